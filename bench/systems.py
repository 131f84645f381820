"""The systems under test, each an edge (where the load goes) and a cloud side that commits.

Every system answers the same questions, so a scenario is written once:

* ``mqtt_port``: where the load generator publishes (the site's broker);
* ``committed()``: how many readings the cloud side holds now (polled while a run goes);
* ``records()``: every reading the cloud side holds, duplicates included, as ``Record``
  (publisher seq, publish time from the payload, time the cloud side committed it: the ingest's
  commit time, the JetStream stored time, or the cloud collector's receipt time for mosquitto);
* ``kill_cloud``/``start_cloud`` and ``kill_edge``/``start_edge`` (SIGKILL, then a restart on
  the same ports and the same on-disk state) for the fault scenario.

``Bridge`` is ours: the site's mosquitto, the agent, one ingest node. Its edge process is the
agent (the site broker is the SCADA's and stays up); for the peers the edge process is the
bridging broker itself, which is also the site broker.

``MosquittoBridge``: an edge mosquitto bridged (``topic # out 1``, ``cleansession false``) to a
cloud mosquitto, persistence on; the cloud side is read by a persistent ``mosquitto_sub``
session. ``durable`` adds ``autosave_on_changes true`` and ``autosave_interval 1``: the
in-memory store is written after every change, the closest mosquitto comes to our commit.

``NatsLeaf``: an edge nats-server (MQTT listener; MQTT needs JetStream, domain ``edge``) with a
leaf-node connection to a cloud nats-server whose JetStream file stream ``TELEMETRY`` captures
``substation.>`` (domain ``cloud``). nats-server 2.9.10 has no ``sync_interval`` (added in
2.10), so ``durable`` cannot fsync more often than the default: it is the same configuration,
measured again, and reported as such.

Every mosquitto here sets ``max_queued_messages 0``: the default (1000) drops QoS 1 messages
for a slow session silently, which would make a throughput figure meaningless.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from bridge import consume
from bridge._pb import bridge_pb2 as pb
from bridge.dev import localrun


class Record(NamedTuple):
    seq: int
    published_ns: int
    committed_ns: int


class System(Protocol):
    name: str
    mqtt_port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def committed(self) -> int: ...
    def records(self) -> list[Record]: ...
    def kill_cloud(self) -> None: ...
    def start_cloud(self) -> None: ...
    def kill_edge(self) -> None: ...
    def start_edge(self) -> None: ...


def _exe(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError(f"{name} is not installed")


def _record(payload: bytes, committed_ns: int) -> Record:
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

    def stop(self) -> None:
        if self.agent:
            self.agent.proc.stop()
        self.node.proc.stop()
        self.broker.stop()

    def committed(self) -> int:
        assert self.agent is not None
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


class MosquittoBridge:
    def __init__(self, *, workdir: Path, durable: bool) -> None:
        self.name = "mosquitto_bridge_durable" if durable else "mosquitto_bridge"
        self.work = workdir / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        self.mqtt_port = localrun.free_port()
        self.cloud_port = localrun.free_port()
        self._edge: localrun.Proc | None = None
        self._cloud: localrun.Proc | None = None
        self._sub: subprocess.Popen[bytes] | None = None
        self._out = self.work / "collected.jsonl"
        self._counted, self._offset = 0, 0

    def _conf(self, role: str, port: int) -> Path:
        store = self.work / role
        store.mkdir(exist_ok=True)
        text = (f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                f"persistence true\npersistence_location {store}/\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n"
                "log_dest stderr\nlog_type error\nlog_type warning\n")
        if self.durable:
            text += "autosave_on_changes true\nautosave_interval 1\n"
        if role == "edge":
            text += (f"connection cloud\naddress 127.0.0.1:{self.cloud_port}\n"
                     "topic substation/# out 1\ntopic spBv1.0/# out 1\n"
                     "cleansession false\nclientid edge-bridge\n"
                     "restart_timeout 1 5\n")
        conf = self.work / f"{role}.conf"
        conf.write_text(text)
        return conf

    def _broker(self, role: str, port: int) -> localrun.Proc:
        proc = localrun.Proc(name=f"{self.name}-{role}",
                             argv=[_exe("mosquitto"), "-c", str(self._conf(role, port))],
                             log=self.work / f"{role}.log").start()
        localrun.wait_port(port)
        return proc

    def start(self) -> None:
        self.start_cloud()
        self.start_edge()

    def _collect(self) -> None:
        """The cloud-side reader: a persistent QoS 1 session, a line per message: its receipt
        time and the payload in hex (Sparkplug payloads are binary and may hold newlines)."""
        if self._sub is not None and self._sub.poll() is None:
            return
        with self._out.open("ab") as out:
            self._sub = subprocess.Popen(
                [_exe("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(self.cloud_port), "-q",
                 "1", "-c", "-i", "cloud-collector", "-t", "substation/#", "-t", "spBv1.0/#",
                 "-F", "%U %x"],
                stdout=out, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._sub:
            self._sub.terminate()
            self._sub.wait(5)
        for p in (self._edge, self._cloud):
            if p:
                p.stop()

    def committed(self) -> int:
        with self._out.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self._counted += data.count(b"\n", 0, cut)
        self._offset += cut
        return self._counted

    def records(self) -> list[Record]:
        out = []
        for line in self._out.read_bytes().splitlines():
            received, _, payload = line.partition(b" ")
            if payload:
                sec, _, frac = received.partition(b".")
                out.append(_record(bytes.fromhex(payload.decode()),
                                   int(sec) * 10**9 + int(frac.ljust(9, b"0")[:9])))
        return out

    def kill_cloud(self) -> None:
        assert self._cloud is not None
        self._cloud.kill()

    def start_cloud(self) -> None:
        self._cloud = self._broker("cloud", self.cloud_port)
        self._collect()  # mosquitto_sub exits when its broker goes away

    def kill_edge(self) -> None:
        assert self._edge is not None
        self._edge.kill()

    def start_edge(self) -> None:
        self._edge = self._broker("edge", self.mqtt_port)


class NatsLeaf:
    STREAM = "TELEMETRY"

    def __init__(self, *, workdir: Path, durable: bool) -> None:
        self.name = "nats_durable" if durable else "nats"
        self.work = workdir / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.mqtt_port = localrun.free_port()
        self.edge_port, self.cloud_port = localrun.free_port(), localrun.free_port()
        self.leaf_port = localrun.free_port()
        self._edge: localrun.Proc | None = None
        self._cloud: localrun.Proc | None = None

    def _server(self, role: str) -> localrun.Proc:
        conf = self.work / f"{role}.conf"
        if role == "cloud":
            conf.write_text(
                f"server_name: cloud\nlisten: 127.0.0.1:{self.cloud_port}\n"
                f'jetstream {{ store_dir: "{self.work / "cloud-js"}", domain: cloud }}\n'
                f"leafnodes {{ listen: 127.0.0.1:{self.leaf_port} }}\n")
            port = self.cloud_port
        else:
            conf.write_text(
                f"server_name: edge\nlisten: 127.0.0.1:{self.edge_port}\n"
                f'jetstream {{ store_dir: "{self.work / "edge-js"}", domain: edge }}\n'
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
                "leafnodes { reconnect: 1, remotes [ { url: "
                f'"nats-leaf://127.0.0.1:{self.leaf_port}" }} ] }}\n')
            port = self.mqtt_port
        proc = localrun.Proc(name=f"{self.name}-{role}",
                             argv=[_exe("nats-server"), "-c", str(conf)],
                             log=self.work / f"{role}.log").start()
        localrun.wait_port(port)
        return proc

    async def _js(self, op: str) -> object:
        import nats  # bench-only dependency

        nc = await nats.connect(f"nats://127.0.0.1:{self.cloud_port}")
        try:
            js = nc.jetstream()
            if op == "create":
                # NATS's MQTT listener maps '/' to '.' and '.' to '//': spBv1.0/... -> spBv1//0.
                await js.add_stream(name=self.STREAM, subjects=["substation.>", "spBv1//0.>"],
                                    storage="file")
                return None
            if op == "count":
                info = await js.stream_info(self.STREAM)
                return int(info.state.messages)
            info = await js.stream_info(self.STREAM)
            out: list[Record] = []
            sub = await js.subscribe("substation.>", ordered_consumer=True)
            while len(out) < info.state.messages:
                msg = await sub.next_msg(timeout=10)
                stored = msg.metadata.timestamp
                out.append(_record(msg.data, int(stored.timestamp()) * 10**9
                                   + stored.microsecond * 1000))
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    def start(self) -> None:
        self.start_cloud()
        asyncio.run(self._js("create"))
        self.start_edge()

    def stop(self) -> None:
        for p in (self._edge, self._cloud):
            if p:
                p.stop()

    def committed(self) -> int:
        n = asyncio.run(self._js("count"))
        assert isinstance(n, int)
        return n

    def records(self) -> list[Record]:
        data = asyncio.run(self._js("read"))
        assert isinstance(data, list)
        return data

    def kill_cloud(self) -> None:
        assert self._cloud is not None
        self._cloud.kill()

    def start_cloud(self) -> None:
        self._cloud = self._server("cloud")
        localrun.wait_port(self.cloud_port)

    def kill_edge(self) -> None:
        assert self._edge is not None
        self._edge.kill()

    def start_edge(self) -> None:
        self._edge = self._server("edge")
        localrun.wait_port(self.leaf_port)


def peers(workdir: Path) -> list[System]:
    return [MosquittoBridge(workdir=workdir, durable=False),
            MosquittoBridge(workdir=workdir, durable=True),
            NatsLeaf(workdir=workdir, durable=False), NatsLeaf(workdir=workdir, durable=True)]
