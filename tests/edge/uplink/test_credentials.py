"""The uplink's credentials are checked before they switch, and their expiry is said in time."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest

from bridge.edge.uplink.credentials import CredentialWatcher, Pem, load
from bridge.shared import certinfo, pki
from bridge.shared.config import TlsConfig
from bridge.shared.errors import ConfigError
from bridge.shared.telemetry import AgentMetrics


def _site(tmp_path: Path, site: str = "gw-1") -> tuple[Path, TlsConfig]:
    """A CA and a site certificate in ``tmp_path/ca``, copied where an agent reads them."""
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(exist_ok=True)
    if not (ca_dir / "ca.pem").exists():
        pki.create_ca(ca_dir)
    pki.issue_site(ca_dir, ca_dir, site_id=site, force=True)
    live = tmp_path / "live"
    live.mkdir(exist_ok=True)
    for name in (f"site-{site}.pem", f"site-{site}.key"):
        shutil.copy2(ca_dir / name, live / name)
    shutil.copy2(ca_dir / "ca.pem", live / "ca.pem")
    return ca_dir, TlsConfig(ca=live / "ca.pem", cert=live / f"site-{site}.pem",
                             key=live / f"site-{site}.key", file="agent.toml")


def _renew(ca_dir: Path, tls: TlsConfig, *, site: str = "gw-1", days: int = 825,
           parts: tuple[str, ...] = ("key", "cert")) -> None:
    """Issue a new certificate and key and move them into place, as an installer would."""
    new = ca_dir / "new"
    new.mkdir(exist_ok=True)
    pki.issue_site(ca_dir, new, site_id=site, days=days, force=True)
    for part in parts:
        src = new / f"site-{site}.{'key' if part == 'key' else 'pem'}"
        os.replace(src, getattr(tls, part))


def test_a_key_that_does_not_belong_to_the_certificate_is_refused_naming_both(tmp_path: Path):
    ca_dir, tls = _site(tmp_path)
    _renew(ca_dir, tls, parts=("key",))
    with pytest.raises(ConfigError, match=r"agent\.toml: tls\.key: .*site-gw-1\.key does not "
                                          r"belong to .*site-gw-1\.pem"):
        load(tls, site_id="gw-1", now=0.0)


def test_another_sites_certificate_is_refused(tmp_path: Path):
    _, tls = _site(tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.cert: .* is for 'gw-1', not this site "
                                          r"\('gw-2'\): the ingest would refuse it"):
        load(tls, site_id="gw-2", now=0.0)


def test_an_expired_certificate_is_refused(tmp_path: Path):
    _, tls = _site(tmp_path)
    _, not_after = certinfo.read_pem(tls.cert.read_bytes())[0]
    assert load(tls, site_id="gw-1", now=not_after - 1)[1] == tls.cert.read_bytes()
    with pytest.raises(ConfigError, match=r"expired 2\.0 days ago"):
        load(tls, site_id="gw-1", now=not_after + 2 * 86400)


class _Recorder:
    def __init__(self) -> None:
        self.sets: list[Pem] = []

    async def __call__(self, pem: Pem) -> None:
        self.sets.append(pem)


def _reloads(metrics: AgentMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("bridge_tls_reloads_total", {"outcome": outcome})
    return value or 0.0


def test_a_renewal_is_loaded_once_and_a_half_done_one_waits_for_its_other_half(tmp_path: Path):
    ca_dir, tls = _site(tmp_path)
    metrics, seen = AgentMetrics(), _Recorder()
    watcher = CredentialWatcher(tls=tls, site_id="gw-1", metrics=metrics, on_change=seen)

    async def scenario() -> None:
        assert not await watcher.check()  # nothing changed since start
        _renew(ca_dir, tls, parts=("key",))  # the key first: it does not match the old cert
        assert not await watcher.check()
        assert not await watcher.check()  # the same bad set is reported once, not per poll
        assert (_reloads(metrics, "failed"), seen.sets) == (1.0, [])
        os.replace(ca_dir / "new" / "site-gw-1.pem", tls.cert)  # ...then its certificate
        assert await watcher.check()
        assert not await watcher.check()

    asyncio.run(scenario())
    assert _reloads(metrics, "ok") == 1.0
    assert seen.sets == [(tls.ca.read_bytes(), tls.cert.read_bytes(), tls.key.read_bytes())]


def test_expiry_is_warned_at_30_days_then_daily_and_an_error_at_7(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    _, tls = _site(tmp_path)
    _, not_after = certinfo.read_pem(tls.cert.read_bytes())[0]
    now = [not_after - 40 * 86400]
    watcher = CredentialWatcher(tls=tls, site_id="gw-1", metrics=AgentMetrics(),
                                on_change=_Recorder(), clock=lambda: now[0])

    def said() -> list[tuple[str, str, int]]:
        return [(r.fields["cert"], r.fields["band"], r.levelno)  # type: ignore[attr-defined]
                for r in caplog.records if r.getMessage() == "tls.cert_expiring"]

    with caplog.at_level(logging.WARNING, logger="bridge"):
        watcher.expiry()
        assert said() == []  # 40 days left: nothing to say
        now[0] = not_after - 29 * 86400
        watcher.expiry()
        watcher.expiry()
        assert said() == [("client", "warning", logging.WARNING)]  # once, not per check
        now[0] += 86400  # a day later: reminded
        watcher.expiry()
        now[0] = not_after - 6 * 86400
        watcher.expiry()
        now[0] = not_after + 1
        watcher.expiry()
    assert said() == [("client", "warning", logging.WARNING)] * 2 + [
        ("client", "error", logging.ERROR), ("client", "expired", logging.ERROR)]
