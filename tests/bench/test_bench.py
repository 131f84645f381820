from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import PEERS, missing, validate


@pytest.mark.timeout(720)  # the whole quick suite: about 6.5 minutes on this machine
def test_the_quick_benchmark_suite_runs_and_its_results_validate(tmp_path: Path):
    out, report = tmp_path / "results.json", tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out),
                          "--report", str(report)], capture_output=True, text=True,
                         timeout=660, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert validate(rows) == []
    assert missing(rows) == [], "every scenario with every peer"
    text = report.read_text()
    for scenario in ("throughput_json", "latency", "faults_cloud_killed", "drain", "memory",
                     "replica_restart", "fleet", "fleet_recovery", "hostile_site",
                     "consumer_catchup"):
        assert f"### {scenario}" in text
    assert "| throughput_json | msgs_per_s | >= 25,000 |" in text
    # Every system's guarantee was checked in every scenario it ran in, not assumed.
    checked = {(r["system"], r["metric"].partition(".")[0]) for r in rows
               if r["scenario"] == "guarantees"}
    for system in PEERS:
        for scenario in ("throughput_json", "throughput_sparkplug", "latency",
                         "faults_cloud_killed", "faults_edge_killed"):
            assert (system, scenario) in checked, f"{system} unchecked in {scenario}"
    sync = {(r["system"], r["metric"].rpartition(".")[2]): r["value"] for r in rows
            if r["scenario"] == "guarantees" and r["metric"].endswith("sync_always")}
    assert sync[("nats_durable", "cloud_sync_always")] == 1
    assert sync[("nats", "cloud_sync_always")] == 0
    assert "## Guarantees" in text and "mosquitto_bridge<br>*snapshot/1 s*" in text
    cpu = {(r["scenario"], r["system"], r["metric"]): r["value"] for r in rows}
    for system in (*PEERS, "paho_ceiling"):
        assert cpu[("throughput_json", system, "cpu_s_per_M")] > 0
    assert cpu[("throughput_json", "bridge", "client_cpu_s_per_M")] > 0
    assert cpu[("throughput_json", "paho_ceiling", "client_cpu_s_per_M")] > 0
    for png in ("throughput_json.png", "latency_5k.png", "faults.png"):
        assert (tmp_path / "bench" / png).read_bytes()[:4] == b"\x89PNG"


def test_the_results_validator_rejects_malformed_rows():
    assert validate([]) != []
    assert validate([{"scenario": "x", "system": "bridge", "metric": "m", "value": "1",
                      "unit": "s"}]) != []
    assert validate([{"scenario": "x", "system": "other", "metric": "m", "value": 1,
                      "unit": "s"}]) != []
    assert validate([{"scenario": "x", "system": "bridge", "metric": "m", "value": 1.5,
                      "unit": "s"}]) == []


def test_the_report_can_be_redrawn_from_a_results_file_alone(tmp_path: Path):
    rows = [{"scenario": "throughput_json", "system": s, "metric": "msgs_per_s", "value": v,
             "unit": "msgs/s"} for s, v in (("bridge", 1000), ("nats", 4000))]
    out, report = tmp_path / "results.json", tmp_path / "benchmarks.md"
    out.write_text(json.dumps(rows))
    res = subprocess.run([sys.executable, "-m", "bench", "--render", "--out", str(out),
                          "--report", str(report)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = report.read_text()
    row = "| throughput_json | msgs_per_s | >= 25,000 | 1,000 msgs/s | **no** | nats 0.25 |"
    assert row in text
    assert (tmp_path / "bench" / "throughput_json.png").exists()


def test_the_trace_prints_a_line_a_second_and_the_total():
    res = subprocess.run([sys.executable, "-m", "bench.trace", "--count", "3000", "--procs",
                          "2"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[-1].startswith("3,000 readings in ")
    assert all("committed/s" in line and "RSS anon" in line for line in lines[:-1])
    assert len(lines) >= 2


def test_the_stage_breakdown_splits_every_reading_and_measures_the_idle_floor():
    res = subprocess.run([sys.executable, "-m", "bench.stages", "--rate", "200", "--seconds",
                          "2", "--calls", "50"], capture_output=True, text=True, timeout=180,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert out.startswith("400 readings at 200/s"), out
    for stage in ("publish -> intake", "intake -> ingest commit", "publish -> ingest commit",
                  "agent's call (uplink)", "ingest's handler"):
        assert f"  {stage}" in out, stage
    floor = [line for line in out.splitlines()
             if line.lstrip().startswith(("health check", "PushBatch, 1 reading"))]
    assert len(floor) == 2 and all("(n=50), ingest CPU" in line for line in floor), out


def test_the_fleet_bare_baseline_the_sparkplug_rate_and_decode_costs_run_on_their_own():
    """The standalone measurements docs/deployment.md and docs/performance.md quote."""
    res = subprocess.run([sys.executable, "-m", "bench.fleet", "--sites", "20", "--seconds",
                          "1", "--bare", "--only", "ingest_sqlite"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "grpc_bare: 20 sites" in res.stdout and "0 calls failed" in res.stdout, res.stdout
    assert "ingest_sqlite: 20 sites" in res.stdout, res.stdout
    res = subprocess.run([sys.executable, "-m", "bench.throughput", "--sparkplug", "200"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bridge: 200 messages" in res.stdout, res.stdout
    res = subprocess.run([sys.executable, "-m", "bench.decode", "--n", "20"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line.split()[0] for line in res.stdout.splitlines()] == [
        "parse", "decode", "check_wire", "envelope", "seal", "envelope"], res.stdout
