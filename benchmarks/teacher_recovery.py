"""Does training recover a known teacher? Held-out 2AFC agreement before and after ``train()``.

A teacher LPIPS (pretrained alex trunk, a seeded sparse random lin-weight set: ``rand() ** 8``)
judges generated triplets (``synthetic.make_2afc`` with ``max_gap``: only triplets whose two
teacher distances are within ``max_gap`` of each other, where the channel weighting decides).
The student starts from uniform lin weights (every weight 0.1: the ranking of the lpips=False
baseline) and trains on the training folder; agreement with the teacher is scored on a
held-out folder (the teacher scores 1.0 there by construction).

    python benchmarks/teacher_recovery.py --train 1000 --val 300 --json benchmarks/results/teacher-recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import lpips_fast
from lpips_fast.training import score_2afc, synthetic, train


def sparse_teacher(seed: int = 0) -> lpips_fast.LPIPS:
    teacher = lpips_fast.LPIPS(net="alex")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in teacher.lin_weights():
            w.copy_(torch.rand(w.shape, generator=g).pow(8))
    return teacher


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--max-gap", type=float, default=0.3)
    ap.add_argument("--runs", default="1e-3:5:1,1e-3:5:0,1e-4:5:1",
                    help="comma-separated lr:epochs:dropout (epochs at base rate = decay epochs)")
    ap.add_argument("--data", default=None, help="folder holding train/ and val/ from an earlier run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import skimage.data as skd

    root = args.data or tempfile.mkdtemp(prefix="teacher_")
    tr_dir, va_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(tr_dir):
        srcs = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket(), skd.immunohistochemistry()]
        teacher = sparse_teacher(0)
        t0 = time.perf_counter()
        synthetic.make_2afc(tr_dir, srcs, n=args.train, teacher=teacher, max_gap=args.max_gap, seed=10)
        synthetic.make_2afc(va_dir, srcs, n=args.val, teacher=teacher, max_gap=args.max_gap, seed=11)
        print(f"generated {args.train} + {args.val} triplets in {time.perf_counter() - t0:.0f} s", flush=True)
    uniform = lpips_fast.LPIPS(net="alex", lpips=False)
    start_val = score_2afc(uniform, va_dir)
    start_train = score_2afc(uniform, tr_dir)
    packaged = score_2afc(lpips_fast.LPIPS(net="alex"), va_dir)
    print(f"held-out agreement with the teacher: uniform start {start_val:.4f} (alex v0.1 weights {packaged:.4f})", flush=True)
    rows = []
    for spec in args.runs.split(","):
        lr, ep, drop = spec.split(":")
        t0 = time.perf_counter()
        res = train(tr_dir, init="uniform", lr=float(lr), epochs=int(ep), decay_epochs=int(ep),
                    dropout=drop == "1", val_dirs=va_dir, progress=False)
        row = {"lr": float(lr), "epochs": int(ep), "decay_epochs": int(ep), "dropout": drop == "1",
               "train_start": start_train, "train_end": res.train_2afc, "val_start": start_val,
               "val_end": res.val_2afc, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"lr {lr}, {ep}+{ep} epochs, dropout {drop}: held-out {start_val:.4f} -> {res.val_2afc:.4f} "
              f"(train {start_train:.4f} -> {res.train_2afc:.4f}) in {row['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train_triplets": args.train, "val_triplets": args.val, "max_gap": args.max_gap,
                       "teacher": "alex trunk, lin = rand()**8 (seed 0)", "student_init": "uniform 0.1",
                       "alex_v0.1_val": packaged, "runs": rows,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
