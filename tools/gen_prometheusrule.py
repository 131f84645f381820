"""Write deploy/kubernetes/monitoring/prometheusrule.yaml from deploy/prometheus/rules.yml.

The rules are written once, as a plain Prometheus rule file that promtool checks and
unit-tests; prometheus-operator users apply the same groups as a PrometheusRule.
Run: python -m tools.gen_prometheusrule (tests/deploy/test_kubernetes.py checks it is current).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
OUT = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
HEADER = ("# Generated from deploy/prometheus/rules.yml by `python -m tools.gen_prometheusrule`;\n"
          "# edit that file and re-run (a test fails while the two differ).\n")


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "bridge", "namespace": "bridge",
                        "labels": {"app.kubernetes.io/part-of": "edge-bridge",
                                   "release": "kube-prometheus-stack"}},
           "spec": {"groups": groups}}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
