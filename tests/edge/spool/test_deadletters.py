"""``DeadLetters``, the spool's part that owns the ``dead_letters`` table, on an open
``SpoolFile`` without the rest of the spool: bounded by count and bytes, oldest evicted first
in the writer's own transaction, every eviction counted, its memory rebuilt at open."""

from __future__ import annotations

from pathlib import Path

from bridge.edge.spool import DeadLetter, transaction
from bridge.edge.spool.clock import SpoolClock
from bridge.edge.spool.deadletters import DeadLetters
from bridge.edge.spool.file import SpoolFile
from bridge.edge.spool.schema import open_file


def opened(path: Path, *, max_count: int = 100, max_bytes: int = 1 << 20,
           payload_bytes: int = 1024, evicted: list[int] | None = None
           ) -> tuple[SpoolFile, DeadLetters]:
    f = SpoolFile(path=path, site_id="s", max_bytes=1 << 24, max_age_s=0, clock=SpoolClock())
    dead = DeadLetters(file=f, payload_bytes=payload_bytes, max_count=max_count,
                       max_bytes=max_bytes,
                       on_evict=None if evicted is None else evicted.append)
    open_file(f, load=(dead.reload,))
    return f, dead


def put(f: SpoolFile, dead: DeadLetters, *payloads: bytes) -> None:
    """As a commit does: insert inside the writer's transaction, then tell the part."""
    with transaction(f.db):
        rows = dead.insert([DeadLetter("plant", "t", p, "invalid_json", "d") for p in payloads])
    dead.committed(*rows)


def test_past_its_count_the_oldest_letters_leave_and_each_eviction_is_counted(
        tmp_path: Path):
    evicted: list[int] = []
    f, dead = opened(tmp_path / "s.db", max_count=3, evicted=evicted)
    put(f, dead, b"1", b"2")
    put(f, dead, b"3", b"4", b"5")
    assert [r.letter.payload for r in dead.rows()] == [b"3", b"4", b"5"]
    assert evicted == [2]
    assert dead.bytes == sum(len(b"3") + len(b"t") + len(b"d") for _ in range(3))


def test_past_its_bytes_the_oldest_letters_leave_whatever_their_count(tmp_path: Path):
    f, dead = opened(tmp_path / "s.db", max_bytes=250)
    put(f, dead, b"a" * 100, b"b" * 100)
    put(f, dead, b"c" * 100)
    assert [r.letter.payload[:1] for r in dead.rows()] == [b"b", b"c"]
    assert dead.bytes <= 250


def test_a_letter_keeps_only_a_prefix_of_its_payload_and_records_its_full_size(
        tmp_path: Path):
    f, dead = opened(tmp_path / "s.db", payload_bytes=16)
    put(f, dead, b"x" * 1000)
    (row,) = dead.rows()
    assert (row.letter.payload, row.letter.size) == (b"x" * 16, 1000)


def test_a_rolled_back_transaction_leaves_neither_the_rows_nor_the_memory_changed(
        tmp_path: Path):
    f, dead = opened(tmp_path / "s.db", max_count=1)
    put(f, dead, b"kept")
    try:
        with transaction(f.db):
            dead.insert([DeadLetter("plant", "t", b"new", "invalid_json", "d")])
            raise RuntimeError("the commit failed")
    except RuntimeError:
        pass
    assert [r.letter.payload for r in dead.rows()] == [b"kept"]
    put(f, dead, b"next")  # the memory still matches the table: one eviction, of "kept"
    assert [r.letter.payload for r in dead.rows()] == [b"next"]


def test_a_reopened_file_rebuilds_what_the_part_keeps_in_memory(tmp_path: Path):
    f, dead = opened(tmp_path / "s.db", max_count=2)
    put(f, dead, b"1", b"22")
    before = dead.bytes
    f.db.close()
    f, dead = opened(tmp_path / "s.db", max_count=2)
    assert dead.bytes == before
    put(f, dead, b"3")
    assert [r.letter.payload for r in dead.rows()] == [b"22", b"3"]
