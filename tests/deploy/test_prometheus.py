"""deploy/prometheus/rules.yml: promtool accepts it, and every alert fires and stays quiet
when it should (promtool's own rule unit tests, built from the cases below)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
AGENT = 'job="agent",instance="gw1:9100"'
SITE = {f'bridge_agent_site{{{AGENT},site="site-a"}}': "1x100"}
INGEST = 'job="ingest",instance="10.0.0.7:9102"'

# alert -> (series when it must fire, eval time, labels it fires with) and
#          (series when it must not fire, eval time)
Case = tuple[dict[str, str], str, dict[str, str]]
CASES: dict[str, tuple[Case, tuple[dict[str, str], str]]] = {
    "BridgeBacklogOld": (
        ({**SITE, f"bridge_spool_oldest_age_seconds{{{AGENT}}}": "1000x20"}, "10m",
         {"site": "site-a", "severity": "warning"}),
        ({**SITE, f"bridge_spool_oldest_age_seconds{{{AGENT}}}": "100x20"}, "10m")),
    "BridgeBacklogOldCritical": (
        ({**SITE, f"bridge_spool_oldest_age_seconds{{{AGENT}}}": "30000x20"}, "10m",
         {"site": "site-a", "severity": "critical"}),
        ({**SITE, f"bridge_spool_oldest_age_seconds{{{AGENT}}}": "1000x20"}, "10m")),
    "BridgeBacklogLarge": (
        ({**SITE, f"bridge_spool_readings{{{AGENT}}}": "2000000x30"}, "15m",
         {"site": "site-a", "severity": "warning"}),
        ({**SITE, f"bridge_spool_readings{{{AGENT}}}": "1000x30"}, "15m")),
    "BridgeSpoolNearlyFull": (
        ({**SITE, f"bridge_spool_fill_ratio{{{AGENT}}}": "0.95x10"}, "5m",
         {"site": "site-a", "severity": "critical"}),
        ({**SITE, f"bridge_spool_fill_ratio{{{AGENT}}}": "0.5x10"}, "5m")),
    "BridgeSpoolDropping": (
        ({f'bridge_spool_dropped_total{{{AGENT},reason="ttl"}}': "0 0 0 100 100"}, "4m",
         {"job": "agent", "instance": "gw1:9100", "reason": "ttl", "severity": "critical"}),
        ({f'bridge_spool_dropped_total{{{AGENT},reason="ttl"}}': "0x10"}, "4m")),
    "BridgeDeadLettersRising": (
        ({**SITE, f'bridge_dead_letters_total{{{AGENT},reason="invalid_json"}}': "0+5x40"},
         "30m", {"site": "site-a", "reason": "invalid_json", "severity": "warning"}),
        ({**SITE, f'bridge_dead_letters_total{{{AGENT},reason="invalid_json"}}': "3x40"},
         "30m")),
    "BridgeFailover": (
        ({f'bridge_uplink_failovers_total{{{AGENT},from_endpoint="aws",to_endpoint="azure"}}':
          "0 0 1 1 1"}, "4m",
         {"job": "agent", "instance": "gw1:9100", "from_endpoint": "aws",
          "to_endpoint": "azure", "severity": "info"}),
        ({f'bridge_uplink_failovers_total{{{AGENT},from_endpoint="aws",to_endpoint="azure"}}':
          "0x10"}, "4m")),
    "BridgeFailoverFlapping": (
        ({**SITE, f'bridge_uplink_failovers_total{{{AGENT},from_endpoint="aws",'
                  'to_endpoint="azure"}': "0+1x70"}, "65m",
         {"site": "site-a", "severity": "warning"}),
        ({**SITE, f'bridge_uplink_failovers_total{{{AGENT},from_endpoint="aws",'
                  'to_endpoint="azure"}': "0 1 2 2x70"}, "65m")),
    "BridgeNoHealthyUpstream": (
        ({f'bridge_uplink_endpoint_healthy{{{AGENT},endpoint="aws"}}': "0x10",
          f'bridge_uplink_endpoint_healthy{{{AGENT},endpoint="azure"}}': "0x10"}, "5m",
         {"job": "agent", "instance": "gw1:9100", "severity": "critical"}),
        ({f'bridge_uplink_endpoint_healthy{{{AGENT},endpoint="aws"}}': "0x10",
          f'bridge_uplink_endpoint_healthy{{{AGENT},endpoint="azure"}}': "1x10"}, "5m")),
    "BridgeSourceDown": (
        ({f'bridge_source_up{{{AGENT},source="plant"}}': "0x10"}, "8m",
         {"job": "agent", "instance": "gw1:9100", "source": "plant", "severity": "warning"}),
        ({f'bridge_source_up{{{AGENT},source="plant"}}': "1x10"}, "8m")),
    "BridgeUplinkThrottled": (
        ({f'bridge_uplink_throttled_total{{{AGENT},endpoint="aws"}}': "0+10x30"}, "25m",
         {"job": "agent", "instance": "gw1:9100", "endpoint": "aws", "severity": "warning"}),
        ({f'bridge_uplink_throttled_total{{{AGENT},endpoint="aws"}}': "0x30"}, "25m")),
    "BridgeUplinkRefused": (
        ({f'bridge_uplink_endpoint_refused{{{AGENT},endpoint="aws"}}': "1x10"}, "5m",
         {"job": "agent", "instance": "gw1:9100", "endpoint": "aws", "severity": "critical"}),
        ({f'bridge_uplink_endpoint_refused{{{AGENT},endpoint="aws"}}': "0x10"}, "5m")),
    "BridgeIngestCommitSlow": (
        ({f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="0.1"}}': "0x30",
          f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="1.0"}}': "0+10x30",
          f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="+Inf"}}': "0+10x30"}, "20m",
         {"job": "ingest", "severity": "warning"}),
        ({f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="0.1"}}': "0+10x30",
          f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="1.0"}}': "0+10x30",
          f'bridge_ingest_commit_seconds_bucket{{{INGEST},le="+Inf"}}': "0+10x30"}, "20m")),
    "BridgeIngestStoreErrors": (
        ({f"bridge_ingest_store_errors_total{{{INGEST}}}": "0+1x20"}, "15m",
         {"job": "ingest", "severity": "critical"}),
        ({f"bridge_ingest_store_errors_total{{{INGEST}}}": "0x20"}, "15m")),
    "BridgeIngestThrottling": (
        ({f'bridge_ingest_throttled_total{{{INGEST},site="site-a"}}': "0+1x30"}, "25m",
         {"job": "ingest", "site": "site-a", "severity": "warning"}),
        ({f'bridge_ingest_throttled_total{{{INGEST},site="site-a"}}': "0x30"}, "25m")),
    # The unit tests' clock starts at 0: a last-commit value of N*60 at minute N is "live".
    # The firing case stops committing at 5 m and the series vanishes (all replicas restarted).
    "BridgeSiteSilent": (
        ({f'bridge_ingest_site_last_commit_timestamp_seconds{{{INGEST},site="site-a"}}':
          "0+60x5"}, "30m", {"site": "site-a", "severity": "warning"}),
        ({f'bridge_ingest_site_last_commit_timestamp_seconds{{{INGEST},site="site-a"}}':
          "0+60x40"}, "30m")),
    "BridgeCertificateExpiring": (
        ({f'bridge_cert_expiry_seconds{{{AGENT},cert="client",subject="site-a"}}': "864000x10"},
         "5m", {"job": "agent", "instance": "gw1:9100", "cert": "client", "subject": "site-a",
                "severity": "warning"}),
        ({f'bridge_cert_expiry_seconds{{{AGENT},cert="client",subject="site-a"}}': "2592000x10"},
         "5m")),
    "BridgeCertificateExpired": (
        ({f'bridge_cert_expiry_seconds{{{AGENT},cert="client",subject="site-a"}}': "-5x10"},
         "5m", {"job": "agent", "instance": "gw1:9100", "cert": "client", "subject": "site-a",
                "severity": "critical"}),
        ({f'bridge_cert_expiry_seconds{{{AGENT},cert="client",subject="site-a"}}': "864000x10"},
         "5m")),
    "BridgeCertificateUnreadable": (
        ({f'bridge_cert_unreadable{{{AGENT},cert="ca"}}': "1x10"}, "8m",
         {"job": "agent", "instance": "gw1:9100", "cert": "ca", "severity": "warning"}),
        ({f'bridge_cert_unreadable{{{AGENT},cert="ca"}}': "0x10"}, "8m")),
}


def _alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing (make debs installs Debian's prometheus package)"
    return subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules() -> None:
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_runbook_line_and_a_case_that_fires_and_one_that_does_not() -> None:
    alerts = _alerts()
    assert set(alerts) == set(CASES)
    for name, rule in alerts.items():
        assert rule["annotations"].get("runbook"), name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name


def test_every_alert_fires_and_stays_quiet_as_its_cases_say(tmp_path: Path) -> None:
    alerts = _alerts()
    tests = []
    for name, ((series, at, labels), (quiet, quiet_at)) in CASES.items():
        annotations = alerts[name]["annotations"]
        for inputs, when, expected in ((series, at, [{"exp_labels": labels,
                                                      "exp_annotations": annotations}]),
                                       (quiet, quiet_at, [])):
            tests.append({"interval": "1m",
                          "input_series": [{"series": s, "values": v} for s, v in inputs.items()],
                          "alert_rule_test": [{"eval_time": when, "alertname": name,
                                                "exp_alerts": expected}]})
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    r = _promtool("test", "rules", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_a_broken_expectation_fails_promtool(tmp_path: Path) -> None:
    """The harness can fail: a quiet case expected to fire is reported as a failure."""
    (quiet, at) = CASES["BridgeSourceDown"][1]
    spec = tmp_path / "broken_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "tests": [{
        "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in quiet.items()],
        "alert_rule_test": [{"eval_time": at, "alertname": "BridgeSourceDown",
                              "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]}]}))
    r = _promtool("test", "rules", str(spec))
    assert r.returncode != 0
    assert "FAILED" in r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_names_real_metrics(name: str) -> None:
    """Case series use the metric names the rules read (no typo passing vacuously)."""
    text = RULES.read_text()
    (series, _, _), (quiet, _) = CASES[name]
    for s in (*series, *quiet):
        metric = s.split("{", 1)[0]
        if metric != "bridge_agent_site":
            base = metric.removesuffix("_bucket")
            assert base in text, (name, metric)
