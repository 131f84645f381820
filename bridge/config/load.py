"""The loaders: a file's tables, read through ``table._Table``, into the ``model`` dataclasses,
with the checks that span keys (duplicates, combinations, files that must exist)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from bridge.codecs import CODECS, JsonMapping
from bridge.config.model import (
    DEFAULT_AMQP_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MQTT_PORT,
    NATS_URL,
    SPARKPLUG_TOPICS,
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
    SparkplugConfig,
    SpoolConfig,
    TlsConfig,
    UplinkConfig,
    nats_servers,
    parse_hostport,
    valid_site_id,
)
from bridge.config.table import _REQUIRED, _hostport, _read, _Table
from bridge.errors import ConfigError, MappingError
from bridge.files import exposure


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
