"""Every user error is one line on stderr naming the option, exit status 2, before any work;
outputs never overwrite inputs; file names that are not UTF-8 never lose a row."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from lpips_fast import cli
from test_data_helpers import env, make_flat_dir, reference_model, save_state_dict


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    d0, d1 = str(root / "d0"), str(root / "d1")
    make_flat_dir(d0, 3)
    make_flat_dir(d1, 3, seed=2)
    os.makedirs(root / "empty")
    ref, _ = reference_model()
    sd = save_state_dict(ref, str(root / "sd.safetensors"))
    (root / "notes.txt").write_text("not weights")
    from lpips_fast.weights import lin_state_dict
    from safetensors.torch import save_file

    save_file(lin_state_dict("vgg", "0.1"), str(root / "vgg_lin.safetensors"))
    return {"root": str(root), "d0": d0, "d1": d1, "sd": sd, "img": os.path.join(d0, "img000.png"),
            "img1": os.path.join(d1, "img000.png"), "empty": str(root / "empty"), "txt": str(root / "notes.txt"),
            "vgg_lin": str(root / "vgg_lin.safetensors")}


COMMON = ["--workers", "0", "--device", "cpu", "-q"]
# (case id, argv with placeholders, text the one-line message must contain, may the model be built?)
CASES = [
    ("o-unwritable", ["dirs", "D0", "D1", "-o", "/proc/lpips-out.csv", "--state-dict", "SD"], "-o /proc/lpips-out.csv", False),
    ("o-dev-full", ["dirs", "D0", "D1", "-o", "/dev/full", "--state-dict", "SD"], "not a regular file", False),
    ("o-missing-folder", ["dirs", "D0", "D1", "-o", "ROOT/no/such/o.csv", "--state-dict", "SD"], "does not exist", False),
    ("o-is-an-input", ["dirs", "D0", "D1", "-o", "IMG1", "--state-dict", "SD"], "is one of the input images", False),
    ("pair-o-is-an-input", ["pair", "IMG", "IMG1", "-o", "IMG", "--state-dict", "SD"], "is one of the input images", False),
    ("cache-is-a-file", ["dirs", "D0", "D1", "--cache", "TXT", "--state-dict", "SD"], "--cache", False),
    ("cache-unwritable", ["dirs", "D0", "D1", "--cache", "/proc/lpips-cache", "--state-dict", "SD"], "--cache", False),
    ("cache-max-size-inf", ["dirs", "D0", "D1", "--cache", "ROOT/c", "--cache-max-size", "inf", "--state-dict", "SD"], "--cache-max-size", False),
    ("cache-max-size-negative", ["dirs", "D0", "D1", "--cache", "ROOT/c", "--cache-max-size", "-5G", "--state-dict", "SD"], "--cache-max-size", False),
    ("trunk-missing", ["dirs", "D0", "D1", "--trunk", "ROOT/nope.pth"], "--trunk", False),
    ("lin-missing", ["dirs", "D0", "D1", "--lin", "ROOT/nope.pth", "--random-trunk"], "--lin", False),
    ("state-dict-missing", ["dirs", "D0", "D1", "--state-dict", "ROOT/nope.safetensors"], "--state-dict", False),
    ("lin-not-weights", ["dirs", "D0", "D1", "--lin", "TXT", "--random-trunk"], "--lin: ", True),
    ("lin-other-net", ["dirs", "D0", "D1", "--lin", "VGGLIN", "--random-trunk"], "--lin: ", True),
    ("lin-is-an-image", ["dirs", "D0", "D1", "--lin", "IMG", "--random-trunk"], "--lin: ", True),
    ("state-dict-not-weights", ["dirs", "D0", "D1", "--state-dict", "TXT"], "--state-dict: ", True),
    ("trunk-not-weights", ["dirs", "D0", "D1", "--trunk", "TXT", "--random-trunk"], "--trunk: ", True),
    ("device-mps", ["dirs", "D0", "D1", "--device", "mps", "--state-dict", "SD"], "--device mps", False),
    ("device-meta", ["dirs", "D0", "D1", "--device", "meta", "--state-dict", "SD"], "--device meta", False),
    ("resize-over-max-pixels", ["dirs", "D0", "D1", "--resize", "100x100", "--max-pixels", "5000", "--state-dict", "SD"], "--resize", False),
    ("empty-folder-dirs", ["dirs", "EMPTY", "EMPTY", "--state-dict", "SD"], "no images", False),
    ("empty-folder-ref", ["ref", "IMG", "EMPTY", "--state-dict", "SD"], "no images", False),
    ("allpairs-matrix-bad-path", ["allpairs", "D0", "--matrix", "ROOT/no/such/m.npy", "--state-dict", "SD"], "--matrix", False),
    ("allpairs-matrix-unwritable", ["allpairs", "D0", "--matrix", "/proc/m.npy", "--state-dict", "SD"], "--matrix", False),
    ("map-o-bad-path", ["map", "IMG", "IMG1", "-o", "ROOT/no/such/heat.png", "--state-dict", "SD"], "-o", False),
    ("map-o-is-an-input", ["map", "IMG", "IMG1", "-o", "IMG1", "--state-dict", "SD"], "is one of the input images", False),
    ("map-npy-bad-path", ["map", "IMG", "IMG1", "-o", "ROOT/h.png", "--npy", "/proc/h.npy", "--state-dict", "SD"], "--npy", False),
    ("retry-errors-without-resume", ["dirs", "D0", "D1", "-o", "ROOT/r.csv", "--retry-errors", "--state-dict", "SD"], "--retry-errors", False),
]


@pytest.mark.parametrize("case,argv,says,builds", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(w, monkeypatch, capsys, case, argv, says, builds):
    subst = {"D0": w["d0"], "D1": w["d1"], "SD": w["sd"], "IMG": w["img"], "IMG1": w["img1"], "TXT": w["txt"],
             "EMPTY": w["empty"], "VGGLIN": w["vgg_lin"]}
    argv = [subst.get(a, a.replace("ROOT", w["root"])) for a in argv]
    if not builds:  # refused before any model is built or any image scored
        from lpips_fast.dataset.features import FeatureSource

        def forbidden(*a, **k):
            raise AssertionError("work started before the arguments were checked")

        monkeypatch.setattr(FeatureSource, "from_options", classmethod(forbidden))
    before = {p: open(p, "rb").read() for p in (w["img"], w["img1"])}
    rc = cli.main([argv[0], *COMMON, *argv[1:]])  # the case's own options win
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    assert says in lines[0], lines[0]
    assert before == {p: open(p, "rb").read() for p in before}  # inputs untouched


def test_non_utf8_file_names_keep_every_row(w, tmp_path):
    import shutil

    d0, d1 = tmp_path / "a", tmp_path / "b"
    shutil.copytree(w["d0"], d0)
    shutil.copytree(w["d1"], d1)
    odd = b"caf\xe9.png"  # Latin-1 bytes: not UTF-8
    for d in (d0, d1):
        os.rename(os.path.join(os.fsencode(str(d)), b"img001.png"), os.path.join(os.fsencode(str(d)), odd))
    e = env()
    e["PYTHONIOENCODING"] = "utf-8"  # strict: the escape must come from lpips-fast
    base = [sys.executable, "-m", "lpips_fast.cli", "dirs", str(d0), str(d1), "--state-dict", w["sd"], *COMMON]
    p = subprocess.run(base, env=e, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    lines = p.stdout.decode("utf-8").splitlines()  # valid UTF-8, every row there
    assert len(lines) == 4 and any(line.startswith("caf\\udce9.png,caf\\udce9.png,") for line in lines), lines
    # a file keeps the bytes as they are, and --resume reads them back: no duplicate row
    out = str(tmp_path / "o.csv")
    assert cli.main(["dirs", str(d0), str(d1), "-o", out, "--state-dict", w["sd"], *COMMON]) == 0
    assert odd + b"," + odd in open(out, "rb").read()
    assert cli.main(["dirs", str(d0), str(d1), "-o", out, "--resume", "--state-dict", w["sd"], *COMMON]) == 0
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and os.fsdecode(odd) in {r["path0"] for r in rows}
    jl = str(tmp_path / "o.jsonl")
    assert cli.main(["dirs", str(d0), str(d1), "-o", jl, "--state-dict", w["sd"], *COMMON]) == 0
    assert len(open(jl, encoding="utf-8").read().splitlines()) == 3  # JSON escapes it: valid UTF-8


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_writing_is_one_line_not_a_traceback(w, monkeypatch, capsys):
    import lpips_fast.dataset.writers as writers

    with pytest.raises(writers.OutputWriteError, match="No space left"):
        writers.RowWriter("/dev/full", "csv")
    monkeypatch.setattr(writers, "check_new_file", lambda *a, **k: None)  # as if the disk filled up later
    rc = cli.main(["dirs", w["d0"], w["d1"], "-o", "/dev/full", "--state-dict", w["sd"], *COMMON])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "No space left" in err and "--resume" in err, err
