"""The edge agent: wires sources -> intake (``bridge.edge.intake``) -> spool -> sender -> ingest.

Ownership hand-offs (docs/architecture.md, "Ownership hand-offs"): a broker message is acked
only after the spool transaction holding its envelope or its dead letter committed (the
intake's invariant); a spool row is released only after an ingest node acknowledged it.
Shutdown runs in the reverse order of the flow: stop taking from the brokers (after acking
everything committed), let in-flight batches finish within the grace period, then close the
uplink and the spool. Whatever was not acknowledged stays in the spool or in the broker's
session for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from bridge.edge.codecs import Decoder
from bridge.edge.intake import ClockSync, Intake, IntakePolicy, decoder_for
from bridge.edge.sources import make_source
from bridge.edge.spool import AsyncSpool, Spool
from bridge.edge.spool.clock import SpoolClock
from bridge.edge.uplink.breaker import for_uplink, reachable_minimum
from bridge.edge.uplink.credentials import CredentialWatcher, Pem
from bridge.edge.uplink.netbind import BindProxy, resolve_vlan
from bridge.edge.uplink.pool import Endpoint, EndpointPool
from bridge.edge.uplink.sender import Sender
from bridge.edge.uplink.transport import GrpcTransport
from bridge.shared.certinfo import ROLE_SITE
from bridge.shared.config import AgentConfig, SourceConfig, load_agent
from bridge.shared.errors import SpoolFull, SpoolReset
from bridge.shared.httpserve import HttpEndpoint, loop_answers, on_loop
from bridge.shared.reload import Reloader
from bridge.shared.service import Notifier
from bridge.shared.telemetry import AgentMetrics, CertExpiry, event

SHUTDOWN_GRACE_S = 5.0
SOURCE_BUDGET_S = 5.0    # a source may be reconnecting this long, or twice its backoff cap
SPOOL_READY_FILL = 0.9   # with no endpoint healthy, not ready once the spool is this full


class Agent:
    def __init__(self, *, config: AgentConfig, metrics: AgentMetrics | None = None,
                 wall: Callable[[], float] = time.time,
                 spool_clock: SpoolClock | None = None) -> None:
        """``wall`` (certificate expiry) and ``spool_clock`` (reading ages) are injected only
        by tests that run the agent across simulated months (tests/system/test_unattended.py)."""
        self.config = config
        self.metrics = metrics or AgentMetrics()
        held = {"client": config.tls.cert, "ca": config.tls.ca}
        for src in config.sources:  # plant-side certificates count too
            if src.tls is not None and src.tls.cert is not None:
                held[f"source:{src.name}"] = src.tls.cert
            if src.tls is not None and src.tls.ca is not None:
                held[f"source-ca:{src.name}"] = src.tls.ca
        self.metrics.registry.register(CertExpiry(files=held, clock=wall))
        sc = config.spool
        self.spool = AsyncSpool(Spool(path=config.spool.path, site_id=config.site_id,
                                      max_bytes=config.spool.max_bytes,
                                      reserve_bytes=config.spool.reserve_bytes,
                                      max_age_s=config.spool.max_age_s, clock=spool_clock,
                                      dead_letter_payload_bytes=sc.dead_letter_payload_bytes,
                                      dead_letters_max=sc.dead_letters_max,
                                      dead_letters_max_bytes=sc.dead_letters_max_bytes,
                                      on_evict=self.metrics.dead_letters_evicted.inc))
        self._drops: dict[str, int] = {}
        self._oldest_age: float | None = None
        up = config.uplink
        min_requests = reachable_minimum(up)
        self.proxies: dict[str, BindProxy] = {}
        for e in up.endpoints:
            iface = resolve_vlan(e.vlan) if e.vlan else e.interface
            if iface:
                self.proxies[e.name] = BindProxy(
                    interface=iface, endpoint=e.name, target=e.target,
                    on_refused=self.metrics.netbind_refused.labels(e.name).inc)
        self.pool = EndpointPool(
            endpoints=[Endpoint(name=e.name, target=e.target, leg=e.leg,
                                transport=self._transport(e.name, None),
                                backoff_max_s=up.backoff_max_s,
                                breaker=for_uplink(up, min_requests=min_requests))
                       for e in up.endpoints],
            metrics=self.metrics, health_interval_s=up.health_interval_s,
            health_timeout_s=up.health_timeout_s, health_timeout_min_s=up.health_timeout_min_s,
            failback_after_s=up.failback_after_s, refused_retry_s=up.refused_retry_s)
        self.sender = Sender(spool=self.spool, pool=self.pool, config=up, metrics=self.metrics)
        self.credentials = CredentialWatcher(
            tls=config.tls, site_id=config.site_id, metrics=self.metrics,
            check_s=config.tls_check_s, on_change=self._rotate, clock=wall,
            also={k: v for k, v in held.items() if k not in ("client", "ca")})
        self._zero_series()
        self.notifier = Notifier(component="agent")
        clock = ClockSync()
        self.sources = [make_source(s, self.metrics) for s in config.sources]
        self.intakes = [Intake(source=src, spool=self.spool, site_id=config.site_id,
                               decoder=self._decoder(s), metrics=self.metrics, clock=clock,
                               policy=IntakePolicy.of(config.spool, s))
                        for src, s in zip(self.sources, config.sources, strict=True)]
        self.started_ns = time.time_ns()
        self._phase = "starting"  # running, stopping (readiness)
        # when each source was last seen not subscribed, since it was last subscribed
        self._down_since: dict[str, float] = {s.info.name: time.monotonic()
                                               for s in self.sources}
        self._hup = asyncio.Event()
        self.reloader: Reloader[AgentConfig] = Reloader(
            component="agent", running=config, load=self._load_config,
            appliers={"log.level": lambda c: logging.getLogger("bridge").setLevel(
                          c.log_level.upper()),
                      "tls.check_s": lambda c: setattr(self.credentials, "check_s",
                                                       c.tls_check_s)},
            refresh=self._refresh_credentials, counter=self.metrics.config_reloads)
        for outcome in ("ok", "restart_needed", "failed"):
            self.metrics.config_reloads.labels(outcome)

    # -- SIGHUP ---------------------------------------------------------------------------

    def _load_config(self) -> AgentConfig:
        new = load_agent(self.config.file)
        new.tls.verified(role=ROLE_SITE, name=new.site_id)
        return new

    async def _refresh_credentials(self) -> list[str]:
        """Certificates are re-read at every reload, changed or not in the config."""
        return ["tls (certificate files)"] if await self.credentials.check() else []

    def request_reload(self) -> None:
        """The SIGHUP handler: the reload runs on the loop (``_reload_on_signal``)."""
        self._hup.set()

    async def _reload_on_signal(self) -> None:
        while True:
            await self._hup.wait()
            self._hup.clear()
            await self.reloader.reload()

    def _transport(self, name: str, pem: Pem | None) -> GrpcTransport:
        e = next(e for e in self.config.uplink.endpoints if e.name == name)
        proxy = self.proxies.get(name)
        return GrpcTransport(target=e.target, tls=self.config.tls, pem=pem,
                             backoff_max_s=self.config.uplink.backoff_max_s,
                             proxy_url=proxy.url if proxy else None)

    async def _rotate(self, pem: Pem) -> None:
        """New credentials: new channels; calls in flight finish within one deadline."""
        self.pool.rebuild(lambda ep: self._transport(ep.name, pem),
                          grace_s=self.config.uplink.deadline_s)

    def _decoder(self, source: SourceConfig) -> Decoder:
        counter = self.metrics.sparkplug_events

        def notice(kind: str, fields: dict[str, Any]) -> None:
            counter.labels(source.name, kind).inc(fields.get("count", 1))
            event(f"sparkplug.{kind}", level=logging.WARNING, source=source.name, **fields)

        return decoder_for(source, notice)

    def _zero_series(self) -> None:
        """Create the labelled series alerts and dashboards read at 0, so that ``rate()`` and
        ``increase()`` see the first event (a series born at 1 has no increase)."""
        m, names = self.metrics, [e.name for e in self.config.uplink.endpoints]
        for reason in ("ttl", "spool_full"):
            m.spool_dropped.labels(reason)
        for name in names:
            m.throttled.labels(name)
            m.throttle_wait.labels(name)
            m.stalls.labels(name)
            m.breaker_trips.labels(name)
            m.endpoint_refused.labels(name).set(0)
            for code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
                m.refused.labels(name, code)
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
        up = sum(s.subscribed.is_set() for s in self.sources)
        return (f"spooled {self.spool.figures().readings} readings; {up}/{len(self.sources)} "
                f"sources subscribed; {self.sender.in_flight} batches in flight")

    def status(self) -> dict[str, Any]:
        sp = self.spool.figures()
        return {
            "site_id": self.config.site_id,
            "epoch": f"{sp.epoch:016x}",
            "spool": {"readings": sp.readings, "bytes": sp.bytes, "next_seq": sp.next_seq,
                      "max_bytes": sp.max_bytes, "path": str(sp.path),
                      "oldest_age_s": None if self._oldest_age is None
                      else round(self._oldest_age, 3),
                      "dropped": dict(self._drops),
                      # batches the sender took from memory, and from the file (the backlog)
                      "reads": {"memory": sp.reads_memory, "file": sp.reads_file},
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

    def readiness(self) -> list[str]:
        """Why the agent is not ready (``/readyz``; [] when it is): starting or stopping; a
        source not subscribed for longer than its reconnect budget; no endpoint healthy while
        the spool is nearly full (without a healthy endpoint but with room, readings are
        kept: the agent does its job)."""
        if self._phase != "running":
            return [f"{self._phase}"]
        reasons = []
        now = time.monotonic()
        for src in self.sources:
            since = self._down_since.get(src.info.name)
            budget = max(SOURCE_BUDGET_S, 2 * src.reconnect_max_s)
            if since is not None and now - since > budget:
                reasons.append(f"source {src.info.name} ({src.info.broker}) not subscribed for "
                               f"{now - since:.0f} s (budget {budget:.0f} s)")
        if not any(e["state"] == "healthy" and e["breaker"] != "open"
                   for e in self.pool.snapshot()):
            fill = self.spool.figures().fill
            if fill >= SPOOL_READY_FILL:
                reasons.append(f"no endpoint healthy and the spool {fill:.0%} full")
        return reasons

    def _watch_sources(self) -> None:
        now = time.monotonic()
        for s in self.sources:
            if s.subscribed.is_set():
                self._down_since.pop(s.info.name, None)
            else:
                self._down_since.setdefault(s.info.name, now)

    async def _bounds(self, interval_s: float = 2.0) -> None:
        """Expire readings past ``max_age_s``; refresh the spool figures /status shows and
        the sources' down times /readyz reads."""
        while True:
            self._watch_sources()
            n = 0
            try:
                n = await self.spool.expire()
                if n:
                    self.metrics.spool_dropped.labels("ttl").inc(n)
                    self.spool.appended.set()  # tombstones to send
                self._drops = await self.spool.drop_totals()
                self._oldest_age = await self.spool.oldest_age_s()
                self.metrics.spool_oldest_age.set(self._oldest_age or 0.0)
            except (SpoolFull, SpoolReset) as exc:
                # A full disk delays expiry (deletes come first); a replaced file restarts it.
                event("spool.bounds_deferred", level=logging.WARNING, reason=str(exc))
            if n == 0:
                await asyncio.sleep(interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        spool, fig = self.spool, self.spool.figures()
        event("agent.started", site_id=self.config.site_id, epoch=f"{fig.epoch:016x}",
              spooled=fig.readings, spool=str(fig.path),
              endpoints=[e.name for e in self.config.uplink.endpoints])
        # Read at scrape time, on the scrape thread: figures only (see AsyncSpool).
        self.metrics.spool_readings.set_function(lambda: spool.figures().readings)
        self.metrics.spool_bytes.set_function(lambda: spool.figures().bytes)
        self.metrics.spool_quarantines.set_function(lambda: len(spool.figures().quarantines))
        self.metrics.spool_salvaged.set_function(
            lambda: sum(q.salvaged for q in spool.figures().quarantines))
        self.metrics.spool_max_bytes.set(fig.max_bytes)
        self.metrics.dead_letters_replayed.inc(await spool.dead_counter("dead_replayed"))
        self.metrics.dead_letters_purged.inc(await spool.dead_counter("dead_purged"))
        self.metrics.spool_fill.set_function(lambda: spool.figures().fill)
        self.metrics.site.labels(self.config.site_id).set(1)
        for name, proxy in self.proxies.items():
            await proxy.start()
            event("netbind.proxy", endpoint=name, interface=proxy.interface, url=proxy.url)
        async with asyncio.TaskGroup() as tg:
            pool_task = tg.create_task(self.pool.run(), name="endpoint-pool")
            bounds_task = tg.create_task(self._bounds(), name="spool-bounds")
            sender_task = tg.create_task(self.sender.run(), name="sender")
            self.credentials.expiry()
            creds_task = tg.create_task(self.credentials.run(), name="credentials")
            intake_tasks = [tg.create_task(i.run(), name=f"intake-{i.source.info.name}")
                            for i in self.intakes]
            source_tasks = [tg.create_task(src.run(), name=f"source-{src.info.name}")
                            for src in self.sources]
            reload_task = tg.create_task(self._reload_on_signal(), name="config-reload")
            notify_task = tg.create_task(
                self.notifier.run(waiting_for=self._waiting_for, status=self._status_line),
                name="service-notify")
            self._phase = "running"
            await stop.wait()
            self._phase = "stopping"
            t0 = time.monotonic()
            event("agent.stopping", spooled=spool.figures().readings,
                  in_flight=self.sender.in_flight)
            # 1. Stop taking from brokers; everything committed gets acked before disconnect.
            for intake in self.intakes:
                intake.stop()
            await asyncio.gather(*intake_tasks)
            for src in self.sources:
                await src.stop()
            await asyncio.gather(*source_tasks)  # each run() returns once its stop() is done
            # 2. Let batches in flight finish, within the grace period.
            self.sender.stop()
            remaining = max(0.5, SHUTDOWN_GRACE_S - (time.monotonic() - t0))
            try:
                await asyncio.wait_for(asyncio.shield(sender_task), remaining)
            except TimeoutError:
                sender_task.cancel()
            pool_task.cancel()
            creds_task.cancel()
            bounds_task.cancel()
            notify_task.cancel()
            reload_task.cancel()
        await self.pool.close()
        for proxy in self.proxies.values():
            await proxy.close()
        await self.spool.close()
        event("agent.stopped", spooled=spool.figures().readings,
              shutdown_s=round(time.monotonic() - t0, 3))


async def run(config: AgentConfig) -> None:
    agent = Agent(config=config)
    http = None
    loop = asyncio.get_running_loop()
    if config.metrics_listen:
        http = HttpEndpoint(listen=config.metrics_listen, registry=agent.metrics.registry,
                            status=agent.status, live=lambda: loop_answers(loop),
                            ready=lambda: on_loop(loop, agent.readiness))
        http.start()
        event("agent.http", listen=config.metrics_listen, port=http.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.request_reload)
    try:
        await agent.run(stop)
    finally:
        if http:
            http.stop()
