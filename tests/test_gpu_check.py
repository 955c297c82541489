"""benchmarks/gpu_check.py: its CPU walk (every section, tiny shapes) and its budget logic.

The CUDA checks themselves are tests/gpu (skipped here); this proves the script around them runs,
writes its JSON and keeps going past a failing or over-budget row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_cpu_walk_of_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu" and not data["failures"]
    sections = data["sections"]
    assert sections["preflight"]["status"] == "pass" and sections["preflight"]["triton_launch"]["ok"]
    tests = sections["tests"]
    assert tests["status"] == "pass" and tests["counts"].get("skipped", 0) >= 20 and not tests["counts"].get("failed")
    assert {t["test"].split("::")[0].rsplit(".", 1)[-1] for t in tests["tests"]} >= {"test_cuda_ops", "test_cuda_engine"}
    rows = {r["case"]: r for r in data["rows"]}
    assert [r["status"] for r in data["rows"]] == ["pass"] * 5
    e2e = rows["alex 32px b2 fp32"]
    assert {"reference", "default", "engine"} <= set(e2e["providers"]) and e2e["providers"]["engine"]["ok"]
    assert rows["loss alex 32px b2 fp32"]["gradient_check"]["ok"]
    assert rows["distance tiny fp32"]["fused_vs_eager"]["ok"]
    assert rows["pipeline squeeze 32px b2 x4"]["results_equal_direct_calls"]
    assert rows["nvtx"]["checked"] is False and "nsys profile" in rows["nvtx"]["command"]
    assert "== summary" in proc.stdout


def _run(tmp_path, budget_s=100.0):
    return gpu_check.Run("cpu", budget_s, tmp_path / "r.json", {"device": "cpu"})


def test_a_failing_row_does_not_stop_the_next(tmp_path):
    def broken(run, row):
        raise RuntimeError("boom")

    def fine(run, row):
        row["value"] = 1

    run = _run(tmp_path)
    gpu_check.section_rows(run, [("first", 10, broken, {}, None), ("second", 10, fine, {}, None)])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["error", "pass"] and "boom" in rows[0]["reason"]
    assert rows[1]["value"] == 1 and run.result["failures"] == ["rows: first: RuntimeError: boom"]


def test_row_budget_skips_the_rest_of_that_row_only(tmp_path):
    def slow(run, row):
        row["step1"] = True
        time.sleep(1.2)
        run.check_time()
        row["step2"] = True  # never reached: the row's budget is spent

    def fine(run, row):
        row["ran"] = True

    run = _run(tmp_path, budget_s=1.0)  # less than the slow row needs
    run.min_row_s = 0.1
    gpu_check.section_rows(run, [("slow", 1, slow, {}, None), ("after", 1, fine, {}, None)])
    rows = run.result["rows"]
    assert rows[0]["status"] == "partial" and rows[0]["step1"] and "step2" not in rows[0]
    assert rows[1]["status"] == "skipped" and "budget" in rows[1]["reason"]
    assert not run.result["failures"]


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu", "--sections", "rows,benchmarks"])
    assert exc.value.code == 2 and "--sections" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu", "--budget-s", "0"])
    assert exc.value.code == 2


def test_end_to_end_row_cuda_branches_walked_on_cpu(tmp_path):
    """The CUDA-only branches of the end-to-end row (fp32 engine checked on one instance, timed on
    another; compiled-row provider naming), walked with CPU tensors."""
    import torch

    run = _run(tmp_path)
    run.cuda = True  # the device stays the CPU: graphs are ignored there, gpu_ms is None
    row = {"case": "squeeze fp32", "providers": {}, "batch": 2}
    gpu_check.row_end_to_end(run, row, net="squeeze", px=32, n=2, dtype=torch.float32)
    assert set(row["providers"]) == {"reference", "default", "engine_graphs"}
    assert row["providers"]["engine_graphs"]["ok"] and row["providers"]["engine_graphs"]["gpu_ms"] is None
    assert row["ratio_wall"]["reference"] == 1.0 and not run.result["failures"]
