"""PNG plots for docs/benchmarks.md, drawn from the same rows as the tables."""

from __future__ import annotations

from pathlib import Path

from bench.results import Row


def draw(rows: list[Row], where: Path) -> list[str]:
    """Write the plots into ``where``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    out: list[str] = []

    def bars(name: str, title: str, unit: str, series: dict[str, dict[str, float]],
             log: bool = False) -> None:
        systems = list(dict.fromkeys(s for values in series.values() for s in values))
        if not systems:
            return
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + i * width for j in range(len(systems))]
            ax.bar(xs, [values.get(s, 0.0) for s in systems], width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(systems))])
        ax.set_xticklabels(systems, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(where / name)
        plt.close(fig)
        out.append(name)

    def pick(scenario: str, metric: str) -> dict[str, float]:
        return {r.system: r.value for r in rows if r.scenario == scenario and r.metric == metric}

    bars("throughput_json.png", "throughput_json: QoS 1 JSON readings committed on the cloud side",
         "msgs/s", {"msgs/s": pick("throughput_json", "msgs_per_s")})
    bars("latency_5k.png", "latency at 5k msgs/s offered, publish to commit", "ms (log)",
         {m: pick("latency", f"{m}_5k") for m in ("p50_ms", "p99_ms", "p999_ms")}, log=True)
    bars("faults.png", "readings lost (acknowledged, never committed)", "readings",
         {k: pick(f"faults_{k}", "lost") for k in ("cloud_killed", "edge_killed")})
    return out
