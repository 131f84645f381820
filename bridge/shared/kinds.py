"""The closed sets of names a config may choose from, as the types the code compares.

The config schema (``bridge.shared.config.schema``) declares its choices with these enums, so a
value the file spells wrong is refused there by name, and the model and the stages receive an
enum member, never a bare string: a misspelt comparison is a type error, not a branch that
never runs. They are ``StrEnum``s: each member equals its spelling in the file, in logs and in
metrics labels.
"""

from __future__ import annotations

from enum import StrEnum


class Codec(StrEnum):
    """How a source's payloads are decoded (``sources[].codec``)."""

    JSON = "json"
    SPARKPLUG = "sparkplug"
    RAW = "raw"


class Protocol(StrEnum):
    """The plant broker's protocol (a source's ``type``)."""

    MQTT = "mqtt"
    AMQP = "amqp"


class ExchangeType(StrEnum):
    """An AMQP exchange's type (``sources[].exchange_type``)."""

    TOPIC = "topic"
    DIRECT = "direct"
    FANOUT = "fanout"
    HEADERS = "headers"


class ReadingClass(StrEnum):
    """A reading's class for the full-spool order (``spool.priority[].class``): telemetry is
    dropped first, alarms last (``rank``)."""

    TELEMETRY = "telemetry"
    EVENT = "event"
    ALARM = "alarm"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {ReadingClass.TELEMETRY: 0, ReadingClass.EVENT: 1, ReadingClass.ALARM: 2}


class FullPolicy(StrEnum):
    """What the intake does once the spool stayed full past ``spool.backpressure_s``."""

    DROP_OLDEST = "drop_oldest"   # force out the oldest telemetry, as a tombstone
    REJECT_NEW = "reject_new"     # dead-letter new messages as spool_full


class StoreKind(StrEnum):
    """Where an ingest node commits (``store.kind``)."""

    SQLITE = "sqlite"
    JETSTREAM = "jetstream"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
