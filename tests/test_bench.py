from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.results import validate


def test_the_quick_benchmark_suite_runs_and_its_results_validate(tmp_path: Path):
    out, report = tmp_path / "results.json", tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out),
                          "--report", str(report)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert validate(rows) == []
    assert {(r["scenario"], r["metric"]) for r in rows} >= {("failover", "p95_s"),
                                                             ("failover_hang", "p95_s")}
    assert "| failover | bridge | p95_s |" in report.read_text()


def test_the_results_validator_rejects_malformed_rows():
    assert validate([]) != []
    assert validate([{"scenario": "x", "system": "bridge", "metric": "m", "value": "1",
                      "unit": "s"}]) != []
    assert validate([{"scenario": "x", "system": "other", "metric": "m", "value": 1,
                      "unit": "s"}]) != []
    assert validate([{"scenario": "x", "system": "bridge", "metric": "m", "value": 1.5,
                      "unit": "s"}]) == []
