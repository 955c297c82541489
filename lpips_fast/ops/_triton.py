"""Triton kernels for the fused LPIPS distance (CUDA; CPU tensors under TRITON_INTERPRET=1).

One program owns a tile of BLOCK_P pixels x all C channels (BLOCK_C = next power of two of C)
of one image: it loads both C-vectors of each pixel once, keeps them in registers, and computes
the norms, the weighted squared difference and (backward) all three gradients from them. Strides
are passed in, so NCHW, channels_last and a stride-0 broadcast batch need no copy. The spatial
mean is one fp32 partial per program followed by a fixed-order ``sum`` (no atomics), and the
weight gradient is a (programs, C) partial buffer summed the same way: bitwise repeatable.

Exposed as ``torch.library.triton_op`` + ``wrap_triton`` so that torch.compile traces into the
kernels. No ``from __future__ import annotations`` here: the ops' schemas are inferred from the
annotations, and some torch versions ignore ``triton_op(schema=...)``.
"""

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _eager
from ._autograd import grads_empty, make_backward, setup_context

__all__ = ["distance_triton", "distance_triton_backward"]

from torch.library import triton_op, wrap_triton  # torch >= 2.6, the package's floor


_TILE = 4096  # BLOCK_C * BLOCK_P elements per tensor and program


# IEEE-rounded sqrt and division for fp32 (tl.sqrt and "/" may be approximate on the GPU); they
# run once per pixel, so the cost is nil. fp64 sqrt and division are IEEE already.
@triton.jit
def _sqrt(v, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def _recip(v, IS_F64: tl.constexpr):
    if IS_F64:
        return 1.0 / v
    else:
        return tl.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def _inv_norm(sum_sq, eps, IS_F64: tl.constexpr):
    """1 / (sqrt(sum_c x_c^2) + eps), eps outside the sqrt as in the reference."""
    return _recip(_sqrt(sum_sq, IS_F64) + eps, IS_F64)


@triton.jit
def _load_tile(PTR, base, offs_p, offs_c, sp, sc, mask, IS_F64: tl.constexpr):
    """A [pixels, channels] tile (zeros outside ``mask``), upcast to the accumulation dtype."""
    t = tl.load(PTR + base + offs_p[:, None] * sp + offs_c[None, :] * sc, mask=mask, other=0.0)
    if IS_F64:
        return t.to(tl.float64)
    else:
        return t.to(tl.float32)


@triton.jit
def _lpips_fwd_kernel(
    X, Y, Wt, OUT, C, P, n_pblocks,
    sxn, sxc, sxp, syn, syc, syp,
    eps,
    HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # Tiles are [BLOCK_P pixels, BLOCK_C channels]: channel sums run along the last axis (under
    # the interpreter that is numpy's pairwise summation, as accurate as the GPU's tree sum).
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_pblocks
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_p[:, None] & mask_c[None, :]
    x = _load_tile(X, n * sxn, offs_p, offs_c, sxp, sxc, mask, IS_F64)
    y = _load_tile(Y, n * syn, offs_p, offs_c, syp, syc, mask, IS_F64)
    ia = _inv_norm(tl.sum(x * x, axis=1), eps, IS_F64)
    ib = _inv_norm(tl.sum(y * y, axis=1), eps, IS_F64)
    diff = x * ia[:, None] - y * ib[:, None]
    d2 = diff * diff
    if HAS_W:
        w = tl.load(Wt + offs_c, mask=mask_c, other=0.0)
        d2 = d2 * w[None, :]
    d = tl.sum(d2, axis=1)
    if SPATIAL:
        tl.store(OUT + n * P + offs_p, d, mask=mask_p)
    else:
        tl.store(OUT + pid, tl.sum(tl.where(mask_p, d, 0.0), axis=0))


@triton.jit
def _lpips_bwd_kernel(
    G, X, Y, Wt, DX, DY, DWP, C, P, n_pblocks,
    sxn, sxc, sxp, syn, syc, syp,
    dxn, dxc, dxp, dyn, dyc, dyp,
    gsn, gsp, eps,
    HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_pblocks
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_p[:, None] & mask_c[None, :]
    x = _load_tile(X, n * sxn, offs_p, offs_c, sxp, sxc, mask, IS_F64)
    y = _load_tile(Y, n * syn, offs_p, offs_c, syp, syc, mask, IS_F64)
    if SPATIAL:
        g = tl.load(G + n * gsn + offs_p * gsp, mask=mask_p, other=0.0).to(x.dtype)
    else:
        g = tl.where(mask_p, tl.load(G + n * gsn).to(x.dtype) / P, 0.0)
    nx = _sqrt(tl.sum(x * x, axis=1), IS_F64)
    ny = _sqrt(tl.sum(y * y, axis=1), IS_F64)
    ia = _recip(nx + eps, IS_F64)
    ib = _recip(ny + eps, IS_F64)
    diff = x * ia[:, None] - y * ib[:, None]
    if HAS_W:
        w = tl.load(Wt + offs_c, mask=mask_c, other=0.0)
        r = (2.0 * w)[None, :] * diff
    else:
        r = 2.0 * diff
    if NEED_DW:
        dwp = tl.sum(g[:, None] * (diff * diff), axis=0)
        tl.store(DWP + pid * C + offs_c, dwp, mask=mask_c)
    if NEED_DX:
        alive = nx > 0
        coef = tl.where(alive, tl.sum(r * x, axis=1) * ia * ia / tl.where(alive, nx, 1.0), 0.0)
        gx = tl.where(alive, g, 0.0)
        dx = gx[:, None] * (r * ia[:, None] - x * coef[:, None])
        tl.store(
            DX + n * dxn + offs_p[:, None] * dxp + offs_c[None, :] * dxc,
            dx.to(DX.dtype.element_ty),
            mask=mask,
        )
    if NEED_DY:
        alive_y = ny > 0
        coef_y = tl.where(alive_y, tl.sum(r * y, axis=1) * ib * ib / tl.where(alive_y, ny, 1.0), 0.0)
        gy = tl.where(alive_y, g, 0.0)
        dy = gy[:, None] * (y * coef_y[:, None] - r * ib[:, None])
        tl.store(
            DY + n * dyn + offs_p[:, None] * dyp + offs_c[None, :] * dyc,
            dy.to(DY.dtype.element_ty),
            mask=mask,
        )


# ----------------------------------------------------------------------------- launch helpers
def _pixel_stride(t: torch.Tensor) -> int:
    """Stride of H*W walked as one dimension, or -1 when the layout does not allow it."""
    h, w = t.shape[2], t.shape[3]
    if h * w <= 1:
        return 1
    if h == 1:
        return t.stride(3)
    if w == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == w * t.stride(3) else -1


def _walkable(t: torch.Tensor) -> torch.Tensor:
    return t if _pixel_stride(t) >= 0 else t.contiguous()


def _nps(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, channel, pixel) strides; batch stride 0 when N == 1 so that broadcasts are free."""
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1), _pixel_stride(t)


def _config(c: int, p: int) -> Tuple[int, int, int]:
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(triton.next_power_of_2(p), _TILE // block_c))
    warps = 4 if block_c * block_p <= 2048 else 8
    return block_c, block_p, warps


def _device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (not whichever is current); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _weight_arg(weight: Optional[torch.Tensor], acc: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return weight.to(acc).contiguous() if weight is not None else like


def _forward(feat0, feat1, weight, spatial, eps):
    x, y = _walkable(feat0), _walkable(feat1)
    n, c, h, w = x.shape
    p = h * w
    acc = _eager.acc_dtype(x.dtype)
    if n * p == 0:
        out = x.new_zeros((n, 1, h, w) if spatial else (n,), dtype=acc)
        return out if spatial or n == 0 else out.fill_(float("nan"))
    block_c, block_p, warps = _config(c, p)
    n_pblocks = triton.cdiv(p, block_p)
    out = x.new_empty((n, 1, h, w) if spatial else (n * n_pblocks,), dtype=acc)
    wt = _weight_arg(weight, acc, x)
    with _device_ctx(x):
        wrap_triton(_lpips_fwd_kernel)[(n * n_pblocks,)](
            x, y, wt, out, c, p, n_pblocks,
            *_nps(x), *_nps(y),
            eps,
            HAS_W=weight is not None, SPATIAL=spatial, IS_F64=acc == torch.float64,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
        )  # fmt: skip
    if spatial:
        return out
    return out.view(n, n_pblocks).sum(dim=1) / p


def _backward(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    need_weight = need_weight and weight is not None
    x, y = _walkable(feat0), _walkable(feat1)
    n, c, h, w = x.shape
    p = h * w
    acc = _eager.acc_dtype(x.dtype)
    dx, dy, _ = grads_empty(feat0, feat1, weight, need_feat0, need_feat1, False)
    if n * p == 0 or not (need_feat0 or need_feat1 or need_weight):
        dx.zero_()
        dy.zero_()
        dw = weight.new_zeros(weight.shape) if need_weight else feat0.new_empty(0)
        return dx, dy, dw
    block_c, block_p, warps = _config(c, p)
    n_pblocks = triton.cdiv(p, block_p)
    programs = n * n_pblocks
    dwp = x.new_empty((programs, c) if need_weight else (1,), dtype=acc)
    if spatial:
        g = _walkable(grad)
        g_sn, g_sp = (g.stride(0) if n > 1 else 0), _pixel_stride(g)
    else:
        g, g_sn, g_sp = grad, grad.stride(0), 0
    wt = _weight_arg(weight, acc, x)
    with _device_ctx(x):
        wrap_triton(_lpips_bwd_kernel)[(programs,)](
            g, x, y, wt, dx if need_feat0 else x, dy if need_feat1 else y, dwp,
            c, p, n_pblocks,
            *_nps(x), *_nps(y),
            *(_nps(dx) if need_feat0 else (0, 0, 0)), *(_nps(dy) if need_feat1 else (0, 0, 0)),
            g_sn, g_sp, eps,
            HAS_W=weight is not None, SPATIAL=spatial, IS_F64=acc == torch.float64,
            NEED_DX=need_feat0, NEED_DY=need_feat1, NEED_DW=need_weight,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
        )  # fmt: skip
    dw = dwp.sum(dim=0).to(weight.dtype) if need_weight else feat0.new_empty(0)
    return dx, dy, dw


# ----------------------------------------------------------------------------- the ops
def distance_triton(
    feat0: torch.Tensor, feat1: torch.Tensor, weight: Optional[torch.Tensor], spatial: bool, eps: float
) -> torch.Tensor:
    return _forward(feat0, feat1, weight, spatial, eps)


def distance_triton_backward(
    grad: torch.Tensor,
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: Optional[torch.Tensor],
    spatial: bool,
    eps: float,
    need_feat0: bool,
    need_feat1: bool,
    need_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight)


distance_triton = triton_op("lpips_fast::distance_triton", mutates_args=())(distance_triton)
distance_triton_backward = triton_op("lpips_fast::distance_triton_backward", mutates_args=())(distance_triton_backward)
distance_triton.register_autograd(make_backward(distance_triton_backward), setup_context=setup_context)
