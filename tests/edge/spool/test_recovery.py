"""A corrupt spool is moved aside, salvaged with identities intact, and never stops the agent."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from bridge.edge.spool import Spool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolReset
from tests.edge.spool.test_core import pending

ROWS = 3000


def filled(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "spool.db"
    sp = Spool(path=path, site_id="s", max_bytes=1 << 26)
    for _ in range(ROWS // 500):
        sp.commit(pending(500, size=300))
    epoch = sp.epoch
    sp.close()  # last connection: checkpoints the WAL into the file
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    return path, epoch


def read_all(sp: Spool) -> list[pb.Envelope]:
    out: list[pb.Envelope] = []
    rid = 0
    while rows := sp.read_after(rid, max_rows=1000, max_bytes=1 << 30):
        out.extend(pb.Envelope.FromString(b) for _, b in rows)
        rid = rows[-1][0]
    return out


def reopen_reading_through_corruption(path: Path) -> tuple[Spool, list[pb.Envelope]]:
    sp = Spool(path=path, site_id="s", max_bytes=1 << 26)
    try:
        envs = read_all(sp)
    except SpoolReset:
        envs = read_all(sp)
    return sp, envs


def quarantined_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.iterdir() if ".corrupt-" in p.name)


def test_a_wrong_header_is_moved_aside_and_a_fresh_spool_takes_over(tmp_path: Path):
    path, epoch = filled(tmp_path)
    with path.open("r+b") as f:
        f.write(b"this is no sqlite file")
    sp, envs = reopen_reading_through_corruption(path)
    assert envs == [] and sp.epoch != epoch
    (q,) = sp.quarantines
    assert q.salvaged == 0 and q.moved_to in quarantined_files(tmp_path)
    assert sp.commit(pending(2)) == [1, 2]


def test_a_spool_of_another_schema_version_is_quarantined_and_fully_salvaged(tmp_path: Path):
    path, epoch = filled(tmp_path)
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    sp, envs = reopen_reading_through_corruption(path)
    assert len(envs) == ROWS
    assert {e.epoch for e in envs} == {epoch}, "salvaged readings keep their identity"
    assert [e.seq for e in envs] == list(range(1, ROWS + 1))
    assert sp.epoch != epoch and sp.quarantines[0].salvaged == ROWS
    sp.commit(pending(1))
    assert pb.Envelope.FromString(sp.read_after(ROWS, max_rows=1, max_bytes=1 << 20)[0][1]) \
        .seq == 1, "new readings start a new epoch at seq 1"


@pytest.mark.parametrize("damage", ["garbage_pages", "truncated"])
def test_damaged_pages_are_found_at_runtime_and_what_is_readable_is_salvaged(
        tmp_path: Path, damage: str):
    path, epoch = filled(tmp_path)
    size = path.stat().st_size
    if damage == "garbage_pages":
        rng = random.Random(7)
        with path.open("r+b") as f:
            f.seek(size // 2 // 4096 * 4096)
            f.write(rng.randbytes(8 * 4096))
    else:
        os.truncate(path, size * 6 // 10 // 4096 * 4096)
    sp, envs = reopen_reading_through_corruption(path)
    (q,) = sp.quarantines
    assert 0 < q.salvaged < ROWS
    assert len(envs) == q.salvaged
    seqs = [e.seq for e in envs]
    assert seqs == sorted(set(seqs)) and {e.epoch for e in envs} == {epoch}
    assert seqs[0] == 1, "the undamaged start is salvaged"
    assert sp.generation == 1 and sp.epoch != epoch
    assert len(quarantined_files(tmp_path)) == 1


def test_a_spool_of_another_site_is_a_configuration_error_not_corruption(tmp_path: Path):
    from bridge.shared.errors import SpoolError
    path, _ = filled(tmp_path)
    with pytest.raises(SpoolError, match="belongs to site"):
        Spool(path=path, site_id="other", max_bytes=1 << 26)
    assert quarantined_files(tmp_path) == []
