"""``python -m hil``: probe the kernel, list or run scenarios, write docs/hil.md."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path
from typing import Any

import orjson

from hil.kernel import probe
from hil.scenarios import SCENARIOS, Result, run

DOC = Path(__file__).resolve().parent.parent / "docs" / "hil.md"


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "hil.json"


def _record(r: Result, command: str, caps: list[str]) -> dict[str, object]:
    a = r.accounting
    return {"ok": r.ok, "lines": r.lines(), "timings": r.timings,
            "accounting": None if a is None else [a.published, a.committed_once, a.lost,
                                                   a.doubled],
            "measured": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC", "command": command,
            "host": f"{platform.node()} (kernel {platform.release()})", "kernel": caps}


def _table(results: dict[str, dict[str, Any]]) -> str:
    """The docs table from every scenario's latest stored result, in SCENARIOS order."""
    rows, details, notes = [], [], set()
    for name in SCENARIOS:
        rec = results.get(name)
        if rec is None:
            rows.append(f"| {name} | not run | - | - | - | - | |")
            continue
        acct = " | ".join(str(v) for v in rec["accounting"]) if rec["accounting"] \
            else "- | - | - | -"
        times = "; ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in rec["timings"].items()
                          if k != "site_up_s")
        rows.append(f"| {name} | {'pass' if rec['ok'] else 'FAIL'} | {acct} | {times} |")
        details += ["", f"### {name}", "",
                    f"Measured {rec['measured']} on {rec['host']} with `{rec['command']}`.",
                    "", "```", *rec["lines"], "```"]
        notes.update(rec["kernel"])
    return "\n".join([
        "| scenario | result | published | committed once | lost | doubled "
        "| seconds (and rates, by name) |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "Kernel features found by the runs:", "", *[f"- {c}" for c in sorted(notes)],
        *details, ""])


def _write_doc(results: dict[str, dict[str, Any]]) -> None:
    text = DOC.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{start}\n{_table(results)}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hil", description="The site in network "
                                "namespaces: build it, break it, account for every reading.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="what this kernel offers the testbed")
    sub.add_parser("list", help="the scenarios")
    r = sub.add_parser("run", help="run one scenario, or all")
    r.add_argument("scenario", choices=[*SCENARIOS, "all"])
    r.add_argument("--quick", action="store_true", help="the smaller size make test runs")
    r.add_argument("--write", action="store_true", help="store the results in "
                   "docs/hil.json and render the table in docs/hil.md")
    args = p.parse_args(argv)
    caps = probe()
    if args.cmd == "probe":
        print("\n".join(caps.lines()))
        return 0 if caps.has("netns") and caps.has("veth") else 1
    if args.cmd == "list":
        for name, (fn, _, _) in SCENARIOS.items():
            print(f"{name}: {(fn.__doc__ or '').split(chr(10))[0]}")
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    for name in names:
        print(f"running {name} ({'quick' if args.quick else 'full'}) ...", flush=True)
        res = run(name, quick=args.quick, caps=caps)
        print("\n".join(res.lines()), flush=True)
        results.append(res)
    if args.write:
        cmd = "python -m hil run " + args.scenario + (" --quick" if args.quick else "")
        stored = orjson.loads(RESULTS.read_bytes()) if RESULTS.exists() else {}
        for res in results:
            stored[res.scenario] = _record(res, cmd, caps.lines())
        RESULTS.write_bytes(orjson.dumps(stored, option=orjson.OPT_INDENT_2) + b"\n")
        _write_doc(stored)
        print(f"wrote {RESULTS} and {DOC}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
