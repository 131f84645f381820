"""The scenarios: each builds the site, injects one kind of failure, heals it, and accounts.

Each returns a ``Result``: the exact accounting (published, committed once, lost, doubled),
the seconds each event took, and the properties it checked (``checks``: name -> held). A
scenario passes only if every check held and the accounting is exact. ``quick`` runs the
same scenario smaller (the ``make test`` subset); ``make hil`` runs every one full size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.kernel import Capabilities, probe
from hil.site import Accounting, Site
from hil.topology import Topology


@dataclass
class Result:
    scenario: str
    accounting: Accounting | None = None
    timings: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    tag: int = 0  # the testbed's address block, 10.<tag>.0.0/16 (its namespaces: hil<tag>-*)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.accounting is not None and self.accounting.exact
                and all(self.checks.values()))

    def lines(self) -> list[str]:
        a = self.accounting
        out = [f"scenario {self.scenario}: {'PASS' if self.ok else 'FAIL'}"]
        if a is not None:
            out.append(f"  published {a.published}, committed once {a.committed_once}, "
                       f"lost {a.lost}, doubled {a.doubled}")
        out += [f"  {k}: {v:.3f}{' s' if k.endswith('_s') else ''}"
                for k, v in self.timings.items()]
        out += [f"  check {k}: {'held' if v else 'FAILED'}" for k, v in self.checks.items()]
        out += [f"  note: {n}" for n in self.notes]
        if self.error:
            out.append(f"  error: {self.error}")
        return out


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _drain(site: Site, published: int, r: Result, *, timeout: float, key: str) -> None:
    r.timings[key] = site.wait(lambda: site.idle(published), timeout=timeout,
                               what="the agent's spool to empty")


def primary_leg_down(site: Site, r: Result, quick: bool) -> None:
    """wan0 fails: the agent moves to lte0 of the same cloud, then back once wan0 is stable."""
    t = site.topo
    n, outage_s = (1500, 4.0) if quick else (6000, 15.0)
    pub = site.publish(n, 200)
    site.wait(lambda: site.active() == "aws/wan0" and pub.progress.acked >= n // 4,
              timeout=60, what="traffic on aws/wan0")
    lte_before = t.leg_bytes("lte0")
    down_ns = time.time_ns()
    t.link("gateway", "wan0", up=False)
    down_done = time.time()  # the link is down once `ip` returns
    site.wait(lambda: site.active() == "aws/lte0", timeout=30, what="failover to aws/lte0")
    site.wait(lambda: (site.status()["uplink"]["failover_first_ack_ns"] or 0) > down_ns,
              timeout=30, what="the first ack over lte0")
    first_ack = site.status()["uplink"]["failover_first_ack_ns"]
    r.timings["failover_to_backup_leg_s"] = (first_ack - down_ns) / 1e9
    seen: set[str] = set()
    wan0_states: set[str] = set()
    end = time.monotonic() + outage_s
    while time.monotonic() < end:  # sample the outage: what is active, what wan0's state is
        eps = site.endpoints()
        seen.update(name for name, e in eps.items() if e["active"])
        wan0_states.add(eps["aws/wan0"]["state"])
        time.sleep(0.1)
    r.checks["moved to the backup leg of the same cloud"] = seen == {"aws/lte0"}
    r.checks["the downed leg stayed unhealthy (never reached by another route)"] = \
        wan0_states == {"unhealthy"}
    r.checks["the backup leg carried the traffic"] = t.leg_bytes("lte0") > lte_before + 10_000
    lte_peer = site.peers("aws").get(t.leg_addr("lte0"), 0)
    r.checks["the cloud saw batches from the lte0 address"] = lte_peer > 0
    up_at, up_wall = time.monotonic(), time.time()
    t.link("gateway", "wan0", up=True)
    # Readings keep coming: fail-back is decided per batch.
    more = site.publish(3000 if quick else 9000, 100, first=n + 1)
    site.wait(lambda: site.active() == "aws/wan0", timeout=30 if quick else 90,
              what="fail-back to aws/wan0")
    r.timings["failback_after_repair_s"] = time.monotonic() - up_at
    r.notes.append("fail-back waits failback_after_s = 3 s of continuous health")
    published = pub.join(300) + more.join(300)
    _drain(site, published, r, timeout=120, key="drain_after_publisher_s")
    wan0_acks = [e for e in site.events("uplink.batch") if e.get("status") == "OK"
                 and e["endpoint"] == "aws/wan0"
                 and down_done < e["ts"] - e["duration_ms"] / 1000 < up_wall]
    r.checks["no batch sent on aws/wan0 while wan0 was down was acked"] = not wan0_acks
    failed = [e for e in site.events("netbind.connect_failed") if e.get("interface") == "wan0"]
    r.notes.append(f"bind-proxy connects refused on the downed wan0: {len(failed)} (the old "
                   "connection is dropped by keepalive; short outages end before a reconnect)")
    r.accounting = site.account(published)


def slow_backup_drain(site: Site, r: Result, quick: bool) -> None:
    """Every leg down while a backlog builds; then only lte0 at 256 kbit/s: it drains the
    backlog while live readings, sent first, stay fresh."""
    t = site.topo
    backlog, live, live_rate = (2000, 300, 10.0) if quick else (36_000, 1800, 10.0)
    r.notes.append(f"backlog: {backlog} readings (an hour of a 10 readings/s plant when full "
                   "size), published while no WAN leg was up")
    t.link("gateway", "wan0", up=False)
    t.link("gateway", "lte0", up=False)
    site.publish(backlog, 0).join(600)
    site.wait(lambda: site.status()["committed_messages"] >= backlog, timeout=300,
              what="the backlog to be spooled")
    t.cap("lte0", 256)
    up_ns = time.time_ns()
    t.link("gateway", "lte0", up=True)
    pub = site.publish(live, live_rate, first=backlog + 1)
    site.wait(lambda: site.status()["spool"]["readings"] <= live_rate * 2, timeout=1800,
              what="the backlog to drain")
    r.timings["drain_s"] = (time.time_ns() - up_ns) / 1e9
    published = backlog + pub.join(live / live_rate + 300)
    _drain(site, published, r, timeout=300, key="drain_after_publisher_s")
    acct = site.account(published)
    # The live lane is what arrived after the sender set the backlog's boundary, once the leg
    # answered again; what arrived before (while no endpoint was healthy) is backlog.
    started = [e["ts"] for e in site.events("uplink.drain_started") if e["ts"] >= up_ns / 1e9]
    boundary_ns = int(started[0] * 1e9) if started else up_ns
    r.timings["backlog_boundary_after_leg_up_s"] = (boundary_ns - up_ns) / 1e9
    live_lat = [s for gw_ns, s in acct.latencies_s if gw_ns >= boundary_ns]
    r.timings["live_p50_s"] = _p(live_lat, 50)
    r.timings["live_p99_s"] = _p(live_lat, 99)
    r.timings["drain_readings_per_second"] = backlog / r.timings["drain_s"]
    r.checks["live readings stayed fresh (p99 under 10 s) while the backlog drained"] = \
        r.timings["live_p99_s"] < 10.0
    r.checks["only lte0 carried it"] = all(e["leg"] != "wan0" for e in
                                          site.events("uplink.batch") if e.get("status") == "OK")
    r.accounting = acct


def _cut_aws(site: Site, r: Result, quick: bool, cut: Callable[[bool], None], *,
             healed_key: str) -> list[dict[str, dict[str, Any]]]:
    """Traffic on aws/wan0, then ``cut(True)`` cuts aws off: failover to azure is timed, the
    endpoints are sampled while it stays cut, ``cut(False)`` mends it, fail-back is timed and
    every reading accounted. Returns the samples taken while aws was cut off."""
    n, hold_s = (1500, 5.0) if quick else (6000, 30.0)
    pub = site.publish(n, 200)
    site.wait(lambda: site.active() == "aws/wan0" and pub.progress.acked >= n // 4,
              timeout=60, what="traffic on aws/wan0")
    t0 = time.monotonic()
    cut(True)
    site.wait(lambda: (site.active() or "").startswith("azure"), timeout=60,
              what="failover to azure")
    r.timings["failover_to_next_cloud_s"] = time.monotonic() - t0
    samples = []
    end = time.monotonic() + hold_s
    while time.monotonic() < end:  # sample the outage: what is active, what state aws is in
        samples.append(site.endpoints())
        time.sleep(0.1)
    t1 = time.monotonic()
    cut(False)
    # Readings keep coming: fail-back is decided per batch.
    more = site.publish(3000 if quick else 9000, 100, first=n + 1)
    site.wait(lambda: site.active() == "aws/wan0", timeout=30 if quick else 90,
              what="fail-back to aws")
    r.timings[healed_key] = time.monotonic() - t1
    published = pub.join(300) + more.join(300)
    _drain(site, published, r, timeout=120, key="drain_after_publisher_s")
    r.accounting = site.account(published)
    return samples


def one_way_partition(site: Site, r: Result, quick: bool) -> None:
    """aws receives but its answers never return: the agent must leave it, losing nothing."""
    samples = _cut_aws(site, r, quick, lambda on: site.topo.one_way("aws", on=on),
                       healed_key="failback_after_heal_s")
    active = [next((name for name, e in eps.items() if e["active"]), "") for eps in samples]
    r.checks["stayed off the partitioned cloud"] = all(a.startswith("azure") for a in active)


def blackholed_cloud(site: Site, r: Result, quick: bool) -> None:
    """A dead route upstream: everything toward aws vanishes on both legs. Found by the health
    probe (no RST, no error: silence), left for azure, returned to after the repair."""
    samples = _cut_aws(site, r, quick, lambda on: site.topo.blackhole("aws", on=on),
                       healed_key="failback_after_repair_s")
    states = {eps[name]["state"] for eps in samples for name in ("aws/wan0", "aws/lte0")}
    r.checks["both aws legs stayed unhealthy behind the blackhole"] = states == {"unhealthy"}


def rtt_loss(site: Site, r: Result, quick: bool) -> None:
    """200 ms RTT and 2 % packet loss to every cloud (the userspace relay): slower, exact."""
    t = site.topo
    n, rate = (600, 100) if quick else (6000, 100)
    t.relay((100.0, 5.0, 0.02))
    t0 = time.monotonic()
    try:
        pub = site.publish(n, rate)
        published = pub.join(n / rate + 300)
        _drain(site, published, r, timeout=300, key="drain_after_publisher_s")
        r.timings["publish_to_drained_s"] = time.monotonic() - t0
    finally:
        counts = t.relay(None)
    r.notes.append(f"relay: {counts.get('packets', 0)} packets, {counts.get('dropped', 0)} "
                   "dropped")
    r.checks["the relay dropped packets (the loss was real)"] = counts.get("dropped", 0) > 0
    acct = site.account(published)
    lat = [s for _, s in acct.latencies_s]
    r.timings["p50_s"], r.timings["p99_s"] = _p(lat, 50), _p(lat, 99)
    # One call is one round trip on an open connection: 200 ms, less up to 2 x 5 ms jitter.
    r.checks["latency shows the 200 ms RTT (p50 >= 0.18 s)"] = r.timings["p50_s"] >= 0.18
    r.notes.append(f"failovers during the run: {site.status()['uplink']['failovers']}")
    r.accounting = acct


def ot_flap(site: Site, r: Result, quick: bool) -> None:
    """The OT leg to the plant broker goes down and up; the broker's session holds readings."""
    t = site.topo
    n, flaps, down_s = (1500, 2, 8.0) if quick else (4000, 5, 10.0)
    pub = site.publish(n, 100)
    for _ in range(flaps):
        site.wait(lambda: site.status()["sources"][0]["subscribed"], timeout=60,
                  what="the source to be subscribed")
        t.link("gateway", "ot0", up=False)
        time.sleep(down_s)  # the outage itself
        t.link("gateway", "ot0", up=True)
        r.timings.setdefault("resubscribed_after_flap_s", 0.0)
        r.timings["resubscribed_after_flap_s"] = max(
            r.timings["resubscribed_after_flap_s"],
            site.wait(lambda: site.status()["sources"][0]["subscribed"], timeout=60,
                      what="the source to resubscribe"))
    published = pub.join(300)
    _drain(site, published, r, timeout=120, key="drain_after_publisher_s")
    lost = len(site.events("source.disconnected"))
    r.notes.append(f"{flaps} flaps of {down_s:g} s; the source saw {lost} disconnects")
    r.checks["the source noticed the OT leg going down"] = lost >= 1
    r.accounting = site.account(published)


def all_down(site: Site, r: Result, quick: bool) -> None:
    """Every WAN leg down for ten minutes (20 s quick) under load: spooled, then drained."""
    t = site.topo
    outage_s, rate = (20.0, 50.0) if quick else (600.0, 50.0)
    n = int(rate * (outage_s + 20))
    pub = site.publish(n, rate, timeout_s=outage_s + 900)
    site.wait(lambda: pub.progress.acked >= rate * 5, timeout=60, what="publishing under way")
    t.link("gateway", "wan0", up=False)
    t.link("gateway", "lte0", up=False)
    time.sleep(outage_s)  # the outage itself
    held = site.status()["spool"]["readings"]
    r.notes.append(f"spooled at the end of the outage: {held} readings")
    r.checks["the spool held the outage's readings"] = held >= rate * outage_s * 0.8
    up = time.monotonic()
    t.link("gateway", "wan0", up=True)
    t.link("gateway", "lte0", up=True)
    site.wait(lambda: site.status()["spool"]["readings"] < rate * 2, timeout=600,
              what="the backlog to drain")
    r.timings["backlog_drained_s"] = time.monotonic() - up
    published = pub.join(900)
    _drain(site, published, r, timeout=120, key="drain_after_publisher_s")
    r.accounting = site.account(published)


SCENARIOS: dict[str, tuple[Callable[[Site, Result, bool], None], str, str]] = {
    # name: (function, uplink config for it, spool config)
    "primary-leg-down": (primary_leg_down, "", ""),
    "slow-backup-drain": (slow_backup_drain,
                          "batch_max_readings = 50\ndrain_max_per_s = 60.0\n", ""),
    "one-way-partition": (one_way_partition, "", ""),
    "blackholed-cloud": (blackholed_cloud, "", ""),
    "rtt-200ms-loss-2pct": (rtt_loss, "", ""),
    "ot-leg-flap": (ot_flap, "", ""),
    "all-legs-down": (all_down, "", ""),
}
NEEDS = {"slow-backup-drain": ("tbf",), "rtt-200ms-loss-2pct": ("tun",)}


def run(name: str, *, quick: bool, workdir: Path | None = None,
        caps: Capabilities | None = None, tag: int | None = None) -> Result:
    """Build the site, run one scenario, tear it all down; never raises for the scenario."""
    fn, uplink_extra, spool_extra = SCENARIOS[name]
    r = Result(scenario=name)
    caps = caps or probe()
    missing = [f for f in ("netns", "veth", *NEEDS.get(name, ())) if not caps.has(f)]
    if missing:
        r.error = "this kernel lacks " + ", ".join(f"{f} ({caps.missing.get(f)})"
                                                  for f in missing)
        return r
    if not caps.has("vlan"):
        r.notes.append(f"OT leg is a plain veth: 802.1Q VLAN devices are missing "
                       f"({caps.missing.get('vlan')})")
    with tempfile.TemporaryDirectory(prefix=f"hil-{name}-", dir=workdir) as tmp:
        topo = Topology(tag=tag if tag is not None else _tag(), caps=caps, workdir=Path(tmp))
        r.tag = topo.tag
        site: Site | None = None
        t0 = time.monotonic()
        try:
            topo.build()
            site = Site(topo=topo, workdir=Path(tmp), uplink_extra=uplink_extra,
                        spool_extra=spool_extra).start()
            r.timings["site_up_s"] = time.monotonic() - t0
            fn(site, r, quick)
        except Exception as exc:  # noqa: BLE001 - a failed scenario is a result, with logs
            r.error = f"{type(exc).__name__}: {exc}"
            if site is not None and site.agent is not None:
                r.notes.append("agent log tail:\n" + site.agent.tail(15))
        finally:
            if site is not None:
                site.stop()
            topo.teardown()
    return r


def _tag() -> int:
    """The second octet of the testbed's 10.B.0.0/16, chosen among free ones."""
    import os
    import subprocess
    taken = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    for b in [160 + (os.getpid() + i) % 40 for i in range(40)]:
        if f"hil{b}-" not in taken:
            return b
    raise RuntimeError("no free testbed address block (40 hil runs at once?)")
