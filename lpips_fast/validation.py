"""Input checks for LPIPS: clear errors naming the argument, what was got and what was expected."""

from __future__ import annotations

import torch

__all__ = ["check_image_pair", "check_finite", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("raise", "propagate")


def _check_image(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{name}: expected a 4-D tensor (N, C, H, W), got {x.ndim}-D with shape {tuple(x.shape)}"
        )
    if x.shape[1] not in (1, 3):
        raise ValueError(
            f"{name}: expected 3 channels (RGB) or 1 (gray, broadcast to RGB), got {x.shape[1]} "
            f"channels in shape {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name}: expected a floating-point tensor in [-1, 1], got dtype {x.dtype}; convert uint8 "
            f"images with `x.float() / 127.5 - 1`, or pass `x.float() / 255` with normalize=True"
        )
    return x


def check_image_pair(
    in0: object, in1: object, *, device: torch.device, min_size: int, net: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the two image batches of ``LPIPS.forward`` and return them unchanged."""
    a = _check_image("in0", in0)
    b = _check_image("in1", in1)
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(
            f"in0/in1: batch sizes must match or one must be 1 (broadcast), got in0 {tuple(a.shape)} "
            f"and in1 {tuple(b.shape)}"
        )
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"in0/in1: image sizes must match, got in0 {tuple(a.shape[2:])} and in1 {tuple(b.shape[2:])} "
            f"(H, W); resize one of them first"
        )
    for name, x in (("in0", a), ("in1", b)):
        if x.device != device:
            raise ValueError(
                f"{name}: expected a tensor on the module's device {device}, got one on {x.device}; "
                f"move it with `.to({str(device)!r})` or move the module with `.to({str(x.device)!r})`"
            )
    h, w = a.shape[2], a.shape[3]
    if min(h, w) < min_size:
        raise ValueError(
            f"in0/in1: images of {h}x{w} are smaller than the {net} trunk's minimum of "
            f"{min_size}x{min_size} pixels; upsample them or choose another net"
        )
    return a, b


def check_finite(in0: torch.Tensor, in1: torch.Tensor) -> None:
    """Raise if either input holds NaN or Inf: one device sync for both (skipped while compiling
    or capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return
    if in0.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if bool(torch.isfinite(in0).all() & torch.isfinite(in1).all()):
        return
    for name, x in (("in0", in0), ("in1", in1)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name}: holds NaN or Inf values; pass nonfinite='propagate' to LPIPS(...) to let "
                f"them flow through as the reference lpips does"
            )
