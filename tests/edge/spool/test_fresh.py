"""The fresh tail (bridge.edge.spool.fresh): the sender's next batch from memory, never different
from what the file holds, and never a row a bound has dropped."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.edge.spool import AsyncSpool, Spool
from bridge.edge.spool.fresh import FreshTail
from bridge.shared._pb import bridge_pb2 as pb
from tests.edge.spool.test_core import pending

MB = 1 << 20

# One step of a random life: (what, how many or which).
STEPS = st.lists(st.tuples(st.sampled_from(["commit", "take", "release", "room", "big"]),
                           st.integers(min_value=1, max_value=40)), max_size=40)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_whatever_the_tail_answers_is_what_the_file_answers(tmp_path_factory, steps) -> None:
    sp = Spool(path=tmp_path_factory.mktemp("f") / "s.db", site_id="s", max_bytes=MB)
    sp.fresh.max_bytes = 2_000  # small, so the tail also overflows and misses
    cursor = 0
    try:
        for what, n in steps:
            if what == "commit":
                sp.commit(pending(n, size=20))
            elif what == "big":  # one commit larger than the whole tail
                sp.commit(pending(2, size=1_500))
            elif what == "take":
                got = sp.take_fresh(cursor, max_rows=n, max_bytes=400)
                want = sp.read_after(cursor, max_rows=n, max_bytes=400)
                if got is not None:
                    assert got == want
                if want:
                    cursor = want[-1][0]
            elif what == "release" and cursor:
                sp.release(max(1, cursor - n), cursor)
            elif what == "room":
                sp.make_room(n * 30)  # drops rows (and writes tombstones)
    finally:
        sp.close()


def test_the_sender_reads_live_rows_from_memory_and_a_backlog_from_the_file(tmp_path: Path):
    async def run() -> None:
        sp = AsyncSpool(Spool(path=tmp_path / "s.db", site_id="s", max_bytes=64 * MB))
        try:
            await sp.commit(pending(5))
            rows = await sp.read_after(0, max_rows=100, max_bytes=MB)
            assert [r for r, _ in rows] == [1, 2, 3, 4, 5]
            assert (sp.spool.fresh.hits, sp.spool.fresh.misses) == (1, 0)
            assert await sp.read_after(5, max_rows=100, max_bytes=MB) == []  # nothing new
            # More than the tail holds arrives while the sender is away: the oldest of it is
            # read from the file, the newest again from memory.
            for _ in range(30):
                await sp.commit(pending(100, size=1_000))
            assert sp.spool.fresh.hits == 2
            backlog = await sp.read_after(5, max_rows=100, max_bytes=MB)
            assert backlog[0][0] == 6 and sp.spool.fresh.misses == 1
            tail = await sp.read_after(3_000, max_rows=100, max_bytes=MB)
            assert [r for r, _ in tail] == list(range(3_001, 3_006))
            assert sp.spool.fresh.hits == 3
        finally:
            await sp.close()

    asyncio.run(run())


def test_a_bound_never_drops_a_row_the_sender_took_from_the_tail(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=MB)
    sp.commit(pending(10, size=50))
    taken = sp.take_fresh(0, max_rows=4, max_bytes=MB, hold=True)
    assert taken is not None and [r for r, _ in taken] == [1, 2, 3, 4]
    sp.make_room(MB)  # asks for everything
    left = sp.read_after(0, max_rows=100, max_bytes=MB)
    assert [r for r, _ in left][:4] == [1, 2, 3, 4], "held rows stay"
    stones = [pb.Envelope.FromString(b) for r, b in left if r > 10]
    assert [(s.seq, s.dropped.last_seq) for s in stones] == [(5, 10)]
    # The drop emptied the tail: rows 5..10 are gone and never come from memory.
    assert sp.take_fresh(4, max_rows=100, max_bytes=MB) is None
    sp.close()


def test_a_drop_waits_for_a_take_in_progress_on_another_thread(tmp_path: Path):
    """The pick of a bound and the tail's take are one at a time (the tail's lock)."""
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=MB)
    sp.commit(pending(10, size=50))
    dropped: list[int] = []
    with sp.fresh.lock:  # as a take on the event loop holds it
        t = threading.Thread(target=lambda: dropped.append(sp.make_room(MB)))
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and dropped == [], "the drop went ahead during a take"
        sp.holds.hold(1, 10)  # the take's hold, made before the lock is let go
    t.join(timeout=10)
    assert dropped == [0]
    sp.close()


def test_a_quarantine_empties_the_tail(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=MB)
    sp.commit(pending(3))
    sp._replace("a test")  # as on SQLITE_CORRUPT
    assert sp.take_fresh(0, max_rows=10, max_bytes=MB) is None
    sp.close()


def test_the_tail_keeps_only_a_dense_run_ending_at_the_newest_row() -> None:
    tail = FreshTail(max_bytes=10)
    tail.add([(1, b"aaaa"), (2, b"bbbb")])
    tail.add([(4, b"dd")])  # not contiguous: the tail starts over
    assert tail.take(0, max_rows=9, max_bytes=99) is None
    assert tail.take(3, max_rows=9, max_bytes=99) == [(4, b"dd")]
    tail.add([(5, b"eeeeeeeeeee")])  # a row larger than the tail: not kept
    assert tail.take(4, max_rows=9, max_bytes=99) is None
    tail.add([(6, b"fff"), (7, b"ggg"), (8, b"hhhh")])  # a commit larger than the tail
    assert tail.take(6, max_rows=9, max_bytes=99) == [(7, b"ggg"), (8, b"hhhh")]


def test_a_take_never_waits_for_a_drop_it_reads_the_file_behind_it_instead(tmp_path: Path):
    """The event loop must not stall behind a bound's drop (its pick, tombstones and fsync
    hold the tail's lock on the spool's thread): the take gives up at once."""
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=MB)
    sp.commit(pending(3))
    held = threading.Event()
    release = threading.Event()

    def drop_in_progress() -> None:
        with sp.fresh.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=drop_in_progress)
    t.start()
    try:
        assert held.wait(10)
        assert sp.take_fresh(0, max_rows=10, max_bytes=MB) is None  # at once, not after
    finally:
        release.set()
        t.join()
    assert [r for r, _ in sp.take_fresh(0, max_rows=10, max_bytes=MB) or []] == [1, 2, 3]
    sp.close()
