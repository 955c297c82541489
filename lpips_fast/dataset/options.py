"""``EvalOptions``: every setting of a dataset-scale run in one object, and its validation.

The ``evaluate_*`` functions, ``all_pairs``, the all-pairs evaluation and the CLI all build one
``EvalOptions`` and pass it down. ``OptionError`` is a bad setting: it names the option, what was
given and what is expected (the CLI prints it as one line and exits with status 2).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import OptionError
from ..model_cache import lin_identity
from ..paths import writable_dir

__all__ = [
    "EvalOptions", "OptionError", "parse_dtype", "DTYPES", "resolve_device", "check_device", "check_cache_dir",
    "check_cache_max_bytes", "lin_identity", "default_workers",
]  # fmt: skip


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}



def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch floating dtype from a dtype or one of ``DTYPES``' names; None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise OptionError(f"dtype: got {dtype}, expected torch.float32, torch.float16 or torch.bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise OptionError(f"dtype: got {dtype!r}, expected 'float32', 'float16' or 'bfloat16'")


def check_device(device: str | torch.device | None, option: str = "device") -> None:
    """Only the CPU and CUDA devices that exist here are accepted (mps, meta, xla... are not)."""
    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise OptionError(f"{option} {device}: {' '.join(str(e).split())} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise OptionError(f"{option} {device}: device type {dev.type!r} is not supported (expected cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise OptionError(f"{option} {device}: CUDA is not available here (expected cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) (expected cuda:0..cuda:{torch.cuda.device_count() - 1})")


def default_workers() -> int:
    """Decoding processes when none are asked for: one per spare CPU, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def resolve_device(device, model=None) -> torch.device | None:
    """``device`` if given; else None when a ready model is given (its own device); else CUDA when
    available, otherwise the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if model is not None:
        return None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EvalOptions:
    """Settings of a dataset-scale run (model, device, decoding, batching, cache).

    Model: ``net``, ``version``, ``lpips``, or a ready ``model`` (``lpips_fast.LPIPS``, used as
    is); ``state_dict`` (a complete LPIPS state dict), ``trunk``/``lin`` (weight files),
    ``random_trunk`` with ``seed`` (an untrained trunk, for testing). ``device`` (None: the model's,
    else CUDA when available), ``dtype``; ``batch_size`` pairs per trunk batch (halved on
    out-of-memory); ``workers`` decoding processes (0: in this process); ``resize`` ('HxW' or
    (H, W)); ``max_pixels`` (decompression-bomb limit, default Pillow's); ``cache`` (feature-cache
    directory or ``FeatureCache``) and ``cache_max_bytes``; ``progress`` (tqdm bar);
    ``distributed`` (join torchrun's process group); ``engine`` (None: on CUDA without a cache)
    and ``compile`` (the Engine's torch.compile).
    """

    net: str = "alex"
    version: str = "0.1"
    lpips: bool = True
    model: Any = None
    state_dict: str | None = None
    trunk: str | None = None
    lin: str | None = None
    random_trunk: bool = False
    seed: int = 0
    device: Any = None
    dtype: Any = None
    batch_size: int = 32
    workers: int = 0
    resize: Any = None
    max_pixels: int | None = None
    cache: Any = None
    cache_max_bytes: int | None = None
    progress: bool = False
    distributed: bool = False
    engine: bool | None = None
    compile: bool = False
    extra: dict = field(default_factory=dict)  # command-specific settings recorded for --resume

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "EvalOptions":
        """The options the ``[model]`` and ``[eval]`` sections of ``settings`` describe
        (``lpips_fast.deploy.settings.load_settings()``; what the dataset commands read); ``overrides`` win.

        ``dtype`` auto is float32 and ``compile`` auto is off here (exact numbers by default);
        ``workers`` unset is ``default_workers()``; ``engine`` auto is None (on CUDA without a cache).
        """
        m, e = settings.section("model"), settings.section("eval")
        kwargs: dict[str, Any] = dict(
            net=m["net"], version=m["version"], dtype=None if m["dtype"] == "auto" else m["dtype"],
            state_dict=m["state_dict"], trunk=m["trunk"], lin=m["lin"], random_trunk=m["random_trunk"], seed=m["seed"],
            compile=m["compile"] == "on", device=e["device"], batch_size=e["batch_size"],
            workers=default_workers() if e["workers"] is None else e["workers"], resize=e["resize"],
            max_pixels=e["max_pixels"], cache=e["cache"], cache_max_bytes=e["cache_max_size"],
            engine={"auto": None, "on": True, "off": False}[e["engine"]],
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes) -> "EvalOptions":
        return replace(self, **changes)

    def validate(self) -> "EvalOptions":
        """Check every setting without loading anything; returns a normalised copy."""
        from .data import parse_resize
        from ..nets import canonical_net_name
        from ..weights import canonical_version

        try:
            net = canonical_net_name(self.net)
        except (ValueError, KeyError):
            raise OptionError(f"net: got {self.net!r}, expected 'alex', 'vgg' or 'squeeze'") from None
        try:
            version = canonical_version(self.version)
        except ValueError as e:
            raise OptionError(str(e)) from None
        dtype = parse_dtype(self.dtype)
        try:
            resize = parse_resize(self.resize)
        except (ValueError, TypeError) as e:
            raise OptionError(str(e)) from None
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError(f"batch_size: got {self.batch_size!r}, expected a positive integer")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise OptionError(f"workers: got {self.workers!r}, expected an integer >= 0")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels < 1):
            raise OptionError(f"max_pixels: got {self.max_pixels!r}, expected a positive integer")
        if resize is not None:
            from .data import PILLOW_MAX_IMAGE_PIXELS

            limit = PILLOW_MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels
            if resize[0] * resize[1] > limit:
                raise OptionError(
                    f"resize: {resize[0]}x{resize[1]} = {resize[0] * resize[1]} pixels exceeds max_pixels {limit} "
                    "(expected a smaller size, or raise max_pixels)"
                )
        check_cache_max_bytes(self.cache_max_bytes)
        check_device(self.device)
        for name in ("state_dict", "trunk"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise OptionError(f"{name}: {path} does not exist or is not a file (expected a weights file)")
        if self.lin is not None:
            lin_identity(self.lin)  # a weights file, or a set registered with `lpips-fast weights register`
        if self.cache is not None and isinstance(self.cache, (str, os.PathLike)):
            check_cache_dir(os.fspath(self.cache))
        return replace(self, net=net, version=version, dtype=dtype, resize=resize)

    def settings(self, command: str) -> dict:
        """What a resumed output must share with this run (JSON-ready; see ``RESUME_SETTINGS``)."""
        dtype = parse_dtype(self.dtype)
        s = {
            "command": command,
            "net": getattr(self.model, "pnet_type", None) or self.net,
            "version": getattr(self.model, "version", None) or self.version,
            "lpips": bool(getattr(self.model, "lpips", self.lpips)),
            "dtype": str(dtype).replace("torch.", ""),
            "resize": None if self.resize is None else "x".join(str(v) for v in self.resize),
            "trunk": _abs(self.trunk),
            "lin": None if self.lin is None else lin_identity(self.lin),
            "state_dict": _abs(self.state_dict),
            "random_trunk": bool(self.random_trunk),
            "seed": int(self.seed) if self.random_trunk else None,
        }
        from ..nets import canonical_net_name

        s["net"] = canonical_net_name(s["net"])
        s.update(self.extra)
        return s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def _abs(path) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))


def check_cache_max_bytes(value) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"cache_max_bytes: got {value}, expected a finite size such as 10G")
    if not isinstance(value, int) or value <= 0:
        raise OptionError(f"cache_max_bytes: got {value!r}, expected a positive size such as 10G or 500M")


def check_cache_dir(path: str, option: str = "cache") -> None:
    """A feature-cache folder must be a folder (or creatable) and writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"{option}: {path} is not a directory (expected a feature-cache folder)")
    probe_dir = path
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise OptionError(f"{option}: {path} cannot be created ({probe_dir} is not a directory)")
    if not writable_dir(probe_dir):
        raise OptionError(f"{option}: {path} is not writable (expected a folder this user can write)")
