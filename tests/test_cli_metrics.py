"""``--metrics-json``: the run's counters as JSON for the dataset commands."""

from __future__ import annotations

import json

from lpips_fast import cli


def test_dirs_and_allpairs_write_metrics(tmp_path):
    m = tmp_path / "m.json"
    rc = cli.main(["dirs", "examples/distorted", "examples/clean", "-o", str(tmp_path / "s.csv"),
                   "--metrics-json", str(m), "-q", "--random-trunk", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    got = json.loads(m.read_text())
    assert got["command"] == "dirs" and got["rows"] == 2 and got["errors"] == 0 and got["scored_now"] == 2
    assert got["lpips"]["mean"] > 0 and got["pairs_per_s"] > 0 and got["oom_retries"] == 0
    assert got["cache"] == {"hits": 0, "misses": 4} and got["batch_size"]["initial"] == got["batch_size"]["final"]
    rc = cli.main(["allpairs", "examples/clean", "--metrics-json", str(m), "-q", "--random-trunk"])
    assert rc == 0 and json.loads(m.read_text())["rows"] == 1


def test_bad_metrics_path_is_a_usage_error_before_any_work(tmp_path, capsys):
    rc = cli.main(["dirs", "examples/distorted", "examples/clean", "--metrics-json", str(tmp_path / "no" / "m.json"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--metrics-json" in err[0]
    rc = cli.main(["map", "examples/clean/cat.png", "examples/distorted/cat.png", "-o", str(tmp_path / "h.png"),
                   "--metrics-json", str(tmp_path / "m.json")])
    assert rc == 2 and "--metrics-json" in capsys.readouterr().err


def test_error_rows_are_counted_by_kind(tmp_path):
    import os

    import numpy as np
    from PIL import Image

    from test_data_helpers import make_dirs

    d0, d1 = make_dirs(str(tmp_path / "data"))
    for d in (d0, d1):
        open(os.path.join(d, "empty.png"), "wb").close()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(d, "tiny.png"))
    os.remove(os.path.join(d1, "astronaut.png"))
    os.mkfifo(os.path.join(d1, "astronaut.png"))  # never read: an error row, not a hang
    m = tmp_path / "m.json"
    rc = cli.main(["dirs", d0, d1, "-o", str(tmp_path / "s.csv"), "--metrics-json", str(m), "-q", "--random-trunk",
                   "--workers", "0"])
    got = json.loads(m.read_text())
    kinds = got["errors_by_kind"]
    assert rc == 3 and sum(kinds.values()) == got["errors"] and "other" not in kinds, got
    assert kinds["missing"] == 2 and kinds["size_mismatch"] == 1 and kinds["empty_file"] == 1, kinds
    assert kinds["too_small"] == 1 and kinds["not_regular_file"] == 1, kinds
    assert kinds.get("decode_error", 0) + kinds.get("not_an_image", 0) == 2, kinds  # corrupt.png, truncated.png


def test_row_error_kind_names_every_message_the_dataset_layer_writes():
    from lpips_fast.errors import row_error_kind

    for message, kind in [
        ("missing in DIR0 (a/)", "missing"), ("path1: missing file", "missing"),
        ("path0: unreadable: not a regular file (a FIFO)", "not_regular_file"),
        ("path0: unreadable: PermissionError: Permission denied", "unreadable"), ("path1: empty file", "empty_file"),
        ("path0: decompression bomb: 9x9 = 81 pixels exceeds the limit of 50 pixels", "decompression_bomb"),
        ("path1: not an image: Pillow cannot identify the file format", "not_an_image"),
        ("path1: decode error: OSError: image file is truncated", "decode_error"),
        ("size mismatch: 48x64 vs 40x64 (use --resize HxW)", "size_mismatch"),
        ("size 40x64 differs from the most common size 48x64 (use --resize HxW)", "size_mismatch"),
        ("path0: image of 16x16 is smaller than the alex trunk's minimum of 31x31 pixels (use --resize)", "too_small"),
        ("out of memory even with a batch of 1 pair", "out_of_memory"),
        ("internal error: RuntimeError: boom", "internal"),
        ("something new", "other"),
    ]:
        assert row_error_kind(message) == kind, message
