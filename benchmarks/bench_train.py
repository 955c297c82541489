"""Training speed on the CPU: the reference ``lpips.Trainer`` against ``lpips_fast.train`` (64 px).

Both train alex v0.1 lin layers (dropout on, batch 50, Adam lr 1e-4 beta1 0.5) on the same
generated 2AFC folder. The reference runs its own loop (``set_input`` + ``optimize_parameters``
per batch, as PerceptualSimilarity's ``train.py``) on images decoded once beforehand (its
decoding is not timed: that favours the reference). lpips-fast is timed end to end by
``train()``: decoding, one trunk pass per image for the feature cache, the epochs.

Reported: seconds per epoch for each, the cache's one-off cost, and epochs per minute over a
run of ``--epochs`` epochs (the recipe's 10 by default) including that one-off cost. Before timing,
one step of each from the same weights and dropout masks is checked to agree (1e-6).

    python benchmarks/bench_train.py --triplets 200 --epochs 10 --json benchmarks/results/train-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import lpips_fast
from lpips_fast.training import Dist2LogitLayer, make_optimizer, open_2afc, synthetic, to_input, train, train_step
from lpips_fast.training.bapps import iter_batches


def _reference_trainer():
    import lpips

    from lpips_fast import weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = lpips.Trainer()
        tr.initialize(model="lpips", net="alex", use_gpu=False, is_train=True, pnet_rand=True)
    tmp = lpips_fast.nets.build_trunk("alex")
    tmp.load_torchvision_features(weights.trunk_state_dict("alex"))
    tr.net.net.load_state_dict(tmp.state_dict())
    return tr


def _batches(data, batch_size):
    out = []
    for rows, imgs in iter_batches(data, batch_size):
        out.append({"ref": to_input(imgs[0]), "p0": to_input(imgs[1]), "p1": to_input(imgs[2]),
                    "judge": torch.as_tensor(data.judge[rows]).view(-1, 1, 1, 1)})
    return out


def _check_one_step(batch) -> float:
    """Largest lin/head weight difference after one step from the same state and masks."""
    tr = _reference_trainer()
    model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True, use_dropout=True, eval_mode=False)
    model.load_state_dict(tr.net.state_dict())
    head = Dist2LogitLayer()
    head.load_state_dict(tr.rankLoss.net.state_dict())
    opt = make_optimizer(model, head)
    torch.manual_seed(1)
    tr.set_input(batch)
    tr.optimize_parameters()
    torch.manual_seed(1)
    b = batch["ref"].shape[0]
    with torch.no_grad():
        feats = model.features(torch.cat([batch["ref"], batch["p0"], batch["p1"]]))
    fr, f0, f1 = ([f[i * b:(i + 1) * b] for f in feats] for i in range(3))
    train_step(model, head, opt, fr, f0, f1, batch["judge"])
    err = max(float((lin.weight - tr.net.lins[k].model[1].weight).abs().max()) for k, lin in enumerate(model.lins))
    for a, r in zip(head.state_dict().values(), tr.rankLoss.net.state_dict().values()):
        err = max(err, float((a - r).abs().max()))
    return err


def _reference_epoch(tr, batches, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        tr.set_input(batches[i])
        tr.optimize_parameters()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triplets", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10, help="run length for epochs/minute (default: 10)")
    ap.add_argument("--ref-epochs", type=int, default=2, help="reference epochs timed (default: 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="an existing 2AFC folder (default: generated)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="bench_train_")
    data_dir = args.data
    if data_dir is None:
        import skimage.data as skd

        srcs = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
        data_dir = synthetic.make_2afc(os.path.join(tmp, "train"), srcs, n=args.triplets, seed=0)
    data = open_2afc(data_dir)
    batches = _batches(data, 50)
    err = _check_one_step(batches[0])
    print(f"one step from the same state: max |lpips-fast - reference| = {err:.2e}", flush=True)
    if err > 1e-6:
        print("FAIL: steps differ", file=sys.stderr)
        return 1

    tr = _reference_trainer()
    rng = np.random.default_rng(0)
    ref_times = [_reference_epoch(tr, batches, rng.permutation(len(batches))) for _ in range(args.ref_epochs)]
    ref_epoch = float(np.median(ref_times))
    print(f"reference: {ref_epoch:.2f} s/epoch ({len(data)} triplets)", flush=True)

    log = []
    t0 = time.perf_counter()
    res = train(data_dir, epochs=args.epochs, decay_epochs=0, progress=False, log=log.append)
    ours_total = time.perf_counter() - t0
    ours_epoch = float(np.median([h["seconds"] for h in res.history]))
    cache_s = ours_total - sum(h["seconds"] for h in res.history)
    ref_total = ref_epoch * args.epochs
    nodrop = train(data_dir, epochs=args.epochs, decay_epochs=0, dropout=False, progress=False)
    nodrop_epoch = float(np.median([h["seconds"] for h in nodrop.history]))
    row = {
        "triplets": len(data), "px": 64, "net": "alex", "batch_size": 50, "threads": args.threads,
        "reference_s_per_epoch": ref_epoch,
        "lpips_fast_s_per_epoch": ours_epoch,
        "lpips_fast_setup_s": cache_s,
        "run_epochs": args.epochs,
        "reference_epochs_per_min": 60.0 * args.epochs / ref_total,
        "lpips_fast_epochs_per_min": 60.0 * args.epochs / ours_total,
        "speedup_run": ref_total / ours_total,
        "speedup_per_epoch_cached": ref_epoch / ours_epoch,
        "lpips_fast_no_dropout_s_per_epoch": nodrop_epoch,
        "one_step_max_abs_diff": err,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"lpips-fast: {ours_epoch:.3f} s/epoch on cached features + {cache_s:.2f} s set-up (decode + trunk once)")
    print(f"{args.epochs}-epoch run: reference {row['reference_epochs_per_min']:.1f} epochs/min, "
          f"lpips-fast {row['lpips_fast_epochs_per_min']:.1f} epochs/min: {row['speedup_run']:.1f}x "
          f"({row['speedup_per_epoch_cached']:.0f}x per cached epoch)")
    print(f"without dropout (fused op, weight gradient): {nodrop_epoch:.3f} s/epoch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
