"""The scale-out store: any number of stateless ingest replicas in front of one JetStream stream.

Subject layout
==============
One stream (``stream``, default ``BRIDGE``; R3, file storage, ``allow_atomic``) holds every
reading of a cloud on subjects ``<prefix>.<site>.<epoch>`` (default prefix ``bridge.r``):
``<site>`` is the site id with ``.`` written as ``_`` (site ids never contain ``_``, so the
mapping is reversible), ``<epoch>`` the epoch as 16 lowercase hex digits. One subject is one
(site, epoch): its messages are that stream's readings in the order they were committed.

Message format
==============
The data is one serialised ``bridge.v1.Envelope``. Headers: ``Bridge-Site``, ``Bridge-Epoch``
(16 hex digits), ``Bridge-Seq`` (decimal), and on a tombstone ``Bridge-Last-Seq`` and
``Bridge-Reason``. A consumer with a plain NATS client needs nothing else (docs/consuming.md).

Dedupe invariant (exact, windowless, any number of replicas)
============================================================
*The set of seqs stored on a subject is the authority*, and every append to a subject is
conditional on the subject's last stream sequence (``Nats-Expected-Last-Subject-Sequence``),
so appends to one (site, epoch) are serialised across all replicas by JetStream itself:

1. A replica keeps, per subject it has served, the ledger of the seqs stored there (the same
   ``StreamLedger`` as the SQLite store: watermark plus intervals) and the subject's last
   stream sequence that ledger reflects. The first time it meets a subject it reads the
   subject's headers once (``headers_only``) to build both.
2. It computes what of a batch is new against that ledger (tombstones overlapping known seqs
   are narrowed to their new sub-ranges, as in the SQLite store) and publishes only that, as one
   atomic batch (ADR-50; at most 1,000 messages each) whose first message expects the last
   subject sequence it knows. JetStream applies all of it or none of it.
3. If another replica appended in between, JetStream refuses the batch (10071, wrong last
   sequence) and nothing is stored; the replica reads the subject's new messages, updates its
   ledger and tries again with what is still new. Two replicas racing on the same batch: one
   stores it, the other finds every seq present and answers DUPLICATE.
4. A publish whose outcome is unknown (a timeout, a lost connection, a leader change) marks the
   subject's ledger stale; the next append catches up from the stored messages first. An
   unknown outcome is never answered COMMITTED: the call fails, the agent retries, and the
   retry finds the readings (DUPLICATE) or stores them.
5. The ingest acks only after JetStream's PubAck, which comes after the write is replicated to
   a quorum (2 of 3) and, with ``sync_interval: always`` on the servers, fsynced there.

Order of batches does not matter (the ledger is a set, not a cursor), and ``Nats-Msg-Id`` is
not used: its window is time-bound and held in server memory, and inside an atomic batch one
duplicate id rejects the whole batch (10201), while the conditional append already makes every
write exact.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bridge.config import JetStreamSettings, site_id_problem
from bridge.errors import StoreUnavailable
from bridge.ingest.backend import StreamState
from bridge.ingest.ledger import Key, Ledger, StreamLedger
from bridge.ingest.store import COMMITTED, DUPLICATE, Incoming, narrow
from bridge.telemetry import IngestMetrics, event

ATOMIC_MAX = 1000  # messages per atomic batch (server limit)
# Wrong last (subject) sequence: 10071 names the actual one, 10164 (atomic batches) does not.
WRONG_LAST = (10071, 10164)


@functools.lru_cache(maxsize=16384)
def subject_token(site: str) -> str:
    """The subject token of a valid site id: ``.`` written as ``_``. Injective by
    construction: a valid id has no ``_`` (anything else is ``ValueError``, and the ingest
    refuses such an identity before it gets here), so two ids never share a subject."""
    if (problem := site_id_problem(site)) is not None:
        raise ValueError(f"not a site id, no subject: {problem}")
    return site.replace(".", "_")


def site_of(token: str) -> str:
    return token.replace("_", ".")


MARK_EVERY = 1000  # messages between two seek marks of a subject


@dataclass
class _Subject:
    ledger: StreamLedger = field(default_factory=StreamLedger)
    last: int = 0          # the subject's last stream sequence the ledger reflects
    stale: bool = True     # must catch up from ``last`` before the next append
    dropped: list[tuple[int, int, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Seek index for Subscribe: (stream seq, highest reading seq of every earlier message of
    # the subject), one mark per ~MARK_EVERY messages. A subject is in commit order, not seq
    # order, but the running maximum is monotonic, so a cursor can start at the last mark
    # whose maximum it already has: nothing it still needs lies before it.
    marks: list[tuple[int, int]] = field(default_factory=list)
    top: int = 0
    since_mark: int = MARK_EVERY

    def note(self, first_stream_seq: int, count: int, highest: int) -> None:
        """``count`` messages from ``first_stream_seq`` on (or later) were added."""
        if self.since_mark >= MARK_EVERY:
            self.marks.append((first_stream_seq, self.top))
            self.since_mark = 0
        self.top = max(self.top, highest)
        self.since_mark += count

    def start_for(self, cursor: int) -> int:
        """The stream sequence to read from for readings above ``cursor``."""
        i = bisect.bisect_right([m for _, m in self.marks], cursor) - 1
        return self.marks[i][0] if i >= 0 else 1


@dataclass(frozen=True, slots=True)
class _Out:
    """One message to append: the range ``first..last`` of item ``item`` of the batch."""

    item: int
    first: int
    last: int
    data: bytes
    headers: dict[str, str]


async def _ignore(_: bool) -> None:
    return None


class JetStreamStore:
    """Commits batches to JetStream with the invariant above; one instance per replica."""

    def __init__(self, *, settings: JetStreamSettings, max_epochs_per_site: int = 256,
                 on_health: Callable[[bool], Awaitable[None]] | None = None,
                 metrics: IngestMetrics | None = None) -> None:
        """``on_health(False)`` when the connection to the cluster is lost, ``(True)`` when it
        is back: the node's gRPC health follows, so agents move on at their next probe."""
        self.settings = settings
        self.on_health = on_health or _ignore
        self.metrics = metrics or IngestMetrics()
        self.max_epochs_per_site = max_epochs_per_site
        self.ledger = Ledger()
        self._subjects: dict[Key, _Subject] = {}
        self._nc: NATS | None = None
        self._batches = 0
        self.inline_commit: Callable[[Sequence[Incoming]], list[str]] | None = None
        # Validation and Acks run here (the commit itself is async network I/O).
        self.executor: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admit")

    def committed_now(self) -> None:
        return None

    def subject(self, key: Key) -> str:
        return f"{self.settings.prefix}.{subject_token(key[0])}.{key[1]:016x}"

    # -- connection and stream ---------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        try:
            # A few tries at start (a refused certificate or no server is a clear error at
            # once, and the service manager restarts us), then reconnect for ever.
            self._nc = await nats.connect(servers=list(s.servers), **s.connect_options(),
                                          max_reconnect_attempts=2,
                                          reconnect_time_wait=0.5, connect_timeout=5,
                                          error_cb=self._on_error,
                                          disconnected_cb=self._on_disconnect,
                                          reconnected_cb=self._on_reconnect)
        except (NatsError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to JetStream at {', '.join(s.servers)}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self._nc.options["max_reconnect_attempts"] = -1
        await self._ensure_stream()
        event("jetstream.connected", servers=list(s.servers), stream=s.stream)

    async def _on_error(self, exc: Exception) -> None:
        event("jetstream.error", level=logging.WARNING, reason=str(exc)[:200])

    async def _on_disconnect(self) -> None:
        for sub in self._subjects.values():
            sub.stale = True  # outcomes in flight are unknown now
        event("jetstream.disconnected", level=logging.WARNING)
        await self.on_health(False)

    async def _on_reconnect(self) -> None:
        event("jetstream.reconnected")
        await self.on_health(True)

    def _client(self) -> NATS:
        if self._nc is None or not self._nc.is_connected:
            raise StoreUnavailable("not connected to the JetStream cluster")
        return self._nc

    async def _api(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client().request(subject, json.dumps(body).encode(),
                                                timeout=self.settings.ack_timeout_s)
        except (NatsError, TimeoutError) as exc:
            raise StoreUnavailable(f"{subject}: {type(exc).__name__}: {exc}") from exc
        doc: dict[str, Any] = json.loads(resp.data)
        return doc

    async def _ensure_stream(self) -> None:
        s = self.settings
        info = await self._api(f"$JS.API.STREAM.INFO.{s.stream}", {})
        if "error" not in info:
            cfg = info.get("config", {})
            if not cfg.get("allow_atomic"):
                info = await self._api(f"$JS.API.STREAM.UPDATE.{s.stream}",
                                       {**cfg, "allow_atomic": True})
            if "error" in info:
                raise StoreUnavailable(f"stream {s.stream}: {info['error']}")
            return
        created = await self._api(f"$JS.API.STREAM.CREATE.{s.stream}", {
            "name": s.stream, "subjects": [f"{s.prefix}.>"], "num_replicas": s.replicas,
            "storage": "file", "retention": "limits", "discard": "old",
            "allow_atomic": True, "duplicate_window": 120_000_000_000})
        if "error" in created:
            raise StoreUnavailable(f"cannot create stream {s.stream}: {created['error']}")
        event("jetstream.stream_created", stream=s.stream, replicas=s.replicas,
              subjects=f"{s.prefix}.>")

    async def close(self, timeout: float = 5.0) -> bool:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._nc is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(self._nc.drain(), timeout)
        return True

    # -- reading a subject -----------------------------------------------------------------

    async def _catch_up(self, key: Key, sub: _Subject, upto: int | None = None) -> None:
        """Fold the subject's messages after ``sub.last`` into its ledger (headers only)."""
        nc = self._client()
        js = nc.jetstream(timeout=self.settings.ack_timeout_s)
        subject = self.subject(key)
        try:
            if upto is None:
                try:
                    last = await js.get_last_msg(self.settings.stream, subject)
                    upto = int(last.seq or 0)
                except NotFoundError:
                    upto = 0
            if upto > sub.last:
                psub = await js.subscribe(
                    subject, ordered_consumer=True, headers_only=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                          opt_start_seq=sub.last + 1))
                try:
                    while sub.last < upto:
                        msg = await psub.next_msg(timeout=self.settings.ack_timeout_s)
                        self._fold(key, sub, msg)
                finally:
                    with contextlib.suppress(NatsError, TimeoutError):
                        await psub.unsubscribe()
        except (NatsError, TimeoutError) as exc:
            raise StoreUnavailable(f"reading {subject}: {type(exc).__name__}: {exc}") from exc
        sub.stale = False

    def _fold(self, key: Key, sub: _Subject, msg: Msg) -> None:
        h = msg.headers or {}
        stream_seq = int(msg.metadata.sequence.stream)
        try:
            seq = int(h["Bridge-Seq"])
            last = int(h.get("Bridge-Last-Seq", seq))
            if not 0 < seq <= last < 2**63:
                raise ValueError(f"seq {seq}..{last}")
        except (KeyError, ValueError) as exc:
            # Not written by a replica (another publisher on our subjects): it holds no
            # reading of ours. Skipped, said once per message, and never a wedge.
            self.metrics.foreign_records.inc()
            event("jetstream.foreign_message", level=logging.WARNING,
                  subject=self.subject(key), stream_seq=stream_seq, reason=str(exc)[:100])
            sub.last = max(sub.last, stream_seq)
            return
        sub.ledger.add_range(seq, last)
        if "Bridge-Last-Seq" in h:
            sub.dropped.append((seq, last, h.get("Bridge-Reason", "")))
        sub.note(stream_seq, 1, last)
        sub.last = max(sub.last, stream_seq)

    async def _get(self, key: Key) -> _Subject:
        sub = self._subjects.get(key)
        if sub is None:
            sub = self._subjects[key] = _Subject()
        return sub

    # -- committing --------------------------------------------------------------------------

    async def commit(self, batch: Sequence[Incoming]) -> list[str]:
        """Per item ``COMMITTED``, ``DUPLICATE`` or a rejection reason (see the invariant)."""
        out: list[str] = [""] * len(batch)
        groups: dict[Key, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault((item.site_id, item.epoch), []).append(i)
        for key, idx in groups.items():
            if key not in self._subjects and key not in self.ledger.streams and \
                    self.ledger.epochs(key[0]) >= self.max_epochs_per_site:
                for i in idx:
                    out[i] = "too_many_epochs"
                continue
            sub = await self._get(key)
            async with sub.lock:
                for i, outcome in zip(idx, await self._commit_key(key, sub,
                                                                  [batch[i] for i in idx]),
                                      strict=True):
                    out[i] = outcome
        return out

    async def _commit_key(self, key: Key, sub: _Subject, items: list[Incoming]) -> list[str]:
        ours = [False] * len(items)  # some range of the item was stored by this call
        for _attempt in range(10):
            if sub.stale:
                await self._catch_up(key, sub)
            trial = sub.ledger.copy()
            msgs: list[_Out] = []
            for i, item in enumerate(items):
                last = item.seq if item.last_seq is None else item.last_seq
                for a, b in trial.missing(item.seq, last):
                    trial.add_range(a, b)
                    blob = item.envelope if (a, b) == (item.seq, last) else \
                        narrow(item.envelope, a, b)
                    msgs.append(_Out(i, a, b, blob, self._headers(
                        key, a, b if item.last_seq is not None else None, item.reason)))
            if not msgs:
                break
            wrong_last = await self._append(key, sub, msgs, ours)
            if wrong_last is None:
                break
            # Another replica appended first: catch up to what it wrote, then decide again.
            event("jetstream.append_raced", subject=self.subject(key), expected=sub.last,
                  actual=wrong_last or None)
            await self._catch_up(key, sub, upto=wrong_last or None)
        else:
            raise StoreUnavailable(f"{self.subject(key)}: still racing other replicas after "
                                   "10 tries")
        self.ledger.put(key, sub.ledger)
        return [COMMITTED if mine else DUPLICATE for mine in ours]

    def _headers(self, key: Key, seq: int, last: int | None, reason: str) -> dict[str, str]:
        h = {"Bridge-Site": key[0], "Bridge-Epoch": f"{key[1]:016x}", "Bridge-Seq": str(seq)}
        if last is not None:
            h["Bridge-Last-Seq"] = str(last)
            h["Bridge-Reason"] = reason
        return h

    async def _append(self, key: Key, sub: _Subject, msgs: list[_Out],
                      ours: list[bool]) -> int | None:
        """Append ``msgs`` in atomic batches, each expecting the subject's last sequence as
        this replica knows it; every stored batch is folded into the ledger at once. None when
        all are stored; else the subject's actual last sequence (0: unknown), another replica
        having appended first."""
        nc = self._client()
        subject = self.subject(key)
        for start in range(0, len(msgs), ATOMIC_MAX):
            chunk = msgs[start:start + ATOMIC_MAX]
            self._batches += 1
            batch_id = f"{id(self):x}-{self._batches}"
            try:
                for n, out in enumerate(chunk, 1):
                    h = {**out.headers, "Nats-Batch-Id": batch_id,
                         "Nats-Batch-Sequence": str(n)}
                    if n == 1:
                        h["Nats-Expected-Last-Subject-Sequence"] = str(sub.last)
                    if n < len(chunk):
                        await nc.publish(subject, out.data, headers=h)
                        continue
                    h["Nats-Batch-Commit"] = "1"
                    resp = await nc.request(subject, out.data, headers=h,
                                            timeout=self.settings.ack_timeout_s)
            except (NatsError, TimeoutError) as exc:
                sub.stale = True  # the outcome is unknown: catch up before the next append
                raise StoreUnavailable(f"{subject}: no acknowledgement from JetStream "
                                       f"({type(exc).__name__}: {exc})") from exc
            ack: dict[str, Any] = json.loads(resp.data)
            err = ack.get("error")
            if err is not None:
                if err.get("err_code") in WRONG_LAST:
                    actual = str(err.get("description", "")).rsplit(":", 1)[-1].strip()
                    return int(actual) if actual.isdigit() else 0
                sub.stale = True
                raise StoreUnavailable(f"{subject}: JetStream refused the batch: "
                                       f"{err.get('description')} ({err.get('err_code')})")
            for out in chunk:
                sub.ledger.add_range(out.first, out.last)
                ours[out.item] = True
                if "Bridge-Last-Seq" in out.headers:
                    sub.dropped.append((out.first, out.last, out.headers["Bridge-Reason"]))
            # Every message of the batch lies after the subject's previous last: a safe mark.
            sub.note(sub.last + 1, len(chunk), max(out.last for out in chunk))
            sub.last = int(ack["seq"])
        return None

    # -- status and reading ----------------------------------------------------------------

    async def keys(self) -> list[Key]:
        """Every (site, epoch) with a subject in the stream."""
        prefix = self.settings.prefix
        found: list[Key] = []
        offset = 0
        while True:
            info = await self._api(f"$JS.API.STREAM.INFO.{self.settings.stream}",
                                   {"subjects_filter": f"{prefix}.>", "offset": offset})
            subjects = (info.get("state") or {}).get("subjects") or {}
            for subj in subjects:
                token, _, epoch = subj[len(prefix) + 1:].rpartition(".")
                with contextlib.suppress(ValueError):
                    found.append((site_of(token), int(epoch, 16)))
            total = int(info.get("total", len(subjects)) or 0)
            offset += len(subjects)
            if not subjects or offset >= total:
                return sorted(set(found))

    async def status(self) -> list[StreamState]:
        out = []
        for key in await self.keys():
            sub = await self._get(key)
            async with sub.lock:
                await self._catch_up(key, sub)
                self.ledger.put(key, sub.ledger)
                out.append((key, sub.ledger.copy(), list(sub.dropped)))
        return out

    async def read(self, *, follow: bool, cursors: dict[Key, int] | None = None
                   ) -> AsyncIterator[tuple[bytes, int]]:
        """What is stored, subject by subject from each cursor's seek mark (the cost grows
        with what is read; a replica builds a subject's marks once, from its headers, the
        first time it serves it); then, with ``follow``, every later commit in stream order.
        The caller still filters by cursor: a mark is where reading may start, not where the
        cursor's readings begin."""
        cursors = cursors or {}
        info = await self._api(f"$JS.API.STREAM.INFO.{self.settings.stream}", {})
        if "error" in info:
            raise StoreUnavailable(f"stream {self.settings.stream}: {info['error']}")
        upto = int((info.get("state") or {}).get("last_seq") or 0)
        js = self._client().jetstream(timeout=self.settings.ack_timeout_s)
        for key in await self.keys():
            sub = await self._get(key)
            async with sub.lock:
                await self._catch_up(key, sub)
                self.ledger.put(key, sub.ledger)
            start = sub.start_for(cursors.get(key, 0))
            end = min(sub.last, upto)
            if start > end:
                continue
            async for msg in self._messages(js, self.subject(key), start, end):
                yield msg
        if follow:
            async for msg in self._messages(js, f"{self.settings.prefix}.>", upto + 1, None):
                yield msg

    async def _messages(self, js: Any, subject: str, start: int, end: int | None
                        ) -> AsyncIterator[tuple[bytes, int]]:
        """Messages on ``subject`` with stream sequence ``start``..``end`` (None: forever)."""
        sub = await js.subscribe(subject, ordered_consumer=True, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start))
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0 if end is None else
                                             self.settings.ack_timeout_s)
                except TimeoutError:
                    if end is None:
                        continue
                    raise StoreUnavailable(f"{subject}: stopped answering at {start}..{end}") \
                        from None
                meta = msg.metadata
                stream_seq = int(meta.sequence.stream)
                if end is not None and stream_seq > end:
                    return
                yield msg.data, int(meta.timestamp.timestamp() * 1e9) if meta.timestamp \
                    else 0
                if end is not None and stream_seq >= end:
                    return
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await sub.unsubscribe()
