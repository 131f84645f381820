"""Every use of paho-mqtt's internals, in one place, checked at start.

``FastClient`` overrides private methods of ``paho.mqtt.client.Client`` (2.2.x) for the
agent's receive path: buffered reads, every received packet handled per ``select``, and a
lean QoS 0/1 PUBLISH path (docs/architecture.md, Decisions, "paho internals" has the measured
reason). paho is pinned exactly in pyproject.toml; ``check_paho()`` runs before the first
connection and turns a renamed or missing internal into one clear error naming the installed
paho version, instead of an ``AttributeError`` on paho's network thread.
"""

from __future__ import annotations

import importlib.metadata
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

from bridge.shared.errors import DependencyError
from bridge.shared.sockets import connect_bound

TESTED = "2.2.0"  # the version pinned in pyproject.toml, whose internals these are
# Methods FastClient overrides or calls, and instance attributes it reads.
METHODS = ("_handle_publish", "_sock_recv", "_sock_close", "_packet_read", "_loop_rc_handle",
           "loop_read", "loop_write", "_create_socket", "_create_socket_connection")
ATTRIBUTES = ("_in_packet", "_out_packet", "_sock", "_host", "_port", "_connect_timeout",
              "_ssl_context")
IN_PACKET_KEYS = ("command", "packet")

_U16 = struct.Struct("!H")
OnPublish = Callable[[str, bytes, bool, int, int], None]  # topic, payload, dup, mid, qos


def check_paho(client_class: type[Any] = mqtt.Client) -> None:
    """Raise ``DependencyError`` unless every internal FastClient relies on is there."""
    try:
        version = importlib.metadata.version("paho-mqtt")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    missing = [m for m in METHODS if not callable(getattr(client_class, m, None))]
    probe = client_class(CallbackAPIVersion.VERSION2, client_id="bridge-paho-check")
    missing += [a for a in ATTRIBUTES if not hasattr(probe, a)]
    packet = getattr(probe, "_in_packet", None)
    if isinstance(packet, dict):
        missing += [f"_in_packet[{k!r}]" for k in IN_PACKET_KEYS if k not in packet]
    if missing:
        raise DependencyError(
            f"paho-mqtt {version} lacks internals the MQTT source relies on "
            f"({', '.join(missing)}); it is tested with paho-mqtt=={TESTED}: install that "
            f"version (pip install 'paho-mqtt=={TESTED}')")


class FastClient(mqtt.Client):
    """paho's client with buffered reads and a lean QoS 0/1 PUBLISH path.

    paho reads each packet with three ``recv`` calls (type byte, length, body) and handles one
    packet per ``select`` when nothing is in flight outbound; at 10k+ msgs/s that is most of
    its thread's time. Here ``recv`` is served from a 64 KiB buffer, and ``loop_read`` handles
    every packet already received before going back to ``select`` (so ``select`` never sleeps
    on bytes sitting in the buffer), writing queued acks between packets.

    With ``on_publish_received`` set, a QoS 0/1 PUBLISH goes straight to it: topic, payload, DUP,
    packet id and QoS read off the packet, its v5 properties skipped (we use none, and set no
    Topic Alias Maximum, so the broker sends no aliases), instead of paho's Properties parse,
    ``MQTTMessage`` (with its own ``threading.Condition``) and topic-callback matching. QoS 2
    still takes paho's path. Relies on the paho internals in ``INTERNALS``; ``check_paho``
    verifies them at start.
    """

    _BUF = 65536

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._rbuf = b""
        self._rpos = 0
        self.on_publish_received: OnPublish | None = None
        self.bind_interface: str | None = None  # SO_BINDTODEVICE, failing closed
        self.last_error = ""  # why the last connection failed or broke (paho keeps none)
        # Called before every connection attempt: a new TLS context when the certificate
        # files changed (a renewal takes effect at the next handshake), else None.
        self.tls_refresh: Callable[[], ssl.SSLContext | None] | None = None

    def _create_socket(self) -> Any:
        if self.tls_refresh is not None and (ctx := self.tls_refresh()) is not None:
            self._ssl_context = ctx
        try:
            sock = super()._create_socket()
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS (SSLError, names)
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        self.last_error = ""
        return sock

    def _create_socket_connection(self) -> socket.socket:
        if self.bind_interface is None:
            return super()._create_socket_connection()
        return connect_bound(self._host, self._port, interface=self.bind_interface,
                             timeout=self._connect_timeout)

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        deliver = self.on_publish_received
        if deliver is None or qos == 2:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        try:
            (n,) = _U16.unpack_from(packet, 0)
            pos = 2 + n
            topic = bytes(packet[2:pos]).decode("utf-8", "replace")
            mid = 0
            if qos:
                (mid,) = _U16.unpack_from(packet, pos)
                pos += 2
            size, shift = 0, 0
            while True:  # v5 property length: a variable byte integer
                b = packet[pos]
                pos += 1
                size |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            pos += size
            if pos > len(packet) or shift > 28:
                raise MalformedPacket("PUBLISH property length past the packet")
        except (IndexError, struct.error) as exc:
            raise MalformedPacket(f"PUBLISH: {exc}") from exc
        deliver(topic, bytes(packet[pos:]), bool(header & 0x08), mid, qos)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            try:
                self._rbuf, self._rpos = super()._sock_recv(max(bufsize, self._BUF)), 0
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # nothing to read yet: paho's normal path
            except OSError as exc:  # e.g. the broker's TLS alert after the handshake
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                raise
            if not self._rbuf:
                return self._rbuf  # EOF: paho treats it as connection lost
        start, self._rpos = self._rpos, min(self._rpos + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # bytes of a dead connection mean nothing on the next
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        while True:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if self._rpos >= len(self._rbuf):
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # buffer drained: back to select
            if self._out_packet:
                # While the broker keeps sending, a packet straddling each 64 KiB read keeps
                # the buffer from ever draining; acks queued meanwhile go out here, or they
                # pile up (measured: 120,000 queued PUBACKs) and the broker's window stalls.
                rc = self.loop_write()
                if rc:
                    return rc
