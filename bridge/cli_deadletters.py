"""``bridge dead-letters``: list the spool's dead letters, replay them with the current
config, or purge them (``bridge.edge.redrive`` does the work)."""

from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path
from typing import Any

import orjson

from bridge.shared.config import AgentConfig, load_agent
from bridge.shared.errors import UsageError


def add_parser(sub: Any) -> None:
    dl = sub.add_parser("dead-letters", help="messages the agent could not turn into readings:"
                        " list them, replay them with the current config, or purge them")
    dl.add_argument("action", nargs="?", choices=("list", "replay", "purge"), default="list",
                    help="list (the default; safe beside the agent), replay or purge (both "
                    "with the agent stopped)")
    dl.add_argument("--config", required=True, help="the agent's config (uses spool.path)")
    dl.add_argument("--id", type=int, action="append", default=[],
                    help="replay or purge this dead letter (its #id in the list; repeat)")
    dl.add_argument("--reason", action="append", default=[],
                    help="replay or purge the dead letters with this reason (repeat)")
    dl.add_argument("--older-than-days", type=float,
                    help="purge the dead letters older than this many days")
    dl.add_argument("--all", action="store_true", help="purge every dead letter")
    dl.add_argument("--limit", type=int, default=20,
                    help="newest dead letters to list (default: %(default)s)")
    dl.add_argument("--json", action="store_true", help="JSON lines with the payload in base64")
    dl.set_defaults(fn=cmd_dead_letters)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    cfg = load_agent(Path(args.config))
    if args.action == "replay":
        return _replay(cfg, args)
    if args.action == "purge":
        return _purge(cfg, args)
    if args.id or args.reason or args.older_than_days is not None or args.all:
        raise UsageError("--id, --reason, --older-than-days and --all select letters for "
                         "replay or purge; listing takes --limit")
    from bridge.edge.spool import read_dead_letters

    letters = read_dead_letters(cfg.spool.path, limit=args.limit)
    for row in letters:
        d = row.letter
        doc = {"id": row.id,
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.at_ns / 1e9)),
               "source": d.source, "topic": d.topic, "reason": d.reason, "detail": d.detail,
               "bytes": d.size if d.size is not None else len(d.payload),
               "truncated": d.size is not None and d.size > len(d.payload),
               "attempts": row.attempts}
        if args.json:
            doc["payload_b64"] = base64.b64encode(d.payload).decode()
            print(orjson.dumps(doc).decode())
        else:
            preview = d.payload[:60].decode("utf-8", "backslashreplace")
            tried = f", {row.attempts} replay(s) failed" if row.attempts else ""
            print(f"#{row.id}  {doc['at']}  {d.source:<8} {d.reason:<18} {d.topic}  "
                  f"({doc['bytes']} bytes{tried}) {d.detail}\n    {preview!r}")
    if not letters and not args.json:
        print(f"no dead letters in {cfg.spool.path}")
    return 0


def _replay(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from bridge.edge import redrive
    from bridge.shared.telemetry import setup_logging

    if args.older_than_days is not None or args.all:
        raise UsageError("replay selects with --id and --reason (none: every dead letter)")
    setup_logging(cfg.log_level, component="dead-letters")
    out = redrive.replay(cfg, ids=args.id, reasons=args.reason)
    seqs = "" if out.first_seq is None else f" as seqs {out.first_seq}..{out.last_seq}"
    print(f"replayed {out.replayed}{seqs}; skipped {out.skipped}; still failing "
          f"{sum(out.failed.values())}"
          + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(out.failed.items())) + ")"
             if out.failed else ""))
    return 1 if out.failed else 0


def _purge(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from bridge.edge import redrive
    from bridge.shared.telemetry import setup_logging

    if not (args.id or args.reason or args.older_than_days is not None or args.all):
        raise UsageError("purge needs --id, --reason, --older-than-days or --all")
    setup_logging(cfg.log_level, component="dead-letters")
    n = redrive.purge(cfg, ids=args.id, reasons=args.reason, everything=args.all,
                      older_than_s=None if args.older_than_days is None
                      else args.older_than_days * 86400)
    print(f"purged {n} dead letter(s) from {cfg.spool.path}")
    return 0
