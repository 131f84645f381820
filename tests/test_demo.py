from __future__ import annotations

import json
import subprocess
import sys


def test_the_demo_accounts_for_every_reading_and_reports_json():
    res = subprocess.run([sys.executable, "-m", "bridge", "demo", "--readings", "3000", "--json"],
                         capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    for key in ("published", "committed", "lost", "duplicates", "failovers", "elapsed_s",
                "failover_s"):
        assert key in summary
    assert summary["published"] == summary["committed"] == 3000
    assert (summary["lost"], summary["duplicates"]) == (0, 0)
    assert summary["failovers"] >= 1
    assert "killed the primary" in res.stderr
