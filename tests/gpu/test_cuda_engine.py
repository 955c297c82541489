"""LPIPS and Engine on CUDA: the module against the fp64 oracle on its features, Engine (eager, CUDA graphs, compiled)
against the module, graph replays that really rewrite their output, the pinned pipeline's
ordering, and the compile/capture fallbacks.

Tolerances: fp32 runs with TF32 and cuDNN autotuning off in the module (conftest; the Engine
turns autotuning on inside its calls, which may pick Winograd/FFT convolutions): 1e-5 absolute
on LPIPS values of order 0.1-1 (fp32 convolutions in a different order differ by ~1e-6 relative).
bf16/fp16 engines: ``2 * |module under autocast - module fp32| + 1e-4``, PyTorch's own
low-precision error on the same images (the trunk runs in the same precision, the distance in
fp32 in both).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lpips_fast
from lpips_fast.inference.engine import Engine, uint8_to_unit
from lpips_fast.ops import lpips_distance_reference
from lpips_fast.inference.pipeline import PinnedPipeline

pytestmark = pytest.mark.cuda


def _model(net: str, seed: int = 1234) -> lpips_fast.LPIPS:
    torch.manual_seed(seed)
    m = lpips_fast.LPIPS(pretrained=False, net=net, pnet_rand=True, nonfinite="propagate")
    with torch.no_grad():
        for lin in m.lins:
            lin.weight.uniform_(0.0, 0.1)
    return m.eval()


def _u8(n: int, px: int, seed: int, device="cuda") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, device=device, generator=g)


def _module(m, x, y):
    with torch.no_grad():
        return m(uint8_to_unit(x), uint8_to_unit(y)).float()


def _bound(m, x, y, want, dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        lowp = m(uint8_to_unit(x), uint8_to_unit(y)).float()
    return 2 * float((lowp - want).abs().max()) + 1e-4


def _err(a, b) -> float:
    return float((a.float().reshape(-1) - b.float().reshape(-1)).abs().max())


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_module_on_cuda_matches_the_oracle_on_its_features(net):
    """LPIPS.forward on CUDA (one batched trunk pass, the grouped op) against the fp64 oracle summed
    over the layers of the same trunk's features (no CPU run: that would build the C++ op)."""
    m = _model(net).cuda()
    xf, yf = uint8_to_unit(_u8(3, 48, 1)), uint8_to_unit(_u8(3, 48, 2))
    with torch.no_grad():
        got = m(xf, yf)
        f0, f1 = m.features(xf), m.features(yf)
        want = sum(
            lpips_distance_reference(a, b, w).view(-1, 1, 1, 1) for a, b, w in zip(f0, f1, m.lin_weights())
        )
    assert _err(got, want) <= 1e-5
    xi = xf.clone().requires_grad_()
    m(xi, yf).sum().backward()  # the loss: finite input gradient, also at all-zero feature columns
    assert torch.isfinite(xi.grad).all() and xi.grad.abs().max() > 0


@pytest.mark.parametrize("net", ["alex", "squeeze", "vgg"])
def test_engine_eager_fp32_equals_module(net):
    m = _model(net).cuda()
    x, y = _u8(8, 64, 3), _u8(8, 64, 4)
    e = Engine(model=m, device="cuda", dtype=torch.float32, compile=False, cuda_graphs=False)
    assert _err(e(x, y), _module(m, x, y)) <= 1e-5


@pytest.mark.parametrize(
    "net,dtype", [("alex", torch.float32), ("alex", torch.bfloat16), ("squeeze", torch.float16), ("vgg", torch.bfloat16)]
)
def test_engine_graphs_poisoned_output_is_rewritten(net, dtype):
    m = _model(net).cuda()
    n, px = 8, 64
    e = Engine(model=m, device="cuda", dtype=dtype, compile=False, cuda_graphs=True)
    x, y = _u8(n, px, 10), _u8(n, px, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        first = e(x, y)
    assert e.cuda_graphs and e.stats["captures"] == 1
    want = _module(m, x, y)
    assert _err(first, want) <= _bound(m, x, y, want, dtype)
    kept = first.clone()
    (entry,) = e._graphs.values()
    for seed in (20, 21, 22):
        entry.out.fill_(float("nan"))
        x2, y2 = _u8(n, px, seed), _u8(n, px, seed + 100)
        got = e(x2, y2)
        want2 = _module(m, x2, y2)
        assert torch.isfinite(got).all() and _err(got, want2) <= _bound(m, x2, y2, want2, dtype)
    assert torch.equal(first, kept), "a later replay overwrote an earlier result"
    x3, y3 = _u8(5, px, 30), _u8(5, px, 31)  # short batch: padded into the captured one
    got3 = e(x3, y3)
    want3 = _module(m, x3, y3)
    assert got3.shape == (5, 1, 1, 1) and e.stats["captures"] == 1
    assert _err(got3, want3) <= _bound(m, x3, y3, want3, dtype)
    assert torch.equal(e(x, y), first), "replays are not deterministic"
    assert e.stats["eager_calls"] == 0


def test_engine_graphs_lru():
    e = Engine(model=_model("squeeze"), device="cuda", dtype=torch.bfloat16, compile=False, max_graphs=2)
    for p in (32, 40, 48):
        e(_u8(2, p, p), _u8(2, p, p + 1))
    assert len(e._graphs) == 2 and e.stats["evictions"] == 1


@pytest.mark.parametrize("dtype,graphs", [(torch.float32, True), (torch.bfloat16, False)])
def test_engine_compiled(dtype, graphs):
    torch._dynamo.reset()
    m = _model("alex").cuda()
    x, y = _u8(16, 64, 40), _u8(16, 64, 41)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e = Engine(model=m, device="cuda", dtype=dtype, compile=True, cuda_graphs=graphs)
        got = e(x, y)
        got2 = e(_u8(16, 64, 42), _u8(16, 64, 43))
    fell_back = [str(v.message) for v in w if "lpips_fast" in str(v.message)]
    assert e.compile and not fell_back and e.cuda_graphs == graphs, fell_back
    want = _module(m, x, y)
    assert _err(got, want) <= _bound(m, x, y, want, dtype)
    assert torch.isfinite(got2).all()


@pytest.mark.parametrize("slots", [2, 3])
def test_pinned_pipeline_order_and_integrity(slots):
    """Distinct data per batch: a slot rewritten before its copy ended would corrupt a batch."""
    e = Engine(model=_model("alex").cuda(), device="cuda", dtype=torch.bfloat16, compile=False)
    g = torch.Generator().manual_seed(7)
    nb, n, px = 8, 16, 128
    batches = [
        (torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g),
         torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g))
        for _ in range(nb)
    ]  # fmt: skip
    direct = [e(a.cuda(), b.cuda()).reshape(-1).cpu() for a, b in batches]
    got = list(PinnedPipeline(e, slots=slots).map(iter(batches)))
    assert len(got) == nb
    for k, (a, b) in enumerate(zip(got, direct)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"batch {k} differs"
    short = [(batches[0][0][: n // 2], batches[0][1][: n // 2])] + batches[1:3]
    got = list(PinnedPipeline(e, slots=slots).map(short))
    assert torch.allclose(got[0], direct[0][: n // 2], atol=1e-6) and torch.allclose(got[2], direct[2], atol=1e-6)


def test_capture_failure_falls_back_once(monkeypatch):
    m = _model("squeeze").cuda()
    x, y = _u8(2, 32, 50), _u8(2, 32, 51)
    want = _module(m, x, y)
    e = Engine(model=m, device="cuda", dtype=torch.float32, compile=False, cuda_graphs=True)

    def broken_capture(key):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(e, "_capture", broken_capture)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a, b = e(x, y), e(x, y)
    msgs = [str(v.message) for v in w if "lpips_fast" in str(v.message)]
    assert len(msgs) == 1 and not e.cuda_graphs
    assert _err(a, want) <= 1e-5 and _err(b, want) <= 1e-5


def test_compile_failure_falls_back_once(monkeypatch):
    m = _model("squeeze").cuda()
    x, y = _u8(2, 32, 52), _u8(2, 32, 53)
    want = _module(m, x, y)
    e = Engine(model=m, device="cuda", dtype=torch.float32, compile=True, cuda_graphs=False)

    def broken_compiled(inp):
        raise RuntimeError("simulated Inductor failure")

    monkeypatch.setattr(e, "_features_fn", broken_compiled)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a, b = e(x, y), e(x, y)
    msgs = [str(v.message) for v in w if "lpips_fast" in str(v.message)]
    assert len(msgs) == 1 and not e.compile
    assert _err(a, want) <= 1e-5 and _err(b, want) <= 1e-5
