"""Exported LPIPS graphs: ONNX (for ONNX Runtime) and AOTInductor packages (``.pt2``).

    from lpips_fast import LPIPS
    from lpips_fast.deploy.export import onnx, aoti
    onnx(LPIPS(net="alex"), "lpips_alex.onnx")     # dynamic batch, height and width
    aoti(LPIPS(net="alex"), "lpips_alex.pt2")      # dynamic batch; loads without lpips_fast

Both graphs take two (N,3,H,W) float32 images in [-1, 1] and return (N,) distances, or the
(N,1,H,W) map for a ``spatial`` model. The fused distance op is exported through its
decomposition (the eager composite, ``lpips_distance(..., backend="torch")``): ONNX Runtime
needs no custom operator and the ``.pt2`` package holds no ``lpips_fast::`` op, so it loads
with ``torch._inductor.aoti_load_package`` (or libtorch's ``AOTIModelPackageLoader`` in C++)
where this package is not installed.

:func:`check_onnx` / :func:`check_aoti` score the photographs shipped under ``examples/`` at
three sizes and two batch sizes against the eager ``LPIPS`` module (``--check`` on the CLI).
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
    "CHECK_SIZES",
    "CHECK_TOLERANCE",
]

# Three image sizes for the parity checks (H, W): a square, a non-square and the photos' own size.
CHECK_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 80), (128, 128))
CHECK_TOLERANCE = 1e-5
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the repository's examples/


class ExportableLPIPS(nn.Module):
    """``LPIPS``'s inference forward written for tracing: preprocess, one batched trunk pass for
    both images, then the distance step's eager composite per layer (no custom op); pairs of
    bitwise-equal images are exactly 0, as in ``LPIPS``.

    Shares the parameters of the given module (no copy). Inputs: two float (N,3,H,W) tensors in
    [-1, 1] of equal shape. Output: (N,) distances, or (N,1,H,W) when the module is spatial.
    """

    def __init__(self, model: LPIPS) -> None:
        super().__init__()
        if not isinstance(model, LPIPS):
            raise TypeError(f"model: expected an lpips_fast.LPIPS, got {type(model).__name__}")
        self.model = model
        self.spatial = bool(model.spatial)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        m = self.model
        n = in0.shape[0]
        feats = m.net(torch.cat([m.preprocess(in0), m.preprocess(in1)]))
        total = None
        for f, w in zip(feats, m.lin_weights()):
            d = lpips_distance(f[:n], f[n:], w, spatial=self.spatial, backend="torch")
            if self.spatial:
                d = F.interpolate(d, size=in0.shape[2:], mode="bilinear", align_corners=False)
            total = d if total is None else total + d
        # As LPIPS: bitwise-equal images score exactly 0 (whatever the rounding of their features).
        same = identical_pairs(in0, in1)
        return torch.where(same.view(-1, *([1] * (total.dim() - 1))), torch.zeros_like(total), total)


def _prepare(model: LPIPS) -> ExportableLPIPS:
    """An eval-mode float32 copy's wrapper (the caller's module is not changed)."""
    import copy

    if not isinstance(model, LPIPS):
        raise TypeError(f"model: expected an lpips_fast.LPIPS, got {type(model).__name__}")
    m = copy.deepcopy(model).eval().requires_grad_(False).to(device="cpu", dtype=torch.float32)
    m.net.to(memory_format=torch.contiguous_format)
    return ExportableLPIPS(m).eval()


def _example(model: LPIPS, example: Any) -> tuple[torch.Tensor, torch.Tensor]:
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


def _dynamic_shapes(model: LPIPS, dynamic: bool, spatial_dims: bool):
    """``torch.export`` dynamic_shapes for (in0, in1): one batch Dim, optionally one H and W."""
    from torch.export import Dim

    if not dynamic:
        return None
    batch = Dim("batch", min=1, max=1 << 16)
    dims: dict[int, Any] = {0: batch}
    if spatial_dims:
        lo = _min_dynamic_size(model)
        dims[2] = Dim("height", min=lo, max=8192)
        dims[3] = Dim("width", min=lo, max=8192)
    return ({**dims}, {**dims})


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

    ``dynamic``: batch, height and width are symbolic (any size the trunk accepts). ``opset``:
    the ONNX opset (default: the exporter's). Returns the path written.
    """
    p = _check_path(path, ".onnx")
    wrapper = _prepare(model)
    args = _example(model, example)
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
            dynamic_shapes=_dynamic_shapes(model, dynamic, spatial_dims=True),
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

    The batch is dynamic; ``dynamic_hw`` also makes height and width dynamic (otherwise the
    package serves the example's H and W only). ``freezing`` lets Inductor treat the weights as
    constants (constant folding, convolution weights prepacked for oneDNN). Load it with
    ``torch._inductor.aoti_load_package(path)``. Takes 25-80 s for alex on 2 cores (about
    twice that with ``dynamic_hw``).
    """
    p = _check_path(path, ".pt2")
    wrapper = _prepare(model)
    args = _example(model, example)
    with torch.no_grad():
        ep = torch.export.export(
            wrapper, args, dynamic_shapes=_dynamic_shapes(model, True, spatial_dims=dynamic_hw), strict=False
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
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])

    def run(a, b):
        return sess.run(None, {"in0": a.numpy(), "in1": b.numpy()})[0]

    return _check(run, model, sizes, batches, tolerance)


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
    runner = torch._inductor.aoti_load_package(os.fspath(path))

    def run(a, b):
        with torch.no_grad():
            return runner(a, b)

    return _check(run, model, sizes, batches, tolerance)
