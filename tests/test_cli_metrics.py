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
