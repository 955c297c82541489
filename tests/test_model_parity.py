"""Parity with the real lpips 0.1.4 package, identical random trunks, every mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_pair

NETS = ["alex", "vgg", "squeeze"]
FWD_ATOL = 1e-5  # float32, absolute
GRAD_RTOL = 1e-4  # float32, relative to the largest gradient entry


def _images(n, h, w, seed, normalize=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    return x if normalize else x * 2 - 1


def _close(a, b, atol=FWD_ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max abs error {err} > {atol}"


MODES = list(itertools.product(["0.1", "0.0"], [True, False], [False, True]))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("version,lpips_on,spatial", MODES)
def test_forward_all_modes(net, version, lpips_on, spatial):
    ref, ours = make_pair(net, version, lpips_on, spatial)
    x, y = _images(2, 33, 47, 1), _images(2, 33, 47, 2)
    with torch.no_grad():
        a, la = ref(x, y, retPerLayer=True)
        b, lb = ours(x, y, retPerLayer=True)
    _close(a, b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        _close(u, v)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("shape", [(1, 100, 75), (3, 64, 64), (5, 48, 40)])
def test_forward_sizes_normalize_broadcast(net, shape):
    ref, ours = make_pair(net)
    n, h, w = shape
    x, y1 = _images(n, h, w, 3, normalize=True), _images(1, h, w, 4, normalize=True)
    with torch.no_grad():
        _close(ref(x, y1, normalize=True), ours(x, y1, normalize=True))  # in1 batch 1 broadcast
        _close(ref(y1, x, normalize=True), ours(y1, x, normalize=True))  # in0 batch 1 broadcast


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("which", ["in0", "both"])
def test_input_gradients(net, spatial, which):
    ref, ours = make_pair(net, spatial=spatial)
    x0, y0 = _images(2, 40, 36, 5), _images(2, 40, 36, 6)
    grads = []
    for model in (ref, ours):
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(which == "both")
        model(x, y).sum().backward()
        grads.append((x.grad, y.grad))
    (gx_r, gy_r), (gx_o, gy_o) = grads
    assert torch.isfinite(gx_r).all(), "reference gradient not finite for this input: pick another seed"
    for r, o in [(gx_r, gx_o)] + ([(gy_r, gy_o)] if which == "both" else []):
        scale = r.abs().max().item()
        err = (r - o).abs().max().item()
        assert err <= GRAD_RTOL * scale, f"grad error {err} > {GRAD_RTOL} * {scale}"
    if which == "in0":
        assert gy_o is None


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_lin_weight_gradients_match_reference(net):
    """Gradients reach the lin weights (what training them needs) and equal the reference's."""
    ref, ours = make_pair(net)
    x, y = _images(2, 48, 48, 7), _images(2, 48, 48, 8)
    ref.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    ref(x, y).sum().backward()
    ours(x, y).sum().backward()
    try:
        for k in range(len(ours.lins)):
            g_r = ref.lins[k].model[1].weight.grad
            g_o = ours.lins[k].model[1].weight.grad
            assert g_o is not None
            assert torch.allclose(g_r, g_o, rtol=1e-4, atol=1e-7)
    finally:
        ref.zero_grad(set_to_none=True)


def test_state_dict_keys_identical():
    for net in NETS:
        ref, ours = make_pair(net)
        assert list(ref.state_dict().keys()) == list(ours.state_dict().keys())


def test_reference_no_dropout_checkpoint_loads(tmp_path):
    """A lin checkpoint saved by the reference with use_dropout=False (model.0 keys) loads via model_path."""
    import lpips
    import lpips_fast

    ref = lpips.LPIPS(pretrained=True, net="alex", use_dropout=False, pnet_rand=True, verbose=False)
    torch.manual_seed(5)
    for lin in ref.lins:
        lin.model[0].weight.data.uniform_(0, 1)
    path = tmp_path / "trained.pth"
    torch.save(ref.state_dict(), path)
    ours = lpips_fast.LPIPS(net="alex", use_dropout=False, pnet_rand=True, model_path=str(path))
    for k in range(5):
        assert torch.equal(ours.lins[k].weight, ref.lins[k].model[0].weight)


def test_use_dropout_false_still_loads_calibrated_weights():
    """The reference's trap: use_dropout=False silently leaves lin weights random. Not here."""
    import lpips_fast
    from lpips_fast import weights

    sd = weights.lin_state_dict("alex", "0.1")
    for use_dropout in (True, False):
        m = lpips_fast.LPIPS(net="alex", use_dropout=use_dropout, pnet_rand=True)
        for k in range(5):
            assert torch.equal(m.lins[k].weight, sd[f"lin{k}.model.1.weight"])


def test_zero_feature_columns_give_finite_gradients():
    """An all-zero feature column: the reference's normalisation has a NaN gradient there, ours is 0."""
    import lpips
    import lpips_fast
    from lpips_fast.ops import lpips_distance

    f0 = torch.rand(2, 8, 5, 5)
    f0[:, :, 1, 2] = 0.0  # one all-zero column per image
    f1 = torch.rand(2, 8, 5, 5)
    w = torch.rand(8)
    a = f0.clone().requires_grad_(True)
    ref_d = (lpips.normalize_tensor(a) - lpips.normalize_tensor(f1)) ** 2
    (ref_d * w.view(1, -1, 1, 1)).sum(1).mean().backward()
    assert torch.isnan(a.grad).any(), "the reference's trap is no longer reproducible"
    b = f0.clone().requires_grad_(True)
    lpips_distance(b, f1, w).sum().backward()
    assert torch.isfinite(b.grad).all()
    assert torch.all(b.grad[:, :, 1, 2] == 0)

    # Through the whole module (flat images make many zero columns): finite gradients.
    torch.manual_seed(0)
    m = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    with torch.no_grad():
        m.net.slice1[0].bias.fill_(-0.5)
    x = torch.full((1, 3, 64, 64), -1.0, requires_grad=True)
    y = torch.rand(1, 3, 64, 64) * 2 - 1
    m(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_quiet_by_default_and_version_alias(capsys):
    import lpips_fast

    m = lpips_fast.LPIPS(net="alex", version="v0.1", pnet_rand=True)
    assert m.version == "0.1"
    assert capsys.readouterr().out == ""
    lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=True)
    assert "Setting up [LPIPS] perceptual loss" in capsys.readouterr().out


def test_functional_caches_one_model_per_config():
    import lpips_fast
    from lpips_fast import functional

    functional.clear_model_cache()
    x, y = _images(2, 64, 64, 9), _images(2, 64, 64, 10)
    try:
        d1 = lpips_fast.lpips(x, y, net="alex")
    except FileNotFoundError:
        pytest.skip("pretrained alex trunk not fetched")
    d2 = lpips_fast.lpips(x, y, net="alex")
    assert torch.equal(d1, d2)
    assert len(functional._models) == 1
    lpips_fast.lpips(x.double(), y.double(), net="alex")
    assert len(functional._models) == 2


def test_train_mode_with_dropout_matches_reference_and_has_finite_gradients():
    """Training the lin layers (train mode, dropout on): same values as the reference for the same
    RNG state, and no NaN gradient at an all-zero feature column (the reference's trap)."""
    import copy

    ref, ours = make_pair("alex")
    ref, ours = copy.deepcopy(ref).train(), copy.deepcopy(ours).train()
    x, y = _images(2, 48, 48, 11), _images(2, 48, 48, 12)
    torch.manual_seed(3)
    a = ref(x, y)
    torch.manual_seed(3)
    b = ours(x, y)
    _close(a, b)

    # Zero columns in layer 2: a huge negative bias kills every channel of slice2's conv.
    with torch.no_grad():
        getattr(ours.net.slice2, "3").bias.fill_(-1e4)
    xg = x.clone().requires_grad_(True)
    ours(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert all(torch.isfinite(lin.weight.grad).all() for lin in ours.lins)
