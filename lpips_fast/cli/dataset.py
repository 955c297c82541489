"""The dataset commands of ``lpips-fast``: ``pair``, ``dirs``, ``ref``, ``allpairs`` and ``map``.

Each command builds an ``EvalOptions`` (from the layered settings) and a ``RunOutput`` and calls
one library function (``evaluate.run_to_output``, ``diversity.evaluate_all_pairs``,
``heatmap.heat_map``), then prints the summary.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .common import EXIT_ERROR_ROWS, EXIT_OK, UsageError, echo, positive_int

__all__ = ["add_commands", "summary_line", "show_progress", "run_metrics"]


def _common_parser() -> argparse.ArgumentParser:
    """The options every dataset command shares. Model and input options are settings (``[model]``,
    ``[eval]``, ``[log]`` in ``lpips_fast.settings``): a TOML file and ``LPIPS_FAST_*`` variables
    give their defaults, the flags here override them."""
    from ..deploy.settings import add_arguments, add_flag

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (defaults < --config file < LPIPS_FAST_* environment < flags; `lpips-fast config show`)")
    add_arguments(g, (), flags=False)  # --config, --set
    g = p.add_argument_group("model")
    for name in ("net", "version"):
        add_flag(g, "model", name)
    add_flag(g, "eval", "device")
    add_flag(g, "model", "dtype", help="trunk precision; auto is float32 here")
    for name in ("trunk", "lin", "state_dict", "random_trunk", "seed"):
        add_flag(g, "model", name)
    add_flag(g, "eval", "engine")
    add_flag(g, "model", "compile", action="store_const", const="on",
             help="torch.compile the trunk in the engine (first batch of each size compiles); auto is off here")
    g = p.add_argument_group("input")
    for name in ("batch_size", "workers", "resize", "max_pixels"):
        add_flag(g, "eval", name)
    g = p.add_argument_group("output")
    add_flag(g, "eval", "format")
    g.add_argument("--resume", action="store_true", help="keep the rows already in -o OUT and score only the missing pairs")
    g.add_argument("--retry-errors", action="store_true", help="with --resume: score the pairs that were error rows again")
    g.add_argument("--force", action="store_true", help="with --resume: continue an output written with other settings")
    for name in ("cache", "cache_max_size"):
        add_flag(g, "eval", name)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--metrics-json", metavar="PATH", default=None,
                   help="also write the run's counters as JSON (rows, errors, speed, batch sizes, out-of-memory retries, cache hits)")
    for name in ("level", "format"):
        add_flag(g, "log", name)
    p.set_defaults(uses_settings=True)
    return p


def add_commands(sub) -> None:
    """Register the dataset commands on the root parser's subparsers."""
    common = _common_parser()
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
    p.add_argument("--pairs", type=positive_int, default=None, metavar="N", help="score N random distinct pairs instead of all")
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


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def summary_line(result, label: str = "summary") -> str:
    """The one-line summary of a ``RunResult``."""
    stats, tot = result.stats, result.totals or {}
    has = stats.n > 0
    parts = [f"count={stats.count}", f"errors={stats.errors}"]
    for name in ("mean", "std", "stderr", "min", "max"):
        parts.append(f"{name}={_fmt(getattr(stats, name)) if has else 'nan'}")
    parts.append(f"elapsed={result.elapsed:.3f}s")
    parts.append(f"pairs/s={result.scored / result.elapsed if result.elapsed > 0 else 0.0:.1f}")
    if result.resumed:
        parts.append(f"resumed={result.resumed}")
    if tot.get("oom"):
        parts.append(f"oom_retries={tot['oom']} batch_size={tot['initial_batch_size']}->{tot['batch_size']}")
    if tot.get("cached"):
        parts.append(f"cache_hits={tot['hits']} cache_misses={tot['misses']}")
    return f"{label}: " + " ".join(parts)


def show_progress(quiet: bool, main: bool = True) -> bool:
    """Draw a progress bar: on rank 0, without --quiet, when stderr is a terminal."""
    return main and not quiet and sys.stderr.isatty()


# -- from arguments to the library -----------------------------------------------------------
def _options(args, command: str, **extra):
    from ..dataset.options import EvalOptions

    opts = EvalOptions.from_settings(args.settings, distributed=True, extra=extra)
    return _named(args, opts.validate)  # fail before any work, naming the command-line option


# EvalOptions' option names -> their settings keys (whose flags the dataset commands take)
_OPTION_KEYS = {
    "cache_max_bytes": "eval.cache_max_size", "state_dict": "model.state_dict", "max_pixels": "eval.max_pixels",
    "batch_size": "eval.batch_size", "resize": "eval.resize", "device": "eval.device", "dtype": "model.dtype",
    "cache": "eval.cache", "trunk": "model.trunk", "lin": "model.lin", "net": "model.net", "version": "model.version",
}


def _named(args, fn):
    """Run ``fn``; re-raise an OptionError naming the option as the user gave it: its flag, or its
    settings key and where the value came from (``eval.device from env LPIPS_FAST_EVAL_DEVICE``)."""
    from ..errors import OptionError
    from ..deploy.settings import SCHEMA

    try:
        return fn()
    except OptionError as e:
        msg = str(e)
        settings = getattr(args, "settings", None)
        for api, key in _OPTION_KEYS.items():
            if msg.startswith(api + ":") or msg.startswith(api + " "):
                section, _, name = key.partition(".")
                flag = SCHEMA[section][name].flag
                source = settings.source(key) if settings is not None else f"flag {flag}"
                msg = (flag if source == f"flag {flag}" else f"{key} (from {source})") + msg[len(api):]
                break
        raise OptionError(msg) from None


def _output(args, opts, command: str, *, stdout_rows: bool | None = None):
    from ..dataset.writers import RunOutput

    return RunOutput(args.output, args.settings["eval.format"], resume=args.resume, settings=opts.settings(command), force=args.force,
                     retry_errors=args.retry_errors, stdout_rows=command in ("dirs", "ref") if stdout_rows is None else stdout_rows)


def _need_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"{what}: {path} is not a directory")


def _need_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what}: {path} does not exist")


def _score(args, command: str, specs, *, ref_file: str | None = None, engine_auto: bool = True):
    """Score ``specs`` into -o (or stdout); returns the RunResult (None off rank 0)."""
    from ..dataset.evaluate import run_to_output, spec_files, start
    from ..dataset.features import FeatureSource

    opts = _options(args, command)
    _check_metrics_path(args, spec_files(specs, ref_file))
    if not engine_auto and args.settings["eval.engine"] == "auto":
        opts = opts.replace(engine=False)  # one pair: capturing CUDA graphs would cost more than it saves
    out = _output(args, opts, command)
    _named(args, lambda: out.check(spec_files(specs, ref_file)))
    ctx, device = _named(args, lambda: start(opts))
    done = False
    try:
        src = _named(args, lambda: FeatureSource.from_options(opts, device))
        res = run_to_output(specs, src, ctx, out, ref_file=ref_file, show_progress=show_progress(args.quiet, ctx.is_main),
                            keep_rows=command == "pair")
        done = True
        return res if ctx.is_main else None
    finally:
        ctx.close(barrier=done)  # on success the ranks leave the group together


# -- commands --------------------------------------------------------------------------------
def cmd_dirs(args) -> int:
    from ..dataset.evaluate import dir_specs

    _need_dir(args.dir0, "DIR0")
    _need_dir(args.dir1, "DIR1")
    specs = dir_specs(args.dir0, args.dir1)
    if not specs:
        raise UsageError(f"DIR0/DIR1: no images under {args.dir0} or {args.dir1} (expected image files, searched recursively)")
    return _report(args, _score(args, "dirs", specs))


def cmd_ref(args) -> int:
    from ..dataset.evaluate import ref_specs

    _need_file(args.ref, "REF")
    _need_dir(args.dir, "DIR")
    specs = ref_specs(args.ref, args.dir)
    if not specs:
        raise UsageError(f"DIR: no images under {args.dir} (expected image files, searched recursively)")
    return _report(args, _score(args, "ref", specs, ref_file=args.ref))


def _report(args, res) -> int:
    if res is None:
        return EXIT_OK
    echo(summary_line(res), sys.stderr if args.output in (None, "-") else sys.stdout)
    _write_metrics(args, res)
    return EXIT_ERROR_ROWS if res.stats.errors else EXIT_OK


def run_metrics(command: str, result) -> dict:
    """The counters of a ``RunResult`` as a JSON-ready dict (``--metrics-json``)."""
    stats, tot = result.stats, result.totals or {}
    has = stats.n > 0
    return {
        "command": command,
        "rows": stats.count,
        "errors": stats.errors,
        "errors_by_kind": dict(sorted(stats.error_kinds.items())),  # lpips_fast.errors.ROW_ERROR_KINDS
        "scored_now": result.scored,
        "resumed": result.resumed,
        "elapsed_s": result.elapsed,
        "pairs_per_s": result.scored / result.elapsed if result.elapsed > 0 else 0.0,
        "lpips": {k: (getattr(stats, k) if has else None) for k in ("mean", "std", "stderr", "min", "max")},
        "oom_retries": tot.get("oom", 0),
        "batch_size": {"initial": tot.get("initial_batch_size"), "final": tot.get("batch_size")},
        "cache": {"hits": tot.get("hits", 0), "misses": tot.get("misses", 0)} if tot.get("cached") else None,
    }


def _check_metrics_path(args, inputs=()) -> None:
    if getattr(args, "metrics_json", None):
        from ..dataset.writers import check_new_file

        _named(args, lambda: check_new_file(args.metrics_json, "--metrics-json", inputs=inputs))


def _write_metrics(args, res) -> None:
    if getattr(args, "metrics_json", None) and res is not None:
        import json

        with open(args.metrics_json, "w", encoding="utf-8") as f:
            json.dump(run_metrics(args.command, res), f, indent=1)
            f.write("\n")


def cmd_pair(args) -> int:
    from ..dataset.evaluate import pair_specs
    from ..dataset.writers import read_existing

    specs = pair_specs([(args.path0, args.path1)])
    if args.resume and args.output not in (None, "-") and os.path.exists(args.output):
        opts = _options(args, "pair")
        _named(args, lambda: _output(args, opts, "pair").check([args.path0, args.path1]))
        done = {r.key: r for r in read_existing(args.output, _output(args, opts, "pair").fmt).rows}
        row = done.get((args.path0, args.path1))
        if row is not None and not (row.error is not None and args.retry_errors):
            return _pair_result(row)  # already scored: report it, write nothing
    res = _score(args, "pair", specs, engine_auto=False)
    _write_metrics(args, res)
    return EXIT_OK if res is None else _pair_result(res.rows[0])


def _pair_result(row) -> int:
    if row.error is not None:
        echo(f"lpips-fast pair: error: {row.error}", sys.stderr)
        return EXIT_ERROR_ROWS
    echo(repr(float(row.lpips)))
    return EXIT_OK


def cmd_allpairs(args) -> int:
    from ..dataset.diversity import evaluate_all_pairs, image_files
    from ..dataset.evaluate import start
    from ..dataset.features import FeatureSource
    from ..dataset.writers import check_new_file

    _need_dir(args.dir, "DIR")
    rels, files = image_files(args.dir)
    n = len(rels)
    if n < 2:
        raise UsageError(f"DIR: {args.dir} holds {n} image(s); all pairs need at least 2")
    if args.pairs is not None and args.pairs > n * (n - 1) // 2:
        raise UsageError(f"--pairs {args.pairs}: only {n * (n - 1) // 2} distinct pairs of {n} images exist")
    if args.pairs is not None and args.matrix:
        raise UsageError("--matrix needs all pairs (drop --pairs)")
    opts = _options(args, "allpairs", pairs=args.pairs, pair_seed=args.seed if args.pairs is not None else None)
    out = _output(args, opts, "allpairs", stdout_rows=False)
    _named(args, lambda: out.check(files))
    _check_metrics_path(args, files)
    if args.matrix:
        check_new_file(args.matrix, "--matrix", inputs=files)
        check_new_file(os.path.splitext(args.matrix)[0] + ".paths.txt", "--matrix", inputs=files)
    ctx, device = _named(args, lambda: start(opts))
    done = False
    try:
        src = _named(args, lambda: FeatureSource.from_options(opts, device))
        res = evaluate_all_pairs(args.dir, src, ctx, out, pairs=args.pairs, seed=args.seed, matrix=args.matrix,
                                 listing=(rels, files), show_progress=show_progress(args.quiet, ctx.is_main))
        done = True
    finally:
        ctx.close(barrier=done)
    if not res.is_main:
        return EXIT_OK
    stream = sys.stderr if args.output == "-" else sys.stdout
    echo(summary_line(res), stream)
    _write_metrics(args, res)
    if res.stats.n:
        echo(f"diversity: {res.stats.mean:.6f} +- {res.stats.stderr:.6f} (mean LPIPS over {res.stats.n} pairs +- standard error)", stream)
    return EXIT_ERROR_ROWS if res.stats.errors else EXIT_OK


def cmd_map(args) -> int:
    import numpy as np

    from ..dataset.evaluate import start
    from ..dataset.features import FeatureSource
    from ..dataset.heatmap import heat_map
    from ..dataset.writers import check_new_file

    if args.metrics_json:
        raise UsageError("--metrics-json: not written by map (one pair, no run counters); use it with pair, dirs, ref or allpairs")
    for p in (args.path0, args.path1):
        _need_file(p, "A/B")
    check_new_file(args.output, "-o", inputs=[args.path0, args.path1])
    if args.npy:
        check_new_file(args.npy, "--npy", inputs=[args.path0, args.path1])
    opts = _options(args, "map")
    ctx, device = _named(args, lambda: start(opts))
    try:
        if not ctx.is_main:
            return EXIT_OK
        hm = heat_map(_named(args, lambda: FeatureSource.from_options(opts, device)), args.path0, args.path1, vmax=args.vmax)
    finally:
        ctx.close()
    if hm.error is not None:
        echo(f"lpips-fast map: error: {hm.error}", sys.stderr)
        return EXIT_ERROR_ROWS
    from PIL import Image

    Image.fromarray(hm.picture).save(args.output)
    if args.npy:
        np.save(args.npy, hm.values)
    echo(repr(hm.lpips))
    if not args.quiet:
        echo(f"map: {args.output} (A | B | LPIPS map, white = {hm.vmax:.6g}, map mean {float(hm.values.mean()):.6g})", sys.stderr)
    return EXIT_OK
