"""The intake: one source's path into the spool (decode, dead-letter, group commit, then ack).

Invariant (docs/architecture.md, "Ownership hand-offs"): a broker message is acked only after
the spool transaction holding its envelope, its dead letter or its skip committed, and acks go
out in receive order. A commit that fails is retried with backoff and nothing is acked
meanwhile. A full spool first stops the acks (backpressure: the broker holds the readings);
after ``spool.backpressure_s`` it applies ``spool.full_policy``: ``drop_oldest`` forces out
the oldest readings as tombstones, ``reject_new`` numbers the new ones and keeps only their
tombstone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from bridge.edge.codecs import Decoder, make_decoder
from bridge.edge.envelope import prepare_envelope
from bridge.edge.redelivery import RedeliveryRing
from bridge.edge.sources.base import Message, Source
from bridge.edge.spool import AsyncSpool, DeadLetter, Pending
from bridge.shared import defaults as D
from bridge.shared.config import (
    SourceConfig,
    SpoolConfig,
)
from bridge.shared.errors import DecodeError, SpoolFull, SpoolReset
from bridge.shared.kinds import FullPolicy, ReadingClass
from bridge.shared.pacing import Backoff
from bridge.shared.telemetry import AgentMetrics, event

PREPARE_SLICE = 64  # messages decoded between two turns of the event loop


@dataclass(frozen=True, kw_only=True)
class IntakePolicy:
    """How one source's messages are committed: group size, bounds and the full-spool policy."""

    commit_max: int = D.COMMIT_MAX_MESSAGES
    commit_max_bytes: int = D.COMMIT_MAX_BYTES
    max_payload_bytes: int = D.MAX_PAYLOAD_BYTES
    priority: tuple[tuple[str, ReadingClass], ...] = ()
    backpressure_s: float = D.BACKPRESSURE_S
    full_policy: FullPolicy = D.FULL_POLICY
    dedupe_retransmissions: bool = D.DEDUPE_RETRANSMISSIONS
    ring_size: int = 0  # the redelivery ring (bridge.edge.redelivery); 0: none

    @classmethod
    def of(cls, spool: SpoolConfig, source: SourceConfig) -> IntakePolicy:
        return cls(commit_max=spool.commit_max_messages, commit_max_bytes=spool.commit_max_bytes,
                   max_payload_bytes=source.decode.max_payload_bytes,
                   priority=spool.priority, backpressure_s=spool.backpressure_s,
                   full_policy=spool.full_policy,
                   dedupe_retransmissions=source.decode.dedupe_retransmissions,
                   ring_size=2 * source.window)


def decoder_for(source: SourceConfig,
                notice: Callable[[str, dict[str, Any]], None]) -> Decoder:
    """The decoder ``source``'s config asks for (the agent's intake, and a dead letter's
    replay, ``bridge.edge.redrive``); ``notice`` hears the Sparkplug decoder's events."""
    dc = source.decode
    sp = dc.sparkplug
    if sp is None:
        return make_decoder(codec=dc.codec, mappings=list(dc.mappings), notice=notice,
                            rebirth=False, rebirth_on_gap=False, rebirth_interval_s=0.0)
    return make_decoder(codec=dc.codec, mappings=list(dc.mappings), notice=notice,
                        rebirth=sp.rebirth, rebirth_on_gap=sp.rebirth_on_gap,
                        rebirth_interval_s=sp.rebirth_interval_s,
                        rebirth_max_per_s=sp.rebirth_max_per_s,
                        max_edge_nodes=sp.max_edge_nodes,
                        max_decompressed_bytes=sp.max_decompressed_bytes)


def priority_of(priority: tuple[tuple[str, ReadingClass], ...], topic: str) -> int:
    """The rank of the first ``spool.priority`` pattern's class that ``topic`` matches
    (telemetry's when none does)."""
    return next((cls.rank for pattern, cls in priority
                 if mqtt.topic_matches_sub(pattern, topic)), ReadingClass.TELEMETRY.rank)


def digest(topic: str, payload: bytes) -> bytes:
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()


class Intake:
    """One source's path into the spool: group commit, then ack in receive order."""

    def __init__(self, *, source: Source, spool: AsyncSpool, site_id: str, decoder: Decoder,
                 metrics: AgentMetrics, clock: ClockSync,
                 policy: IntakePolicy | None = None) -> None:
        p = policy or IntakePolicy()
        self.policy = p
        self.dedupe_retransmissions = p.dedupe_retransmissions
        self.priority = p.priority
        self.backpressure_s = p.backpressure_s
        self.full_policy = p.full_policy
        self._prio_cache: dict[str, int] = {}
        self.source, self.spool, self.site_id = source, spool, site_id
        self.decoder = decoder
        self.max_payload_bytes = p.max_payload_bytes
        self.commit_max = p.commit_max
        self.commit_max_bytes = p.commit_max_bytes
        self.metrics = metrics
        self.clock = clock
        self._stopping = asyncio.Event()
        self.committed_messages = 0
        self.ring: RedeliveryRing | None = None  # this source's, loaded at start (run)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        name = self.source.info.name
        self.decoder.restore(await self.spool.load_state(name))
        if self.policy.ring_size > 0:
            self.ring = RedeliveryRing(self.policy.ring_size, await self.spool.load_ring(name))
        backoff = Backoff(base_s=0.05, cap_s=2.0)
        full_since: float | None = None
        while not self._stopping.is_set():
            take = asyncio.ensure_future(self.source.take(self.commit_max))
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
            if take not in done:
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await take
                # The source may have handed us messages as we stopped: commit and ack them.
                if take.cancelled() or take.exception() is not None:
                    break
            stop.cancel()
            # Groups bounded in payload bytes too: a commit holds the spool's thread, where the
            # sender reads what the fresh tail no longer holds.
            for messages in self._groups(take.result()):
                digests: list[bytes] = []
                pending, dead, skipped, ignored = await self._prepare_sliced(messages, digests)
                state = {f"{name}/{k}": v for k, v in self.decoder.take_state().items()}
                taken = len(pending)  # stored, or numbered and dropped by reject_new
                while True:
                    try:
                        await self.spool.commit(pending, dead, state, self._ring_rows(digests))
                        backoff.reset()
                        full_since = None
                        break
                    except SpoolReset:
                        # the file was replaced (bridge.edge.spool Recovery): commit again
                        continue
                    except SpoolFull as exc:
                        # Backpressure: nothing acked, so the broker holds the rest.
                        if self._stopping.is_set():
                            return
                        self.metrics.spool_full.inc()
                        now = time.monotonic()
                        if full_since is None:
                            full_since = now
                            event("spool.full", level=logging.WARNING, source=name,
                                  reason=str(exc), waiting=len(messages),
                                  policy_after_s=self.backpressure_s, policy=self.full_policy)
                        if now - full_since >= self.backpressure_s and await self._apply_policy(
                                pending):
                            if self.full_policy == FullPolicy.REJECT_NEW:
                                pending, digests = [], []
                            continue
                        await backoff.sleep()
                    except Exception as exc:  # noqa: BLE001 - never let the intake task die
                        # Nothing was written or acked; the broker keeps the messages. Visible,
                        # retried with backoff, and the agent stays up to send what it holds.
                        if self._stopping.is_set():
                            return
                        self.metrics.spool_commit_errors.inc()
                        event("spool.commit_failed", level=logging.ERROR, source=name,
                              reason=f"{type(exc).__name__}: {exc}"[:300], waiting=len(messages))
                        await backoff.sleep()
                if self.ring is not None:
                    for dg in digests:
                        self.ring.push(dg)
                await self.source.ack(messages)
                self.committed_messages += taken
                self.metrics.source_messages.labels(name).inc(len(messages))
                self.metrics.spool_commits.inc()
                if skipped:
                    self.metrics.source_redelivered_skipped.labels(name).inc(skipped)
                    event("source.redelivery_skipped", source=name, messages=skipped,
                          reason="already in spool")
                for reason, n in ignored.items():
                    if reason == "retransmission":
                        self.metrics.source_retransmissions.labels(name).inc(n)
                    self.metrics.source_skipped.labels(name, reason).inc(n)
                    event("source.skipped", source=name, messages=n, reason=reason)
                for req in self.decoder.take_requests():
                    self.source.publish(req)
                for d in dead:
                    self.metrics.dead_letters.labels(d.reason).inc()
                if dead:
                    event("intake.dead_lettered", level=logging.WARNING, source=name,
                          messages=len(dead), reason=dead[0].reason, detail=dead[0].detail,
                          topic=dead[0].topic)
                self.spool.appended.set()

    def _ring_rows(self, digests: list[bytes]) -> list[tuple[str, int, int, bytes]]:
        """The ring's rows for a group's envelopes, written with them; pushed after."""
        return [] if self.ring is None else self.ring.rows_for(self.source.info.name, digests)

    def _groups(self, messages: list[Message]) -> list[list[Message]]:
        """``messages`` in receive order, cut into groups of at most ``commit_max_bytes`` of
        payload (a larger single message is a group of its own)."""
        out: list[list[Message]] = [[]]
        size = 0
        for m in messages:
            if out[-1] and size + len(m.payload) > self.commit_max_bytes:
                out.append([])
                size = 0
            out[-1].append(m)
            size += len(m.payload)
        return out

    async def _apply_policy(self, pending: list[Pending]) -> bool:
        """The spool stayed full past the backpressure window: drop by policy (recorded)."""
        try:
            if self.full_policy == FullPolicy.REJECT_NEW:
                n = await self.spool.commit_dropped(pending, "spool_full")
            else:
                # Free 5 % of the bound at a time: not one drop per message.
                n = await self.spool.make_room(max(self.spool.max_bytes // 20, 1))
        except (SpoolFull, SpoolReset):
            return False  # the disk itself is full: keep applying backpressure
        if n:
            self.metrics.spool_dropped.labels("spool_full").inc(n)
            self.spool.appended.set()  # tombstones to send
        return n > 0

    def _prio(self, topic: str) -> int:
        prio = self._prio_cache.get(topic)
        if prio is None:
            prio = priority_of(self.priority, topic)
            if len(self._prio_cache) < 100_000:
                self._prio_cache[topic] = prio
        return prio

    async def _prepare_sliced(self, messages: list[Message], digests: list[bytes]
                              ) -> tuple[list[Pending], list[DeadLetter], int, Counter[str]]:
        """``_prepare`` in slices of ``PREPARE_SLICE`` messages, letting the event loop run
        between them: a group of 1,000 Sparkplug messages of 50 metrics takes about 140 ms to
        decode (``python -m bench.decode``), and the sender's calls and the probes must not
        wait that long."""
        pending: list[Pending] = []
        dead: list[DeadLetter] = []
        skipped = 0
        ignored: Counter[str] = Counter()
        seen: set[bytes] = set()
        for start in range(0, len(messages), PREPARE_SLICE):
            if start:
                await asyncio.sleep(0)
            p, d, s, i = self._prepare(messages[start:start + PREPARE_SLICE], seen, digests)
            pending += p
            dead += d
            skipped += s
            ignored += i
        return pending, dead, skipped, ignored

    def _prepare(self, messages: list[Message], seen: set[bytes], digests: list[bytes]
                 ) -> tuple[list[Pending], list[DeadLetter], int, Counter[str]]:
        """Decode a batch: envelopes to append, dead letters, redeliveries, skips by reason.
        ``seen``: the digests of the commit group's readings so far; this slice's are added,
        and appended to ``digests`` in the order of the envelopes (the ring's rows)."""
        info = self.source.info
        now = time.time_ns()
        synced = self.clock.synced()
        pending: list[Pending] = []
        dead: list[DeadLetter] = []
        skipped = 0
        ignored: Counter[str] = Counter()
        ring = self.ring
        limit = self.max_payload_bytes
        for m in messages:
            try:
                d = digest(m.topic, m.payload)
                if m.redelivered and ring is not None and ring.claim(d):
                    skipped += 1
                    continue
                if self.dedupe_retransmissions and (
                        d in seen or (ring is not None and ring.holds(d))) and \
                        self.decoder.stamped(m.topic, m.payload):
                    # The same bytes with the publisher's own seq: its QoS 1 resend after a
                    # broker restart, not a new reading (see docs/architecture.md).
                    ignored["retransmission"] += 1
                    continue
                if len(m.payload) > limit:
                    dead.append(DeadLetter(info.name, m.topic, m.payload, "oversize",
                                           f"{len(m.payload)} bytes > max_payload_bytes={limit}"))
                    continue
                decoded = self.decoder.decode(m.topic, m.payload)
                if decoded.skip is not None:
                    ignored[decoded.skip] += 1
                    continue
                env = prepare_envelope(site_id=self.site_id, source=info,
                                       topic=m.topic, decoded=decoded, codec=self.decoder.codec,
                                       gateway_time_ns=now, clock_synced=synced)
            except DecodeError as exc:
                dead.append(DeadLetter(info.name, m.topic, m.payload, exc.reason, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - one message's bug must not stop the queue
                dead.append(DeadLetter(info.name, m.topic, m.payload, "intake_error",
                                       f"{type(exc).__name__}: {exc}"[:300]))
                continue
            seen.add(d)
            digests.append(d)
            pending.append(Pending(prio=self._prio(m.topic), envelope=env))
        return pending, dead, skipped, ignored



class ClockSync:
    """Whether the kernel considers the wall clock synchronised (adjtimex), cached for 10 s."""

    _TIME_ERROR = 5

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name, use_errno=True) if name else None
        self._checked = 0.0
        self._synced = False

    def synced(self) -> bool:
        now = time.monotonic()
        if now - self._checked > 10.0:
            self._checked = now
            self._synced = self._query()
        return self._synced

    def _query(self) -> bool:
        if self._libc is None:
            return False
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = self._libc.adjtimex(buf)
        return bool(state >= 0 and state != self._TIME_ERROR)
