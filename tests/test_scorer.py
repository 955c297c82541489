"""``lpips_fast.Scorer``: values equal LPIPS, batching, load balancing, bad requests, OOM, backpressure."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast import Engine, InvalidInput, Overloaded, Scorer

TOL = 1e-6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lpips_fast.LPIPS(net="alex", pnet_rand=True)


def _rand_pair(h=64, w=64, gen=None):
    a = torch.rand(3, h, w, generator=gen) * 2 - 1
    b = torch.rand(3, h, w, generator=gen) * 2 - 1
    return a, b


def _ref(model, a, b) -> float:
    with torch.no_grad():
        return model(a[None], b[None]).item()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FakeEngine:
    """A real Engine behind a hook that can block, record or raise for a batch."""

    def __init__(self, engine: Engine, hook=None):
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.hook = hook
        self.batches: list[torch.Tensor] = []

    def __call__(self, a, b):
        self.batches.append(a.clone())
        if self.hook is not None:
            self.hook(a, b)
        return self.engine(a, b)


def test_values_equal_lpips_for_every_input_kind_and_both_devices_work(model, tmp_path):
    g = torch.Generator().manual_seed(1)
    u8 = [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g).numpy() for _ in range(4)]
    path = tmp_path / "a.png"
    path.write_bytes(_png(u8[0]))
    cases = []  # (img0, img1, reference value)
    for _ in range(24):
        a, b = _rand_pair(gen=g)
        cases.append((a, b, _ref(model, a, b)))
    fl = [torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in u8]
    cases += [
        (torch.from_numpy(u8[0]).permute(2, 0, 1), torch.from_numpy(u8[1]).permute(2, 0, 1), _ref(model, fl[0], fl[1])),
        (u8[0], u8[1], _ref(model, fl[0], fl[1])),  # numpy HxWx3 uint8
        (_png(u8[2]), _png(u8[3]), _ref(model, fl[2], fl[3])),  # encoded bytes
        (str(path), u8[1], _ref(model, fl[0], fl[1])),  # a path and an array
        (u8[2], fl[3], _ref(model, fl[2], fl[3])),  # uint8 with float
        (fl[0][None], fl[1].numpy(), _ref(model, fl[0], fl[1])),  # (1,3,H,W) tensor, float array
    ]
    with Scorer(model=model, devices=["cpu", "cpu"], max_batch=8, max_delay_ms=20) as scorer:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda c: scorer.score(c[0], c[1], timeout=60), cases))
        stats = scorer.stats()
    for (_, _, want), v in zip(cases, got):
        assert isinstance(v, float)
        assert abs(v - want) <= TOL, (v, want)
    assert stats["pairs_scored"] == len(cases) and stats["errors"] == {}
    per_device = {k: v["pairs"] for k, v in stats["devices"].items()}
    assert set(per_device) == {"cpu#0", "cpu#1"}
    assert all(n > 0 for n in per_device.values()), per_device
    assert stats["batches"] < len(cases)  # coalesced


def test_pairs_are_coalesced_per_shape(model):
    eng = FakeEngine(Engine(model=model, device="cpu"))
    with Scorer(engines=[eng], max_batch=8, max_delay_ms=1000) as scorer:
        futs = [scorer.submit(*_rand_pair(64, 64)) for _ in range(8)]
        futs += [scorer.submit(*_rand_pair(48, 40)) for _ in range(3)]
        concurrent.futures.wait(futs, timeout=60)
        assert all(f.exception() is None for f in futs)
    shapes = sorted((b.shape[0], tuple(b.shape[2:])) for b in eng.batches)
    assert shapes == [(3, (48, 40)), (8, (64, 64))]


def test_bad_requests_fail_alone(model):
    g = torch.Generator().manual_seed(2)
    good = [_rand_pair(gen=g) for _ in range(6)]
    nan = torch.rand(3, 64, 64)
    nan[0, 1, 2] = float("nan")
    bad = {
        "undecodable": (b"\x89PNG not really", good[0][1]),
        "nonfinite": (nan, good[0][1]),
        "too_small": (torch.rand(3, 16, 16), torch.rand(3, 16, 16)),
        "shape_mismatch": (torch.rand(3, 64, 64), torch.rand(3, 64, 48)),
        "bad_type": ([1, 2, 3], good[0][1]),
        "too_large": (torch.rand(3, 300, 300), torch.rand(3, 300, 300)),
    }
    with Scorer(model=model, devices=["cpu"], max_batch=16, max_delay_ms=50, max_pixels=200 * 200) as scorer:
        futs = []
        for i, (a, b) in enumerate(good):
            futs.append(scorer.submit(a, b))
            if i < len(bad):
                kind = list(bad)[i]
                futs.append((kind, scorer.submit(*bad[kind])))
        for f in futs:
            if isinstance(f, tuple):
                kind, f = f
                err = f.exception(timeout=60)
                assert isinstance(err, InvalidInput) and err.kind == kind, (kind, err)
                assert ("img0" in str(err)) or ("img1" in str(err))
        vals = [f.result(timeout=60) for f in futs if not isinstance(f, tuple)]
        stats = scorer.stats()
    for (a, b), v in zip(good, vals):
        assert abs(v - _ref(model, a, b)) <= TOL
    assert stats["errors"] == {k: 1 for k in bad}


def test_engine_failure_on_one_pair_spares_the_rest_of_its_batch(model):
    poison = -0.123

    def hook(a, b):
        if (a[:, 0, 0, 0] == poison).any():
            raise RuntimeError("poisoned pair")

    eng = FakeEngine(Engine(model=model, device="cpu"), hook)
    pairs = [_rand_pair() for _ in range(8)]
    pairs[5][0][0, 0, 0] = poison
    with Scorer(engines=[eng], max_batch=8, max_delay_ms=300) as scorer:
        futs = [scorer.submit(a, b) for a, b in pairs]
        concurrent.futures.wait(futs, timeout=60)
    for i, (f, (a, b)) in enumerate(zip(futs, pairs)):
        if i == 5:
            assert "poisoned" in str(f.exception())
        else:
            assert abs(f.result() - _ref(model, a, b)) <= TOL
    assert eng.batches[0].shape[0] == 8  # they did share a batch


def test_out_of_memory_halves_the_batch_and_caps_the_shape(model):
    def hook(a, b):
        if a.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated: batch too large")

    eng = FakeEngine(Engine(model=model, device="cpu"), hook)
    pairs = [_rand_pair() for _ in range(16)]
    with Scorer(engines=[eng], max_batch=16, max_delay_ms=300) as scorer:
        futs = [scorer.submit(a, b) for a, b in pairs]
        vals = [f.result(timeout=60) for f in futs]
        assert [b.shape[0] for b in eng.batches] == [16, 8, 4, 4, 8, 4, 4]
        assert scorer.stats()["oom_retries"] == 3
        # Later batches of that shape start at the cap: no more out-of-memory errors.
        more = [scorer.submit(*_rand_pair()) for _ in range(8)]
        concurrent.futures.wait(more, timeout=60)
        assert scorer.stats()["oom_retries"] == 3
        assert all(b.shape[0] <= 4 for b in eng.batches[7:])
    for (a, b), v in zip(pairs, vals):
        assert abs(v - _ref(model, a, b)) <= TOL


def test_backpressure_and_cancellation(model):
    gate = threading.Event()
    eng = FakeEngine(Engine(model=model, device="cpu"), lambda a, b: gate.wait(30))
    with Scorer(engines=[eng], max_batch=1, max_delay_ms=0, max_queue=2) as scorer:
        first = scorer.submit(*_rand_pair())  # taken by the worker, which blocks on the gate
        deadline = time.monotonic() + 10
        while not eng.batches and time.monotonic() < deadline:
            time.sleep(0.005)
        assert eng.batches, "the worker never started"
        queued = [scorer.submit(*_rand_pair()) for _ in range(2)]
        with pytest.raises(Overloaded, match="max_queue=2"):
            scorer.submit(*_rand_pair())
        # score() waits for room instead of raising; cancelling a queued pair makes that room.
        waiter = concurrent.futures.ThreadPoolExecutor(1).submit(scorer.score, *_rand_pair(), 30)
        time.sleep(0.05)
        assert not waiter.done()
        assert queued[0].cancel()
        gate.set()
        assert isinstance(waiter.result(timeout=60), float)
        assert isinstance(first.result(timeout=60), float) and isinstance(queued[1].result(timeout=60), float)
        stats = scorer.stats()
    assert len(eng.batches) == 3  # first, queued[1], the waiter: the cancelled pair never ran
    assert stats["cancelled"] == 1 and stats["errors"] == {"overloaded": 1}


def test_score_async_decodes_off_the_loop_and_matches(model):
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (48, 48, 3), dtype=torch.uint8, generator=g).numpy() for _ in range(12)]
    enc = [_png(x) for x in imgs]
    fl = [torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in imgs]

    async def main(scorer):
        return await asyncio.gather(*(scorer.score_async(enc[i], enc[i + 1]) for i in range(0, 12, 2)))

    with Scorer(model=model, devices=["cpu"], max_batch=8, max_delay_ms=10) as scorer:
        got = asyncio.run(main(scorer))
    for k, v in enumerate(got):
        assert abs(v - _ref(model, fl[2 * k], fl[2 * k + 1])) <= TOL


def test_close_drains_queued_pairs_then_refuses(model):
    scorer = Scorer(model=model, devices=["cpu"], max_batch=64, max_delay_ms=60_000)
    pairs = [_rand_pair() for _ in range(5)]
    futs = [scorer.submit(a, b) for a, b in pairs]
    t = time.perf_counter()
    scorer.close()
    assert time.perf_counter() - t < 30  # not the 60 s delay
    for f, (a, b) in zip(futs, pairs):
        assert abs(f.result(timeout=0) - _ref(model, a, b)) <= TOL
    with pytest.raises(RuntimeError, match="closed"):
        scorer.submit(*pairs[0])


def test_spatial_maps_equal_lpips():
    torch.manual_seed(0)
    m = lpips_fast.LPIPS(net="alex", pnet_rand=True, spatial=True)
    pairs = [_rand_pair(40, 48) for _ in range(3)]
    with Scorer(model=m, devices=["cpu"], max_delay_ms=20) as scorer:
        maps = [f.result(timeout=60) for f in [scorer.submit(a, b) for a, b in pairs]]
    for (a, b), got in zip(pairs, maps):
        with torch.no_grad():
            want = m(a[None], b[None])[0, 0]
        assert got.shape == (40, 48)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_argument_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="max_batch"):
        Scorer(model=model, devices=["cpu"], max_batch=0)
    with pytest.raises(TypeError, match="devices"):
        Scorer(model=model, devices="cpu")
    with pytest.raises(ValueError, match="max_queue"):
        Scorer(model=model, devices=["cpu"], max_queue=0)


def test_from_settings_reads_model_and_scorer_sections(tmp_path):
    from lpips_fast.deploy.settings import load_settings

    flags = {"model.random_trunk": ("true", "--set"), "model.seed": ("3", "--set"),
             "scorer.devices": ("cpu,cpu", "--device"), "scorer.max_batch": ("8", "--max-batch")}
    settings = load_settings(env={}, start_dir=tmp_path, flags=flags)
    torch.manual_seed(3)
    want = lpips_fast.LPIPS(net="alex", pnet_rand=True)
    with Scorer.from_settings(settings, max_delay_ms=50) as scorer:
        assert scorer.devices == ["cpu#0", "cpu#1"] and scorer.max_batch == 8 and scorer.max_delay == 0.05
        a, b = _rand_pair()
        assert abs(scorer.score(a, b, timeout=60) - _ref(want, a, b)) <= TOL


def test_score_async_waits_for_room_or_sheds_load(model):
    gate = threading.Event()
    eng = FakeEngine(Engine(model=model, device="cpu"), lambda a, b: gate.wait(30))

    async def main(scorer):
        first = asyncio.ensure_future(scorer.score_async(*_rand_pair()))
        while not eng.batches:  # the worker holds the first pair at the gate
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(scorer.score_async(*_rand_pair()))  # fills the queue (max_queue=1)
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await scorer.score_async(*_rand_pair(), wait=False)
        waiting = asyncio.ensure_future(scorer.score_async(*_rand_pair()))  # waits for room
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, queued, waiting), 60)

    with Scorer(engines=[eng], max_batch=1, max_delay_ms=0, max_queue=1) as scorer:
        values = asyncio.run(main(scorer))
        stats = scorer.stats()
    assert all(isinstance(v, float) for v in values)
    assert stats["requests"] == 4 and stats["pairs_scored"] == 3 and stats["errors"] == {"overloaded": 1}
