"""``python -m hil``: probe the kernel, list or run scenarios, write docs/hil.md."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

from hil.kernel import probe
from hil.scenarios import SCENARIOS, Result, run

DOC = Path(__file__).resolve().parent.parent / "docs" / "hil.md"


def _table(results: list[Result], command: str, caps: list[str]) -> str:
    rows = []
    for r in results:
        a = r.accounting
        acct = (f"{a.published} | {a.committed_once} | {a.lost} | {a.doubled}" if a
                else "- | - | - | -")
        times = "; ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r.timings.items()
                          if k != "site_up_s")
        rows.append(f"| {r.scenario} | {'pass' if r.ok else 'FAIL'} | {acct} | {times} |")
    details = []
    for r in results:
        details += ["", f"### {r.scenario}", "", "```", *r.lines(), "```"]
    return "\n".join([
        "| scenario | result | published | committed once | lost | doubled | seconds |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"(kernel {platform.release()}) with `{command}`. Kernel features found:",
        "", *[f"- {c}" for c in caps], *details, ""])


def _write_doc(table: str) -> None:
    text = DOC.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hil", description="The site in network "
                                "namespaces: build it, break it, account for every reading.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="what this kernel offers the testbed")
    sub.add_parser("list", help="the scenarios")
    r = sub.add_parser("run", help="run one scenario, or all")
    r.add_argument("scenario", choices=[*SCENARIOS, "all"])
    r.add_argument("--quick", action="store_true", help="the smaller size make test runs")
    r.add_argument("--write", action="store_true", help="put the table into docs/hil.md")
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
        _write_doc(_table(results, cmd, caps.lines()))
        print(f"wrote {DOC}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
