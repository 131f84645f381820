"""The systemd units: they verify, and systemd-analyze rates each 2.0 or better."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED = "/opt/bridge/.venv/bin/bridge"


@pytest.fixture(autouse=True, scope="module")
def _analyze() -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (make debs installs it)"


def _units(tmp_path: Path) -> dict[str, Path]:
    """The units as installed, the ExecStart path pointed at this checkout's venv, plus the
    agent with its netbind drop-in applied (written after the unit, as systemd reads it)."""
    exe = str(Path(sys.prefix) / "bin" / "bridge")
    out = {}
    for name in ("bridge-agent.service", "bridge-ingest.service"):
        text = (UNITS / name).read_text()
        assert INSTALLED in text
        (tmp_path / name).write_text(text.replace(INSTALLED, exe))
        out[name] = tmp_path / name
    merged = tmp_path / "bridge-agent-netbind.service"
    merged.write_text(out["bridge-agent.service"].read_text()
                      + (UNITS / "bridge-agent.service.d" / "netbind.conf").read_text())
    out[merged.name] = merged
    return out


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _units(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units.values())],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not [line for line in r.stderr.splitlines() if "bridge-" in line], r.stderr


@pytest.mark.parametrize("name", ["bridge-agent.service", "bridge-ingest.service",
                                  "bridge-agent-netbind.service"])
def test_systemd_analyze_security_rates_the_unit_2_or_better(tmp_path: Path, name: str) -> None:
    unit = _units(tmp_path)[name]
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        str(unit)], check=False, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_the_units_are_notify_services_with_a_watchdog() -> None:
    for name in ("bridge-agent.service", "bridge-ingest.service"):
        text = (UNITS / name).read_text()
        assert re.search(r"^Type=notify$", text, re.M), name
        assert re.search(r"^WatchdogSec=\d+s$", text, re.M), name
        assert re.search(r"^NotifyAccess=main$", text, re.M), name
    agent = (UNITS / "bridge-agent.service").read_text()
    assert re.search(r"^CapabilityBoundingSet=$", agent, re.M)  # CAP_NET_RAW only by drop-in
    assert "CAP_NET_RAW" in (UNITS / "bridge-agent.service.d" / "netbind.conf").read_text()


def test_systemctl_reload_sends_sighup_to_the_service() -> None:
    for name in ("bridge-agent.service", "bridge-ingest.service"):
        text = (UNITS / name).read_text()
        assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M), name


@pytest.mark.parametrize("unit,example", [("bridge-agent.service", "agent.toml"),
                                          ("bridge-ingest.service", "ingest.toml")])
def test_the_example_configs_write_only_where_their_unit_lets_them(unit: str,
                                                                   example: str) -> None:
    """ProtectSystem=strict: a service writes only its StateDirectory (and ReadWritePaths),
    so every /var path the example config names must lie inside one of them."""
    text = (UNITS / unit).read_text()
    writable = [f"/var/lib/{d}/" for d in re.findall(r"^StateDirectory=(\S+)", text, re.M)]
    writable += [p.rstrip("/") + "/" for line in
                 re.findall(r"^ReadWritePaths=(.+)$", text, re.M) for p in line.split()]
    config = (UNITS.parent / "examples" / example).read_text()
    paths = re.findall(r'"(/var/[^"]+)"', config)
    assert paths, f"{example} names no /var path"
    assert [p for p in paths if not any(p.startswith(w) for w in writable)] == []
