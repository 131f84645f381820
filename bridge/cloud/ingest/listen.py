"""The ingest node's listeners: each address bound exclusively, and mTLS credentials that
follow the files on disk.

* ``bind``: grpcio turns ``SO_REUSEPORT`` on by default, so a second node on the same port
  would start and the kernel would split connections (and dedupe ledgers) between the two.
  The servers are made with ``grpc.so_reuseport`` 0 and ``bind`` checks the address first
  (``bridge.common.claim_address``), so a taken one is ``InUseError``, one line, exit 2.
* ``server_credentials``: a required client certificate; the certificate, key and CA are
  re-read when their mtimes change (grpcio asks at each new handshake), after the checks of
  start-up (``TlsConfig.verified``): a key from another certificate is reported and never
  switched to.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from bridge.shared.config import TlsConfig, parse_hostport
from bridge.shared.errors import ConfigError, InUseError
from bridge.shared.sockets import claim_address
from bridge.shared.telemetry import event


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """mTLS with a required client certificate, reloaded when the files change on disk."""
    ca, cert, key = tls.verified(role=None)
    state = {"mtime": _mtimes(tls)}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        m = _mtimes(tls)
        if m == state["mtime"]:
            return None
        try:  # the checks of start-up: a key from another certificate is never switched to
            ca2, cert2, key2 = tls.verified(role=None)
        except ConfigError as exc:  # keep serving with the old certificate
            state["mtime"] = m
            event("ingest.tls_reload_failed", level=logging.ERROR, reason=str(exc),
                  keeping="the certificate already in use")
            return None
        state["mtime"] = m
        event("ingest.tls_reloaded")
        return grpc.ssl_server_certificate_configuration([(key2, cert2)], ca2)

    initial = grpc.ssl_server_certificate_configuration([(key, cert)], ca)
    fetcher: Any = fetch  # grpcio accepts None ("unchanged"); the stubs do not say so
    return grpc.dynamic_ssl_server_credentials(initial, fetcher,
                                               require_client_authentication=True)


def _mtimes(tls: TlsConfig) -> tuple[float, ...]:
    out = []
    for p in (tls.ca, tls.cert, tls.key):
        try:
            out.append(p.stat().st_mtime)
        except OSError:
            out.append(0.0)
    return tuple(out)


def bind(server: grpc.aio.Server, listen: str, key: str,
          creds: grpc.ServerCredentials | None) -> int:
    """The port ``server`` listens on, exclusively; ``InUseError`` naming ``key`` if another
    process holds it (checked first: grpcio's own failure is a bare ``RuntimeError``)."""
    host, port = parse_hostport(listen, listen=True)
    claim_address(host, port, key=key)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, creds) if creds is not None else \
            server.add_insecure_port(address)
    except RuntimeError as exc:  # lost a race for the port since the check
        raise InUseError(f"{key} {listen}: cannot bind ({exc})") from exc
    if bound == 0:
        raise InUseError(f"{key} {listen}: cannot bind")
    return bound
