"""A JetStream replica's per-subject state, its checkpoints, and the bound on what it holds.

A replica needs, per (site, epoch) subject it serves, the ledger of the seqs stored there and
the subject's last stream sequence that ledger reflects (``bridge.cloud.store.jetstream``'s dedupe
invariant). Built from the subject's messages, that costs time and memory proportional to the
subject's whole history; a checkpoint makes a restart cost only the tail.

Checkpoint layout
=================
One JetStream key-value bucket per stream, ``<stream>_LEDGER`` (file storage, the stream's
replica count, history 1), one key per subject: ``<site token>.<epoch as 16 hex digits>``, the
subject's last two tokens. The value is zlib-compressed JSON, version ``v`` 1::

    {"v": 1, "stream": <the stream's creation time, as STREAM.INFO gives it>,
     "last": <stream seq>, "wm": <watermark>, "n": <committed>,
     "above": [a1, b1, a2, b2, ...],          # intervals above the watermark
     "dropped": [[first, last, reason], ...], # the newest DROPPED_KEPT tombstones
     "marks": [stream_seq, top, ...], "top": <highest seq>, "every": <messages per mark>,
     "since": <messages since the last mark>}

Checkpoint invariant
====================
*A checkpoint states exactly the seqs stored on its subject in stream sequences 1..last* of
the stream created at ``stream``. It is written by replicas only (the NATS reader account
cannot write the bucket), after the ledger it copies was built from the subject itself, so:

1. A replica that meets a subject reads its checkpoint, then only the messages after
   ``last``. A checkpoint of another stream (``stream`` differs: the stream was deleted and
   made anew), of a newer version, one that inflates past 8 MiB or breaks the ledger's
   invariant, or one whose ``last`` lies past the subject's actual last message is ignored,
   and the subject is read from its start: slower, never wrong.
2. A stale checkpoint (any ``last`` below the subject's last) is only slower: the tail read
   folds in what came after it. Replicas overwrite each other's checkpoints freely; any of
   them is true for its own ``last``.
3. Checkpoints are written by a background task as the ledger advances (every
   ``CHECKPOINT_EVERY`` of the subject's own messages, or ``CHECKPOINT_IDLE_S`` after the
   last change), and for every changed subject when the replica closes: never on the ack
   path. The conditional append stays the authority on what is stored.

Memory bound
============
``SubjectCache`` holds the states by least recent use within a byte budget (an estimate per
state: intervals, tombstones kept, seek marks). Past it, states that are checkpointed, not
locked and not in use are evicted; the next batch of that subject reloads the checkpoint. The
seek marks of a subject are thinned (every other one dropped, the spacing doubled) past
``MARKS_MAX``, and only the newest ``DROPPED_KEPT`` tombstones are kept for ``status``, so one
state has a fixed bound beside its intervals, and intervals are capped by
``limits.max_gaps_per_stream``. The cache keeps its byte total and its states with changes
not yet checkpointed as they change, never summed over it: an append and a wake of the
checkpoint task cost what one subject costs, however many sites the replica has met.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from bridge.cloud.store.ledger import Key, StreamLedger
from bridge.shared.config import site_id_problem
from bridge.shared.pacing import Backoff
from bridge.shared.telemetry import IngestMetrics, event

VERSION = 1
MARK_EVERY = 1000      # messages between two seek marks of a subject, at first
MARKS_MAX = 1024       # seek marks per subject; past it every other one is dropped
DROPPED_KEPT = 256     # newest tombstones a state keeps for ``status``
CHECKPOINT_EVERY = 1000  # messages of a subject between two checkpoints
CHECKPOINT_IDLE_S = 5.0  # a changed subject is checkpointed this long after its last change
MAX_CHECKPOINT_BYTES = 768 * 1024  # below the servers' default max_payload (1 MiB)
OPEN_RETRY_CAP_S = 30.0  # at most this long between two tries to open the bucket
MAX_INFLATED = 8 * 1024 * 1024     # a checkpoint's JSON is far smaller (20,000 gaps: ~0.8 MB)


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


@dataclass
class SubjectState:
    ledger: StreamLedger = field(default_factory=StreamLedger)
    last: int = 0          # the subject's last stream sequence the ledger reflects
    stale: bool = True     # must catch up from ``last`` before the next append
    loaded: bool = False   # the checkpoint was looked for
    dropped: list[tuple[int, int, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Seek index for Subscribe: (stream seq, highest reading seq of every earlier message of
    # the subject), one mark per ``every`` messages. A subject is in commit order, not seq
    # order, but the running maximum is monotonic, so a cursor can start at the last mark
    # whose maximum it already has: nothing it still needs lies before it.
    marks: list[tuple[int, int]] = field(default_factory=list)
    top: int = 0
    every: int = MARK_EVERY
    since_mark: int = MARK_EVERY
    saved: int = 0         # ``last`` of the newest checkpoint written or read
    unsaved: int = 0       # messages of the subject noted since that checkpoint
    changed_at: float = 0.0  # monotonic time of the first change not yet checkpointed
    users: int = 0         # callers between taking this state and releasing its lock
    counted: int = 0       # this state's cost as its cache last counted it

    def note(self, first_stream_seq: int, count: int, highest: int) -> None:
        """``count`` messages from ``first_stream_seq`` on (or later) were added."""
        if self.since_mark >= self.every:
            self.marks.append((first_stream_seq, self.top))
            self.since_mark = 0
            if len(self.marks) > MARKS_MAX:
                self.marks = self.marks[::2]
                self.every *= 2
        self.top = max(self.top, highest)
        self.since_mark += count
        self.unsaved += count
        if not self.changed_at:
            self.changed_at = time.monotonic()

    def drop(self, first: int, last: int, reason: str) -> None:
        self.dropped.append((first, last, reason))
        if len(self.dropped) > DROPPED_KEPT:
            del self.dropped[:len(self.dropped) - DROPPED_KEPT]

    def adopt(self, other: SubjectState) -> None:
        """Take a checkpoint's content (this state keeps its own lock and users)."""
        self.ledger, self.last, self.dropped = other.ledger, other.last, other.dropped
        self.marks, self.top, self.every = other.marks, other.top, other.every
        self.since_mark, self.saved = other.since_mark, other.saved

    def start_for(self, cursor: int) -> int:
        """The stream sequence to read from for readings above ``cursor``."""
        i = bisect.bisect_right([m for _, m in self.marks], cursor) - 1
        return self.marks[i][0] if i >= 0 else 1

    @property
    def clean(self) -> bool:
        return self.saved >= self.last

    def due(self, now: float) -> bool:
        """A checkpoint should be written now (rule 3). A stale state may be written too:
        its ledger is still exact for its ``last`` (an unknown outcome added nothing)."""
        if self.clean:
            return False
        # Counted in the subject's own messages: its stream sequence moves with every other
        # subject's appends too, and would make every call of every site due at once.
        return self.unsaved >= CHECKPOINT_EVERY or now - self.changed_at >= CHECKPOINT_IDLE_S

    def cost(self) -> int:
        """Bytes this state holds, estimated (CPython objects, not the wire size)."""
        return 1200 + 140 * len(self.ledger.above) + 160 * len(self.dropped) + \
            140 * len(self.marks)

    # -- checkpoint -----------------------------------------------------------------------

    def encode(self, stream: str) -> bytes:
        lg = self.ledger
        doc: dict[str, Any] = {
            "v": VERSION, "stream": stream, "last": self.last, "wm": lg.watermark,
            "n": lg.committed, "above": [x for span in lg.above for x in span],
            "dropped": [list(d) for d in self.dropped],
            "marks": [x for mark in self.marks for x in mark], "top": self.top,
            "every": self.every, "since": self.since_mark}
        return zlib.compress(orjson.dumps(doc), 1)

    @classmethod
    def decode(cls, blob: bytes, stream: str) -> SubjectState | None:
        """The state a checkpoint of ``stream`` holds; None if it is of another stream or
        version, or not a checkpoint at all (rule 1)."""
        try:
            # Bounded: a checkpoint that inflates past MAX_INFLATED is not one of ours.
            inflater = zlib.decompressobj()
            raw = inflater.decompress(blob, MAX_INFLATED)
            if inflater.unconsumed_tail or not inflater.eof:
                return None
            doc = orjson.loads(raw)
            if not isinstance(doc, dict) or doc.get("v") != VERSION or \
                    doc.get("stream") != stream:
                return None
            above = [int(x) for x in doc["above"]]
            marks = [int(x) for x in doc["marks"]]
            st = cls(ledger=StreamLedger(int(doc["wm"]), list(zip(above[::2], above[1::2],
                                                                   strict=True)),
                                         int(doc["n"])),
                     last=int(doc["last"]), loaded=True,
                     dropped=[(int(a), int(b), str(r)) for a, b, r in doc["dropped"]],
                     marks=list(zip(marks[::2], marks[1::2], strict=True)),
                     top=int(doc["top"]), every=int(doc["every"]),
                     since_mark=int(doc["since"]))
        except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        if not _sound(st):
            return None
        st.saved = st.last
        return st


def _sound(st: SubjectState) -> bool:
    """The ledger invariant (``bridge.cloud.store.ledger``) and the wire's ranges hold."""
    lg = st.ledger
    prev = lg.watermark + 1  # an interval must start past the watermark's successor
    for a, b in lg.above:
        if not prev < a <= b < 2**63:
            return False
        prev = b + 1
    return 0 <= lg.watermark < 2**63 and st.last >= 0 and lg.committed >= lg.watermark \
        and st.every >= 1


def checkpoint_key(key: Key, token: str) -> str:
    """The bucket key of a subject: its site token and epoch (``token`` is the site's)."""
    return f"{token}.{key[1]:016x}"


class SubjectCache:
    """Subject states by least recent use, within ``budget`` bytes (see the memory bound).

    Every figure a call or the checkpoint task reads is kept as states change, never summed
    over the cache: the bytes held (each state's cost is re-counted when its holder lets it
    go) and the states with changes not yet checkpointed. A replica serving a large fleet
    then spends per call what one subject costs, not what all of them do."""

    def __init__(self, *, budget: int) -> None:
        self.budget = budget
        self._states: OrderedDict[Key, SubjectState] = OrderedDict()
        self._unsaved: dict[Key, None] = {}  # states not clean, in the order they changed
        self._total = 0
        self.evictions = 0

    @contextlib.asynccontextmanager
    async def hold(self, key: Key) -> AsyncIterator[SubjectState]:
        """The state of ``key``, locked; it cannot be evicted from this call to the end of
        the block (a waiter for the lock counts as a user, so a state is never dropped
        between one holder's release and the next one's wake-up)."""
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = SubjectState()
            st.counted = st.cost()
            self._total += st.counted
        else:
            self._states.move_to_end(key)
        st.users += 1
        try:
            async with st.lock:
                yield st
        finally:
            self.recount(key, st)
            st.users -= 1

    def recount(self, key: Key, st: SubjectState) -> None:
        """``st`` may have changed: its cost and whether it waits for a checkpoint."""
        if self._states.get(key) is not st:
            return
        cost = st.cost()
        self._total += cost - st.counted
        st.counted = cost
        if st.clean:
            self._unsaved.pop(key, None)
        else:
            self._unsaved[key] = None

    def __contains__(self, key: Key) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    def peek(self, key: Key) -> SubjectState | None:
        return self._states.get(key)

    def items(self) -> Iterator[tuple[Key, SubjectState]]:
        return iter(list(self._states.items()))

    def unsaved(self) -> list[tuple[Key, SubjectState]]:
        """The states with changes not yet checkpointed (as of their holders' release)."""
        return [(key, self._states[key]) for key in list(self._unsaved)]

    def size(self) -> int:
        return self._total

    def evict(self) -> int:
        """Drop the least recently used states that can go, until within the budget; the
        number dropped. A state in use stays; so does one with a change not yet checkpointed
        (the checkpoint task writes it, and it can go next time) unless it is stale anyway."""
        if self._total <= self.budget:
            return 0
        dropped = 0
        for key, st in list(self._states.items()):
            if self._total <= self.budget:
                break
            if not st.users and (st.clean or st.stale):
                self._total -= st.counted
                del self._states[key]
                self._unsaved.pop(key, None)
                dropped += 1
        self.evictions += dropped
        return dropped


class Checkpoints:
    """The checkpoint bucket of one stream (see the layout): read and written by replicas."""

    def __init__(self, *, stream: str, stream_id: str, replicas: int) -> None:
        self.bucket = f"{stream}_LEDGER"
        self.stream_id = stream_id
        self.replicas = replicas
        self._kv: KeyValue | None = None

    async def open(self, js: JetStreamContext, *, create: bool = True) -> None:
        """Bind the bucket, creating it (the stream's replicas, file storage) if missing."""
        try:
            self._kv = await js.key_value(self.bucket)
        except BucketNotFoundError:
            if not create:
                raise
            self._kv = await js.create_key_value(KeyValueConfig(
                bucket=self.bucket, history=1, replicas=self.replicas,
                storage=StorageType.FILE, max_value_size=MAX_CHECKPOINT_BYTES,
                description="bridge: per-subject ledger checkpoints (bridge.cloud.store.subjects)"))

    async def load(self, name: str) -> SubjectState | None:
        """The checkpoint stored under ``name``; None if there is none usable. A read that
        fails is only slower (the subject is read from its start), so it is not an error."""
        if self._kv is None:
            return None
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            event("jetstream.checkpoint_unreadable", level=logging.WARNING, key=name,
                  reason=f"{type(exc).__name__}: {exc}"[:200])
            return None
        return SubjectState.decode(entry.value or b"", self.stream_id)

    async def save(self, name: str, st: SubjectState) -> str:
        """Write ``st``'s checkpoint; the outcome: ``written``, ``too_large`` or ``failed``."""
        if self._kv is None:
            return "failed"
        last, pending = st.last, st.unsaved
        blob = st.encode(self.stream_id)  # no await before this: one consistent state
        if len(blob) > MAX_CHECKPOINT_BYTES:
            event("jetstream.checkpoint_too_large", level=logging.WARNING, key=name,
                  bytes=len(blob))
            return "too_large"
        try:
            await self._kv.put(name, blob)
        except (NatsError, TimeoutError) as exc:
            event("jetstream.checkpoint_failed", level=logging.WARNING, key=name,
                  reason=f"{type(exc).__name__}: {exc}"[:200])
            return "failed"
        st.saved = max(st.saved, last)
        st.unsaved = max(0, st.unsaved - pending)  # what came during the put stays counted
        st.changed_at = 0.0 if st.clean else time.monotonic()  # commits came meanwhile
        return "written"


async def run_checkpoints(*, cache: SubjectCache, checkpoints: Checkpoints,
                          name: Callable[[Key], str], on_outcome: Callable[[str], None],
                          wake: asyncio.Event, period: float = 0.5) -> None:
    """The background task of rule 3: write what is due, then keep the cache in budget."""
    while True:
        # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that lands as
        # the event is set, and this task would then outlive close().
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period):
                await wake.wait()
        wake.clear()
        await flush(cache=cache, checkpoints=checkpoints, name=name, on_outcome=on_outcome)
        cache.evict()


async def flush(*, cache: SubjectCache, checkpoints: Checkpoints, name: Callable[[Key], str],
                on_outcome: Callable[[str], None], everything: bool = False) -> None:
    """Write the checkpoints that are due (with ``everything``: of every changed state)."""
    now = time.monotonic()
    for key, st in cache.items() if everything else cache.unsaved():
        if st.due(now) or (everything and not st.clean):
            on_outcome(await checkpoints.save(name(key), st))
            cache.recount(key, st)


class Keeper:
    """A replica's subject states and their checkpoints: the cache, the bucket, its task."""

    def __init__(self, *, budget: int, metrics: IngestMetrics,
                 name: Callable[[Key], str]) -> None:
        """``name``: a subject's bucket key (``checkpoint_key`` of its site token)."""
        self.cache = SubjectCache(budget=budget)
        self.metrics = metrics
        self.name = name
        self.checkpoints: Checkpoints | None = None
        self.write = True
        self._wake = asyncio.Event()  # a subject is CHECKPOINT_EVERY messages past its last
        self.ready = asyncio.Event()  # the bucket is open
        self._task: asyncio.Task[None] | None = None

    async def open(self, js: JetStreamContext, *, stream: str, stream_id: str,
                   replicas: int, write: bool = True) -> None:
        """The bucket and the task that writes it (with ``write``; a reader only reads
        checkpoints). Until the bucket opens a replica is still exact, reading subjects
        whole; each failed try is a warning and ``outcome="disabled"``. A replica retries
        (a cluster may be slow to place an R3 bucket); a reader, short-lived, tries once."""
        cp = Checkpoints(stream=stream, stream_id=stream_id, replicas=replicas)
        opened = await self._bind(js, cp, create=write)
        if not write:
            self.write = False
            return
        self._task = asyncio.create_task(self._run(js, cp, opened),
                                         name="jetstream-checkpoints")

    async def _bind(self, js: JetStreamContext, cp: Checkpoints, *, create: bool) -> bool:
        try:
            await cp.open(js, create=create)
        except (NatsError, TimeoutError) as exc:
            self.metrics.checkpoints.labels("disabled").inc()
            event("jetstream.checkpoints_disabled", level=logging.WARNING, bucket=cp.bucket,
                  retrying=create, reason=f"{type(exc).__name__}: {exc}"[:200])
            return False
        self.checkpoints = cp
        self.ready.set()
        return True

    async def _run(self, js: JetStreamContext, cp: Checkpoints, opened: bool) -> None:
        backoff = Backoff(base_s=1.0, cap_s=OPEN_RETRY_CAP_S)
        while not opened:
            await backoff.sleep()
            if opened := await self._bind(js, cp, create=True):
                event("jetstream.checkpoints_enabled", bucket=cp.bucket,
                      tries=backoff.attempt + 1)
        await run_checkpoints(cache=self.cache, checkpoints=cp, name=self.name,
                              on_outcome=self._outcome, wake=self._wake)

    def _outcome(self, outcome: str) -> None:
        self.metrics.checkpoints.labels(outcome).inc()
        self.metrics.subject_states.set(len(self.cache))
        self.metrics.subject_bytes.set(self.cache.size())

    def advanced(self, key: Key, st: SubjectState) -> None:
        """``st`` took an append: counted now (its holder may append more before it lets it
        go), and the task woken once a checkpoint is due by count."""
        self.cache.recount(key, st)
        if st.unsaved >= CHECKPOINT_EVERY:
            self._wake.set()

    async def load(self, key: Key, st: SubjectState, upto: int, subject: str) -> None:
        """Start ``st`` (met for the first time) from its checkpoint, if it has a usable one
        (rule 1); ``upto`` is the subject's last stream sequence now."""
        st.loaded = True
        if self.checkpoints is None or st.last:
            return
        found = await self.checkpoints.load(self.name(key))
        if found is None:
            self.metrics.checkpoints.labels("missing").inc()
            return
        if found.last > upto:  # the subject is shorter than its checkpoint says: not ours
            self.metrics.checkpoints.labels("ignored").inc()
            event("jetstream.checkpoint_ignored", level=logging.WARNING, subject=subject,
                  checkpoint_last=found.last, subject_last=upto)
            return
        st.adopt(found)
        self.metrics.checkpoints.labels("loaded").inc()

    async def close(self, *, timeout: float, connected: bool) -> None:
        """Stop the task; with a connection, write every changed state's checkpoint first."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.checkpoints is not None and connected and self.write:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await flush(cache=self.cache, checkpoints=self.checkpoints,
                                name=self.name, on_outcome=self._outcome, everything=True)

    def abandon(self) -> None:
        """Stop writing checkpoints at once, as a kill -9 would (tests and benchmarks)."""
        if self._task is not None:
            self._task.cancel()
        self.checkpoints = None
