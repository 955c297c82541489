"""--resume: a run killed with SIGKILL mid-way leaves a file that resume completes; partial lines."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lpips_fast import cli
from lpips_fast.dataset.writers import Row, RowWriter, read_existing
from test_data_helpers import env, make_flat_dir, reference_model, save_state_dict


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    d = os.path.join(root, "imgs")
    make_flat_dir(d, 240)
    ref, ours = reference_model()
    sd = save_state_dict(ref, os.path.join(root, "lpips.safetensors"))
    return {"root": root, "dir": d, "sd": sd, "ours": ours, "ref_img": os.path.join(d, "img000.png")}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", ["csv"])
def test_resume_after_real_sigkill(big, tmp_path, fmt):
    out = str(tmp_path / f"scores.{fmt}")
    argv = [
        sys.executable, "-m", "lpips_fast.cli", "ref", big["ref_img"], big["dir"], "-o", out,
        "--state-dict", big["sd"], "--batch-size", "1", "--workers", "0", "--device", "cpu", "--quiet",
    ]
    p = subprocess.Popen(argv, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline:
        if p.poll() is not None:
            break
        if os.path.exists(out) and os.path.getsize(out) > 0:
            with open(out, "rb") as f:
                n = f.read().count(b"\n")
            if n >= 4:  # header + a few rows: kill it mid-run, at an arbitrary moment
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.005)
    p.wait(timeout=60)
    assert killed, f"the run finished before it could be killed (rc={p.returncode}): {p.stderr.read()[-2000:]!r}"
    p.stderr.close()
    before = _rows(out) if os.path.getsize(out) else []
    assert 0 < len(before) < 240

    # resume completes it: every pair exactly once
    rc = cli.main(["ref", big["ref_img"], big["dir"], "-o", out, "--resume", "--state-dict", big["sd"], "--workers", "0", "--device", "cpu", "--batch-size", "16"])
    assert rc == 0
    after = _rows(out)
    keys = [(r["path0"], r["path1"]) for r in after]
    assert len(keys) == 240 == len(set(keys))
    # the rows kept from before the kill are untouched, the values equal a clean run
    import lpips_fast

    clean = {r.path1: r.lpips for r in lpips_fast.evaluate_ref(big["ref_img"], big["dir"], model=big["ours"], batch_size=32)}
    for r in after:
        assert r["error"] == ""
        assert abs(float(r["lpips"]) - clean[r["path1"]]) < 1e-6
    kept = {(r["path0"], r["path1"]): r["lpips"] for r in after}
    for r in before:
        assert kept[(r["path0"], r["path1"])] == r["lpips"]


def test_partial_last_line_is_dropped_and_rescored(tmp_path):
    for fmt in ("csv", "jsonl"):
        out = str(tmp_path / f"o.{fmt}")
        w = RowWriter(out, fmt)
        w.write([Row("a", "a", 0.25), Row("b", "b", None, "decode error: x, y\nz")])
        w.close()
        with open(out, "ab") as f:
            f.write(b'c,c,0.12' if fmt == "csv" else b'{"path0": "c", "pa')
        ex = read_existing(out, fmt)
        assert ex.keys == {("a", "a"), ("b", "b")}
        assert ex.truncated_bytes > 0
        assert ex.rows[1].error == "decode error: x, y z"
        with open(out, "rb") as f:
            assert f.read().endswith(b"\n")
        w = RowWriter(out, fmt, append=True)
        w.write([Row("c", "c", 0.5)])
        w.close()
        ex = read_existing(out, fmt)
        assert [r.key for r in ex.rows] == [("a", "a"), ("b", "b"), ("c", "c")]
        if fmt == "csv":
            assert open(out).read().count("path0,path1,lpips,error") == 1
        else:
            assert all(json.loads(x) for x in open(out))


def test_resume_skips_done_pairs_jsonl(big, tmp_path, capsys):
    out = str(tmp_path / "s.jsonl")
    names = sorted(os.listdir(big["dir"]))[:5]
    # a previous run's rows (with made-up values, to prove they are kept, not recomputed)
    with open(out, "w") as f:
        for n in names:
            f.write(json.dumps({"path0": big["ref_img"], "path1": n, "lpips": 9.0, "error": None}) + "\n")
        f.write('{"path0": "x"')  # killed mid-line
    # hand-written, so no settings record: --force says these rows are known to match
    rc = cli.main(["ref", big["ref_img"], big["dir"], "-o", out, "--resume", "--force", "--state-dict", big["sd"], "--workers", "0", "--device", "cpu", "--batch-size", "64"])
    assert rc == 0
    rows = [json.loads(x) for x in open(out)]
    assert len(rows) == 240
    assert [r["lpips"] for r in rows[:5]] == [9.0] * 5
    s = capsys.readouterr().out
    assert "count=240" in s and "resumed=5" in s


def test_pair_resume_reuses_the_row(big, tmp_path, capsys):
    a, b = big["ref_img"], os.path.join(big["dir"], "img001.png")
    out = str(tmp_path / "p.csv")
    common = ["--state-dict", big["sd"], "--workers", "0", "--device", "cpu"]
    assert cli.main(["pair", a, b, "-o", out, *common]) == 0
    first = capsys.readouterr().out
    assert cli.main(["pair", a, b, "-o", out, "--resume", *common]) == 0
    assert capsys.readouterr().out == first
    assert len(_rows(out)) == 1


def test_output_problems_are_usage_errors(big, tmp_path, capsys):
    common = ["--state-dict", big["sd"], "--workers", "0", "--device", "cpu"]
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"path0": "a", "path1": "b", "lpips": 0.1, "error": null}\n')
    assert cli.main(["ref", big["ref_img"], big["dir"], "-o", str(jl), "--resume", "--format", "csv", *common]) == 2
    assert "wrong --format" in capsys.readouterr().err
    assert cli.main(["ref", big["ref_img"], big["dir"], "-o", str(tmp_path), *common]) == 2
    assert cli.main(["ref", big["ref_img"], big["dir"], "-o", str(tmp_path / "no" / "x.csv"), *common]) == 2
    part = tmp_path / "h.csv"
    part.write_text("path0,pa")  # killed while writing the header: still resumable
    assert cli.main(["ref", big["ref_img"], big["dir"], "-o", str(part), "--resume", *common]) == 0
    assert len(_rows(str(part))) == 240


def test_bulk_stats_and_rows_equal_row_by_row(tmp_path):
    import numpy as np

    from lpips_fast.dataset.writers import Stats

    v = np.random.default_rng(0).random(1000)
    a, b = Stats(), Stats()
    for x in v:
        a.add(Row("p", "q", float(x)))
    b.add(Row("e", "f", None, "bad"))
    b.add_values(v[:10])
    b.add_values(v[10:])
    assert (a.count + 1, a.errors + 1) == (b.count, b.errors)
    assert abs(a.mean - b.mean) < 1e-12 and abs(a.std - b.std) < 1e-12 and (a.min, a.max) == (b.min, b.max)
    for fmt in ("csv", "jsonl"):
        p1, p2 = str(tmp_path / f"1.{fmt}"), str(tmp_path / f"2.{fmt}")
        names = ["x.png", 'we,ird "name".png', "z.png"]
        w = RowWriter(p1, fmt)
        w.write([Row("a,b.png", n, float(x)) for n, x in zip(names, v)])
        w.close()
        w = RowWriter(p2, fmt)
        w.write_pairs("a,b.png", names, v[:3])
        w.close()
        assert open(p1).read() == open(p2).read()


# -- resume checks its settings; CSV records with newlines; --retry-errors ----------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("small"))
    d0, d1 = os.path.join(root, "a"), os.path.join(root, "b")
    make_flat_dir(d0, 3)
    make_flat_dir(d1, 3, seed=5)
    ref, _ = reference_model()
    sd = save_state_dict(ref, os.path.join(root, "lpips.safetensors"))
    from lpips_fast.weights import lin_state_dict
    from safetensors.torch import save_file

    lin = os.path.join(root, "lin.safetensors")
    save_file(lin_state_dict("alex", "0.1"), lin)
    return {"root": root, "d0": d0, "d1": d1, "sd": sd, "lin": lin}


@pytest.mark.parametrize("change,named", [
    (["--net", "squeeze"], "--net was alex, now squeeze"),
    (["--version", "0.0"], "--version was 0.1, now 0.0"),
    (["--resize", "40x56"], "--resize was unset, now 40x56"),
    (["--dtype", "bfloat16"], "--dtype was float32, now bfloat16"),
    (["--lin", "LIN"], "--lin was unset"),
    (["REF"], "the command was dirs, now ref"),
])
def test_resume_refuses_an_output_written_with_other_settings(small, tmp_path, capsys, change, named):
    out = str(tmp_path / "s.csv")
    common = ["--state-dict", small["sd"], "--workers", "0", "--device", "cpu"]
    assert cli.main(["dirs", small["d0"], small["d1"], "-o", out, *common]) == 0
    before = open(out).read()
    assert os.path.exists(out + ".lpips-run.json")
    change = [small["lin"] if c == "LIN" else c for c in change]
    if change == ["REF"]:
        argv = ["ref", os.path.join(small["d0"], "img000.png"), small["d1"], "-o", out, "--resume", *common]
    else:
        argv = ["dirs", small["d0"], small["d1"], "-o", out, "--resume", *common, *change]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert open(out).read() == before  # nothing written
    if change[0] in ("--version", "--resize"):  # --force mixes them knowingly
        assert cli.main(argv + ["--force"]) == 0


def test_resume_refuses_an_output_without_its_settings_record(small, tmp_path, capsys):
    """An output copied without its sidecar (or written by an older version) could hold rows of any
    trunk: --resume refuses it in one line; --force continues it; an empty file needs no record."""
    out = str(tmp_path / "s.csv")
    common = ["--state-dict", small["sd"], "--workers", "0", "--device", "cpu"]
    assert cli.main(["dirs", small["d0"], small["d1"], "-o", out, *common, "--net", "alex"]) == 0
    os.remove(out + ".lpips-run.json")
    before = open(out).read()
    capsys.readouterr()
    argv = ["dirs", small["d0"], small["d1"], "-o", out, "--resume", *common, "--net", "vgg"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no record of the settings that wrote it" in err and "--force" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert open(out).read() == before and not os.path.exists(out + ".lpips-run.json")
    assert cli.main(argv[:-2] + ["--net", "alex", "--force"]) == 0  # knowingly continued: the record is written
    assert "resumed=3" in capsys.readouterr().out and os.path.exists(out + ".lpips-run.json")
    empty = str(tmp_path / "empty.csv")
    open(empty, "w").close()
    assert cli.main(["dirs", small["d0"], small["d1"], "-o", empty, "--resume", *common]) == 0
    assert len(_rows(empty)) == 3


def test_resume_with_the_same_settings_is_accepted(small, tmp_path, capsys):
    out = str(tmp_path / "s.jsonl")
    common = ["--state-dict", small["sd"], "--workers", "0", "--device", "cpu", "--resize", "48x64"]
    assert cli.main(["dirs", small["d0"], small["d1"], "-o", out, *common]) == 0
    assert cli.main(["dirs", small["d0"], small["d1"], "-o", out, "--resume", *common]) == 0
    assert "resumed=3" in capsys.readouterr().out


def test_csv_cut_inside_a_quoted_newline_is_repaired(tmp_path):
    out = str(tmp_path / "q.csv")
    rows = [Row("x.png", "x.png", 0.125), Row("we\nird.png", "we\nird.png", 0.25), Row("z.png", "z.png", 0.5)]
    w = RowWriter(out, "csv")
    w.write(rows)
    w.close()
    data = open(out, "rb").read()
    cut = data.index(b"we\n") + 3  # inside the quoted field, right after its newline
    open(out, "wb").write(data[:cut])
    ex = read_existing(out, "csv")
    assert ex.keys == {("x.png", "x.png")} and ex.truncated_bytes > 0
    assert open(out, "rb").read() == data[: data.index(b'"we')]
    w = RowWriter(out, "csv", append=True)
    w.write(rows[1:])
    w.close()
    again = read_existing(out, "csv")
    assert [r.key for r in again.rows] == [r.key for r in rows] and again.truncated_bytes == 0
    # a complete record ending in a quoted newline is kept
    ex = read_existing(out, "csv")
    assert len(ex.rows) == 3


def test_resume_retry_errors_rescores_fixed_files(small, tmp_path, capsys):
    import shutil

    d0, d1 = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(small["d0"], d0)
    shutil.copytree(small["d1"], d1)
    good = open(os.path.join(d1, "img001.png"), "rb").read()
    open(os.path.join(d1, "img001.png"), "wb").write(b"not yet written")
    out = str(tmp_path / "r.csv")
    common = ["--state-dict", small["sd"], "--workers", "0", "--device", "cpu"]
    assert cli.main(["dirs", d0, d1, "-o", out, *common]) == 3
    assert cli.main(["dirs", d0, d1, "-o", out, "--resume", *common]) == 3  # plain resume keeps the error row
    open(os.path.join(d1, "img001.png"), "wb").write(good)
    capsys.readouterr()
    assert cli.main(["dirs", d0, d1, "-o", out, "--retry-errors", *common]) == 2  # needs --resume
    assert cli.main(["dirs", d0, d1, "-o", out, "--resume", "--retry-errors", *common]) == 0
    assert "count=3 errors=0" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["path0"] for r in rows] == ["img000.png", "img002.png", "img001.png"]
    # every row scored (the folders hold the same photos, so their values are exactly 0)
    assert all(r["error"] == "" and float(r["lpips"]) >= 0 for r in rows)
