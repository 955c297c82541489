"""`import lpips_fast` and a forward pass import no torchvision, lpips or cv2, and build nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_forward_without_torchvision_lpips_cv2():
    code = textwrap.dedent(
        """
        import sys, torch
        import lpips_fast
        m = lpips_fast.LPIPS(pretrained=True, net="alex", pnet_rand=True)
        d = m(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1)
        assert d.shape == (2, 1, 1, 1)
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torchvision", "lpips", "cv2"))
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_import_is_light():
    code = "import sys, lpips_fast; print(sorted(k for k in sys.modules if k.startswith('lpips_fast')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mods = eval(out.stdout)
    for heavy in ("lpips_fast.inference.engine", "lpips_fast.cli", "lpips_fast.dataset.pairwise", "lpips_fast.dataset.evaluate"):
        assert heavy not in mods
