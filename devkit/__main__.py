"""``python -m devkit``: the development harness's commands, not shipped in the package.

* ``demo``: the whole pipeline on this machine, primary killed halfway (``make demo``).
* ``simulate``: a substation's or a water plant's readings published over MQTT (JSON or
  Sparkplug B) or AMQP, for tests, benchmarks and trying a config by hand.

Errors are the bridge's (``bridge.cli.main``): a ``UserError`` is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from bridge import cli
from bridge.shared.errors import ConfigError, DemoError, UsageError
from devkit import demo, simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    parts = urlsplit(args.broker)
    if parts.scheme not in ("mqtt", "amqp") or not parts.hostname:
        raise ConfigError("command line", "--broker", f'expected "mqtt://HOST[:PORT]" or '
                          f'"amqp://USER:PASSWORD@HOST[:PORT]/VHOST", got {args.broker!r}')
    if parts.scheme == "amqp":
        if args.payload != "json":
            raise UsageError("--payload sparkplug needs an mqtt:// broker (Sparkplug is MQTT)")
        prog = simulate.run_amqp(url=args.broker, exchange=args.exchange, site=args.site,
                                 count=args.count, rate=args.rate, profile=args.profile)
    else:
        try:
            prog = simulate.run(host=parts.hostname, port=parts.port or 1883, site=args.site,
                                count=args.count, rate=args.rate, profile=args.profile,
                                payload=args.payload,
                                metrics_per_message=args.metrics_per_message,
                                devices=args.devices, mqtt_version=args.mqtt_version,
                                group=args.group or simulate.SPARKPLUG_GROUP)
        except OSError as exc:  # refused, unreachable, or no CONNACK (wrong protocol version)
            print(f"error: cannot publish to {args.broker}: {exc}", file=sys.stderr)
            return 1
    print(f"published {prog.acked} messages, {prog.readings} readings (broker-acknowledged), "
          f"failed {prog.failed}")
    return 0 if prog.failed == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        summary = demo.run(readings=args.readings, rate=args.rate, keep=args.keep,
                           source=args.source, payload=args.payload, store=args.store,
                           workdir=Path(args.workdir) if args.workdir else None)
    except DemoError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print(orjson.dumps(summary.as_dict()).decode())
    else:
        print(demo.format_summary(summary))
    ok = summary.lost == 0 and summary.duplicates == 0 and summary.committed == summary.published
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devkit", description="The development "
                                "harness (not shipped): the demo and the plant simulator.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="publish realistic SCADA readings over MQTT or AMQP")
    s.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://HOST:PORT, or amqp://USER:PASSWORD@HOST:PORT/VHOST")
    s.add_argument("--payload", choices=("json", "sparkplug"), default="json",
                   help="JSON readings or Sparkplug B (default: %(default)s)")
    s.add_argument("--exchange", default="scada", help="AMQP: the topic exchange")
    s.add_argument("--metrics-per-message", type=int, default=10, help="sparkplug: per DDATA")
    s.add_argument("--devices", type=int, default=4, help="sparkplug: devices of the node")
    s.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5",
                   help="MQTT protocol version (NATS's MQTT listener speaks 3.1.1 only)")
    s.add_argument("--group", help="sparkplug: group id (default \"Bridge Sim\"; NATS's MQTT "
                   "listener takes no spaces in topics)")
    s.add_argument("--site", required=True, help="the site id in the topics it publishes")
    s.add_argument("--rate", type=float, default=100.0, help="messages/s (0: unlimited)")
    s.add_argument("--count", type=int, default=1000,
                   help="messages to publish (default: %(default)s)")
    s.add_argument("--profile", choices=("grid", "water"), default="grid",
                   help="a substation's or a water plant's signals (default: %(default)s)")
    s.set_defaults(fn=cmd_simulate)

    d = sub.add_parser("demo", help="the whole pipeline on this machine, primary killed halfway")
    d.add_argument("--readings", type=int, default=20_000,
                   help="readings to publish (default: %(default)s)")
    d.add_argument("--rate", type=float, default=0.0, help="publish rate (0: unlimited)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument("--keep", action="store_true", help="keep the working directory")
    d.add_argument("--workdir", help="use this directory instead of a temporary one")
    d.add_argument("--source", choices=("mqtt", "amqp"), default="mqtt",
                   help="the plant broker: a local mosquitto, or the machine's RabbitMQ")
    d.add_argument("--payload", choices=("json", "sparkplug"), default="json",
                   help="JSON readings or Sparkplug B (default: %(default)s)")
    d.add_argument("--store", choices=("sqlite", "jetstream"), default="sqlite",
                   help="each cloud's store: a SQLite file, or a 3-node JetStream cluster")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    main()
