"""Grouped Triton kernels: every layer of a trunk in one launch (CUDA; CPU under TRITON_INTERPRET=1).

One launch covers up to ``MAX_LAYERS`` layers. Its grid is the concatenation of each layer's
programs (images x pixel tiles); a program finds its layer from the per-layer start offsets
``S{k}`` (plain scalar arguments, so torch.compile and CUDA graphs see ordinary launch
parameters), then runs the same tile code as the per-layer kernels in ``_triton.py``, with that
layer's own ``BLOCK_C``/``BLOCK_P`` from the launcher's block config. Unused layer slots are
compiled out (``NL``). A trunk with more layers takes one launch per ``MAX_LAYERS``.

Forward: spatial, each layer's map at its offset in one flat output (no reduction); otherwise one
partial per program, already divided by the layer's pixel count, in an (N, programs-per-image)
buffer that one fixed-order ``sum(dim=1)`` turns into the sum over layers of the spatial means
(no atomics: bitwise repeatable). Backward: dx/dy tiles, and for the weight gradient one partial
per program and channel in a (sum of C_l, most programs of a layer) buffer, summed per layer.

The numbers equal the per-layer op's to float rounding (the spatial mean divides before summing
the tiles instead of after); ``tests/test_ops_grouped.py`` checks both against the fp64 oracle.
"""

import dataclasses
import re
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _eager, _triton
from ._aot_spec import TRITON_DTYPES, KernelSpec, pointer_type
from ._autograd import grouped_grads_empty, grouped_setup_context, make_grouped_backward
from ._triton import inv_norm, load_tile, recip, sqrt_acc

__all__ = ["distances_triton", "distances_triton_backward", "MAX_LAYERS"]

MAX_LAYERS = 7  # squeeze's 7 taps; alex and vgg have 5


@triton.jit
def _fwd_tile(
    local, X, Y, Wt, OUT, C, P, NB, OFF, sxn, sxc, sxp, syn, syc, syp, B_TOTAL, eps,
    HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    n = local // NB
    blk = local % NB
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
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
        tl.store(OUT + OFF + n * P + offs_p, d, mask=mask_p)
    else:
        tl.store(OUT + n * B_TOTAL + OFF + blk, tl.sum(tl.where(mask_p, d, 0.0), axis=0) / P)


@triton.jit
def _bwd_tile(
    local, G, X, Y, Wt, DX, DY, DWP, C, P, NB, OFF,
    sxn, sxc, sxp, syn, syc, syp, dxn, dxc, dxp, dyn, dyc, dyp, COFF, QMAX, eps,
    HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    n = local // NB
    blk = local % NB
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_p[:, None] & mask_c[None, :]
    x = load_tile(X, n * sxn, offs_p, offs_c, sxp, sxc, mask, IS_F64)
    y = load_tile(Y, n * syn, offs_p, offs_c, syp, syc, mask, IS_F64)
    if SPATIAL:
        g = tl.load(G + OFF + n * P + offs_p, mask=mask_p, other=0.0).to(x.dtype)
    else:
        g = tl.where(mask_p, tl.load(G + n).to(x.dtype) / P, 0.0)
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
        tl.store(DWP + (COFF + offs_c) * QMAX + local, dwp, mask=mask_c)
    if NEED_DX:
        alive = nx > 0
        coef = tl.where(alive, tl.sum(r * x, axis=1) * ia * ia / tl.where(alive, nx, 1.0), 0.0)
        gx = tl.where(alive, g, 0.0)
        dx = gx[:, None] * (r * ia[:, None] - x * coef[:, None])
        tl.store(DX + n * dxn + offs_p[:, None] * dxp + offs_c[None, :] * dxc, dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DY:
        alive_y = ny > 0
        coef_y = tl.where(alive_y, tl.sum(r * y, axis=1) * ib * ib / tl.where(alive_y, ny, 1.0), 0.0)
        gy = tl.where(alive_y, g, 0.0)
        dy = gy[:, None] * (y * coef_y[:, None] - r * ib[:, None])
        tl.store(DY + n * dyn + offs_p[:, None] * dyp + offs_c[None, :] * dyc, dy.to(DY.dtype.element_ty), mask=mask)


# The kernels: one slot of arguments per layer (unused slots compiled out by NL). Generated text
# kept verbatim so that triton.jit can read its source; every slot is the same.


@triton.jit
def _grouped_fwd_kernel(
    X0, Y0, W0, C0, P0, NB0, S0, OFF0, sxn0, sxc0, sxp0, syn0, syc0, syp0,
    X1, Y1, W1, C1, P1, NB1, S1, OFF1, sxn1, sxc1, sxp1, syn1, syc1, syp1,
    X2, Y2, W2, C2, P2, NB2, S2, OFF2, sxn2, sxc2, sxp2, syn2, syc2, syp2,
    X3, Y3, W3, C3, P3, NB3, S3, OFF3, sxn3, sxc3, sxp3, syn3, syc3, syp3,
    X4, Y4, W4, C4, P4, NB4, S4, OFF4, sxn4, sxc4, sxp4, syn4, syc4, syp4,
    X5, Y5, W5, C5, P5, NB5, S5, OFF5, sxn5, sxc5, sxp5, syn5, syc5, syp5,
    X6, Y6, W6, C6, P6, NB6, S6, OFF6, sxn6, sxc6, sxp6, syn6, syc6, syp6,
    OUT, N, B_TOTAL, eps,
    NL: tl.constexpr, HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    BC0: tl.constexpr, BP0: tl.constexpr,
    BC1: tl.constexpr, BP1: tl.constexpr,
    BC2: tl.constexpr, BP2: tl.constexpr,
    BC3: tl.constexpr, BP3: tl.constexpr,
    BC4: tl.constexpr, BP4: tl.constexpr,
    BC5: tl.constexpr, BP5: tl.constexpr,
    BC6: tl.constexpr, BP6: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    if (pid >= S0) & (pid < S0 + N * NB0):
        _fwd_tile(pid - S0, X0, Y0, W0, OUT, C0, P0, NB0, OFF0, sxn0, sxc0, sxp0, syn0, syc0, syp0, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC0, BP0)
    if NL > 1:
        if (pid >= S1) & (pid < S1 + N * NB1):
            _fwd_tile(pid - S1, X1, Y1, W1, OUT, C1, P1, NB1, OFF1, sxn1, sxc1, sxp1, syn1, syc1, syp1, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC1, BP1)
    if NL > 2:
        if (pid >= S2) & (pid < S2 + N * NB2):
            _fwd_tile(pid - S2, X2, Y2, W2, OUT, C2, P2, NB2, OFF2, sxn2, sxc2, sxp2, syn2, syc2, syp2, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC2, BP2)
    if NL > 3:
        if (pid >= S3) & (pid < S3 + N * NB3):
            _fwd_tile(pid - S3, X3, Y3, W3, OUT, C3, P3, NB3, OFF3, sxn3, sxc3, sxp3, syn3, syc3, syp3, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC3, BP3)
    if NL > 4:
        if (pid >= S4) & (pid < S4 + N * NB4):
            _fwd_tile(pid - S4, X4, Y4, W4, OUT, C4, P4, NB4, OFF4, sxn4, sxc4, sxp4, syn4, syc4, syp4, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC4, BP4)
    if NL > 5:
        if (pid >= S5) & (pid < S5 + N * NB5):
            _fwd_tile(pid - S5, X5, Y5, W5, OUT, C5, P5, NB5, OFF5, sxn5, sxc5, sxp5, syn5, syc5, syp5, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC5, BP5)
    if NL > 6:
        if (pid >= S6) & (pid < S6 + N * NB6):
            _fwd_tile(pid - S6, X6, Y6, W6, OUT, C6, P6, NB6, OFF6, sxn6, sxc6, sxp6, syn6, syc6, syp6, B_TOTAL, eps, HAS_W, SPATIAL, IS_F64, BC6, BP6)


@triton.jit
def _grouped_bwd_kernel(
    X0, Y0, W0, DX0, DY0, C0, P0, NB0, S0, OFF0, sxn0, sxc0, sxp0, syn0, syc0, syp0, dxn0, dxc0, dxp0, dyn0, dyc0, dyp0, COFF0,
    X1, Y1, W1, DX1, DY1, C1, P1, NB1, S1, OFF1, sxn1, sxc1, sxp1, syn1, syc1, syp1, dxn1, dxc1, dxp1, dyn1, dyc1, dyp1, COFF1,
    X2, Y2, W2, DX2, DY2, C2, P2, NB2, S2, OFF2, sxn2, sxc2, sxp2, syn2, syc2, syp2, dxn2, dxc2, dxp2, dyn2, dyc2, dyp2, COFF2,
    X3, Y3, W3, DX3, DY3, C3, P3, NB3, S3, OFF3, sxn3, sxc3, sxp3, syn3, syc3, syp3, dxn3, dxc3, dxp3, dyn3, dyc3, dyp3, COFF3,
    X4, Y4, W4, DX4, DY4, C4, P4, NB4, S4, OFF4, sxn4, sxc4, sxp4, syn4, syc4, syp4, dxn4, dxc4, dxp4, dyn4, dyc4, dyp4, COFF4,
    X5, Y5, W5, DX5, DY5, C5, P5, NB5, S5, OFF5, sxn5, sxc5, sxp5, syn5, syc5, syp5, dxn5, dxc5, dxp5, dyn5, dyc5, dyp5, COFF5,
    X6, Y6, W6, DX6, DY6, C6, P6, NB6, S6, OFF6, sxn6, sxc6, sxp6, syn6, syc6, syp6, dxn6, dxc6, dxp6, dyn6, dyc6, dyp6, COFF6,
    G, DWP, N, QMAX, eps,
    NL: tl.constexpr, HAS_W: tl.constexpr, SPATIAL: tl.constexpr, IS_F64: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, NEED_DW: tl.constexpr,
    BC0: tl.constexpr, BP0: tl.constexpr,
    BC1: tl.constexpr, BP1: tl.constexpr,
    BC2: tl.constexpr, BP2: tl.constexpr,
    BC3: tl.constexpr, BP3: tl.constexpr,
    BC4: tl.constexpr, BP4: tl.constexpr,
    BC5: tl.constexpr, BP5: tl.constexpr,
    BC6: tl.constexpr, BP6: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    if (pid >= S0) & (pid < S0 + N * NB0):
        _bwd_tile(pid - S0, G, X0, Y0, W0, DX0, DY0, DWP, C0, P0, NB0, OFF0, sxn0, sxc0, sxp0, syn0, syc0, syp0, dxn0, dxc0, dxp0, dyn0, dyc0, dyp0, COFF0, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC0, BP0)
    if NL > 1:
        if (pid >= S1) & (pid < S1 + N * NB1):
            _bwd_tile(pid - S1, G, X1, Y1, W1, DX1, DY1, DWP, C1, P1, NB1, OFF1, sxn1, sxc1, sxp1, syn1, syc1, syp1, dxn1, dxc1, dxp1, dyn1, dyc1, dyp1, COFF1, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC1, BP1)
    if NL > 2:
        if (pid >= S2) & (pid < S2 + N * NB2):
            _bwd_tile(pid - S2, G, X2, Y2, W2, DX2, DY2, DWP, C2, P2, NB2, OFF2, sxn2, sxc2, sxp2, syn2, syc2, syp2, dxn2, dxc2, dxp2, dyn2, dyc2, dyp2, COFF2, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC2, BP2)
    if NL > 3:
        if (pid >= S3) & (pid < S3 + N * NB3):
            _bwd_tile(pid - S3, G, X3, Y3, W3, DX3, DY3, DWP, C3, P3, NB3, OFF3, sxn3, sxc3, sxp3, syn3, syc3, syp3, dxn3, dxc3, dxp3, dyn3, dyc3, dyp3, COFF3, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC3, BP3)
    if NL > 4:
        if (pid >= S4) & (pid < S4 + N * NB4):
            _bwd_tile(pid - S4, G, X4, Y4, W4, DX4, DY4, DWP, C4, P4, NB4, OFF4, sxn4, sxc4, sxp4, syn4, syc4, syp4, dxn4, dxc4, dxp4, dyn4, dyc4, dyp4, COFF4, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC4, BP4)
    if NL > 5:
        if (pid >= S5) & (pid < S5 + N * NB5):
            _bwd_tile(pid - S5, G, X5, Y5, W5, DX5, DY5, DWP, C5, P5, NB5, OFF5, sxn5, sxc5, sxp5, syn5, syc5, syp5, dxn5, dxc5, dxp5, dyn5, dyc5, dyp5, COFF5, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC5, BP5)
    if NL > 6:
        if (pid >= S6) & (pid < S6 + N * NB6):
            _bwd_tile(pid - S6, G, X6, Y6, W6, DX6, DY6, DWP, C6, P6, NB6, OFF6, sxn6, sxc6, sxp6, syn6, syc6, syp6, dxn6, dxc6, dxp6, dyn6, dyc6, dyp6, COFF6, QMAX, eps, HAS_W, SPATIAL, IS_F64, NEED_DX, NEED_DY, NEED_DW, BC6, BP6)



# ----------------------------------------------------------------------------- launcher
class _Layer:
    """One layer's launch geometry: walkable features, block config, program range."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, start: int, backward: bool) -> None:
        self.x, self.y = x, y
        n, self.c, h, w = x.shape
        self.p = h * w
        acc = _eager.acc_dtype(x.dtype)
        self.block_c, self.block_p, self.warps = _triton.block_config(self.c, self.p, acc, backward=backward)
        self.nb = triton.cdiv(self.p, self.block_p)
        self.programs = n * self.nb
        self.start = start


def _layers(feats0: List[torch.Tensor], feats1: List[torch.Tensor], backward: bool = False) -> List[_Layer]:
    out, start = [], 0
    for f0, f1 in zip(feats0, feats1):
        layer = _Layer(_triton.walkable(f0), _triton.walkable(f1), start, backward)
        out.append(layer)
        start += layer.programs
    return out


def _slot_args(k: int, layer: _Layer, wt: torch.Tensor, off: int) -> Dict[str, object]:
    sxn, sxc, sxp = _triton.nps_strides(layer.x)
    syn, syc, syp = _triton.nps_strides(layer.y)
    return {
        f"X{k}": layer.x, f"Y{k}": layer.y, f"W{k}": wt, f"C{k}": layer.c, f"P{k}": layer.p,
        f"NB{k}": layer.nb, f"S{k}": layer.start, f"OFF{k}": off,
        f"sxn{k}": sxn, f"sxc{k}": sxc, f"sxp{k}": sxp, f"syn{k}": syn, f"syc{k}": syc, f"syp{k}": syp,
    }  # fmt: skip


def _empty_slot(k: int, like: torch.Tensor, bwd: bool) -> Dict[str, object]:
    args: Dict[str, object] = {f"X{k}": like, f"Y{k}": like, f"W{k}": like}
    names = ["C", "P", "NB", "S", "OFF", "sxn", "sxc", "sxp", "syn", "syc", "syp"]
    if bwd:
        args.update({f"DX{k}": like, f"DY{k}": like})
        names += ["dxn", "dxc", "dxp", "dyn", "dyc", "dyp", "COFF"]
    args.update({f"{name}{k}": 0 for name in names})
    return args


def _constexprs(blocks: List[Tuple[int, int, int]], **flags: bool) -> Dict[str, object]:
    """The launch's constexprs: flags, NL and every slot's BLOCK_C/BLOCK_P (1 for unused slots)."""
    out: Dict[str, object] = dict(flags, NL=len(blocks))
    for k in range(MAX_LAYERS):
        out[f"BC{k}"], out[f"BP{k}"] = blocks[k][:2] if k < len(blocks) else (1, 1)
    return out


def _warps(blocks: List[Tuple[int, int, int]], flags: Dict[str, bool]) -> int:
    """One launch, one warp count: the largest tile's, except the fp64 backward's, 4. With 8 (256
    threads) ptxas capped the fp64 backward at 80 registers (three blocks per SM) and spilled mask
    predicates in the kernel body (8-16 bytes per thread on sm_80 and sm_90; 20261129 audit);
    with 4 every fp64 backward launch compiles at 112-216 registers without local memory. fp64 is
    the exactness path, not a throughput one. (The per-layer kernel keeps ``block_config``'s 8:
    at 4 warps five of its fp64 backward specs spilled on sm_80.)"""
    if flags.get("IS_F64") and "NEED_DX" in flags:
        return 4
    return max(b[2] for b in blocks)


def _launch(fn, group: List[_Layer], args: Dict[str, object], flags: Dict[str, bool]) -> None:
    """One launch of ``fn`` over ``group``: per-layer constexprs, unused slots filled, one grid."""
    blocks = [(layer.block_c, layer.block_p, layer.warps) for layer in group]
    constexprs = _constexprs(blocks, **flags)
    programs = sum(layer.programs for layer in group)
    ordered = [args[name] for name in fn.arg_names if name not in constexprs]
    assert len(ordered) + len(constexprs) == len(fn.arg_names), (fn.__name__, sorted(args), sorted(constexprs))
    warps = _warps(blocks, flags)
    with _triton.device_context(group[0].x):
        wrap_triton(fn)[(programs,)](*ordered, **constexprs, num_warps=warps)


def _fwd_flags(has_w: bool, spatial: bool, acc: torch.dtype) -> Dict[str, bool]:
    return dict(HAS_W=has_w, SPATIAL=spatial, IS_F64=acc == torch.float64)


def _bwd_flags(has_w, spatial, acc, need_dx, need_dy, need_dw) -> Dict[str, bool]:
    return dict(_fwd_flags(has_w, spatial, acc), NEED_DX=need_dx, NEED_DY=need_dy, NEED_DW=need_dw)


def _groups(layers: List[_Layer]) -> List[List[_Layer]]:
    """Layers with work, MAX_LAYERS a launch, program starts rebased per launch."""
    live = [layer for layer in layers if layer.programs > 0]
    groups = [live[i : i + MAX_LAYERS] for i in range(0, len(live), MAX_LAYERS)]
    for group in groups:
        base = group[0].start
        for layer in group:
            layer.start -= base
    return groups


def _forward(feats0, feats1, weights, spatial, eps):
    layers = _layers(feats0, feats1)
    x0 = layers[0].x
    n = x0.shape[0]
    acc = _eager.acc_dtype(x0.dtype)
    has_w = len(weights) > 0
    if spatial:
        out = x0.new_empty((sum(n * layer.p for layer in layers),), dtype=acc)
    else:
        if n == 0 or any(layer.p == 0 for layer in layers):  # the mean of no pixels
            return x0.new_full((n,), float("nan"), dtype=acc)
        out = x0.new_empty((n, sum(layer.nb for layer in layers)), dtype=acc)
    wts = [_triton.weight_arg(w, acc, x0) for w in weights] if has_w else [x0] * len(layers)
    offsets, off = [], 0
    for layer in layers:
        offsets.append(off)
        off += n * layer.p if spatial else layer.nb
    index = {id(layer): k for k, layer in enumerate(layers)}
    for group in _groups(layers):
        args: Dict[str, object] = {"OUT": out, "N": n, "B_TOTAL": out.shape[1] if not spatial else 0, "eps": eps}
        for k in range(MAX_LAYERS):
            if k < len(group):
                i = index[id(group[k])]
                args.update(_slot_args(k, group[k], wts[i], offsets[i]))
            else:
                args.update(_empty_slot(k, x0, bwd=False))
        _launch(_grouped_fwd_kernel, group, args, _fwd_flags(has_w, spatial, acc))
    return out if spatial else out.sum(dim=1)


def _backward(grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights):
    has_w = len(weights) > 0
    need_weights = need_weights and has_w
    dxs, dys, dws = grouped_grads_empty(feats0, feats1, weights, need_feats0, need_feats1, False)
    layers = _layers(feats0, feats1, backward=True)
    x0 = layers[0].x
    n = x0.shape[0]
    acc = _eager.acc_dtype(x0.dtype)
    for layer, dx, dy in zip(layers, dxs, dys):
        if layer.programs == 0:
            dx.zero_()
            dy.zero_()
    qmax = max(layer.programs for layer in layers)
    coffs, coff = [], 0
    for layer in layers:
        coffs.append(coff)
        coff += layer.c
    dwp = x0.new_empty((coff, max(qmax, 1)) if need_weights else (1,), dtype=acc)
    g = grad.to(acc).contiguous()
    wts = [_triton.weight_arg(w, acc, x0) for w in weights] if has_w else [x0] * len(layers)
    offsets, off = [], 0
    for layer in layers:
        offsets.append(off)
        off += n * layer.p
    index = {id(layer): k for k, layer in enumerate(layers)}
    if need_feats0 or need_feats1 or need_weights:
        for group in _groups(layers):
            args: Dict[str, object] = {"G": g, "DWP": dwp, "N": n, "QMAX": dwp.shape[-1], "eps": eps}
            for k in range(MAX_LAYERS):
                if k >= len(group):
                    args.update(_empty_slot(k, x0, bwd=True))
                    continue
                i = index[id(group[k])]
                layer = group[k]
                args.update(_slot_args(k, layer, wts[i], offsets[i] if spatial else 0))
                dxn, dxc, dxp = _triton.nps_strides(dxs[i]) if need_feats0 else (0, 0, 0)
                dyn, dyc, dyp = _triton.nps_strides(dys[i]) if need_feats1 else (0, 0, 0)
                args.update({
                    f"DX{k}": dxs[i] if need_feats0 else layer.x, f"DY{k}": dys[i] if need_feats1 else layer.y,
                    f"dxn{k}": dxn, f"dxc{k}": dxc, f"dxp{k}": dxp, f"dyn{k}": dyn, f"dyc{k}": dyc, f"dyp{k}": dyp,
                    f"COFF{k}": coffs[i],
                })  # fmt: skip
            flags = _bwd_flags(has_w, spatial, acc, need_feats0, need_feats1, need_weights)
            _launch(_grouped_bwd_kernel, group, args, flags)
    if need_weights:
        dws = [
            dwp[c0 : c0 + layer.c, : layer.programs].sum(dim=1).to(w.dtype) if layer.programs else w.new_zeros(w.shape)
            for layer, c0, w in zip(layers, coffs, weights)
        ]
    return dxs, dys, dws


# ----------------------------------------------------------------------------- ahead of time
_SLOT_PARAM = re.compile(r"(X|Y|DX|DY|W)(\d)")


def _signature(fn, feat_dtype: torch.dtype, constexprs: Dict[str, object]) -> Dict[str, str]:
    """Triton types of ``fn``'s parameters as the launcher passes them: feature-dtype pointers
    for features, gradients and unused slots' placeholders, accumulation-dtype pointers for the
    weights, the output and the partial buffers, fp32 ``eps``, i32 sizes and strides."""
    acc = _eager.acc_dtype(feat_dtype)
    sig = {}
    for name in fn.arg_names:
        slot = _SLOT_PARAM.fullmatch(name)
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("OUT", "G", "DWP"):
            sig[name] = pointer_type(acc)
        elif slot:
            weight = slot.group(1) == "W" and constexprs["HAS_W"] and int(slot.group(2)) < constexprs["NL"]
            sig[name] = pointer_type(acc if weight else feat_dtype)
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    return sig


# Image sizes whose layer maps give the trunks' distinct block configs (small training losses,
# and ImageNet-sized evaluation).
AOT_IMAGE_SIZES = (64, 224)


def aot_specializations() -> List[KernelSpec]:
    """Every grouped launch the launcher makes for the alex, vgg and squeeze trunks at
    ``AOT_IMAGE_SIZES``, in every dtype, flag and NEED_* combination: per-layer block configs
    from ``_triton.block_config`` (the launcher's), constexprs from ``_constexprs``, types from
    ``_signature``. Specs compiling to one binary are merged. The contract is
    ``lpips_fast.ops.aot``'s."""
    from ..nets import TRUNK_CHANNELS, build_trunk

    merged: Dict[Tuple, KernelSpec] = {}
    needs = [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True) if a or b or c]
    for net, channels in TRUNK_CHANNELS.items():
        trunk = build_trunk(net, init=False)
        for size in AOT_IMAGE_SIZES:
            pixels = [side * side for side in trunk.layer_sizes(size)]
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                acc = _eager.acc_dtype(dtype)
                fwd_blocks = [_triton.block_config(c, p, acc) for c, p in zip(channels, pixels)][:MAX_LAYERS]
                bwd_blocks = [_triton.block_config(c, p, acc, backward=True) for c, p in zip(channels, pixels)][:MAX_LAYERS]
                for has_w in (True, False):
                    for spatial in (False, True):
                        # The common paths: alex losses in fp32, vgg evaluation in bf16.
                        common = (net, dtype) in (("alex", torch.float32), ("vgg", torch.bfloat16)) and has_w
                        axes = (("net", net), ("dtype", TRITON_DTYPES[dtype]), ("HAS_W", has_w), ("SPATIAL", spatial))
                        variants = [(_grouped_fwd_kernel, fwd_blocks, _fwd_flags(has_w, spatial, acc), (("kernel", "grouped_fwd"),), common and not spatial)]
                        for need in needs:
                            if need[2] and not has_w:
                                continue
                            flags = _bwd_flags(has_w, spatial, acc, *need)
                            label = ",".join(k for k, on in zip(("dx", "dy", "dw"), need) if on)
                            hot = common and not spatial and need == (True, False, False)
                            variants.append((_grouped_bwd_kernel, bwd_blocks, flags, (("kernel", "grouped_bwd"), ("need", label)), hot))
                        for fn, blocks, flags, kaxes, hot in variants:
                            constexprs = _constexprs(blocks, **flags)
                            spec = KernelSpec(
                                kernel=fn.__name__, fn=fn, signature=_signature(fn, dtype, constexprs),
                                constexprs=constexprs, num_warps=_warps(blocks, flags), dtype=TRITON_DTYPES[dtype],
                                launch={"net": [net], "image_size": [size], "has_weight": has_w, "spatial": spatial},
                                axes=kaxes + axes, hot=hot,
                            )  # fmt: skip
                            old = merged.get(spec.key())
                            if old is not None:
                                launch = dict(old.launch, net=sorted(set(old.launch["net"]) | {net}),
                                              image_size=sorted(set(old.launch["image_size"]) | {size}))
                                spec = dataclasses.replace(old, launch=launch, hot=old.hot or hot)
                            merged[spec.key()] = spec
    # Most demanding first: fp32 then fp64, backward, more outputs.
    rank = {"fp32": 0, "fp64": 1, "bf16": 2, "fp16": 3}
    return sorted(
        merged.values(),
        key=lambda s: (rank[s.dtype], s.kernel != "_grouped_bwd_kernel",
                       -sum(bool(s.constexprs.get(k)) for k in ("NEED_DX", "NEED_DY", "NEED_DW"))),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the ops
def distances_triton(
    feats0: List[torch.Tensor], feats1: List[torch.Tensor], weights: List[torch.Tensor], spatial: bool, eps: float
) -> torch.Tensor:
    return _forward(feats0, feats1, weights, spatial, eps)


def distances_triton_backward(
    grad: torch.Tensor,
    feats0: List[torch.Tensor],
    feats1: List[torch.Tensor],
    weights: List[torch.Tensor],
    spatial: bool,
    eps: float,
    need_feats0: bool,
    need_feats1: bool,
    need_weights: bool,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    return _backward(grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights)


distances_triton = triton_op("lpips_fast::distances_triton", mutates_args=())(distances_triton)
distances_triton_backward = triton_op("lpips_fast::distances_triton_backward", mutates_args=())(
    distances_triton_backward
)
distances_triton.register_autograd(make_grouped_backward(distances_triton_backward), setup_context=grouped_setup_context)
