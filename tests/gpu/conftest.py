"""CUDA tests: marked ``cuda`` in each module, skipped here without a GPU.

Run with ``python -m pytest -m cuda tests/gpu`` (``benchmarks/gpu_check.py`` does, in its own
process). In the same process as tests/test_ops_triton.py, which sets ``TRITON_INTERPRET=1`` for
the session, the Triton kernels are interpreter objects: these tests then skip rather than test
the interpreter on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch


def _kernels_compiled() -> bool:
    from triton.runtime.jit import JITFunction

    import lpips_fast.ops as ops

    return isinstance(ops._triton_ops()._lpips_fwd_kernel, JITFunction)


@pytest.fixture(autouse=True)
def cuda_exact():
    """Skip without CUDA; fp32 comparisons with TF32 and cuDNN autotuning off (restored after)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _kernels_compiled():
        pytest.skip("Triton kernels were imported under TRITON_INTERPRET=1: run tests/gpu in its own process")
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = flags
