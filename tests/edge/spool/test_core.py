from __future__ import annotations

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


