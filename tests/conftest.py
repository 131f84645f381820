"""Shared fixtures: real certificates, real brokers on free ports, real processes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.cloud import consume
from devkit import localrun, simulate
from devkit.localrun import AgentProc


def wait_for(cond: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02) -> None:
    """Poll ``cond`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class LoopTurns:
    """Counts the turns another task gets on the event loop while the block runs: a loop held
    by one piece of work gives it none."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _spin(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._spin())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def metric_value(text: str, series: str) -> float:
    """The value of one series (name with its labels, as exposed) in Prometheus text; 0 if
    absent. Labelled series are created at 0, so tests compare values, never presence."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


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

    def ingest(self, node: str, *, wait: bool = True, **kw: object) -> localrun.IngestProc:
        n = self.nodes[node] = localrun.ingest(self.workdir, self.pki, node,
                                               **kw).start()  # type: ignore[arg-type]
        if wait:
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


class Publisher:
    """The simulator on a thread, so faults can be injected while it publishes."""

    def __init__(self, cluster: Cluster, *, count: int, rate: float, site: str = "site-a",
                 amqp: localrun.RabbitMQ | None = None):
        """MQTT into the cluster's mosquitto, or, with ``amqp``, into RabbitMQ's exchange."""
        self.progress = simulate.Progress()
        self.error: BaseException | None = None
        self.count = count
        self.stop = threading.Event()

        def run() -> None:
            try:
                if amqp is not None:
                    simulate.run_amqp(url=amqp.URL, exchange=amqp.exchange, site=site,
                                      count=count, rate=rate, progress=self.progress,
                                      timeout_s=120, stop=self.stop)
                    return
                simulate.run(host="127.0.0.1", port=cluster.broker.port, site=site,
                             count=count, rate=rate, progress=self.progress, timeout_s=120,
                             stop=self.stop)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> int:
        self.thread.join(150)
        assert not self.thread.is_alive(), "publisher did not finish"
        assert self.error is None, self.error
        assert self.progress.failed == 0
        return self.progress.acked


def idle(agent: AgentProc, taken: int = 0) -> bool:
    """The agent has taken ``taken`` messages from its source and has nothing left to send.

    Without ``taken`` an agent that has not yet received a just-published message looks idle.
    """
    st = agent.status()
    return (st["committed_messages"] >= taken
            and not (st["spool"]["readings"] or st["uplink"]["in_flight"]))


def active(agent: AgentProc) -> list[str]:
    return [e["name"] for e in agent.status()["uplink"]["endpoints"] if e["active"]]


def wait_active(agent: AgentProc, name: str) -> None:
    """Wait until ``name`` carries traffic, so killing it is a failover, not a first choice.

    Killed before the agent's first health answer, the primary is never chosen and the agent
    starts on the secondary: no failover happens (this raced on a slow CI machine).
    """
    wait_for(lambda: active(agent) == [name], what=f"{name} active")


def delivered(cluster: Cluster, agent: AgentProc, count: int) -> bool:
    """The agent has nothing left to send and the merged stream holds ``count`` readings."""
    if not idle(agent):
        return False
    stream, _ = cluster.consume()
    return len(stream) >= count


def wait_delivered(cluster: Cluster, agent: AgentProc, count: int, timeout: float = 60) -> None:
    wait_for(lambda: delivered(cluster, agent, count), timeout=timeout, interval=0.2,
             what=f"{count} readings delivered")


def publish_raw(port: int, items: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in items:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def blast(port: int, *, prefix: str, count: int, pad: int = 0) -> int:
    """Publish ``count`` JSON readings (``seq`` 1..count, ``pad`` filler bytes) at QoS 1 as
    fast as the broker takes them; returns how many the broker acknowledged."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), "no CONNACK from the test broker"
    filler = "x" * pad
    acked = 0
    try:
        # In chunks: paho's message ids wrap at 65,535 and a queued id cannot be reused.
        for start in range(1, count + 1, 20_000):
            infos = [client.publish(f"{prefix}/v{n % 10}", b'{"seq": %d, "value": %d, '
                                    b'"pad": "%s"}' % (n, n, filler.encode()), qos=1)
                     for n in range(start, min(start + 20_000, count + 1))]
            for info in infos:
                info.wait_for_publish(60)
            acked += sum(1 for info in infos if info.is_published())
        return acked
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture(scope="session")
def rabbit_server() -> None:
    """The machine's RabbitMQ, started if it is down (tests share it, with unique names)."""
    localrun.RabbitMQ.ensure_running()


@pytest.fixture
def rabbit(rabbit_server: None, request: pytest.FixtureRequest) -> Iterator[localrun.RabbitMQ]:
    r = localrun.RabbitMQ.unique(request.node.name[:40])
    yield r
    r.cleanup()
