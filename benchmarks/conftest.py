"""pytest-benchmark suite configuration: device, sizes, timing rounds, and the results JSON.

    pytest benchmarks/bench_lpips.py                       # CPU subset (the issue's CPU targets), a few minutes
    pytest benchmarks/bench_lpips.py --bench-full          # every net x size x mode
    pytest benchmarks/bench_lpips.py --bench-device cuda   # GPU (full set by default)

Besides pytest-benchmark's own output (and ``--benchmark-json``), the session writes
``benchmarks/results/bench-<device>-<date>.json`` with the device name, torch/triton versions,
the date, every case's timings, ratios to the reference and peak memory, and prints a
markdown table. On a shared CPU, ratios use the best round (``min``): the least disturbed by
other processes; medians are recorded too.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

_RESULTS: dict[str, dict] = {}


def pytest_addoption(parser):
    g = parser.getgroup("lpips-fast benchmarks")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--bench-full", action="store_true", help="all nets x sizes x modes (default on CUDA)")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case (default 5 CPU, 20 CUDA)")
    g.addoption("--bench-out", default=None, help="results JSON path (default benchmarks/results/bench-<device>-<date>.json)")


def pytest_configure(config):
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    d = request.config.getoption("--bench-device")
    if d is None:
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return d


@pytest.fixture(scope="session")
def bench_rounds(request, bench_device) -> int:
    r = request.config.getoption("--bench-rounds")
    return r if r is not None else (20 if bench_device == "cuda" else 5)


@pytest.fixture(scope="session")
def bench_full(request, bench_device) -> bool:
    return bool(request.config.getoption("--bench-full")) or bench_device == "cuda"


@pytest.fixture(scope="session")
def record_result():
    """record_result(case, provider, seconds_min, seconds_median, extra) -> stored for the JSON."""

    def record(case: str, provider: str, t_min: float, t_median: float, extra: dict) -> None:
        _RESULTS.setdefault(case, {})[provider] = {"min_s": t_min, "median_s": t_median, **extra}

    return record


def pytest_benchmark_update_machine_info(config, machine_info):
    from gpu_check import environment

    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["lpips_fast"] = environment(dev)


def pytest_sessionfinish(session, exitstatus):
    if not _RESULTS:
        return
    from gpu_check import environment

    cfg = session.config
    dev = cfg.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(dev)
    rows = []
    for case, provs in _RESULTS.items():
        ref = provs.get("reference")
        row = {"case": case, "providers": provs}
        if ref:
            row["ratio_to_reference_min"] = {p: ref["min_s"] / v["min_s"] for p, v in provs.items()}
            row["ratio_to_reference_median"] = {p: ref["median_s"] / v["median_s"] for p, v in provs.items()}
            if ref.get("peak_bytes"):
                row["peak_memory_ratio"] = {p: v["peak_bytes"] / ref["peak_bytes"] for p, v in provs.items() if v.get("peak_bytes")}
        rows.append(row)
    table = markdown_table(rows)
    out = cfg.getoption("--bench-out")
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = HERE / "results" / f"bench-{dev}-{stamp}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**env, "command": " ".join(sys.argv), "rows": rows, "table_markdown": table}, indent=1))
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = f"\nlpips-fast ratios to the reference (best round; median in the JSON):\n{table}\nwrote {out}\n"
    if tr is not None:
        tr.write_line(msg)
    else:
        print(msg)


PROVIDER_ORDER = ["reference", "composite", "default", "default_cl", "engine", "engine_compiled", "engine_graphs", "floor"]


def markdown_table(rows: list[dict]) -> str:
    provs = [p for p in PROVIDER_ORDER if any(p in r["providers"] for r in rows)]
    lines = ["| case | " + " | ".join(provs) + " |", "|" + "---|" * (len(provs) + 1)]
    for r in rows:
        cells = []
        for p in provs:
            v = r["providers"].get(p)
            if v is None:
                cells.append("")
                continue
            cell = f"{v['min_s'] * 1e3:.1f} ms"
            ratio = r.get("ratio_to_reference_min", {}).get(p)
            if ratio is not None:
                cell += f" ({ratio:.2f}x)"
            mem = r.get("peak_memory_ratio", {}).get(p)
            if mem is not None and p != "reference":
                cell += f", mem {mem:.2f}x"
            cells.append(cell)
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
