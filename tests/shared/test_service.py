"""systemd Type=notify: READY=1 when the process can work, WATCHDOG=1 from its event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from systemd_watchdog.systemd_watchdog import WatchDog

from bridge.shared.service import Notifier
from devkit import localrun


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's; use ``_notify_here`` to point at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def _notify_here(sock: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started from now on (and Notifiers made) talk to ``sock``."""
    monkeypatch.setenv("NOTIFY_SOCKET", sock.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "800000")


def _until(sock: socket.socket, wanted: str, *, timeout: float = 30.0) -> list[str]:
    """Every line received up to and including the first that starts with ``wanted``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {wanted!r} within {timeout} s; got {seen}")
        sock.settimeout(left)
        try:
            lines = sock.recv(4096).decode().splitlines()
        except TimeoutError:
            continue
        seen.extend(lines)
        if any(line.startswith(wanted) for line in lines):
            return seen


def test_the_agent_is_ready_only_once_its_spool_is_open_and_a_source_subscribed(
        tmp_path: Path, pkis: localrun.Pki, notify_socket: socket.socket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = localrun.ingest(tmp_path, pkis, "aws").start()
    port = localrun.free_port()
    agent = localrun.agent(tmp_path, pkis, "site-a", mqtt_port=port, endpoints=[node])
    broker = localrun.Mosquitto(tmp_path, port=port)
    try:
        localrun.wait_healthy(node.target, pkis.consumer())
        _notify_here(notify_socket, monkeypatch)
        agent.start()
        before = _until(notify_socket, "STATUS=starting")
        assert "READY=1" not in before
        assert f"no source subscribed yet (plant at mqtt://127.0.0.1:{port})" in before[-1]
        assert (tmp_path / "spool-site-a.db").exists()  # open before the first status line

        broker.start()
        _until(notify_socket, "READY=1")
        assert agent.status()["sources"][0]["subscribed"] is True
        after = _until(notify_socket, "WATCHDOG=1")
        after += _until(notify_socket, "WATCHDOG=1")
        assert after.count("WATCHDOG=1") >= 2
    finally:
        agent.proc.stop()
        broker.stop()
        node.proc.stop()
    assert agent.proc.popen is not None and agent.proc.popen.returncode == 0


def test_the_ingest_is_ready_once_it_serves_health_checks(
        tmp_path: Path, pkis: localrun.Pki, notify_socket: socket.socket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _notify_here(notify_socket, monkeypatch)
    node = localrun.ingest(tmp_path, pkis, "aws").start()
    try:
        _until(notify_socket, "READY=1")
        ca, cert, key = pkis.consumer().read()
        with grpc.secure_channel(node.target, grpc.ssl_channel_credentials(ca, key, cert)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="bridge.v1.Ingest"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        _until(notify_socket, "WATCHDOG=1")
    finally:
        node.proc.stop()


def test_a_wedged_event_loop_stops_the_watchdog_pings(
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    _notify_here(notify_socket, monkeypatch)
    loop = asyncio.new_event_loop()
    notifier = Notifier(component="test")
    assert notifier.ping_interval_s == pytest.approx(0.2)
    task = loop.create_task(notifier.run(waiting_for=lambda: None, status=lambda: "ok"))
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        _until(notify_socket, "WATCHDOG=1", timeout=10)
        # Wedge the loop (the fault injected: a blocking call on it) for 10 ping intervals.
        wedged = threading.Event()

        def block() -> None:
            wedged.set()
            time.sleep(2.0)

        loop.call_soon_threadsafe(block)
        assert wedged.wait(5)
        notify_socket.settimeout(0)
        while True:  # what was already queued before the wedge
            try:
                notify_socket.recv(4096)
            except BlockingIOError:
                break
        notify_socket.settimeout(1.0)
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
        # Once the loop runs again, so do the pings.
        _until(notify_socket, "WATCHDOG=1", timeout=10)
    finally:
        loop.call_soon_threadsafe(task.cancel)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_outside_systemd_the_notifier_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier(component="test")
    assert not notifier.enabled
    asyncio.run(notifier.run(waiting_for=lambda: "never", status=lambda: "ok"))
    assert not notifier.ready and notifier.pings == 0


def test_a_zero_watchdog_interval_set_by_hand_does_not_spin_the_loop(
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    _notify_here(notify_socket, monkeypatch)
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        notifier = Notifier(component="test", watchdog=WatchDog(sock=sock))
        assert notifier.enabled
        assert notifier.ping_interval_s == pytest.approx(0.05)
