"""The LPIPS distance step alone: fused op vs the reference's eager ops, on the CPU.

One "step" is every layer of a trunk: ``sum_k lpips_distance(f0_k, f1_k, w_k)`` over the per-layer
feature shapes that alex / vgg16 produce at 64 px (batch 16) and 256 px (batch 2). Providers:
``fused`` (the C++ kernel, ``backend=None`` on the CPU) and ``eager`` (the reference's ops in the
features' dtype: normalize, subtract, square, 1x1 conv, spatial mean). Modes: ``forward`` (no
grad) and ``train`` (forward + backward to both features and the lin weights). Layouts: NCHW and
channels_last (what the trunk produces on the CPU for alex and squeeze).

Run:  python -m pytest benchmarks/bench_distance.py --benchmark-only -q \\
          --benchmark-group-by=param:net,param:px,param:mode,param:layout \\
          --benchmark-columns=min,median,rounds
      (OMP_NUM_THREADS=1 in front gives steadier numbers on a shared machine.)
Target (issue 3): alex, 64 px, batch 16, forward: fused >= 4x faster than eager.
"""

from __future__ import annotations

import pytest
import torch

from lpips_fast.ops import lpips_distance, lpips_distance_reference

BATCH = {64: 16, 256: 2}


def _alex_shapes(px: int):
    conv1 = (px + 4 - 11) // 4 + 1
    pool1 = (conv1 - 3) // 2 + 1
    pool2 = (pool1 - 3) // 2 + 1
    return [(64, conv1, conv1), (192, pool1, pool1), (384, pool2, pool2), (256, pool2, pool2), (256, pool2, pool2)]


def _vgg_shapes(px: int):
    return [(c, px >> k, px >> k) for k, c in enumerate((64, 128, 256, 512, 512))]


SHAPES = {"alex": _alex_shapes, "vgg": _vgg_shapes}


def _features(net: str, px: int, layout: str = "nchw", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = BATCH[px]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = []
    for c, h, w in SHAPES[net](px):
        x = torch.randn(n, c, h, w, generator=g).relu_().contiguous(memory_format=fmt)
        y = torch.randn(n, c, h, w, generator=g).relu_().contiguous(memory_format=fmt)
        out.append((x, y, torch.rand(c, generator=g)))
    return out


def _fused(feats, spatial=False):
    return sum(lpips_distance(x, y, w, spatial=spatial).sum() for x, y, w in feats)


def _eager(feats, spatial=False):
    return sum(lpips_distance_reference(x, y, w, spatial=spatial, upcast=False).sum() for x, y, w in feats)


PROVIDERS = {"fused": _fused, "eager": _eager}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("px", [64, 256])
@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.parametrize("provider", ["fused", "eager"])
def test_distance_step(benchmark, provider, net, px, mode, layout):
    feats = _features(net, px, layout)
    fn = PROVIDERS[provider]
    # correctness first: same numbers as the fp64 oracle
    ref = sum(lpips_distance_reference(x, y, w).sum() for x, y, w in feats)
    torch.testing.assert_close(fn(feats).double(), ref, rtol=1e-5, atol=0)
    benchmark.extra_info.update(
        provider=provider, net=net, px=px, batch=BATCH[px], mode=mode, layout=layout,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )  # fmt: skip

    if mode == "forward":

        def run():
            with torch.no_grad():
                return fn(feats)

    else:
        leaves = [[t.clone().requires_grad_() for t in layer] for layer in feats]
        params = [t for layer in leaves for t in layer]

        def run():
            return torch.autograd.grad(fn(leaves), params)

    rounds = 30 if px == 64 else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=3)
