"""One owner per resource: a spool, a listen address. A second claimant exits 2 with one line
naming the resource (and, for a spool, the holder's PID); it never starts and splits the data."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import localrun
from tests.conftest import Cluster, Publisher, wait_delivered


def run_bridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    # Structured log lines (JSON, e.g. agent.starting) may come before it.
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("{")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def second_config(a: localrun.AgentProc, tmp_path: Path) -> Path:
    """The same agent config with only the metrics port changed (the reproduced mistake)."""
    text = a.config.read_text().replace(f"127.0.0.1:{a.http_port}",
                                        f"127.0.0.1:{localrun.free_port()}")
    path = tmp_path / "agent-copy.toml"
    path.write_text(text)
    return path


def test_a_second_agent_on_the_same_spool_exits_2_naming_the_spool_and_the_holder(
        cluster: Cluster, tmp_path: Path):
    cluster.ingest("aws")
    a = cluster.agent()
    line = one_error_line(run_bridge("agent", "--config", str(second_config(a, tmp_path))))
    assert str(tmp_path / "spool-site-a.db") in line
    assert f"PID {a.proc.pid}" in line
    # The owner was not disturbed: every reading arrives exactly once.
    pub = Publisher(cluster, count=300, rate=0)
    published = pub.join()
    wait_delivered(cluster, a, published)
    assert cluster.account(published) == (published, 0, 0)


def test_read_only_commands_work_beside_the_running_agent(cluster: Cluster):
    cluster.ingest("aws")
    a = cluster.agent()
    res = run_bridge("dead-letters", "--config", str(a.config))
    assert res.returncode == 0, res.stderr
    assert "no dead letters" in res.stdout
    res = run_bridge("status", "--config", str(a.config))
    assert res.returncode == 0, res.stderr
    assert "site site-a" in res.stdout


def test_the_kernel_releases_the_spool_when_its_owner_is_killed(cluster: Cluster):
    cluster.ingest("aws")
    a = cluster.agent()
    a.proc.signal(signal.SIGKILL)
    a.proc.wait(10)
    a.start()
    a.wait_subscribed()  # would exit 2 if a stale lock outlived the killed owner
    assert a.proc.alive()


def test_a_second_ingest_on_the_same_port_exits_2(cluster: Cluster, tmp_path: Path):
    first = cluster.ingest("aws")
    (tmp_path / "other").mkdir()
    second = localrun.ingest(tmp_path / "other", cluster.pki, "aws2", port=first.port)
    line = one_error_line(run_bridge("ingest", "--config", str(second.config)))
    assert f"listen 127.0.0.1:{first.port}: address already in use" in line
    assert first.proc.alive()


@pytest.mark.parametrize("section", ["health", "metrics"])
def test_an_ingest_whose_health_or_metrics_port_is_taken_exits_2(
        tmp_path: Path, pkis: localrun.Pki, listener: int, section: str):
    node = localrun.ingest(tmp_path, pkis, "aws",
                           extra=f'[{section}]\nlisten = "127.0.0.1:{listener}"\n')
    line = one_error_line(run_bridge("ingest", "--config", str(node.config)))
    assert f"{section}.listen 127.0.0.1:{listener}: address already in use" in line


def test_an_agent_whose_metrics_port_is_taken_exits_2_without_a_traceback(
        tmp_path: Path, pkis: localrun.Pki, listener: int):
    node = localrun.ingest(tmp_path, pkis, "aws")
    a = localrun.agent(tmp_path, pkis, "site-a", mqtt_port=localrun.free_port(),
                       endpoints=[node], http_port=listener)
    line = one_error_line(run_bridge("agent", "--config", str(a.config)))
    assert f"metrics.listen 127.0.0.1:{listener}: address already in use" in line


def test_consume_into_a_reader_that_stops_early_exits_quietly(cluster: Cluster):
    """``bridge consume | head -1``: the reader leaving ends the output, not in a traceback."""
    cluster.ingest("aws")
    a = cluster.agent()
    published = Publisher(cluster, count=2000, rate=0).join()
    wait_delivered(cluster, a, published)
    tls = cluster.pki.consumer()
    argv = " ".join([sys.executable, "-m", "bridge", "consume", "--from",
                     cluster.nodes["aws"].target, "--ca", str(tls.ca), "--cert", str(tls.cert),
                     "--key", str(tls.key)])
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {argv} | head -1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.stdout.count("\n") == 1
    assert res.stderr == ""
    assert res.returncode == 0
