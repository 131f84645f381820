"""A second-by-second trace of the bridge under the full-speed JSON load.

``python -m bench.trace [--count N]`` starts the bridge as ``make bench`` does (site
mosquitto, agent, one ingest), publishes ``--count`` readings with ``bench.load.Blast`` and
prints, each second: readings committed in the cloud per second, the spool's depth, messages
the agent has taken, the CPU share of the agent and of the ingest, and the agent's anonymous
and file-backed RSS. A stall, a flood into the agent or memory that keeps growing shows here
as a line, where a single end-to-end figure hides it (this is how the inbox flood, the ring
leak and the PUBACK pile-up were found).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.load import Blast
from bench.memory import rss_mb
from bench.profile import cpu_ticks
from bench.systems import Bridge


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.trace")
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--procs", type=int, default=4)
    args = ap.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        bridge = Bridge(workdir=Path(tmp))
        bridge.start()
        assert bridge.agent is not None and bridge.node.proc is not None
        agent, ingest = bridge.agent.proc.pid, bridge.node.proc.pid
        blast = Blast(workdir=Path(tmp), port=bridge.mqtt_port, site="bench-site",
                      count=args.count, procs=args.procs)
        t0 = time.monotonic()
        blast.start()
        last_t, last_c = t0, 0
        last_a, last_i = cpu_ticks(agent), cpu_ticks(ingest)
        try:
            while last_c < args.count:
                time.sleep(1.0)
                now, committed = time.monotonic(), bridge.committed()
                st = bridge.agent.status()
                a, i = cpu_ticks(agent), cpu_ticks(ingest)
                dt = now - last_t
                print(f"{now - t0:6.1f} s  committed/s {(committed - last_c) / dt:8,.0f}  "
                      f"spool {st['spool']['readings']:7,}  taken {st['committed_messages']:9,}  "
                      f"agent {(a - last_a) / hz / dt * 100:4.0f}% CPU  "
                      f"ingest {(i - last_i) / hz / dt * 100:4.0f}% CPU  "
                      f"RSS anon {rss_mb(agent, 'RssAnon'):.0f} MB "
                      f"file {rss_mb(agent, 'RssFile'):.0f} MB",
                      flush=True)
                last_t, last_c, last_a, last_i = now, committed, a, i
        finally:
            blast.stop()
            bridge.stop()
        print(f"{args.count:,} readings in {last_t - t0:.1f} s = "
              f"{args.count / (last_t - t0):,.0f} msgs/s")


if __name__ == "__main__":
    main()
