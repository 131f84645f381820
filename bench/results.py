"""The results file: a list of rows ``{scenario, system, metric, value, unit}``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SYSTEMS = {"bridge", "mosquitto_bridge", "mosquitto_bridge_durable", "nats", "nats_durable",
           "paho_ceiling", "broker_ceiling", "load_generator", "ingest_sqlite",
           "ingest_js_always_1", "ingest_js_always_3", "ingest_js_default_1",
           "ingest_js_default_3", "no_checkpoint", "ingest_js_default_2"}


@dataclass(frozen=True)
class Row:
    scenario: str
    system: str
    metric: str
    value: float
    unit: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(rows: Any) -> list[str]:
    """Problems with a results document (empty when valid)."""
    if not isinstance(rows, list) or not rows:
        return ["results must be a non-empty list"]
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"scenario", "system", "metric", "value",
                                                      "unit"}:
            problems.append(f"row {i}: keys must be scenario, system, metric, value, unit")
            continue
        if row["system"] not in SYSTEMS:
            problems.append(f"row {i}: unknown system {row['system']!r}")
        value = row["value"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            problems.append(f"row {i}: value must be a finite number")
        for key in ("scenario", "metric", "unit"):
            if not isinstance(row[key], str) or not row[key]:
                problems.append(f"row {i}: {key} must be a non-empty string")
    return problems


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


PEERS = ("bridge", "mosquitto_bridge", "mosquitto_bridge_durable", "nats", "nats_durable")
REQUIRED: dict[str, tuple[str, ...]] = {
    "throughput_json": (*PEERS, "paho_ceiling", "broker_ceiling", "load_generator"),
    "throughput_sparkplug": (*PEERS, "load_generator"),
    "latency": PEERS,
    "failover": ("bridge",),
    "failover_hang": ("bridge",),
    "drain": ("bridge",),
    "memory": ("bridge",),
    "faults_cloud_killed": PEERS,
    "faults_edge_killed": PEERS,
    "ingest_stores": ("ingest_sqlite", "ingest_js_always_1"),
    "replica_restart": ("bridge",),
    "consumer_catchup": ("bridge", "load_generator"),
    "fleet": ("ingest_sqlite", "ingest_js_default_2"),
    "hostile_site": ("bridge",),
    "fleet_recovery": ("bridge", "load_generator"),
    "guarantees": PEERS,  # every system's verify() ran and found its files written
}


def missing(rows: list[dict[str, Any]]) -> list[str]:
    """Scenario/system pairs the suite must produce but a results document lacks."""
    have = {(r["scenario"], r["system"]) for r in rows}
    return [f"{s}/{sys}" for s, systems in REQUIRED.items() for sys in systems
            if (s, sys) not in have]
