#!/usr/bin/env python
"""Every GPU-only check of lpips-fast in one command (under 8 minutes on one H200).

    python benchmarks/gpu_check.py             # on a CUDA machine; writes benchmarks/results/gpu_check-*.json
    python benchmarks/gpu_check.py --cpu       # smoke mode: the non-CUDA parts, tiny shapes (tests run it)

Sections (each in its own try/except, so one failure never hides the others; exit status 1 if
any check failed):

- ``ops``: ``benchmarks/gpu_check_ops.py``'s ``run_checks`` (Triton kernels fp32/fp16/bf16, opcheck);
- ``engine_graphs``: CUDA-graph capture and replay: the static output is poisoned with NaN, then
  replayed with new data and checked rewritten; earlier results survive later replays; a short
  batch reuses the captured one (padded, trimmed); every replay gets fresh data;
- ``compiled``: the torch.compile'd engine, with and without graphs, and no fallback warning;
- ``pipeline``: the pinned ring: results in order and equal to direct engine calls with distinct
  data per batch (a slot rewritten before its copy ended would corrupt a batch), 2 and 3 slots,
  and copy/compute overlap from timings plus a profiler summary;
- ``fallbacks``: simulated compile/capture failures give one warning and correct results;
- ``throughput``: pairs/s and ratios to the reference for the issue's H200 targets, and the
  loss's peak memory.

Reference: the ``lpips`` 0.1.4 package when importable (its wheel may be carried along), else an
eager transcription of its forward (``EagerReference``: the trunk once per image, then the
reference distance math op for op). fp32 comparisons run with TF32 off (1e-5 absolute); a
bf16/fp16 result ``out`` must satisfy ``max|out - ref| <= 2 * max|ref_autocast - ref| + 1e-4``, where
``ref_autocast`` is the reference itself under ``torch.autocast`` in that dtype (PyTorch's own
low-precision error on this computation).

This file also holds the providers and helpers the pytest-benchmark suite (``bench_lpips.py``)
shares, so that both time exactly the same callables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import lpips_fast  # noqa: E402
from lpips_fast.engine import Engine, _Graph, uint8_to_unit  # noqa: E402
from lpips_fast.ops import lpips_distance, lpips_distance_reference  # noqa: E402
from lpips_fast.pipeline import PinnedPipeline  # noqa: E402

NETS = ("alex", "vgg", "squeeze")


# ============================================================================ shared helpers
def have_lpips() -> bool:
    try:
        import lpips  # noqa: F401

        return True
    except Exception:
        return False


class EagerReference(torch.nn.Module):
    """The reference forward without the package: trunk once per image, then the reference's
    distance math op for op, per layer (``lpips_distance_reference(upcast=False)``)."""

    def __init__(self, ours: lpips_fast.LPIPS) -> None:
        super().__init__()
        self.m = copy.deepcopy(ours)
        # The reference runs NCHW: a channels_last trunk here would compare NHWC with NHWC.
        self.m.net.to(memory_format=torch.contiguous_format)

    def forward(self, in0, in1, retPerLayer=False, normalize=False):
        m = self.m
        f0 = m.net(m.preprocess(in0, normalize))
        f1 = m.net(m.preprocess(in1, normalize))
        val = 0
        for a, b, w in zip(f0, f1, m.lin_weights()):
            val = val + lpips_distance_reference(a, b, w, upcast=False).view(-1, 1, 1, 1)
        return val


def make_models(net: str, device: str | torch.device, seed: int = 1234):
    """(reference, ours) with identical random trunks and lin weights, in eval mode."""
    torch.manual_seed(seed)
    if have_lpips():
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        ours = lpips_fast.LPIPS(pretrained=False, net=net, pnet_rand=True, nonfinite="propagate")
        ours.load_state_dict(ref.state_dict())
    else:
        ours = lpips_fast.LPIPS(pretrained=False, net=net, pnet_rand=True, nonfinite="propagate")
        with torch.no_grad():
            for lin in ours.lins:
                lin.weight.uniform_(0.0, 0.1)
        ref = EagerReference(ours)
    return ref.to(device).eval(), ours.to(device).eval()


def composite_forward(model: lpips_fast.LPIPS, in0, in1):
    """Our module's strategy (one trunk pass, or no_grad for a target without gradients) with the
    eager composite distance (``backend="torch"``): what the fused op is measured against."""
    n = in0.shape[0]
    if torch.is_grad_enabled() and in0.requires_grad and not in1.requires_grad:
        f0 = model.features(in0)
        with torch.no_grad():
            f1 = model.features(in1)
    else:
        f = model.features(torch.cat([in0, in1]))
        f0, f1 = [t[:n] for t in f], [t[n:] for t in f]
    val = 0
    for a, b, w in zip(f0, f1, model.lin_weights()):
        val = val + lpips_distance(a, b, w, backend="torch").view(-1, 1, 1, 1)
    return val


def random_u8(n: int, px: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device, *, warmup: int = 2, min_time: float = 0.3,
              max_iters: int = 30, min_iters: int = 3) -> float:
    """Median seconds per call, with a device synchronize inside the timed region."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn: Callable[[], Any], device) -> int | None:
    """Peak bytes allocated above the baseline while ``fn`` runs (CUDA only; None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def lowp_bound(ref_model, x, y, ref_out, dtype) -> float:
    """2 x PyTorch's own error (the reference under autocast in ``dtype``) + 1e-4."""
    dev_type = x.device.type
    with torch.no_grad(), torch.autocast(dev_type, dtype=dtype):
        lowp = ref_model(x, y).float()
    b = 2 * float((lowp - ref_out).abs().max()) + 1e-4
    if not math.isfinite(b):  # the reference overflowed under autocast: 5% of the value instead
        b = 0.05 * float(ref_out.abs().max()) + 1e-3
    return b


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().reshape(-1) - b.detach().float().reshape(-1)).abs().max())


@contextlib.contextmanager
def exact_fp32():
    """TF32 off (cuDNN convolutions and matmuls) so fp32 paths are comparable at 1e-5."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def environment(device) -> dict:
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "device": str(dev),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "lpips_reference": "lpips 0.1.4 package" if have_lpips() else "EagerReference (no lpips package)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def raise_recompile_limit(n: int = 64) -> None:
    """Every (engine, shape) is one Dynamo recompile; the default limit (8) would silently leave
    later engines eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


# ============================================================================ check harness
class Checker:
    def __init__(self, device: str, quick: bool, budget_s: float) -> None:
        self.device = device
        self.quick = quick
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.sections: dict[str, dict] = {}
        self.failures: list[str] = []
        self.throughput: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check(self, section: str, name: str, ok: bool, detail: str = "") -> None:
        rec = self.sections[section].setdefault("checks", [])
        rec.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
        if not ok:
            self.failures.append(f"{section}: {name} {detail}")

    def run(self, name: str, fn: Callable[["Checker"], None]) -> None:
        print(f"== {name} (t={self.elapsed():.0f}s)", flush=True)
        self.sections[name] = {"status": "running"}
        t = time.perf_counter()
        try:
            fn(self)
            failed = any(not c["ok"] for c in self.sections[name].get("checks", []))
            self.sections[name]["status"] = "fail" if failed else self.sections[name].get("status_override", "pass")
        except Exception as e:
            self.sections[name]["status"] = "error"
            self.sections[name]["error"] = f"{type(e).__name__}: {e}"
            self.sections[name]["traceback"] = traceback.format_exc()[-4000:]
            self.failures.append(f"{name}: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
        self.sections[name]["seconds"] = round(time.perf_counter() - t, 2)


# ============================================================================ sections
def section_ops(c: Checker) -> None:
    try:
        import gpu_check_ops  # benchmarks/gpu_check_ops.py (the ops owner's checks)
    except ImportError as e:
        c.sections["ops"]["status_override"] = "missing"
        c.sections["ops"]["detail"] = f"benchmarks/gpu_check_ops.py not importable: {e}"
        print(f"  [missing] {e}", flush=True)
        return
    results: dict = {}
    try:
        ret = gpu_check_ops.run_checks(results)
    finally:
        c.sections["ops"]["results"] = _jsonable(results)
    # The ops script's own verdicts: a False return, a non-empty "failures" entry, or any entry
    # with ok/passed False or status fail/error.
    bad = [k for k, v in _walk(results) if _is_failure(v)]
    if ret is False:
        bad.append("run_checks returned False")
    if results.get("failures"):
        bad.append(f"failures: {results['failures']}")
    c.check("ops", "gpu_check_ops.run_checks", not bad, f"failing entries: {bad[:10]}" if bad else "")


def _walk(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield f"{prefix}{k}", v
            yield from _walk(v, f"{prefix}{k}.")


def _is_failure(v) -> bool:
    if isinstance(v, dict):
        if v.get("ok") is False or v.get("passed") is False:
            return True
        if str(v.get("status", "")).lower() in ("fail", "failed", "error"):
            return True
    return False


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return repr(x)


def _expect(ref_model, x_u8, y_u8):
    with torch.no_grad():
        return ref_model(uint8_to_unit(x_u8), uint8_to_unit(y_u8)).float()


def section_engine_eager(c: Checker) -> None:
    """Engine without graphs (CPU, or CUDA eager) against the reference, uint8 input."""
    dev = c.device
    px, n = (32, 3) if c.quick else (64, 8)
    for net in ("alex", "squeeze") if c.quick else NETS:
        ref, ours = make_models(net, dev)
        x, y = random_u8(n, px, dev, 1), random_u8(n, px, dev, 2)
        with exact_fp32():
            want = _expect(ref, x, y)
            e = Engine(model=ours, device=dev, dtype=torch.float32, compile=False, cuda_graphs=False)
            got = e(x, y)
        err = max_err(got, want)
        c.check("engine_eager", f"{net} fp32 {n}x{px}px vs reference", err <= 1e-5, f"max err {err:.2e}")
        with exact_fp32():
            mod = ours(uint8_to_unit(x), uint8_to_unit(y))
        err = max_err(mod, want)
        c.check("engine_eager", f"{net} LPIPS.forward fp32 vs reference", err <= 1e-5, f"max err {err:.2e}")


def section_engine_graphs(c: Checker) -> None:
    dev = c.device
    px, n = 64, 8
    cases = [("alex", torch.float32), ("alex", torch.bfloat16), ("squeeze", torch.float16), ("vgg", torch.bfloat16)]
    for net, dtype in cases:
        tag = f"{net} {str(dtype).split('.')[-1]}"
        ref, ours = make_models(net, dev)
        with exact_fp32():
            e = Engine(model=ours, device=dev, dtype=dtype, compile=False, cuda_graphs=True)
            x, y = random_u8(n, px, dev, 10), random_u8(n, px, dev, 11)
            want = _expect(ref, x, y)
            bound = 1e-5 if dtype == torch.float32 else lowp_bound(ref, uint8_to_unit(x), uint8_to_unit(y), want, dtype)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                first = e(x, y)
            c.check("engine_graphs", f"{tag}: captured without fallback", e.cuda_graphs and e.stats["captures"] == 1
                    and not [m for m in w if "lpips_fast" in str(m.message)], f"stats {e.stats} warnings {[str(m.message)[:200] for m in w]}")
            err = max_err(first, want)
            c.check("engine_graphs", f"{tag}: first replay vs reference", err <= bound, f"err {err:.2e} bound {bound:.2e}")
            kept = first.clone()
            entry = next(iter(e._graphs.values()))
            # Poison the static output, replay with new data, check it was rewritten.
            for seed in (20, 21, 22):
                entry.out.fill_(float("nan"))
                x2, y2 = random_u8(n, px, dev, seed), random_u8(n, px, dev, seed + 100)
                got = e(x2, y2)
                want2 = _expect(ref, x2, y2)
                b2 = 1e-5 if dtype == torch.float32 else lowp_bound(ref, uint8_to_unit(x2), uint8_to_unit(y2), want2, dtype)
                err = max_err(got, want2)
                c.check("engine_graphs", f"{tag}: poisoned output rewritten (seed {seed})",
                        bool(torch.isfinite(got).all()) and err <= b2 and max_err(got, first) > 0,
                        f"err {err:.2e} bound {b2:.2e}")
            c.check("engine_graphs", f"{tag}: earlier result not overwritten by later replays",
                    torch.equal(first, kept), "")
            # Short batch: reuses the captured batch (padded), result trimmed.
            x3, y3 = random_u8(5, px, dev, 30), random_u8(5, px, dev, 31)
            got3 = e(x3, y3)
            want3 = _expect(ref, x3, y3)
            b3 = 1e-5 if dtype == torch.float32 else lowp_bound(ref, uint8_to_unit(x3), uint8_to_unit(y3), want3, dtype)
            err = max_err(got3, want3)
            c.check("engine_graphs", f"{tag}: short batch padded + trimmed",
                    got3.shape == (5, 1, 1, 1) and e.stats["captures"] == 1 and err <= b3,
                    f"err {err:.2e} bound {b3:.2e} stats {e.stats}")
            # Graph replays are deterministic: same data twice -> identical result.
            c.check("engine_graphs", f"{tag}: replay deterministic", torch.equal(e(x, y), first), "")
            c.check("engine_graphs", f"{tag}: no eager call outside warm-up", e.stats["eager_calls"] == 0, f"{e.stats}")
        if c.elapsed() > c.budget_s * 0.4:
            c.sections["engine_graphs"]["note"] = "stopped early to stay within the time budget"
            break
    # LRU: three sizes with max_graphs=2.
    ref, ours = make_models("squeeze", dev)
    e = Engine(model=ours, device=dev, dtype=torch.bfloat16, compile=False, max_graphs=2)
    for p in (32, 40, 48):
        e(random_u8(2, p, dev, p), random_u8(2, p, dev, p + 1))
    c.check("engine_graphs", "LRU keeps max_graphs", len(e._graphs) == 2 and e.stats["evictions"] == 1, f"{e.stats}")


def section_compiled(c: Checker) -> None:
    dev = c.device
    raise_recompile_limit()
    n, px = 16, 64
    ref, ours = make_models("alex", dev)
    x, y = random_u8(n, px, dev, 40), random_u8(n, px, dev, 41)
    # bf16 compiled + graphs is checked (against the reference) and timed by the throughput rows.
    for dtype, graphs in ((torch.float32, True), (torch.bfloat16, False)):
        tag = f"alex {str(dtype).split('.')[-1]} compile graphs={graphs}"
        with exact_fp32():
            want = _expect(ref, x, y)
            bound = 1e-5 if dtype == torch.float32 else lowp_bound(ref, uint8_to_unit(x), uint8_to_unit(y), want, dtype)
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                e = Engine(model=ours, device=dev, dtype=dtype, compile=True, cuda_graphs=graphs)
                got = e(x, y)
                got2 = e(random_u8(n, px, dev, 42), random_u8(n, px, dev, 43))
            first_s = time.perf_counter() - t
            fell_back = [str(m.message)[:300] for m in w if "lpips_fast" in str(m.message)]
            c.check("compiled", f"{tag}: no fallback", e.compile and not fell_back and (e.cuda_graphs == graphs),
                    f"first calls {first_s:.1f}s {fell_back}")
            err = max_err(got, want)
            c.check("compiled", f"{tag}: vs reference", err <= bound, f"err {err:.2e} bound {bound:.2e}")
            c.check("compiled", f"{tag}: second batch finite", bool(torch.isfinite(got2).all()), "")


def section_pipeline(c: Checker) -> None:
    dev = c.device
    is_cuda = torch.device(dev).type == "cuda"
    if c.quick:
        nb, n, px, net = 4, 2, 32, "squeeze"
    else:
        nb, n, px, net = 10, 64, 256, "alex"
    ref, ours = make_models(net, dev)
    dtype = torch.bfloat16 if is_cuda else torch.float32
    e = Engine(model=ours, device=dev, dtype=dtype, compile=False, cuda_graphs=is_cuda)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g),
                torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)) for _ in range(nb)]
    # Direct engine calls on device-resident data: what every pipeline run must reproduce.
    dev_batches = [(a.to(dev), b.to(dev)) for a, b in batches]
    direct = [e(a, b).reshape(-1).cpu() for a, b in dev_batches]
    for slots in (2, 3):
        pipe = PinnedPipeline(e, slots=slots)
        got = list(pipe.map(iter(batches)))
        same = len(got) == nb and all(torch.allclose(gg, dd, atol=1e-6, rtol=0) for gg, dd in zip(got, direct))
        c.check("pipeline", f"{slots} slots: {nb} distinct batches, results in order and uncorrupted", same,
                f"stats {pipe.stats}")
    # Short last batch through the pipeline (pooled buffers are views of the larger ones).
    pipe = PinnedPipeline(e, slots=2)
    short = [(batches[0][0][: n // 2 or 1], batches[0][1][: n // 2 or 1])] + batches[1:3]
    got = list(pipe.map(short))
    ok = torch.allclose(got[0], direct[0][: n // 2 or 1], atol=1e-6) and torch.allclose(got[2], direct[2], atol=1e-6)
    c.check("pipeline", "short batch then full batches", ok, "")
    if not is_cuda:
        return
    # -- overlap: timings --------------------------------------------------------------------
    pinned = [(a.pin_memory(), b.pin_memory()) for a, b in batches]
    bufs = [(torch.empty_like(a, device=dev), torch.empty_like(b, device=dev)) for a, b in batches]

    def h2d_only():
        for (a, b), (da, db) in zip(pinned, bufs):
            da.copy_(a, non_blocking=True)
            db.copy_(b, non_blocking=True)

    def host_only():
        tmp = [torch.empty_like(a) for a, _ in batches[:1]]
        for a, b in batches:
            tmp[0].copy_(a)
            tmp[0].copy_(b)

    def compute_only():
        for a, b in dev_batches:
            e(a, b)

    pipe = PinnedPipeline(e, slots=3)

    def piped():
        for _ in pipe.map(iter(batches)):
            pass

    t_h2d = time_call(h2d_only, dev, min_time=0.5)
    t_host = time_call(host_only, "cpu", min_time=0.5)
    t_comp = time_call(compute_only, dev, min_time=0.5)
    t_pipe = time_call(piped, dev, min_time=0.5)
    serial = t_h2d + t_host + t_comp
    hidden = (serial - t_pipe) / max(min(t_h2d + t_host, t_comp), 1e-9)
    info = {
        "batches": nb, "batch": n, "px": px, "net": net, "dtype": str(dtype),
        "host_memcpy_ms": t_host * 1e3, "h2d_ms": t_h2d * 1e3, "compute_ms": t_comp * 1e3,
        "pipeline_ms": t_pipe * 1e3, "serial_sum_ms": serial * 1e3,
        "fraction_of_shorter_side_hidden": hidden,
        "h2d_GBps": sum(a.numel() + b.numel() for a, b in batches) / t_h2d / 1e9,
        "host_waits": pipe.stats["host_waits"],
    }
    c.sections["pipeline"]["overlap"] = info
    print(f"  overlap: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()})}")
    c.check("pipeline", "copies overlap compute (pipeline faster than the serial sum)", t_pipe < 0.95 * serial,
            f"pipeline {t_pipe*1e3:.1f} ms vs serial {serial*1e3:.1f} ms")
    # -- overlap: profiler summary (informative; never fails the run) -------------------------
    try:
        c.sections["pipeline"]["profiler"] = _profile_overlap(piped)
        print(f"  profiler: {c.sections['pipeline']['profiler']}")
    except Exception as ex:  # profiler availability varies
        c.sections["pipeline"]["profiler"] = f"unavailable: {type(ex).__name__}: {ex}"


def _profile_overlap(fn) -> dict:
    """Share of host->device copy time during which a compute kernel also ran (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    copies, kernels = [], []
    for ev in prof.events():
        if getattr(ev, "device_type", None) is None or str(ev.device_type) != "DeviceType.CUDA":
            continue
        iv = (ev.time_range.start, ev.time_range.end)
        if "HtoD" in ev.name or "Memcpy HtoD" in ev.name:
            copies.append(iv)
        elif "Memcpy" not in ev.name and "Memset" not in ev.name:
            kernels.append(iv)
    kernels.sort()
    total = sum(e - s for s, e in copies)
    covered = 0.0
    for s, e in copies:
        for ks, ke in kernels:
            if ks >= e:
                break
            covered += max(0.0, min(e, ke) - max(s, ks))
    return {"h2d_copies": len(copies), "kernels": len(kernels), "h2d_us": total,
            "h2d_us_overlapping_kernels": min(covered, total), "overlap_share": (min(covered, total) / total) if total else None}


def section_fallbacks(c: Checker) -> None:
    dev = c.device
    ref, ours = make_models("squeeze", dev)
    x, y = random_u8(2, 32, dev, 50), random_u8(2, 32, dev, 51)
    with exact_fp32():
        want = _expect(ref, x, y)
        # Capture failure: simulated by a capture that raises.
        e = Engine(model=ours, device=dev, dtype=torch.float32, compile=False, cuda_graphs=True)
        e.cuda_graphs = True

        def broken_capture(key):
            raise RuntimeError("simulated capture failure")

        e._capture = broken_capture
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = e(x, y)
            b = e(x, y)
        msgs = [str(m.message) for m in w if "lpips_fast" in str(m.message)]
        c.check("fallbacks", "capture failure: one warning, eager results", len(msgs) == 1 and max_err(a, want) <= 1e-5
                and max_err(b, want) <= 1e-5, f"{len(msgs)} warnings, err {max_err(a, want):.2e}")
        # Compile failure: simulated by a compiled function that raises on first use.
        e = Engine(model=ours, device=dev, dtype=torch.float32, compile=False, cuda_graphs=False)
        e.compile = True

        def broken_compiled(inp):
            raise RuntimeError("simulated Inductor failure")

        e._features_fn = broken_compiled
        e._compiled_active = True
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = e(x, y)
            b = e(x, y)
        msgs = [str(m.message) for m in w if "lpips_fast" in str(m.message)]
        c.check("fallbacks", "compile failure: one warning, eager results", len(msgs) == 1 and max_err(a, want) <= 1e-5
                and max_err(b, want) <= 1e-5 and not e.compile, f"{len(msgs)} warnings")


# -- throughput -------------------------------------------------------------------------------
H200_TARGETS = [
    # (label, net, px, batch, engine dtype, provider whose ratio is the target, target ratio)
    ("alex 64px b64 fp32", "alex", 64, 64, torch.float32, "engine_graphs", 5.0),
    ("alex 256px b64 bf16", "alex", 256, 64, torch.bfloat16, "engine_graphs", 4.0),
    ("vgg 256px b32 bf16", "vgg", 256, 32, torch.bfloat16, "engine_graphs", 2.0),
    ("squeeze 224px b64 bf16", "squeeze", 224, 64, torch.bfloat16, "engine_graphs", None),
]
CPU_SMOKE_ROWS = [("alex 32px b2 fp32", "alex", 32, 2, torch.float32, "default", None)]


def section_throughput(c: Checker) -> None:
    dev = c.device
    is_cuda = torch.device(dev).type == "cuda"
    raise_recompile_limit()
    rows = H200_TARGETS if is_cuda else CPU_SMOKE_ROWS
    for label, net, px, n, dtype, target_provider, target in rows:
        if c.elapsed() > c.budget_s:
            c.throughput.append({"case": label, "skipped": "time budget"})
            print(f"  {label}: skipped (time budget)")
            continue
        ref, ours = make_models(net, dev)
        x, y = random_u8(n, px, dev, 60), random_u8(n, px, dev, 61)
        xf, yf = uint8_to_unit(x), uint8_to_unit(y)
        row: dict[str, Any] = {"case": label, "net": net, "px": px, "batch": n, "engine_dtype": str(dtype)}
        with torch.no_grad():
            with exact_fp32():
                want = ref(xf, yf).float()
                bound = 1e-5 if dtype == torch.float32 else lowp_bound(ref, xf, yf, want, dtype)
            provs: dict[str, Callable[[], Any]] = {
                "reference": lambda: ref(xf, yf),
                "composite": lambda: composite_forward(ours, xf, yf),
                "default": lambda: ours(xf, yf),
            }
            e = Engine(model=ours, device=dev, dtype=dtype, compile=is_cuda, cuda_graphs=False)
            provs["engine_compiled" if is_cuda else "engine"] = lambda: e(x, y)
            if is_cuda:
                provs["engine_graphs"] = lambda: e(x, y)
            times = {}
            for name, fn in provs.items():
                if name == "engine_graphs":
                    e.cuda_graphs = True  # the same compiled engine, now captured per shape
                tol = bound if name.startswith("engine") else 1e-5
                with exact_fp32():  # check with TF32 off ...
                    err = max_err(fn(), want)
                c.check("throughput", f"{label} {name} matches reference", err <= tol, f"err {err:.2e} tol {tol:.1e}")
                times[name] = time_call(fn, dev)  # ... time with PyTorch's defaults (TF32 convs on CUDA)
            if is_cuda and e.stats["captures"] and dtype == torch.float32:
                row["note"] = "fp32 engine graphs captured with TF32 off (as checked), timed replays use that capture"
        row["pairs_per_s"] = {k: n / v for k, v in times.items()}
        row["ratio_to_reference"] = {k: times["reference"] / v for k, v in times.items()}
        if target is not None:
            r = row["ratio_to_reference"].get(target_provider)
            row["target"] = {"provider": target_provider, "ratio": target, "met": bool(r is not None and r >= target)}
        c.throughput.append(row)
        del e
        if is_cuda:
            torch.cuda.empty_cache()
    # Loss (forward + backward): time and peak memory, reference vs ours.
    if c.elapsed() > c.budget_s:
        c.throughput.append({"case": "loss", "skipped": "time budget"})
        return
    net, px, n = ("alex", 256, 32) if is_cuda else ("alex", 32, 2)
    ref, ours = make_models(net, dev)
    xf, yf = uint8_to_unit(random_u8(n, px, dev, 70)), uint8_to_unit(random_u8(n, px, dev, 71))

    def loss_of(model):
        def run():
            xx = xf.clone().requires_grad_(True)
            model(xx, yf).mean().backward()
            return xx.grad
        return run

    with exact_fp32():
        g_ref, g_ours = loss_of(ref)(), loss_of(ours)()
        fin = torch.isfinite(g_ref)  # the reference gives NaN where a feature column is all zero
        err = max_err(g_ours[fin], g_ref[fin])
        scale = float(g_ref[fin].abs().max())
        c.check("throughput", f"loss {net} {px}px b{n}: input gradient vs reference",
                err <= 1e-5 * max(1.0, scale) + 1e-7 and bool(torch.isfinite(g_ours).all()),
                f"err {err:.2e} (max |grad| {scale:.2e}; reference NaN entries {int((~fin).sum())})")
    t_ref, t_ours = time_call(loss_of(ref), dev), time_call(loss_of(ours), dev)
    m_ref, m_ours = peak_memory(loss_of(ref), dev), peak_memory(loss_of(ours), dev)
    row = {"case": f"loss {net} {px}px b{n} fp32", "pairs_per_s": {"reference": n / t_ref, "default": n / t_ours},
           "ratio_to_reference": {"reference": 1.0, "default": t_ref / t_ours},
           "peak_bytes": {"reference": m_ref, "default": m_ours}}
    if m_ref:
        row["peak_memory_ratio"] = m_ours / m_ref
        row["target"] = {"provider": "default", "peak_memory_ratio": 0.7, "met": m_ours / m_ref <= 0.7}
    c.throughput.append(row)


def print_table(rows: list[dict]) -> str:
    provs = ["reference", "composite", "default", "engine", "engine_compiled", "engine_graphs"]
    lines = ["| case | " + " | ".join(provs) + " | target |", "|" + "---|" * (len(provs) + 2)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} |")
            continue
        cells = []
        for p in provs:
            if p in r.get("pairs_per_s", {}):
                cells.append(f"{r['pairs_per_s'][p]:,.0f}/s ({r['ratio_to_reference'][p]:.2f}x)")
            else:
                cells.append("")
        tgt = r.get("target")
        t = ""
        if tgt:
            if "peak_memory_ratio" in tgt:
                t = f"mem {r['peak_memory_ratio']:.2f}x <= 0.7x: {'met' if tgt['met'] else 'NOT met'}"
            else:
                t = f"{tgt['provider']} >= {tgt['ratio']}x: {'met' if tgt['met'] else 'NOT met'}"
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {t} |")
    text = "\n".join(lines)
    print(text)
    return text


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke mode: non-CUDA parts on the CPU, tiny shapes")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check-<device>-<date>.json)")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds after which remaining throughput rows are skipped (keeps the run under 8 min)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("No CUDA device: run with --cpu for the smoke mode (the CUDA checks need a GPU).")
        return 2
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    c = Checker(device, quick=not cuda, budget_s=args.budget)
    env = environment(device)
    print(json.dumps(env, indent=1))

    if cuda:
        c.run("ops", section_ops)
    c.run("engine_eager", section_engine_eager)
    if cuda:
        c.run("engine_graphs", section_engine_graphs)
        c.run("compiled", section_compiled)
    c.run("pipeline", section_pipeline)
    c.run("fallbacks", section_fallbacks)
    c.run("throughput", section_throughput)
    table = print_table(c.throughput)

    result = {
        "mode": "cuda" if cuda else "cpu",
        **env,
        "seconds": round(c.elapsed(), 1),
        "sections": c.sections,
        "throughput": c.throughput,
        "table_markdown": table,
        "failures": c.failures,
    }
    out = args.out
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = "".join(ch if ch.isalnum() else "-" for ch in env["device_name"]).strip("-").lower() or device
        out = HERE / "results" / f"gpu_check-{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1))
    print(f"\nwrote {out}  ({c.elapsed():.0f}s)")
    if c.failures:
        print("FAILED:\n  " + "\n  ".join(c.failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
