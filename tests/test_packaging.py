"""What ships: the wheel (with the Apache-2.0 licence the project declares) and the gateway's
Debian package (``make package``), built, checked by lintian, extracted and run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_license_file_and_declares_apache_2(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("edge_telemetry_bridge-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(lic) == (ROOT / "LICENSE").read_bytes()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "Apache-2.0" in z.read(meta).decode()
    # The package and nothing else: the dev harness, tests and benches stay in the checkout.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"bridge"}, tops
    assert {"bridge/edge/agent.py", "bridge/cloud/ingest/server.py",
            "bridge/shared/_pb/bridge_pb2.py"} <= set(names)
    assert b"Apache License" in (ROOT / "LICENSE").read_bytes()[:200]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make package`` once for the module; the .deb it built."""
    out = tmp_path_factory.mktemp("deb")
    res = subprocess.run(["make", "-s", "package", f"PACKAGE_DIR={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (found,) = out.glob("bridge_*_*.deb")
    return found


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
    control = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True, timeout=120)
    (root / "DEBIAN").symlink_to(control)
    return root


def test_the_package_is_named_by_version_and_arch_and_lintian_finds_no_error(deb: Path):
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert deb.name == f"bridge_{version}_{arch}.deb"
    assert shutil.which("lintian"), "lintian is missing (make debs installs it)"
    res = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:]
    assert not [x for x in res.stdout.splitlines() if x.startswith("E:")]


def test_the_units_paths_exist_in_the_package_and_agree_with_its_configs(tree: Path):
    units = sorted((tree / "lib/systemd/system").glob("bridge-*.service"))
    assert [u.name for u in units] == ["bridge-agent.service", "bridge-ingest.service"]
    sysusers = (tree / "usr/lib/sysusers.d/bridge.conf").read_text()
    tmpfiles = (tree / "usr/lib/tmpfiles.d/bridge.conf").read_text()
    for unit in units:
        text = unit.read_text()
        for exe, config in re.findall(r"^ExecStart(?:Pre)?=(\S+) \S+ --config (\S+)", text,
                                      re.M):
            assert (tree / exe.lstrip("/")).is_file(), exe
            assert (tree / config.lstrip("/")).is_file(), config
        (user,) = re.findall(r"^User=(\S+)$", text, re.M)
        assert re.search(rf"^u {user} ", sysusers, re.M), user
        states = [f"/var/lib/{d}/" for d in re.findall(r"^StateDirectory=(\S+)", text, re.M)]
        writable = states + [p.rstrip("/") + "/" for line in
                             re.findall(r"^ReadWritePaths=(.+)$", text, re.M)
                             for p in line.split()]
        (config,) = set(re.findall(r"--config (\S+)", text))
        paths = re.findall(r'"(/var/[^"]+)"', (tree / config.lstrip("/")).read_text())
        assert paths and all(any(p.startswith(w) for w in writable) for p in paths), paths
        for doc in re.findall(r"^Documentation=file://(\S+)$", text, re.M):
            assert (tree / doc.lstrip("/")).is_file(), doc
        for pem in re.findall(r'"(/etc/bridge/pki/[^"]+)"',
                              (tree / config.lstrip("/")).read_text()):
            assert re.search(r"^d /etc/bridge/pki ", tmpfiles, re.M), pem
    conffiles = (tree / "DEBIAN/conffiles").read_text().split()
    assert conffiles == ["/etc/bridge/agent.toml", "/etc/bridge/ingest.toml",
                         "/etc/bridge/consumer.toml"]
    assert all((tree / c.lstrip("/")).is_file() for c in conffiles)
    assert os.readlink(tree / "usr/bin/bridge") == "/opt/bridge/.venv/bin/bridge"
    assert (tree / "usr/share/doc/bridge/copyright").is_file()


def test_nothing_is_started_or_enabled_on_install(tree: Path):
    for script in ("postinst", "prerm", "postrm"):
        text = (tree / "DEBIAN" / script).read_text()
        assert not re.search(r"systemctl (start|enable|restart)|deb-systemd-invoke", text)
    assert "systemd-sysusers bridge.conf" in (tree / "DEBIAN/postinst").read_text()


def test_the_packaged_bridge_runs_its_version_and_checks_an_agent_config(
        tree: Path, tmp_path: Path):
    from devkit import localrun

    python = tree / "opt/bridge/.venv/bin/python"
    script = tree / "opt/bridge/.venv/bin/bridge"
    assert script.read_text().startswith("#!/opt/bridge/.venv/bin/python3\n")
    env = {"PATH": "/usr/bin:/bin"}  # nothing of this checkout's venv
    res = subprocess.run([str(python), str(script), "--version"], capture_output=True,
                         text=True, timeout=60, check=False, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().startswith("bridge "), res.stderr
    tls = localrun.Pki(tmp_path / "pki", ["site-7"]).site("site-7")
    config = tmp_path / "agent.toml"
    config.write_text(
        (tree / "etc/bridge/agent.toml").read_text()
        .replace("/etc/bridge/pki/ca.pem", str(tls.ca))
        .replace("/var/lib/bridge/", f"{tmp_path}/"))
    text = config.read_text()
    text = re.sub(r'cert = "[^"]+"', f'cert = "{tls.cert}"', text, count=1)
    text = re.sub(r'key = "[^"]+"', f'key = "{tls.key}"', text, count=1)
    text = re.sub(r'site_id = "[^"]+"', 'site_id = "site-7"', text, count=1)
    config.write_text(text)
    res = subprocess.run([str(python), str(script), "agent", "--config", str(config),
                          "--check"], capture_output=True, text=True, timeout=60, check=False,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "OK (site site-7" in res.stdout
    out = subprocess.run([str(python), "-c", "import bridge, sys; print(bridge.__file__, "
                          "sys.prefix)"], capture_output=True, text=True, timeout=60,
                         check=True, env=env, cwd=tmp_path).stdout  # not this checkout
    assert out.startswith(str(tree / "opt/bridge/.venv/lib/python3.11/site-packages/bridge"))
