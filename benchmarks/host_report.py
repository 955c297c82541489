#!/usr/bin/env python
"""Host-side costs of the module on the CPU, for the README: construction time, the host time
of a small forward (where per-call overheads dominate), op counts of one forward + backward,
batch invariance and d(x, x), and the cost of a second-order gradient.

    python benchmarks/host_report.py [--json out.json] [--reference] [--threads 1]

Runs against whatever ``lpips_fast`` is importable, so that two checkouts can be compared with
the same script (PYTHONPATH=old-checkout python benchmarks/host_report.py). ``--reference`` adds
the same rows for the ``lpips`` 0.1.4 package (same trunk weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import lpips_fast


def _median_time(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _op_counts(model, x, y) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, y).sum().backward()
    ev = prof.key_averages()
    return {
        "lpips_fast_ops": sum(e.count for e in ev if e.key.startswith("lpips_fast::") and "_cpu" in e.key
                              and not e.key.startswith("lpips_fast::_")),
        "all_ops": sum(e.count for e in ev),
    }


def _reference(net: str):
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    ours = lpips_fast.LPIPS(net=net)
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ref.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small shapes, least noise on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict = {"torch_threads": torch.get_num_threads()}

    for net in ("alex", "vgg"):
        lpips_fast.LPIPS(net=net)  # warm file caches
        rows[f"construct_{net}_ms"] = 1e3 * _median_time(lambda: lpips_fast.LPIPS(net=net), 5, warmup=1)

    model = lpips_fast.LPIPS(net="alex")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    y = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    models = {"lpips_fast": model}
    if args.reference:
        models["reference"] = _reference("alex")
    for name, m in models.items():
        with torch.no_grad():
            rows[f"{name}_forward_1x64_us"] = 1e6 * _median_time(lambda: m(x, y), args.reps)
        xr = x.clone().requires_grad_(True)
        rows[f"{name}_fwd_bwd_1x64_us"] = 1e6 * _median_time(lambda: m(xr, y).sum().backward(), args.reps // 2)
        rows[f"{name}_ops"] = _op_counts(m, xr, y)

        def penalty():
            xg = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(m(xg, y).sum(), xg, create_graph=True)
            (gx * gx).sum().backward()

        try:
            rows[f"{name}_grad_penalty_1x64_ms"] = 1e3 * _median_time(penalty, 20)
        except RuntimeError as e:  # an older lpips_fast had no second-order gradients
            rows[f"{name}_grad_penalty_1x64_ms"] = f"error: {' '.join(str(e).split())[:120]}"

    with torch.no_grad():
        for net in ("alex", "vgg", "squeeze"):
            try:
                m = lpips_fast.LPIPS(net=net)
            except Exception:  # squeeze has no offline weights: a random trunk shows the same rounding
                m = lpips_fast.LPIPS(net=net, pnet_rand=True)
            xb = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
            yb = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
            batch = m(xb, yb).flatten()
            worst = 0.0
            for k in range(16):
                alone = m(xb[k : k + 1], yb[k : k + 1]).flatten()[0]
                rolled = m(torch.roll(xb, 5, 0), torch.roll(yb, 5, 0)).flatten()[(k + 5) % 16] if k == 0 else alone
                worst = max(worst, abs(float(alone - batch[k])), abs(float(rolled - batch[k])))
            rows[f"batch_invariance_{net}_max_abs"] = worst
            rows[f"d_x_x_{net}"] = float(m(xb, xb.clone()).abs().max())
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
