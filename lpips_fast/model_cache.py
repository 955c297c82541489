"""The LPIPS module a dataset-scale run evaluates with: built from ``EvalOptions``, kept per
configuration so that repeated ``evaluate_*`` / ``all_pairs`` calls reuse one model.

Weight files are read once each with ``lpips_fast.weights.read_checkpoint``; a file that cannot
be read raises ``OptionError`` naming the option (``state_dict``, ``trunk`` or ``lin``).
Cached models are frozen (eval mode, no parameter gradients) and keyed by everything they depend
on, including the size and modification time of the weight files.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING

import torch

from .errors import OptionError

if TYPE_CHECKING:
    from .dataset.options import EvalOptions

__all__ = ["build_model", "shared_model", "model_fingerprint", "model_fingerprint_cached", "lin_identity", "clear"]

_models: dict[tuple, torch.nn.Module] = {}
_fingerprints: dict[int, str] = {}
_lock = threading.Lock()


def _read(option: str, path: str) -> dict[str, torch.Tensor]:
    from .weights import read_checkpoint

    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise OptionError(f"{option}: {path} does not exist (expected a weights file)") from None
    except Exception as e:  # not a checkpoint, a refused pickle, not a mapping of tensors...
        why = " ".join(str(e).split())
        why = why if len(why) <= 160 else why[:160] + "..."
        raise OptionError(
            f"{option}: {path} is not a readable weights file ({type(e).__name__}: {why}); "
            "expected .safetensors or a torch state dict"
        ) from None


def _load_trunk(model, path: str) -> None:
    sd = _read("trunk", path)
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    if not feats:
        raise OptionError(f"trunk: {path}: no torchvision-format trunk weights ('features.N.weight'; got {sorted(sd)[:4]}...)")
    try:
        model.net.load_torchvision_features(feats)
    except Exception as e:
        raise OptionError(f"trunk: {path}: {' '.join(str(e).split())} (expected the {model.pnet_type} trunk's weights)") from None


def _load_lin(model, path: str) -> None:
    if not os.path.isfile(path):  # a registered set (options.validate() checked it resolves)
        from .weights import registry

        try:
            sd, _ = registry.lin_state_dict_for(path, model.pnet_type, model.version)
        except Exception as e:
            raise OptionError(f"lin: {path}: {' '.join(str(e).split())[:300]}") from None
    else:
        sd = _read("lin", path)
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    if not lin:
        raise OptionError(f"lin: {path}: holds no lin{{k}}.model.1.weight keys (got {sorted(sd)[:4]}...; expected LPIPS lin weights)")
    try:
        missing, _ = model.load_state_dict(lin, strict=False)
    except RuntimeError as e:
        raise OptionError(f"lin: {path}: {' '.join(str(e).split())[:300]} (expected lin weights for {model.pnet_type})") from None
    missing = set(missing)
    for k in range(len(model.chns)):
        if f"lin{k}.model.1.weight" in missing and f"lins.{k}.model.1.weight" in missing:
            raise OptionError(f"lin: {path}: lacks lin{k}.model.1.weight (expected lin weights for {model.pnet_type})")


def build_model(
    net: str = "alex",
    version: str = "0.1",
    *,
    model=None,
    lpips: bool = True,
    state_dict: str | None = None,
    trunk: str | None = None,
    lin: str | None = None,
    random_trunk: bool = False,
    seed: int = 0,
):
    """A new LPIPS module in eval mode (``model``, when given, is returned as is).

    ``state_dict``: a complete LPIPS state dict with the reference's keys, loaded strictly.
    ``trunk``/``lin``: explicit trunk (torchvision format) and lin weight files. ``random_trunk``:
    an untrained trunk drawn from ``seed`` (testing), with the packaged lin weights.
    """
    if model is not None:
        return model
    from .model import LPIPS

    if state_dict is not None:
        sd = _read("state_dict", state_dict)
        m = LPIPS(pretrained=False, net=net, version=version, lpips=lpips, pnet_rand=True)
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            raise OptionError(f"state_dict: {state_dict}: {' '.join(str(e).split())[:300]} (expected a complete {net} LPIPS state dict)") from None
        return m.eval()
    if random_trunk:
        torch.manual_seed(seed)
        m = LPIPS(pretrained=lin is None and lpips, net=net, version=version, lpips=lpips, pnet_rand=True)
    else:
        m = LPIPS(pretrained=lin is None and lpips, net=net, version=version, lpips=lpips, pnet_rand=trunk is not None)
    if trunk is not None:
        _load_trunk(m, trunk)
    if lin is not None and lpips:
        _load_lin(m, lin)
    return m.eval()


def lin_identity(lin: str) -> str:
    """What a ``lin`` option names: the absolute path of a weights file, or ``NAME@N sha256:...``
    for a set in ``lpips_fast.weights.registry`` (so a resumed run sees a re-registered name change).
    OptionError when it is neither."""
    if os.path.isfile(lin):
        return os.path.abspath(os.fspath(lin))
    from .weights import registry

    try:
        entry = registry.resolve(os.fspath(lin))
    except Exception as e:
        raise OptionError(
            f"lin: {lin} is neither a weights file nor a registered lin set ({' '.join(str(e).split())[:200]}); "
            "expected a .safetensors/.pth file or a name from `lpips-fast weights list`"
        ) from None
    return f"{entry.spec} sha256:{entry.sha256 or 'packaged'}"


def _file_key(path: str | None) -> tuple | None:
    if path is None:
        return None
    if not os.path.isfile(path):  # a registered lin set: its name, number and hash
        return (lin_identity(path),)
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def shared_model(options: EvalOptions, device: torch.device, dtype: torch.dtype):
    """The frozen model of ``options`` on ``device``/``dtype``, built once per configuration.

    ``options.model`` (a caller's module) is never cached, moved or cast: it is returned when it
    already sits on ``device``/``dtype`` in eval mode, else a frozen copy is made.
    """
    if options.model is not None:
        return on_device(options.model, device, dtype)
    try:
        files = tuple(_file_key(p) for p in (options.state_dict, options.trunk, options.lin))
    except OSError as e:
        raise OptionError(f"weights file: {e}") from None
    key = (options.net, options.version, bool(options.lpips), options.random_trunk, options.seed if options.random_trunk else None,
           files, str(device), dtype)
    with _lock:
        m = _models.get(key)
        if m is None:
            m = build_model(options.net, options.version, lpips=options.lpips, state_dict=options.state_dict, trunk=options.trunk,
                            lin=options.lin, random_trunk=options.random_trunk, seed=options.seed)
            m = m.to(device=device, dtype=dtype).eval().requires_grad_(False)
            _models[key] = m
        return m


def on_device(model, device: torch.device | None, dtype: torch.dtype):
    """``model`` in eval mode on ``device``/``dtype``: itself when it is already there, else a copy
    (the caller's module is never moved, cast or switched to eval)."""
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    ps = list(model.parameters()) + list(model.buffers())
    same = all(
        p.device.type == device.type and (device.index is None or p.device.index == device.index) and p.dtype == dtype
        for p in ps
    )
    if same and not model.training:
        return model
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def model_fingerprint(model) -> str:
    """Hash of what the trunk features depend on: trunk weights, net and the scaling version."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{getattr(model, 'pnet_type', '')}|{getattr(model, 'version', '')}".encode())
    for name, t in sorted(model.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint_cached(model) -> str:
    """``model_fingerprint(model)``, computed once for the cached (frozen) models."""
    with _lock:
        frozen = any(m is model for m in _models.values())
        if frozen and id(model) in _fingerprints:
            return _fingerprints[id(model)]
    fp = model_fingerprint(model)
    if frozen:
        with _lock:
            _fingerprints[id(model)] = fp
    return fp


def clear() -> None:
    """Forget the cached models."""
    with _lock:
        _models.clear()
        _fingerprints.clear()
