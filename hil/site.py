"""The real parts on the topology: the plant's mosquitto, an ingest per cloud, the agent.

Every process is the product's own (``python -m bridge ...``) started in its namespace with
``ip netns exec``; nothing on the data path is simulated but the SCADA publisher, which
publishes from the test host into the plant broker over the plant's management link (so the
OT leg between plant and gateway can fail while readings keep coming). The accounting reads
every cloud's stream back through the consumer's merge, as cloud teams would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bridge.cloud import consume
from bridge.shared import pki
from bridge.shared.config import TlsConfig
from devkit import localrun, simulate
from hil.topology import CLOUDS, Topology

SITE = "hil-site"
INGEST_PORT = 6443
STATUS_PORT = 9100
MQTT_PORT = 1883


@dataclass
class Accounting:
    published: int
    committed_once: int
    lost: int
    doubled: int
    latencies_s: list[tuple[int, float]] = field(default_factory=list)  # (gateway ns, s)

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.committed_once == self.published


class Publisher:
    """The SCADA side: ``count`` JSON readings at ``rate``/s into the plant broker."""

    def __init__(self, *, host: str, count: int, rate: float, timeout_s: float,
                 first: int = 1) -> None:
        """Readings carry seq ``first`` .. ``first + count - 1``."""
        self.progress = simulate.Progress()
        self.error: BaseException | None = None
        self.count = count

        def run() -> None:
            try:
                simulate.run(host=host, port=MQTT_PORT, site=SITE, count=count, rate=rate,
                             progress=self.progress, timeout_s=timeout_s, first=first)
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.error = exc

        self.thread = threading.Thread(target=run, name="hil-publisher", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the publisher did not finish")
        if self.error is not None:
            raise RuntimeError(f"the publisher failed: {self.error}")
        if self.progress.acked != self.count:
            raise RuntimeError(f"the plant broker acknowledged {self.progress.acked} of "
                               f"{self.count} readings")
        return self.progress.acked


class Site:
    def __init__(self, *, topo: Topology, workdir: Path, uplink_extra: str = "",
                 spool_extra: str = "") -> None:
        self.topo, self.workdir = topo, workdir
        self.uplink_extra, self.spool_extra = uplink_extra, spool_extra
        self.procs: list[localrun.Proc] = []
        self.pki = localrun.Pki(workdir / "pki", [SITE])
        self.ingests: dict[str, localrun.IngestProc] = {}
        self.agent: localrun.Proc | None = None

    # -- starting ---------------------------------------------------------------------------

    def _wait_tcp(self, host: str, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {host}:{port}") from None
                time.sleep(0.05)

    def start(self) -> Site:
        t = self.topo
        conf = self.workdir / "plant-mosquitto.conf"
        conf.write_text(f"listener {MQTT_PORT} 0.0.0.0\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\n")
        self._start(localrun.Proc(name="plant-mosquitto", log=self.workdir / "plant.log",
                                  argv=t.exec_argv("plant", ["mosquitto", "-c", str(conf)])))
        self._wait_tcp(t.plant_mgmt, MQTT_PORT)
        for cloud in CLOUDS:
            addr = t.cloud_addr(cloud)
            issued = pki.issue_server(self.pki.dir, self.pki.dir, name=f"ingest-{cloud}",
                                      dns=[], ips=[addr], force=True)
            assert issued.key_path is not None
            tls = TlsConfig(ca=self.pki.ca, cert=issued.cert_path, key=issued.key_path)
            node = localrun.ingest(self.workdir, self.pki, cloud, port=INGEST_PORT, host=addr,
                                   tls=tls, netns=t.ns(f"cloud-{cloud}"))
            self.ingests[cloud] = node
            self._start(node.proc)
        for node in self.ingests.values():
            localrun.wait_healthy(node.target, self.pki.consumer(), timeout=30)
        self.agent = self._start(self._agent_proc())
        self.wait_subscribed()
        return self

    def _start(self, proc: localrun.Proc) -> localrun.Proc:
        self.procs.append(proc)
        return proc.start()

    def _agent_proc(self) -> localrun.Proc:
        t, tls = self.topo, self.pki.site(SITE)
        eps = "".join(f'[[uplink.endpoints]]\nname = "{c}"\n'
                      f'target = "{t.cloud_addr(c)}:{INGEST_PORT}"\n'
                      'interface = ["wan0", "lte0"]\n' for c in CLOUDS)
        cfg = self.workdir / "agent.toml"
        cfg.write_text(
            f'site_id = "{SITE}"\n'
            f'[spool]\npath = "{self.workdir / "spool.db"}"\n{self.spool_extra}'
            f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
            f'[[sources]]\nname = "plant"\nurl = "mqtt://{t.plant_ot}:{MQTT_PORT}"\n'
            'topics = ["#"]\nkeepalive_s = 5\ninterface = "ot0"\n'
            f"[uplink]\nfailback_after_s = 3.0\n{self.uplink_extra}{eps}"
            f'[metrics]\nlisten = "{t.gateway_mgmt}:{STATUS_PORT}"\n')
        return localrun.Proc(name="agent", log=self.workdir / "agent.log",
                             argv=t.exec_argv("gateway", localrun.bridge_argv(
                                 "agent", "--config", str(cfg))))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # -- reading ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        url = f"http://{self.topo.gateway_mgmt}:{STATUS_PORT}/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            doc: dict[str, Any] = orjson.loads(resp.read())
            return doc

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.status()["uplink"]["endpoints"]}

    def active(self) -> str | None:
        return next((n for n, e in self.endpoints().items() if e["active"]), None)

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        self.wait(lambda: all(s["subscribed"] for s in self.status()["sources"]),
                  timeout=timeout, what="the agent to subscribe to the plant broker")

    def wait(self, cond: Any, *, timeout: float, what: str, interval: float = 0.05) -> float:
        """Poll ``cond`` until true; returns the seconds it took (RuntimeError on timeout)."""
        t0 = time.monotonic()
        while True:
            try:
                if cond():
                    return time.monotonic() - t0
            except OSError:
                pass  # the agent's status endpoint is briefly unreachable
            if self.agent is not None and not self.agent.alive():
                raise RuntimeError(f"the agent exited:\n{self.agent.tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def idle(self, taken: int) -> bool:
        st = self.status()
        return (st["committed_messages"] >= taken
                and not (st["spool"]["readings"] or st["uplink"]["in_flight"]))

    def publish(self, count: int, rate: float, timeout_s: float = 900.0,
                first: int = 1) -> Publisher:
        return Publisher(host=self.topo.plant_mgmt, count=count, rate=rate,
                         timeout_s=timeout_s, first=first)

    def account(self, published: int) -> Accounting:
        merger = consume.Merger()
        errors = asyncio.run(consume.read_all(
            targets=[n.target for n in self.ingests.values()], tls=self.pki.consumer(),
            merger=merger, timeout=60))
        if errors:
            raise RuntimeError(f"reading the clouds back failed: {errors}")
        stream = [c for c in merger.drain() if c.envelope.site_id == SITE]
        seen = Counter(c.envelope.source_seq for c in stream)
        expected = set(range(1, published + 1))
        lat = [(c.envelope.gateway_time_ns, (c.commit_time_ns - c.envelope.gateway_time_ns) / 1e9)
               for c in stream if c.envelope.source_seq in expected]
        return Accounting(published=published, committed_once=len(set(seen) & expected),
                          lost=len(expected - set(seen)),
                          doubled=sum(n - 1 for n in seen.values()) + len(set(seen) - expected),
                          latencies_s=lat)

    def peers(self, cloud: str) -> Counter[str]:
        """Batches committed by ``cloud``'s ingest, by the address they came from."""
        out: Counter[str] = Counter()
        for line in self.ingests[cloud].proc.log.read_text(errors="replace").splitlines():
            if '"ingest.batch"' in line and '"peer"' in line:
                peer = str(orjson.loads(line)["peer"])  # ipv4:10.B.2.1:PORT
                out[peer.split(":")[1] if peer.startswith("ipv4:") else peer] += 1
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        if self.agent is None:
            return []
        return [orjson.loads(line) for line in self.agent.log.read_text(errors="replace")
                .splitlines() if line.startswith("{") and f'"event":"{name}"' in line]
