"""``train()``: fit LPIPS lin weights to 2AFC judgments with the reference's recipe, faster.

The recipe (lpips 0.1.4 ``lpips.Trainer`` and PerceptualSimilarity's ``train.py``):

- trunk frozen (``pnet_tune=True`` trains it too), lin layers with dropout (p = 0.5) on the
  squared unit-feature differences, started from the default conv initialisation (``init=
  'random'``) or from a weight set (``'packaged'``, ``'uniform'``, or a file);
- per batch: ``d0 = LPIPS(ref, p0)``, ``d1 = LPIPS(ref, p1)``, the ranking head
  ``Dist2LogitLayer(d0, d1)`` and the binary cross-entropy against the judge;
- Adam (lr 1e-4, betas (0.5, 0.999)) over the lin weights, the head (and the trunk when tuned);
  after each step every lin weight is clamped to >= 0;
- ``epochs`` epochs at the base rate, then ``decay_epochs`` more, the rate lowered by
  ``lr / decay_epochs`` after each of them (the reference's ``update_learning_rate``, called
  after every epoch past ``epochs``);
- shuffled batches of 50.

What is faster here: with a frozen trunk its features are computed once per image, in batches
of ref, p0 and p1 together, and kept for every epoch (``cache_features``); each step is then only
the distance step and the head. With dropout (the recipe) the cache holds the squared unit
differences ref-p0 and ref-p1, on which the masks are drawn in the reference's element order;
with ``dropout=False`` it holds the raw features and the step is the fused distance op with its
weight gradient.
The reference runs the trunk twice on ref and once on p0/p1 every step, and backpropagates
through it to the inputs.

Checkpoints: after every epoch the state (lin, head and trunk weights when tuned, Adam moments,
learning rate, random-number state, history) is written atomically to ``checkpoint``; a run
started again with the same arguments continues from the last finished epoch and ends with the
same weights as an uninterrupted run. The shuffling of epoch ``e`` depends only on
``(seed, e)`` and dropout draws from the saved generator state.

One deliberate difference: the reference clamps every 1x1 convolution in the LPIPS module,
which for ``net='squeeze'`` includes the trunk's Fire-module convolutions (changing the
"frozen" trunk); here only the lin weights are clamped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import unit_normalize
from .bapps import BappsError, TwoAFCSet, iter_batches, open_2afc, to_input
from .head import Dist2LogitLayer
from .scores import score_2afc, twoafc_agreement

__all__ = [
    "train", "TrainResult", "FeatureCacheError", "train_step", "ranking_step", "lin_distance", "unit_diff_sq",
    "make_optimizer", "learning_rates", "save_weights", "free_memory", "INIT_CHOICES", "UNIFORM_WEIGHT",
]

INIT_CHOICES = ("random", "uniform", "packaged")
UNIFORM_WEIGHT = 0.1
CHECKPOINT_FORMAT = "lpips_fast.train_checkpoint.v1"
WEIGHTS_FORMAT = "lpips_fast.lin_weights.v1"


@dataclass
class TrainResult:
    """What ``train()`` returns: the trained model (eval mode), its head, per-epoch history."""

    model: torch.nn.Module
    head: Dist2LogitLayer
    history: list[dict] = field(default_factory=list)
    train_2afc: float = float("nan")
    val_2afc: float | None = None
    out: str | None = None
    metadata: dict = field(default_factory=dict)
    registered: str | None = None


# -- the step --------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, head: torch.nn.Module, lr: float = 1e-4, beta1: float = 0.5) -> torch.optim.Adam:
    """Adam over the trainable LPIPS parameters (lin weights; the trunk when tuned) and the head."""
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


def ranking_step(
    model: torch.nn.Module,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    d0: torch.Tensor,
    d1: torch.Tensor,
    judge: torch.Tensor,
) -> dict:
    """Head, BCE against ``judge``, Adam step, clamp of the lin weights; returns ``loss``, ``acc``."""
    target = judge.reshape(d0.shape).to(d0.dtype)
    loss = F.binary_cross_entropy(head(d0, d1), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for w in model.lin_weights():
            w.clamp_(min=0)
        lt = (d1 < d0).to(target.dtype)
        acc = (lt * target + (1 - lt) * (1 - target)).mean()
    return {"loss": float(loss.detach()), "acc": float(acc)}


def train_step(
    model: torch.nn.Module,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    feats_ref: Sequence[torch.Tensor],
    feats_p0: Sequence[torch.Tensor],
    feats_p1: Sequence[torch.Tensor],
    judge: torch.Tensor,
) -> dict:
    """One optimisation step on a batch of trunk features; returns ``loss`` and ``acc`` (floats).

    ``model`` is an ``lpips_fast.LPIPS`` in train mode (dropout active if it was built with
    ``use_dropout=True``); ``judge`` holds the fractions preferring p1, shape (B,) or (B,1,1,1).
    """
    d0 = model.distances(feats_ref, feats_p0, spatial=False)
    d1 = model.distances(feats_ref, feats_p1, spatial=False)
    return ranking_step(model, head, optimizer, d0, d1, judge)


def unit_diff_sq(f0: torch.Tensor, f1: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared difference of unit-normalised features, NCHW (what the lin layers see in training)."""
    return ((unit_normalize(f0, eps) - unit_normalize(f1, eps)) ** 2).contiguous()


def lin_distance(model: torch.nn.Module, diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,1,1,1) distances from per-layer squared unit differences through the lin layers.

    In train mode each lin layer's dropout draws its mask here, layer by layer, as
    ``LPIPS.distances`` does: the same masks and values for the same random state.
    """
    val = None
    for lin, d in zip(model.lins, diffs):
        r = lin(d).mean([2, 3], keepdim=True)
        val = r if val is None else val + r
    return val


def learning_rates(lr: float, epochs: int, decay_epochs: int) -> list[float]:
    """The rate used in each epoch (reference order of float operations: repeated subtraction)."""
    out, cur = [], lr
    for e in range(1, epochs + decay_epochs + 1):
        out.append(cur)
        if e > epochs:
            cur = cur - lr / decay_epochs
    return out


# -- features ----------------------------------------------------------------------------------
MEMORY_SHARE = 0.7  # of the free memory (device, then host) a feature cache may take


class FeatureCacheError(ValueError):
    """The trunk-feature cache has nowhere to go: it fits neither in memory nor on the disk, or its
    scratch folder cannot be made. The message says how large it is, what is free, and the ways
    out (``cache_features=False``/``--no-cache``, ``feature_dir``/``--feature-dir``)."""


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits


def free_disk(path: str | os.PathLike) -> int:
    """Bytes free on the file system holding ``path``."""
    return int(shutil.disk_usage(path).free)


def _remove_orphaned_scratch(parent: str) -> None:
    """Remove ``features-<pid>-*`` scratch folders under ``parent`` whose process is gone (killed)."""
    for name in os.listdir(parent):
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "features" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # alive (or someone else's): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _no_scratch(what: str, e: OSError) -> FeatureCacheError:
    return FeatureCacheError(f"feature cache: {what} ({e.strerror or e}); "
                             "pass --feature-dir / feature_dir= naming a writable folder, or --no-cache")


class _FeatureStore:
    """Per triplet, what the steps need from the frozen trunk, computed once.

    ``diffs=True`` (dropout on): the squared unit differences ref-p0 and ref-p1 per layer (the
    dropout masks apply to them); else the raw features of ref, p0 and p1 (the fused op
    normalises them itself and computes the weight gradient).

    Where it lives (``where``): on ``device`` when it takes at most ``MEMORY_SHARE`` of the free
    memory there; else in host memory (a CUDA device), each batch copied over; else in float32
    ``.npy`` files memory-mapped under ``feature_dir`` (default: a folder under the cache root),
    scratch files removed when the store is closed. The values are the same wherever they live.
    """

    def __init__(self, model, data: TwoAFCSet, batch_size: int, workers: int, device, progress, diffs: bool,
                 amp: bool = False, feature_dir: str | os.PathLike | None = None) -> None:
        self.diffs = diffs
        self.device = torch.device(device)
        self.sides: list[list[torch.Tensor]] | None = None
        self.where = "device"
        self.scratch: str | None = None
        self._feature_dir = feature_dir
        shape = None
        try:
            with torch.no_grad(), _bar(len(data), "trunk features", progress) as bar:
                for rows, imgs in iter_batches(data, batch_size, workers=workers):
                    if shape is None:
                        shape = imgs.shape[2:]
                    elif imgs.shape[2:] != shape:
                        raise BappsError(
                            f"training needs one image size after resizing, got {shape[1]}x{shape[0]} and "
                            f"{imgs.shape[3]}x{imgs.shape[2]} (e.g. {data.p0[int(rows[0])]})"
                        )
                    sides = [[t.float() for t in side] for side in _trunk_sides(model, imgs, device, amp)]
                    if diffs:
                        sides = [[unit_diff_sq(r, p) for r, p in zip(sides[0], sides[s])] for s in (1, 2)]
                    if self.sides is None:
                        self.sides = self._allocate([[tuple(t.shape[1:]) for t in side] for side in sides], len(data))
                    idx = torch.as_tensor(rows, device=self.sides[0][0].device)
                    for store_side, side in zip(self.sides, sides):
                        for store, t in zip(store_side, side):
                            store.index_copy_(0, idx, t.contiguous().to(store.device))
                    bar.update(len(rows))
        except BaseException:
            self.close()
            raise

    def _allocate(self, shapes: list[list[tuple]], rows: int) -> list[list[torch.Tensor]]:
        need = rows * 4 * sum(math.prod(s) for side in shapes for s in side)
        cpu = torch.device("cpu")
        if need <= MEMORY_SHARE * free_memory(self.device):
            self.where, at = "device", self.device
        elif self.device.type != "cpu" and need <= MEMORY_SHARE * free_memory(cpu):
            self.where, at = "host", cpu
        else:
            self.where = "disk"
            return self._allocate_on_disk(shapes, rows, need)
        return [[torch.empty((rows,) + s, dtype=torch.float32, device=at) for s in side] for side in shapes]

    def _allocate_on_disk(self, shapes: list[list[tuple]], rows: int, need: int) -> list[list[torch.Tensor]]:
        from ..paths import cache_root

        parent = os.fspath(self._feature_dir) if self._feature_dir is not None else os.path.join(cache_root(), "train-features")
        gib = 2**30
        try:
            os.makedirs(parent, exist_ok=True)
            _remove_orphaned_scratch(parent)
            free = free_disk(parent)
        except OSError as e:
            raise _no_scratch(f"cannot use {parent} for scratch files", e) from None
        if need > 0.95 * free:
            memory = f"{free_memory(torch.device('cpu')) / gib:.1f} GiB of host memory"
            if self.device.type != "cpu":
                memory = f"{free_memory(self.device) / gib:.1f} GiB of {self.device} memory, " + memory
            raise FeatureCacheError(
                f"feature cache: {rows} triplets need {need / gib:.1f} GiB; free: {memory}, {free / gib:.1f} GiB of "
                f"disk at {parent} (expected room for it: pass a larger feature_dir / --feature-dir, or "
                "cache_features=False / --no-cache to run the trunk every step)"
            )
        try:
            self.scratch = tempfile.mkdtemp(prefix=f"features-{os.getpid()}-", dir=parent)
        except OSError as e:
            raise _no_scratch(f"cannot create a scratch folder in {parent}", e) from None
        out = []
        for i, side in enumerate(shapes):
            out.append([])
            for j, s in enumerate(side):
                mm = np.lib.format.open_memmap(os.path.join(self.scratch, f"side{i}-layer{j}.npy"), mode="w+",
                                               dtype=np.float32, shape=(rows,) + s)
                out[-1].append(torch.from_numpy(mm))
        return out

    def close(self) -> None:
        """Drop the features (and the scratch files of a store on disk)."""
        self.sides = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for side in self.sides for t in side)

    def rows(self, rows) -> list[list[torch.Tensor]]:
        """The stored rows ``rows`` (indices or a slice), on the training device."""
        if isinstance(rows, slice):
            return [[t[rows].to(self.device) for t in side] for side in self.sides]
        idx = torch.as_tensor(rows, device=self.sides[0][0].device)
        return [[t.index_select(0, idx).to(self.device) for t in side] for side in self.sides]

    def batches(self, order: np.ndarray, batch_size: int):
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            yield rows, self.rows(rows)

    def all_distances(self, model, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """``distances`` over every stored triplet, ``chunk`` rows at a time."""
        n = self.sides[0][0].shape[0]
        parts = [self.distances(model, self.rows(slice(lo, lo + chunk))) for lo in range(0, n, chunk)]
        return torch.cat([p[0].flatten() for p in parts]), torch.cat([p[1].flatten() for p in parts])

    def distances(self, model, sides) -> tuple[torch.Tensor, torch.Tensor]:
        if self.diffs:
            return lin_distance(model, sides[0]), lin_distance(model, sides[1])
        return (model.distances(sides[0], sides[1], spatial=False),
                model.distances(sides[0], sides[2], spatial=False))


def trunk_autocast(device: torch.device, amp: bool):
    """bf16 autocast for the trunk's convolutions (the distance step accumulates in fp32 whatever
    the features' dtype), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _trunk_sides(model, imgs: torch.Tensor, device, amp: bool) -> list[list[torch.Tensor]]:
    """One trunk pass over a (k, B, H, W, 3) batch of k image sets (ref, p0, p1):
    ``sides[s][layer]`` is set ``s``'s (B, C, h, w) features."""
    k, b = imgs.shape[:2]
    with trunk_autocast(device, amp):
        feats = model.features(to_input(imgs.reshape(k * b, *imgs.shape[2:])).to(device))
    return [[f[s * b:(s + 1) * b] for f in feats] for s in range(k)]


def _streamed_batches(model, data, order, batch_size, workers, device, amp: bool = False):
    """Decode and run the trunk per batch (trunk tuned, or no cache); gradients as the trunk needs."""
    for rows, imgs in iter_batches(data, batch_size, indices=order, workers=workers):
        yield rows, _trunk_sides(model, imgs, device, amp)


def _bar(total: int, desc: str, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


# -- set-up ------------------------------------------------------------------------------------
def _build_model(net, version, init, pnet_rand, pnet_tune, dropout, trunk_path, device):
    from ..model import LPIPS

    packaged = init == "packaged"
    model = LPIPS(pretrained=packaged, net=net, version=version, pnet_rand=pnet_rand, pnet_tune=pnet_tune,
                  use_dropout=dropout, eval_mode=False, trunk_path=trunk_path)
    if init == "uniform":
        with torch.no_grad():
            for w in model.lin_weights():
                w.fill_(UNIFORM_WEIGHT)
    elif init not in INIT_CHOICES:
        path = os.fspath(init)
        if not os.path.isfile(path):
            raise ValueError(f"init: got {init!r}, expected one of {INIT_CHOICES} or a lin-weights file")
        model = LPIPS(pretrained=True, net=net, version=version, pnet_rand=pnet_rand, pnet_tune=pnet_tune,
                      use_dropout=dropout, eval_mode=False, trunk_path=trunk_path, model_path=path)
    return model.to(device)


def _config(**kw) -> dict:
    return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in kw.items()}


def _check_args(epochs, decay_epochs, batch_size, lr, beta1, register, out):
    for name, v, lo in (("epochs", epochs, 0), ("decay_epochs", decay_epochs, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: got {v!r}, expected an int >= {lo}")
    if epochs + decay_epochs < 1:
        raise ValueError(f"epochs + decay_epochs: got {epochs} + {decay_epochs}, expected at least one epoch")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: got {lr!r}, expected a positive float")
    if not (isinstance(beta1, (int, float)) and 0 <= beta1 < 1):
        raise ValueError(f"beta1: got {beta1!r}, expected a float in [0, 1)")
    if register is not None and out is None:
        raise ValueError(f"register: got {register!r} without out; the registry stores the written file, pass out=")


# -- checkpoints -------------------------------------------------------------------------------
def _trainable_state(model, head, pnet_tune: bool) -> dict[str, torch.Tensor]:
    sd = {f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(model.lins)}
    if pnet_tune:
        sd.update({f"net.{k}": v for k, v in model.net.state_dict().items()})
    sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return sd


def _save_checkpoint(path, model, head, optimizer, pnet_tune, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in _trainable_state(model, head, pnet_tune).items()}
    for i, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
    tensors["rng.cpu"] = torch.get_rng_state()
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(dev)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(meta)})
    os.replace(tmp, path)


def _load_checkpoint(path, model, head, optimizer, pnet_tune, config: dict) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        md = f.metadata() or {}
        if md.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: {path} is not a training checkpoint (format {md.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(md["state"])
    diff = sorted(k for k in set(config) | set(meta["config"]) if config.get(k) != meta["config"].get(k))
    if diff:
        detail = ", ".join(f"{k}: {meta['config'].get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(
            f"checkpoint: {path} was written by a run with other settings ({detail}); "
            "pass the same settings, another checkpoint path, or resume=False to start over"
        )
    with torch.no_grad():
        for k, v in _trainable_state(model, head, pnet_tune).items():
            v.copy_(tensors[k])
    sd = optimizer.state_dict()
    state = {}
    for i in sd["param_groups"][0]["params"]:
        names = {k.split(".", 2)[2] for k in tensors if k.startswith(f"optim.{i}.")}
        if names:
            state[i] = {n: tensors[f"optim.{i}.{n}"] for n in names}
    sd["state"] = state
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.cpu"])
    dev = next(model.parameters()).device
    if dev.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], dev)
    return meta


def save_weights(path, model, metadata: dict, include_trunk: bool = False) -> str:
    """Write the lin weights (and the trunk when tuned) as safetensors with string ``metadata``."""
    from safetensors.torch import save_file

    sd = {f"lin{k}.model.1.weight": lin.weight.detach().cpu().contiguous().clone() for k, lin in enumerate(model.lins)}
    if include_trunk:
        sd.update({f"net.{k}": v.detach().cpu().contiguous().clone() for k, v in model.net.state_dict().items()})
    md = {"format": WEIGHTS_FORMAT}
    md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata=md)
    os.replace(tmp, path)
    return path


# -- the loop ----------------------------------------------------------------------------------
class _TrainingRun:
    """The state one ``train()`` call works on: data, model, head, optimizer, feature cache, history.

    The pieces run in ``train()``'s order (build, resume, cache the features, the epochs, the
    training-set score); ``train()`` seeds the global random state before ``build`` and keeps it
    forked from the caller's for all of them.
    """

    def __init__(self, data: TwoAFCSet, dev: torch.device, *, amp: bool, total: int, batch_size: int, workers: int,
                 load_size: int, seed: int, pnet_tune: bool, config: dict, progress: bool | None,
                 say: Callable[[str], None]) -> None:
        self.data, self.dev, self.amp, self.total = data, dev, amp, total
        self.batch_size, self.workers, self.load_size = batch_size, workers, load_size
        self.seed, self.pnet_tune, self.config = seed, pnet_tune, config
        self.progress, self.say = progress, say
        self.store: _FeatureStore | None = None
        self.history: list[dict] = []

    def build(self, net, version, init, pnet_rand, dropout, trunk_path, lr: float, beta1: float) -> None:
        """The model with its starting lin weights (from ``init``), the ranking head and Adam."""
        self.model = _build_model(net, version, init, pnet_rand, self.pnet_tune, dropout, trunk_path, self.dev)
        self.head = Dist2LogitLayer().to(self.dev)
        self.optimizer = make_optimizer(self.model, self.head, lr, beta1)

    def resume_from(self, checkpoint) -> int:
        """Load ``checkpoint`` (weights, Adam moments, random state, history); returns the next epoch."""
        meta = _load_checkpoint(checkpoint, self.model, self.head, self.optimizer, self.pnet_tune, self.config)
        self.history = meta["history"]
        self.say(f"resuming from {checkpoint} after epoch {meta['epoch']}")
        return meta["epoch"] + 1

    def cache_features(self, dropout: bool, feature_dir: str | os.PathLike | None = None) -> None:
        """Run the frozen trunk once over the whole set and keep what the steps need."""
        t0 = time.perf_counter()
        self.model.eval()
        self.store = _FeatureStore(self.model, self.data, self.batch_size, self.workers, self.dev, self.progress,
                                   diffs=dropout, amp=self.amp, feature_dir=feature_dir)
        where = {"device": f"{self.dev} memory", "host": "host memory", "disk": f"files under {self.store.scratch}"}
        self.say(f"trunk features of {3 * len(self.data)} images cached ({self.store.nbytes() / 2**20:.1f} MiB, "
                 f"{where[self.store.where]}) in {time.perf_counter() - t0:.1f} s")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def run_epoch(self, epoch: int, lr: float) -> dict:
        """One pass over the set at rate ``lr``; returns the epoch's history row."""
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        losses, accs, counts = [], [], []
        with _bar(len(self.data), f"epoch {epoch}/{self.total}", self.progress) as bar:
            for rows, sides in self._epoch_batches(epoch):
                r = self._step(rows, sides)
                losses.append(r["loss"])
                accs.append(r["acc"])
                counts.append(len(rows))
                bar.update(len(rows))
        w = np.asarray(counts, dtype=np.float64)
        return {"epoch": epoch, "lr": lr, "loss": float(np.dot(losses, w) / w.sum()),
                "acc": float(np.dot(accs, w) / w.sum()), "seconds": time.perf_counter() - t0}

    def _epoch_batches(self, epoch: int):
        """The epoch's batches, shuffled by ``(seed, epoch)``: from the feature cache, or streamed."""
        order = torch.randperm(len(self.data),
                               generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).numpy()
        if self.store is not None:
            return self.store.batches(order, self.batch_size)
        return _streamed_batches(self.model, self.data, order, self.batch_size, self.workers, self.dev, self.amp)

    def _step(self, rows, sides) -> dict:
        """One optimisation step on a batch of cached or streamed features."""
        judge = torch.as_tensor(self.data.judge[rows], device=self.dev)
        if self.store is not None:
            d0, d1 = self.store.distances(self.model, sides)
            return ranking_step(self.model, self.head, self.optimizer, d0, d1, judge)
        return train_step(self.model, self.head, self.optimizer, *sides, judge)

    def end_epoch(self, row: dict, checkpoint, on_epoch_end: Callable[[int, dict], None] | None) -> None:
        """Record and log ``row``, write the checkpoint, then call ``on_epoch_end``."""
        epoch = row["epoch"]
        self.history.append(row)
        self.say(f"epoch {epoch}/{self.total}: loss {row['loss']:.4f}, train agreement {row['acc']:.4f}, "
                 f"lr {row['lr']:.3g}, {row['seconds']:.2f} s")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, self.model, self.head, self.optimizer, self.pnet_tune,
                             {"config": self.config, "epoch": epoch, "history": self.history})
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    def train_score(self) -> float:
        """Switch to eval mode and score the training set (from the feature cache when there is one)."""
        self.model.eval()
        if self.store is not None:
            with torch.no_grad():
                d0, d1 = (d.cpu().numpy() for d in self.store.all_distances(self.model))
            return float(np.mean(twoafc_agreement(d0, d1, self.data.judge)))
        return self.score(self.data.roots)

    def score(self, dirs) -> float:
        """2AFC score of the model on the folders ``dirs``."""
        return score_2afc(self.model, dirs, load_size=self.load_size, batch_size=self.batch_size,
                          workers=self.workers, device=self.dev, progress=self.progress)

    def weights_metadata(self, train_2afc: float, val_dirs, val_2afc: float | None) -> dict:
        """What is written with the weights: the training set, the run's settings, the 2AFC scores."""
        from .. import __version__

        c = self.config
        metadata = {
            "net": c["net"], "version": self.model.version, "train_datasets": list(self.data.roots),
            "triplets": len(self.data), "epochs": c["epochs"], "decay_epochs": c["decay_epochs"],
            "batch_size": c["batch_size"], "lr": c["lr"], "init": c["init"], "dropout": c["dropout"],
            "pnet_tune": c["pnet_tune"], "seed": c["seed"], "final_2afc": train_2afc,
            "lpips_fast_version": __version__,
        }
        if val_2afc is not None:
            dirs = [val_dirs] if isinstance(val_dirs, (str, os.PathLike)) else val_dirs
            metadata["val_datasets"] = [os.fspath(d) for d in dirs]
            metadata["val_2afc"] = val_2afc
        return metadata


def _register_weights(name: str, path: str, net: str, version: str, metadata: dict) -> str:
    """Store the written weights in the lin-set registry as ``name``; returns the registered spec."""
    from ..weights.registry import register as register_lin_set

    note = json.dumps({k: metadata[k] for k in ("train_datasets", "triplets", "epochs", "decay_epochs", "final_2afc")})
    return register_lin_set(name, path, net=net, version=version, note=note).spec


def train(
    dirs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    net: str = "alex",
    version: str = "0.1",
    epochs: int = 5,
    decay_epochs: int = 5,
    batch_size: int = 50,
    lr: float = 1e-4,
    beta1: float = 0.5,
    init: str | os.PathLike = "random",
    dropout: bool = True,
    pnet_rand: bool = False,
    pnet_tune: bool = False,
    trunk_path: str | os.PathLike | None = None,
    cache_features: bool = True,
    feature_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    val_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
    load_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    register: str | None = None,
    amp: bool | None = None,
) -> TrainResult:
    """Train LPIPS lin weights (and the ranking head) on the 2AFC folders ``dirs``.

    Returns a ``TrainResult``; with ``out`` the weights are also written as safetensors that
    ``LPIPS(model_path=out)`` loads, with the training set, epochs and final 2AFC score in its
    metadata. ``checkpoint`` (default ``out + '.ckpt'`` when ``out`` is given) is rewritten after
    every epoch and resumed from when ``resume`` is true. ``on_epoch_end(epoch, row)`` is called
    after each epoch's checkpoint is written. ``register=NAME`` also stores ``out`` in the lin-set
    registry (``lpips_fast.weights.registry``) as ``NAME@N``, loadable with ``LPIPS(lin=NAME)``.
    ``amp``: run the trunk under bf16 autocast (default: on CUDA; off on the CPU, where bf16
    convolutions are slower); the distance step and the lin weights stay fp32.
    ``cache_features``: keep the frozen trunk's features for every epoch, in device memory, else
    host memory, else memory-mapped scratch files under ``feature_dir`` (default: under the cache
    root), whichever has room (``FeatureCacheError`` when none has, before training starts).
    """
    _check_args(epochs, decay_epochs, batch_size, lr, beta1, register, out)
    if feature_dir is not None:
        from ..dataset.options import check_cache_dir

        check_cache_dir(os.fspath(feature_dir), "feature_dir")  # a folder (or creatable) and writable
    data = open_2afc(dirs, load_size)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = dev.type == "cuda" if amp is None else bool(amp)
    if checkpoint is None and out is not None:
        checkpoint = os.fspath(out) + ".ckpt"
    config = _config(
        datasets=list(data.roots), triplets=len(data), net=net, version=version, epochs=epochs,
        decay_epochs=decay_epochs, batch_size=batch_size, lr=lr, beta1=beta1, init=os.fspath(init),
        dropout=dropout, pnet_rand=pnet_rand, pnet_tune=pnet_tune, seed=seed, load_size=load_size, amp=amp,
    )
    rates = learning_rates(float(lr), epochs, decay_epochs)
    total = epochs + decay_epochs
    run = _TrainingRun(data, dev, amp=amp, total=total, batch_size=batch_size, workers=workers, load_size=load_size,
                       seed=seed, pnet_tune=pnet_tune, config=config, progress=progress, say=log or (lambda m: None))

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), contextlib.closing(run):
        torch.manual_seed(seed)
        run.build(net, version, init, pnet_rand, dropout, trunk_path, lr, beta1)
        start = 1
        if checkpoint is not None and resume and os.path.exists(checkpoint):
            start = run.resume_from(checkpoint)
        if cache_features and not pnet_tune and start <= total:
            run.cache_features(dropout, feature_dir)
        for epoch in range(start, total + 1):
            run.end_epoch(run.run_epoch(epoch, rates[epoch - 1]), checkpoint, on_epoch_end)
        train_2afc = run.train_score()
    val_2afc = run.score(val_dirs) if val_dirs is not None else None
    metadata = run.weights_metadata(train_2afc, val_dirs, val_2afc)
    path = save_weights(out, run.model, metadata, include_trunk=pnet_tune) if out is not None else None
    registered = _register_weights(register, path, net, run.model.version, metadata) if register is not None else None
    return TrainResult(model=run.model, head=run.head, history=run.history, train_2afc=train_2afc, val_2afc=val_2afc,
                       out=path, metadata=metadata, registered=registered)
