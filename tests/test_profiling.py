"""NVTX switch: a shared no-op when off; the nvtx package when present, torch.cuda.nvtx otherwise."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest

from lpips_fast import profiling


@pytest.fixture
def restore():
    state = (profiling._enabled, profiling._nvtx_mod)
    yield
    profiling._enabled, profiling._nvtx_mod = state


def test_off_is_shared_nullcontext(restore):
    profiling.set_nvtx(False)
    a, b = profiling.nvtx_range("lpips_fast/trunk"), profiling.nvtx_range("lpips_fast/distance")
    assert a is b and isinstance(a, contextlib.nullcontext)
    with a:
        pass


def test_nvtx_package_used_when_installed(restore, monkeypatch):
    calls = []
    fake = types.ModuleType("nvtx")
    fake.annotate = lambda name, domain=None: (calls.append((name, domain)), contextlib.nullcontext())[1]
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    profiling._nvtx_mod = None
    profiling.set_nvtx(True)
    with profiling.nvtx_range("lpips_fast/h2d"):
        pass
    assert calls == [("lpips_fast/h2d", "lpips_fast")]


def test_torch_fallback(restore, monkeypatch):
    import torch

    calls = []
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    profiling._nvtx_mod = None
    profiling.set_nvtx(True)
    with pytest.raises(KeyError):
        with profiling.nvtx_range("lpips_fast/preprocess"):
            raise KeyError("popped even on error")
    assert calls == [("push", "lpips_fast/preprocess"), ("pop",)]
    assert profiling.nvtx_enabled()


def test_installed_nvtx_package_without_gpu(restore):
    """The real nvtx package (extra ``.[profile]``): ranges open and close without a GPU or a
    profiler attached (NVTX calls are no-ops until a tool such as nsys injects itself)."""
    nvtx = pytest.importorskip("nvtx")
    profiling._nvtx_mod = None
    profiling.set_nvtx(True)
    ctx = profiling.nvtx_range("lpips_fast/trunk")
    assert isinstance(ctx, nvtx.annotate)
    with ctx:
        with profiling.nvtx_range("lpips_fast/distance"):
            pass
    assert profiling._nvtx_mod is nvtx
