"""Named lin-weight sets: round trip, versions, hash refusal, reference .pth conversion, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lpips_fast
from lpips_fast.weights import registry
from lpips_fast.weights import WeightsIntegrityError, WeightsNotFoundError, lin_state_dict

ALEX = (64, 192, 384, 256, 256)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _random_lin(seed: int, key_fmt: str = "lin{k}.model.1.weight") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key_fmt.format(k=k): torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(ALEX)}


def _model(**kw):
    torch.manual_seed(0)
    return lpips_fast.LPIPS(net="alex", pnet_rand=True, **kw)


def test_round_trip_into_lpips(tmp_path, home, monkeypatch):
    sd = _random_lin(1)
    save_file(sd, tmp_path / "mine.safetensors")
    e = registry.register("mine", tmp_path / "mine.safetensors", net="alex", version="0.1", note="trained on X")
    assert (e.name, e.number, e.spec, e.net, e.version, e.note) == ("mine", 1, "mine@1", "alex", "0.1", "trained on X")
    assert e.path.startswith(str(home / "models" / "mine"))
    assert len(e.sha256) == 64 and e.created and e.source.endswith("mine.safetensors")
    m = _model(lin="mine")
    for k in range(5):
        assert torch.equal(m.lins[k].weight, sd[f"lin{k}.model.1.weight"])
    # a model built with the weights given directly scores the same
    x, y = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    ref = _model(model_path=str(tmp_path / "mine.safetensors"))
    monkeypatch.undo()  # the usual home again: its cached C++ kernel build (a new home rebuilds it, ~60 s)
    with torch.no_grad():
        assert torch.equal(m(x, y), ref(x, y))


def test_versions_increase_and_pin(tmp_path):
    for seed in (1, 2, 3):
        save_file(_random_lin(seed), tmp_path / f"w{seed}.safetensors")
        e = registry.register("mine", tmp_path / f"w{seed}.safetensors", net="alex")
        assert e.number == seed
    assert registry.resolve("mine").number == 3
    sd1, e1 = registry.load("mine@1")
    assert e1.number == 1 and torch.equal(sd1["lin0.model.1.weight"], _random_lin(1)["lin0.model.1.weight"])
    sd3, _ = registry.load("mine")
    assert torch.equal(sd3["lin0.model.1.weight"], _random_lin(3)["lin0.model.1.weight"])
    with pytest.raises(WeightsNotFoundError, match=r"versions \[1, 2, 3\], got @4"):
        registry.resolve("mine@4")
    specs = [s.spec for s in registry.list_sets()]
    assert specs[: len(registry.PACKAGED)] == [f"{p}@1" for p in registry.PACKAGED]
    assert specs[len(registry.PACKAGED):] == ["mine@1", "mine@2", "mine@3"]


def test_modified_file_is_refused(tmp_path):
    save_file(_random_lin(1), tmp_path / "w.safetensors")
    e = registry.register("mine", tmp_path / "w.safetensors", net="alex")
    # replace the stored tensors with other, valid ones: only the hash can tell
    save_file(_random_lin(2), e.path)
    with pytest.raises(WeightsIntegrityError, match="mine@1.*sha256.*recorded at registration"):
        registry.load("mine")
    with pytest.raises(WeightsIntegrityError):
        _model(lin="mine")
    rows = {r["name"]: r for r in registry.inventory()}
    assert rows["mine@1"]["status"] == "bad" and rows["alex-v0.1@1"]["status"] == "ok"


def test_reference_pth_registers_after_conversion(tmp_path):
    # the reference's use_dropout=False spelling (model.0) in a torch zip checkpoint
    sd = _random_lin(4, "lin{k}.model.0.weight")
    torch.save(sd, tmp_path / "ref.pth")
    e = registry.register("ref", tmp_path / "ref.pth", net="alex", version="0.0")
    assert e.path.endswith(".safetensors")
    got, _ = registry.load("ref")
    assert sorted(got) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert torch.equal(got["lin2.model.1.weight"], sd["lin2.model.0.weight"])
    # a pickle of arbitrary objects is refused (weights_only=True)
    torch.save({"lin0.model.1.weight": object()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        registry.register("evil", tmp_path / "evil.pth", net="alex")
    assert not any(s.name == "evil" and not s.packaged for s in registry.list_sets())


def test_packaged_sets_and_bad_input(tmp_path):
    sd, e = registry.load("vgg-v0.0")
    assert e.packaged and e.net == "vgg" and e.version == "0.0"
    assert torch.equal(sd["lin4.model.1.weight"], lin_state_dict("vgg", "0.0")["lin4.model.1.weight"])
    m = _model(lin="alex-v0.0", version="0.0")
    assert torch.equal(m.lins[0].weight, lin_state_dict("alex", "0.0")["lin0.model.1.weight"])
    with pytest.raises(ValueError, match="packaged lin set"):
        registry.register("alex-v0.1", tmp_path / "x.safetensors", net="alex")
    with pytest.raises(ValueError, match="version='0.0'"):
        _model(lin="alex-v0.0")  # model version 0.1
    with pytest.raises(ValueError, match="holds vgg weights"):
        _model(lin="vgg-v0.1")
    with pytest.raises(WeightsNotFoundError, match="no lin set named 'nope'.*weights register"):
        registry.resolve("nope")
    with pytest.raises(ValueError, match="name"):
        registry.resolve("../etc@1")
    save_file(_random_lin(1), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="expected .*squeeze|do not hold|does not hold"):
        registry.register("sq", tmp_path / "w.safetensors", net="squeeze")


def test_cli_register_and_list(tmp_path, capsys):
    from lpips_fast.cli import main

    torch.save(_random_lin(5), tmp_path / "w.pth")
    assert main(["weights", "register", "cli-set", str(tmp_path / "w.pth"), "--net", "alex", "--note", "n"]) == 0
    assert "registered cli-set@1" in capsys.readouterr().out
    assert main(["weights", "register", "cli-set", str(tmp_path / "w.pth"), "--net", "alex", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"] == "cli-set@2"
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sets = {r["name"]: r for r in rows if r["kind"] == "lin-set"}
    assert {"cli-set@1", "cli-set@2", "alex-v0.1@1"} <= set(sets)
    assert sets["cli-set@1"]["status"] == "ok" and sets["cli-set@1"]["note"] == "n"
    assert main(["weights", "register", "x", str(tmp_path / "missing.pth"), "--net", "alex"]) == 2
    assert "does not exist" in capsys.readouterr().err
