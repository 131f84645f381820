"""Sockets with one owner and one way out.

* ``connect_bound``: a blocking TCP connection pinned to one interface (``SO_BINDTODEVICE``),
  failing closed, for the plant side's OT leg (paho's network thread); the uplink's bind proxy
  does the same on the event loop (``bridge.edge.uplink.netbind``).
* ``claim_address``: a listen address checked free before a server binds it, and the
  one-line error when it is not (every listener the bridge opens is exclusive).
"""

from __future__ import annotations

import errno
import socket

from bridge.shared.errors import ConfigError, InUseError


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
