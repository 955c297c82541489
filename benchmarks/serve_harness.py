"""A real ``python -m lpips_fast.cli serve`` process on a free 127.0.0.1 port, and its inputs.

Shared by ``tests/test_serve.py``, ``tests/test_serve_reliability.py`` and
``benchmarks/soak_serve.py``: the server is reached only through the CLI and HTTP. Random-trunk
alex models saved as state dicts keep start-up cheap and need no download.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # a first start may build the C++ kernel (~60 s on 2 cores, more under load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) in [-1, 1], as the service decodes it."""
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1


def random_model(path: Path, seed: int):
    """A random-trunk alex LPIPS (seeded), saved as a state dict at ``path``; returns the model."""
    import lpips_fast

    torch.manual_seed(seed)
    m = lpips_fast.LPIPS(net="alex", pnet_rand=True).eval()
    torch.save(m.state_dict(), path)
    return m


class Server:
    """A ``python -m lpips_fast.cli serve`` child process; always terminated at teardown."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "lpips_fast.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
