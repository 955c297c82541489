"""NVTX ranges for Nsight, behind one switch: ``LPIPS_FAST_NVTX=1``.

When off (the default) ``nvtx_range`` returns a shared ``contextlib.nullcontext``: no CUDA query,
no allocation. When on it uses the ``nvtx`` package if installed (domain ``lpips_fast``) and
``torch.cuda.nvtx`` otherwise. Range names: ``lpips_fast/h2d``, ``lpips_fast/preprocess``,
``lpips_fast/trunk``, ``lpips_fast/distance``.
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

__all__ = ["nvtx_enabled", "nvtx_range", "set_nvtx"]

_NULL = contextlib.nullcontext()
_enabled = os.environ.get("LPIPS_FAST_NVTX", "") not in ("", "0", "false", "False")
_nvtx_mod = None


def nvtx_enabled() -> bool:
    return _enabled


def set_nvtx(enabled: bool) -> None:
    """Turn the ranges on or off at run time (the env var sets the initial state)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def _torch_range(name: str):
    import torch

    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str) -> ContextManager:
    """A context manager marking ``name`` on the NVTX timeline, or a no-op when disabled."""
    if not _enabled:
        return _NULL
    global _nvtx_mod
    if _nvtx_mod is None:
        try:
            import nvtx  # type: ignore

            _nvtx_mod = nvtx
        except ImportError:
            _nvtx_mod = False
    if _nvtx_mod:
        return _nvtx_mod.annotate(name, domain="lpips_fast")
    return _torch_range(name)
