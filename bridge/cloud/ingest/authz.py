"""Who may call the ingest, checked for the whole life of a call.

The peer's identity comes from its verified client certificate (``bridge.shared.pki``: CN, which a
DNS SAN must repeat; the role in the OU; serial and fingerprint). Invariants:

* Every call (PushBatch, Subscribe, Status) is refused with PERMISSION_DENIED, counted
  (``bridge_ingest_denied_total{reason}``) and logged (``ingest.denied``), unless the
  certificate is not on the deny-list (``revoked``), has not expired (``expired``: a channel
  opened before notAfter outlives its handshake, so expiry is checked per call, not only by
  TLS), has the call's role (a site pushes, a consumer reads) and names a valid id
  (``invalid_identity``: at most 64 characters of a-z, 0-9, '-' and '.', the rule of the
  config loader and ``bridge pki``). So an id the bridge would never issue reaches no metric
  label, no log line in full, no store and no JetStream subject (where ``site_a`` and
  ``site.a`` would otherwise share one).
* A long stream (Subscribe with ``follow``) is checked again at least every ``interval_s``
  (the deny-list's own reload interval, 0.2 s) while it is open, idle or not: it ends with
  PERMISSION_DENIED once its certificate is revoked or expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from bridge.cloud.ingest.denylist import DenyList
from bridge.shared.certinfo import ROLE_SITE
from bridge.shared.config import site_id_problem
from bridge.shared.pki import PeerIdentity, identity_from_pem
from bridge.shared.telemetry import IngestMetrics, event

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
REASONS = ("not_a_site_certificate", "site_mismatch", "not_a_consumer_certificate", "revoked",
           "expired", "invalid_identity")
_IDLE = object()


class Authorizer:
    """The identity of each call and the refusals above; one per ingest node."""

    def __init__(self, *, metrics: IngestMetrics, deny_list: DenyList | None,
                 interval_s: float = 0.2, clock: Callable[[], float] = time.time) -> None:
        self.metrics, self.deny_list = metrics, deny_list
        self.interval_s, self._clock = interval_s, clock
        self._identities: dict[bytes, PeerIdentity] = {}
        self._labelled: set[str] = set()
        for reason in REASONS:
            metrics.denied.labels(reason)

    def identity(self, context: Context) -> PeerIdentity:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        if not pems:
            return PeerIdentity(name="", role="")
        pem = pems[0]
        ident = self._identities.get(pem)
        if ident is None:
            if len(self._identities) > 10_000:
                self._identities.clear()
            ident = self._identities[pem] = identity_from_pem(pem)
        return ident

    def refusal(self, ident: PeerIdentity, role: str) -> tuple[str, str, dict[str, Any]] | None:
        """(reason, message, log fields) if ``ident`` may not make a ``role`` call now."""
        if self.deny_list is not None and self.deny_list.revoked(ident.serial,
                                                                 ident.fingerprint):
            return ("revoked", f"certificate {ident.name[:64]!r} (serial {ident.serial:x}) "
                    "is revoked", {"serial": f"{ident.serial:x}",
                                   "fingerprint": ident.fingerprint})
        if ident.not_after <= self._clock():
            return ("expired", f"certificate {ident.name[:64]!r} (serial {ident.serial:x}) "
                    "has expired", {"serial": f"{ident.serial:x}"})
        if ident.role != role or not ident.name:
            return (f"not_a_{role.removeprefix('bridge-')}_certificate",
                    f"certificate {ident.name[:64]!r} (role {ident.role[:64]!r}) may not "
                    f"{'push' if role == ROLE_SITE else 'read'}", {"role": ident.role[:64]})
        if (problem := site_id_problem(ident.name)) is not None:
            return ("invalid_identity", f"certificate common name is not a valid "
                    f"{'site id' if role == ROLE_SITE else 'consumer name'}: {problem}", {})
        return None

    async def caller(self, context: Context, role: str) -> PeerIdentity:
        """The caller's identity if it may make a ``role`` call; else PERMISSION_DENIED."""
        ident = self.identity(context)
        why = self.refusal(ident, role)
        if why is not None:
            if role == ROLE_SITE:
                self.metrics.batches.labels("PERMISSION_DENIED").inc()
            reason, message, fields = why
            await self.deny(context, reason, message, identity=ident.name[:100], **fields)
        if role == ROLE_SITE and ident.name not in self._labelled:
            # A site's series start at 0 (rate() sees its first), once its id is known good.
            self._labelled.add(ident.name)
            for counter in (self.metrics.committed, self.metrics.duplicates,
                            self.metrics.throttled):
                counter.labels(ident.name)
        return ident

    async def deny(self, context: Context, reason: str, message: str,
                   **fields: Any) -> NoReturn:
        self.metrics.denied.labels(reason).inc()
        event("ingest.denied", level=logging.WARNING, reason=reason, peer=context.peer(),
              flag="UAEX", **fields)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def guard(self, items: AsyncIterator[T], ident: PeerIdentity, role: str,
                    context: Context, *, batch: int = 0) -> AsyncIterator[Any]:
        """``items``, ended with PERMISSION_DENIED within ``interval_s`` of ``ident`` losing
        the right to them, even while no item comes (a pump task reads ``items``). With
        ``batch``, lists of up to ``batch`` items: those the store had ready (a reader that
        is catching up gets full lists; a live one gets each item as it comes)."""
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=max(256, 2 * batch))

        async def pump() -> None:
            try:
                async for item in items:
                    await queue.put((True, item))
                await queue.put((False, None))
            except Exception as exc:  # noqa: BLE001 - raised again in the call's own task
                await queue.put((False, exc))

        task = asyncio.create_task(pump(), name="stream-pump")
        checked = time.monotonic()
        try:
            while True:
                try:  # the fast path: no timer per item while the store delivers
                    more, item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:  # asyncio.timeout: wait_for can lose a cancel (common.wait_event)
                        async with asyncio.timeout(self.interval_s):
                            more, item = await queue.get()
                    except TimeoutError:
                        more, item = True, _IDLE
                if item is _IDLE or time.monotonic() - checked >= self.interval_s:
                    checked = time.monotonic()
                    why = self.refusal(ident, role)
                    if why is not None:
                        reason, message, fields = why
                        await self.deny(context, reason, f"{message} (stream ended)",
                                        identity=ident.name[:100], **fields)
                if not more:
                    if isinstance(item, BaseException):
                        raise item
                    return
                if item is _IDLE:
                    continue
                if not batch:
                    yield item
                    continue
                ready = [item]  # and what else the store has ready, taken without waiting
                end: tuple[bool, Any] | None = None
                while len(ready) < batch:
                    try:
                        more, item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if not more:
                        end = (more, item)
                        break
                    ready.append(item)
                yield ready
                if end is not None:
                    if isinstance(end[1], BaseException):
                        raise end[1]
                    return
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
