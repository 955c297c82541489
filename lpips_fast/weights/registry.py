"""Named, versioned, hashed lin-weight sets: the metric versions a deployment can pin.

    from lpips_fast import registry
    registry.register("mine", "lin.pth", net="alex", version="0.1", note="fine-tuned on X")
    LPIPS(net="alex", lin="mine")        # the newest; "mine@1" pins the first registration

Two kinds of entries:

- packaged (read-only): ``alex-v0.1``, ``alex-v0.0``, ``vgg-v0.1``, ``vgg-v0.0``,
  ``squeeze-v0.1``, ``squeeze-v0.0`` -- the lpips 0.1.4 lin weights shipped with this package
  (verified against the package manifest);
- registered: ``$LPIPS_FAST_HOME/models/NAME/N.safetensors`` with ``N.json`` beside it (sha256 of
  the safetensors file, net, LPIPS version, creation time, source file and its sha256, note).
  Registering an existing NAME again adds version N+1; ``NAME`` alone means the newest.

Every load re-hashes the file and refuses a mismatch (``WeightsIntegrityError``). Input files
are safetensors, or torch checkpoints read with ``torch.load(weights_only=True)`` (the
reference's ``.pth`` format: ``lin{k}.model.1.weight``, also ``lin{k}.model.0.weight`` and
``lins.{k}...``; a full LPIPS state dict contributes its lin keys only).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..nets import TRUNK_CHANNELS, canonical_net_name
from . import WeightsIntegrityError, WeightsNotFoundError, cache_dir, canonical_version, lin_state_dict

__all__ = [
    "LinSet",
    "models_dir",
    "register",
    "resolve",
    "load",
    "lin_state_dict_for",
    "list_sets",
    "inventory",
    "PACKAGED",
]

PACKAGED = tuple(f"{net}-v{v}" for net in ("alex", "vgg", "squeeze") for v in ("0.1", "0.0"))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class LinSet:
    """One registered (or packaged) lin-weight set."""

    name: str
    number: int  # the N of NAME@N (1 for packaged sets)
    net: str
    version: str  # the LPIPS version the weights belong to ('0.1' or '0.0')
    sha256: str | None  # of the safetensors file (None for packaged: checked against the manifest)
    created: str | None
    source: str
    source_sha256: str | None
    note: str
    path: str | None
    packaged: bool

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.number}"

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec}


def models_dir() -> Path:
    """``$LPIPS_FAST_HOME/models`` (default ``~/.cache/lpips_fast/models``)."""
    return Path(cache_dir()) / "models"


# -- reading weight files --------------------------------------------------------------------
def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """The weights package's one reader (safetensors, or ``torch.load(weights_only=True)``), with
    the failure said in one ValueError naming the file."""
    from . import read_checkpoint

    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # refused pickle content, not a checkpoint, truncated...
        first = " ".join(str(e).split())[:200]
        raise ValueError(
            f"file: {path} cannot be read as safetensors or with torch.load(weights_only=True) "
            f"({type(e).__name__}: {first}); expected a state dict of lin weights"
        ) from None


def _canonical_lin(sd: Mapping[str, torch.Tensor], net: str, source: str) -> dict[str, torch.Tensor]:
    """``lin{k}.model.1.weight`` (1, C_k, 1, 1) float32 for every layer of ``net``; clear errors."""
    out: dict[str, torch.Tensor] = {}
    pat = re.compile(r"^(?:lin(\d+)|lins\.(\d+))\.model\.[01]\.weight$")
    for key, value in sd.items():
        m = pat.match(key)
        if m is None or not isinstance(value, torch.Tensor):
            continue
        k = int(m.group(1) or m.group(2))
        out.setdefault(f"lin{k}.model.1.weight", value.detach().to(torch.float32).cpu().contiguous())
    chans = TRUNK_CHANNELS[net]
    want = [f"lin{k}.model.1.weight" for k in range(len(chans))]
    missing = [k for k in want if k not in out]
    if missing or len(out) != len(want):
        raise ValueError(
            f"file: {source} does not hold the {len(chans)} lin layers of {net} "
            f"(expected keys lin0..lin{len(chans) - 1}.model.1.weight, got {sorted(sd)[:8]})"
        )
    for k, c in zip(want, chans):
        t = out[k]
        if t.numel() != c:
            raise ValueError(f"file: {source}: {k} has shape {tuple(t.shape)}, expected (1, {c}, 1, 1) for net {net!r}")
        out[k] = t.reshape(1, c, 1, 1)
        if not torch.isfinite(out[k]).all():
            raise ValueError(f"file: {source}: {k} holds NaN or Inf values")
    return {k: out[k] for k in want}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the registry ----------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"name: got {name!r}, expected 1-64 characters of letters, digits, '.', '_' or '-' "
            "starting with a letter or digit"
        )
    return name


def _numbers(name: str) -> list[int]:
    d = models_dir() / name
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())


def _packaged(name: str) -> LinSet:
    net, v = name.split("-v")
    return LinSet(name=name, number=1, net=net, version=v, sha256=None, created=None,
                  source="packaged (lpips 0.1.4)", source_sha256=None, note="", path=None, packaged=True)


def _read_meta(name: str, number: int) -> LinSet:
    meta_path = models_dir() / name / f"{number}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsIntegrityError(f"lin set {name}@{number}: unreadable metadata {meta_path} ({e})") from e
    return LinSet(name=name, number=number, net=meta["net"], version=meta["version"], sha256=meta["sha256"],
                  created=meta.get("created"), source=meta.get("source", ""),
                  source_sha256=meta.get("source_sha256"), note=meta.get("note", ""),
                  path=str(models_dir() / name / meta["file"]), packaged=False)


def register(
    name: str,
    file: str | os.PathLike,
    *,
    net: str,
    version: str = "0.1",
    note: str = "",
) -> LinSet:
    """Store the lin weights in ``file`` as ``NAME@N`` (N one more than the newest) and return it.

    ``file``: safetensors or a torch checkpoint (read with ``weights_only=True``), in the
    reference's key format. The weights are checked against ``net``'s layer widths; ``version``
    is the LPIPS version they were trained for. Packaged names cannot be registered.
    """
    _check_name(name)
    if name in PACKAGED:
        raise ValueError(f"name: {name!r} is a packaged lin set (read-only); choose another name")
    net = canonical_net_name(net)
    version = canonical_version(version)
    src = Path(os.fspath(file))
    if not src.is_file():
        raise FileNotFoundError(f"file: {src} does not exist")
    raw = src.read_bytes()
    sd = _canonical_lin(_read_file(src), net, str(src))
    from safetensors.torch import save

    data = save(sd, metadata={"format": "pt", "net": net, "version": version})
    folder = models_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    nums = _numbers(name)
    number = (nums[-1] + 1) if nums else 1
    while (folder / f"{number}.json").exists():  # a concurrent registration took it
        number += 1
    meta = {
        "name": name,
        "number": number,
        "file": f"{number}.safetensors",
        "sha256": _sha256(data),
        "net": net,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(src.resolve()),
        "source_sha256": _sha256(raw),
        "note": note or "",
    }
    _write_atomic(folder / meta["file"], data)
    _write_atomic(folder / f"{number}.json", (json.dumps(meta, indent=2) + "\n").encode())
    return _read_meta(name, number)


def resolve(spec: str) -> LinSet:
    """``NAME`` (newest) or ``NAME@N`` -> its entry; ``WeightsNotFoundError`` naming what exists."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"lin: got {spec!r}, expected a registered name such as 'alex-v0.1' or 'mine@2'")
    name, _, num = spec.partition("@")
    _check_name(name)
    if num and not num.isdigit():
        raise ValueError(f"lin: got {spec!r}, expected NAME or NAME@N with N a positive integer")
    if name in PACKAGED:
        if num and int(num) != 1:
            raise WeightsNotFoundError(f"lin: {spec!r}: packaged set {name} has only version 1")
        return _packaged(name)
    nums = _numbers(name)
    if not nums:
        known = ", ".join([*PACKAGED, *sorted(p.name for p in models_dir().glob("*") if p.is_dir())])
        raise WeightsNotFoundError(
            f"lin: no lin set named {name!r} (known: {known}); register one with "
            "`lpips-fast weights register NAME FILE --net NET`"
        )
    number = int(num) if num else nums[-1]
    if number not in nums:
        raise WeightsNotFoundError(f"lin: {name} has versions {nums}, got @{number}")
    return _read_meta(name, number)


def load(spec: str) -> tuple[dict[str, torch.Tensor], LinSet]:
    """The verified state dict ``{'lin{k}.model.1.weight': ...}`` of ``spec`` and its entry.

    Registered sets are hashed before decoding: a file that does not match the sha256 recorded
    at registration raises ``WeightsIntegrityError``.
    """
    entry = resolve(spec)
    if entry.packaged:
        return lin_state_dict(entry.net, entry.version), entry
    path = Path(entry.path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsNotFoundError(f"lin set {entry.spec}: cannot read {path} ({e})") from e
    got = _sha256(data)
    if got != entry.sha256:
        raise WeightsIntegrityError(
            f"lin set {entry.spec}: {path} has sha256 {got}, but {entry.sha256} was recorded at registration "
            "(the file was modified or is corrupt); register the weights again"
        )
    from safetensors.torch import load as st_load

    return _canonical_lin(st_load(data), entry.net, str(path)), entry


def lin_state_dict_for(spec: str, net: str, version: str) -> tuple[dict[str, torch.Tensor], LinSet]:
    """:func:`load`, checked to fit a model of ``net`` and LPIPS ``version`` (clear error otherwise)."""
    sd, entry = load(spec)
    net, version = canonical_net_name(net), canonical_version(version)
    if entry.net != net:
        raise ValueError(f"lin: {spec!r} holds {entry.net} weights, but the model's net is {net!r}")
    if entry.version != version:
        raise ValueError(
            f"lin: {spec!r} was made for LPIPS version {entry.version}, but the model has version={version!r}; "
            f"pass version={entry.version!r}"
        )
    return sd, entry


def list_sets() -> list[LinSet]:
    """Every lin set: the packaged ones, then each registered NAME@N (sorted by name, number)."""
    out = [_packaged(n) for n in PACKAGED]
    root = models_dir()
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name)):
            for n in _numbers(folder.name):
                out.append(_read_meta(folder.name, n))
    return out


def inventory() -> list[dict]:
    """Rows in ``lpips_fast.weights.list_weights()``'s shape (kind 'lin-set'), each verified."""
    rows = []
    for e in list_sets():
        row = {"kind": "lin-set", "name": e.spec, "path": e.path or "(packaged)", "expected": e.sha256,
               "sha256": None, "source": e.source, "status": "ok", "net": e.net, "version": e.version,
               "created": e.created, "note": e.note}
        try:
            load(e.spec)
            row["sha256"] = e.sha256
        except WeightsIntegrityError as exc:
            row["status"], row["detail"] = "bad", str(exc)
            row["sha256"] = _sha256(Path(e.path).read_bytes()) if e.path and Path(e.path).is_file() else None
        except WeightsNotFoundError as exc:
            row["status"], row["detail"] = "missing", str(exc)
        rows.append(row)
    return rows
