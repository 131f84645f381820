"""How the benches' load generators call PushBatch: as the agent does (bridge.edge.uplink).

The call states its deadline (``bridge-deadline-ms``), and a RESOURCE_EXHAUSTED refusal (the
node's admission control, a site's calls in flight) is waited out for its ``retry-after-ms``
with the agent's own jitter, then the same batch is sent again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from bridge.edge.uplink.layers import hinted_wait
from bridge.shared.grpcconn import DEADLINE_METADATA

T = TypeVar("T")


def stated(timeout: float) -> tuple[tuple[str, str], ...]:
    return ((DEADLINE_METADATA, str(round(timeout * 1000))),)


def retry_after(err: grpc.aio.AioRpcError, default: float = 0.05) -> float:
    """The ``retry-after-ms`` trailer of a refusal, in seconds."""
    trailers: Any = err.trailing_metadata() or ()
    return next((float(v) / 1000 for k, v in trailers if k == "retry-after-ms"), default)


async def push(call: Callable[..., Awaitable[T]], request: Any, *, timeout: float
               ) -> tuple[T, int]:
    """(the answer, the refusals waited out before it)."""
    refused = 0
    while True:
        try:
            return await call(request, timeout=timeout, metadata=stated(timeout)), refused
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refused += 1
            await asyncio.sleep(hinted_wait(retry_after(err)))
