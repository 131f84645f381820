"""``python -m devkit demo``: the whole path on one machine, with a cloud killed halfway.

PKI -> plant broker -> agent (spool, mTLS uplink) -> three ingest nodes ``aws``, ``azure``
and ``gcp`` -> merged consumer. About halfway through publishing, the primary (``aws``) is
killed with SIGKILL; the agent fails over. At the end ``aws`` is started again on its own store
(a cloud coming back), every node is consumed and merged, and every published reading is
accounted for.

With ``--store jetstream`` every cloud is a 3-node JetStream cluster (R3, fsync always) with
one stateless ingest replica in front of it; the killed ``aws`` replica comes back without
any state of its own, and what it had committed is read back from its cluster.

The plant broker is a private mosquitto (``--source mqtt``) or the machine's RabbitMQ with an
exchange and queue of the run's own (``--source amqp``). Payloads are JSON, accounted by their
``seq``, or Sparkplug B (``--payload sparkplug``, MQTT only), where every metric value counts as
a reading and is accounted by (message, device, metric): each message carries its number in
the ``Sim/Message`` metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bridge.cloud import consume
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import DemoError
from devkit import localrun, simulate
from devkit.jscluster import JetStreamCluster

SITE = "demo-substation"
NODES = ("aws", "azure", "gcp")


@dataclass
class Summary:
    published: int = 0
    committed: int = 0
    lost: int = 0
    duplicates: int = 0
    failovers: int = 0
    failover_s: float | None = None
    elapsed_s: float = 0.0
    rate_per_s: float = 0.0
    agent_shutdown_s: float = 0.0
    workdir: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Progress:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()

    def line(self, text: str, *, final: bool = False) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()


SPARKPLUG_METRICS = 10  # values per Sparkplug message in the demo
SPARKPLUG_DEVICES = 4


def account(stream: list[pb.Committed], payload: str,
            pub: simulate.Progress) -> tuple[int, int, int, int]:
    """(published, committed, lost, duplicates), reading by reading.

    JSON readings are identified by (site, seq); Sparkplug values by (message n, device,
    metric), with the simulator's own record of how many values message n held.
    """
    seen: Counter[tuple[object, ...]] = Counter()
    if payload == "json":
        for c in stream:
            seen[(c.envelope.site_id, c.envelope.source_seq)] += 1
        expected = {(SITE, n) for n in range(1, pub.acked + 1)}
        committed = len(set(seen) & expected)
        dups = sum(k - 1 for k in seen.values()) + len(set(seen) - expected)
        return len(expected), committed, len(expected) - committed, dups
    for c in stream:
        env = c.envelope
        n = next((v.integer for v in env.values if v.signal == simulate.MESSAGE_METRIC), None)
        for v in env.values:
            seen[(n, env.labels.get("device", ""), v.signal)] += 1
    per_message = Counter(k[0] for k in seen)
    committed = sum(min(per_message[n], want) for n, want in pub.values.items())
    published = sum(pub.values.values())
    dups = (sum(k - 1 for k in seen.values())
            + sum(max(per_message[n] - pub.values.get(n, 0), 0)  # type: ignore[call-overload]
                  for n in per_message))
    return published, committed, published - committed, dups


def run(*, readings: int = 20_000, rate: float = 0.0, workdir: Path | None = None,
        keep: bool = False, out: TextIO = sys.stderr, source: str = "mqtt",
        payload: str = "json", store: str = "sqlite") -> Summary:
    if source == "amqp" and payload == "sparkplug":
        raise DemoError("Sparkplug B is an MQTT protocol: use --source mqtt with "
                        "--payload sparkplug")
    rabbit = None
    if source == "amqp":
        try:
            localrun.RabbitMQ.ensure_running()
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(f"--source amqp needs RabbitMQ: {exc}") from exc
        rabbit = localrun.RabbitMQ.unique("demo")
    messages = readings if payload == "json" else max(
        readings // SPARKPLUG_METRICS, SPARKPLUG_DEVICES + 2)
    tmp = Path(tempfile.mkdtemp(prefix="bridge-demo-")) if workdir is None else workdir
    tmp.mkdir(parents=True, exist_ok=True)
    progress = _Progress(out)
    summary = Summary(workdir=str(tmp))
    progress.line(f"workdir {tmp}", final=True)
    pkis = localrun.Pki(tmp / "pki", [SITE])
    broker = localrun.Mosquitto(tmp).start()
    clusters: dict[str, JetStreamCluster] = {}
    if store == "jetstream":
        for cloud in NODES:  # one 3-node R3 cluster per cloud, fsync always
            clusters[cloud] = JetStreamCluster(tmp / f"js-{cloud}", name=f"js-{cloud}")
            clusters[cloud].start()
        progress.line("JetStream clusters " + ", ".join(
            f"{cloud} :{c.nodes[0].port}/:{c.nodes[1].port}/:{c.nodes[2].port}"
            for cloud, c in clusters.items()), final=True)
    nodes = {cloud: localrun.ingest(tmp, pkis, cloud,
                                    jetstream=clusters[cloud].servers if clusters else None)
             for cloud in NODES}
    sources = None
    if rabbit is not None:
        sources = rabbit.source_toml()
    elif payload == "sparkplug":
        sources = (f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
                   'codec = "sparkplug"\n[sources.sparkplug]\nhost_id = "bridge-demo"\n')
    agent = localrun.agent(tmp, pkis, SITE, mqtt_port=broker.port, endpoints=list(nodes.values()),
                           sources=sources)
    procs: list[localrun.Proc] = [broker.proc] if broker.proc else []
    consumer_tls = pkis.consumer()
    targets = [n.target for n in nodes.values()]
    try:
        for n in nodes.values():
            n.start()
            procs.append(n.proc)
        for n in nodes.values():
            localrun.wait_healthy(n.target, consumer_tls)
        agent.start()
        procs.append(agent.proc)
        agent.wait_subscribed()
        plant = (f"RabbitMQ exchange {rabbit.exchange}" if rabbit is not None
                 else f"mosquitto :{broker.port} ({payload})")
        progress.line(f"{plant}, ingest "
                      + ", ".join(f"{n.node} :{n.port}" for n in nodes.values())
                      + f", agent (status http://127.0.0.1:{agent.http_port}/status)",
                      final=True)

        pub = simulate.Progress()
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                if rabbit is not None:
                    simulate.run_amqp(url=rabbit.URL, exchange=rabbit.exchange, site=SITE,
                                      count=messages, rate=rate, progress=pub)
                else:
                    simulate.run(host="127.0.0.1", port=broker.port, site=SITE,
                                 count=messages, rate=rate, progress=pub, payload=payload,
                                 metrics_per_message=SPARKPLUG_METRICS,
                                 devices=SPARKPLUG_DEVICES)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        t0 = time.monotonic()
        publisher = threading.Thread(target=publish, name="simulator", daemon=True)
        publisher.start()
        killed_at: float | None = None
        last_line = 0.0
        last_change, last_state = time.monotonic(), None
        while True:
            time.sleep(0.05)
            if killed_at is None and pub.acked >= messages // 2:
                killed_at = time.time()
                nodes["aws"].proc.kill()
                progress.line(f"[{time.monotonic() - t0:6.2f}s] killed the primary ingest "
                              f"'aws' with SIGKILL after {pub.acked} published", final=True)
            if errors:
                raise errors[0]
            now = time.monotonic()
            st = agent.status()
            state = (st["committed_messages"], st["uplink"]["acked_readings"])
            if state != last_state:
                last_state, last_change = state, now
            done = (not publisher.is_alive() and st["committed_messages"] >= pub.acked
                    and st["spool"]["readings"] == 0 and st["uplink"]["in_flight"] == 0)
            if now - last_line >= 0.5 or done:
                last_line = now
                active = next((e["name"] for e in st["uplink"]["endpoints"] if e["active"]),
                              "-")
                progress.line(f"[{now - t0:6.2f}s] published {pub.acked:>7}/{messages}  "
                              f"spooled {st['committed_messages']:>7}  "
                              f"acked by cloud {st['uplink']['acked_readings']:>7}  "
                              f"in spool {st['spool']['readings']:>6}  uplink -> {active}",
                              final=done)
            if done:
                break
            if now - last_change > 60:
                progress.line("no progress for 60 s: stopping to account for what arrived",
                              final=True)
                break
        publisher.join()
        if errors:
            raise errors[0]
        elapsed = time.monotonic() - t0
        st = agent.status()
        summary.failovers = st["uplink"]["failovers"]
        if killed_at is not None and st["uplink"]["failover_first_ack_ns"]:
            summary.failover_s = round(st["uplink"]["failover_first_ack_ns"] / 1e9 - killed_at,
                                       3)
        summary.agent_shutdown_s = round(agent.proc.stop(), 3)

        # The primary comes back on its own store: everything it committed is still there.
        nodes["aws"] = aws = localrun.IngestProc(node="aws", port=nodes["aws"].port,
                                                 config=nodes["aws"].config,
                                                 proc=nodes["aws"].proc)
        aws.start()
        localrun.wait_healthy(aws.target, consumer_tls)
        merger = consume.Merger()
        errs = asyncio.run(consume.read_all(targets=targets, tls=consumer_tls, merger=merger))
        if errs:
            raise RuntimeError(f"cannot read every cloud: {errs}")
        (summary.published, summary.committed, summary.lost,
         summary.duplicates) = account(merger.drain(), payload, pub)
        summary.elapsed_s = round(elapsed, 3)
        summary.rate_per_s = round(summary.committed / elapsed, 1) if elapsed else 0.0
        return summary
    except BaseException:
        for p in procs:
            if p.name.startswith(("agent", "ingest")):
                out.write(f"--- last lines of {p.log}\n{p.tail()}\n")
        raise
    finally:
        for p in reversed(procs):
            p.stop()
        for n in nodes.values():
            n.proc.stop()
        for c in clusters.values():
            c.stop()
        if rabbit is not None:
            with contextlib.suppress(Exception):
                rabbit.cleanup()
        if not keep and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_summary(s: Summary) -> str:
    verdict = "OK: every published reading committed exactly once" if (
        s.lost == 0 and s.duplicates == 0 and s.committed == s.published) else "FAILED"
    fo = f"{s.failover_s:.3f} s" if s.failover_s is not None else "-"
    return "\n".join([
        "",
        "demo summary",
        f"  published   {s.published:>10}   (acknowledged by the plant broker)",
        f"  committed   {s.committed:>10}   (in the merged, deduplicated cloud stream)",
        f"  lost        {s.lost:>10}",
        f"  duplicates  {s.duplicates:>10}",
        f"  failovers   {s.failovers:>10}   (kill -> first batch elsewhere: {fo})",
        f"  elapsed     {s.elapsed_s:>10.2f} s",
        f"  rate        {s.rate_per_s:>10.1f} readings/s",
        f"  agent stop  {s.agent_shutdown_s:>10.2f} s   (SIGTERM to exit)",
        f"  {verdict}",
    ])
