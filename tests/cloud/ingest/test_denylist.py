"""A running ingest refuses revoked certificates within a second of the deny-list changing."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from bridge.cloud.ingest.denylist import parse
from bridge.edge.envelope import encode_batch
from bridge.edge.uplink.transport import GrpcTransport
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import ConfigError, TransportError
from bridge.shared.pki import identity_from_pem
from devkit import localrun
from tests.conftest import metric_value

FP = "ab" * 32


def test_the_deny_list_reads_serials_and_fingerprints_with_comments():
    got = parse(f"# revoked\nserial:0A1b  # a comment\n\nsha256:{':'.join(['AB'] * 32)}\n"
                f"sha256:{FP.upper()}\n", source="deny.txt")
    assert got.serials == {0x0A1B}
    assert got.fingerprints == {FP}
    assert len(got) == 2


@pytest.mark.parametrize("line", ["0a1b", "serial:xyz", "sha256:abcd", "md5:" + "ab" * 16,
                                  "serial:"])
def test_a_bad_deny_list_line_is_an_error_naming_the_line(line: str):
    with pytest.raises(ConfigError, match=r"deny\.txt: line 2: expected 'serial:<hex>'"):
        parse(f"serial:1\n{line}\n", source="deny.txt")


def test_an_ingest_with_a_missing_deny_list_refuses_to_start_with_one_line(tmp_path: Path):
    pkis = localrun.Pki(tmp_path / "pki", [])
    node = localrun.ingest(tmp_path, pkis, "aws",
                           extra=f'[revocation]\ndeny_list = "{tmp_path / "nope.txt"}"\n')
    res = subprocess.run(localrun.bridge_argv("ingest", "--config", str(node.config)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {node.config}: revocation.deny_list: {tmp_path / 'nope.txt'}: no such file "
        "(create it empty: an empty list revokes nothing)"]


async def _push(t: GrpcTransport, site: str, seq: int) -> str:
    env = pb.Envelope(site_id=site, epoch=7, seq=seq, gateway_time_ns=time.time_ns())
    try:
        await t.push(encode_batch(str(uuid.uuid4()), [env.SerializeToString()]),
                     batch_id="t", timeout=5)
    except TransportError as err:
        return f"{err.code}: {err.detail}"
    return "OK"


def test_a_revoked_site_is_refused_within_a_second_and_a_bad_edit_keeps_it_revoked(
        tmp_path: Path):
    pkis = localrun.Pki(tmp_path / "pki", ["s1", "s2"])
    deny = tmp_path / "revoked.txt"
    deny.write_text("# nothing revoked yet\n")
    mport = localrun.free_port()
    node = localrun.ingest(tmp_path, pkis, "aws",
                           extra=f'[revocation]\ndeny_list = "{deny}"\n'
                                 f'[metrics]\nlisten = "127.0.0.1:{mport}"\n').start()
    try:
        localrun.wait_healthy(node.target, pkis.consumer())

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                return r.read().decode()

        async def scenario() -> None:
            one = GrpcTransport(target=node.target, tls=pkis.site("s1"), backoff_max_s=1)
            two = GrpcTransport(target=node.target, tls=pkis.site("s2"), backoff_max_s=1)
            try:
                assert await _push(one, "s1", 1) == "OK"  # the channel is open before...
                res = await asyncio.to_thread(subprocess.run, localrun.bridge_argv(
                    "pki", "revoke", "--deny-list", str(deny),
                    str(pkis.dir / "site-s1.pem")), capture_output=True, text=True,
                    timeout=60, check=True)
                written = time.monotonic()
                ident = identity_from_pem((pkis.dir / "site-s1.pem").read_bytes())
                assert f"serial:{ident.serial:x}" in res.stdout
                assert f"sha256:{ident.fingerprint}" in deny.read_text()
                seq, outcome = 2, "OK"
                while outcome == "OK" and time.monotonic() - written < 3:
                    outcome = await _push(one, "s1", seq)  # ...and is refused on it
                    seq += 1
                refused_after = time.time() - deny.stat().st_mtime_ns / 1e9  # since the edit
                assert outcome.startswith("PERMISSION_DENIED: certificate 's1' (serial "), outcome
                assert "is revoked" in outcome
                assert refused_after < 1.0, refused_after
                assert await _push(two, "s2", 1) == "OK"  # another site is not affected

                # A typo must not un-revoke: the bad file is refused and the list stays.
                deny.write_text("serial:not-hex\n")
                deadline = time.monotonic() + 5
                while metric_value(metrics(), 'bridge_ingest_deny_list_reloads_total'
                                   '{outcome="error"}') < 1 and time.monotonic() < deadline:
                    await _push(two, "s2", 2)  # reloads happen on the call path
                    await asyncio.sleep(0.05)
                text = metrics()
                assert metric_value(text, 'bridge_ingest_deny_list_reloads_total'
                                    '{outcome="error"}') == 1
                assert metric_value(text, "bridge_ingest_deny_list_entries") == 2
                assert (await _push(one, "s1", 100)).startswith("PERMISSION_DENIED")
                assert metric_value(metrics(), 'bridge_ingest_denied_total'
                                    '{reason="revoked"}') >= 2
            finally:
                await one.close()
                await two.close()

        asyncio.run(scenario())
    finally:
        node.proc.stop()
    log = (tmp_path / "ingest-aws.log").read_text()
    assert '"event":"ingest.deny_list_reloaded"' in log
    assert '"event":"ingest.deny_list_failed"' in log and "line 1" in log
