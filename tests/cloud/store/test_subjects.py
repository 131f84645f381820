"""Checkpoints and the bounded subject cache of a JetStream replica, against a real
three-node cluster: a restart reads the tail, a stale or foreign checkpoint is only slower
(or ignored), never wrong, and the states held stay within the budget."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import nats
import orjson
import pytest
from nats.js.client import JetStreamContext

from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.cloud.store.subjects import (
    CHECKPOINT_EVERY,
    Checkpoints,
    Keeper,
    SubjectCache,
    SubjectState,
    flush,
)
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import JetStreamSettings
from bridge.shared.telemetry import IngestMetrics
from devkit.jscluster import JetStreamCluster


@pytest.fixture
def js(tmp_path: Path) -> Iterator[JetStreamCluster]:
    c = JetStreamCluster(tmp_path / "js").start()
    yield c
    c.stop()


def batch(site: str, epoch: int, seqs: range | list[int]) -> list[Incoming]:
    return [Incoming(site, epoch, s, pb.Envelope(site_id=site, epoch=epoch,
                                                 seq=s).SerializeToString()) for s in seqs]


def replica(js: JetStreamCluster, **kw: float) -> JetStreamStore:
    return JetStreamStore(settings=JetStreamSettings(servers=tuple(js.servers), **kw),
                          metrics=IngestMetrics())


async def up(store: JetStreamStore) -> None:
    """Start ``store`` and wait for its checkpoint bucket: on a loaded machine creating the
    R3 bucket can outlast the first try, which the replica then retries in the background."""
    await store.start()
    async with asyncio.timeout(60):
        await store.keeper.ready.wait()


def tail_read(store: JetStreamStore) -> float:
    return store.metrics.catchup_messages._value.get()


def outcomes(store: JetStreamStore) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in store.metrics.checkpoints.collect()
            for s in m.samples if s.name.endswith("_total")}


async def stored_seqs(js: JetStreamCluster, subject: str) -> list[int]:
    """Every seq on ``subject``, read with plain nats-py."""
    nc = await nats.connect(servers=js.servers)
    try:
        jsc = nc.jetstream()
        info = await jsc.stream_info("BRIDGE", subjects_filter=subject)
        total = (info.state.subjects or {}).get(subject, 0)
        sub = await jsc.subscribe(subject, ordered_consumer=True)
        out = [int((await sub.next_msg(timeout=10)).headers["Bridge-Seq"])
               for _ in range(total)]
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def test_a_restarted_replica_reads_the_checkpoint_and_only_the_tail(
        js: JetStreamCluster):
    first = replica(js)
    await up(first)
    for lo in range(1, 20_001, 1000):
        assert set(await first.commit(batch("site-a", 5, range(lo, lo + 1000)))) == \
            {"committed"}
    await first.close()  # a clean stop writes every changed checkpoint
    assert outcomes(first).get("written", 0) >= 1

    second = replica(js)
    await up(second)
    try:
        assert await second.commit(batch("site-a", 5, [20_000, 20_001])) == \
            ["duplicate", "committed"]
        assert tail_read(second) == 0, "a clean stop leaves no tail to read"
        assert outcomes(second)["loaded"] == 1
    finally:
        await second.close()


async def test_a_stale_checkpoint_is_only_slower_and_a_missing_one_reads_everything(
        js: JetStreamCluster):
    first = replica(js)
    await up(first)
    await first.commit(batch("site-a", 5, range(1, 3001)))
    await first.close()  # checkpoint at 3,000 messages
    crashed = replica(js)
    await up(crashed)
    await crashed.commit(batch("site-a", 5, range(3001, 3501)))
    crashed.keeper.abandon()  # a replica killed before it wrote its checkpoint
    await crashed.close()

    third = replica(js)
    await up(third)
    try:
        out = await third.commit(batch("site-a", 5, range(2990, 3510)))
        assert out == ["duplicate"] * 511 + ["committed"] * 9
        assert tail_read(third) == 500, "the messages after the checkpoint, no more"
    finally:
        await third.close()

    nc = await nats.connect(servers=js.servers)
    kv = await nc.jetstream().key_value("BRIDGE_LEDGER")
    await kv.purge("site-a.0000000000000005")
    await nc.close()
    fourth = replica(js)
    await up(fourth)
    try:
        assert await fourth.commit(batch("site-a", 5, [3509, 3510])) == \
            ["duplicate", "committed"]
        assert tail_read(fourth) == 3509
        assert outcomes(fourth)["missing"] == 1
    finally:
        await fourth.close()
    assert sorted(await stored_seqs(js, "bridge.r.site-a.0000000000000005")) == \
        list(range(1, 3511))


async def test_a_checkpoint_of_a_deleted_stream_or_past_the_subject_is_ignored(
        js: JetStreamCluster):
    first = replica(js)
    await up(first)
    await first.commit(batch("site-a", 5, range(1, 101)))
    await first.close()
    nc = await nats.connect(servers=js.servers)
    jsc = nc.jetstream()
    await jsc.delete_stream("BRIDGE")  # the stream is made anew; its bucket outlives it
    blind = replica(js)  # the new stream's subject gets more messages than the old one had
    await up(blind)
    blind.keeper.abandon()
    await blind.commit(batch("site-a", 5, range(1001, 1201)))
    await blind.close()
    second = replica(js)
    await up(second)
    try:
        # Were the old checkpoint (seqs 1..100 at stream seq 100) believed, all of these
        # would be answered duplicate and never stored: they must be committed.
        assert set(await second.commit(batch("site-a", 5, range(1, 51)))) == {"committed"}
        assert outcomes(second).get("loaded", 0) == 0
    finally:
        await second.close()
    # A checkpoint of this stream that claims more than the subject holds: ignored too.
    kv = await jsc.key_value("BRIDGE_LEDGER")
    entry = await kv.get("site-a.0000000000000005")
    st = SubjectState.decode(entry.value or b"", second._stream_id)
    assert st is not None and st.last == 250
    st.last, st.saved = 10_000, 10_000
    st.ledger.add_range(51, 100)
    await kv.put("site-a.0000000000000005", st.encode(second._stream_id))
    await kv.put("site-a.0000000000000006", b"not a checkpoint")
    await nc.close()
    third = replica(js)
    await up(third)
    try:
        assert set(await third.commit(batch("site-a", 5, range(51, 101)))) == {"committed"}
        assert await third.commit(batch("site-a", 6, [1])) == ["committed"]
        assert outcomes(third)["ignored"] == 1
    finally:
        await third.close()
    assert sorted(await stored_seqs(js, "bridge.r.site-a.0000000000000005")) == \
        list(range(1, 101)) + list(range(1001, 1201))


async def test_subject_states_stay_within_the_budget_and_come_back_from_checkpoints(
        js: JetStreamCluster):
    store = replica(js, cache_mb=0.02)  # about a dozen small states
    await up(store)
    try:
        for site in range(60):
            await store.commit(batch(f"site-{site}", 1, range(1, 21)))
        deadline = asyncio.get_running_loop().time() + 20
        while store._subjects.size() > store._subjects.budget:
            assert asyncio.get_running_loop().time() < deadline, "never evicted"
            await asyncio.sleep(0.1)  # the checkpoint task's period; polled, not assumed
        held = len(store._subjects)
        assert held < 60 and store._subjects.evictions >= 60 - held
        before = tail_read(store)
        assert await store.commit(batch("site-0", 1, [20, 21])) == ["duplicate", "committed"]
        assert tail_read(store) == before, "reloaded from its checkpoint, no tail"
    finally:
        await store.close()


def test_a_checkpoint_round_trips_and_garbage_or_another_version_is_refused():
    st = SubjectState(last=77)
    for a, b in ((1, 10), (20, 2**63 - 1)):
        st.ledger.add_range(a, b)
    st.drop(20, 2**63 - 1, "spool_full")
    for i in range(3000):
        st.note(i + 1, 1, i + 1)
    back = SubjectState.decode(st.encode("t1"), "t1")
    assert back is not None
    assert (back.ledger.watermark, back.ledger.above, back.ledger.committed) == \
        (st.ledger.watermark, st.ledger.above, st.ledger.committed)
    assert (back.last, back.saved, back.dropped, back.marks, back.every) == \
        (77, 77, st.dropped, st.marks, st.every)
    assert SubjectState.decode(st.encode("t1"), "t2") is None
    assert SubjectState.decode(b"", "t1") is None
    assert SubjectState.decode(b"x" * 100, "t1") is None
    bomb = zlib.compress(b"[" + b" " * (64 << 20) + b"]", 9)  # 64 MiB of JSON in ~64 kB
    assert len(bomb) < 100_000 and SubjectState.decode(bomb, "t1") is None
    doc = orjson.loads(zlib.decompress(st.encode("t1")))
    for bad in ({"above": [5, 3]}, {"above": [1, 2]}, {"wm": -1}, {"above": [20, 2**63]},
                {"every": 0}):  # unordered, inside the watermark, negative, past 2^63-1
        assert SubjectState.decode(zlib.compress(orjson.dumps({**doc, **bad})), "t1") is None


def test_seek_marks_and_kept_tombstones_are_bounded_however_long_the_subject():
    from bridge.cloud.store.subjects import DROPPED_KEPT, MARKS_MAX
    st = SubjectState()
    for i in range(2_000_000 // 100):
        st.note(i * 100 + 1, 100, (i + 1) * 100)
        st.drop(i, i, "x")
    assert len(st.marks) <= MARKS_MAX and len(st.dropped) == DROPPED_KEPT
    assert st.start_for(1_999_950) >= 1_999_950 - 2 * st.every


def test_a_checkpoint_is_due_after_a_thousand_of_the_subjects_own_messages_not_the_streams():
    st = SubjectState(last=0)
    st.note(50_001, 10, 10)  # ten messages, far into a stream other subjects fill
    st.last = 50_010
    assert not st.due(time.monotonic()), "the stream's sequence moved, not the subject"
    st.note(60_001, CHECKPOINT_EVERY - 10, CHECKPOINT_EVERY)
    st.last = 60_000 + CHECKPOINT_EVERY - 10
    assert st.due(time.monotonic())


class _CountingCheckpoints(Checkpoints):
    """The bucket's seam: records what would be written, writes nothing."""

    def __init__(self) -> None:
        super().__init__(stream="BRIDGE", stream_id="t", replicas=1)
        self.written: list[str] = []

    async def save(self, name: str, st: SubjectState) -> str:
        self.written.append(name)
        st.saved, st.unsaved = st.last, 0
        return "written"


async def test_the_cache_keeps_its_bytes_and_unsaved_states_as_they_change_never_summing():
    cache = SubjectCache(budget=1 << 30)
    for i in range(500):
        async with cache.hold((f"site-{i}", 1)) as st:
            st.ledger.add_range(1, 10)
            st.ledger.add_range(20 + i % 7, 30)  # an interval above the watermark
            st.last = st.saved = 100 + i  # checkpointed
    for i in (3, 7):
        async with cache.hold((f"site-{i}", 1)) as st:
            st.note(st.last + 1, CHECKPOINT_EVERY, 40)
            st.last += CHECKPOINT_EVERY
            st.ledger.add_range(50, 60)
    assert cache.size() == sum(st.cost() for _, st in cache.items())
    assert [k for k, _ in cache.unsaved()] == [("site-3", 1), ("site-7", 1)]
    cp = _CountingCheckpoints()
    await flush(cache=cache, checkpoints=cp, name=lambda k: k[0], on_outcome=lambda _: None)
    assert cp.written == ["site-3", "site-7"] and cache.unsaved() == []
    small = SubjectCache(budget=cache.size() // 2)
    for i in range(50):
        async with small.hold((f"site-{i}", 1)) as st:
            st.ledger.add_range(1, 5)
    small.budget = small.size() // 2
    small.evict()
    assert small.size() == sum(st.cost() for _, st in small.items()) <= small.budget


class _SlowBucket:
    """The real JetStream context, whose first ``fails`` bucket lookups time out, as a
    cluster still forming or slow to place an R3 bucket does (a fault at the seam)."""

    def __init__(self, js: JetStreamContext, fails: int) -> None:
        self.js, self.fails = js, fails

    async def key_value(self, bucket: str) -> Any:
        if self.fails:
            self.fails -= 1
            raise TimeoutError
        return await self.js.key_value(bucket)

    async def create_key_value(self, config: Any) -> Any:
        return await self.js.create_key_value(config)


async def test_a_bucket_that_does_not_open_at_start_is_retried_and_then_written(
        js: JetStreamCluster):
    nc = await nats.connect(servers=js.servers)
    metrics = IngestMetrics()
    keeper = Keeper(budget=1 << 20, metrics=metrics, name=lambda k: f"{k[0]}.{k[1]:016x}")
    try:
        await keeper.open(cast(JetStreamContext, _SlowBucket(nc.jetstream(), fails=2)),
                          stream="BRIDGE", stream_id="1", replicas=3)
        assert keeper.checkpoints is None and not keeper.ready.is_set()
        async with asyncio.timeout(30):
            await keeper.ready.wait()
        counted = {s.labels["outcome"]: s.value for m in metrics.checkpoints.collect()
                   for s in m.samples if s.name.endswith("_total")}
        assert counted["disabled"] == 2, "each failed try is counted"
        async with keeper.cache.hold(("site-a", 5)) as st:
            st.ledger.add_range(1, 10)
            st.note(1, 10, 10)
            st.last = 10
        await keeper.close(timeout=10, connected=True)
        entry = await (await nc.jetstream().key_value("BRIDGE_LEDGER")).get(
            "site-a.0000000000000005")
        written = SubjectState.decode(entry.value or b"", "1")
        assert written is not None and written.last == 10
    finally:
        await keeper.close(timeout=1, connected=False)
        await nc.close()
