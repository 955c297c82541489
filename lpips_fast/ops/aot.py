"""Compile the Triton kernels for CUDA targets ahead of time, without a GPU, and audit them.

    python -m lpips_fast.ops.aot --arch 80 --arch 90 --json aot.json [--scope all|cover|hot] [--jobs N]
        [--module M] [--dtype D] [--kernel K] [--failed-in OLD.json] [--strict]

Each specialisation is compiled with ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", arch, 32), options={"num_warps": ...})`` (Triton's bundled ptxas; no
driver needed), and its cubin is read with Triton's bundled ``cuobjdump --dump-resource-usage``:
registers per thread, stack and local bytes per thread (``spills``: these kernels have no local
arrays, so any local memory holds registers, spilled or saved), shared memory (the launch's, from
the kernel's metadata) and cubin size. The JSON is a list of objects, one per (spec, arch):
``kernel, arch, dtype, ok, regs, spills, stack, local, shared, cubin_bytes, num_warps`` plus the
constexprs (``BLOCK_C``, ``BLOCK_P``, flags), ``launch`` (the channel and pixel counts that pick
it), ``hot``, ``seconds``, ``error`` and ``accepted`` (with ``local_ops`` when it has local
memory; below). Exit status 3 when a compile fails or a spec has local memory that the rule
below does not accept (every spec is one the launcher picks), 2 on a usage error, 0 otherwise.

Accepted local memory (``SLOW_PATH_RULE``; ``--strict`` accepts none). For a spec with local
memory the SASS (``cuobjdump -sass``) is read, and the record gets ``local_ops`` (local loads and
stores in the kernel body and in out-of-line subroutines, calls not behind a branch, calls in the
PTX) and ``accepted`` (the rule's text, or null). The rule accepts a spec when the PTX has no
``call`` (Triton inlines every ``@triton.jit`` helper, so every SASS ``CALL`` is ptxas's own
out-of-line slow path of an IEEE ``div.rn``/``sqrt.rn``/``rcp.rn``), no local load or store is in
the kernel body (before the last ``EXIT``), each ``CALL`` is jumped over by a predicated branch
just before it (the fast path's range check, e.g. ``FCHK``), and the frame is at most
``SLOW_PATH_FRAME_MAX`` bytes. Such a frame holds registers the subroutine saves around its own
work when ptxas has capped the kernel's registers to fit more blocks per SM (Triton declares
``.reqntid`` and no ``.maxnreg``; 80 per thread at 256 threads is the most that fits 3 blocks);
it is touched only when the range check flags an operand (a zero, subnormal, infinite or NaN
one, or a quotient near the exponent limits), per pixel and not per tile value, and then costs
two L1-resident stores and loads next to the slow path's own few dozen instructions. Lifting the
cap removes the frame and costs occupancy (the sm_90 fp16 example: 24 resident warps per SM at 80
registers, 16 at ``maxnreg=128``, which ``wrap_triton`` does not pass through, 93 registers; 12
at 4 warps, 166 registers).

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
# One SASS instruction of cuobjdump -sass: address, optional predicate, opcode, operands.
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-7T]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_PTX_CALL = re.compile(r"^\s*(@!?%p\d+\s+)?call(\.uni)?\b", re.MULTILINE)

SLOW_PATH_FRAME_MAX = 32  # bytes of local memory per thread the rule accepts
SLOW_PATH_RULE = (
    "local memory only in ptxas's out-of-line IEEE div/sqrt slow paths (no PTX calls, no local "
    "access in the kernel body, every call behind the fast path's range check, frame <= "
    f"{SLOW_PATH_FRAME_MAX} B): registers saved there under ptxas's occupancy cap, touched only for "
    "operands at the ends of the exponent range"
)
_GUARD_WINDOW = 24  # instructions before a CALL searched for the predicated branch over it


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


def failed_in(specs: list, records: List[dict]) -> list:
    """The specs that an earlier audit's ``records`` (its JSON) marked not ok, matched on kernel,
    dtype and constexprs (not on num_warps: a spec is re-checked as the launcher now picks it)."""
    bad = [r for r in records if not r.get("ok")]
    return [s for s in specs
            if any(r["kernel"] == s.kernel and r["dtype"] == s.dtype
                   and all(r.get(c) == v for c, v in s.constexprs.items()) for r in bad)]


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


def _run_tool(args: List[str], cubin: bytes) -> str:
    """cuobjdump ``args`` on ``cubin``; its stdout."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither triton's bundled copy nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """regs, stack, local, static shared of the (single) kernel in ``cubin``, from cuobjdump."""
    text = _run_tool(["--dump-resource-usage"], cubin)
    m = _RES.search(text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {text[-500:]!r}")
    regs, stack, shared, local = (int(v) for v in m.groups())
    return {"regs": regs, "stack": stack, "local": local, "static_shared": shared}


def local_memory_sites(cubin: bytes, ptx: str) -> Dict[str, int]:
    """Where the kernel touches local memory, from its SASS: ``body`` (local loads/stores before
    the kernel's last ``EXIT``), ``slow_path`` (in the subroutines after it), ``unguarded_calls``
    (``CALL``s whose nearest branch before them, within ``_GUARD_WINDOW`` instructions, is not
    a predicated one that jumps over them) and ``ptx_calls`` (``call`` instructions in the PTX)."""
    text = _run_tool(["-sass"], cubin)
    ins = [(int(a, 16), bool(p), op, rest) for a, p, op, rest in _SASS.findall(text)]
    if not ins:
        raise RuntimeError(f"no SASS in cuobjdump output: {text[-500:]!r}")
    exits = [a for a, _, op, _ in ins if op == "EXIT"]
    end = max(exits) if exits else -1
    local = [a for a, _, op, _ in ins if op.split(".")[0] in ("LDL", "STL")]
    unguarded = 0
    for k, (a, _, op, _) in enumerate(ins):
        if op.split(".")[0] != "CALL":
            continue
        # The nearest branch before the call (past the argument moves) must be predicated and skip it.
        guarded = False
        for _, pred, op2, rest in reversed(ins[max(0, k - _GUARD_WINDOW) : k]):
            if op2.split(".")[0] == "BRA":
                target = re.search(r"0x([0-9a-f]+)", rest)
                guarded = pred and target is not None and int(target.group(1), 16) > a
                break
        unguarded += not guarded
    return {
        "body": sum(1 for a in local if a <= end),
        "slow_path": sum(1 for a in local if a > end),
        "unguarded_calls": unguarded,
        "ptx_calls": len(_PTX_CALL.findall(ptx)),
    }


def accepted_reason(rec: Dict[str, Any]) -> Optional[str]:
    """``SLOW_PATH_RULE`` when the record's local memory meets it (see the module docstring), else None."""
    sites = rec.get("local_ops")
    if not rec.get("spills") or not sites:
        return None
    if sites["body"] or sites["unguarded_calls"] or sites["ptx_calls"] or not sites["slow_path"]:
        return None
    if rec["spills"] > SLOW_PATH_FRAME_MAX:
        return None
    return SLOW_PATH_RULE


def compile_spec(spec, arch: int, options: Optional[dict] = None, strict: bool = False) -> Dict[str, Any]:
    """Compile one spec for sm_<arch>; the JSON record (``ok`` False with ``error`` on failure or
    on local memory that ``accepted_reason`` does not accept; ``strict``: no local memory accepted)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec: Dict[str, Any] = {"kernel": spec.kernel, "arch": arch, "dtype": spec.dtype, "num_warps": spec.num_warps}
    rec.update(spec.constexprs)
    rec.update({"launch": spec.launch, "hot": spec.hot, "accepted": None})
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
        if rec["spills"]:
            rec["local_ops"] = local_memory_sites(cubin, compiled.asm["ptx"])
            rec["accepted"] = None if strict else accepted_reason(rec)
        rec["ok"] = rec["spills"] == 0 or rec["accepted"] is not None
        rec["error"] = None if rec["ok"] else f"{rec['spills']} bytes of local memory per thread (register spills)"
    except Exception as exc:  # a compile error is a result, recorded per spec
        rec.update({"ok": False, "regs": None, "spills": None, "shared": None, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


_STRICT = False  # set with _SPECS


def _work(task):
    index, arch = task
    return compile_spec(_SPECS[index], arch, strict=_STRICT)


def compile_all(specs: list, archs: Sequence[int], jobs: int = 1, progress=None, strict: bool = False) -> List[Dict[str, Any]]:
    """Compile every spec for every arch, ``jobs`` processes in parallel; records in input order.
    ``progress(done, total, record)`` is called after each compile, in completion order."""
    global _SPECS, _STRICT
    _SPECS = list(specs)
    _STRICT = strict
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
    lines = [f"{'kernel':<19} {'dtype':<5} {'sm':>3} {'specs':>5} {'max regs':>8} {'spilling':>8} {'accepted':>8} {'failed':>6}"]
    for (k, d, a), rs in sorted(groups.items()):
        regs = [r["regs"] for r in rs if r.get("regs") is not None]
        spilling = sum(1 for r in rs if r.get("spills"))
        accepted = sum(1 for r in rs if r.get("accepted"))
        failed = sum(1 for r in rs if r.get("regs") is None)
        lines.append(f"{k:<19} {d:<5} {a:>3} {len(rs):>5} {max(regs) if regs else '-':>8} {spilling:>8} {accepted:>8} {failed:>6}")
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
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"), action="append", default=None,
                    help="only specs of this feature dtype (repeatable)")
    ap.add_argument("--kernel", action="append", default=None, help="only specs of this kernel (repeatable)")
    ap.add_argument("--failed-in", type=Path, default=None, metavar="JSON",
                    help="only the specs an earlier audit's JSON marked not ok (re-check them)")
    ap.add_argument("--strict", action="store_true",
                    help="accept no local memory at all (default: accept what SLOW_PATH_RULE allows)")
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
    if args.dtype:
        specs = [s for s in specs if s.dtype in args.dtype]
    if args.kernel:
        specs = [s for s in specs if s.kernel in args.kernel]
    if args.failed_in:
        try:
            specs = failed_in(specs, json.loads(args.failed_in.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--failed-in {args.failed_in}: {exc}")
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
        records = compile_all(specs, archs, jobs=args.jobs, progress=progress, strict=args.strict)
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
    accepted = sum(1 for r in records if r.get("accepted"))
    print(f"{len(records)} compiles in {elapsed:.0f} s; {len(bad)} failed or spilled; {accepted} with local memory "
          "accepted (SLOW_PATH_RULE)" + (f"; wrote {args.json}" if args.json else ""))
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
