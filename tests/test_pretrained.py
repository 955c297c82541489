"""Pretrained alex and vgg trunks on real photographs, against the reference lpips 0.1.4.

The reference would download torchvision's weights; here both models get the trunk that
`lpips-fast weights fetch` verified, so the comparison is of the computation, with real weights
and real images. In CI (CI=true) missing weights are a failure, never a skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lpips_fast
from conftest import make_pair


def _require_trunk(net):
    from lpips_fast import weights

    try:
        weights.trunk_state_dict(net)
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"pretrained {net} trunk not fetched: {e}")


def _photos(size=96):
    from PIL import Image, ImageFilter
    from skimage import data

    out = {}
    for name in ("astronaut", "chelsea", "coffee"):
        im = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
        out[name] = im
        out[name + "_blur"] = im.filter(ImageFilter.GaussianBlur(1.2))
        rng = np.random.default_rng(0)
        noisy = np.clip(np.asarray(im, dtype=np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        out[name + "_noise"] = Image.fromarray(noisy.astype(np.uint8))
    return {k: lpips_fast.im2tensor(np.asarray(v)) for k, v in out.items()}


@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.parametrize("spatial", [False, True])
def test_pretrained_parity_on_photographs(net, spatial):
    _require_trunk(net)
    ref, ours = make_pair(net, spatial=spatial, pretrained_trunk=True)
    from lpips_fast import weights

    ours_loaded = lpips_fast.LPIPS(net=net, spatial=spatial)  # pretrained trunk + packaged lin weights
    assert all(torch.equal(a, b) for a, b in zip(ours_loaded.state_dict().values(), ref.state_dict().values()))
    ph = _photos()
    names = ["astronaut", "chelsea", "coffee"]
    x = torch.cat([ph[n] for n in names] * 3)
    y = torch.cat([ph[n + "_blur"] for n in names] + [ph[n + "_noise"] for n in names] + [ph[n] for n in names[1:] + names[:1]])
    with torch.no_grad():
        a = ref(x, y)
        b = ours_loaded(x, y)
    assert (a - b).abs().max().item() <= 1e-5
    if not spatial:
        d = b.view(-1)
        # Sanity of the pretrained metric: a distortion is closer than another photograph.
        assert (d[:6] < d[6:].min()).all(), d
        assert d.min() > 0
        with torch.no_grad():
            # One batched channels_last trunk pass: the two halves may round differently (~1e-16).
            assert ours_loaded(x, x).abs().max() < 1e-10


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_pretrained_gradients_match_reference(net):
    _require_trunk(net)
    ref, _ = make_pair(net, pretrained_trunk=True)
    ours = lpips_fast.LPIPS(net=net)
    ph = _photos(64)
    x0, y = torch.cat([ph["astronaut_blur"], ph["coffee_noise"]]), torch.cat([ph["astronaut"], ph["coffee"]])
    grads = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_(True)
        m(x, y).sum().backward()
        grads.append(x.grad)
    scale = grads[0].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-4 * scale
