"""The stream contract of docs/consuming.md, read in two languages from what the JetStream
store really writes: every header a reader sees is named on the page, and the Node.js and the
Python examples print the same exact values past 2^53 (epoch, times, 64-bit seqs)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson
import pytest

from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import JetStreamSettings
from devkit.jscluster import JetStreamCluster

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "consuming.md"
MODULES = ROOT / ".venv" / "jsreader" / "node_modules"
SITE, EPOCH = "substation-7.north", 0x5863D2E407EE45B4  # an epoch past 2^53, a dotted site
BIG_NS = 2**62 + 7  # a time in nanoseconds past 2^53
STONE_LAST = 2**63  # a tombstone's last seq: a uint64 past int64


@pytest.fixture
def js(tmp_path: Path) -> Iterator[JetStreamCluster]:
    c = JetStreamCluster(tmp_path / "js").start()
    yield c
    c.stop()


def readings() -> list[Incoming]:
    """Three readings (the second without its optional fields) and a tombstone."""
    out = []
    for s in (1, 2, 3):
        env = pb.Envelope(site_id=SITE, epoch=EPOCH, seq=s, gateway_time_ns=BIG_NS + s,
                          source=pb.Source(topic="substation/7/bus"), values=[
                              pb.Value(signal="volts", number=110.37),
                              pb.Value(signal="count", integer=-(2**63) + s),
                              pb.Value(signal="state", text="closed"),
                              pb.Value(signal="trip", boolean=False),
                              pb.Value(signal="none", is_null=True)])
        if s != 2:
            env.source_time_ns, env.source_seq = BIG_NS, 2**64 - s
        out.append(Incoming(SITE, EPOCH, s, env.SerializeToString()))
    stone = pb.Envelope(site_id=SITE, epoch=EPOCH, seq=4, gateway_time_ns=BIG_NS,
                        dropped=pb.DropNotice(reason="ttl", last_seq=STONE_LAST,
                                              count=STONE_LAST - 3))
    out.append(Incoming(SITE, EPOCH, 4, stone.SerializeToString(), last_seq=STONE_LAST,
                        reason="ttl"))
    return out


def expected() -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []
    for s in (1, 2, 3):
        lines.append({"site": SITE, "epoch": "5863d2e407ee45b4", "seq": s, "stream_seq": s,
                      "topic": "substation/7/bus",
                      "source_time_ns": None if s == 2 else BIG_NS,
                      "gateway_time_ns": BIG_NS + s,
                      "source_seq": None if s == 2 else 2**64 - s,
                      "values": {"volts": 110.37, "count": -(2**63) + s, "state": "closed",
                                 "trip": False, "none": None}})
    lines.append({"site": SITE, "epoch": "5863d2e407ee45b4", "seq": 4, "stream_seq": 4,
                  "topic": "", "source_time_ns": None, "gateway_time_ns": BIG_NS,
                  "source_seq": None, "values": {},
                  "dropped": {"last_seq": STONE_LAST, "reason": "ttl"}})
    return lines


async def store(servers: list[str]) -> None:
    writer = JetStreamStore(settings=JetStreamSettings(servers=tuple(servers)))
    await writer.start()
    try:
        assert set(await writer.commit(readings())) == {"committed"}
    finally:
        await writer.close()


async def stored_headers(servers: list[str]) -> list[dict[str, str]]:
    """Every stored message's headers. A request that times out is asked again (up to 30 s in
    all): on a loaded host the three-node cluster may be electing a stream leader just then,
    and a reader retries such a request as any JetStream client would."""
    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                info = await js.stream_info("BRIDGE")
                return [dict((await js.get_msg("BRIDGE", n)).headers or {})
                        for n in range(info.state.first_seq, info.state.last_seq + 1)]
            except nats.errors.TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
    finally:
        await nc.close()


def documented_headers() -> set[str]:
    """The header names in the first column of the page's header tables."""
    names: set[str] = set()
    for line in PAGE.read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names |= set(re.findall(r"`([A-Za-z-]+)`", first))
    return names


def node_reader(tmp_path: Path, servers: list[str], subject: str) -> list[dict[str, object]]:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None or not (MODULES / "protobufjs").is_dir():
        pytest.fail("examples/read_jetstream.mjs's packages are not installed: run `make test` "
                    "(it runs npm ci into .venv/jsreader)")
    where = tmp_path / "mjs"
    where.mkdir()
    shutil.copy(ROOT / "examples" / "read_jetstream.mjs", where)
    (where / "node_modules").symlink_to(MODULES)  # as if `npm ci` ran beside the script
    res = subprocess.run([node, "read_jetstream.mjs", *servers, "--proto",
                          str(ROOT / "protos/bridge/v1/bridge.proto"), "--subject", subject],
                         capture_output=True, text=True, timeout=60, cwd=where, check=False,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert res.returncode == 0, res.stderr
    return [orjson.loads(x) for x in res.stdout.splitlines()]


def python_reader(tmp_path: Path, servers: list[str], subject: str) -> list[dict[str, object]]:
    gen = tmp_path / "gen"
    gen.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc",
                    f"-I{ROOT / 'protos/bridge/v1'}", f"--python_out={gen}",
                    str(ROOT / "protos/bridge/v1/bridge.proto")], check=True, timeout=60)
    res = subprocess.run([sys.executable, str(ROOT / "examples/read_jetstream.py"), *servers,
                          "--subject", subject], capture_output=True, text=True, timeout=60,
                         cwd=gen, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(gen)},
                         check=False)
    assert res.returncode == 0, res.stderr
    return [orjson.loads(x) for x in res.stdout.splitlines()]


def test_every_header_on_a_stored_message_is_named_on_the_consuming_page(
        js: JetStreamCluster) -> None:
    asyncio.run(store(js.servers))
    headers = asyncio.run(stored_headers(js.servers))
    seen = {name for h in headers for name in h}
    documented = documented_headers()
    assert seen - documented == set(), "stored headers the page does not name"
    assert {"Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit",
            "Nats-Expected-Last-Subject-Sequence", "Bridge-Last-Seq"} <= seen
    # and the page names no Bridge-* header the store does not write
    assert {n for n in documented if n.startswith("Bridge-")} <= seen
    assert all(h["Bridge-Epoch"] == f"{EPOCH:016x}" for h in headers)  # lowercase, 16 digits


def test_the_node_and_python_readers_print_the_same_exact_values_past_2_to_the_53(
        js: JetStreamCluster, tmp_path: Path) -> None:
    asyncio.run(store(js.servers))
    subject = "bridge.r.substation-7_north.>"
    from_node = node_reader(tmp_path, js.servers, subject)
    assert from_node == expected()
    assert python_reader(tmp_path, js.servers, subject) == from_node


def test_the_node_reader_ends_at_once_on_a_subject_with_nothing_stored(
        js: JetStreamCluster, tmp_path: Path) -> None:
    asyncio.run(store(js.servers))
    assert node_reader(tmp_path, js.servers, "bridge.r.nobody.>") == []
