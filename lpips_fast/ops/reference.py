"""Eager oracle: the reference lpips 0.1.4 distance step, transcribed op for op.

``normalize_tensor`` -> ``(n0 - n1) ** 2`` -> 1x1 conv (``lin``) or channel sum ->
``spatial_average``. Tests and benchmarks compare the fused kernels against this one function.
``upcast=True`` computes in float64 (the oracle); ``upcast=False`` computes in the features'
own dtype, which is both the eager baseline that benchmarks time and "PyTorch's own error" that
low-precision tolerances are scaled by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lpips_distance_reference"]


def _normalize_tensor(in_feat: torch.Tensor, eps: float) -> torch.Tensor:
    norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
    return in_feat / (norm_factor + eps)


def lpips_distance_reference(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    spatial: bool = False,
    eps: float = 1e-10,
    upcast: bool = True,
) -> torch.Tensor:
    """The reference math; (N,) spatial means or the (N,1,H,W) map, like ``lpips_distance``.

    Differentiable through plain autograd (so it gives NaN gradients where a feature column is
    all zero, exactly like the reference).
    """
    if upcast:
        feat0, feat1 = feat0.double(), feat1.double()
        weight = None if weight is None else weight.double()
    elif weight is not None:
        weight = weight.to(feat0.dtype)
    diff = (_normalize_tensor(feat0, eps) - _normalize_tensor(feat1, eps)) ** 2
    if weight is None:
        d = diff.sum(dim=1, keepdim=True)
    else:
        d = F.conv2d(diff, weight.reshape(1, -1, 1, 1))
    return d if spatial else d.mean(dim=(2, 3), keepdim=True).reshape(-1)
