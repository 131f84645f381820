"""The make-test subset of hil/: real processes on namespaced links, exact accounting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hil import kernel, scenarios


@pytest.fixture(scope="module")
def caps() -> kernel.Capabilities:
    found = kernel.probe("t")
    if not (found.has("netns") and found.has("veth")):
        pytest.skip("needs root and network namespaces: " + "; ".join(found.lines()))
    return found


def test_the_kernel_probe_names_every_feature_present_or_missing_with_the_reason(
        caps: kernel.Capabilities):
    lines = caps.lines()
    for feature in ("netns", "veth", "tbf", "tun", "netem", "vlan"):
        assert any(line.startswith(f"{feature}: ") for line in lines), lines
    for feature, why in caps.missing.items():
        assert why and f"{feature}: MISSING ({why})" in lines


def _run(name: str, tmp_path: Path, caps: kernel.Capabilities) -> scenarios.Result:
    result = scenarios.run(name, quick=True, workdir=tmp_path, caps=caps)
    print("\n".join(result.lines()))
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout
    assert not [n for n in left.split() if n.startswith(f"hil{result.tag}-")], left
    return result


def test_a_primary_leg_down_moves_traffic_to_the_backup_leg_of_the_same_cloud(
        tmp_path: Path, caps: kernel.Capabilities):
    r = _run("primary-leg-down", tmp_path, caps)
    assert r.error is None, r.lines()
    assert r.checks and all(r.checks.values()), r.lines()
    assert r.accounting is not None and r.accounting.exact, r.lines()
    assert r.timings["failover_to_backup_leg_s"] < 5.0, r.lines()


def test_a_cloud_behind_a_one_way_partition_is_left_and_nothing_is_lost(
        tmp_path: Path, caps: kernel.Capabilities):
    r = _run("one-way-partition", tmp_path, caps)
    assert r.ok, r.lines()


def test_200_ms_rtt_with_2_percent_loss_is_slower_and_still_exact(
        tmp_path: Path, caps: kernel.Capabilities):
    if not caps.has("tun"):
        pytest.skip(f"the impairment relay needs TUN: {caps.missing.get('tun')}")
    r = _run("rtt-200ms-loss-2pct", tmp_path, caps)
    assert r.ok, r.lines()
