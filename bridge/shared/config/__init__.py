"""TOML configuration to frozen dataclasses.

Every error names the file and the key path (``uplink.endpoints[1].target``) and the CLI turns it
into one line and exit status 2. Unknown keys are errors too: a typo in a bound such as
``max_bytes`` must not silently fall back to a default. Relative paths are resolved against the
config file's directory, so a config works whatever the current directory of the service is.
Every key is documented in docs/configuration.md.


The package: ``schema`` (the files' keys, types, bounds and defaults as msgspec Structs,
declared once), ``model`` (the dataclasses the rest of the bridge reads, and value parsers),
``load`` (one loader per file kind: schema, then the checks that span keys).
"""

from __future__ import annotations

from bridge.shared.config.load import load_agent, load_consumer, load_ingest
from bridge.shared.config.model import (
    DEFAULT_AMQP_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_MQTT_PORT,
    NATS_URL,
    SITE_ID_MAX,
    SITE_ID_RE,
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
    SourceTls,
    SparkplugConfig,
    SpoolConfig,
    TlsConfig,
    UplinkConfig,
    nats_servers,
    parse_hostport,
    site_id_problem,
)
from bridge.shared.errors import ConfigError

__all__ = [
    "DEFAULT_AMQP_PORT",
    "DEFAULT_INGEST_PORT",
    "DEFAULT_MQTT_PORT",
    "NATS_URL",
    "SITE_ID_MAX",
    "SITE_ID_RE",
    "SPARKPLUG_TOPICS",
    "AgentConfig",
    "AmqpSourceConfig",
    "BreakerConfig",
    "ConfigError",
    "ConsumerConfig",
    "DecodeConfig",
    "EndpointConfig",
    "IngestConfig",
    "JetStreamSettings",
    "MqttSourceConfig",
    "SourceConfig",
    "SourceTls",
    "SparkplugConfig",
    "SpoolConfig",
    "TlsConfig",
    "UplinkConfig",
    "load_agent",
    "load_consumer",
    "load_ingest",
    "nats_servers",
    "parse_hostport",
    "site_id_problem",
]
