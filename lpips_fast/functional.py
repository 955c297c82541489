"""``lpips_fast.lpips(in0, in1, ...)``: one call, one cached model per configuration."""

from __future__ import annotations

import threading

import torch

from .model import LPIPS, canonical_version
from .nets import canonical_net_name

__all__ = ["lpips", "clear_model_cache"]

_models: dict[tuple, LPIPS] = {}
_lock = threading.Lock()


def _cached_model(net: str, version: str, lpips: bool, spatial: bool, device: torch.device, dtype: torch.dtype) -> LPIPS:
    key = (canonical_net_name(net), canonical_version(version), bool(lpips), bool(spatial), device, dtype)
    with _lock:
        model = _models.get(key)
        if model is None:
            model = LPIPS(net=key[0], version=key[1], lpips=key[2], spatial=key[3])
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
            _models[key] = model
        return model


def lpips(
    in0: torch.Tensor,
    in1: torch.Tensor,
    net: str = "alex",
    version: str = "0.1",
    lpips: bool = True,
    *,
    spatial: bool = False,
    normalize: bool = False,
    retPerLayer: bool = False,
):
    """LPIPS distance between two image batches with pretrained weights.

    The model for (net, version, lpips, spatial, device, dtype) is built once and kept; device and
    dtype are those of ``in0``. Gradients flow to the inputs (the weights stay frozen).
    """
    if not isinstance(in0, torch.Tensor):
        raise TypeError(f"in0: expected a torch.Tensor, got {type(in0).__name__}")
    dtype = in0.dtype if torch.is_floating_point(in0) else torch.float32
    model = _cached_model(net, version, lpips, spatial, in0.device, dtype)
    return model(in0, in1, retPerLayer=retPerLayer, normalize=normalize)


def clear_model_cache() -> None:
    """Forget the cached models (frees their memory): ``lpips()``'s and the dataset layer's."""
    with _lock:
        _models.clear()
    from . import model_cache

    model_cache.clear()
