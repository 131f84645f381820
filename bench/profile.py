"""Where the bridge's time goes under the full-speed JSON load (``make profile``).

Starts the bridge (site mosquitto, agent, one ingest), publishes with ``bench.load.Blast``, and
for ``seconds`` in the middle of the run measures each process's CPU share (from
/proc/<pid>/stat) and records the agent with py-spy (``pip install py-spy``; needs ptrace,
so root or CAP_SYS_PTRACE). Prints the CPU table, the agent's rate meanwhile, and the hottest
frames (own time and inclusive), so a claim about the bottleneck comes with its evidence.

``--load sparkplug`` profiles the Sparkplug scenario's load instead (2 ``python -m devkit simulate``
processes, 50 metrics a message), ``--load drain`` a 1M-reading backlog drained with no live
traffic (the spool filled before the agent starts, as ``make bench``'s drain scenario does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import memory
from bench.load import Blast
from bench.systems import Bridge
from bench.throughput import sparkplug_load


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of a process so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def top_frames(folded: Path, n: int) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    out = [f"{total} samples", "own time:"]
    out += [f"  {k * 100 / total:5.1f}%  {f[:120]}" for f, k in own.most_common(n)]
    out.append("inclusive:")
    out += [f"  {k * 100 / total:5.1f}%  {f[:120]}" for f, k in incl.most_common(n * 2)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--load", choices=("json", "sparkplug", "drain"), default="json")
    ap.add_argument("--backlog", type=int, default=1_000_000, help="readings, for --load drain")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        bridge = Bridge(workdir=work, codec="sparkplug" if args.load == "sparkplug" else "json")
        if args.load == "drain":
            memory.fill(bridge.work / "spool-bench-site.db", args.backlog)
        bridge.start()
        assert bridge.agent is not None and bridge.broker.proc is not None
        pids = {"agent": bridge.agent.proc.pid, "ingest": bridge.node.proc.pid,
                "site mosquitto": bridge.broker.proc.pid}
        count = int(args.seconds * 20_000) + 40_000
        load: list[subprocess.Popen[bytes]] = []
        blast = Blast(workdir=work, port=bridge.mqtt_port, site="bench-site", count=count)
        try:
            if args.load == "json":
                blast.start()
            elif args.load == "sparkplug":
                load = sparkplug_load(bridge.mqtt_port, int(args.seconds * 3_000) + 6_000, 2,
                                      output=subprocess.DEVNULL)
            while bridge.committed() < 5_000:  # past start-up, into the steady state
                time.sleep(0.05)
            before = {k: cpu_ticks(p) for k, p in pids.items()}
            c0, t0 = bridge.committed(), time.monotonic()
            folded = work / "agent.folded"
            subprocess.run([spy, "record", "-p", str(pids["agent"]), "-d",
                            str(int(args.seconds)), "-r", "200", "-f", "raw", "-o",
                            str(folded), "--nonblocking"], check=True, capture_output=True)
            elapsed = time.monotonic() - t0
            after = {k: cpu_ticks(p) for k, p in pids.items()}
            rate = (bridge.committed() - c0) / elapsed
            reads = bridge.agent.status()["spool"].get("reads", {})
        finally:
            blast.stop()
            for proc in load:
                proc.kill()
            bridge.stop()
        hz = os.sysconf("SC_CLK_TCK")
        unit = "messages (one envelope each)" if args.load == "sparkplug" else "readings"
        print(f"[{args.load}] agent committed {rate:,.0f} {unit}/s over {elapsed:.1f} s "
              f"({os.cpu_count()} CPUs on this machine)")
        for name in pids:
            print(f"  {name:<15} {(after[name] - before[name]) / hz / elapsed * 100:5.0f}% CPU")
        print(f"  the sender's batches so far: {reads.get('memory', 0):,} from memory, "
              f"{reads.get('file', 0):,} from the spool file")
        print(top_frames(folded, args.top))


if __name__ == "__main__":
    main()
