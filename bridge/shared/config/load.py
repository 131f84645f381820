"""The loaders: a file decoded into its ``schema`` Struct, then into the ``model`` dataclasses,
with the checks a schema cannot state (values that depend on other keys, names that must be
unique, files that must exist, paths relative to the config file)."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from bridge.edge.codecs import JsonMapping
from bridge.shared import defaults as D
from bridge.shared.config import interpolate, schema
from bridge.shared.config.model import (
    DEFAULT_AMQP_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_MQTT_PORT,
    MQTT_MAX_PACKET,
    MQTT_PACKET_OVERHEAD,
    NATS_URL,
    SPARKPLUG_TOPICS,
    TLS_PORTS,
    AgentConfig,
    AmqpSourceConfig,
    BreakerConfig,
    ConsumerConfig,
    DecodeConfig,
    EndpointConfig,
    IngestConfig,
    JetStreamSettings,
    MqttSourceConfig,
    SourceConfig,
    SourceTls,
    SparkplugConfig,
    SpoolConfig,
    TlsConfig,
    UplinkConfig,
    nats_servers,
    parse_hostport,
    site_id_problem,
)
from bridge.shared.errors import ConfigError, MappingError
from bridge.shared.files import exposure
from bridge.shared.kinds import Codec, StoreKind

C = TypeVar("C")


def _scrubbed(load: Callable[[Path], C]) -> Callable[[Path], C]:
    """``load``, whose errors never print a value the file took from the environment (it may
    be a secret): each is written as the ``${VAR}`` that brought it."""
    @functools.wraps(load)
    def run(path: Path) -> C:
        seen: dict[str, str] = {}
        token = interpolate.SEEN.set(seen)
        try:
            return load(path)
        except ConfigError as exc:
            if not seen:
                raise
            raise ConfigError(exc.file, exc.key, interpolate.scrub(exc.message, seen)) \
                from None
        finally:
            interpolate.SEEN.reset(token)
    return run


class _File:
    """The file being loaded: its name for errors and its directory for relative paths."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.base = path.resolve().parent

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.name, key, message)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def hostport(self, key: str, value: str, *, default_port: int | None = None,
                 listen: bool = False) -> str:
        try:
            parse_hostport(value, default_port=default_port, listen=listen)
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc
        return value


def _tls(f: _File, t: schema.TlsFile) -> TlsConfig:
    return TlsConfig(ca=f.path(t.ca), cert=f.path(t.cert), key=f.path(t.key), file=f.name,
                     section="tls")


def _listen(f: _File, key: str, value: str | None) -> str | None:
    return None if value is None else f.hostport(key, value, listen=True)


def _decode(f: _File, s: schema.MqttSourceFile | schema.AmqpSourceFile, where: str, *,
            separator: str) -> DecodeConfig:
    mappings = []
    for i, m in enumerate(s.mappings):
        try:
            mappings.append(JsonMapping(
                topic=m.topic, value=m.value, separator=separator,
                where=f"{where}.mappings[{i}]", items=m.items, signal=m.signal,
                timestamp=m.timestamp, timestamp_format=m.timestamp_format, unit=m.unit,
                quality=m.quality, quality_codes=m.quality_codes, seq=m.seq))
        except MappingError as exc:
            key, _, message = str(exc).partition(": ")
            raise f.error(key, message) from exc
    if mappings and s.codec == Codec.SPARKPLUG:
        raise f.error(f"{where}.mappings", 'JSON mappings do not apply to codec = "sparkplug"')
    sparkplug = None
    if s.codec == Codec.SPARKPLUG:
        sp = s.sparkplug or schema.SparkplugFile()
        if sp.host_id is not None and not re.fullmatch(r"[^/+#]+", sp.host_id):
            raise f.error(f"{where}.sparkplug.host_id", "must not contain '/', '+' or '#'")
        sparkplug = SparkplugConfig(
            host_id=sp.host_id, rebirth=sp.rebirth, rebirth_on_gap=sp.rebirth_on_gap,
            rebirth_interval_s=sp.rebirth_interval_s, rebirth_max_per_s=sp.rebirth_max_per_s,
            max_edge_nodes=sp.max_edge_nodes, max_decompressed_bytes=sp.max_decompressed_bytes)
    elif s.sparkplug is not None:
        raise f.error(f"{where}.sparkplug", 'applies only to codec = "sparkplug"')
    return DecodeConfig(codec=s.codec, sparkplug=sparkplug, mappings=tuple(mappings),
                        dedupe_retransmissions=s.dedupe_retransmissions,
                        max_payload_bytes=s.max_payload_bytes)


def _broker_url(f: _File, url: str, where: str, *, scheme: str, port: int,
                shape: str) -> tuple[SplitResult, str, int]:
    """(parts, host, port) of a source's ``url`` (``scheme`` or its TLS form ``<scheme>s``);
    errors name the key."""
    parts = urlsplit(url)
    if parts.scheme not in (scheme, f"{scheme}s") or not parts.hostname:
        raise f.error(f"{where}.url", f'expected "{shape}" (or {scheme}s:// for TLS), '
                      f"got {url!r}")
    try:
        return parts, parts.hostname, parts.port or TLS_PORTS.get(parts.scheme, port)
    except ValueError as exc:
        raise f.error(f"{where}.url", f"bad port in {url!r}") from exc


def _source_tls(f: _File, s: schema.MqttSourceFile | schema.AmqpSourceFile, scheme: str,
                where: str) -> SourceTls | None:
    """The source's TLS settings; a ``[sources.tls]`` table needs the TLS scheme, so a
    plaintext URL never silently ignores the certificates meant to protect it."""
    t = s.tls
    if not scheme.endswith("s"):
        if t is not None:
            raise f.error(f"{where}.tls", f"TLS is configured but the url is {scheme}://; "
                          f"use {scheme}s://")
        return None
    t = t or schema.SourceTlsFile()
    if (t.cert is None) != (t.key is None):
        raise f.error(f"{where}.tls.key", "cert and key go together")
    paths: dict[str, Path | None] = {}
    for key in ("ca", "cert", "key"):
        value = getattr(t, key)
        p = f.path(value) if value is not None else None
        if p is not None and not p.is_file():
            raise f.error(f"{where}.tls.{key}", f"{p}: no such file")
        paths[key] = p
    key_path = paths["key"]
    if key_path is not None and (problem := exposure(key_path)):
        raise f.error(f"{where}.tls.key", f"private key {problem}")
    tls = SourceTls(ca=paths["ca"], cert=paths["cert"], key=paths["key"], file=f.name,
                    section=f"{where}.tls")
    tls.context()  # loads now: a key that does not match its certificate fails at start
    return tls


def _amqp_source(f: _File, s: schema.AmqpSourceFile, i: int) -> AmqpSourceConfig:
    where = f"sources[{i}]"
    parts, host, port = _broker_url(f, s.url, where, scheme="amqp", port=DEFAULT_AMQP_PORT,
                                    shape="amqp://USER:PASSWORD@HOST[:PORT]/VHOST")
    tls = _source_tls(f, s, parts.scheme, where)
    bindings = tuple(s.bindings) if s.bindings is not None else \
        (("#",) if s.exchange else ())
    if bindings and not s.exchange:
        raise f.error(f"{where}.bindings", "needs an exchange to bind the queue to")
    return AmqpSourceConfig(
        name=s.name or f"amqp{i}", host=host, port=port,
        vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        username=unquote(parts.username or "guest"), password=unquote(parts.password or "guest"),
        queue=s.queue, durable=s.durable, exchange=s.exchange, exchange_type=s.exchange_type,
        bindings=bindings, prefetch=s.prefetch, heartbeat_s=s.heartbeat_s,
        reconnect_max_s=s.reconnect_max_s, decode=_decode(f, s, where, separator="."),
        tls=tls)


def _mqtt_source(f: _File, s: schema.MqttSourceFile, i: int, site_id: str) -> MqttSourceConfig:
    where = f"sources[{i}]"
    name = s.name or f"mqtt{i}"
    parts, host, port = _broker_url(f, s.url, where, scheme="mqtt", port=DEFAULT_MQTT_PORT,
                                    shape="mqtt://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise f.error(f"{where}.url", "credentials in an mqtt:// url are not used; set "
                      f"{where}.username and {where}.password instead (and keep the file "
                      "mode 0600)")
    tls = _source_tls(f, s, parts.scheme, where)
    decode = _decode(f, s, where, separator="/")
    if s.topics is None and decode.codec != Codec.SPARKPLUG:
        raise f.error(f"{where}.topics", "required key is missing")
    topics = tuple(s.topics) if s.topics is not None else SPARKPLUG_TOPICS
    if not topics:
        raise f.error(f"{where}.topics", "needs at least one topic filter")
    floor = min(decode.max_payload_bytes + MQTT_PACKET_OVERHEAD, MQTT_MAX_PACKET)
    if s.max_packet_bytes is not None and s.max_packet_bytes < floor:
        raise f.error(f"{where}.max_packet_bytes", f"must be at least {floor} (max_payload_bytes "
                      f"+ {MQTT_PACKET_OVERHEAD} for the topic and headers): a message just "
                      "past max_payload_bytes must still reach the agent to be dead-lettered")
    return MqttSourceConfig(
        max_packet_bytes=s.max_packet_bytes or max(D.MQTT_MAX_PACKET_BYTES, floor),
        name=name, host=host, port=port, topics=topics,
        client_id=s.client_id or f"bridge-{site_id}-{name}",
        session_expiry_s=s.session_expiry_s, receive_maximum=s.receive_maximum,
        keepalive_s=s.keepalive_s, username=s.username, password=s.password, decode=decode,
        tls=tls, interface=s.interface)


def _spool(f: _File, s: schema.SpoolFile) -> SpoolConfig:
    if 0 < s.reserve_bytes < 8 << 20:
        raise f.error("spool.reserve_bytes", "must be 0 (no reserve) or at least 8388608 "
                      "(8 MiB): it must cover a checkpoint of the spool's WAL")
    return SpoolConfig(
        path=f.path(s.path), max_bytes=s.max_bytes, commit_max_messages=s.commit_max_messages,
        commit_max_bytes=s.commit_max_bytes,
        reserve_bytes=s.reserve_bytes, max_age_s=s.max_age_s, backpressure_s=s.backpressure_s,
        full_policy=s.full_policy, priority=tuple((r.topic, r.class_) for r in s.priority),
        dead_letter_payload_bytes=s.dead_letter_payload_bytes,
        dead_letters_max=s.dead_letters_max, dead_letters_max_bytes=s.dead_letters_max_bytes)


def _legs(f: _File, e: schema.EndpointFile, where: str) -> list[EndpointConfig]:
    """One endpoint per leg (``interface`` or ``vlan``, a value or a list), in order, named
    ``<name>/<leg>`` when there are several; one unbound endpoint if it names none."""
    kind = "interface" if e.interface is not None else "vlan"
    value = e.interface if e.interface is not None else e.vlan
    values: list[str | int | None] = list(value) if isinstance(value, list) else [value]
    if not values:
        raise f.error(f"{where}.{kind}", "an empty list binds to nothing; leave the key out "
                      "to use the gateway's routing")
    target = f.hostport(f"{where}.target", e.target, default_port=DEFAULT_INGEST_PORT)
    out = []
    for v in values:
        ep = EndpointConfig(name=e.name, target=target, priority=0,
                            interface=v if isinstance(v, str) else None,
                            vlan=v if isinstance(v, int) else None)
        if len(values) > 1:
            if values.count(v) > 1:
                raise f.error(f"{where}.{kind}", f"leg {ep.leg!r} is listed twice")
            ep = dataclasses.replace(ep, name=f"{e.name}/{ep.leg}")
        out.append(ep)
    return out


def _uplink(f: _File, u: schema.UplinkFile) -> UplinkConfig:
    endpoints = []
    seen: set[str] = set()
    for i, e in enumerate(u.endpoints):
        where = f"uplink.endpoints[{i}]"
        if e.interface and e.vlan:
            raise f.error(f"{where}.vlan", "give either interface or vlan, not both")
        if "/" in e.name:
            raise f.error(f"{where}.name", f"{e.name!r}: '/' separates an endpoint from its "
                          "leg in metrics and logs; choose a name without it")
        for ep in _legs(f, e, where):
            if ep.name in seen:
                raise f.error(f"{where}.name", f"duplicate endpoint name {ep.name!r}")
            seen.add(ep.name)
            endpoints.append(dataclasses.replace(
                ep, priority=i if e.priority is None else e.priority))
    if not endpoints:
        raise f.error("uplink.endpoints", "needs at least one [[uplink.endpoints]] table")
    b = u.breaker
    return UplinkConfig(
        endpoints=tuple(sorted(endpoints, key=lambda e: e.priority)),
        batch_max_readings=u.batch_max_readings, batch_max_bytes=u.batch_max_bytes,
        max_in_flight=u.max_in_flight, deadline_s=u.deadline_s,
        health_interval_s=u.health_interval_s, health_timeout_s=u.health_timeout_s,
        health_timeout_min_s=u.health_timeout_min_s, failback_after_s=u.failback_after_s,
        backoff_max_s=u.backoff_max_s, drain_max_per_s=u.drain_max_per_s,
        refused_retry_s=u.refused_retry_s,
        breaker=BreakerConfig(window_s=b.window_s, error_rate=b.error_rate,
                              min_requests=b.min_requests, open_s=b.open_s,
                              half_open_probes=b.half_open_probes))


@_scrubbed
def load_agent(path: Path) -> AgentConfig:
    a, _ = schema.decode(path, schema.AgentFile)
    f = _File(path)
    if (problem := site_id_problem(a.site_id)) is not None:
        raise f.error("site_id", problem)
    sources: list[SourceConfig] = [
        _mqtt_source(f, s, i, a.site_id) if isinstance(s, schema.MqttSourceFile)
        else _amqp_source(f, s, i) for i, s in enumerate(a.sources)]
    if not sources:
        raise f.error("sources", "needs at least one [[sources]] table")
    names = [s.name for s in sources]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise f.error(f"sources[{i}].name", f"duplicate source name {n!r}")
    config = AgentConfig(file=path, site_id=a.site_id, tls=_tls(f, a.tls),
                         spool=_spool(f, a.spool), sources=tuple(sources),
                         uplink=_uplink(f, a.uplink),
                         metrics_listen=_listen(f, "metrics.listen", a.metrics.listen),
                         log_level=a.log.level, tls_check_s=a.tls.check_s)
    from_env = interpolate.SEEN.get() or {}  # a password from the environment is not in
    secret = next((i for i, s in enumerate(sources) if s.password not in (None, "guest")
                   and s.password not in from_env), None)  # (the file holds it)
    if secret is not None and (problem := exposure(path)):
        # A source is named by its place in the file in every error, as the schema's do.
        raise f.error(f"sources[{secret}]", f"(source {sources[secret].name!r}) holds a "
                      f"password, and {problem}")
    return config


_JETSTREAM_KEYS = ("servers", "stream", "subject_prefix", "replicas", "ack_timeout_s", "cache_mb",
                   "creds",
                   "tls_ca", "tls_cert", "tls_key")


def _nats_access(f: _File, s: schema.StoreFile | schema.ConsumerJetStreamFile,
                 section: str) -> dict[str, Any]:
    """Stream, subject prefix, credentials and TLS files of a JetStream access, checked:
    names NATS accepts, files that exist, secrets that are private."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s.stream):
        raise f.error(f"{section}.stream", f"{s.stream!r}: letters, digits, '_' and '-' only")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", s.subject_prefix):
        raise f.error(f"{section}.subject_prefix",
                      f"{s.subject_prefix!r} is not a NATS subject without wildcards")
    files: dict[str, str | None] = {}
    for key in ("creds", "tls_ca", "tls_cert", "tls_key"):
        value = getattr(s, key)
        p = f.path(value) if value is not None else None
        if p is not None and not p.is_file():
            raise f.error(f"{section}.{key}", f"{p}: no such file")
        if p is not None and key in ("creds", "tls_key") and (problem := exposure(p)):
            raise f.error(f"{section}.{key}",
                          f"{'credentials' if key == 'creds' else 'private key'} {problem}")
        files[key] = str(p) if p is not None else None
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        raise f.error(f"{section}.tls_key", "tls_cert and tls_key go together")
    return {"stream": s.stream, "prefix": s.subject_prefix, **files}


def _jetstream(f: _File, s: schema.StoreFile) -> JetStreamSettings:
    if not s.servers:
        raise f.error("store.servers", 'kind = "jetstream" needs the NATS servers, e.g. '
                      '["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]')
    for i, url in enumerate(s.servers):
        if not NATS_URL.fullmatch(url):
            raise f.error(f"store.servers[{i}]",
                          f"expected nats://HOST:PORT or tls://HOST:PORT, got {url!r}")
    access = _nats_access(f, s, "store")
    return JetStreamSettings(servers=tuple(s.servers), replicas=s.replicas,
                             ack_timeout_s=s.ack_timeout_s, cache_mb=s.cache_mb, **access)


@_scrubbed
def load_ingest(path: Path) -> IngestConfig:
    c, raw = schema.decode(path, schema.IngestFile)
    f = _File(path)
    listen = f.hostport("listen", c.listen, listen=True)
    store = c.store
    given: dict[str, Any] = raw.get("store", {})
    store_path: Path | None = None
    jetstream = None
    if store.kind == StoreKind.SQLITE:
        if store.path is None:
            raise f.error("store.path", "required key is missing")
        other = next((k for k in _JETSTREAM_KEYS if k in given), None)
        if other is not None:
            raise f.error(f"store.{other}", 'applies only to kind = "jetstream"')
        store_path = f.path(store.path)
    else:
        if "path" in given:
            raise f.error("store.path", 'applies only to kind = "sqlite"')
        jetstream = _jetstream(f, store)
    health_listen = _listen(f, "health.listen", c.health.listen)
    health_port = parse_hostport(health_listen, listen=True)[1] if health_listen else 0
    if health_port and health_port == parse_hostport(listen, listen=True)[1]:
        raise f.error("health.listen", "must not share the port of listen "
                      "(the gRPC port is mTLS only; the health port is plaintext)")
    deny_list = f.path(c.revocation.deny_list) if c.revocation.deny_list is not None else None
    if deny_list is not None and not deny_list.is_file():
        raise f.error("revocation.deny_list", f"{deny_list}: no such file (create it empty: "
                      "an empty list revokes nothing)")
    rate = c.rate_limit.readings_per_s
    return IngestConfig(
        file=path, node=c.node, listen=listen, tls=_tls(f, c.tls), store_path=store_path,
        health_listen=health_listen, rate_limit_per_s=rate,
        rate_limit_burst=c.rate_limit.burst if c.rate_limit.burst is not None
        else max(rate, 1.0) * 2,
        metrics_listen=_listen(f, "metrics.listen", c.metrics.listen), log_level=c.log.level,
        max_batch_envelopes=c.limits.max_batch_envelopes,
        max_tombstone_span=c.limits.max_tombstone_span,
        max_epochs_per_site=c.limits.max_epochs_per_site,
        max_gaps_per_stream=c.limits.max_gaps_per_stream,
        max_batch_bytes=c.limits.max_batch_bytes,
        max_in_flight_per_site=c.limits.max_in_flight_per_site,
        admit_target_ms=c.limits.admit_target_ms, admit_wait_ms=c.limits.admit_wait_ms,
        max_in_flight_readings=c.limits.max_in_flight_readings, jetstream=jetstream,
        deny_list=deny_list)


@_scrubbed
def load_consumer(path: Path) -> ConsumerConfig:
    c, _ = schema.decode(path, schema.ConsumerFile)
    f = _File(path)
    for i, t in enumerate(c.from_):
        try:
            if t.startswith(("nats://", "tls://")):  # a JetStream-backed cloud, read directly
                nats_servers(t)
                continue
            parse_hostport(t, default_port=DEFAULT_INGEST_PORT)
        except ValueError as exc:
            raise f.error(f"from[{i}]", str(exc)) from exc
    return ConsumerConfig(targets=tuple(c.from_), tls=_tls(f, c.tls) if c.tls else None,
                          cursor=f.path(c.cursor) if c.cursor is not None else None,
                          jetstream=JetStreamSettings(servers=(),
                                                      **_nats_access(f, c.jetstream,
                                                                     "jetstream")))
