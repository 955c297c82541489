"""Bad inputs raise clear errors naming the argument; empty batches give empty results."""

from __future__ import annotations

import pytest
import torch

import lpips_fast


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)


def img(*shape):
    return torch.rand(*shape) * 2 - 1


@pytest.mark.parametrize(
    "in0,in1,exc,words",
    [
        ([[1.0]], img(1, 3, 64, 64), TypeError, ["in0", "torch.Tensor", "list"]),
        (img(1, 3, 64, 64), None, TypeError, ["in1", "torch.Tensor", "NoneType"]),
        (img(3, 64, 64), img(1, 3, 64, 64), ValueError, ["in0", "4-D", "(3, 64, 64)"]),
        (img(1, 4, 64, 64), img(1, 4, 64, 64), ValueError, ["in0", "4 channels", "3 channels"]),
        (img(2, 3, 64, 64), img(3, 3, 64, 64), ValueError, ["batch sizes", "(2, 3, 64, 64)", "(3, 3, 64, 64)"]),
        (img(1, 3, 64, 64), img(1, 3, 64, 65), ValueError, ["image sizes", "(64, 65)"]),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), img(1, 3, 64, 64), TypeError, ["in0", "uint8", "normalize=True"]),
        (img(1, 3, 30, 64), img(1, 3, 30, 64), ValueError, ["30x64", "alex", "minimum", "31x31"]),
    ],
)
def test_bad_inputs(model, in0, in1, exc, words):
    with pytest.raises(exc) as info:
        model(in0, in1)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_device_mismatch_is_named(model):
    meta = img(1, 3, 64, 64).to("meta")
    with pytest.raises(ValueError, match=r"in0: expected a tensor on the module's device cpu, got one on meta"):
        model(meta, img(1, 3, 64, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raises_by_default_and_propagates_on_request(bad):
    torch.manual_seed(0)
    x, y = img(2, 3, 64, 64), img(2, 3, 64, 64)
    x[1, 0, 3, 3] = bad
    m = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True)
    with pytest.raises(ValueError, match="in0: holds NaN or Inf"):
        m(x, y)
    m2 = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True, nonfinite="propagate")
    m2.load_state_dict(m.state_dict())
    out = m2(x, y)
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"net: got 'resnet'"):
        lpips_fast.LPIPS(net="resnet", pnet_rand=True)
    with pytest.raises(ValueError, match=r"version: got '0.2'"):
        lpips_fast.LPIPS(version="0.2", pnet_rand=True)
    with pytest.raises(ValueError, match=r"nonfinite: got 'ignore'"):
        lpips_fast.LPIPS(pnet_rand=True, nonfinite="ignore")


@pytest.mark.parametrize("spatial", [False, True])
def test_empty_batch_gives_empty_result(spatial):
    m = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True, spatial=spatial)
    out, layers = m(img(0, 3, 64, 48), img(0, 3, 64, 48), retPerLayer=True)
    assert out.shape == ((0, 1, 64, 48) if spatial else (0, 1, 1, 1))
    assert len(layers) == 5


@pytest.mark.parametrize("net,expected", [("alex", 31), ("vgg", 16), ("squeeze", 17)])
def test_trunk_minimum_size_is_exact(net, expected):
    """The computed minimum is the smallest size the trunk accepts: one pixel less fails in torch."""
    from lpips_fast.nets import build_trunk

    trunk = build_trunk(net).eval()
    assert trunk.min_size == expected
    with torch.no_grad():
        trunk(torch.rand(1, 3, expected, expected))
        with pytest.raises(RuntimeError):
            trunk(torch.rand(1, 3, expected - 1, expected - 1))


def test_gray_input_broadcasts_like_reference():
    from conftest import make_pair

    ref, ours = make_pair("alex")
    x, y = img(2, 1, 64, 64), img(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ref(x, y), ours(x, y), atol=1e-5)
