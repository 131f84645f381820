"""The HTTP endpoint (bridge.shared.httpserve): prometheus_client's exposition with HEAD, the
probes and bounded connections, over real sockets; and a real agent's /healthz and /readyz."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from bridge.shared.httpserve import HttpEndpoint, loop_answers, on_loop
from devkit import localrun
from tests.conftest import Cluster, wait_for


@pytest.fixture
def endpoint() -> Iterator[HttpEndpoint]:
    reg = CollectorRegistry()
    Counter("bridge_test_things", "Things", registry=reg).inc(3)
    Counter("bridge_test_other", "Other", registry=reg).inc()
    reasons: list[str] = []
    ep = HttpEndpoint(listen="127.0.0.1:0", registry=reg, status=lambda: {"ok": True},
                      live=list, ready=lambda: reasons, max_connections=2)
    ep.reasons = reasons  # type: ignore[attr-defined]
    ep.start()
    yield ep
    ep.stop()


def get(ep: HttpEndpoint, path: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_metrics_are_served_by_prometheus_clients_own_exposition(endpoint: HttpEndpoint):
    status, headers, body = get(endpoint, "/metrics")
    assert status == 200 and b"bridge_test_things_total 3.0" in body
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = get(endpoint, "/metrics?name[]=bridge_test_other_total")
    assert b"bridge_test_other_total" in body and b"bridge_test_things" not in body
    status, headers, om = get(endpoint, "/metrics",
                              headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert om.rstrip().endswith(b"# EOF")
    status, headers, zipped = get(endpoint, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    assert b"bridge_test_things_total 3.0" in gzip.decompress(zipped)


def test_head_answers_the_headers_of_get_without_a_body(endpoint: HttpEndpoint):
    _, got, body = get(endpoint, "/metrics")
    status, headers, empty = get(endpoint, "/metrics", method="HEAD")
    assert status == 200 and empty == b""
    assert headers["content-length"] == got["content-length"] == str(len(body))
    assert get(endpoint, "/readyz", method="HEAD")[0] == 200


def test_probes_status_and_unknown_paths(endpoint: HttpEndpoint):
    assert get(endpoint, "/healthz")[::2] == (200, b"ok\n")
    assert get(endpoint, "/readyz")[::2] == (200, b"ready\n")
    endpoint.reasons.extend(["source plant not subscribed", "stopping"])  # type: ignore
    assert get(endpoint, "/readyz")[::2] == (503, b"source plant not subscribed\nstopping\n")
    assert get(endpoint, "/status")[2] == b'{"ok":true}'
    assert get(endpoint, "/nothing")[0] == 404
    assert get(endpoint, "/metrics", method="POST")[0] == 405


def test_half_sent_requests_hold_no_more_than_the_bound_and_are_dropped_after_the_timeout(
        endpoint: HttpEndpoint, monkeypatch: pytest.MonkeyPatch):
    from bridge.shared import httpserve

    monkeypatch.setattr(httpserve._Handler, "timeout", 0.5)
    held = []
    for _ in range(2):  # every slot taken by a client that never finishes its request
        s = socket.create_connection(("127.0.0.1", endpoint.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    deadline = time.monotonic() + 10
    while get(endpoint, "/healthz")[0] != 503:  # the third connection is turned away
        assert time.monotonic() < deadline, "a third connection was served"
    assert endpoint.turned_away >= 1
    for s in held:  # the server gives up on each within its timeout and closes it
        s.settimeout(10)
        assert s.recv(1024) == b""
        s.close()
    assert get(endpoint, "/healthz")[0] == 200


def test_liveness_names_an_event_loop_that_does_not_answer():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert loop_answers(loop) == []
        assert on_loop(loop, lambda: ["not ready"]) == ["not ready"]
        release = threading.Event()
        loop.call_soon_threadsafe(release.wait)  # the loop is stuck in a callback
        reasons = on_loop(loop, list, timeout=0.2)
        assert reasons == ["the event loop did not answer within 0.2 s"]
        release.set()
        assert loop_answers(loop) == []
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert loop_answers(loop) == ["the event loop is closed"]


def probe(port: int, path: str) -> tuple[int, bytes]:
    """(status, body); (0, b"") while nothing listens yet."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    except ConnectionRefusedError:
        return 0, b""
    finally:
        c.close()


def test_a_running_agent_is_live_and_ready_and_names_a_source_past_its_budget(
        cluster: Cluster, tmp_path: Path):
    cluster.ingest("aws")
    good = cluster.agent()
    assert probe(good.http_port, "/healthz") == (200, b"ok\n")
    wait_for(lambda: probe(good.http_port, "/readyz") == (200, b"ready\n"),
                      what="the agent ready")
    dead = localrun.free_port()  # an AMQP broker nobody runs: never subscribed
    bad = cluster.agent("site-b", start=False, sources=(
        f'[[sources]]\nname = "historian"\ntype = "amqp"\n'
        f'url = "amqp://guest:guest@127.0.0.1:{dead}/"\nqueue = "q"\nreconnect_max_s = 0.5\n'))
    bad.start()
    wait_for(lambda: probe(bad.http_port, "/readyz")[0] == 503 and
                      b"source historian" in probe(bad.http_port, "/readyz")[1], timeout=30,
                      what="the agent not ready, naming the source")
    _, body = probe(bad.http_port, "/readyz")
    assert b"not subscribed for" in body and b"(budget 5 s)" in body
    assert probe(bad.http_port, "/healthz") == (200, b"ok\n")  # alive, not ready
