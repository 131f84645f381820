"""The AMQP source against the machine's RabbitMQ: faults mid-stream, exact accounting."""

from __future__ import annotations

from devkit.localrun import RabbitMQ as Rabbit
from tests.conftest import Cluster, Publisher, wait_delivered, wait_for

SOURCE_NAME = "bridge plant"  # the connection name the agent gives RabbitMQ


def test_readings_from_rabbitmq_arrive_exactly_once_through_a_killed_connection(
        cluster: Cluster, rabbit: Rabbit):
    cluster.ingest("aws")
    agent = cluster.agent(sources=rabbit.source_toml())
    pub = Publisher(cluster, count=6000, rate=2000, amqp=rabbit)
    wait_for(lambda: agent.status()["committed_messages"] >= 1500, what="1500 committed")
    assert rabbit.close_connections(SOURCE_NAME) == 1
    wait_for(lambda: len(rabbit.connections(SOURCE_NAME)) == 1, timeout=30,
             what="the agent to reconnect")
    published = pub.join()
    wait_delivered(cluster, agent, published)
    assert cluster.account(published) == (published, 0, 0)
    metrics = agent.metrics()
    assert 'bridge_source_connects_total{session_present="false",source="plant"} 2.0' in metrics
    assert 'bridge_source_connection_failures_total{kind="lost",source="plant"} 1.0' in metrics


def test_a_rabbitmq_restart_mid_stream_loses_and_doubles_nothing(cluster: Cluster,
                                                                 rabbit: Rabbit):
    # A small spool and no cloud: the agent fills its spool and then holds a full prefetch
    # window of delivered, unacked messages when RabbitMQ restarts. Those come back flagged
    # redelivered on the new connection while the old copies are still waiting to commit.
    cluster.ingest("aws")
    cluster.nodes["aws"].proc.stop()
    agent = cluster.agent(sources=rabbit.source_toml(),
                          spool_extra="max_bytes = 1048576\nbackpressure_s = 3600\n")
    published = Publisher(cluster, count=15_000, rate=0, amqp=rabbit).join()
    wait_for(lambda: "bridge_spool_full_total 0.0" not in agent.metrics(),
             what="the spool to push back")
    rabbit.restart_app()
    wait_for(lambda: len(rabbit.connections(SOURCE_NAME)) == 1, timeout=30,
             what="the agent to reconnect")
    cluster.restart_ingest("aws")
    wait_delivered(cluster, agent, published, timeout=120)
    assert cluster.account(published) == (published, 0, 0)
    skipped = [line for line in agent.metrics().splitlines()
               if line.startswith('bridge_source_redeliveries_skipped_total{source="plant"}')]
    assert skipped and float(skipped[0].split()[-1]) > 0, skipped
