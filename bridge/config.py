"""TOML configuration to frozen dataclasses.

Every error names the file and the key path (``uplink.endpoints[1].target``) and the CLI turns it
into one line and exit status 2. Unknown keys are errors too: a typo in a bound such as
``max_bytes`` must not silently fall back to a default. Relative paths are resolved against the
config file's directory, so a config works whatever the current directory of the service is.
Every key is documented in docs/configuration.md.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from bridge.codecs import CODECS, JsonMapping
from bridge.errors import ConfigError, MappingError
from bridge.files import exposure

_REQUIRED: Any = object()

DEFAULT_INGEST_PORT = 6443
DEFAULT_MQTT_PORT = 1883
DEFAULT_AMQP_PORT = 5672
DEFAULT_MAX_PAYLOAD = 1 << 20
SPARKPLUG_TOPICS = ("spBv1.0/+/NBIRTH/+", "spBv1.0/+/NDEATH/+", "spBv1.0/+/NDATA/+",
                    "spBv1.0/+/DBIRTH/+/+", "spBv1.0/+/DDEATH/+/+", "spBv1.0/+/DDATA/+/+")


#: Site ids double as DNS SANs (see bridge.pki), so they follow DNS label rules (lower case,
#: digits, '-', '.'). Defined here so that loading a config never loads cryptography.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
SITE_ID_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


def valid_site_id(site_id: str) -> bool:
    return len(site_id) <= 253 and SITE_ID_RE.match(site_id) is not None


class _Table:
    """One TOML table being read; tracks consumed keys to report unknown ones."""

    def __init__(self, data: dict[str, Any], *, file: str, path: str, base: Path) -> None:
        self._data, self._file, self._path, self._base = data, file, path, base
        self._seen: set[str] = set()

    @property
    def file(self) -> str:
        return self._file

    @property
    def where(self) -> str:
        return self._path

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self._file, self._key(key) if key else self._path, message)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self._data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {what}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {what}, got {type(value).__name__} {value!r}")
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str) and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        value = self._get(key, default, (int,), "an integer")
        if isinstance(value, int):
            if minimum is not None and value < minimum:
                raise self.error(key, f"must be >= {minimum}, got {value}")
            if maximum is not None and value > maximum:
                raise self.error(key, f"must be <= {maximum}, got {value}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, minimum: float | None = None) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if value is not None:
            value = float(value)
            if minimum is not None and value < minimum:
                raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        if value is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        if isinstance(value, str):
            p = Path(value).expanduser()
            return p if p.is_absolute() else (self._base / p)
        return value

    def str_list(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (list,), "a list of strings")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item:
                    raise ConfigError(self._file, f"{self._key(key)}[{i}]",
                                      f"expected a non-empty string, got {item!r}")
            return tuple(value)
        return value

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self._get(key, _REQUIRED if required else {}, (dict,), "a table")
        return _Table(value, file=self._file, path=self._key(key), base=self._base)

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key, [], (list,), "an array of tables ([[...]])")
        out = []
        for i, item in enumerate(value):
            path = f"{self._key(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self._file, path, "expected a table")
            out.append(_Table(item, file=self._file, path=path, base=self._base))
        return out

    def has(self, key: str) -> bool:
        return key in self._data

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (see docs/configuration.md)")


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


def _hostport(t: _Table, key: str, default: Any = _REQUIRED, *,
              default_port: int | None = None, listen: bool = False) -> Any:
    value = t.string(key, default)
    if value is None:
        return None
    try:
        parse_hostport(value, default_port=default_port, listen=listen)
    except ValueError as exc:
        raise t.error(key, str(exc)) from exc
    return value


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


@dataclass(frozen=True, kw_only=True)
class SparkplugConfig:
    host_id: str | None          # publish spBv1.0/STATE/<host_id>: the Primary Host Application
    rebirth: bool                # request a rebirth (NCMD) for DATA that cannot be typed
    rebirth_on_gap: bool         # ... and for a seq gap
    rebirth_interval_s: float    # at most one request per edge node per this interval
    rebirth_max_per_s: float = 10.0  # rebirth requests per second for the whole source
    max_edge_nodes: int = 10_000     # edge nodes tracked per source
    max_decompressed_bytes: int = 16 << 20  # a compressed payload inflates to at most this


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How a source's payloads become readings; the same for every protocol."""

    codec: str = "json"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    mappings: tuple[JsonMapping, ...] = ()
    sparkplug: SparkplugConfig | None = None
    dedupe_retransmissions: bool = True  # byte-identical repeats that carry the publisher's seq


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
    protocol: str = "mqtt"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
    protocol: str = "amqp"

    @property
    def url(self) -> str:
        """For logs and envelopes: never the password."""
        vhost = "" if self.vhost == "/" else "/" + self.vhost
        return f"amqp://{self.host}:{self.port}{vhost}"

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
    max_age_s: float = 0.0
    backpressure_s: float = 60.0
    full_policy: str = "drop_oldest"
    priority: tuple[tuple[str, str], ...] = ()  # (topic filter, class)
    dead_letter_payload_bytes: int = 4096  # the prefix of a bad message kept
    dead_letters_max: int = 10_000         # rows
    dead_letters_max_bytes: int = 16 << 20  # and at most max_bytes / 10


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    name: str
    target: str
    priority: int
    interface: str | None = None
    vlan: int | None = None


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
    drain_max_per_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    file: Path
    site_id: str
    tls: TlsConfig
    spool: SpoolConfig
    sources: tuple[SourceConfig, ...]
    uplink: UplinkConfig
    metrics_listen: str | None
    log_level: str


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
    stream: str = "BRIDGE"
    prefix: str = "bridge.r"
    replicas: int = 3
    ack_timeout_s: float = 5.0
    creds: str | None = None        # a NATS user credentials file (JWT + nkey seed)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


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
    log_level: str
    max_batch_envelopes: int = 10_000
    max_tombstone_span: int = 2**40
    max_epochs_per_site: int = 256
    jetstream: JetStreamSettings | None = None
    health_listen: str | None = None  # plaintext grpc.health.v1 only (kubelet probes)


def _read(path: Path) -> _Table:
    file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"invalid TOML: {exc}") from exc
    return _Table(data, file=file, path="", base=path.resolve().parent)


def _tls(t: _Table) -> TlsConfig:
    tls = TlsConfig(ca=t.path("ca"), cert=t.path("cert"), key=t.path("key"), file=t.file,
                    section=t.where)
    t.done()
    return tls


def _common(root: _Table) -> tuple[str | None, str]:
    metrics = root.table("metrics")
    listen = _hostport(metrics, "listen", None, listen=True)
    metrics.done()
    log = root.table("log")
    level = log.choice("level", ("debug", "info", "warning", "error"), "info")
    log.done()
    return listen, level


def _decode(t: _Table, *, separator: str) -> DecodeConfig:
    codec = t.choice("codec", CODECS, "json")
    mappings = []
    for i, mt in enumerate(t.tables("mappings")):
        try:
            mappings.append(JsonMapping(
                topic=mt.string("topic"), value=mt.string("value"), separator=separator,
                where=f"{t.where}.mappings[{i}]",
                items=mt.string("items", None), signal=mt.string("signal", None),
                timestamp=mt.string("timestamp", None),
                timestamp_format=mt.string("timestamp_format", "auto"),
                unit=mt.string("unit", None), quality=mt.string("quality", None),
                quality_codes=mt.string("quality_codes", "opc_da"), seq=mt.string("seq", None)))
        except MappingError as exc:
            key, _, message = str(exc).partition(": ")
            raise ConfigError(t.file, key, message) from exc
        mt.done()
    if mappings and codec == "sparkplug":
        raise t.error("mappings", "JSON mappings do not apply to codec = \"sparkplug\"")
    spt = t.table("sparkplug")
    sparkplug = None
    if codec == "sparkplug":
        sparkplug = SparkplugConfig(
            host_id=spt.string("host_id", None),
            rebirth=spt.boolean("rebirth", True),
            rebirth_on_gap=spt.boolean("rebirth_on_gap", True),
            rebirth_interval_s=spt.number("rebirth_interval_s", 10.0, minimum=0.0),
            rebirth_max_per_s=spt.number("rebirth_max_per_s", 10.0, minimum=0.0),
            max_edge_nodes=spt.integer("max_edge_nodes", 10_000, minimum=1),
            max_decompressed_bytes=spt.integer("max_decompressed_bytes", 16 << 20,
                                               minimum=1024, maximum=1 << 30))
        if sparkplug.host_id is not None and not re.fullmatch(r"[^/+#]+", sparkplug.host_id):
            raise spt.error("host_id", "must not contain '/', '+' or '#'")
    elif t.has("sparkplug"):
        raise t.error("sparkplug", 'applies only to codec = "sparkplug"')
    spt.done()
    return DecodeConfig(codec=codec, sparkplug=sparkplug, mappings=tuple(mappings),
                        dedupe_retransmissions=t.boolean("dedupe_retransmissions", True),
                        max_payload_bytes=t.integer("max_payload_bytes", DEFAULT_MAX_PAYLOAD,
                                                    minimum=64, maximum=256 << 20))


def _broker_url(t: _Table, *, scheme: str, default: str, port: int,
                shape: str) -> tuple[SplitResult, str, int]:
    """(parts, host, port) of a source's ``url``; errors name the key."""
    url = t.string("url", default)
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname:
        raise t.error("url", f'expected "{shape}", got {url!r}')
    try:
        return parts, parts.hostname, parts.port or port
    except ValueError as exc:
        raise t.error("url", f"bad port in {url!r}") from exc


def _amqp_source(t: _Table, *, index: int) -> AmqpSourceConfig:
    name = t.string("name", f"amqp{index}")
    parts, host, port = _broker_url(
        t, scheme="amqp", default=f"amqp://guest:guest@127.0.0.1:{DEFAULT_AMQP_PORT}/",
        port=DEFAULT_AMQP_PORT, shape="amqp://USER:PASSWORD@HOST[:PORT]/VHOST")
    exchange = t.string("exchange", None)
    bindings = t.str_list("bindings", ("#",) if exchange else ())
    if bindings and not exchange:
        raise t.error("bindings", "needs an exchange to bind the queue to")
    src = AmqpSourceConfig(
        name=name, host=host, port=port,
        vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        username=unquote(parts.username or "guest"), password=unquote(parts.password or "guest"),
        queue=t.string("queue"),
        durable=t.boolean("durable", True),
        exchange=exchange,
        exchange_type=t.choice("exchange_type", ("topic", "direct", "fanout", "headers"),
                               "topic"),
        bindings=bindings,
        prefetch=t.integer("prefetch", 1000, minimum=1, maximum=65535),
        heartbeat_s=t.integer("heartbeat_s", 30, minimum=0),
        reconnect_max_s=t.number("reconnect_max_s", 30.0, minimum=0.1),
        decode=_decode(t, separator="."),
    )
    t.done()
    return src


def _mqtt_source(t: _Table, *, site_id: str, index: int) -> MqttSourceConfig:
    name = t.string("name", f"mqtt{index}")
    _, host, port = _broker_url(t, scheme="mqtt", default=f"mqtt://127.0.0.1:{DEFAULT_MQTT_PORT}",
                                port=DEFAULT_MQTT_PORT, shape="mqtt://HOST[:PORT]")
    decode = _decode(t, separator="/")
    topics = t.str_list("topics", SPARKPLUG_TOPICS if decode.codec == "sparkplug" else _REQUIRED)
    if not topics:
        raise t.error("topics", "needs at least one topic filter")
    src = MqttSourceConfig(
        name=name,
        host=host,
        port=port,
        topics=topics,
        client_id=t.string("client_id", f"bridge-{site_id}-{name}"),
        session_expiry_s=t.integer("session_expiry_s", 7 * 86400, minimum=0, maximum=2**32 - 1),
        receive_maximum=t.integer("receive_maximum", 1000, minimum=1, maximum=65535),
        keepalive_s=t.integer("keepalive_s", 30, minimum=5),
        username=t.string("username", None),
        password=t.string("password", None),
        decode=decode,
    )
    t.done()
    return src


def load_agent(path: Path) -> AgentConfig:
    root = _read(path)
    site_id = root.string("site_id")
    if not valid_site_id(site_id):
        raise root.error("site_id", f"{site_id!r} must be a DNS-style name (a-z, 0-9, '-', '.')")
    tls = _tls(root.table("tls", required=True))

    spool_t = root.table("spool", required=True)
    spool = SpoolConfig(
        path=spool_t.path("path"),
        max_bytes=spool_t.integer("max_bytes", 1 << 30, minimum=1 << 20),
        commit_max_messages=spool_t.integer("commit_max_messages", 1000, minimum=1,
                                            maximum=100_000),
        reserve_bytes=spool_t.integer("reserve_bytes", 32 << 20, minimum=0),
    )
    if 0 < spool.reserve_bytes < 8 << 20:
        raise spool_t.error("reserve_bytes", "must be 0 (no reserve) or at least 8388608 "
                            "(8 MiB): it must cover a checkpoint of the spool's WAL")
    rules = []
    for rt in spool_t.tables("priority"):
        rules.append((rt.string("topic"), rt.choice("class", ("alarm", "event", "telemetry"))))
        rt.done()
    spool = SpoolConfig(
        path=spool.path, max_bytes=spool.max_bytes,
        commit_max_messages=spool.commit_max_messages, reserve_bytes=spool.reserve_bytes,
        max_age_s=spool_t.number("max_age_s", 30 * 86400.0, minimum=0.0),
        backpressure_s=spool_t.number("backpressure_s", 60.0, minimum=0.0),
        full_policy=spool_t.choice("full_policy", ("drop_oldest", "reject_new"), "drop_oldest"),
        priority=tuple(rules),
        dead_letter_payload_bytes=spool_t.integer("dead_letter_payload_bytes", 4096, minimum=0,
                                                  maximum=1 << 20),
        dead_letters_max=spool_t.integer("dead_letters_max", 10_000, minimum=1),
        dead_letters_max_bytes=spool_t.integer("dead_letters_max_bytes", 16 << 20,
                                               minimum=0),
    )
    spool_t.done()

    sources: list[SourceConfig] = []
    for i, st in enumerate(root.tables("sources")):
        kind = st.choice("type", ("mqtt", "amqp"), "mqtt")
        sources.append(_mqtt_source(st, site_id=site_id, index=i) if kind == "mqtt"
                       else _amqp_source(st, index=i))
    if not sources:
        raise root.error("sources", "needs at least one [[sources]] table")
    names = [s.name for s in sources]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ConfigError(str(path), f"sources[{i}].name", f"duplicate source name {n!r}")

    up = root.table("uplink", required=True)
    endpoints = []
    for i, et in enumerate(up.tables("endpoints")):
        endpoints.append(EndpointConfig(name=et.string("name"),
                                        target=_hostport(et, "target",
                                                         default_port=DEFAULT_INGEST_PORT),
                                        priority=et.integer("priority", i, minimum=0),
                                        interface=et.string("interface", None),
                                        vlan=et.integer("vlan", None, minimum=1, maximum=4094)))
        if endpoints[-1].interface and endpoints[-1].vlan:
            raise et.error("vlan", "give either interface or vlan, not both")
        et.done()
    if not endpoints:
        raise up.error("endpoints", "needs at least one [[uplink.endpoints]] table")
    seen: set[str] = set()
    for i, ep in enumerate(endpoints):
        if ep.name in seen:
            raise ConfigError(str(path), f"uplink.endpoints[{i}].name",
                              f"duplicate endpoint name {ep.name!r}")
        seen.add(ep.name)
    bt = up.table("breaker")
    breaker = BreakerConfig(
        window_s=bt.number("window_s", 10.0, minimum=0.1),
        error_rate=bt.number("error_rate", 0.15, minimum=0.0),
        min_requests=bt.integer("min_requests", 20, minimum=1),
        open_s=bt.number("open_s", 5.0, minimum=0.01),
        half_open_probes=bt.integer("half_open_probes", 3, minimum=1),
    )
    if breaker.error_rate >= 1.0:
        raise bt.error("error_rate", f"must be below 1.0, got {breaker.error_rate}")
    bt.done()
    uplink = UplinkConfig(
        endpoints=tuple(sorted(endpoints, key=lambda e: e.priority)),
        batch_max_readings=up.integer("batch_max_readings", 1250, minimum=1, maximum=10_000),
        batch_max_bytes=up.integer("batch_max_bytes", 250_000, minimum=1024, maximum=4_000_000),
        max_in_flight=up.integer("max_in_flight", 4, minimum=1, maximum=64),
        deadline_s=up.number("deadline_s", 5.0, minimum=0.05),
        health_interval_s=up.number("health_interval_s", 0.25, minimum=0.05),
        health_timeout_s=up.number("health_timeout_s", 2.0, minimum=0.05),
        health_timeout_min_s=up.number("health_timeout_min_s", 0.3, minimum=0.01),
        failback_after_s=up.number("failback_after_s", 30.0, minimum=0.0),
        backoff_max_s=up.number("backoff_max_s", 10.0, minimum=0.05),
        breaker=breaker,
        drain_max_per_s=up.number("drain_max_per_s", 0.0, minimum=0.0),
    )
    up.done()
    metrics_listen, log_level = _common(root)
    root.done()
    secret = next((s.name for s in sources if s.password not in (None, "guest")), None)
    if secret is not None and (problem := exposure(path)):
        raise ConfigError(str(path), f"sources[{secret}]", f"holds a password, and {problem}")
    return AgentConfig(file=path, site_id=site_id, tls=tls, spool=spool, sources=tuple(sources),
                       uplink=uplink, metrics_listen=metrics_listen, log_level=log_level)


def load_ingest(path: Path) -> IngestConfig:
    root = _read(path)
    node = root.string("node")
    listen = _hostport(root, "listen", f"0.0.0.0:{DEFAULT_INGEST_PORT}", listen=True)
    tls = _tls(root.table("tls", required=True))
    store = root.table("store", required=True)
    kind = store.choice("kind", ("sqlite", "jetstream"), "sqlite")
    store_path: Path | None = None
    jetstream = None
    if kind == "sqlite":
        store_path = store.path("path")
    else:
        servers = store.str_list("servers", ())
        if not servers:
            raise store.error("servers", 'kind = "jetstream" needs the NATS servers, e.g. '
                              '["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]')
        for i, url in enumerate(servers):
            if not NATS_URL.fullmatch(url):
                raise store.error(f"servers[{i}]", f"expected nats://HOST:PORT or "
                                  f"tls://HOST:PORT, got {url!r}")
        name = store.string("stream", "BRIDGE")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise store.error("stream", f"{name!r}: letters, digits, '_' and '-' only")
        prefix = store.string("subject_prefix", "bridge.r")
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", prefix):
            raise store.error("subject_prefix", f"{prefix!r} is not a NATS subject without "
                              "wildcards")
        paths = {}
        for key in ("creds", "tls_ca", "tls_cert", "tls_key"):
            p = store.path(key, None)
            if p is not None and not p.is_file():
                raise store.error(key, f"{p}: no such file")
            paths[key] = str(p) if p is not None else None
        if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
            raise store.error("tls_key", "tls_cert and tls_key go together")
        jetstream = JetStreamSettings(
            servers=tuple(servers), stream=name, prefix=prefix,
            replicas=store.integer("replicas", 3, minimum=1, maximum=5),
            ack_timeout_s=store.number("ack_timeout_s", 5.0, minimum=0.1), **paths)
    store.done()
    lim = root.table("limits")
    max_batch = lim.integer("max_batch_envelopes", 10_000, minimum=1, maximum=1_000_000)
    max_span = lim.integer("max_tombstone_span", 2**40, minimum=1, maximum=2**63 - 1)
    max_epochs = lim.integer("max_epochs_per_site", 256, minimum=1)
    lim.done()
    rl = root.table("rate_limit")
    rate = rl.number("readings_per_s", 0.0, minimum=0.0)
    burst = rl.number("burst", max(rate, 1.0) * 2, minimum=1.0)
    rl.done()
    health = root.table("health")
    health_listen = _hostport(health, "listen", None, listen=True)
    health.done()
    metrics_listen, log_level = _common(root)
    root.done()
    health_port = parse_hostport(health_listen, listen=True)[1] if health_listen else 0
    if health_port and health_port == parse_hostport(listen, listen=True)[1]:
        raise ConfigError(str(path), "health.listen", "must not share the port of listen "
                          "(the gRPC port is mTLS only; the health port is plaintext)")
    return IngestConfig(file=path, node=node, listen=listen, tls=tls, store_path=store_path,
                        health_listen=health_listen,
                        rate_limit_per_s=rate, rate_limit_burst=burst,
                        metrics_listen=metrics_listen, log_level=log_level,
                        max_batch_envelopes=max_batch, max_tombstone_span=max_span,
                        max_epochs_per_site=max_epochs, jetstream=jetstream)


@dataclass(frozen=True, kw_only=True)
class ConsumerConfig:
    targets: tuple[str, ...]
    tls: TlsConfig
    cursor: Path | None


def load_consumer(path: Path) -> ConsumerConfig:
    root = _read(path)
    targets = root.str_list("from", ())
    for i, t in enumerate(targets):
        try:
            if t.startswith(("nats://", "tls://")):  # a JetStream-backed cloud, read directly
                nats_servers(t)
                continue
            parse_hostport(t, default_port=DEFAULT_INGEST_PORT)
        except ValueError as exc:
            raise ConfigError(str(path), f"from[{i}]", str(exc)) from exc
    cursor = root.path("cursor", None)
    tls = _tls(root.table("tls", required=True))
    root.done()
    return ConsumerConfig(targets=targets, tls=tls, cursor=cursor)
