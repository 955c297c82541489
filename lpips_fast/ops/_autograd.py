"""Autograd wiring and output allocation shared by the CPU (C++) and CUDA (Triton) distance ops.

The per-layer ops have the schema ``_schemas.FWD``/``BWD``, the grouped ones ``GROUPED_FWD``/
``GROUPED_BWD``; a fused backward returns the requested gradients (empty tensors for the others).

Double backward: when the backward itself runs with grad mode on (``create_graph=True``:
gradient penalties, meta-learning), it computes the gradients with the differentiable eager
composite (``_eager``) instead of the fused kernel, so that they can be differentiated again. Its
first-order values equal the fused kernel's to float rounding.
"""

from __future__ import annotations

import torch

from . import _eager

__all__ = [
    "out_empty",
    "grads_empty",
    "setup_context",
    "make_backward",
    "grouped_out_empty",
    "grouped_grads_empty",
    "grouped_setup_context",
    "make_grouped_backward",
]


def out_empty(feat0: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Output of the forward (also its fake): fp32, or fp64 for fp64 features; contiguous."""
    n, _, h, w = feat0.shape
    shape = (n, 1, h, w) if spatial else (n,)
    return feat0.new_empty(shape, dtype=_eager.acc_dtype(feat0.dtype))


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_eager.grad_memory_format(t))


def grads_empty(feat0, feat1, weight, need_feat0, need_feat1, need_weight):
    """Outputs of the backward (also its fake); an unneeded gradient is an empty tensor."""
    dx = _grad_like(feat0) if need_feat0 else feat0.new_empty(0)
    dy = _grad_like(feat1) if need_feat1 else feat1.new_empty(0)
    dw = weight.new_empty(weight.shape) if (need_weight and weight is not None) else feat0.new_empty(0)
    return dx, dy, dw


def setup_context(ctx, inputs, output) -> None:
    feat0, feat1, weight, spatial, eps = inputs
    ctx.save_for_backward(feat0, feat1, weight)
    ctx.spatial, ctx.eps = spatial, eps


def make_backward(backward_op):
    def backward(ctx, grad):
        feat0, feat1, weight = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        need_w = bool(need_w and weight is not None)
        if not (need_x or need_y or need_w):
            return None, None, None, None, None
        if torch.is_grad_enabled():
            dx, dy, dw = _eager.distance_grads_differentiable(
                grad, [feat0], [feat1], None if weight is None else [weight], ctx.spatial, ctx.eps,
                need_x, need_y, need_w,
            )
            dx, dy, dw = dx[0], dy[0], dw[0]
        else:
            dx, dy, dw = backward_op(grad, feat0, feat1, weight, ctx.spatial, ctx.eps, need_x, need_y, need_w)
        return (dx if need_x else None, dy if need_y else None, dw if need_w else None, None, None)

    return backward


# ----------------------------------------------------------------------------- grouped (all layers)
def grouped_out_empty(feats0, spatial: bool) -> torch.Tensor:
    """Output of the grouped forward (also its fake): (N,) or every layer's map flattened."""
    f = feats0[0]
    acc = _eager.acc_dtype(f.dtype)
    if spatial:
        return f.new_empty((sum(t.shape[0] * t.shape[2] * t.shape[3] for t in feats0),), dtype=acc)
    return f.new_empty((f.shape[0],), dtype=acc)


def grouped_grads_empty(feats0, feats1, weights, need_feats0, need_feats1, need_weights):
    """Outputs of the grouped backward (also its fake): three lists, empty tensors where unneeded."""
    need_weights = need_weights and len(weights) > 0
    dxs = [_grad_like(t) if need_feats0 else t.new_empty(0) for t in feats0]
    dys = [_grad_like(t) if need_feats1 else t.new_empty(0) for t in feats1]
    dws = [w.new_empty(w.shape) for w in weights] if need_weights else [t.new_empty(0) for t in feats0]
    return dxs, dys, dws


def grouped_setup_context(ctx, inputs, output) -> None:
    feats0, feats1, weights, spatial, eps = inputs
    ctx.save_for_backward(*feats0, *feats1, *weights)
    ctx.layers, ctx.has_weights = len(feats0), len(weights) > 0
    ctx.spatial, ctx.eps = spatial, eps


def make_grouped_backward(backward_op):
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = ctx.layers
        feats0, feats1, weights = list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n :])
        nx, ny, nw = ctx.needs_input_grad[:3]
        need_x, need_y, need_w = any(nx), any(ny), any(nw)
        if not (need_x or need_y or need_w):
            return [None] * n, [None] * n, [None] * len(weights), None, None
        if torch.is_grad_enabled():
            dxs, dys, dws = _eager.distance_grads_differentiable(
                grad, feats0, feats1, weights if ctx.has_weights else None, ctx.spatial, ctx.eps,
                need_x, need_y, need_w, grouped=True,
            )
        else:
            dxs, dys, dws = backward_op(grad, feats0, feats1, weights, ctx.spatial, ctx.eps, need_x, need_y, need_w)

        def pick(grads, needs):
            return [g if need else None for g, need in zip(grads, needs)]

        return pick(dxs, nx), pick(dys, ny), pick(dws, nw), None, None

    return backward
