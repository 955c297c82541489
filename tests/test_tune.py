"""select_precision: the fp32 row is exact, lower precisions' errors are measured, the choice
is the fastest row within the budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast.deploy.tune import PRECISIONS, engine_kwargs, generated_pairs, select_precision


@pytest.fixture(scope="module")
def report():
    a, b, ref = generated_pairs((48, 48), levels=3)
    return select_precision(net="alex", pairs=(a, b), references=ref, batch_size=8, repeats=1,
                            candidates=["fp32", "fp32-nchw", "bf16", "int8"]), (a, b, ref)


def test_fp32_row_is_exact(report):
    rep, _ = report
    fp32 = rep.rows[0]
    assert fp32.name == "fp32" and fp32.status == "ok"
    assert fp32.max_abs_err == 0.0 and fp32.mean_abs_err == 0.0
    assert fp32.spearman == 1.0 and fp32.two_afc == 1.0 and fp32.within_budget
    assert rep.n_pairs == 12 and rep.n_triplets == 2 * 15  # two photos, 6 distortions each
    assert fp32.pairs_per_s > 0 and fp32.model_bytes > 1e6


def test_lower_precision_errors_are_measured(report):
    rep, (a, b, _) = report
    rows = {r.name: r for r in rep.rows}
    bf16 = rows["bf16"]
    assert bf16.status == "ok"
    eng = lpips_fast.Engine(net="alex", device="cpu", dtype=torch.bfloat16, compile=False)
    with torch.no_grad():
        want = lpips_fast.LPIPS(net="alex")(a, b).flatten().double()
        got = torch.cat([eng(a[i:i + 8], b[i:i + 8]).flatten() for i in range(0, 12, 8)]).double()
    err = (got - want).abs()
    assert bf16.max_abs_err == pytest.approx(float(err.max()), rel=1e-6) and bf16.max_abs_err > 0
    assert bf16.mean_abs_err == pytest.approx(float(err.mean()), rel=1e-6)
    assert 0 < rows["fp32-nchw"].max_abs_err < 1e-5  # same math, other convolution layout
    int8 = rows["int8"]
    if int8.status == "ok":
        assert int8.max_abs_err > 1e-4 and int8.model_bytes < rows["fp32"].model_bytes / 2
    else:
        assert int8.reason  # says why the stack cannot


def test_choice_is_fastest_within_budget(report):
    rep, _ = report
    ok = [r for r in rep.rows if r.status == "ok" and r.within_budget]
    assert rep.choice == max(ok, key=lambda r: r.pairs_per_s).name
    for r in rep.rows:
        if r.status == "ok":
            assert r.within_budget == (r.two_afc >= 0.99 and r.spearman >= 0.999)
    md = rep.markdown()
    assert f"chosen: {rep.choice}" in md and "| int8" in md
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["rows"][0]["max_abs_err"] == 0.0


def test_engine_kwargs_and_bad_input():
    assert engine_kwargs("bf16") == {"dtype": torch.bfloat16, "channels_last": True}
    assert engine_kwargs("fp32-nchw") == {"dtype": torch.float32, "channels_last": False}
    assert set(PRECISIONS) >= {"fp32", "bf16", "fp16", "aoti", "int8"}
    with pytest.raises(ValueError, match="not an Engine setting"):
        engine_kwargs("int8")
    with pytest.raises(ValueError, match="precision"):
        engine_kwargs("fp8")
    with pytest.raises(ValueError, match="candidates"):
        select_precision(candidates=["fp64"])


def test_cli_tune_json(tmp_path, capsys):
    from lpips_fast.cli import main

    out = tmp_path / "t.json"
    rc = main(["tune", "--net", "alex", "--size", "40", "--candidates", "fp32", "fp16", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert [r["name"] for r in d["rows"]] == ["fp32", "fp16"] and d["choice"] in ("fp32", "fp16")
    assert d["rows"][0]["max_abs_err"] == 0.0
    assert np.isfinite(d["rows"][1]["max_abs_err"]) or d["rows"][1]["status"] != "ok"
    assert "chosen:" in capsys.readouterr().out
    assert main(["tune", "--candidates", "fp8"]) == 2
