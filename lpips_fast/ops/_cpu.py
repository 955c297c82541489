"""The CPU distance ops and the just-in-time build of their C++ kernels (csrc/lpips_distance.cpp).

Ops (schemas in ``_schemas.py``): ``lpips_fast::distance_cpu`` (one layer) and
``lpips_fast::distances_cpu`` (all layers in one call), each a ``torch.library.custom_op`` with a
fake kernel, a fused backward op and autograd. Their CPU kernels are small Python trampolines into
the internal C++ ops (``_distance_fwd_cpu``, ``_distances_fwd_cpu``, ...), so that (1) the ops
exist, with fake kernels and autograd, before anything is built (the first call may already be
inside torch.compile, and a TorchScript trace that recorded them loads after ``import
lpips_fast``), and (2) the no-compiler fallback (the eager composite) lives inside the ops.

Nothing is built at import. The first CPU call (or ``build_cpu_extension()``, which CI calls
once to warm the cache) compiles the source with ``torch.utils.cpp_extension.load`` into a build
directory keyed by the torch version and the source's hash, under
``$LPIPS_FAST_HOME/torch_extensions`` (default ``~/.cache/lpips_fast/torch_extensions``), so an
edited source builds anew and an unchanged one loads from the cache in well under a second. The library
registers CPU kernels for the internal ops with ``TORCH_LIBRARY_IMPL`` (``is_python_module=False``):
no pybind11, and only the light ATen / torch/library headers.

If the build or load fails (no compiler, no ninja), :func:`available` returns False and warns
once; callers then use the pure-PyTorch path.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from . import _eager, _schemas
from ._autograd import (
    grads_empty,
    grouped_grads_empty,
    grouped_out_empty,
    grouped_setup_context,
    make_backward,
    make_grouped_backward,
    out_empty,
    setup_context,
)

__all__ = ["available", "build_cpu_extension", "source_path", "build_directory", "distance_cpu", "distances_cpu"]

_schemas.define_cpp_ops()

_NAME = "lpips_fast_cpu"
_SOURCE = "lpips_distance.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {"ok": None, "error": None}


def source_path() -> Path:
    """The C++ source: packaged next to the package (lpips_fast/csrc) or in the repository's csrc/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc", here.parent.parent / "csrc"):
        if (cand / _SOURCE).is_file():
            return cand / _SOURCE
    raise FileNotFoundError(
        f"lpips_fast: C++ source {_SOURCE} not found next to the package or in the repository's csrc/"
    )


def build_directory() -> Path:
    """``<cache root>/torch_extensions/torch<version>/<source+flags hash>``: two checkouts or
    versions of the package on one machine each keep their own build instead of rebuilding over
    each other's (the library's name is the same, so they would share one folder otherwise)."""
    import hashlib

    from ..paths import cache_root

    tag = "torch" + torch.__version__.replace("+", "_")
    h = hashlib.sha256(source_path().read_bytes())
    h.update(" ".join(_cflags()).encode())
    return cache_root() / "torch_extensions" / tag / h.hexdigest()[:16]


def _cflags() -> list[str]:
    """-O3, plus AVX2/FMA when this machine has them (the cache is per machine and per flags)."""
    flags = ["-O3"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    words = set(cpuinfo.split())
    if {"avx2", "fma"} <= words:
        flags += ["-mavx2", "-mfma"]
    return flags


def _kernels_registered() -> bool:
    """Whether the C++ library is loaded in this process (its CPU kernels registered)."""
    return _state["ok"] is True


def _import_cpp_extension():
    # Its import logs "No CUDA runtime is found, using CUDA_HOME=..." on CPU-only machines: noise
    # for a CPU build, so it is silenced for the import only.
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(old)
    return cpp_extension


def _build(verbose: bool) -> None:
    cpp_extension = _import_cpp_extension()

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(source_path())],
        extra_cflags=_cflags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )


def build_cpu_extension(verbose: bool = False) -> Path:
    """Build (or load from the cache) the C++ kernels now; raises if that fails.

    Returns the build directory. Meant for CI and install scripts:
    ``python -c "import lpips_fast.ops as o; o.build_cpu_extension()"``.
    """
    with _lock:
        if not _kernels_registered():
            _build(verbose)
        _state["ok"], _state["error"] = True, None
    return build_directory()


def available() -> bool:
    """True once the C++ kernels are loaded; builds them on first call; warns once on failure."""
    ok = _state["ok"]
    if ok is not None:
        return bool(ok)
    with _lock:
        if _state["ok"] is None:
            try:
                if not _kernels_registered():
                    _build(verbose=False)
                _state["ok"] = True
            except Exception as exc:  # no compiler, no ninja, read-only cache, ...
                _state["ok"], _state["error"] = False, exc
                warnings.warn(
                    "lpips_fast: could not build or load the C++ CPU kernels "
                    f"({type(exc).__name__}: {exc}); using the slower pure-PyTorch path on the CPU.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return bool(_state["ok"])


# ----------------------------------------------------------------------------- the CPU ops
@torch.library.custom_op("lpips_fast::distance_cpu", mutates_args=(), device_types="cpu", schema=_schemas.FWD)
def distance_cpu(feat0, feat1, weight, spatial, eps):
    if available():
        return torch.ops.lpips_fast._distance_fwd_cpu(feat0, feat1, weight, spatial, eps)
    with torch.no_grad():
        return _eager.distance_torch(feat0, feat1, weight, spatial, eps).contiguous()


@distance_cpu.register_fake
def _(feat0, feat1, weight, spatial, eps):
    return out_empty(feat0, spatial)


@torch.library.custom_op(
    "lpips_fast::distance_cpu_backward", mutates_args=(), device_types="cpu", schema=_schemas.BWD
)
def distance_cpu_backward(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    if available():
        return torch.ops.lpips_fast._distance_bwd_cpu(
            grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight
        )
    return _eager.distance_torch_backward(
        grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight
    )


@distance_cpu_backward.register_fake
def _(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    return grads_empty(feat0, feat1, weight, need_feat0, need_feat1, need_weight)


distance_cpu.register_autograd(make_backward(distance_cpu_backward), setup_context=setup_context)


@torch.library.custom_op("lpips_fast::distances_cpu", mutates_args=(), device_types="cpu", schema=_schemas.GROUPED_FWD)
def distances_cpu(feats0, feats1, weights, spatial, eps):
    if available():
        return torch.ops.lpips_fast._distances_fwd_cpu(feats0, feats1, weights, spatial, eps)
    with torch.no_grad():
        return _eager.distances_torch(feats0, feats1, weights, spatial, eps).contiguous()


@distances_cpu.register_fake
def _(feats0, feats1, weights, spatial, eps):
    return grouped_out_empty(feats0, spatial)


@torch.library.custom_op(
    "lpips_fast::distances_cpu_backward", mutates_args=(), device_types="cpu", schema=_schemas.GROUPED_BWD
)
def distances_cpu_backward(grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights):
    if available():
        return torch.ops.lpips_fast._distances_bwd_cpu(
            grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights
        )
    return _eager.distances_torch_backward(
        grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights
    )


@distances_cpu_backward.register_fake
def _(grad, feats0, feats1, weights, spatial, eps, need_feats0, need_feats1, need_weights):
    return grouped_grads_empty(feats0, feats1, weights, need_feats0, need_feats1, need_weights)


distances_cpu.register_autograd(make_grouped_backward(distances_cpu_backward), setup_context=grouped_setup_context)
