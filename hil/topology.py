"""The site as network namespaces: plant, gateway, WAN router, one namespace per cloud.

```
 plant                  gateway (agent)                   wan (router)     cloud-aws, cloud-azure
 ot0 10.B.0.2 ─OT leg─ ot0  10.B.0.1
                       wan0 10.B.1.1 ─MTU 1390─ gw-wan0 10.B.1.2
                       lte0 10.B.2.1 ─MTU 1390─ gw-lte0 10.B.2.2
                                                c-aws   10.B.11.1 ─ eth0 10.B.11.2 (ingest)
                                                c-azure 10.B.12.1 ─ eth0 10.B.12.2 (ingest)
 mgmt0 10.B.251.2      mgmt0 10.B.250.2         mgmt0   10.B.252.2
     └────── the test host (root namespace): out-of-band management links ──────┘
```

The gateway reaches each cloud over either WAN leg (a route per leg; the agent binds each
endpoint's connections to one leg, so the route of the other leg is never taken by it). The
management links exist so the test host can publish into the plant broker, read the agent's
/status and read the clouds' streams; the gateway has no route to a cloud through them, and
the root namespace does not forward. ``B`` is chosen per run so parallel runs do not collide.

Impairments, all reversible: ``link`` (down/up), ``cap`` (``tc tbf`` both ways), ``blackhole``
(the router drops traffic *to* a cloud), ``one_way`` (the router drops traffic *from* a cloud:
requests arrive, answers never do) and ``relay`` (latency, jitter and loss for everything the
router forwards, through ``hil/relay.py``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from hil.kernel import Capabilities

CLOUDS = ("aws", "azure")
WAN_MTU = 1390


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@dataclass
class Topology:
    tag: int
    caps: Capabilities
    workdir: Path
    built: list[str] = field(default_factory=list)
    _rules: list[tuple[str, ...]] = field(default_factory=list)
    _caps: list[tuple[str, str]] = field(default_factory=list)
    relay_proc: subprocess.Popen[str] | None = None

    @property
    def b(self) -> str:
        return f"10.{self.tag}"

    def ns(self, role: str) -> str:
        return f"hil{self.tag}-{role}"

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    # -- addresses --------------------------------------------------------------------------

    def cloud_addr(self, cloud: str) -> str:
        return f"{self.b}.{11 + CLOUDS.index(cloud)}.2"

    @property
    def plant_ot(self) -> str:
        return f"{self.b}.0.2"

    @property
    def plant_mgmt(self) -> str:
        return f"{self.b}.251.2"

    @property
    def gateway_mgmt(self) -> str:
        return f"{self.b}.250.2"

    def leg_addr(self, leg: str) -> str:
        return f"{self.b}.{1 if leg == 'wan0' else 2}.1"

    # -- building ---------------------------------------------------------------------------

    def _veth(self, a_ns: str | None, a: str, b_ns: str, b: str) -> None:
        argv = ["link", "add", a]
        if a_ns:
            argv += ["netns", self.ns(a_ns)]
        ip(*argv, "type", "veth", "peer", b, "netns", self.ns(b_ns))

    def _addr(self, role: str | None, dev: str, cidr: str, mtu: int | None = None) -> None:
        pre = ["-n", self.ns(role)] if role else []
        ip(*pre, "addr", "add", cidr, "dev", dev)
        ip(*pre, "link", "set", dev, "up", *(["mtu", str(mtu)] if mtu else []))

    def build(self) -> Topology:
        self.caps.require("netns", "veth")
        b = self.b
        try:
            for role in ("plant", "gateway", "wan", *(f"cloud-{c}" for c in CLOUDS)):
                ip("netns", "add", self.ns(role))
                self.built.append(role)
                ip("-n", self.ns(role), "link", "set", "lo", "up")
            # OT leg: a real 802.1Q VLAN where the kernel has it, else the plain veth.
            if self.caps.has("vlan"):
                self._veth("gateway", "ot-trunk", "plant", "ot-trunk")
                for role in ("gateway", "plant"):
                    ip("-n", self.ns(role), "link", "set", "ot-trunk", "up")
                    ip("-n", self.ns(role), "link", "add", "link", "ot-trunk", "name", "ot0",
                       "type", "vlan", "id", "100")
            else:
                self._veth("gateway", "ot0", "plant", "ot0")
            self._addr("gateway", "ot0", f"{b}.0.1/24")
            self._addr("plant", "ot0", f"{b}.0.2/24")
            for n, leg in ((1, "wan0"), (2, "lte0")):
                self._veth("gateway", leg, "wan", f"gw-{leg}")
                self._addr("gateway", leg, f"{b}.{n}.1/30", WAN_MTU)
                self._addr("wan", f"gw-{leg}", f"{b}.{n}.2/30", WAN_MTU)
            for i, cloud in enumerate(CLOUDS):
                net = f"{b}.{11 + i}"
                self._veth("wan", f"c-{cloud}", f"cloud-{cloud}", "eth0")
                self._addr("wan", f"c-{cloud}", f"{net}.1/24", WAN_MTU)
                self._addr(f"cloud-{cloud}", "eth0", f"{net}.2/24", WAN_MTU)
                ip("-n", self.ns(f"cloud-{cloud}"), "route", "add", "default", "via",
                   f"{net}.1")
                for n, leg, metric in ((1, "wan0", "10"), (2, "lte0", "20")):
                    ip("-n", self.ns("gateway"), "route", "add", f"{net}.0/24", "via",
                       f"{b}.{n}.2", "dev", leg, "metric", metric)
            for role, n in (("gateway", 250), ("plant", 251), ("wan", 252)):
                host = f"hm{self.tag}{role[0]}"
                self._veth(None, host, role, "mgmt0")
                self._addr(None, host, f"{b}.{n}.1/30")
                self._addr(role, "mgmt0", f"{b}.{n}.2/30")
            for i in range(len(CLOUDS)):
                ip("route", "add", f"{b}.{11 + i}.0/24", "via", f"{b}.252.2")
            wan = self.exec_argv("wan", ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                                         "net.ipv4.conf.all.rp_filter=0",
                                         "net.ipv4.conf.default.rp_filter=0"])
            subprocess.run(wan, check=True, capture_output=True, timeout=20)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        self.relay(None)
        for role in ("gateway", "plant", "wan"):
            ip("link", "del", f"hm{self.tag}{role[0]}", check=False)
        for role in reversed(self.built):
            ip("netns", "del", self.ns(role), check=False)
        self.built.clear()

    # -- impairments ------------------------------------------------------------------------

    def link(self, role: str, dev: str, *, up: bool) -> None:
        ip("-n", self.ns(role), "link", "set", dev, "up" if up else "down")
        if up and role == "gateway" and dev in ("wan0", "lte0"):
            # A link going down takes its routes with it; put them back.
            n = 1 if dev == "wan0" else 2
            for i in range(len(CLOUDS)):
                ip("-n", self.ns("gateway"), "route", "replace", f"{self.b}.{11 + i}.0/24",
                   "via", f"{self.b}.{n}.2", "dev", dev, "metric", "10" if n == 1 else "20")

    def cap(self, leg: str, kbit: int | None) -> None:
        """A bandwidth cap on a WAN leg, both directions (``tc tbf``); None removes it."""
        for role, dev in (("gateway", leg), ("wan", f"gw-{leg}")):
            tc = self.exec_argv(role, ["tc", "qdisc", "del", "dev", dev, "root"])
            subprocess.run(tc, capture_output=True, check=False, timeout=20)
            if kbit is not None:
                self.caps.require("tbf")
                burst = max(1600, kbit * 1000 // 8 // 50)  # about 20 ms of the rate, >= 1 MTU
                add = self.exec_argv(role, ["tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                            "rate", f"{kbit}kbit", "burst", str(burst),
                                            "latency", "500ms"])
                subprocess.run(add, check=True, capture_output=True, timeout=20)

    def _rule(self, *spec: str, on: bool) -> None:
        if on:
            ip("-n", self.ns("wan"), "rule", "add", *spec, "priority", "50")
            self._rules.append(spec)
        else:
            ip("-n", self.ns("wan"), "rule", "del", *spec, "priority", "50", check=False)
            with contextlib.suppress(ValueError):
                self._rules.remove(spec)

    def blackhole(self, cloud: str, *, on: bool) -> None:
        """Everything forwarded toward ``cloud`` is dropped (a dead route upstream)."""
        self._rule("to", f"{self.b}.{11 + CLOUDS.index(cloud)}.0/24", "blackhole", on=on)

    def one_way(self, cloud: str, *, on: bool) -> None:
        """Requests reach ``cloud``; nothing it sends comes back (an asymmetric partition)."""
        self._rule("iif", f"c-{cloud}", "blackhole", on=on)

    def relay(self, impair: tuple[float, float, float] | None) -> dict[str, int]:
        """(one-way delay ms, jitter ms, loss 0-1) on everything the router forwards between
        the gateway and the clouds; None stops it and returns its counters."""
        counts: dict[str, int] = {}
        if self.relay_proc is not None:
            self.relay_proc.terminate()
            out, _ = self.relay_proc.communicate(timeout=20)
            for line in out.splitlines():
                if '"relay.stopped"' in line:
                    counts = {k: v for k, v in orjson.loads(line).items() if k != "event"}
            self.relay_proc = None
        if impair is None:
            return counts
        self.caps.require("tun")
        delay, jitter, loss = impair
        argv = [sys.executable, "-m", "hil.relay", "--delay-ms", str(delay), "--jitter-ms",
                str(jitter), "--loss", str(loss), "--seed", str(self.tag)]
        for iif in ("gw-wan0", "gw-lte0", *(f"c-{c}" for c in CLOUDS)):
            argv += ["--iif", iif]
        root = Path(__file__).resolve().parent.parent
        self.relay_proc = subprocess.Popen(self.exec_argv("wan", argv), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, cwd=root,
                                           env={**os.environ, "PYTHONPATH": str(root)})
        assert self.relay_proc.stdout is not None
        line = self.relay_proc.stdout.readline()  # blocks until the relay is in place
        if '"relay.ready"' not in line:
            self.relay_proc.kill()
            _, err = self.relay_proc.communicate(timeout=20)  # and closes its pipes
            self.relay_proc = None
            raise RuntimeError(f"the impairment relay did not start: {line}{err}")
        return counts

    def leg_bytes(self, leg: str) -> int:
        """Bytes the gateway has sent on ``leg`` (its tx counter)."""
        res = ip("-n", self.ns("gateway"), "-s", "-j", "link", "show", "dev", leg)
        doc = orjson.loads(res.stdout)
        return int(doc[0]["stats64"]["tx"]["bytes"])
