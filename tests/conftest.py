"""Shared fixtures: real certificates, real brokers on free ports, real processes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge import consume, localrun


def wait_for(cond: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02) -> None:
    """Poll ``cond`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> localrun.Pki:
    return localrun.Pki(tmp_path_factory.mktemp("pki"), ["site-a", "site-b"])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[localrun.Mosquitto]:
    m = localrun.Mosquitto(tmp_path).start()
    yield m
    m.stop()


class Cluster:
    """Ingest nodes and agents as real processes, stopped at teardown."""

    def __init__(self, workdir: Path, pkis: localrun.Pki, broker: localrun.Mosquitto) -> None:
        self.workdir, self.pki, self.broker = workdir, pkis, broker
        self.nodes: dict[str, localrun.IngestProc] = {}
        self.agents: list[localrun.AgentProc] = []

    def ingest(self, node: str) -> localrun.IngestProc:
        n = self.nodes[node] = localrun.ingest(self.workdir, self.pki, node).start()
        localrun.wait_healthy(n.target, self.pki.consumer())
        return n

    def restart_ingest(self, node: str) -> localrun.IngestProc:
        n = self.nodes[node]
        n.proc.stop()
        n.start()
        localrun.wait_healthy(n.target, self.pki.consumer())
        return n

    def agent(self, site: str = "site-a", *, nodes: list[str] | None = None,
              start: bool = True, **kw: object) -> localrun.AgentProc:
        eps = [self.nodes[n] for n in (nodes or list(self.nodes))]
        a = localrun.agent(self.workdir, self.pki, site, mqtt_port=self.broker.port,
                           endpoints=eps, **kw)  # type: ignore[arg-type]
        self.agents.append(a)
        if start:
            a.start()
            a.wait_subscribed()
        return a

    def restart_agent(self, a: localrun.AgentProc) -> None:
        a.proc.stop()
        a.start()
        a.wait_subscribed()

    def consume(self) -> tuple[list[object], dict[str, str]]:
        merger = consume.Merger()
        errors = asyncio.run(consume.read_all(
            targets=[n.target for n in self.nodes.values()], tls=self.pki.consumer(),
            merger=merger))
        return merger.drain(), errors

    def account(self, published: int, site: str = "site-a") -> tuple[int, int, int]:
        """(committed, lost, duplicates) by publisher seq in the merged stream."""
        stream, errors = self.consume()
        assert not errors, errors
        seen = Counter(c.envelope.source_seq for c in stream  # type: ignore[attr-defined]
                       if c.envelope.site_id == site)  # type: ignore[attr-defined]
        expected = set(range(1, published + 1))
        lost = len(expected - set(seen))
        dups = sum(n - 1 for n in seen.values()) + len(set(seen) - expected)
        return len(set(seen) & expected), lost, dups

    def stop(self) -> None:
        for a in self.agents:
            a.proc.stop()
        for n in self.nodes.values():
            n.proc.stop()


@pytest.fixture
def cluster(tmp_path: Path, pkis: localrun.Pki,
            broker: localrun.Mosquitto) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pkis, broker)
    yield c
    c.stop()
