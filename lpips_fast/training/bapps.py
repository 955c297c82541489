"""BAPPS-format datasets: 2AFC triplets and JND pairs on disk, decoded in worker processes.

The on-disk layout is the one the LPIPS paper's data uses (BAPPS):

- 2AFC folder: ``ref/``, ``p0/``, ``p1/`` (images) and ``judge/`` (one ``.npy`` per triplet,
  the fraction of people who preferred ``p1``).
- JND folder: ``p0/``, ``p1/`` (images) and ``same/`` (one ``.npy`` per pair, the fraction of
  people who judged the two images the same).

Files pair up by their path relative to the sub-folder with the extension removed
(``ref/000012.png`` + ``p0/000012.png`` + ``p1/000012.png`` + ``judge/000012.npy``). A name present in
some sub-folders but not in others is an error that lists the names, never a silently shorter
dataset (the reference pairs files by their position in sorted lists instead).

Images are read with Pillow as RGB and, as the reference's loader does (torchvision
``Resize(load_size)`` on a PIL image), resized with Pillow's bilinear filter so that the shorter
side is ``load_size`` (no resize when it already is). Tensors are in [-1, 1] computed as
``(x / 255 - 0.5) / 0.5`` in float32, the reference's ``ToTensor`` + ``Normalize(0.5, 0.5)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "BappsError",
    "TwoAFCSet",
    "JNDSet",
    "open_2afc",
    "open_jnd",
    "read_rgb",
    "to_input",
    "iter_batches",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_LIST_LIMIT = 10


class BappsError(ValueError):
    """A dataset folder that does not have the BAPPS layout (message says what is wrong where)."""


def _as_dirs(dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    out = [os.fspath(d) for d in dirs]
    if not out:
        raise BappsError("dirs: got an empty list, expected one or more dataset folders")
    return out


def _list_stems(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    """Relative path without extension -> file path, for every file under ``folder`` with ``exts``."""
    found: dict[str, str] = {}
    dupes: list[str] = []
    for root, dirnames, files in os.walk(folder):
        dirnames.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            rel = os.path.relpath(os.path.join(root, stem), folder).replace(os.sep, "/")
            if rel in found:
                dupes.append(rel)
            found[rel] = os.path.join(root, name)
    if dupes:
        raise BappsError(
            f"{folder}: {len(dupes)} names have more than one file (e.g. {dupes[:_LIST_LIMIT]}); "
            "expected one file per name"
        )
    return found


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def _match(root: str, image_subs: Sequence[str], label_sub: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    if not os.path.isdir(root):
        raise BappsError(f"dataset folder {root!r} does not exist or is not a folder")
    subs = list(image_subs) + [label_sub]
    missing = [s for s in subs if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise BappsError(
            f"{root}: missing sub-folder(s) {missing}; a "
            f"{'2AFC' if label_sub == 'judge' else 'JND'} folder holds {', '.join(s + '/' for s in subs)}"
        )
    listing = {s: _list_stems(os.path.join(root, s), IMAGE_EXTENSIONS) for s in image_subs}
    listing[label_sub] = _list_stems(os.path.join(root, label_sub), (".npy",))
    every = set().union(*(set(v) for v in listing.values()))
    problems = []
    for s in subs:
        lacking = sorted(every - set(listing[s]))
        if lacking:
            what = ".npy file" if s == label_sub else "image"
            problems.append(f"{len(lacking)} names have no {what} in {s}/: {_names(lacking)}")
    if problems:
        raise BappsError(f"{root}: mismatched files; " + "; ".join(problems))
    if not every:
        raise BappsError(f"{root}: no files found in {', '.join(s + '/' for s in subs)}")
    return sorted(every), listing


def _read_label(path: str) -> float:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise BappsError(f"{path}: cannot read the .npy file ({exc})") from exc
    arr = np.asarray(arr)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        raise BappsError(f"{path}: expected one number in [0, 1], got an array of shape {arr.shape} dtype {arr.dtype}")
    # The reference reads it into a FloatTensor: the value is float32.
    v = float(np.float32(arr.reshape(())))
    if not 0.0 <= v <= 1.0:
        raise BappsError(f"{path}: expected a value in [0, 1], got {v}")
    return v


@dataclass
class TwoAFCSet:
    """Triplets (ref, p0, p1) with ``judge`` (fraction preferring p1), from one or more folders."""

    ref: list[str]
    p0: list[str]
    p1: list[str]
    judge: np.ndarray  # (N,) float32
    dataset: np.ndarray  # (N,) int: index into ``roots``
    roots: list[str]
    names: list[str] = field(default_factory=list)
    load_size: int = 64

    def __len__(self) -> int:
        return len(self.p0)

    def images(self, i: int) -> tuple[str, ...]:
        return (self.ref[i], self.p0[i], self.p1[i])


@dataclass
class JNDSet:
    """Pairs (p0, p1) with ``same`` (fraction who judged them the same), from one or more folders."""

    p0: list[str]
    p1: list[str]
    same: np.ndarray  # (N,) float32
    dataset: np.ndarray
    roots: list[str]
    names: list[str] = field(default_factory=list)
    load_size: int = 64

    def __len__(self) -> int:
        return len(self.p0)

    def images(self, i: int) -> tuple[str, ...]:
        return (self.p0[i], self.p1[i])


def _check_load_size(load_size: int) -> int:
    if isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < 1:
        raise ValueError(f"load_size: got {load_size!r}, expected a positive int (pixels of the shorter side)")
    return load_size


def _open(dirs, image_subs, label_sub, load_size):
    roots = _as_dirs(dirs)
    load_size = _check_load_size(load_size)
    rows = []
    for di, root in enumerate(roots):
        names, listing = _match(root, image_subs, label_sub)
        for name in names:
            rows.append((di, name, [listing[s][name] for s in image_subs], listing[label_sub][name]))
    # The reference's order: sorted file paths over all folders (keyed here on the first image).
    rows.sort(key=lambda r: r[2][0])
    labels = np.array([_read_label(r[3]) for r in rows], dtype=np.float32)
    cols = list(zip(*[r[2] for r in rows]))
    return roots, rows, cols, labels, load_size


def open_2afc(dirs: str | os.PathLike | Sequence[str | os.PathLike], load_size: int = 64) -> TwoAFCSet:
    """Index the 2AFC triplets of one or more BAPPS folders (raises ``BappsError`` on a bad layout)."""
    roots, rows, cols, labels, load_size = _open(dirs, ("ref", "p0", "p1"), "judge", load_size)
    return TwoAFCSet(
        ref=list(cols[0]), p0=list(cols[1]), p1=list(cols[2]), judge=labels,
        dataset=np.array([r[0] for r in rows], dtype=np.int64), roots=roots,
        names=[r[1] for r in rows], load_size=load_size,
    )


def open_jnd(dirs: str | os.PathLike | Sequence[str | os.PathLike], load_size: int = 64) -> JNDSet:
    """Index the JND pairs of one or more BAPPS folders (raises ``BappsError`` on a bad layout)."""
    roots, rows, cols, labels, load_size = _open(dirs, ("p0", "p1"), "same", load_size)
    return JNDSet(
        p0=list(cols[0]), p1=list(cols[1]), same=labels,
        dataset=np.array([r[0] for r in rows], dtype=np.int64), roots=roots,
        names=[r[1] for r in rows], load_size=load_size,
    )


def read_rgb(path: str | os.PathLike, load_size: int | None = 64) -> np.ndarray:
    """HxWx3 uint8 RGB; the shorter side resized to ``load_size`` with Pillow bilinear (None: as is).

    The output size follows torchvision's ``Resize(int)``: short side ``load_size``, long side
    ``int(load_size * long / short)``.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if load_size is not None:
                w, h = im.size
                short, long = (w, h) if w <= h else (h, w)
                if short != load_size:
                    new_long = int(load_size * long / short)
                    size = (load_size, new_long) if w <= h else (new_long, load_size)
                    im = im.resize(size, Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError as exc:
        raise BappsError(f"{os.fspath(path)}: cannot decode the image ({exc})") from exc


def to_input(images: np.ndarray):
    """(N,H,W,3) uint8 -> (N,3,H,W) float32 in [-1, 1]: ``(x / 255 - 0.5) / 0.5`` as the reference."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
    return x.sub(0.5).div(0.5).contiguous()


class _Decoder:
    """Map-style dataset for DataLoader workers: index -> (index, stacked uint8 images)."""

    def __init__(self, items: list[tuple[str, ...]], load_size: int) -> None:
        self.items = items
        self.load_size = load_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        imgs = [read_rgb(p, self.load_size) for p in self.items[i]]
        shapes = {a.shape for a in imgs}
        if len(shapes) != 1:
            raise BappsError(
                f"images of one row differ in size after resizing to {self.load_size}: "
                + ", ".join(f"{p} {a.shape[1]}x{a.shape[0]}" for p, a in zip(self.items[i], imgs))
            )
        return i, np.stack(imgs)


def _collate(batch):
    return batch


def iter_batches(
    dataset: TwoAFCSet | JNDSet,
    batch_size: int = 50,
    indices: Sequence[int] | None = None,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decoded rows in order: ``(indices (B,), images (K,B,H,W,3) uint8)``, K = 3 (2AFC) or 2 (JND).

    ``workers > 0`` decodes in that many DataLoader worker processes. A batch whose rows differ in
    size (folders with different image sizes) is split into runs of equal size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}, expected a positive int")
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    dec = _Decoder([dataset.images(i) for i in idx], dataset.load_size)
    n = len(dec)
    if workers and workers > 0 and n > batch_size:
        from torch.utils.data import DataLoader

        loader = DataLoader(dec, batch_size=batch_size, shuffle=False, collate_fn=_collate,
                            num_workers=min(int(workers), -(-n // batch_size)))
        chunks = iter(loader)
    else:
        chunks = ([dec[j] for j in range(lo, min(n, lo + batch_size))] for lo in range(0, n, batch_size))
    for chunk in chunks:
        run: list = []
        for j, arr in chunk:
            if run and run[-1][1].shape != arr.shape:
                yield _emit(run, idx)
                run = []
            run.append((j, arr))
        if run:
            yield _emit(run, idx)


def _emit(run, idx):
    rows = np.array([idx[j] for j, _ in run], dtype=np.int64)
    imgs = np.stack([a for _, a in run], axis=1)  # K,B,H,W,3
    return rows, imgs
