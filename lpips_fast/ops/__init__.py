"""The fused LPIPS distance step: ``lpips_distance`` (one layer) and ``lpips_distances`` (all layers).

Per pixel, with x and y the C-vectors of the two feature maps and a = |x| + eps, b = |y| + eps
(eps outside the sqrt, as in the reference):  d = sum_c w_c (x_c / a - y_c / b)^2, then the
spatial mean per image or the (N,1,H,W) map. Both C-vectors are read from memory once, every sum
accumulates in fp32 (fp64 for fp64 features), and all cross-tile sums run in a fixed order.
``lpips_distances`` does every layer of a trunk in one op call (one parallel region on the CPU,
one Triton launch plus one reduction on CUDA) and returns the sum over layers (or the per-layer
maps); each layer's value is the per-layer op's (bitwise on the CPU).

Backends (``backend=``):
- ``None``: the C++ kernels on the CPU, Triton on CUDA, the eager composite elsewhere.
- ``"cpp"``: ``lpips_fast::distance_cpu`` / ``distances_cpu`` (``_cpu.py``): opaque custom ops
  over the C++ kernels in csrc/lpips_distance.cpp, built just in time on first use and cached; if
  they cannot be built the ops compute with the eager composite and say so once.
- ``"triton"``: ``lpips_fast::distance_triton`` / ``distances_triton`` (``_triton.py``,
  ``_triton_grouped.py``): ``torch.library.triton_op``s, so that torch.compile traces into the
  kernels and CUDA graphs capture them (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"torch"``: the eager composite (``_eager.py``), differentiable by plain autograd.

The CPU and CUDA ops are separate ops chosen here by device: a CPU kernel registered on a
``triton_op`` makes Inductor trace into the Triton kernel on the CPU, which fails.

Gradients: fused backward kernels for the features and the weights, computing only those that
autograd needs (weight gradient = sum over pixels of g (xhat - yhat)^2, for training the lin
layers). Where a feature column is all zero (|x| = 0, e.g. a dead ReLU pixel) the gradient with
respect to it is 0; the reference gives NaN there. Second-order gradients (``create_graph=True``)
go through the eager composite (``_autograd.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _cpu, _eager
from ._cpu import build_cpu_extension
from ._eager import unit_normalize
from .reference import lpips_distance_reference

__all__ = [
    "lpips_distance",
    "lpips_distances",
    "lpips_distance_reference",
    "build_cpu_extension",
    "unit_normalize",
]

_BACKENDS = ("torch", "triton", "cpp")


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


_triton_grouped_mod = None


def _triton_grouped_ops():
    """The grouped Triton op module, imported on first use (after the per-layer one)."""
    global _triton_grouped_mod
    if _triton_grouped_mod is None:
        _triton_ops()
        from . import _triton_grouped as mod

        _triton_grouped_mod = mod
    return _triton_grouped_mod


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


def _requires_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is not None:
        return backend
    if device.type == "cpu":
        return "cpp"
    return _default_cuda_backend() if device.type == "cuda" else "torch"


def _cpp_fast_path(*tensors: Optional[torch.Tensor]) -> bool:
    """Inference straight into the C++ kernel, skipping the custom op's Python layers (~15 us a
    call): not when autograd, torch.compile or a TorchScript trace needs to see the op."""
    return (
        not (torch.is_grad_enabled() and _requires_grad(*tensors))
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _cpu.available()
    )


def _broadcast_batch(feat0: torch.Tensor, feat1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand a batch of 1 against N as a stride-0 view (autograd's expand backward sums it)."""
    n0, n1 = feat0.shape[0], feat1.shape[0]
    if n0 == n1:
        return feat0, feat1
    n = max(n0, n1)
    return feat0.expand(n, -1, -1, -1), feat1.expand(n, -1, -1, -1)


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

    Gradients flow to feat0, feat1 and weight (only those required are computed), also to second
    order. At a pixel where a feature vector is all zero the gradient with respect to it is 0
    (the reference's gradient is NaN there).
    """
    _validate(feat0, feat1, weight, spatial, eps, backend)
    feat0, feat1 = _broadcast_batch(feat0, feat1)
    eps = float(eps)
    backend = _resolve_backend(backend, feat0.device)
    if backend == "cpp":
        if _cpp_fast_path(feat0, feat1, weight):
            return torch.ops.lpips_fast._distance_fwd_cpu(feat0, feat1, weight, spatial, eps)
        return torch.ops.lpips_fast.distance_cpu(feat0, feat1, weight, spatial, eps)
    if backend == "triton":
        return _triton_ops().distance_triton(feat0, feat1, weight, spatial, eps)
    return _eager.distance_torch(feat0, feat1, weight, spatial, eps)


def _validate_layers(feats0, feats1, weights, spatial, eps, backend) -> list:
    for name, seq in (("feats0", feats0), ("feats1", feats1)):
        if not isinstance(seq, (list, tuple)) or len(seq) == 0:
            raise TypeError(f"lpips_distances: {name} must be a non-empty list of tensors, got {type(seq).__name__}")
    if len(feats0) != len(feats1):
        raise ValueError(f"lpips_distances: feats0 and feats1 must have one tensor per layer, got {len(feats0)} and {len(feats1)}")
    if weights is None:
        weights = [None] * len(feats0)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(feats0):
        raise ValueError(f"lpips_distances: weights must be None or one (C,) tensor (or None) per layer, got {weights!r:.80}")
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise ValueError("lpips_distances: weights must be given for every layer or for none")
    for k, (f0, f1, w) in enumerate(zip(feats0, feats1, weights)):
        try:
            _validate(f0, f1, w, spatial, eps, backend)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"layer {k}: {exc}") from None
        if f0.dtype != feats0[0].dtype or f0.device != feats0[0].device:
            raise TypeError(
                f"lpips_distances: layer {k} has dtype {f0.dtype} on {f0.device}, layer 0 {feats0[0].dtype} "
                f"on {feats0[0].device}: all layers must share one"
            )
        if max(f0.shape[0], f1.shape[0]) != max(feats0[0].shape[0], feats1[0].shape[0]):
            raise ValueError(f"lpips_distances: layer {k} has another batch size than layer 0")
    return list(weights)


def lpips_distances(
    feats0: Sequence[torch.Tensor],
    feats1: Sequence[torch.Tensor],
    weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    spatial: bool = False,
    eps: float = 1e-10,
    backend: Optional[str] = None,
):
    """LPIPS distances of every layer of a trunk in one op call.

    Args:
        feats0, feats1: per-layer (N, C_l, H_l, W_l) features (same rules as ``lpips_distance``;
            one dtype and device for all layers).
        weights: per-layer (C_l,) channel weights, or None for plain channel sums.
        spatial: per-layer maps instead of the summed spatial means.

    Returns:
        ``spatial=False``: the (N,) sum over layers of each layer's spatial mean (the LPIPS value
        before any upsampling), equal to adding ``lpips_distance`` of each layer in layer order
        (bitwise on the CPU). ``spatial=True``: a list of per-layer (N, 1, H_l, W_l) maps (views
        of one buffer).
    """
    weights = _validate_layers(feats0, feats1, weights, spatial, eps, backend)
    pairs = [_broadcast_batch(f0, f1) for f0, f1 in zip(feats0, feats1)]
    f0s, f1s = [p[0] for p in pairs], [p[1] for p in pairs]
    ws = [] if weights[0] is None else list(weights)
    eps = float(eps)
    backend = _resolve_backend(backend, f0s[0].device)
    if backend == "cpp":
        if _cpp_fast_path(*f0s, *f1s, *ws):
            out = torch.ops.lpips_fast._distances_fwd_cpu(f0s, f1s, ws, spatial, eps)
        else:
            out = torch.ops.lpips_fast.distances_cpu(f0s, f1s, ws, spatial, eps)
    elif backend == "triton":
        out = _triton_grouped_ops().distances_triton(f0s, f1s, ws, spatial, eps)
    else:
        out = _eager.distances_torch(f0s, f1s, ws, spatial, eps)
    if not spatial:
        return out
    maps, off = [], 0
    for f in f0s:
        n, _, h, w = f.shape
        maps.append(out[off : off + n * h * w].view(n, 1, h, w))
        off += n * h * w
    return maps
