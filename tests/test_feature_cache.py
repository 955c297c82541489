"""Feature cache: a second run skips the trunk, LRU bound, several processes, keys per trunk."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

import lpips_fast
from lpips_fast import cli
from lpips_fast.dataset.feature_cache import FeatureCache, feature_key, parse_size
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
    import lpips_fast.dataset.data as data

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
    from lpips_fast.dataset.feature_cache import model_fingerprint

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


# -- integrity: damaged shards, damaged index, orphans -------------------------------------------
def _flip_data_bytes(path):
    """Flip bytes inside a safetensors file's tensor data (the header stays valid, same size)."""
    import struct

    raw = bytearray(open(path, "rb").read())
    start = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    for pos in range(start + 3, len(raw), max(1, (len(raw) - start) // 7)):
        raw[pos] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bytes(raw))


def test_flipped_shard_bytes_are_a_miss_and_recomputed(world, tmp_path):
    model = world["ours"]
    cache = str(tmp_path / "fc")
    first = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
    c = FeatureCache(cache)
    for name in os.listdir(c.shard_dir):
        _flip_data_bytes(os.path.join(c.shard_dir, name))
    seen, h = _count_trunk(model)
    try:
        with pytest.warns(RuntimeWarning, match="integrity check"):
            again = lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
    finally:
        h.remove()
    assert sum(seen) == 12  # every entry was damaged: all recomputed
    for a, b in zip(first, again):
        assert (a.path0, a.error) == (b.path0, b.error)
        if a.lpips is not None:
            assert abs(a.lpips - b.lpips) <= 1e-6
    seen, h = _count_trunk(model)
    try:
        lpips_fast.evaluate_dirs(world["d0"], world["d1"], model=model, cache=cache, batch_size=4)
    finally:
        h.remove()
    assert sum(seen) == 0  # the recomputed entries are good hits again


def test_one_damaged_entry_is_dropped_the_rest_hit(tmp_path):
    c = FeatureCache(str(tmp_path / "c"))
    c.put_many({"a": _feats(0), "b": _feats(1)})
    (shard,) = os.listdir(c.shard_dir)
    import json
    import struct

    raw = bytearray(open(os.path.join(c.shard_dir, shard), "rb").read())
    n = struct.unpack("<Q", bytes(raw[:8]))[0]
    lo, _ = json.loads(bytes(raw[8 : 8 + n]))["b.0"]["data_offsets"]
    raw[8 + n + lo + 5] ^= 0x01  # one bit of entry b
    open(os.path.join(c.shard_dir, shard), "wb").write(bytes(raw))
    c2 = FeatureCache(c.root)
    with pytest.warns(RuntimeWarning, match="1 cached feature entry failed"):
        got = c2.get_many(["a", "b"])
    assert set(got) == {"a"} and torch.equal(got["a"][0], _feats(0)[0])
    assert len(c2) == 1 and c2.dropped_entries == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_index_is_rebuilt(tmp_path, damage):
    root = str(tmp_path / "c")
    c = FeatureCache(root)
    for k in range(40):
        c.put_many({f"k{k}": _feats(k)})
    c.close()
    index = os.path.join(root, "index.sqlite")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(index + suffix):
            os.unlink(index + suffix)
    if damage == "garbage":
        open(index, "wb").write(b"this is not a database\n" * 200)
    else:
        size = os.path.getsize(index)
        with open(index, "r+b") as f:
            f.truncate(size // 3)
    with pytest.warns(RuntimeWarning, match="index"):
        c2 = FeatureCache(root)
        got = c2.get_many([f"k{k}" for k in range(40)])
    for k, v in got.items():  # whatever survived is intact
        assert torch.equal(v[1], _feats(int(k[1:]))[1])
    c2.put_many({"new": _feats(99)})
    assert torch.equal(c2.get_many(["new"])["new"][0], _feats(99)[0])
    assert any(n.startswith("index.sqlite.corrupt-") for n in os.listdir(root))
    # the shards of the lost index were orphans: evicted
    listed = {r[0] for r in c2._connect().execute("SELECT name FROM shards")}
    assert set(os.listdir(c2.shard_dir)) == listed


def test_orphaned_shards_are_evicted(tmp_path):
    c = FeatureCache(str(tmp_path / "c"))
    c.put_many({"a": _feats(0)})
    old = os.path.join(c.shard_dir, "0" * 32 + ".safetensors")
    fresh = os.path.join(c.shard_dir, "1" * 32 + ".safetensors")
    for p in (old, fresh):
        open(p, "wb").write(b"left behind by a crash")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    c2 = FeatureCache(c.root)
    assert not os.path.exists(old) and os.path.exists(fresh)  # a fresh one may be a writer's, not yet committed
    assert set(c2.get_many(["a"])) == {"a"}
    assert c2.evict_orphans(min_age_s=0) == 1 and not os.path.exists(fresh)


def test_entries_without_a_checksum_are_silent_misses(tmp_path, recwarn):
    import sqlite3

    c = FeatureCache(str(tmp_path / "c"))
    c.put_many({"a": _feats(0), "b": _feats(1)})
    c.close()
    con = sqlite3.connect(os.path.join(c.root, "index.sqlite"))
    con.execute("UPDATE entries SET digest=NULL WHERE key='a'")  # as an index written before checksums
    con.commit()
    con.close()
    c2 = FeatureCache(c.root)
    assert set(c2.get_many(["a", "b"])) == {"b"} and len(c2) == 1
    assert not [w for w in recwarn if "feature cache" in str(w.message)]
    c2.put_many({"a": _feats(0)})
    assert torch.equal(c2.get_many(["a"])["a"][0], _feats(0)[0])
