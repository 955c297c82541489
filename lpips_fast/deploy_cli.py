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

__all__ = ["add_commands", "add_register_command", "registry_rows"]

_NETS = ("alex", "vgg", "vgg16", "squeeze")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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

    from .model import LPIPS

    kwargs = {"net": args.net, "version": args.version, "spatial": spatial}
    if args.lin is not None:
        kwargs["lin"] = args.lin
    if args.random_trunk:
        torch.manual_seed(0)
        kwargs["pnet_rand"] = True
    return LPIPS(**kwargs)


# -- export ------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from . import export

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
                   help="run onnxruntime (CPU) on photographs at three sizes; fail above 1e-5 vs LPIPS")
    o.set_defaults(func=_cmd_export)

    a = sub.add_parser("aoti", help="torch.export + AOTInductor package (.pt2), dynamic batch")
    _model_args(a)
    a.add_argument("--spatial", action="store_true", help="return the (N,1,H,W) map instead of (N,) distances")
    a.add_argument("-o", "--output", required=True, metavar="OUT.pt2")
    a.add_argument("--size", type=_hw, default=None, metavar="HxW",
                   help="image size the package serves (default 64x64; any with --dynamic-hw)")
    a.add_argument("--dynamic-hw", action="store_true", help="also dynamic height and width (slower compile)")
    a.add_argument("--check", action="store_true",
                   help="load the package and compare with LPIPS on photographs; fail above 1e-5")
    a.set_defaults(func=_cmd_export)


# -- weights register (hooked into lpips_fast.weights.cli) ---------------------------------------
def _cmd_register(args: argparse.Namespace) -> int:
    from . import registry

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
    from .registry import inventory

    return inventory()
