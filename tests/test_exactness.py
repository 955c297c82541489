"""Drop-in exactness beyond the parity tables: d(x, x) = 0, batch invariance, second-order
gradients against the reference, construction that leaves the global RNG alone, TorchScript."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lpips_fast
from conftest import make_pair


def _img(n, h, w, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


# ----------------------------------------------------------------------------- d(x, x) = 0
@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_images_score_exactly_zero(net, spatial, dtype):
    _, model = make_pair(net=net, spatial=spatial)
    model = model.to(dtype)
    x = _img(3, 40, 36, seed=1, dtype=dtype)
    y = _img(3, 40, 36, seed=2, dtype=dtype)
    y[1] = x[1]  # pair 1: an equal copy; pairs 0 and 2 differ
    with torch.no_grad():
        for other in (x, x.clone(), y):
            total, layers = model(x, other, retPerLayer=True)
            expect_zero = [True] * 3 if other is not y else [False, True, False]
            for k, z in enumerate(expect_zero):
                for t in [total, *layers]:
                    assert bool((t[k] == 0).all()) == z, (net, k, float(t[k].abs().max()))
        assert (model(x, x[:1]).flatten(1)[0] == 0).all()  # broadcast batch of 1


def test_identical_pair_zero_gradient_and_other_pairs_unchanged():
    _, model = make_pair(net="alex")
    x = _img(2, 48, 48, seed=3).requires_grad_(True)
    y = torch.cat([x.detach()[:1], _img(1, 48, 48, seed=4)])
    out = model(x, y)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert out[0].item() == 0.0 and (gx[0] == 0).all() and gx[1].abs().sum() > 0
    # the other pair's value and gradient are the same as when scored alone
    x1 = x.detach()[1:].clone().requires_grad_(True)
    alone = model(x1, y[1:])
    (g1,) = torch.autograd.grad(alone.sum(), x1)
    torch.testing.assert_close(out[1], alone[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(gx[1:], g1, rtol=1e-4, atol=1e-8)


@pytest.mark.pretrained
def test_functional_and_engine_zero_on_identical_images(pretrained_alex):
    x = _img(2, 64, 64, seed=5)
    assert (lpips_fast.lpips(x, x.clone()) == 0).all()
    engine = lpips_fast.Engine(net="alex", device="cpu")
    assert (engine(x, x.clone()) == 0).all()
    u8 = (torch.rand(2, 3, 64, 64) * 255).to(torch.uint8)
    assert (engine(u8, u8.clone()) == 0).all()


@pytest.fixture
def pretrained_alex():
    from lpips_fast import weights

    try:
        weights.trunk_state_dict("alex")
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pretrained alex trunk not fetched")


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_batch_invariance_below_stated_bound(net):
    """A pair scored alone, in a batch of 16, at several positions: the README's bound (1e-6)."""
    _, model = make_pair(net=net)
    x, y = _img(16, 64, 64, seed=6), _img(16, 64, 64, seed=7)
    with torch.no_grad():
        batch = model(x, y).flatten()
        for k in (0, 7, 15):
            alone = model(x[k : k + 1], y[k : k + 1]).flatten()
            assert abs(float(alone[0]) - float(batch[k])) <= 1e-6 * max(1.0, abs(float(alone[0])))
            rolled = model(torch.roll(x, k, 0), torch.roll(y, k, 0)).flatten()
            assert abs(float(rolled[k]) - float(batch[0])) <= 1e-6 * max(1.0, abs(float(batch[0])))


# ----------------------------------------------------------------------------- second order
def _second_order(model, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x, y).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), x)  # gradient of a gradient penalty
    return g.detach(), gg


@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.parametrize("lpips_on", [True, False])
def test_double_backward_equals_reference(net, lpips_on):
    ref, ours = make_pair(net=net, lpips_on=lpips_on)
    x, y = _img(2, 48, 48, seed=8), _img(2, 48, 48, seed=9)
    g_ref, gg_ref = _second_order(ref, x, y)
    g_ours, gg_ours = _second_order(ours, x, y)
    for a, b in ((g_ours, g_ref), (gg_ours, gg_ref)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_double_backward_through_lin_weights():
    """Gradient penalty w.r.t. the lin weights (meta-learning): equals the reference's."""
    ref, ours = make_pair(net="alex")
    x, y = _img(2, 40, 40, seed=10), _img(2, 40, 40, seed=11)

    def run(model):
        ws = [p for n, p in model.named_parameters() if n.startswith("lin") and "lins" not in n]
        for p in ws:
            p.requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr, y).sum(), xr, create_graph=True)
        return torch.autograd.grad((g * g).sum(), ws)

    for a, b in zip(run(ours), run(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


# ----------------------------------------------------------------------------- RNG and init
@pytest.mark.pretrained
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_construction_leaves_global_rng_untouched(net, pretrained_alex):
    torch.manual_seed(123)
    before = torch.rand(8)
    torch.manual_seed(123)
    lpips_fast.LPIPS(net=net)
    lpips_fast.Engine(net=net, device="cpu")
    assert torch.equal(torch.rand(8), before)


def test_random_trunk_still_follows_the_seed_like_the_reference():
    torch.manual_seed(5)
    a = lpips_fast.LPIPS(pretrained=False, pnet_rand=True)
    torch.manual_seed(5)
    b = lpips_fast.LPIPS(pretrained=False, pnet_rand=True)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert a.net.slice1[0].weight.abs().sum() > 0


# ----------------------------------------------------------------------------- TorchScript
def test_trace_saves_and_loads_in_a_fresh_process(tmp_path):
    _, model = make_pair(net="alex")
    x, y = _img(2, 48, 48, seed=12), _img(2, 48, 48, seed=13)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, (x, y))
    path = tmp_path / "lpips_alex.pt"
    torch.jit.save(traced, str(path))
    torch.save({"x": x, "y": y, "out": model(x, y).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import torch, lpips_fast
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = m(io["x"], io["y"])
        assert torch.equal(out, io["out"]), (out, io["out"])
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_script_raises_a_clear_error():
    _, model = make_pair(net="alex")
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(model)


# ----------------------------------------------------------------------------- dataset layer
def test_dataset_layer_scores_identical_images_exactly_zero(tmp_path):
    """Equal files (or equal pixels) score exactly 0 in dirs/ref/allpairs and all_pairs."""
    import shutil

    from lpips_fast import cli

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for name, src in (("x.png", "clean/cat.png"), ("y.png", "clean/astronaut.png")):
        shutil.copy(f"examples/{src}", a / name)
    shutil.copy("examples/clean/cat.png", b / "x.png")  # equal copy
    shutil.copy("examples/distorted/astronaut.png", b / "y.png")
    out = tmp_path / "dirs.csv"
    assert cli.main(["dirs", str(a), str(b), "-o", str(out), "-q", "--random-trunk"]) == 0
    rows = dict(line.split(",")[:3:2] for line in out.read_text().splitlines()[1:])
    assert rows["x.png"] == "0.0" and float(rows["y.png"]) > 0
    shutil.copy("examples/clean/cat.png", a / "z.png")  # a duplicate inside one folder
    out = tmp_path / "pairs.csv"
    assert cli.main(["allpairs", str(a), "-o", str(out), "-q", "--random-trunk"]) == 0
    vals = {tuple(line.split(",")[:2]): float(line.split(",")[2]) for line in out.read_text().splitlines()[1:]}
    assert vals[("x.png", "z.png")] == 0.0 and vals[("x.png", "y.png")] > 0
    _, model = make_pair(net="alex")
    x = _img(3, 40, 40, seed=14)
    x[2] = x[0]
    D = lpips_fast.all_pairs(x, model=model)
    assert D[0, 2] == 0 and D[2, 0] == 0 and D[0, 1] > 0
