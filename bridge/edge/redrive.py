"""Dead letters re-driven: replayed through the current config, or purged (``bridge
dead-letters replay`` and ``purge``).

Both open the spool as its one writer (``spool.path``'s owner lock, ``bridge.shared.files``),
so they refuse to run beside a live agent (exit 2, naming its PID): stop the agent, re-drive, start
it again. The agent then sends what a replay appended like any backlog, and exports the
totals the spool keeps (``bridge_dead_letters_replayed_total``, ``..._purged_total``). Each
run is also one structured event (``dead_letters.replayed``, ``dead_letters.purged``).

**Replay.** The selected dead letters are decoded again, oldest first (their arrival order),
with the current config's decoder of their source, which starts from the Sparkplug birth
state the spool holds (read only: a replay never changes it). What decodes now is appended
with a fresh seq, in that order, in the same transaction that deletes its row; a message the
decoder skips by design (a Sparkplug STATE, ...) leaves the table as ``skipped``. What still
fails keeps its row with the new reason and detail, ``attempts`` counted and
``last_attempt_ns`` set. A letter cut to ``dead_letter_payload_bytes`` cannot be replayed
(``truncated``), nor one of a source no longer in the config (``unknown_source``).

**Purge.** Deletes the selected letters: by id, reason or age (``--all`` for every one).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.edge.envelope import SourceInfo, prepare_envelope
from bridge.edge.intake import ClockSync, decoder_for, priority_of
from bridge.edge.spool import DeadRow, Pending, Spool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import AgentConfig, SourceConfig
from bridge.shared.errors import DecodeError
from bridge.shared.telemetry import event

REPLAY_BATCH = 1000  # dead letters per transaction


@dataclass
class Replayed:
    """What one replay did."""

    replayed: int = 0    # appended as readings, rows deleted
    skipped: int = 0     # decoded to nothing by design, rows deleted
    failed: Counter[str] = field(default_factory=Counter)  # kept, by their new reason
    first_seq: int | None = None
    last_seq: int | None = None


def open_spool(config: AgentConfig) -> Spool:
    """The agent's spool, as the agent opens it (its one writer)."""
    sc = config.spool
    return Spool(path=sc.path, site_id=config.site_id, max_bytes=sc.max_bytes,
                 reserve_bytes=sc.reserve_bytes, max_age_s=sc.max_age_s,
                 dead_letter_payload_bytes=sc.dead_letter_payload_bytes,
                 dead_letters_max=sc.dead_letters_max,
                 dead_letters_max_bytes=sc.dead_letters_max_bytes)


def replay(config: AgentConfig, *, ids: Sequence[int] = (), reasons: Sequence[str] = ()
           ) -> Replayed:
    """Replay the selected dead letters (all when no selector is given)."""
    spool = open_spool(config)
    try:
        rows = spool.dead_rows(ids=ids, reasons=reasons)
        sources = {s.name: s for s in config.sources}
        decoders: dict[str, Any] = {}
        out = Replayed()
        synced = ClockSync().synced()
        for start in range(0, len(rows), REPLAY_BATCH):
            pending: list[Pending] = []
            done: list[int] = []
            failed: list[tuple[int, str, str]] = []
            for row in rows[start:start + REPLAY_BATCH]:
                verdict = _decode(config, spool, sources, decoders, row, synced)
                if isinstance(verdict, tuple):
                    failed.append((row.id, *verdict))
                    out.failed[verdict[0]] += 1
                    continue
                done.append(row.id)
                if verdict is None:
                    out.skipped += 1
                    continue
                pending.append(Pending(prio=priority_of(config.spool.priority, row.letter.topic),
                                       envelope=verdict))
            first = spool.next_seq
            spool.replay_dead(pending, done, failed, time.time_ns())
            if pending:
                out.first_seq = first if out.first_seq is None else out.first_seq
                out.last_seq = spool.next_seq - 1
            out.replayed += len(pending)
        event("dead_letters.replayed", level=logging.WARNING if out.failed else logging.INFO,
              spool=str(config.spool.path), selected=len(rows), replayed=out.replayed,
              skipped=out.skipped, still_failing=dict(out.failed), first_seq=out.first_seq,
              last_seq=out.last_seq)
        return out
    finally:
        spool.close()


def _decode(config: AgentConfig, spool: Spool, sources: dict[str, SourceConfig],
            decoders: dict[str, Any], row: DeadRow, synced: bool
            ) -> pb.Envelope | tuple[str, str] | None:
    """The envelope a dead letter decodes to now, None (skipped by design), or why not."""
    letter = row.letter
    if letter.size is not None and letter.size > len(letter.payload):
        return ("truncated", f"only the first {len(letter.payload)} of {letter.size} bytes "
                "were kept (spool.dead_letter_payload_bytes)")
    source = sources.get(letter.source)
    if source is None:
        return ("unknown_source", f"source {letter.source!r} is not in {config.file}")
    decoder = decoders.get(source.name)
    if decoder is None:
        decoder = decoders[source.name] = decoder_for(source, _quiet)
        decoder.restore(spool.load_state(source.name))
    if len(letter.payload) > source.decode.max_payload_bytes:
        return ("oversize", f"{len(letter.payload)} bytes > max_payload_bytes="
                f"{source.decode.max_payload_bytes}")
    try:
        decoded = decoder.decode(letter.topic, letter.payload)
        if decoded.skip is not None:
            return None
        info = SourceInfo(name=source.name, protocol=source.protocol, broker=source.url)
        return prepare_envelope(site_id=config.site_id, source=info,
                                topic=letter.topic, decoded=decoded, codec=decoder.codec,
                                gateway_time_ns=time.time_ns(), clock_synced=synced)
    except DecodeError as exc:
        return (exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one letter's bug must not stop the replay
        return ("intake_error", f"{type(exc).__name__}: {exc}"[:300])


def _quiet(kind: str, fields: dict[str, Any]) -> None:
    event(f"sparkplug.{kind}", level=logging.INFO, during="dead_letters.replay", **fields)


def purge(config: AgentConfig, *, ids: Sequence[int] = (), reasons: Sequence[str] = (),
          older_than_s: float | None = None, everything: bool = False) -> int:
    """Delete the selected dead letters; how many. Without a selector, only ``everything``
    deletes them all (a bare purge is refused by the CLI)."""
    if not (ids or reasons or older_than_s is not None or everything):
        raise ValueError("purge needs a selector or everything=True")
    spool = open_spool(config)
    try:
        before = None if older_than_s is None else time.time_ns() - int(older_than_s * 1e9)
        rows = spool.dead_rows(ids=ids, reasons=reasons, before_ns=before)
        n = spool.purge_dead([r.id for r in rows])
        event("dead_letters.purged", level=logging.WARNING, spool=str(config.spool.path),
              purged=n, ids=list(ids) or None, reasons=list(reasons) or None,
              older_than_s=older_than_s)
        return n
    finally:
        spool.close()
