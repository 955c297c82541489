"""Autograd wiring and output allocation shared by the CPU (C++) and CUDA (Triton) distance ops.

Both ops have the same schema: forward ``(feat0, feat1, weight?, spatial, eps)`` and a fused
backward returning ``(d_feat0, d_feat1, d_weight)`` for the requested ones (empty tensors for
the others).
"""

from __future__ import annotations

import torch

from . import _eager

__all__ = ["out_empty", "grads_empty", "setup_context", "make_backward"]


def out_empty(feat0: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Output of the forward (also its fake): fp32, or fp64 for fp64 features; contiguous."""
    n, _, h, w = feat0.shape
    shape = (n, 1, h, w) if spatial else (n,)
    return feat0.new_empty(shape, dtype=_eager.acc_dtype(feat0.dtype))


def grads_empty(feat0, feat1, weight, need_feat0, need_feat1, need_weight):
    """Outputs of the backward (also its fake); an unneeded gradient is an empty tensor."""

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_eager.grad_memory_format(t))

    dx = like(feat0) if need_feat0 else feat0.new_empty(0)
    dy = like(feat1) if need_feat1 else feat1.new_empty(0)
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
        dx, dy, dw = backward_op(grad, feat0, feat1, weight, ctx.spatial, ctx.eps, need_x, need_y, need_w)
        return (dx if need_x else None, dy if need_y else None, dw if need_w else None, None, None)

    return backward
