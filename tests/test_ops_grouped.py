"""The grouped op ``lpips_distances`` (every layer in one call) on the CPU.

It must equal the per-layer op bitwise (forward and every gradient, every layout, dtype and
mode), match the fp64 oracle, pass gradcheck/opcheck/compile, and cut the op calls of a
forward + backward from one per layer to one. Triton's grouped kernels are tested under the
interpreter in test_ops_grouped_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import lpips_fast
import lpips_fast.ops as ops
from lpips_fast.ops import lpips_distance, lpips_distance_reference, lpips_distances

ALEX = [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)]
SQUEEZE_LIKE = [(64, 9, 9), (128, 4, 4), (256, 2, 2), (384, 1, 1), (384, 1, 1), (512, 1, 1), (512, 1, 1)]


def _layers(shapes, n=3, *, dtype=torch.float32, channels_last=False, n1=None, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)

    def feat(nb, c, h, w):
        t = torch.randn(nb, c, h, w, generator=g, dtype=torch.float64).relu()
        t[:, 0] += 0.1
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    f0 = [feat(n, *s) for s in shapes]
    f1 = [feat(n if n1 is None else n1, *s) for s in shapes]
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    ws = [torch.rand(s[0], generator=g, dtype=torch.float64).to(wdt) for s in shapes] if weighted else None
    return f0, f1, ws


def _per_layer(f0, f1, ws, spatial, backend="cpp"):
    ws = ws if ws is not None else [None] * len(f0)
    outs = [lpips_distance(a, b, w, spatial=spatial, backend=backend) for a, b, w in zip(f0, f1, ws)]
    if spatial:
        return outs
    total = outs[0]
    for o in outs[1:]:
        total = total + o  # the module's order
    return total


def _loss(out, spatial):
    # a non-uniform upstream gradient, so that every layer's gradient path is exercised
    if spatial:
        return sum((m * torch.linspace(0.5, 1.5, m.numel(), dtype=m.dtype).view(m.shape)).sum() for m in out)
    return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spatial", [False, True])
def test_bitwise_equal_to_per_layer_forward_and_backward(dtype, channels_last, spatial):
    f0, f1, ws = _layers(ALEX, dtype=dtype, channels_last=channels_last)
    for t in f0 + f1 + ws:
        t.requires_grad_(True)
    per = _per_layer(f0, f1, ws, spatial)
    grouped = lpips_distances(f0, f1, ws, spatial=spatial)
    if spatial:
        assert all(torch.equal(a, b) for a, b in zip(per, grouped))
    else:
        assert torch.equal(per, grouped)
    g_per = torch.autograd.grad(_loss(per, spatial), f0 + f1 + ws)
    g_grp = torch.autograd.grad(_loss(grouped, spatial), f0 + f1 + ws)
    assert all(torch.equal(a, b) for a, b in zip(g_per, g_grp))


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_seven_layers_broadcast_and_unweighted(spatial, weighted):
    f0, f1, ws = _layers(SQUEEZE_LIKE, n=4, n1=1, weighted=weighted, channels_last=True)
    per = _per_layer(f0, f1, ws, spatial)
    grouped = lpips_distances(f0, f1, ws, spatial=spatial)
    if spatial:
        assert [m.shape for m in grouped] == [(4, 1, h, w) for _, h, w in SQUEEZE_LIKE]
        assert all(torch.equal(a, b) for a, b in zip(per, grouped))
    else:
        assert grouped.shape == (4,)
        assert torch.equal(per, grouped)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("spatial", [False, True])
def test_matches_fp64_oracle(backend, spatial):
    f0, f1, ws = _layers(ALEX)
    out = lpips_distances(f0, f1, ws, spatial=spatial, backend=backend)
    refs = [lpips_distance_reference(a, b, w, spatial=spatial) for a, b, w in zip(f0, f1, ws)]
    if spatial:
        for o, r in zip(out, refs):
            torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-9)
    else:
        torch.testing.assert_close(out.double(), sum(refs), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spatial", [False, True])
def test_gradcheck_fp64(spatial):
    f0, f1, ws = _layers([(5, 3, 4), (7, 2, 3), (3, 1, 1)], n=2, dtype=torch.float64, n1=1)
    ins = [t.requires_grad_(True) for t in f0 + f1 + ws]

    def fn(*ts):
        out = lpips_distances(list(ts[:3]), list(ts[3:6]), list(ts[6:]), spatial=spatial)
        return torch.cat([m.reshape(-1) for m in out]) if spatial else out

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_double_backward_gradgradcheck_fp64():
    f0, f1, ws = _layers([(5, 3, 4), (7, 2, 3)], n=2, dtype=torch.float64)
    ins = [t.requires_grad_(True) for t in f0 + f1 + ws]

    def fn(*ts):
        return lpips_distances(list(ts[:2]), list(ts[2:4]), list(ts[4:]))

    assert torch.autograd.gradgradcheck(fn, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opcheck_grouped_cpu():
    f0, f1, ws = _layers([(4, 3, 5), (6, 2, 2)], n=2, dtype=torch.float64)
    for t in f0 + f1 + ws:
        t.requires_grad_(True)
    for spatial in (False, True):
        torch.library.opcheck(torch.ops.lpips_fast.distances_cpu.default, (f0, f1, ws, spatial, 1e-10))
    torch.library.opcheck(torch.ops.lpips_fast.distances_cpu.default, (f0, f1, [], False, 1e-10))


def test_compile_fullgraph_cpu():
    f0, f1, ws = _layers(ALEX[:3])
    fn = torch.compile(lambda a, b, w: lpips_distances(a, b, w) * 2, fullgraph=True)
    torch.testing.assert_close(fn(f0, f1, ws), lpips_distances(f0, f1, ws) * 2, rtol=0, atol=0)


def test_bad_arguments_name_the_layer():
    f0, f1, ws = _layers(ALEX[:2])
    with pytest.raises(ValueError, match="layer 1"):
        lpips_distances(f0, [f1[0], f1[1][:, :5]], ws)
    with pytest.raises(ValueError, match="one tensor per layer"):
        lpips_distances(f0, f1[:1], ws)
    with pytest.raises(ValueError, match="every layer or for none"):
        lpips_distances(f0, f1, [ws[0], None])
    with pytest.raises(TypeError, match="non-empty list"):
        lpips_distances([], [], None)


def _profiled_op_calls(model, x, y):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, y).sum().backward()
    return [e.key for e in prof.key_averages() if e.key.startswith("lpips_fast::")], prof


def test_alex_forward_backward_is_one_op_call_each_way():
    """Measured with torch.profiler: one grouped op forward and one backward (before: 5 + 5)."""
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    x = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_(True)
    y = torch.rand(1, 3, 64, 64) * 2 - 1
    keys, prof = _profiled_op_calls(model, x, y)
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("lpips_fast::")}
    assert counts.get("lpips_fast::distances_cpu") == 1, counts
    assert counts.get("lpips_fast::distances_cpu_backward") == 1, counts
    assert "lpips_fast::distance_cpu" not in counts, counts
    # retPerLayer keeps the per-layer op: one call per layer
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof2:
        model(x, y, retPerLayer=True)[0].sum().backward()
    counts2 = {e.key: e.count for e in prof2.key_averages() if e.key.startswith("lpips_fast::")}
    assert counts2.get("lpips_fast::distance_cpu") == 5, counts2


def test_module_values_unchanged_by_grouping():
    """The module's value equals adding the per-layer results, bitwise (same kernels, same order)."""
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    x, y = torch.rand(4, 3, 48, 40) * 2 - 1, torch.rand(4, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        total, per = model(x, y, retPerLayer=True)
        assert torch.equal(model(x, y), total)
        spatial = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True, spatial=True)
        spatial.load_state_dict(model.state_dict())
        stotal, _ = spatial(x, y, retPerLayer=True)
        assert torch.equal(spatial(x, y), stotal)
