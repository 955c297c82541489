"""all_pairs as one GEMM: exact vs the reference's pairwise LPIPS, symmetric, zero diagonal; CLI allpairs."""

from __future__ import annotations

import csv
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast import cli
from lpips_fast.dataset.pairwise import sample_pairs
from test_data_helpers import distort, make_flat_dir, photos, reference_model, save_state_dict


def _ref_pairwise(ref, x):
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = ref(x[i], x[j]).flatten()
    return i, j, d


@pytest.fixture(scope="module")
def imgs():
    ph = photos(6, (64, 64))
    arrs = ph + [distort(p, k) for k, p in enumerate(ph)]
    return np.stack(arrs)  # 12 x 64 x 64 x 3


def test_all_pairs_exact_vs_reference(imgs):
    ref, ours = reference_model()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    D = lpips_fast.all_pairs(x, model=ours, block_size=5)
    n = x.shape[0]
    assert D.shape == (n, n) and D.dtype == torch.float32
    assert torch.equal(D, D.T)
    assert torch.all(D.diag() == 0)
    i, j, d = _ref_pairwise(ref, x)
    assert (D[i, j] - d).abs().max().item() < 1e-5
    # same from uint8 arrays, a uint8 tensor and unblocked
    D2 = lpips_fast.all_pairs(list(imgs), model=ours)
    D3 = lpips_fast.all_pairs(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), model=ours)
    assert (D2 - D).abs().max() < 1e-6 and (D3 - D).abs().max() < 1e-6
    # [0, 1] inputs with normalize=True
    D4 = lpips_fast.all_pairs((x + 1) / 2, model=ours, normalize=True)
    assert (D4 - D).abs().max() < 1e-5


def test_all_pairs_baseline_and_version_00(imgs):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_pair

    x = torch.from_numpy(imgs[:6]).permute(0, 3, 1, 2).float() / 127.5 - 1
    for kw in ({"lpips_on": False}, {"version": "0.0"}):
        ref, ours = make_pair("alex", **kw)
        D = lpips_fast.all_pairs(x, model=ours)
        i, j, d = _ref_pairwise(ref, x)
        assert (D[i, j] - d).abs().max().item() < 1e-5, kw


def test_all_pairs_from_a_directory_and_errors(tmp_path, imgs):
    ref, ours = reference_model()
    from PIL import Image

    for k, a in enumerate(imgs[:5]):
        Image.fromarray(a).save(tmp_path / f"{k}.png")
    D = lpips_fast.all_pairs(str(tmp_path), model=ours)
    Dx = lpips_fast.all_pairs(list(imgs[:5]), model=ours)
    assert (D - Dx).abs().max() < 1e-6
    # memmap output (when the matrix does not fit in memory)
    mm = np.lib.format.open_memmap(str(tmp_path / "m.npy"), mode="w+", dtype=np.float32, shape=(5, 5))
    lpips_fast.all_pairs(str(tmp_path), model=ours, out=mm, block_size=2)
    assert np.abs(mm - D.numpy()).max() < 1e-6
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.png"):
        lpips_fast.all_pairs(str(tmp_path), model=ours)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ap"))
    d = os.path.join(root, "imgs")
    make_flat_dir(d, 10)
    # an odd-size image and a corrupt one: error rows, not a failed run
    make_flat_dir(os.path.join(root, "odd"), 1, size=(40, 64))
    shutil.copy(os.path.join(root, "odd", "img000.png"), os.path.join(d, "odd.png"))
    with open(os.path.join(d, "zz_corrupt.png"), "wb") as f:
        f.write(b"garbage")
    ref, ours = reference_model()
    return {"dir": d, "sd": save_state_dict(ref, os.path.join(root, "sd.safetensors")), "ref": ref, "ours": ours}


def _run(folder, *argv):
    return cli.main([*argv, "--state-dict", folder["sd"], "--workers", "0", "--device", "cpu"])


def test_cli_allpairs_matrix_rows_and_sampled_pairs(folder, tmp_path, capsys):
    out, mat = str(tmp_path / "all.csv"), str(tmp_path / "m.npy")
    assert _run(folder, "allpairs", folder["dir"], "-o", out, "--matrix", mat, "--batch-size", "4") == 3
    text = capsys.readouterr().out
    assert "diversity:" in text and "count=47 errors=2" in text  # 45 pairs of 10 images + 2 bad images
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    errs = {r["path0"]: r["error"] for r in rows if r["error"]}
    assert set(errs) == {"odd.png", "zz_corrupt.png"}
    assert "differs from the most common size" in errs["odd.png"]
    M = np.load(mat)
    paths = open(mat[:-4] + ".paths.txt").read().split()
    assert M.shape == (10, 10) and len(paths) == 10 and "odd.png" not in paths
    assert np.array_equal(M, M.T) and (np.diag(M) == 0).all()
    good = [r for r in rows if not r["error"]]
    assert len(good) == 45
    for r in good:
        assert abs(float(r["lpips"]) - M[paths.index(r["path0"]), paths.index(r["path1"])]) < 1e-7
    # values vs the reference pairwise LPIPS on the decoded pixels
    from test_data_helpers import ref_distance

    for r in good[::9]:
        want = ref_distance(folder["ref"], os.path.join(folder["dir"], r["path0"]), os.path.join(folder["dir"], r["path1"]))
        assert abs(float(r["lpips"]) - want) < 1e-5

    # N random distinct pairs: a subset of the same values, reproducible from the seed
    sp = str(tmp_path / "some.csv")
    assert _run(folder, "allpairs", folder["dir"], "--pairs", "20", "--seed", "3", "-o", sp) == 3
    with open(sp, newline="") as f:
        some = [r for r in csv.DictReader(f) if not r["error"]]
    assert len(some) == 20 and len({(r["path0"], r["path1"]) for r in some}) == 20
    for r in some:
        assert r["path0"] < r["path1"]
        assert abs(float(r["lpips"]) - M[paths.index(r["path0"]), paths.index(r["path1"])]) < 1e-6
    sp2 = str(tmp_path / "some2.csv")
    _run(folder, "allpairs", folder["dir"], "--pairs", "20", "--seed", "3", "-o", sp2)
    assert open(sp).read() == open(sp2).read()
    capsys.readouterr()
    assert _run(folder, "allpairs", folder["dir"], "--pairs", "1000") == 2


def test_sample_pairs_are_distinct_and_in_range():
    for n, k in ((5, 10), (50, 7), (200, 5000)):
        i, j = sample_pairs(n, k, seed=1)
        assert len(i) == k and (i < j).all() and (j < n).all() and (i >= 0).all()
        assert len(set(zip(i.tolist(), j.tolist()))) == k


def test_lpips_fast_all_pairs_is_the_function_after_importing_its_module():
    """The GEMM lives in ``lpips_fast.pairwise``; importing it leaves ``lpips_fast.all_pairs`` the function."""
    import importlib

    mod = importlib.import_module("lpips_fast.dataset.pairwise")
    assert lpips_fast.all_pairs is mod.all_pairs
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    ref, ours = reference_model()
    assert torch.equal(lpips_fast.all_pairs(x, model=ours), mod.all_pairs(x, model=ours))
