"""A non-editable install carries what the server reads at run time: the presets, the kernels'
sources and the calibration texts."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_presets_kernel_sources_and_texts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("skipserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"server/presets/{p.name}" for p in (ROOT / "server" / "presets").glob("*.yaml")}
    assert presets and presets <= names
    assert {f"engine/native/{p.name}" for p in (ROOT / "engine" / "native").glob("*.cpp")} <= names
    assert "engine/data/calibration.txt" in names
