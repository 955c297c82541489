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
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _eager
from ._aot_spec import TRITON_DTYPES, KernelSpec, pointer_type
from ._autograd import grads_empty, make_backward, setup_context

# The launcher pieces and the tile helpers are shared with the grouped kernels (_triton_grouped.py).
__all__ = [
    "distance_triton", "distance_triton_backward", "aot_specializations",
    "block_config", "walkable", "nps_strides", "weight_arg", "device_context",
    "sqrt_acc", "recip", "inv_norm", "load_tile",
]  # fmt: skip

# torch.library.triton_op / wrap_triton: torch >= 2.6 (the package's floor). tl.sqrt_rn / tl.div_rn
# and triton.compile(ASTSource(...), target=GPUTarget(...)) (ops/aot.py): checked with torch
# 2.14.1 + triton 3.8 here; the GPU machines' torch 2.11 + triton 3.6 are checked for these names
# by benchmarks/gpu_check.py's preflight before anything else runs there.
from torch.library import triton_op, wrap_triton


_TILE = 4096  # BLOCK_C * BLOCK_P elements per tensor and program (fp32 accumulation)


# IEEE-rounded sqrt and division for fp32 (tl.sqrt and "/" may be approximate on the GPU); they
# run once per pixel, so the cost is nil. fp64 sqrt and division are IEEE already.
@triton.jit
def sqrt_acc(v, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def recip(v, IS_F64: tl.constexpr):
    if IS_F64:
        return 1.0 / v
    else:
        return tl.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def inv_norm(sum_sq, eps, IS_F64: tl.constexpr):
    """1 / (sqrt(sum_c x_c^2) + eps), eps outside the sqrt as in the reference."""
    return recip(sqrt_acc(sum_sq, IS_F64) + eps, IS_F64)


@triton.jit
def load_tile(PTR, base, offs_p, offs_c, sp, sc, mask, IS_F64: tl.constexpr):
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
    x = load_tile(X, n * sxn, offs_p, offs_c, sxp, sxc, mask, IS_F64)
    y = load_tile(Y, n * syn, offs_p, offs_c, syp, syc, mask, IS_F64)
    ia = inv_norm(tl.sum(x * x, axis=1), eps, IS_F64)
    ib = inv_norm(tl.sum(y * y, axis=1), eps, IS_F64)
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
    x = load_tile(X, n * sxn, offs_p, offs_c, sxp, sxc, mask, IS_F64)
    y = load_tile(Y, n * syn, offs_p, offs_c, syp, syc, mask, IS_F64)
    if SPATIAL:
        g = tl.load(G + n * gsn + offs_p * gsp, mask=mask_p, other=0.0).to(x.dtype)
    else:
        g = tl.where(mask_p, tl.load(G + n * gsn).to(x.dtype) / P, 0.0)
    nx = sqrt_acc(tl.sum(x * x, axis=1), IS_F64)
    ny = sqrt_acc(tl.sum(y * y, axis=1), IS_F64)
    ia = recip(nx + eps, IS_F64)
    ib = recip(ny + eps, IS_F64)
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


def walkable(t: torch.Tensor) -> torch.Tensor:
    return t if _pixel_stride(t) >= 0 else t.contiguous()


def nps_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, channel, pixel) strides; batch stride 0 when N == 1 so that broadcasts are free."""
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1), _pixel_stride(t)


def block_config(c: int, p: int, acc: torch.dtype = torch.float32, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) for C channels and P pixels per image, as plain Python ints.

    A forward tile holds 4096 values (2048 for fp64 accumulation: each takes two registers), so
    that every thread holds 16 registers' worth of each tile-shaped tensor; the backward keeps
    more tile-shaped values alive and gets half that. ``python -m lpips_fast.ops.aot`` compiles
    every config this picks and fails on any register spill: on sm_90, fp64 with 4096-value tiles
    spilled up to 1.6 KiB per thread, and the fp32 backward with 4096-value tiles 8 bytes (dy and
    dw at C = 256); the backward is memory-bound, and smaller tiles also raise its occupancy.
    (The grouped kernel's launches choose their own warp count: ``_triton_grouped._warps``.)
    ``int()`` first: in opcheck's dynamic-shape tests the sizes arrive as SymInts, and constexprs
    and num_warps must be concrete (this specialises the trace on C and on P's tile, which the
    compiled kernel needs anyway). Checked with torch 2.14.1 / triton 3.8 (tests/test_aot.py
    traces it symbolically); on torch 2.11 / triton 3.6 tests/gpu's opcheck runs it on CUDA.
    """
    c, p = int(c), int(p)
    words = (2 if acc == torch.float64 else 1) * (2 if backward else 1)  # register words per tile value
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(triton.next_power_of_2(p), _TILE // words // block_c))
    warps = 4 if block_c * block_p * words <= 2048 else 8
    return block_c, block_p, warps


def device_context(t: torch.Tensor):
    """Launch on the tensor's GPU (not whichever is current); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def weight_arg(weight: Optional[torch.Tensor], acc: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return weight.to(acc).contiguous() if weight is not None else like


# What each pointer parameter holds: "feat" (the features' dtype) or "acc" (fp32; fp64 for fp64
# features). Non-pointer parameters are sizes and strides (ints) except those in _FLOAT_PARAMS.
# The launcher passes tensors exactly for these names (tests/test_aot.py checks it against the
# arguments it builds), and aot_specializations() types the signature from this table.
_POINTERS = {
    "_lpips_fwd_kernel": {"X": "feat", "Y": "feat", "Wt": "acc", "OUT": "acc"},
    "_lpips_bwd_kernel": {"G": "acc", "X": "feat", "Y": "feat", "Wt": "acc", "DX": "feat", "DY": "feat", "DWP": "acc"},
}
_FLOAT_PARAMS = frozenset({"eps"})


def _fwd_constexprs(has_w: bool, spatial: bool, acc: torch.dtype, block_c: int, block_p: int) -> dict:
    return dict(HAS_W=has_w, SPATIAL=spatial, IS_F64=acc == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p)


def _bwd_constexprs(has_w, spatial, acc, need_dx, need_dy, need_dw, block_c, block_p) -> dict:
    return dict(
        HAS_W=has_w, SPATIAL=spatial, IS_F64=acc == torch.float64,
        NEED_DX=need_dx, NEED_DY=need_dy, NEED_DW=need_dw, BLOCK_C=block_c, BLOCK_P=block_p,
    )  # fmt: skip


def _fwd_args(x, y, wt, out, p, n_pblocks, eps) -> dict:
    sxn, sxc, sxp = nps_strides(x)
    syn, syc, syp = nps_strides(y)
    return dict(
        X=x, Y=y, Wt=wt, OUT=out, C=x.shape[1], P=p, n_pblocks=n_pblocks,
        sxn=sxn, sxc=sxc, sxp=sxp, syn=syn, syc=syc, syp=syp, eps=eps,
    )  # fmt: skip


def _bwd_args(g, g_sn, g_sp, x, y, wt, dx, dy, dwp, need_dx, need_dy, p, n_pblocks, eps) -> dict:
    sxn, sxc, sxp = nps_strides(x)
    syn, syc, syp = nps_strides(y)
    dxn, dxc, dxp = nps_strides(dx) if need_dx else (0, 0, 0)
    dyn, dyc, dyp = nps_strides(dy) if need_dy else (0, 0, 0)
    return dict(
        G=g, X=x, Y=y, Wt=wt, DX=dx if need_dx else x, DY=dy if need_dy else y, DWP=dwp,
        C=x.shape[1], P=p, n_pblocks=n_pblocks,
        sxn=sxn, sxc=sxc, sxp=sxp, syn=syn, syc=syc, syp=syp,
        dxn=dxn, dxc=dxc, dxp=dxp, dyn=dyn, dyc=dyc, dyp=dyp,
        gsn=g_sn, gsp=g_sp, eps=eps,
    )  # fmt: skip


def _launch(fn, programs: int, args: dict, constexprs: dict, num_warps: int, like: torch.Tensor) -> None:
    """Launch ``fn`` with its arguments in the kernel's own parameter order."""
    ordered = [args[name] for name in fn.arg_names if name not in constexprs]
    assert len(ordered) + len(constexprs) == len(fn.arg_names) == len(args) + len(constexprs), (
        f"{fn.__name__}: arguments {sorted(args)} + constexprs {sorted(constexprs)} != {fn.arg_names}"
    )
    with device_context(like):
        wrap_triton(fn)[(programs,)](*ordered, **constexprs, num_warps=num_warps)


def _signature(fn, feat_dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton types of ``fn``'s parameters as the launcher passes them (sizes and strides that
    fit in 32 bits; the JIT compiles an i64 variant for larger ones)."""
    acc = _eager.acc_dtype(feat_dtype)
    roles = _POINTERS[fn.__name__]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in roles:
            sig[name] = pointer_type(feat_dtype if roles[name] == "feat" else acc)
        else:
            sig[name] = "fp32" if name in _FLOAT_PARAMS else "i32"
    return sig


def _forward(feat0, feat1, weight, spatial, eps):
    x, y = walkable(feat0), walkable(feat1)
    n, c, h, w = x.shape
    p = h * w
    acc = _eager.acc_dtype(x.dtype)
    if n * p == 0:
        out = x.new_zeros((n, 1, h, w) if spatial else (n,), dtype=acc)
        return out if spatial or n == 0 else out.fill_(float("nan"))
    block_c, block_p, warps = block_config(c, p, acc)
    n_pblocks = triton.cdiv(p, block_p)
    out = x.new_empty((n, 1, h, w) if spatial else (n * n_pblocks,), dtype=acc)
    wt = weight_arg(weight, acc, x)
    args = _fwd_args(x, y, wt, out, p, n_pblocks, eps)
    constexprs = _fwd_constexprs(weight is not None, spatial, acc, block_c, block_p)
    _launch(_lpips_fwd_kernel, n * n_pblocks, args, constexprs, warps, x)
    if spatial:
        return out
    return out.view(n, n_pblocks).sum(dim=1) / p


def _backward(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    need_weight = need_weight and weight is not None
    x, y = walkable(feat0), walkable(feat1)
    n, c, h, w = x.shape
    p = h * w
    acc = _eager.acc_dtype(x.dtype)
    dx, dy, _ = grads_empty(feat0, feat1, weight, need_feat0, need_feat1, False)
    if n * p == 0 or not (need_feat0 or need_feat1 or need_weight):
        dx.zero_()
        dy.zero_()
        dw = weight.new_zeros(weight.shape) if need_weight else feat0.new_empty(0)
        return dx, dy, dw
    block_c, block_p, warps = block_config(c, p, acc, backward=True)
    n_pblocks = triton.cdiv(p, block_p)
    programs = n * n_pblocks
    dwp = x.new_empty((programs, c) if need_weight else (1,), dtype=acc)
    if spatial:
        g = walkable(grad)
        g_sn, g_sp = (g.stride(0) if n > 1 else 0), _pixel_stride(g)
    else:
        g, g_sn, g_sp = grad, grad.stride(0), 0
    wt = weight_arg(weight, acc, x)
    args = _bwd_args(g, g_sn, g_sp, x, y, wt, dx, dy, dwp, need_feat0, need_feat1, p, n_pblocks, eps)
    constexprs = _bwd_constexprs(
        weight is not None, spatial, acc, need_feat0, need_feat1, need_weight, block_c, block_p
    )
    _launch(_lpips_bwd_kernel, programs, args, constexprs, warps, x)
    dw = dwp.sum(dim=0).to(weight.dtype) if need_weight else feat0.new_empty(0)
    return dx, dy, dw


# ----------------------------------------------------------------------------- ahead of time
# Channel counts of the alex, vgg and squeeze layers plus edge cases, and pixel counts that give
# each channel count its distinct tiles: one pixel, a 3x3 map, a map larger than any tile.
AOT_CHANNELS = (1, 3, 64, 128, 192, 256, 384, 512, 1000)
AOT_PIXELS = (1, 9, 1 << 16)
_TRUNK_CHANNELS = frozenset({64, 128, 192, 256, 384, 512})
# (need_dx, need_dy, need_dw): every combination the autograd wiring can request (one at least).
_NEEDS = tuple((a, b, c) for a in (False, True) for b in (False, True) for c in (False, True) if a or b or c)


def _need_label(need_dx: bool, need_dy: bool, need_dw: bool) -> str:
    return ",".join(k for k, on in (("dx", need_dx), ("dy", need_dy), ("dw", need_dw)) if on)


def aot_specializations() -> List[KernelSpec]:
    """Every (kernel, dtype, flags, block config) the launcher can pick for AOT_CHANNELS x
    AOT_PIXELS, from ``block_config`` and the launcher's own constexpr and signature builders; specs
    that compile to the same binary are merged (their ``launch`` lists every (C, P) they serve).
    The contract is ``lpips_fast.ops.aot``'s (see its docstring)."""
    merged: Dict[Tuple, Tuple[KernelSpec, list]] = {}

    def add(fn, dtype, constexprs, warps, launch, axes, hot, cp):
        spec = KernelSpec(
            kernel=fn.__name__, fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs,
            num_warps=warps, dtype=TRITON_DTYPES[dtype], launch=launch, axes=axes, hot=hot,
        )  # fmt: skip
        first, cps = merged.setdefault(spec.key(), (spec, []))
        cps.append(cp)
        if hot and not first.hot:
            merged[spec.key()] = (dataclasses.replace(first, hot=True), cps)

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = _eager.acc_dtype(dtype)
        for c in AOT_CHANNELS:
            for p in AOT_PIXELS:
                block_c, block_p, warps = block_config(c, p, acc)
                bwd_c, bwd_p, bwd_warps = block_config(c, p, acc, backward=True)
                common = c in _TRUNK_CHANNELS and p == AOT_PIXELS[-1] and dtype in (torch.float32, torch.bfloat16)
                block = ("block", f"{block_c}x{block_p}/w{warps}")
                bwd_block = ("block", f"{bwd_c}x{bwd_p}/w{bwd_warps}")
                for has_w in (True, False):
                    for spatial in (False, True):
                        flags = {"has_weight": has_w, "spatial": spatial}
                        axes = (("dtype", TRITON_DTYPES[dtype]), ("HAS_W", has_w), ("SPATIAL", spatial), block)
                        hot = common and has_w and not spatial
                        kw = _fwd_constexprs(has_w, spatial, acc, block_c, block_p)
                        add(_lpips_fwd_kernel, dtype, kw, warps, flags, (("kernel", "fwd"),) + axes, hot, (c, p))
                        for need in _NEEDS:
                            if need[2] and not has_w:
                                continue  # no weight, no weight gradient (make_backward drops it)
                            kw = _bwd_constexprs(has_w, spatial, acc, *need, bwd_c, bwd_p)
                            bwd_axes = (("kernel", "bwd"), ("need", _need_label(*need))) + axes[:-1] + (bwd_block,)
                            bwd_hot = hot and need == (True, False, False)  # the loss: input gradient
                            add(_lpips_bwd_kernel, dtype, kw, bwd_warps, flags, bwd_axes, bwd_hot, (c, p))
    out = []
    for spec, cps in merged.values():
        launch = dict(spec.launch, C=sorted({c for c, _ in cps}), P=sorted({p for _, p in cps}))
        out.append(dataclasses.replace(spec, launch=launch))
    # Most demanding first (aot.py's cover scope keeps the first spec having each axis value):
    # fp32 then fp64, backward, larger tiles, more gradients.
    rank = {"fp32": 0, "fp64": 1, "bf16": 2, "fp16": 3}
    out.sort(
        key=lambda s: (
            rank[s.dtype], s.kernel != "_lpips_bwd_kernel", -s.constexprs["BLOCK_C"] * s.constexprs["BLOCK_P"],
            -sum(bool(s.constexprs.get(k)) for k in ("NEED_DX", "NEED_DY", "NEED_DW")),
        )
    )
    return out


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
