"""Compile the Triton kernels for CUDA targets ahead of time, without a GPU, and audit them.

    python -m lpips_fast.ops.aot --arch 80 --arch 90 --json aot.json [--scope all|cover|hot] [--jobs N]

Each specialisation is compiled with ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", arch, 32), options={"num_warps": ...})`` (Triton's bundled ptxas; no
driver needed), and its cubin is read with Triton's bundled ``cuobjdump --dump-resource-usage``:
registers per thread, stack and local bytes per thread (spills: these kernels have no local
arrays or calls, so any local memory is spilled registers), shared memory (the launch's, from
the kernel's metadata) and cubin size. The JSON is a list of objects, one per (spec, arch):
``kernel, arch, dtype, ok, regs, spills, stack, local, shared, cubin_bytes, num_warps`` plus the
constexprs (``BLOCK_C``, ``BLOCK_P``, flags), ``launch`` (the channel and pixel counts that pick
it), ``hot``, ``seconds`` and ``error``. Exit status 3 when a compile fails or a spec spills
(every spec is one the launcher picks), 2 on a usage error, 0 otherwise.

Contract for the kernel modules named in ``SPEC_MODULES`` (the per-layer and the grouped kernels): each defines
``aot_specializations() -> list[KernelSpec]`` (``lpips_fast.ops._aot_spec``), built by calling
the module's own launcher code (block-config function, constexpr and signature builders), never
a copy of it, so that this tool compiles what the launcher runs, and listed most demanding first
(largest tiles, most outputs). ``KernelSpec.axes`` names the dimensions a spec varies along (as
``(name, value)`` pairs; name them after the kernel when two modules' axes differ in meaning)
and ``hot`` marks the common path; ``--scope cover`` compiles the hot specs plus, for every axis
value not yet covered, the first spec that has it (the CI set); ``--scope all`` every spec.

What is not covered: the JIT also specialises integer arguments equal to 1 and 16-divisible
pointers and sizes at run time (constant folding, wider loads); these compiles use the generic
form of each signature (i32 sizes and strides, no divisibility hints).

Checked with triton 3.8.0 (this machine's) for ``triton.compile``, ``triton.compiler.ASTSource``,
``triton.backends.compiler.GPUTarget``, the ``options`` dict and ``CompiledKernel.asm["cubin"]`` /
``.metadata.shared``; triton 3.6 (the GPU machine's) has the same names. ``knobs.nvidia.cuobjdump``
is looked up with a fallback to the bundled binary's path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

SPEC_MODULES = ("lpips_fast.ops._triton", "lpips_fast.ops._triton_grouped")
SCOPES = ("all", "cover", "hot")

_SPECS: list = []  # set before the worker pool forks; workers index into it
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def load_specs(modules: Sequence[str] = SPEC_MODULES) -> list:
    """Every module's ``aot_specializations()``, in order."""
    specs = []
    for name in modules:
        specs.extend(importlib.import_module(name).aot_specializations())
    return specs


def select(specs: list, scope: str) -> list:
    """``all``; ``hot`` (the specs marked hot); ``cover`` (hot + the first spec having each axis value)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return list(specs)
    chosen = [s for s in specs if s.hot]
    if scope == "cover":
        seen = {axis for s in chosen for axis in s.axes}
        for s in specs:
            new = set(s.axes) - seen
            if new and not s.hot:
                chosen.append(s)
                seen |= new
    return chosen


def _cuobjdump() -> Optional[str]:
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # older triton: no knobs.nvidia.cuobjdump
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """regs, stack, local, static shared of the (single) kernel in ``cubin``, from cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither triton's bundled copy nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _RES.search(text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {text[-500:]!r}")
    regs, stack, shared, local = (int(v) for v in m.groups())
    return {"regs": regs, "stack": stack, "local": local, "static_shared": shared}


def compile_spec(spec, arch: int, options: Optional[dict] = None) -> Dict[str, Any]:
    """Compile one spec for sm_<arch>; the JSON record (``ok`` False with ``error`` on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec: Dict[str, Any] = {"kernel": spec.kernel, "arch": arch, "dtype": spec.dtype, "num_warps": spec.num_warps}
    rec.update(spec.constexprs)
    rec.update({"launch": spec.launch, "hot": spec.hot})
    t0 = time.perf_counter()
    try:
        if not isinstance(spec.fn, triton.runtime.JITFunction):
            raise RuntimeError(
                f"{spec.kernel} is {type(spec.fn).__name__}, not a JITFunction: its module was imported "
                "under TRITON_INTERPRET=1; compile in a fresh process without that variable"
            )
        src = ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs))
        opts = {"num_warps": spec.num_warps, **(options or {})}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        cubin = compiled.asm["cubin"]
        usage = resource_usage(cubin)
        rec.update(usage)
        rec["spills"] = usage["stack"] + usage["local"]
        rec["shared"] = int(compiled.metadata.shared)
        rec["cubin_bytes"] = len(cubin)
        rec["ok"] = rec["spills"] == 0
        rec["error"] = None if rec["ok"] else f"{rec['spills']} bytes of local memory per thread (register spills)"
    except Exception as exc:  # a compile error is a result, recorded per spec
        rec.update({"ok": False, "regs": None, "spills": None, "shared": None, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _work(task):
    index, arch = task
    return compile_spec(_SPECS[index], arch)


def compile_all(specs: list, archs: Sequence[int], jobs: int = 1, progress=None) -> List[Dict[str, Any]]:
    """Compile every spec for every arch, ``jobs`` processes in parallel; records in input order.
    ``progress(done, total, record)`` is called after each compile, in completion order."""
    global _SPECS
    _SPECS = list(specs)
    tasks = [(i, a) for a in archs for i in range(len(specs))]
    if jobs <= 1:
        results = []
        for t in tasks:
            results.append(_work(t))
            if progress:
                progress(len(results), len(tasks), results[-1])
        return results
    results: List[Optional[dict]] = [None] * len(tasks)
    ctx = multiprocessing.get_context("fork")  # the workers inherit _SPECS (JIT functions do not pickle)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_work, t): k for k, t in enumerate(tasks)}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if progress:
                progress(done, len(tasks), results[futures[fut]])
    return results  # type: ignore[return-value]


def _flags(rec: dict) -> str:
    keys = ("HAS_W", "SPATIAL", "NEED_DX", "NEED_DY", "NEED_DW")
    return " ".join(k.replace("NEED_", "").lower() for k in keys if rec.get(k)) or "-"


def format_table(records: List[dict], *, only_hot: bool = False) -> str:
    """A fixed-width table: kernel, dtype, flags, block, warps, arch, regs, spills, shared, cubin KiB."""
    head = f"{'kernel':<18} {'dtype':<5} {'flags':<22} {'block':>9} {'w':>2} {'sm':>3} {'regs':>4} {'spill':>5} {'shared':>6} {'KiB':>5}  C"
    lines = [head, "-" * len(head)]
    for r in records:
        if only_hot and not r.get("hot"):
            continue
        block = f"{r.get('BLOCK_C')}x{r.get('BLOCK_P')}"
        kib = f"{r['cubin_bytes'] / 1024:.0f}" if r.get("cubin_bytes") else "-"
        cs = ",".join(str(c) for c in r.get("launch", {}).get("C", []))
        lines.append(
            f"{r['kernel']:<18} {r['dtype']:<5} {_flags(r):<22} {block:>9} {r['num_warps']:>2} {r['arch']:>3} "
            f"{str(r.get('regs')):>4} {str(r.get('spills')):>5} {str(r.get('shared')):>6} {kib:>5}  {cs}"
        )
    return "\n".join(lines)


def summarize(records: List[dict]) -> str:
    """Per (kernel, dtype, arch): specs compiled, max registers, specs spilling, failures."""
    groups: Dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["dtype"], r["arch"]), []).append(r)
    lines = [f"{'kernel':<18} {'dtype':<5} {'sm':>3} {'specs':>5} {'max regs':>8} {'spilling':>8} {'failed':>6}"]
    for (k, d, a), rs in sorted(groups.items()):
        regs = [r["regs"] for r in rs if r.get("regs") is not None]
        spilling = sum(1 for r in rs if r.get("spills"))
        failed = sum(1 for r in rs if r.get("regs") is None)
        lines.append(f"{k:<18} {d:<5} {a:>3} {len(rs):>5} {max(regs) if regs else '-':>8} {spilling:>8} {failed:>6}")
    return "\n".join(lines)


def _arch(text: str) -> int:
    try:
        value = int(text.removeprefix("sm_").removeprefix("sm"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a compute capability such as 80 or 90, got {text!r}") from None
    if value < 50:
        raise argparse.ArgumentTypeError(f"expected a compute capability such as 80 or 90, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lpips_fast.ops.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=_arch, action="append", help="compute capability (repeatable; default 90)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-spec records here")
    ap.add_argument("--scope", choices=SCOPES, default="all", help="all specs (default), cover (CI set) or hot")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    ap.add_argument("--table", choices=("hot", "all", "none"), default="hot", help="rows to print (default hot)")
    ap.add_argument("--module", choices=SPEC_MODULES, action="append", default=None,
                    help="only the specs of this kernel module (repeatable; default: every module)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    archs = args.arch or [90]
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"lpips_fast.ops.aot: triton is not installed ({exc})", file=sys.stderr)
        return 1
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels, even when a test session set it
    specs = select(load_specs(args.module or SPEC_MODULES), args.scope)
    cache = tempfile.mkdtemp(prefix="lpips_fast_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every spec really compiles
    t0 = time.perf_counter()
    print(f"compiling {len(specs)} specs x {len(archs)} arch(s) with {args.jobs} process(es)", flush=True)

    partial: List[dict] = []

    def progress(done: int, total: int, rec: dict) -> None:
        partial.append(rec)
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.json and done < total:  # a run cut short keeps what it compiled
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(partial, indent=1))

    try:
        records = compile_all(specs, archs, jobs=args.jobs, progress=progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    if args.table != "none":
        print(format_table(records, only_hot=args.table == "hot"))
    print(summarize(records))
    bad = [r for r in records if not r["ok"]]
    for r in bad[:20]:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['dtype']} {_flags(r)} {r.get('BLOCK_C')}x{r.get('BLOCK_P')}: {r['error']}")
    print(f"{len(records)} compiles in {elapsed:.0f} s; {len(bad)} failed or spilled" + (f"; wrote {args.json}" if args.json else ""))
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
