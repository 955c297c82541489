"""The wheel carries what a non-editable install needs: the C++ source, lin weights, licenses."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build without isolation")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("lpips_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lpips_fast/csrc/lpips_distance.cpp" in names
    for net in ("alex", "vgg", "squeeze"):
        for v in ("0.0", "0.1"):
            assert f"lpips_fast/weights/data/lin_{net}_v{v}.safetensors" in names
    assert "lpips_fast/weights/data/manifest.json" in names
    assert any(n.endswith("licenses/LICENSES/lpips-BSD-2-Clause.txt") for n in names)
