"""A real Prometheus scrapes a running agent and two ingest nodes: every metric the rules and
the dashboard name exists in what it scraped, every rule evaluates, every panel query runs."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit import localrun
from tests.conftest import Cluster, Publisher, blast, idle, publish_raw, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "bridge.json"
TOKEN = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Grafana's variables, as a user with one agent job and the default selections has them.
VARIABLES = {"$__rate_interval": "1m", "$site": ".*", "$agent_job": "agent",
             "$ingest_job": ".*ingest.*"}


def _names(expr: str) -> set[str]:
    """Metric names an expression reads (recording rules' names contain ':')."""
    return {t for t in TOKEN.findall(expr) if ":" not in t
            and t.startswith(("bridge_", "process_"))}


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _panel_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"].removeprefix("label_values(").split(",")[0])
    return out


def _get(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]


def test_the_dashboard_is_a_grafana_model_with_a_query_in_every_panel() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]


PER_SITE_INGEST = ("bridge_ingest_readings_committed", "bridge_ingest_duplicates",
                   "bridge_ingest_throttled", "bridge_ingest_site_")


def test_every_dashboard_query_honours_the_site_and_job_variables() -> None:
    """A query filters by its job variable, and a query of per-site series (every agent
    series, through the bridge_agent_site join; the ingest's series labelled by site) by
    $site; both sides call the label ``site``. (A node's own series have no site.)"""
    doc = json.loads(DASHBOARD.read_text())
    for p in doc["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            assert "site_id" not in expr, (p["title"], expr)
            per_site = "$agent_job" in expr or any(
                m in expr for m in PER_SITE_INGEST) or expr.startswith("site:")
            assert not per_site or '$site"' in expr, (p["title"], expr)
            for m in re.finditer(r"(?<![:\w])(bridge_[a-z_]+)(\{[^}]*\})?(?!:)", expr):
                name, labels = m.group(1), m.group(2) or ""
                if name.startswith("bridge_ingest_"):
                    assert 'job=~"$ingest_job"' in labels, (p["title"], name)
                elif name not in ("bridge_agent_site", "bridge_cert_expiry_seconds"):
                    assert 'job=~"$agent_job"' in labels, (p["title"], name)


def test_prometheus_scrapes_every_metric_the_rules_and_the_dashboard_use(
        cluster: Cluster, tmp_path: Path) -> None:
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing (make debs installs Debian's prometheus package)"
    ports: dict[str, int] = {}
    for node, extra in (("aws", "[rate_limit]\nreadings_per_s = 100\nburst = 20\n"),
                        ("azure", "")):
        ports[node] = localrun.free_port()  # one at a time: a free port is free until bound
        cluster.ingest(node, extra=extra + f'[metrics]\nlisten = "127.0.0.1:{ports[node]}"\n')
    agent = cluster.agent()
    published = Publisher(cluster, count=400, rate=0).join()
    # The first batch may pass on credit (a bucket can go into debt); once it is acked, the
    # bucket is ~380 readings short and refills at 100/s, so the next batch is throttled.
    wait_for(lambda: idle(agent, published), timeout=60, what="the first readings sent")
    published += blast(cluster.broker.port, prefix="plant/second", count=100)
    publish_raw(cluster.broker.port, [("plant/bad", b"{not json")])

    prom_port = localrun.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "agent",
             "static_configs": [{"targets": [f"127.0.0.1:{agent.http_port}"]}]},
            {"job_name": "bridge-ingest",
             "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports.values()]}]}]}))
    prom = localrun.Proc(name="prometheus", log=tmp_path / "prometheus.log", argv=[
        exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]).start()
    try:
        localrun.wait_port(prom_port, timeout=30)
        wanted = set().union(*map(_names, _rule_exprs() + _panel_exprs()))
        wanted = {n.removesuffix("_bucket") + ("_bucket" if n.endswith("_bucket") else "")
                  for n in wanted}

        def scraped() -> set[str]:
            try:
                return set(_get(prom_port, "/api/v1/label/__name__/values"))
            except OSError:
                return set()

        def committed() -> float:
            got = _get(prom_port, "/api/v1/query",
                       query='sum(bridge_ingest_readings_committed_total{site="site-a"})')
            return float(got["result"][0]["value"][1]) if got["result"] else 0.0

        def health() -> list[str]:
            try:  # 503 until the TSDB is open: not up yet
                targets = _get(prom_port, "/api/v1/targets")["activeTargets"]
            except OSError:
                return []
            return sorted(t["health"] for t in targets)

        wait_for(lambda: health() == ["up", "up", "up"], timeout=30, what="three targets up")
        wait_for(lambda: wanted <= scraped() and committed() >= published, timeout=90,
                 what="Prometheus to scrape every metric the rules and dashboard name")

        throttled = _get(prom_port, "/api/v1/query",
                         query='bridge_ingest_throttled_total{site="site-a"}')["result"]
        assert any(float(r["value"][1]) > 0 for r in throttled), "the throttle was exercised"

        def evaluated() -> list[dict[str, Any]]:
            rules = [r for g in _get(prom_port, "/api/v1/rules")["groups"] for r in g["rules"]]
            return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules) \
                else []

        wait_for(lambda: bool(evaluated()), timeout=30, what="every rule evaluated once")
        bad = [(r["name"], r.get("lastError")) for r in evaluated() if r["health"] != "ok"]
        assert not bad
        for panel_expr in _panel_exprs():
            query = panel_expr
            for var, value in VARIABLES.items():
                query = query.replace(var, value)
            res = _get(prom_port, "/api/v1/query", query=query)
            assert res["resultType"] in {"vector", "scalar", "matrix"}, query
        # The per-site recording rules see the site through the agent's site series.
        # The recording group runs every 30 s: its first run may precede the agent's first
        # scrape, so wait for a run that saw it.
        def sites() -> list[str]:
            res = _get(prom_port, "/api/v1/query", query="site:bridge_spool_readings:max")
            return [r["metric"]["site"] for r in res["result"]]

        wait_for(lambda: sites() == ["site-a"], timeout=90,
                 what="the per-site recording rule to name site-a")
    finally:
        prom.stop()
        agent.proc.stop()


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_metrics_docs_list_every_metric_the_deploy_files_use(source: str) -> None:
    docs = (DEPLOY.parent / "docs" / "metrics.md").read_text()
    exprs = _rule_exprs() if source == "rules" else _panel_exprs()
    for name in set().union(*map(_names, exprs)):
        base = re.sub(r"_(bucket|total)$", "", name)
        if not name.startswith("process_"):
            assert f"`{base}" in docs, name
