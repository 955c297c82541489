"""The README's examples run as written (CLI lines and Python blocks), from the repository root."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _cli_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            # Set-up commands (pip, weights fetch) are run by .ci/run itself.
            # A line sent to the background (`... &`) starts a server: tests/test_serve.py runs that one.
            if (_ENV_PREFIX.sub("", line).startswith("lpips-fast ") and " weights fetch" not in line
                    and not line.endswith("&")):
                lines.append(line)
    return lines


_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # VAR=value lpips-fast ...


def _split_env(line: str) -> tuple[dict, list[str]]:
    """``VAR=1 lpips-fast a b`` -> ({'VAR': '1'}, ['lpips-fast', 'a', 'b'])."""
    argv = shlex.split(line)
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    return env, argv


def _require_alex():
    from lpips_fast import weights

    try:
        weights.trunk_state_dict("alex")
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pretrained alex trunk not fetched")


def test_readme_has_cli_and_python_examples():
    assert len(_cli_lines()) >= 8
    assert len(_blocks("python")) >= 2


@pytest.mark.parametrize("line", _cli_lines())
def test_readme_cli_line_runs(line, tmp_path):
    _require_alex()
    env, argv = _split_env(line)
    cmd = [sys.executable, "-m", "lpips_fast.cli", *argv[1:]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, (line, out.stdout[-2000:], out.stderr[-2000:])


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index):
    _require_alex()
    code = _blocks("python")[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
