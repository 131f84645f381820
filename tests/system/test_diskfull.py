"""A full disk is backpressure, never corruption; the agent recovers by itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, Publisher, blast, idle, wait_for


@pytest.fixture
def tiny_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A small tmpfs (32 MiB unless parametrized): a real filesystem that runs out of space."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    size = getattr(request, "param", "32m")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
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
    assert '"spool.full"' in log and "Traceback" not in log
    assert '"spool.release_blocked"' not in log, "the intake never took the deletes' space"
    assert (tiny_fs / "spool-site-a.db.reserve").exists(), "headroom restored once drained"


ROUND = 100_000


@pytest.mark.parametrize("tiny_fs", ["12m"], indirect=True)
def test_a_backlog_several_times_the_disk_recovers_every_time_without_a_restart(
        cluster: Cluster, tiny_fs: Path):
    """The wedge of issue 15: clouds down, disk full, the broker holding a backlog several
    times the filesystem (100,000 readings of ~450 bytes, ~45 MB, against a 12 MiB tmpfs of
    which the spool may use 4 MiB); the clouds return. Three rounds, one agent process."""
    cluster.ingest("aws")
    agent = cluster.agent(spool_dir=tiny_fs)  # default reserve: too big for this disk
    pid = agent.proc.pid
    published: dict[str, int] = {}
    taken = 0
    for rnd in range(3):
        site = f"round{rnd}"
        full_before = _metric(agent.metrics(), "bridge_spool_full_total")
        cluster.nodes["aws"].proc.kill()
        published[site] = blast(cluster.broker.port, prefix=f"plant/{site}", count=ROUND,
                                pad=400)
        assert published[site] == ROUND
        wait_for(lambda b=full_before: _metric(agent.metrics(), "bridge_spool_full_total") > b,
                 timeout=120, interval=0.2, what=f"round {rnd}: the disk to fill")
        assert agent.status()["spool"]["readings"] < published[site], "the broker holds the rest"
        cluster.restart_ingest("aws")
        taken += published[site]
        wait_for(lambda t=taken: idle(agent, t), timeout=180, interval=0.2,
                 what=f"round {rnd}: everything delivered once the cloud was back")
        assert agent.proc.alive() and agent.proc.pid == pid, "the same agent process"
    # One cloud: its store is the whole stream (read directly: 300k readings of ~450 bytes
    # through Subscribe take longer than the consumer's deadline on a loaded machine).
    from bridge.cloud.store.sqlite import Reader
    from bridge.shared._pb import bridge_pb2 as pb

    reader = Reader(cluster.workdir / "store-aws.db")
    seen: dict[str, list[int]] = {}
    offset = 0
    while rows := reader.page(offset, 10_000):
        for r in rows:
            env = pb.Envelope.FromString(r.envelope)
            seen.setdefault(env.source.topic.split("/")[1], []).append(env.source_seq)
        offset = rows[-1].offset
    reader.close()
    for site, n in published.items():
        assert sorted(seen[site]) == list(range(1, n + 1)), site  # each exactly once
    log = agent.proc.log.read_text()
    assert '"spool.release_blocked"' not in log and "Traceback" not in log


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
