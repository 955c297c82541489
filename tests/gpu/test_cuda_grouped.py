"""The grouped Triton op (every layer in one launch) on CUDA: against the per-layer op and the
fp64 oracle in every dtype, gradients, second order, opcheck, torch.compile(fullgraph=True),
CUDA-graph replay, and the launch count of a module forward + backward.

Bounds: the per-layer bounds of cuda_helpers.py summed over layers (the grouped kernel runs the
per-layer tile code; only the spatial mean's summation order differs: it divides each tile's
partial by the pixel count before one sum over all tiles of all layers).
"""

from __future__ import annotations

import pytest
import torch

from .cuda_helpers import assert_within, feats, forward_bound
from lpips_fast.ops import lpips_distance, lpips_distance_reference, lpips_distances

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ALEX_64 = [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)]
VGG_64 = [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
SQUEEZE_64 = [(64, 31, 31), (128, 15, 15), (256, 7, 7), (384, 3, 3), (384, 3, 3), (512, 3, 3), (512, 3, 3)]


def _layers(shapes, n, dtype, seed, *, n1=None, channels_last=False, weighted=True):
    out = [feats(n, c, h, w, dtype, seed=seed + k, n1=n1, channels_last=channels_last, weighted=weighted)
           for k, (c, h, w) in enumerate(shapes)]  # fmt: skip
    return [o[0] for o in out], [o[1] for o in out], ([o[2] for o in out] if weighted else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shapes", [ALEX_64, VGG_64, SQUEEZE_64], ids=["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("spatial", [False, True])
def test_forward_vs_oracle(shapes, dtype, spatial):
    for k, (channels_last, n1, weighted) in enumerate([(False, None, True), (True, 1, True), (True, None, False)]):
        f0, f1, ws = _layers(shapes, 3, dtype, seed=10 * k, n1=n1, channels_last=channels_last, weighted=weighted)
        got = lpips_distances(f0, f1, ws, spatial=spatial)
        wl = ws if ws is not None else [None] * len(f0)
        want = [lpips_distance_reference(a, b, w, spatial=spatial) for a, b, w in zip(f0, f1, wl)]
        bounds = [forward_bound(a, b, w, spatial) for a, b, w in zip(f0, f1, wl)]
        if spatial:
            for g, r, bd in zip(got, want, bounds):
                assert_within(g, r, bd, f"{dtype} cl={channels_last}")
        else:
            # per-layer bounds plus the cross-layer sum's own rounding
            total = sum(want)
            bound = sum(bounds) + len(f0) * 2.0**-24 * total.abs()
            assert_within(got, total, bound, f"{dtype} cl={channels_last}")


@pytest.mark.parametrize("spatial", [False, True])
def test_gradients_match_per_layer_op(spatial):
    f0, f1, ws = _layers(ALEX_64, 3, torch.float32, seed=5, n1=1, channels_last=True)
    ins = [t.requires_grad_() for t in f0 + f1 + ws]
    grouped = lpips_distances(f0, f1, ws, spatial=spatial)
    per = [lpips_distance(a, b, w, spatial=spatial) for a, b, w in zip(f0, f1, ws)]
    up = [torch.rand_like(p) for p in per]
    lg = sum((m * u).sum() for m, u in zip(grouped, up)) if spatial else (grouped * up[0]).sum()
    lp = sum((m * u).sum() for m, u in zip(per, up)) if spatial else sum((m * up[0]).sum() for m in per)
    for a, b in zip(torch.autograd.grad(lg, ins), torch.autograd.grad(lp, ins)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_second_order_vs_oracle_fp64():
    f0, f1, ws = _layers(ALEX_64[:3], 2, torch.float64, seed=7)
    for t in f0 + ws:
        t.requires_grad_(True)

    def penalty(fn):
        gs = torch.autograd.grad(fn().sum(), f0, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in gs), f0 + ws)

    ours = penalty(lambda: lpips_distances(f0, f1, ws))
    ref = penalty(lambda: sum(lpips_distance_reference(a, b, w) for a, b, w in zip(f0, f1, ws)))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_opcheck_on_cuda():
    f0, f1, ws = _layers([(6, 3, 4), (10, 2, 2)], 2, torch.float32, seed=9)
    samples = [
        ([t.clone().requires_grad_() for t in f0], f1, [w.clone().requires_grad_() for w in ws], False, 1e-10),
        ([t.contiguous(memory_format=torch.channels_last) for t in f0], [t.clone().requires_grad_() for t in f1], [], True, 1e-10),
        ([t.bfloat16().requires_grad_() for t in f0], [t.bfloat16() for t in f1], ws, False, 1e-10),
    ]  # fmt: skip
    for args in samples:
        torch.library.opcheck(torch.ops.lpips_fast.distances_triton.default, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    f0, f1, ws = _layers(ALEX_64, 4, torch.float32, seed=11)

    def step(a, b, c):
        return lpips_distances(a, b, c) * 2

    ins_c = [[t.clone().requires_grad_() for t in g] for g in (f0, f1, ws)]
    ins_e = [[t.clone().requires_grad_() for t in g] for g in (f0, f1, ws)]
    rc, re_ = torch.compile(step, fullgraph=True)(*ins_c), step(*ins_e)
    torch.testing.assert_close(rc, re_, rtol=1e-6, atol=0)
    flat_c = [t for g in ins_c for t in g]
    flat_e = [t for g in ins_e for t in g]
    for a, b in zip(torch.autograd.grad(rc.sum(), flat_c), torch.autograd.grad(re_.sum(), flat_e)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cuda_graph_poison_and_replay():
    f0, f1, ws = _layers(ALEX_64, 4, torch.float32, seed=13)
    s0, s1 = [t.clone() for t in f0], [t.clone() for t in f1]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            lpips_distances(s0, s1, ws)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = lpips_distances(s0, s1, ws)
    for seed in (14, 15):
        g0, g1, _ = _layers(ALEX_64, 4, torch.float32, seed=seed)
        for dst, src in zip(s0 + s1, g0 + g1):
            dst.copy_(src)
        gout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gout, lpips_distances(g0, g1, ws))


def test_module_forward_backward_launch_count():
    """One alex forward + backward: the distance step is 2 Triton kernels (+1 reduction each way)."""
    import lpips_fast

    model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True).cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda", requires_grad=True)
    y = torch.rand(2, 3, 64, 64, device="cuda")
    model(x, y).sum().backward()  # warm-up (JIT compiles)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(x, y).sum().backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    grouped = [n for n in names if "grouped" in n]
    single = [n for n in names if "_lpips_fwd_kernel" in n or "_lpips_bwd_kernel" in n]
    assert len(grouped) == 2 and not single, names
