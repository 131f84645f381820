"""Bounds: age by a clock that wall-clock jumps cannot fool; drops recorded and sent by name."""

from __future__ import annotations

from pathlib import Path

from bridge.edge.spool import PRIORITIES, Pending, Spool
from bridge.edge.spool.clock import SpoolClock
from bridge.shared._pb import bridge_pb2 as pb


class Clocks:
    """Controllable boot-time and wall clocks, and the boot id."""

    def __init__(self) -> None:
        self.boottime = 1000.0
        self.wall = 1_800_000_000.0
        self.boot_id = "boot-1"

    def clock(self) -> SpoolClock:
        return SpoolClock(boottime=lambda: self.boottime, wall=lambda: self.wall,
                          boot_id=lambda: self.boot_id)


def rows(n: int, *, prio: int = 0, start: int = 0) -> list[Pending]:
    return [Pending(prio=prio,
                    envelope=pb.Envelope(site_id="s", raw=b"r" * 100))
            for _ in range(n)]


def open_spool(path: Path, clocks: Clocks, **kw) -> Spool:
    return Spool(path=path, site_id="s", max_bytes=1 << 24, clock=clocks.clock(), **kw)


def envelopes(sp: Spool) -> list[pb.Envelope]:
    return [pb.Envelope.FromString(b)
            for _, b in sp.read_after(0, max_rows=100_000, max_bytes=1 << 30)]


def test_readings_older_than_max_age_become_one_tombstone_per_seq_range(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(10))
    c.boottime += 1800
    sp.commit(rows(5))
    assert sp.expire() == 0
    c.boottime += 1801
    assert sp.expire() == 10
    envs = envelopes(sp)
    assert [e.seq for e in envs if not e.HasField("dropped")] == [11, 12, 13, 14, 15]
    (stone,) = [e for e in envs if e.HasField("dropped")]
    assert (stone.seq, stone.dropped.last_seq, stone.dropped.count, stone.dropped.reason) == \
        (1, 10, 10, "ttl")
    assert sp.drop_totals() == {"ttl": 10}
    assert sp.readings == 6
    sp.close()
    assert open_spool(tmp_path / "s.db", c, max_age_s=3600).drop_totals() == {"ttl": 10}, \
        "drop totals survive a restart"


def test_a_wall_clock_jump_neither_expires_early_nor_keeps_readings_forever(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(3))
    c.wall += 10 * 3600  # NTP fixes the clock by ten hours forward
    assert sp.expire() == 0
    c.wall -= 20 * 3600  # ... or backward
    c.boottime += 3601  # but an hour does pass
    assert sp.expire() == 3


def test_age_survives_an_agent_restart_in_the_same_boot_exactly(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(3))
    sp.close()
    c.boottime += 3000
    c.wall -= 5 * 86400  # the wall clock is irrelevant within a boot
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    assert sp.oldest_age_s() == 3000
    c.boottime += 601
    assert sp.expire() == 3


def test_across_a_reboot_downtime_counts_only_when_the_wall_clock_is_plausible(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(2))
    sp.close()
    c.boot_id, c.boottime, c.wall = "boot-2", 5.0, c.wall + 1200  # powered off 20 minutes
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    assert sp.oldest_age_s() == 1200
    sp.close()
    c.boot_id, c.boottime, c.wall = "boot-3", 5.0, c.wall + 400 * 86400  # RTC far in the future
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    assert sp.oldest_age_s() == 1200, "an implausible jump credits nothing: no early expiry"


def test_drop_oldest_takes_telemetry_before_events_and_alarms(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c)
    sp.commit(rows(5, prio=PRIORITIES["alarm"]))        # seqs 1-5
    sp.commit(rows(5, prio=PRIORITIES["telemetry"]))    # seqs 6-10
    sp.commit(rows(5, prio=PRIORITIES["event"]))        # seqs 11-15
    sp.commit(rows(5, prio=PRIORITIES["telemetry"]))    # seqs 16-20
    one = len(envelopes(sp)[0].SerializeToString())
    assert sp.make_room(one * 8) == 8
    kept = [e.seq for e in envelopes(sp) if not e.HasField("dropped")]
    assert kept == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 19, 20]
    stones = sorted((e.seq, e.dropped.last_seq) for e in envelopes(sp) if e.HasField("dropped"))
    assert stones == [(6, 10), (16, 18)]


def test_rows_in_flight_are_never_dropped(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=10)
    sp.commit(rows(6))
    sp.read_after(0, max_rows=4, max_bytes=1 << 30, hold=True)  # rids 1-4: a batch on the wire
    c.boottime += 11
    assert sp.expire() == 2
    assert [e.seq for e in envelopes(sp) if not e.HasField("dropped")] == [1, 2, 3, 4]


def test_reject_new_keeps_only_tombstones_for_the_new_messages(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c)
    sp.commit(rows(2))
    assert sp.commit_dropped(rows(3), "spool_full") == 3
    sp.commit(rows(1))
    stone = next(e for e in envelopes(sp) if e.HasField("dropped"))
    assert (stone.seq, stone.dropped.last_seq) == (3, 5)
    assert [e.seq for e in envelopes(sp) if not e.HasField("dropped")] == [1, 2, 6]


def test_days_offline_expire_exactly_what_outlived_max_age(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=2 * 86400)
    for _day in range(4):  # four days without a cloud, 3 readings a day
        sp.commit(rows(3))
        c.boottime += 86400
        sp.expire()
    # Readings of day 0 and 1 are older than two days; days 2 and 3 are kept.
    kept = [e.seq for e in envelopes(sp) if not e.HasField("dropped")]
    assert kept == [7, 8, 9, 10, 11, 12]
    assert sp.drop_totals() == {"ttl": 6}
    assert sp.oldest_age_s() == 2 * 86400


def test_a_salvaged_tombstone_is_never_dropped_again_so_its_range_survives(tmp_path: Path):
    import sqlite3

    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(10))
    c.boottime += 4000
    assert sp.expire() == 10  # one tombstone for seqs 1..10
    sp.close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")  # quarantine it
    db.commit()
    db.close()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    assert sp.quarantines and sp.quarantines[0].salvaged == 1
    sp.commit(rows(5))
    assert sp.make_room(1 << 30) == 5  # only the new readings go, never the tombstone
    stones = [(e.seq, e.dropped.last_seq, e.dropped.reason) for e in envelopes(sp)]
    assert (1, 10, "ttl") in stones
    c.boottime += 4000
    assert sp.expire() == 0


def test_a_failed_reject_new_commit_leaves_no_numbered_gap(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c)
    sp.commit(rows(3))
    broken = sp.bounds._write_drop

    def fail(*a, **kw):
        import sqlite3
        raise sqlite3.OperationalError("database or disk is full")

    sp.bounds._write_drop = fail  # type: ignore[method-assign]
    import contextlib

    from bridge.shared.errors import SpoolFull
    with contextlib.suppress(SpoolFull):
        sp.commit_dropped(rows(4), "spool_full")
    assert sp.next_seq == 4, "nothing was recorded, so nothing was numbered"
    sp.bounds._write_drop = broken  # type: ignore[method-assign]
    assert sp.commit_dropped(rows(4), "spool_full") == 4
    sp.commit(rows(1))
    seqs = [(e.seq, e.dropped.last_seq if e.HasField("dropped") else e.seq)
            for e in envelopes(sp)]
    assert seqs == [(1, 1), (2, 2), (3, 3), (4, 7), (8, 8)]


def test_rows_held_for_a_batch_in_flight_are_never_dropped_whatever_the_lane(tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=3600)
    sp.commit(rows(30))
    # A drain: the backlog cursor is at 0, a live batch (rids 21..30) is in flight.
    batch = sp.read_after(20, max_rows=10, max_bytes=1 << 30, hold=True)
    assert [r for r, _ in batch] == list(range(21, 31))
    c.boottime += 4000
    assert sp.expire() == 20
    assert sp.make_room(1 << 30) == 0
    kept = [e.seq for e in envelopes(sp) if not e.HasField("dropped")]
    assert kept == list(range(21, 31))
    sp.unhold(21)
    assert sp.expire() == 10


def test_tombstones_piled_at_the_front_during_an_outage_never_hide_readings_from_expiry(
        tmp_path: Path):
    c = Clocks()
    sp = open_spool(tmp_path / "s.db", c, max_age_s=10)
    for _ in range(5):  # an uplink that never comes back: each pass leaves a tombstone
        sp.commit(rows(1))
        c.boottime += 11
        assert sp.expire(limit=3) == 1
    # five tombstones, older than max_age themselves, lie before the next reading
    sp.commit(rows(1))
    c.boottime += 11
    assert sp.expire(limit=3) == 1
    assert [e.seq for e in envelopes(sp) if not e.HasField("dropped")] == []
