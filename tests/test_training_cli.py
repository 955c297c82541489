"""``lpips-fast synth / eval / train``: outputs, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json
import os

import pytest

from lpips_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = os.path.join(ROOT, "examples", "clean")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["synth", "2afc", str(root / "a"), "--sources", SOURCES, "--n", "20", "--seed", "0"]) == 0
    assert main(["synth", "2afc", str(root / "b"), "--sources", SOURCES, "--n", "12", "--seed", "1",
                 "--teacher-lin", "sparse", "--max-gap", "0.5"]) == 0
    assert main(["synth", "jnd", str(root / "j"), "--sources", SOURCES, "--n", "16", "--temperature", "0.05"]) == 0
    return root


def test_eval_table_and_json(folders, capsys, tmp_path):
    from lpips_fast import LPIPS
    from lpips_fast.training import score_2afc

    out = tmp_path / "s.json"
    rc = main(["eval", "2afc", str(folders / "a"), str(folders / "b"), "--json", str(out), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2AFC" in text and "all" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [20, 12, 32]
    # The teacher of folder a (alex v0.1, hard judgments) agrees with itself everywhere.
    assert rows[0]["score"] == 1.0
    assert rows[1]["score"] == pytest.approx(score_2afc(LPIPS(net="alex"), folders / "b"), abs=1e-12)
    assert main(["eval", "jnd", str(folders / "j"), "--json", "-", "-q"]) == 0
    js = capsys.readouterr().out
    assert json.loads(js[js.index("{"):])["rows"][0]["mode"] == "jnd"


def test_train_writes_a_loadable_file_and_resumes(folders, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["train", str(folders / "a"), "--epochs", "1", "--decay-epochs", "1", "--batch-size", "8",
            "--out", str(out), "--val", str(folders / "b"), "-q"]
    assert main(args) == 0
    assert "on --val" in capsys.readouterr().out
    assert out.exists() and (tmp_path / "m.safetensors.ckpt").exists()
    assert main(["eval", "2afc", str(folders / "b"), "--lin", str(out), "-q"]) == 0
    # Rerun: the checkpoint is complete, nothing to train, the same weights and metadata again.
    from safetensors import safe_open

    def read():
        with safe_open(out, "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    md0, w0 = read()
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().err
    md1, w1 = read()
    assert md1 == md0 and w1.keys() == w0.keys()
    assert all((w1[k] == w0[k]).all() for k in w0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "2afc", "/nonexistent/bapps"], "does not exist"),
        (["eval", "jnd", "{a}"], "missing sub-folder"),
        (["train", "{a}", "--out", "/tmp/x.pth"], "--out: got '/tmp/x.pth', expected a file name ending in .safetensors"),
        (["train", "{a}", "--out", "/tmp/x.safetensors", "--init", "nope"], "init: got 'nope'"),
        (["synth", "jnd", "/tmp/x", "--sources", SOURCES, "--max-gap", "0.5"], "--max-gap"),
    ],
)
def test_errors_are_one_line_with_status_2(folders, capsys, argv, message):
    argv = [a.replace("{a}", str(folders / "a")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_train_feature_cache_without_room_is_one_line_exit_2(folders, tmp_path, monkeypatch, capsys):
    from lpips_fast.training import trainer

    monkeypatch.setattr(trainer, "free_memory", lambda device: 0)
    monkeypatch.setattr(trainer, "free_disk", lambda path: 0)
    rc = main(["train", str(folders / "a"), "--epochs", "1", "--decay-epochs", "0", "--out",
               str(tmp_path / "w.safetensors"), "--feature-dir", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "feature cache" in err[-1] and "--no-cache" in err[-1], err
    assert not (tmp_path / "w.safetensors").exists()
