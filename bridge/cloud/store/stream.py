"""Reading a JetStream subject in order, at the rate nats-py can parse it.

nats-py's ``next_msg`` and its message iterator each create tasks and a timer per message;
reading a subject of millions that way costs more than parsing the messages. Here an ordered
consumer delivers to a callback that puts each message on a bounded queue, and the reader
takes what is ready without suspending: one timer per wait, none per message. When the reader
is slower than the stream, the callback waits while the queue is full and nats-py buffers behind it
(within its pending limits; the ordered consumer recovers from anything it drops). Used by a
replica (its ledger's catch-up, Subscribe) and by ``bridge consume`` reading a stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NotJSMessageError
from nats.js.api import ConsumerConfig, DeliverPolicy

QUEUE = 2048  # messages taken off the socket but not yet read


class Delivery(NamedTuple):
    stream_seq: int
    time_ns: int  # when the stream stored the message (exact: nats-py's datetime is not)
    pending: int  # messages after this one on the consumer's filter


def delivery(msg: Msg) -> Delivery:
    """What a JetStream delivery's reply subject says, read without nats-py's ``metadata``
    (a dataclass, a datetime and a dozen ints per message: a seventh of a consumer's time).
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``,
    or from servers 2.10 on ``$JS.ACK.<domain>.<account hash>.<stream>...`` with a token more
    at the end (ADR-15); ``NotJSMessageError`` (a nats error) for anything else."""
    t = (msg.reply or "").split(".")
    if len(t) == 9 and t[0] == "$JS" and t[1] == "ACK":
        return Delivery(int(t[5]), int(t[7]), int(t[8]))
    if len(t) >= 11 and t[0] == "$JS" and t[1] == "ACK":
        return Delivery(int(t[7]), int(t[9]), int(t[10]))
    raise NotJSMessageError


async def messages(js: Any, subject: str, *, start: int | None, idle_s: float | None,
                   headers_only: bool = False) -> AsyncIterator[Msg]:
    """Messages on ``subject`` from stream sequence ``start`` (None: the first), until the
    caller stops; ``TimeoutError`` after ``idle_s`` seconds without one (None: wait for
    ever). The consumer is deleted when the caller stops."""
    ready: collections.deque[Msg] = collections.deque()
    arrived, room = asyncio.Event(), asyncio.Event()

    async def deliver(msg: Msg) -> None:
        ready.append(msg)
        arrived.set()
        while len(ready) >= QUEUE:  # the reader is behind: hold nats-py's delivery here
            room.clear()
            await room.wait()

    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL) if start is None else \
        ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    sub = await js.subscribe(subject, ordered_consumer=True, cb=deliver,
                             headers_only=headers_only, config=config)
    try:
        while True:
            while ready:
                yield ready.popleft()
            room.set()
            arrived.clear()
            if not ready:
                async with asyncio.timeout(idle_s):
                    await arrived.wait()
    finally:
        room.set()
        with contextlib.suppress(NatsError, TimeoutError):
            await sub.unsubscribe()
