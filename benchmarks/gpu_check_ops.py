"""CUDA-only checks of the fused distance op, called by benchmarks/gpu_check.py on a GPU machine.

``run_checks(results)`` runs every check, records what it found in ``results["ops"]`` and raises
AssertionError at the end listing the checks that failed (so that one failure does not hide the
others). Checks: Triton fp32/fp16/bf16 forward vs the fp64 eager oracle, the three gradients,
channels_last, broadcast both ways, zero columns, bitwise determinism, opcheck on CUDA,
torch.compile(fullgraph=True), CUDA-graph replay, and the timing of the distance step against
the time to read both feature tensors once at the measured device copy bandwidth (target <= 1.5x).
Written for torch >= 2.6 with triton >= 3.2; uses only public APIs. Budget: well under 2 minutes.
"""

from __future__ import annotations

import time
import traceback

import torch

_DEVICE = "cuda"  # the CPU smoke test (``--cpu-smoke``) runs the value checks with "cpu"


def _feats(n, c, h, w, dtype, *, seed=0, channels_last=False, n1=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).relu()
    y = torch.randn(n if n1 is None else n1, c, h, w, generator=g, dtype=torch.float64).relu()
    x[:, 0] += 0.1
    y[:, 0] += 0.1
    wt = torch.rand(c, generator=g, dtype=torch.float32)
    x, y, wt = x.to(_DEVICE, dtype), y.to(_DEVICE, dtype), wt.to(_DEVICE)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    return x, y, wt


def _cuda_time_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _check_forward(out: dict) -> None:
    from lpips_fast.ops import lpips_distance, lpips_distance_reference

    shapes = [(3, 1, 1, 1), (3, 3, 3, 5), (4, 64, 15, 15), (2, 192, 31, 17), (3, 512, 7, 7), (2, 1000, 3, 5)]
    worst = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, shape in enumerate(shapes):
            for channels_last in (False, True):
                for spatial in (False, True):
                    x, y, w = _feats(*shape, dtype, seed=i, channels_last=channels_last)
                    res = lpips_distance(x, y, w, spatial=spatial)
                    assert res.dtype == torch.float32 and res.device.type == _DEVICE
                    ref = lpips_distance_reference(x, y, w, spatial=spatial)
                    err = (res.double() - ref).abs()
                    if dtype == torch.float32:
                        rel = (err / ref.abs().clamp_min(1e-3)).max().item()  # C = 1 gives d ~ 0 (cancellation)
                        worst["fp32_rel"] = max(worst.get("fp32_rel", 0.0), rel)
                        assert bool((err <= 1e-6 * ref.abs() + 1e-9).all()), f"fp32 {shape} rel err {rel:.3g}"
                    else:
                        own = (lpips_distance_reference(x, y, w, spatial=spatial, upcast=False).double() - ref)
                        ratio = err.max().item() / (own.abs().max().item() + 1e-12)
                        key = f"{str(dtype)[6:]}_err_over_torch"
                        worst[key] = max(worst.get(key, 0.0), ratio)
                        assert err.max() <= 2 * own.abs().max() + 1e-6, f"{dtype} {shape} err ratio {ratio:.3g}"
    out["forward"] = worst


def _check_backward(out: dict) -> None:
    from lpips_fast.ops import lpips_distance, lpips_distance_reference

    cases = [((3, 64, 15, 15), False, None), ((3, 192, 7, 5), True, 1), ((2, 512, 3, 3), False, None)]
    worst = 0.0
    for i, (shape, channels_last, n1) in enumerate(cases):
        for spatial in (False, True):
            x, y, w = _feats(*shape, torch.float32, seed=10 + i, channels_last=channels_last, n1=n1)
            ours = [t.clone().requires_grad_() for t in (x, y, w)]
            ref = [t.double().requires_grad_() for t in (x, y, w)]
            res = lpips_distance(*ours, spatial=spatial)
            up = torch.randn(res.shape, device=_DEVICE, dtype=torch.float64)
            g_ours = torch.autograd.grad(res, ours, up.float())
            g_ref = torch.autograd.grad(lpips_distance_reference(*ref, spatial=spatial), ref, up)
            for a, b in zip(g_ours, g_ref):
                scale = b.abs().max().item()
                err = (a.double() - b).abs().max().item() / max(scale, 1e-30)
                worst = max(worst, err)
                assert err < 1e-4, f"grad {shape} spatial={spatial} err {err:.3g}"
    # bf16 features with fp32 weight (autocast), all grads finite and in the right dtypes
    x, y, w = _feats(2, 64, 9, 9, torch.bfloat16, seed=20)
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    gx, gy, gw = torch.autograd.grad(lpips_distance(x, y, w).sum(), (x, y, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in (gx, gy, gw))
    out["backward_fp32_max_rel_err"] = worst


def _check_zero_columns_and_broadcast(out: dict) -> None:
    from lpips_fast.ops import lpips_distance

    x, y, w = _feats(2, 32, 5, 5, torch.float32, seed=30)
    x[:, :, 1, 2] = 0
    x, y, w = x.requires_grad_(), y.requires_grad_(), w.requires_grad_()
    grads = torch.autograd.grad(lpips_distance(x, y, w, spatial=True).sum(), (x, y, w))
    assert all(torch.isfinite(g).all() for g in grads) and (grads[0][:, :, 1, 2] == 0).all()
    x, y1, w = _feats(4, 64, 7, 7, torch.float32, seed=31, n1=1)
    full = lpips_distance(x, y1.expand(4, -1, -1, -1).contiguous(), w)
    assert torch.equal(lpips_distance(x, y1, w), full)
    torch.testing.assert_close(lpips_distance(y1, x, w), full, rtol=1e-6, atol=0)
    out["zero_columns_and_broadcast"] = "ok"


def _check_determinism(out: dict) -> None:
    from lpips_fast.ops import lpips_distance

    x, y, w = _feats(8, 64, 31, 31, torch.float32, seed=40)

    def run():
        xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
        res = lpips_distance(xs, ys, ws)
        return [res.detach(), *torch.autograd.grad(res.sum(), (xs, ys, ws))]

    a, b = run(), run()
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "two runs differ"
    out["bitwise_repeatable"] = True


def _check_opcheck(out: dict) -> None:
    import lpips_fast.ops as ops

    ops._triton_ops()
    x, y, w = _feats(2, 6, 3, 4, torch.float32, seed=50)
    xc = x.contiguous(memory_format=torch.channels_last)
    samples = [
        (x.clone().requires_grad_(), y, w.clone().requires_grad_(), False, 1e-10),
        (xc.clone(), y.clone().requires_grad_(), None, True, 1e-10),
        (x.half(), y.half(), w, True, 1e-10),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.lpips_fast.distance_triton.default, args)
    bargs = (torch.rand(2, 1, 3, 4, device=_DEVICE), xc, y, w, True, 1e-10, True, True, True)
    torch.library.opcheck(torch.ops.lpips_fast.distance_triton_backward.default, bargs)
    out["opcheck_cuda"] = "ok"


def _check_compile_and_graphs(out: dict) -> None:
    from lpips_fast.ops import lpips_distance

    x, y, w = _feats(4, 64, 15, 15, torch.float32, seed=60)

    def step(a, b, c):
        return lpips_distance(a, b, c) + lpips_distance(a, b, None, spatial=True).mean(dim=(1, 2, 3))

    compiled = torch.compile(step, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (x, y, w)]
    xe = [t.clone().requires_grad_() for t in (x, y, w)]
    rc, re_ = compiled(*xs), step(*xe)
    torch.testing.assert_close(rc, re_, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(rc.sum(), xs), torch.autograd.grad(re_.sum(), xe)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    out["compile_fullgraph"] = "ok"

    # CUDA graph: capture, poison the output, replay, check it was rewritten
    sx, sy = x.clone(), y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            lpips_distance(sx, sy, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = lpips_distance(sx, sy, w)
    x2, y2, _ = _feats(4, 64, 15, 15, torch.float32, seed=61)
    sx.copy_(x2)
    sy.copy_(y2)
    gout.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(gout, lpips_distance(x2, y2, w), rtol=0, atol=0)
    out["cuda_graph_replay"] = "ok"


def _check_timing(out: dict) -> None:
    from lpips_fast.ops import lpips_distance, lpips_distance_reference

    buf = torch.empty(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(buf)
    t_copy = _cuda_time_ms(lambda: dst.copy_(buf), iters=20)
    bw = 2 * buf.numel() * buf.element_size() / (t_copy * 1e-3)  # bytes/s, read + write
    del buf, dst
    timing = {"copy_bandwidth_GBps": round(bw / 1e9, 1)}
    worst_ratio = 0.0
    steps = {
        "vgg256_b16": [(16, c, 256 >> k, 256 >> k) for k, c in enumerate((64, 128, 256, 512, 512))],
        "alex224_b64": [(64, 64, 55, 55), (64, 192, 27, 27), (64, 384, 13, 13), (64, 256, 13, 13), (64, 256, 13, 13)],
    }
    for dtype in (torch.float32, torch.bfloat16):
        for name, shapes in steps.items():
            feats = [_feats(*s, dtype, seed=70 + i) for i, s in enumerate(shapes)]
            nbytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y, _ in feats)

            def fused():
                return [lpips_distance(x, y, w) for x, y, w in feats]

            def eager():
                return [lpips_distance_reference(x, y, w, upcast=False) for x, y, w in feats]

            t_fused, t_eager = _cuda_time_ms(fused), _cuda_time_ms(eager, iters=10)
            t_read = nbytes / bw * 1e3
            ratio = t_fused / t_read
            key = f"{name}_{str(dtype)[6:]}"
            timing[key] = {
                "fused_ms": round(t_fused, 4),
                "eager_ms": round(t_eager, 4),
                "read_once_ms": round(t_read, 4),
                "fused_over_read": round(ratio, 3),
                "eager_over_fused": round(t_eager / t_fused, 2),
            }
            if name == "vgg256_b16":  # bandwidth-bound; alex at these sizes is closer to launch-bound
                worst_ratio = max(worst_ratio, ratio)
            del feats
    out["timing"] = timing
    assert worst_ratio <= 1.5, f"distance step at {worst_ratio:.2f}x the read-once time (target <= 1.5x)"


def run_checks(results: dict) -> None:
    """Run every CUDA check of the op; findings in results['ops']; AssertionError if any failed."""
    if not torch.cuda.is_available():
        raise AssertionError("gpu_check_ops needs a CUDA device")
    out = results.setdefault("ops", {})
    out["device"] = torch.cuda.get_device_name()
    out["torch"] = torch.__version__
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    failures = []
    checks = [
        _check_forward,
        _check_backward,
        _check_zero_columns_and_broadcast,
        _check_determinism,
        _check_opcheck,
        _check_compile_and_graphs,
        _check_timing,
    ]
    for check in checks:
        name = check.__name__.removeprefix("_check_")
        t0 = time.perf_counter()
        try:
            check(out)
            out.setdefault("passed", []).append(name)
        except Exception as exc:  # record and keep going; raise at the end
            failures.append(name)
            out.setdefault("errors", {})[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            out.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
        out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
    if failures:
        raise AssertionError(f"gpu_check_ops failed: {failures}: {out.get('errors')}")


def _cpu_smoke() -> dict:
    """The value checks with CPU tensors (C++ kernel): checks this file's own logic without a GPU."""
    global _DEVICE
    _DEVICE = "cpu"
    out: dict = {}
    for check in (_check_forward, _check_backward, _check_zero_columns_and_broadcast, _check_determinism):
        check(out)
    return out


if __name__ == "__main__":  # python benchmarks/gpu_check_ops.py [--cpu-smoke]
    import json
    import sys

    res: dict = {}
    try:
        if "--cpu-smoke" in sys.argv:
            res["ops"] = _cpu_smoke()
        else:
            run_checks(res)
    finally:
        print(json.dumps(res, indent=2, default=str))
