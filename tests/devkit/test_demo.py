from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devkit import localrun

ROOT = Path(__file__).resolve().parents[2]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devkit", "demo", "--json", *args],
                          capture_output=True, text=True, timeout=240, check=False, cwd=ROOT)


def test_the_demo_accounts_for_every_reading_and_reports_json():
    res = demo("--readings", "3000")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    for key in ("published", "committed", "lost", "duplicates", "failovers", "elapsed_s",
                "failover_s"):
        assert key in summary
    assert summary["published"] == summary["committed"] == 3000
    assert (summary["lost"], summary["duplicates"]) == (0, 0)
    assert summary["failovers"] >= 1
    assert "killed the primary" in res.stderr


@pytest.mark.usefixtures("rabbit_server")
def test_the_demo_runs_from_rabbitmq():
    res = demo("--readings", "3000", "--source", "amqp")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["published"] == summary["committed"] == 3000
    assert (summary["lost"], summary["duplicates"]) == (0, 0)
    assert "RabbitMQ exchange bridge-demo-" in res.stderr


def test_the_demo_runs_on_three_jetstream_clusters():
    res = demo("--readings", "3000", "--store", "jetstream")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["published"] == summary["committed"] == 3000
    assert (summary["lost"], summary["duplicates"]) == (0, 0)
    assert summary["failovers"] >= 1
    assert "JetStream clusters aws :" in res.stderr


def test_the_demo_counts_every_sparkplug_metric_value():
    res = demo("--readings", "5000", "--payload", "sparkplug")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    # 500 messages of 10 values, less the births' different shapes: the simulator's own count.
    assert summary["published"] == summary["committed"] > 4900
    assert (summary["lost"], summary["duplicates"]) == (0, 0)


def test_sparkplug_over_amqp_is_refused_before_anything_starts():
    res = demo("--source", "amqp", "--payload", "sparkplug")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: Sparkplug B is an MQTT protocol: use --source mqtt "
                                  "with --payload sparkplug")


def test_simulate_names_a_broker_it_cannot_reach_without_a_traceback():
    res = subprocess.run([sys.executable, "-m", "devkit", "simulate", "--broker", f"mqtt://127.0.0.1:{localrun.free_port()}",
                          "--site", "x", "--count", "1"], capture_output=True, text=True,
                         timeout=60, check=False, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr.startswith("error: cannot publish to mqtt://127.0.0.1:")
    assert "Traceback" not in res.stderr
