"""Helpers shared by the dataset-layer tests: generated folders of real-looking images.

Photographs shipped with scikit-image, shrunk to 48x64 and distorted (noise, blur, JPEG), plus the
awkward cases: a corrupt file, a truncated file, a grayscale and an RGBA image, a size mismatch and
files present in only one folder. No test functions live here.
"""

from __future__ import annotations

import io
import os
import sys
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 48, 64

OK_NAMES = ["astronaut.png", "chelsea.png", "coffee.jpg", "sub/rocket.png", "gray.png", "rgba.png"]
ERROR_NAMES = ["corrupt.png", "mismatch.png", "only0.png", "only1.png", "truncated.png"]


def photos(n: int = 6, size=(H, W)) -> list[np.ndarray]:
    """n distinct HxWx3 uint8 photographs (crops of scikit-image's sample pictures)."""
    from PIL import Image
    from skimage import data

    srcs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(), data.immunohistochemistry()]
    out = []
    k = 0
    while len(out) < n:
        src = srcs[k % len(srcs)]
        shift = (k // len(srcs)) * 17
        crop = src[shift:, shift:]
        out.append(np.asarray(Image.fromarray(crop).convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)))
        k += 1
    return out


def distort(img: np.ndarray, seed: int) -> np.ndarray:
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:
        out = np.clip(img.astype(np.int16) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
    elif kind == 1:
        out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5)))
    else:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=15)
        out = np.asarray(Image.open(buf).convert("RGB"))
    return np.ascontiguousarray(out)


def _save(path: str, arr: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    if path.endswith(".jpg"):
        im.save(path, quality=90)
    else:
        im.save(path)


def make_dirs(root: str) -> tuple[str, str]:
    """root/d0 and root/d1 with OK_NAMES scoreable and ERROR_NAMES error rows."""
    d0, d1 = os.path.join(root, "d0"), os.path.join(root, "d1")
    ph = photos(6)
    for k, name in enumerate(["astronaut.png", "chelsea.png", "coffee.jpg", "sub/rocket.png"]):
        _save(os.path.join(d0, name), ph[k])
        _save(os.path.join(d1, name), distort(ph[k], k))
    _save(os.path.join(d0, "gray.png"), ph[4], "L")
    _save(os.path.join(d1, "gray.png"), distort(ph[4], 4), "L")
    _save(os.path.join(d0, "rgba.png"), ph[5], "RGBA")
    _save(os.path.join(d1, "rgba.png"), distort(ph[5], 5), "RGBA")
    # errors
    _save(os.path.join(d0, "corrupt.png"), ph[0])
    with open(os.path.join(d1, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _save(os.path.join(d0, "truncated.png"), ph[1])
    _save(os.path.join(d1, "truncated.png"), distort(ph[1], 7))
    p = os.path.join(d1, "truncated.png")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    _save(os.path.join(d0, "mismatch.png"), ph[2])
    from PIL import Image

    small = np.asarray(Image.fromarray(ph[2]).resize((W, H - 8)))
    _save(os.path.join(d1, "mismatch.png"), small)
    _save(os.path.join(d0, "only0.png"), ph[3])
    _save(os.path.join(d1, "only1.png"), ph[3])
    with open(os.path.join(d1, "notes.txt"), "w") as f:
        f.write("not an image, not listed")
    return d0, d1


def make_flat_dir(path: str, n: int, size=(H, W), seed: int = 0) -> list[str]:
    """n distinct images (photos and their distortions) in one folder; returns the names."""
    ph = photos(min(n, 6), size)
    names = []
    for k in range(n):
        img = ph[k % len(ph)] if k < len(ph) else distort(ph[k % len(ph)], seed + k)
        name = f"img{k:03d}.png"
        _save(os.path.join(path, name), img)
        names.append(name)
    return names


def reference_model():
    """The reference lpips 0.1.4 AlexNet LPIPS with a seeded random trunk and its packaged lins."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import make_pair

    return make_pair("alex", "0.1")


def save_state_dict(model, path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def ref_distance(ref, path0: str, path1: str) -> float:
    """The reference's value on the pixels our decoder produces."""
    import lpips
    import torch

    from lpips_fast.dataset.data import decode_file

    a, b = decode_file(path0).array, decode_file(path1).array
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(ref(lpips.im2tensor(a), lpips.im2tensor(b)).item())


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("WORLD_SIZE", None)
    return e
