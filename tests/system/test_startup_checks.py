"""Start-up and ``--check`` refuse credentials that would only fail later: the checks the peer's
TLS would make (key of this certificate, issued by this CA, for this role and this site),
for the agent, the ingest and the consumer; one limit on site ids everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.shared.config import TlsConfig
from devkit import localrun


def run_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def refused(res: subprocess.CompletedProcess[str], key: str, message: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert f": {key}: " in errors[0], errors[0]
    assert message in errors[0], errors[0]


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> localrun.Pki:
    """A second, unrelated CA issuing the same names."""
    return localrun.Pki(tmp_path_factory.mktemp("other-pki"), ["site-a"])


def agent_with(tmp_path: Path, pkis: localrun.Pki, tls: TlsConfig, site: str = "site-a"
               ) -> localrun.AgentProc:
    node = localrun.ingest(tmp_path, pkis, "aws")
    a = localrun.agent(tmp_path, pkis, site, mqtt_port=localrun.free_port(), endpoints=[node])
    text = a.config.read_text()
    own = pkis.site(site)
    for name in ("ca", "cert", "key"):
        text = text.replace(f'"{getattr(own, name)}"', f'"{getattr(tls, name)}"')
    a.config.write_text(text)
    return a


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_an_agent_key_from_another_certificate_is_refused(
        tmp_path: Path, pkis: localrun.Pki, check: bool):
    site_a = pkis.site("site-a")
    tls = TlsConfig(ca=site_a.ca, cert=site_a.cert, key=pkis.site("site-b").key)
    a = agent_with(tmp_path, pkis, tls)
    refused(run_bridge("agent", "--config", str(a.config), *(["--check"] if check else [])),
            "tls.key", "does not belong to")


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_an_agent_whose_site_id_is_not_its_certificates_is_refused(
        tmp_path: Path, pkis: localrun.Pki, check: bool):
    a = agent_with(tmp_path, pkis, pkis.site("site-b"), site="site-a")
    refused(run_bridge("agent", "--config", str(a.config), *(["--check"] if check else [])),
            "tls.cert", "is for 'site-b', not this site ('site-a')")


def test_an_agent_certificate_from_another_ca_is_refused(
        tmp_path: Path, pkis: localrun.Pki, other_ca: localrun.Pki):
    foreign = other_ca.site("site-a")
    tls = TlsConfig(ca=pkis.ca, cert=foreign.cert, key=foreign.key)
    a = agent_with(tmp_path, pkis, tls)
    refused(run_bridge("agent", "--config", str(a.config), "--check"), "tls.cert",
            "unable to get local issuer certificate")


def test_a_consumer_certificate_cannot_run_an_agent(tmp_path: Path, pkis: localrun.Pki):
    consumer = pkis.consumer()
    a = agent_with(tmp_path, pkis, consumer)
    refused(run_bridge("agent", "--config", str(a.config), "--check"), "tls.cert",
            "'bridge-consumer' certificate, not 'bridge-site'")


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_an_ingest_key_from_another_certificate_is_refused(
        tmp_path: Path, pkis: localrun.Pki, check: bool):
    server = pkis.server()
    node = localrun.ingest(tmp_path, pkis, "aws", tls=TlsConfig(
        ca=server.ca, cert=server.cert, key=pkis.site("site-a").key))
    refused(run_bridge("ingest", "--config", str(node.config),
                       *(["--check"] if check else [])), "tls.key", "does not belong to")


def test_a_consumer_with_a_site_certificate_is_refused(tmp_path: Path, pkis: localrun.Pki):
    site = pkis.site("site-a")
    res = run_bridge("consume", "--from", "127.0.0.1:1", "--ca", str(site.ca),
                     "--cert", str(site.cert), "--key", str(site.key))
    refused(res, "--.cert", "'bridge-site' certificate, not 'bridge-consumer'")


def test_a_consumer_key_from_another_certificate_is_refused(tmp_path: Path,
                                                            pkis: localrun.Pki):
    consumer = pkis.consumer()
    res = run_bridge("consume", "--from", "127.0.0.1:1", "--status", "--ca", str(consumer.ca),
                     "--cert", str(consumer.cert), "--key", str(pkis.site("site-a").key))
    refused(res, "--.key", "does not belong to")


def test_the_good_credentials_still_pass(tmp_path: Path, pkis: localrun.Pki):
    a = agent_with(tmp_path, pkis, pkis.site("site-a"))
    res = run_bridge("agent", "--config", str(a.config), "--check")
    assert res.returncode == 0, res.stderr
    node = localrun.ingest(tmp_path, pkis, "gcp")
    res = run_bridge("ingest", "--config", str(node.config), "--check")
    assert res.returncode == 0, res.stderr


LONG = "s" * 121


def test_a_site_id_longer_than_a_certificate_name_is_one_clear_error(tmp_path: Path,
                                                                       pkis: localrun.Pki):
    res = run_bridge("pki", "site", "--dir", str(pkis.dir), "--out", str(tmp_path),
                     "--site", LONG)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "is 121 characters; at most 64" in res.stderr
    res = run_bridge("pki", "csr", "--out", str(tmp_path), "--site", LONG)
    assert res.returncode == 2 and "is 121 characters; at most 64" in res.stderr, res.stderr
    res = run_bridge("pki", "consumer", "--dir", str(pkis.dir), "--out", str(tmp_path),
                     "--name", "c" * 65)
    assert res.returncode == 2 and "at most 64" in res.stderr, res.stderr
    res = run_bridge("pki", "server", "--dir", str(pkis.dir), "--out", str(tmp_path),
                     "--name", "n" * 65, "--dns", "localhost")
    assert res.returncode == 2 and "holds 1 to 64" in res.stderr, res.stderr
    a = agent_with(tmp_path, pkis, pkis.site("site-a"), site="site-a")
    a.config.write_text(a.config.read_text().replace('site_id = "site-a"',
                                                     f'site_id = "{"a" * 65}"'))
    refused(run_bridge("agent", "--config", str(a.config), "--check"), "site_id",
            "is 65 characters; at most 64")


def test_sixty_four_characters_is_a_valid_site(tmp_path: Path, pkis: localrun.Pki):
    site = "s" * 31 + "." + "t" * 32  # 64 characters; a DNS label holds 63
    res = run_bridge("pki", "site", "--dir", str(pkis.dir), "--out", str(tmp_path),
                     "--site", site)
    assert res.returncode == 0, res.stderr
