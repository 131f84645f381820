"""The ``bridge`` command. User mistakes end as one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bridge import __version__, cli_deadletters
from bridge.shared.certinfo import ROLE_CONSUMER, ROLE_SITE
from bridge.shared.config import (
    DEFAULT_INGEST_PORT,
    JetStreamSettings,
    TlsConfig,
    load_agent,
    load_consumer,
    load_ingest,
    nats_servers,
    parse_hostport,
)
from bridge.shared.errors import ConfigError, StoreUnavailable, UsageError, UserError
from bridge.shared.kinds import Protocol

EXIT_USAGE = 2


if TYPE_CHECKING:
    from bridge.shared import pki

# Imported by the commands that use them: cryptography (pki) and aiormq cost the long-running
# agent about 11 MB of RSS it never needs (measured with VmRSS before and after each import).


def _print_issued(what: str, issued: pki.Issued) -> None:
    print(f"{what}: {issued.subject}")
    print(f"  certificate {issued.cert_path}")
    if issued.key_path is not None:
        print(f"  key         {issued.key_path} (mode 0600)")
    print(f"  expires     {issued.not_after:%Y-%m-%d %H:%M:%S} UTC")


def cmd_pki(args: argparse.Namespace) -> int:
    from bridge.shared import pki

    if args.pki_cmd == "revoke":
        if not args.cert and not args.serial:
            raise UsageError("pki revoke: name a certificate (CERT.pem) or --serial")
        lines = pki.revoke(Path(args.deny_list), [Path(c) for c in args.cert],
                           serials=args.serial)
        for line in lines:
            print(line)
        print(f"appended to {args.deny_list}; ingest nodes reading it refuse these within a "
              "second")
        return 0
    if args.pki_cmd == "csr":
        csr, key = pki.site_csr(Path(args.out), site_id=args.site, force=args.force)
        print(f"request {csr} (send it to the CA host: bridge pki sign --csr ...)")
        print(f"  key     {key} (mode 0600; stays on this gateway)")
        return 0
    ca_dir = Path(args.dir)
    out = Path(args.out) if getattr(args, "out", None) else ca_dir
    if args.pki_cmd == "sign":
        _print_issued("site", pki.sign_site(ca_dir, Path(args.csr), out, site_id=args.site,
                                            days=args.days, force=args.force))
        return 0
    if args.pki_cmd == "ca":
        _print_issued("CA", pki.create_ca(ca_dir, name=args.name, days=args.days,
                                          force=args.force))
    elif args.pki_cmd == "server":
        _print_issued("server", pki.issue_server(ca_dir, out, name=args.name, dns=args.dns,
                                                 ips=args.ip, days=args.days, force=args.force))
    elif args.pki_cmd == "site":
        _print_issued("site", pki.issue_site(ca_dir, out, site_id=args.site, days=args.days,
                                             force=args.force))
    else:
        _print_issued("consumer", pki.issue_consumer(ca_dir, out, name=args.name,
                                                     days=args.days, force=args.force))
    return 0


# gRPC core's own log lines (``I1207 ... ssl_transport_security.cc:2563] Handshake failed``)
# are not JSON: only at log.level "debug" do its informational lines reach standard error;
# otherwise only its errors. gRPC reads GRPC_VERBOSITY once, when it is first imported, so a
# reload cannot change it; an operator's own GRPC_VERBOSITY is kept.
_GRPC_VERBOSITY = {"debug": "INFO", "info": "ERROR", "warning": "ERROR", "error": "ERROR"}


def _grpc_verbosity(level: str) -> None:
    """Set before grpc is first imported (``bridge.edge.agent`` and ``bridge.cloud.ingest``
    import it)."""
    os.environ.setdefault("GRPC_VERBOSITY", _GRPC_VERBOSITY.get(level, "ERROR"))


def cmd_agent(args: argparse.Namespace) -> int:
    config = load_agent(Path(args.config))
    # The checks the ingest's TLS would make, now rather than as refusals later.
    config.tls.verified(role=ROLE_SITE, name=config.site_id)
    if args.check:
        if any(s.protocol == Protocol.MQTT for s in config.sources):
            from bridge.edge.sources.paho import check_paho

            check_paho()
        print(f"{args.config}: OK (site {config.site_id}, {len(config.sources)} source(s), "
              f"{len(config.uplink.endpoints)} endpoint(s))")
        return 0
    _grpc_verbosity(config.log_level)
    from bridge.edge import agent
    from bridge.shared.telemetry import setup_logging

    setup_logging(config.log_level, component="agent")
    asyncio.run(agent.run(config))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    config = load_ingest(Path(args.config))
    config.tls.verified(role=None)
    if args.check:
        js = config.jetstream
        store = f"JetStream stream {js.stream} on {', '.join(js.servers)}" if js else \
            f"SQLite {config.store_path}"
        print(f"{args.config}: OK (node {config.node}, listen {config.listen}, store {store})")
        return 0
    _grpc_verbosity(config.log_level)
    from bridge.cloud.ingest import server
    from bridge.shared.telemetry import setup_logging

    setup_logging(config.log_level, component="ingest")
    try:
        asyncio.run(server.run(config))
    except (OSError, StoreUnavailable) as exc:
        raise UsageError(f"ingest cannot start: {exc}") from exc
    return 0


def _consumer_setup(args: argparse.Namespace
                    ) -> tuple[list[str], TlsConfig | None, Path | None, JetStreamSettings]:
    targets: list[str] = []
    cursor = Path(args.cursor) if args.cursor else None
    tls = None
    jetstream = JetStreamSettings(servers=())
    if args.config:
        cfg = load_consumer(Path(args.config))
        targets.extend(cfg.targets)
        tls, jetstream = cfg.tls, cfg.jetstream
        cursor = cursor or cfg.cursor
    for t in args.sources or []:
        try:
            if t.startswith(("nats://", "tls://")):  # a JetStream-backed cloud, read directly
                targets.append(",".join(nats_servers(t)))
                continue
            host, port = parse_hostport(t, default_port=DEFAULT_INGEST_PORT)
        except ValueError as exc:
            raise ConfigError("command line", "--from", str(exc)) from exc
        targets.append(f"{host}:{port}")
    if any([args.ca, args.cert, args.key]):
        if not all([args.ca, args.cert, args.key]):
            raise ConfigError("command line", "--ca/--cert/--key", "give all three")
        tls = TlsConfig(ca=Path(args.ca), cert=Path(args.cert), key=Path(args.key),
                        file="command line", section="--")
    if not targets:
        raise ConfigError("command line", "--from", "give at least one ingest HOST:PORT "
                          "(or 'from' in --config)")
    nodes = [t for t in targets if not t.startswith(("nats://", "tls://"))]
    if tls is None and nodes:
        # Only an ingest node asks for a consumer certificate; a nats:// source uses the
        # credentials and TLS of [jetstream] in --config.
        raise ConfigError("command line", "--ca/--cert/--key",
                          f"reading {nodes[0]} needs a consumer certificate (flags or [tls] "
                          "in --config)")
    if tls is not None:
        tls.verified(role=ROLE_CONSUMER)
    return targets, tls, cursor, jetstream


def cmd_consume(args: argparse.Namespace) -> int:
    from bridge.cloud import consume

    targets, tls, cursor_path, jetstream = _consumer_setup(args)
    if args.status:
        doc = asyncio.run(consume.status(targets=targets, tls=tls, jetstream=jetstream))
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json
              else consume.format_status(doc))
        return 0 if all("error" not in n for n in doc["nodes"]) else 1
    merger = consume.Merger(cursors=consume.load_cursors(cursor_path))
    out = sys.stdout.buffer
    # Progress only for a person watching: nothing when standard error is a file or a pipe.
    progress = consume.Progress(sys.stderr) if sys.stderr.isatty() else None

    def emit(batch: list[Any]) -> None:
        for c in batch:
            out.write(orjson.dumps(consume.reading_json(c)) + b"\n")
        out.flush()
        if cursor_path is not None and batch:
            consume.save_cursors(cursor_path, merger.cursors)
        if progress is not None:
            progress.add(batch)

    if args.follow:
        async def go() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await consume.follow(targets=targets, tls=tls, merger=merger, emit=emit, stop=stop,
                                 jetstream=jetstream)

        try:
            asyncio.run(go())
        finally:
            if progress is not None:
                progress.done()
        return 0
    errors = asyncio.run(consume.read_all(targets=targets, tls=tls, merger=merger,
                                          jetstream=jetstream, emit=emit))
    emit(merger.drain())
    if progress is not None:
        progress.done()
    for target, err in errors.items():
        print(f"warning: {target}: {err} (its readings are not in this output)",
              file=sys.stderr)
    held = merger.pending()
    if held:
        print(f"note: {held} reading(s) held back above a gap; they are emitted once the gap "
              "fills (see --status)", file=sys.stderr)
    return 1 if errors else 0


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows as lines, every column but the last as wide as its widest cell (long names and
    targets push the columns out instead of breaking them)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [" ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in rows]


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url
    if args.config:
        cfg = load_agent(Path(args.config))
        if not cfg.metrics_listen:
            raise ConfigError(str(cfg.file), "metrics.listen",
                              "not set: the agent has no status endpoint")
        host, port = parse_hostport(cfg.metrics_listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        url = f"http://{host}:{port}"
    if not url:
        raise ConfigError("command line", "--url", "give --url or --config")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as resp:  # noqa: S310
            doc = orjson.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"no agent answering at {url}: {exc}") from exc
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    sp = doc["spool"]
    print(f"site {doc['site_id']}  epoch {doc['epoch']}  up {doc['uptime_s']:.0f} s")
    age = "-" if sp.get("oldest_age_s") is None else f"{sp['oldest_age_s']:.0f} s"
    print(f"spool   {sp['readings']} readings, {sp['bytes']} bytes (max {sp['max_bytes']}), "
          f"oldest {age}, next seq {sp['next_seq']}")
    if sp.get("dropped"):
        print("dropped " + ", ".join(f"{n} ({r})" for r, n in sorted(sp["dropped"].items())))
    for q in sp.get("quarantined", []):
        print(f"QUARANTINED {q['moved_to']}: {q['reason']} (salvaged {q['salvaged']})")
    rows = [["source ", " " + s["name"], s["broker"],
             "subscribed" if s["subscribed"] else "NOT SUBSCRIBED", ""]
            for s in doc["sources"]]
    up = doc["uplink"]
    for e in up["endpoints"]:
        err = f"  last error: {e['last_error']}" if e["last_error"] else ""
        if e.get("last_ack_ns"):
            err = f"  last ack {(time.time_ns() - e['last_ack_ns']) / 1e9:.1f} s ago" + err
        rows.append(["uplink ", ("*" if e["active"] else " ") + e["name"], e["target"],
                     e["state"], f"breaker {e['breaker']}{err}"])
    for line in _aligned(rows):
        print(line)
    print(f"failovers {up['failovers']}, batches in flight {up['in_flight']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridge", description="Edge telemetry bridge: SCADA "
                                "brokers to multi-cloud ingest, nothing lost, nothing doubled.")
    p.add_argument("--version", action="version", version=f"bridge {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("agent", help="run the edge agent")
    a.add_argument("--config", required=True, help="agent TOML config")
    a.add_argument("--check", action="store_true", help="validate the config and exit")
    a.set_defaults(fn=cmd_agent)

    i = sub.add_parser("ingest", help="run an ingest node")
    i.add_argument("--config", required=True, help="ingest TOML config")
    i.add_argument("--check", action="store_true", help="validate the config and exit")
    i.set_defaults(fn=cmd_ingest)

    c = sub.add_parser("consume", help="read the merged stream of one or more ingest nodes")
    c.add_argument("--from", dest="sources", action="append", metavar="HOST:PORT",
                   help="an ingest node (repeat, one per cloud)")
    c.add_argument("--config", help="consumer TOML config (from, cursor, [tls])")
    c.add_argument("--ca", help="the CA that signed the ingest nodes' certificates (PEM)")
    c.add_argument("--cert", help="this consumer's certificate (PEM; bridge pki consumer)")
    c.add_argument("--key", help="its private key (PEM)")
    c.add_argument("--cursor", help="resume from and save to this cursor file")
    c.add_argument("--follow", action="store_true", help="keep streaming new readings")
    c.add_argument("--status", action="store_true",
                   help="print per-site watermarks and gaps, per cloud and merged")
    c.add_argument("--json", action="store_true", help="with --status: JSON output")
    c.set_defaults(fn=cmd_consume)

    k = sub.add_parser("pki", help="create a CA and issue certificates")
    ksub = k.add_subparsers(dest="pki_cmd", required=True)
    for name, hlp in (("ca", "create the CA"), ("server", "issue an ingest server certificate"),
                      ("site", "issue a site (agent) certificate"),
                      ("consumer", "issue a consumer certificate")):
        kp = ksub.add_parser(name, help=hlp)
        kp.add_argument("--dir", required=True, help="the CA directory (ca.pem, ca.key)")
        kp.add_argument("--force", action="store_true", help="overwrite existing files")
        kp.add_argument("--days", type=int, default=3650 if name == "ca" else 825,
                        help="validity in days (default: %(default)s)")
        if name != "ca":
            kp.add_argument("--out", help="where to write (default: --dir)")
        if name == "ca":
            kp.add_argument("--name", default="bridge CA",
                            help="the CA's common name (default: %(default)s)")
        elif name == "server":
            kp.add_argument("--name", required=True,
                            help="the node's name: the certificate's common name and file names")
            kp.add_argument("--dns", action="append", default=[],
                            help="a DNS name agents use to reach it (repeat)")
            kp.add_argument("--ip", action="append", default=[],
                            help="an IP address agents use to reach it (repeat)")
        elif name == "site":
            kp.add_argument("--site", required=True,
                            help="the site id the certificate proves (a-z, 0-9, '-', '.')")
        else:
            kp.add_argument("--name", required=True,
                            help="the consumer's name: the certificate's common name")
    kc = ksub.add_parser("csr", help="on the gateway: a new site key and a request to sign")
    kc.add_argument("--site", required=True, help="this gateway's site id")
    kc.add_argument("--out", required=True, help="where to write the key and the request")
    kc.add_argument("--force", action="store_true", help="overwrite existing files")
    ks = ksub.add_parser("sign", help="on the CA host: a site certificate for a request")
    ks.add_argument("--dir", required=True, help="the CA directory (ca.pem, ca.key)")
    ks.add_argument("--csr", required=True, help="the request bridge pki csr wrote")
    ks.add_argument("--site", help="refuse a request for any other site id")
    ks.add_argument("--out", help="where to write the certificate (default: --dir)")
    ks.add_argument("--days", type=int, default=825,
                    help="validity in days (default: %(default)s)")
    ks.add_argument("--force", action="store_true", help="overwrite an existing certificate")
    kr = ksub.add_parser("revoke", help="append certificates to an ingest deny-list")
    kr.add_argument("--deny-list", required=True,
                    help="the file [revocation] deny_list names (created if missing)")
    kr.add_argument("cert", nargs="*", help="certificate PEM files to revoke")
    kr.add_argument("--serial", action="append", default=[],
                    help="a serial number in hex (when the certificate file is gone)")
    k.set_defaults(fn=cmd_pki)

    cli_deadletters.add_parser(sub)

    st = sub.add_parser("status", help="a running agent's spool, sources and endpoints")
    st.add_argument("--config", help="the agent's config (uses metrics.listen)")
    st.add_argument("--url", help="the agent's HTTP endpoint, e.g. http://127.0.0.1:9464")
    st.add_argument("--json", action="store_true", help="the agent's /status as JSON")
    st.set_defaults(fn=cmd_status)
    return p


def main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None
         ) -> None:
    """Run one command; ``parser`` is another command set with the same error handling (the
    dev harness's ``python -m devkit``)."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        code = args.fn(args)
    except UserError as exc:  # one line, exit 2 (bridge.shared.errors)
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader went away (``bridge consume | head -1``): that ends the output, not in
        # error. Later writes (the interpreter's final flush) go nowhere instead of raising.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
