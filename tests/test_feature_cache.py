"""Feature cache: a second run skips the trunk, LRU bound, several processes, keys per trunk."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

import lpips_fast
from lpips_fast import cli
from lpips_fast.feature_cache import FeatureCache, feature_key, parse_size
from test_data_helpers import make_dirs, reference_model, save_state_dict


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    d0, d1 = make_dirs(root)
    ref, ours = reference_model()
    return {"root": root, "d0": d0, "d1": d1, "ours": ours, "sd": save_state_dict(ref, os.path.join(root, "sd.safetensors"))}


def _count_trunk(model):
    seen = []
    h = model.net.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    return seen, h


def test_second_run_skips_the_trunk(world, tmp_path, monkeypatch):
    import lpips_fast.data as data

    decodes = []
    real_decode = data.decode_bytes
    monkeypatch.setattr(data, "decode_bytes", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    model = world["ours"]
    cache = str(tmp_path / "fc")
    seen, h = _count_trunk(model)
    try:
        t0 = time.perf_counter()
        first = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
        t1 = time.perf_counter()
        n_first = sum(seen)
        seen.clear()
        n_decodes = len(decodes)
        decodes.clear()
        second = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
        t2 = time.perf_counter()
        n_second = sum(seen)
    finally:
        h.remove()
    assert n_first == 12  # 6 scoreable pairs, two images each
    assert n_second == 0
    # Cached files are not even decoded (their header is read): the first run decodes 17 of the 18
    # files (d0/corrupt.png repeats astronaut.png's bytes, cached a window earlier); the second
    # only the 4 whose features were never computed (corrupt, truncated, both mismatch.png).
    assert (n_decodes, len(decodes)) == (17, 4)
    # Same rows and errors; values equal to float32 rounding (the trunk's channels_last convolutions
    # round differently with the batch's composition, and cached features come back NCHW).
    assert [(r.path0, r.error) for r in first] == [(r.path0, r.error) for r in second]
    for a, b in zip(first, second):
        assert (a.lpips is None) == (b.lpips is None)
        if a.lpips is not None:
            assert abs(a.lpips - b.lpips) <= 1e-6
    print(f"cache: first run {t1 - t0:.3f}s, second run {t2 - t1:.3f}s (trunk skipped)")
    # ref: the reference's features come from the cache too
    seen, h = _count_trunk(model)
    try:
        lpips_fast.evaluate_ref(os.path.join(world["d0"], "astronaut.png"), world["d0"], model=model, cache=cache)
    finally:
        h.remove()
    # d0 holds byte-identical copies (corrupt.png = astronaut.png, truncated.png = chelsea.png,
    # only0.png = sub/rocket.png): keyed by content, only mismatch.png is new to the cache
    assert sum(seen) == 1
    assert len(FeatureCache(cache)) == 13


def test_cli_cache_hits_in_summary(world, tmp_path, capsys):
    cache = str(tmp_path / "fc")
    args = ["dirs", world["d0"], world["d1"], "--state-dict", world["sd"], "--workers", "0", "--device", "cpu", "--cache", cache]
    assert cli.main(args + ["-o", str(tmp_path / "a.csv")]) == 3
    assert "cache_hits=0 cache_misses=12" in capsys.readouterr().out
    assert cli.main(args + ["-o", str(tmp_path / "b.csv")]) == 3
    assert "cache_hits=12 cache_misses=0" in capsys.readouterr().out
    rows_a = open(tmp_path / "a.csv").read().splitlines()
    rows_b = open(tmp_path / "b.csv").read().splitlines()
    assert len(rows_a) == len(rows_b) and rows_a[0] == rows_b[0]
    for a, b in zip(rows_a[1:], rows_b[1:]):  # path0,path1,lpips,error
        pa, pb = a.split(",", 3), b.split(",", 3)
        assert pa[:2] == pb[:2] and pa[3] == pb[3]
        assert (pa[2] == "") == (pb[2] == "")
        if pa[2]:
            assert abs(float(pa[2]) - float(pb[2])) <= 1e-6  # float32 rounding, see above


def test_key_depends_on_trunk_dtype_size_and_version(world):
    from lpips_fast.feature_cache import model_fingerprint

    _, other = reference_model()
    fp = model_fingerprint(world["ours"])
    assert fp == model_fingerprint(other)
    with torch.no_grad():
        other.net.slice1[0].weight.add_(1e-3)
    assert fp != model_fingerprint(other)
    k = feature_key("abc", "alex", "0.1", (48, 64), torch.float32, fp)
    assert k != feature_key("abc", "alex", "0.1", (48, 64), torch.float16, fp)
    assert k != feature_key("abc", "alex", "0.0", (48, 64), torch.float32, fp)
    assert k != feature_key("abc", "alex", "0.1", (64, 48), torch.float32, fp)
    assert k != feature_key("abd", "alex", "0.1", (48, 64), torch.float32, fp)
    assert parse_size("10G") == 10 * 1024**3 and parse_size("512k") == 512 * 1024


def _feats(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, 4, generator=g), torch.randn(16, 2, 2, generator=g)]


def test_lru_eviction_keeps_the_bound(tmp_path):
    c = FeatureCache(str(tmp_path / "c"), max_bytes=4096)  # two shards of two entries (~1.8 kB each) fit, three do not
    c.put_many({"a": _feats(0), "b": _feats(1)})
    time.sleep(0.01)
    c.put_many({"c": _feats(2), "d": _feats(3)})
    time.sleep(0.01)
    assert set(c.get_many(["a"])) == {"a"}  # touch the first shard: now the second is the oldest
    time.sleep(0.01)
    c.put_many({"e": _feats(4), "f": _feats(5)})
    assert c.total_bytes() <= 4096
    got = c.get_many(["a", "b", "c", "d", "e", "f"])
    assert {"e", "f"} <= set(got) and not {"c", "d"} & set(got)
    assert torch.equal(got["e"][1], _feats(4)[1])
    assert len(os.listdir(os.path.join(c.root, "shards"))) == len(c._connect().execute("SELECT name FROM shards").fetchall())


def test_vanished_shard_is_a_miss(tmp_path):
    c = FeatureCache(str(tmp_path / "c"))
    c.put_many({"a": _feats(0)})
    for f in os.listdir(c.shard_dir):
        os.unlink(os.path.join(c.shard_dir, f))
    assert c.get_many(["a"]) == {}


def _writer(root, wid, n):
    c = FeatureCache(root, max_bytes=1 << 30)
    for k in range(n):
        c.put_many({f"w{wid}-{k}": _feats(wid * 100 + k), f"shared-{k}": _feats(k)})
        c.get_many([f"shared-{(k + 3) % n}", f"w{1 - wid}-{k}"])
    c.close()


def test_several_processes_share_a_cache(tmp_path):
    root = str(tmp_path / "c")
    FeatureCache(root)
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_writer, args=(root, w, 15)) for w in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    c = FeatureCache(root)
    keys = [f"w{w}-{k}" for w in range(2) for k in range(15)] + [f"shared-{k}" for k in range(15)]
    got = c.get_many(keys)
    assert set(got) == set(keys)
    for k in range(15):
        assert torch.equal(got[f"w1-{k}"][0], _feats(100 + k)[0])
        assert torch.equal(got[f"shared-{k}"][1], _feats(k)[1])


def test_hit_evicted_after_the_probe_is_decoded_again(world, tmp_path):
    """Workers skip decoding cached files; if the shard is gone by scoring time, decode then."""
    model = world["ours"]
    cache = str(tmp_path / "fc")
    first = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
    c = FeatureCache(cache)
    for f in os.listdir(c.shard_dir):  # the index still lists them: the probe says "cached"
        os.unlink(os.path.join(c.shard_dir, f))
    seen, h = _count_trunk(model)
    try:
        again = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
    finally:
        h.remove()
    assert sum(seen) == 12
    assert [(r.path0, r.lpips, r.error) for r in first] == [(r.path0, r.lpips, r.error) for r in again]
