"""Small BAPPS-format datasets whose human judgments are replaced by a known teacher metric.

The real BAPPS data (hundreds of thousands of human 2AFC/JND judgments) is a separate download.
For tests, demos and recovery experiments this module writes folders with the same layout from
any photographs: random ``size`` x ``size`` crops (with flips) as references, two distortions of
each (blur, noise, JPEG, contrast, colour shift, pixelation, each at a random strength) as
``p0``/``p1``, and judgments computed by a teacher, normally an ``LPIPS`` model:

- 2AFC: ``judge = 1[d1 < d0]`` (0.5 on a tie) with ``temperature=0``, else
  ``sigmoid((d0 - d1) / temperature)``, where ``d0, d1`` are the teacher's distances from
  ``ref`` to ``p0``/``p1``, computed on the images exactly as the loader will read them.
- JND: ``same = 1[d < median(d)]`` with ``temperature=0``, else
  ``sigmoid((median(d) - d) / temperature)``, with ``d`` the teacher distance of the pair.

Triplets whose two teacher distances agree to 1e-5 (relative) are not written, so the teacher's
own 2AFC score on its hard-judged set is 1.0 however the distances are batched. With ``max_gap`` only
triplets whose two teacher distances are close are kept: on those the choice depends on how the
metric weighs the trunk's channels, which is what training the lin layers can learn.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Sequence

import numpy as np

from .bapps import IMAGE_EXTENSIONS, read_rgb, to_input

__all__ = ["DISTORTIONS", "distort", "make_2afc", "make_jnd", "load_sources"]

DISTORTIONS = ("blur", "noise", "jpeg", "contrast", "color", "pixelate")
_TIE = 1e-5  # relative distance gap below which a 2AFC triplet counts as a tie and is not written


def distort(img: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One distortion of an HxWx3 uint8 image at ``strength`` in [0, 1]."""
    from PIL import Image, ImageEnhance, ImageFilter

    if kind not in DISTORTIONS:
        raise ValueError(f"kind: got {kind!r}, expected one of {DISTORTIONS}")
    s = float(np.clip(strength, 0.0, 1.0))
    im = Image.fromarray(img)
    if kind == "blur":
        out = np.asarray(im.filter(ImageFilter.GaussianBlur(radius=0.3 + 2.2 * s)))
    elif kind == "noise":
        noisy = img.astype(np.float64) + rng.normal(0.0, 3.0 + 35.0 * s, img.shape)
        out = np.clip(np.rint(noisy), 0, 255)
    elif kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(round(60 - 55 * s)))
        buf.seek(0)
        with Image.open(buf) as j:
            out = np.asarray(j.convert("RGB"))
    elif kind == "contrast":
        out = np.asarray(ImageEnhance.Contrast(im).enhance(1.0 - 0.7 * s))
    elif kind == "color":
        shift = rng.uniform(-1.0, 1.0, 3) * (8.0 + 50.0 * s)
        out = np.clip(np.rint(img.astype(np.float64) + shift), 0, 255)
    else:  # pixelate
        h, w = img.shape[:2]
        f = 1.0 + 3.0 * s
        small = im.resize((max(1, int(w / f)), max(1, int(h / f))), Image.BILINEAR)
        out = np.asarray(small.resize((w, h), Image.NEAREST))
    return np.ascontiguousarray(out, dtype=np.uint8)


def load_sources(sources: str | os.PathLike | Sequence) -> list[np.ndarray]:
    """Source photographs: a folder of images, a list of paths, or a list of HxWx3 uint8 arrays."""
    if isinstance(sources, (str, os.PathLike)):
        folder = os.fspath(sources)
        if not os.path.isdir(folder):
            raise ValueError(f"sources: {folder!r} is not a folder")
        sources = sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    out = []
    for s in sources:
        arr = read_rgb(s, None) if isinstance(s, (str, os.PathLike)) else np.asarray(s)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise ValueError(f"sources: expected HxWx3 uint8 images, got shape {arr.shape} dtype {arr.dtype}")
        out.append(np.ascontiguousarray(arr[..., :3]))
    if not out:
        raise ValueError("sources: no images found")
    return out


def _crop(src: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = src.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        src = np.asarray(Image.fromarray(src).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR))
        h, w = src.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    c = src[y:y + size, x:x + size]
    if rng.random() < 0.5:
        c = c[:, ::-1]
    return np.ascontiguousarray(c)


def _random_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = DISTORTIONS[int(rng.integers(len(DISTORTIONS)))]
    return distort(img, kind, float(rng.uniform(0.1, 1.0)), rng)


def _teacher_fn(teacher) -> Callable:
    """``fn(anchor, [others...]) -> [distances...]``: anchor against each of the other batches.

    An LPIPS teacher runs its trunk once over the anchor and the others together.
    """
    import torch

    if teacher is None:
        from ..model import LPIPS

        teacher = LPIPS(net="alex", version="0.1")
    if isinstance(teacher, torch.nn.Module):
        model = teacher.eval()

        def fn(anchor: np.ndarray, others: list[np.ndarray]) -> list[np.ndarray]:
            dev = next(model.parameters()).device
            b = len(anchor)
            with torch.no_grad():
                feats = model.features(to_input(np.concatenate([anchor, *others])).to(dev))
                sides = [[f[i * b:(i + 1) * b] for f in feats] for i in range(len(others) + 1)]
                return [model.distances(sides[0], sides[i], spatial=False).flatten().double().cpu().numpy()
                        for i in range(1, len(others) + 1)]

        return fn
    if callable(teacher):
        return lambda anchor, others: [np.asarray(teacher(anchor, o), dtype=np.float64).reshape(-1) for o in others]
    raise TypeError(f"teacher: expected an LPIPS module, a callable(a, b) -> distances or None, got {type(teacher).__name__}")


def _distances(fn, anchor: np.ndarray, others: list[np.ndarray], chunk: int = 64) -> list[np.ndarray]:
    parts = [fn(anchor[i:i + chunk], [o[i:i + chunk] for o in others]) for i in range(0, len(anchor), chunk)]
    return [np.concatenate(col) for col in zip(*parts)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _write(out: str, sub: str, names: list[str], arrays) -> None:
    from PIL import Image

    os.makedirs(os.path.join(out, sub), exist_ok=True)
    for name, a in zip(names, arrays):
        if sub in ("judge", "same"):
            np.save(os.path.join(out, sub, name + ".npy"), np.array([a], dtype=np.float32))
        else:
            Image.fromarray(a).save(os.path.join(out, sub, name + ".png"))


def _check(n: int, size: int, temperature: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: got {n!r}, expected a positive int")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: got {size!r}, expected an int >= 16")
    if not temperature >= 0:
        raise ValueError(f"temperature: got {temperature!r}, expected a float >= 0")


def make_2afc(
    out: str | os.PathLike,
    sources,
    n: int = 64,
    *,
    size: int = 64,
    teacher=None,
    temperature: float = 0.0,
    max_gap: float | None = None,
    seed: int = 0,
) -> str:
    """Write an ``n``-triplet 2AFC folder (``ref/ p0/ p1/ judge/``) judged by ``teacher``; returns ``out``.

    ``teacher``: an ``LPIPS`` module (default: pretrained alex v0.1), or ``fn(a, b) -> (B,)``
    distances for (B,H,W,3) uint8 batches. ``max_gap``: keep only triplets the teacher finds
    hard, ``|d0 - d1| <= max_gap * max(d0, d1)`` (candidates are drawn until ``n`` are kept).
    """
    _check(n, size, temperature)
    if max_gap is not None and not 0 < max_gap <= 1:
        raise ValueError(f"max_gap: got {max_gap!r}, expected a float in (0, 1] or None")
    rng = np.random.default_rng(seed)
    srcs = load_sources(sources)
    fn = _teacher_fn(teacher)
    parts: list[tuple[np.ndarray, ...]] = []
    have = 0
    for _ in range(200):
        m = n - have if max_gap is None else max(32, 4 * (n - have))
        ref = np.stack([_crop(srcs[int(rng.integers(len(srcs)))], size, rng) for _ in range(m)])
        p0 = np.stack([_random_distortion(r, rng) for r in ref])
        p1 = np.stack([_random_distortion(r, rng) for r in ref])
        d0, d1 = _distances(fn, ref, [p0, p1])
        gap = np.abs(d0 - d1)
        top = np.maximum(np.maximum(d0, d1), 1e-12)
        # Near-ties (equal to float rounding) are dropped: their order may flip between batchings.
        keep = gap > _TIE * top
        if max_gap is not None:
            keep &= gap <= max_gap * top
        ref, p0, p1, d0, d1 = ref[keep], p0[keep], p1[keep], d0[keep], d1[keep]
        parts.append((ref, p0, p1, d0, d1))
        have += len(ref)
        if have >= n:
            break
    else:
        raise ValueError(f"max_gap: {max_gap} keeps too few triplets ({have} of {n} wanted); use a larger gap")
    ref, p0, p1, d0, d1 = (np.concatenate(c)[:n] for c in zip(*parts))
    if temperature == 0:
        judge = (d1 < d0) * 1.0 + (d1 == d0) * 0.5
    else:
        judge = _sigmoid((d0 - d1) / temperature)
    out = os.fspath(out)
    names = [f"{i:06d}" for i in range(n)]
    for sub, arr in (("ref", ref), ("p0", p0), ("p1", p1), ("judge", judge)):
        _write(out, sub, names, arr)
    return out


def make_jnd(
    out: str | os.PathLike,
    sources,
    n: int = 64,
    *,
    size: int = 64,
    teacher=None,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Write an ``n``-pair JND folder (``p0/ p1/ same/``) judged by ``teacher``; returns ``out``."""
    _check(n, size, temperature)
    rng = np.random.default_rng(seed)
    srcs = load_sources(sources)
    ref = np.stack([_crop(srcs[int(rng.integers(len(srcs)))], size, rng) for _ in range(n)])
    p1 = np.stack([_random_distortion(r, rng) for r in ref])
    fn = _teacher_fn(teacher)
    (d,) = _distances(fn, ref, [p1])
    tau = float(np.median(d))
    same = (d < tau) * 1.0 if temperature == 0 else _sigmoid((tau - d) / temperature)
    out = os.fspath(out)
    names = [f"{i:06d}" for i in range(n)]
    for sub, arr in (("p0", ref), ("p1", p1), ("same", same)):
        _write(out, sub, names, arr)
    return out
