"""Ahead-of-time compile of the Triton kernels for sm_90, without a GPU (lpips_fast.ops.aot).

The spec list must be the launcher's: block configs from ``block_config``, argument types matching the
arguments the launcher builds, every NEED_* combination autograd can request. The compile of the
CI set (``--scope cover``: the hot specs plus every axis value once, ~45 compiles, 30-60 s on 2
cores) must succeed without register spills; ``--scope all`` (~1700 specs per arch) is run by
hand (README, "Checking a GPU").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Not imported here: tests/test_ops_triton.py must import triton first, under TRITON_INTERPRET=1.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

from lpips_fast.ops import _eager, aot  # noqa: E402
from lpips_fast.ops._aot_spec import TRITON_DTYPES, pointer_type  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACC = (torch.float32, torch.float64)


def _tr():
    """``lpips_fast.ops._triton``, imported at first use and not at collection: tests/test_ops_triton.py
    must be the first to import it (under TRITON_INTERPRET=1) to run its cases in-process. Nothing
    here needs compiled-mode kernels (the compiles run in subprocesses)."""
    from lpips_fast.ops import _triton

    return _triton


@pytest.fixture(scope="module")
def specs():
    """The per-layer kernels' specs (other modules in aot.SPEC_MODULES test their own)."""
    return _tr().aot_specializations()


def test_config_returns_plain_ints():
    for acc, backward in [(a, b) for a in ACC for b in (False, True)]:
        for c in _tr().AOT_CHANNELS:
            for p in (*_tr().AOT_PIXELS, 2, 225, 3025):
                cfg = _tr().block_config(c, p, acc, backward)
                assert all(type(v) is int for v in cfg), (c, p, cfg)
                block_c, block_p, warps = cfg
                assert block_c >= c and block_c * block_p <= max(4096, block_c) and warps in (4, 8)


def test_config_plain_ints_under_symbolic_trace():
    """opcheck's dynamic-shape tests trace the launcher with SymInt sizes: constexprs stay ints."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []

    def f(x):
        assert isinstance(x.shape[1], torch.SymInt)
        seen.append(_tr().block_config(x.shape[1], x.shape[2] * x.shape[3]))
        return x * 2

    make_fx(f, tracing_mode="symbolic")(torch.randn(2, 64, 5, 7))
    assert seen == [_tr().block_config(64, 35)] and all(type(v) is int for v in seen[0])


def test_specs_are_the_launchers_configs(specs):
    fwd = [s for s in specs if s.kernel == "_lpips_fwd_kernel"]
    bwd = [s for s in specs if s.kernel == "_lpips_bwd_kernel"]
    assert fwd and bwd and len({s.key() for s in specs}) == len(specs)
    covered = set()
    for s in specs:
        acc = _eager.acc_dtype({v: k for k, v in TRITON_DTYPES.items()}[s.dtype])
        for c in s.launch["C"]:
            for p in s.launch["P"]:
                covered.add((s.kernel, s.dtype, c, p))
        # Every (C, P) the spec stands for picks exactly its block config.
        backward = s.kernel == "_lpips_bwd_kernel"
        picks = {_tr().block_config(c, p, acc, backward) for c in s.launch["C"] for p in s.launch["P"]}
        assert picks == {(s.constexprs["BLOCK_C"], s.constexprs["BLOCK_P"], s.num_warps)}, s
    for kernel in ("_lpips_fwd_kernel", "_lpips_bwd_kernel"):
        for dtype in ("fp32", "fp16", "bf16", "fp64"):
            for c in (1, 3, 64, 128, 192, 256, 384, 512, 1000):
                for p in _tr().AOT_PIXELS:
                    assert (kernel, dtype, c, p) in covered
    needs = {
        (s.constexprs["HAS_W"], s.constexprs["NEED_DX"], s.constexprs["NEED_DY"], s.constexprs["NEED_DW"]) for s in bwd
    }
    # With a weight: all 7 non-empty combinations; without: the 3 without a weight gradient.
    assert len(needs) == 10 and all(dx or dy or dw for _, dx, dy, dw in needs)
    assert not any(dw and not has_w for has_w, _, _, dw in needs)
    assert {(s.constexprs["HAS_W"], s.constexprs["SPATIAL"]) for s in fwd} == {
        (a, b) for a in (True, False) for b in (True, False)
    }


def _check_types(args: dict, sig: dict, constexprs: dict) -> None:
    assert set(args) | set(constexprs) == set(sig)
    for name, value in args.items():
        want = sig[name]
        if isinstance(value, torch.Tensor):
            assert want == pointer_type(value.dtype), (name, want, value.dtype)
        elif isinstance(value, float):
            assert want == "fp32", (name, want)
        else:
            assert isinstance(value, int) and want == "i32", (name, want, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_signature_matches_the_arguments_the_launcher_builds(dtype):
    """The AOT signature and the launcher's argument dicts agree, tensor by tensor."""
    acc = _eager.acc_dtype(dtype)
    x = torch.rand(2, 64, 3, 5, dtype=dtype)
    y = torch.rand(2, 64, 3, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wt = torch.rand(64, dtype=acc)
    block_c, block_p, warps = _tr().block_config(64, 15, acc)
    kw = _tr()._fwd_constexprs(True, False, acc, block_c, block_p)
    out = torch.empty(2, dtype=acc)
    args = _tr()._fwd_args(x, y, wt, out, 15, 1, 1e-10)
    _check_types(args, _tr()._signature(_tr()._lpips_fwd_kernel, dtype, kw), kw)
    block_c, block_p, warps = _tr().block_config(64, 15, acc, backward=True)
    kw = _tr()._bwd_constexprs(True, True, acc, True, True, True, block_c, block_p)
    g = torch.rand(2, 1, 3, 5, dtype=acc)
    dwp = torch.empty(2, 64, dtype=acc)
    args = _tr()._bwd_args(g, 15, 1, x, y, wt, torch.empty_like(x), torch.empty_like(y), dwp, True, True, 15, 1, 1e-10)
    _check_types(args, _tr()._signature(_tr()._lpips_bwd_kernel, dtype, kw), kw)


def test_cover_scope_has_every_axis_value_and_the_hot_specs(specs):
    assert aot.SPEC_MODULES[0] == "lpips_fast.ops._triton" and len(aot.load_specs()) >= len(specs)
    chosen = aot.select(specs, "cover")
    assert {a for s in specs for a in s.axes} == {a for s in chosen for a in s.axes}
    assert [s for s in specs if s.hot] == [s for s in chosen if s.hot]
    hot = [s for s in specs if s.hot]
    assert {s.dtype for s in hot} == {"fp32", "bf16"} and {s.kernel for s in hot} == {
        "_lpips_fwd_kernel",
        "_lpips_bwd_kernel",
    }
    with pytest.raises(ValueError, match="scope"):
        aot.select(specs, "most")


def _run(args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """A fresh interpreter without TRITON_INTERPRET (tests/test_ops_triton.py sets it for the
    session, and kernels imported under it cannot be compiled for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


_SPILL_SNIPPET = """
import json
from lpips_fast.ops import aot
spec = next(s for s in aot.load_specs() if s.hot and s.kernel == "_lpips_bwd_kernel" and s.constexprs["BLOCK_C"] == 512)
print(json.dumps(aot.compile_spec(spec, 90, options={"maxnreg": 32})))
"""


def test_spills_are_detected():
    """A register cap forces spills: the record must say so (ok False, spills > 0)."""
    proc = _run(["-c", _SPILL_SNIPPET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["regs"] is not None and rec["regs"] <= 32, rec
    assert rec["spills"] > 0 and rec["ok"] is False and "spill" in rec["error"]
    # Spills in the kernel body are never accepted.
    assert rec["local_ops"]["body"] > 0 and rec["accepted"] is None, rec


_SLOW_PATH_SNIPPET = """
import json
from lpips_fast.ops import aot
spec = next(
    s for s in aot.load_specs()
    if s.kernel == "_grouped_bwd_kernel" and s.dtype == "fp16" and s.launch["net"] == ["vgg"]
    and s.constexprs["SPATIAL"] and s.constexprs["NEED_DX"] and s.constexprs["NEED_DW"] and not s.constexprs["NEED_DY"]
)
print(json.dumps(aot.compile_spec(spec, 90)))
"""


def test_slow_path_frame_is_accepted_by_the_rule():
    """The 20261129 audit's sm_90 example (grouped backward, fp16, weight, spatial, dx and dw, 8
    warps): 80 registers and an 8-byte frame whose only local loads and stores are in ptxas's
    out-of-line IEEE division slow path. Accepted by SLOW_PATH_RULE; with one local access in the
    body, or a larger frame, it would not be."""
    proc = _run(["-c", _SLOW_PATH_SNIPPET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["spills"] > 0, f"this spec no longer has local memory; pick another for the rule's test: {rec}"
    sites = rec["local_ops"]
    assert sites["body"] == 0 and sites["slow_path"] > 0 and sites["unguarded_calls"] == 0 and sites["ptx_calls"] == 0
    assert rec["ok"] and rec["accepted"] == aot.SLOW_PATH_RULE and rec["error"] is None, rec
    assert aot.accepted_reason(dict(rec, local_ops=dict(sites, body=1))) is None
    assert aot.accepted_reason(dict(rec, spills=aot.SLOW_PATH_FRAME_MAX + 8)) is None


# Hand-written cuobjdump -sass lines: a body with one guarded call, an EXIT, one subroutine.
_SASS_TEXT = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   FCHK P0, R28, R17 ;
        /*0020*/              @!P0 BRA 0x60 ;
        /*0030*/                   MOV R0, R17 ;
        /*0040*/                   MOV R16, 0x60 ;
        /*0050*/                   CALL.REL.NOINC 0x90 ;
        /*0060*/                   %s ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80 ;
        /*0090*/                   STL [R1], R29 ;
        /*00a0*/                   LDL.LU R29, [R1] ;
        /*00b0*/                   RET.REL.NODEC R16 0x0 ;
"""


@pytest.mark.parametrize(
    "body, ptx, want",
    [
        ("NOP", "", {"body": 0, "slow_path": 2, "unguarded_calls": 0, "ptx_calls": 0}),
        ("STL [R1+0x4], R2", "", {"body": 1, "slow_path": 2, "unguarded_calls": 0, "ptx_calls": 0}),
        ("NOP", "\tcall.uni (retval0), f, (param0);", {"body": 0, "slow_path": 2, "unguarded_calls": 0, "ptx_calls": 1}),
    ],
)
def test_local_memory_sites_from_sass(monkeypatch, body, ptx, want):
    monkeypatch.setattr(aot, "_run_tool", lambda args, cubin: _SASS_TEXT % body)
    sites = aot.local_memory_sites(b"", ptx)
    assert sites == want
    accepted = aot.accepted_reason({"spills": 8, "local_ops": sites})
    assert (accepted == aot.SLOW_PATH_RULE) is (want["body"] == 0 and want["ptx_calls"] == 0)


def test_unguarded_call_is_not_accepted(monkeypatch):
    text = _SASS_TEXT.replace("@!P0 BRA 0x60", "FADD R2, R2, R3") % "NOP"
    monkeypatch.setattr(aot, "_run_tool", lambda args, cubin: text)
    sites = aot.local_memory_sites(b"", "")
    assert sites["unguarded_calls"] == 1 and aot.accepted_reason({"spills": 8, "local_ops": sites}) is None


def test_failed_in_selects_the_earlier_audits_failures(specs):
    pick = next(s for s in specs if s.kernel == "_lpips_bwd_kernel")
    other = next(s for s in specs if s.kernel == "_lpips_fwd_kernel")
    records = [
        {"kernel": pick.kernel, "dtype": pick.dtype, "ok": False, "num_warps": 1, **pick.constexprs},
        {"kernel": other.kernel, "dtype": other.dtype, "ok": True, **other.constexprs},
    ]
    chosen = aot.failed_in(specs, records)
    assert pick in chosen and other not in chosen
    assert all(s.kernel == pick.kernel and s.dtype == pick.dtype and s.constexprs == pick.constexprs for s in chosen)


def test_grouped_fp64_backward_runs_4_warps():
    """At 8 warps ptxas capped the grouped fp64 backward at 80 registers and spilled in the body
    (20261129 audit); the per-layer kernel keeps block_config's warps (at 4, five of its fp64
    backward specs spilled on sm_80)."""
    from lpips_fast.ops import _triton_grouped

    for s in _triton_grouped.aot_specializations():
        if s.dtype == "fp64" and s.kernel == "_grouped_bwd_kernel":
            assert s.num_warps == 4, s
    assert _tr().block_config(1000, 9, torch.float64, backward=True)[2] == 8


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        aot.main(["--arch", "sm_x"])
    assert exc.value.code == 2 and "--arch" in capsys.readouterr().err


def test_aot_cover_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    proc = _run(["-m", "lpips_fast.ops.aot", "--arch", "90", "--scope", "cover", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert len(records) == len(aot.select(aot.load_specs(), "cover"))
    for r in records:
        assert r["ok"] and r["arch"] == 90 and r["spills"] == 0 and r["accepted"] is None, r
        assert 0 < r["regs"] <= 255 and r["shared"] >= 0 and r["cubin_bytes"] > 0
        # per-layer kernels: one tile; grouped kernels: one tile per layer slot (BC{k}/BP{k}) and NL
        tile = {"BLOCK_C", "BLOCK_P"} if r["kernel"].startswith("_lpips") else {"NL", "BC0", "BP0"}
        assert {"kernel", "dtype", "num_warps", "launch"} | tile <= set(r)
    hot = [r for r in records if r["hot"]]
    assert len(hot) == sum(s.hot for s in aot.load_specs()) and "_lpips_bwd_kernel" in proc.stdout
    assert {"_grouped_fwd_kernel", "_grouped_bwd_kernel"} <= {r["kernel"] for r in hot}
