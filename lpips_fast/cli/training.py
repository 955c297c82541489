"""``lpips-fast eval {2afc,jnd}``, ``lpips-fast train`` and ``lpips-fast synth {2afc,jnd}``.

    lpips-fast synth 2afc /tmp/bapps/train --sources examples/clean --n 64
    lpips-fast eval 2afc /tmp/bapps/train /tmp/bapps/val --json /tmp/scores.json
    lpips-fast train /tmp/bapps/train --epochs 2 --decay-epochs 1 --out /tmp/mine.safetensors

Exit status: 0 done, 2 a bad argument or dataset folder (one line on stderr), 1 unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import nonneg_int, positive_int

__all__ = ["add_commands"]

_NETS = ["alex", "vgg", "vgg16", "squeeze"]
_VERSIONS = ["0.1", "0.0", "v0.1", "v0.0"]


def _err(cmd: str, msg: str) -> int:
    print(f"lpips-fast {cmd}: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    return 2


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-size", type=positive_int, default=64, help="shorter image side after resizing (default: 64)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="rows per batch (default: 50)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="decoding processes (default: 0, in-process)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _model(args):
    import os

    from ..model import LPIPS

    if args.lin is not None and not os.path.exists(args.lin):
        # Not a file: a registered lin set (lpips_fast.weights.registry), 'NAME' or 'NAME@N'.
        return LPIPS(net=args.net, version=args.version, lin=args.lin)
    return LPIPS(net=args.net, version=args.version, model_path=args.lin, lpips=not args.baseline)


# -- eval ------------------------------------------------------------------------------------
def _cmd_eval(args) -> int:
    from ..training.bapps import BappsError
    from ..training.scores import score_table

    cmd = f"eval {args.mode}"
    try:
        model = _model(args)
        if args.device:
            model = model.to(args.device)
        rows = score_table(model, args.dirs, args.mode, load_size=args.load_size, batch_size=args.batch_size,
                           workers=args.workers, progress=False if args.quiet else None)
    except (BappsError, ValueError, FileNotFoundError) as e:
        return _err(cmd, e)
    label = "2AFC" if args.mode == "2afc" else "JND mAP"
    width = max(len("dataset"), *(len(r["dataset"]) for r in rows))
    print(f"{'dataset':<{width}}  {'n':>7}  {label}")
    for r in rows:
        print(f"{r['dataset']:<{width}}  {r['n']:>7d}  {r['score']:.4f}")
    if args.json:
        model_desc = {"net": args.net, "version": args.version, "lin": args.lin, "baseline": args.baseline}
        text = json.dumps({"model": model_desc, "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


# -- train -----------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    from ..training.bapps import BappsError
    from ..training.trainer import train

    if not args.out.endswith(".safetensors"):
        return _err("train", f"--out: got {args.out!r}, expected a file name ending in .safetensors")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        res = train(
            args.dirs, net=args.net, version=args.version, epochs=args.epochs, decay_epochs=args.decay_epochs,
            batch_size=args.batch_size, lr=args.lr, beta1=args.beta1, init=args.init, dropout=not args.no_dropout,
            pnet_rand=args.pnet_rand, pnet_tune=args.pnet_tune, cache_features=not args.no_cache,
            feature_dir=args.feature_dir, out=args.out, amp=args.amp,
            checkpoint=args.checkpoint, resume=not args.restart, val_dirs=args.val or None, seed=args.seed,
            load_size=args.load_size, workers=args.workers, device=args.device,
            progress=False if args.quiet else None, log=log, register=args.register,
        )
    except (BappsError, ValueError, FileNotFoundError) as e:
        return _err("train", e)
    line = f"wrote {res.out}: 2AFC {res.train_2afc:.4f} on the training set"
    if res.val_2afc is not None:
        line += f", {res.val_2afc:.4f} on --val"
    print(line)
    if res.registered:
        print(f"registered as {res.registered}: LPIPS(net={args.net!r}, lin={res.registered!r})")
    return 0


# -- synth -----------------------------------------------------------------------------------
def _cmd_synth(args) -> int:
    import torch

    from ..model import LPIPS
    from ..training import synthetic

    try:
        teacher = LPIPS(net=args.teacher_net, version=args.teacher_version,
                        model_path=None if args.teacher_lin in ("packaged", "sparse") else args.teacher_lin)
        if args.teacher_lin == "sparse":
            g = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for w in teacher.lin_weights():
                    w.copy_(torch.rand(w.shape, generator=g).pow(8))
        kw = dict(n=args.n, size=args.size, teacher=teacher, temperature=args.temperature, seed=args.seed)
        if args.mode == "2afc":
            out = synthetic.make_2afc(args.out, args.sources, max_gap=args.max_gap, **kw)
        else:
            if args.max_gap is not None:
                return _err("synth jnd", "--max-gap: applies to 2afc folders only")
            out = synthetic.make_jnd(args.out, args.sources, **kw)
    except (ValueError, FileNotFoundError, OSError) as e:
        return _err(f"synth {args.mode}", e)
    print(f"wrote {args.n} {'triplets' if args.mode == '2afc' else 'pairs'} to {out}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``eval``, ``train`` and ``synth`` on the main CLI's sub-parsers."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "eval", help="2AFC score or JND mAP on BAPPS-format folders", formatter_class=fmt,
        description="Score a metric on BAPPS-format folders by the reference's definitions, one row per\n"
                    "folder (and one for all of them).\n\n  lpips-fast eval 2afc val/traditional val/cnn --json scores.json",
    )
    p.add_argument("mode", choices=["2afc", "jnd"], help="2afc (ref/ p0/ p1/ judge/) or jnd (p0/ p1/ same/)")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--net", default="alex", choices=_NETS, help="trunk (default: alex)")
    p.add_argument("--version", default="0.1", choices=_VERSIONS, help="LPIPS version (default: 0.1)")
    p.add_argument("--lin", metavar="PATH|NAME", default=None,
                   help="lin weights: a file (e.g. from lpips-fast train) or a registered set NAME[@N]")
    p.add_argument("--baseline", action="store_true", help="no lin layers: the channel sum (lpips=False)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON ('-': stdout)")
    _data_args(p)
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser(
        "train", help="train lin weights on 2AFC folders (the reference recipe)", formatter_class=fmt,
        description="Train the lin layers (and the ranking head) on BAPPS-format 2AFC folders with the\n"
                    "reference's recipe; the trunk's features are computed once. Writes a safetensors file\n"
                    "that LPIPS(model_path=FILE) and --lin load; a checkpoint (FILE.ckpt) is written after\n"
                    "every epoch and a rerun with the same arguments resumes from it.\n\n"
                    "  lpips-fast train train/traditional train/cnn --epochs 5 --decay-epochs 5 --out mine.safetensors",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the trained weights")
    p.add_argument("--net", default="alex", choices=_NETS, help="trunk (default: alex)")
    p.add_argument("--version", default="0.1", choices=_VERSIONS, help="LPIPS version (default: 0.1)")
    p.add_argument("--epochs", type=nonneg_int, default=5, help="epochs at the base rate (default: 5)")
    p.add_argument("--decay-epochs", type=nonneg_int, default=5, help="further epochs, rate decaying linearly (default: 5)")
    p.add_argument("--lr", type=_pos_float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default: 0.5)")
    p.add_argument("--init", default="random", metavar="random|uniform|packaged|PATH",
                   help="lin start: conv default init (reference), all 0.1, the packaged set, or a file")
    p.add_argument("--no-dropout", action="store_true", help="no dropout on the lin layers (the fused op's weight gradient)")
    p.add_argument("--pnet-tune", action="store_true", help="train the trunk too (no feature cache)")
    p.add_argument("--pnet-rand", action="store_true", help="random trunk (from scratch)")
    p.add_argument("--no-cache", action="store_true", help="run the trunk every step instead of caching its features")
    p.add_argument("--feature-dir", default=None, metavar="DIR",
                   help="scratch folder for the feature cache when memory is short (default: under the cache root)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="trunk under bf16 autocast (default: on CUDA, off on the CPU)")
    p.add_argument("--val", nargs="+", default=None, metavar="DIR", help="2AFC folders scored after training")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--seed", type=int, default=0, help="shuffling, dropout and initialisation seed (default: 0)")
    p.add_argument("--register", default=None, metavar="NAME", help="also store the result as the lin set NAME@N")
    _data_args(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "synth", help="write a BAPPS-format folder judged by a teacher metric", formatter_class=fmt,
        description="Write a small BAPPS-format folder from photographs: crops, random distortions (blur,\n"
                    "noise, JPEG, contrast, colour, pixelation) and judgments by a teacher LPIPS.\n\n"
                    "  lpips-fast synth 2afc /tmp/bapps/train --sources examples/clean --n 64",
    )
    p.add_argument("mode", choices=["2afc", "jnd"])
    p.add_argument("out", metavar="OUT")
    p.add_argument("--sources", required=True, metavar="DIR", help="folder of source photographs")
    p.add_argument("--n", type=positive_int, default=64, help="triplets (2afc) or pairs (jnd) (default: 64)")
    p.add_argument("--size", type=positive_int, default=64, help="crop size in pixels (default: 64)")
    p.add_argument("--teacher-net", default="alex", choices=_NETS, help="teacher trunk (default: alex)")
    p.add_argument("--teacher-version", default="0.1", choices=_VERSIONS)
    p.add_argument("--teacher-lin", default="packaged", metavar="packaged|sparse|PATH",
                   help="teacher lin weights: packaged, a seeded sparse random set, or a file")
    p.add_argument("--temperature", type=float, default=0.0, help="0: hard judgments; >0: sigmoid of the distance gap")
    p.add_argument("--max-gap", type=float, default=None, help="2afc: keep triplets with |d0-d1| <= GAP*max(d0,d1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)
