"""What the wheel carries beside the code: the Apache-2.0 licence the project declares."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert b"Apache License" in (ROOT / "LICENSE").read_bytes()[:200]
