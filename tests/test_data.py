"""Decoding and discovery: error reasons, RGB conversion, uint8 -> [-1, 1] like the reference, workers."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lpips_fast.dataset.data import (
    PILLOW_MAX_IMAGE_PIXELS,
    ImageDataset,
    decode_bytes,
    decode_file,
    iter_windows,
    list_images,
    parse_resize,
    to_model_input,
)
from test_data_helpers import photos


def _png(arr, mode=None):
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_list_images_recursive_sorted_skips_hidden_and_non_images(tmp_path):
    for rel in ("b.png", "a.JPG", "sub/c.webp", ".hidden.png", ".git/x.png", "notes.txt", "sub/deeper/d.tiff"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert list_images(tmp_path) == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.tiff"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "b.png")


def test_parse_resize():
    assert parse_resize("256x128") == (256, 128)
    assert parse_resize("64") == (64, 64)
    assert parse_resize((3, 4)) == (3, 4)
    assert parse_resize(None) is None
    for bad in ("0x5", "axb", "12x"):
        with pytest.raises(ValueError):
            parse_resize(bad)


def test_modes_become_rgb():
    a = photos(1)[0]
    for mode, check in (("L", None), ("RGBA", a), ("P", None), ("CMYK", None), ("LA", None), ("I;16", None)):
        d = decode_bytes(_png(a, mode) if mode not in ("CMYK",) else _jpeg(a, mode))
        assert d.ok, (mode, d.error)
        assert d.array.shape == (48, 64, 3) and d.array.dtype == np.uint8, mode
        if check is not None:
            assert np.array_equal(d.array, check)  # alpha dropped, colour kept
    g = decode_bytes(_png(a, "L")).array
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])


def _jpeg(a, mode):
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def test_error_reasons(tmp_path):
    a = photos(1)[0]
    data = _png(a)
    assert "not an image" in decode_bytes(b"hello").error
    assert "truncated" in decode_bytes(data[: len(data) // 2]).error or "decode error" in decode_bytes(data[: len(data) // 2]).error
    bomb = decode_bytes(data, max_pixels=1000)
    assert bomb.error.startswith("decompression bomb: 64x48 = 3072 pixels exceeds the limit of 1000")
    assert decode_bytes(data, max_pixels=3072).ok  # the limit itself is allowed
    assert PILLOW_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 89478485
    assert decode_file(tmp_path / "missing.png").error == "missing file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert decode_file(tmp_path / "empty.png").error == "empty file"
    d = tmp_path / "dir.png"
    d.mkdir()
    assert decode_file(d).error.startswith("unreadable")
    ok = decode_file(_write(tmp_path / "ok.png", data), resize=(40, 56))
    assert ok.ok and ok.array.shape == (40, 56, 3) and len(ok.digest) == 32


def _write(p, data):
    p.write_bytes(data)
    return p


def test_to_model_input_matches_reference_im2tensor():
    import lpips

    arrs = photos(3)
    x = to_model_input(arrs, "cpu", torch.float32)
    want = torch.cat([lpips.im2tensor(a) for a in arrs])
    assert torch.equal(x, want)
    assert to_model_input(arrs, "cpu", torch.float16).dtype == torch.float16


def test_workers_decode_in_order(tmp_path):
    arrs = photos(6)
    files = []
    for k, a in enumerate(arrs):
        files.append(str(_write(tmp_path / f"{k}.png", _png(a))))
    files.append(str(_write(tmp_path / "bad.png", b"junk")))
    ds = ImageDataset(files, range(len(files)))
    seq = [it for w in iter_windows(ds, 3, workers=0) for it in w]
    par = [it for w in iter_windows(ds, 3, workers=2) for it in w]
    assert [i for i, _ in par] == list(range(7))
    for (i, a), (j, b) in zip(seq, par):
        assert i == j and a.error == b.error and a.digest == b.digest
        if a.ok:
            assert np.array_equal(a.array, b.array)
    assert par[-1][1].error is not None


def test_cli_with_decoding_workers(tmp_path):
    """The DataLoader path end to end: --workers 2 gives the rows of --workers 0."""
    from lpips_fast import cli
    from test_data_helpers import make_dirs, reference_model, save_state_dict

    d0, d1 = make_dirs(str(tmp_path))
    ref, _ = reference_model()
    sd = save_state_dict(ref, str(tmp_path / "sd.safetensors"))
    outs = []
    for w in ("0", "2"):
        out = str(tmp_path / f"w{w}.csv")
        assert cli.main(["dirs", d0, d1, "-o", out, "--workers", w, "--state-dict", sd, "--device", "cpu", "--batch-size", "3"]) == 3
        outs.append(open(out).read())
    assert outs[0] == outs[1]


def test_list_images_survives_a_symlink_loop(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    files = list_images(tmp_path)
    assert "a/x.png" in files and len(files) < 5


def test_16_bit_gray_is_scaled_not_clipped():
    g16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")
    d = decode_bytes(buf.getvalue())
    assert d.ok and d.array.shape == (48, 64, 3)
    assert np.array_equal(d.array[..., 0], np.round(g16 / 257.0).astype(np.uint8))
