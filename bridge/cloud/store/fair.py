"""A one-thread executor that shares its time among sites by readings, not by arrival.

A node's store work runs on one thread (SQLite has one writer; a replica validates and builds
acks on one). With a plain FIFO queue, a site with several large batches in flight puts all of
them ahead of every other site's next batch: one site sets everyone's latency. Here each site
has its own queue and the thread serves them by deficit round robin (Shreedhar and Varghese):
each turn gives a site ``QUANTUM`` readings of credit, and its next job runs once its credit
covers the job's size. So every site with work gets the same number of readings through per
round, and a site's 100-reading batch never waits behind another site's 10,000-reading ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple["Future[Any]", int, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
QUANTUM = 500  # readings of credit per turn


class FairExecutor(Executor):
    """One worker thread; jobs queued per key, taken one per key in turn."""

    def __init__(self, *, name: str) -> None:
        self._queues: dict[str, deque[_Job]] = {}
        self._turns: deque[str] = deque()  # keys with queued jobs, next turn first
        self._credit: dict[str, int] = {}  # readings a key may still run this round
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit_for(self, key: str, cost: int, fn: Callable[P, T], /, *args: P.args,
                   **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn`` (worth ``cost`` readings) in ``key``'s share of the thread, after
        ``key``'s earlier jobs."""
        fut: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._turns.append(key)
                self._credit[key] = 0
            queue.append((fut, max(cost, 1), fn, args, kwargs))
            self._cv.notify()
        return fut

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[T]:
        return self.submit_for("", 1, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._closed = True
            if cancel_futures:
                for queue in self._queues.values():
                    for fut, *_ in queue:
                        fut.cancel()
                self._queues.clear()
                self._turns.clear()
                self._credit.clear()
            self._cv.notify_all()
        if wait:
            self._thread.join()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._turns and not self._closed:
                    self._cv.wait()
                if not self._turns:
                    return
                key = self._turns[0]
                queue = self._queues[key]
                cost = queue[0][1]
                if self._credit[key] < cost and len(self._turns) > 1:
                    self._credit[key] += QUANTUM  # its turn: more credit, then the next key
                    self._turns.rotate(-1)
                    continue
                fut, cost, fn, args, kwargs = queue.popleft()
                self._credit[key] = max(self._credit[key] - cost, 0)
                if not queue:
                    del self._queues[key], self._credit[key]
                    self._turns.popleft()
                elif self._credit[key] < queue[0][1]:
                    self._turns.rotate(-1)  # its credit is spent: to the back of the line
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                fut.set_exception(exc)
