"""All pairs of N images as one GEMM: ``lpips_fast.all_pairs(images) -> (N, N)``.

Per layer l with channel weights w (1 when ``lpips=False``) and unit-normalised features
``xhat = x / (sqrt(sum_c x^2) + eps)`` (eps outside the sqrt, exactly as the pairwise op), the
pairwise LPIPS is

    d(i, j) = sum_l 1/(H_l W_l) sum_p sum_c w_c (xhat_i[c,p] - xhat_j[c,p])^2
            = A_i + A_j - 2 <s * v_i, v_j>,     A_i = <s * v_i, v_i>

where ``v_i`` is the concatenation over layers of the flattened ``xhat_i`` and ``s`` repeats
``w_c / (H_l W_l)`` over the pixels. ``|xhat|^2`` is not exactly 1 (the eps), so ``A_i`` is
computed, never assumed. The trunk runs once per image; the Gram matrix ``(s*V) V^T`` is
computed block by block in float32 (TF32 off), ``A`` in float64, and ``d`` assembled in float64
before rounding to float32. Off-diagonal blocks are mirrored, diagonal blocks symmetrised, the
diagonal set to 0, and values clamped at 0 when every weight is non-negative.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "all_pairs", "FeatureRows", "gram_distances", "pair_distances", "flatten_unit_features", "column_scale",
    "weights_nonneg", "sample_pairs", "content_ids", "image_key",
]


def flatten_unit_features(feats: Sequence[torch.Tensor], eps: float = 1e-10) -> torch.Tensor:
    """Per-layer (n, C, h, w) features -> (n, K) concatenated ``xhat`` rows (float32)."""
    rows = []
    for f in feats:
        f = f.float()
        nrm = torch.sqrt(torch.sum(f * f, dim=1, keepdim=True))
        rows.append((f / (nrm + eps)).reshape(f.shape[0], -1))
    return torch.cat(rows, dim=1)


def column_scale(feats_shapes: Sequence[Sequence[int]], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The (K,) scale ``w_c / (h w)`` per column of ``flatten_unit_features``."""
    parts = []
    for shape, w in zip(feats_shapes, weights):
        c, h, wd = (int(v) for v in shape[-3:])
        wv = torch.ones(c, dtype=torch.float64) if w is None else w.detach().to("cpu", torch.float64).reshape(-1)
        parts.append((wv / (h * wd)).repeat_interleave(h * wd))
    return torch.cat(parts).to(torch.float32)


class FeatureRows:
    """Accumulates ``v_i`` rows image by image (or batch by batch) into one (N, K) matrix."""

    def __init__(self, n: int, weights: Sequence[torch.Tensor | None], eps: float = 1e-10):
        self.n = n
        self.weights = list(weights)
        self.eps = eps
        self.V: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.keys: list = [None] * n  # content hashes, for exact zeros between equal images

    def add(self, index: Sequence[int] | torch.Tensor, feats: Sequence[torch.Tensor], keys: Sequence | None = None) -> None:
        """``feats``: per-layer (b, C, h, w) (or (C, h, w) for one image) features of ``index``;
        ``keys``: the images' content hashes (``image_key`` or a file digest)."""
        feats = [f if f.dim() == 4 else f.unsqueeze(0) for f in feats]
        rows = flatten_unit_features(feats, self.eps).to("cpu")
        if self.V is None:
            self.V = torch.empty(self.n, rows.shape[1], dtype=torch.float32)
            self.scale = column_scale([f.shape for f in feats], self.weights)
        elif rows.shape[1] != self.V.shape[1]:
            raise ValueError("all images must have the same size (use resize)")
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        self.V[idx] = rows
        self.filled[idx] = True
        if keys is not None:
            for i, k in zip(idx.tolist(), keys):
                self.keys[i] = k

    def same(self) -> torch.Tensor | None:
        """Content ids of the rows (``content_ids``), or None unless every row has a key."""
        return None if any(k is None for k in self.keys) else content_ids(self.keys)


@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    old_p = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        torch.set_float32_matmul_precision(old_p)


def _default_block(n: int, k: int, device: torch.device) -> int:
    budget = (512 if device.type == "cuda" else 256) * 1024**2  # bytes of one row block of V
    return int(max(16, min(n, budget // max(1, 4 * k), 4096)))


def gram_distances(
    V: torch.Tensor,
    scale: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    block_size: int | None = None,
    out: np.ndarray | torch.Tensor | None = None,
    clamp: bool = True,
    same: torch.Tensor | None = None,
) -> torch.Tensor | np.ndarray:
    """(N, N) distances from (N, K) rows ``V`` and the (K,) column scale, block by block.

    ``out`` may be a preallocated (N, N) float32 array (e.g. ``numpy.memmap`` when the matrix does
    not fit in memory); it is filled and returned. ``same``: (N,) content ids (``content_ids``);
    images with equal ids are bitwise equal and their distance is exactly 0, as on the diagonal.
    """
    n, k = V.shape
    dev = torch.device(device) if device is not None else V.device
    bs = int(block_size or _default_block(n, k, dev))
    V = V.float()
    s = scale.to(torch.float32)
    A = (V.double() ** 2 * s.double()).sum(1)  # (N,) float64
    if out is None:
        out = torch.empty(n, n, dtype=torch.float32)
    as_np = isinstance(out, np.ndarray)
    s_dev = s.to(dev)
    with torch.inference_mode(), _no_tf32():
        for i0 in range(0, n, bs):
            i1 = min(n, i0 + bs)
            Vi = V[i0:i1].to(dev, non_blocking=True)
            Ui = Vi * s_dev
            for j0 in range(i0, n, bs):
                j1 = min(n, j0 + bs)
                Vj = Vi if j0 == i0 else V[j0:j1].to(dev, non_blocking=True)
                G = (Ui @ Vj.T).to("cpu", torch.float64)
                D = A[i0:i1, None] + A[None, j0:j1] - 2.0 * G
                if j0 == i0:
                    D = 0.5 * (D + D.T)
                    D.fill_diagonal_(0.0)
                if same is not None:
                    D[same[i0:i1, None] == same[None, j0:j1]] = 0.0
                if clamp:
                    D.clamp_(min=0.0)
                D32 = D.to(torch.float32)
                if as_np:
                    out[i0:i1, j0:j1] = D32.numpy()
                    if j0 != i0:
                        out[j0:j1, i0:i1] = D32.T.numpy()
                else:
                    out[i0:i1, j0:j1] = D32
                    if j0 != i0:
                        out[j0:j1, i0:i1] = D32.T
    return out


def pair_distances(
    V: torch.Tensor, scale: torch.Tensor, i: torch.Tensor, j: torch.Tensor, *, chunk: int = 4096,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distances of selected pairs ``(i[k], j[k])`` directly as ``sum_k s_k (v_i - v_j)^2``
    (float64); exactly 0 where ``same`` (content ids, see ``gram_distances``) match."""
    i = torch.as_tensor(i, dtype=torch.long)
    j = torch.as_tensor(j, dtype=torch.long)
    s = scale.double()
    out = torch.empty(len(i), dtype=torch.float64)
    for lo in range(0, len(i), chunk):
        d = (V[i[lo : lo + chunk]] - V[j[lo : lo + chunk]]).double()
        out[lo : lo + chunk] = (d * d * s).sum(1)
    if same is not None:
        out[same[i] == same[j]] = 0.0
    return out


def content_ids(keys: Sequence) -> torch.Tensor:
    """(N,) int64 ids, equal exactly where ``keys`` (content hashes, or any hashable) are equal."""
    first: dict = {}
    return torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)


def image_key(x: torch.Tensor | np.ndarray) -> str:
    """A content hash of one image's values (bitwise-equal images, equal keys): the file digest
    (``data.file_digest``) of its bytes, dtype and shape."""
    from .data import file_digest

    a = x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)
    return file_digest(a.tobytes() + str((a.dtype, a.shape)).encode())


def weights_nonneg(weights) -> bool:
    """True when every channel weight is >= 0 (then distances are clamped at 0)."""
    return all(w is None or bool((w >= 0).all()) for w in weights)


def sample_pairs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k distinct unordered pairs (i < j) of range(n), sorted, reproducible from ``seed``."""
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if 2 * k >= total:
        flat = np.sort(rng.choice(total, size=k, replace=False))
    else:
        chosen: set[int] = set()
        while len(chosen) < k:
            for v in rng.integers(0, total, size=2 * (k - len(chosen))).tolist():
                chosen.add(v)
                if len(chosen) == k:
                    break
        flat = np.array(sorted(chosen), dtype=np.int64)
    # flat index -> (i, j) in row-major upper-triangle order
    i = (n - 2 - np.floor(np.sqrt(-8 * flat + 4 * n * (n - 1) - 7) / 2.0 - 0.5)).astype(np.int64)
    j = (flat + i + 1 - n * (n - 1) // 2 + (n - i) * ((n - i) - 1) // 2).astype(np.int64)
    return i, j


def _as_batches(images, normalize: bool, batch_size: int):
    """Yield (start, float tensor (b,3,H,W) in [-1,1]) from the accepted image inputs."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images: expected (N, 3, H, W), got shape {tuple(images.shape)}")
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo : lo + batch_size]
            if x.dtype == torch.uint8:
                x = x.float() / 127.5 - 1.0
            elif normalize:
                x = 2 * x - 1
            yield lo, x
        return
    raise TypeError


def all_pairs(
    images,
    net: str = "alex",
    version: str = "0.1",
    *,
    model=None,
    lpips: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    block_size: int | None = None,
    normalize: bool = False,
    resize=None,
    workers: int = 0,
    cache=None,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """LPIPS between all pairs of ``images``: an (N, N) float32 CPU tensor, symmetric, zero diagonal.

    ``images``: an (N, 3, H, W) float tensor in [-1, 1] (``normalize=True`` for [0, 1]), an
    (N, 3, H, W) uint8 tensor, a list of HxWx3 uint8 arrays, a list of image files or a
    directory (every image under it, sorted; see ``data.list_images``). All images must have the
    same size (``resize='HxW'`` resizes files). Files that cannot be decoded raise ValueError
    (use the CLI's ``allpairs`` for error rows). ``model`` (a ready ``lpips_fast.LPIPS``)
    overrides ``net``/``version``/``lpips``; models built from them are kept for later calls.
    ``cache``: a feature-cache directory (files only). Each image goes through the trunk once;
    the pairs cost one blockwise GEMM (``block_size`` rows at a time). Values match pairwise
    LPIPS within 1e-5.
    """
    from .features import FeatureSource
    from .options import EvalOptions, resolve_device

    opts = EvalOptions(net=net, version=version, lpips=lpips, model=model, device=device, dtype=dtype, batch_size=batch_size,
                       workers=workers, resize=resize, cache=cache).validate()
    src = FeatureSource.from_options(opts, resolve_device(device, model))
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        from .data import list_images

        root = os.fspath(images)
        images = [os.path.join(root, p) for p in list_images(root)]
    weights = src.model.lin_weights()
    if isinstance(images, torch.Tensor):
        rows = _rows_from_tensor(src, images, normalize, batch_size, weights)
    else:
        items = list(images)
        if items and isinstance(items[0], np.ndarray):
            rows = _rows_from_arrays(src, items, batch_size, weights)
        else:
            rows = _rows_from_files(src, [os.fspath(p) for p in items], weights)
    if rows.n == 0:
        return torch.zeros(0, 0)
    return gram_distances(
        rows.V, rows.scale, device=src.device, block_size=block_size, out=out, clamp=weights_nonneg(weights), same=rows.same()
    )


def _rows_from_tensor(src, images: torch.Tensor, normalize: bool, batch_size: int, weights) -> FeatureRows:
    rows = FeatureRows(images.shape[0] if images.dim() == 4 else 0, weights)
    with torch.inference_mode():
        for lo, x in _as_batches(images, normalize, batch_size):
            x = x.to(src.device, src.dtype)
            if min(x.shape[-2:]) < src.min_size:
                raise ValueError(
                    f"images: {x.shape[-2]}x{x.shape[-1]} is smaller than the {src.net} trunk's minimum of {src.min_size} pixels"
                )
            rows.add(range(lo, lo + x.shape[0]), src.model.features(x), [image_key(im) for im in x])
    return rows


def _rows_from_arrays(src, items: list, batch_size: int, weights) -> FeatureRows:
    from .data import Decoded

    n = len(items)
    rows = FeatureRows(n, weights)
    decs = [Decoded(array=np.ascontiguousarray(a, dtype=np.uint8)) for a in items]
    sizes = {d.hw for d in decs}
    if len(sizes) > 1:
        raise ValueError(f"images: all images must have the same size, got {sorted(sizes)}")
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            chunk = decs[lo : lo + batch_size]
            rows.add(range(lo, lo + len(chunk)), src.features(chunk), [image_key(d.array) for d in chunk])
    return rows


def _rows_from_files(src, files: list[str], weights) -> FeatureRows:
    rows = FeatureRows(len(files), weights)
    size = None
    for idx, d, f in src.image_features(files, range(len(files))):
        if isinstance(f, str):
            raise ValueError(f"{files[idx]}: {f}")
        if size is None:
            size = d.hw
        elif d.hw != size:
            raise ValueError(f"{files[idx]}: size {d.hw[0]}x{d.hw[1]} differs from {size[0]}x{size[1]} (use resize='HxW')")
        rows.add([idx], f, [d.digest])
    return rows
