"""Engine on the CPU: results equal LPIPS.forward, uint8 input, chunking/padding, fallbacks.

The CUDA-graph bookkeeping (bucketing, padding, trimming, cloning, LRU) is exercised here with a
stand-in graph that replays eagerly; real capture and replay are checked by tests/gpu/
(``python -m pytest -m cuda tests/gpu``, run by ``benchmarks/gpu_check.py`` on a GPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lpips_fast
from lpips_fast.inference.engine import Engine, _Graph, uint8_to_unit


def _model(net="alex", spatial=False, seed=0):
    torch.manual_seed(seed)
    m = lpips_fast.LPIPS(pretrained=False, pnet_rand=True, net=net, spatial=spatial, nonfinite="propagate")
    with torch.no_grad():
        for lin in m.lins:  # non-trivial lin weights (pretrained=False leaves random ones)
            lin.weight.uniform_(0.0, 0.1)
    return m.eval()


def _u8(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def alex():
    return _model("alex")


@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_matches_module(alex, channels_last):
    e = Engine(model=alex, device="cpu", channels_last=channels_last)
    x, y = _u8(3, 3, 40, 48, seed=1), _u8(3, 3, 40, 48, seed=2)
    with torch.no_grad():
        ref = alex(uint8_to_unit(x), uint8_to_unit(y))
    out = e(x, y)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_float_normalize_broadcast_and_gray(alex):
    e = Engine(model=alex, device="cpu", normalize=True)
    x = torch.rand(4, 3, 33, 35)
    y = torch.rand(1, 3, 33, 35)
    with torch.no_grad():
        ref = alex(x, y, normalize=True)
    torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    g0, g1 = torch.rand(2, 1, 33, 33), torch.rand(2, 1, 33, 33)
    with torch.no_grad():
        ref = alex(g0, g1, normalize=True)
    torch.testing.assert_close(e(g0, g1), ref, atol=1e-5, rtol=0)


def test_batch_size_chunks(alex):
    e = Engine(model=alex, device="cpu", batch_size=2)
    x, y = torch.rand(5, 3, 32, 32) * 2 - 1, torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = alex(x, y)
    torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)


def test_spatial_and_empty():
    m = _model("squeeze", spatial=True)
    e = Engine(model=m, device="cpu")
    x, y = torch.rand(2, 3, 24, 20) * 2 - 1, torch.rand(2, 3, 24, 20) * 2 - 1
    with torch.no_grad():
        ref = m(x, y)
    out = e(x, y)
    assert out.shape == (2, 1, 24, 20)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert e(x[:0], y[:0]).shape == (0, 1, 24, 20)


def test_bf16_trunk_close(alex):
    # bf16 keeps 8 mantissa bits: the trunk's features carry ~0.4% relative error; the distance
    # accumulates in fp32. Bound: 3% of the value plus 1e-3.
    e = Engine(model=alex, device="cpu", dtype=torch.bfloat16)
    x, y = _u8(2, 3, 32, 32, seed=3), _u8(2, 3, 32, 32, seed=4)
    with torch.no_grad():
        ref = alex(uint8_to_unit(x), uint8_to_unit(y))
    out = e(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=3e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_caller_module_untouched(alex, channels_last):
    w = alex.net.slice1[0].weight
    strides = w.stride()
    Engine(model=alex, device="cpu", dtype=torch.bfloat16, channels_last=channels_last)
    assert alex.net.slice1[0].weight is w and w.dtype == torch.float32 and w.stride() == strides


def test_input_errors(alex):
    e = Engine(model=alex, device="cpu")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(TypeError, match="img0"):
        e(x.numpy(), x)
    with pytest.raises(ValueError, match="img1"):
        e(x, x[:, :2])
    with pytest.raises(TypeError, match="uint8"):
        e(x, _u8(2, 3, 32, 32))
    with pytest.raises(TypeError, match="int32"):
        e(x.int(), x.int())
    with pytest.raises(ValueError, match="batch sizes"):
        e(x, torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="minimum"):
        e(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        Engine(model=alex, device="cpu", dtype=torch.float64)
    with pytest.raises(TypeError, match="model="):
        Engine(model=alex, device="cpu", version="0.0")


def test_compile_failure_falls_back_with_one_warning(alex, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("simulated Inductor failure")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    e = Engine(model=alex, device="cpu", compile=True)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = alex(x, y)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = e(x, y)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    assert e.compile is False


# -- CUDA-graph bookkeeping with a stand-in graph -----------------------------------------------
class _EagerGraph:
    """Replays by recomputing into the static output, as a captured graph would."""

    def __init__(self, engine, in0, in1, out):
        self.engine, self.in0, self.in1, self.out = engine, in0, in1, out
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.engine._compute(self.in0, self.in1))


def _fake_capture(engine):
    def capture(key):
        batch, c, h, w, dt = key
        in0 = torch.zeros((batch, c, h, w), dtype=dt)
        in1 = torch.zeros((batch, c, h, w), dtype=dt)
        out = engine._compute(in0, in1)
        engine.stats["captures"] += 1
        return _Graph(graph=_EagerGraph(engine, in0, in1, out), in0=in0, in1=in1, out=out)

    return capture


def _graph_engine(model, **kw):
    e = Engine(model=model, device="cpu", **kw)
    e.cuda_graphs = True  # pretend: the capture is the stand-in above
    e._capture = _fake_capture(e)
    return e


def test_graph_padding_trimming_clone_and_lru(alex):
    e = _graph_engine(alex, max_graphs=2)
    x, y = _u8(6, 3, 32, 32, seed=5), _u8(6, 3, 32, 32, seed=6)
    with torch.no_grad():
        ref = alex(uint8_to_unit(x), uint8_to_unit(y))
    first = e(x[:4], y[:4])
    torch.testing.assert_close(first, ref[:4], atol=1e-5, rtol=0)
    # A short batch reuses the 4-graph (padded), and the earlier result is not overwritten.
    kept = first.clone()
    short = e(x[4:], y[4:])
    torch.testing.assert_close(short, ref[4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(first, kept, atol=0, rtol=0)
    assert e.stats["captures"] == 1 and e.stats["replays"] == 2
    # Poison the static output: the next replay must rewrite it.
    entry = next(iter(e._graphs.values()))
    entry.out.fill_(float("nan"))
    torch.testing.assert_close(e(x[:3], y[:3]), ref[:3], atol=1e-5, rtol=0)
    # New sizes: LRU keeps two graphs.
    e(_u8(2, 3, 40, 40), _u8(2, 3, 40, 40))
    e(_u8(2, 3, 48, 48), _u8(2, 3, 48, 48))
    assert len(e._graphs) == 2 and e.stats["evictions"] == 1
    assert (4, 3, 32, 32, torch.uint8) not in e._graphs


def test_graph_batch_size_and_broadcast(alex):
    e = _graph_engine(alex, batch_size=4)
    x, y = torch.rand(7, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = alex(x, y)
    torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    assert list(e._graphs) == [(4, 3, 32, 32, torch.float32)]


def test_graph_batch_size_small_first_call_captures_once(alex):
    """batch_size=4: a first call of 2 pairs captures the 4-graph, which then serves 7 pairs."""
    e = _graph_engine(alex, batch_size=4)
    x, y = torch.rand(7, 3, 32, 32) * 2 - 1, torch.rand(7, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = alex(x, y)
    torch.testing.assert_close(e(x[:2], y[:2]), ref[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    assert list(e._graphs) == [(4, 3, 32, 32, torch.float32)] and e.stats["captures"] == 1


def test_eager_errors_are_not_reported_as_compile_failures(alex):
    """An error in the eager path propagates once, with no compile warning and no rerun."""
    e = Engine(model=alex, device="cpu", compile=False)
    calls = []

    def boom(x):
        calls.append(1)
        raise MemoryError("simulated")

    e._features_fn = boom
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MemoryError):
            e(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert calls == [1]


def test_capture_failure_of_one_shape_keeps_the_other_graphs(alex):
    """After a successful capture, a shape that fails to capture (e.g. out of memory) runs eager,
    with one warning; graphs stay on for the shapes that work."""
    e = _graph_engine(alex)
    fake = e._capture

    def capture(key):
        if key[2] == 40:
            raise RuntimeError("simulated capture OOM")
        return fake(key)

    e._capture = capture
    x32, y32 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    x40, y40 = torch.rand(2, 3, 40, 40) * 2 - 1, torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        r32, r40 = alex(x32, y32), alex(x40, y40)
    torch.testing.assert_close(e(x32, y32), r32, atol=1e-5, rtol=0)
    with pytest.warns(RuntimeWarning, match="capture of a new shape failed"):
        torch.testing.assert_close(e(x40, y40), r40, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(e(x40, y40), r40, atol=1e-5, rtol=0)
        torch.testing.assert_close(e(x32, y32), r32, atol=1e-5, rtol=0)
    assert e.cuda_graphs is True
    assert e.stats["captures"] == 1 and e.stats["replays"] == 2 and e.stats["eager_calls"] == 2


def test_capture_failure_falls_back_with_one_warning(alex):
    e = Engine(model=alex, device="cpu")
    e.cuda_graphs = True

    def broken(key):
        raise RuntimeError("simulated capture failure")

    e._capture = broken
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = alex(x, y)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)
    assert e.cuda_graphs is False


def test_lazy_export():
    assert lpips_fast.Engine is Engine


def test_channels_last_module_forced_to_nchw(alex):
    import copy

    m = copy.deepcopy(alex)
    m.net.to(memory_format=torch.channels_last)
    e = Engine(model=m, device="cpu", channels_last=False)
    assert e.model.net.slice1[0].weight.is_contiguous()
    x, y = _u8(2, 3, 32, 32, seed=8), _u8(2, 3, 32, 32, seed=9)
    with torch.no_grad():
        ref = alex(uint8_to_unit(x), uint8_to_unit(y))
    torch.testing.assert_close(e(x, y), ref, atol=1e-5, rtol=0)


def test_precision_names_from_tune_set_dtype_and_layout():
    from lpips_fast.inference.engine import ENGINE_PRECISIONS, precision_settings

    model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    e = Engine(model=model, device="cpu", precision="bf16-nchw")
    assert e.dtype == torch.bfloat16 and e.channels_last is False
    assert Engine(model=model, device="cpu", precision="fp32").channels_last is True
    assert set(ENGINE_PRECISIONS) <= {"fp32", "fp32-nchw", "bf16", "bf16-nchw", "fp16", "fp16-nchw"}
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    y = torch.rand(2, 3, 40, 40) * 2 - 1
    exact = Engine(model=model, device="cpu", precision="fp32-nchw")(x, y)
    torch.testing.assert_close(exact, model(x, y).float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not an Engine setting"):
        Engine(model=model, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="expected one of"):
        precision_settings("fp8")
    with pytest.raises(ValueError, match="not both"):
        Engine(model=model, device="cpu", precision="bf16", dtype=torch.float32)
