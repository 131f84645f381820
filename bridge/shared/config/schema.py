"""The config files' schemas, declared once as msgspec Structs: key names, types, bounds and
defaults. ``decode`` reads a TOML file into one of them; unknown keys, wrong types and values
out of bounds are ``ConfigError``s naming the file and the key path
(``uplink.endpoints[1].target``), as are the checks ``bridge.shared.config.load`` adds on top
(values that depend on other keys, files that must exist). docs/configuration.md documents
every key; tests/shared/config/test_docs.py checks its tables against these Structs.

``None`` as a default means "absent": either optional, or computed from other keys by the
loader (a source's ``name``, an endpoint's ``priority``, the rate limit's ``burst``).
"""

from __future__ import annotations

import enum
import math
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
from msgspec import Meta

from bridge.shared import defaults as D
from bridge.shared.config import interpolate
from bridge.shared.errors import ConfigError
from bridge.shared.kinds import (
    Codec,
    ExchangeType,
    FullPolicy,
    LogLevel,
    ReadingClass,
    StoreKind,
)

Text = Annotated[str, Meta(pattern=r"\S")]  # a string with something in it
Texts = list[Text]
Seconds = Annotated[float, Meta(ge=0.0)]


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A TOML table: unknown keys are errors (a typo in a bound must not pass silently)."""


class TlsFile(_Table, kw_only=True):
    ca: Text
    cert: Text
    key: Text


class AgentTlsFile(TlsFile, kw_only=True):
    check_s: Annotated[float, Meta(ge=0.1)] = D.TLS_CHECK_S  # how often files are checked


class MetricsFile(_Table, kw_only=True):
    listen: Text | None = None


class LogFile(_Table, kw_only=True):
    level: LogLevel = LogLevel.INFO


class MappingFile(_Table, kw_only=True):
    topic: Text
    value: Text
    items: Text | None = None
    signal: Text | None = None
    timestamp: Text | None = None
    timestamp_format: Text = "auto"
    unit: Text | None = None
    quality: Text | None = None
    quality_codes: Text = "opc_da"
    seq: Text | None = None


class SparkplugFile(_Table, kw_only=True):
    host_id: Text | None = None
    rebirth: bool = True
    rebirth_on_gap: bool = True
    rebirth_interval_s: Seconds = D.REBIRTH_INTERVAL_S
    rebirth_max_per_s: Annotated[float, Meta(ge=0.0)] = D.REBIRTH_MAX_PER_S
    max_edge_nodes: Annotated[int, Meta(ge=1)] = D.MAX_EDGE_NODES
    max_decompressed_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = D.MAX_DECOMPRESSED_BYTES


class SourceTlsFile(_Table, kw_only=True):
    ca: Text | None = None    # the broker's CA; absent: the system's trust store
    cert: Text | None = None  # a client certificate, for a broker that asks for one
    key: Text | None = None


class _SourceFile(_Table, kw_only=True, tag_field="type"):
    name: Text | None = None
    tls: SourceTlsFile | None = None
    codec: Codec = D.CODEC
    max_payload_bytes: Annotated[int, Meta(ge=64, le=256 << 20)] = D.MAX_PAYLOAD_BYTES
    dedupe_retransmissions: bool = D.DEDUPE_RETRANSMISSIONS
    mappings: list[MappingFile] = msgspec.field(default_factory=list)
    sparkplug: SparkplugFile | None = None


class MqttSourceFile(_SourceFile, kw_only=True, tag="mqtt"):
    url: Text = "mqtt://127.0.0.1:1883"
    topics: Texts | None = None
    client_id: Text | None = None
    session_expiry_s: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 7 * 86400
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 1000
    keepalive_s: Annotated[int, Meta(ge=5)] = 30
    username: Text | None = None
    password: Text | None = None
    interface: Text | None = None  # bind the broker connection to this interface (OT leg)
    # The hard bound sent as CONNECT Maximum Packet Size (None: max(16 MiB, the payload bound
    # plus room for the topic and headers)); see bridge.edge.sources.mqtt.
    max_packet_bytes: Annotated[int, Meta(ge=4096, le=268_435_455)] | None = None


class AmqpSourceFile(_SourceFile, kw_only=True, tag="amqp"):
    url: Text = "amqp://guest:guest@127.0.0.1:5672/"
    queue: Text
    durable: bool = True
    exchange: Text | None = None
    exchange_type: ExchangeType = ExchangeType.TOPIC
    bindings: Texts | None = None
    prefetch: Annotated[int, Meta(ge=1, le=65535)] = 1000
    heartbeat_s: Annotated[int, Meta(ge=0)] = 30
    reconnect_max_s: Annotated[float, Meta(ge=0.1)] = 30.0


class PriorityFile(_Table, kw_only=True):
    topic: Text
    class_: ReadingClass = msgspec.field(name="class")


class SpoolFile(_Table, kw_only=True):
    path: Text
    max_bytes: Annotated[int, Meta(ge=1 << 20)] = 1 << 30
    commit_max_messages: Annotated[int, Meta(ge=1, le=100_000)] = D.COMMIT_MAX_MESSAGES
    commit_max_bytes: Annotated[int, Meta(ge=1024)] = D.COMMIT_MAX_BYTES
    reserve_bytes: Annotated[int, Meta(ge=0)] = 32 << 20
    max_age_s: Seconds = D.MAX_AGE_S
    backpressure_s: Seconds = D.BACKPRESSURE_S
    full_policy: FullPolicy = D.FULL_POLICY
    priority: list[PriorityFile] = msgspec.field(default_factory=list)
    dead_letter_payload_bytes: Annotated[int, Meta(ge=0, le=1 << 20)] = D.DEAD_LETTER_PAYLOAD_BYTES
    dead_letters_max: Annotated[int, Meta(ge=1)] = D.DEAD_LETTERS_MAX
    dead_letters_max_bytes: Annotated[int, Meta(ge=0)] = D.DEAD_LETTERS_MAX_BYTES


VlanId = Annotated[int, Meta(ge=1, le=4094)]


class EndpointFile(_Table, kw_only=True):
    name: Text
    target: Text
    priority: Annotated[int, Meta(ge=0)] | None = None
    interface: Text | Texts | None = None  # a list: the legs this endpoint may use, in order
    vlan: VlanId | list[VlanId] | None = None


class BreakerFile(_Table, kw_only=True):
    window_s: Annotated[float, Meta(ge=0.1)] = 10.0
    error_rate: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.15
    min_requests: Annotated[int, Meta(ge=1)] = 20
    open_s: Annotated[float, Meta(ge=0.01)] = 5.0
    half_open_probes: Annotated[int, Meta(ge=1)] = 3


class UplinkFile(_Table, kw_only=True):
    endpoints: list[EndpointFile] = msgspec.field(default_factory=list)
    batch_max_readings: Annotated[int, Meta(ge=1, le=10_000)] = 1250
    batch_max_bytes: Annotated[int, Meta(ge=1024, le=4_000_000)] = 250_000
    max_in_flight: Annotated[int, Meta(ge=1, le=64)] = 4
    deadline_s: Annotated[float, Meta(ge=0.05)] = 5.0
    health_interval_s: Annotated[float, Meta(ge=0.05)] = 0.25
    health_timeout_s: Annotated[float, Meta(ge=0.05)] = 2.0
    health_timeout_min_s: Annotated[float, Meta(ge=0.01)] = 0.3
    failback_after_s: Seconds = 30.0
    backoff_max_s: Annotated[float, Meta(ge=0.05)] = 10.0
    refused_retry_s: Annotated[float, Meta(ge=0.1)] = D.REFUSED_RETRY_S
    drain_max_per_s: Annotated[float, Meta(ge=0.0)] = D.DRAIN_MAX_PER_S
    breaker: BreakerFile = msgspec.field(default_factory=BreakerFile)


class AgentFile(_Table, kw_only=True):
    site_id: Text
    tls: AgentTlsFile
    spool: SpoolFile
    sources: list[Union[MqttSourceFile, AmqpSourceFile]] = msgspec.field(  # noqa: UP007
        default_factory=list)
    uplink: UplinkFile
    metrics: MetricsFile = msgspec.field(default_factory=MetricsFile)
    log: LogFile = msgspec.field(default_factory=LogFile)


class StoreFile(_Table, kw_only=True):
    kind: StoreKind = StoreKind.SQLITE
    path: Text | None = None
    servers: Texts = msgspec.field(default_factory=list)
    stream: Text = D.STREAM
    subject_prefix: Text = D.SUBJECT_PREFIX
    replicas: Annotated[int, Meta(ge=1, le=5)] = D.REPLICAS
    ack_timeout_s: Annotated[float, Meta(ge=0.1)] = D.ACK_TIMEOUT_S
    cache_mb: Annotated[float, Meta(ge=1)] = D.CACHE_MB
    creds: Text | None = None
    tls_ca: Text | None = None
    tls_cert: Text | None = None
    tls_key: Text | None = None


class LimitsFile(_Table, kw_only=True):
    max_batch_envelopes: Annotated[int, Meta(ge=1, le=1_000_000)] = D.MAX_BATCH_ENVELOPES
    max_tombstone_span: Annotated[int, Meta(ge=1, le=2**63 - 1)] = D.MAX_TOMBSTONE_SPAN
    max_epochs_per_site: Annotated[int, Meta(ge=1)] = D.MAX_EPOCHS_PER_SITE
    max_gaps_per_stream: Annotated[int, Meta(ge=1, le=20_000)] = D.MAX_GAPS_PER_STREAM
    max_batch_bytes: Annotated[int, Meta(ge=65_536, le=64 * 1024 * 1024)] = D.MAX_BATCH_BYTES
    max_in_flight_per_site: Annotated[int, Meta(ge=1, le=1024)] = D.MAX_IN_FLIGHT_PER_SITE
    admit_target_ms: Annotated[int, Meta(ge=0, le=60_000)] = D.ADMIT_TARGET_MS
    admit_wait_ms: Annotated[int, Meta(ge=50, le=60_000)] = D.ADMIT_WAIT_MS
    max_in_flight_readings: Annotated[int, Meta(ge=1_000, le=10_000_000)] = \
        D.MAX_IN_FLIGHT_READINGS


class RateLimitFile(_Table, kw_only=True):
    readings_per_s: Annotated[float, Meta(ge=0.0)] = 200_000.0
    burst: Annotated[float, Meta(ge=1.0)] | None = None


class HealthFile(_Table, kw_only=True):
    listen: Text | None = None


class RevocationFile(_Table, kw_only=True):
    deny_list: Text | None = None


class IngestFile(_Table, kw_only=True):
    node: Text
    listen: Text = "0.0.0.0:6443"
    tls: TlsFile
    store: StoreFile
    limits: LimitsFile = msgspec.field(default_factory=LimitsFile)
    rate_limit: RateLimitFile = msgspec.field(default_factory=RateLimitFile)
    health: HealthFile = msgspec.field(default_factory=HealthFile)
    revocation: RevocationFile = msgspec.field(default_factory=RevocationFile)
    metrics: MetricsFile = msgspec.field(default_factory=MetricsFile)
    log: LogFile = msgspec.field(default_factory=LogFile)


class ConsumerJetStreamFile(_Table, kw_only=True):
    """How ``nats://`` sources in ``from`` are read (the stream's name, its subjects, access)."""

    stream: Text = D.STREAM
    subject_prefix: Text = D.SUBJECT_PREFIX
    creds: Text | None = None
    tls_ca: Text | None = None
    tls_cert: Text | None = None
    tls_key: Text | None = None


class ConsumerFile(_Table, kw_only=True):
    from_: Texts = msgspec.field(default_factory=list, name="from")
    cursor: Text | None = None
    tls: TlsFile | None = None  # needed for ingest nodes (HOST:PORT), not for nats:// sources
    jetstream: ConsumerJetStreamFile = msgspec.field(default_factory=ConsumerJetStreamFile)


F = TypeVar("F", bound=_Table)

_WHAT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
         "array": "a list", "object": "a table"}


def decode(path: Path, schema: type[F]) -> tuple[F, dict[str, Any]]:
    """The file's TOML as ``schema`` (and as parsed, for keys whose presence matters); any
    mistake is one ``ConfigError`` with its key path."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "", "file not found") from exc
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}") from exc
    secrets = interpolate.expand(raw, os.environ, str(path))
    if (seen := interpolate.SEEN.get()) is not None:
        seen.update(secrets)
    if (bad := _non_finite(raw)) is not None:
        raise ConfigError(str(path), bad, "must be a finite number (inf and nan mean nothing "
                          "for a bound or a duration)")
    for source in raw.get("sources", []) if isinstance(raw.get("sources"), list) else []:
        if isinstance(source, dict):
            source.setdefault("type", "mqtt")
    try:
        return msgspec.convert(raw, schema, strict=True), raw
    except msgspec.ValidationError as exc:
        err = _error(str(path), schema, str(exc), raw)
        raise ConfigError(err.file, err.key, interpolate.scrub(err.message, secrets)) from None


def _non_finite(value: Any, where: str = "") -> str | None:
    """The key path of the first inf or nan in the parsed TOML, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else
                            f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def _value_at(raw: Any, where: str) -> Any:
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", where):
        try:
            raw = raw[int(part[1:-1])] if part.startswith("[") else raw[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return raw


def _error(file: str, schema: type[Any], message: str, raw: Any) -> ConfigError:
    """msgspec's message ("Expected `int` >= 64 - at `$.spool.max_bytes`") in our words."""
    text, _, at = message.partition(" - at `$")
    where = at.rstrip("`").lstrip(".")

    def key(child: str) -> str:
        return f"{where}.{child}" if where else child

    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        return ConfigError(file, key(m[1]), "unknown key (see docs/configuration.md)")
    if m := re.fullmatch(r"Object missing required field `(.+)`", text):
        return ConfigError(file, key(m[1]), "required key is missing")
    if m := re.fullmatch(r"Expected `([^`]+)`, got `(\w+)`", text):
        kinds = [_WHAT.get(k, k) for k in m[1].split(" | ") if k != "null"]
        return ConfigError(file, where, f"expected {' or '.join(kinds)}, got {m[2]}")
    if m := re.fullmatch(r"Expected `(\w+)` (>=|<=|<|>) (\S+)", text):
        return ConfigError(file, where, f"must be {m[2]} {m[3]}, got {_value_at(raw, where)!r}")
    if re.fullmatch(r"Expected `str` matching regex .*", text):
        return ConfigError(file, where, "must not be empty")
    if m := re.fullmatch(r"Invalid (?:enum )?value (.+)", text):
        choices = _choices(schema, where)
        return ConfigError(file, where, f"must be one of {', '.join(choices)}; got {m[1]}"
                           if choices else f"invalid value {m[1]}")
    return ConfigError(file, where, text)


def _choices(schema: type[Any], where: str) -> list[str]:
    """The allowed values of the Literal (or the tags of the union) at ``where``."""
    types: list[Any] = [schema]
    parts = [p for p in re.split(r"\.|\[\d+\]", where) if p]
    for i, part in enumerate(parts):
        found: list[Any] = []
        for t in types:
            if part == "type" and i == len(parts) - 1 and isinstance(t, type) and \
                    issubclass(t, _SourceFile):
                return ["mqtt", "amqp"]
            if not (isinstance(t, type) and issubclass(t, msgspec.Struct)):
                continue
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(t)}
            if part in fields:
                found.extend(_unwrap(fields[part]))
        types = found
    values = [str(v) for t in types if typing.get_origin(t) is Literal
              for v in typing.get_args(t)]
    values += [str(v) for t in types if isinstance(t, type) and issubclass(t, enum.Enum)
               for v in t]
    return list(dict.fromkeys(values))


def _unwrap(t: Any) -> list[Any]:
    """A field's type without Annotated, Optional, list and union wrappers."""
    origin = typing.get_origin(t)
    if origin is Annotated:
        return _unwrap(typing.get_args(t)[0])
    if origin in (list, Union) or str(origin) == "<class 'types.UnionType'>":
        return [u for a in typing.get_args(t) for u in _unwrap(a)]
    return [t]
