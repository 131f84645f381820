from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bridge.edge.spool import DeadLetter, Pending, Spool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolError, SpoolFull


def pending(n: int, *, size: int = 10) -> list[Pending]:
    return [Pending(envelope=pb.Envelope(site_id="s", raw=bytes([i % 256]) * size))
            for i in range(n)]


def test_seqs_are_dense_and_survive_reopen_and_release(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    assert sp.commit(pending(3)) == [1, 2, 3]  # rids
    epoch = sp.epoch
    rows = sp.read_after(0, max_rows=10, max_bytes=1 << 20)
    assert [s for s, _ in rows] == [1, 2, 3]
    assert pb.Envelope.FromString(rows[1][1]).seq == 2
    sp.release(1, 3)
    sp.close()
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    assert (sp.epoch, sp.readings, sp.bytes) == (epoch, 0, 0)
    sp.commit(pending(2))
    rows = sp.read_after(0, max_rows=10, max_bytes=1 << 20)
    assert [pb.Envelope.FromString(b).seq for _, b in rows] == [4, 5], \
        "seqs are never reused, even after release and reopen"


def test_read_after_respects_the_byte_bound_but_always_returns_one_row(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    sp.commit(pending(5, size=100))
    assert len(sp.read_after(0, max_rows=10, max_bytes=250)) == 2
    assert len(sp.read_after(0, max_rows=10, max_bytes=1)) == 1
    assert [s for s, _ in sp.read_after(3, max_rows=10, max_bytes=1 << 20)] == [4, 5]


def test_a_commit_beyond_max_bytes_is_refused_whole(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    sp.commit(pending(1, size=(1 << 20) - 100))
    with pytest.raises(SpoolFull):
        sp.commit(pending(2, size=100))
    assert sp.readings == 1 and sp.next_seq == 2
    sp.release(1, 1)
    assert sp.commit(pending(2, size=100)) == [2, 3]


def test_rejected_rows_move_to_dead_letters_when_released(tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    sp.commit(pending(3), [DeadLetter("plant", "t", b"x", "invalid_json", "detail")])
    sp.release(1, 3, rejected=[(2, "bad identity")])
    assert sp.readings == 0
    reasons = sorted((d.reason, d.detail) for d in sp.dead_letters())
    assert reasons == [("invalid_json", "detail"), ("rejected", "bad identity")]


def test_a_spool_of_another_site_or_schema_is_refused_not_reused(tmp_path: Path):
    Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20).close()
    with pytest.raises(SpoolError, match="belongs to site 's'"):
        Spool(path=tmp_path / "s.db", site_id="other", max_bytes=1 << 20)


def test_the_figures_other_threads_read_are_published_whole_after_each_operation(
        tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 20)
    before = sp.published
    sp.commit(pending(3, size=10))
    after = sp.published
    assert (before.readings, before.last_rid, before.next_seq) == (0, 0, 1)
    assert (after.readings, after.last_rid, after.next_seq) == (3, 3, 4)
    assert after.bytes == sp.bytes > 0 and after.epoch == sp.epoch
    sp.commit((), dead=[DeadLetter("s", "t", b"x" * 50, "decode", "bad")])
    assert sp.published.dead_bytes == sp.dead_bytes > 0, "a dead letter's bytes are published"
    sp.release(1, 3)
    assert (sp.published.readings, sp.published.bytes) == (0, 0)
    assert before.readings == 0, "a published set never changes: a new one replaces it"


def test_a_reader_on_another_thread_never_sees_a_set_torn_between_two_commits(
        tmp_path: Path):
    sp = Spool(path=tmp_path / "s.db", site_id="s", max_bytes=1 << 30)
    done = threading.Event()
    torn: list[tuple[int, int, int]] = []

    def read() -> None:
        while not done.is_set():
            f = sp.published
            if not f.readings == f.last_rid == f.next_seq - 1:  # only commits in this file
                torn.append((f.readings, f.last_rid, f.next_seq))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(300):
            sp.commit(pending(2, size=5))
    finally:
        done.set()
        reader.join()
    assert torn == []
    assert sp.published.readings == 600
