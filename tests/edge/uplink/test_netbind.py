"""Interface binding: uplink traffic leaves only by the configured interface, or not at all."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bridge.edge.uplink.netbind import resolve_vlan
from bridge.shared import pki
from bridge.shared.config import TlsConfig
from bridge.shared.errors import BindError
from devkit import localrun
from tests.conftest import Cluster, Publisher, idle, wait_for

VLAN_CONFIG = """VLAN Dev name    | VLAN ID
Name-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD
eth0.200       | 200  | eth0
eth0.310       | 310  | eth0
"""


def test_vlan_ids_resolve_to_interface_names_through_the_kernel_table(tmp_path: Path):
    cfg = tmp_path / "config"
    cfg.write_text(VLAN_CONFIG)
    assert resolve_vlan(310, config=cfg) == "eth0.310"
    with pytest.raises(BindError, match="no interface carries it"):
        resolve_vlan(999, config=cfg)
    with pytest.raises(BindError, match=r"802\.1Q"):
        resolve_vlan(200, config=tmp_path / "missing")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def veth_cloud() -> Iterator[tuple[str, str, str]]:
    """A 'cloud' host in its own network namespace, reachable over a veth pair.

    Yields (netns, host-side interface, the cloud's address).
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    tag = os.getpid() % 200 + 20
    ns, host_if, ns_if = f"brt{tag}", f"brh{tag}", f"brn{tag}"
    net = f"10.231.{tag}"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        pytest.skip(f"kernel cannot build the testbed: {exc.stderr.decode().strip()}")
    yield ns, host_if, f"{net}.2"
    subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_an_endpoint_bound_to_its_interface_works_and_one_bound_elsewhere_fails_closed(
        cluster: Cluster, veth_cloud: tuple[str, str, str], tmp_path: Path):
    ns, host_if, addr = veth_cloud
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for f in ("ca.pem", "ca.key"):
        (ca_dir / f).write_bytes((cluster.pki.dir / f).read_bytes())
    pki.issue_server(ca_dir, ca_dir, name="cloud", dns=[], ips=[addr])
    tls = TlsConfig(ca=cluster.pki.ca, cert=ca_dir / "server-cloud.pem",
                    key=ca_dir / "server-cloud.key")
    node = cluster.nodes["cloud"] = localrun.ingest(cluster.workdir, cluster.pki, "cloud",
                                                    tls=tls, host=addr, netns=ns).start()
    localrun.wait_healthy(node.target, cluster.pki.consumer())
    # The same cloud twice: first via the wrong leg (loopback), then via its own veth leg.
    agent = cluster.agent(nodes=["cloud", "cloud"], names=["wrong-leg", "wan-leg"],
                          interfaces={"wrong-leg": "lo", "wan-leg": host_if})
    published = Publisher(cluster, count=300, rate=0).join()
    wait_for(lambda: idle(agent, published), what="delivery over the bound leg")
    eps = {e["name"]: e for e in agent.status()["uplink"]["endpoints"]}
    assert eps["wrong-leg"]["state"] == "unhealthy"
    assert eps["wan-leg"]["active"]
    def failed() -> list[dict]:
        return [orjson.loads(line) for line in agent.proc.log.read_text().splitlines()
                if '"netbind.connect_failed"' in line]

    # Loopback has no way to the cloud: the bound connect fails (after its own timeout).
    wait_for(lambda: bool(failed()), timeout=20, what="the wrong leg's connect to fail")
    assert failed()[0]["interface"] == "lo" and failed()[0]["flag"] == "UF"
    assert cluster.account(published) == (published, 0, 0)


def test_a_missing_interface_fails_closed_and_traffic_uses_the_next_endpoint(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent(interfaces={"aws": "nosuchif0"})
    published = Publisher(cluster, count=300, rate=0).join()
    wait_for(lambda: idle(agent, published), what="delivery via azure")
    eps = {e["name"]: e for e in agent.status()["uplink"]["endpoints"]}
    assert eps["aws"]["state"] == "unhealthy" and eps["azure"]["active"]
    assert "nosuchif0" in agent.proc.log.read_text()
    assert cluster.account(published) == (published, 0, 0)


async def test_the_bind_proxy_tunnels_only_to_its_endpoints_target():
    import asyncio

    from bridge.edge.uplink.netbind import BindProxy
    from bridge.shared.telemetry import AgentMetrics

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = AgentMetrics()
    proxy = BindProxy(interface="lo", endpoint="aws", target=f"127.0.0.1:{port}",
                      on_refused=metrics.netbind_refused.labels("aws").inc)
    await proxy.start()

    async def connect(target: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return line

    try:
        assert (await connect(f"127.0.0.1:{port}")).startswith(b"HTTP/1.1 200")
        for other in (f"127.0.0.1:{port + 1}", "ingest.example.invalid:443", f"localhost:{port}"):
            assert (await connect(other)).startswith(b"HTTP/1.1 403"), other
        assert metrics.netbind_refused.labels("aws")._value.get() == 3
    finally:
        await proxy.close()
        server.close()
