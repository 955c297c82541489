"""Training on CUDA with the feature cache in host memory (no room on the device): the same
weights, bitwise, as with the cache on the device; and bf16 autocast of the trunk runs."""

from __future__ import annotations

import os

import pytest
import torch

import lpips_fast
from lpips_fast.training import synthetic, train

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("gputrain")
    torch.manual_seed(0)
    teacher = lpips_fast.LPIPS(net="alex", pnet_rand=True)  # no pretrained trunk needed on the GPU machine
    synthetic.make_2afc(root / "train", os.path.join(ROOT, "examples", "clean"), n=48, teacher=teacher, seed=5)
    return root / "train"


def test_host_memory_feature_cache_trains_the_same_weights(small_set, monkeypatch):
    from lpips_fast.training import trainer

    kw = dict(epochs=1, decay_epochs=1, batch_size=16, lr=1e-3, init="uniform", seed=1, device="cuda",
              amp=False, pnet_rand=True)
    on_device = train(small_set, **kw)
    real = trainer.free_memory
    monkeypatch.setattr(trainer, "free_memory", lambda device: 0 if device.type == "cuda" else real(device))
    said: list[str] = []
    on_host = train(small_set, log=said.append, **kw)
    assert any("host memory" in m for m in said), said
    for a, b in zip(on_device.model.lin_weights(), on_host.model.lin_weights()):
        assert torch.equal(a.cpu(), b.cpu())
    assert on_device.train_2afc == on_host.train_2afc


def test_autocast_trunk_trains_on_cuda(small_set):
    res = train(small_set, epochs=1, decay_epochs=0, batch_size=16, init="uniform", seed=1, device="cuda",
                amp=True, pnet_rand=True)
    assert all(torch.isfinite(w).all() and (w >= 0).all() for w in res.model.lin_weights())
    assert 0.0 <= res.train_2afc <= 1.0
