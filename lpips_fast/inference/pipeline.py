"""Host -> device feeding for the Engine: a ring of pooled pinned buffers and a copy stream.

    engine = Engine(net="alex", device="cuda")
    pipe = PinnedPipeline(engine, slots=3)
    for d in pipe.map(batches):        # batches: iterable of (uint8 img0, uint8 img1) on the host
        ...                            # d: (n,) float32 on the host, in input order

Per batch, on CUDA:

1. host: wait until the slot's previous host->device copy has finished (``copied`` event), then
   write the batch into the slot's pinned buffer (pooled: reallocated only when a batch is larger);
2. copy stream: wait until the compute stream has consumed the slot's previous device buffer
   (``consumed`` event), then copy pinned -> device with ``non_blocking=True``; record ``copied``;
3. compute stream: wait for ``copied``, run the engine (uint8 -> [-1, 1] + scaling fused on the
   device), record ``consumed``, copy the (tiny) result back to pinned host memory;
4. results are handed out in input order, ``depth`` batches behind, so copies of batch k+1
   overlap the trunk of batch k.

uint8 crosses the bus (4x fewer bytes than float32). On CPU (or without CUDA) the same API runs
the engine batch by batch, without pinning or streams.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import torch

from ..profiling import nvtx_range

__all__ = ["PinnedPipeline", "PinnedSlot"]


class PinnedSlot:
    """One ring slot: pinned host buffers, device buffers and the two events guarding them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: list[torch.Tensor | None] = [None, None]
        self.dev: list[torch.Tensor | None] = [None, None]
        self.copied = torch.cuda.Event()  # H2D copy from ``host`` finished
        self.consumed = torch.cuda.Event()  # compute has read ``dev``
        self.used = False
        self.allocations = 0

    def _buffer(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Views of this slot's buffers shaped like ``like``, and whether they are new."""
        numel = like.numel()
        h = self.host[i]
        fresh = h is None or h.numel() < numel or h.dtype != like.dtype
        if fresh:
            # Pooled: grow only (pin_memory allocations are slow and synchronising).
            self.host[i] = torch.empty(numel, dtype=like.dtype, pin_memory=True)
            self.dev[i] = torch.empty(numel, dtype=like.dtype, device=self.device)
            self.allocations += 1
        host = self.host[i][:numel].view(like.shape)
        dev = self.dev[i][:numel].view(like.shape)
        return host, dev, fresh


class PinnedPipeline:
    """Feed (img0, img1) host batches through ``engine`` with pinned, overlapped copies.

    Arguments:
        engine: a callable ``engine(img0, img1) -> (n,1,1,1)`` with a ``device`` attribute,
            normally ``lpips_fast.Engine``.
        slots: ring size K (>= 2 to overlap); each slot holds one batch's pinned + device buffers.
        depth: how many batches may be in flight before the oldest result is handed out
            (default ``slots - 1``).
    """

    def __init__(self, engine: Any, slots: int = 3, depth: int | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots: got {slots}, expected >= 1")
        depth = slots - 1 if depth is None else depth
        if not 0 <= depth < slots:
            raise ValueError(f"depth: got {depth}, expected 0 <= depth < slots ({slots})")
        self.engine = engine
        self.device = torch.device(getattr(engine, "device", "cpu"))
        self.slots = slots
        self.depth = depth
        self.use_cuda = self.device.type == "cuda"
        self._ring: list[PinnedSlot] = []
        self._copy_stream = None
        # host_waits: times the host found a slot's copy still running and had to wait for it.
        self.stats = {"batches": 0, "host_waits": 0}

    # -- CUDA path ------------------------------------------------------------------------
    def _setup(self) -> None:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
            self._ring = [PinnedSlot(self.device) for _ in range(self.slots)]

    def _stage(self, k: int, img0: torch.Tensor, img1: torch.Tensor) -> tuple[PinnedSlot, torch.Tensor, torch.Tensor]:
        slot = self._ring[k % self.slots]
        if slot.used and not slot.copied.query():
            # The slot's previous host->device copy is still running: rewriting its pinned
            # buffer now would corrupt that batch on the device.
            self.stats["host_waits"] += 1
            slot.copied.synchronize()
        pairs = []
        fresh = False
        for i, img in enumerate((img0, img1)):
            host, dev, new = slot._buffer(i, img)
            fresh = fresh or new
            host.copy_(img)  # CPU memcpy into pinned memory
            pairs.append((host, dev))
        stream = self._copy_stream
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream), nvtx_range("lpips_fast/h2d"):
            if fresh:
                # A new device buffer comes from the compute stream's pool: its memory may still
                # be read by queued compute work, so the copy waits for everything queued there.
                stream.wait_stream(compute)
            elif slot.used:
                stream.wait_event(slot.consumed)  # compute is done reading this slot's device buffer
            for host, dev in pairs:
                dev.copy_(host, non_blocking=True)
            slot.copied.record(stream)
        slot.used = True
        return slot, pairs[0][1], pairs[1][1]

    def _submit(self, slot: PinnedSlot, d0: torch.Tensor, d1: torch.Tensor):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(slot.copied)
        out = self.engine(d0, d1)
        slot.consumed.record(compute)
        res = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        res.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return res, done

    # -- public API -----------------------------------------------------------------------
    def map(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[torch.Tensor]:
        """Yield each batch's distances as a host float32 tensor of shape (n,) (or the engine's
        spatial shape), in input order."""
        if not self.use_cuda:
            for img0, img1 in batches:
                self.stats["batches"] += 1
                yield _squeeze(self.engine(_as_tensor(img0), _as_tensor(img1)))
            return
        self._setup()
        pending: collections.deque = collections.deque()
        for k, (img0, img1) in enumerate(batches):
            img0, img1 = _as_tensor(img0), _as_tensor(img1)
            # The device context only around our own calls: never left set while the caller
            # runs between two yields.
            with torch.cuda.device(self.device):
                slot, d0, d1 = self._stage(k, img0, img1)
                pending.append(self._submit(slot, d0, d1))
            self.stats["batches"] += 1
            while len(pending) > self.depth:
                yield _finish(*pending.popleft())
        while pending:
            yield _finish(*pending.popleft())

    def run(self, batches: Iterable[tuple[Any, Any]]) -> torch.Tensor:
        """All distances of ``batches`` concatenated, in order."""
        outs = list(self.map(batches))
        return torch.cat(outs) if outs else torch.zeros(0)


def _finish(res: torch.Tensor, done: Any) -> torch.Tensor:
    done.synchronize()
    return _squeeze(res)


def _squeeze(out: torch.Tensor) -> torch.Tensor:
    """(n,1,1,1) -> (n,); spatial maps (n,1,H,W) unchanged."""
    return out.reshape(out.shape[0]) if out.shape[1:].numel() == 1 else out


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)
