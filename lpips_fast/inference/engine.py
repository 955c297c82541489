"""``Engine``: fixed-shape LPIPS inference, as fast as the trunk's convolutions allow.

    engine = lpips_fast.Engine(net="alex", device="cuda")      # bf16, compiled, CUDA graphs
    d = engine(img0, img1)                                      # (N,1,1,1) float32

What it does beyond ``LPIPS.forward``:

- both images go through one batched trunk pass, in ``dtype`` (bf16 on CUDA by default) and
  channels_last where that is faster; the distance op accumulates in fp32;
- ``uint8`` images (0..255, what decoders and the pinned pipeline produce) are accepted and mapped
  to [-1, 1] plus the v0.1 scaling on the device, so only bytes cross the bus;
- on CUDA, one CUDA graph per (batch, C, H, W, input dtype) with static input buffers; warm-up on
  a side stream with cudnn autotuning switched on; graphs kept in a small LRU; a short batch is
  padded to the smallest captured batch that holds it and the result trimmed;
- results are fresh tensors (cloned from the graph's static output), so later replays cannot
  overwrite them;
- ``compile=True`` applies ``torch.compile`` to preprocessing + trunk (the distance op stays one
  kernel per layer);
- a failing compile or capture falls back to eager with one warning (per kind), never a crash.

No input validation beyond shapes and dtypes, and no NaN check (that would be a device sync per
call): the Engine is for pipelines that already trust their inputs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model import LPIPS, identical_pairs
from ..nets import canonical_net_name
from ..profiling import nvtx_range

__all__ = ["Engine", "uint8_to_unit", "PRECISIONS", "ENGINE_PRECISIONS", "precision_settings"]

#: Precision names as ``lpips-fast tune`` reports them. The Engine runs the first six; 'aoti'
#: (``lpips_fast.deploy.export.aoti``) and 'int8' (``tune``'s quantised trunk) are other runtimes.
PRECISIONS = ("fp32", "fp32-nchw", "bf16", "bf16-nchw", "fp16", "fp16-nchw", "aoti", "int8")
ENGINE_PRECISIONS = PRECISIONS[:6]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_settings(precision: str) -> dict:
    """``{"dtype", "channels_last"}`` for a precision name (``"bf16"``, ``"fp32-nchw"``, ...)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}, expected one of {PRECISIONS}")
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(
            f"precision: {precision!r} is not an Engine setting; use lpips_fast.deploy.export.aoti (aoti) or "
            "select_precision's int8 trunk (int8)"
        )
    dtype, _, layout = precision.partition("-")
    return {"dtype": _DTYPES[dtype], "channels_last": layout != "nchw"}


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (``x / 127.5 - 1``, the conversion the docs suggest)."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass
class _Graph:
    """One captured shape: static inputs, the graph and its static output."""

    graph: Any  # torch.cuda.CUDAGraph
    in0: torch.Tensor
    in1: torch.Tensor
    out: torch.Tensor


class Engine:
    """Fixed-shape LPIPS inference: one trunk pass, low precision, torch.compile, CUDA graphs.

    Arguments:
        net: 'alex', 'vgg' (or 'vgg16') or 'squeeze'; ignored when ``model`` is given.
        device: where to run (default: CUDA if available, else CPU).
        dtype: trunk precision; default bfloat16 on CUDA, float32 on CPU. The distance
            accumulates in fp32 and the result is always float32.
        precision: a name as ``lpips-fast tune`` reports it ('fp32', 'bf16', 'fp16', each
            optionally '-nchw'): sets ``dtype`` and ``channels_last`` (give either, not both).
        compile: torch.compile preprocessing + trunk. Default: True on CUDA, False on CPU
            (on the 2-core dev CPU, alex 64 px batch 16: ~20 s of compilation per shape for
            ~5% over eager channels_last oneDNN convolutions). Each (engine, shape) is one
            Dynamo recompile; past ``torch._dynamo.config.recompile_limit`` (default 8) Dynamo
            runs the function eagerly.
        cuda_graphs: capture one graph per shape (CUDA only; ignored on CPU). Default True.
        channels_last: trunk memory format; default True (faster on CUDA's tensor cores and,
            for all three trunks, on the CPU).
        normalize: float inputs are in [0, 1] (as ``LPIPS.forward(normalize=True)``); uint8
            inputs are always 0..255.
        max_graphs: how many captured shapes to keep (least recently used is dropped).
        batch_size: if given, every call is cut into chunks of this many pairs and a short chunk
            is padded, so exactly one graph per image size is ever captured.
        model: an existing ``LPIPS`` module to take weights and settings from (not modified).
        **lpips_kwargs: passed to ``LPIPS(...)`` when ``model`` is None (pretrained, version,
            lpips, pnet_rand, model_path, trunk_path, ...).
    """

    def __init__(
        self,
        net: str = "alex",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
        cuda_graphs: bool = True,
        *,
        precision: str | None = None,
        channels_last: bool | None = None,
        normalize: bool = False,
        max_graphs: int = 4,
        batch_size: int | None = None,
        model: LPIPS | None = None,
        **lpips_kwargs: Any,
    ) -> None:
        if precision is not None:
            if dtype is not None or channels_last is not None:
                raise ValueError("precision: give either precision= or dtype=/channels_last=, not both")
            settings = precision_settings(precision)
            dtype, channels_last = settings["dtype"], settings["channels_last"]
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        is_cuda = self.device.type == "cuda"
        if dtype is None:
            dtype = torch.bfloat16 if is_cuda else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: got {dtype}, expected torch.float32, torch.float16 or torch.bfloat16")
        if max_graphs < 1:
            raise ValueError(f"max_graphs: got {max_graphs}, expected >= 1")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}, expected >= 1 or None")
        self.dtype = dtype
        self.normalize = bool(normalize)
        self.max_graphs = int(max_graphs)
        self.batch_size = batch_size
        self.compile = bool(is_cuda if compile is None else compile)
        self.cuda_graphs = bool(cuda_graphs and is_cuda)
        # Default NHWC everywhere. CUDA: what tensor-core convolutions want. CPU (oneDNN, measured
        # on the 2-core dev machines, benchmarks/README.md): 1.3-2.6x faster for alex and squeeze;
        # for vgg's forward (the engine never runs a backward) 1.45x (64 px x16: 277 vs 407 ms).
        self.channels_last = True if channels_last is None else bool(channels_last)

        if model is None:
            lpips_kwargs.setdefault("nonfinite", "propagate")
            model = LPIPS(net=canonical_net_name(net), **lpips_kwargs)
        elif lpips_kwargs:
            raise TypeError(f"Engine: got both model= and LPIPS arguments {sorted(lpips_kwargs)}")
        # A private copy: the engine casts the trunk and must not change the caller's module.
        model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = model.to(self.device)
        self.model.net.to(dtype=dtype)
        # Set the format either way: a module may arrive with a channels_last trunk.
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.net.to(memory_format=fmt)
        self.spatial = model.spatial
        self.net = model.pnet_type

        self._features_fn: Callable[[torch.Tensor], list[torch.Tensor]] = self._features_eager
        self._compiled_active = False  # True while _features_fn is the torch.compile'd function
        if self.compile:
            try:
                self._features_fn = torch.compile(self._features_eager, dynamic=False)
                self._compiled_active = True
            except Exception as e:  # torch.compile itself is lazy; this only catches setup errors
                self._fallback("compile", e)
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._uncapturable: set[tuple] = set()  # shapes whose capture failed after others succeeded
        self._warned: set[str] = set()
        self._side_stream = None
        self.stats = {"captures": 0, "replays": 0, "eager_calls": 0, "evictions": 0}

    # -- the computation ------------------------------------------------------------------
    def _to_trunk_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (uint8 0..255 or float) -> scaled trunk input in ``dtype`` / memory format."""
        if x.dtype == torch.uint8:
            x = uint8_to_unit(x)
            x = self.model.preprocess(x, normalize=False)
        else:
            x = self.model.preprocess(x.to(torch.float32), normalize=self.normalize)
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _features_eager(self, x: torch.Tensor) -> list[torch.Tensor]:
        with nvtx_range("lpips_fast/preprocess"):
            x = self._to_trunk_input(x)
        with nvtx_range("lpips_fast/trunk"):
            return self.model.net(x)

    def _compute(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        """in0, in1: (n, C, H, W) on the device, same dtype. Returns (n,1,1,1) (or spatial) fp32."""
        n = in0.shape[0]
        feats = self._features_fn(torch.cat([in0, in1]))
        f0 = [f[:n] for f in feats]
        f1 = [f[n:] for f in feats]
        out = self.model.distances(f0, f1, out_hw=tuple(in0.shape[2:]), same=identical_pairs(in0, in1))
        return out.to(torch.float32)

    def _run_eager(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        self.stats["eager_calls"] += 1
        try:
            return self._compute(in0, in1)
        except Exception as e:
            # Out of memory is the caller's to handle (the dataset layer halves the batch); an
            # eager run has nothing to fall back to.
            if not self._compiled_active or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            # Compilation happens on the first call of each shape: fall back once, then retry.
            self._fallback("compile", e)
            return self._compute(in0, in1)

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair: (N,1,1,1) float32 (or (N,1,H,W) with a spatial model).

        ``img0``/``img1``: (N,C,H,W) or (1,C,H,W) (broadcast), C in {1,3}, uint8 (0..255) or
        float ([-1,1], or [0,1] with ``normalize=True``), on any device (copied to ``device``).
        """
        in0, in1, n = self._check(img0, img1)
        if n == 0:
            shape = (0, 1) + (tuple(in0.shape[2:]) if self.spatial else (1, 1))
            return torch.zeros(shape, device=self.device)
        step = self.batch_size or n
        outs = []
        with self._cudnn_benchmark():
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                a = in0[lo:hi] if in0.shape[0] > 1 else in0
                b = in1[lo:hi] if in1.shape[0] > 1 else in1
                outs.append(self._call_chunk(a, b, hi - lo))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    forward = __call__

    def _call_chunk(self, a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
        entry = self._graph_for(n, a, b) if self.cuda_graphs else None
        if entry is None:  # no graphs, or this shape could not be captured
            with nvtx_range("lpips_fast/h2d"):
                # non_blocking only towards a GPU: a device-to-host copy must finish before the
                # CPU reads it.
                nb = self.device.type == "cuda"
                a = a.to(self.device, non_blocking=nb).expand(n, *a.shape[1:])
                b = b.to(self.device, non_blocking=nb).expand(n, *b.shape[1:])
            if a.dtype != b.dtype:  # two float dtypes (uint8 with float is rejected in _check)
                a, b = a.to(torch.float32), b.to(torch.float32)
            return self._run_eager(a, b)
        with nvtx_range("lpips_fast/h2d"):
            # copy_ broadcasts a batch of 1 and moves host tensors (async from pinned memory).
            entry.in0[:n].copy_(a, non_blocking=True)
            entry.in1[:n].copy_(b, non_blocking=True)
        entry.graph.replay()
        self.stats["replays"] += 1
        return entry.out[:n].clone()

    # -- CUDA graphs ----------------------------------------------------------------------
    def _key(self, batch: int, a: torch.Tensor, b: torch.Tensor) -> tuple:
        dt = a.dtype if a.dtype == b.dtype else torch.float32
        return (batch, a.shape[1], a.shape[2], a.shape[3], dt)

    def _graph_for(self, n: int, a: torch.Tensor, b: torch.Tensor) -> _Graph | None:
        # With batch_size set, capture at that size so one graph per image size serves every call.
        want = self._key(max(n, self.batch_size or 0), a, b)
        # Reuse the smallest captured batch that holds n pairs of the same image shape.
        best = None
        for key in self._graphs:
            if key[1:] == want[1:] and key[0] >= n and (best is None or key[0] < best[0]):
                best = key
        if best is not None:
            self._graphs.move_to_end(best)
            return self._graphs[best]
        if want in self._uncapturable:
            return None
        try:
            entry = self._capture(want)
        except Exception as e:
            if self.stats["captures"] == 0:
                # Nothing was ever captured: graphs do not work here, eager from now on.
                self._fallback("cuda_graphs", e)
                self.cuda_graphs = False
            else:
                # Other shapes captured fine (this one may be too big): only this shape runs eager.
                self._fallback("cuda_graphs_shape", e)
                self._uncapturable.add(want)
            return None
        self._graphs[want] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats["evictions"] += 1
        return entry

    def _capture(self, key: tuple) -> _Graph:
        batch, c, h, w, dt = key
        dev = self.device
        # Static inputs live outside the graph's pool; fresh (not zero) data for the warm-up so
        # that nothing is tuned on a degenerate input.
        gen = torch.Generator(device=dev).manual_seed(0)
        if dt == torch.uint8:
            in0 = torch.randint(0, 256, (batch, c, h, w), device=dev, dtype=dt, generator=gen)
            in1 = torch.randint(0, 256, (batch, c, h, w), device=dev, dtype=dt, generator=gen)
        else:
            in0 = torch.rand((batch, c, h, w), device=dev, generator=gen).mul_(2).sub_(1).to(dt)
            in1 = torch.rand((batch, c, h, w), device=dev, generator=gen).mul_(2).sub_(1).to(dt)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=dev)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            # Warm-up: compiles (if asked), autotunes cudnn, creates cuBLAS/cuDNN handles on
            # the stream that will capture.
            for _ in range(3):
                self._run_eager(in0, in1)
            self.stats["eager_calls"] -= 3
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pinning memory in another thread must not break capture.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            out = self._compute(in0, in1)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.stats["captures"] += 1
        return _Graph(graph=graph, in0=in0, in1=in1, out=out)

    @contextlib.contextmanager
    def _cudnn_benchmark(self):
        if self.device.type != "cuda":
            yield
            return
        prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = prev

    # -- helpers --------------------------------------------------------------------------
    def _fallback(self, kind: str, err: BaseException) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            what, scope = {
                "compile": ("torch.compile", "running eager from now on"),
                "cuda_graphs": ("CUDA graph capture", "running eager from now on"),
                "cuda_graphs_shape": ("CUDA graph capture of a new shape", "shapes that fail run eager"),
            }[kind]
            warnings.warn(
                f"lpips_fast.Engine: {what} failed ({type(err).__name__}: {err}); "
                f"{scope} (same results, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
        if kind == "compile":
            self.compile = False
            self._features_fn = self._features_eager
            self._compiled_active = False

    def _check(self, img0: Any, img1: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        for name, x in (("img0", img0), ("img1", img1)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor (N, C, H, W), got {type(x).__name__}")
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"{name}: expected shape (N, 3 or 1, H, W), got {tuple(x.shape)}")
            if x.dtype != torch.uint8 and not torch.is_floating_point(x):
                raise TypeError(f"{name}: expected uint8 (0..255) or floating point, got {x.dtype}")
        if (img0.dtype == torch.uint8) != (img1.dtype == torch.uint8):
            raise TypeError(
                f"img0/img1: both uint8 (0..255) or both floating point, got {img0.dtype} and {img1.dtype}"
            )
        if img0.shape[1:] != img1.shape[1:]:
            raise ValueError(
                f"img0/img1: channel and image sizes must match, got {tuple(img0.shape)} and {tuple(img1.shape)}"
            )
        n0, n1 = img0.shape[0], img1.shape[0]
        if n0 != n1 and 1 not in (n0, n1):
            raise ValueError(f"img0/img1: batch sizes must match or one must be 1, got {n0} and {n1}")
        h, w = img0.shape[2], img0.shape[3]
        m = self.model.net.min_size
        if min(h, w) < m:
            raise ValueError(f"img0/img1: images of {h}x{w} are smaller than the {self.net} trunk's minimum of {m}x{m}")
        n = 0 if 0 in (n0, n1) else max(n0, n1)
        return img0, img1, n

    def clear(self) -> None:
        """Drop every captured graph (frees their memory pools)."""
        self._graphs.clear()

    def __repr__(self) -> str:
        return (
            f"Engine(net={self.net!r}, device={str(self.device)!r}, dtype={self.dtype}, compile={self.compile}, "
            f"cuda_graphs={self.cuda_graphs}, channels_last={self.channels_last}, graphs={len(self._graphs)})"
        )
