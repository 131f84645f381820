"""The HTTP endpoint of the agent and the ingest (``metrics.listen``): ``/metrics``,
``/status``, ``/healthz`` and ``/readyz``.

* ``/metrics`` is prometheus_client's own exposition (its WSGI app): content negotiation
  (OpenMetrics for a scraper that asks), gzip for a client that accepts it, ``name[]``
  filters; HEAD answers the headers of GET.
* ``/status``: the process's JSON status (``bridge status`` reads it).
* ``/healthz`` (liveness): 200 while the process's event loop answers within
  ``LIVE_TIMEOUT_S``; 503 with the reason when it does not (a restart is the cure).
* ``/readyz`` (readiness): 200 ``ready``, or 503 with one reason per line, from the
  component's own check (the agent: spool open, sources connected or within their reconnect
  budget, an endpoint healthy or the backlog inside its bounds; the ingest: its store).

Bounded: at most ``MAX_CONNECTIONS`` connections are served at once (one more is answered 503
and closed at once, counted), and a connection has ``TIMEOUT_S`` to send its request and read
the answer, so half-sent requests cannot hold threads. Only GET and HEAD are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from bridge.shared.config import parse_hostport
from bridge.shared.sockets import address_error

MAX_CONNECTIONS = 16
TIMEOUT_S = 10.0
LIVE_TIMEOUT_S = 2.0

StartResponse = Callable[..., Any]
Probe = Callable[[], list[str]]  # reasons the process is not live / ready (empty: it is)


def on_loop(loop: asyncio.AbstractEventLoop, probe: Probe,
            timeout: float = LIVE_TIMEOUT_S) -> list[str]:
    """Run ``probe`` on ``loop`` (which owns the state it reads) from another thread; a loop
    that does not run it within ``timeout`` is itself the reason."""
    async def run() -> list[str]:
        return probe()

    if loop.is_closed():
        return ["the event loop is closed"]
    try:
        fut = asyncio.run_coroutine_threadsafe(run(), loop)
    except RuntimeError as exc:
        return [f"the event loop cannot take work ({exc})"]
    try:
        return fut.result(timeout)
    except TimeoutError:
        fut.cancel()
        return [f"the event loop did not answer within {timeout:g} s"]


def loop_answers(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Liveness: [] while ``loop`` runs a no-op within ``LIVE_TIMEOUT_S``."""
    return on_loop(loop, list)


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # applied to the connection's socket (StreamRequestHandler.setup)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], limit: int) -> None:
        super().__init__(address, _Handler)
        self._slots = threading.BoundedSemaphore(limit)
        self.turned_away = 0  # connections answered 503 because all slots were taken
        self.failed = 0       # connections that timed out or broke mid-request

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.turned_away += 1
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.failed += 1  # a slow or broken client: nothing to print


class HttpEndpoint:
    """``/metrics``, ``/status``, ``/healthz`` and ``/readyz`` on ``listen`` (module doc)."""

    def __init__(self, *, listen: str, registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]], key: str = "metrics.listen",
                 live: Probe | None = None, ready: Probe | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        """``key``: the config key of ``listen``, named in the error if it is taken."""
        host, port = parse_hostport(listen, listen=True)
        self._metrics = make_wsgi_app(registry)
        self._status, self._live, self._ready = status, live, ready
        try:  # exclusive: Python's HTTP server sets SO_REUSEADDR but never SO_REUSEPORT
            self._server = _Server((host, port), max_connections)
        except OSError as exc:
            raise address_error(key, listen, exc) from exc
        self._server.set_app(self._app)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="http-endpoint", daemon=True)

    @property
    def turned_away(self) -> int:
        return self._server.turned_away

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"use GET or HEAD\n",
                           extra=[("Allow", "GET, HEAD")])
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            got: list[Any] = []
            body = b"".join(self._metrics({**environ, "REQUEST_METHOD": "GET"},
                                          lambda status, headers, *_: got.extend(
                                              (status, headers))))
            status, headers = got
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
            start_response(status, headers)
            return [b"" if method == "HEAD" else body]
        if path == "/status":
            return _answer(start_response, "200 OK", orjson.dumps(self._status()),
                           ctype="application/json", head=method == "HEAD")
        if path in ("/healthz", "/readyz"):
            probe = self._live if path == "/healthz" else self._ready
            reasons = [] if probe is None else probe()
            if reasons:
                return _answer(start_response, "503 Service Unavailable",
                               ("\n".join(reasons) + "\n").encode(), head=method == "HEAD")
            return _answer(start_response, "200 OK",
                           b"ok\n" if path == "/healthz" else b"ready\n", head=method == "HEAD")
        return _answer(start_response, "404 Not Found",
                       b"not found: /metrics, /status, /healthz or /readyz\n",
                       head=method == "HEAD")


def _answer(start_response: StartResponse, status: str, body: bytes, *,
            ctype: str = "text/plain; charset=utf-8", head: bool = False,
            extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            *(extra or [])])
    return [b"" if head else body]
