"""Dataset-scale evaluation: paired folders, one reference against a folder, lists of pairs.

    rows = lpips_fast.evaluate_dirs("out/", "gt/", net="alex")        # list of Row
    rows = lpips_fast.evaluate_ref("ref.png", "samples/")
    rows = lpips_fast.evaluate_pairs([("a.png", "b.png"), ...])

Each ``Row`` has ``path0, path1, lpips, error``: a pair that cannot be scored (missing,
unreadable, corrupt or truncated file, not a regular file, decompression bomb, size mismatch
without ``resize``, image smaller than the trunk allows) is a row with ``lpips=None`` and a
reason in ``error``; nothing is dropped and nothing raises.

A job is a list of ``PairSpec`` (``dir_specs``, ``ref_specs``, ``pair_specs``). ``PairEvaluation``
turns it into rows window by window: files are decoded in DataLoader workers, features and
distances come from a ``FeatureSource``, and under ``torchrun`` the windows are sharded over the
ranks and gathered on rank 0 in job order. ``run_to_output`` adds the output file: resume (skip
the rows already written), the settings check, streaming writes and the running statistics.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .data import REF, Decoded, PairDataset, PairSpec, bucket_by_size, iter_windows, list_images
from .distributed import DistContext, shard, windows_per_rank
from .features import FeatureSource, OutOfMemoryAtBatchOne, is_oom
from ..model_cache import build_model
from .options import EvalOptions
from .writers import Row, RunOutput, Stats

__all__ = [
    "evaluate_dirs",
    "evaluate_ref",
    "evaluate_pairs",
    "evaluate_specs",
    "EvalOptions",
    "PairEvaluation",
    "RunResult",
    "run_to_output",
    "start",
    "build_model",
    "dir_specs",
    "ref_specs",
    "pair_specs",
    "spec_files",
    "Row",
    "is_oom",
]


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


def spec_files(specs: Sequence[PairSpec], ref_file: str | None = None) -> list[str]:
    """Every input file named by ``specs`` (for the "output is an input" check)."""
    files = [f for s in specs for f in (s.file0, s.file1) if f and f != REF]
    return files + ([ref_file] if ref_file else [])


def _specs_digest(specs: Sequence[PairSpec]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for s in specs:
        h.update(f"{s.key0}\0{s.key1}\0{s.error}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# -- setting up ------------------------------------------------------------------------------
def start(options: EvalOptions) -> tuple[DistContext, torch.device | None]:
    """The torchrun context (joined when ``options.distributed``) and this rank's device."""
    from .options import resolve_device

    device = resolve_device(options.device, options.model)
    if not options.distributed:
        return DistContext(), device
    from .distributed import init_from_env

    ctx, dev = init_from_env(None if device is None else str(device))
    return ctx, (torch.device(dev) if ctx.enabled else device)


# -- pairs -> rows ---------------------------------------------------------------------------
class PairEvaluation:
    """Rows of a list of ``PairSpec`` from a ``FeatureSource``, sharded over the torchrun ranks."""

    def __init__(self, source: FeatureSource, ctx: DistContext | None = None):
        self.source = source
        self.ctx = ctx or DistContext()

    def score_window(self, specs: Sequence[PairSpec], items: list, ref: Decoded | None = None) -> list[Row]:
        """Rows for one window of decoded items ``(index, Decoded0, Decoded1)``."""
        src = self.source
        rows: list[Row] = []
        good = []
        for idx, d0, d1 in items:
            s = specs[idx]
            if s.error is not None:
                rows.append(Row(s.key0, s.key1, None, s.error, idx))
                continue
            d0 = ref if d0 is None else d0
            err = src.check(d0, "path0") or src.check(d1, "path1")
            if err is None and d0.hw != d1.hw:
                err = f"size mismatch: {d0.hw[0]}x{d0.hw[1]} vs {d1.hw[0]}x{d1.hw[1]} (use --resize HxW)"
            if err is not None:
                rows.append(Row(s.key0, s.key1, None, err, idx))
            else:
                good.append((idx, d0, d1))
        for group in bucket_by_size(good, key=lambda t: t[1].hw).values():
            try:
                vals = src.pair_distances([g[1] for g in group], [g[2] for g in group])
            except OutOfMemoryAtBatchOne as e:
                vals, msg = None, str(e)
            except Exception as e:  # never lose the rows: report the failure on each of them
                vals, msg = None, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
            for k, (i, _, _) in enumerate(group):
                s = specs[i]
                rows.append(Row(s.key0, s.key1, float(vals[k]), None, i) if vals is not None else Row(s.key0, s.key1, None, msg, i))
        rows.sort(key=lambda r: r.index)
        return rows

    def iter_rows(
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
        ctx, src = self.ctx, self.source
        if ctx.enabled and _specs_digest(specs) != ctx.broadcast(_specs_digest(specs)):
            raise RuntimeError("ranks disagree on the list of pairs (do all ranks see the same files?)")
        todo = [i for i, s in enumerate(specs) if (s.key0, s.key1) not in (skip or set())] if ctx.is_main else None
        todo = ctx.broadcast(todo) if ctx.enabled else todo
        ref = None
        if ref_file is not None and todo:
            ref = src.decode(ref_file)
            if src.check(ref, "ref") is None:
                try:
                    src.pin(ref)
                except Exception as e:
                    if not is_oom(e):
                        raise
        window = src.initial_batch_size
        ds = PairDataset(specs, shard(todo, ctx), resize=src.resize, max_pixels=src.max_pixels, probe=src.probe())
        it = iter(iter_windows(ds, window, src.workers))
        for _ in range(windows_per_rank(len(todo), window, ctx)):
            rows = self.score_window(specs, next(it, []), ref)
            if ctx.enabled:
                parts = ctx.gather(rows)
                if not ctx.is_main:
                    continue
                rows = sorted((r for p in parts for r in p), key=lambda r: r.index)
            if on_progress is not None:
                on_progress(len(rows))
            yield rows


def totals(source: FeatureSource, ctx: DistContext) -> dict | None:
    """Out-of-memory retries and cache counts summed over the ranks (the smallest batch size);
    None off rank 0. Every rank must call it."""
    c = source.cache
    mine = {"oom": source.stats.oom_events, "batch_size": source.batch_size,
            "hits": c.hits if c is not None else 0, "misses": c.misses if c is not None else 0}
    parts = ctx.gather(mine)
    if parts is None:
        return None
    return {"oom": sum(p["oom"] for p in parts), "batch_size": min(p["batch_size"] for p in parts),
            "hits": sum(p["hits"] for p in parts), "misses": sum(p["misses"] for p in parts),
            "initial_batch_size": source.initial_batch_size, "cached": c is not None}


# -- runs with an output file ----------------------------------------------------------------
@dataclass
class RunResult:
    """What a run did: statistics over every row (kept and new), rows scored now, rows kept from
    a resumed output, the summed counters of ``totals`` (None off rank 0), the elapsed time."""

    stats: Stats
    scored: int
    resumed: int
    totals: dict | None
    elapsed: float
    is_main: bool = True
    rows: list | None = None  # the rows themselves when no output file was given (``pair``)


def progress_bar(total: int, unit: str, show: bool):
    """A tqdm bar on stderr when ``show``, else None."""
    if not show:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)


def run_to_output(
    specs: Sequence[PairSpec],
    source: FeatureSource,
    ctx: DistContext,
    output: RunOutput | None,
    *,
    ref_file: str | None = None,
    show_progress: bool = False,
    keep_rows: bool = False,
) -> RunResult:
    """Score ``specs`` into ``output`` (rank 0 writes; checked beforehand with ``output.check``):
    rows already in a resumed output are kept and skipped."""
    t0 = time.perf_counter()
    writer, existing = output.open() if (output is not None and ctx.is_main) else (None, None)
    kept = existing.rows if existing is not None else []
    stats = Stats()
    for r in kept:
        stats.add(r)
    bar = progress_bar(max(0, len(specs) - len(kept)), "pair", show_progress and ctx.is_main)
    scored, rows_out = 0, []
    try:
        for rows in PairEvaluation(source, ctx).iter_rows(
            specs, skip=existing.keys if existing is not None else None, ref_file=ref_file, on_progress=(bar.update if bar else None)
        ):
            if writer is not None:
                writer.write(rows)
            if keep_rows:
                rows_out.extend(rows)
            for r in rows:
                stats.add(r)
            scored += len(rows)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    tot = totals(source, ctx)
    return RunResult(stats, scored, len(kept), tot, time.perf_counter() - t0, ctx.is_main, rows_out if keep_rows else None)


# -- public API ------------------------------------------------------------------------------
def evaluate_specs(specs: Sequence[PairSpec], options: EvalOptions, *, ref_file: str | None = None) -> list[Row]:
    """Rows of ``specs`` with ``options`` (a list; under torchrun rank 0 gets every row, the
    other ranks an empty list)."""
    options = options.validate()
    ctx, device = start(options)
    source = FeatureSource.from_options(options, device)
    bar = progress_bar(len(specs), "pair", options.progress and ctx.is_main)
    out: list[Row] = []
    try:
        for rows in PairEvaluation(source, ctx).iter_rows(specs, ref_file=ref_file, on_progress=(bar.update if bar else None)):
            out.extend(rows)
    finally:
        if bar is not None:
            bar.close()
    ctx.close(barrier=True)  # a group joined for this call is left here, not at interpreter exit
    return out


_API_DOC = """
    Keyword arguments (all optional; they fill an ``EvalOptions``): ``net`` ('alex', 'vgg',
    'squeeze'), ``version`` ('0.1'), ``model`` (a ready ``lpips_fast.LPIPS``; overrides
    net/version), ``device`` (default: the model's, else CUDA when available), ``dtype`` (torch
    dtype or 'float32'/'float16'/'bfloat16'), ``batch_size`` (pairs per trunk batch; halved on
    out-of-memory), ``workers`` (DataLoader decoding processes; 0 decodes in this process),
    ``resize`` ('HxW' or (H, W)), ``max_pixels`` (decompression-bomb limit; default Pillow's
    MAX_IMAGE_PIXELS, 89,478,485), ``cache`` (a feature-cache directory or ``FeatureCache``),
    ``cache_max_bytes``, ``progress`` (a tqdm bar), ``distributed`` (under torchrun: join the
    process group from the environment and shard the pairs; rank 0 gets every row, the other
    ranks an empty list). Models built from ``net``/``version`` are kept and reused by later calls.
    Returns a list of ``Row(path0, path1, lpips, error)``; ``lpips`` is None on an error row.
"""


def _options(**kw) -> EvalOptions:
    return EvalOptions(**kw)


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
    opts = _options(net=net, version=version, model=model, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
                    resize=resize, max_pixels=max_pixels, cache=cache, cache_max_bytes=cache_max_bytes, progress=progress,
                    distributed=distributed)
    return evaluate_specs(pair_specs(pairs), opts)


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
    opts = _options(net=net, version=version, model=model, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
                    resize=resize, max_pixels=max_pixels, cache=cache, cache_max_bytes=cache_max_bytes, progress=progress,
                    distributed=distributed)
    return evaluate_specs(dir_specs(os.fspath(dir0), os.fspath(dir1)), opts)


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
    opts = _options(net=net, version=version, model=model, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
                    resize=resize, max_pixels=max_pixels, cache=cache, cache_max_bytes=cache_max_bytes, progress=progress,
                    distributed=distributed)
    ref = os.fspath(ref)
    return evaluate_specs(ref_specs(ref, os.fspath(directory)), opts, ref_file=ref)


evaluate_pairs.__doc__ = "LPIPS of explicit ``(path0, path1)`` file pairs, one row each.\n" + _API_DOC
evaluate_dirs.__doc__ = (
    "LPIPS of every file with the same relative path under ``dir0`` and ``dir1`` (recursive); a file in only one "
    "folder is an error row. Paths in the rows are relative to their folder.\n" + _API_DOC
)
evaluate_ref.__doc__ = (
    "LPIPS of one reference image (``path0``, decoded and run through the trunk once) against every image under "
    "``directory`` (``path1``, relative).\n" + _API_DOC
)
