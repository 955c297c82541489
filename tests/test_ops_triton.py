"""Triton kernels (forward and backward) on CPU tensors under TRITON_INTERPRET=1.

How the interpreter is switched on, robustly to import order: Triton chooses between a compiled
and an interpreted kernel when ``@triton.jit`` runs, i.e. when ``lpips_fast.ops._triton`` is first
imported (lazily, on the first ``backend="triton"`` call), not when ``triton`` itself is
imported. This module sets ``TRITON_INTERPRET=1`` before anything else and then imports that
module. If something earlier in this process had already imported it without the variable, its
kernels are compiled-mode ones that cannot run on CPU tensors: then every in-process test here
skips and ``test_rerun_in_subprocess`` runs this file in a fresh interpreter with the variable
set. Either way each case runs once. (The variable stays set for the rest of the session; on a
CPU-only machine nothing else can run Triton kernels anyway.)

Shapes: the issue's C in {1,3,64,192,384,512,1000}, HxW in {1x1,3x5,15x15,31x17}, N in {1,3},
channels_last, broadcast (either side) and spatial on/off are covered by the CASES table below,
each value at least once and each case forward and backward, in fp32 (vs the fp64 oracle, 1e-6
relative) and fp64 (all three gradients, tight). Not the full cross product: the interpreter is
slow, and the kernels do not branch on these values beyond masks and strides.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import lpips_fast.ops as ops  # noqa: E402
from lpips_fast.ops import lpips_distance, lpips_distance_reference  # noqa: E402


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(ops._triton_ops()._lpips_fwd_kernel, InterpretedFunction)


INTERPRETED = _interpreted()
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="kernels compiled before TRITON_INTERPRET=1; see rerun test")

# (C, H, W, N, channels_last, broadcast, spatial, weighted); broadcast: None, "feat1" or "feat0"
CASES = [
    (1, 1, 1, 1, False, None, False, True),
    (3, 3, 5, 3, True, "feat1", True, True),
    (64, 15, 15, 3, False, None, True, False),
    (192, 31, 17, 1, True, None, False, True),
    (384, 3, 5, 3, False, "feat0", False, True),
    (512, 1, 1, 3, True, None, True, True),
    (1000, 3, 5, 1, False, None, True, True),
    (1000, 1, 1, 3, True, "feat1", False, False),
    (3, 15, 15, 1, False, None, False, False),
    (64, 31, 17, 3, True, "feat1", True, True),
]


def _inputs(case, dtype, seed):
    c, h, w, n, channels_last, broadcast, _, weighted = case
    g = torch.Generator().manual_seed(seed)
    n0 = 1 if broadcast == "feat0" else n
    n1 = 1 if broadcast == "feat1" else n
    x = torch.randn(n0, c, h, w, generator=g, dtype=torch.float64).relu()
    y = torch.randn(n1, c, h, w, generator=g, dtype=torch.float64).relu()
    x[:, 0] += 0.1  # no all-zero columns here (tested separately)
    y[:, 0] += 0.1
    wt = torch.rand(c, generator=g, dtype=torch.float64) if weighted else None
    x, y = x.to(dtype), y.to(dtype)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    return x, y, (wt.to(dtype) if wt is not None else None)


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[0]}-{c[1]}x{c[2]}-N{c[3]}" for c in CASES])
def test_forward_fp32_vs_oracle(case):
    spatial = case[6]
    x, y, w = _inputs(case, torch.float32, seed=case[0] + case[1])
    out = lpips_distance(x, y, w, spatial=spatial, backend="triton")
    ref = lpips_distance_reference(x, y, w, spatial=spatial)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    assert bool((err <= 1e-6 * ref.abs() + 1e-9).all()), err.max().item()


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[0]}-{c[1]}x{c[2]}-N{c[3]}" for c in CASES])
def test_backward_vs_oracle(case):
    spatial = case[6]
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        x, y, w = _inputs(case, dtype, seed=case[0] + 7)
        ours = [t.clone().requires_grad_() for t in (x, y, w) if t is not None]
        ref = [t.double().requires_grad_() for t in (x, y, w) if t is not None]
        wo = ours[2] if w is not None else None
        wr = ref[2] if w is not None else None
        out = lpips_distance(ours[0], ours[1], wo, spatial=spatial, backend="triton")
        up = torch.randn(out.shape, dtype=torch.float64)
        g_ours = torch.autograd.grad(out, ours, up.to(out.dtype))
        g_ref = torch.autograd.grad(lpips_distance_reference(ref[0], ref[1], wr, spatial=spatial), ref, up)
        for a, b in zip(g_ours, g_ref):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * (1e-3 + b.abs().max().item()))


@needs_interp
def test_matches_cpp_and_is_bitwise_repeatable():
    case = (64, 15, 15, 3, True, "feat1", True, True)
    x, y, w = _inputs(case, torch.float32, seed=3)

    def run():
        xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
        out = lpips_distance(xs, ys, ws, backend="triton")
        return [out.detach(), *torch.autograd.grad(out.sum(), (xs, ys, ws))]

    a, b = run(), run()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    torch.testing.assert_close(a[0], lpips_distance(x, y, w, backend="cpp"), rtol=1e-6, atol=0)


@needs_interp
def test_zero_columns_finite_zero_gradients():
    x, y, w = _inputs((16, 4, 4, 2, False, None, True, True), torch.float32, seed=4)
    x[:, :, 1, 2] = 0
    y[0, :, 3, 0] = 0
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    gx, gy, gw = torch.autograd.grad(lpips_distance(x, y, w, spatial=True, backend="triton").sum(), (x, y, w))
    assert all(torch.isfinite(g).all() for g in (gx, gy, gw))
    assert (gx[:, :, 1, 2] == 0).all() and (gy[0, :, 3, 0] == 0).all() and gx.abs().sum() > 0


@needs_interp
def test_fp16_within_twice_torch_error():
    x, y, w = _inputs((192, 3, 5, 2, False, None, True, True), torch.float16, seed=5)
    w = w.float()  # fp32 lin weights with fp16 features (autocast)
    ref64 = lpips_distance_reference(x, y, w, spatial=True)
    torch_err = (lpips_distance_reference(x, y, w, spatial=True, upcast=False).double() - ref64).abs().max()
    out = lpips_distance(x, y, w, spatial=True, backend="triton")
    assert out.dtype == torch.float32
    assert (out.double() - ref64).abs().max() <= 2 * torch_err + 1e-6
    xg = x.clone().requires_grad_()
    lpips_distance(xg, y, w, backend="triton").sum().backward()
    assert xg.grad.dtype == torch.float16 and torch.isfinite(xg.grad).all()


def test_rerun_in_subprocess():
    if INTERPRETED:
        pytest.skip("the interpreted kernels ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
