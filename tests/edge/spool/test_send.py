"""The send side's ``Holds``: the one record of the batches in flight, shared by the event
loop (takes, unholds) and the spool's thread (reads, bounds)."""

from __future__ import annotations

import threading
from pathlib import Path

from bridge.edge.spool import Pending, Spool
from bridge.edge.spool.send import Holds
from bridge.shared._pb import bridge_pb2 as pb


def test_a_batch_is_held_from_its_read_until_it_is_unheld():
    h = Holds()
    h.hold(1, 10)
    h.hold(11, 20)
    assert sorted(h.spans()) == [(1, 10), (11, 20)]
    h.unhold(1)
    h.unhold(1)  # twice (abandoned, then its end): harmless
    assert h.spans() == [(11, 20)]
    h.clear()
    assert h.spans() == []


def test_holds_made_and_dropped_on_another_thread_are_all_seen_whole():
    h = Holds()

    def churn(base: int) -> None:
        for i in range(2000):
            h.hold(base + i, base + i)
            h.unhold(base + i)

    threads = [threading.Thread(target=churn, args=(k * 10_000,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert all(first == last for first, last in h.spans())
    for t in threads:
        t.join()
    assert h.spans() == []


def test_a_row_read_for_a_batch_stays_until_the_batch_ends_then_a_bound_may_drop_it(
        tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    sp.commit([Pending(envelope=pb.Envelope(site_id="s", raw=b"x" * 10)) for _ in range(4)])
    rows = sp.read_after(0, max_rows=2, max_bytes=1 << 20, hold=True)
    assert sp.holds.spans() == [(1, 2)]
    assert sp.make_room(1 << 20) == 2  # rids 3-4 only
    sp.unhold(rows[0][0])
    assert sp.make_room(1 << 20) == 2  # now rids 1-2


def test_a_read_bounded_by_through_neither_returns_nor_holds_a_row_past_it(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    sp.commit([Pending(envelope=pb.Envelope(site_id="s", raw=b"x" * 10)) for _ in range(6)])
    # from the fresh tail (the newest rows, in memory) ...
    fresh = sp.take_fresh(1, max_rows=10, max_bytes=1 << 20, hold=True, through=3)
    assert fresh is not None and [r for r, _ in fresh] == [2, 3]
    assert sp.take_fresh(3, max_rows=10, max_bytes=1 << 20, hold=True, through=3) == []
    # ... and from the file, as the backlog reads it
    assert [r for r, _ in sp.read_after(3, max_rows=10, max_bytes=1 << 20, hold=True,
                                        through=5)] == [4, 5]
    assert sp.read_after(5, max_rows=10, max_bytes=1 << 20, hold=True, through=5) == []
    assert sorted(sp.holds.spans()) == [(2, 3), (4, 5)]
