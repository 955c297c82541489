"""lpips-fast: the fastest exact LPIPS for PyTorch, a drop-in for ``lpips`` 0.1.4.

    import lpips_fast as lpips
    loss_fn = lpips.LPIPS(net="alex")
    d = loss_fn(img0, img1)          # (N,1,1,1), images in [-1, 1]

Importing this package never imports torchvision, lpips or cv2, never queries CUDA and never
builds the C++ kernel (that happens lazily, on first CPU use).
"""

from __future__ import annotations

import importlib

from . import _moved
from .functional import clear_model_cache, lpips
from .images import im2tensor, load_image, normalize_tensor, tensor2im
from .model import LPIPS, NetLinLayer, ScalingLayer

__version__ = "0.1.0"

_moved.install()  # old module paths (lpips_fast.engine, ...) import with a DeprecationWarning

# Heavier layers load on first use.
_LAZY = {
    "Engine": "inference.engine",
    "Scorer": "inference.scorer",
    "Overloaded": "inference.scorer",
    "InvalidInput": "inference.scorer",
    "all_pairs": "dataset.pairwise",
    "evaluate_dirs": "dataset.evaluate",
    "evaluate_ref": "dataset.evaluate",
    "evaluate_pairs": "dataset.evaluate",
    "EvalOptions": "dataset.options",
    "score_2afc": "training",
    "score_jnd": "training",
    "train": "training",
    "compare": "deploy.comparison",
    "select_precision": "deploy.tune",
}

__all__ = [
    "LPIPS",
    "ScalingLayer",
    "NetLinLayer",
    "lpips",
    "clear_model_cache",
    "load_image",
    "im2tensor",
    "tensor2im",
    "normalize_tensor",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'lpips_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
