"""``fleet_recovery``: every site of a fleet drains its backlog at once into two JetStream
replicas.

First the tier's saturation rate, what the replicas commit when they always have more work than
they take: with admission control off, ``sat_sites`` sites keep 2 calls each coming back to
back, counted for ``sat_seconds`` once every call was answered once (a 60 s deadline: only the
rate is measured here, and every call is answered: 100 x 2 x 1,250 = 250,000 readings in
flight, about 6 s of the tier's work on this machine), so no time goes to calls that time out
or to the admission's pacing; then the same with a third of those sites (32 calls per replica
instead of 100), and the faster of the two is the phase's rate (the raw tier is faster at some
depths than at others). Runs differ by up to 1.5x on this machine and its speed drifts
by a sixth within minutes, so the phase is run again after the recovery (100 other sites, on
the stream as the recovery left it) and the reference is the mean of the two. The ratio to
the best of the phases and the recovery's own best 10 s is reported beside it (the best of a
recovery's ten or so 10 s windows lies above their mean by the machine's noise alone). The
tier's CPU (replicas and nats-servers, from /proc) per reading is reported for each phase, and
the CPU the host took (steal): whether the recovery costs more work per reading (the host's
speed moves that figure too: docs/deployment.md). Then the
replicas are restarted with their default admission control for the recovery: ``sites``
sites, each with its own certificate and channel and a backlog of ``backlog`` readings, start
together. Each site behaves as the agent's uplink does with its
defaults (bridge.edge.uplink.sender): 1,250-reading batches, up to 4 calls in flight (one at first
and after a throttle, doubled per ack), a 5 s deadline stated in ``bridge-deadline-ms``;
RESOURCE_EXHAUSTED waits the ingest's retry-after (with the agent's own jitter,
``hinted_wait``) on the same replica and holds new batches back as long; each batch says the
readings behind it, and an OK answer naming the site's next turn holds its next batch until
then; a deadline exceeded or
an unavailable replica is what makes an agent fail over, so the call moves to the other replica
with the same readings and is counted as a failover (and a deadline exceeded). Reported:
readings/s from the first call to the last ack and its ratio to the saturation rate (the mean
of the phases before and after), p99
of admitted calls (as the site saw them), calls refused (and by why, from the replicas'
``/metrics``), next turns named, deadlines exceeded, failovers, the
share of readings re-sent that were already stored (acked DUPLICATE), and what an idle
connected site costs the replicas (VmRSS with every channel connected minus before, over the
sites). Afterwards every site's subject is counted with a plain client and must hold exactly
its backlog.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
from prometheus_client.parser import text_string_to_metric_families

from bench import client
from bench.evidence import TierMeter
from bench.memory import rss_mb
from bench.results import Row, percentile
from bridge.cloud.store.subjects import subject_token
from bridge.edge.uplink.layers import hinted_wait
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.grpcconn import mtls_credentials
from devkit import localrun
from devkit.jscluster import JetStreamCluster

SCENARIO = "fleet_recovery"
SYSTEM = "bridge"  # two JetStream replicas: the bridge's cloud tier as deployed
BATCH = 1250  # the agent's uplink.batch_max_readings: a draining agent sends full batches
IN_FLIGHT = 4
DEADLINE_S = 5.0
SAT_DEADLINE_S = 60.0
SAT_CALLS = 2  # calls in flight per site in the saturation phase
PUSH = "/bridge.v1.Ingest/PushBatch"
SAT_EPOCH, RECOVERY_EPOCH, NARROW_EPOCH = 1, 2, 3
# Each saturation phase runs these shares of its sites in turn (each its own epoch, so no
# call is a duplicate) and takes the faster: the raw tier commits more at some depths than at
# others (docs/deployment.md), and the reference must be its best, not one depth's.
SAT_SHAPES = ((1.0, SAT_EPOCH), (0.32, NARROW_EPOCH))


@dataclass
class _Stats:
    latencies: list[float] = field(default_factory=list)
    readings: int = 0
    refused: int = 0
    next_turns: int = 0  # OK answers that named the site's next turn
    deadlines: int = 0
    failovers: int = 0
    duplicates: int = 0
    last_ack: float = 0.0
    start: float = 0.0
    full_at: int = 0  # acks after which ``full`` is set (the saturation phase's queue is full)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    acks: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, readings)

    def timeline(self, t0: float, step: float) -> list[int]:
        """Readings acknowledged in each ``step`` seconds from ``t0``."""
        out: list[int] = []
        for t, n in self.acks:
            i = int((t - t0) // step)
            out += [0] * (i + 1 - len(out))
            out[i] += n
        return out

    def best_rate(self, span: float) -> float:
        """The most readings/s acknowledged over any ``span`` seconds."""
        best, lo, inside = 0, 0, 0
        for t, n in self.acks:
            inside += n
            while self.acks[lo][0] < t - span:
                inside -= self.acks[lo][1]
                lo += 1
            best = max(best, inside)
        return best / span


class _Site:
    """One site's uplink: its channel to its replica, and to the other one on failover."""

    def __init__(self, site: str, targets: list[str], first: int,
                 creds: grpc.ChannelCredentials) -> None:
        self.site, self.targets, self.creds = site, targets, creds
        self.current = first
        self.channels: dict[int, grpc.aio.Channel] = {}
        self.window = 1          # as the agent's sender: slow start, 1 again after a throttle
        self.busy_until = 0.0    # as the agent's sender: no new backlog batch before this

    def call(self) -> grpc.aio.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
        ch = self.channels.get(self.current)
        if ch is None:
            ch = self.channels[self.current] = grpc.aio.secure_channel(
                self.targets[self.current], self.creds)
        return ch.unary_unary(PUSH, request_serializer=None,
                              response_deserializer=pb.Ack.FromString)

    def batch(self, epoch: int, first: int, n: int, more: int) -> bytes:
        """``more``: readings behind this batch, said as the agent says its backlog."""
        return pb.Batch(batch_id=f"{self.site}-{epoch}-{first}", envelopes=[
            pb.Envelope(site_id=self.site, epoch=epoch, seq=first + k,
                        values=[pb.Value(signal="v", number=float(k))])
            for k in range(n)], backlog_readings=more).SerializeToString()

    async def push(self, blob: bytes, n: int, stats: _Stats,
                   deadline: float = DEADLINE_S) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                ack = await self.call()(blob, timeout=deadline,
                                        metadata=client.stated(deadline))
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    stats.refused += 1
                    wait = hinted_wait(client.retry_after(err))
                    self.busy_until = max(self.busy_until, time.monotonic() + wait)
                    self.window = 1
                    await asyncio.sleep(wait)
                    continue
                if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    stats.deadlines += 1
                stats.failovers += 1
                self.current = (self.current + 1) % len(self.targets)
                continue
            stats.latencies.append(time.perf_counter() - t0)
            if ack.next_after_ms:  # as the agent's sender: the backlog waits for its turn
                stats.next_turns += 1
                self.busy_until = max(self.busy_until, time.monotonic() + hinted_wait(
                    ack.next_after_ms / 1000))
            stats.readings += n
            stats.duplicates += sum(r.disposition == pb.DISPOSITION_DUPLICATE
                                    for r in ack.results)
            stats.last_ack = time.monotonic()
            stats.acks.append((stats.last_ack, n))
            if len(stats.acks) == stats.full_at:
                stats.full.set()
            self.window = min(IN_FLIGHT, 2 * self.window)
            return

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(grace=None)


def _sites(names: list[str], targets: list[str], pkis: localrun.Pki) -> list[_Site]:
    out = []
    for i, name in enumerate(names):
        out.append(_Site(name, targets, i % len(targets),
                         mtls_credentials(pkis.site(name).read())))
    return out


async def _lane(s: _Site, todo: list[tuple[bytes, int]], stats: _Stats) -> None:
    """The agent's backlog lane for one site: a new batch only within its window and after
    any retry-after; batches already sent retry on their own. It wakes when a batch ends or
    the retry-after runs out, as the agent's sender does (woken by an ack), never on a poll
    (it woke every 50 ms: a thousand lanes polling take CPU from the tier under test, which
    shares the machine with the load generator)."""
    sent: set[asyncio.Task[None]] = set()
    while todo or sent:
        now = time.monotonic()
        while todo and len(sent) < s.window and now >= s.busy_until:
            blob, n = todo.pop(0)
            sent.add(asyncio.ensure_future(s.push(blob, n, stats)))
        # Held back only by the retry-after: wake when it runs out; by the window: at an end.
        wait = s.busy_until - now if todo and len(sent) < s.window else None
        if not sent:
            await asyncio.sleep(max(wait or 0.0, 0.0))
            continue
        done, _ = await asyncio.wait(sent, return_when=asyncio.FIRST_COMPLETED, timeout=wait)
        sent -= done


def _batches(s: _Site, epoch: int, readings: int) -> list[tuple[bytes, int]]:
    """A site's backlog as the agent would send it, built before any clock starts (the load
    generator is one process: building 1,250 envelopes in Python costs it more than the
    ingest spends refusing them)."""
    out = []
    for first in range(1, readings + 1, BATCH):
        n = min(BATCH, readings - first + 1)
        out.append((s.batch(epoch, first, n, readings - (first + n - 1)), n))
    return out


@dataclass
class _Phase:
    """One saturation phase: its best shape's rate, and that shape's CPU."""

    rate: float
    gen_cores: float
    tier: TierMeter
    shapes: list[float]  # readings/s of each of SAT_SHAPES


async def _saturate(sites: list[_Site], seconds: float, tier: TierMeter, epoch: int,
                    rate_hint: float = 60_000) -> tuple[float, float]:
    """Readings/s acknowledged while ``sites`` keep ``SAT_CALLS`` calls each coming back to
    back, so the tier always has more work than it takes; counted for ``seconds`` from when
    every call has been answered once (the queue is full and steady). Also the CPU the load
    generator used meanwhile, in cores (it shares the machine with the tier); ``tier`` is
    metered over the same window."""
    workers = len(sites) * SAT_CALLS
    stats = _Stats(full_at=workers)
    fill = workers * BATCH / rate_hint  # seconds until every call was answered once, about
    each = (int(rate_hint * (2 * fill + seconds + 2) / len(sites)) // BATCH + SAT_CALLS) * BATCH
    todo = {s.site: _batches(s, epoch, each) for s in sites}
    counted: list[int] = []
    cpu: list[float] = []

    async def worker(s: _Site) -> None:
        batches = todo[s.site]
        while batches and len(counted) < 2:
            blob, n = batches.pop(0)
            await s.push(blob, n, stats, deadline=SAT_DEADLINE_S)

    async def mark() -> None:
        await stats.full.wait()
        counted.append(stats.readings)
        cpu.append(time.process_time())
        tier.start()
        await asyncio.sleep(seconds)
        tier.stop()
        counted.append(stats.readings)
        cpu.append(time.process_time())

    await asyncio.gather(mark(), *(worker(s) for s in sites for _ in range(SAT_CALLS)))
    return (counted[1] - counted[0]) / seconds, (cpu[1] - cpu[0]) / seconds


async def _recover(sites: list[_Site], backlog: int, procs: list[localrun.IngestProc],
                   tier: TierMeter) -> tuple[_Stats, float, float, float]:
    """(stats, seconds from the first call to the last ack, idle MB of the connections, the
    load generator's CPU meanwhile in cores); ``tier`` is metered over the same span."""
    todo = {s.site: _batches(s, RECOVERY_EPOCH, backlog) for s in sites}
    base = sum(rss_mb(p.proc.pid) for p in procs)
    for s in sites:
        s.call()
    await asyncio.gather(*(s.channels[s.current].channel_ready() for s in sites))
    idle_mb = sum(rss_mb(p.proc.pid) for p in procs) - base
    stats = _Stats()
    tier.start()
    t0 = stats.start = time.monotonic()
    cpu0 = time.process_time()
    await asyncio.gather(*(_lane(s, todo[s.site], stats) for s in sites))
    tier.stop()
    cores = (time.process_time() - cpu0) / (time.monotonic() - t0)
    return stats, stats.last_ack - t0, idle_mb, cores


def _refusals(ports: list[int]) -> dict[str, float]:
    """The replicas' admission refusals by why, and the next turns they named, summed
    (from their ``/metrics`` on ``ports``)."""
    out: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "bridge_ingest_admission_refusals_total":
                    out[s.labels["why"]] = out.get(s.labels["why"], 0.0) + s.value
                elif s.name == "bridge_ingest_admission_next_turns_total":
                    out["next_turns"] = out.get("next_turns", 0.0) + s.value
    return out


async def _subject_counts(servers: list[str], epoch: int) -> dict[str, int]:
    nc = await nats.connect(servers=servers)
    try:
        info = await nc.jetstream().stream_info("BRIDGE",
                                                subjects_filter=f"bridge.r.*.{epoch:016x}")
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


def run(*, work: Path, sites: int, backlog: int, sat_sites: int, sat_seconds: float,
        log: Callable[[str], None], ingest_extra: str = "") -> list[Row]:
    if sites < 2 * sat_sites:
        # The saturation phase runs before and after the recovery with other sites each time.
        raise ValueError(f"--sites {sites} is fewer than twice --sat-sites {sat_sites}: the "
                         "saturation phase runs twice, with different sites each time")
    names = [f"rec-site-{i}" for i in range(sites)]
    t0 = time.monotonic()
    pkis = localrun.Pki(work / "pki", names)
    log(f"  {sites} site certificates in {time.monotonic() - t0:.0f} s")
    cluster = JetStreamCluster(work / "js", sync="default").start()

    scrape: dict[str, int] = {}  # replica's target -> its metrics port

    def replicas(extra: str) -> list[localrun.IngestProc]:
        procs = []
        for i in range(2):
            port = localrun.free_port()
            p = localrun.ingest(work, pkis, "rec", name=f"rec-{i}", jetstream=cluster.servers,
                                extra=f'[log]\nlevel = "warning"\n[metrics]\nlisten = '
                                f'"127.0.0.1:{port}"\n' + extra)
            scrape[p.target] = port
            procs.append(p.start())
        for p in procs:
            try:
                localrun.wait_healthy(p.target, pkis.consumer(), timeout=60)
            except TimeoutError as exc:
                for q in procs:
                    q.proc.stop()
                raise RuntimeError(f"{exc}; its log ends:\n{p.proc.tail(30)}") from exc
        return procs

    def tier(procs: list[localrun.IngestProc]) -> TierMeter:
        pids = {p.node: p.proc.pid for p in procs}
        for n in cluster.nodes:
            assert n.proc is not None
            pids[n.name] = n.proc.pid
        return TierMeter(pids=pids, part={p.node for p in procs})

    async def saturate(targets: list[str], part: list[str], metered: list[TierMeter]
                       ) -> list[tuple[float, float]]:
        """(readings/s, load generator cores) of each of ``SAT_SHAPES`` in turn."""
        sat = _sites(part, targets, pkis)
        try:
            return [await _saturate(sat[:max(1, round(len(sat) * share))], sat_seconds, t,
                                    epoch)
                    for (share, epoch), t in zip(SAT_SHAPES, metered, strict=True)]
        finally:
            await asyncio.gather(*(s.close() for s in sat))

    async def recover(targets: list[str], procs: list[localrun.IngestProc], metered: TierMeter
                      ) -> tuple[_Stats, float, float, float]:
        fleet = _sites(names, targets, pkis)
        try:
            return await _recover(fleet, backlog, procs, metered)
        finally:
            await asyncio.gather(*(s.close() for s in fleet))

    def raw_tier(part: list[str], phases: list[_Phase]) -> float:
        """The raw tier's best rate over ``SAT_SHAPES``, appended to ``phases``."""
        procs = replicas("[limits]\nadmit_target_ms = 0\n")  # the raw tier
        try:
            metered = [tier(procs) for _ in SAT_SHAPES]
            shapes = asyncio.run(saturate([p.target for p in procs], part, metered))
        finally:
            for p in procs:
                p.proc.stop()
        best = max(range(len(shapes)), key=lambda i: shapes[i][0])
        phases.append(_Phase(rate=shapes[best][0], gen_cores=shapes[best][1],
                             tier=metered[best], shapes=[r for r, _ in shapes]))
        return shapes[best][0]

    try:
        phases: list[_Phase] = []
        sat_phase = raw_tier(names[:sat_sites], phases)
        procs = replicas(ingest_extra)
        rec_tier = tier(procs)
        try:
            stats, elapsed, idle_mb, rec_cores = asyncio.run(
                recover([p.target for p in procs], procs, rec_tier))
            why = _refusals([scrape[p.target] for p in procs])
        finally:
            for p in procs:
                p.proc.stop()
        # Again after the recovery, on the stream it left and with other sites: this
        # machine's speed drifts by a sixth within minutes, so the tier's saturation rate
        # is the mean of the two, bracketing the recovery. (Not the recovery's own best
        # 10 s: the most of ten noisy windows is above their mean by construction; it is
        # reported beside, as ratio_to_best_saturation.)
        sat_after = raw_tier(names[sat_sites:2 * sat_sites], phases)
        sat_rate = (sat_phase + sat_after) / 2
        counts = asyncio.run(_subject_counts(cluster.servers, RECOVERY_EPOCH))
    finally:
        cluster.stop()
    wrong = [n for n in names
             if counts.get(f"bridge.r.{subject_token(n)}.{RECOVERY_EPOCH:016x}") != backlog]
    if wrong:
        raise RuntimeError(f"{len(wrong)} sites' subjects do not hold exactly their backlog, "
                           f"e.g. {wrong[0]}")
    total = sites * backlog
    rate = total / elapsed
    p99 = percentile(stats.latencies, 99) * 1000
    resent = stats.duplicates / total * 100
    # CPU per reading of the tier (replicas and nats-servers) in each phase: does the recovery
    # cost more work per reading? (The host's speed moves this too: docs/deployment.md.)
    sats = [ph.tier for ph in phases]
    sat_cores = phases[0].gen_cores
    sat_us = sum(ph.tier.seconds / (ph.rate * sat_seconds) for ph in phases) / 2 * 1e6
    rec_us = rec_tier.seconds / total * 1e6
    sat_cores_tier = sum(t.seconds for t in sats) / (2 * sat_seconds)
    rec_cores_tier = rec_tier.seconds / elapsed
    sat_cores_rep = sum(t.part_s for t in sats) / (2 * sat_seconds)
    rec_cores_rep = rec_tier.part_s / elapsed
    log(f"  saturation ({sat_sites} sites, then " + ", ".join(
        f"{max(1, round(sat_sites * share))}" for share, _ in SAT_SHAPES[1:]) + "): "
        + " and ".join("/".join(f"{r:,.0f}" for r in ph.shapes) for ph in phases)
        + " readings/s before and after the recovery; "
        f"the tier's rate {sat_phase:,.0f}/s before the recovery, "
        f"{sat_after:,.0f}/s after it, best 10 s of the recovery "
        f"{stats.best_rate(10.0):,.0f}/s; recovery of {sites} "
        f"sites x {backlog}: {rate:,.0f} readings/s ({rate / sat_rate:.2f}x) in {elapsed:.0f} s,"
        f" admitted p99 {p99:.0f} ms, {stats.refused} refused, {stats.deadlines} deadlines "
        f"exceeded, {stats.failovers} failovers, {stats.duplicates} re-sent; idle channels "
        f"{idle_mb * 1024 / sites:.0f} kB per site; every reading stored once; the load "
        f"generator used {sat_cores:.2f} cores in the saturation phase, {rec_cores:.2f} in "
        f"the recovery")
    log("  refused by why: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(why.items())
                                          if k != "next_turns")
        + f"; OK answers naming the next turn: {stats.next_turns:,} seen by the sites, "
        f"{why.get('next_turns', 0):,.0f} counted by the replicas")
    log(f"  the tier (replicas and nats-servers) used {sat_us:.1f} us of CPU per reading and "
        f"{sat_cores_tier:.2f} cores ({sat_cores_rep:.2f} the replicas) in the saturation "
        f"phases, {rec_us:.1f} us and {rec_cores_tier:.2f} cores ({rec_cores_rep:.2f}) in the "
        f"recovery ({sat_us / rec_us:.2f}x); the host took "
        f"{sum(t.steal_s for t in sats) / (2 * sat_seconds):.2f} and "
        f"{rec_tier.steal_s / elapsed:.2f} cores (steal)")
    log("  readings/s in each 10 s of the recovery: " + ", ".join(
        f"{n / 10:,.0f}" for n in stats.timeline(stats.start, 10.0)))
    return [Row(SCENARIO, SYSTEM, "saturation_readings_per_s", round(sat_rate, 1), "readings/s"),
            Row(SCENARIO, SYSTEM, "saturation_phase_readings_per_s", round(sat_phase, 1),
                "readings/s"),
            Row(SCENARIO, SYSTEM, "saturation_after_readings_per_s", round(sat_after, 1),
                "readings/s"),
            Row(SCENARIO, SYSTEM, "ratio_to_best_saturation",
                round(rate / max(sat_phase, sat_after, stats.best_rate(10.0)), 3), "x"),
            Row(SCENARIO, SYSTEM, "readings_per_s", round(rate, 1), "readings/s"),
            Row(SCENARIO, SYSTEM, "ratio_to_saturation", round(rate / sat_rate, 3), "x"),
            Row(SCENARIO, SYSTEM, "admitted_p99_ms", round(p99, 1), "ms"),
            Row(SCENARIO, SYSTEM, "calls_refused", stats.refused, "calls"),
            Row(SCENARIO, SYSTEM, "next_turns_named", stats.next_turns, "calls"),
            Row(SCENARIO, SYSTEM, "deadlines_exceeded", stats.deadlines, "calls"),
            Row(SCENARIO, SYSTEM, "failovers", stats.failovers, "calls"),
            Row(SCENARIO, SYSTEM, "resent_pct", round(resent, 3), "%"),
            Row(SCENARIO, SYSTEM, "idle_kb_per_site", round(idle_mb * 1024 / sites, 1), "kB"),
            Row(SCENARIO, SYSTEM, "tier_cpu_us_per_reading_saturation", round(sat_us, 2), "us"),
            Row(SCENARIO, SYSTEM, "tier_cpu_us_per_reading_recovery", round(rec_us, 2), "us"),
            Row(SCENARIO, SYSTEM, "cpu_ratio_to_saturation", round(sat_us / rec_us, 3), "x"),
            Row(SCENARIO, SYSTEM, "tier_cores_saturation", round(sat_cores_tier, 2), "cores"),
            Row(SCENARIO, SYSTEM, "tier_cores_recovery", round(rec_cores_tier, 2), "cores"),
            Row(SCENARIO, SYSTEM, "replica_cores_saturation", round(sat_cores_rep, 2), "cores"),
            Row(SCENARIO, SYSTEM, "replica_cores_recovery", round(rec_cores_rep, 2), "cores"),
            Row(SCENARIO, SYSTEM, "host_steal_cores_saturation",
                round(sum(t.steal_s for t in sats) / (2 * sat_seconds), 2), "cores"),
            Row(SCENARIO, SYSTEM, "host_steal_cores_recovery",
                round(rec_tier.steal_s / elapsed, 2), "cores"),
            Row(SCENARIO, "load_generator", "cores_saturation", round(sat_cores, 2), "cores"),
            Row(SCENARIO, "load_generator", "cores_recovery", round(rec_cores, 2), "cores")]


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.recovery")
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=2500)
    ap.add_argument("--sat-sites", type=int, default=100)
    ap.add_argument("--sat-seconds", type=float, default=10.0)
    ap.add_argument("--no-admission", action="store_true",
                    help="the replicas without admission control (limits.admit_target_ms = 0)")
    ap.add_argument("--admit-target-ms", type=int, default=None,
                    help="the replicas' limits.admit_target_ms for the recovery (default: "
                    "their default)")
    ap.add_argument("--admit-wait-ms", type=int, default=None,
                    help="the replicas' limits.admit_wait_ms for the recovery (default: "
                    "their default)")
    args = ap.parse_args()
    if args.sites < 2 * args.sat_sites:
        ap.error(f"--sites {args.sites} must be at least twice --sat-sites {args.sat_sites}: "
                 "the saturation phase runs before and after the recovery, with other sites")
    extra = ""
    if args.no_admission:
        extra = "[limits]\nadmit_target_ms = 0\n"
    else:
        if args.admit_target_ms is not None:
            extra += f"admit_target_ms = {args.admit_target_ms}\n"
        if args.admit_wait_ms is not None:
            extra += f"admit_wait_ms = {args.admit_wait_ms}\n"
        extra = "[limits]\n" + extra if extra else ""
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for r in run(work=Path(tmp), sites=args.sites, backlog=args.backlog,
                     sat_sites=args.sat_sites, sat_seconds=args.sat_seconds, log=print,
                     ingest_extra=extra):
            print(f"{r.metric:<28} {r.value:g} {r.unit}")


if __name__ == "__main__":
    main()
