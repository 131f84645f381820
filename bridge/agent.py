"""The edge agent: sources -> intake (decode, spool commit, broker ack) -> sender -> ingest.

Ownership hand-offs (DESIGN.md "Data flows one way"): a broker message is acked only after the
spool transaction holding its envelope or its dead letter committed; a spool row is released
only after an ingest node acknowledged it. Shutdown runs in the reverse order of the flow:
stop taking from the brokers (after acking everything committed), let in-flight batches finish
within the grace period, then close the uplink and the spool. Whatever was not acknowledged
stays in the spool or in the broker's session for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections import Counter
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt

from bridge._pb import bridge_pb2 as pb
from bridge.codecs import DecodeError, Decoder, make_decoder
from bridge.config import DEFAULT_MAX_PAYLOAD, AgentConfig, SourceConfig
from bridge.envelope import ClockSync, prepare_envelope, seal
from bridge.netbind import BindProxy, resolve_vlan
from bridge.service import Notifier
from bridge.sources import make_source
from bridge.sources.base import Message, Source
from bridge.spool import (
    PRIORITIES,
    AsyncSpool,
    DeadLetter,
    Pending,
    Spool,
    SpoolFull,
    SpoolReset,
)
from bridge.telemetry import AgentMetrics, CertExpiry, HttpEndpoint, event
from bridge.uplink.backoff import Backoff
from bridge.uplink.breaker import CircuitBreaker
from bridge.uplink.pool import Endpoint, EndpointPool
from bridge.uplink.sender import Sender
from bridge.uplink.transport import GrpcTransport

SHUTDOWN_GRACE_S = 5.0


def digest(topic: str, payload: bytes) -> bytes:
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()


class Intake:
    """One source's path into the spool: group commit, then ack in receive order."""

    def __init__(self, *, source: Source, spool: AsyncSpool, site_id: str, decoder: Decoder,
                 commit_max: int, metrics: AgentMetrics, clock: ClockSync,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
                 priority: tuple[tuple[str, str], ...] = (), backpressure_s: float = 60.0,
                 full_policy: str = "drop_oldest", dedupe_retransmissions: bool = True) -> None:
        self.dedupe_retransmissions = dedupe_retransmissions
        self.priority = priority
        self.backpressure_s = backpressure_s
        self.full_policy = full_policy
        self._prio_cache: dict[str, int] = {}
        self.source, self.spool, self.site_id = source, spool, site_id
        self.decoder = decoder
        self.max_payload_bytes = max_payload_bytes
        self.commit_max = commit_max
        self.metrics = metrics
        self.clock = clock
        self._stopping = asyncio.Event()
        self.committed_messages = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        name = self.source.info.name
        self.decoder.restore(await self.spool.run(self.spool.spool.load_state, name))
        backoff = Backoff(base_s=0.05, cap_s=2.0)
        full_since: float | None = None
        while not self._stopping.is_set():
            take = asyncio.ensure_future(self.source.take(self.commit_max))
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
            if take not in done:
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await take
                # The source may have handed us messages as we stopped: commit and ack them.
                if take.cancelled() or take.exception() is not None:
                    break
            stop.cancel()
            messages = take.result()
            pending, dead, skipped, ignored = self._prepare(messages)
            state = {f"{name}/{k}": v for k, v in self.decoder.take_state().items()}
            taken = len(pending)  # stored, or numbered and dropped by reject_new
            while True:
                try:
                    await self.spool.run(self.spool.spool.commit, pending, dead, state)
                    backoff.reset()
                    full_since = None
                    break
                except SpoolReset:
                    continue  # the file was replaced (see bridge.spool Recovery): commit again
                except SpoolFull as exc:
                    # Backpressure: nothing acked, so the broker holds the rest.
                    if self._stopping.is_set():
                        return
                    self.metrics.spool_full.inc()
                    now = time.monotonic()
                    if full_since is None:
                        full_since = now
                        event("spool.full", level=logging.WARNING, source=name,
                              reason=str(exc), waiting=len(messages),
                              policy_after_s=self.backpressure_s, policy=self.full_policy)
                    if now - full_since >= self.backpressure_s and await self._apply_policy(
                            pending):
                        if self.full_policy == "reject_new":
                            pending = []
                        continue
                    await backoff.sleep()
                except Exception as exc:  # noqa: BLE001 - never let the intake task die
                    # Nothing was written or acked; the broker keeps the messages. Visible,
                    # retried with backoff, and the agent stays up to send what it holds.
                    if self._stopping.is_set():
                        return
                    self.metrics.spool_commit_errors.inc()
                    event("spool.commit_failed", level=logging.ERROR, source=name,
                          reason=f"{type(exc).__name__}: {exc}"[:300], waiting=len(messages))
                    await backoff.sleep()
            await self.source.ack(messages)
            self.committed_messages += taken
            self.metrics.source_messages.labels(name).inc(len(messages))
            self.metrics.spool_commits.inc()
            if skipped:
                self.metrics.source_redelivered_skipped.labels(name).inc(skipped)
                event("source.redelivery_skipped", source=name, messages=skipped,
                      reason="already in spool")
            for reason, n in ignored.items():
                if reason == "retransmission":
                    self.metrics.source_retransmissions.labels(name).inc(n)
                self.metrics.source_skipped.labels(name, reason).inc(n)
                event("source.skipped", source=name, messages=n, reason=reason)
            for req in self.decoder.take_requests():
                self.source.publish(req)
            for d in dead:
                self.metrics.dead_letters.labels(d.reason).inc()
            if dead:
                event("intake.dead_lettered", level=logging.WARNING, source=name,
                      messages=len(dead), reason=dead[0].reason, detail=dead[0].detail,
                      topic=dead[0].topic)
            self.spool.appended.set()

    async def _apply_policy(self, pending: list[Pending]) -> bool:
        """The spool stayed full past the backpressure window: drop by policy (recorded)."""
        spool = self.spool.spool
        try:
            if self.full_policy == "reject_new":
                n = await self.spool.run(spool.commit_dropped, pending, "spool_full")
            else:
                need = max(spool.max_bytes // 20, 1)  # free 5 %: not one drop per message
                n = await self.spool.run(spool.make_room, need)
        except (SpoolFull, SpoolReset):
            return False  # the disk itself is full: keep applying backpressure
        if n:
            self.metrics.spool_dropped.labels("spool_full").inc(n)
            self.spool.appended.set()  # tombstones to send
        return n > 0

    def _prio(self, topic: str) -> int:
        prio = self._prio_cache.get(topic)
        if prio is None:
            prio = next((PRIORITIES[cls] for pattern, cls in self.priority
                         if mqtt.topic_matches_sub(pattern, topic)), 0)
            if len(self._prio_cache) < 100_000:
                self._prio_cache[topic] = prio
        return prio

    def _prepare(self, messages: list[Message]
                 ) -> tuple[list[Pending], list[DeadLetter], int, Counter[str]]:
        """Decode a batch: envelopes to append, dead letters, redeliveries, skips by reason."""
        info = self.source.info
        now = time.time_ns()
        synced = self.clock.synced()
        pending: list[Pending] = []
        dead: list[DeadLetter] = []
        skipped = 0
        ignored: Counter[str] = Counter()
        spool = self.spool.spool
        limit = self.max_payload_bytes
        batch: set[bytes] = set()
        for m in messages:
            try:
                d = digest(m.topic, m.payload)
                if m.redelivered and spool.claim_redelivery(info.name, d):
                    skipped += 1
                    continue
                if self.dedupe_retransmissions and (
                        d in batch or spool.recently_committed(info.name, d)) and \
                        self.decoder.stamped(m.topic, m.payload):
                    # The same bytes with the publisher's own seq: its QoS 1 resend after a
                    # broker restart, not a new reading (see docs/architecture.md).
                    ignored["retransmission"] += 1
                    continue
                if len(m.payload) > limit:
                    dead.append(DeadLetter(info.name, m.topic, m.payload, "oversize",
                                           f"{len(m.payload)} bytes > max_payload_bytes={limit}"))
                    continue
                decoded = self.decoder.decode(m.topic, m.payload)
                if decoded.skip is not None:
                    ignored[decoded.skip] += 1
                    continue
                env = prepare_envelope(site_id=self.site_id, epoch=spool.epoch, source=info,
                                       topic=m.topic, decoded=decoded, codec=self.decoder.codec,
                                       gateway_time_ns=now, clock_synced=synced)
            except DecodeError as exc:
                dead.append(DeadLetter(info.name, m.topic, m.payload, exc.reason, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - one message's bug must not stop the queue
                dead.append(DeadLetter(info.name, m.topic, m.payload, "intake_error",
                                       f"{type(exc).__name__}: {exc}"[:300]))
                continue
            batch.add(d)
            pending.append(Pending(source=info.name, digest=d, prio=self._prio(m.topic),
                                   build=partial(self._seal, env)))
        return pending, dead, skipped, ignored

    def _seal(self, env: pb.Envelope, seq: int) -> bytes:
        return seal(env, self.spool.spool.epoch, seq)


class Agent:
    def __init__(self, *, config: AgentConfig, metrics: AgentMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or AgentMetrics()
        self.metrics.registry.register(CertExpiry(files={"client": config.tls.cert,
                                                         "ca": config.tls.ca}))
        ring_sizes = {s.name: 2 * s.window for s in config.sources}
        sc = config.spool
        self.spool = AsyncSpool(Spool(path=config.spool.path, site_id=config.site_id,
                                      max_bytes=config.spool.max_bytes, ring_sizes=ring_sizes,
                                      reserve_bytes=config.spool.reserve_bytes,
                                      max_age_s=config.spool.max_age_s,
                                      dead_letter_payload_bytes=sc.dead_letter_payload_bytes,
                                      dead_letters_max=sc.dead_letters_max,
                                      dead_letters_max_bytes=sc.dead_letters_max_bytes,
                                      on_evict=self.metrics.dead_letters_evicted.inc))
        self._drops: dict[str, int] = {}
        self._oldest_age: float | None = None
        up = config.uplink
        b = up.breaker
        # Calls that time out end one deadline after they start: at most max_in_flight of them
        # per deadline, so a window holds at most this many. A larger minimum could never be
        # reached by a stalled endpoint, and its breaker would never open.
        reachable = max(1, int(up.max_in_flight * b.window_s / up.deadline_s))
        min_requests = min(b.min_requests, reachable)
        if min_requests < b.min_requests:
            event("uplink.breaker_minimum_lowered",
                  configured=b.min_requests, effective=min_requests,
                  reason=f"max_in_flight={up.max_in_flight} calls with a {up.deadline_s:g} s "
                         f"deadline fill a {b.window_s:g} s window with at most {reachable}")
        self.proxies: dict[str, BindProxy] = {}
        for e in up.endpoints:
            iface = resolve_vlan(e.vlan) if e.vlan else e.interface
            if iface:
                self.proxies[e.name] = BindProxy(
                    interface=iface, endpoint=e.name, target=e.target,
                    on_refused=self.metrics.netbind_refused.labels(e.name).inc)
        self.pool = EndpointPool(
            endpoints=[Endpoint(name=e.name, target=e.target,
                                transport=GrpcTransport(
                                    target=e.target, tls=config.tls,
                                    backoff_max_s=up.backoff_max_s,
                                    proxy_url=self.proxies[e.name].url
                                    if e.name in self.proxies else None),
                                backoff_max_s=up.backoff_max_s,
                                breaker=CircuitBreaker(window_s=b.window_s,
                                                       error_rate=b.error_rate,
                                                       min_requests=min_requests,
                                                       open_s=b.open_s,
                                                       half_open_probes=b.half_open_probes))
                       for e in up.endpoints],
            metrics=self.metrics, health_interval_s=up.health_interval_s,
            health_timeout_s=up.health_timeout_s, health_timeout_min_s=up.health_timeout_min_s,
            failback_after_s=up.failback_after_s)
        self.sender = Sender(spool=self.spool, pool=self.pool, config=up, metrics=self.metrics)
        self._zero_series()
        self.notifier = Notifier(component="agent")
        clock = ClockSync()
        self.sources = [make_source(s, self.metrics) for s in config.sources]
        self.intakes = [Intake(source=src, spool=self.spool, site_id=config.site_id,
                               decoder=self._decoder(s),
                               max_payload_bytes=s.decode.max_payload_bytes,
                               commit_max=config.spool.commit_max_messages,
                               metrics=self.metrics, clock=clock,
                               priority=config.spool.priority,
                               backpressure_s=config.spool.backpressure_s,
                               full_policy=config.spool.full_policy,
                               dedupe_retransmissions=s.decode.dedupe_retransmissions)
                        for src, s in zip(self.sources, config.sources, strict=True)]
        self.started_ns = time.time_ns()

    def _decoder(self, source: SourceConfig) -> Decoder:
        dc = source.decode
        sp = dc.sparkplug
        counter = self.metrics.sparkplug_events

        def notice(kind: str, fields: dict[str, Any]) -> None:
            counter.labels(source.name, kind).inc(fields.get("count", 1))
            event(f"sparkplug.{kind}", level=logging.WARNING, source=source.name, **fields)

        if sp is None:
            return make_decoder(codec=dc.codec, mappings=list(dc.mappings), notice=notice,
                                rebirth=False, rebirth_on_gap=False, rebirth_interval_s=0.0)
        return make_decoder(codec=dc.codec, mappings=list(dc.mappings), notice=notice,
                            rebirth=sp.rebirth, rebirth_on_gap=sp.rebirth_on_gap,
                            rebirth_interval_s=sp.rebirth_interval_s,
                            rebirth_max_per_s=sp.rebirth_max_per_s,
                            max_edge_nodes=sp.max_edge_nodes,
                            max_decompressed_bytes=sp.max_decompressed_bytes)

    def _zero_series(self) -> None:
        """Create the labelled series alerts and dashboards read at 0, so that ``rate()`` and
        ``increase()`` see the first event (a series born at 1 has no increase)."""
        m, names = self.metrics, [e.name for e in self.config.uplink.endpoints]
        for reason in ("ttl", "spool_full"):
            m.spool_dropped.labels(reason)
        for name in names:
            m.throttled.labels(name)
            m.stalls.labels(name)
            m.breaker_trips.labels(name)
            for other in names:
                if other != name:
                    m.failovers.labels(name, other)
        for s in self.config.sources:
            m.source_messages.labels(s.name)
            m.source_up.labels(s.name)
            for kind in ("connect_failed", "lost"):
                m.source_failures.labels(s.name, kind)

    def _waiting_for(self) -> str | None:
        """What keeps the agent from being ready: the spool is open (``__init__``) and at
        least one source must be subscribed."""
        if any(s.subscribed.is_set() for s in self.sources):
            return None
        return "no source subscribed yet (" + ", ".join(
            f"{s.info.name} at {s.info.broker}" for s in self.sources) + ")"

    def _status_line(self) -> str:
        sp = self.spool.spool
        up = sum(s.subscribed.is_set() for s in self.sources)
        return (f"spooled {sp.readings} readings; {up}/{len(self.sources)} sources subscribed; "
                f"{self.sender.in_flight} batches in flight")

    def status(self) -> dict[str, Any]:
        sp = self.spool.spool
        return {
            "site_id": self.config.site_id,
            "epoch": f"{sp.epoch:016x}",
            "spool": {"readings": sp.readings, "bytes": sp.bytes, "next_seq": sp.next_seq,
                      "max_bytes": sp.max_bytes, "path": str(sp.path),
                      "oldest_age_s": None if self._oldest_age is None
                      else round(self._oldest_age, 3),
                      "dropped": dict(self._drops),
                      "quarantined": [{"moved_to": str(q.moved_to), "reason": q.reason,
                                       "salvaged": q.salvaged, "unreadable": q.unreadable}
                                      for q in sp.quarantines]},
            "sources": [{"name": s.info.name, "broker": s.info.broker,
                         "subscribed": s.subscribed.is_set()} for s in self.sources],
            "uplink": {"endpoints": self.pool.snapshot(), "failovers": self.pool.failovers,
                       "last_failover_ns": self.pool.last_failover_ns or None,
                       "failover_first_ack_ns": self.pool.failover_first_ack_ns or None,
                       "in_flight": self.sender.in_flight,
                       "draining": self.sender.draining,
                       "acked_readings": self.sender.acked_readings},
            "committed_messages": sum(i.committed_messages for i in self.intakes),
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 3),
        }

    async def _bounds(self, interval_s: float = 2.0) -> None:
        """Expire readings past ``max_age_s``; refresh the spool figures /status shows."""
        sp = self.spool.spool
        while True:
            n = 0
            try:
                n = await self.spool.run(sp.expire)
                if n:
                    self.metrics.spool_dropped.labels("ttl").inc(n)
                    self.spool.appended.set()  # tombstones to send
                self._drops = await self.spool.run(sp.drop_totals)
                self._oldest_age = await self.spool.run(sp.oldest_age_s)
                self.metrics.spool_oldest_age.set(self._oldest_age or 0.0)
            except (SpoolFull, SpoolReset) as exc:
                # A full disk delays expiry (deletes come first); a replaced file restarts it.
                event("spool.bounds_deferred", level=logging.WARNING, reason=str(exc))
            if n == 0:
                await asyncio.sleep(interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        sp = self.spool.spool
        event("agent.started", site_id=self.config.site_id, epoch=f"{sp.epoch:016x}",
              spooled=sp.readings, spool=str(sp.path),
              endpoints=[e.name for e in self.config.uplink.endpoints])
        self.metrics.spool_readings.set_function(lambda: sp.readings)
        self.metrics.spool_bytes.set_function(lambda: sp.bytes)
        self.metrics.spool_quarantines.set_function(lambda: len(sp.quarantines))
        self.metrics.spool_salvaged.set_function(lambda: sum(q.salvaged for q in sp.quarantines))
        self.metrics.spool_max_bytes.set(sp.max_bytes)
        self.metrics.spool_fill.set_function(lambda: (sp.bytes + sp.dead_bytes) / sp.max_bytes)
        self.metrics.site.labels(self.config.site_id).set(1)
        for name, proxy in self.proxies.items():
            await proxy.start()
            event("netbind.proxy", endpoint=name, interface=proxy.interface, url=proxy.url)
        async with asyncio.TaskGroup() as tg:
            pool_task = tg.create_task(self.pool.run(), name="endpoint-pool")
            bounds_task = tg.create_task(self._bounds(), name="spool-bounds")
            sender_task = tg.create_task(self.sender.run(), name="sender")
            intake_tasks = [tg.create_task(i.run(), name=f"intake-{i.source.info.name}")
                            for i in self.intakes]
            for src in self.sources:
                await src.start()
            notify_task = tg.create_task(
                self.notifier.run(waiting_for=self._waiting_for, status=self._status_line),
                name="service-notify")
            await stop.wait()
            t0 = time.monotonic()
            event("agent.stopping", spooled=sp.readings, in_flight=self.sender.in_flight)
            # 1. Stop taking from brokers; everything committed gets acked before disconnect.
            for intake in self.intakes:
                intake.stop()
            await asyncio.gather(*intake_tasks)
            for src in self.sources:
                await src.stop()
            # 2. Let batches in flight finish, within the grace period.
            self.sender.stop()
            remaining = max(0.5, SHUTDOWN_GRACE_S - (time.monotonic() - t0))
            try:
                await asyncio.wait_for(asyncio.shield(sender_task), remaining)
            except TimeoutError:
                sender_task.cancel()
            pool_task.cancel()
            bounds_task.cancel()
            notify_task.cancel()
        await self.pool.close()
        for proxy in self.proxies.values():
            await proxy.close()
        await self.spool.close()
        event("agent.stopped", spooled=sp.readings,
              shutdown_s=round(time.monotonic() - t0, 3))


async def run(config: AgentConfig) -> None:
    agent = Agent(config=config)
    http = None
    if config.metrics_listen:
        http = HttpEndpoint(listen=config.metrics_listen, registry=agent.metrics.registry,
                            status=agent.status)
        http.start()
        event("agent.http", listen=config.metrics_listen, port=http.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.run(stop)
    finally:
        if http:
            http.stop()
