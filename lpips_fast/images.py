"""Image helpers with the reference lpips 0.1.4 conventions, using Pillow (no OpenCV).

Conventions (from the reference's ``load_image``/``im2tensor``/``tensor2im``): images are HWC
uint8 RGB arrays; tensors are 1x3xHxW float32 in [-1, 1] (``x / 127.5 - 1``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["load_image", "im2tensor", "tensor2im", "normalize_tensor"]

_ORIENTATION = 0x0112  # EXIF tag


def exif_orientation(im) -> int:
    """The EXIF orientation (1..8) of a Pillow image, 1 when absent or unreadable.

    Never decodes pixels: Pillow's ``getexif()`` on a PNG would load the whole image to look for an
    ``eXIf`` chunk after the image data, so a PNG is only asked when its ``info`` already holds
    EXIF (an ``eXIf`` chunk before the data, or any once the image is loaded).
    """
    if getattr(im, "format", None) == "PNG" and "exif" not in im.info:
        return 1
    try:
        o = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:
        return 1
    return o if 1 <= o <= 8 else 1


def upright(im):
    """``im`` with its EXIF orientation applied (``ImageOps.exif_transpose``); itself when upright."""
    if exif_orientation(im) == 1:
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (grayscale and RGBA become RGB).

    An EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), as the reference's
    OpenCV-based ``load_image`` does: a photo stored rotated with a tag loads upright.
    """
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(upright(im).convert("RGB"), dtype=np.uint8).copy()


def im2tensor(image: np.ndarray, imtype=np.uint8, cent: float = 1.0, factor: float = 255.0 / 2.0) -> torch.Tensor:
    """HxWx3 array -> 1x3xHxW float32 tensor, ``image / factor - cent`` ([-1, 1] for uint8)."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image: expected an HxWxC array, got shape {arr.shape}")
    return torch.from_numpy((arr / factor - cent).astype(np.float32).transpose(2, 0, 1)[None].copy())


def tensor2im(image_tensor: torch.Tensor, imtype=np.uint8, cent: float = 1.0, factor: float = 255.0 / 2.0) -> np.ndarray:
    """First image of an Nx3xHxW tensor -> HxWx3 array ``(x + cent) * factor`` cast to ``imtype``."""
    image_numpy = image_tensor[0].detach().cpu().float().numpy()
    return ((np.transpose(image_numpy, (1, 2, 0)) + cent) * factor).astype(imtype)


def normalize_tensor(in_feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise over channels: ``x / (sqrt(sum_c x^2) + eps)`` (eps outside the sqrt)."""
    norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
    return in_feat / (norm_factor + eps)
