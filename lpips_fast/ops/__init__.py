"""The fused LPIPS distance step: one custom op call per trunk layer.

Per pixel, with x and y the C-vectors of the two feature maps and a = |x| + eps, b = |y| + eps
(eps outside the sqrt, as in the reference):  d = sum_c w_c (x_c / a - y_c / b)^2, then the
spatial mean per image or the (N,1,H,W) map. Both C-vectors are read from memory once, every sum
accumulates in fp32 (fp64 for fp64 features), and all cross-tile sums run in a fixed order.

Backends (``backend=``):
- ``None``: the C++ kernel on the CPU, Triton on CUDA, the eager composite elsewhere.
- ``"cpp"``: ``torch.ops.lpips_fast.distance_cpu``, a ``torch.library.custom_op`` whose CPU kernel
  calls the C++ kernels in csrc/lpips_distance.cpp (built just in time on first use and cached;
  see ``_cpu.py``). If they cannot be built the op computes with the eager composite and says so
  once.
- ``"triton"``: ``torch.ops.lpips_fast.distance_triton``, a ``torch.library.triton_op`` over the
  kernels in ``_triton.py`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"torch"``: the eager composite (``_eager.py``), differentiable by plain autograd.

Layout decision: DESIGN.md's layout (a), one op per device chosen here by device. The issue
asks for the CUDA op to be a ``triton_op`` so that torch.compile traces into the Triton kernels
(Inductor can schedule and fuse them, and CUDA graphs capture them). Layout (b) would make the
CUDA path opaque to Inductor; and registering a CPU kernel on the triton_op itself breaks
torch.compile on the CPU (Inductor traces into the Triton kernel). So the CPU op is a separate,
opaque custom op. Its CPU kernel is a small Python trampoline into the C++ op rather than the C++
op itself so that (1) the op exists, with its fake kernel and autograd, before anything is
built, so that the first call may already be inside torch.compile, and (2) the no-compiler
fallback lives inside the op (compiled graphs keep working).

Gradients: both ops have fused backward kernels for feat0, feat1 and weight, computing only
those that autograd needs (weight gradient = sum over pixels of g (xhat - yhat)^2, needed to
train the lin layers). Where a feature column is all zero (|x| = 0, e.g. a dead ReLU pixel), the
gradient with respect to that column is defined as 0; the reference gives NaN there.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _cpu, _eager
from ._autograd import grads_empty, make_backward, out_empty, setup_context
from ._cpu import build_cpu_extension
from ._eager import unit_normalize
from .reference import lpips_distance_reference

__all__ = ["lpips_distance", "lpips_distance_reference", "build_cpu_extension", "unit_normalize"]

_BACKENDS = ("torch", "triton", "cpp")
_FWD_SCHEMA = "(Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, float eps) -> Tensor"
_BWD_SCHEMA = (
    "(Tensor grad, Tensor feat0, Tensor feat1, Tensor? weight, bool spatial, float eps, "
    "bool need_feat0, bool need_feat1, bool need_weight) -> (Tensor, Tensor, Tensor)"
)


# ----------------------------------------------------------------------------- CPU op (C++)
@torch.library.custom_op("lpips_fast::distance_cpu", mutates_args=(), device_types="cpu", schema=_FWD_SCHEMA)
def _distance_cpu(feat0, feat1, weight, spatial, eps):
    if _cpu.available():
        return torch.ops.lpips_fast._distance_fwd_cpu(feat0, feat1, weight, spatial, eps)
    with torch.no_grad():
        return _eager.distance_torch(feat0, feat1, weight, spatial, eps).contiguous()


@_distance_cpu.register_fake
def _(feat0, feat1, weight, spatial, eps):
    return out_empty(feat0, spatial)


@torch.library.custom_op(
    "lpips_fast::distance_cpu_backward", mutates_args=(), device_types="cpu", schema=_BWD_SCHEMA
)
def _distance_cpu_backward(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    if _cpu.available():
        return torch.ops.lpips_fast._distance_bwd_cpu(
            grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight
        )
    return _eager.distance_torch_backward(
        grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight
    )


@_distance_cpu_backward.register_fake
def _(grad, feat0, feat1, weight, spatial, eps, need_feat0, need_feat1, need_weight):
    return grads_empty(feat0, feat1, weight, need_feat0, need_feat1, need_weight)


_distance_cpu.register_autograd(make_backward(_distance_cpu_backward), setup_context=setup_context)


# ----------------------------------------------------------------------------- CUDA op (Triton)
_triton_mod = None


def _triton_ops():
    """The Triton op module, imported on first use (importing triton costs ~0.3 s)."""
    global _triton_mod
    if _triton_mod is None:
        # A plain import statement: Dynamo traces it (importlib.import_module it refuses, which
        # broke torch.compile(fullgraph=True) on the first CUDA call).
        try:
            from . import _triton as mod
        except ImportError as exc:
            raise RuntimeError(
                f"lpips_distance: backend 'triton' needs the triton package ({exc}); "
                "use backend='torch' (any device) or 'cpp' (CPU)"
            ) from exc
        _triton_mod = mod
    return _triton_mod


_cuda_default: Optional[str] = None


def _default_cuda_backend() -> str:
    """'triton', or 'torch' with one warning where triton cannot be imported (e.g. Windows builds)."""
    global _cuda_default
    if _cuda_default is None:
        try:
            _triton_ops()
            _cuda_default = "triton"
        except RuntimeError as exc:
            import warnings

            warnings.warn(f"{exc}; using the slower eager composite on CUDA", RuntimeWarning, stacklevel=4)
            _cuda_default = "torch"
    return _cuda_default


# ----------------------------------------------------------------------------- public wrapper
def _check_feature(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lpips_distance: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"lpips_distance: {name} must be 4-D (N,C,H,W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"lpips_distance: {name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _validate(feat0, feat1, weight, spatial, eps, backend) -> None:
    _check_feature("feat0", feat0)
    _check_feature("feat1", feat1)
    if feat0.dtype != feat1.dtype:
        raise TypeError(f"lpips_distance: feat0 and feat1 must share a dtype, got {feat0.dtype} and {feat1.dtype}")
    if feat0.device != feat1.device:
        raise ValueError(
            f"lpips_distance: feat0 and feat1 must be on one device, got {feat0.device} and {feat1.device}"
        )
    if feat0.shape[1:] != feat1.shape[1:]:
        raise ValueError(
            "lpips_distance: feat1 must match feat0 in C, H and W, got "
            f"feat0 {tuple(feat0.shape)} and feat1 {tuple(feat1.shape)}"
        )
    n0, n1 = feat0.shape[0], feat1.shape[0]
    if n0 != n1 and n0 != 1 and n1 != 1:
        raise ValueError(
            f"lpips_distance: batch sizes must be equal or one of them 1 (broadcast), got {n0} and {n1}"
        )
    if feat0.shape[1] == 0:
        raise ValueError("lpips_distance: features need at least one channel, got C = 0")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"lpips_distance: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != feat0.shape[1]:
            raise ValueError(
                f"lpips_distance: weight must have shape ({feat0.shape[1]},) (one per channel), "
                f"got {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"lpips_distance: weight must be floating point, got dtype {weight.dtype}")
        if weight.device != feat0.device:
            raise ValueError(
                f"lpips_distance: weight must be on the features' device {feat0.device}, got {weight.device}"
            )
    if not isinstance(spatial, bool):
        raise TypeError(f"lpips_distance: spatial must be a bool, got {type(spatial).__name__}")
    if not isinstance(eps, (float, int)) or isinstance(eps, bool):
        raise TypeError(f"lpips_distance: eps must be a float, got {type(eps).__name__}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"lpips_distance: backend must be None, 'torch', 'triton' or 'cpp', got {backend!r}")
    if backend == "cpp" and feat0.device.type != "cpu":
        raise ValueError(f"lpips_distance: backend 'cpp' needs CPU tensors, got device {feat0.device}")


def _requires_grad(feat0: torch.Tensor, feat1: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    return feat0.requires_grad or feat1.requires_grad or (weight is not None and weight.requires_grad)


def lpips_distance(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    spatial: bool = False,
    eps: float = 1e-10,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LPIPS distance of one layer: ``sum_c w_c (x_c/(|x|+eps) - y_c/(|y|+eps))^2`` per pixel.

    Args:
        feat0: (N, C, H, W) features (NCHW or channels_last; fp16, bf16, fp32 or fp64).
        feat1: (N, C, H, W) features, or (1, C, H, W) broadcast against feat0 without a copy;
            feat0 may likewise have batch 1 against feat1's batch N.
        weight: (C,) channel weights (the lin layer's ``weight.view(-1)``; may be fp32 with
            fp16/bf16 features), or None for a plain sum over channels.
        spatial: return the (N, 1, H, W) per-pixel map instead of the (N,) spatial means.
        eps: added to the norm outside the sqrt, as in the reference.
        backend: None (C++ on CPU, Triton on CUDA), "cpp", "triton" or "torch".

    Returns:
        fp32 for fp16/bf16/fp32 features (fp32 accumulation throughout), fp64 for fp64.

    Gradients flow to feat0, feat1 and weight (only those required are computed). At a pixel
    where a feature vector is all zero the gradient with respect to it is 0 (the reference's
    gradient is NaN there).
    """
    _validate(feat0, feat1, weight, spatial, eps, backend)
    n0, n1 = feat0.shape[0], feat1.shape[0]
    if n0 != n1:  # a stride-0 view; autograd's expand backward sums the gradient over the batch
        n = max(n0, n1)
        feat0 = feat0.expand(n, -1, -1, -1)
        feat1 = feat1.expand(n, -1, -1, -1)
    eps = float(eps)
    if backend is None:
        device_type = feat0.device.type
        backend = "cpp" if device_type == "cpu" else _default_cuda_backend() if device_type == "cuda" else "torch"
    if backend == "cpp":
        if (
            not (torch.is_grad_enabled() and _requires_grad(feat0, feat1, weight))
            and not torch.compiler.is_compiling()
            and _cpu.available()
        ):
            # Inference fast path: straight to the C++ kernel, skipping the Python layers of the
            # custom op (~15 us a call, a third of a small layer). Same kernel, same numbers.
            return torch.ops.lpips_fast._distance_fwd_cpu(feat0, feat1, weight, spatial, eps)
        return torch.ops.lpips_fast.distance_cpu(feat0, feat1, weight, spatial, eps)
    if backend == "triton":
        return _triton_ops().distance_triton(feat0, feat1, weight, spatial, eps)
    return _eager.distance_torch(feat0, feat1, weight, spatial, eps)
