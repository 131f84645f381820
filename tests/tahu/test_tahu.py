"""Sparkplug B from a client this project did not write: Eclipse Tahu's JavaScript
``sparkplug-client`` (npm, run with the machine's Node.js; installed by ``make test``),
compressed (DEFLATE, GZIP) and not, through a real mosquitto and the real agent and ingest,
compared value by value with what the client says it published."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.conftest import Cluster, wait_delivered

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / ".venv" / "tahu" / "node_modules"
SCRIPT = Path(__file__).parent / "publish.js"
ROUNDS = 30

SOURCE = ('[[sources]]\nname = "spb"\nurl = "mqtt://127.0.0.1:{port}"\ncodec = "sparkplug"\n'
          '[sources.sparkplug]\nrebirth = false\n')


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None or not (MODULES / "sparkplug-client").is_dir():
        pytest.fail("Eclipse Tahu's sparkplug-client is not installed: run `make test` "
                    "(it runs npm install into .venv/tahu)")
    return node


def _value(v: object) -> object:
    return round(v, 4) if isinstance(v, float) else v


def test_tahu_edge_node_payloads_compressed_or_not_arrive_with_every_value(cluster: Cluster):
    node = _node()
    cluster.ingest("aws")
    agent = cluster.agent(sources=SOURCE.format(port=cluster.broker.port))
    res = subprocess.run([node, str(SCRIPT), str(cluster.broker.port), str(ROUNDS)],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "NODE_PATH": str(MODULES)})
    assert res.returncode == 0, res.stderr
    sent = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert len(sent) == 2 + 2 * ROUNDS
    assert Counter(m["compressed"] for m in sent) == {None: 20, "DEFLATE": 21, "GZIP": 21}

    wait_delivered(cluster, agent, len(sent))
    stream, errors = cluster.consume()
    assert not errors
    got = Counter()
    for c in stream:
        env = c.envelope  # type: ignore[attr-defined]
        for v in env.values:
            kind = v.WhichOneof("kind")
            got[(env.labels["message_type"], env.labels.get("device"), v.signal,
                 _value(getattr(v, kind)))] += 1
        assert "unsupported" not in env.labels
    expected = Counter()
    for m in sent:
        metrics = m["metrics"] + ([["bdSeq", 0]] if m["type"] == "NBIRTH" else [])
        for name, value in metrics:
            expected[(m["type"], m["device"], name, _value(value))] += 1
    assert got == expected
    assert len(stream) == len(sent)
    metrics = agent.metrics()
    assert "bridge_dead_letters_total{" not in metrics, "nothing dead-lettered"
    assert 'kind="seq_gap"' not in metrics
