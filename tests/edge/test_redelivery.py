"""The redelivery ring (bridge.edge.redelivery): the intake's own, kept durable by the spool
in the transaction of its messages and handed back at start."""

from __future__ import annotations

from pathlib import Path

from bridge.edge.redelivery import RedeliveryRing
from bridge.edge.spool import Spool
from tests.edge.spool.test_core import pending


def digest(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_flagged_redelivery_of_a_committed_message_is_recognised_once_across_reopen(
        tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    ring = RedeliveryRing(4, sp.load_ring("plant"))
    digests = [digest(i) for i in range(6)]
    for part in (digests[:3], digests[3:]):  # two commits: the second continues the slots
        sp.commit(pending(len(part)), ring=ring.rows_for("plant", part))
        for d in part:
            ring.push(d)
    sp.close()
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    ring = RedeliveryRing(4, sp.load_ring("plant"))
    assert not ring.claim(digest(0)), "fell out of the ring"
    assert ring.claim(digest(5))
    assert not ring.claim(digest(5)), "claimed only once"
    assert ring.claim(digest(2))
    assert RedeliveryRing(4, sp.load_ring("other")).claim(digest(3)) is False
    sp.close()


def test_a_groups_ring_rows_are_computed_before_its_commit_and_pushed_only_after(
        tmp_path: Path):
    """The rows describe the pushes to come; nothing moves until the commit returned."""
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    ring = RedeliveryRing(8, [])
    rows = ring.rows_for("plant", [digest(1), digest(2)])
    assert rows == [("plant", 0, 0, digest(1)), ("plant", 1, 1, digest(2))]
    assert ring.rows_for("plant", [digest(3)]) == [("plant", 0, 0, digest(3))], \
        "computing rows pushes nothing"
    sp.commit(pending(2), ring=rows)
    assert sp.load_ring("plant") == [(0, digest(1)), (1, digest(2))]
    sp.close()


def test_the_redelivery_ring_forgets_what_falls_out_of_it():
    """A digest that left the window is gone from memory too (it leaked: ~140 B a message)."""
    ring = RedeliveryRing(10, [])
    for i in range(10_000):
        ring.push(b"d%d" % i)
    assert len(ring) == 10
    assert not ring.claim(b"d9989"), "evicted"
    assert ring.claim(b"d9990") and not ring.claim(b"d9990"), "one claim per stored copy"
    ring.push(b"d9999")  # a second copy of an identical payload
    assert ring.claim(b"d9999") and ring.claim(b"d9999") and not ring.claim(b"d9999")
    assert len(ring) <= 10
