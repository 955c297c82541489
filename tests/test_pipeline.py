"""PinnedPipeline on the CPU (no pinning, no streams): order, values, inputs.

The CUDA ring (pinned slots, copy stream, event guards, overlap) is checked by
``benchmarks/gpu_check.py`` on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast.inference.engine import Engine, uint8_to_unit
from lpips_fast.inference.pipeline import PinnedPipeline


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = lpips_fast.LPIPS(pretrained=False, pnet_rand=True, net="squeeze", nonfinite="propagate")
    with torch.no_grad():
        for lin in m.lins:
            lin.weight.uniform_(0.0, 0.1)
    return m.eval()


def _batches(sizes, hw=(24, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=g),
         torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=g))
        for n in sizes
    ]


def test_results_in_order(model):
    batches = _batches([3, 1, 4, 2])
    pipe = PinnedPipeline(Engine(model=model, device="cpu"), slots=2)
    outs = list(pipe.map(iter(batches)))
    assert [o.shape for o in outs] == [(3,), (1,), (4,), (2,)]
    for (a, b), o in zip(batches, outs):
        with torch.no_grad():
            ref = model(uint8_to_unit(a), uint8_to_unit(b)).view(-1)
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=0)
    assert pipe.stats["batches"] == 4


def test_run_numpy_and_empty(model):
    batches = _batches([2, 2], seed=1)
    pipe = PinnedPipeline(Engine(model=model, device="cpu"))
    got = pipe.run([(a.numpy(), np.ascontiguousarray(b.numpy())) for a, b in batches])
    want = torch.cat([pipe.engine(a, b).view(-1) for a, b in batches])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert pipe.run([]).shape == (0,)


def test_bad_arguments(model):
    e = Engine(model=model, device="cpu")
    with pytest.raises(ValueError, match="slots"):
        PinnedPipeline(e, slots=0)
    with pytest.raises(ValueError, match="depth"):
        PinnedPipeline(e, slots=2, depth=2)
