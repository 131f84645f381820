"""A full disk is backpressure, never corruption; the agent recovers by itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, Publisher, idle, wait_for


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: a real filesystem that runs out of space (ENOSPC)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_a_full_disk_applies_backpressure_and_the_agent_recovers_when_space_returns(
        cluster: Cluster, tiny_fs: Path):
    cluster.ingest("aws")
    agent = cluster.agent(spool_dir=tiny_fs, spool_extra="reserve_bytes = 8388608\n")
    assert (tiny_fs / "spool-site-a.db.reserve").exists()
    cluster.nodes["aws"].proc.kill()
    pub = Publisher(cluster, count=400_000, rate=0)
    wait_for(lambda: _metric(agent.metrics(), "bridge_spool_full_total") > 0,
             timeout=120, interval=0.2, what="the disk to fill")
    pub.stop.set()
    published = pub.join()  # the broker holds what the agent could not take
    spooled = agent.status()["spool"]["readings"]
    assert 0 < spooled < published, "backpressure: the rest waits in the broker"
    assert agent.proc.alive()
    cluster.restart_ingest("aws")
    wait_for(lambda: idle(agent, published),
             timeout=120, interval=0.2, what="everything delivered after space returned")
    assert cluster.account(published) == (published, 0, 0)
    log = agent.proc.log.read_text()
    assert '"spool.full"' in log and '"spool.reserve_used"' in log and "Traceback" not in log
    assert (tiny_fs / "spool-site-a.db.reserve").exists(), "headroom restored once drained"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
