"""The inbox between a network thread and the intake: bounded, ordered, and never stuck."""

from __future__ import annotations

import asyncio
import threading

from bridge.edge.sources.base import Inbox, Message


def msg(i: int) -> Message:
    return Message(topic="t", payload=b"%d" % i, redelivered=False, generation=1, token=i, qos=1)


async def test_a_full_inbox_holds_the_network_thread_until_the_intake_takes():
    inbox = Inbox(limit=3, max_wait_s=60)
    inbox.bind(asyncio.get_running_loop())
    producer = threading.Thread(target=lambda: [inbox.put(msg(i)) for i in range(5)])
    producer.start()
    first = await inbox.take(2)  # wakes when the first put arrives
    while len(first) < 2:
        first += await inbox.take(2 - len(first))
    await asyncio.to_thread(producer.join, 10)
    assert not producer.is_alive(), "room was made, so the producer finished"
    rest = await inbox.take(10)
    assert [m.token for m in first + rest] == [0, 1, 2, 3, 4]


async def test_a_put_waiting_for_room_gives_way_when_the_source_stops():
    inbox = Inbox(limit=1, max_wait_s=60)
    inbox.bind(asyncio.get_running_loop())
    inbox.put(msg(0))
    producer = threading.Thread(target=inbox.put, args=(msg(1),))
    producer.start()
    await asyncio.to_thread(producer.join, 0.5)
    assert producer.is_alive(), "no room: the network thread waits"
    inbox.close()
    await asyncio.to_thread(producer.join, 10)
    assert not producer.is_alive()
    assert len(inbox) == 2


async def test_a_put_waiting_too_long_appends_so_the_network_loop_can_answer_keepalives():
    inbox = Inbox(limit=1, max_wait_s=0.05)
    inbox.put(msg(0))
    await asyncio.to_thread(inbox.put, msg(1))  # returns after max_wait_s, not never
    assert len(inbox) == 2


def big(i: int, size: int) -> Message:
    return Message(topic="t", payload=b"x" * size, redelivered=False, generation=1, token=i,
                   qos=1)


async def test_the_network_thread_waits_while_the_inbox_holds_its_bytes_bound():
    """Few but large messages (oversize ones on their way to the dead letters) stop the
    network thread at ``max_bytes``, far below the message bound."""
    inbox = Inbox(limit=1000, max_bytes=1000, max_wait_s=60)
    inbox.bind(asyncio.get_running_loop())
    for i in range(3):
        inbox.put(big(i, 400))  # 1,200 bytes waiting: at the bound, with 3 of 1,000 messages
    producer = threading.Thread(target=inbox.put, args=(big(3, 400),))
    producer.start()
    await asyncio.to_thread(producer.join, 0.5)
    assert producer.is_alive(), "over the byte bound: the network thread waits"
    taken = await inbox.take(2)  # 400 bytes left: room again
    await asyncio.to_thread(producer.join, 10)
    assert not producer.is_alive()
    rest = await inbox.take(10)
    assert [m.token for m in taken + rest] == [0, 1, 2, 3]


async def test_one_message_larger_than_the_bytes_bound_is_let_in_when_nothing_waits():
    inbox = Inbox(limit=1000, max_bytes=1000, max_wait_s=60)
    inbox.bind(asyncio.get_running_loop())
    producer = threading.Thread(target=inbox.put, args=(big(0, 5000),))
    producer.start()
    await asyncio.to_thread(producer.join, 10)
    assert not producer.is_alive(), "an empty inbox takes any single message"
    assert [m.token for m in await inbox.take(10)] == [0]
