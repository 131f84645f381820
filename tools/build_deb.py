"""Build ``bridge_<version>_<arch>.deb`` (``make package``) with dpkg-deb.

Usage: python tools/build_deb.py [OUT_DIR]   (default: build/)

Layout (what ``tests/test_packaging.py`` checks against the units):

* ``/opt/bridge/.venv``: a virtual environment of Debian's own ``/usr/bin/python3`` (the
  gateway's interpreter, not the builder's), holding the project's wheel and exactly the
  dependencies of ``requirements.lock`` (hashes checked); ``/usr/bin/bridge`` links to its
  ``bridge``. ``/opt/bridge/docs``: the documentation the units name.
* ``/lib/systemd/system``: ``bridge-agent.service`` and ``bridge-ingest.service``; the
  agent's interface-binding drop-in is an example (``/usr/share/doc/bridge/examples``),
  installed by hand only where an endpoint binds to an interface.
* ``/usr/lib/sysusers.d/bridge.conf`` and ``/usr/lib/tmpfiles.d/bridge.conf``: the
  repository's ``systemd/bridge.sysusers`` (the ``bridge`` user the units run as) and
  ``systemd/bridge.tmpfiles`` (``/var/lib/bridge``, ``/etc/bridge/pki``).
* ``/etc/bridge/agent.toml``, ``ingest.toml`` and ``consumer.toml``: the examples, as
  conffiles (an operator's edits survive upgrades). The other examples are in
  ``/usr/share/doc/bridge/examples``.
* Nothing is enabled or started on install: postinst creates the user and directories,
  compiles the bytecode and reloads systemd; the operator enables the units
  (docs/deployment.md).

A venv is not relocatable: it is built in the staging tree and every absolute path to it
(scripts' ``#!`` lines, ``pyvenv.cfg``, ``activate``) is rewritten to ``/opt/bridge/.venv``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path("/usr/bin/python3")  # Debian's interpreter: the gateway's
PREFIX = "/opt/bridge/.venv"
CONFFILES = ("agent.toml", "ingest.toml", "consumer.toml")
MAINTAINER = "Edge telemetry bridge team <bridge@example.com>"


OVERRIDES = """# FHS 3.13: an add-on application package installs in /opt/<package>; the units
# and the docs name /opt/bridge.
bridge: dir-or-file-in-opt *
# The virtual environment's scripts run its own interpreter, not /usr/bin/python3.
bridge: wrong-path-for-interpreter /opt/bridge/.venv/bin/python3 != /usr/bin/python3 *
# grpcio's wheel links zlib statically.
bridge: embedded-library zlib *
"""

DEBIAN_CHANGELOG = """bridge ({version}) unstable; urgency=medium

  * Release {version}; the project's changes are in
    /usr/share/doc/bridge/CHANGELOG.md.gz.

 -- {maintainer}  Mon, 07 Dec 2026 00:00:00 +0000
"""

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers bridge.conf
    systemd-tmpfiles --create bridge.conf
    for f in /etc/bridge/agent.toml /etc/bridge/ingest.toml /etc/bridge/consumer.toml; do
        [ -e "$f" ] && chgrp bridge "$f" && chmod 0640 "$f"
    done
    /opt/bridge/.venv/bin/python -m compileall -q /opt/bridge/.venv/lib >/dev/null || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
# Bytecode compiled by postinst is not in the package's file list.
find /opt/bridge/.venv -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
exit 0
"""

POSTRM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"""

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-telemetry-bridge
Source: https://example.com/edge-telemetry-bridge

Files: *
Copyright: 2026 the edge telemetry bridge authors
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found in
 /usr/share/common-licenses/Apache-2.0. The Python packages in /opt/bridge/.venv carry their
 own licences in their dist-info directories.
"""


def version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run(*argv: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in argv], check=True, cwd=cwd)


def build_venv(stage: Path, wheels: Path) -> None:
    venv = stage / PREFIX.lstrip("/")
    run(PYTHON, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    run(pip, "install", "-q", "--no-cache-dir", "--require-hashes", "-r",
        ROOT / "requirements.lock")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
        wheels, ROOT)
    (wheel,) = wheels.glob("edge_telemetry_bridge-*.whl")
    run(pip, "install", "-q", "--no-cache-dir", "--no-deps", wheel)
    run(pip, "uninstall", "-q", "-y", "pip")  # the gateway installs packages, not pip
    # The interpreter by its version: the venv's site-packages are python3.11's.
    (venv / "bin" / "python3").unlink()
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3.11")
    for lib in venv.rglob("*.so"):  # as dh_strip does (lintian: unstripped-binary-or-object)
        run("strip", "--strip-unneeded", "--remove-section=.comment",
            "--remove-section=.note", lib)
    # Every absolute path to the staging venv becomes the installed one.
    staged = str(venv)
    for path in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if staged.encode() in data:
                path.write_bytes(data.replace(staged.encode(), PREFIX.encode()))
    for cache in venv.rglob("__pycache__"):  # compiled on the gateway by postinst
        shutil.rmtree(cache)


def install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def gz(data: bytes, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    dst.chmod(0o644)


def build(out: Path) -> Path:
    ver, a = version(), arch()
    name = f"bridge_{ver}_{a}"
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    stage = work / "root"
    build_venv(stage, work / "wheels")
    bin_ = stage / "usr" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "bridge").symlink_to(f"{PREFIX}/bin/bridge")
    for unit in ("bridge-agent.service", "bridge-ingest.service"):
        install(ROOT / "systemd" / unit, stage / "lib/systemd/system" / unit)
    doc = stage / "usr/share/doc/bridge"
    install(ROOT / "systemd/bridge-agent.service.d/netbind.conf",
            doc / "examples/bridge-agent.service.d/netbind.conf")
    for example in sorted((ROOT / "examples").iterdir()):
        if example.is_file() and example.name not in CONFFILES:
            install(example, doc / "examples" / example.name)
    for conf in CONFFILES:
        install(ROOT / "examples" / conf, stage / "etc/bridge" / conf)
    for page in sorted((ROOT / "docs").glob("*.md")):
        install(page, stage / "opt/bridge/docs" / page.name)
    install(ROOT / "systemd/bridge.sysusers", stage / "usr/lib/sysusers.d/bridge.conf")
    install(ROOT / "systemd/bridge.tmpfiles", stage / "usr/lib/tmpfiles.d/bridge.conf")
    (doc / "copyright").write_text(COPYRIGHT)
    gz((ROOT / "CHANGELOG.md").read_bytes(), doc / "CHANGELOG.md.gz")
    gz(DEBIAN_CHANGELOG.format(version=ver, maintainer=MAINTAINER).encode(),
       doc / "changelog.gz")
    (stage / "usr/share/lintian/overrides").mkdir(parents=True)
    (stage / "usr/share/lintian/overrides/bridge").write_text(OVERRIDES)
    debian = stage / "DEBIAN"
    debian.mkdir()
    size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file()) // 1024
    (debian / "control").write_text(
        f"Package: bridge\nVersion: {ver}\nArchitecture: {a}\nMaintainer: {MAINTAINER}\n"
        f"Installed-Size: {size}\n"
        "Depends: python3 (>= 3.11), python3 (<< 3.12), python3.11, libc6, systemd\n"
        "Section: net\nPriority: optional\nHomepage: https://example.com/edge-telemetry-bridge\n"
        "Description: durable, deduplicating telemetry bridge for industrial edge sites\n"
        " The edge agent subscribes to a plant's MQTT (JSON, Sparkplug B) or\n"
        " AMQP broker, spools every reading durably and ships it over mutual-TLS\n"
        " gRPC to ingest nodes in several clouds, which deduplicate exactly.\n"
        " This package holds the agent, the ingest node and the consumer (the\n"
        " bridge command), with their systemd units.\n")
    (debian / "conffiles").write_text("".join(f"/etc/bridge/{c}\n" for c in CONFFILES))
    for script, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
        (debian / script).write_text(text)
        (debian / script).chmod(0o755)
    for d in [stage, *(p for p in stage.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    deb = out / f"{name}.deb"
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb)
    return deb


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build"
    out.mkdir(parents=True, exist_ok=True)
    os.umask(0o022)
    print(build(out.resolve()))


if __name__ == "__main__":
    main()
