"""Pin uplink connections to one network interface (a gateway's WAN VLAN leg).

grpcio cannot bind a channel to a device or a source address (no socket mutator in Python), so
each bound endpoint gets a small HTTP CONNECT proxy on loopback: the channel is pointed at it
with the ``grpc.http_proxy`` option, and the proxy's upstream sockets set ``SO_BINDTODEVICE``
before connecting. TLS stays end to end through the tunnel. The proxy **fails closed**: if the
interface is missing or down the connect fails (502 to gRPC, UNAVAILABLE to the agent, an
``netbind.connect_failed`` event with the reason); traffic never leaves by another route.
``SO_BINDTODEVICE`` needs CAP_NET_RAW (the systemd unit grants it).

VLAN ids resolve to interface names through the kernel's ``/proc/net/vlan/config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from bridge.shared.errors import BindError
from bridge.shared.sockets import check_interface
from bridge.shared.telemetry import event

VLAN_CONFIG = Path("/proc/net/vlan/config")
_CONNECT_TIMEOUT_S = 5.0


def resolve_vlan(vid: int, *, config: Path = VLAN_CONFIG) -> str:
    """The interface carrying 802.1Q VLAN ``vid``, e.g. 200 -> "eth0.200"."""
    try:
        text = config.read_text()
    except FileNotFoundError as exc:
        raise BindError(f"VLAN {vid}: this kernel has no 802.1Q support loaded "
                        f"({config} missing; modprobe 8021q)") from exc
    for line in text.splitlines()[2:]:
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) == vid:
            return parts[0]
    raise BindError(f"VLAN {vid}: no interface carries it (see {config})")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.strip().rpartition(":")
    try:
        return host.strip("[]").lower(), int(port)
    except ValueError:
        return "", -1


class BindProxy:
    """CONNECT proxy on 127.0.0.1 whose upstream connections are bound to ``interface``."""

    def __init__(self, *, interface: str, endpoint: str, target: str,
                 on_refused: Callable[[], None] | None = None) -> None:
        """``target`` (``host:port``) is the only upstream this proxy will connect to: any
        other local process asking it for another host gets 403, so the proxy is never a
        way around the gateway's routing onto the WAN leg."""
        self.interface, self.endpoint = interface, endpoint
        self.allowed = _split_target(target)
        self._on_refused = on_refused or (lambda: None)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._tunnel(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._tasks.discard(task)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "CONNECT":
                raise BindError(f"unsupported proxy method {method}")
            if _split_target(target) != self.allowed:
                self._on_refused()
                event("netbind.refused", level=logging.WARNING, endpoint=self.endpoint,
                      interface=self.interface, requested=target[:200],
                      allowed=f"{self.allowed[0]}:{self.allowed[1]}")
                with contextlib.suppress(Exception):
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    writer.close()
                return
            host, port = self.allowed
            upstream = await self._connect(host, port)
        except (BindError, OSError, ValueError, asyncio.IncompleteReadError,
                TimeoutError) as exc:
            event("netbind.connect_failed", level=logging.WARNING, endpoint=self.endpoint,
                  interface=self.interface, reason=str(exc) or type(exc).__name__, flag="UF")
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _connect(self, host: str, port: int) -> socket.socket:
        check_interface(self.interface)  # OSError naming it: a 502 and connect_failed
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: Exception = BindError(f"no address for {host}")
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                self.interface.encode())
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, addr), _CONNECT_TIMEOUT_S)
                return sock
            except PermissionError as exc:
                sock.close()
                raise BindError(f"binding to {self.interface} needs CAP_NET_RAW") from exc
            except (OSError, TimeoutError) as exc:
                sock.close()
                why = getattr(exc, "strerror", None) or f"no answer in {_CONNECT_TIMEOUT_S:g} s"
                last = BindError(f"connect to {host}:{port} via {self.interface} failed: {why}")
        raise last
