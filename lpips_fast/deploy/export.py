"""Exported LPIPS graphs: ONNX (for ONNX Runtime) and AOTInductor packages (``.pt2``).

    from lpips_fast import LPIPS
    from lpips_fast.deploy.export import onnx, aoti
    onnx(LPIPS(net="alex"), "lpips_alex.onnx")     # dynamic batch, height and width
    aoti(LPIPS(net="alex"), "lpips_alex.pt2")      # dynamic batch; loads without lpips_fast

Both graphs take two (N,3,H,W) float32 images in [-1, 1] and return (N,) distances, or the
(N,1,H,W) map for a ``spatial`` model. Each refuses, with an error naming what it expected,
the inputs it was not built for. The ``.pt2`` package checks inside its own graph (so also where
lpips_fast is not installed): 3 channels, the height and width it serves (its one size, or at
least the trunk's minimum with ``dynamic_hw``) and, for a model with ``nonfinite='raise'``, NaN
or Inf. ONNX Runtime checks rank, dtype and the fixed channel count of an ONNX graph itself.
Not checked in the ``.pt2`` graph: rank, dtype, device, and ``in1``'s shape (it is read with
``in0``'s); AOTInductor's own input checks cover those when the process runs with
``AOTI_RUNTIME_CHECK_INPUTS=1`` (torch 2.11 and 2.14 compile them into every package and run
them only then). Value ranges are not checked, as ``LPIPS`` does not check them. The fused distance op is exported through its
decomposition (the eager composite, ``lpips_distance(..., backend="torch")``): ONNX Runtime
needs no custom operator and the ``.pt2`` package holds no ``lpips_fast::`` op, so it loads
with ``torch._inductor.aoti_load_package`` (or libtorch's ``AOTIModelPackageLoader`` in C++)
where this package is not installed.

:func:`check_onnx` / :func:`check_aoti` score the photographs shipped under ``examples/`` at
three sizes and two batch sizes against the eager ``LPIPS`` module, and :func:`check_refusals`
feeds an artifact inputs it must refuse (``--check`` on the CLI runs both).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import LPIPS, identical_pairs
from ..ops import lpips_distance

__all__ = [
    "ExportableLPIPS",
    "onnx",
    "aoti",
    "check_onnx",
    "check_aoti",
    "check_images",
    "check_refusals",
    "CHECK_SIZES",
    "CHECK_TOLERANCE",
]

# Three image sizes for the parity checks (H, W): a square, a non-square and the photos' own size.
CHECK_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 80), (128, 128))
CHECK_TOLERANCE = 1e-5
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the repository's examples/


class ExportableLPIPS(nn.Module):
    """``LPIPS``'s inference forward written for tracing: input checks, preprocess, one batched
    trunk pass for both images, then the distance step's eager composite per layer (no custom
    op); pairs of bitwise-equal images are exactly 0, as in ``LPIPS``.

    Shares the parameters of the given module (no copy). Inputs: two float (N,3,H,W) tensors in
    [-1, 1] of equal shape. Output: (N,) distances, or (N,1,H,W) when the module is spatial.

    The checks are ``torch._assert_async`` nodes, so they stay in the traced graph and run in the
    compiled artifact: ``size`` (H, W) the only size served, else at least ``min_size`` on both
    sides; ``channel_slice``: the graph's channel dimension is symbolic (traced on a 4-channel
    example) and the first 3 channels are used after a runtime check that there are exactly 3;
    NaN/Inf refused when the model's ``nonfinite`` is ``'raise'``.
    """

    def __init__(self, model: LPIPS, *, size: tuple[int, int] | None = None, min_size: int = 1,
                 channel_slice: bool = False, pad_small: bool = False) -> None:
        super().__init__()
        if not isinstance(model, LPIPS):
            raise TypeError(f"model: expected an lpips_fast.LPIPS, got {type(model).__name__}")
        self.model = model
        self.spatial = bool(model.spatial)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.min_size = int(min_size)
        self.channel_slice = bool(channel_slice)
        self.pad_small = bool(pad_small)
        self.refuse_nonfinite = model.nonfinite == "raise"

    def check_inputs(self, in0: torch.Tensor, in1: torch.Tensor) -> None:
        """Runtime asserts on ``in0``'s sizes (``in1`` shares its symbols) and on both values."""
        c, h, w = in0.shape[1], in0.shape[2], in0.shape[3]
        if self.channel_slice:
            _require(torch.scalar_tensor(c) == 3, "in0/in1: expected 3 channels (N, 3, H, W)")
        if self.size is not None:
            eh, ew = self.size
            _require(
                (torch.scalar_tensor(h) == eh) & (torch.scalar_tensor(w) == ew),
                f"in0/in1: this package serves {eh}x{ew} images only (H x W); resize them, or export "
                "with dynamic_hw=True (--dynamic-hw) for other sizes",
            )
        else:
            lo = self.min_size
            _require(
                _at_least(h, w, lo),
                f"in0/in1: images must be at least {lo}x{lo} pixels for this package's trunk; upsample them",
            )
        if self.refuse_nonfinite:
            _require(
                torch.isfinite(in0).all() & torch.isfinite(in1).all(),
                "in0/in1: hold NaN or Inf values (the model was exported with nonfinite='raise')",
            )

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        self.check_inputs(in0, in1)
        if self.channel_slice:
            in0, in1 = in0[:, :3], in1[:, :3]
        m = self.model
        n = in0.shape[0]
        x = torch.cat([m.preprocess(in0), m.preprocess(in1)])
        if self.pad_small:
            lo = self.min_size
            x = F.pad(x, (0, torch.sym_max(0, lo - x.shape[3]), 0, torch.sym_max(0, lo - x.shape[2])))
        feats = m.net(x)
        total = None
        for f, w in zip(feats, m.lin_weights()):
            d = lpips_distance(f[:n], f[n:], w, spatial=self.spatial, backend="torch")
            if self.spatial:
                d = F.interpolate(d, size=in0.shape[2:], mode="bilinear", align_corners=False)
            total = d if total is None else total + d
        # As LPIPS: bitwise-equal images score exactly 0 (whatever the rounding of their features).
        same = identical_pairs(in0, in1)
        total = torch.where(same.view(-1, *([1] * (total.dim() - 1))), torch.zeros_like(total), total)
        if self.pad_small:
            fits = _at_least(in0.shape[2], in0.shape[3], self.min_size)
            total = torch.where(fits, total, torch.full_like(total, float("nan")))
        return total


def _at_least(h, w, lo: int) -> torch.Tensor:
    """``h >= lo and w >= lo`` as a 0-d bool tensor (runtime values of symbolic sizes)."""
    return (torch.scalar_tensor(h) >= lo) & (torch.scalar_tensor(w) >= lo)


def _require(ok: torch.Tensor, message: str) -> None:
    """A check that survives tracing: ``aten._assert_async`` raises ``message`` where it runs."""
    torch._assert_async(ok, message)


def _prepare(model: LPIPS, **checks: Any) -> ExportableLPIPS:
    """An eval-mode float32 copy's wrapper (the caller's module is not changed; ``_example`` has
    checked its type); ``checks`` go to :class:`ExportableLPIPS`."""
    import copy

    m = copy.deepcopy(model).eval().requires_grad_(False).to(device="cpu", dtype=torch.float32)
    m.net.to(memory_format=torch.contiguous_format)
    return ExportableLPIPS(m, **checks).eval()


def _example(model: LPIPS, example: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, LPIPS):
        raise TypeError(f"model: expected an lpips_fast.LPIPS, got {type(model).__name__}")
    if example is None:
        g = torch.Generator().manual_seed(0)
        size = max(64, int(model.net.min_size))
        x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        y = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        return x, y
    if (
        not isinstance(example, (tuple, list))
        or len(example) != 2
        or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in example)
    ):
        raise ValueError("example: expected a pair of (N,3,H,W) tensors")
    if example[0].shape != example[1].shape or example[0].shape[0] < 2:
        raise ValueError(
            f"example: the two tensors need one shape with batch >= 2 (so the batch stays dynamic), "
            f"got {tuple(example[0].shape)} and {tuple(example[1].shape)}"
        )
    return example[0].float().cpu(), example[1].float().cpu()


def _dynamic_shapes(model: LPIPS, dynamic: bool, spatial_dims: bool, channels: bool = False, min_hw: int | None = None):
    """``torch.export`` dynamic_shapes for (in0, in1): one batch Dim, optionally one H and W and
    one channel Dim (shared by both inputs)."""
    from torch.export import Dim

    if not dynamic:
        return None
    batch = Dim("batch", min=1, max=1 << 16)
    dims: dict[int, Any] = {0: batch}
    if channels:
        dims[1] = Dim("channels", min=3, max=1 << 16)
    if spatial_dims:
        lo = _min_dynamic_size(model) if min_hw is None else min_hw
        dims[2] = Dim("height", min=lo, max=8192)
        dims[3] = Dim("width", min=lo, max=8192)
    return ({**dims}, {**dims})


def _spare_channel(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a fourth, zero channel: traced on it, the graph keeps its channel count symbolic
    (a 3-channel example would specialise it), so the in-graph channel check sees the real one."""
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def _min_dynamic_size(model: LPIPS) -> int:
    """Smallest H/W a dynamic graph accepts: every trunk tap at least 2 pixels on a side.

    (Tracing specialises a 1-pixel tap, where broadcasting differs, so graphs with symbolic H
    and W exclude it; at this size and above they serve every size.)
    """
    size = int(model.net.min_size)
    while min(model.net.layer_sizes(size)) < 2:
        size += 1
    return size


def _check_path(path: str | os.PathLike, suffix: str) -> Path:
    p = Path(os.fspath(path))
    if p.suffix != suffix:
        raise ValueError(f"path: expected a file name ending in {suffix}, got {str(p)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def onnx(
    model: LPIPS,
    path: str | os.PathLike,
    *,
    example: Sequence[torch.Tensor] | None = None,
    dynamic: bool = True,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as an ONNX graph ``(in0, in1) -> distances`` with the dynamo exporter.

    ``dynamic``: batch, height and width are symbolic (any size from the trunk's minimum; a
    smaller image is padded up to it and its distance is NaN, ONNX having no assertion operator);
    otherwise every dimension is the example's, and ONNX Runtime refuses any other. ``opset``:
    the ONNX opset (default: the exporter's). Returns the path written.
    """
    p = _check_path(path, ".onnx")
    args = _example(model, example)
    wrapper = _prepare(model, size=None if dynamic else tuple(args[0].shape[2:]), min_size=_min_dynamic_size(model),
                       pad_small=dynamic)
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # in0 and in1 share their Dims, so the exporter notes that it keeps one name per axis.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        prog = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model, dynamic, spatial_dims=True, min_hw=1),
            input_names=["in0", "in1"],
            output_names=["lpips"],
            external_data=False,
            verbose=False,
            **kwargs,
        )
    prog.save(str(p))
    return p


def aoti(
    model: LPIPS,
    path: str | os.PathLike,
    *,
    example: Sequence[torch.Tensor] | None = None,
    dynamic_hw: bool = False,
    freezing: bool = True,
) -> Path:
    """Compile ``model`` with ``torch.export`` + AOTInductor into a ``.pt2`` package (CPU).

    The batch is dynamic; with ``dynamic_hw`` the package serves every height and width of at
    least the trunk's minimum, otherwise only the example's H and W, and it raises
    ``RuntimeError`` (from inside its graph) on any other size, on a channel count other than 3
    and, for ``nonfinite='raise'``, on NaN/Inf (module docstring: what it does not check).
    ``freezing`` lets Inductor treat the weights as constants (constant folding, convolution
    weights prepacked for oneDNN). Load it with ``torch._inductor.aoti_load_package(path)``.
    Takes about 30-160 s for alex on 2 cores.
    """
    p = _check_path(path, ".pt2")
    args = _example(model, example)
    lo = _min_dynamic_size(model)
    size = None if dynamic_hw else (int(args[0].shape[2]), int(args[0].shape[3]))
    if size is not None and min(size) < lo:
        raise ValueError(
            f"example: a package of one size needs images of at least {lo}x{lo} for the "
            f"{model.pnet_type} trunk (so that it can check its input size), got {size[0]}x{size[1]}"
        )
    wrapper = _prepare(model, size=size, min_size=lo, channel_slice=True)
    traced = tuple(_spare_channel(t) for t in args)
    with torch.no_grad():
        # H and W are symbolic even for a one-size package: its size check needs their runtime
        # values (measured: the same speed as a static graph, python benchmarks/bench_export.py).
        ep = torch.export.export(
            wrapper, traced, dynamic_shapes=_dynamic_shapes(model, True, spatial_dims=True, channels=True), strict=False
        )
        out = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(p), inductor_configs={"freezing": bool(freezing)}
        )
    return Path(out)


# -- parity checks -----------------------------------------------------------------------------
def check_images(size: tuple[int, int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean/distorted photograph pairs from ``examples/`` resized to ``size`` (H, W), as two
    (batch,3,H,W) float32 tensors in [-1, 1]. Beyond the shipped pairs, mirrored copies."""
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in (_EXAMPLES / "clean").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"check_images: no photographs under {_EXAMPLES / 'clean'}")
    h, w = size
    x0, x1 = [], []
    for i in range(batch):
        name = names[i % len(names)]
        pair = []
        for side in ("clean", "distorted"):
            with Image.open(_EXAMPLES / side / name) as im:
                a = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
            if (i // len(names)) % 2:
                a = a[:, ::-1]
            pair.append(torch.from_numpy(a.copy()).permute(2, 0, 1) / 127.5 - 1)
        x0.append(pair[0])
        x1.append(pair[1])
    return torch.stack(x0), torch.stack(x1)


def _check(run, model: LPIPS, sizes, batches, tolerance: float) -> list[dict]:
    m = model.eval()
    rows = []
    for size in sizes:
        for batch in batches:
            a, b = check_images(size, batch)
            with torch.no_grad():
                want = m(a, b).reshape(a.shape[0], *((1,) + tuple(a.shape[2:]) if m.spatial else ()))
            got = torch.as_tensor(run(a, b)).reshape(want.shape)
            err = float((got.double() - want.double()).abs().max())
            rows.append({"size": list(size), "batch": batch, "max_abs_err": err, "ok": err <= tolerance})
    return rows


def _refusal_cases(model: LPIPS, size: tuple[int, int] | None, lo: int, runtime_checks: bool) -> list[tuple]:
    """(case, in0, in1) an artifact serving ``size`` (None: any size from ``lo``) must refuse;
    ``runtime_checks`` adds the cases only a runtime's own input checks catch."""
    h, w = size or (64, 64)
    a, b = check_images((h, w), 2)
    cases = [("4 channels", _spare_channel(a), _spare_channel(b)), ("1 channel", a[:, :1], b[:, :1])]
    if size is not None:
        cases.append((f"{h + 8}x{w + 8} for a {h}x{w} graph", *check_images((h + 8, w + 8), 2)))
    elif lo > 1:
        cases.append((f"{lo - 1}x{lo - 1}, under the minimum {lo}", *check_images((lo - 1, lo - 1), 2)))
    if model.nonfinite == "raise":
        bad = a.clone()
        bad[0, 0, 0, 0] = float("nan")
        cases.append(("NaN pixel in pair 0", bad, b))
    if runtime_checks:
        cases += [("3-D input", a[0], b[0]), ("float64", a.double(), b.double()),
                  ("in1 of another size", a, check_images((h + 8, w + 8), 2)[1])]
    return cases


def _refusals(run, cases: list[tuple], nan_cases: tuple[str, ...] = ()) -> list[dict]:
    """Run each case; refused = raised, or (for a case named in ``nan_cases``) pair 0 is NaN."""
    rows = []
    for case, x, y in cases:
        expected = "nan" if case.startswith(nan_cases) else "error"
        try:
            with torch.no_grad():
                out = torch.as_tensor(run(x, y)).flatten()
        except Exception as e:  # the artifact's own error (the runtime's, or the graph's assert)
            got = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
            rows.append({"case": case, "expected": expected, "refused": True, "got": got})
            continue
        nan = bool(torch.isnan(out[0]))
        rows.append({"case": case, "expected": expected, "refused": expected == "nan" and nan,
                     "got": "NaN" if nan else f"numbers {[round(float(v), 6) for v in out[:4]]}"})
    return rows


def check_refusals(path: str | os.PathLike, model: LPIPS, *, size: tuple[int, int] | None = None) -> list[dict]:
    """Feed the ``.onnx`` / ``.pt2`` artifact at ``path`` inputs it was not built for: another
    channel count, another size (``size``: the one size it serves; None: any size from the
    trunk's minimum), a NaN pixel (when ``model.nonfinite`` is 'raise'); for ONNX also a 3-D
    input, float64 and ``in1`` of another size (ONNX Runtime's own checks; an ONNX graph answers
    NaN for a size under the minimum or a NaN pixel, having no assertion operator), and for a
    ``.pt2`` those three too when ``AOTI_RUNTIME_CHECK_INPUTS`` is set (AOTInductor's checks).
    One row per case: ``case``, ``expected`` ('error' or 'nan'), ``refused``, ``got``."""
    lo = _min_dynamic_size(model)
    suffix = Path(os.fspath(path)).suffix
    if suffix == ".onnx":
        cases = _refusal_cases(model, size, lo, runtime_checks=True)
        return _refusals(_onnx_runner(path), cases, nan_cases=(f"{lo - 1}x", "NaN pixel"))
    if suffix != ".pt2":
        raise ValueError(f"path: expected a .onnx or .pt2 file, got {os.fspath(path)!r}")
    runtime_checks = os.environ.get("AOTI_RUNTIME_CHECK_INPUTS", "") not in ("", "0")
    return _refusals(_aoti_runner(path), _refusal_cases(model, size, lo, runtime_checks))


def _onnx_runner(path: str | os.PathLike):
    """``run(a, b)`` over an ONNX Runtime CPU session of the file at ``path``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return lambda a, b: sess.run(None, {"in0": a.numpy(), "in1": b.numpy()})[0]


def _aoti_runner(path: str | os.PathLike):
    """``run(a, b)`` over the loaded ``.pt2`` package at ``path``, without autograd."""
    runner = torch._inductor.aoti_load_package(os.fspath(path))

    def run(a, b):
        with torch.no_grad():
            return runner(a, b)

    return run


def check_onnx(
    path: str | os.PathLike,
    model: LPIPS,
    *,
    sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    batches: Sequence[int] = (1, 3),
    tolerance: float = CHECK_TOLERANCE,
) -> list[dict]:
    """Run the ONNX file with onnxruntime's CPU provider on photographs at each size and batch;
    one row per run: ``size``, ``batch``, ``max_abs_err`` against ``model``, ``ok``."""
    return _check(_onnx_runner(path), model, sizes, batches, tolerance)


def check_aoti(
    path: str | os.PathLike,
    model: LPIPS,
    *,
    sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    batches: Sequence[int] = (1, 3),
    tolerance: float = CHECK_TOLERANCE,
) -> list[dict]:
    """Like :func:`check_onnx` for a ``.pt2`` package (sizes must match it unless it was
    compiled with ``dynamic_hw=True``)."""
    return _check(_aoti_runner(path), model, sizes, batches, tolerance)
