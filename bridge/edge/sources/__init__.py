"""Plant broker connections: MQTT (paho-mqtt) and AMQP 0-9-1 (aiormq)."""

from __future__ import annotations

from bridge.edge.sources.base import Message, Source
from bridge.edge.sources.mqtt import MqttSource
from bridge.shared.config import AmqpSourceConfig, SourceConfig
from bridge.shared.telemetry import AgentMetrics


def make_source(config: SourceConfig, metrics: AgentMetrics) -> Source:
    if isinstance(config, AmqpSourceConfig):
        # aiormq (~3.6 MB of RSS) is loaded only by an agent that has an AMQP source.
        from bridge.edge.sources.amqp import AmqpSource

        return AmqpSource(config=config, metrics=metrics)
    return MqttSource(config=config, metrics=metrics)


__all__ = ["Message", "MqttSource", "Source", "make_source"]
