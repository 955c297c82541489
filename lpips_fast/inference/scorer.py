"""``Scorer``: LPIPS for many concurrent callers, one pair at a time, batched behind their backs.

    with lpips_fast.Scorer(net="alex", devices=["cpu"], max_batch=64, max_delay_ms=2) as scorer:
        d = scorer.score(img0, img1)                 # blocking, thread-safe -> float
        fut = scorer.submit(img0, img1)              # concurrent.futures.Future[float]
        d = await scorer.score_async(img0, img1)     # asyncio

How it works: each request is checked and converted on the caller's side (decoding encoded images
too), then queued in a group of same-shaped pairs. A dispatcher thread hands a group to a device as
one batch when it holds ``max_batch`` pairs or ``max_delay_ms`` after its first pair arrived (later,
if every device is busy: pairs keep joining the group meanwhile), choosing the device with the
fewest outstanding pairs. One worker thread per device runs its ``Engine`` and answers each pair's
future individually.

- A bad request (wrong type, undecodable, smaller than the trunk's minimum, larger than
  ``max_pixels``, NaN/Inf, mismatched sizes) fails its own future with ``InvalidInput`` and never
  joins a batch. A batch that fails inside the engine is split in halves until the failing pair is
  alone, so other pairs still get their values; an out-of-memory error halves the batch the same
  way (and caps later batches of that shape).
- Backpressure: at most ``max_queue`` pairs wait for a device; beyond that ``submit`` raises
  ``Overloaded`` while ``score`` / ``score_async`` wait for room.
- ``future.cancel()`` on a pair that has not started drops it from its batch.
- ``close()`` (or leaving the ``with`` block) scores everything already queued, then stops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .telemetry import LATENCY_BUCKETS_S, LOGGER_NAME, Metrics, batch_size_buckets

__all__ = ["Scorer", "Overloaded", "InvalidInput", "INPUT_ERROR_KINDS", "model_from_settings"]

log = logging.getLogger(LOGGER_NAME)

#: ``InvalidInput.kind`` values.
INPUT_ERROR_KINDS = ("bad_type", "undecodable", "too_small", "too_large", "nonfinite", "shape_mismatch")


class Overloaded(RuntimeError):
    """``Scorer.submit``: ``max_queue`` pairs already wait for a device; retry later (HTTP 503)."""


class InvalidInput(ValueError):
    """A request that cannot be scored; ``kind`` is one of ``INPUT_ERROR_KINDS``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- inputs ----------------------------------------------------------------------------------
def _decode(data: bytes | str | os.PathLike, name: str, max_pixels: int | None) -> np.ndarray:
    """Encoded bytes or a file path -> HxWx3 uint8, refusing images over ``max_pixels`` before decoding."""
    import warnings

    from PIL import Image

    what = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else f"file {os.fspath(data)!r}"
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size  # read from the header: nothing decoded yet
                if max_pixels is not None and w * h > max_pixels:
                    raise InvalidInput(f"{name}: image of {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}", "too_large")
                return np.array(im.convert("RGB"), dtype=np.uint8)
    except InvalidInput:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"{name}: {e}", "too_large") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"{name}: could not decode {what} as an image: not a format Pillow recognises", "undecodable") from None
    except FileNotFoundError:
        raise InvalidInput(f"{name}: no such file {os.fspath(data)!r}", "undecodable") from None
    except Exception as e:
        raise InvalidInput(f"{name}: could not decode {what} as an image (PNG, JPEG, ...): {e}", "undecodable") from None


def _as_chw(x: Any, name: str, normalize: bool, max_pixels: int | None) -> torch.Tensor:
    """One image -> (C, H, W) uint8 (0..255) or float32 tensor (on the caller's device)."""
    if isinstance(x, (bytes, bytearray, memoryview, str, os.PathLike)):
        x = _decode(x, name, max_pixels)
    elif type(x).__module__.startswith("PIL.") and hasattr(x, "convert"):
        x = np.asarray(x.convert("RGB"), dtype=np.uint8)
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            # uint8 arrays are images: HxW or HxWxC (what load_image and decoders return).
            if x.ndim == 2:
                x = x[:, :, None]
            if x.ndim != 3 or x.shape[2] not in (1, 3):
                raise InvalidInput(f"{name}: uint8 arrays must be HxW, HxWx1 or HxWx3, got shape {x.shape}", "bad_type")
            x = np.ascontiguousarray(x)
            x = torch.from_numpy(x if x.flags.writeable else x.copy()).permute(2, 0, 1)
        elif np.issubdtype(x.dtype, np.floating):
            x = np.ascontiguousarray(x, dtype=np.float32)
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        else:
            raise InvalidInput(f"{name}: expected a uint8 image or a float array, got dtype {x.dtype}", "bad_type")
    if not isinstance(x, torch.Tensor):
        raise InvalidInput(
            f"{name}: expected a tensor, numpy array, encoded image bytes, a path or a PIL image, got {type(x).__name__}",
            "bad_type",
        )
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    elif x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise InvalidInput(f"{name}: expected one image (3 or 1, H, W) or (1, 3, H, W), got shape {tuple(x.shape)}", "bad_type")
    # Few torch calls here: each one releases the GIL, which many client threads then fight over.
    # NaN/Inf are checked per batch by the worker (one reduction), gradients never flow (no_grad).
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise InvalidInput(f"{name}: expected uint8 (0..255) or floating point, got {x.dtype}", "bad_type")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
    h, w = x.shape[1], x.shape[2]
    if max_pixels is not None and h * w > max_pixels:
        raise InvalidInput(f"{name}: image of {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}", "too_large")
    return x


@dataclass(eq=False)
class _Pair:
    a: torch.Tensor  # (3, H, W)
    b: torch.Tensor
    key: tuple
    future: concurrent.futures.Future
    t0: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Worker:
    """One device: its engine, a small inbox of batches, and its outstanding-pair count."""

    name: str
    engine: Any
    capacity: int  # batches in flight (running + waiting in the inbox)
    inbox: collections.deque = field(default_factory=collections.deque)
    in_flight: int = 0  # batches
    outstanding: int = 0  # pairs
    last_pick: int = 0
    thread: threading.Thread | None = None
    wake: threading.Condition | None = None  # over the scorer's lock: "your inbox has a batch"


def _engines_for(net, devices, model, version, dtype, compile, normalize, lpips_kwargs) -> list:
    """One ``Engine`` per device over one model (``model``, else ``LPIPS(net, version, **lpips_kwargs)``);
    ``devices`` None: every CUDA device, else the CPU."""
    from .engine import Engine
    from ..model import LPIPS

    if devices is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if isinstance(devices, (str, torch.device)):
        raise TypeError(f"devices: expected a list such as ['cpu'] or ['cuda:0', 'cuda:1'], got {devices!r}")
    if len(devices) == 0:
        raise ValueError("devices: got an empty list, expected at least one device")
    if model is None:
        model = LPIPS(net=net, version=version, **lpips_kwargs)
    elif lpips_kwargs:
        raise TypeError(f"Scorer: got both model= and LPIPS arguments {sorted(lpips_kwargs)}")
    return [Engine(model=model, device=d, dtype=dtype, compile=compile, normalize=normalize) for d in devices]


class Scorer:
    """Dynamic batching of single-pair LPIPS requests onto one ``Engine`` per device.

    Arguments:
        net, version: the model (as ``LPIPS``); ignored when ``model`` or ``engines`` is given.
        devices: e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu"]`` (a device may repeat: two CPU
            workers). Default: every visible GPU, else ``["cpu"]``.
        max_batch: most pairs per engine call.
        max_delay_ms: how long a group waits for company after its first pair.
        max_queue: most pairs waiting for a device (``submit`` raises ``Overloaded`` beyond).
        dtype, compile: passed to each ``Engine`` (defaults: fp32 eager on CPU, bf16 compiled on CUDA).
        normalize: float inputs are in [0, 1] instead of [-1, 1] (uint8 inputs are always 0..255).
        max_pixels: refuse images with more pixels (checked from the header before decoding).
        model: an ``LPIPS`` module to serve (copied to each device by its Engine).
        engines: ready engines (one worker each) instead of building them; each is called as
            ``engine(img0, img1) -> (N,1,1,1)`` and must expose ``.model`` (an ``LPIPS``).
        name: what ``stats()`` calls this scorer; also its metrics' ``model`` label unless
            ``metric_labels`` (constant labels of every metric) says otherwise.
        **lpips_kwargs: passed to ``LPIPS`` (pretrained, pnet_rand, model_path, trunk_path, spatial, ...).

    Inputs to ``score``/``submit``: tensors (3,H,W) or (1,3,H,W) (uint8 0..255 or float), numpy
    uint8 HxWx3 images or float arrays laid out as tensors, encoded image bytes, paths, PIL images.
    Results: a float per pair (``spatial=True``: an (H, W) float32 CPU tensor). Tensors and
    arrays are read when their batch runs, not copied at submission: leave them unchanged until
    the future is done.
    """

    def __init__(
        self,
        net: str = "alex",
        devices: Sequence[str | torch.device] | None = None,
        *,
        max_batch: int = 64,
        max_delay_ms: float = 2.0,
        max_queue: int = 4096,
        version: str = "0.1",
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
        normalize: bool = False,
        max_pixels: int | None = None,
        model: Any = None,
        engines: Sequence[Any] | None = None,
        name: str = "default",
        metric_labels: dict[str, str] | None = None,
        **lpips_kwargs: Any,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: got {max_batch!r}, expected an integer >= 1")
        if not max_delay_ms >= 0:
            raise ValueError(f"max_delay_ms: got {max_delay_ms!r}, expected a number >= 0")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue: got {max_queue!r}, expected an integer >= 1")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels: got {max_pixels!r}, expected an integer >= 1 or None")
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.normalize = bool(normalize)
        self.max_pixels = max_pixels
        self.name = name
        self._metric_labels = {"model": name} if metric_labels is None else dict(metric_labels)

        if engines is None:
            engines = _engines_for(net, devices, model, version, dtype, compile, self.normalize, lpips_kwargs)
        elif not engines:
            raise ValueError("engines: got an empty list, expected at least one engine")
        self.model = engines[0].model
        self.min_size = int(self.model.net.min_size)
        self.spatial = bool(self.model.spatial)
        self.net = str(self.model.pnet_type)
        self.version = str(self.model.version)

        names = [str(getattr(e, "device", "cpu")) for e in engines]
        self._workers = [
            _Worker(
                name=d if names.count(d) == 1 else f"{d}#{i}",
                engine=e,
                capacity=2 if str(d).startswith("cuda") else 1,
            )
            for i, (d, e) in enumerate(zip(names, engines))
        ]
        self.devices = [w.name for w in self._workers]

        # One lock, one condition per kind of waiter, so that a new pair wakes only the dispatcher
        # (and only when it changes a decision) and a finished batch only what it concerns.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # the dispatcher
        self._room = threading.Condition(self._lock)  # callers waiting for queue room
        for w in self._workers:
            w.wake = threading.Condition(self._lock)
        self._groups: collections.OrderedDict[tuple, collections.deque[_Pair]] = collections.OrderedDict()
        self._queued = 0  # pairs waiting for a device
        self._shape_cap: dict[tuple, int] = {}  # batch cap per shape after an out-of-memory error
        self._picks = itertools.count(1)
        self._closed = False
        self._stopping = False
        self._recent_latency: collections.deque[float] = collections.deque(maxlen=10000)
        self._init_metrics()

        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="lpips-scorer-dispatch", daemon=True)
        self._dispatcher.start()
        for w in self._workers:
            w.thread = threading.Thread(target=self._worker_loop, args=(w,), name=f"lpips-scorer-{w.name}", daemon=True)
            w.thread.start()

    @classmethod
    def from_settings(cls, settings: Any, *, model: Any = None, **overrides: Any) -> "Scorer":
        """A Scorer configured by the ``[model]`` and ``[scorer]`` sections of ``settings``
        (``lpips_fast.deploy.settings.load_settings()``); ``overrides`` win over both."""
        import torch

        m, sc = settings.section("model"), settings.section("scorer")
        if model is None:
            model = model_from_settings(m)
        kwargs: dict[str, Any] = {
            "devices": list(sc["devices"]) or None,
            "max_batch": sc["max_batch"],
            "max_delay_ms": sc["max_delay_ms"],
            "max_queue": sc["max_queue"],
            "dtype": None if m["dtype"] == "auto" else getattr(torch, m["dtype"]),
            "compile": {"auto": None, "on": True, "off": False}[m["compile"]],
        }
        kwargs.update(overrides)
        return cls(model=model, **kwargs)

    # -- metrics ------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        m = self.metrics = Metrics(const_labels=self._metric_labels)
        self._m_requests = m.counter("requests_total", "pairs submitted")
        self._m_pairs = m.counter("pairs_total", "pairs scored", ["device"])
        self._m_batches = m.counter("batches_total", "engine calls", ["device"])
        self._m_errors = m.counter("errors_total", "pairs failed, by kind", ["kind"])
        self._m_cancelled = m.counter("cancelled_total", "pairs cancelled before they ran")
        self._m_oom = m.counter("oom_retries_total", "batches halved after an out-of-memory error", ["device"])
        self._m_batch_size = m.histogram(
            "batch_size", "pairs per engine call", batch_size_buckets(self.max_batch), ["device"]
        )
        self._m_latency = m.histogram("latency_seconds", "submit to answer, per pair", LATENCY_BUCKETS_S)
        m.gauge("queue_depth", "pairs waiting for a device", lambda: self._queued)
        m.gauge("in_flight", "pairs handed to devices and not yet answered", lambda: sum(w.outstanding for w in self._workers))

    def stats(self) -> dict[str, Any]:
        """Counters and distributions so far (plain Python values; no prometheus-client needed)."""
        lat = sorted(self._recent_latency)

        def pct(q: float) -> float | None:
            return None if not lat else 1000.0 * lat[min(len(lat) - 1, int(q * len(lat)))]

        snap = self.metrics.snapshot()
        pairs = self._m_pairs.samples()
        batches = self._m_batches.samples()
        ooms = self._m_oom.samples()
        n_pairs, n_batches = sum(pairs.values()), sum(batches.values())
        return {
            "model": self.name,
            "requests": int(self._m_requests.total()),
            "pairs_scored": int(n_pairs),
            "errors": {k[0]: int(v) for k, v in self._m_errors.samples().items()},
            "cancelled": int(self._m_cancelled.total()),
            "batches": int(n_batches),
            "mean_batch_size": (n_pairs / n_batches) if n_batches else None,
            "batch_size": snap["batch_size"],
            "queue_depth": self._queued,
            "in_flight": sum(w.outstanding for w in self._workers),
            "oom_retries": int(sum(ooms.values())),
            "latency_ms": {"count": len(lat), "p50": pct(0.50), "p99": pct(0.99),
                           "mean": (1000.0 * sum(lat) / len(lat)) if lat else None},
            "devices": {
                w.name: {
                    "pairs": int(pairs.get((w.name,), 0)),
                    "batches": int(batches.get((w.name,), 0)),
                    "oom_retries": int(ooms.get((w.name,), 0)),
                    "outstanding": w.outstanding,
                }
                for w in self._workers
            },
        }

    # -- public API ---------------------------------------------------------------------------
    def submit(self, img0: Any, img1: Any) -> concurrent.futures.Future:
        """Queue one pair; returns a Future of its value. Raises ``Overloaded`` when the queue is full.

        Invalid inputs give a future that already holds an ``InvalidInput`` error.
        """
        return self._submit(img0, img1, block=False, timeout=None)

    def score(self, img0: Any, img1: Any, timeout: float | None = None) -> Any:
        """LPIPS of one pair, blocking (waits for queue room rather than raising ``Overloaded``).

        ``timeout`` (seconds) bounds the whole wait; on expiry the pair is cancelled and
        ``TimeoutError`` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        fut = self._submit(img0, img1, block=True, timeout=timeout)
        try:
            return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"score: no result within timeout={timeout} s") from None

    async def score_async(self, img0: Any, img1: Any, *, wait: bool = True) -> Any:
        """LPIPS of one pair, awaited; encoded images are decoded in a worker thread.

        With a full queue: waits (asynchronously) for room, or with ``wait=False`` raises
        ``Overloaded`` (what a service shedding load wants). Cancelling the awaiting task cancels
        the pair if it has not started.
        """
        if self._closed:
            raise RuntimeError("Scorer is closed")
        if _needs_decoding(img0) or _needs_decoding(img1):
            prepared = await asyncio.to_thread(self._prepare, img0, img1)
        else:
            prepared = self._prepare(img0, img1)
        self._m_requests.inc()
        delay = 0.001
        while True:
            try:
                fut = self._enqueue(prepared, block=False, timeout=None)
                break
            except Overloaded:
                if not wait:
                    self._m_errors.inc(kind="overloaded")
                    raise
                await asyncio.sleep(delay)
                delay = min(0.05, delay * 2)
        return await asyncio.wrap_future(fut)

    def warmup(self, size: int = 64) -> None:
        """Run one random ``size`` px pair on every device (weights resident, kernels loaded).

        Calls each engine directly: call it before sending traffic.
        """
        size = max(size, self.min_size)
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=g)
        b = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=g)
        for w in self._workers:
            with self._lock:
                w.outstanding += 1  # keeps the dispatcher's load picture honest while it runs
            try:
                with torch.no_grad():
                    w.engine(a, b)
            finally:
                with self._lock:
                    w.outstanding -= 1

    def close(self, cancel_pending: bool = False) -> None:
        """Stop accepting pairs, score the queued ones (or cancel them), and stop the threads."""
        with self._lock:
            self._closed = True
            if cancel_pending:
                for group in list(self._groups.values()):
                    for p in list(group):
                        p.future.cancel()
            self._wake.notify()
            self._room.notify_all()
        if self._dispatcher.is_alive() and threading.current_thread() is not self._dispatcher:
            self._dispatcher.join()
        for w in self._workers:
            if w.thread is not None and w.thread.is_alive() and threading.current_thread() is not w.thread:
                w.thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Scorer(net={self.net!r}, version={self.version!r}, devices={self.devices}, max_batch={self.max_batch}, "
            f"max_delay_ms={self.max_delay * 1000:g}, max_queue={self.max_queue})"
        )

    # -- queueing -------------------------------------------------------------------------------
    def _prepare(self, img0: Any, img1: Any) -> _Pair | InvalidInput:
        try:
            a = _as_chw(img0, "img0", self.normalize, self.max_pixels)
            b = _as_chw(img1, "img1", self.normalize, self.max_pixels)
            if a.shape[1:] != b.shape[1:]:
                raise InvalidInput(
                    f"img0/img1: image sizes must match, got {a.shape[2]}x{a.shape[1]} and {b.shape[2]}x{b.shape[1]}",
                    "shape_mismatch",
                )
            h, w = a.shape[1], a.shape[2]
            if min(h, w) < self.min_size:
                m = self.min_size
                raise InvalidInput(
                    f"img0/img1: images of {w}x{h} are smaller than the {self.net} trunk's minimum of {m}x{m}", "too_small"
                )
        except InvalidInput as e:
            return e
        if a.dtype != b.dtype:  # one uint8, one float: both float in the float convention
            a, b = (self._u8_to_float(x) if x.dtype == torch.uint8 else x for x in (a, b))
        if a.device != b.device:
            b = b.to(a.device)
        a = a.expand(3, -1, -1) if a.shape[0] == 1 else a
        b = b.expand(3, -1, -1) if b.shape[0] == 1 else b
        key = (a.dtype, str(a.device), h, w)
        return _Pair(a=a, b=b, key=key, future=concurrent.futures.Future())

    def _u8_to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        return x / 255.0 if self.normalize else x / 127.5 - 1.0

    def _submit(self, img0: Any, img1: Any, block: bool, timeout: float | None) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("Scorer is closed")
        prepared = self._prepare(img0, img1)
        self._m_requests.inc()
        try:
            return self._enqueue(prepared, block=block, timeout=timeout)
        except (Overloaded, TimeoutError):
            self._m_errors.inc(kind="overloaded")
            raise

    def _enqueue(self, prepared: _Pair | InvalidInput, block: bool, timeout: float | None) -> concurrent.futures.Future:
        """Queue a prepared pair (an invalid one gets a failed future). Counts nothing but input errors."""
        if isinstance(prepared, InvalidInput):
            self._m_errors.inc(kind=prepared.kind)
            log.debug("rejected pair: %s", prepared)
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(prepared)
            return fut
        p = prepared
        with self._lock:
            if self._closed:
                raise RuntimeError("Scorer is closed")
            if self._queued >= self.max_queue:
                if not block:
                    raise Overloaded(f"Scorer: {self._queued} pairs already queued (max_queue={self.max_queue}); retry later")
                ok = self._room.wait_for(lambda: self._queued < self.max_queue or self._closed, timeout)
                if self._closed:
                    raise RuntimeError("Scorer is closed")
                if not ok:
                    raise TimeoutError(f"score: the queue stayed full (max_queue={self.max_queue}) for {timeout} s")
            p.t0 = time.perf_counter()
            group = self._groups.setdefault(p.key, collections.deque())
            group.append(p)
            self._queued += 1
            # The dispatcher cares about a group's first pair (its deadline) and a full group.
            if len(group) == 1 or len(group) >= self._cap(p.key):
                self._wake.notify()
        p.future.add_done_callback(lambda f, p=p: self._on_done(p) if f.cancelled() else None)
        return p.future

    def _cap(self, key: tuple) -> int:
        return min(self.max_batch, self._shape_cap.get(key, self.max_batch))

    def _on_done(self, p: _Pair) -> None:
        """A cancelled pair leaves its group at once (if it is still waiting there)."""
        with self._lock:
            group = self._groups.get(p.key)
            if group is not None:
                try:
                    group.remove(p)
                except ValueError:
                    return  # already handed to a device: its worker drops it
                self._queued -= 1
                self._m_cancelled.inc()
                if not group:
                    del self._groups[p.key]
                self._room.notify()

    def _dispatch_loop(self) -> None:
        with self._lock:
            while True:
                if self._closed and self._queued == 0:
                    self._stopping = True
                    for w in self._workers:
                        w.wake.notify()
                    return
                now = time.perf_counter()
                ready, wait = None, None
                for key, group in self._groups.items():
                    due = group[0].t0 + self.max_delay
                    if len(group) >= self._cap(key) or now >= due or self._closed:
                        if ready is None or group[0].t0 < self._groups[ready][0].t0:
                            ready = key
                    else:
                        wait = due - now if wait is None else min(wait, due - now)
                free = [w for w in self._workers if w.in_flight < w.capacity]
                if ready is not None and free:
                    w = min(free, key=lambda w: (w.outstanding, w.last_pick))
                    w.last_pick = next(self._picks)
                    group = self._groups[ready]
                    batch = [group.popleft() for _ in range(min(self._cap(ready), len(group)))]
                    if not group:
                        del self._groups[ready]
                    self._queued -= len(batch)
                    w.inbox.append(batch)
                    w.in_flight += 1
                    w.outstanding += len(batch)
                    w.wake.notify()
                    self._room.notify_all()
                    continue
                # Nothing ready: sleep until the earliest group is due (or a new group or a full
                # one appears). Ready but every device busy: sleep until a worker finishes.
                self._wake.wait(timeout=wait if ready is None else None)

    def _worker_loop(self, w: _Worker) -> None:
        while True:
            with self._lock:
                w.wake.wait_for(lambda: w.inbox or self._stopping)
                if not w.inbox:
                    return
                batch = w.inbox.popleft()
            try:
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if len(live) < len(batch):
                    self._m_cancelled.inc(len(batch) - len(live))
                if live:
                    with torch.no_grad():
                        self._run_batch(w, live)
            except BaseException as e:  # never leave a future hanging
                for p in batch:
                    if p.future.running():
                        p.future.set_exception(e)
                log.exception("scorer worker %s: unexpected error", w.name)
            finally:
                with self._lock:
                    w.in_flight -= 1
                    w.outstanding -= len(batch)
                    self._wake.notify()

    def _run_batch(self, w: _Worker, pairs: list[_Pair]) -> None:
        """Stack a batch, fail the pairs holding NaN/Inf on their own, score the rest."""
        a = torch.stack([p.a for p in pairs])
        b = torch.stack([p.b for p in pairs])
        if a.is_floating_point():
            fin0 = torch.isfinite(a).flatten(1).all(1)
            fin1 = torch.isfinite(b).flatten(1).all(1)
            ok = (fin0 & fin1).tolist()
            if not all(ok):
                bad0 = (~fin0).tolist()
                for i in (i for i, good in enumerate(ok) if not good):
                    name = "img0" if bad0[i] else "img1"
                    self._m_errors.inc(kind="nonfinite")
                    pairs[i].future.set_exception(InvalidInput(f"{name}: contains NaN or Inf values", "nonfinite"))
                keep = [i for i, good in enumerate(ok) if good]
                if not keep:
                    return
                pairs = [pairs[i] for i in keep]
                a, b = a[keep], b[keep]
        self._run(w, pairs, a, b)

    def _run(self, w: _Worker, pairs: list[_Pair], a: torch.Tensor, b: torch.Tensor) -> None:
        """Score ``pairs`` (stacked in ``a``, ``b``) on ``w``; on failure split in halves so only
        failing pairs fail."""
        n = len(pairs)
        h = n // 2
        try:
            out = w.engine(a, b).detach().to("cpu", torch.float32)
        except torch.OutOfMemoryError as e:
            self._m_oom.inc(device=w.name)
            if w.name.startswith("cuda"):
                torch.cuda.empty_cache()
            if n == 1:
                self._fail(pairs, e, "out_of_memory")
                return
            key = pairs[0].key
            with self._lock:
                self._shape_cap[key] = min(self._shape_cap.get(key, self.max_batch), n // 2)
            log.warning("scorer %s: out of memory at a batch of %d %s pairs; halving", w.name, n, key[2:])
            self._run(w, pairs[:h], a[:h], b[:h])
            self._run(w, pairs[h:], a[h:], b[h:])
            return
        except Exception as e:
            if n == 1:
                self._fail(pairs, e, "engine")
                return
            self._run(w, pairs[:h], a[:h], b[:h])
            self._run(w, pairs[h:], a[h:], b[h:])
            return
        self._m_batches.inc(device=w.name)
        self._m_batch_size.observe(n, device=w.name)
        self._m_pairs.inc(n, device=w.name)
        now = time.perf_counter()
        if self.spatial:
            values: Iterable[Any] = [out[i, 0].clone() for i in range(n)]
        else:
            values = out.view(n, -1)[:, 0].tolist()
        for p, v in zip(pairs, values):
            dt = now - p.t0
            self._m_latency.observe(dt)
            self._recent_latency.append(dt)
            p.future.set_result(v)

    def _fail(self, pairs: list[_Pair], e: BaseException, kind: str) -> None:
        self._m_errors.inc(len(pairs), kind=kind)
        log.warning("scorer: a pair failed in the engine (%s: %s)", type(e).__name__, e)
        for p in pairs:
            p.future.set_exception(e)


def model_from_settings(model_settings: dict[str, Any], *, net: str | None = None, version: str | None = None,
                        state_dict: str | None = None, lin_set: str | None = None) -> Any:
    """The LPIPS module a ``[model]`` settings section describes (``settings.section("model")``).

    ``net``/``version``/``state_dict`` replace the section's; ``lin_set`` names a registered lin
    set (``lpips_fast.weights.registry``, ``NAME[@N]``) instead of the section's ``lin`` file.
    """
    from ..model_cache import build_model

    net = net or model_settings["net"]
    version = version or model_settings["version"]
    if lin_set is not None:
        from ..model import LPIPS

        if model_settings["random_trunk"]:
            torch.manual_seed(model_settings["seed"])
        m = LPIPS(net=net, version=version, lin=lin_set, pnet_rand=bool(model_settings["random_trunk"]),
                  trunk_path=model_settings["trunk"])
        return m.eval()
    return build_model(net, version, state_dict=state_dict or model_settings["state_dict"], trunk=model_settings["trunk"],
                       lin=model_settings["lin"], random_trunk=model_settings["random_trunk"], seed=model_settings["seed"])


def _needs_decoding(x: Any) -> bool:
    return isinstance(x, (bytes, bytearray, memoryview, str, os.PathLike)) or type(x).__module__.startswith("PIL.")
