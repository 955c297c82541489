"""All-pairs evaluation of a folder (diversity): rows, summary statistics, the distance matrix.

``evaluate_all_pairs`` decodes every image under a folder once and runs it through the trunk
once (sharded over torchrun ranks, gathered on rank 0). Images whose size differs from the most
common size, or that cannot be decoded, are error rows. The pairs are then all pairs i < j (one
blockwise GEMM, ``pairwise.gram_distances``, optionally written block by block into a
memory-mapped ``.npy``) or ``pairs`` random distinct pairs drawn from ``seed``. Rows stream into
a ``RunOutput`` (resume skips the pairs already written).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import torch

from .data import list_images
from .distributed import DistContext, shard
from .evaluate import RunResult, progress_bar, totals
from .features import FeatureSource
from .pairwise import (
    column_scale, content_ids, flatten_unit_features, gram_distances, pair_distances, sample_pairs, weights_nonneg,
)  # fmt: skip
from .writers import Row, RunOutput, Stats

__all__ = ["evaluate_all_pairs", "image_files"]

_ROWS_PER_WRITE = 20000


def image_files(directory: str) -> tuple[list[str], list[str]]:
    """(relative names, paths) of the images under ``directory``."""
    rels = list_images(directory)
    return rels, [os.path.join(directory, r) for r in rels]


def _gather_features(source: FeatureSource, files: list[str], ctx: DistContext, show_progress: bool):
    """Rank 0: ``[(index, (hw, layer shapes, file digest) or None, xhat row or error)]`` sorted by index."""
    bar = progress_bar(len(files), "img", show_progress and ctx.is_main and not ctx.enabled)
    mine = []
    for idx, d, f in source.image_features(files, shard(list(range(len(files))), ctx)):
        if isinstance(f, str):
            mine.append((idx, None, f))
        else:
            hs = (d.hw, [tuple(t.shape) for t in f], d.digest)
            mine.append((idx, hs, flatten_unit_features([t.unsqueeze(0) for t in f])[0]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    parts = ctx.gather(mine)
    return None if parts is None else sorted((it for p in parts for it in p), key=lambda t: t[0])


def _majority(got, rels):
    """Keep the images of the most common size: (kept indices, layer shapes, error rows)."""
    sizes = Counter(hs[0] for _, hs, _ in got if hs is not None)
    major = sizes.most_common(1)[0][0] if sizes else None
    shapes, bad, ok = None, [], []
    for idx, hs, v in got:
        if hs is None:
            bad.append(Row(rels[idx], "", None, v, idx))
        elif hs[0] != major:
            hw = hs[0]
            bad.append(Row(rels[idx], "", None, f"size {hw[0]}x{hw[1]} differs from the most common size {major[0]}x{major[1]} (use --resize HxW)", idx))
        else:
            ok.append(idx)
            shapes = hs[1]
    return ok, shapes, bad


def _stack(got, ok: list[int]) -> torch.Tensor:
    """One (m, K) matrix of the kept rows, each image's row freed as it is copied (no 2x peak)."""
    keep = set(ok)
    V = None
    t = 0
    for k, (idx, hs, v) in enumerate(got):
        if idx in keep:
            if V is None:
                V = torch.empty(len(ok), v.numel())
            V[t] = v
            t += 1
            got[k] = (idx, hs, None)
    return V


def evaluate_all_pairs(
    directory: str,
    source: FeatureSource,
    ctx: DistContext,
    output: RunOutput,
    *,
    pairs: int | None = None,
    seed: int = 0,
    matrix: str | None = None,
    listing: tuple[list[str], list[str]] | None = None,
    show_progress: bool = False,
) -> RunResult:
    """LPIPS over all pairs (or ``pairs`` random pairs) of the images under ``directory``.

    Every rank must call it; rank 0 writes ``output`` and, when given, ``matrix`` (an (M, M)
    float32 ``.npy`` of the M kept images, their names in ``<matrix stem>.paths.txt``).
    ``listing``: ``image_files(directory)`` when the caller has it already.
    """
    t0 = time.perf_counter()
    rels, files = listing if listing is not None else image_files(directory)
    got = _gather_features(source, files, ctx, show_progress)
    tot = totals(source, ctx)
    if not ctx.is_main:
        return RunResult(Stats(), 0, 0, None, time.perf_counter() - t0, False)
    ok, shapes, bad = _majority(got, rels)
    m = len(ok)
    V = _stack(got, ok) if m else None
    keep = set(ok)
    digests = [hs[2] for idx, hs, _ in got if idx in keep]
    same = None if any(k is None for k in digests) else content_ids(digests)  # equal files score exactly 0
    del got
    weights = source.model.lin_weights()
    clamp = weights_nonneg(weights)
    writer, existing = output.open()
    stats = Stats()
    for r in existing.rows:
        stats.add(r)
    skip = existing.keys
    scored = 0

    def emit(rows):
        nonlocal scored
        rows = [r for r in rows if r.key not in skip]
        if writer is not None and rows:
            writer.write(rows)
        for r in rows:
            stats.add(r)
        scored += len(rows)

    try:
        emit(bad)
        names = [rels[i] for i in ok]
        if m >= 2:
            scale = column_scale(shapes, weights)
            if pairs is not None:
                a, b = sample_pairs(m, min(pairs, m * (m - 1) // 2), seed)
                vals = pair_distances(V, scale, torch.from_numpy(a), torch.from_numpy(b), same=same)
                if clamp:
                    vals = vals.clamp(min=0)
                for lo in range(0, len(a), _ROWS_PER_WRITE):
                    emit([Row(names[a[t]], names[b[t]], float(vals[t]), None) for t in range(lo, min(len(a), lo + _ROWS_PER_WRITE))])
            else:
                scored += _all_pairs_rows(V, scale, names, source.device, clamp, matrix, writer, stats, emit,
                                          resuming=bool(skip), same=same)
    finally:
        if writer is not None:
            writer.close()
    return RunResult(stats, scored, len(existing.rows), tot, time.perf_counter() - t0, True)


def _all_pairs_rows(V, scale, names, device, clamp, matrix, writer, stats, emit, resuming: bool, same=None) -> int:
    """Every pair i < j from one blockwise GEMM; returns the rows written in bulk (``emit``
    counts its own)."""
    out = None
    if matrix:
        # written in place, block by block (a memory-mapped .npy): the matrix never has to fit in memory
        out = np.lib.format.open_memmap(matrix, mode="w+", dtype=np.float32, shape=(len(names), len(names)))
        with open(os.path.splitext(matrix)[0] + ".paths.txt", "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(n + "\n" for n in names))
    D = gram_distances(V, scale, device=device, clamp=clamp, out=out, same=same)
    Dn = D if isinstance(D, np.ndarray) else D.numpy()
    m = len(names)
    bulk = 0
    if resuming:  # row by row, skipping the pairs already written
        batch = []
        for i in range(m):
            batch.extend(Row(names[i], names[j], float(Dn[i, j]), None) for j in range(i + 1, m))
            if len(batch) >= _ROWS_PER_WRITE:
                emit(batch)
                batch = []
        emit(batch)
    else:  # one formatted write per matrix row
        for i in range(m - 1):
            vals = np.asarray(Dn[i, i + 1 :], dtype=np.float64)
            if writer is not None:
                writer.write_pairs(names[i], names[i + 1 :], vals)
            stats.add_values(vals)
            bulk += len(vals)
    if isinstance(Dn, np.memmap):
        Dn.flush()
    return bulk
