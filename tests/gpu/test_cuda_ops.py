"""The Triton distance op on CUDA: every dtype against the fp64 oracle, gradients, opcheck,
torch.compile(fullgraph=True), CUDA-graph replay, bitwise repeatability.

Bounds: tests/gpu/cuda_helpers.py (derived there; the error grows like u log2(C) with the
kernels' tree sums). Inputs are generated on the device, fresh per case.
"""

from __future__ import annotations

import pytest
import torch

from .cuda_helpers import assert_within, backward_bounds, feats, forward_bound
from lpips_fast.ops import lpips_distance, lpips_distance_reference

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, C, H, W): one shape per block config the launcher picks for the channel counts
# (192 shares 256's tiles, 384 shares 512's) plus the edges C = 1, 3, 1000.
SHAPES = [(3, 1, 1, 1), (3, 3, 3, 5), (4, 64, 15, 15), (2, 128, 31, 17), (2, 192, 27, 27), (3, 384, 7, 7),
          (2, 1000, 3, 5)]  # fmt: skip
# (channels_last, spatial, weighted): all four flag combinations in fp32; two in the other dtypes
# (each combination is one more kernel to JIT on the GPU, ~1 s each).
VARIANTS = {torch.float32: [(False, False, True), (True, True, True), (False, True, False), (True, False, False)]}
OTHER_VARIANTS = [(False, False, True), (True, True, False)]


def _id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_forward_vs_fp64_oracle(shape, dtype):
    for k, (channels_last, spatial, weighted) in enumerate(VARIANTS.get(dtype, OTHER_VARIANTS)):
        x, y, w = feats(*shape, dtype, seed=k, channels_last=channels_last, weighted=weighted)
        got = lpips_distance(x, y, w, spatial=spatial)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.is_cuda
        want = lpips_distance_reference(x, y, w, spatial=spatial)
        assert_within(got, want, forward_bound(x, y, w, spatial), f"{shape} {dtype} cl={channels_last} {spatial=}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    "shape,channels_last,n1",
    [((3, 64, 15, 15), False, None), ((3, 192, 7, 5), True, 1), ((2, 512, 3, 3), False, None), ((2, 3, 9, 9), True, None)],
    ids=["c64", "c192-cl-bcast", "c512", "c3-cl"],
)
@pytest.mark.parametrize("spatial", [False, True], ids=["mean", "spatial"])
def test_backward_vs_fp64_oracle(shape, channels_last, n1, spatial, dtype):
    x, y, w = feats(*shape, dtype, seed=11, channels_last=channels_last, n1=n1)
    ours = [x.clone().requires_grad_(), y.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [t.detach().double().requires_grad_() for t in (x, y, w)]
    out = lpips_distance(*ours, spatial=spatial)
    g = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=torch.Generator("cuda").manual_seed(5))
    got = torch.autograd.grad(out, ours, g)
    want = torch.autograd.grad(lpips_distance_reference(*ref, spatial=spatial), ref, g.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    bx, by, bw = backward_bounds(x, y, w, g, spatial)
    assert_within(got[0], want[0], bx, "d_feat0")
    assert_within(got[1], want[1], by, "d_feat1")
    assert_within(got[2], want[2], bw, "d_weight")


@pytest.mark.parametrize("need", ["x", "y", "w", "xw"])
def test_only_requested_gradients(need):
    x, y, w = feats(2, 64, 9, 9, torch.float32, seed=20)
    leaves = {"x": x, "y": y, "w": w}
    for name in need:
        leaves[name] = leaves[name].clone().requires_grad_()
    out = lpips_distance(leaves["x"], leaves["y"], leaves["w"])
    grads = torch.autograd.grad(out.sum(), [leaves[n] for n in need])
    ref = [leaves[n].detach().double().requires_grad_() for n in "xyw"]
    want = dict(zip("xyw", torch.autograd.grad(lpips_distance_reference(*ref).sum(), ref)))
    for name, gg in zip(need, grads):
        torch.testing.assert_close(gg.double(), want[name], rtol=1e-4, atol=1e-7)


def test_zero_columns_give_zero_gradients_and_broadcast_is_free():
    x, y, w = feats(2, 32, 5, 5, torch.float32, seed=30)
    x[:, :, 1, 2] = 0
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    grads = torch.autograd.grad(lpips_distance(x, y, w, spatial=True).sum(), (x, y, w))
    assert all(torch.isfinite(t).all() for t in grads) and (grads[0][:, :, 1, 2] == 0).all()
    x, y1, w = feats(4, 64, 7, 7, torch.float32, seed=31, n1=1)
    full = lpips_distance(x, y1.expand(4, -1, -1, -1).contiguous(), w)
    assert torch.equal(lpips_distance(x, y1, w), full)
    assert torch.equal(lpips_distance(y1, x, w), lpips_distance(y1.expand(4, -1, -1, -1).contiguous(), x, w))


def test_bitwise_repeatable():
    x, y, w = feats(8, 64, 31, 31, torch.float32, seed=40)

    def run():
        xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
        res = lpips_distance(xs, ys, ws)
        return [res.detach(), *torch.autograd.grad(res.sum(), (xs, ys, ws))]

    assert all(torch.equal(p, q) for p, q in zip(run(), run()))


def test_opcheck_on_cuda():
    x, y, w = feats(2, 6, 3, 4, torch.float32, seed=50)
    xc = x.contiguous(memory_format=torch.channels_last)
    samples = [
        (x.clone().requires_grad_(), y, w.clone().requires_grad_(), False, 1e-10),
        (xc.clone(), y.clone().requires_grad_(), None, True, 1e-10),
        (x.half(), y.half(), w, True, 1e-10),
        (x.bfloat16().requires_grad_(), y.bfloat16(), w, False, 1e-10),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.lpips_fast.distance_triton.default, args)
    g = torch.rand(2, 1, 3, 4, device="cuda")
    for need in [(True, True, True), (True, False, False), (False, False, True)]:
        torch.library.opcheck(torch.ops.lpips_fast.distance_triton_backward.default, (g, xc, y, w, True, 1e-10, *need))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, y, w = feats(4, 64, 15, 15, torch.float32, seed=60)

    def step(a, b, c):
        return lpips_distance(a, b, c) + lpips_distance(a, b, None, spatial=True).mean(dim=(1, 2, 3))

    compiled = torch.compile(step, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (x, y, w)]
    xe = [t.clone().requires_grad_() for t in (x, y, w)]
    rc, re_ = compiled(*xs), step(*xe)
    torch.testing.assert_close(rc, re_, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(rc.sum(), xs), torch.autograd.grad(re_.sum(), xe)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cuda_graph_poison_and_replay():
    x, y, w = feats(4, 64, 15, 15, torch.float32, seed=70)
    sx, sy = x.clone(), y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            lpips_distance(sx, sy, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = lpips_distance(sx, sy, w)
    for seed in (71, 72):
        x2, y2, _ = feats(4, 64, 15, 15, torch.float32, seed=seed)
        sx.copy_(x2)
        sy.copy_(y2)
        gout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gout, lpips_distance(x2, y2, w))


def test_launches_on_the_tensors_device():
    """With several GPUs, a tensor on cuda:1 must launch there, whatever device is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    x, y, w = feats(2, 64, 7, 7, torch.float32, seed=80, device="cuda:1")
    with torch.cuda.device(0):
        got = lpips_distance(x, y, w)
    assert got.device == x.device
    torch.testing.assert_close(got.double(), lpips_distance_reference(x, y, w), rtol=1e-5, atol=0)
