"""The dataset commands read the same layered settings as the Scorer and serve:
defaults < TOML file (--config, or [tool.lpips-fast] in a pyproject.toml upward) < LPIPS_FAST_* < flags."""

from __future__ import annotations

import json
import os

import pytest

from lpips_fast import cli
from lpips_fast.dataset.options import EvalOptions, default_workers
from lpips_fast.deploy.settings import SettingsError, load_settings
from lpips_fast.dataset.writers import settings_path
from test_data_helpers import make_flat_dir, reference_model, save_state_dict

COMMON = ["--device", "cpu", "--workers", "0", "-q"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    d0, d1 = str(root / "d0"), str(root / "d1")
    make_flat_dir(d0, 3)
    make_flat_dir(d1, 3)
    for k in range(3):  # the same photos in another order: no pair is identical
        os.rename(os.path.join(d1, f"img{k:03d}.png"), os.path.join(d1, f"tmp{(k + 1) % 3:03d}.png"))
    for k in range(3):
        os.rename(os.path.join(d1, f"tmp{k:03d}.png"), os.path.join(d1, f"img{k:03d}.png"))
    ref, _ = reference_model()
    sd = save_state_dict(ref, str(root / "sd.safetensors"))
    return {"root": root, "d0": d0, "d1": d1, "sd": sd}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LPIPS_FAST_* settings from the caller's shell, and a working directory without a pyproject.toml."""
    for var in list(os.environ):
        if var.startswith("LPIPS_FAST_") and var != "LPIPS_FAST_HOME":
            monkeypatch.delenv(var)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return monkeypatch


def _run(w, tmp_path, *extra, name="o.csv"):
    out, metrics = str(tmp_path / name), str(tmp_path / (name + ".metrics.json"))
    for p in (out, metrics, settings_path(out)):
        if os.path.exists(p):
            os.remove(p)
    rc = cli.main(["dirs", w["d0"], w["d1"], "-o", out, "--metrics-json", metrics, *extra])
    assert rc == 0
    with open(settings_path(out)) as f:
        recorded = json.load(f)
    with open(metrics) as f:
        return recorded, json.load(f)


def _recorded(sidecar: dict, key: str):
    """A setting recorded in the resume sidecar (flat, or under 'settings')."""
    return sidecar.get("settings", sidecar)[key]


def test_env_sets_the_batch_size_and_a_flag_overrides_it(w, tmp_path, clean_env):
    clean_env.setenv("LPIPS_FAST_EVAL_BATCH_SIZE", "2")
    _, m = _run(w, tmp_path, "--state-dict", w["sd"], *COMMON)
    assert m["batch_size"]["initial"] == 2
    _, m = _run(w, tmp_path, "--state-dict", w["sd"], *COMMON, "--batch-size", "1")
    assert m["batch_size"]["initial"] == 1
    _, m = _run(w, tmp_path, "--state-dict", w["sd"], *COMMON, "--set", "eval.batch_size=3")
    assert m["batch_size"]["initial"] == 3


def test_file_then_env_then_flag(w, tmp_path, clean_env):
    cfg = tmp_path / "lpips-fast.toml"
    sd_rel = os.path.relpath(w["sd"], tmp_path)  # relative paths in a file are relative to the file
    cfg.write_text(f'[model]\nstate_dict = "{sd_rel}"\n\n[eval]\nresize = "40x48"\nbatch_size = 2\n'
                   'device = "cpu"\nworkers = 0\n')
    side, m = _run(w, tmp_path, "--config", str(cfg), "-q")
    assert _recorded(side, "resize") == "40x48" and m["batch_size"]["initial"] == 2
    assert _recorded(side, "state_dict") == os.path.abspath(w["sd"])
    clean_env.setenv("LPIPS_FAST_EVAL_RESIZE", "36x36")
    side, _ = _run(w, tmp_path, "--config", str(cfg), "-q")
    assert _recorded(side, "resize") == "36x36"
    side, _ = _run(w, tmp_path, "--config", str(cfg), "-q", "--resize", "32x32")
    assert _recorded(side, "resize") == "32x32"
    # the file's scores equal the flags-only run's
    a = open(tmp_path / "o.csv").read()
    assert ",0.0," not in a and ",0," not in a
    _run(w, tmp_path, "--state-dict", w["sd"], *COMMON, "--resize", "32x32", "--batch-size", "2", name="flags.csv")
    assert a == open(tmp_path / "flags.csv").read()


def test_pyproject_found_upward(w, tmp_path, clean_env):
    proj = tmp_path / "proj"
    (proj / "sub" / "deeper").mkdir(parents=True)
    (proj / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.lpips-fast.eval]\nbatch_size = 1\n'
                                         'resize = "34x34"\n')
    clean_env.chdir(proj / "sub" / "deeper")
    side, m = _run(w, tmp_path, "--state-dict", w["sd"], *COMMON)
    assert m["batch_size"]["initial"] == 1 and _recorded(side, "resize") == "34x34"


def _refused(capsys, argv, monkeypatch) -> str:
    from lpips_fast.dataset.features import FeatureSource

    def forbidden(*a, **k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(FeatureSource, "from_options", classmethod(forbidden))
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


@pytest.mark.parametrize("var,value,says", [
    ("LPIPS_FAST_EVAL_BATCH_SIZE", "0", "expected an integer >= 1"),
    ("LPIPS_FAST_EVAL_RESIZE", "32by32", "expected HxW"),
    ("LPIPS_FAST_EVAL_ENGINE", "maybe", "one of auto, on, off"),
    ("LPIPS_FAST_MODEL_NET", "alexnet", "did you mean 'alex'"),
    ("LPIPS_FAST_EVAL_BATCHSIZE", "4", "did you mean eval.batch_size"),
])
def test_bad_env_value_is_one_line_naming_the_variable(w, tmp_path, clean_env, capsys, var, value, says):
    clean_env.setenv(var, value)
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], "--state-dict", w["sd"], *COMMON], clean_env)
    assert line.startswith("lpips-fast dirs: error:") and f"env {var}" in line and says in line, line


def test_bad_file_key_names_the_file_and_line(w, tmp_path, clean_env, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[eval]\nbatch_size = 4\ncache_max_size = "lots"\n')
    line = _refused(capsys, ["pair", os.path.join(w["d0"], "img000.png"), os.path.join(w["d1"], "img000.png"),
                             "--config", str(cfg), "--state-dict", w["sd"], *COMMON], clean_env)
    assert f"{cfg}:3" in line and "eval.cache_max_size" in line and "a size in bytes" in line, line
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], "--set", "eval.batch=3", *COMMON], clean_env)
    assert "--set eval.batch" in line and "eval.batch_size" in line, line
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], "--batch-size", "zero", *COMMON], clean_env)
    assert "flag --batch-size" in line and "'zero'" in line, line


def test_config_show_lists_the_eval_section(tmp_path, clean_env, capsys):
    clean_env.setenv("LPIPS_FAST_EVAL_BATCH_SIZE", "8")
    assert cli.main(["config", "show", "--json", "--set", "eval.resize=64x64"]) == 0
    shown = json.loads(capsys.readouterr().out)["settings"]["eval"]
    assert shown["batch_size"] == {"value": 8, "source": "env LPIPS_FAST_EVAL_BATCH_SIZE"}
    assert shown["resize"] == {"value": "64x64", "source": "flag --set eval.resize"}
    assert shown["workers"] == {"value": None, "source": "default"}


def test_eval_options_from_settings(tmp_path, clean_env):
    s = load_settings(env={}, start_dir=tmp_path)
    o = EvalOptions.from_settings(s)
    assert (o.net, o.version, o.batch_size, o.workers, o.engine, o.compile) == ("alex", "0.1", 32, default_workers(), None, False)
    assert o.validate().dtype.is_floating_point and str(o.validate().dtype) == "torch.float32"  # auto: exact fp32
    s = load_settings(env={"LPIPS_FAST_MODEL_DTYPE": "bfloat16", "LPIPS_FAST_EVAL_ENGINE": "off",
                           "LPIPS_FAST_MODEL_COMPILE": "on"}, start_dir=tmp_path)
    o = EvalOptions.from_settings(s, batch_size=5)
    assert (str(o.validate().dtype), o.engine, o.compile, o.batch_size) == ("torch.bfloat16", False, True, 5)


def test_lin_in_a_file_is_a_path_beside_it_or_a_registered_name(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(b"")
    cfg = tmp_path / "a.toml"
    cfg.write_text('[model]\nlin = "mine.safetensors"\n')
    assert load_settings(cfg, env={})["model.lin"] == str(tmp_path / "mine.safetensors")
    cfg.write_text('[model]\nlin = "house-style@2"\n')
    assert load_settings(cfg, env={})["model.lin"] == "house-style@2"
    cfg.write_text('[model]\nlin = "weights/missing.safetensors"\n')  # a path: kept relative to the file
    assert load_settings(cfg, env={})["model.lin"] == str(tmp_path / "weights" / "missing.safetensors")
    with pytest.raises(SettingsError, match=r"eval.resize: got '0x5' from .*a.toml:2"):
        cfg.write_text('[eval]\nresize = "0x5"\n')
        load_settings(cfg, env={})


def test_a_projects_own_pyproject_is_not_read(w, tmp_path, clean_env, monkeypatch):
    """No [tool.lpips-fast] table: the file is not even parsed (broken TOML, or no TOML reader on 3.10)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text('[project\nname = "broken"\n')
    clean_env.chdir(proj)
    monkeypatch.setitem(__import__("sys").modules, "tomllib", None)  # as on Python 3.10 without tomli
    side, _ = _run(w, tmp_path, "--state-dict", w["sd"], *COMMON)
    assert _recorded(side, "net") == "alex"


def test_an_error_names_where_the_value_came_from(w, tmp_path, clean_env, capsys):
    clean_env.setenv("LPIPS_FAST_MODEL_TRUNK", str(tmp_path / "nope.pth"))
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], *COMMON], clean_env)
    assert "model.trunk (from env LPIPS_FAST_MODEL_TRUNK)" in line and "does not exist" in line, line
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], "--trunk", str(tmp_path / "nope.pth"), *COMMON], clean_env)
    assert "error: --trunk: " in line and "from env" not in line, line
    line = _refused(capsys, ["dirs", w["d0"], w["d1"], "--set", f"model.trunk={tmp_path / 'nope.pth'}", *COMMON],
                    clean_env)
    assert "model.trunk (from flag --set model.trunk)" in line, line


def test_sizes_read_like_the_feature_cache_does(tmp_path):
    for text, want in [("1e9", 10**9), (".5G", 1 << 29), ("10G", 10 << 30), ("32MiB", 32 << 20), ("4096", 4096)]:
        assert load_settings(env={"LPIPS_FAST_EVAL_CACHE_MAX_SIZE": text}, start_dir=tmp_path)["eval.cache_max_size"] == want
    for text in ("inf", "nan", "-5G", "0", "lots"):
        with pytest.raises(SettingsError, match="eval.cache_max_size"):
            load_settings(env={"LPIPS_FAST_EVAL_CACHE_MAX_SIZE": text}, start_dir=tmp_path)
