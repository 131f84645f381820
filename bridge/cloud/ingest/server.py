"""The ingest node: mTLS gRPC, site authentication, dedupe, commit, then acknowledge.

A ``PushBatch`` is answered only after ``Store.commit`` returned, i.e. after an fsynced
SQLite transaction holding the readings and the ledger change. The peer's identity comes from
its verified client certificate (``bridge.shared.pki.identity_from_pem``): a site certificate
may push only envelopes whose ``site_id`` is its own; a consumer certificate may only read.
Anything else is PERMISSION_DENIED, counted and logged, and nothing of the call is stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.cloud.ingest.admission import Admission
from bridge.cloud.ingest.authz import Authorizer
from bridge.cloud.ingest.denylist import DenyList
from bridge.cloud.ingest.gate import Gate
from bridge.cloud.ingest.limits import Limits, store_refusal
from bridge.cloud.ingest.listen import bind, server_credentials
from bridge.cloud.ingest.observe import (
    SERVICE,
    AdmissionMetrics,
    DenyListMetrics,
    Metered,
    SiteProgress,
)
from bridge.cloud.ingest.ratelimit import SiteLimiter
from bridge.cloud.store import open_backend
from bridge.cloud.store.backend import Backend, status_reply
from bridge.cloud.store.records import COMMITTED, DUPLICATE, Incoming
from bridge.shared import defaults as D
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.certinfo import ROLE_CONSUMER, ROLE_SITE
from bridge.shared.config import IngestConfig, JetStreamSettings, TlsConfig, load_ingest
from bridge.shared.httpserve import HttpEndpoint, loop_answers
from bridge.shared.reload import Reloader
from bridge.shared.service import Notifier
from bridge.shared.telemetry import CertExpiry, IngestMetrics, event

MAX_BATCH_ID = 128  # the agent sends a UUID (36); anything longer is refused, not logged
SUBSCRIBE_BATCH = 500  # readings per SubscribeBatches message at most

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # Pair with the agent's keepalive (bridge.common.channel_options): pings every 10 s are
    # welcome.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # One owner per address: grpcio sets SO_REUSEPORT by default, and a second node on the
    # same port would then start and split connections (and dedupe ledgers) with the first.
    ("grpc.so_reuseport", 0),
    # Connections roll over so rotated server certificates take effect.
    ("grpc.max_connection_age_ms", 3_600_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]


@dataclass(slots=True)
class _Prepared:
    """A validated batch: the Ack so far, and the envelopes (with their positions) to commit."""

    ack: pb.Ack
    incoming: list[Incoming] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rejected: int = 0


class IngestService(pb_grpc.IngestServicer):
    def __init__(self, *, node: str, backend: Backend, metrics: IngestMetrics,
                 limiter: SiteLimiter | None = None, limits: Limits | None = None,
                 deny_list: DenyList | None = None, admission: Admission | None = None,
                 ) -> None:
        self.node = node
        self.limits = limits or Limits()
        self.admission = admission
        self.gate = Gate(node=node, limits=self.limits, metrics=metrics, limiter=limiter,
                         admission=admission)
        self.backend = backend
        self.metrics = metrics
        self.authz = Authorizer(metrics=metrics, deny_list=deny_list)
        self.last_commit: dict[str, float] = {}

    async def PushBatch(self, request: pb.Batch,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.Ack:
        t0 = time.perf_counter()
        ident = await self.authz.caller(context, ROLE_SITE)
        if len(request.batch_id) > MAX_BATCH_ID:  # it is logged and echoed in the Ack
            self.metrics.batches.labels("INVALID_ARGUMENT").inc()
            event("ingest.batch", level=logging.WARNING, site=ident.name,
                  batch_id=request.batch_id[:MAX_BATCH_ID] + "...", status="INVALID_ARGUMENT",
                  flag="UPE", reason=f"batch_id of {len(request.batch_id)} characters")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"batch_id is {len(request.batch_id)} characters; at most "
                                f"{MAX_BATCH_ID}")
        # A whole call's bounds and the node's admission come before any per-envelope work.
        await self.gate.enter(context, ident.name, request, t0)
        a0 = time.perf_counter()
        try:
            return await self._push(request, context, ident.name, t0)
        finally:
            self.gate.leave(ident.name, len(request.envelopes), time.perf_counter() - a0)

    async def _push(self, request: pb.Batch, context: grpc.aio.ServicerContext[Any, Any],
                    site: str, t0: float) -> pb.Ack:
        # Validation and the Ack, proportional to the batch, run on a thread (the event loop
        # keeps answering health checks and other sites); the backend owns the commit. A
        # thread-bound store (SQLite) does all three in one hop on its writer thread.
        inline = self.backend.inline_commit
        c0 = time.perf_counter()
        try:
            if inline is not None:
                result = await asyncio.wrap_future(self.backend.executor.submit_for(
                    site, len(request.envelopes), self._admit_inline, inline, request, site))
            else:
                result = await self._admit_async(request, site)
        except Exception as exc:  # noqa: BLE001 - the store failed: say so, never a traceback
            self.metrics.batches.labels("UNAVAILABLE").inc()
            self.metrics.store_errors.inc()
            detail = f"{type(exc).__name__}: {exc}"[:200]
            event("ingest.store_failed", level=logging.ERROR, site=site,
                  batch_id=request.batch_id, reason=detail, flag="UF")
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"store unavailable on {self.node}: {detail}")
        if isinstance(result, str):
            self.metrics.batches.labels("PERMISSION_DENIED").inc()
            await self.authz.deny(context, "site_mismatch",
                             f"certificate is for site {site!r}, batch carries "
                             f"{result[:100]!r}", identity=site, claimed=result[:100],
                             batch_id=request.batch_id)
        self.backend.committed_now()
        self.metrics.commit_seconds.observe(time.perf_counter() - c0)
        ack, committed, duplicates, rejected = result
        if committed:
            self.metrics.committed.labels(site).inc(committed)
            self.last_commit[site] = time.time()
        if duplicates:
            self.metrics.duplicates.labels(site).inc(duplicates)
        self.metrics.batches.labels("OK").inc()
        if next_ms := self.gate.next_turn_ms(site, request):
            ack.next_after_ms = min(next_ms, 0xFFFFFFFF)
        event("ingest.batch", site=site, batch_id=request.batch_id,
              readings=len(request.envelopes), committed=committed, duplicates=duplicates,
              rejected=rejected, status="OK", flag="-", peer=context.peer(),
              duration_ms=round((time.perf_counter() - t0) * 1000, 3),
              **({"next_after_ms": next_ms} if next_ms else {}))
        return ack

    def _validate(self, request: pb.Batch, site: str) -> _Prepared | str:
        """Check every envelope; the Ack with the rejections filled in and what to commit.

        Returns the claimed site id instead when an envelope names another site (the whole
        call is denied).
        """
        limits = self.limits
        # Fields this version does not know are not stored: a later field (an identity one
        # included) must never reach consumers through an ingest that could not check it.
        request.DiscardUnknownFields()
        p = _Prepared(ack=pb.Ack(batch_id=request.batch_id, node=self.node))
        results = p.ack.results
        rejected = self.metrics.rejected
        for i, env in enumerate(request.envelopes):
            if env.site_id != site:
                return env.site_id
            r = results.add(site_id=env.site_id, epoch=env.epoch, seq=env.seq)
            reason = limits.check(env)
            if reason is not None:
                r.disposition = pb.DISPOSITION_REJECTED
                r.reason = reason
                rejected.labels(reason.split(":", 1)[0]).inc()
                p.rejected += 1
                continue
            p.positions.append(i)
            drop = env.dropped if env.HasField("dropped") else None
            p.incoming.append(Incoming(env.site_id, env.epoch, env.seq,
                                       env.SerializeToString(),
                                       last_seq=drop.last_seq if drop else None,
                                       reason=drop.reason if drop else ""))
        return p

    async def _admit_async(self, request: pb.Batch, site: str
                           ) -> tuple[pb.Ack, int, int, int] | str:
        """Validate and answer on a thread, commit through the (async) backend."""
        executor = self.backend.executor  # one turn per site at a time (ingest/fair.py)
        n = len(request.envelopes)
        p = await asyncio.wrap_future(executor.submit_for(site, n, self._validate, request,
                                                          site))
        if isinstance(p, str):
            return p
        outcomes = await self.backend.commit(p.incoming) if p.incoming else []
        return await asyncio.wrap_future(executor.submit_for(site, n, self._finish, p,
                                                             outcomes))

    def _admit_inline(self, commit: Callable[[Sequence[Incoming]], list[str]],
                      request: pb.Batch, site: str) -> tuple[pb.Ack, int, int, int] | str:
        """Validate, commit and build the Ack in one go, on the store's own thread."""
        p = self._validate(request, site)
        if isinstance(p, str):
            return p
        return self._finish(p, commit(p.incoming) if p.incoming else [])

    def _finish(self, p: _Prepared, outcomes: list[str]) -> tuple[pb.Ack, int, int, int]:
        """The backend's outcomes into the Ack, with watermarks; (ack, committed, dup, rej)."""
        results = p.ack.results
        committed = duplicates = 0
        n_rejected = p.rejected
        for pos, outcome in zip(p.positions, outcomes, strict=True):
            r = results[pos]
            if outcome == COMMITTED:
                r.disposition = pb.DISPOSITION_COMMITTED
                committed += 1
            elif outcome == DUPLICATE:
                r.disposition = pb.DISPOSITION_DUPLICATE
                duplicates += 1
            else:
                r.disposition = pb.DISPOSITION_REJECTED
                r.reason = store_refusal(outcome, max_epochs=self.backend.max_epochs_per_site,
                                         max_gaps=self.backend.max_gaps_per_stream)
                self.metrics.rejected.labels(outcome).inc()
                n_rejected += 1
        for key in sorted({(i.site_id, i.epoch) for i in p.incoming}):
            if (wm := self.backend.watermark(key)) is not None:
                p.ack.watermarks.add(site_id=key[0], epoch=key[1], committed_through=wm)
        return p.ack, committed, duplicates, n_rejected

    async def Subscribe(self, request: pb.SubscribeRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[
                            pb.Committed]:
        async for batch in self._committed(request, context, 1):
            for c in batch.items:
                yield c

    async def SubscribeBatches(self, request: pb.SubscribeRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[
                                   pb.CommittedBatch]:
        async for batch in self._committed(request, context, SUBSCRIBE_BATCH):
            yield batch

    async def _committed(self, request: pb.SubscribeRequest,
                         context: grpc.aio.ServicerContext[Any, Any], most: int
                         ) -> AsyncIterator[pb.CommittedBatch]:
        """What a consumer reads from the cursors on, in batches of up to ``most``."""
        ident = await self.authz.caller(context, ROLE_CONSUMER)
        cursors = {(c.site_id, c.epoch): c.after_seq for c in request.cursors}
        self.metrics.subscribers.inc()
        try:
            # Revocation and expiry end the stream too, not only new calls (authz.py).
            records = self.backend.read(follow=request.follow, cursors=cursors)
            async for ready in self.authz.guard(records, ident, ROLE_CONSUMER, context,
                                                batch=most):
                out = pb.CommittedBatch()
                for blob, commit_ns in ready:
                    c = out.items.add(commit_time_ns=commit_ns, node=self.node)
                    try:
                        c.envelope.MergeFromString(blob)  # parsed in place, not copied
                    except DecodeError:  # not ours (another publisher on the stream)
                        del out.items[-1]
                        self.metrics.foreign_records.inc()
                        event("ingest.unreadable_record", level=logging.WARNING,
                              bytes=len(blob))
                        continue
                    env = c.envelope
                    if env.seq <= cursors.get((env.site_id, env.epoch), 0):
                        del out.items[-1]
                if out.items:
                    yield out
        finally:
            self.metrics.subscribers.dec()

    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.StatusReply:
        await self.authz.caller(context, ROLE_CONSUMER)
        try:
            streams = await self.backend.status()
        except Exception as exc:  # noqa: BLE001 - a clear answer, never a traceback
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"store unavailable on {self.node}: {type(exc).__name__}: "
                                f"{exc}"[:300])
        return status_reply(self.node, streams)

    async def close(self, timeout: float = 5.0) -> bool:
        """Stop the threads and the backend; False if the store was still busy after
        ``timeout`` (nothing it holds was acknowledged)."""
        return await self.backend.close(timeout)


class IngestNode:
    """A running ingest node (server, health, store); used by the CLI and by tests."""

    def __init__(self, *, node: str, listen: str, tls: TlsConfig, store_path: Path | None = None,
                 jetstream: JetStreamSettings | None = None,
                 rate_limit_per_s: float = 0.0, rate_limit_burst: float = 0.0,
                 metrics: IngestMetrics | None = None, limits: Limits | None = None,
                 max_epochs_per_site: int = D.MAX_EPOCHS_PER_SITE,
                 max_gaps_per_stream: int = D.MAX_GAPS_PER_STREAM,
                 health_listen: str | None = None, deny_list: Path | None = None) -> None:
        self.node = node
        self.metrics = metrics or IngestMetrics()
        self.backend: Backend = open_backend(
            store_path=store_path, jetstream=jetstream, max_epochs_per_site=max_epochs_per_site,
            max_gaps_per_stream=max_gaps_per_stream, metrics=self.metrics,
            on_health=self._store_health)
        limiter = SiteLimiter(rate=rate_limit_per_s, burst=max(rate_limit_burst, 1.0)) \
            if rate_limit_per_s > 0 else None
        denied = DenyList(path=deny_list) if deny_list is not None else None
        lim = limits or Limits()
        admission = Admission(target_s=lim.admit_target_ms / 1000,
                              max_wait_s=lim.admit_wait_ms / 1000,
                              ceiling=lim.max_in_flight_readings) \
            if lim.admit_target_ms > 0 else None
        self.service = IngestService(node=node, backend=self.backend, metrics=self.metrics,
                                     limiter=limiter, limits=lim, deny_list=denied,
                                     admission=admission)
        if admission is not None:
            self.metrics.registry.register(AdmissionMetrics(admission=admission))
        if denied is not None:
            self.metrics.registry.register(DenyListMetrics(deny_list=denied))
        self.health = health_aio.HealthServicer()
        self._not_ready = ["starting"]  # reasons for /readyz; [] once serving
        self.metrics.registry.register(SiteProgress(backend=self.backend,
                                                     last_commit=self.service.last_commit))
        self.metrics.registry.register(CertExpiry(files={"server": tls.cert, "ca": tls.ca}))
        # gRPC refuses a larger message before it is parsed (limits.max_batch_bytes), and a
        # connection carries at most a site's calls in flight (an agent keeps 4 and a health
        # check): a client past that waits on its own side, before any of it is parsed.
        limits = self.service.limits
        own = [("grpc.max_receive_message_length", limits.max_batch_bytes),
               ("grpc.max_concurrent_streams", limits.max_in_flight_per_site)]
        self.server = grpc.aio.server(options=[*SERVER_OPTIONS, *own],
                                      interceptors=[Metered(metrics=self.metrics)])
        pb_grpc.add_IngestServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = bind(self.server, listen, "listen", server_credentials(tls))
        # Kubelet gRPC probes speak plaintext and carry no client certificate: a second server
        # on its own port answers grpc.health.v1 only (the Ingest service is never plaintext).
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if health_listen:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = bind(self.health_server, health_listen, "health.listen", None)

    def readiness(self) -> list[str]:
        """Why the node is not ready (``/readyz``; [] when it is)."""
        return list(self._not_ready)

    async def _store_health(self, ok: bool) -> None:
        """The Ingest service's health follows the store's connection: NOT_SERVING while it
        is lost (agents and readiness probes leave the node). The server's own status ("")
        stays SERVING: it is what a liveness probe asks, and a lost NATS connection is not
        cured by restarting the pod."""
        status = health_pb2.HealthCheckResponse.SERVING if ok else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE, status)
        self._not_ready = [] if ok else ["the store's connection is lost"]
        event("ingest.health", node=self.node, serving=ok, reason="store connection "
              + ("restored" if ok else "lost"), level=logging.INFO if ok else logging.WARNING)

    async def start(self) -> None:
        await self.backend.start()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._not_ready = []
        event("ingest.listening", node=self.node, port=self.port,
              health_port=self.health_port or None)

    async def stop(self, grace: float = 5.0) -> bool:
        """Stop within ``grace`` seconds; False if the store's writer was still busy then.

        Nothing a busy writer holds has been acknowledged: SQLite rolls its transaction back
        when the process exits, and the agent resends the batch elsewhere.
        """
        t0 = time.monotonic()
        self._not_ready = ["stopping"]
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        left = max(0.1, grace - (time.monotonic() - t0))
        idle = await self.service.close(left)
        event("ingest.stopped", node=self.node, clean=idle,
              stop_s=round(time.monotonic() - t0, 3))
        return idle


def _reloader(config: IngestConfig, node: IngestNode) -> Reloader[IngestConfig]:
    """SIGHUP: the log level applies at once, the deny-list is re-read; the node's own
    certificate is re-read by grpcio at the next handshake after the files change (checked
    here first); every other key needs a restart and is named."""

    def load() -> IngestConfig:
        new = load_ingest(config.file)
        new.tls.verified(role=None)
        return new

    async def refresh() -> list[str]:
        deny = node.service.authz.deny_list
        if deny is None:
            return []
        deny.refresh(force=True)
        return ["revocation.deny_list (re-read)"]

    for outcome in ("ok", "restart_needed", "failed"):
        node.metrics.config_reloads.labels(outcome)
    return Reloader(component="ingest", running=config, load=load,
                    appliers={"log.level": lambda c: logging.getLogger("bridge").setLevel(
                        c.log_level.upper())},
                    refresh=refresh, counter=node.metrics.config_reloads)


async def _reload_on(hup: asyncio.Event, reloader: Reloader[IngestConfig]) -> None:
    while True:
        await hup.wait()
        hup.clear()
        await reloader.reload()


async def run(config: IngestConfig) -> None:
    node = IngestNode(node=config.node, listen=config.listen, tls=config.tls,
                      store_path=config.store_path, jetstream=config.jetstream,
                      rate_limit_per_s=config.rate_limit_per_s,
                      rate_limit_burst=config.rate_limit_burst,
                      limits=Limits(max_batch_envelopes=config.max_batch_envelopes,
                                    max_tombstone_span=config.max_tombstone_span,
                                    max_batch_bytes=config.max_batch_bytes,
                                    max_in_flight_per_site=config.max_in_flight_per_site,
                                    admit_target_ms=config.admit_target_ms,
                                    admit_wait_ms=config.admit_wait_ms,
                                    max_in_flight_readings=config.max_in_flight_readings),
                      max_epochs_per_site=config.max_epochs_per_site,
                      max_gaps_per_stream=config.max_gaps_per_stream,
                      health_listen=config.health_listen, deny_list=config.deny_list)
    http = None
    if config.metrics_listen:
        loop = asyncio.get_running_loop()
        http = HttpEndpoint(listen=config.metrics_listen, registry=node.metrics.registry,
                            status=lambda: {"node": config.node, "port": node.port},
                            live=lambda: loop_answers(loop), ready=node.readiness)
        http.start()
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    notifier = Notifier(component="ingest")
    async with asyncio.TaskGroup() as tg:
        reload = tg.create_task(_reload_on(hup, _reloader(config, node)), name="config-reload")
        notify = tg.create_task(notifier.run(
            waiting_for=lambda: None,
            status=lambda: f"serving on port {node.port}; "
                           f"{len(node.service.last_commit)} sites committed since start"),
            name="service-notify")
        await stop.wait()
        notify.cancel()
        reload.cancel()
    event("ingest.stopping", node=config.node)
    clean = await node.stop()
    if http:
        http.stop()
    if not clean:
        # The writer is stuck (a hung disk, a held lock): its executor thread would hold up
        # interpreter exit. Leave now; nothing it holds was acknowledged.
        event("ingest.stop_forced", level=logging.ERROR, node=config.node,
              reason="store writer still busy after the grace period")
        logging.shutdown()
        os._exit(1)
