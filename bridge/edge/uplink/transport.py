"""The seam between the sender and the network: ``Transport`` and its gRPC implementation.

``Transport`` is a Protocol so the pool and sender can be driven by a scripted double in tests
(an ingest that answers UNAVAILABLE, hangs, or throttles) while production uses ``GrpcTransport``:
one mTLS channel per endpoint, keepalive paired with the server's settings
(``bridge.cloud.ingest.server.SERVER_OPTIONS``), short reconnect backoff so a recovered endpoint is
usable again within about a second, and a deadline on every call.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import TlsConfig
from bridge.shared.errors import ErrorKind, TransportError
from bridge.shared.grpcconn import DEADLINE_METADATA, channel_options, mtls_channel

PUSH_METHOD = "/bridge.v1.Ingest/PushBatch"
HEALTH_SERVICE = "bridge.v1.Ingest"


# Call-level errors never drop data: the batch stays in the spool and is retried. Only
# per-envelope REJECTED acknowledgements are permanent (see bridge.edge.uplink.sender). An identity
# refusal (PERMISSION_DENIED, UNAUTHENTICATED) is permanent for the endpoint, not the data: the
# pool takes it out and retries it slowly (bridge.edge.uplink.pool, "Refusals").
_FLAGS = {
    grpc.StatusCode.UNAVAILABLE: "UF",
    grpc.StatusCode.DEADLINE_EXCEEDED: "UT",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RL",
    grpc.StatusCode.PERMISSION_DENIED: "UAEX",
    grpc.StatusCode.UNAUTHENTICATED: "UAEX",
    grpc.StatusCode.CANCELLED: "DC",
}


def classify(err: grpc.aio.AioRpcError) -> TransportError:
    code = err.code()
    retry_after = None
    max_envelopes = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        metadata: Any = err.trailing_metadata() or ()
        for key, value in metadata:
            try:
                if key == "retry-after-ms":
                    retry_after = float(value) / 1000.0
                elif key == "max-batch-envelopes":
                    max_envelopes = max(1, int(value))
            except (TypeError, ValueError):
                continue  # a malformed hint is ignored: the backoff still applies
        kind = ErrorKind.THROTTLED
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        kind = ErrorKind.REFUSED
    else:
        kind = ErrorKind.RETRYABLE
    return TransportError(code=code.name, flag=_FLAGS.get(code, "UF"), kind=kind,
                          detail=(err.details() or "")[:300], retry_after_s=retry_after,
                          max_envelopes=max_envelopes)


class Transport(Protocol):
    async def push(self, batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack: ...

    async def healthy(self, *, timeout: float) -> bool: ...

    async def close(self, grace: float | None = None) -> None:
        """Close; with ``grace``, calls in flight may finish for up to that long first."""


class GrpcTransport:
    def __init__(self, *, target: str, tls: TlsConfig, backoff_max_s: float,
                 proxy_url: str | None = None,
                 pem: tuple[bytes, bytes, bytes] | None = None) -> None:
        """``pem`` (ca, cert, key), already read and checked, takes the place of reading
        ``tls``'s files (a credential rotation, ``bridge.edge.uplink.credentials``)."""
        options = channel_options(backoff_max_s=backoff_max_s)
        # interface binding (bridge.edge.uplink.netbind): tunnel through the bound proxy
        if proxy_url:
            options.append(("grpc.http_proxy", proxy_url))
        self._channel = mtls_channel(target, pem or tls.read(), options=options)
        self._push = self._channel.unary_unary(PUSH_METHOD, request_serializer=None,
                                               response_deserializer=pb.Ack.FromString)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def push(self, batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack:
        try:
            ack: pb.Ack = await self._push(batch, timeout=timeout,
                                           metadata=(("x-request-id", batch_id),
                                                     (DEADLINE_METADATA,
                                                      str(round(timeout * 1000)))))
            return ack
        except grpc.aio.AioRpcError as err:
            raise classify(err) from err

    async def healthy(self, *, timeout: float) -> bool:
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise classify(err) from err
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace=grace)
