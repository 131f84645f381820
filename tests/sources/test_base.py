"""The inbox between a network thread and the intake: bounded, ordered, and never stuck."""

from __future__ import annotations

import asyncio
import threading

from bridge.sources.base import Inbox, Message


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
