"""Structured events and Prometheus metrics (the HTTP endpoint serving them:
bridge.shared.httpserve).

Every drop, retry and failover is one named event (a JSON log line with a ``reason``) and a
counter. Event and metric names are listed in docs/metrics.md. Each component (agent, ingest)
owns its own ``CollectorRegistry`` so that several can live in one process (tests, the demo).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.shared import certinfo
from bridge.shared.errors import redact

# A counter's ``_created`` series doubles what every scrape carries and no rule or panel reads
# it (the process start time is process_start_time_seconds).
disable_created_metrics()  # type: ignore[no-untyped-call]

_log = logging.getLogger("bridge")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``event`` plus the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(out, default=str).decode())  # no password in a log


def setup_logging(level: str = "info", *, component: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("bridge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("bridge").info("", extra={"event": f"{component}.starting",
                                               "fields": {}})


def event(name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Emit a named structured event (never on the per-reading path)."""
    if _log.isEnabledFor(level):
        _log.log(level, name, extra={"event": name, "fields": fields})


class CertExpiry(Collector):
    """``bridge_cert_expiry_seconds``: seconds until each held certificate's notAfter.

    Read from the files at scrape time (parsed again only when a file's mtime changes), so the
    figure follows a rotated certificate and goes negative once one has expired. A file that
    cannot be read or parsed yields ``bridge_cert_unreadable{cert} 1`` instead of a stale value.
    """

    def __init__(self, *, files: Mapping[str, Path], clock: Callable[[], float] = time.time
                 ) -> None:
        self._files = dict(files)
        self._clock = clock
        self._cache: dict[str, tuple[float, list[tuple[str, float]]]] = {}
        self._unreadable: dict[str, str] = {}

    def _read(self, role: str, path: Path) -> list[tuple[str, float]] | None:
        try:
            mtime = path.stat().st_mtime
            hit = self._cache.get(role)
            if hit is not None and hit[0] == mtime:
                return hit[1]
            out = certinfo.read_pem(path.read_bytes())
        except (OSError, ValueError) as exc:
            if self._unreadable.get(role) != str(exc):  # once per cause, not per scrape
                self._unreadable[role] = str(exc)
                event("telemetry.cert_unreadable", level=logging.WARNING, cert=role,
                      path=str(path), reason=f"{type(exc).__name__}: {exc}"[:200])
            return None
        self._unreadable.pop(role, None)
        self._cache[role] = (mtime, out)
        return out

    def collect(self) -> Iterable[Metric]:
        expiry = GaugeMetricFamily("bridge_cert_expiry_seconds", "Seconds until the "
                                   "certificate's notAfter (negative once expired), by the "
                                   "role it plays here (client, server, ca) and its subject",
                                   labels=["cert", "subject"])
        bad = GaugeMetricFamily("bridge_cert_unreadable", "1 when a configured certificate file "
                                "cannot be read or parsed", labels=["cert"])
        now = self._clock()
        for role, path in self._files.items():
            certs = self._read(role, path)
            bad.add_metric([role], 0.0 if certs is not None else 1.0)
            for subject, not_after in certs or ():
                expiry.add_metric([role, subject], not_after - now)
        yield expiry
        yield bad


def _component_registry(component: str, registry: CollectorRegistry | None) -> CollectorRegistry:
    """A registry with the process metrics (CPU, RSS, fds, start time) and build info."""
    r = registry or CollectorRegistry()
    ProcessCollector(registry=r)
    Gauge("bridge_build_info", "1, labelled with the component and its version",
          ["component", "version", "python"], registry=r).labels(
        component, __version__, sys.version.split()[0]).set(1)
    return r


class AgentMetrics:
    """The agent's metrics; names documented in docs/metrics.md."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = _component_registry("agent", registry)
        self.config_reloads = Counter(
            "bridge_config_reloads", "SIGHUP reloads by outcome: ok, restart_needed (a changed "
            "key needs a restart, named in agent.reloaded), failed (the file was refused)",
            ["outcome"], registry=r)
        self.site = Gauge("bridge_agent_site", "1, labelled with the site id this agent "
                          "ships for (join on instance to name a gateway's series)",
                          ["site"], registry=r)
        self.spool_max_bytes = Gauge("bridge_spool_max_bytes", "The spool's bound on envelope "
                                     "and dead-letter bytes (max_bytes)", registry=r)
        self.spool_fill = Gauge("bridge_spool_fill_ratio", "Envelope plus dead-letter bytes "
                                "held, as a fraction of max_bytes (1.0 is full)", registry=r)
        self.source_messages = Counter("bridge_source_messages", "Messages taken from a broker",
                                       ["source"], registry=r)
        self.source_redelivered_skipped = Counter(
            "bridge_source_redeliveries_skipped",
            "Redelivered messages acked without storing because the spool already held them",
            ["source"], registry=r)
        self.source_up = Gauge("bridge_source_up", "1 when the source is connected and subscribed",
                               ["source"], registry=r)
        self.source_connects = Counter("bridge_source_connects", "Broker (re)connections",
                                       ["source", "session_present"], registry=r)
        self.source_failures = Counter(
            "bridge_source_connection_failures", "Broker connections refused or lost, by kind "
            "(connect_failed, lost)", ["source", "kind"], registry=r)
        self.dead_letters = Counter("bridge_dead_letters", "Messages dead-lettered, by reason",
                                    ["reason"], registry=r)
        self.source_skipped = Counter(
            "bridge_source_skipped", "Messages acked without storing a reading, by reason "
            "(host_state, stale_death)", ["source", "reason"], registry=r)
        self.sparkplug_events = Counter(
            "bridge_sparkplug_events", "Sparkplug host events: seq_gap, rebirth_requested, "
            "stale_death, state_unreadable", ["source", "kind"], registry=r)
        self.source_published = Counter(
            "bridge_source_published", "Messages the agent published to a plant broker "
            "(Sparkplug STATE, rebirth requests), by outcome", ["source", "outcome"], registry=r)
        self.spool_readings = Gauge("bridge_spool_readings", "Readings held in the spool",
                                    registry=r)
        self.spool_bytes = Gauge("bridge_spool_bytes", "Envelope bytes held in the spool",
                                 registry=r)
        self.spool_quarantines = Gauge("bridge_spool_quarantines",
                                       "Corrupt spool files moved aside since start", registry=r)
        self.spool_salvaged = Gauge("bridge_spool_salvaged_readings",
                                    "Readings salvaged from quarantined spool files since start",
                                    registry=r)
        self.spool_dropped = Counter("bridge_spool_dropped", "Readings a bound forced out, by "
                                     "reason (sent on as tombstones)", ["reason"], registry=r)
        self.spool_oldest_age = Gauge("bridge_spool_oldest_age_seconds",
                                      "Age of the oldest spooled reading (spool clock)",
                                      registry=r)
        self.spool_commits = Counter("bridge_spool_commits", "Spool group commits", registry=r)
        self.spool_full = Counter("bridge_spool_full", "Commits refused because the spool is full",
                                  registry=r)
        self.spool_commit_errors = Counter(
            "bridge_spool_commit_errors", "Group commits that failed for a reason other than a "
            "full spool (retried with backoff; nothing acked meanwhile)", registry=r)
        self.dead_letters_replayed = Counter(
            "bridge_dead_letters_replayed", "Dead letters replayed into readings by `bridge "
            "dead-letters replay` (kept in the spool; read when the agent starts)", registry=r)
        self.dead_letters_purged = Counter(
            "bridge_dead_letters_purged", "Dead letters deleted by `bridge dead-letters purge` "
            "(kept in the spool; read when the agent starts)", registry=r)
        self.dead_letters_evicted = Counter(
            "bridge_spool_dead_letters_evicted", "Dead letters removed to keep the table within "
            "its bounds, oldest first", registry=r)
        self.source_retransmissions = Counter(
            "bridge_source_retransmissions_skipped", "Publisher retransmissions (a byte-identical "
            "message with the publisher's own seq, on the same topic, within the redelivery "
            "ring) acked without storing", ["source"], registry=r)
        self.protocol_errors = Counter(
            "bridge_uplink_protocol_errors", "Acks the agent could not accept (wrong count, "
            "unknown disposition, identity mismatch); the batch is retried, nothing released",
            ["endpoint", "kind"], registry=r)
        self.netbind_refused = Counter(
            "bridge_netbind_refused", "CONNECTs to a bind proxy for anything but its endpoint's "
            "target (refused with 403)", ["endpoint"], registry=r)
        self.stalls = Counter(
            "bridge_uplink_stalls", "Calls that timed out on an endpoint whose health checks "
            "passed (gray failure): the endpoint is taken out and its batches moved",
            ["endpoint"], registry=r)
        self.refused = Counter(
            "bridge_uplink_refused", "Calls an ingest refused because of this site's identity "
            "(PERMISSION_DENIED, UNAUTHENTICATED: revoked, wrong certificate); the batch stays "
            "in the spool", ["endpoint", "code"], registry=r)
        self.endpoint_refused = Gauge(
            "bridge_uplink_endpoint_refused", "1 while an endpoint refuses this site's identity "
            "(it is out of rotation and retried every uplink.refused_retry_s)", ["endpoint"],
            registry=r)
        self.batches = Counter("bridge_uplink_batches", "Batches sent, by endpoint and outcome",
                               ["endpoint", "code"], registry=r)
        self.readings_acked = Counter("bridge_uplink_readings_acked",
                                      "Readings acknowledged by the ingest, by disposition",
                                      ["endpoint", "disposition"], registry=r)
        self.retries = Counter("bridge_uplink_retries", "Batches resent after a failed attempt",
                               ["endpoint", "flag"], registry=r)
        self.throttled = Counter("bridge_uplink_throttled", "Attempts answered RESOURCE_EXHAUSTED",
                                 ["endpoint"], registry=r)
        self.throttle_wait = Counter(
            "bridge_uplink_throttle_wait_seconds", "Seconds batches waited on an ingest's "
            "retry-after (RESOURCE_EXHAUSTED: busy, not broken)", ["endpoint"], registry=r)
        self.next_turns = Counter(
            "bridge_uplink_next_turns", "OK answers of an ingest in demand that named the "
            "backlog's next turn (it waits for it instead of being refused)", ["endpoint"],
            registry=r)
        self.next_turn_wait = Counter(
            "bridge_uplink_next_turn_wait_seconds", "Seconds the backlog waited for the turns "
            "named by OK answers (next_after_ms)", ["endpoint"], registry=r)
        self.batch_seconds = Histogram("bridge_uplink_batch_seconds", "PushBatch duration",
                                       ["endpoint"], registry=r)
        self.failovers = Counter("bridge_uplink_failovers", "Active endpoint changes on failure",
                                 ["from_endpoint", "to_endpoint"], registry=r)
        self.breaker_state = Gauge("bridge_uplink_breaker_state",
                                   "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                   ["endpoint"], registry=r)
        self.breaker_trips = Counter("bridge_uplink_breaker_trips", "Times the breaker opened",
                                     ["endpoint"], registry=r)
        self.endpoint_healthy = Gauge("bridge_uplink_endpoint_healthy",
                                      "1 when the endpoint is considered healthy",
                                      ["endpoint"], registry=r)
        self.tls_reloads = Counter("bridge_tls_reloads", "Changed uplink certificate files "
                                   "loaded into new channels (ok) or refused (failed)",
                                   ["outcome"], registry=r)


class IngestMetrics:
    """The ingest node's metrics; names documented in docs/metrics.md."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = _component_registry("ingest", registry)
        self.config_reloads = Counter(
            "bridge_ingest_config_reloads", "SIGHUP reloads by outcome: ok, restart_needed, "
            "failed", ["outcome"], registry=r)
        self.requests = Counter("bridge_ingest_requests", "gRPC calls answered, by method and "
                                "status code (the autoscaler's per-pod request rate)",
                                ["method", "code"], registry=r)
        self.in_flight = Gauge("bridge_ingest_requests_in_flight", "gRPC calls being served "
                               "(Subscribe streams count while open)", ["method"], registry=r)
        self.batches = Counter("bridge_ingest_batches", "PushBatch calls by outcome",
                               ["code"], registry=r)
        self.committed = Counter("bridge_ingest_readings_committed", "Readings newly committed",
                                 ["site"], registry=r)
        self.duplicates = Counter("bridge_ingest_duplicates", "Readings already committed",
                                  ["site"], registry=r)
        self.rejected = Counter("bridge_ingest_rejected", "Readings rejected, by reason",
                                ["reason"], registry=r)
        self.foreign_records = Counter(
            "bridge_ingest_foreign_records", "Messages on the store's subjects that no replica "
            "wrote (not an envelope, or no identity headers): skipped", registry=r)
        self.store_errors = Counter("bridge_ingest_store_errors", "Batches the store failed to "
                                    "commit (answered UNAVAILABLE, nothing acked)", registry=r)
        self.throttled = Counter("bridge_ingest_throttled", "Batches refused over the rate limit",
                                 ["site"], registry=r)
        self.refused = Counter("bridge_ingest_refused_batches", "Calls refused whole with "
                               "RESOURCE_EXHAUSTED before any per-envelope work: batch_too_large,"
                               " site_in_flight, rate_limit, node_busy", ["reason"], registry=r)
        self.denied = Counter("bridge_ingest_denied", "Calls refused for identity reasons",
                              ["reason"], registry=r)
        self.commit_seconds = Histogram("bridge_ingest_commit_seconds", "Store commit duration",
                                        registry=r)
        self.subscribers = Gauge("bridge_ingest_subscribers", "Open Subscribe streams",
                                 registry=r)
        # JetStream replicas only (bridge.cloud.store.subjects).
        self.checkpoints = Counter(
            "bridge_ingest_checkpoints", "Subject checkpoints by outcome: written, too_large, "
            "failed, loaded, missing, ignored, disabled", ["outcome"], registry=r)
        self.catchup_messages = Counter(
            "bridge_ingest_catchup_messages", "Stored messages a replica read to bring a "
            "subject's ledger up to date (the tail after its checkpoint)", registry=r)
        self.catchup_seconds = Histogram(
            "bridge_ingest_catchup_seconds", "Time to read a subject's tail", registry=r)
        self.subject_states = Gauge(
            "bridge_ingest_subject_states", "Subject states a replica holds", registry=r)
        self.subject_bytes = Gauge(
            "bridge_ingest_subject_state_bytes", "Estimated bytes of the subject states held "
            "(kept within store.cache_mb)", registry=r)
