"""Low-level helpers: hashing, the packaged manifest, deterministic safetensors files, errors.

Weight files are only ever read here (:func:`read_checkpoint`), as safetensors
(``safetensors.torch.load``) or, for torch checkpoints, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "DATA_DIR",
    "MANIFEST_PATH",
    "WeightsError",
    "WeightsNotFoundError",
    "WeightsIntegrityError",
    "sha256_bytes",
    "sha256_file",
    "content_sha256",
    "manifest",
    "tensors_to_bytes",
    "write_bytes_atomic",
    "load_safetensors_verified",
    "read_checkpoint",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST_PATH = DATA_DIR / "manifest.json"

_CHUNK = 1 << 20


class WeightsError(Exception):
    """Base class of the weight-handling errors."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No verified source for the requested weights; the message says what to run."""


class WeightsIntegrityError(WeightsError, ValueError):
    """A weight file does not hash to its expected sha256 (tampered or corrupt) or has the wrong content."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def content_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves, independent of the file format.

    Covers, for each key in sorted order: the key, the dtype, the shape and the raw
    little-endian bytes of the contiguous tensor. Two files with equal content hash hold the
    same numbers bit for bit.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0")
        h.update(repr(tuple(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@lru_cache(maxsize=1)
def _manifest_cached(mtime_ns: int) -> dict:
    with open(MANIFEST_PATH, "r", encoding="utf-8") as f:
        return json.load(f)


def manifest() -> dict:
    """The packaged manifest (``data/manifest.json``): sha256 of the shipped lin files and the
    pinned hashes of the converted trunks."""
    return _manifest_cached(MANIFEST_PATH.stat().st_mtime_ns)


def tensors_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise to safetensors deterministically: contiguous float32 CPU tensors, no free-form
    metadata beyond one fixed entry (safetensors orders the header itself by dtype and name)."""
    clean = {}
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(t).__name__}")
        clean[key] = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    return _st_save(clean, metadata={"format": "pt"})


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weight files are not secrets
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_safetensors_verified(path: str | os.PathLike, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory, check its sha256 (when given), then decode it.

    The bytes that are hashed are the bytes that are decoded (no re-read in between).
    """
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        got = sha256_bytes(data)
        if got != expected_sha256:
            raise WeightsIntegrityError(
                f"{path}: sha256 {got} does not match the expected {expected_sha256} "
                "(the file is corrupt or was modified)"
            )
    return _st_load(data)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch checkpoint read with
    ``torch.load(weights_only=True)`` (never a full pickle): the one weight-file reader.

    FileNotFoundError when ``path`` is not a file; ValueError when the file holds no mapping of
    names to tensors (a malicious pickle raises ``pickle.UnpicklingError``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} does not exist or is not a file")
    if p.suffix == ".safetensors":
        try:
            return _st_load(p.read_bytes())
        except Exception as e:  # safetensors' own error type is not an Exception subclass we can name
            raise ValueError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    obj = torch.load(os.fspath(p), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)
