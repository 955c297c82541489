"""``lpips-fast export {onnx,aoti}``, ``tune``, ``compare`` and ``weights register``.

    lpips-fast export onnx --net alex -o lpips_alex.onnx --check
    lpips-fast export aoti --net alex -o lpips_alex.pt2 --check

``add_commands(subparsers)`` registers the commands on the main CLI; each handler parses,
calls the library (``export``, ``tune``, ``compare``) and prints. Nothing heavy is imported at
module level. Exit status: 0 ok, 1 a check failed (or an unexpected error), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["add_commands", "add_register_command", "registry_rows"]

_NETS = ("alex", "vgg", "vgg16", "squeeze")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _hw(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected a size such as 64 or 96x80, got {text!r}")
    if len(parts) > 2 or h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 64 or 96x80, got {text!r}")
    return h, w


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net", default="alex", choices=_NETS, help="trunk network (default: alex)")
    p.add_argument("--version", default="0.1", choices=["0.1", "0.0", "v0.1", "v0.0"],
                   help="LPIPS version (default: 0.1)")
    p.add_argument("--lin", default=None, metavar="NAME[@N]",
                   help="a registered lin-weight set (lpips-fast weights list) instead of the packaged one")
    p.add_argument("--random-trunk", action="store_true", help=argparse.SUPPRESS)


def _build_model(args, spatial: bool = False):
    import torch

    from ..model import LPIPS

    kwargs = {"net": args.net, "version": args.version, "spatial": spatial}
    if args.lin is not None:
        kwargs["lin"] = args.lin
    if args.random_trunk:
        torch.manual_seed(0)
        kwargs["pnet_rand"] = True
    try:
        return LPIPS(**kwargs)
    except ValueError as e:  # e.g. a lin set made for another net or version
        raise UsageError(str(e)) from None


# -- export ------------------------------------------------------------------------------------
def _usage_errors(fn):
    """Report a ``UsageError`` as one line on stderr and exit status 2."""
    import functools

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as e:
            _err(f"lpips-fast {args.command}: error: {e}")
            return EXIT_USAGE

    return run


@_usage_errors
def _cmd_export(args: argparse.Namespace) -> int:
    from ..deploy import export

    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if not args.output.endswith(suffix):
        _err(f"-o/--output: got {args.output!r}, expected a file name ending in {suffix}")
        return EXIT_USAGE
    model = _build_model(args, spatial=args.spatial)
    if args.format == "onnx":
        path = export.onnx(model, args.output, dynamic=not args.static, opset=args.opset)
        check = export.check_onnx
    else:
        example = None
        if args.size is not None:
            example = export.check_images(args.size, 2)
        path = export.aoti(model, args.output, example=example, dynamic_hw=args.dynamic_hw)
        check = export.check_aoti
    print(f"wrote {path}")
    if not args.check:
        return EXIT_OK
    kw = {}
    if args.format == "aoti" and not args.dynamic_hw:
        kw["sizes"] = [args.size or (64, 64)]
    if args.format == "onnx" and args.static:
        kw["sizes"], kw["batches"] = [(64, 64)], [2]
    rows = check(path, model, **kw)
    for r in rows:
        h, w = r["size"]
        print(f"check {h}x{w} batch {r['batch']}: max abs err {r['max_abs_err']:.3g} {'ok' if r['ok'] else 'FAILED'}")
    if not all(r["ok"] for r in rows):
        _err(f"check: FAILED, error above {export.CHECK_TOLERANCE} against lpips_fast.LPIPS")
        return EXIT_FAILURE
    fixed = None
    if args.format == "aoti" and not args.dynamic_hw:
        fixed = args.size or (64, 64)
    elif args.format == "onnx" and args.static:
        fixed = (64, 64)
    refusals = export.check_refusals(path, model, size=fixed)
    for r in refusals:
        verdict = "refused" if r["refused"] else f"FAILED, expected {'an error' if r['expected'] == 'error' else 'NaN'}"
        print(f"check {r['case']}: {verdict} ({r['got']})")
    if not all(r["refused"] for r in refusals):
        _err("check: FAILED, the artifact answered an input it was not built for")
        return EXIT_FAILURE
    return EXIT_OK


# -- tune --------------------------------------------------------------------------------------
@_usage_errors
def _cmd_tune(args: argparse.Namespace) -> int:
    from ..deploy.tune import PRECISIONS, select_precision

    cands = args.candidates or list(PRECISIONS)
    bad = [c for c in cands if c not in PRECISIONS]
    if bad:
        _err(f"lpips-fast tune: error: --candidates: got {bad}, expected names from {', '.join(PRECISIONS)}")
        return EXIT_USAGE
    if args.skip:
        cands = [c for c in cands if c not in args.skip]
    model = _build_model(args)
    rep = select_precision(
        net=args.net, device=args.device, model=model, size=args.size, batch_size=args.batch_size,
        repeats=args.repeats, candidates=cands, budget={"two_afc": args.min_2afc, "spearman": args.min_spearman},
    )
    print(rep.markdown())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rep.to_dict(), f, indent=2)
    return EXIT_OK


# -- compare -----------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> int:
    import os

    from ..deploy.comparison import Config, compare

    try:
        a, b = Config.parse(args.a), Config.parse(args.b)
    except (ValueError, RuntimeError) as e:
        _err(f"lpips-fast compare: error: A/B: {e}")
        return EXIT_USAGE
    if len(args.pairs) == 2 and all(os.path.isdir(x) for x in args.pairs):
        src = {"dirs": tuple(args.pairs)}
    elif len(args.pairs) == 1 and os.path.isfile(args.pairs[0]):
        src = {"pairs": args.pairs[0]}
    else:
        _err(f"lpips-fast compare: error: PAIRS: got {args.pairs}, expected two folders (DIR0 DIR1) or one pairs file")
        return EXIT_USAGE
    try:
        rep = compare(a, b, triplets=args.triplets, batch_size=args.batch_size, top=args.top, **src)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _err(f"lpips-fast compare: error: {e}")
        return EXIT_USAGE
    print(rep.markdown())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rep.to_dict(include_scores=args.json_scores), f, indent=2)
    if args.plot:
        rep.plot(args.plot)
    return EXIT_OK


def add_commands(subparsers) -> None:
    """Register ``export``, ``tune`` and ``compare`` on an argparse sub-parsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "export", help="write ONNX or AOTInductor (.pt2) graphs of the metric", formatter_class=fmt,
        description="Export LPIPS as a graph (in0, in1) -> (N,) distances, images (N,3,H,W) float in [-1, 1].\n"
                    "The fused op exports through its decomposition (no custom operator needed).\n\n"
                    "  lpips-fast export onnx --net alex -o lpips_alex.onnx --check\n"
                    "  lpips-fast export aoti --net alex -o lpips_alex.pt2 --check",
    )
    sub = p.add_subparsers(dest="format", metavar="{onnx,aoti}")
    sub.required = True
    o = sub.add_parser("onnx", help="ONNX graph with dynamic batch, height and width (dynamo exporter)")
    _model_args(o)
    o.add_argument("--spatial", action="store_true", help="return the (N,1,H,W) map instead of (N,) distances")
    o.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    o.add_argument("--static", action="store_true", help="fixed shapes (the example's: batch 2, 64x64)")
    o.add_argument("--check", action="store_true",
                   help="run onnxruntime (CPU) on photographs at three sizes (fail above 1e-5 vs LPIPS) and on inputs it must refuse")
    o.set_defaults(func=_cmd_export)

    a = sub.add_parser("aoti", help="torch.export + AOTInductor package (.pt2), dynamic batch")
    _model_args(a)
    a.add_argument("--spatial", action="store_true", help="return the (N,1,H,W) map instead of (N,) distances")
    a.add_argument("-o", "--output", required=True, metavar="OUT.pt2")
    a.add_argument("--size", type=_hw, default=None, metavar="HxW",
                   help="image size the package serves (default 64x64; any with --dynamic-hw)")
    a.add_argument("--dynamic-hw", action="store_true",
                   help="serve every height and width from the trunk's minimum (else only --size; other sizes raise)")
    a.add_argument("--check", action="store_true",
                   help="load the package, compare with LPIPS on photographs (fail above 1e-5), and feed it "
                        "inputs it must refuse (fail if one is answered)")
    a.set_defaults(func=_cmd_export)

    _add_compare(subparsers)
    _add_tune(subparsers)


# -- weights register (hooked into lpips_fast.cli.weights) ---------------------------------------
def _cmd_register(args: argparse.Namespace) -> int:
    from ..weights import registry

    try:
        entry = registry.register(args.name, args.file, net=args.net, version=args.version, note=args.note or "")
    except (ValueError, FileNotFoundError) as e:
        _err(f"lpips-fast weights register: error: {e}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(entry.to_dict(), indent=2))
    else:
        print(f"registered {entry.spec}: net {entry.net}, version {entry.version}, sha256 {entry.sha256}")
        print(f"  {entry.path}")
    return EXIT_OK


def add_register_command(weights_subparsers) -> None:
    """Add ``register`` to the ``weights`` command's sub-parsers."""
    r = weights_subparsers.add_parser(
        "register", help="store a lin-weight set under a name (NAME@N versions)",
        description="Store lin weights (safetensors, or a reference-format .pth read with weights_only=True) "
                    "as NAME@N under $LPIPS_FAST_HOME/models, with its sha256; re-registering NAME adds N+1. "
                    "Use it with LPIPS(lin='NAME') or --lin NAME.",
    )
    r.add_argument("name", metavar="NAME")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--net", required=True, choices=_NETS, help="the trunk the weights belong to")
    r.add_argument("--version", default="0.1", choices=["0.1", "0.0", "v0.1", "v0.0"],
                   help="the LPIPS version they were trained for (default: 0.1)")
    r.add_argument("--note", default=None, help="free text stored with the entry")
    r.add_argument("--json", action="store_true", help="print the entry as JSON")
    r.set_defaults(func=_cmd_register)


def registry_rows() -> list[dict]:
    """The named lin sets as ``weights list`` rows (kind 'lin-set'), each verified."""
    from ..weights.registry import inventory

    return inventory()


def _add_compare(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    c = subparsers.add_parser(
        "compare", help="A/B report of two metric configurations on the same pairs", formatter_class=fmt,
        description="Score the same pairs with two configurations and report Pearson/Spearman/Kendall, max/mean\n"
                    "absolute difference, 2AFC agreement (with --triplets), the largest disagreements and latency\n"
                    "per batch with a bootstrap 95% interval on the ratio B/A.\n\n"
                    "A configuration is key=value items: net, version, lin (a registered set), dtype\n"
                    "(float32|float16|bfloat16), backend (auto|cpp|torch|triton), device; a bare first item is the net.\n\n"
                    "  lpips-fast compare alex alex,version=0.0 examples/clean examples/distorted --json ab.json",
    )
    c.add_argument("a", metavar="A", help="configuration A, e.g. net=alex,version=0.1")
    c.add_argument("b", metavar="B", help="configuration B, e.g. net=alex,lin=mine@2")
    c.add_argument("pairs", metavar="PAIRS", nargs="+", help="DIR0 DIR1 (same relative paths) or a pairs file (two paths a line)")
    c.add_argument("--triplets", default=None, metavar="FILE", help="'ref p0 p1' lines: report 2AFC agreement")
    c.add_argument("--batch-size", type=int, default=16, help="pairs per timed batch (default: 16)")
    c.add_argument("--top", type=int, default=10, help="how many largest disagreements to list (default: 10)")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    c.add_argument("--json-scores", action="store_true", help="include every pair's two scores in the JSON")
    c.add_argument("--plot", default=None, metavar="OUT.png", help="scatter + difference histogram (matplotlib)")
    c.set_defaults(func=_cmd_compare)


def _add_tune(subparsers) -> None:
    t = subparsers.add_parser(
        "tune", help="measure fp32/bf16/fp16/channels_last/AOTI/int8 here and pick the fastest within an accuracy budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time each way of running LPIPS on this device and measure its accuracy against the exact fp32\n"
                    "module on generated distortions of photographs (max/mean abs error, Spearman, 2AFC agreement);\n"
                    "choose the fastest within the budget.\n\n  lpips-fast tune --net alex --skip aoti --json tune.json",
    )
    _model_args(t)
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    t.add_argument("--size", type=_hw, default=(64, 64), metavar="HxW", help="image size (default: 64x64)")
    t.add_argument("--batch-size", type=int, default=16, help="pairs per batch (default: 16)")
    t.add_argument("--repeats", type=int, default=3, help="timed passes per row; the median counts (default: 3)")
    t.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                   help="rows to try (default: all: fp32 fp32-nchw bf16 bf16-nchw fp16 fp16-nchw aoti int8)")
    t.add_argument("--skip", nargs="+", default=None, metavar="NAME", help="rows to leave out (e.g. aoti: ~1 min compile)")
    t.add_argument("--min-2afc", type=float, default=0.99, help="budget: 2AFC agreement with fp32 (default: 0.99)")
    t.add_argument("--min-spearman", type=float, default=0.999, help="budget: Spearman with fp32 (default: 0.999)")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    t.set_defaults(func=_cmd_tune)
