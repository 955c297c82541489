"""The lpips-fast CLI: rows vs the reference lpips, error rows, exit codes, formats, OOM, help."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from lpips_fast import cli
from test_data_helpers import (
    ERROR_NAMES,
    OK_NAMES,
    make_dirs,
    ref_distance,
    reference_model,
    save_state_dict,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli"))
    d0, d1 = make_dirs(root)
    ref, ours = reference_model()
    sd = save_state_dict(ref, os.path.join(root, "lpips.safetensors"))
    return {"root": root, "d0": d0, "d1": d1, "ref": ref, "ours": ours, "sd": sd}


def run(world, *argv):
    return cli.main([*argv, "--state-dict", world["sd"], "--workers", "0", "--device", "cpu"])


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows


def test_help_of_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("pair", "dirs", "ref", "allpairs", "map"):
        assert cmd in out
    commands = ["pair", "dirs", "ref", "allpairs", "map"]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if "weights" in sub.choices:
        commands.append("weights")
    for cmd in commands:
        assert cli.main([cmd, "--help"]) == 0, cmd
        text = capsys.readouterr().out
        assert "usage: lpips-fast " + cmd in text
        if cmd != "weights":
            for opt in ("--net", "--version", "--device", "--dtype", "--batch-size", "--workers", "--resize", "--format", "--cache", "--resume", "--quiet"):
                assert opt in text, (cmd, opt)


def test_dirs_rows_match_reference_and_errors_are_rows(world, tmp_path, capsys):
    out = str(tmp_path / "scores.csv")
    rc = run(world, "dirs", world["d0"], world["d1"], "-o", out, "--batch-size", "4")
    assert rc == cli.EXIT_ERROR_ROWS
    rows = read_csv(out)
    assert [r["path0"] for r in rows] == sorted(OK_NAMES + ERROR_NAMES)
    assert all(r["path0"] == r["path1"] for r in rows)
    by = {r["path0"]: r for r in rows}
    for name in OK_NAMES:
        r = by[name]
        assert r["error"] == ""
        want = ref_distance(world["ref"], os.path.join(world["d0"], name), os.path.join(world["d1"], name))
        assert abs(float(r["lpips"]) - want) < 1e-6, name
    reasons = {
        "corrupt.png": "not an image",
        "truncated.png": "truncated",
        "mismatch.png": "size mismatch: 48x64 vs 40x64",
        "only0.png": "missing in DIR1",
        "only1.png": "missing in DIR0",
    }
    for name, why in reasons.items():
        assert by[name]["lpips"] == ""
        assert why in by[name]["error"], (name, by[name]["error"])
    summary = capsys.readouterr().out
    assert "count=11 errors=5" in summary
    for key in ("mean=", "std=", "stderr=", "min=", "max=", "elapsed=", "pairs/s="):
        assert key in summary


def test_gray_and_rgba_become_rgb(world):
    from lpips_fast.dataset.data import decode_file

    for name in ("gray.png", "rgba.png"):
        d = decode_file(os.path.join(world["d0"], name))
        assert d.ok and d.array.shape == (48, 64, 3) and d.array.dtype == np.uint8


def test_jsonl_and_stdout(world, tmp_path, capsys):
    out = str(tmp_path / "scores.jsonl")
    assert run(world, "dirs", world["d0"], world["d1"], "-o", out) == 3
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 11
    ok = [r for r in lines if r["error"] is None]
    assert len(ok) == 6 and all(isinstance(r["lpips"], float) for r in ok)
    assert all(r["lpips"] is None for r in lines if r["error"] is not None)
    capsys.readouterr()
    # no -o: rows on stdout, summary on stderr
    assert run(world, "dirs", world["d0"], world["d1"], "--format", "jsonl") == 3
    cap = capsys.readouterr()
    assert len([json.loads(x) for x in cap.out.splitlines()]) == 11
    assert "summary: count=11" in cap.err


def test_exit_codes(world, tmp_path, capsys):
    ok0, ok1 = tmp_path / "a", tmp_path / "b"
    for name in ("astronaut.png", "coffee.jpg"):
        for src, dst in ((world["d0"], ok0), (world["d1"], ok1)):
            os.makedirs(dst, exist_ok=True)
            with open(os.path.join(src, name), "rb") as f, open(dst / name, "wb") as g:
                g.write(f.read())
    assert run(world, "dirs", str(ok0), str(ok1), "-o", str(tmp_path / "o.csv")) == 0
    assert run(world, "dirs", world["d0"], str(tmp_path / "nope")) == 2
    assert run(world, "dirs", world["d0"], world["d1"], "--resize", "banana") == 2
    assert run(world, "dirs", world["d0"], world["d1"], "--resume") == 2
    assert run(world, "dirs", world["d0"], world["d1"], "--batch-size", "0") == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["dirs", world["d0"], world["d1"], "--device", "tpu:9"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["dirs", world["d0"], world["d1"], "--device", "cuda"]) == 2
    assert cli.main([]) == 2
    capsys.readouterr()


def test_resize_makes_mismatch_scoreable(world, tmp_path):
    out = str(tmp_path / "r.csv")
    run(world, "dirs", world["d0"], world["d1"], "-o", out, "--resize", "40x56")
    by = {r["path0"]: r for r in read_csv(out)}
    assert by["mismatch.png"]["error"] == "" and float(by["mismatch.png"]["lpips"]) > 0


def test_decompression_bomb_is_an_error_row(world, tmp_path):
    out = str(tmp_path / "bomb.csv")
    assert run(world, "dirs", world["d0"], world["d1"], "-o", out, "--max-pixels", "2000") == 3
    rows = read_csv(out)
    assert sum("decompression bomb" in r["error"] for r in rows) >= 6
    assert "2000" in rows[0]["error"]


def test_pair_and_ref(world, tmp_path, capsys):
    a = os.path.join(world["d0"], "chelsea.png")
    b = os.path.join(world["d1"], "chelsea.png")
    assert run(world, "pair", a, b) == 0
    got = float(capsys.readouterr().out.strip())
    assert abs(got - ref_distance(world["ref"], a, b)) < 1e-6
    assert run(world, "pair", a, os.path.join(world["d1"], "corrupt.png")) == 3
    assert "not an image" in capsys.readouterr().err

    out = str(tmp_path / "ref.csv")
    assert run(world, "ref", a, world["d1"], "-o", out) == 3
    rows = read_csv(out)
    names = sorted(OK_NAMES + ["corrupt.png", "mismatch.png", "only1.png", "truncated.png"])
    assert [r["path1"] for r in rows] == names
    assert all(r["path0"] == a for r in rows)
    by = {r["path1"]: r for r in rows}
    for name in ("astronaut.png", "gray.png", "sub/rocket.png"):
        assert abs(float(by[name]["lpips"]) - ref_distance(world["ref"], a, os.path.join(world["d1"], name))) < 1e-6
    assert "size mismatch" in by["mismatch.png"]["error"]


def test_evaluate_ref_runs_reference_trunk_once(world):
    import lpips_fast

    model = world["ours"]
    seen = []
    h = model.net.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        rows = lpips_fast.evaluate_ref(os.path.join(world["d0"], "chelsea.png"), world["d1"], model=model, batch_size=3)
    finally:
        h.remove()
    n_ok = sum(r.error is None for r in rows)
    # every scoreable image of DIR once, plus the reference once (never once per pair)
    assert n_ok == 7 and sum(seen) == n_ok + 1


def test_evaluate_api_matches_cli(world):
    import lpips_fast

    rows = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=world["ours"], batch_size=2)
    assert len(rows) == 11
    by = {r.path0: r for r in rows}
    want = ref_distance(world["ref"], os.path.join(world["d0"], "coffee.jpg"), os.path.join(world["d1"], "coffee.jpg"))
    assert abs(by["coffee.jpg"].lpips - want) < 1e-6
    pr = lpips_fast.evaluate_pairs([(os.path.join(world["d0"], "coffee.jpg"), os.path.join(world["d1"], "coffee.jpg"))], model=world["ours"])
    assert abs(pr[0].lpips - want) < 1e-6


def test_out_of_memory_halves_the_batch(world, tmp_path, capsys, monkeypatch):
    from lpips_fast.dataset.features import FeatureSource as Session

    real = Session._trunk
    calls = []

    def fake_trunk(self, arrays):
        calls.append(len(arrays))
        if len(arrays) > 4:  # 2 images per pair: batches above 2 pairs "do not fit"
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, arrays)

    monkeypatch.setattr(Session, "_trunk", fake_trunk)
    out = str(tmp_path / "oom.csv")
    assert run(world, "dirs", world["d0"], world["d1"], "-o", out, "--batch-size", "8") == 3
    summary = capsys.readouterr().out
    assert "oom_retries=2 batch_size=8->2" in summary
    base = str(tmp_path / "base.csv")
    monkeypatch.setattr(Session, "_trunk", real)
    run(world, "dirs", world["d0"], world["d1"], "-o", base)
    a, b = read_csv(out), read_csv(base)
    assert [(r["path0"], r["error"]) for r in a] == [(r["path0"], r["error"]) for r in b]
    for x, y in zip(a, b):
        if x["lpips"]:
            assert abs(float(x["lpips"]) - float(y["lpips"])) < 1e-6


def test_map_writes_heat_picture(world, tmp_path, capsys):
    from PIL import Image

    a = os.path.join(world["d0"], "astronaut.png")
    b = os.path.join(world["d1"], "astronaut.png")
    out = str(tmp_path / "heat.png")
    npy = str(tmp_path / "heat.npy")
    assert run(world, "map", a, b, "-o", out, "--npy", npy) == 0
    val = float(capsys.readouterr().out.strip())
    assert abs(val - ref_distance(world["ref"], a, b)) < 1e-6
    im = Image.open(out)
    assert im.size == (3 * 64 + 8, 48)
    m = np.load(npy)
    assert m.shape == (48, 64) and (m >= 0).all()
    # the reference's spatial map on the same pixels
    import lpips
    from lpips_fast.dataset.data import decode_file

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_sp = lpips.LPIPS(net="alex", spatial=True, pnet_rand=True, verbose=False)
    ref_sp.load_state_dict(world["ref"].state_dict())
    with torch.no_grad():
        want = ref_sp(lpips.im2tensor(decode_file(a).array), lpips.im2tensor(decode_file(b).array))[0, 0].numpy()
    assert np.abs(m - want).max() < 1e-6


def test_engine_path_matches_and_halves_on_oom(world, tmp_path, capsys, monkeypatch):
    """--engine on (the CUDA default without a cache): Engine fed by PinnedPipeline, CPU here."""
    from lpips_fast.inference.engine import Engine

    base = str(tmp_path / "base.csv")
    run(world, "dirs", world["d0"], world["d1"], "-o", base, "--engine", "off")
    real = Engine.__call__

    def fake_call(self, a, b):
        if a.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, a, b)

    monkeypatch.setattr(Engine, "__call__", fake_call)
    out = str(tmp_path / "eng.csv")
    assert run(world, "dirs", world["d0"], world["d1"], "-o", out, "--engine", "on", "--batch-size", "8") == 3
    assert "oom_retries=2 batch_size=8->2" in capsys.readouterr().out
    a, b = read_csv(out), read_csv(base)
    assert [(r["path0"], r["error"]) for r in a] == [(r["path0"], r["error"]) for r in b]
    for x, y in zip(a, b):
        if x["lpips"]:
            assert abs(float(x["lpips"]) - float(y["lpips"])) < 1e-6


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys
    import types

    class Tty(io.StringIO):
        def isatty(self):
            return True

    from lpips_fast.dataset.evaluate import progress_bar

    fake = types.SimpleNamespace(main=True, args=types.SimpleNamespace(quiet=False))

    def progress(run, total):
        return progress_bar(total, "pair", cli.show_progress(run.args.quiet, run.main))

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(fake, 10) is None  # not a terminal
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress(fake, 10)
    assert bar is not None
    bar.update(10)
    bar.close()
    assert "10/10" in sys.stderr.getvalue()
    fake.args.quiet = True
    assert progress(fake, 10) is None  # --quiet
    fake.args.quiet, fake.main = False, False
    assert progress(fake, 10) is None  # not rank 0


def test_random_trunk_is_seeded(world, capsys):
    a = os.path.join(world["d0"], "coffee.jpg")
    b = os.path.join(world["d1"], "coffee.jpg")
    vals = []
    for seed in ("3", "3", "4"):
        assert cli.main(["pair", a, b, "--random-trunk", "--model-seed", seed, "--workers", "0", "--device", "cpu"]) == 0
        vals.append(float(capsys.readouterr().out))
    assert vals[0] == vals[1] != vals[2]


def test_dash_output_is_stdout(world, capsys):
    assert run(world, "dirs", world["d0"], world["d1"], "-o", "-") == 3
    cap = capsys.readouterr()
    assert cap.out.startswith("path0,path1,lpips,error\n") and len(cap.out.splitlines()) == 12
    assert "summary:" in cap.err and "summary:" not in cap.out


def test_api_never_moves_or_casts_the_callers_model(world):
    import lpips_fast

    model = world["ours"]
    w = model.net.slice1[0].weight
    rows = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, dtype="float16", batch_size=4)
    assert model.net.slice1[0].weight is w and w.dtype == torch.float32
    assert sum(r.error is None for r in rows) == 6
