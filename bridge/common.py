"""Helpers that several stages share, so that none imports another stage for them.

* ``Backoff``: capped, fully jittered, wakeable backoff, one per retry loop (the sender, the
  endpoint pool's probes, the AMQP source's reconnects, the consumer).
* ``TokenBucket``: a rate limit that may go into debt, so a request larger than the burst is
  never refused forever (the ingest's per-site limits, the sender's drain pacing, Sparkplug
  rebirth requests).
* ``channel_options``: the gRPC client channel settings of every client of the ingest (the
  agent's uplink, the consumer): keepalive, reconnect backoff, no library retries.
  ``DEADLINE_METADATA``: the agent states its call deadline in this header, so the ingest
  can tell how long a call waited before its handler ran (gRPC keeps the deadline itself
  from the server's code; ``bridge.ingest.admission``).
* ``connect_bound``: a blocking TCP connection pinned to one interface (``SO_BINDTODEVICE``),
  failing closed, for the plant side's OT leg (paho's network thread); the uplink's bind proxy
  does the same on the event loop (``bridge.netbind``).
* ``claim_address``: a listen address checked free before a server binds it, and the
  one-line error when it is not (every listener the bridge opens is exclusive).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

from bridge.errors import ConfigError, InUseError


class Backoff:
    """``sleep()`` waits uniform(0, min(cap, base * 2**attempt)); ``wake()`` cuts it short."""

    def __init__(self, *, base_s: float = 0.05, cap_s: float = 10.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.attempt = 0
        self._wake = asyncio.Event()

    def reset(self) -> None:
        self.attempt = 0

    def wake(self) -> None:
        self._wake.set()

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay

    async def sleep(self, delay: float | None = None) -> None:
        self._wake.clear()
        await wait_event(self._wake, self.next_delay() if delay is None else delay)


class TokenBucket:
    def __init__(self, *, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens = burst
        self._at = clock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens; 0.0 if done, else the seconds to wait before asking again."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        need = min(float(n), self.burst)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


DEADLINE_METADATA = "bridge-deadline-ms"


def channel_options(*, backoff_max_s: float) -> list[tuple[str, Any]]:
    """Keepalive pings every 10 s (the ingest permits 5 s), reconnects capped at
    ``backoff_max_s``, and no gRPC retries: ours resend with the same ids, elsewhere."""
    return [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
        ("grpc.enable_retries", 0),  # retries are ours: same request ids, other endpoints
    ]


Pem = tuple[bytes, bytes, bytes]  # (ca, cert, key), as TlsConfig.read() gives them


def mtls_credentials(pem: Pem) -> grpc.ChannelCredentials:
    """Client credentials for mutual TLS: trust ``ca``, present ``cert`` with ``key``. The one
    place the PEM triple meets gRPC's (root, key, chain) argument order."""
    import grpc  # not at import time: the CLI sets GRPC_VERBOSITY before gRPC starts

    ca, cert, key = pem
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def mtls_channel(target: str, pem: Pem, *, options: list[tuple[str, Any]] | None = None
                 ) -> grpc.aio.Channel:
    """An asyncio gRPC channel to ``target`` with ``mtls_credentials(pem)`` (the agent's
    uplink, the consumer, the bench's sites)."""
    import grpc

    return grpc.aio.secure_channel(target, mtls_credentials(pem), options=options)


def check_interface(name: str) -> None:
    """``OSError`` naming ``name`` unless the interface exists."""
    try:
        socket.if_nametoindex(name)
    except OSError as exc:
        raise OSError(f"interface {name!r} does not exist") from exc


def connect_bound(host: str, port: int, *, interface: str, timeout: float) -> socket.socket:
    """A blocking TCP connection to ``host:port`` that can only leave by ``interface``.

    If the interface is missing or down, or has no route to the host, the connect fails
    (``OSError`` naming the interface): it never falls back to another route. Needs
    CAP_NET_RAW.
    """
    check_interface(interface)
    last: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except PermissionError as exc:
            sock.close()
            raise OSError(f"binding to {interface} needs CAP_NET_RAW") from exc
        except OSError as exc:
            sock.close()
            last = OSError(f"connect to {host}:{port} via {interface} failed: "
                           f"{exc.strerror or type(exc).__name__}")
    raise last


def address_error(key: str, listen: str, exc: OSError) -> InUseError | ConfigError:
    """The user's error for a listen address that could not be bound."""
    if exc.errno == errno.EADDRINUSE:
        return InUseError(f"{key} {listen}: address already in use (another process listens "
                          "there; every address has one owner)")
    return ConfigError("", key, f"cannot listen on {listen}: {exc.strerror or exc}")


def claim_address(host: str, port: int, *, key: str) -> None:
    """``InUseError`` if another process listens on ``host:port`` (port 0 is always free).

    Why a probe: grpcio turns ``SO_REUSEPORT`` on unless told otherwise, and even with it off
    a failed bind is a ``RuntimeError("Failed to bind")`` plus C-core log lines. A plain bind
    without ``SO_REUSEPORT`` (``SO_REUSEADDR`` as every server sets it) fails exactly when
    another socket listens there. The servers themselves bind exclusively too, so a process
    that wins the race in between still cannot share the port.
    """
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError("", key, f"cannot listen on {listen}: {exc.strerror or exc}") \
            from exc
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise address_error(key, listen, exc) from exc


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """``event.wait()`` for at most ``timeout`` seconds; True if the event is set. Not
    ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that lands just as the event
    is set, and a loop around it then outlives its task's cancel (seen: a checkpoint task
    that hung the store's close)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
