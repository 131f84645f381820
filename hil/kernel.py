"""What this kernel can do for the testbed, found by trying it in a scratch namespace.

Each feature is tried the way the testbed would use it, and reported present or missing with
the kernel's own words, so a run never fails, or passes, without saying why:

* ``netns``, ``veth``: the topology itself (required);
* ``tbf``: bandwidth caps (``tc qdisc ... tbf``; required for the slow-leg scenario);
* ``tun``: the userspace impairment relay (latency, jitter, loss; ``hil/relay.py``);
* ``netem``: kernel latency/loss. Not used when missing: the relay does the same;
* ``vlan``: 802.1Q sub-interfaces. With them the OT leg is a real VLAN (``ot0`` = VLAN 100 on
  the veth); without them the OT leg is the plain veth and the report says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

REQUIRED = ("netns", "veth")


def _run(*argv: str) -> str | None:
    """None on success, else the command's own error text."""
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
    if res.returncode == 0:
        return None
    return (res.stderr or res.stdout).strip().splitlines()[-1] if (res.stderr or res.stdout) \
        else f"exit {res.returncode}"


@dataclass
class Capabilities:
    present: set[str] = field(default_factory=set)
    missing: dict[str, str] = field(default_factory=dict)  # feature -> why

    def has(self, feature: str) -> bool:
        return feature in self.present

    def lines(self) -> list[str]:
        out = [f"{f}: present" for f in sorted(self.present)]
        out += [f"{f}: MISSING ({why})" for f, why in sorted(self.missing.items())]
        return out

    def require(self, *features: str) -> None:
        lacking = [f"{f} ({self.missing.get(f, 'not probed')})" for f in features
                   if f not in self.present]
        if lacking:
            raise RuntimeError("this kernel cannot run the testbed: missing "
                               + "; ".join(lacking))


def probe(tag: str = "probe") -> Capabilities:
    caps = Capabilities()
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        why = "needs root, iproute2 (ip) and tc"
        for f in ("netns", "veth", "tbf", "tun", "netem", "vlan"):
            caps.missing[f] = why
        return caps
    ns, peer = f"hilk-{tag}-{os.getpid()}", f"hilk-{tag}-{os.getpid()}b"
    err = _run("ip", "netns", "add", ns)
    if err:
        caps.missing["netns"] = err
        for f in ("veth", "tbf", "tun", "netem", "vlan"):
            caps.missing[f] = "no network namespace to try it in"
        return caps
    try:
        caps.present.add("netns")
        _run("ip", "netns", "add", peer)
        err = _run("ip", "link", "add", "a0", "netns", ns, "type", "veth", "peer", "b0",
                   "netns", peer)
        if err:
            caps.missing["veth"] = err
        else:
            caps.present.add("veth")
        checks = {
            "tbf": ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "a0", "root", "tbf",
                    "rate", "256kbit", "burst", "4kb", "latency", "100ms"),
            "netem": ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                      "netem", "delay", "1ms"),
            "vlan": ("ip", "-n", ns, "link", "add", "link", "a0", "name", "a0.100", "type",
                     "vlan", "id", "100"),
            "tun": ("ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "t0", "mode",
                    "tun"),
        }
        for feature, argv in checks.items():
            if feature in ("tbf", "vlan") and "veth" not in caps.present:
                caps.missing[feature] = "no veth to try it on"
                continue
            err = _run(*argv)
            if err:
                caps.missing[feature] = err
            else:
                caps.present.add(feature)
    finally:
        _run("ip", "netns", "del", ns)
        _run("ip", "netns", "del", peer)
    return caps
