"""Inputs generated on the device, and the error bounds the fused kernels must meet.

Error model (forward; x, y the C-vectors of one pixel, u the unit roundoff of the accumulation
dtype: 2^-24 for fp16/bf16/fp32 features, which are upcast exactly, and 2^-53 for fp64). The
oracle (``lpips_distance_reference``) upcasts the same stored features to fp64, so input rounding
is common to both and only the kernel's arithmetic counts:
- channel sums are tree reductions over BLOCK_C = 2^k lanes: relative error <= k u (not C u);
- xhat_c = x_c / (sqrt_rn(sum x^2) + eps) then has relative error <= r = (k/2 + 4) u;
- d = sum_c w_c (xhat_c - yhat_c)^2 cancels where xhat ~ yhat: each difference is off by at
  most r (|xhat_c| + |yhat_c|), so by Cauchy-Schwarz d is off by at most
  2 r sqrt(d M) + r^2 M + (k + 3) u d, with M = sum_c w_c (|xhat_c| + |yhat_c|)^2 (<= 4 max w);
- the spatial mean adds the tile's tree sum over BLOCK_P pixels and torch's sum over the tiles.
Backward, per element: a running-error bound K u |terms| with |terms| the same expression with
every difference replaced by a sum of absolute values, plus the output dtype's rounding. Each
bound carries a factor 2 for second-order terms and FMA contraction (which only removes
roundings). The error grows like u log2(C) in the worst case here (u sqrt(C) for the
statistical estimate of a sequential sum), not like u C.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

EPS = 1e-10
U = {torch.float64: 2.0**-53}


def acc_u(dtype: torch.dtype) -> float:
    return U.get(dtype, 2.0**-24)


def feats(n, c, h, w, dtype, *, seed=0, channels_last=False, n1=None, weighted=True, device="cuda"):
    """Random ReLU features on the device (no all-zero pixel: channel 0 gets +0.1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, device=device, dtype=torch.float32).relu_()
    y = torch.randn(n if n1 is None else n1, c, h, w, generator=g, device=device, dtype=torch.float32).relu_()
    x[:, 0] += 0.1
    y[:, 0] += 0.1
    wt = torch.rand(c, generator=g, device=device, dtype=torch.float32) if weighted else None
    x, y = x.to(dtype), y.to(dtype)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    return x, y, wt


def _log2_block(v: int) -> int:
    return max(0, math.ceil(math.log2(max(v, 1))))


def _pieces(x, y, w):
    x64, y64 = x.double(), y.double()
    a = x64.norm(dim=1, keepdim=True) + EPS
    b = y64.norm(dim=1, keepdim=True) + EPS
    wv = w.double().view(1, -1, 1, 1) if w is not None else torch.ones_like(x64[:1, :, :1, :1])
    return x64, y64, a, b, x64 / a, y64 / b, wv


def forward_bound(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor], spatial: bool) -> torch.Tensor:
    """Per-output bound on |fused - oracle| (shape of the op's output, fp64)."""
    from lpips_fast.ops._triton import block_config  # the launcher's tiles decide the sum orders

    n = max(x.shape[0], y.shape[0])
    x, y = x.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1)
    c, p = x.shape[1], x.shape[2] * x.shape[3]
    u = acc_u(x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_c, block_p, _ = block_config(c, p, acc)
    k = _log2_block(block_c)
    r = (k / 2 + 4) * u
    _, _, _, _, xh, yh, wv = _pieces(x, y, w)
    d = (wv * (xh - yh) ** 2).sum(1, keepdim=True)
    mag = (wv * (xh.abs() + yh.abs()) ** 2).sum(1, keepdim=True)
    per_pixel = 2 * r * (d * mag).sqrt() + r * r * mag + (k + 3) * u * d
    if spatial:
        return 2 * per_pixel
    tiles = -(-p // block_p)
    mean_d = d.mean(dim=(1, 2, 3))
    return 2 * (per_pixel.mean(dim=(1, 2, 3)) + (_log2_block(block_p) + tiles + 2) * u * mean_d)


def backward_bounds(x, y, w, grad, spatial: bool):
    """Per-element bounds on (d_feat0, d_feat1, d_weight) for upstream gradient ``grad``, before
    the final rounding to the gradients' dtype (``assert_within`` adds it)."""
    from lpips_fast.ops._triton import block_config

    n = max(x.shape[0], y.shape[0])
    xe, ye = x.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1)
    c, p = x.shape[1], x.shape[2] * x.shape[3]
    u = acc_u(x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_c, block_p, _ = block_config(c, p, acc, backward=True)
    k = _log2_block(block_c)
    x64, y64, a, b, xh, yh, wv = _pieces(xe, ye, w)
    g = grad.double().abs().view(n, 1, *x.shape[2:]) if spatial else (grad.double().abs() / p).view(n, 1, 1, 1)
    big_r = 2 * wv * (xh.abs() + yh.abs())  # |r_c| with the difference replaced by a sum
    s_x = (big_r * x64.abs()).sum(1, keepdim=True)
    s_y = (big_r * y64.abs()).sum(1, keepdim=True)
    nx, ny = a - EPS, b - EPS
    mx = g * (big_r / a + x64.abs() * s_x / (a * a * nx.clamp_min(1e-300)))
    my = g * (big_r / b + y64.abs() * s_y / (b * b * ny.clamp_min(1e-300)))
    kk = (2 * k + 12) * u

    def reduce_batch(t, like):  # a broadcast input's gradient sums over the batch
        return t.sum(0, keepdim=True) if like.shape[0] == 1 and n > 1 else t

    # A broadcast input's gradient is the batch sum of per-image gradients, each already rounded
    # to the features' dtype: one ulp of each term's magnitude.
    out_eps = torch.finfo(x.dtype).eps if (x.shape[0] != y.shape[0]) else 0.0
    dx = reduce_batch((2 * kk + out_eps) * mx, x)
    dy = reduce_batch((2 * kk + out_eps) * my, y)
    r = (k / 2 + 4) * u
    diff = (xh - yh).abs()
    term = g * (2 * r * diff * (xh.abs() + yh.abs()) + (r * (xh.abs() + yh.abs())) ** 2 + (2 + _log2_block(block_p)) * u * diff**2)
    programs = n * -(-p // block_p)
    dw = 2 * (term.sum(dim=(0, 2, 3)) + programs * u * (g * diff**2).sum(dim=(0, 2, 3)))
    return dx, dy, dw


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> float:
    """|got - want| <= bound + one ulp of ``got``'s dtype (its final rounding: half an ulp, or
    flush-to-zero below the smallest normal for fp32/fp64, below the smallest subnormal for
    fp16/bf16), elementwise; returns the worst error / allowed ratio."""
    fi = torch.finfo(got.dtype)
    floor = fi.smallest_normal * (fi.eps if got.element_size() == 2 else 1.0)
    err = (got.double() - want.double()).abs()
    allowed = bound + fi.eps * want.double().abs() + floor
    ratio = float((err / allowed).max())
    assert ratio <= 1.0, f"{what}: error {float(err.max()):.3e} exceeds its bound (worst ratio {ratio:.2f})"
    return ratio
