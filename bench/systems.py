"""The systems under test, each an edge (where the load goes) and a cloud side that commits.

Every system answers the same questions, so a scenario is written once:

* ``mqtt_port``: where the load generator publishes (the site's broker);
* ``committed()``: how many readings the cloud side holds now (polled while a run goes);
* ``records()``: every reading the cloud side holds, duplicates included, as ``Record``
  (publisher seq, publish time from the payload, time the cloud side committed it: the ingest's
  commit time, the JetStream stored time, or the cloud collector's receipt time for mosquitto);
* ``kill_cloud``/``start_cloud`` and ``kill_edge``/``start_edge`` (SIGKILL, then a restart on
  the same ports and the same on-disk state) for the fault scenario;
* ``pids()``: the system's processes by role, ``edge_roles`` the ones on the gateway (for CPU
  per reading; load generators and cloud-side readers are not the system's);
* ``verify()``: checks, after a run, that the system kept its guarantee (its files were
  written during the run, its servers report the sync setting claimed) and returns the
  evidence; raises ``bench.evidence.GuaranteeNotMet`` otherwise.

``Bridge`` is ours: the site's mosquitto, the agent, one ingest node. Its edge process is the
agent (the site broker is the SCADA's and stays up); for the peers (``bench.peers``) the edge
process is the bridging broker itself, which is also the site broker.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from bench.evidence import FileWatch
from bench.results import Row
from bridge.cloud import consume
from bridge.shared._pb import bridge_pb2 as pb
from devkit import localrun


class Record(NamedTuple):
    seq: int
    published_ns: int
    committed_ns: int


class System(Protocol):
    name: str
    mqtt_port: int
    edge_roles: tuple[str, ...]

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def committed(self) -> int: ...
    def records(self) -> list[Record]: ...
    def kill_cloud(self) -> None: ...
    def start_cloud(self) -> None: ...
    def kill_edge(self) -> None: ...
    def start_edge(self) -> None: ...
    def pids(self) -> dict[str, int]: ...
    def verify(self) -> dict[str, float]: ...


def checked(scenario: str, system: System, log: Callable[[str], None]) -> list[Row]:
    """``system.verify()`` after a run, as rows of the ``guarantees`` scenario (it raises, and
    the run fails, when the system did not keep the guarantee its column claims)."""
    evidence = system.verify()
    log(f"  {system.name} guarantee checked: "
        + ", ".join(f"{k} {v:g}" for k, v in evidence.items()))
    return [Row("guarantees", system.name, f"{scenario}.{key}", value, "evidence")
            for key, value in evidence.items()]


def exe(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError(f"{name} is not installed")


def record(payload: bytes, committed_ns: int) -> Record:
    doc = orjson.loads(payload)
    return Record(int(doc["seq"]), int(doc["ts"]) * 1000, committed_ns)


class Bridge:
    """Our agent between the site broker and one ingest node."""

    name = "bridge"

    def __init__(self, *, workdir: Path, site: str = "bench-site", agent_extra: str = "",
                 spool_extra: str = "", codec: str = "json") -> None:
        self.work, self.site = workdir / "bridge", site
        self.work.mkdir(parents=True, exist_ok=True)
        self.pki = localrun.Pki(self.work / "pki", [site])
        self.broker = localrun.Mosquitto(self.work)
        self.node = localrun.ingest(self.work, self.pki, "aws")
        self._agent_extra, self._spool_extra, self._codec = agent_extra, spool_extra, codec
        self.agent: localrun.AgentProc | None = None
        self.mqtt_port = 0
        spool = self.work / f"spool-{site}.db"
        store = self.work / "store-aws.db"
        self._watches = [
            FileWatch(paths=(spool, spool.with_name(spool.name + "-wal")), what="agent spool"),
            FileWatch(paths=(store, store.with_name(store.name + "-wal")), what="ingest store")]

    def start(self) -> None:
        self.broker.start()
        self.mqtt_port = self.broker.port
        self.node.start()
        localrun.wait_healthy(self.node.target, self.pki.consumer())
        sources = None
        if self._codec == "sparkplug":
            sources = (f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{self.mqtt_port}"\n'
                       'codec = "sparkplug"\n[sources.sparkplug]\nhost_id = "bench"\n')
        self.agent = localrun.agent(self.work, self.pki, self.site, mqtt_port=self.mqtt_port,
                                    endpoints=[self.node], topics=("substation/#",),
                                    extra=self._agent_extra, spool_extra=self._spool_extra,
                                    sources=sources)
        self.start_edge()
        for watch in self._watches:
            watch.begin()

    def stop(self) -> None:
        if self.agent:
            self.agent.proc.stop()
        self.node.proc.stop()
        self.broker.stop()

    edge_roles: tuple[str, ...] = ("agent", "site broker")

    def pids(self) -> dict[str, int]:
        assert self.agent is not None and self.broker.proc is not None
        return {"agent": self.agent.proc.pid, "site broker": self.broker.proc.pid,
                "ingest": self.node.proc.pid}

    def verify(self) -> dict[str, float]:
        """Spool and store written during the run (their fsync per commit is the spool's and
        the store's own invariant, held by the kill -9 tests and the fault scenarios)."""
        return {f"{w.what.replace(' ', '_')}_writes": w.require(wait_s=0.0)
                for w in self._watches}

    def committed(self) -> int:
        assert self.agent is not None
        for watch in self._watches:
            watch.poll()
        return int(self.agent.status()["uplink"]["acked_readings"])

    def stream(self, after: dict[tuple[str, int], int] | None = None) -> list[pb.Committed]:
        """The committed stream, from ``after`` (seq cursors per (site, epoch)) on."""
        merger = consume.Merger(cursors=dict(after or {}))
        errors = asyncio.run(consume.read_all(targets=[self.node.target],
                                              tls=self.pki.consumer(), merger=merger,
                                              timeout=600))
        if errors:
            raise RuntimeError(f"consume failed: {errors}")
        return merger.drain()

    def records(self, after: dict[tuple[str, int], int] | None = None) -> list[Record]:
        return [Record(c.envelope.source_seq, c.envelope.source_time_ns, c.commit_time_ns)
                for c in self.stream(after)]

    def kill_cloud(self) -> None:
        self.node.proc.kill()

    def start_cloud(self) -> None:
        self.node.start()
        localrun.wait_healthy(self.node.target, self.pki.consumer())

    def kill_edge(self) -> None:
        assert self.agent is not None
        self.agent.proc.kill()

    def start_edge(self) -> None:
        assert self.agent is not None
        self.agent.start()
        self.agent.wait_subscribed()
