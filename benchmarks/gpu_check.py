#!/usr/bin/env python
"""Every GPU-only check of lpips-fast in one command, within a time budget (default 420 s).

    python benchmarks/gpu_check.py                 # CUDA; writes benchmarks/results/gpu_check-*.json
    python benchmarks/gpu_check.py --cpu           # every section's code path on the CPU, tiny shapes

Sections, in order (the JSON is rewritten after each step, so a timeout keeps what was measured):

1. ``preflight`` (seconds): versions, device name, ``import numpy, triton, lpips_fast``, a C
   compiler for Triton's launcher stub, and a one-kernel Triton launch in a subprocess (under
   ``TRITON_INTERPRET=1`` on CPU tensors with ``--cpu``). If it fails, the run stops there and
   says what is missing.
2. ``tests``: ``python -m pytest -m cuda tests/gpu`` in a subprocess with its own time budget;
   every test's outcome parsed from ``--junitxml`` (or, after a timeout, from the verbose output).
   With ``--cpu`` they are collected and skip (no CUDA): that checks they import and collect.
3. ``rows``: throughput rows, most valuable first, each with its own time budget (a slow compile
   skips the rest of its row, never the rows after it): the README's H200 targets (alex 64 px b64
   fp32 >= 5x the reference, alex 256 px b64 bf16 >= 4x, vgg 256 px b32 bf16 >= 2x, loss peak
   memory <= 0.7x), then squeeze, the distance step alone, the pinned pipeline's overlap, NVTX.
   Each provider is first checked against the reference (fp32 with TF32 off: 1e-5; bf16/fp16:
   ``2 * |reference under autocast - reference| + 1e-4``), then timed twice: ``wall_ms``, the
   synchronised wall time per call (the throughput a caller gets, host work included), and
   ``gpu_ms``, the device's kernel time per call from ``torch.profiler`` (what the GPU executes).
   The distance step is timed as CUDA-graph replays between CUDA events (never host dispatch of
   eager calls) and compared with reading both feature sets once at the measured copy bandwidth.

Exit status 1 if any check failed (a test, a provider's result, the preflight); targets are
reported as met or not met and do not change the exit status. Reference: the ``lpips`` 0.1.4
package when importable, else ``EagerReference`` (the trunk once per image, then the reference's
distance math op for op).

This file also holds the providers and helpers that the pytest-benchmark suite
(``bench_lpips.py``) shares, so that both time exactly the same callables.
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
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lpips_fast  # noqa: E402
from lpips_fast.inference.engine import Engine, uint8_to_unit  # noqa: E402
from lpips_fast.ops import lpips_distance, lpips_distance_reference  # noqa: E402
from lpips_fast.inference.pipeline import PinnedPipeline  # noqa: E402

NETS = ("alex", "vgg", "squeeze")
NSYS_COMMAND = (
    "LPIPS_FAST_NVTX=1 nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node -o lpips-fast "
    "python benchmarks/gpu_check.py --sections rows"
)
NVTX_RANGES = ("lpips_fast/h2d", "lpips_fast/preprocess", "lpips_fast/trunk", "lpips_fast/distance")


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
    """Random uint8 images, generated on ``device`` (no host copy on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g, device=device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device, *, warmup: int = 2, min_time: float = 0.3,
              max_iters: int = 30, min_iters: int = 3) -> float:
    """Median wall seconds per call, with a device synchronize inside the timed region."""
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


def gpu_time_ms(fn: Callable[[], Any], device, iters: int = 3) -> float | None:
    """Device kernel time per call (ms) from torch.profiler: what the GPU executes, without host
    gaps (CUDA only; None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            sync(device)
        total_us = sum(ev.time_range.elapsed_us() for ev in prof.events() if ev.device_type == DeviceType.CUDA)
        if not total_us:  # device events attributed to the launching ops instead
            total_us = sum(
                getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0)) for a in prof.key_averages()
            )
    except Exception as exc:  # the profiler (CUPTI) is informative here: never fail a row over it
        warnings.warn(f"gpu_check: torch.profiler failed ({type(exc).__name__}: {exc}); gpu_ms left empty")
        return None
    return total_us / iters / 1e3 if total_us else None


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
    """TF32 and cuDNN autotuning off, so fp32 paths are comparable at 1e-5."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = old


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


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return repr(x)


# ============================================================================ the run
class OutOfTime(Exception):
    """A row's own budget ran out: the rest of that row is skipped."""


class Run:
    """Budgets, results and the JSON file (rewritten after every step)."""

    def __init__(self, device: str, budget_s: float, out: Path, env: dict) -> None:
        self.device = device
        self.cuda = device == "cuda"
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.out = out
        self.result: dict = {"mode": "cuda" if self.cuda else "cpu", **env, "budget_s": budget_s,
                             "sections": {}, "rows": [], "failures": [], "targets": []}  # fmt: skip
        self.row_deadline = math.inf
        self.min_row_s = 5.0  # a row starts only with at least this much of the budget left

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self) -> None:
        self.result["seconds"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(_jsonable(self.result), indent=1))
        tmp.replace(self.out)

    def fail(self, what: str) -> None:
        self.result["failures"].append(what)
        print(f"  FAIL {what}", flush=True)

    def check_time(self) -> None:
        if time.perf_counter() > self.row_deadline:
            raise OutOfTime("row budget spent")


# -- 1. preflight ------------------------------------------------------------------------------
_LAUNCH_SNIPPET = r"""
import os, sys, torch, triton, triton.language as tl
@triton.jit
def add_one(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)
dev = sys.argv[1]
x = torch.arange(100, dtype=torch.float32, device=dev)
add_one[(1,)](x, 100, BLOCK=128)
if dev == "cuda":
    torch.cuda.synchronize()
assert torch.equal(x.cpu(), torch.arange(100, dtype=torch.float32) + 1), "wrong result"
print("launch ok")
"""


def section_preflight(run: Run) -> bool:
    sec = run.result["sections"].setdefault("preflight", {})
    missing = []
    for mod in ("numpy", "triton", "lpips_fast"):
        try:
            m = __import__(mod)
            sec[mod] = getattr(m, "__version__", "ok")
        except Exception as exc:
            sec[mod] = None
            missing.append(f"python package {mod!r} does not import ({type(exc).__name__}: {exc})")
    sec["pytest"] = getattr(__import__("pytest"), "__version__", "ok") if _importable("pytest") else None
    if sec["pytest"] is None:
        print("  preflight: pytest is not installed: the tests section cannot run (the rows still will)", flush=True)
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    sec["c_compiler"] = shutil.which(cc) if cc else None
    if not sec["c_compiler"]:
        missing.append("no C compiler (cc/gcc/clang or $CC): Triton builds its launcher stub with one")
    # API names the package uses, checked with torch 2.14.1 / triton 3.8 on the CPU machines; the
    # GPU machine's torch 2.11 / triton 3.6 should have them too: this says so on the machine.
    try:
        import triton.language as tl
    except Exception:  # reported above as a missing package
        tl = None
    apis = {"torch.library.triton_op": hasattr(torch.library, "triton_op"),
            "torch.library.wrap_triton": hasattr(torch.library, "wrap_triton"),
            "triton.language.sqrt_rn": hasattr(tl, "sqrt_rn"), "triton.language.div_rn": hasattr(tl, "div_rn")}  # fmt: skip
    sec["apis"] = apis
    missing += [f"{name} is missing in this torch/triton" for name, ok in apis.items() if not ok]
    if run.cuda:
        sec["device_count"] = torch.cuda.device_count()
        sec["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    if not missing:
        env = dict(os.environ)
        if not run.cuda:
            env["TRITON_INTERPRET"] = "1"
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", _LAUNCH_SNIPPET, run.device], capture_output=True,
                                  text=True, timeout=120, env=env)  # fmt: skip
            ok = proc.returncode == 0 and "launch ok" in proc.stdout
            tail = (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            ok, tail = False, "timed out after 120 s"
        sec["triton_launch"] = {"ok": ok, "seconds": round(time.perf_counter() - t, 1),
                                "interpreter": not run.cuda, "output": None if ok else tail}  # fmt: skip
        if not ok:
            missing.append(f"a one-kernel Triton launch failed: {tail}")
    sec["missing"] = missing
    sec["status"] = "fail" if missing else "pass"
    for m in missing:
        run.fail(f"preflight: {m}")
    print(f"  preflight: {sec['status']} {json.dumps({k: v for k, v in sec.items() if k != 'missing'})}", flush=True)
    return not missing


# -- 2. the GPU tests --------------------------------------------------------------------------
_VERBOSE_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _parse_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:1500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})  # fmt: skip
    return tests


def _pytest(files: list[str], select: str, timeout_s: float) -> dict:
    """One pytest subprocess over ``files`` (``-k select``); its tests parsed from --junitxml, or
    from the verbose output when it ran out of time."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-k", select, "-v", "-p", "no:cacheprovider",
               "--no-header", f"--junitxml={junit}", *files]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 5), cwd=ROOT, env=env)
            stdout, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            rc, timed_out = None, True
        if junit.exists():
            tests = _parse_junit(junit)
        else:
            tests = [{"test": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": None}
                     for m in map(_VERBOSE_LINE.match, stdout.splitlines()) if m]  # fmt: skip
    return {"command": " ".join(["python", *cmd[1 : -len(files)], "tests/gpu"]), "returncode": rc,
            "timed_out": timed_out, "seconds": round(time.perf_counter() - t, 1), "tests": tests,
            "output_tail": stdout[-3000:]}  # fmt: skip


def section_tests(run: Run, budget_s: float) -> None:
    """tests/gpu in two pytest runs: everything but the torch.compile tests first (kernels, then
    the Engine, pipeline and fallbacks), then the compile tests (each compile costs tens of
    seconds) with what is left of the budget."""
    sec = run.result["sections"].setdefault("tests", {})
    if not _importable("pytest"):
        sec["status"] = "not run"
        run.fail("tests: pytest is not installed here (pip install pytest, or copy its wheel): tests/gpu not run")
        return
    first = ("test_cuda_ops.py", "test_cuda_grouped.py", "test_cuda_engine.py")
    found = sorted(p.name for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    files = [str(ROOT / "tests" / "gpu" / f) for f in [*(f for f in first if f in found), *(f for f in found if f not in first)]]
    sec["budget_s"] = round(budget_s)
    deadline = time.perf_counter() + budget_s
    sec["runs"], tests = [], []
    for select in ("not compile", "compile"):
        left = deadline - time.perf_counter()
        if left < 5:
            sec["runs"].append({"select": select, "skipped": "tests budget spent"})
            run.fail(f"tests: '-k {select}' not run: the tests budget ({budget_s:.0f} s) was spent")
            continue
        res = _pytest(files, select, left)
        tests += res.pop("tests")
        sec["runs"].append({"select": select, **res})
        if res["timed_out"]:
            run.fail(f"tests: '-k {select}' ran past the tests budget ({budget_s:.0f} s); "
                     "tests not reported did not run")  # fmt: skip
        elif res["returncode"] not in (0, 1, 5):  # 1: some test failed (listed below); 5: none selected
            run.fail(f"tests: '-k {select}' exited {res['returncode']} (collection error?): {res['output_tail'][-500:]}")
    counts: dict[str, int] = {}
    for t_ in tests:
        counts[t_["outcome"]] = counts.get(t_["outcome"], 0) + 1
    sec.update({"counts": counts, "tests": tests, "seconds": round(sum(r.get("seconds", 0) for r in sec["runs"]), 1)})
    for t_ in tests:
        if t_["outcome"] in ("failed", "error"):
            run.fail(f"tests: {t_['test']}: {(t_['message'] or '')[:300]}")
    if not tests:
        run.fail("tests: no test was collected from tests/gpu")
    sec["status"] = "fail" if any(f.startswith("tests:") for f in run.result["failures"]) else "pass"
    if not run.cuda and sec["status"] == "pass":
        sec["note"] = "CPU: the CUDA tests were collected and skipped (no GPU)"
    print(f"  tests: {sec['status']} {counts} in {sec['seconds']} s", flush=True)


# -- 3. rows -----------------------------------------------------------------------------------
def _measure(run: Run, row: dict, name: str, fn: Callable[[], Any], check: Callable[[], tuple[float, float]] | None):
    """Check ``fn`` against the reference (err, tol), then time it; recorded in ``row``."""
    run.check_time()
    prov: dict = {}
    row["providers"][name] = prov
    if check is not None:
        err, tol = check()
        prov.update({"max_err": err, "tol": tol, "ok": bool(err <= tol)})
        if not prov["ok"]:
            run.fail(f"rows: {row['case']} {name}: error {err:.2e} > tolerance {tol:.1e}")
    run.check_time()
    n = row.get("batch", 1)
    wall = time_call(fn, run.device)
    prov["wall_ms"] = wall * 1e3
    prov["pairs_per_s"] = n / wall
    prov["gpu_ms"] = gpu_time_ms(fn, run.device)
    run.save()
    print(f"  {row['case']} {name}: {prov['wall_ms']:.2f} ms wall"
          + (f", {prov['gpu_ms']:.2f} ms GPU" if prov["gpu_ms"] is not None else "")
          + (f", err {prov['max_err']:.1e}" if "max_err" in prov else ""), flush=True)  # fmt: skip


def _ratios(row: dict) -> None:
    ref = row["providers"].get("reference", {})
    for key in ("wall_ms", "gpu_ms"):
        if ref.get(key):
            row[f"ratio_{key.split('_')[0]}"] = {
                k: ref[key] / v[key] for k, v in row["providers"].items() if v.get(key)
            }


def row_end_to_end(run: Run, row: dict, net: str, px: int, n: int, dtype: torch.dtype, compiled: bool = False) -> None:
    """reference, default (LPIPS.forward) and the Engine with CUDA graphs (eager on the CPU); with
    ``compiled``, reference and the torch.compile'd Engine with graphs only (its own row, late, so
    that a slow compile cannot eat the budget of the rows before it)."""
    dev = run.device
    ref, ours = make_models(net, dev)
    x, y = random_u8(n, px, dev, 60), random_u8(n, px, dev, 61)
    xf, yf = uint8_to_unit(x), uint8_to_unit(y)
    with torch.no_grad(), exact_fp32():
        want = ref(xf, yf).float()
        bound = 1e-5 if dtype == torch.float32 else lowp_bound(ref, xf, yf, want, dtype)

    def checker(fn, tol):
        def check():
            with torch.no_grad(), exact_fp32():  # checked with TF32 off, timed with the defaults
                return max_err(fn(), want), tol

        return check

    with torch.no_grad():
        plain = [("reference", lambda: ref(xf, yf), None), ("default", lambda: ours(xf, yf), 1e-5)]
        for name, fn, tol in plain[:1] if compiled else plain:
            _measure(run, row, name, fn, checker(fn, tol) if tol else None)
        if compiled:
            name = "engine_compiled_graphs" if run.cuda else "engine_compiled"
        else:
            name = "engine_graphs" if run.cuda else "engine"
        run.check_time()
        e = Engine(model=ours, device=dev, dtype=dtype, compile=compiled, cuda_graphs=run.cuda)
        if dtype == torch.float32 and run.cuda:
            # Checked on an engine captured with TF32 off; timed on one captured with PyTorch's
            # defaults, as the reference is (bf16/fp16 engines do not depend on TF32).
            checked = Engine(model=ours, device=dev, dtype=dtype, compile=compiled, cuda_graphs=True)
            check = checker(lambda: checked(x, y), bound)
        else:
            check = checker(lambda: e(x, y), bound)
        _measure(run, row, name, lambda: e(x, y), check)
        row["providers"][name]["stats"] = dict(e.stats)
    _ratios(row)


def row_loss(run: Run, row: dict, net: str, px: int, n: int) -> None:
    dev = run.device
    ref, ours = make_models(net, dev)
    xf, yf = uint8_to_unit(random_u8(n, px, dev, 70)), uint8_to_unit(random_u8(n, px, dev, 71))

    def loss_of(model):
        def go():
            xx = xf.clone().requires_grad_(True)
            model(xx, yf).mean().backward()
            return xx.grad

        return go

    with exact_fp32():
        g_ref, g_ours = loss_of(ref)(), loss_of(ours)()
    fin = torch.isfinite(g_ref)  # the reference gives NaN where a feature column is all zero
    err = max_err(g_ours[fin], g_ref[fin])
    tol = 1e-5 * max(1.0, float(g_ref[fin].abs().max())) + 1e-7
    ok = err <= tol and bool(torch.isfinite(g_ours).all())
    row["gradient_check"] = {"max_err": err, "tol": tol, "ok": ok, "reference_nan": int((~fin).sum())}
    if not ok:
        run.fail(f"rows: {row['case']}: input gradient error {err:.2e} > {tol:.1e} (or non-finite)")
    for name, model in (("reference", ref), ("default", ours)):
        _measure(run, row, name, loss_of(model), None)
        row["providers"][name]["peak_bytes"] = peak_memory(loss_of(model), dev)
    _ratios(row)
    m_ref, m_ours = row["providers"]["reference"]["peak_bytes"], row["providers"]["default"]["peak_bytes"]
    if m_ref:
        row["peak_memory_ratio"] = m_ours / m_ref


def _graph_time_ms(fn: Callable[[], Any], iters: int = 20) -> float:
    """fn captured in a CUDA graph; median time of one replay between CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def row_distance(run: Run, row: dict, shapes: list, dtype: torch.dtype) -> None:
    """The distance step alone (5 layers), fused vs the eager composite, GPU execution time."""
    dev = run.device
    g = torch.Generator(device=dev).manual_seed(80)
    feats = []
    for s in shapes:
        x = torch.randn(s, device=dev, generator=g).relu_().to(dtype)
        y = torch.randn(s, device=dev, generator=g).relu_().to(dtype)
        feats.append((x, y, torch.rand(s[1], device=dev, generator=g)))
    nbytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y, _ in feats)

    def fused():
        return [lpips_distance(x, y, w) for x, y, w in feats]

    def eager():
        return [lpips_distance(x, y, w, backend="torch") for x, y, w in feats]

    err = max(max_err(a, b) for a, b in zip(fused(), eager()))
    tol = 1e-4 * max(float(b.abs().max()) for b in eager()) + 1e-6
    row["fused_vs_eager"] = {"max_err": err, "tol": tol, "ok": err <= tol}
    if err > tol:
        run.fail(f"rows: {row['case']}: fused vs eager composite {err:.2e} > {tol:.1e}")
    run.check_time()
    if run.cuda:
        buf = torch.empty(1 << 28, device=dev)  # 1 GiB
        dst = torch.empty_like(buf)
        t_copy = _graph_time_ms(lambda: dst.copy_(buf), iters=10)
        bw = 2 * buf.numel() * buf.element_size() / (t_copy * 1e-3)  # read + write, bytes/s
        del buf, dst
        t_fused, t_eager = _graph_time_ms(fused), _graph_time_ms(eager, iters=10)
        how = "CUDA-graph replay between CUDA events"
    else:
        bw = None
        t_fused, t_eager = time_call(fused, dev) * 1e3, time_call(eager, dev) * 1e3
        how = "CPU wall time"
    row.update({"timing": how, "fused_ms": t_fused, "eager_ms": t_eager, "eager_over_fused": t_eager / t_fused})
    if bw:
        row["copy_bandwidth_GBps"] = bw / 1e9
        row["read_once_ms"] = nbytes / bw * 1e3
        row["fused_over_read_once"] = t_fused / row["read_once_ms"]
    print(f"  {row['case']}: fused {t_fused:.3f} ms, eager {t_eager:.3f} ms ({how})"
          + (f", read-once {row['read_once_ms']:.3f} ms" if bw else ""), flush=True)  # fmt: skip


def row_pipeline(run: Run, row: dict, net: str, nb: int, n: int, px: int) -> None:
    """Copy/compute overlap of the pinned pipeline: timings, and the profiler's share of
    host-to-device copy time during which a kernel also ran."""
    dev = run.device
    _, ours = make_models(net, dev)
    e = Engine(model=ours, device=dev, dtype=torch.bfloat16 if run.cuda else torch.float32, compile=False,
               cuda_graphs=run.cuda)  # fmt: skip
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g),
                torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)) for _ in range(nb)]  # fmt: skip
    dev_batches = [(a.to(dev), b.to(dev)) for a, b in batches]
    pipe = PinnedPipeline(e, slots=3)
    got = list(pipe.map(iter(batches)))
    direct = [e(a, b).reshape(-1).cpu() for a, b in dev_batches]
    ok = len(got) == nb and all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(got, direct))
    row["results_equal_direct_calls"] = ok
    if not ok:
        run.fail(f"rows: {row['case']}: pipeline results differ from direct engine calls")
    run.check_time()

    def compute_only():
        for a, b in dev_batches:
            e(a, b)

    def piped():
        for _ in pipe.map(iter(batches)):
            pass

    row["compute_ms"] = time_call(compute_only, dev, min_time=0.5) * 1e3
    row["pipeline_ms"] = time_call(piped, dev, min_time=0.5) * 1e3
    if run.cuda:
        pinned = [(a.pin_memory(), b.pin_memory()) for a, b in batches]
        bufs = [(torch.empty_like(a, device=dev), torch.empty_like(b, device=dev)) for a, b in batches]

        def h2d_only():
            for (a, b), (da, db) in zip(pinned, bufs):
                da.copy_(a, non_blocking=True)
                db.copy_(b, non_blocking=True)

        row["h2d_ms"] = time_call(h2d_only, dev, min_time=0.5) * 1e3
        row["pipeline_over_compute"] = row["pipeline_ms"] / row["compute_ms"]
        try:
            row["profiler_overlap"] = _profile_overlap(piped)
        except Exception as exc:  # informative only
            row["profiler_overlap"] = f"unavailable: {type(exc).__name__}: {exc}"
    row["host_waits"] = pipe.stats["host_waits"]
    print(f"  {row['case']}: {json.dumps({k: v for k, v in row.items() if k.endswith('_ms')})}", flush=True)


def _profile_overlap(fn) -> dict:
    """Share of host->device copy time during which a compute kernel also ran (profiler trace)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    copies, kernels = [], []
    for ev in prof.events():
        if ev.device_type != DeviceType.CUDA:
            continue
        iv = (ev.time_range.start, ev.time_range.end)
        if "HtoD" in ev.name:
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
    covered = min(covered, total)
    return {"h2d_copies": len(copies), "kernels": len(kernels), "h2d_us": total,
            "h2d_us_overlapping_kernels": covered, "overlap_share": covered / total if total else None}  # fmt: skip


_NVTX_SNIPPET = r"""
import torch, lpips_fast
from lpips_fast.inference.engine import Engine
e = Engine(model=lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True), device="cuda", compile=False, cuda_graphs=False)
x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")
for _ in range(3):
    e(x, x.flip(0))
torch.cuda.synchronize()
"""


def row_nvtx(run: Run, row: dict) -> None:
    """NVTX ranges seen by Nsight Systems, when ``nsys`` is installed; otherwise say what to run."""
    from lpips_fast import profiling

    row["nvtx_backend"] = "nvtx package" if _importable("nvtx") else "torch.cuda.nvtx"
    row["command"] = NSYS_COMMAND
    nsys = shutil.which("nsys")
    if not (run.cuda and nsys):
        row["checked"] = False
        row["reason"] = "no CUDA device" if not run.cuda else "nsys not on PATH: run the command by hand"
        # The switch itself: ranges are created when on (no profiler here to record them).
        profiling.set_nvtx(True)
        try:
            with profiling.nvtx_range("lpips_fast/check"):
                pass
        finally:
            profiling.set_nvtx(os.environ.get("LPIPS_FAST_NVTX", "") not in ("", "0", "false", "False"))
        print(f"  nvtx: not checked ({row['reason']}); command: {NSYS_COMMAND}", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "nvtx_run.py"
        script.write_text(_NVTX_SNIPPET)
        rep = Path(tmp) / "nvtx"
        env = dict(os.environ, LPIPS_FAST_NVTX="1", PYTHONPATH=str(ROOT))
        prof = subprocess.run([nsys, "profile", "--trace=cuda,nvtx", "-o", str(rep), sys.executable, str(script)],
                              capture_output=True, text=True, timeout=max(10, run.row_deadline - time.perf_counter()),
                              env=env)  # fmt: skip
        stats = subprocess.run([nsys, "stats", "--report", "nvtx_sum", f"{rep}.nsys-rep"], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
    seen = [r for r in NVTX_RANGES if r in stats.stdout]
    row.update({"checked": True, "profile_rc": prof.returncode, "ranges_seen": seen,
                "ok": set(seen) >= {"lpips_fast/preprocess", "lpips_fast/trunk", "lpips_fast/distance"}})  # fmt: skip
    if not row["ok"]:
        row["stats_tail"] = (stats.stdout + stats.stderr)[-1500:]
        run.fail(f"rows: nvtx: ranges seen by nsys {seen}, expected preprocess/trunk/distance")
    print(f"  nvtx: ranges seen by nsys: {seen}", flush=True)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


VGG256 = [(16, c, 256 >> k, 256 >> k) for k, c in enumerate((64, 128, 256, 512, 512))]
ALEX224 = [(64, 64, 55, 55), (64, 192, 27, 27), (64, 384, 13, 13), (64, 256, 13, 13), (64, 256, 13, 13)]


def cuda_rows() -> list:
    """(case, budget share, function, kwargs, target), most valuable first. torch.compile'd
    engines have rows of their own after the targets and the distance step."""
    e2e = row_end_to_end
    return [
        ("alex 64px b64 fp32", 40, e2e, dict(net="alex", px=64, n=64, dtype=torch.float32),
         {"provider": "engine_graphs", "ratio": 5.0}),
        ("alex 256px b64 bf16", 40, e2e, dict(net="alex", px=256, n=64, dtype=torch.bfloat16),
         {"provider": "engine_graphs", "ratio": 4.0}),
        ("vgg 256px b32 bf16", 50, e2e, dict(net="vgg", px=256, n=32, dtype=torch.bfloat16),
         {"provider": "engine_graphs", "ratio": 2.0}),
        ("loss alex 256px b32 fp32", 30, row_loss, dict(net="alex", px=256, n=32),
         {"provider": "default", "peak_memory_ratio": 0.7}),
        ("distance vgg256 b16 bf16", 20, row_distance, dict(shapes=VGG256, dtype=torch.bfloat16),
         {"provider": "fused", "over_read_once": 1.5}),
        ("distance vgg256 b16 fp32", 15, row_distance, dict(shapes=VGG256, dtype=torch.float32),
         {"provider": "fused", "over_read_once": 1.5}),
        ("distance alex224 b64 bf16", 15, row_distance, dict(shapes=ALEX224, dtype=torch.bfloat16), None),
        ("alex 256px b64 bf16 compiled", 60, e2e, dict(net="alex", px=256, n=64, dtype=torch.bfloat16, compiled=True),
         {"provider": "engine_compiled_graphs", "ratio": 4.0}),
        ("squeeze 224px b64 bf16", 30, e2e, dict(net="squeeze", px=224, n=64, dtype=torch.bfloat16), None),
        ("pipeline alex 256px b64 x10", 30, row_pipeline, dict(net="alex", nb=10, n=64, px=256), None),
        ("alex 64px b64 fp32 compiled", 50, e2e, dict(net="alex", px=64, n=64, dtype=torch.float32, compiled=True),
         {"provider": "engine_compiled_graphs", "ratio": 5.0}),
        ("nvtx", 40, row_nvtx, {}, None),
    ]  # fmt: skip


def cpu_rows() -> list:
    """The same row functions with tiny shapes: their code paths on the CPU (the compiled rows
    differ from the others by one Engine flag, and an Inductor compile on the CPU costs ~30 s:
    left out; tests/gpu/test_cuda_engine.py checks the compiled Engine on CUDA)."""
    tiny = [(2, c, 8 >> k or 1, 8 >> k or 1) for k, c in enumerate((64, 192, 384, 256, 256))]
    return [
        ("alex 32px b2 fp32", 30, row_end_to_end, dict(net="alex", px=32, n=2, dtype=torch.float32), None),
        ("loss alex 32px b2 fp32", 20, row_loss, dict(net="alex", px=32, n=2), None),
        ("distance tiny fp32", 10, row_distance, dict(shapes=tiny, dtype=torch.float32), None),
        ("pipeline squeeze 32px b2 x4", 15, row_pipeline, dict(net="squeeze", nb=4, n=2, px=32), None),
        ("nvtx", 5, row_nvtx, {}, None),
    ]  # fmt: skip


def _target_met(row: dict, target: dict) -> dict:
    res = dict(target, case=row["case"])
    if target.get("ratio"):
        r = row.get("ratio_wall", {}).get(target["provider"])
        best = max((v for k, v in row.get("ratio_wall", {}).items() if k.startswith("engine")), default=None)
        res.update({"measured": r, "best_engine": best, "met": bool(best is not None and best >= target["ratio"])})
    elif target.get("peak_memory_ratio"):
        r = row.get("peak_memory_ratio")
        res.update({"measured": r, "met": bool(r is not None and r <= target["peak_memory_ratio"])})
    elif target.get("over_read_once"):
        r = row.get("fused_over_read_once")
        res.update({"measured": r, "met": bool(r is not None and r <= target["over_read_once"])})
    return res


def section_rows(run: Run, rows: list) -> None:
    raise_recompile_limit()
    total_share = sum(share for _, share, _, _, _ in rows)
    for case, share, fn, kwargs, target in rows:
        row: dict = {"case": case, "providers": {}, **{k: v for k, v in kwargs.items() if k != "shapes"}}
        row = _jsonable(row) | {"providers": {}}
        run.result["rows"].append(row)
        left = run.left()
        if left < run.min_row_s:
            row["status"] = "skipped"
            row["reason"] = f"total budget spent ({run.elapsed():.0f} s of {run.budget_s:.0f} s)"
            print(f"  {case}: skipped ({row['reason']})", flush=True)
            run.save()
            continue
        # This row's own budget: its share of what is left, never more than what is left.
        budget = min(left, max(share, left * share / total_share))
        run.row_deadline = time.perf_counter() + budget
        row["budget_s"] = round(budget)
        t = time.perf_counter()
        try:
            fn(run, row, **kwargs)
            row["status"] = "pass" if not any(f.startswith(f"rows: {case}") for f in run.result["failures"]) else "fail"
        except OutOfTime:
            row["status"] = "partial"
            row["reason"] = f"row budget ({budget:.0f} s) spent: the rest of this row was skipped"
        except Exception as exc:
            row["status"] = "error"
            row["reason"] = f"{type(exc).__name__}: {exc}"[:1500]
            row["traceback"] = traceback.format_exc()[-3000:]
            run.fail(f"rows: {case}: {row['reason']}")
            print(row["traceback"], flush=True)
        finally:
            run.row_deadline = math.inf
            total_share -= share
        row["seconds"] = round(time.perf_counter() - t, 1)
        if target is not None and row["status"] in ("pass", "partial"):
            row["target"] = _target_met(row, target)
            run.result["targets"].append(row["target"])
        if run.cuda:
            torch.cuda.empty_cache()
        run.save()


def summary(result: dict) -> str:
    lines = ["", "== summary"]
    for name, sec in result["sections"].items():
        lines.append(f"{name:<10} {sec.get('status', '?'):<8} {sec.get('counts', '')} {sec.get('note', '')}".rstrip())
    lines.append("")
    lines.append("| row | status | reference | default | engine(_graphs) | compiled(+graphs) | note |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        cells = []
        cuda = result["mode"] == "cuda"
        for p in ("reference", "default", "engine_graphs" if cuda else "engine",
                  "engine_compiled_graphs" if cuda else "engine_compiled"):  # fmt: skip
            v = r.get("providers", {}).get(p)
            ratio = r.get("ratio_wall", {}).get(p)
            cells.append(f"{v['pairs_per_s']:,.0f}/s ({ratio:.2f}x)" if v and "pairs_per_s" in v and ratio else "")
        note = r.get("reason", "")
        if "fused_ms" in r:
            note = f"fused {r['fused_ms']:.3f} ms, eager {r['eager_ms']:.3f} ms" + (
                f", {r['fused_over_read_once']:.2f}x read-once" if "fused_over_read_once" in r else "")
        if "peak_memory_ratio" in r:
            note = f"peak memory {r['peak_memory_ratio']:.2f}x"
        if "target" in r:
            note += f" [target {'met' if r['target'].get('met') else 'NOT met'}]"
        lines.append(f"| {r['case']} | {r.get('status')} | " + " | ".join(cells) + f" | {note} |")
    lines.append("")
    lines.append(f"failures: {len(result['failures'])}")
    for f in result["failures"]:
        lines.append(f"  {f[:400]}")
    return "\n".join(lines)


# ============================================================================ main
SECTIONS = ("preflight", "tests", "rows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="walk every section on the CPU with tiny shapes")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check-<device>-<date>.json)")
    ap.add_argument("--budget-s", "--budget", dest="budget_s", type=float, default=420.0,
                    help="total seconds; each section and row gets its share (default 420)")  # fmt: skip
    ap.add_argument("--tests-budget-s", type=float, default=None,
                    help="seconds for the GPU tests (default 45%% of the budget)")  # fmt: skip
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset of preflight,tests,rows (default all)")  # fmt: skip
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}, expected a subset of {list(SECTIONS)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("No CUDA device: run with --cpu to walk the sections on the CPU (the checks need a GPU).")
        return 2
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    env = environment(device)
    out = args.out
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = "".join(ch if ch.isalnum() else "-" for ch in env["device_name"]).strip("-").lower() or device
        out = HERE / "results" / f"gpu_check-{name}-{stamp}.json"
    run = Run(device, args.budget_s, out, env)
    run.result["command"] = " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(env, indent=1), flush=True)
    run.save()

    if "preflight" in sections:
        print(f"== preflight (t={run.elapsed():.0f}s)", flush=True)
        if not section_preflight(run):
            run.save()
            print(summary(run.result))
            print(f"\npreflight failed: fix what is listed above first. Wrote {out}")
            return 1
        run.save()
    if "tests" in sections:
        print(f"== tests (t={run.elapsed():.0f}s)", flush=True)
        share = args.tests_budget_s if args.tests_budget_s is not None else 0.45 * args.budget_s
        section_tests(run, min(share, max(run.left() - 30, 10)))
        run.save()
    if "rows" in sections:
        print(f"== rows (t={run.elapsed():.0f}s)", flush=True)
        run.result["sections"]["rows"] = {"status": "running"}
        section_rows(run, cuda_rows() if cuda else cpu_rows())
        statuses = [r.get("status") for r in run.result["rows"]]
        run.result["sections"]["rows"] = {
            "status": "fail" if any(s in ("fail", "error") for s in statuses) else "pass",
            "counts": {s: statuses.count(s) for s in sorted(set(statuses))},
        }
    text = summary(run.result)
    run.result["summary"] = text
    run.save()
    print(text)
    print(f"\nwrote {out} ({run.elapsed():.0f} s)")
    return 1 if run.result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
