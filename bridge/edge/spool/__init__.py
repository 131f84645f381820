"""The agent's durable, bounded queue of envelopes between the plant broker and the uplink.

On-disk format (SQLite 3, one file, WAL mode, ``synchronous=FULL`` for appends)
==============================================================================

``meta(key TEXT PRIMARY KEY, value)``
    ``schema_version`` = 1; ``site_id``; ``epoch`` (random, 1..2^63-1, chosen when the file is
    created); ``next_seq`` (the seq the next new envelope gets; never decreases); ``readings``
    and ``bytes`` (running totals of the ``readings`` table, kept in the same transactions so
    that opening a large spool does not scan it); ``created_ns``; ``clock`` (the spool clock's
    last snapshot, JSON, saved with every commit); ``state/<source>/<key>``: a decoder's state
    (Sparkplug birth certificates, see ``bridge.edge.codecs.sparkplug``), written in the same
    transaction as the messages that changed it. A salvaged file starts without it.
``readings(rid INTEGER PRIMARY KEY, envelope BLOB, prio INTEGER, at REAL)``
    One row per message, in commit order (``rid``, local to this file). ``prio`` is its class (0
    telemetry, 1 event, 2 alarm; 99 a tombstone, never dropped); ``at`` is the spool clock
    (``bridge.edge.spool.clock``: elapsed seconds, immune to wall-clock jumps) at commit.
    ``envelope`` is the serialised ``bridge.v1.Envelope``; its identity ``(site_id, epoch,
    seq)`` is what the ingest dedupes on. For envelopes created in this file ``epoch`` is the
    file's and ``seq`` runs with ``rid``; envelopes salvaged from a quarantined file keep their
    original identity, so a reading that was already delivered is recognised as a duplicate,
    never doubled. Rows are deleted only
    once an ingest node answered COMMITTED or DUPLICATE for them (or REJECTED, after they were
    copied to ``dead_letters``).
``drops(id INTEGER PRIMARY KEY, at_ns, reason, epoch, first_seq, last_seq, count)``
    Every reading a bound forced out (older than ``max_age_s``: ``ttl``; the spool full past
    the backpressure window: ``spool_full``), one row per contiguous seq range. The same range
    is sent on as a *tombstone* envelope (``dropped`` set, no values) in place of the readings,
    so the ingest and the consumers see the gap by name instead of waiting for it.
``dead_letters(id INTEGER PRIMARY KEY, at_ns, source, topic, payload BLOB, reason, detail,
size, attempts, last_attempt_ns)``
    Messages that will never be sent (undecodable payloads, ingest rejections), kept for an
    operator; written in the same transaction that lets the broker message be acked.
    ``payload`` holds at most the first ``dead_letter_payload_bytes`` of the message and
    ``size`` its full length. The table is bounded by ``dead_letters_max`` rows and
    ``dead_letters_max_bytes`` (payload, topic and detail), oldest evicted first in the same
    transaction, each eviction counted; its bytes count inside ``max_bytes`` and their bound
    is at most a tenth of it, so dead letters can never fill the spool and stop readings.
    Schema version 1 files (no ``size``) are migrated in place at open. ``attempts`` and
    ``last_attempt_ns`` record each re-drive that failed (``bridge.edge.redrive``); they were
    added within version 2 (at open, if missing), so an older agent still reads the file. A replay
    deletes the rows it appended readings for in the same transaction as the appends;
    ``meta.dead_replayed`` and ``meta.dead_purged`` count re-driven and purged letters.
``recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, PRIMARY KEY (source, slot))``
    A ring, per source, of the digests of the last ``ring_size`` messages committed (``n``
    counts messages per source; ``slot`` = ``n`` mod ``ring_size``). A broker redelivers
    (MQTT DUP=1, AMQP ``redelivered``) only messages it sent but saw no ack for, and it never
    has more unacked than the receive window, so a ring twice that size holds every message
    that can come back. A *flagged* redelivery whose digest is in the ring is acked without
    being stored again; unflagged identical payloads are separate readings. The ring belongs
    to the source's intake (``bridge.edge.redelivery``): it computes the rows, the spool
    writes them in the transaction of their messages and hands them back at start
    (``load_ring``). A file that replaces a quarantined one starts with no rows; the intake
    keeps its ring in memory across the replacement.

Invariants
==========
1. A broker message is acked only after the transaction holding its envelope (or its dead
   letter, or its ring match) has committed with ``synchronous=FULL``: an acked message survives
   a crash or power loss.
2. New envelopes get dense, strictly increasing seqs per (site_id, epoch), never reused:
   ``next_seq`` is stored in the same transaction as the rows it numbers.
3. Deletes are not fsynced on their own (``synchronous=NORMAL`` for them); the WAL is
   append-only, so a crash can only undo recent deletes, whose rows are then resent and
   answered DUPLICATE by the ingest. Never a loss, never a double in the consumed stream.
4. ``meta.readings``/``meta.bytes`` equal the count and total envelope length of ``readings``.
5. ``readings`` bytes plus ``dead_letters`` bytes never exceed ``max_bytes`` through a commit.
6. One writer: ``<path>.lock`` is ``flock``-ed (``bridge.shared.files.OwnerLock``) before
   anything is read and held until ``close``; it holds the owner's PID for the error a
   second agent gets. The kernel releases it when the owner dies (kill -9 included). Readers
   (``read_dead_letters``) take no lock and run beside the agent.

Bounds
======
``max_bytes`` bounds the envelope bytes held. A commit that would exceed it raises
``SpoolFull`` and nothing of it is written: the caller stops acking the broker (backpressure),
so readings wait in the broker's persistent session. ``PRAGMA max_page_count`` caps the file a
little above ``max_bytes``, and a full disk (``SQLITE_FULL``, ENOSPC) is ``SpoolFull`` too.

Headroom: deleting rows still writes to the WAL, and a WAL never shrinks by itself. Appends
are refused (``SpoolFull``, backpressure) while the filesystem has less than ``HEADROOM`` (8
MiB, a whole WAL and its checkpoint) free beyond twice the append: the intake never takes the
space deletes need, so acknowledged rows can always be released. When the disk is full anyway
(another process filled it), the spool checkpoints with ``TRUNCATE`` (the WAL's space goes
back to the disk) and retries; ``<path>.reserve``, a preallocated file of ``reserve_bytes``,
is given up if that is not enough: it must cover a checkpoint of the whole WAL, which is kept
at or below 4 MiB (``wal_autocheckpoint`` 1000 pages, ``journal_size_limit``), so
``reserve_bytes`` >= 8 MiB. So the spool can always shrink, and a full disk never wedges it.
While space is tight every release is followed by an incremental vacuum (the file is created
with ``auto_vacuum=INCREMENTAL``) and a truncating checkpoint; the reserve is put back once
the disk has room for it twice over.

Recovery
========
SQLite's WAL recovery handles torn writes after a crash or power loss. A file that SQLite
reports as corrupt (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``: a wrong header, garbage pages, a
truncated file), or whose ``schema_version`` or tables are not this version's, is never
repaired in place and never stops the agent:

1. the file and its ``-wal``/``-shm`` are renamed ``<path>.corrupt-<UTC timestamp>`` (kept for
   an operator, never deleted);
2. every ``readings`` row that can still be read and parses as an envelope of this site is
   copied, in ``rid`` order and with its identity unchanged, into a fresh file with a new
   epoch; what could not be read is counted;
3. a ``spool.quarantined`` event (level error) and counters report it; the agent continues.

This happens at open or, when corruption shows up later, on the operation that hit it; that
operation raises ``SpoolReset`` so callers drop positions (rids) that belonged to the old file.
A spool of another ``site_id`` is a configuration mistake, not corruption: ``SpoolError``.

The package
===========
``Spool`` (``core``) owns the open file and its parts, each an object it holds and hands the
others it needs; no part calls back into the spool:

- ``file``: ``SpoolFile``, the connection and the meta row's figures, the state every part
  works on; ``schema``: ``open_file`` (pragmas, tables, migrations, the meta row);
- ``headroom``: ``Headroom`` (the reserve file, the space deletes need);
- ``deadletters``: ``DeadLetters`` (the bounded table) and the CLI's offline reader;
- ``send``: ``Holds`` (rows the uplink has in hand) and ``SendSide`` (reads after a position,
  release);
- ``bounds``: ``Bounds`` (expiry, drops, tombstones; never a held row);
- ``recovery``: ``Recovery`` (quarantine and salvage);
- ``fresh``: the newest rows in memory, so live batches are not read back from the file (its
  own invariant); ``clock``: the spool clock; ``base``: constants, records, ``SpoolFigures``
  and the one ``transaction`` helper every write goes through; ``facade``: ``AsyncSpool``.

``core`` runs the append path itself (the seal gives each envelope its identity in the
commit) and every cross-part step (a release on a full disk asks ``Headroom`` for space; a
corrupt file is replaced by ``Recovery`` and the ``Holds`` cleared).

Threads: every operation is synchronous and runs on one thread (``AsyncSpool`` gives the
spool its own, so fsyncs never block the event loop). Three things are shared with the event
loop, each made to be: the fresh tail (its lock; a take never waits for it), ``Holds`` (its
lock) and ``Spool.published``, an immutable ``SpoolFigures`` swapped whole after every
operation.
"""

from __future__ import annotations

from bridge.edge.spool.base import (
    HEADROOM,
    PRIORITIES,
    SCHEMA_VERSION,
    TOMBSTONE,
    WAL_LIMIT,
    DeadLetter,
    DeadRow,
    Pending,
    Quarantine,
    SpoolFigures,
    transaction,
)
from bridge.edge.spool.core import Spool
from bridge.edge.spool.deadletters import read_dead_letters
from bridge.edge.spool.facade import AsyncSpool
from bridge.shared.errors import SpoolError, SpoolFull, SpoolReset

__all__ = [
    "HEADROOM",
    "PRIORITIES",
    "SCHEMA_VERSION",
    "TOMBSTONE",
    "WAL_LIMIT",
    "AsyncSpool",
    "DeadLetter",
    "DeadRow",
    "Pending",
    "Quarantine",
    "Spool",
    "SpoolError",
    "SpoolFigures",
    "SpoolFull",
    "SpoolReset",
    "read_dead_letters",
    "transaction",
]
