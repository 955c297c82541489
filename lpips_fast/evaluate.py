"""Dataset-scale evaluation: paired folders, one reference against a folder, lists of pairs.

    rows = lpips_fast.evaluate_dirs("out/", "gt/", net="alex")        # list of Row
    rows = lpips_fast.evaluate_ref("ref.png", "samples/")
    rows = lpips_fast.evaluate_pairs([("a.png", "b.png"), ...])

Each ``Row`` has ``path0, path1, lpips, error``: a pair that cannot be scored (missing,
unreadable, corrupt or truncated file, decompression bomb, size mismatch without ``resize``,
image smaller than the trunk allows) is a row with ``lpips=None`` and a reason in ``error``;
nothing is dropped and nothing raises.

Layering: files are decoded by ``data`` (in DataLoader workers), features come from the model's
``features`` (the trunk) or the feature cache, distances from the model's ``distances``. The same
``Session`` drives the CLI, including sharding under ``torchrun`` (``distributed``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .data import (
    REF,
    Decoded,
    ImageDataset,
    PairDataset,
    PairSpec,
    bucket_by_size,
    decode_file,
    iter_windows,
    list_images,
    parse_resize,
    to_model_input,
)
from .distributed import DistContext, shard, windows_per_rank
from .writers import Row

__all__ = [
    "evaluate_dirs",
    "evaluate_ref",
    "evaluate_pairs",
    "Session",
    "build_model",
    "dir_specs",
    "ref_specs",
    "pair_specs",
    "Row",
    "is_oom",
]


# -- model -----------------------------------------------------------------------------------
def _read_state_dict(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=True)


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
    """The LPIPS module to evaluate with.

    ``model``: a ready ``lpips_fast.LPIPS`` (used as is). ``state_dict``: a complete LPIPS state
    dict with the reference's keys (.safetensors or a torch file, loaded with
    ``weights_only=True``) on a randomly initialised module. ``trunk``/``lin``: explicit trunk
    (torchvision format) and lin weight files. ``random_trunk``: an untrained trunk seeded with
    ``seed`` (testing), with the packaged lin weights when available.
    """
    if model is not None:
        return model
    from .model import LPIPS

    if state_dict is not None:
        m = LPIPS(pretrained=False, net=net, version=version, lpips=lpips, pnet_rand=True)
        m.load_state_dict(_read_state_dict(state_dict))
        return m.eval()
    if random_trunk:
        torch.manual_seed(seed)
        try:
            return LPIPS(pretrained=True, net=net, version=version, lpips=lpips, pnet_rand=True, model_path=lin, trunk_path=trunk).eval()
        except (AttributeError, FileNotFoundError, ImportError):
            torch.manual_seed(seed)
            return LPIPS(pretrained=False, net=net, version=version, lpips=lpips, pnet_rand=True, trunk_path=trunk).eval()
    return LPIPS(pretrained=True, net=net, version=version, lpips=lpips, model_path=lin, trunk_path=trunk).eval()


def is_oom(e: BaseException) -> bool:
    """True for device or host out-of-memory errors."""
    oom_t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_t and isinstance(e, oom_t):
        return True
    if isinstance(e, (RuntimeError, MemoryError)):
        msg = str(e).lower()
        return isinstance(e, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg
    return False


def _on(model, device: torch.device, dtype: torch.dtype):
    """``model`` in eval mode on ``device``/``dtype``: itself if already there, else a copy (the
    caller's module is never moved, cast or switched to eval)."""
    ps = list(model.parameters()) + list(model.buffers())
    same = all(
        p.device.type == device.type and (device.index is None or p.device.index == device.index) and p.dtype == dtype
        for p in ps
    )
    if same and not model.training:
        return model
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


class OutOfMemoryAtBatchOne(RuntimeError):
    pass


# -- job specs -------------------------------------------------------------------------------
def dir_specs(dir0: str, dir1: str) -> list[PairSpec]:
    """Every relative path in either folder (recursive), sorted; one side missing -> error spec."""
    a, b = list_images(dir0), list_images(dir1)
    sa, sb = set(a), set(b)
    specs = []
    for rel in sorted(sa | sb):
        f0 = os.path.join(dir0, rel) if rel in sa else None
        f1 = os.path.join(dir1, rel) if rel in sb else None
        err = None
        if f0 is None:
            err = f"missing in DIR0 ({dir0})"
        elif f1 is None:
            err = f"missing in DIR1 ({dir1})"
        specs.append(PairSpec(rel, rel, f0, f1, err))
    return specs


def ref_specs(ref: str, directory: str) -> list[PairSpec]:
    """The reference (side 0, decoded once) against every image under ``directory``."""
    return [PairSpec(str(ref), rel, REF, os.path.join(directory, rel)) for rel in list_images(directory)]


def pair_specs(pairs: Iterable[Sequence[str]]) -> list[PairSpec]:
    """Explicit (path0, path1) pairs; the paths are shown as given."""
    out = []
    for p in pairs:
        p0, p1 = (os.fspath(x) for x in p)
        out.append(PairSpec(p0, p1, p0, p1))
    return out


def _specs_digest(specs: Sequence[PairSpec]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for s in specs:
        h.update(f"{s.key0}\0{s.key1}\0{s.error}\n".encode())
    return h.hexdigest()


# -- the scoring session ---------------------------------------------------------------------
@dataclass
class SessionStats:
    trunk_images: int = 0
    trunk_calls: int = 0
    oom_events: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class Session:
    """A model on a device plus the options of a run; scores windows of decoded pairs.

    ``batch_size`` counts pairs per trunk batch; it halves on an out-of-memory error (the batch
    is retried) and stays halved for the rest of the run (``stats.oom_events``).
    """

    def __init__(
        self,
        model,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
        workers: int = 0,
        resize=None,
        max_pixels: int | None = None,
        cache=None,
        ctx: DistContext | None = None,
        engine: bool | None = None,
        compile: bool = False,
    ):
        from .nets import canonical_net_name

        if isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        if device is None:
            try:
                device = next(model.parameters()).device
            except StopIteration:
                device = "cpu"
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = _on(model, self.device, self.dtype)
        self.net = canonical_net_name(model.pnet_type)
        self.version = model.version
        self.min_size = int(model.net.min_size)
        self.batch_size = max(1, int(batch_size))
        self.initial_batch_size = self.batch_size
        self.workers = max(0, int(workers))
        self.resize = parse_resize(resize)
        self.max_pixels = max_pixels
        self.ctx = ctx or DistContext()
        if isinstance(cache, (str, os.PathLike)):
            from .feature_cache import FeatureCache

            cache = FeatureCache(cache)
        self.cache = cache
        self.fingerprint = ""
        if cache is not None:
            from .feature_cache import model_fingerprint

            self.fingerprint = model_fingerprint(model)
        self.stats = SessionStats()
        self._pinned: dict[str, list[torch.Tensor]] = {}
        # Pairs without cache or reference: on CUDA the Engine (CUDA graphs, uint8 over the bus)
        # fed by the pinned-buffer pipeline; elsewhere features + op here.
        self.use_engine = cache is None and (self.device.type == "cuda" if engine is None else bool(engine))
        self.compile = bool(compile)
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            from .engine import Engine
            from .pipeline import PinnedPipeline

            eng = Engine(
                model=self.model, device=self.device, dtype=self.dtype, compile=self.compile, batch_size=self.batch_size
            )
            self._pipe = PinnedPipeline(eng, slots=3)
        return self._pipe

    def _score_engine(self, group: list) -> list[float]:
        """Distances of same-size pairs through Engine + PinnedPipeline; OOM halves and retries."""
        while True:
            bs = self.batch_size
            chunks = [group[i : i + bs] for i in range(0, len(group), bs)]

            def batches():
                for ch in chunks:
                    a = torch.from_numpy(np.stack([c[1].array for c in ch])).permute(0, 3, 1, 2)
                    b = torch.from_numpy(np.stack([c[2].array for c in ch])).permute(0, 3, 1, 2)
                    self.stats.trunk_calls += 1
                    self.stats.trunk_images += 2 * len(ch)
                    yield a, b

            try:
                out: list[float] = []
                for d in self._pipeline().map(batches()):
                    out.extend(d.reshape(-1).to(torch.float64).tolist())
                return out
            except Exception as e:
                if not is_oom(e):
                    raise
                del e
                self._pipe = None  # its graphs and buffers were sized for the old batch
                self._free()
                if bs <= 1:
                    raise OutOfMemoryAtBatchOne("out of memory even with a batch of 1 pair")
                self.batch_size = max(1, bs // 2)
                self.stats.oom_events += 1

    # -- features ----------------------------------------------------------------------------
    def _cache_key(self, d: Decoded) -> str | None:
        if d.digest is None:
            return None
        from .feature_cache import feature_key

        return feature_key(d.digest, self.net, self.version, d.hw, self.dtype, self.fingerprint)

    def _trunk(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        x = to_model_input(arrays, self.device, self.dtype)
        self.stats.trunk_calls += 1
        self.stats.trunk_images += len(arrays)
        return self.model.features(x)

    def features(self, decs: Sequence[Decoded]) -> list[torch.Tensor]:
        """Per-layer (B, C, h, w) trunk features of same-size images (trunk, cache or pinned)."""
        ids = [d.digest or f"obj{id(d)}" for d in decs]
        uniq = list(dict.fromkeys(ids))
        first = {}
        for i, k in enumerate(ids):
            first.setdefault(k, decs[i])
        have: dict[str, list[torch.Tensor]] = {}
        for k in uniq:
            if k in self._pinned:
                have[k] = self._pinned[k]
        need = [k for k in uniq if k not in have]
        ckeys = {}
        if self.cache is not None and need:
            ckeys = {k: self._cache_key(first[k]) for k in need}
            got = self.cache.get_many([c for c in ckeys.values() if c])
            for k in need:
                c = ckeys.get(k)
                if c and c in got:
                    have[k] = [t.to(self.device, self.dtype, non_blocking=True) for t in got[c]]
            self.stats.cache_hits = self.cache.hits
            self.stats.cache_misses = self.cache.misses
        miss = [k for k in need if k not in have]
        for k in miss:
            if first[k].array is None:  # decoding was skipped for a cache hit that has gone since
                first[k] = self._redecode(first[k])
        if miss:
            out = self._trunk([first[k].array for k in miss])
            if len(miss) == len(ids) and not have:
                # Common case: every image computed now, no duplicates: use the batch as is.
                if self.cache is not None:
                    self._cache_put(miss, ckeys, out)
                return out
            for j, k in enumerate(miss):
                have[k] = [f[j] for f in out]
            if self.cache is not None:
                self._cache_put(miss, ckeys, out)
        return [torch.stack([have[k][l] for k in ids]) for l in range(len(have[ids[0]]))]

    def _redecode(self, d: Decoded) -> Decoded:
        nd = decode_file(d.path, resize=self.resize, max_pixels=self.max_pixels)
        if nd.error is not None or nd.hw != d.hw:
            raise RuntimeError(f"{d.path}: changed during the run ({nd.error or 'new size'})")
        return nd

    def _probe(self):
        """For decoding workers: skip the pixels of files whose features are cached."""
        if self.cache is None:
            return None
        from .feature_cache import CacheProbe

        return CacheProbe(self.cache.root, self.net, self.version, self.dtype, self.fingerprint)

    def _cache_put(self, miss, ckeys, out) -> None:
        items = {}
        for j, k in enumerate(miss):
            c = ckeys.get(k)
            if c:
                items[c] = [f[j].detach().to("cpu") for f in out]
        if items:
            self.cache.put_many(items)

    def pin(self, d: Decoded) -> None:
        """Compute one image's features once for the whole run (the reference of ``ref``)."""
        key = d.digest or f"obj{id(d)}"
        if key not in self._pinned:
            with torch.inference_mode():
                feats = self.features([d])
            self._pinned[key] = [f[0] for f in feats]

    def distances(self, f0: list[torch.Tensor], f1: list[torch.Tensor]) -> torch.Tensor:
        """(B,) LPIPS values from per-layer features (the model's own combination step)."""
        return self.model.distances(f0, f1, spatial=False).view(-1)

    def spatial_map(self, d0: Decoded, d1: Decoded) -> tuple[torch.Tensor, float]:
        """The reference's ``spatial=True`` map of one same-size pair, (H, W) float32 on the CPU
        (each layer's map upsampled bilinearly to the image size and summed), and the scalar LPIPS."""
        with torch.inference_mode():
            f = self.model.features(to_model_input([d0.array, d1.array], self.device, self.dtype))
            f0, f1 = [t[:1] for t in f], [t[1:] for t in f]
            heat = self.model.distances(f0, f1, out_hw=d0.hw, spatial=True)
            total = self.model.distances(f0, f1, spatial=False)
        return heat[0, 0].to("cpu", torch.float32), float(total.view(-1)[0])

    # -- OOM-aware chunking ------------------------------------------------------------------
    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_chunks(self, items: list, fn: Callable[[list], list]) -> list:
        """``fn`` over ``items`` in chunks of ``batch_size``; halve and retry on out-of-memory."""
        out: list = []
        i = 0
        while i < len(items):
            bs = self.batch_size
            chunk = items[i : i + bs]
            try:
                res = fn(chunk)
            except Exception as e:
                if not is_oom(e):
                    raise
                del e
                self._free()
                if bs <= 1:
                    raise OutOfMemoryAtBatchOne("out of memory even with a batch of 1 pair")
                self.batch_size = max(1, bs // 2)
                self.stats.oom_events += 1
                continue
            out.extend(res)
            i += len(chunk)
        return out

    # -- pairs -------------------------------------------------------------------------------
    def _check(self, d: Decoded, side: str) -> str | None:
        if d.error is not None:
            return f"{side}: {d.error}"
        h, w = d.hw
        if min(h, w) < self.min_size:
            return f"{side}: image of {h}x{w} is smaller than the {self.net} trunk's minimum of {self.min_size}x{self.min_size} pixels (use --resize)"
        return None

    def score_window(self, specs: Sequence[PairSpec], items: list, ref: Decoded | None = None) -> list[Row]:
        """Rows for one window of decoded items ``(index, Decoded0, Decoded1)``."""
        rows: list[Row] = []
        good = []
        for idx, d0, d1 in items:
            s = specs[idx]
            if s.error is not None:
                rows.append(Row(s.key0, s.key1, None, s.error, idx))
                continue
            if d0 is None:
                d0 = ref
            err = self._check(d0, "path0") or self._check(d1, "path1")
            if err is None and d0.hw != d1.hw:
                err = f"size mismatch: {d0.hw[0]}x{d0.hw[1]} vs {d1.hw[0]}x{d1.hw[1]} (use --resize HxW)"
            if err is not None:
                rows.append(Row(s.key0, s.key1, None, err, idx))
                continue
            good.append((idx, d0, d1))

        def score(chunk):
            with torch.inference_mode():
                f = self.features([c[1] for c in chunk] + [c[2] for c in chunk])
                n = len(chunk)
                d = self.distances([t[:n] for t in f], [t[n:] for t in f])
                return d.detach().to("cpu", torch.float64).tolist()

        engine = self.use_engine and ref is None
        for _, group in bucket_by_size(good, key=lambda t: t[1].hw).items():
            try:
                vals = self._score_engine(group) if engine else self.run_chunks(group, score)
            except OutOfMemoryAtBatchOne as e:
                rows.extend(Row(specs[i].key0, specs[i].key1, None, str(e), i) for i, _, _ in group)
                continue
            except Exception as e:  # never lose the rows: report the failure on each of them
                msg = f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
                rows.extend(Row(specs[i].key0, specs[i].key1, None, msg, i) for i, _, _ in group)
                continue
            for (i, _, _), v in zip(group, vals):
                rows.append(Row(specs[i].key0, specs[i].key1, float(v), None, i))
        rows.sort(key=lambda r: r.index)
        return rows

    def iter_pairs(
        self,
        specs: Sequence[PairSpec],
        *,
        skip: set | None = None,
        ref_file: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[list[Row]]:
        """Rows of ``specs`` (minus the ``(path0, path1)`` keys in ``skip``), one list per window.

        Under torchrun every rank must call this with the same ``specs``; rank 0 yields every
        rank's rows (in job order), the other ranks yield nothing.
        """
        ctx = self.ctx
        if ctx.enabled:
            mine, theirs = _specs_digest(specs), ctx.broadcast(_specs_digest(specs))
            if mine != theirs:
                raise RuntimeError("ranks disagree on the list of pairs (do all ranks see the same files?)")
        if ctx.is_main:
            skip = skip or set()
            todo = [i for i, s in enumerate(specs) if (s.key0, s.key1) not in skip]
        else:
            todo = None
        todo = ctx.broadcast(todo) if ctx.enabled else todo
        ref = None
        if ref_file is not None and todo:
            ref = decode_file(ref_file, resize=self.resize, max_pixels=self.max_pixels)
            if ref.ok and min(ref.hw) >= self.min_size:
                try:
                    self.pin(ref)
                except Exception as e:
                    if not is_oom(e):
                        raise
        window = self.initial_batch_size
        mine_idx = shard(todo, ctx)
        rounds = windows_per_rank(len(todo), window, ctx)
        ds = PairDataset(specs, mine_idx, resize=self.resize, max_pixels=self.max_pixels, probe=self._probe())
        it = iter(iter_windows(ds, window, self.workers))
        for _ in range(rounds):
            items = next(it, [])
            rows = self.score_window(specs, items, ref)
            if ctx.enabled:
                parts = ctx.gather(rows)
                if not ctx.is_main:
                    continue
                rows = sorted((r for p in parts for r in p), key=lambda r: r.index)
            if on_progress is not None:
                on_progress(len(rows))
            yield rows

    # -- single images (all pairs) -----------------------------------------------------------
    def iter_image_features(self, files: Sequence[str], indices: Sequence[int]) -> Iterator[tuple[int, Decoded, list | str]]:
        """``(index, decoded, features-on-CPU or error reason)`` for each image of ``indices``."""
        ds = ImageDataset(files, indices, resize=self.resize, max_pixels=self.max_pixels, probe=self._probe())
        for items in iter_windows(ds, self.initial_batch_size, self.workers):
            ok = []
            for idx, d in items:
                err = self._check(d, "path")
                if err is not None:
                    yield idx, d, err[len("path: "):]
                else:
                    ok.append((idx, d))

            def feats(chunk):
                with torch.inference_mode():
                    f = self.features([c[1] for c in chunk])
                    f = [t.detach().to("cpu") for t in f]
                return [[t[j] for t in f] for j in range(len(chunk))]

            for _, group in bucket_by_size(ok, key=lambda t: t[1].hw).items():
                try:
                    res = self.run_chunks(group, feats)
                except Exception as e:
                    msg = str(e) if isinstance(e, OutOfMemoryAtBatchOne) else f"internal error: {type(e).__name__}: {e}"
                    for idx, d in group:
                        yield idx, d, msg
                    continue
                for (idx, d), f in zip(group, res):
                    d.drop_pixels()  # keep memory bounded: only the features are kept
                    yield idx, d, f


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# -- public API ------------------------------------------------------------------------------
def _session(
    net, version, model, device, dtype, batch_size, workers, resize, max_pixels, cache, cache_max_bytes, distributed
) -> Session:
    """The Session behind the public ``evaluate_*`` functions (their keyword arguments, in order)."""
    device = _auto_device(device, model)
    ctx = None
    if distributed:
        from .distributed import init_from_env

        ctx, dev = init_from_env(None if device is None else str(device))
        device = dev if ctx.enabled else device
    m = build_model(net, version, model=model)
    if isinstance(cache, (str, os.PathLike)):
        from .feature_cache import FeatureCache

        cache = FeatureCache(cache, max_bytes=cache_max_bytes)
    return Session(
        m, device=device, dtype=dtype, batch_size=batch_size, workers=workers, resize=resize, max_pixels=max_pixels, cache=cache, ctx=ctx
    )


def _collect(session: Session, specs, ref_file=None, progress=False) -> list[Row]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="pair")
    out: list[Row] = []
    try:
        for rows in session.iter_pairs(specs, ref_file=ref_file, on_progress=(bar.update if bar else None)):
            out.extend(rows)
    finally:
        if bar is not None:
            bar.close()
    return out


_API_DOC = """
    Keyword arguments (all optional): ``net`` ('alex', 'vgg', 'squeeze'), ``version`` ('0.1'),
    ``model`` (a ready ``lpips_fast.LPIPS``; overrides net/version), ``device`` (default: the
    model's, else CUDA when available), ``dtype`` (torch dtype or 'float32'/'float16'/'bfloat16'),
    ``batch_size`` (pairs per trunk batch; halved on out-of-memory), ``workers`` (DataLoader
    decoding processes; 0 decodes in this process), ``resize`` ('HxW' or (H, W)), ``max_pixels``
    (decompression-bomb limit; default Pillow's MAX_IMAGE_PIXELS, 89,478,485), ``cache`` (a feature-cache
    directory or ``FeatureCache``), ``cache_max_bytes``, ``progress`` (a tqdm bar),
    ``distributed`` (under torchrun: join the process group from the environment and shard the
    pairs; rank 0 gets every row, the other ranks an empty list).
    Returns a list of ``Row(path0, path1, lpips, error)``; ``lpips`` is None on an error row.
"""


def evaluate_pairs(
    pairs: Iterable[Sequence[str]],
    *,
    net: str = "alex",
    version: str = "0.1",
    model=None,
    device=None,
    dtype=None,
    batch_size: int = 32,
    workers: int = 0,
    resize=None,
    max_pixels: int | None = None,
    cache=None,
    cache_max_bytes: int | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> list[Row]:
    s = _session(
        net, version, model, device, dtype, batch_size, workers, resize, max_pixels, cache, cache_max_bytes, distributed
    )
    return _collect(s, pair_specs(pairs), progress=progress)


def evaluate_dirs(
    dir0: str | os.PathLike,
    dir1: str | os.PathLike,
    *,
    net: str = "alex",
    version: str = "0.1",
    model=None,
    device=None,
    dtype=None,
    batch_size: int = 32,
    workers: int = 0,
    resize=None,
    max_pixels: int | None = None,
    cache=None,
    cache_max_bytes: int | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> list[Row]:
    s = _session(
        net, version, model, device, dtype, batch_size, workers, resize, max_pixels, cache, cache_max_bytes, distributed
    )
    return _collect(s, dir_specs(os.fspath(dir0), os.fspath(dir1)), progress=progress)


def evaluate_ref(
    ref: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    net: str = "alex",
    version: str = "0.1",
    model=None,
    device=None,
    dtype=None,
    batch_size: int = 32,
    workers: int = 0,
    resize=None,
    max_pixels: int | None = None,
    cache=None,
    cache_max_bytes: int | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> list[Row]:
    s = _session(
        net, version, model, device, dtype, batch_size, workers, resize, max_pixels, cache, cache_max_bytes, distributed
    )
    ref = os.fspath(ref)
    return _collect(s, ref_specs(ref, os.fspath(directory)), ref_file=ref, progress=progress)


evaluate_pairs.__doc__ = "LPIPS of explicit ``(path0, path1)`` file pairs, one row each.\n" + _API_DOC
evaluate_dirs.__doc__ = (
    "LPIPS of every file with the same relative path under ``dir0`` and ``dir1`` (recursive); a file in only one "
    "folder is an error row. Paths in the rows are relative to their folder.\n" + _API_DOC
)
evaluate_ref.__doc__ = (
    "LPIPS of one reference image (``path0``, decoded and run through the trunk once) against every image under "
    "``directory`` (``path1``, relative).\n" + _API_DOC
)


def _auto_device(device, model):
    if device is not None:
        return device
    if model is not None:
        return None  # the model's own device
    return "cuda" if torch.cuda.is_available() else "cpu"
