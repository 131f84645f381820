"""Randomised crash test: the agent is killed with SIGKILL at random moments under load."""

from __future__ import annotations

import os
import random

from tests.conftest import Cluster, Publisher, wait_delivered, wait_for

CYCLES = 30


def test_thirty_random_kill_nine_restarts_under_load_lose_and_double_nothing(cluster: Cluster):
    seed = int(os.environ.get("BRIDGE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (rerun with BRIDGE_CRASH_SEED={seed})")
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    pub = Publisher(cluster, count=CYCLES * 400, rate=3000)
    for cycle in range(CYCLES):
        # Kill at a random point: some cycles mid-commit, some mid-batch, some right at start.
        target = pub.progress.acked + rng.randrange(0, 600)
        wait_for(lambda t=target: pub.progress.acked >= t or not pub.thread.is_alive(),
                 what=f"cycle {cycle}: publishing to reach {target}")
        agent.proc.kill()
        if rng.random() < 0.3:
            cluster.nodes["aws"].proc.kill()  # sometimes the primary dies with it
            cluster.restart_ingest("aws")
        agent.start()
        agent.wait_subscribed()
    published = pub.join()
    wait_delivered(cluster, agent, published, timeout=120)
    assert cluster.account(published) == (published, 0, 0), f"seed {seed}"
