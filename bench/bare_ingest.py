"""A bare gRPC server with the ingest's service and mTLS, and nothing else: ``PushBatch``
answers every envelope COMMITTED at once, with no store, no ledger, no metrics.

``python -m bench.fleet --bare`` loads it as it loads the real node, so the memory a
connected, active site costs splits into what grpcio's mTLS connection costs and what the
bridge adds (docs/deployment.md, sizing). Bench harness only: never a place to store data.

``python -m bench.bare_ingest HOST:PORT CA CERT KEY`` prints ``ready`` once it listens.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc


class _Bare(pb_grpc.IngestServicer):
    async def PushBatch(self, request: pb.Batch, context: Any) -> pb.Ack:
        ack = pb.Ack(batch_id=request.batch_id, node="bare")
        for e in request.envelopes:
            ack.results.add(site_id=e.site_id, epoch=e.epoch, seq=e.seq,
                            disposition=pb.DISPOSITION_COMMITTED)
        return ack


async def serve(target: str, ca: bytes, cert: bytes, key: bytes) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_IngestServicer_to_server(_Bare(), server)  # type: ignore[abstract]
    server.add_secure_port(target, grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    ca, cert, key = (Path(p).read_bytes() for p in sys.argv[2:5])
    asyncio.run(serve(sys.argv[1], ca, cert, key))
