"""The grouped Triton op (every layer in one launch) on CPU tensors under TRITON_INTERPRET=1.

Set-up as in test_ops_triton.py: the interpreter is chosen when the Triton module is first
imported, so this file sets the variable first and reruns itself in a subprocess when the
kernels were already compiled in this process. Shapes are tiny (the interpreter is slow); the
kernels branch on layer slots, flags and dtypes, which the cases cover, not on sizes beyond masks.
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
from lpips_fast.ops import lpips_distance, lpips_distance_reference, lpips_distances  # noqa: E402


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(ops._triton_grouped_ops()._grouped_fwd_kernel, InterpretedFunction)


INTERPRETED = _interpreted()
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="kernels compiled before TRITON_INTERPRET=1; see rerun test")

SHAPES = [(64, 7, 5), (192, 3, 3), (3, 2, 5), (1, 4, 4), (40, 1, 1)]
EIGHT = [(8, 3, 3), (16, 2, 2), (3, 1, 4), (5, 2, 1), (7, 3, 1), (9, 1, 1), (4, 2, 2), (6, 1, 2)]


def _layers(shapes, n, n1, dtype, seed, weighted=True, channels_last=False):
    g = torch.Generator().manual_seed(seed)

    def feat(nb, c, h, w):
        t = torch.randn(nb, c, h, w, generator=g, dtype=torch.float64).relu()
        t[:, 0] += 0.1
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    f0 = [feat(n, *s) for s in shapes]
    f1 = [feat(n1, *s) for s in shapes]
    ws = [torch.rand(s[0], generator=g, dtype=torch.float64).to(dtype) for s in shapes] if weighted else None
    return f0, f1, ws


def _oracle(f0, f1, ws, spatial):
    ws = ws if ws is not None else [None] * len(f0)
    outs = [lpips_distance_reference(a.double(), b.double(), w, spatial=spatial) for a, b, w in zip(f0, f1, ws)]
    return outs if spatial else sum(outs)


def _flat(out, spatial):
    return torch.cat([m.reshape(-1) for m in out]) if spatial else out


CASES = [  # (shapes, n, n1, spatial, weighted, channels_last)
    (SHAPES, 3, 3, False, True, False),
    (SHAPES, 3, 1, True, True, True),
    (SHAPES, 1, 3, False, False, True),
    (SHAPES[:2], 2, 2, True, False, False),
    (EIGHT, 2, 2, False, True, False),  # more than MAX_LAYERS: two launches
    (EIGHT, 2, 1, True, True, True),
]


@needs_interp
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_vs_oracle(case):
    shapes, n, n1, spatial, weighted, channels_last = CASES[case]
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        f0, f1, ws = _layers(shapes, n, n1, dtype, seed=case, weighted=weighted, channels_last=channels_last)
        ins = f0 + f1 + (ws or [])
        for t in ins:
            t.requires_grad_(True)
        out = _flat(lpips_distances(f0, f1, ws, spatial=spatial, backend="triton"), spatial)
        ref_ins = [t.detach().double().requires_grad_(True) for t in ins]
        k = len(shapes)
        ref = _flat(
            _oracle(ref_ins[:k], ref_ins[k : 2 * k], ref_ins[2 * k :] if weighted else None, spatial), spatial
        )
        torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=1e-9)
        up = torch.rand(out.shape, dtype=torch.float64) + 0.5
        g_ours = torch.autograd.grad(out, ins, up.to(out.dtype))
        g_ref = torch.autograd.grad(ref, ref_ins, up)
        scale = max(float(b.abs().max()) for b in g_ref)
        for a, b in zip(g_ours, g_ref):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=rtol * 10, atol=rtol * 10 * scale)


@needs_interp
def test_equals_cpp_op_and_zero_columns():
    f0, f1, ws = _layers(SHAPES, 2, 2, torch.float32, seed=9)
    f0[0][:, :, 1, 2] = 0
    for t in f0 + f1 + ws:
        t.requires_grad_(True)
    a = lpips_distances(f0, f1, ws, backend="triton")
    b = lpips_distances(f0, f1, ws, backend="cpp")
    torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    grads = torch.autograd.grad(a.sum(), f0 + f1 + ws)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, 1, 2] == 0).all()


@needs_interp
def test_one_launch_each_way(monkeypatch):
    """Triton launches of a forward + backward over alex-like layers: grouped 1 + 1, per-layer 5 + 5."""
    launches = []
    grouped, single = ops._triton_grouped_ops(), ops._triton_ops()
    for mod in (grouped, single):
        real = mod.wrap_triton

        def counting(fn, real=real):
            launches.append(fn.__name__ if hasattr(fn, "__name__") else str(fn))
            return real(fn)

        monkeypatch.setattr(mod, "wrap_triton", counting)
    f0, f1, ws = _layers(SHAPES, 2, 2, torch.float32, seed=1)
    for t in f0:
        t.requires_grad_(True)
    lpips_distances(f0, f1, ws, backend="triton").sum().backward()
    assert len(launches) == 2, launches
    launches.clear()
    sum(lpips_distance(a, b, w, backend="triton") for a, b, w in zip(f0, f1, ws)).sum().backward()
    assert len(launches) == 2 * len(SHAPES), launches


def test_rerun_in_subprocess():
    if INTERPRETED:
        pytest.skip("the interpreted kernels ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@needs_interp
@pytest.mark.parametrize("grouped", [False, True])
def test_double_backward_equals_oracle(grouped):
    """create_graph=True through the Triton ops: the backward switches to the differentiable
    composite; second-order gradients equal the fp64 oracle's."""
    f0, f1, ws = _layers(SHAPES[:2], 2, 2, torch.float64, seed=11)
    for t in f0 + ws:
        t.requires_grad_(True)

    def penalty(fn):
        gs = torch.autograd.grad(fn().sum(), f0, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in gs), f0 + ws)

    if grouped:
        ours = penalty(lambda: lpips_distances(f0, f1, ws, backend="triton"))
    else:
        ours = penalty(lambda: sum(lpips_distance(a, b, w, backend="triton") for a, b, w in zip(f0, f1, ws)))
    ref = penalty(lambda: _oracle(f0, f1, ws, spatial=False))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
