"""Sharding pairs across ``torchrun`` processes (torch.distributed; gloo on CPU, nccl on GPU).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank scores the pairs
``todo[rank::world]`` on its own device, window by window; after each window the rows of all
ranks are gathered to rank 0, which alone writes the output. Window ``k`` of all ranks covers the
consecutive job positions ``[k*window*world, (k+1)*window*world)``, so rank 0 writes the rows in
the same order as a single-process run. Resume: rank 0 reads the existing output and broadcasts
the job positions still to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DistContext", "init_from_env", "shard", "windows_per_rank"]


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list | None:
        """``obj`` of every rank on rank 0 (a list indexed by rank), None elsewhere."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_max(self, value: int) -> int:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def close(self, barrier: bool = False) -> None:
        """Leave the process group if this context joined it; ``barrier``: wait for every rank
        first (on the normal path: a rank that tears gloo down while a peer still talks to it can
        abort with 'terminate called without an active exception')."""
        if self.initialized_here:
            import torch.distributed as dist

            if dist.is_initialized():
                if barrier:
                    dist.barrier()
                dist.destroy_process_group()
            self.initialized_here = False


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init_from_env(device: str | None = None) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun; returns the context and this rank's device.

    ``device`` is the user's choice ('cpu', 'cuda', 'cuda:1', None for automatic). Under torchrun
    with CUDA each rank takes ``cuda:LOCAL_RANK`` and the nccl backend; on the CPU gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    here = False
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        here = True
    ctx = DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, backend=backend, initialized_here=here)
    return ctx, str(dev)


def shard(todo: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's share of the job positions: ``todo[rank::world]``."""
    return list(todo[ctx.rank :: ctx.world]) if ctx.enabled else list(todo)


def windows_per_rank(n_todo: int, window: int, ctx: DistContext) -> int:
    """Rounds every rank runs (the largest shard's windows), so gathers pair up across ranks."""
    per = -(-n_todo // ctx.world) if ctx.enabled else n_todo
    return -(-per // max(1, window))
