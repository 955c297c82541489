"""``select_precision``: measure each way of running LPIPS on this device, pick the fastest one
that stays within an accuracy budget against the exact fp32 module.

    from lpips_fast import select_precision
    rep = select_precision(net="alex", device="cpu")
    print(rep.markdown()); rep.choice            # e.g. 'fp32'

Candidates (one row each; a row the stack cannot run says why instead of a number):

- ``fp32``, ``fp32-nchw``: ``Engine`` in float32 with a channels_last / NCHW trunk;
- ``bf16``, ``bf16-nchw``, ``fp16``, ``fp16-nchw``: ``Engine`` with a low-precision trunk (the
  distance accumulates in fp32);
- ``aoti``: the ``torch.export`` + AOTInductor package of ``lpips_fast.deploy.export.aoti`` (CPU);
- ``int8``: static post-training quantization of the trunk (``torch.ao.quantization`` FX graph
  mode, x86 backend, per-channel weights, calibrated on generated distortions disjoint from the
  evaluation pairs); CPU only.

Accuracy is measured against ``LPIPS`` (float32, the exact reference path) on the same pairs:
max / mean absolute error, Spearman rank correlation and 2AFC agreement (for every two pairs
that share a reference image, whether the row orders them as fp32 does). Speed: pairs/s, the
median of ``repeats`` timed passes after one warm-up pass. Memory: on CUDA the peak allocated
bytes during one batch; on the CPU the growth of the process's peak resident set during one
batch (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), the candidate's first batch;
memory the allocator reuses from earlier work is not counted, so it is a lower bound. Model size: bytes of the weights as run (the
package file for ``aoti``, the serialized quantized trunk plus lin weights for ``int8``).

:func:`engine_kwargs` turns a reported precision name into ``Engine`` arguments.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .comparison import spearman
from ..inference.engine import PRECISIONS, precision_settings
from ..model import LPIPS

__all__ = ["select_precision", "TuneReport", "TuneRow", "engine_kwargs", "PRECISIONS", "DEFAULT_BUDGET", "generated_pairs"]

DEFAULT_BUDGET = {"two_afc": 0.99, "spearman": 0.999}


def engine_kwargs(precision: str) -> dict:
    """``Engine`` keyword arguments for a precision name from :data:`PRECISIONS`."""
    return precision_settings(precision)


@dataclass
class TuneRow:
    name: str
    status: str  # 'ok', 'unsupported' or 'error'
    reason: str = ""
    pairs_per_s: float | None = None
    peak_mem_bytes: int | None = None
    model_bytes: int | None = None
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    spearman: float | None = None
    two_afc: float | None = None
    within_budget: bool = False


@dataclass
class TuneReport:
    net: str
    device: str
    size: tuple[int, int]
    n_pairs: int
    n_triplets: int
    batch_size: int
    budget: dict
    memory_method: str
    rows: list[TuneRow] = field(default_factory=list)
    choice: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    def markdown(self) -> str:
        def f(v, spec):
            return "-" if v is None else format(v, spec)

        h, w = self.size
        lines = [
            f"{self.net} on {self.device}, {h}x{w}, {self.n_pairs} pairs ({self.n_triplets} 2AFC triplets), "
            f"batch {self.batch_size}; budget: 2AFC >= {self.budget['two_afc']}, Spearman >= {self.budget['spearman']}",
            "",
            "| precision | pairs/s | peak mem MB | model MB | max abs err | mean abs err | Spearman | 2AFC | in budget |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if r.status != "ok":
                lines.append(f"| {r.name} | {r.status}: {r.reason} | | | | | | | |")
                continue
            mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 1e6
            size = None if r.model_bytes is None else r.model_bytes / 1e6
            lines.append(
                f"| {r.name}{' (chosen)' if r.name == self.choice else ''} | {f(r.pairs_per_s, '.1f')} | {f(mem, '.1f')} | "
                f"{f(size, '.1f')} | {f(r.max_abs_err, '.2g')} | {f(r.mean_abs_err, '.2g')} | {f(r.spearman, '.6f')} | "
                f"{f(r.two_afc, '.4f')} | {'yes' if r.within_budget else 'no'} |"
            )
        lines += ["", f"chosen: {self.choice}", f"memory: {self.memory_method}"]
        return "\n".join(lines)


# -- evaluation data -------------------------------------------------------------------------
def generated_pairs(size: tuple[int, int] = (64, 64), levels: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Distortions of the photographs under ``examples/``: for each photo, ``levels`` Gaussian
    noise and ``levels`` blur strengths. Returns (in0, in1) float32 (N,3,H,W) in [-1, 1] and the
    (N,) index of each pair's reference photo (pairs with one reference form 2AFC triplets)."""
    from PIL import Image, ImageFilter

    root = Path(__file__).resolve().parents[2] / "examples" / "clean"
    photos = sorted(root.glob("*.png"))
    if not photos:
        raise FileNotFoundError(f"generated_pairs: no photographs under {root}; pass pairs= explicitly")
    rng = np.random.default_rng(seed)
    h, w = size
    a, b, ref = [], [], []
    for k, p in enumerate(photos):
        with Image.open(p) as im:
            im = im.convert("RGB").resize((w, h), Image.BICUBIC)
        clean = np.asarray(im, np.float64)
        for lv in range(1, levels + 1):
            noisy = np.clip(clean + rng.normal(0, 4.0 * lv, clean.shape), 0, 255).round()
            blurred = np.asarray(im.filter(ImageFilter.GaussianBlur(0.4 * lv)), np.float64)
            for d in (noisy, blurred):
                a.append(clean)
                b.append(d)
                ref.append(k)

    def t(xs):
        return torch.from_numpy(np.stack(xs).astype(np.float32)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1

    return t(a), t(b), np.array(ref)


def _two_afc(base: np.ndarray, got: np.ndarray, ref: np.ndarray) -> tuple[float | None, int]:
    agree = total = 0
    for r in np.unique(ref):
        idx = np.flatnonzero(ref == r)
        i, j = np.triu_indices(len(idx), 1)
        sb = np.sign(base[idx[j]] - base[idx[i]])
        sg = np.sign(got[idx[j]] - got[idx[i]])
        keep = sb != 0
        agree += int((sb[keep] == sg[keep]).sum())
        total += int(keep.sum())
    return (agree / total if total else None), total


# -- measurement helpers ---------------------------------------------------------------------
def _rss() -> tuple[int, int] | None:
    try:
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) * 1024
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None


def _peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    before = _rss()
    fn()
    after = _rss()
    if before is None or after is None:
        return None
    return max(0, after[1] - before[0])


def _state_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


# -- candidates: each returns (score(a, b) -> (N,) tensor, model_bytes) ----------------------
def _engine_candidate(base: LPIPS, device: torch.device, name: str, _calib):
    from ..inference.engine import Engine

    kw = engine_kwargs(name)
    eng = Engine(model=base, device=device, compile=False, **kw)
    size = sum(p.numel() * p.element_size() for p in eng.model.parameters())

    def score(a, b):
        return eng(a.to(device), b.to(device)).reshape(-1)

    return score, size


def _aoti_candidate(base: LPIPS, device: torch.device, _name: str, calib):
    if device.type != "cpu":
        raise _Unsupported("lpips_fast.deploy.export.aoti compiles for the CPU")
    from .export import aoti

    a, b = calib
    tmp = tempfile.mkdtemp(prefix="lpips-tune-")
    path = aoti(base, os.path.join(tmp, "lpips.pt2"), example=(a[:2], b[:2]))
    runner = torch._inductor.aoti_load_package(str(path))

    def score(x, y):
        return runner(x, y).reshape(-1)

    return score, path.stat().st_size


def _int8_candidate(base: LPIPS, device: torch.device, _name: str, calib):
    if device.type != "cpu":
        raise _Unsupported("torch.ao static int8 kernels (x86/fbgemm, onednn) run on the CPU only")
    import copy
    import warnings

    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:
        raise _Unsupported(f"torch.ao.quantization FX graph mode is not available ({e})") from e
    engines = torch.backends.quantized.supported_engines
    if "x86" not in engines:
        raise _Unsupported(f"no x86 quantized engine in this torch (supported: {engines})")
    torch.backends.quantized.engine = "x86"
    trunk = copy.deepcopy(base.net).to(memory_format=torch.contiguous_format).eval()
    a, b = calib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (moving to torchao)
        prepared = prepare_fx(trunk, get_default_qconfig_mapping("x86"), example_inputs=(base.preprocess(a[:2]),))
        with torch.no_grad():
            for lo in range(0, a.shape[0], 8):
                prepared(torch.cat([base.preprocess(a[lo : lo + 8]), base.preprocess(b[lo : lo + 8])]))
        qtrunk = convert_fx(prepared)
    size = _state_bytes(qtrunk) + sum(w.numel() * 4 for w in base.lin_weights() if w is not None)

    def score(x, y):
        n = x.shape[0]
        f = qtrunk(torch.cat([base.preprocess(x), base.preprocess(y)]))
        return base.distances([t[:n] for t in f], [t[n:] for t in f], spatial=False).reshape(-1)

    return score, size


class _Unsupported(Exception):
    pass


_CANDIDATES = {
    **{n: _engine_candidate for n in PRECISIONS if n not in ("aoti", "int8")},
    "aoti": _aoti_candidate,
    "int8": _int8_candidate,
}


def _run_all(score, a, b, bs: int) -> torch.Tensor:
    outs = []
    for lo in range(0, a.shape[0], bs):
        outs.append(score(a[lo : lo + bs], b[lo : lo + bs]).detach().reshape(-1).to("cpu", torch.float64))
    return torch.cat(outs)


def _pairs_to_score(pairs, references, size: tuple[int, int]):
    """(in0, in1, reference id per pair) on the CPU in float32: ``pairs`` checked, or generated at
    ``size``; without ``references``, pairs with bitwise-equal in0 share one."""
    if pairs is None:
        return generated_pairs(size, seed=0)
    a, b = (t.detach().to("cpu", torch.float32) for t in pairs)
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"pairs: expected two (N,3,H,W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if references is not None:
        return a, b, np.asarray(references)
    _, ref = np.unique(a.flatten(1).numpy(), axis=0, return_inverse=True)
    return a, b, ref.reshape(-1)


def select_precision(
    net: str = "alex",
    device: str | torch.device = "cpu",
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    budget: dict | None = None,
    *,
    references: Sequence[int] | None = None,
    model: LPIPS | None = None,
    size: tuple[int, int] = (64, 64),
    batch_size: int = 16,
    repeats: int = 3,
    candidates: Sequence[str] = PRECISIONS,
) -> TuneReport:
    """Measure every candidate in ``candidates`` and choose the fastest within ``budget``.

    ``pairs``: (in0, in1) float tensors (N,3,H,W) in [-1, 1]; default: :func:`generated_pairs`
    at ``size``. ``references``: (N,) ids of each pair's reference image for 2AFC triplets
    (default: pairs with bitwise-equal in0 share one). ``budget``: minimum ``two_afc`` and
    ``spearman`` (default :data:`DEFAULT_BUDGET`). ``model``: the module to tune (default
    pretrained ``LPIPS(net)``). fp32 always qualifies, so a choice is always made.
    """
    dev = torch.device(device)
    budget = {**DEFAULT_BUDGET, **(budget or {})}
    unknown = [c for c in candidates if c not in _CANDIDATES]
    if unknown:
        raise ValueError(f"candidates: unknown {unknown}, expected names from {PRECISIONS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}, expected a positive integer")
    base = (model if model is not None else LPIPS(net=net)).eval().requires_grad_(False).to("cpu")
    a, b, ref = _pairs_to_score(pairs, references, size)
    ca, cb, _ = generated_pairs(tuple(a.shape[2:]), levels=3, seed=1)  # calibration, not scored
    import copy

    exact = base if dev.type == "cpu" else copy.deepcopy(base).to(dev)  # the fp32 module on the device
    with torch.no_grad():
        want = _run_all(lambda x, y: exact(x.to(dev), y.to(dev)), a, b, batch_size).numpy()
    _, n_trip = _two_afc(want, want, ref)
    report = TuneReport(
        net=base.pnet_type, device=str(dev), size=tuple(a.shape[2:]), n_pairs=int(a.shape[0]), n_triplets=n_trip,
        batch_size=batch_size, budget=budget,
        memory_method=("peak allocated during one batch (torch.cuda)" if dev.type == "cuda" else
                       "growth of peak RSS during the first batch (Linux VmHWM; lower bound)"),
    )
    for name in candidates:
        row = TuneRow(name=name, status="ok")
        try:
            with torch.no_grad():
                score, row.model_bytes = _CANDIDATES[name](base, dev, name, (ca, cb))
                # the candidate's first batch (later ones reuse memory the allocator keeps)
                row.peak_mem_bytes = _peak_memory(lambda: score(a[:batch_size], b[:batch_size]), dev)
                got = _run_all(score, a, b, batch_size).numpy()  # warm-up pass, and the values
                times = []
                for _ in range(max(1, repeats)):
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    _run_all(score, a, b, batch_size)
                    times.append(time.perf_counter() - t0)
        except _Unsupported as e:
            row.status, row.reason = "unsupported", str(e)
        except Exception as e:  # a precision the device cannot run: say why, keep going
            row.status, row.reason = "error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if row.status == "ok":
            err = np.abs(got - want)
            row.pairs_per_s = a.shape[0] / statistics.median(times)
            row.max_abs_err, row.mean_abs_err = float(err.max()), float(err.mean())
            row.spearman = spearman(want, got)
            row.two_afc, _ = _two_afc(want, got, ref)
            row.within_budget = bool(
                (row.two_afc is None or row.two_afc >= budget["two_afc"])
                and row.spearman is not None and row.spearman >= budget["spearman"]
                and np.isfinite(got).all()
            )
        report.rows.append(row)
    ok = [r for r in report.rows if r.status == "ok" and r.within_budget]
    report.choice = max(ok, key=lambda r: r.pairs_per_s).name if ok else None
    return report
