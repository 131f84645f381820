"""The whole pipeline as real processes on one machine: used by the demo, the tests and benches.

Everything is real: a private mosquitto on a free port, ingest nodes and the agent as
``python -m bridge`` subprocesses with real certificates, configs written as an operator would.
Processes can be killed (SIGKILL, SIGSTOP) to inject faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq
import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.shared import pki
from bridge.shared.config import TlsConfig
from bridge.shared.grpcconn import mtls_credentials

_PORTS_GIVEN: set[int] = set()
# Below Linux's ephemeral range (32768-60999 by default): the kernel never gives these to an
# outgoing connection, so a port found free here is not taken by some client's socket before
# the server that was handed it binds it (a port from ``bind(0)`` can be).
_PORT_LOW, _PORT_HIGH = 20000, 32767


def free_port() -> int:
    """A loopback TCP port that binds now and that this process has not handed out before."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randint(_PORT_LOW, _PORT_HIGH)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket() as s:  # that range is crowded: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s") \
                    from exc
            time.sleep(0.02)


@dataclass
class Proc:
    """A child process with its output in a log file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM, wait; SIGKILL after ``timeout``. Returns the seconds it took."""
        t0 = time.monotonic()
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.kill()
        return time.monotonic() - t0

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Mosquitto:
    workdir: Path
    port: int = 0
    proc: Proc | None = None

    def start(self) -> Mosquitto:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = self.port or free_port()
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        # max_queued_messages 0: never drop QoS 1 messages queued for the agent's session
        # (mosquitto's default of 1000 drops the rest silently; see docs/deployment.md).
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\n")
        self.proc = Proc(name="mosquitto", argv=[exe, "-c", str(conf)],
                         log=self.workdir / f"mosquitto-{self.port}.log").start()
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


@dataclass
class Pki:
    dir: Path
    site_ids: list[str]
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca = self.dir / "ca.pem"
        if not self.ca.exists():
            pki.create_ca(self.dir)
            pki.issue_server(self.dir, self.dir, name="ingest", dns=["localhost"],
                             ips=["127.0.0.1"])
            pki.issue_consumer(self.dir, self.dir, name="consumer")
        for site in self.site_ids:
            if not (self.dir / f"site-{site}.pem").exists():
                pki.issue_site(self.dir, self.dir, site_id=site)

    def server(self) -> TlsConfig:
        return TlsConfig(ca=self.ca, cert=self.dir / "server-ingest.pem",
                         key=self.dir / "server-ingest.key")

    def site(self, site: str) -> TlsConfig:
        return TlsConfig(ca=self.ca, cert=self.dir / f"site-{site}.pem",
                         key=self.dir / f"site-{site}.key")

    def consumer(self) -> TlsConfig:
        return TlsConfig(ca=self.ca, cert=self.dir / "consumer-consumer.pem",
                         key=self.dir / "consumer-consumer.key")


def _tls_toml(tls: TlsConfig) -> str:
    return f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'


def bridge_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", *args]


ROOT = Path(__file__).resolve().parents[1]


def devkit_argv(*args: str) -> list[str]:
    """``python -m devkit ARGS``; run it with ``cwd=ROOT`` (the harness is not installed)."""
    return [sys.executable, "-m", "devkit", *args]


@dataclass
class IngestProc:
    node: str
    port: int
    config: Path
    proc: Proc
    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> IngestProc:
        self.proc.start()
        return self


def ingest(workdir: Path, pkis: Pki, node: str, *, port: int = 0, extra: str = "",
           tls: TlsConfig | None = None, host: str = "127.0.0.1",
           netns: str | None = None, jetstream: list[str] | None = None,
           name: str | None = None, store_extra: str = "") -> IngestProc:
    """An ingest node's config and process (inside network namespace ``netns`` if given).

    With ``jetstream`` (server URLs) the node is a stateless replica of the cloud ``node``
    in front of that cluster; ``name`` then tells replicas of one cloud apart in file names.
    """
    port = port or free_port()
    label = name or node
    cfg = workdir / f"ingest-{label}.toml"
    if jetstream:
        servers = ", ".join(f'"{u}"' for u in jetstream)
        store = f'[store]\nkind = "jetstream"\nservers = [{servers}]\n{store_extra}'
    else:
        store = f'[store]\npath = "{workdir / f"store-{node}.db"}"\n'
    cfg.write_text(f'node = "{node}"\nlisten = "{host}:{port}"\n' + store
                   + _tls_toml(tls or pkis.server()) + extra)
    argv = bridge_argv("ingest", "--config", str(cfg))
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return IngestProc(node=node, port=port, config=cfg, host=host,
                      proc=Proc(name=f"ingest-{label}", argv=argv,
                                log=workdir / f"ingest-{label}.log"))


def wait_healthy(target: str, tls: TlsConfig, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(target, mtls_credentials(tls.read())) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service="bridge.v1.Ingest"),
                                  timeout=1.0, wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest at {target} not serving after {timeout} s")
            time.sleep(0.05)


@dataclass
class AgentProc:
    site: str
    config: Path
    http_port: int
    proc: Proc

    def start(self) -> AgentProc:
        self.proc.start()
        return self

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            doc: dict[str, Any] = orjson.loads(resp.read())
            return doc

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())

    def wait_subscribed(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"agent exited:\n{self.proc.tail()}")
            with contextlib.suppress(OSError):
                if all(s["subscribed"] for s in self.status()["sources"]):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent not subscribed after {timeout} s:\n{self.proc.tail()}")
            time.sleep(0.05)


def agent(workdir: Path, pkis: Pki, site: str, *, mqtt_port: int, endpoints: list[IngestProc],
          topics: tuple[str, ...] = ("#",), extra: str = "", uplink_extra: str = "",
          http_port: int = 0, interfaces: dict[str, str] | None = None,
          names: list[str] | None = None, spool_extra: str = "",
          spool_dir: Path | None = None, sources: str | None = None,
          tls_extra: str = "") -> AgentProc:
    """An agent's config and process; ``names`` renames endpoints (to list one node twice).

    ``sources`` replaces the default source (MQTT on ``mqtt_port``) with these TOML tables.
    """
    http_port = http_port or free_port()
    cfg = workdir / f"agent-{site}.toml"
    names = names or [e.node for e in endpoints]
    ifaces = interfaces or {}
    eps = "".join(f'[[uplink.endpoints]]\nname = "{n}"\ntarget = "{e.target}"\n'
                  + (f'interface = "{ifaces[n]}"\n' if n in ifaces else "")
                  for n, e in zip(names, endpoints, strict=True))
    topic_list = ", ".join(f'"{t}"' for t in topics)
    cfg.write_text(
        f'site_id = "{site}"\n{extra}'
        f'[spool]\npath = "{(spool_dir or workdir) / f"spool-{site}.db"}"\n{spool_extra}'
        + _tls_toml(pkis.site(site)) + tls_extra
        + (sources if sources is not None else
           f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{mqtt_port}"\n'
           f"topics = [{topic_list}]\n")
        + f"[uplink]\n{uplink_extra}" + eps
        + f'[metrics]\nlisten = "127.0.0.1:{http_port}"\n')
    return AgentProc(site=site, config=cfg, http_port=http_port,
                     proc=Proc(name=f"agent-{site}", argv=bridge_argv("agent", "--config",
                                                                      str(cfg)),
                               log=workdir / f"agent-{site}.log"))


class RabbitMQ:
    """The machine's RabbitMQ with an exchange and queue unique to one run, and fault injection.

    Unlike mosquitto and nats-server, RabbitMQ is not started per run: it is a system service
    (``rabbitmq-server -detached`` starts it if it is down). Unique names keep runs apart.
    """

    URL = "amqp://guest:guest@127.0.0.1:5672/"

    def __init__(self, *, name: str) -> None:
        self.exchange = name
        self.queue = name

    @classmethod
    def unique(cls, tag: str) -> RabbitMQ:
        clean = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in tag)
        return cls(name=f"bridge-{clean}-{secrets.token_hex(4)}")

    @staticmethod
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", 5672), timeout=1):
                return True
        except OSError:
            return False

    @classmethod
    def ensure_running(cls, timeout: float = 90.0) -> None:
        if cls.up():
            return
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server "
                               "is not installed (apt-get install rabbitmq-server)")
        subprocess.run(["rabbitmq-server", "-detached"], check=False, timeout=60)
        cls._wait_up(timeout)

    @classmethod
    def _wait_up(cls, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cls.up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ not accepting connections after {timeout} s")
            time.sleep(0.2)

    def source_toml(self, name: str = "plant", extra: str = "") -> str:
        return (f'[[sources]]\ntype = "amqp"\nname = "{name}"\nurl = "{self.URL}"\n'
                f'queue = "{self.queue}"\nexchange = "{self.exchange}"\n'
                f'bindings = ["#"]\nheartbeat_s = 5\nreconnect_max_s = 1.0\n{extra}')

    def connections(self, name: str) -> list[str]:
        """Erlang pids of the connections whose client-given name is ``name``."""
        out = _rabbitmqctl("list_connections", "--no-table-headers", "pid",
                           "client_properties")
        return [line.split("\t", 1)[0] for line in out.splitlines()
                if f'"connection_name","{name}"' in line]

    def close_connections(self, name: str) -> int:
        pids = self.connections(name)
        for pid in pids:
            _rabbitmqctl("close_connection", pid, "bridge: injected fault")
        return len(pids)

    def restart_app(self, timeout: float = 60.0) -> None:
        _rabbitmqctl("stop_app")
        _rabbitmqctl("start_app")
        self._wait_up(timeout)

    def cleanup(self) -> None:
        async def run() -> None:
            conn = await aiormq.connect(self.URL)
            try:
                ch = await conn.channel()
                await ch.queue_delete(self.queue)
                await ch.exchange_delete(self.exchange)
            finally:
                await conn.close()

        asyncio.run(run())


def _rabbitmqctl(*args: str) -> str:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout
