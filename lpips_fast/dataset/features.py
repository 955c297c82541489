"""``FeatureSource``: trunk features and pair distances of decoded images, on one device.

Decoded images (``data.Decoded``) go through the feature cache (when there is one), else the
trunk; features pinned for the whole run (a reference image) are computed once. Pairs are
scored by the model's own combination step (``LPIPS.distances``), or, on CUDA without a cache,
by ``Engine`` fed through ``PinnedPipeline``.

Out-of-memory handling lives in one place, ``FeatureSource.run_halving``: a batch that does not
fit is retried at half the size (down to one pair), and the smaller size is kept for the rest of
the run (``stats.oom_events``). A batch of one pair that does not fit raises
``OutOfMemoryAtBatchOne``, which callers turn into error rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from .data import Decoded, ImageDataset, bucket_by_size, decode_file, iter_windows, parse_resize, to_model_input
from .options import parse_dtype

__all__ = ["FeatureSource", "SourceStats", "OutOfMemoryAtBatchOne", "is_oom", "same_image"]

T = TypeVar("T")


def same_image(d0: Decoded, d1: Decoded) -> bool:
    """Whether two decoded images are bitwise equal: the same file content (same decoding), or
    equal pixels when both are at hand."""
    if d0.digest is not None and d0.digest == d1.digest:
        return True
    return d0.array is not None and d1.array is not None and np.array_equal(d0.array, d1.array)


def is_oom(e: BaseException) -> bool:
    """True for device or host out-of-memory errors."""
    oom_t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_t and isinstance(e, oom_t):
        return True
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e).lower()
        return "out of memory" in msg or "can't allocate memory" in msg
    return False


class OutOfMemoryAtBatchOne(RuntimeError):
    """Out of memory even with one pair (or image) per batch."""


@dataclass
class SourceStats:
    trunk_images: int = 0
    trunk_calls: int = 0
    oom_events: int = 0


class FeatureSource:
    """A frozen LPIPS model on a device/dtype, an optional feature cache and the run's decoding options.

    ``batch_size`` counts pairs (or images) per trunk batch; ``run_halving`` lowers it on
    out-of-memory. ``fingerprint`` (of the trunk weights) keys the cache; computed when None.
    """

    def __init__(
        self,
        model,
        *,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
        workers: int = 0,
        resize=None,
        max_pixels: int | None = None,
        cache=None,
        engine: bool | None = None,
        compile: bool = False,
        fingerprint: str | None = None,
    ):
        from ..nets import canonical_net_name

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = parse_dtype(dtype)
        self.net = canonical_net_name(model.pnet_type)
        self.version = model.version
        self.min_size = int(model.net.min_size)
        self.batch_size = max(1, int(batch_size))
        self.initial_batch_size = self.batch_size
        self.workers = max(0, int(workers))
        self.resize = parse_resize(resize)
        self.max_pixels = max_pixels
        self.cache = cache
        self.fingerprint = ""
        if cache is not None:
            if fingerprint is None:
                from .feature_cache import model_fingerprint

                fingerprint = model_fingerprint(model)
            self.fingerprint = fingerprint
        self.stats = SourceStats()
        self._pinned: dict[str, list[torch.Tensor]] = {}
        # Engine (CUDA graphs, uint8 over the bus) for plain pairs on CUDA without a cache.
        self.use_engine = cache is None and (self.device.type == "cuda" if engine is None else bool(engine))
        self.compile = bool(compile)
        self._pipe = None

    @classmethod
    def from_options(cls, options, device: torch.device | None = None) -> "FeatureSource":
        """The source of an ``EvalOptions`` on ``device`` (None: the ready model's own device,
        else the CPU), with the model shared across calls (``model_cache.shared_model``)."""
        import os

        from ..model_cache import model_fingerprint_cached, shared_model

        dtype = parse_dtype(options.dtype)
        if device is None:
            try:
                device = next(options.model.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        model = shared_model(options, torch.device(device), dtype)
        cache = options.cache
        if isinstance(cache, (str, os.PathLike)):
            from .feature_cache import FeatureCache

            cache = FeatureCache(cache, max_bytes=options.cache_max_bytes)
        return cls(
            model, dtype=dtype, batch_size=options.batch_size, workers=options.workers, resize=options.resize,
            max_pixels=options.max_pixels, cache=cache, engine=options.engine, compile=options.compile,
            fingerprint=model_fingerprint_cached(model) if cache is not None else None,
        )

    # -- out of memory: the one halving loop --------------------------------------------------
    def run_halving(self, attempt: Callable[[int], T], on_oom: Callable[[], None] | None = None) -> T:
        """``attempt(batch_size)``; on out-of-memory free memory, halve ``batch_size`` and retry."""
        while True:
            bs = self.batch_size
            try:
                return attempt(bs)
            except Exception as e:
                if not is_oom(e):
                    raise
                del e
                if on_oom is not None:
                    on_oom()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if bs <= 1:
                    raise OutOfMemoryAtBatchOne("out of memory even with a batch of 1 pair") from None
                self.batch_size = max(1, bs // 2)
                self.stats.oom_events += 1

    def run_chunks(self, items: list, fn: Callable[[list], list]) -> list:
        """``fn`` over ``items`` in chunks of ``batch_size`` (halved on out-of-memory)."""
        out: list = []
        i = 0
        while i < len(items):
            res = self.run_halving(lambda bs: fn(items[i : i + bs]))
            out.extend(res)
            i += len(res)
        return out

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, path: str) -> Decoded:
        return decode_file(path, resize=self.resize, max_pixels=self.max_pixels)

    def check(self, d: Decoded, side: str) -> str | None:
        """Why ``d`` cannot be scored (``side: reason``), or None."""
        if d.error is not None:
            return f"{side}: {d.error}"
        h, w = d.hw
        if min(h, w) < self.min_size:
            return f"{side}: image of {h}x{w} is smaller than the {self.net} trunk's minimum of {self.min_size}x{self.min_size} pixels (use --resize)"
        return None

    def probe(self):
        """For decoding workers: a picklable "are these features cached?" check (None without a cache)."""
        if self.cache is None:
            return None
        from .feature_cache import CacheProbe

        return CacheProbe(self.cache.root, self.net, self.version, self.dtype, self.fingerprint)

    # -- features ----------------------------------------------------------------------------
    def _trunk(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        x = to_model_input(arrays, self.device, self.dtype)
        self.stats.trunk_calls += 1
        self.stats.trunk_images += len(arrays)
        return self.model.features(x)

    def _cache_key(self, d: Decoded) -> str | None:
        if d.digest is None:
            return None
        from .feature_cache import feature_key

        return feature_key(d.digest, self.net, self.version, d.hw, self.dtype, self.fingerprint)

    def features(self, decs: Sequence[Decoded]) -> list[torch.Tensor]:
        """Per-layer (B, C, h, w) features of same-size images: pinned, cached or from the trunk."""
        ids = [d.digest or f"obj{id(d)}" for d in decs]
        first: dict[str, Decoded] = {}
        for k, d in zip(ids, decs):
            first.setdefault(k, d)
        have = {k: self._pinned[k] for k in first if k in self._pinned}
        need = [k for k in first if k not in have]
        ckeys: dict[str, str | None] = {}
        if self.cache is not None and need:
            ckeys = {k: self._cache_key(first[k]) for k in need}
            got = self.cache.get_many([c for c in ckeys.values() if c])
            for k in need:
                c = ckeys.get(k)
                if c and c in got:
                    have[k] = [t.to(self.device, self.dtype, non_blocking=True) for t in got[c]]
        miss = [k for k in need if k not in have]
        for k in miss:
            if first[k].array is None:  # decoding was skipped for a cache hit that has gone since
                first[k] = self._redecode(first[k])
        if miss:
            out = self._trunk([first[k].array for k in miss])
            if self.cache is not None:
                self._cache_put(miss, ckeys, out)
            if len(miss) == len(ids) and not have:  # every image computed now, no duplicates
                return out
            for j, k in enumerate(miss):
                have[k] = [f[j] for f in out]
        return [torch.stack([have[k][l] for k in ids]) for l in range(len(have[ids[0]]))]

    def _redecode(self, d: Decoded) -> Decoded:
        nd = self.decode(d.path)
        if nd.error is not None or nd.hw != d.hw:
            raise RuntimeError(f"{d.path}: changed during the run ({nd.error or 'new size'})")
        return nd

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

    # -- distances ---------------------------------------------------------------------------
    def distances(self, f0: list[torch.Tensor], f1: list[torch.Tensor], same: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) LPIPS values from per-layer features (the model's own combination step); pairs
        marked in ``same`` hold bitwise-equal images and score exactly 0."""
        return self.model.distances(f0, f1, spatial=False, same=same).view(-1)

    def pair_distances(self, d0s: Sequence[Decoded], d1s: Sequence[Decoded]) -> list[float]:
        """LPIPS of same-size decoded pairs ``(d0s[k], d1s[k])``, in batches of ``batch_size``."""
        pairs = list(zip(d0s, d1s))
        if self.use_engine and not self._pinned:
            return self._engine_distances(pairs)

        def score(chunk):
            same = torch.tensor([same_image(a, b) for a, b in chunk], device=self.device)  # before pixels are dropped
            with torch.inference_mode():
                f = self.features([c[0] for c in chunk] + [c[1] for c in chunk])
                n = len(chunk)
                return self.distances([t[:n] for t in f], [t[n:] for t in f], same).to("cpu", torch.float64).tolist()

        return self.run_chunks(pairs, score)

    def _pipeline(self):
        if self._pipe is None:
            from ..inference.engine import Engine
            from ..inference.pipeline import PinnedPipeline

            eng = Engine(model=self.model, device=self.device, dtype=self.dtype, compile=self.compile, batch_size=self.batch_size)
            self._pipe = PinnedPipeline(eng, slots=3)
        return self._pipe

    def _drop_pipeline(self) -> None:
        self._pipe = None  # its graphs and buffers were sized for the old batch

    def _engine_distances(self, pairs: list) -> list[float]:
        def attempt(bs: int) -> list[float]:
            def batches():
                for lo in range(0, len(pairs), bs):
                    ch = pairs[lo : lo + bs]
                    a = torch.from_numpy(np.stack([c[0].array for c in ch])).permute(0, 3, 1, 2)
                    b = torch.from_numpy(np.stack([c[1].array for c in ch])).permute(0, 3, 1, 2)
                    self.stats.trunk_calls += 1
                    self.stats.trunk_images += 2 * len(ch)
                    yield a, b

            out: list[float] = []
            for d in self._pipeline().map(batches()):
                out.extend(d.reshape(-1).to(torch.float64).tolist())
            return out

        return self.run_halving(attempt, on_oom=self._drop_pipeline)

    def spatial_map(self, d0: Decoded, d1: Decoded) -> tuple[torch.Tensor, float]:
        """The reference's ``spatial=True`` map of one same-size pair, (H, W) float32 on the CPU
        (each layer's map upsampled bilinearly to the image size and summed), and the scalar LPIPS."""
        with torch.inference_mode():
            f = self.model.features(to_model_input([d0.array, d1.array], self.device, self.dtype))
            f0, f1 = [t[:1] for t in f], [t[1:] for t in f]
            heat = self.model.distances(f0, f1, out_hw=d0.hw, spatial=True)
            total = self.model.distances(f0, f1, spatial=False)
        return heat[0, 0].to("cpu", torch.float32), float(total.view(-1)[0])

    # -- single images -----------------------------------------------------------------------
    def image_features(self, files: Sequence[str], indices: Sequence[int]) -> Iterator[tuple[int, Decoded, list | str]]:
        """``(index, decoded, per-layer features on the CPU or an error reason)`` per image of
        ``indices``, decoded in ``workers`` processes; the pixels are dropped once features exist."""
        ds = ImageDataset(files, indices, resize=self.resize, max_pixels=self.max_pixels, probe=self.probe())
        for items in iter_windows(ds, self.initial_batch_size, self.workers):
            ok = []
            for idx, d in items:
                err = self.check(d, "path")
                if err is not None:
                    yield idx, d, err[len("path: "):]
                else:
                    ok.append((idx, d))

            def feats(chunk):
                with torch.inference_mode():
                    f = [t.detach().to("cpu") for t in self.features([c[1] for c in chunk])]
                return [[t[j] for t in f] for j in range(len(chunk))]

            for group in bucket_by_size(ok, key=lambda t: t[1].hw).values():
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
