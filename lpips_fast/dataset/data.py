"""File discovery, decoding in DataLoader workers, error rows and size bucketing.

Everything here works on files and uint8 arrays; nothing here knows about the trunk or the
distance op. Decoding never raises: a file that cannot be scored becomes a ``Decoded`` with an
``error`` string, which the evaluation layer turns into an error row.

Decoding rules (documented in the README):

- Only regular files are opened (a FIFO, socket or device named ``x.png`` is an error, never a
  hang); symlinks to files are followed.
- Pillow decodes every file; an EXIF orientation tag is applied (``ImageOps.exif_transpose``, as
  the reference's OpenCV ``load_image`` does), so a rotated photo and its upright copy match;
  grayscale, palette, CMYK and RGBA images are converted to RGB with ``Image.convert("RGB")``
  (alpha is dropped, not composited); 16-bit grayscale is scaled to 8 bits (``/ 257``), not clipped.
- ``resize=(H, W)`` resizes with Pillow's bicubic filter after the RGB conversion.
- An image with more pixels than ``max_pixels`` (default: Pillow's ``Image.MAX_IMAGE_PIXELS``,
  89,478,485) is a decompression-bomb error; Pillow itself only warns there and refuses at twice that.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..images import exif_orientation, upright

__all__ = [
    "IMAGE_EXTENSIONS",
    "PILLOW_MAX_IMAGE_PIXELS",
    "Decoded",
    "list_images",
    "parse_resize",
    "decode_bytes",
    "decode_file",
    "PairSpec",
    "PairDataset",
    "ImageDataset",
    "iter_windows",
    "bucket_by_size",
    "to_model_input",
    "read_regular_file",
    "NotARegularFile",
    "upright",
    "exif_orientation",
    "stop_with_parent",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
)


def _pillow_default_max_pixels() -> int:
    try:
        from PIL import Image

        return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485
    except Exception:  # pragma: no cover - Pillow is a dependency
        return 89_478_485


#: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) at import time.
PILLOW_MAX_IMAGE_PIXELS = _pillow_default_max_pixels()


@dataclass
class Decoded:
    """One decoded image: an HxWx3 uint8 RGB array and a content hash, or an error reason."""

    array: np.ndarray | None = None
    digest: str | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (H, W), kept when the array is dropped
    path: str | None = None  # where it came from (to decode later when decoding was skipped)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def hw(self) -> tuple[int, int] | None:
        if self.array is not None:
            return (int(self.array.shape[0]), int(self.array.shape[1]))
        return self.size

    def drop_pixels(self) -> None:
        """Free the pixels once features exist (the size stays known)."""
        self.size = self.hw
        self.array = None


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the image files under ``root`` (recursive, sorted, hidden skipped).

    A file counts as an image by its extension (case-insensitive, ``IMAGE_EXTENSIONS``); its
    content is only checked when it is decoded. Symlinked folders are followed and listed under
    the names the user sees (an alias next to its target lists the files under both names); only
    a folder that is its own ancestor (a symlink loop) is skipped.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a directory")
    st = os.stat(root)
    out = []
    stack = [(root, "", frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        path, rel, ancestors = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            name = f"{rel}/{e.name}" if rel else e.name
            if is_dir:
                try:
                    ds = os.stat(e.path)
                except OSError:
                    continue
                key = (ds.st_dev, ds.st_ino)
                if key not in ancestors:
                    stack.append((e.path, name, ancestors | {key}))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(name)
    out.sort()
    return out


_RESIZE_RE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


def parse_resize(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"HxW"`` (or ``"N"`` for a square, or a 2-sequence) -> ``(H, W)``; ValueError otherwise."""
    if text is None:
        return None
    if not isinstance(text, str):
        h, w = (int(v) for v in text)
    else:
        m = _RESIZE_RE.match(text)
        if m:
            h, w = int(m.group(1)), int(m.group(2))
        elif text.strip().isdigit():
            h = w = int(text)
        else:
            raise ValueError(f"resize: got {text!r}, expected HxW such as 256x256")
    if h <= 0 or w <= 0:
        raise ValueError(f"resize: got {h}x{w}, both sides must be positive")
    return h, w


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def decode_bytes(
    data: bytes,
    *,
    resize: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    digest: str | None = None,
) -> Decoded:
    """Decode encoded image bytes to an HxWx3 uint8 RGB array; errors become ``Decoded.error``."""
    from PIL import Image

    limit = PILLOW_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses at twice that: refuse at the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = limit
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    if w * h > limit:
                        raise Image.DecompressionBombError(f"{w}x{h}")
                    im.load()
                    rgb = _to_rgb(upright(im))
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            size = f"{w}x{h} = {w * h} pixels"
        except Exception:
            size = "too many pixels"
        return Decoded(error=f"decompression bomb: {size} exceeds the limit of {limit} pixels (Pillow's MAX_IMAGE_PIXELS; see --max-pixels)")
    except Image.UnidentifiedImageError:
        return Decoded(error="not an image: Pillow cannot identify the file format")
    except Exception as e:  # truncated, corrupt, unsupported mode...
        return Decoded(error=f"decode error: {type(e).__name__}: {_one_line(e)}")
    if resize is not None:
        h, w = resize
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(rgb, dtype=np.uint8)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    return Decoded(array=arr, digest=digest)


def _to_rgb(im):
    """Pillow image -> RGB. 16-bit grayscale (``I;16*``, or ``I`` holding 0..65535) is scaled to
    8 bits (``/ 257``) instead of Pillow's clipping; every other mode uses ``convert("RGB")``."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        hi = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or hi > 255:
            a = a / 257.0
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")


def file_digest(data: bytes) -> str:
    """Content hash of a file's bytes (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class NotARegularFile(OSError):
    """The path names a FIFO, socket, device or folder: never read (a FIFO would block forever)."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "unknown kind")
        raise NotARegularFile(f"not a regular file ({kind})")


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (symlinks followed). Opened non-blocking and checked with
    ``fstat`` before reading, so a FIFO or device is refused (NotARegularFile), never waited on."""
    _require_regular(os.stat(path).st_mode)  # sockets cannot even be opened: name them first
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(os.fstat(fd).st_mode)  # what was opened, should the path have changed
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def decode_file(
    path: str | os.PathLike | None,
    *,
    resize: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    missing: str | None = None,
    probe=None,
) -> Decoded:
    """Read and decode one file; a missing/unreadable file or a bad image is an error, never raised.

    ``probe(digest, (H, W)) -> bool``: when it says the file's features are cached, the pixels
    are not decoded (``Decoded.array`` is None, ``size`` and ``digest`` are set).
    """
    if path is None:
        return Decoded(error=missing or "missing file")
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        return Decoded(error=missing or "missing file")
    except NotARegularFile as e:
        return Decoded(error=f"unreadable: {e}")
    except OSError as e:
        return Decoded(error=f"unreadable: {type(e).__name__}: {_one_line(e.strerror or e)}")
    if not data:
        return Decoded(error="empty file")
    digest = file_digest(data)
    if probe is not None:
        hw = _cached_size(data, digest, resize, max_pixels, probe)
        if hw is not None:  # the features are in the cache: skip decoding the pixels
            return Decoded(digest=digest, size=hw, path=os.fspath(path))
    d = decode_bytes(data, resize=resize, max_pixels=max_pixels, digest=digest)
    d.path = os.fspath(path)
    return d


def _cached_size(data: bytes, digest: str, resize, max_pixels, probe) -> tuple[int, int] | None:
    """(H, W) the decoded image would have, if ``probe(digest, (H, W))`` says it is cached."""
    from PIL import Image

    limit = PILLOW_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:  # header only
                w, h = im.size
                if exif_orientation(im) in (5, 6, 7, 8):  # rotated by 90 degrees once upright
                    w, h = h, w
    except Exception:
        return None
    if w * h > limit:
        return None  # let the full decode report the bomb
    hw = tuple(resize) if resize is not None else (h, w)
    try:
        return hw if probe(digest, hw) else None
    except Exception:
        return None


# -- datasets --------------------------------------------------------------------------------

#: Marker for a pair side that is the fixed reference image (decoded once by the caller).
REF = "\0ref"


@dataclass
class PairSpec:
    """One output row to produce: display keys, the files behind them, or a known error."""

    key0: str
    key1: str
    file0: str | None
    file1: str | None
    error: str | None = None


class _DecodeOpts:
    def __init__(self, resize, max_pixels, probe=None):
        self.resize = resize
        self.max_pixels = max_pixels
        self.probe = probe


class PairDataset:
    """Map-style dataset over ``specs[indices]``: item -> ``(index, Decoded0, Decoded1)``.

    A side whose file is ``REF`` yields ``None`` (the caller holds the reference). A spec with a
    known ``error`` is not decoded at all.
    """

    def __init__(self, specs: Sequence[PairSpec], indices: Sequence[int], resize=None, max_pixels=None, probe=None):
        self.specs = specs
        self.indices = list(indices)
        self.opts = _DecodeOpts(resize, max_pixels, probe)

    def __len__(self) -> int:
        return len(self.indices)

    def _side(self, path: str | None, key: str) -> Decoded | None:
        if path == REF:
            return None
        return decode_file(path, resize=self.opts.resize, max_pixels=self.opts.max_pixels, probe=self.opts.probe)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        s = self.specs[idx]
        if s.error is not None:
            return idx, None, None
        return idx, self._side(s.file0, s.key0), self._side(s.file1, s.key1)


class ImageDataset:
    """Map-style dataset over image files: item -> ``(index, Decoded)``."""

    def __init__(self, files: Sequence[str], indices: Sequence[int], resize=None, max_pixels=None, probe=None):
        self.files = files
        self.indices = list(indices)
        self.opts = _DecodeOpts(resize, max_pixels, probe)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        return idx, decode_file(self.files[idx], resize=self.opts.resize, max_pixels=self.opts.max_pixels, probe=self.opts.probe)


def _as_list(batch):
    return list(batch)


def iter_windows(dataset, window: int, workers: int = 0, prefetch: int = 2) -> Iterator[list]:
    """Decoded items of ``dataset`` in order, ``window`` at a time, decoded in DataLoader workers.

    ``workers=0`` decodes in the calling process (no DataLoader machinery at all).
    """
    window = max(1, int(window))
    n = len(dataset)
    if workers <= 0 or n == 0:
        for lo in range(0, n, window):
            yield [dataset[i] for i in range(lo, min(n, lo + window))]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=window,
        shuffle=False,
        num_workers=min(int(workers), max(1, -(-n // window))),
        collate_fn=_as_list,
        prefetch_factor=prefetch,
        persistent_workers=False,
        worker_init_fn=stop_with_parent,
    )
    yield from loader


def stop_with_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker is killed when its parent dies (SIGKILL, SIGTERM,
    a crash), so no decoding process outlives the run holding pipes open. Linux: the kernel's
    ``PR_SET_PDEATHSIG``; elsewhere a daemon thread polls the parent's pid once a second."""
    import multiprocessing
    import signal
    import sys
    import threading
    import time

    parent = multiprocessing.parent_process()
    ppid = parent.pid if parent is not None else os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != ppid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:

        def watch():
            while os.getppid() == ppid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="lpips-fast-parent-watch", daemon=True).start()


def bucket_by_size(items, key) -> dict[tuple, list]:
    """Group ``items`` by ``key(item)`` (e.g. the image size), keeping the input order per group."""
    out: dict[tuple, list] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


_LUT = None


def to_model_input(arrays: Sequence[np.ndarray], device, dtype):
    """Stack HxWx3 uint8 arrays into an (N,3,H,W) tensor in [-1, 1] on ``device``.

    uint8 travels to the device (4x fewer bytes than float32); the conversion uses a 256-entry
    table equal to the reference's ``im2tensor`` (``x / 127.5 - 1`` in float64, then float32).
    """
    import torch

    global _LUT
    if _LUT is None:
        _LUT = torch.from_numpy((np.arange(256, dtype=np.float64) / 127.5 - 1.0).astype(np.float32))
    dev = torch.device(device)
    x = torch.from_numpy(np.stack(arrays))  # N,H,W,3 uint8
    if dev.type == "cuda":
        x = x.pin_memory().to(dev, non_blocking=True)
    else:
        x = x.to(dev)
    lut = _LUT.to(dev)
    out = lut.index_select(0, x.reshape(-1).to(torch.int32)).view(x.shape).permute(0, 3, 1, 2).contiguous()
    return out if dtype in (None, torch.float32) else out.to(dtype)
