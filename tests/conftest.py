"""Shared fixtures: pairs of (reference lpips 0.1.4, lpips_fast) models with identical weights."""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

# Keep the 2-core CI machines responsive when several torch processes run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@functools.lru_cache(maxsize=None)
def _reference(net: str, version: str, lpips_on: bool, spatial: bool, pretrained_trunk: bool):
    import lpips  # reference package: tests only

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pretrained_trunk:
            # The reference would download torchvision weights; load ours instead (same values).
            from lpips_fast import weights

            ref = lpips.LPIPS(net=net, version=version, lpips=lpips_on, spatial=spatial, pnet_rand=True, verbose=False)
            sd = weights.trunk_state_dict(net)
            import lpips_fast

            tmp = lpips_fast.nets.build_trunk(net)
            tmp.load_torchvision_features(sd)
            ref.net.load_state_dict(tmp.state_dict())
        else:
            torch.manual_seed(1234)
            ref = lpips.LPIPS(net=net, version=version, lpips=lpips_on, spatial=spatial, pnet_rand=True, verbose=False)
    return ref.eval()


def make_pair(net="alex", version="0.1", lpips_on=True, spatial=False, pretrained_trunk=False):
    """(reference, ours) with the reference's state dict loaded into ours."""
    import lpips_fast

    ref = _reference(net, version, lpips_on, spatial, pretrained_trunk)
    ours = lpips_fast.LPIPS(pretrained=False, net=net, version=version, lpips=lpips_on, spatial=spatial, pnet_rand=True)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


@pytest.fixture
def pair_factory():
    return make_pair
