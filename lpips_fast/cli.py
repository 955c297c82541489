"""``lpips-fast``: score images, folders and all pairs from the command line.

    lpips-fast pair a.png b.png
    lpips-fast dirs out/ gt/ -o scores.csv
    lpips-fast ref ref.png samples/ -o scores.jsonl
    lpips-fast allpairs samples/ --pairs 10000 --seed 0
    lpips-fast map a.png b.png -o heat.png
    lpips-fast weights ...            (the pretrained-weights tool)

Exit status: 0 every row scored, 3 some rows are errors, 2 bad arguments (or missing weights),
1 an unexpected failure. See ``lpips-fast COMMAND --help``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR_ROWS", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_ERROR_ROWS = 3


class UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _resize(text: str):
    from .data import parse_resize

    try:
        return parse_resize(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _size(text: str) -> int:
    from .feature_cache import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 10G or 500M, got {text!r}")


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--net", default="alex", choices=["alex", "vgg", "vgg16", "squeeze"], help="trunk network (default: alex)")
    g.add_argument("--version", default="0.1", choices=["0.1", "0.0", "v0.1", "v0.0"], help="LPIPS version (default: 0.1)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: float32)")
    g.add_argument("--trunk", metavar="PATH", default=None, help="trunk weights file (torchvision format) instead of the fetched ones")
    g.add_argument("--lin", metavar="PATH", default=None, help="lin-layer weights file instead of the packaged ones")
    g.add_argument("--state-dict", metavar="PATH", default=None, help="a complete LPIPS state dict (reference keys, .safetensors or torch file)")
    g.add_argument("--random-trunk", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--model-seed", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument(
        "--engine", choices=["auto", "on", "off"], default="auto",
        help="score pairs with lpips_fast.Engine fed by pinned buffers (CUDA graphs; uint8 over the bus). "
        "auto: on CUDA without --cache (default: auto)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the trunk in the engine (first batch of each size compiles)")
    g = p.add_argument_group("input")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="pairs per batch (default: 32; halved on out-of-memory)")
    g.add_argument("--workers", type=_nonneg_int, default=_default_workers(), help="DataLoader decoding processes (default: %(default)s; 0 decodes in the main process)")
    g.add_argument("--resize", type=_resize, default=None, metavar="HxW", help="resize every image (Pillow bicubic) to HxW before scoring")
    g.add_argument(
        "--max-pixels", type=_positive_int, default=None, metavar="N",
        help="images with more pixels are decompression-bomb error rows (default: Pillow's Image.MAX_IMAGE_PIXELS, 89478485)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=["csv", "jsonl"], default=None, help="row format (default: from the -o extension, else csv)")
    g.add_argument("--resume", action="store_true", help="keep the rows already in -o OUT and score only the missing pairs")
    g.add_argument("--cache", metavar="DIR", default=None, help="feature cache directory (reused across runs and processes)")
    g.add_argument("--cache-max-size", type=_size, default=None, metavar="SIZE", help="cache size bound, LRU-evicted (default: 10G)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="lpips-fast",
        description="Fast exact LPIPS (lpips 0.1.4 numbers) for image pairs, folders and all pairs.",
        epilog="Exit status: 0 all rows scored, 3 some rows are errors, 2 bad arguments. "
        "Under torchrun every command shards its pairs across the ranks; rank 0 writes the output.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("pair", parents=[common], help="distance between two images", formatter_class=fmt,
                       description="Print the LPIPS distance between two image files.\n\n  lpips-fast pair a.png b.png")
    p.add_argument("path0", metavar="A")
    p.add_argument("path1", metavar="B")
    p.add_argument("-o", "--output", default=None, help="also write the row to this file")
    p.set_defaults(func=cmd_pair)

    p = sub.add_parser("dirs", parents=[common], help="paired folders (same relative paths)", formatter_class=fmt,
                       description="Score every file with the same relative path under DIR0 and DIR1 (recursive).\n"
                       "Columns path0,path1,lpips,error (paths relative to their folder); a file in only one\n"
                       "folder is an error row.\n\n  lpips-fast dirs results/ ground_truth/ -o scores.csv")
    p.add_argument("dir0", metavar="DIR0")
    p.add_argument("dir1", metavar="DIR1")
    p.add_argument("-o", "--output", default=None, help="output file (default: rows on stdout)")
    p.set_defaults(func=cmd_dirs)

    p = sub.add_parser("ref", parents=[common], help="one reference against every image of a folder", formatter_class=fmt,
                       description="Score one reference image against every image under DIR (recursive); the\n"
                       "reference goes through the trunk once.\n\n  lpips-fast ref target.png samples/ -o scores.csv")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-o", "--output", default=None, help="output file (default: rows on stdout)")
    p.set_defaults(func=cmd_ref)

    p = sub.add_parser("allpairs", parents=[common], help="all pairs (or N random pairs) of a folder: diversity", formatter_class=fmt,
                       description="LPIPS over all pairs i<j of the images under DIR (one trunk pass per image and one\n"
                       "GEMM), or over N random distinct pairs; prints the mean and its standard error.\n"
                       "Images whose size differs from the most common size are error rows (or use --resize).\n\n"
                       "  lpips-fast allpairs samples/ --matrix d.npy\n  lpips-fast allpairs samples/ --pairs 10000 --seed 0 -o pairs.csv")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--pairs", type=_positive_int, default=None, metavar="N", help="score N random distinct pairs instead of all")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairs (default: 0)")
    p.add_argument("--matrix", default=None, metavar="OUT.npy", help="save the (M, M) float32 matrix of the M scored images (order listed in OUT.paths.txt; written block by block to a memory-mapped .npy)")
    p.add_argument("-o", "--output", default=None, help="write one row per pair (default: only the summary)")
    p.set_defaults(func=cmd_allpairs)

    p = sub.add_parser("map", parents=[common], help="spatial LPIPS heat map of two images", formatter_class=fmt,
                       description="Write the spatial LPIPS map of A vs B as a heat map beside the two images\n"
                       "(A | B | map; black = 0, white = --vmax) and print the distance.\n\n  lpips-fast map a.png b.png -o heat.png")
    p.add_argument("path0", metavar="A")
    p.add_argument("path1", metavar="B")
    p.add_argument("-o", "--output", required=True, metavar="HEAT.png", help="the picture to write")
    p.add_argument("--vmax", type=float, default=None, help="map value shown as white (default: the map's maximum)")
    p.add_argument("--npy", default=None, metavar="OUT.npy", help="also save the raw (H, W) float32 map")
    p.set_defaults(func=cmd_map)

    import importlib

    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_commands(sub)
    return parser


# Command groups that live beside the library layer they drive. Each module defines
# ``add_commands(subparsers)`` and imports nothing heavy at module level (the parser is built on
# every invocation); its command functions return an exit status.
COMMAND_GROUPS = ("lpips_fast.weights.cli", "lpips_fast.serve.cli")


# -- helpers ---------------------------------------------------------------------------------
class _Run:
    """What every scoring command sets up: distributed context, model session, output."""

    def __init__(self, args):
        from .distributed import init_from_env

        self.args = args
        self.t0 = time.perf_counter()
        _check_device(args.device)
        self.ctx, device = init_from_env(args.device)
        self.main = self.ctx.is_main
        self.session = _make_session(args, device, self.ctx)

    def progress(self, total: int, unit: str = "pair"):
        show = self.main and not self.args.quiet and sys.stderr.isatty()
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def close(self):
        self.ctx.close()


def _check_device(device: str | None) -> None:
    import torch

    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device}: {e}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _make_session(args, device, ctx):
    from .evaluate import Session, build_model

    model = build_model(
        args.net, args.version, state_dict=args.state_dict, trunk=args.trunk, lin=args.lin,
        random_trunk=args.random_trunk, seed=args.model_seed,
    )
    cache = None
    if args.cache:
        from .feature_cache import FeatureCache

        cache = FeatureCache(args.cache, max_bytes=args.cache_max_size)
    return Session(
        model, device=device, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
        resize=args.resize, max_pixels=args.max_pixels, cache=cache, ctx=ctx,
        engine={"auto": None, "on": True, "off": False}[args.engine], compile=args.compile,
    )


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def summary_line(
    stats, elapsed: float, scored_now: int, session=None, resumed: int = 0, label: str = "summary", session_totals: dict | None = None
) -> str:
    has = stats.n > 0
    parts = [
        f"count={stats.count}",
        f"errors={stats.errors}",
        f"mean={_fmt(stats.mean) if has else 'nan'}",
        f"std={_fmt(stats.std) if has else 'nan'}",
        f"stderr={_fmt(stats.stderr) if has else 'nan'}",
        f"min={_fmt(stats.min) if has else 'nan'}",
        f"max={_fmt(stats.max) if has else 'nan'}",
        f"elapsed={elapsed:.3f}s",
        f"pairs/s={scored_now / elapsed if elapsed > 0 else 0.0:.1f}",
    ]
    if resumed:
        parts.append(f"resumed={resumed}")
    if session is not None:
        tot = session_totals if session_totals is not None else _local_totals(session)
        if tot["oom"]:
            parts.append(f"oom_retries={tot['oom']} batch_size={session.initial_batch_size}->{tot['batch_size']}")
        if session.cache is not None:
            parts.append(f"cache_hits={tot['hits']} cache_misses={tot['misses']}")
    return f"{label}: " + " ".join(parts)


def _local_totals(session) -> dict:
    c = session.cache
    return {
        "oom": session.stats.oom_events,
        "batch_size": session.batch_size,
        "hits": c.hits if c is not None else 0,
        "misses": c.misses if c is not None else 0,
    }


def gather_totals(run) -> dict | None:
    """OOM retries and cache counts summed over the ranks (smallest batch size); None off rank 0.
    Every rank must call it."""
    parts = run.ctx.gather(_local_totals(run.session))
    if parts is None:
        return None
    return {
        "oom": sum(p["oom"] for p in parts),
        "batch_size": min(p["batch_size"] for p in parts),
        "hits": sum(p["hits"] for p in parts),
        "misses": sum(p["misses"] for p in parts),
    }


def _open_output(args, run: _Run, *, stdout_default: bool):
    """(writer or None, existing rows, summary stream). Only rank 0 writes."""
    from .writers import ExistingRows, RowWriter, format_from_path, read_existing

    out = getattr(args, "output", None)
    fmt = format_from_path(out, args.format)
    existing = ExistingRows()
    if not run.main:
        return None, existing, sys.stderr
    if out not in (None, "-") and args.resume:
        existing = read_existing(out, fmt)
    if out is None and not stdout_default:
        return None, existing, sys.stdout
    writer = RowWriter(out, fmt, append=bool(args.resume))
    return writer, existing, (sys.stderr if out in (None, "-") else sys.stdout)


def _check_resume(args):
    """Output checks before any work: --resume needs -o; -o must be writable; a resumed file
    must be one of ours in the chosen format (checked here so every rank agrees)."""
    out = getattr(args, "output", None)
    if args.resume and out in (None, "-"):
        raise UsageError("--resume needs -o OUT (the file to complete)")
    if out in (None, "-"):
        return
    if os.path.isdir(out):
        raise UsageError(f"-o {out}: is a directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"-o {out}: the folder {parent} does not exist")
    if args.resume and os.path.exists(out):
        from .writers import format_from_path, looks_like

        fmt = format_from_path(out, args.format)
        problem = looks_like(out, fmt)
        if problem:
            raise UsageError(f"--resume -o {out}: {problem}")


def _score_specs(args, specs, *, ref_file=None) -> int:
    from .writers import Stats

    _check_resume(args)
    run = _Run(args)
    try:
        writer, existing, summary_stream = _open_output(args, run, stdout_default=True)
        stats = Stats()
        for r in existing.rows:
            stats.add(r)
        bar = run.progress(max(0, len(specs) - len(existing.keys)))
        scored = 0
        try:
            for rows in run.session.iter_pairs(specs, skip=existing.keys, ref_file=ref_file, on_progress=(bar.update if bar else None)):
                if writer is not None:
                    writer.write(rows)
                for r in rows:
                    stats.add(r)
                scored += len(rows)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        totals = gather_totals(run)
        if not run.main:
            return EXIT_OK
        elapsed = time.perf_counter() - run.t0
        print(
            summary_line(stats, elapsed, scored, run.session, resumed=len(existing.rows), session_totals=totals),
            file=summary_stream, flush=True,
        )
        return EXIT_ERROR_ROWS if stats.errors else EXIT_OK
    finally:
        run.close()


def _need_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"{what}: {path} is not a directory")


def _need_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what}: {path} does not exist")


# -- commands --------------------------------------------------------------------------------
def cmd_dirs(args) -> int:
    from .evaluate import dir_specs

    _need_dir(args.dir0, "DIR0")
    _need_dir(args.dir1, "DIR1")
    return _score_specs(args, dir_specs(args.dir0, args.dir1))


def cmd_ref(args) -> int:
    from .evaluate import ref_specs

    _need_file(args.ref, "REF")
    _need_dir(args.dir, "DIR")
    return _score_specs(args, ref_specs(args.ref, args.dir), ref_file=args.ref)


def cmd_pair(args) -> int:
    from .evaluate import pair_specs
    from .writers import RowWriter, format_from_path

    from .writers import read_existing

    _check_resume(args)
    specs = pair_specs([(args.path0, args.path1)])
    if args.resume and os.path.exists(args.output):
        done = {r.key: r for r in read_existing(args.output, format_from_path(args.output, args.format)).rows}
        row = done.get((args.path0, args.path1))
        if row is not None:  # already scored: report it, write nothing
            if row.error is not None:
                print(f"lpips-fast pair: error: {row.error}", file=sys.stderr)
                return EXIT_ERROR_ROWS
            print(repr(float(row.lpips)))
            return EXIT_OK
    run = _Run(args)
    if args.engine == "auto":
        run.session.use_engine = False  # one pair: capturing CUDA graphs would cost more than it saves
    try:
        rows = [r for rs in run.session.iter_pairs(specs) for r in rs]
        if not run.main:
            return EXIT_OK
        (row,) = rows
        if args.output:
            w = RowWriter(args.output, format_from_path(args.output, args.format), append=bool(args.resume))
            w.write(rows)
            w.close()
        if row.error is not None:
            print(f"lpips-fast pair: error: {row.error}", file=sys.stderr)
            return EXIT_ERROR_ROWS
        print(repr(float(row.lpips)))
        return EXIT_OK
    finally:
        run.close()


def _sample_pairs(n: int, k: int, seed: int):
    """k distinct unordered pairs (i < j) of range(n), sorted, reproducible from ``seed``."""
    import numpy as np

    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if 2 * k >= total:
        flat = np.sort(rng.choice(total, size=k, replace=False))
    else:
        chosen: set[int] = set()
        while len(chosen) < k:
            for v in rng.integers(0, total, size=2 * (k - len(chosen))).tolist():
                chosen.add(v)
                if len(chosen) == k:
                    break
        flat = np.array(sorted(chosen), dtype=np.int64)
    # flat index -> (i, j) in row-major upper-triangle order
    i = (n - 2 - np.floor(np.sqrt(-8 * flat + 4 * n * (n - 1) - 7) / 2.0 - 0.5)).astype(np.int64)
    j = (flat + i + 1 - n * (n - 1) // 2 + (n - i) * ((n - i) - 1) // 2).astype(np.int64)
    return i, j


def cmd_allpairs(args) -> int:
    import numpy as np
    import torch

    from .pairwise import _weights_nonneg, column_scale, flatten_unit_features, gram_distances, pair_distances
    from .data import list_images
    from .distributed import shard
    from .writers import Row, Stats

    _need_dir(args.dir, "DIR")
    _check_resume(args)
    rels = list_images(args.dir)
    n = len(rels)
    if n < 2:
        raise UsageError(f"DIR: {args.dir} holds {n} image(s); all pairs need at least 2")
    if args.pairs is not None and args.pairs > n * (n - 1) // 2:
        raise UsageError(f"--pairs {args.pairs}: only {n * (n - 1) // 2} distinct pairs of {n} images exist")
    if args.pairs is not None and args.matrix:
        raise UsageError("--matrix needs all pairs (drop --pairs)")
    run = _Run(args)
    try:
        sess = run.session
        files = [os.path.join(args.dir, r) for r in rels]
        bar = run.progress(n, unit="img")
        mine = []
        for idx, d, f in sess.iter_image_features(files, shard(list(range(n)), run.ctx)):
            if isinstance(f, str):
                mine.append((idx, None, f))
            else:
                mine.append((idx, (d.hw, [tuple(t.shape) for t in f]), flatten_unit_features([t.unsqueeze(0) for t in f])[0]))
            if bar is not None and not run.ctx.enabled:
                bar.update(1)
        if bar is not None:
            bar.close()
        parts = run.ctx.gather(mine)
        totals = gather_totals(run)
        if not run.main:
            return EXIT_OK
        got = sorted((it for p in parts for it in p), key=lambda t: t[0])
        from collections import Counter

        shapes = {it[1][0]: it[1][1] for it in got if it[1] is not None}
        got = [(idx, None if hs is None else hs[0], v) for idx, hs, v in got]
        sizes = Counter(hw for _, hw, _ in got if hw is not None)
        major = sizes.most_common(1)[0][0] if sizes else None
        bad: dict[int, str] = {}
        ok_idx = []
        for idx, hw, v in got:
            if hw is None:
                bad[idx] = v
            elif hw != major:
                bad[idx] = f"size {hw[0]}x{hw[1]} differs from the most common size {major[0]}x{major[1]} (use --resize HxW)"
            else:
                ok_idx.append(idx)
        m = len(ok_idx)
        weights = sess.model.lin_weights()
        ok_set = set(ok_idx)
        V = None
        if m:
            # fill one (m, K) buffer, dropping each image's row as it is copied (no 2x peak)
            k_cols = next(v for idx, _, v in got if idx in ok_set).numel()
            V = torch.empty(m, k_cols)
            t = 0
            for k, (idx, hw, v) in enumerate(got):
                if idx in ok_set:
                    V[t] = v
                    t += 1
                    got[k] = (idx, hw, None)
        del parts, mine
        scale = column_scale(shapes[major], weights) if m else None

        from .writers import ExistingRows, RowWriter, format_from_path, read_existing

        fmt = format_from_path(args.output, args.format)
        existing = ExistingRows()
        if args.output not in (None, "-") and args.resume:
            existing = read_existing(args.output, fmt)
        writer = RowWriter(args.output, fmt, append=bool(args.resume)) if args.output else None
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
            emit([Row(rels[i], "", None, e, i) for i, e in sorted(bad.items())])
            if m >= 2:
                pos = torch.tensor(ok_idx)
                if args.pairs is not None:
                    k = min(args.pairs, m * (m - 1) // 2)
                    a, b = _sample_pairs(m, k, args.seed)
                    vals = pair_distances(V, scale, torch.from_numpy(a), torch.from_numpy(b))
                    if _weights_nonneg(weights):
                        vals = vals.clamp(min=0)
                    step = 20000
                    for lo in range(0, k, step):
                        emit([
                            Row(rels[int(pos[a[t]])], rels[int(pos[b[t]])], float(vals[t]), None)
                            for t in range(lo, min(k, lo + step))
                        ])
                else:
                    out = None
                    if args.matrix:
                        # written in place, block by block (a memory-mapped .npy): the matrix
                        # never has to fit in memory
                        out = np.lib.format.open_memmap(args.matrix, mode="w+", dtype=np.float32, shape=(m, m))
                        with open(os.path.splitext(args.matrix)[0] + ".paths.txt", "w", encoding="utf-8", errors="surrogateescape") as f:
                            f.write("".join(rels[i] + "\n" for i in ok_idx))
                    D = gram_distances(V, scale, device=sess.device, clamp=_weights_nonneg(weights), out=out)
                    Dn = D if isinstance(D, np.ndarray) else D.numpy()
                    names = [rels[i] for i in ok_idx]
                    if skip:  # resuming: row by row, skipping the pairs already written
                        batch = []
                        for i in range(m):
                            batch.extend(Row(names[i], names[j], float(Dn[i, j]), None) for j in range(i + 1, m))
                            if len(batch) >= 20000:
                                emit(batch)
                                batch = []
                        emit(batch)
                    else:  # bulk: one formatted write per matrix row
                        for i in range(m - 1):
                            vals = np.asarray(Dn[i, i + 1 :], dtype=np.float64)
                            if writer is not None:
                                writer.write_pairs(names[i], names[i + 1 :], vals)
                            stats.add_values(vals)
                            scored += len(vals)
                    if isinstance(Dn, np.memmap):
                        Dn.flush()
        finally:
            if writer is not None:
                writer.close()
        elapsed = time.perf_counter() - run.t0
        stream = sys.stderr if args.output == "-" else sys.stdout
        print(summary_line(stats, elapsed, scored, sess, resumed=len(existing.rows), session_totals=totals), file=stream)
        if stats.n:
            print(f"diversity: {stats.mean:.6f} +- {stats.stderr:.6f} (mean LPIPS over {stats.n} pairs +- standard error)", file=stream, flush=True)
        return EXIT_ERROR_ROWS if stats.errors else EXIT_OK
    finally:
        run.close()


# heat-map colours: black -> purple -> red -> orange -> pale yellow (anchors picked by hand)
_HEAT_ANCHORS = ((0.0, (0, 0, 4)), (0.25, (80, 18, 123)), (0.5, (182, 54, 121)), (0.75, (251, 136, 97)), (1.0, (252, 253, 191)))


def heat_colors(v):
    """Values in [0, 1] (numpy array) -> uint8 RGB."""
    import numpy as np

    v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)
    xs = np.array([a for a, _ in _HEAT_ANCHORS])
    cols = np.array([c for _, c in _HEAT_ANCHORS], dtype=np.float64)
    out = np.stack([np.interp(v, xs, cols[:, k]) for k in range(3)], axis=-1)
    return np.round(out).astype(np.uint8)


def cmd_map(args) -> int:
    import numpy as np

    from .data import decode_file

    for p in (args.path0, args.path1):
        _need_file(p, "A/B")
    run = _Run(args)
    try:
        if not run.main:
            return EXIT_OK
        sess = run.session
        d0 = decode_file(args.path0, resize=sess.resize, max_pixels=sess.max_pixels)
        d1 = decode_file(args.path1, resize=sess.resize, max_pixels=sess.max_pixels)
        err = sess._check(d0, "A") or sess._check(d1, "B")
        if err is None and d0.hw != d1.hw:
            err = f"size mismatch: {d0.hw[0]}x{d0.hw[1]} vs {d1.hw[0]}x{d1.hw[1]} (use --resize HxW)"
        if err is not None:
            print(f"lpips-fast map: error: {err}", file=sys.stderr)
            return EXIT_ERROR_ROWS
        H, W = d0.hw
        heat, total = sess.spatial_map(d0, d1)
        hm = heat.numpy()
        vmax = args.vmax if args.vmax is not None else float(hm.max())
        colored = heat_colors(hm / vmax if vmax > 0 else np.zeros_like(hm))
        gap = np.full((H, 4, 3), 255, dtype=np.uint8)
        from PIL import Image

        Image.fromarray(np.concatenate([d0.array, gap, d1.array, gap, colored], axis=1)).save(args.output)
        if args.npy:
            np.save(args.npy, hm.astype(np.float32))
        print(repr(float(total)))
        if not args.quiet:
            print(f"map: {args.output} (A | B | LPIPS map, white = {vmax:.6g}, map mean {float(hm.mean()):.6g})", file=sys.stderr)
        return EXIT_OK
    finally:
        run.close()


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"lpips-fast {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lpips-fast: interrupted (rows written so far are kept; rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_weights_missing(e):
            print(f"lpips-fast {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _is_weights_missing(e: BaseException) -> bool:
    from .weights import WeightsError

    return isinstance(e, WeightsError)


if __name__ == "__main__":
    sys.exit(main())
