"""Every config default that code outside the schema also needs, declared once.

The schema (``bridge.shared.config.schema``) gives each key its default from here; the model's
dataclasses, and the stages that take the same setting as a keyword (so that tests, tools and
benches can build them without a config file), default to the same names. A default changed
here changes everywhere; docs/configuration.md's defaults are checked against the schema.
"""

from __future__ import annotations

from bridge.shared.kinds import Codec, FullPolicy

# [[sources]]
CODEC = Codec.JSON
MAX_PAYLOAD_BYTES = 1 << 20
DEDUPE_RETRANSMISSIONS = True
MQTT_MAX_PACKET_BYTES = 16 << 20  # the floor of CONNECT's Maximum Packet Size

# [sources.sparkplug]
REBIRTH_INTERVAL_S = 10.0
REBIRTH_MAX_PER_S = 10.0
MAX_EDGE_NODES = 10_000
MAX_DECOMPRESSED_BYTES = 16 << 20

# [spool]
COMMIT_MAX_MESSAGES = 1000
COMMIT_MAX_BYTES = 512 * 1024  # payload bytes per group commit (at least one message)
MAX_AGE_S = 30 * 86400.0
BACKPRESSURE_S = 60.0
FULL_POLICY = FullPolicy.DROP_OLDEST
DEAD_LETTER_PAYLOAD_BYTES = 4096
DEAD_LETTERS_MAX = 10_000
DEAD_LETTERS_MAX_BYTES = 16 << 20

# [uplink] and [tls]
REFUSED_RETRY_S = 60.0
DRAIN_MAX_PER_S = 0.0
TLS_CHECK_S = 5.0

# [store] (JetStream)
STREAM = "BRIDGE"
SUBJECT_PREFIX = "bridge.r"
REPLICAS = 3
ACK_TIMEOUT_S = 5.0
CACHE_MB = 64.0

# [limits]
MAX_BATCH_ENVELOPES = 10_000
MAX_TOMBSTONE_SPAN = 2**40
MAX_EPOCHS_PER_SITE = 256
MAX_GAPS_PER_STREAM = 10_000
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_IN_FLIGHT_PER_SITE = 8
ADMIT_TARGET_MS = 450
ADMIT_WAIT_MS = 100
MAX_IN_FLIGHT_READINGS = 200_000
