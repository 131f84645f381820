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

1. A replica keeps, per subject it serves, the ledger of the seqs stored there (the same
   ``StreamLedger`` as the SQLite store: watermark plus intervals) and the subject's last
   stream sequence that ledger reflects. When it meets a subject it reads the subject's
   checkpoint and then only the headers (``headers_only``) of the messages after it; states
   are held within a byte budget and reloaded the same way (``bridge.cloud.store.subjects``: the
   checkpoint layout and invariant).
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
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from bridge.cloud.store import stream
from bridge.cloud.store.backend import StreamState
from bridge.cloud.store.fair import FairExecutor
from bridge.cloud.store.ledger import TOO_MANY_GAPS, Key, Overlay
from bridge.cloud.store.records import COMMITTED, DUPLICATE, Incoming, narrow
from bridge.cloud.store.subjects import Keeper, SubjectState, checkpoint_key, site_of, subject_token
from bridge.shared import defaults as D
from bridge.shared.config import JetStreamSettings
from bridge.shared.errors import StoreUnavailable
from bridge.shared.pacing import Backoff
from bridge.shared.telemetry import IngestMetrics, event

ATOMIC_MAX = 1000  # messages per atomic batch (server limit)
# Messages between two turns of the event loop (nats-py's publish never yields): a whole chunk
# held it while other calls waited for their handler (late: ingest.admission), checks lagged.
YIELD_EVERY = 100
# Wrong last (subject) sequence: 10071 names the actual one, 10164 (atomic batches) does not.
WRONG_LAST = (10071, 10164)
# No meta leader or peers yet, or a new stream's interest not yet routed to our server. The
# probe expects a last subject sequence no subject has: refused (10071), never stored.
FORMING_S, FORMING = 60.0, ("TimeoutError", "10008", "10005", "probe")
PROBE = {"Nats-Expected-Last-Subject-Sequence": str(2**63 - 1)}


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

    def __init__(self, *, settings: JetStreamSettings,
                 max_epochs_per_site: int = D.MAX_EPOCHS_PER_SITE,
                 max_gaps_per_stream: int = D.MAX_GAPS_PER_STREAM,
                 on_health: Callable[[bool], Awaitable[None]] | None = None,
                 metrics: IngestMetrics | None = None, read_only: bool = False) -> None:
        """``on_health(False)`` when the connection to the cluster is lost, ``(True)`` when it
        is back: the node's gRPC health follows, so agents move on at their next probe.
        ``read_only``: for ``status`` and ``read`` with a reader's account (``bridge consume
        --status``): creates and changes nothing, writes no checkpoint."""
        self.settings = settings
        self.read_only = read_only
        self.on_health = on_health or _ignore
        self.metrics = metrics or IngestMetrics()
        self.max_epochs_per_site = max_epochs_per_site
        self.max_gaps_per_stream = max_gaps_per_stream
        self.keeper = Keeper(budget=int(settings.cache_mb * 1024 * 1024), metrics=self.metrics,
                             name=lambda key: checkpoint_key(key, subject_token(key[0])))
        self._subjects = self.keeper.cache
        self._epochs: dict[str, set[int]] = {}  # epochs of each site this replica has met
        self._newest: dict[str, tuple[int, int]] = {}  # site: (newest epoch, its watermark)
        self._stream_id = ""  # the stream's creation time: checkpoints of another are ignored
        self._nc: NATS | None = None
        self._closing = False
        self._batches = 0
        self.inline_commit: Callable[[Sequence[Incoming]], list[str]] | None = None
        # Validation and Acks run here (the commit itself is async network I/O).
        self.executor = FairExecutor(name="admit")

    def committed_now(self) -> None:
        return None

    def watermark(self, key: Key) -> int | None:
        st = self._subjects.peek(key)
        return st.ledger.watermark if st is not None else None

    def sites(self) -> dict[str, tuple[int, int]]:
        return {site: (wm, len(self._epochs.get(site, ())))
                for site, (_, wm) in list(self._newest.items())}

    def subject(self, key: Key) -> str:
        return f"{self.settings.prefix}.{subject_token(key[0])}.{key[1]:016x}"

    # -- connection and stream ---------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        try:
            # A few tries at start (a refused certificate or no server is a clear error at
            # once, and the service manager restarts us), then reconnect for ever.
            self._nc = await nats.connect(servers=list(s.servers), **s.connect_options(),
                                          max_reconnect_attempts=2, reconnect_time_wait=0.5,
                                          connect_timeout=5, error_cb=self._on_error,
                                          disconnected_cb=self._on_disconnect,
                                          reconnected_cb=self._on_reconnect)
        except (NatsError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to JetStream at {', '.join(s.servers)}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self._nc.options["max_reconnect_attempts"] = -1
        await self._until_ready()
        await self.keeper.open(self._client().jetstream(timeout=s.ack_timeout_s),
                               stream=s.stream, stream_id=self._stream_id,
                               replicas=s.replicas, write=not self.read_only)
        cp = self.keeper.checkpoints
        event("jetstream.connected", servers=list(s.servers), stream=s.stream,
              checkpoints=cp.bucket if cp else None)

    async def _on_error(self, exc: Exception) -> None:
        event("jetstream.error", level=logging.WARNING, reason=str(exc)[:200])

    async def _on_disconnect(self) -> None:
        for _, sub in self._subjects.items():
            sub.stale = True  # outcomes in flight are unknown now
        if self._closing:  # our own close: not news
            return
        event("jetstream.disconnected", level=logging.WARNING)
        await self.on_health(False)

    async def _on_reconnect(self) -> None:
        event("jetstream.reconnected")
        await self.on_health(True)

    def _client(self) -> NATS:
        if self._nc is None or not self._nc.is_connected:
            raise StoreUnavailable("not connected to the JetStream cluster")
        return self._nc

    async def _api(self, subject: str, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            resp = await self._client().request(subject, json.dumps(body).encode(),
                                                timeout=self.settings.ack_timeout_s,
                                                headers=headers)
        except (NatsError, TimeoutError) as exc:
            raise StoreUnavailable(f"{subject}: {type(exc).__name__}: {exc}") from exc
        doc: dict[str, Any] = json.loads(resp.data)
        return doc

    async def _until_ready(self) -> None:
        """The stream, waiting up to FORMING_S for a cluster still forming (FORMING), saying
        so; any other error, or a cluster still not ready then, ends the start with it."""
        deadline, backoff = time.monotonic() + FORMING_S, Backoff(base_s=0.25, cap_s=2.0)
        while True:
            try:
                await self._ensure_stream()
                probe = f"{self.settings.prefix}.probe.0"  # no site's: epochs are 16 hex digits
                if not self.read_only and (await self._api(probe, {}, PROBE)).get(
                        "error", {}).get("err_code") != 10071:
                    raise StoreUnavailable(f"no probe answer from the stream on {probe}")
                return
            except StoreUnavailable as exc:
                if time.monotonic() > deadline or not any(m in str(exc) for m in FORMING):
                    raise
                event("jetstream.waiting", level=logging.WARNING, reason=str(exc)[:200])
                await backoff.sleep()

    async def _ensure_stream(self) -> None:
        s = self.settings
        info = await self._api(f"$JS.API.STREAM.INFO.{s.stream}", {})
        if "error" not in info or self.read_only:
            cfg = info.get("config", {})
            if "error" not in info and not cfg.get("allow_atomic") and not self.read_only:
                info = await self._api(f"$JS.API.STREAM.UPDATE.{s.stream}",
                                       {**cfg, "allow_atomic": True})
            if "error" in info:
                raise StoreUnavailable(f"stream {s.stream}: {info['error']}")
            self._stream_id = str(info.get("created", ""))
            return
        created = await self._api(f"$JS.API.STREAM.CREATE.{s.stream}", {
            "name": s.stream, "subjects": [f"{s.prefix}.>"], "num_replicas": s.replicas,
            "storage": "file", "retention": "limits", "discard": "old",
            "allow_atomic": True, "duplicate_window": 120_000_000_000})
        if "error" in created:
            raise StoreUnavailable(f"cannot create stream {s.stream}: {created['error']}")
        self._stream_id = str(created.get("created", ""))
        event("jetstream.stream_created", stream=s.stream, replicas=s.replicas,
              subjects=f"{s.prefix}.>")

    async def close(self, timeout: float = 5.0) -> bool:
        """Stop; every changed subject's checkpoint is written first (a rolling restart then
        costs the next replica no tail at all)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._closing = True
        await self.keeper.close(timeout=timeout,
                                connected=self._nc is not None and self._nc.is_connected)
        if self._nc is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(self._nc.drain(), timeout)
        return True

    # -- reading a subject -----------------------------------------------------------------

    async def _catch_up(self, key: Key, sub: SubjectState, upto: int | None = None) -> None:
        """Fold the subject's messages after ``sub.last`` into its ledger (headers only),
        starting from its checkpoint the first time (``bridge.cloud.store.subjects``, rule 1)."""
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
            if not sub.loaded:
                await self.keeper.load(key, sub, upto, subject)
            if upto > sub.last:
                t0 = time.monotonic()
                read = 0
                async for msg in stream.messages(js, subject, start=sub.last + 1,
                                                 idle_s=self.settings.ack_timeout_s,
                                                 headers_only=True):
                    self._fold(key, sub, msg)
                    read += 1
                    if sub.last >= upto:
                        break
                self.metrics.catchup_messages.inc(read)
                self.metrics.catchup_seconds.observe(time.monotonic() - t0)
        except (NatsError, TimeoutError) as exc:
            raise StoreUnavailable(f"reading {subject}: {type(exc).__name__}: {exc}") from exc
        sub.stale = False

    def _fold(self, key: Key, sub: SubjectState, msg: Msg) -> None:
        h = msg.headers or {}
        stream_seq = stream.delivery(msg).stream_seq
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
            sub.drop(seq, last, h.get("Bridge-Reason", ""))
        sub.note(stream_seq, 1, last)
        sub.last = max(sub.last, stream_seq)

    # -- committing --------------------------------------------------------------------------

    async def commit(self, batch: Sequence[Incoming]) -> list[str]:
        """Per item ``COMMITTED``, ``DUPLICATE`` or a rejection reason (see the invariant)."""
        out: list[str] = [""] * len(batch)
        groups: dict[Key, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault((item.site_id, item.epoch), []).append(i)
        for key, idx in groups.items():
            epochs = self._epochs.setdefault(key[0], set())
            if key[1] not in epochs and len(epochs) >= self.max_epochs_per_site:
                for i in idx:
                    out[i] = "too_many_epochs"
                continue
            epochs.add(key[1])
            async with self._subjects.hold(key) as sub:
                for i, outcome in zip(idx, await self._commit_key(key, sub,
                                                                  [batch[i] for i in idx]),
                                      strict=True):
                    out[i] = outcome
                if key[1] >= self._newest.get(key[0], (0, 0))[0]:
                    self._newest[key[0]] = (key[1], sub.ledger.watermark)
        return out

    async def _commit_key(self, key: Key, sub: SubjectState, items: list[Incoming]
                          ) -> list[str]:
        ours = [False] * len(items)  # some range of the item was stored by this call
        refused = [False] * len(items)
        for _attempt in range(10):
            refused = [False] * len(items)
            if sub.stale:
                await self._catch_up(key, sub)
            # What this batch adds, beside the ledger (never a copy of it per batch).
            plan = Overlay(sub.ledger, max_gaps=self.max_gaps_per_stream)
            msgs: list[_Out] = []
            spans = [(it.seq, it.seq if it.last_seq is None else it.last_seq) for it in items]
            for i, (item, (_, last), new) in enumerate(zip(items, spans,
                                                           plan.take_each(spans), strict=True)):
                if new is None:
                    refused[i] = True
                    continue
                for a, b in new:
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
        return [TOO_MANY_GAPS if no and not mine else COMMITTED if mine else DUPLICATE
                for mine, no in zip(ours, refused, strict=True)]

    def _headers(self, key: Key, seq: int, last: int | None, reason: str) -> dict[str, str]:
        h = {"Bridge-Site": key[0], "Bridge-Epoch": f"{key[1]:016x}", "Bridge-Seq": str(seq)}
        if last is not None:
            h["Bridge-Last-Seq"] = str(last)
            h["Bridge-Reason"] = reason
        return h

    async def _append(self, key: Key, sub: SubjectState, msgs: list[_Out],
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
                        if n % YIELD_EVERY == 0:
                            await asyncio.sleep(0)
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
            sub.ledger.add_all((out.first, out.last) for out in chunk)
            for out in chunk:
                ours[out.item] = True
                if "Bridge-Last-Seq" in out.headers:
                    sub.drop(out.first, out.last, out.headers["Bridge-Reason"])
            # Every message of the batch lies after the subject's previous last: a safe mark.
            sub.note(sub.last + 1, len(chunk), max(out.last for out in chunk))
            sub.last = int(ack["seq"])
            self.keeper.advanced(key, sub)
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
        """Every subject's ledger, each brought up to date (states past the cache's budget
        are loaded from their checkpoints and may be evicted again afterwards)."""
        out = []
        for key in await self.keys():
            async with self._subjects.hold(key) as sub:
                await self._catch_up(key, sub)
                out.append((key, sub.ledger.copy(), list(sub.dropped)))
        return out

    async def read(self, *, follow: bool, cursors: dict[Key, int] | None = None
                   ) -> AsyncIterator[tuple[bytes, int]]:
        """What is stored, subject by subject from each cursor's seek mark (the cost grows
        with what is read; a subject's marks come with its checkpoint, or are built from its
        headers the first time a replica serves it); then, with ``follow``, every later
        commit in stream order. The caller still filters by cursor: a mark is where reading
        may start, not where the cursor's readings begin."""
        cursors = cursors or {}
        info = await self._api(f"$JS.API.STREAM.INFO.{self.settings.stream}", {})
        if "error" in info:
            raise StoreUnavailable(f"stream {self.settings.stream}: {info['error']}")
        upto = int((info.get("state") or {}).get("last_seq") or 0)
        js = self._client().jetstream(timeout=self.settings.ack_timeout_s)
        for key in await self.keys():
            async with self._subjects.hold(key) as sub:
                await self._catch_up(key, sub)
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
        wait = None if end is None else self.settings.ack_timeout_s
        try:
            async for msg in stream.messages(js, subject, start=start, idle_s=wait):
                stream_seq, time_ns, _ = stream.delivery(msg)
                if end is not None and stream_seq > end:
                    return
                yield msg.data, time_ns
                if end is not None and stream_seq >= end:
                    return
        except TimeoutError:
            raise StoreUnavailable(f"{subject}: stopped answering at {start}..{end}") from None
