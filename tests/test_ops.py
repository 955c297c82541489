"""The fused distance op on the CPU: C++ kernel and eager backend against the fp64 oracle.

Triton (under TRITON_INTERPRET=1) is tested in test_ops_triton.py; CUDA in
tests/gpu/test_cuda_ops.py. Shapes are small: this file must stay well under a minute or two
on a 2-core machine (the C++ build itself is cached; CI warms it with build_cpu_extension()).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import lpips_fast.ops as ops
from lpips_fast.ops import lpips_distance, lpips_distance_reference

BACKENDS = ["cpp", "torch"]


def _feats(n, c, h, w, *, dtype=torch.float32, seed=0, channels_last=False, relu=True, n1=None):
    """Fresh random features (ReLU outputs, like the trunk's taps) and a non-negative weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randn(n if n1 is None else n1, c, h, w, generator=g, dtype=torch.float64)
    if relu:
        x, y = x.relu(), y.relu()
        # keep every pixel alive (a column of zeros is tested on its own)
        x[:, 0] += 0.1
        y[:, 0] += 0.1
    wt = torch.rand(c, generator=g, dtype=torch.float64)
    x, y, wt = x.to(dtype), y.to(dtype), wt.to(torch.float32 if dtype != torch.float64 else dtype)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    return x, y, wt


def _assert_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape
    err = (out - ref).abs()
    bound = rtol * ref.abs() + 1e-9  # absolute part: d is a cancellation when C = 1
    assert bool((err <= bound).all()), f"max rel err {(err / ref.abs().clamp_min(1e-30)).max().item():.3g} > {rtol}"


@pytest.fixture(scope="module", autouse=True)
def _cpp_built():
    assert ops._cpu.available(), "the C++ kernel did not build (see the warning)"


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,channels_last,spatial,weighted",
    [
        ((3, 1, 3, 5), False, False, True),
        ((1, 3, 1, 1), True, True, True),
        ((3, 64, 15, 15), False, True, False),
        ((3, 64, 15, 15), True, False, True),
        ((1, 192, 31, 17), False, False, True),
        ((3, 384, 3, 5), True, True, True),
        ((3, 512, 1, 1), False, False, False),
        ((1, 1000, 3, 5), False, True, True),
        ((3, 1000, 3, 5), True, False, True),
    ],
)
def test_fp32_matches_fp64_oracle(backend, shape, channels_last, spatial, weighted):
    x, y, w = _feats(*shape, channels_last=channels_last, seed=sum(shape))
    w = w if weighted else None
    out = lpips_distance(x, y, w, spatial=spatial, backend=backend)
    assert out.dtype == torch.float32
    assert out.shape == ((shape[0], 1, shape[2], shape[3]) if spatial else (shape[0],))
    _assert_rel(out, lpips_distance_reference(x, y, w, spatial=spatial), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial,channels_last", [(False, False), (True, False), (True, True)])
def test_low_precision_within_twice_torch_error(dtype, spatial, channels_last):
    # fp32 weight with low-precision features
    x, y, w = _feats(3, 192, 7, 7, dtype=dtype, seed=7, channels_last=channels_last)
    ref64 = lpips_distance_reference(x, y, w, spatial=spatial)
    torch_err = (lpips_distance_reference(x, y, w, spatial=spatial, upcast=False).double() - ref64).abs().max()
    for backend in BACKENDS:
        out = lpips_distance(x, y, w, spatial=spatial, backend=backend)
        assert out.dtype == torch.float32
        assert (out.double() - ref64).abs().max() <= 2 * torch_err + 1e-6


def test_fp64_gives_fp64():
    x, y, w = _feats(2, 8, 3, 3, dtype=torch.float64)
    for backend in BACKENDS:
        out = lpips_distance(x, y, w, backend=backend)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, lpips_distance_reference(x, y, w), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_both_ways(backend):
    x, y1, w = _feats(3, 16, 4, 5, n1=1, seed=3)
    full = lpips_distance(x, y1.expand(3, -1, -1, -1).contiguous(), w, backend=backend)
    torch.testing.assert_close(lpips_distance(x, y1, w, backend=backend), full, rtol=0, atol=0)
    torch.testing.assert_close(lpips_distance(y1, x, w, backend=backend), full, rtol=1e-6, atol=0)
    sp = lpips_distance(y1, x, w, spatial=True, backend=backend)
    assert sp.shape == (3, 1, 4, 5)


def test_layouts_agree_and_stay_uncopied():
    x, y, w = _feats(2, 24, 5, 6, seed=4)
    xc, yc = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    a = lpips_distance(x, y, w, spatial=True)
    b = lpips_distance(xc, yc, w, spatial=True)
    c = lpips_distance(x, yc, w, spatial=True)  # mixed layouts
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=0)
    # the gradient comes back in the input's layout
    xg = xc.clone().requires_grad_()
    lpips_distance(xg, yc, w).sum().backward()
    assert xg.grad.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("variant", ["plain", "broadcast", "channels_last"])
def test_gradcheck_cpp_fp64(spatial, variant):
    x, y, w = _feats(2, 5, 3, 4, dtype=torch.float64, seed=5, n1=1 if variant == "broadcast" else None,
                     channels_last=variant == "channels_last")  # fmt: skip
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: lpips_distance(a, b, c, spatial=spatial, backend="cpp"), (x, y, w), eps=1e-6, atol=1e-7
    )


def test_gradcheck_cpp_fp64_unweighted():
    x, y, _ = _feats(2, 7, 2, 3, dtype=torch.float64, seed=6)
    x, y = x.requires_grad_(), y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lpips_distance(a, b, None, backend="cpp"), (x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("shape,channels_last,n1", [((3, 64, 7, 5), False, None), ((3, 192, 3, 5), True, 1)])
def test_all_three_gradients_match_oracle(backend, spatial, shape, channels_last, n1):
    x, y, w = _feats(*shape, seed=11, channels_last=channels_last, n1=n1)
    up = torch.randn((shape[0], 1, shape[2], shape[3]) if spatial else (shape[0],), dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, y, w)]
    ref = [t.double().requires_grad_() for t in (x, y, w)]
    g_ours = torch.autograd.grad(lpips_distance(*ours, spatial=spatial, backend=backend), ours, up.float())
    g_ref = torch.autograd.grad(lpips_distance_reference(*ref, spatial=spatial), ref, up)
    for name, a, b in zip(("feat0", "feat1", "weight"), g_ours, g_ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_required_gradients(backend):
    x, y, w = _feats(2, 16, 3, 3, seed=12)
    x.requires_grad_()
    lpips_distance(x, y, w, backend=backend).sum().backward()
    assert x.grad is not None and y.grad is None and w.grad is None
    w.requires_grad_()
    x.grad = None
    lpips_distance(x.detach(), y, w, backend=backend).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_backward_op_skips_unrequested_outputs():
    x, y, w = _feats(2, 16, 3, 3, seed=13)
    g = torch.ones(2)
    dx, dy, dw = torch.ops.lpips_fast.distance_cpu_backward(g, x, y, w, False, 1e-10, True, False, False)
    assert dx.shape == x.shape and dy.numel() == 0 and dw.numel() == 0


def test_weight_gradient_through_lin_parameter():
    """The model passes lin.weight.view(-1); the gradient must reach the (1,C,1,1) parameter."""
    lin = torch.nn.Conv2d(32, 1, 1, bias=False)
    x, y, _ = _feats(2, 32, 4, 4, seed=14)
    lpips_distance(x, y, lin.weight.view(-1)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (1, 32, 1, 1)
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_columns_give_finite_zero_gradients(backend):
    x, y, w = _feats(2, 16, 4, 4, seed=15)
    x[:, :, 1, 2] = 0  # an all-zero feature vector (dead ReLU pixel)
    y[0, :, 3, 0] = 0
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    out = lpips_distance(x, y, w, spatial=True, backend=backend)
    gx, gy, gw = torch.autograd.grad(out.sum(), (x, y, w))
    for g in (gx, gy, gw):
        assert torch.isfinite(g).all()
    assert (gx[:, :, 1, 2] == 0).all() and (gy[0, :, 3, 0] == 0).all()
    assert gx.abs().sum() > 0
    # the reference gives NaN there (documented difference)
    ref_g = torch.autograd.grad(lpips_distance_reference(x, y, w, spatial=True).sum(), x)[0]
    assert torch.isnan(ref_g).any()


# ----------------------------------------------------------------------------- determinism
def test_bitwise_repeatable_and_thread_count_independent():
    x, y, w = _feats(3, 64, 15, 15, seed=16)

    def run():
        xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
        out = lpips_distance(xs, ys, ws)
        grads = torch.autograd.grad(out.sum(), (xs, ys, ws))
        return [out.detach(), *grads]

    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------- torch.library
def _opcheck_samples():
    x, y, w = _feats(2, 6, 3, 4, seed=17)
    xc = x.contiguous(memory_format=torch.channels_last)
    return [
        (x.requires_grad_(), y, w.requires_grad_(), False, 1e-10),
        (xc, y.requires_grad_(), None, True, 1e-10),
        (x.detach().half(), y.detach().half(), w.detach(), True, 1e-10),
    ]


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_cpu(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.lpips_fast.distance_cpu.default, args)


def test_opcheck_cpu_backward():
    x, y, w = _feats(2, 6, 3, 4, seed=18)
    args = (torch.rand(2, 1, 3, 4), x.contiguous(memory_format=torch.channels_last), y, w, True, 1e-10, True, True, True)
    torch.library.opcheck(torch.ops.lpips_fast.distance_cpu_backward.default, args)


def test_compile_fullgraph_cpu():
    x, y, w = _feats(2, 16, 5, 5, seed=19)

    def step(a, b, c):
        return lpips_distance(a, b, c).sum() + lpips_distance(a, b, None, spatial=True).mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    xs = [t.clone().requires_grad_() for t in (x, y, w)]
    xe = [t.clone().requires_grad_() for t in (x, y, w)]
    out_c, out_e = compiled(*xs), step(*xe)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(out_c, xs), torch.autograd.grad(out_e, xe)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- arguments
def _bad_cases():
    x, y, w = _feats(2, 4, 3, 3)
    return [
        ((x[0], y, w), {}, ValueError, "feat0 must be 4-D"),
        ((x, y[:, :3], w), {}, ValueError, "feat1 must match feat0 in C, H and W"),
        ((x, y[:, :, :2], w), {}, ValueError, "feat1 must match feat0 in C, H and W"),
        ((x, y[..., :2], w), {}, ValueError, "feat1 must match feat0 in C, H and W"),
        ((x, torch.cat([y, y, y]), w), {}, ValueError, "batch sizes"),
        ((x, y, w[:3]), {}, ValueError, "weight must have shape (4,)"),
        ((x, y, w.view(1, 4)), {}, ValueError, "weight must have shape (4,)"),
        ((x, y, torch.ones(4, dtype=torch.long)), {}, TypeError, "weight must be floating point"),
        ((x.long(), y.long(), w), {}, TypeError, "feat0 must be a floating-point tensor"),
        ((x, y.double(), w), {}, TypeError, "share a dtype"),
        ((x, y, w), {"backend": "cuda"}, ValueError, "backend must be None"),
        ((x, y, w), {"spatial": 1}, TypeError, "spatial must be a bool"),
        ((x.numpy(), y, w), {}, TypeError, "feat0 must be a torch.Tensor"),
        ((x, y, w.to("meta")), {}, ValueError, "weight must be on the features' device"),
        ((x, y.to("meta"), w), {}, ValueError, "must be on one device"),
        ((x.to("meta"), y.to("meta"), w.to("meta")), {"backend": "cpp"}, ValueError, "needs CPU tensors"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_raise_clear_errors(case):
    args, kwargs, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        lpips_distance(*args, **kwargs)


# ----------------------------------------------------------------------------- loading
def test_fallback_when_cpp_unavailable_warns_once(monkeypatch):
    def broken(verbose):
        raise OSError("no compiler here")

    monkeypatch.setattr(ops._cpu, "_build", broken)
    monkeypatch.setattr(ops._cpu, "_kernels_registered", lambda: False)
    monkeypatch.setitem(ops._cpu._state, "ok", None)
    x, y, w = _feats(2, 8, 3, 3, seed=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = lpips_distance(x, y, w)
        out2 = lpips_distance(x, y, w, spatial=True)
    msgs = [c for c in caught if "pure-PyTorch" in str(c.message)]
    assert len(msgs) == 1
    torch.testing.assert_close(out1, lpips_distance_reference(x, y, w).float(), rtol=1e-6, atol=0)
    assert out2.shape == (2, 1, 3, 3)
    ours = [t.clone().requires_grad_() for t in (x, y, w)]
    ref = [t.double().requires_grad_() for t in (x, y, w)]
    up = torch.rand(2, 1, 3, 3)
    g_ours = torch.autograd.grad(lpips_distance(*ours, spatial=True), ours, up)
    g_ref = torch.autograd.grad(lpips_distance_reference(*ref, spatial=True), ref, up.double())
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_import_is_lazy():
    code = (
        "import sys, lpips_fast, lpips_fast.ops as o; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert o._cpu._state['ok'] is None, 'C++ built at import'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_autocast_bf16_features_fp32_weight():
    """The model under CPU autocast: bf16 features, the fp32 lin parameter viewed as (C,)."""
    lin = torch.nn.Conv2d(16, 1, 1, bias=False)
    x, y, _ = _feats(2, 16, 4, 4, dtype=torch.bfloat16, seed=21)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lpips_distance(x, y, lin.weight.view(-1))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32
    ref = lpips_distance_reference(x.detach(), y, lin.weight.detach().view(-1))
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=0)


def test_cuda_default_without_triton_falls_back_to_eager(monkeypatch):
    """Where triton cannot be imported (e.g. Windows CUDA builds), the default CUDA backend is the
    eager composite with one warning, not an error (checked on the CPU by faking the device)."""
    import lpips_fast.ops as ops

    def no_triton():
        raise RuntimeError("lpips_distance: backend 'triton' needs the triton package (simulated)")

    monkeypatch.setattr(ops, "_triton_ops", no_triton)
    monkeypatch.setattr(ops, "_cuda_default", None)
    with pytest.warns(RuntimeWarning, match="eager composite on CUDA"):
        assert ops._default_cuda_backend() == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops._default_cuda_backend() == "torch"
