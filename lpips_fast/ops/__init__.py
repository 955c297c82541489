"""The fused LPIPS distance op (one call per trunk layer).

Placeholder body: the eager composite of the reference math. The custom op (C++ on CPU, Triton
on CUDA) replaces it behind the same signature.
"""

from __future__ import annotations

import torch

__all__ = ["lpips_distance"]


def lpips_distance(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    spatial: bool = False,
    eps: float = 1e-10,
    backend: str | None = None,
) -> torch.Tensor:
    """sum_c w_c (x_c/(|x|+eps) - y_c/(|y|+eps))^2 per pixel; (N,) spatial means or (N,1,H,W)."""
    x = feat0 / (torch.sqrt(torch.sum(feat0 * feat0, dim=1, keepdim=True)) + eps)
    y = feat1 / (torch.sqrt(torch.sum(feat1 * feat1, dim=1, keepdim=True)) + eps)
    d = (x - y) ** 2
    if weight is None:
        m = d.sum(dim=1, keepdim=True)
    else:
        m = (d * weight.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
    return m if spatial else m.mean(dim=(1, 2, 3))
