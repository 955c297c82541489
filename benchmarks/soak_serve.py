"""Soak ``lpips-fast serve``: capacity, then open-loop Poisson traffic at 50%, 90% and 150% of it.

    python benchmarks/soak_serve.py --duration 20 --json benchmarks/results/soak_serve-cpu-<UTC>.json

Starts a real server (``python -m lpips_fast.cli serve`` on a free 127.0.0.1 port) serving a
random-trunk alex model saved as a state dict (``--model a=alex-v0.1@PATH``: no download), then:

1. capacity: ``--clients`` closed-loop clients for ``--capacity-duration`` seconds, pairs/s answered;
2. each level (fraction of capacity): Poisson arrivals for ``--duration`` seconds. Every request
   has a scheduled send time; its latency counts from that time (so a client that falls behind
   is charged to the latency, not hidden). Every answer is classified: 200 (its value checked
   against ``lpips_fast.LPIPS`` computed here on the same pair, tolerance ``--tol``), 503 with and
   without ``Retry-After``, other statuses, and requests without an answer (timeouts, connection
   errors: by exception type).

The client is this process's own asyncio + httpx; it shares the CPU with the server, so its
send lag (actual send - scheduled) is reported per level. Request counts and the time spent
are bounded (``--max-requests`` per level; every request has ``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from serve_harness import Server, as_tensor, image, png, random_model  # noqa: E402

LEVELS = (0.5, 0.9, 1.5)


@dataclass
class Pool:
    """A fixed set of image pairs, PNG-encoded, with their expected LPIPS values."""

    pairs: list[tuple[bytes, bytes]]
    expected: list[float]

    @classmethod
    def build(cls, model, n: int = 16, size: int = 64, seed: int = 1000) -> "Pool":
        pairs, expected = [], []
        with torch.no_grad():
            for i in range(n):
                a, b = image(seed + 2 * i, size, size), image(seed + 2 * i + 1, size, size)
                pairs.append((png(a), png(b)))
                expected.append(model(as_tensor(a), as_tensor(b)).item())
        return cls(pairs, expected)


@dataclass
class Tally:
    """What one run of requests got back."""

    tol: float
    sent: int = 0
    ok: int = 0
    wrong_values: int = 0
    shed_503: int = 0
    shed_503_without_retry_after: int = 0
    other_status: Counter = field(default_factory=Counter)
    unanswered: Counter = field(default_factory=Counter)
    latency_ok_s: list = field(default_factory=list)
    latency_all_s: list = field(default_factory=list)
    send_lag_s: list = field(default_factory=list)
    wrong_examples: list = field(default_factory=list)
    # Per request: (when its body was completely written, None if never; status code or exception name).
    events: list = field(default_factory=list)

    def record(self, r: httpx.Response | None, error: BaseException | None, expected: float, latency_s: float,
               sent_at: float | None = None) -> None:
        self.events.append((sent_at, type(error).__name__ if error is not None else r.status_code))
        if error is not None:
            self.unanswered[type(error).__name__] += 1
            return
        self.latency_all_s.append(latency_s)
        if r.status_code == 200:
            got = r.json().get("lpips")
            if not isinstance(got, (int, float)) or not abs(got - expected) <= self.tol:
                self.wrong_values += 1
                if len(self.wrong_examples) < 5:
                    self.wrong_examples.append({"got": got, "expected": expected})
            else:
                self.ok += 1
                self.latency_ok_s.append(latency_s)
        elif r.status_code == 503:
            self.shed_503 += 1
            if "retry-after" not in r.headers:
                self.shed_503_without_retry_after += 1
        else:
            self.other_status[str(r.status_code)] += 1

    def summary(self, elapsed_s: float) -> dict:
        def pct(xs, q):
            return None if not xs else round(1000 * float(np.percentile(xs, q)), 2)

        return {
            "sent": self.sent, "answered_200": self.ok, "wrong_values": self.wrong_values,
            "shed_503": self.shed_503, "shed_503_without_retry_after": self.shed_503_without_retry_after,
            "other_status": dict(self.other_status), "unanswered": sum(self.unanswered.values()),
            "unanswered_by_error": dict(self.unanswered), "wrong_examples": self.wrong_examples,
            "elapsed_s": round(elapsed_s, 3), "answered_200_per_s": round(self.ok / elapsed_s, 2) if elapsed_s else None,
            "latency_200_ms": {"p50": pct(self.latency_ok_s, 50), "p99": pct(self.latency_ok_s, 99),
                               "max": pct(self.latency_ok_s, 100)},
            "latency_all_answers_ms": {"p50": pct(self.latency_all_s, 50), "p99": pct(self.latency_all_s, 99)},
            "send_lag_ms": {"p50": pct(self.send_lag_s, 50), "p99": pct(self.send_lag_s, 99),
                            "max": pct(self.send_lag_s, 100)},
        }


async def _one(client: httpx.AsyncClient, pool: Pool, i: int, tally: Tally, scheduled: float, headers: dict) -> None:
    img0, img1 = pool.pairs[i]
    now = time.perf_counter()
    tally.sent += 1
    tally.send_lag_s.append(max(0.0, now - scheduled))
    r, err, written = None, None, {}

    async def trace(name: str, info: dict) -> None:
        if name == "http11.send_request_body.complete":
            written["t"] = time.perf_counter()

    try:
        r = await client.post("/v1/distance", files={"img0": img0, "img1": img1}, headers=headers,
                              extensions={"trace": trace})
    except httpx.HTTPError as e:  # timeouts, connection errors, protocol errors: no answer
        err = e
    tally.record(r, err, pool.expected[i], time.perf_counter() - scheduled, sent_at=written.get("t"))


def _client(url: str, timeout_s: float, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=timeout_s), limits=limits)


async def closed_loop(url: str, pool: Pool, clients: int, duration_s: float, timeout_s: float, tol: float,
                      headers: dict | None = None, tally: Tally | None = None) -> dict:
    """``clients`` workers, each sending its next pair as soon as the last is answered."""
    tally = tally or Tally(tol)
    rng = random.Random(0)
    async with _client(url, timeout_s, clients) as client:
        t0 = time.perf_counter()
        end = t0 + duration_s

        async def worker():
            while time.perf_counter() < end:
                await _one(client, pool, rng.randrange(len(pool.pairs)), tally, time.perf_counter(), headers or {})

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return tally.summary(elapsed)


async def open_loop(url: str, pool: Pool, rate: float, duration_s: float, timeout_s: float, tol: float,
                    max_requests: int, seed: int = 0, connections: int = 1024, headers: dict | None = None,
                    tally: Tally | None = None) -> dict:
    """Poisson arrivals at ``rate``/s for ``duration_s`` (at most ``max_requests``), each request
    sent at its scheduled time whatever the answers so far; waits for every answer (bounded by
    ``timeout_s`` per request)."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    while len(offsets) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        offsets.append(t)
    tally = tally or Tally(tol)
    async with _client(url, timeout_s, connections) as client:
        t0 = time.perf_counter()
        tasks = []
        for off in offsets:
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                _one(client, pool, rng.randrange(len(pool.pairs)), tally, t0 + off, headers or {})))
        # Every task ends within timeout_s (httpx's pool/connect/read timeouts); the extra bound
        # keeps the run finite whatever happens.
        done, pending = await asyncio.wait(tasks, timeout=timeout_s * 3 + 10)
        for p in pending:
            p.cancel()
        tally.unanswered["client_gave_up"] += len(pending)
        elapsed = time.perf_counter() - t0
    out = tally.summary(elapsed)  # answered_200_per_s: over the time until the last answer
    out.update(offered_rate_per_s=round(rate, 2), scheduled=len(offsets), duration_s=duration_s)
    return out


def soak(url: str, pool: Pool, duration_s: float, capacity_s: float, clients: int, levels=LEVELS,
         timeout_s: float = 30.0, tol: float = 1e-5, max_requests: int = 20000, warmup_s: float = 3.0,
         headers: dict | None = None, connections: int = 128, log=print) -> dict:
    """A warm-up, capacity (closed loop), then an open-loop run per level; the numbers as a dict
    (the warm-up's answers are checked too, not timed)."""
    warm = asyncio.run(closed_loop(url, pool, clients, warmup_s, timeout_s, tol, headers))
    cap = asyncio.run(closed_loop(url, pool, clients, capacity_s, timeout_s, tol, headers))
    capacity = cap["answered_200_per_s"] or 0.0
    log(f"capacity: {capacity:.1f} pairs/s ({clients} closed-loop clients, {capacity_s:g} s)")
    out = {"warmup": {k: warm[k] for k in ("sent", "answered_200", "wrong_values", "unanswered", "other_status")},
           "capacity": dict(cap, clients=clients, duration_s=capacity_s, pairs_per_s=capacity), "levels": []}
    for i, frac in enumerate(levels):
        rate = max(frac * capacity, 0.5)
        res = asyncio.run(open_loop(url, pool, rate, duration_s, timeout_s, tol, max_requests, seed=i,
                                    connections=connections, headers=headers))
        res["client_connections"] = connections
        res["fraction_of_capacity"] = frac
        out["levels"].append(res)
        log(f"{frac:>4.0%} ({rate:.1f}/s): sent {res['sent']}, 200 {res['answered_200']}, 503 {res['shed_503']} "
            f"(no Retry-After: {res['shed_503_without_retry_after']}), other {res['other_status']}, "
            f"unanswered {res['unanswered']}, wrong {res['wrong_values']}, "
            f"p50/p99 {res['latency_200_ms']['p50']}/{res['latency_200_ms']['p99']} ms, "
            f"send lag p99 {res['send_lag_ms']['p99']} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    p.add_argument("--capacity-duration", type=float, default=10.0, help="seconds of the closed-loop capacity run")
    p.add_argument("--warmup", type=float, default=3.0, help="closed-loop seconds before the capacity run (not timed)")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients for the capacity run")
    p.add_argument("--levels", default=",".join(str(x) for x in LEVELS), help="fractions of capacity")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-requests", type=int, default=20000, help="most requests per level")
    p.add_argument("--connections", type=int, default=128,
                   help="most open-loop client connections (more wait in the client, charged to latency; "
                        "httpx's pool costs grow with its size, ~1000 starved this client on 2 cores)")
    p.add_argument("--pool", type=int, default=16, help="distinct image pairs (64x64 PNG)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak_serve_") as tmp:
        tmp = Path(tmp)
        model = random_model(tmp / "a.pt", seed=0)
        pool = Pool.build(model, n=args.pool)
        server_args = ["--model", f"a=alex-v0.1@{tmp / 'a.pt'}", *args.server_arg]
        with Server(server_args, tmp / "server.log") as srv:
            srv.wait_ready()
            t = time.perf_counter()
            res = soak(srv.url, pool, args.duration, args.capacity_duration, args.clients,
                       [float(x) for x in args.levels.split(",")], args.timeout, args.tol, args.max_requests,
                       args.warmup, connections=args.connections)
            healthy = srv.client.get("/healthz").status_code == 200 and srv.proc.poll() is None
            wall = time.perf_counter() - t
            srv.proc.terminate()
            exit_status = srv.proc.wait(60)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc = {
        "benchmark": "soak_serve", "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__, "httpx": httpx.__version__, "loadavg_after": load},
        "server": {"args": ["serve", "--model", "a=alex-v0.1@<random-trunk state dict>", *args.server_arg],
                   "image": "64x64 PNG pairs", "pool": args.pool},
        "client": {"kind": "asyncio + httpx, this process", "timeout_s": args.timeout, "tol": args.tol,
                   "latency_from": "scheduled send time"},
        **res,
        "server_healthy_after": healthy, "server_exit_status_after_sigterm": exit_status, "wall_s": round(wall, 1),
    }
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    bad = sum(lv["unanswered"] + lv["wrong_values"] + lv["shed_503_without_retry_after"] for lv in res["levels"])
    bad += sum(res[k]["unanswered"] + res[k]["wrong_values"] for k in ("warmup", "capacity"))
    return 0 if bad == 0 and healthy and exit_status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
