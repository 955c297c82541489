"""Registered lin-weight sets by name on the dataset layer: ``--lin NAME`` (``EvalOptions.lin``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lpips_fast
from lpips_fast import cli
from lpips_fast.weights import registry
from lpips_fast.dataset.evaluate import evaluate_specs, pair_specs
from lpips_fast.dataset.options import EvalOptions

ALEX = (64, 192, 384, 256, 256)
PAIR = ("examples/clean/cat.png", "examples/distorted/cat.png")


@pytest.fixture
def home(tmp_path, monkeypatch):
    lpips_fast.ops.build_cpu_extension()  # loaded from the usual home before it moves
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _score(lin=None):
    return evaluate_specs(pair_specs([PAIR]), EvalOptions(net="alex", lin=lin, random_trunk=True))


def _register(tmp_path, name, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(ALEX)}
    save_file(sd, tmp_path / f"{name}{seed}.safetensors")
    return registry.register(name, tmp_path / f"{name}{seed}.safetensors", net="alex", version="0.1")


def test_evaluate_pairs_with_a_registered_name(tmp_path, home):
    _register(tmp_path, "mine", 1)
    rows = _score("mine")
    direct = _score(str(tmp_path / "mine1.safetensors"))
    assert rows[0].error is None and rows[0].lpips == direct[0].lpips
    plain = _score()
    assert plain[0].lpips != rows[0].lpips
    # a new version under the same name is a new model (not a stale cached one)
    _register(tmp_path, "mine", 2)
    again, pinned = _score("mine"), _score("mine@1")
    assert again[0].lpips != rows[0].lpips and pinned[0].lpips == rows[0].lpips


def test_cli_lin_name_and_unknown_name(tmp_path, home, capsys):
    _register(tmp_path, "mine", 1)
    assert cli.main(["pair", *PAIR, "--lin", "mine@1", "--random-trunk", "-q"]) == 0
    assert cli.main(["pair", *PAIR, "--lin", "nosuchset", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lin" in err[0] and "nosuchset" in err[0] and "weights list" in err[0]
