"""Dead letters re-driven (bridge.edge.redrive, ``bridge dead-letters replay|purge``): with a real
agent, broker and ingest, a letter that decodes under a corrected config becomes a reading
with a fresh seq and reaches the cloud; what still fails keeps its row with its new reason
and a counted attempt; neither command runs beside a live agent."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson

from bridge.edge.redrive import open_spool, purge, replay
from bridge.edge.spool import DeadLetter
from bridge.shared.config import load_agent
from devkit import localrun
from tests.conftest import Cluster, publish_raw, wait_delivered, wait_for

BIG = b'{"value": ' + b"1" * 200 + b"}"  # 210 bytes: past a 64-byte bound, valid JSON


def run_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def source(port: int, max_payload: int) -> str:
    return (f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{port}"\ntopics = ["#"]\n'
            f"max_payload_bytes = {max_payload}\n")


def letters(config: Path) -> list[dict[str, object]]:
    res = run_bridge("dead-letters", "--config", str(config), "--json", "--limit", "100")
    assert res.returncode == 0, res.stderr
    return [orjson.loads(x) for x in res.stdout.splitlines()]


def test_a_replay_with_a_corrected_config_delivers_and_keeps_what_still_fails(
        cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=source(cluster.broker.port, 64))
    publish_raw(cluster.broker.port, [("plant/a", b'{"value": 1}'), ("plant/big", BIG),
                                      ("plant/bad", b"not json"), ("plant/b", b'{"value": 2}')])
    wait_for(lambda: len(letters(agent.config)) == 2, what="two dead letters")
    wait_delivered(cluster, agent, 2)
    # Beside the live agent, replay and purge refuse and change nothing.
    res = run_bridge("dead-letters", "replay", "--config", str(agent.config))
    assert res.returncode == 2 and "in use by another process" in res.stderr, res.stderr
    res = run_bridge("dead-letters", "purge", "--all", "--config", str(agent.config))
    assert res.returncode == 2 and "in use by another process" in res.stderr
    assert len(letters(agent.config)) == 2
    agent.proc.stop()

    # The operator raises the bound; the oversize letter now decodes, the garbage does not.
    text = agent.config.read_text().replace("max_payload_bytes = 64",
                                            "max_payload_bytes = 4096")
    agent.config.write_text(text)
    res = run_bridge("dead-letters", "replay", "--config", str(agent.config))
    assert res.returncode == 1, res.stderr  # something still fails
    assert "replayed 1 as seqs 3..3; skipped 0; still failing 1 (1 invalid_json)" in res.stdout
    event = orjson.loads(res.stderr.strip().splitlines()[-1])
    assert event["event"] == "dead_letters.replayed" and event["replayed"] == 1
    (kept,) = letters(agent.config)
    assert kept["topic"] == "plant/bad" and kept["attempts"] == 1
    assert kept["reason"] == "invalid_json"

    agent.start()
    agent.wait_subscribed()
    wait_delivered(cluster, agent, 3)
    stream, errors = cluster.consume()
    assert not errors
    assert [(c.envelope.seq, c.envelope.source.topic) for c in stream] == [  # type: ignore
        (1, "plant/a"), (2, "plant/b"), (3, "plant/big")]
    assert "bridge_dead_letters_replayed_total 1.0" in agent.metrics()
    agent.proc.stop()

    res = run_bridge("dead-letters", "purge", "--config", str(agent.config))
    assert res.returncode == 2 and "needs --id, --reason" in res.stderr
    res = run_bridge("dead-letters", "purge", "--reason", "invalid_json", "--config",
                     str(agent.config))
    assert res.returncode == 0 and "purged 1 dead letter(s)" in res.stdout, res.stderr
    assert letters(agent.config) == []


def test_replay_keeps_truncated_and_unknown_source_letters_and_counts_each_attempt(
        tmp_path: Path, pkis: localrun.Pki):
    cfg_path = tmp_path / "agent.toml"
    tls = pkis.site("site-a")
    cfg_path.write_text(
        f'site_id = "site-a"\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
        f'[spool]\npath = "spool.db"\ndead_letter_payload_bytes = 16\n'
        + source(1883, 4096)
        + '[uplink]\n[[uplink.endpoints]]\nname = "aws"\ntarget = "127.0.0.1:6443"\n')
    config = load_agent(cfg_path)
    spool = open_spool(config)
    spool.commit([], [DeadLetter("plant", "t/cut", b'{"value": 12345678901234}', "oversize", ""),
                      DeadLetter("gone", "t/x", b'{"value": 1}', "invalid_json", ""),
                      DeadLetter("plant", "t/ok", b'{"value": 7}', "oversize", "")])
    spool.close()
    for attempt in (1, 2):
        out = replay(config, ids=[1, 2])  # the third is not selected
        assert out.replayed == 0 and dict(out.failed) == {"truncated": 1, "unknown_source": 1}
        db = sqlite3.connect(tmp_path / "spool.db")
        rows = db.execute("SELECT id, reason, attempts, last_attempt_ns IS NOT NULL "
                          "FROM dead_letters ORDER BY id").fetchall()
        db.close()
        assert rows == [(1, "truncated", attempt, 1), (2, "unknown_source", attempt, 1),
                        (3, "oversize", 0, 0)]
    assert replay(config, reasons=["oversize"]).replayed == 1  # only the third: truncated
    assert purge(config, older_than_s=3600) == 0                # none is that old
    assert purge(config, everything=True) == 2
    spool = open_spool(config)
    try:
        assert spool.dead_counter("dead_replayed") == 1 and spool.dead_counter("dead_purged") == 2
        assert spool.readings == 1 and spool.dead_bytes == 0
    finally:
        spool.close()
