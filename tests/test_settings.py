"""Layered settings: defaults < TOML file < LPIPS_FAST_* environment < flags; errors name key and source."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from lpips_fast.cli import serve as serve_cli
from lpips_fast.deploy.settings import SettingsError, load_settings


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_defaults_and_their_source(tmp_path):
    s = load_settings(env={}, start_dir=tmp_path)
    assert s["model.net"] == "alex" and s["serve.port"] == 8080 and s["scorer.devices"] == ()
    assert s.source("serve.port") == "default"
    assert s.config_file is None


def test_layers_override_in_order_and_sources_say_where(tmp_path):
    cfg = _write(tmp_path / "lpips-fast.toml", """
        # comment
        [serve]
        port = 9001
        max_body_bytes = "1M"
        models = { a = "alex-v0.1", b = "vgg-v0.1" }

        [scorer]
        max_batch = 16
        max_delay_ms = 5
        """)
    env = {"LPIPS_FAST_SCORER_MAX_BATCH": "32", "LPIPS_FAST_SERVE_SPLIT": "a=0.9,b=0.1", "LPIPS_FAST_HOME": "/x"}
    flags = [("scorer.max_delay_ms", "1.5", "--max-delay-ms"), ("scorer.devices", ["cpu", "cpu"], "--device")]
    s = load_settings(cfg, env=env, flags=flags)
    assert s["serve.port"] == 9001 and s.source("serve.port") == f"{cfg}:3"
    assert s["serve.max_body_bytes"] == 1 << 20 and s.source("serve.max_body_bytes") == f"{cfg}:4"
    assert s["serve.models"] == {"a": "alex-v0.1", "b": "vgg-v0.1"}
    assert s["scorer.max_batch"] == 32 and s.source("scorer.max_batch") == "env LPIPS_FAST_SCORER_MAX_BATCH"
    assert s["serve.split"] == {"a": 0.9, "b": 0.1}
    assert s["scorer.max_delay_ms"] == 1.5 and s.source("scorer.max_delay_ms") == "flag --max-delay-ms"
    assert s["scorer.devices"] == ("cpu", "cpu")
    assert s.section("scorer") == {"devices": ("cpu", "cpu"), "max_batch": 32, "max_delay_ms": 1.5, "max_queue": 4096}
    assert s.config_file == str(cfg)


def test_pyproject_found_upward_and_paths_relative_to_it(tmp_path):
    _write(tmp_path / "pyproject.toml", """
        [project]
        name = "x"

        [tool.lpips-fast.model]
        net = "vgg"
        lin = "weights/lin.safetensors"
        """)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    s = load_settings(env={}, start_dir=deep)
    assert s["model.net"] == "vgg" and s.source("model.net") == f"{tmp_path / 'pyproject.toml'}:5"
    assert s["model.lin"] == str(tmp_path / "weights" / "lin.safetensors")
    # The nearest pyproject.toml ends the search even without a [tool.lpips-fast] table.
    _write(deep / "pyproject.toml", "[project]\nname = 'y'\n")
    s = load_settings(env={}, start_dir=deep)
    assert s["model.net"] == "alex" and s.config_file is None


@pytest.mark.parametrize(
    "text, key, line, allowed",
    [
        ("[serve]\nport = 70000\n", "serve.port", 2, "an integer from 0 to 65535"),
        ("[serve]\n\nprot = 1\n", "serve.prot", 3, "did you mean serve.port?"),
        ("[srve]\nport = 1\n", "srve.port", 2, "did you mean [serve]?"),
        ("net = 'alex'\n", "net", 1, "top-level keys must be tables"),
        ("[model]\nnet = 'alexnet'\n", "model.net", 2, "one of alex, vgg, vgg16, squeeze"),
        ("[serve]\nsplit = {a = -1}\n", "serve.split", 2, "number >= 0"),
        ("[scorer]\nmax_batch = true\n", "scorer.max_batch", 2, "an integer >= 1"),
    ],
)
def test_bad_file_values_name_key_file_line_and_what_is_allowed(tmp_path, text, key, line, allowed):
    cfg = _write(tmp_path / "c.toml", text)
    with pytest.raises(SettingsError) as e:
        load_settings(cfg, env={})
    msg = str(e.value)
    assert repr(key) in msg or msg.startswith(f"{key}:"), msg
    assert f"{cfg}:{line}" in msg and allowed in msg, msg


def test_bad_env_and_flag_values(tmp_path):
    with pytest.raises(SettingsError, match=r"serve\.port: got 'abc' from env LPIPS_FAST_SERVE_PORT, expected an integer"):
        load_settings(env={"LPIPS_FAST_SERVE_PORT": "abc"}, start_dir=tmp_path)
    with pytest.raises(SettingsError, match=r"unknown setting 'scorer.max_batches' from env LPIPS_FAST_SCORER_MAX_BATCHES"):
        load_settings(env={"LPIPS_FAST_SCORER_MAX_BATCHES": "3"}, start_dir=tmp_path)
    with pytest.raises(SettingsError, match=r"log\.level: got 'loud' from flag --log-level, expected one of"):
        load_settings(env={}, flags={"log.level": ("loud", "--log-level")}, start_dir=tmp_path)
    with pytest.raises(SettingsError, match=r"config: got .*missing.toml.* expected an existing TOML file"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = _write(tmp_path / "broken.toml", "[serve\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, env={})


def test_secrets_are_never_printed(tmp_path, capsys, monkeypatch):
    token = "s3cr3t-token-value"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LPIPS_FAST_SERVE_AUTH_TOKEN", token)
    assert serve_cli.main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert token not in out and "(set, hidden)" in out and "env LPIPS_FAST_SERVE_AUTH_TOKEN" in out
    assert serve_cli.main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert token not in out
    assert json.loads(out)["settings"]["serve"]["auth_token"] == {"value": "(set, hidden)", "source": "env LPIPS_FAST_SERVE_AUTH_TOKEN"}
    cfg = _write(tmp_path / "c.toml", f"[serve]\nauth_token = ['{token}']\n")
    with pytest.raises(SettingsError) as e:
        load_settings(cfg, env={})
    assert token not in str(e.value) and "<secret>" in str(e.value)


def test_config_show_flags_and_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LPIPS_FAST_SERVE_AUTH_TOKEN", raising=False)
    cfg = _write(tmp_path / "lpips-fast.toml", "[serve]\nport = 9001\n")
    assert serve_cli.main(["config", "show", "--config", str(cfg), "--max-batch", "8", "--set", "log.level=debug"]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")}
    assert lines["serve.port"][1:] == ["9001", f"{cfg}:2"]
    assert lines["scorer.max_batch"][1:] == ["8", "flag", "--max-batch"]
    assert lines["log.level"][1:] == ["debug", "flag", "--set", "log.level"]
    assert serve_cli.main(["config", "show", "--set", "serve.port"]) == 2
    assert "expected SECTION.KEY=VALUE" in capsys.readouterr().err
    assert serve_cli.main(["config", "show", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lpips-fast config: error: scorer.max_batch: got '0' from flag --max-batch, expected an integer >= 1"]


def test_without_tomllib_or_tomli_the_error_says_what_to_install(tmp_path, monkeypatch):
    cfg = _write(tmp_path / "c.toml", "[serve]\nport = 1\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(SettingsError, match="needs the 'tomli' package"):
        load_settings(cfg, env={})



def test_config_file_from_the_environment(tmp_path):
    cfg = _write(tmp_path / "x.toml", "[log]\nlevel = 'info'\n")
    s = load_settings(env={"LPIPS_FAST_CONFIG": str(cfg)}, start_dir=tmp_path)
    assert s["log.level"] == "info" and s.source("log.level") == f"{cfg}:2"
    with pytest.raises(SettingsError, match=r"config: got .* from env LPIPS_FAST_CONFIG, expected an existing TOML file"):
        load_settings(env={"LPIPS_FAST_CONFIG": str(tmp_path / "nope.toml")}, start_dir=tmp_path)
