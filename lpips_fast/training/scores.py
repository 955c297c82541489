"""2AFC and JND scores, by the definitions of the reference's ``score_2afc_dataset`` /
``score_jnd_dataset`` (lpips 0.1.4, ``lpips/trainer.py``) and its ``voc_ap``.

- 2AFC, per triplet: ``(d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5``; the
  score is the mean (the fraction of people the metric agrees with).
- JND: pairs sorted by distance (``np.argsort``), a "same" judgment counts as a positive;
  precision and recall from the cumulative sums, and the area under that curve by the PASCAL VOC
  rule (the precision envelope summed over the points where recall changes).

Distances are computed batched: one trunk pass over ref, p0 and p1 of a batch, then the fused
distance op per side. The reference's own test script passes ``(N,1,1,1)`` distances to
``score_jnd_dataset``, whose ``np.argsort`` then sorts along a size-1 axis; the definition here
sorts the flat distances, as that function's docstring specifies.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from .bapps import JNDSet, TwoAFCSet, iter_batches, open_2afc, open_jnd, to_input

__all__ = [
    "voc_ap",
    "twoafc_agreement",
    "jnd_map",
    "score_2afc",
    "score_jnd",
    "score_table",
    "distances_2afc",
    "distances_jnd",
]


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from recall/precision arrays (PASCAL VOC; the 11-point rule if asked)."""
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        total = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            sel = rec >= t
            total += (np.max(prec[sel]) if sel.any() else 0.0) / 11.0
        return float(total)
    r = np.concatenate(([0.0], rec, [1.0]))
    p = np.concatenate(([0.0], prec, [0.0]))
    # Precision envelope: the running maximum from the right.
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def twoafc_agreement(d0: np.ndarray, d1: np.ndarray, judge: np.ndarray) -> np.ndarray:
    """Per-triplet agreement with the judges (the reference's 2AFC ``scores`` array)."""
    d0, d1, g = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (d0, d1, judge))
    if not (d0.shape == d1.shape == g.shape):
        raise ValueError(f"d0, d1, judge: expected equal lengths, got {d0.shape[0]}, {d1.shape[0]}, {g.shape[0]}")
    return (d0 < d1) * (1.0 - g) + (d1 < d0) * g + (d1 == d0) * 0.5


def jnd_map(ds: np.ndarray, sames: np.ndarray) -> float:
    """JND mAP: pairs ranked by distance, "same" as the positive class (the reference's recipe)."""
    ds = np.asarray(ds, dtype=np.float64).reshape(-1)
    sames = np.asarray(sames, dtype=np.float64).reshape(-1)
    if ds.shape != sames.shape:
        raise ValueError(f"ds, sames: expected equal lengths, got {ds.shape[0]} and {sames.shape[0]}")
    order = np.argsort(ds)
    s = sames[order]
    tp = np.cumsum(s)
    fp = np.cumsum(1.0 - s)
    fn = np.sum(s) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = tp / (tp + fp)
        rec = tp / (tp + fn)
    return voc_ap(rec, prec)


# -- distances ----------------------------------------------------------------------------------
def _resolve_model(model, device):
    import torch

    from ..model import LPIPS

    if isinstance(model, str):
        model = LPIPS(net=model, version="0.1")
    if isinstance(model, torch.nn.Module) and device is not None:
        model = model.to(device)
    if not callable(model):
        raise TypeError(f"model: expected an LPIPS module, a net name or a callable(in0, in1), got {type(model).__name__}")
    return model


def _device_of(model):
    import torch

    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, disable=not show, leave=False, unit="row")


def _row_distances(model, imgs: np.ndarray, device, pairs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Distances for (side a, side b) pairs of one decoded batch (K,B,H,W,3); one trunk pass if LPIPS."""
    import torch

    k, b = imgs.shape[:2]
    x = to_input(imgs.reshape(k * b, *imgs.shape[2:])).to(device)
    if hasattr(model, "features") and hasattr(model, "distances"):
        feats = model.features(x)
        sides = [[f[i * b:(i + 1) * b] for f in feats] for i in range(k)]
        outs = [model.distances(sides[i], sides[j], spatial=False) for i, j in pairs]
    else:
        sides = [x[i * b:(i + 1) * b] for i in range(k)]
        outs = [model(sides[i], sides[j]) for i, j in pairs]
    return [torch.as_tensor(o).detach().float().cpu().numpy().reshape(-1) for o in outs]


def _run(model, data, pairs, batch_size, workers, device, progress, desc):
    import torch

    model = _resolve_model(model, device)
    dev = _device_of(model) if device is None else torch.device(device)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    out = [np.zeros(len(data), dtype=np.float32) for _ in pairs]
    try:
        with torch.no_grad(), _progress(len(data), desc, progress) as bar:
            for rows, imgs in iter_batches(data, batch_size, workers=workers):
                for o, d in zip(out, _row_distances(model, imgs, dev, pairs)):
                    o[rows] = d
                bar.update(len(rows))
    finally:
        if was_training:
            model.train()
    return out


def distances_2afc(model, data: TwoAFCSet, *, batch_size: int = 50, workers: int = 0, device=None,
                   progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(d0, d1) float32 arrays: distances from ref to p0 and to p1 for every triplet of ``data``."""
    d0, d1 = _run(model, data, [(0, 1), (0, 2)], batch_size, workers, device, progress, "2afc")
    return d0, d1


def distances_jnd(model, data: JNDSet, *, batch_size: int = 50, workers: int = 0, device=None,
                  progress: bool | None = None) -> np.ndarray:
    """Distances between p0 and p1 for every pair of ``data`` (float32)."""
    (d,) = _run(model, data, [(0, 1)], batch_size, workers, device, progress, "jnd")
    return d


def score_2afc(model, dirs: str | os.PathLike | Sequence[str | os.PathLike], *, load_size: int = 64,
               batch_size: int = 50, workers: int = 0, device=None, progress: bool | None = None) -> float:
    """2AFC score of ``model`` (an ``LPIPS``, a net name or ``fn(in0, in1)``) over all triplets of ``dirs``."""
    data = open_2afc(dirs, load_size)
    d0, d1 = distances_2afc(model, data, batch_size=batch_size, workers=workers, device=device, progress=progress)
    return float(np.mean(twoafc_agreement(d0, d1, data.judge)))


def score_jnd(model, dirs: str | os.PathLike | Sequence[str | os.PathLike], *, load_size: int = 64,
              batch_size: int = 50, workers: int = 0, device=None, progress: bool | None = None) -> float:
    """JND mAP of ``model`` over all pairs of ``dirs``."""
    data = open_jnd(dirs, load_size)
    d = distances_jnd(model, data, batch_size=batch_size, workers=workers, device=device, progress=progress)
    return jnd_map(d, data.same)


def score_table(model, dirs: str | os.PathLike | Sequence[str | os.PathLike], mode: str = "2afc", *,
                load_size: int = 64, batch_size: int = 50, workers: int = 0, device=None,
                progress: bool | None = None) -> list[dict]:
    """One row per dataset folder (``dataset``, ``mode``, ``n``, ``score``), scored in one pass.

    With several folders a last row ``dataset="all"`` scores their union.
    """
    if mode not in ("2afc", "jnd"):
        raise ValueError(f"mode: got {mode!r}, expected '2afc' or 'jnd'")
    if mode == "2afc":
        data = open_2afc(dirs, load_size)
        d0, d1 = distances_2afc(model, data, batch_size=batch_size, workers=workers, device=device, progress=progress)
        per = twoafc_agreement(d0, d1, data.judge)

        def score(sel):
            return float(np.mean(per[sel]))
    else:
        data = open_jnd(dirs, load_size)
        d = distances_jnd(model, data, batch_size=batch_size, workers=workers, device=device, progress=progress)

        def score(sel):
            return jnd_map(d[sel], data.same[sel])
    rows = []
    for i, root in enumerate(data.roots):
        sel = data.dataset == i
        rows.append({"dataset": root, "mode": mode, "n": int(sel.sum()), "score": score(sel)})
    if len(data.roots) > 1:
        rows.append({"dataset": "all", "mode": mode, "n": len(data), "score": score(np.ones(len(data), bool))})
    return rows

