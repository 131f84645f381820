"""The agent's certificate, key and CA, watched: rotation without a restart, expiry warned of.

A renewal (``bridge pki csr`` + ``sign``, certbot, an MDM) replaces the three PEM files, rarely
all in the same instant. Every ``check_s`` the watcher stats them (mtime, size, inode); when a
stamp changed it reads the set and checks it the way TLS will use it before anything switches:

* each file is PEM and the key is private (``TlsConfig.read``);
* the key belongs to the certificate and the CA parses (``ssl.SSLContext.load_cert_chain`` and
  ``load_verify_locations``, the same OpenSSL checks the channel would fail on later);
* the certificate names this site (its CN is ``site_id``: the ingest would refuse another),
  is a site certificate (OU ``bridge-site``), was issued by the CA and is within its dates
  (an in-memory TLS handshake, ``certinfo.chain_problem``): ``TlsConfig.verified``, the same
  checks as at start;
* no stamp moved while it was being read (a half-replaced set is read again next time).

A set that fails is reported once (``tls.reload_failed``, ``bridge_tls_reloads_total
{outcome="failed"}``) and the channels keep the credentials they have: a bad edit never takes
the uplink down. A set that passes becomes new channels for every endpoint
(``EndpointPool.rebuild``): new calls and probes use them at once, calls in flight finish on the
old channel, which closes when they are done or after one call deadline (``tls.reloaded``).

Expiry: after every load and then every ``check_s``, each certificate held (the client
certificate, the CA, and any plant-side client certificates) is compared with the clock:
inside ``WARN_DAYS`` a ``tls.cert_expiring`` WARNING, inside ``ERROR_DAYS`` (or expired) an
ERROR, once when it enters the band and again once a day while it stays there.
``bridge_cert_expiry_seconds`` (``bridge.shared.telemetry.CertExpiry``) carries the figure itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from bridge.shared import certinfo
from bridge.shared import defaults as D
from bridge.shared.config import TlsConfig
from bridge.shared.errors import ConfigError
from bridge.shared.files import Stamp, stamp
from bridge.shared.telemetry import AgentMetrics, event

WARN_DAYS = 30.0
ERROR_DAYS = 7.0
REMIND_S = 86400.0
Pem = tuple[bytes, bytes, bytes]  # ca, cert, key


def load(tls: TlsConfig, *, site_id: str, now: float) -> Pem:
    """The checked (ca, cert, key) PEM of ``tls``; ``ConfigError`` naming what is wrong.

    The same checks as at start (``TlsConfig.verified``): a set that start-up would refuse is
    never switched to at a reload either."""
    return tls.verified(role=certinfo.ROLE_SITE, name=site_id, now=now)


class CredentialWatcher:
    """Polls the uplink's TLS files; calls ``on_change(pem)`` with every new set that passes."""

    def __init__(self, *, tls: TlsConfig, site_id: str, metrics: AgentMetrics,
                 on_change: Callable[[Pem], Awaitable[None]], check_s: float = D.TLS_CHECK_S,
                 also: Mapping[str, Path] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``also``: further certificates held (role -> file) whose expiry is watched."""
        self.tls, self.site_id, self.metrics = tls, site_id, metrics
        self._on_change = on_change
        self.check_s = check_s
        self._clock = clock
        self._paths = (tls.ca, tls.cert, tls.key)
        self._stamp = self._stamps()
        self._failed: tuple[Stamp, ...] | None = None
        self._watched = {"client": tls.cert, "ca": tls.ca, **(also or {})}
        self._bands: dict[str, tuple[str, float]] = {}  # role -> (band, when last said)
        self.reloads = 0

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(p) for p in self._paths)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            await self.check()

    async def check(self) -> bool:
        """One poll: reload if the files changed; say what is near expiry. True if reloaded."""
        reloaded = False
        now = self._stamps()
        if now not in (self._stamp, self._failed):
            reloaded = await self._reload(now)
        self.expiry()
        return reloaded

    async def _reload(self, stamps: tuple[Stamp, ...]) -> bool:
        try:
            pem = load(self.tls, site_id=self.site_id, now=self._clock())
            if self._stamps() != stamps:
                return False  # still being replaced: read it again at the next poll
        except ConfigError as exc:
            self._failed = stamps
            self.metrics.tls_reloads.labels("failed").inc()
            event("tls.reload_failed", level=logging.ERROR, reason=str(exc),
                  keeping="the credentials already in use")
            return False
        self._stamp, self._failed = stamps, None
        await self._on_change(pem)
        self.reloads += 1
        self.metrics.tls_reloads.labels("ok").inc()
        subject, not_after = certinfo.read_pem(pem[1])[0]
        event("tls.reloaded", cert=str(self.tls.cert), subject=subject,
              serial=f"{certinfo.serial_pem(pem[1]):x}",
              expires_in_days=round((not_after - self._clock()) / 86400, 1))
        return True

    def expiry(self) -> None:
        now = self._clock()
        for role, path in self._watched.items():
            try:
                certs = certinfo.read_pem(path.read_bytes())
            except (OSError, ValueError):
                continue  # bridge_cert_unreadable and telemetry.cert_unreadable say so
            left = min(not_after for _, not_after in certs) - now
            band = ("expired" if left <= 0 else "error" if left < ERROR_DAYS * 86400
                    else "warning" if left < WARN_DAYS * 86400 else "")
            said = self._bands.get(role)
            if not band:
                self._bands.pop(role, None)
                continue
            if said is not None and said[0] == band and now - said[1] < REMIND_S:
                continue
            self._bands[role] = (band, now)
            event("tls.cert_expiring",
                  level=logging.WARNING if band == "warning" else logging.ERROR,
                  cert=role, path=str(path), band=band, days_left=round(left / 86400, 2),
                  action="renew it: bridge pki csr on the gateway, bridge pki sign on the CA "
                         "host (docs/deployment.md, Renewing a site certificate)")
