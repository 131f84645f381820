"""The ingest's own metrics that need more than a counter call: per-call request counts (an
interceptor, so every method and every abort is counted once) and per-site progress read from
the ledger at scrape time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.cloud.ingest.admission import Admission
from bridge.cloud.ingest.denylist import DenyList
from bridge.cloud.store.backend import Backend
from bridge.shared.telemetry import IngestMetrics

SERVICE = "bridge.v1.Ingest"


def _code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


class Metered(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call of the Ingest service by method and status code, and those in flight.

    Health checks are not counted: the kubelet's probes are not load, and the autoscaler scales
    on this counter.
    """

    def __init__(self, *, metrics: IngestMetrics) -> None:
        self._metrics = metrics

    @contextlib.contextmanager
    def _counted(self, method: str, context: grpc.aio.ServicerContext[Any, Any]
                 ) -> Iterator[None]:
        """One call in flight while the block runs; counted by its final status code."""
        in_flight = self._metrics.in_flight.labels(method)
        in_flight.inc()
        exc: BaseException | None = None
        try:
            yield
        except BaseException as e:
            exc = e
            raise
        finally:
            in_flight.dec()
            self._metrics.requests.labels(method, _code(context, exc)).inc()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        # The stubs type handlers as synchronous; on grpc.aio they are coroutine functions.
        handler: Any = await continuation(details)
        path: str = details.method
        if handler is None or not path.startswith(f"/{SERVICE}/"):
            return handler
        method = path.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with self._counted(method, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[Any]:
                with self._counted(method, context):
                    async for item in stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                streaming, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


class SiteProgress(Collector):
    """Per site, at scrape time: the last commit's time and the committed-through watermark.

    The watermark is that of the site's highest epoch this node's ledger knows (a JetStream
    replica knows the subjects it has served). Reading the ledger's dict from the scrape thread
    is a C-level copy under the GIL; the writer thread never sees it.
    """

    def __init__(self, *, backend: Backend, last_commit: dict[str, float]) -> None:
        self._backend = backend
        self._last_commit = last_commit

    def collect(self) -> Iterable[Metric]:
        mark = GaugeMetricFamily("bridge_ingest_site_committed_through", "Every seq at or below "
                                 "this is committed, for the site's newest epoch on this node",
                                 labels=["site"])
        epochs = GaugeMetricFamily("bridge_ingest_site_epochs", "Epochs of the site this node's "
                                   "ledger holds", labels=["site"])
        for site, (watermark, count) in sorted(self._backend.sites().items()):
            mark.add_metric([site], float(watermark))
            epochs.add_metric([site], float(count))
        last = GaugeMetricFamily("bridge_ingest_site_last_commit_timestamp_seconds", "Unix time "
                                 "of the last batch that committed new readings of the site on "
                                 "this node", labels=["site"])
        for site, ts in sorted(list(self._last_commit.items())):
            last.add_metric([site], ts)
        yield mark
        yield epochs
        yield last


class DenyListMetrics(Collector):
    """The deny-list's size and reloads, read at scrape time (``bridge.cloud.ingest.denylist``)."""

    def __init__(self, *, deny_list: DenyList) -> None:
        self._deny_list = deny_list

    def collect(self) -> Iterable[Metric]:
        entries = GaugeMetricFamily("bridge_ingest_deny_list_entries", "Revoked serials and "
                                    "fingerprints in force")
        entries.add_metric([], float(len(self._deny_list.entries)))
        reloads = CounterMetricFamily("bridge_ingest_deny_list_reloads", "Changes of the "
                                      "deny-list file taken (ok) or refused, keeping the "
                                      "previous entries (error)", labels=["outcome"])
        for outcome, n in sorted(self._deny_list.reloads.items()):
            reloads.add_metric([outcome], float(n))
        yield entries
        yield reloads


class AdmissionMetrics(Collector):
    """Admission control's state at scrape time (``bridge.cloud.ingest.admission``)."""

    def __init__(self, *, admission: Admission) -> None:
        self._a = admission

    def collect(self) -> Iterable[Metric]:
        a = self._a
        for name, doc, value in (
                ("bridge_ingest_admission_limit_readings", "Readings this node admits in flight "
                 "at once, re-sized from its measured call times", a.limit),
                ("bridge_ingest_admission_in_flight_readings", "Readings admitted and not yet "
                 "answered", a.in_flight),
                ("bridge_ingest_admission_held_readings", "Readings of calls held briefly for "
                 "room (they are admitted within limits.admit_wait_ms)", a.held_readings),
                ("bridge_ingest_admission_line_seconds", "How far ahead the calls refused as "
                 "node_busy were told to come back", a.line_s),
                ("bridge_ingest_admission_early_waiting_calls", "Calls of sites that asked "
                 "before they were told to, waiting on the node for their time", a.early_holding),
                ("bridge_ingest_admission_rate_readings_per_second", "Commit rate measured while "
                 "the node refused work (what spaces the retry-after of waiting sites)", a.rate)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        why = CounterMetricFamily("bridge_ingest_admission_refusals", "Calls refused as "
                                  "node_busy, by why: full (no room within the wait allowed), "
                                  "late (the call already waited that long before its handler "
                                  "ran), early (its site came back before it was told to), "
                                  "share (its site ran ahead of its share while others wait)",
                                  labels=["why"])
        for k, v in sorted(a.refused.items()):
            why.add_metric([k], float(v))
        yield why
        early = CounterMetricFamily("bridge_ingest_admission_early_waits", "Calls of sites "
                                    "that asked before they were told to which waited on the "
                                    "node for their time (at most 1 s, inside their deadline)")
        early.add_metric([], float(a.early_holds))
        yield early
        turns = CounterMetricFamily("bridge_ingest_admission_next_turns", "OK answers that "
                                    "named their site's next turn (next_after_ms: the node "
                                    "was in demand and the batch said more was behind it)")
        turns.add_metric([], float(a.next_turns))
        yield turns
