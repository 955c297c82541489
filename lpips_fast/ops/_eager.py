"""Pure-PyTorch distance: the ``backend="torch"`` path and the fallback when the C++ build fails.

Same math and dtype rules as the fused kernels (fp32 accumulation for fp16/bf16/fp32, fp64 for
fp64) and the same gradient convention: zero where a feature column is all zero. The reference's
``x / (sqrt(sum x^2) + eps)`` has a NaN gradient there (d sqrt(s)/ds at s = 0); here the
per-pixel scale ``1 / (|x| + eps)`` is masked to 0 where |x| = 0 (the forward value is unchanged,
since x itself is 0 there) and the norm's gradient at 0 is 0.
"""

from __future__ import annotations

import torch

__all__ = [
    "distance_torch",
    "distance_torch_backward",
    "distances_torch",
    "distances_torch_backward",
    "distance_grads_differentiable",
    "acc_dtype",
    "grad_memory_format",
    "unit_normalize",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Layout of the gradient returned for ``t`` (the C++ and Triton kernels use the same rule)."""
    return torch.channels_last if t.shape[1] > 1 and t.stride(1) == 1 else torch.contiguous_format


def unit_normalize(t: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``t / (|t|_2 + eps)`` over dim 1, with a zero gradient (not NaN) where ``|t| = 0``."""
    norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    scale = torch.where(norm > 0, 1.0 / (norm + eps), torch.zeros_like(norm))
    return t * scale


def distance_torch(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: torch.Tensor | None,
    spatial: bool,
    eps: float,
) -> torch.Tensor:
    acc = acc_dtype(feat0.dtype)
    d = (unit_normalize(feat0.to(acc), eps) - unit_normalize(feat1.to(acc), eps)) ** 2
    if weight is not None:
        d = d * weight.to(acc).reshape(1, -1, 1, 1)
    d = d.sum(dim=1, keepdim=True)
    return d if spatial else d.mean(dim=(2, 3)).reshape(-1)


def distance_torch_backward(
    grad: torch.Tensor,
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: torch.Tensor | None,
    spatial: bool,
    eps: float,
    need_feat0: bool,
    need_feat1: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernels' backward formula in eager ops; unneeded gradients are empty tensors.

    (Explicit rather than autograd: it runs inside a custom op's backward, below autograd.)
    """
    need_weight = need_weight and weight is not None
    acc = acc_dtype(feat0.dtype)
    x, y = feat0.to(acc), feat1.to(acc)
    nx = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    ny = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    ia, ib = 1.0 / (nx + eps), 1.0 / (ny + eps)
    diff = x * ia - y * ib
    g = grad.to(acc)
    if not spatial:
        g = (g / (x.shape[2] * x.shape[3])).reshape(-1, 1, 1, 1)
    r = 2.0 * diff if weight is None else 2.0 * weight.to(acc).reshape(1, -1, 1, 1) * diff

    def one(t, n, inv, sign):
        alive = n > 0
        coef = (r * t).sum(dim=1, keepdim=True) * inv * inv / torch.where(alive, n, torch.ones_like(n))
        d = sign * torch.where(alive, g, torch.zeros_like(g)) * (r * inv - t * coef)
        return d

    dx = one(x, nx, ia, 1.0).to(feat0.dtype) if need_feat0 else None
    dy = one(y, ny, ib, -1.0).to(feat1.dtype) if need_feat1 else None
    dw = (g * diff * diff).sum(dim=(0, 2, 3)).to(weight.dtype) if need_weight else feat0.new_empty(0)
    dx = dx.contiguous(memory_format=grad_memory_format(feat0)) if need_feat0 else feat0.new_empty(0)
    dy = dy.contiguous(memory_format=grad_memory_format(feat1)) if need_feat1 else feat1.new_empty(0)
    return dx, dy, dw


# ----------------------------------------------------------------------------- grouped (all layers)
def distances_torch(
    feats0: list[torch.Tensor],
    feats1: list[torch.Tensor],
    weights: list[torch.Tensor],
    spatial: bool,
    eps: float,
) -> torch.Tensor:
    """All layers, with the grouped ops' output convention (see ``_schemas``)."""
    ws = weights if weights else [None] * len(feats0)
    outs = [distance_torch(f0, f1, w, spatial, eps) for f0, f1, w in zip(feats0, feats1, ws)]
    if spatial:
        return torch.cat([o.reshape(-1) for o in outs])
    total = outs[0]
    for o in outs[1:]:
        total = total + o
    return total


def _layer_grads(grad: torch.Tensor, feats0: list[torch.Tensor], spatial: bool) -> list[torch.Tensor]:
    """The grouped output's gradient cut into each layer's: its map slice, or the same (N,)."""
    if not spatial:
        return [grad] * len(feats0)
    out, off = [], 0
    for f in feats0:
        n, _, h, w = f.shape
        out.append(grad[off : off + n * h * w].view(n, 1, h, w))
        off += n * h * w
    return out


def distances_torch_backward(grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights):
    """The grouped backward, layer by layer with ``distance_torch_backward``: three lists."""
    ws = weights if weights else [None] * len(feats0)
    per = [
        distance_torch_backward(g, f0, f1, w, spatial, eps, need_feats0, need_feats1, need_weights)
        for g, f0, f1, w in zip(_layer_grads(grad, feats0, spatial), feats0, feats1, ws)
    ]
    return [p[0] for p in per], [p[1] for p in per], [p[2] for p in per]


def distance_grads_differentiable(
    grad: torch.Tensor,
    feats0: list[torch.Tensor],
    feats1: list[torch.Tensor],
    weights: list[torch.Tensor] | None,
    spatial: bool,
    eps: float,
    need_feats0: bool,
    need_feats1: bool,
    need_weights: bool,
    grouped: bool = False,
):
    """First-order gradients that can be differentiated again (for ``create_graph=True``).

    Autograd through the eager composite, with ``create_graph=True``; three lists (one entry per
    layer; zeros where a tensor does not require grad, None where a gradient was not asked for).
    """
    with torch.enable_grad():
        # Partial derivatives: the composite reads aliases of its inputs, and autograd.grad is
        # asked about the aliases. (Asked about the inputs themselves it would return total
        # derivatives, which also follow a trunk's path from one tapped layer to the next.)
        groups = [
            [t.view_as(t) for t in ts] for ts in (feats0, feats1, weights or [])
        ]
        a0, a1, aw = groups
        if grouped:
            out = distances_torch(a0, a1, aw, spatial, eps)
        else:
            out = distance_torch(a0[0], a1[0], aw[0] if aw else None, spatial, eps)
    needs = (need_feats0, need_feats1, need_weights)
    wanted = [t for ts, need in zip(groups, needs) if need for t in ts if t.requires_grad]
    found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True) if wanted else ())

    def grads(ts, need):
        if not need:
            return [None] * max(1, len(ts))
        res = []
        for t in ts:
            g = next(found) if t.requires_grad else None
            res.append(torch.zeros_like(t) if g is None else g)
        return res

    return tuple(grads(ts, need) for ts, need in zip(groups, needs))
