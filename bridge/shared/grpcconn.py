"""The gRPC client side every client of the ingest shares (the agent's uplink, the consumer,
the bench's sites), built in one place.

* ``channel_options``: keepalive, reconnect backoff, no library retries.
* ``mtls_credentials`` / ``mtls_channel``: mutual TLS from the PEM triple ``TlsConfig.read()``
  gives.
* ``DEADLINE_METADATA``: the agent states its call deadline in this header, so the ingest
  can tell how long a call waited before its handler ran (gRPC keeps the deadline itself
  from the server's code; ``bridge.cloud.ingest.admission``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc


DEADLINE_METADATA = "bridge-deadline-ms"


def channel_options(*, backoff_max_s: float) -> list[tuple[str, Any]]:
    """Keepalive pings every 10 s (the ingest permits 5 s), reconnects capped at
    ``backoff_max_s``, and no gRPC retries: ours resend with the same ids, elsewhere."""
    return [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
        ("grpc.enable_retries", 0),  # retries are ours: same request ids, other endpoints
    ]


Pem = tuple[bytes, bytes, bytes]  # (ca, cert, key), as TlsConfig.read() gives them


def mtls_credentials(pem: Pem) -> grpc.ChannelCredentials:
    """Client credentials for mutual TLS: trust ``ca``, present ``cert`` with ``key``. The one
    place the PEM triple meets gRPC's (root, key, chain) argument order."""
    import grpc  # not at import time: the CLI sets GRPC_VERBOSITY before gRPC starts

    ca, cert, key = pem
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def mtls_channel(target: str, pem: Pem, *, options: list[tuple[str, Any]] | None = None
                 ) -> grpc.aio.Channel:
    """An asyncio gRPC channel to ``target`` with ``mtls_credentials(pem)`` (the agent's
    uplink, the consumer, the bench's sites)."""
    import grpc

    return grpc.aio.secure_channel(target, mtls_credentials(pem), options=options)
