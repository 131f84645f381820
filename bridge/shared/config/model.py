"""What a config file becomes: frozen dataclasses the rest of the bridge reads, and the
parsers of values they hold (host:port, NATS URLs, site ids)."""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.edge.codecs import JsonMapping
from bridge.shared import certinfo
from bridge.shared import defaults as D
from bridge.shared.errors import ConfigError
from bridge.shared.files import exposure
from bridge.shared.kinds import Codec, FullPolicy, LogLevel, Protocol, ReadingClass

DEFAULT_INGEST_PORT = 6443


DEFAULT_MQTT_PORT = 1883


DEFAULT_AMQP_PORT = 5672


TLS_PORTS = {"mqtts": 8883, "amqps": 5671}


# MQTT: a packet holds the payload plus the topic (up to 65,535 bytes and its length), the
# fixed header and properties; MQTT cannot encode a packet above MQTT_MAX_PACKET.
MQTT_PACKET_OVERHEAD = 65_535 + 2 + 5 + 1024
MQTT_MAX_PACKET = 268_435_455


SPARKPLUG_TOPICS = ("spBv1.0/+/NBIRTH/+", "spBv1.0/+/NDEATH/+", "spBv1.0/+/NDATA/+",
                    "spBv1.0/+/DBIRTH/+/+", "spBv1.0/+/DDEATH/+/+", "spBv1.0/+/DDATA/+/+")


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


SITE_ID_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


# A site id is its certificate's CN, and X.509 bounds a CN at 64 characters (RFC 5280,
# ub-common-name): one limit everywhere an id enters (config, pki, envelopes at the ingest).
SITE_ID_MAX = 64


def site_id_problem(site_id: str) -> str | None:
    """What is wrong with ``site_id`` as a site (or consumer) name, or None."""
    if len(site_id) > SITE_ID_MAX:
        return (f"{site_id[:20]!r}... is {len(site_id)} characters; at most {SITE_ID_MAX} (a "
                "certificate's common name holds 64)")
    if SITE_ID_RE.match(site_id) is None:
        return f"{site_id!r} must be a DNS-style name (a-z, 0-9, '-', '.')"
    return None


def parse_hostport(value: str, *, default_port: int | None = None,
                   listen: bool = False) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError with a readable message.

    Port 0 ("any free port") is valid only for addresses we listen on.
    """
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\s/]+)(?::(\d+))?", value)
    if not m:
        raise ValueError(f'expected "host:port", got {value!r}')
    host = m.group(1) or m.group(3)
    port_s = m.group(2) or m.group(4)
    if port_s is None:
        if default_port is None:
            raise ValueError(f'expected "host:port", got {value!r} (no port)')
        return host, default_port
    port = int(port_s)
    if not (0 if listen else 1) <= port < 65536:
        raise ValueError(f"port {port} out of range in {value!r}")
    return host, port


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    file: str = ""
    section: str = "tls"

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes; a missing or unreadable file is a ConfigError."""
        out = []
        for name in ("ca", "cert", "key"):
            path: Path = getattr(self, name)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(self.file, f"{self.section}.{name}",
                                  f"cannot read {path}: {exc.strerror}") from exc
            if b"-----BEGIN" not in data:
                raise ConfigError(self.file, f"{self.section}.{name}", f"{path} is not PEM")
            if name == "key" and (problem := exposure(path)):
                raise ConfigError(self.file, f"{self.section}.key", f"private key {problem}")
            out.append(data)
        return out[0], out[1], out[2]

    def verified(self, *, role: str | None, name: str | None = None,
                 now: float | None = None) -> tuple[bytes, bytes, bytes]:
        """``read``, then the checks the peer's TLS would make, so that a wrong file is a
        ``ConfigError`` at start (and at a reload) instead of refusals later: the key belongs
        to the certificate, the CA parses, the certificate has not expired, and with ``role``
        (a client: a site or a consumer) it was issued by this CA for that role and, with
        ``name``, for that name. A server's own certificate may come from another CA than the
        one it trusts for clients, so ``role=None`` skips the chain."""
        ca, cert, key = self.read()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise self._error("key", f"{self.key} does not belong to {self.cert} "
                              f"({exc.__class__.__name__}: {exc})") from exc
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise self._error("ca", f"{self.ca}: {exc}") from exc
        try:
            subject, not_after = certinfo.read_pem(cert)[0]
            held = certinfo.role_pem(cert)
        except ValueError as exc:
            raise self._error("cert", f"{self.cert}: {exc}") from exc
        clock = time.time() if now is None else now
        if not_after <= clock:
            raise self._error("cert", f"{self.cert} expired "
                              f"{(clock - not_after) / 86400:.1f} days ago")
        if role is not None and held != role:
            raise self._error("cert", f"{self.cert} is a {held or 'role-less'!r} "
                              f"certificate, not {role!r}: the ingest would refuse it")
        if name is not None and subject != name:
            raise self._error("cert", f"{self.cert} is for {subject!r}, not this site "
                              f"({name!r}): the ingest would refuse it")
        if role is not None:
            problem = certinfo.chain_problem(ca, self.cert, self.key)
            if problem is not None:
                raise self._error("cert", f"{self.cert} is not accepted with the CA in "
                                  f"{self.ca}: {problem}")
        return ca, cert, key

    def _error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, f"{self.section}.{key}", message)


@dataclass(frozen=True, kw_only=True)
class SourceTls:
    """TLS toward a plant broker (``mqtts://``, ``amqps://``): the broker's CA (None: the
    system's trust store) and an optional client certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    file: str = ""
    section: str = "sources[0].tls"

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker's certificate and name; ConfigError
        naming the key if a file does not load."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(self.file, f"{self.section}.ca", f"{self.ca}: {exc}") from exc
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(self.file, f"{self.section}.cert", f"{self.cert} with "
                                  f"{self.key}: {exc}") from exc
        return ctx


@dataclass(frozen=True, kw_only=True)
class SparkplugConfig:
    host_id: str | None          # publish spBv1.0/STATE/<host_id>: the Primary Host Application
    rebirth: bool                # request a rebirth (NCMD) for DATA that cannot be typed
    rebirth_on_gap: bool         # ... and for a seq gap
    rebirth_interval_s: float    # at most one request per edge node per this interval
    rebirth_max_per_s: float = D.REBIRTH_MAX_PER_S  # requests per second, the whole source
    max_edge_nodes: int = D.MAX_EDGE_NODES            # edge nodes tracked per source
    max_decompressed_bytes: int = D.MAX_DECOMPRESSED_BYTES  # a compressed payload's bound


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How a source's payloads become readings; the same for every protocol."""

    codec: Codec = D.CODEC
    max_payload_bytes: int = D.MAX_PAYLOAD_BYTES
    mappings: tuple[JsonMapping, ...] = ()
    sparkplug: SparkplugConfig | None = None
    # byte-identical repeats that carry the publisher's seq
    dedupe_retransmissions: bool = D.DEDUPE_RETRANSMISSIONS


@dataclass(frozen=True, kw_only=True)
class MqttSourceConfig:
    name: str
    host: str
    port: int
    topics: tuple[str, ...]
    client_id: str
    session_expiry_s: int
    receive_maximum: int
    keepalive_s: int
    username: str | None
    password: str | None
    decode: DecodeConfig = DecodeConfig()
    protocol: Protocol = Protocol.MQTT
    tls: SourceTls | None = None
    interface: str | None = None  # SO_BINDTODEVICE for the broker connection
    max_packet_bytes: int = D.MQTT_MAX_PACKET_BYTES  # CONNECT Maximum Packet Size: the bound

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def window(self) -> int:
        return self.receive_maximum


@dataclass(frozen=True, kw_only=True)
class AmqpSourceConfig:
    name: str
    host: str
    port: int
    vhost: str
    username: str
    password: str
    queue: str
    durable: bool
    exchange: str | None
    exchange_type: str
    bindings: tuple[str, ...]
    prefetch: int
    heartbeat_s: int
    reconnect_max_s: float
    decode: DecodeConfig = DecodeConfig()
    protocol: Protocol = Protocol.AMQP
    tls: SourceTls | None = None

    @property
    def url(self) -> str:
        """For logs and envelopes: never the password."""
        vhost = "" if self.vhost == "/" else "/" + self.vhost
        return f"{'amqps' if self.tls else 'amqp'}://{self.host}:{self.port}{vhost}"

    @property
    def window(self) -> int:
        return self.prefetch


SourceConfig = MqttSourceConfig | AmqpSourceConfig


@dataclass(frozen=True, kw_only=True)
class SpoolConfig:
    path: Path
    max_bytes: int
    commit_max_messages: int
    reserve_bytes: int
    commit_max_bytes: int = D.COMMIT_MAX_BYTES
    max_age_s: float = D.MAX_AGE_S
    backpressure_s: float = D.BACKPRESSURE_S
    full_policy: FullPolicy = D.FULL_POLICY
    priority: tuple[tuple[str, ReadingClass], ...] = ()  # (topic filter, class)
    dead_letter_payload_bytes: int = D.DEAD_LETTER_PAYLOAD_BYTES  # a bad message's prefix kept
    dead_letters_max: int = D.DEAD_LETTERS_MAX                    # rows
    dead_letters_max_bytes: int = D.DEAD_LETTERS_MAX_BYTES        # and at most max_bytes / 10


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """One way to one cloud. A configured endpoint that lists several legs becomes one of
    these per leg, named ``<cloud>/<leg>``, in the listed order, next to each other."""

    name: str
    target: str
    priority: int
    interface: str | None = None
    vlan: int | None = None

    @property
    def leg(self) -> str | None:
        """The interface (or ``vlan<id>``) its connections are bound to; None: unbound."""
        return self.interface or (f"vlan{self.vlan}" if self.vlan else None)


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    window_s: float
    error_rate: float
    min_requests: int
    open_s: float
    half_open_probes: int


@dataclass(frozen=True, kw_only=True)
class UplinkConfig:
    endpoints: tuple[EndpointConfig, ...]
    batch_max_readings: int
    batch_max_bytes: int
    max_in_flight: int
    deadline_s: float
    health_interval_s: float
    health_timeout_s: float
    health_timeout_min_s: float
    failback_after_s: float
    backoff_max_s: float
    breaker: BreakerConfig
    drain_max_per_s: float = D.DRAIN_MAX_PER_S
    refused_retry_s: float = D.REFUSED_RETRY_S  # an endpoint that refused us is retried after


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    file: Path
    site_id: str
    tls: TlsConfig
    spool: SpoolConfig
    sources: tuple[SourceConfig, ...]
    uplink: UplinkConfig
    metrics_listen: str | None
    log_level: LogLevel
    tls_check_s: float = D.TLS_CHECK_S  # how often the uplink's TLS files are checked


NATS_URL = re.compile(r"(nats|tls)://[^/\s:,]+:\d{1,5}")


def nats_servers(target: str) -> list[str]:
    """The servers of a ``nats://HOST:PORT[,nats://HOST:PORT...]`` target (ValueError)."""
    servers = [u.strip() for u in target.split(",")]
    bad = [u for u in servers if not NATS_URL.fullmatch(u)]
    if bad:
        raise ValueError(f"expected nats://HOST:PORT[,nats://HOST:PORT...], got {bad[0]!r}")
    return servers


@dataclass(frozen=True, kw_only=True)
class JetStreamSettings:
    """``[store] kind = "jetstream"``: where the stream lives and how to reach it."""

    servers: tuple[str, ...]
    stream: str = D.STREAM
    prefix: str = D.SUBJECT_PREFIX
    replicas: int = D.REPLICAS
    ack_timeout_s: float = D.ACK_TIMEOUT_S
    cache_mb: float = D.CACHE_MB    # subject states a replica holds (bridge.cloud.store.subjects)
    creds: str | None = None        # a NATS user credentials file (JWT + nkey seed)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def connect_options(self) -> dict[str, object]:
        """``nats.connect`` keyword arguments for this access: credentials and TLS."""
        tls = None
        if self.tls_ca or self.tls_cert:
            tls = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                tls.load_cert_chain(self.tls_cert, self.tls_key)
        return {"tls": tls, "user_credentials": self.creds}


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    file: Path
    node: str
    listen: str
    tls: TlsConfig
    store_path: Path | None
    rate_limit_per_s: float
    rate_limit_burst: float
    metrics_listen: str | None
    log_level: LogLevel
    max_batch_envelopes: int = D.MAX_BATCH_ENVELOPES
    max_tombstone_span: int = D.MAX_TOMBSTONE_SPAN
    max_epochs_per_site: int = D.MAX_EPOCHS_PER_SITE
    max_gaps_per_stream: int = D.MAX_GAPS_PER_STREAM
    max_batch_bytes: int = D.MAX_BATCH_BYTES
    max_in_flight_per_site: int = D.MAX_IN_FLIGHT_PER_SITE
    admit_target_ms: int = D.ADMIT_TARGET_MS
    admit_wait_ms: int = D.ADMIT_WAIT_MS
    max_in_flight_readings: int = D.MAX_IN_FLIGHT_READINGS
    jetstream: JetStreamSettings | None = None
    health_listen: str | None = None  # plaintext grpc.health.v1 only (kubelet probes)
    deny_list: Path | None = None  # revoked serials/fingerprints (bridge.cloud.ingest.denylist)


@dataclass(frozen=True, kw_only=True)
class ConsumerConfig:
    targets: tuple[str, ...]
    tls: TlsConfig | None  # ingest nodes only; a nats:// source uses ``jetstream``
    cursor: Path | None
    jetstream: JetStreamSettings = JetStreamSettings(servers=())
