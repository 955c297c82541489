"""All pairs of N = 1000 images at 64 px: ``lpips_fast.all_pairs`` vs the reference in batches (CPU).

    python -m pytest benchmarks/bench_all_pairs.py --benchmark-only -p no:cacheprovider -s
    python benchmarks/bench_all_pairs.py            # same numbers, no pytest

lpips-fast: every image through the trunk once, then one blockwise GEMM (the whole N x N matrix).
Reference (lpips 0.1.4): ``ref(x[i], x[j])`` over the N(N-1)/2 = 499,500 pairs in batches of 64
pairs, i.e. what a user of the reference does. Running all of it would take tens of minutes, so
the reference is timed on a sample of batches (``REF_BATCHES``) and extrapolated linearly to all
pairs (its cost is linear in the number of pairs); the output says so. Both use a random trunk
(``pnet_rand=True``): the cost does not depend on the weights. Images are 64x64 crops of the
scikit-image sample photographs.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
import torch

N = int(os.environ.get("BENCH_N", 1000))
SIZE = 64
REF_BATCH = 64
REF_BATCHES = int(os.environ.get("BENCH_REF_BATCHES", 12))
TARGET = 50.0
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # BENCH_DEVICE=cuda times both sides on the GPU


def _images(n: int = N, size: int = SIZE) -> torch.Tensor:
    from skimage import data

    srcs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        s = srcs[k % len(srcs)]
        y = rng.integers(0, s.shape[0] - size)
        x = rng.integers(0, s.shape[1] - size)
        out[k] = s[y : y + size, x : x + size]
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1


def _models():
    import lpips

    import lpips_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ours = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


def run_ours(ours, x) -> tuple[float, torch.Tensor]:
    import lpips_fast

    t = time.perf_counter()
    D = lpips_fast.all_pairs(x.to(DEVICE), model=ours.to(DEVICE), batch_size=100, device=DEVICE)
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t, D


def run_reference_sample(ref, x, batches: int = REF_BATCHES) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seconds for ``batches`` batches of REF_BATCH pairs, extrapolated seconds for all pairs."""
    n = x.shape[0]
    rng = np.random.default_rng(1)
    flat = rng.choice(n * (n - 1) // 2, size=batches * REF_BATCH, replace=False)
    iu, ju = np.triu_indices(n, 1)
    i, j = torch.from_numpy(iu[flat]), torch.from_numpy(ju[flat])
    vals = []
    ref = ref.to(DEVICE)
    x = x.to(DEVICE)
    with torch.no_grad():
        ref(x[:2], x[2:4])  # warm-up
        t = time.perf_counter()
        for b in range(batches):
            s = slice(b * REF_BATCH, (b + 1) * REF_BATCH)
            vals.append(ref(x[i[s]], x[j[s]]).flatten().cpu())
        dt = time.perf_counter() - t
    total_pairs = n * (n - 1) // 2
    return dt, dt * total_pairs / (batches * REF_BATCH), i, j, torch.cat(vals)


def report(t_ours, t_ref_sample, t_ref_all, n_sample, err) -> str:
    pairs = N * (N - 1) // 2
    return (
        f"all pairs of N={N} images at {SIZE}px ({pairs} pairs), {DEVICE}, {torch.get_num_threads()} CPU threads\n"
        f"  lpips-fast all_pairs (trunk once per image + GEMM): {t_ours:.2f} s ({pairs / t_ours:,.0f} pairs/s)\n"
        f"  reference lpips 0.1.4, batches of {REF_BATCH} pairs: {t_ref_sample:.2f} s for a sample of {n_sample} pairs "
        f"-> {t_ref_all:.0f} s extrapolated to all pairs ({n_sample / t_ref_sample:,.0f} pairs/s)\n"
        f"  speed-up: {t_ref_all / t_ours:.0f}x (target >= {TARGET:.0f}x); max |all_pairs - reference| on the sample: {err:.2e}"
    )


def test_all_pairs_vs_reference(benchmark):
    ref, ours = _models()
    x = _images()
    res = {}

    def ours_fn():
        res["t"], res["D"] = run_ours(ours, x)

    benchmark.pedantic(ours_fn, rounds=1, iterations=1, warmup_rounds=0)
    t_s, t_all, i, j, v = run_reference_sample(ref, x)
    err = float((res["D"][i, j] - v).abs().max())
    text = report(res["t"], t_s, t_all, len(v), err)
    print("\n" + text)
    benchmark.extra_info.update(
        n=N, size=SIZE, ours_s=res["t"], ref_sample_s=t_s, ref_sample_pairs=len(v), ref_extrapolated_s=t_all,
        speedup=t_all / res["t"], max_abs_err=err, reference_extrapolated=True,
    )
    assert err < 1e-5
    assert t_all / res["t"] >= TARGET


if __name__ == "__main__":
    ref, ours = _models()
    x = _images()
    t_ours, D = run_ours(ours, x)
    t_s, t_all, i, j, v = run_reference_sample(ref, x)
    print(report(t_ours, t_s, t_all, len(v), float((D[i, j] - v).abs().max())))
    sys.exit(0)
