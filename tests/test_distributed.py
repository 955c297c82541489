"""torchrun with two CPU processes (gloo) writes the same output as one process."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lpips_fast import cli
from lpips_fast.dataset.distributed import DistContext, shard, windows_per_rank
from test_data_helpers import env, make_dirs, make_flat_dir, reference_model, save_state_dict


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    d0, d1 = make_dirs(root)
    flat = os.path.join(root, "flat")
    make_flat_dir(flat, 9)
    with open(os.path.join(flat, "bad.png"), "wb") as f:
        f.write(b"not a png")
    ref, _ = reference_model()
    return {"root": root, "d0": d0, "d1": d1, "flat": flat, "sd": save_state_dict(ref, os.path.join(root, "sd.safetensors"))}


def _common(world):
    return ["--state-dict", world["sd"], "--workers", "0", "--device", "cpu", "--batch-size", "2", "-q"]


def _torchrun(world, *argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lpips_fast.cli", *argv, *_common(world)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    return p


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same(a, b):
    ra, rb = _rows(a), _rows(b)
    assert [(r["path0"], r["path1"], r["error"]) for r in ra] == [(r["path0"], r["path1"], r["error"]) for r in rb]
    for x, y in zip(ra, rb):
        if x["lpips"] or y["lpips"]:
            assert abs(float(x["lpips"]) - float(y["lpips"])) <= 1e-6


def test_sharding_rounds_cover_the_job_in_order():
    todo = list(range(23))
    for world in (1, 2, 3):
        parts = [shard(todo, DistContext(rank=r, world=world)) for r in range(world)]
        assert sorted(i for p in parts for i in p) == todo
        w = 4
        rounds = windows_per_rank(len(todo), w, DistContext(rank=0, world=world))
        assert all(-(-len(p) // w) <= rounds for p in parts)
        # round k of all ranks covers consecutive positions: rank-0 rows come out in job order
        seen = []
        for k in range(rounds):
            seen.extend(sorted(i for p in parts for i in p[k * w : (k + 1) * w]))
        assert seen == todo


def test_torchrun_two_processes_equal_one_with_resume(world, tmp_path):
    single = str(tmp_path / "single.csv")
    assert cli.main(["dirs", world["d0"], world["d1"], "-o", single, *_common(world)]) == 3
    # a run killed after four rows (and half a fifth): two ranks complete it
    multi = str(tmp_path / "multi.csv")
    with open(single) as f:
        lines = f.readlines()
    with open(multi, "w") as f:
        f.writelines(lines[:5])
        f.write(lines[5][:7])
    shutil.copyfile(single + ".lpips-run.json", multi + ".lpips-run.json")  # a killed run leaves its record
    p = _torchrun(world, "dirs", world["d0"], world["d1"], "-o", multi, "--resume", "--cache", str(tmp_path / "fc"))
    assert "summary: count=11 errors=5" in p.stdout, p.stdout + p.stderr[-3000:]
    assert "resumed=4" in p.stdout
    # counts summed over both ranks: the 3 pairs left to score (gray, rgba, sub/rocket) = 6 images
    assert "cache_hits=0 cache_misses=6" in p.stdout
    _same(single, multi)


def test_torchrun_allpairs_equal_one(world, tmp_path):
    s_out, s_mat = str(tmp_path / "s.csv"), str(tmp_path / "s.npy")
    assert cli.main(["allpairs", world["flat"], "-o", s_out, "--matrix", s_mat, *_common(world)]) == 3
    m_out, m_mat = str(tmp_path / "m.csv"), str(tmp_path / "m.npy")
    p = _torchrun(world, "allpairs", world["flat"], "-o", m_out, "--matrix", m_mat)
    assert "summary: count=37 errors=1" in p.stdout, p.stdout + p.stderr[-3000:]
    _same(s_out, m_out)
    a, b = np.load(s_mat), np.load(m_mat)
    assert a.shape == b.shape == (9, 9)
    assert np.abs(a - b).max() <= 1e-6
    assert open(s_mat[:-4] + ".paths.txt").read() == open(m_mat[:-4] + ".paths.txt").read()


_API_SCRIPT = """
import json, os, sys
import lpips_fast
from lpips_fast.dataset.evaluate import build_model
m = build_model(state_dict=sys.argv[3])
rows = lpips_fast.evaluate_dirs(sys.argv[1], sys.argv[2], model=m, device="cpu", batch_size=2, distributed=True)
with open(sys.argv[4] + os.environ["RANK"], "w") as f:
    json.dump([r.as_dict() for r in rows], f)
"""


def test_evaluate_api_under_torchrun(world, tmp_path):
    import json

    import lpips_fast
    from lpips_fast.dataset.evaluate import build_model

    script = tmp_path / "api.py"
    script.write_text(_API_SCRIPT)
    outp = str(tmp_path / "rank")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), world["d0"], world["d1"], world["sd"], outp]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = json.load(open(outp + "0")), json.load(open(outp + "1"))
    assert r1 == [] and len(r0) == 11
    single = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=build_model(state_dict=world["sd"]), device="cpu")
    for a, b in zip(r0, single):
        assert (a["path0"], a["error"]) == (b.path0, b.error)
        assert (a["lpips"] is None) == (b.lpips is None)
        if b.lpips is not None:
            assert abs(a["lpips"] - b.lpips) <= 1e-6
