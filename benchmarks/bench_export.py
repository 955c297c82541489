"""Exported forms on the CPU: ONNX Runtime and the AOTInductor package against ``LPIPS`` and the
reference ``lpips`` 0.1.4, in one run, every result checked (1e-5) before it is timed.

    python benchmarks/bench_export.py                       # alex, vgg x 64, 224 px
    python benchmarks/bench_export.py --nets alex --sizes 64 --rounds 5 --json out.json

Providers (same random trunk and lin weights for all; timings do not depend on the values):
``reference`` (lpips 0.1.4), ``LPIPS`` (lpips_fast's module), ``onnxruntime`` (CPU provider, the
graph of ``lpips_fast.deploy.export.onnx``: dynamic batch/H/W), ``aoti`` (``lpips_fast.deploy.export.aoti``:
dynamic batch, the size fixed, Inductor freezing). Rounds are interleaved (each round runs every
provider once, the order rotated from round to round) and the median per provider is reported, so
machine load drifts hit all alike. ONNX Runtime runs with thread spinning off
(``session.intra_op.allow_spinning=0``): its spinning workers would otherwise keep the cores busy
into the next provider's timing. ``CPU ms`` is the process's CPU time per batch (all threads), a
second view when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings

import torch

import lpips_fast
from lpips_fast.deploy import export

BATCH = {64: 16, 224: 4}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def models(net: str):
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    ours = lpips_fast.LPIPS(pretrained=False, net=net, pnet_rand=True).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def bench(nets, sizes, rounds: int, threads: int, tmp: str) -> list[dict]:
    import onnxruntime as ort

    torch.set_num_threads(threads)
    rows = []
    for net in nets:
        ref, ours = models(net)
        onnx_path = export.onnx(ours, os.path.join(tmp, f"{net}.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # ORT's worker threads otherwise spin after each run, taking the cores from whichever
        # provider is timed next in the interleaved rounds (measured: the reference 2x slower).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        for px in sizes:
            n = BATCH.get(px, 8)
            g = torch.Generator().manual_seed(px)
            a = torch.rand(n, 3, px, px, generator=g) * 2 - 1
            b = (a + 0.3 * torch.randn(n, 3, px, px, generator=g)).clamp(-1, 1)
            t0 = time.perf_counter()
            pt2 = export.aoti(ours, os.path.join(tmp, f"{net}_{px}.pt2"), example=(a[:2], b[:2]))
            compile_s = time.perf_counter() - t0
            runner = torch._inductor.aoti_load_package(str(pt2))
            providers = {
                "reference": lambda: ref(a, b),
                "LPIPS": lambda: ours(a, b),
                "onnxruntime": lambda: torch.from_numpy(sess.run(None, {"in0": a.numpy(), "in1": b.numpy()})[0]),
                "aoti": lambda: runner(a, b),
            }
            with torch.no_grad():
                want = ours(a, b).flatten().double()
                errs = {k: float((fn().flatten().double() - want).abs().max()) for k, fn in providers.items()}
                bad = {k: e for k, e in errs.items() if e > 1e-5}
                if bad:
                    raise AssertionError(f"{net} {px}px: results differ from LPIPS by more than 1e-5: {bad}")
                times: dict[str, list[float]] = {k: [] for k in providers}
                cpu: dict[str, list[float]] = {k: [] for k in providers}
                for _ in range(2):
                    for fn in providers.values():
                        fn()
                order = list(providers.items())
                for r in range(rounds):
                    for k, fn in order[r % len(order):] + order[:r % len(order)]:  # rotate who follows whom
                        c, t = time.process_time(), time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
                        cpu[k].append(time.process_time() - c)
            med = {k: statistics.median(v) for k, v in times.items()}
            med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
            for k in providers:
                rows.append({
                    "net": net, "px": px, "batch": n, "provider": k, "ms_per_batch": med[k] * 1e3,
                    "cpu_ms_per_batch": med_cpu[k] * 1e3,
                    "pairs_per_s": n / med[k], "vs_reference": med["reference"] / med[k],
                    "vs_LPIPS": med["LPIPS"] / med[k], "max_abs_err_vs_LPIPS": errs[k],
                    "aoti_compile_s": compile_s if k == "aoti" else None,
                })
            print(f"{net} {px}px done (aoti compile {compile_s:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| net | px | batch | provider | ms / batch | CPU ms / batch | pairs/s | speed vs reference | vs LPIPS | max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['px']} | {r['batch']} | {r['provider']} | {r['ms_per_batch']:.1f} | {r['cpu_ms_per_batch']:.1f} | "
                     f"{r['pairs_per_s']:.1f} | {r['vs_reference']:.2f}x | {r['vs_LPIPS']:.2f}x | {r['max_abs_err_vs_LPIPS']:.1g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=["alex", "vgg"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(args.nets, args.sizes, args.rounds, args.threads, tmp)
    import onnxruntime

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores, load average {load:.1f}, {args.threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"median of {args.rounds} interleaved rounds\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
