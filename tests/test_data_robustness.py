"""Hostile inputs to the dataset layer: symlinked folder aliases, EXIF orientation, FIFOs and
sockets named like images, decoding workers whose parent is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import lpips_fast
from lpips_fast import cli
from lpips_fast.dataset.data import decode_file, list_images
from test_data_helpers import env, make_flat_dir, photos, reference_model, save_state_dict


@pytest.fixture(scope="module")
def models():
    return reference_model()


def test_symlinked_alias_folders_pair_by_the_names_given(tmp_path, models):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    make_flat_dir(str(d0 / "real"), 2)
    make_flat_dir(str(d1 / "real"), 2, seed=3)
    make_flat_dir(str(d1 / "alias"), 2, seed=4)
    os.symlink("real", d0 / "alias")  # an alias next to the real folder
    os.symlink("..", d0 / "real" / "up")  # a loop: skipped, not followed forever
    names = ["alias/img000.png", "alias/img001.png", "real/img000.png", "real/img001.png"]
    assert list_images(d0) == names
    rows = lpips_fast.evaluate_dirs(d0, d1, model=models[1])
    assert [r.path0 for r in rows] == names
    # every present file scored (both sides hold the same photos, so each value is exactly 0)
    assert all(r.error is None and r.lpips == 0 for r in rows), [(r.error, r.lpips) for r in rows]
    # two folder names that are symlinks to the same folder
    os.symlink(d1 / "real", tmp_path / "x")
    os.symlink(d1 / "real", tmp_path / "y")
    rows = lpips_fast.evaluate_dirs(tmp_path / "x", tmp_path / "y", model=models[1])
    assert [(r.path0, r.error) for r in rows] == [("img000.png", None), ("img001.png", None)]
    assert all(r.lpips < 1e-6 for r in rows)  # the same files on both sides


def _save_jpeg(path, arr, orientation=None):
    im = Image.fromarray(arr)
    kw = {"quality": 100, "subsampling": 0}
    if orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = orientation
        kw["exif"] = ex.tobytes()
    im.save(path, **kw)


@pytest.mark.parametrize("orientation,turn", [(6, 1), (8, -1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, models, orientation, turn):
    upright = photos(1, (48, 64))[0]
    up, rot = str(tmp_path / "up.jpg"), str(tmp_path / "rot.jpg")
    _save_jpeg(up, upright)
    _save_jpeg(rot, np.ascontiguousarray(np.rot90(upright, k=turn)), orientation)  # stored turned, tagged
    a, b = lpips_fast.load_image(up), lpips_fast.load_image(rot)
    assert a.shape == b.shape == (48, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3
    assert decode_file(rot).array.shape == (48, 64, 3)
    _, ours = models
    (row,) = lpips_fast.evaluate_pairs([(up, rot)], model=ours)
    assert row.error is None and row.lpips < 0.01, row
    # without the tag the same pixels are a different picture
    raw = np.asarray(Image.open(rot).convert("RGB"))
    if raw.shape == upright.shape:
        with torch.no_grad():
            d = ours(lpips_fast.im2tensor(raw), lpips_fast.im2tensor(a)).item()
        assert d > 0.05
    # the feature cache reads the size from the header without decoding: it must be the upright size
    cache = str(tmp_path / "fc")
    first = lpips_fast.evaluate_pairs([(up, rot)], model=ours, cache=cache)
    second = lpips_fast.evaluate_pairs([(up, rot)], model=ours, cache=cache)
    assert first[0].error is None and abs(first[0].lpips - second[0].lpips) < 1e-6


class _Alarm(Exception):
    pass


def _with_alarm(seconds, fn):
    def handler(signum, frame):
        raise _Alarm(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_socket_and_folder_named_png_are_error_rows(tmp_path, models, capsys):
    d = tmp_path / "d"
    make_flat_dir(str(d), 2)
    os.mkfifo(d / "fifo.png")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(d / "sock.png"))
    try:
        rows = _with_alarm(30, lambda: lpips_fast.evaluate_ref(d / "img000.png", d, model=models[1]))
        by = {r.path1: r for r in rows}
        assert set(by) == {"fifo.png", "img000.png", "img001.png", "sock.png"}
        assert "not a regular file (a FIFO)" in by["fifo.png"].error
        assert "unreadable: not a regular file (a socket)" in by["sock.png"].error
        assert by["img001.png"].error is None
        sd = save_state_dict(models[0], str(tmp_path / "sd.safetensors"))
        rc = _with_alarm(60, lambda: cli.main(["ref", str(d / "img000.png"), str(d), "--state-dict", sd, "--workers", "0", "--device", "cpu", "-o", str(tmp_path / "o.csv")]))
        assert rc == 3
    finally:
        srv.close()


_WORKER_SCRIPT = """
import os, sys, time
from lpips_fast.dataset.data import iter_windows

class Slow:
    def __len__(self):
        return 64
    def __getitem__(self, i):
        with open(sys.argv[1] + f".{os.getpid()}", "w") as f:
            f.write("x")
        time.sleep(120)
        return i

for _ in iter_windows(Slow(), 4, workers=2):
    pass
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\\nState:\\tZ" not in f.read() and True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decoding_workers_exit_when_the_parent_is_killed(tmp_path):
    stem = str(tmp_path / "worker")
    p = subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, stem], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        pids: list[int] = []
        while time.time() < deadline and len(pids) < 2:
            pids = [int(n.rsplit(".", 1)[1]) for n in os.listdir(tmp_path) if n.startswith("worker.")]
            time.sleep(0.1)
        assert len(pids) == 2, "the workers did not start"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(w) for w in pids):
            time.sleep(0.1)
        assert not any(_alive(w) for w in pids), "decoding workers outlived their parent"
    finally:
        if p.poll() is None:
            p.kill()


def test_cached_files_are_not_decoded_for_their_orientation(tmp_path, monkeypatch):
    """The cache probe reads only the header: looking for an EXIF tag must not decode a PNG."""
    from PIL import ImageFile

    make_flat_dir(str(tmp_path), 1)
    png = str(tmp_path / "img000.png")
    jpg = str(tmp_path / "rot.jpg")
    _save_jpeg(jpg, np.ascontiguousarray(np.rot90(photos(1)[0])), 6)
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.format) or real(self))
    asked = []
    d = decode_file(png, probe=lambda digest, hw: asked.append(hw) or True)
    assert d.array is None and d.size == (48, 64) and loads == []
    d = decode_file(jpg, probe=lambda digest, hw: asked.append(hw) or True)
    assert d.array is None and d.size == (48, 64) and loads == []  # the upright size, from the header
