"""The spatial LPIPS map of two image files as a picture: A | B | map (black = 0, white = vmax)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .features import FeatureSource

__all__ = ["heat_colors", "HeatMap", "heat_map"]

# heat-map colours: black -> purple -> red -> orange -> pale yellow (anchors picked by hand)
_HEAT_ANCHORS = ((0.0, (0, 0, 4)), (0.25, (80, 18, 123)), (0.5, (182, 54, 121)), (0.75, (251, 136, 97)), (1.0, (252, 253, 191)))


def heat_colors(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (NaN shown as 0)."""
    v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)
    xs = np.array([a for a, _ in _HEAT_ANCHORS])
    cols = np.array([c for _, c in _HEAT_ANCHORS], dtype=np.float64)
    out = np.stack([np.interp(v, xs, cols[:, k]) for k in range(3)], axis=-1)
    return np.round(out).astype(np.uint8)


@dataclass
class HeatMap:
    """``error`` (why the pair cannot be scored), else the LPIPS value, the (H, W) float32 map,
    the value shown as white and the picture (H, 3W + 8, 3) uint8."""

    error: str | None = None
    lpips: float | None = None
    values: np.ndarray | None = None
    vmax: float | None = None
    picture: np.ndarray | None = None


def heat_map(source: FeatureSource, path0: str, path1: str, vmax: float | None = None) -> HeatMap:
    """Decode both files with the source's options and render their spatial LPIPS map."""
    d0, d1 = source.decode(path0), source.decode(path1)
    err = source.check(d0, "A") or source.check(d1, "B")
    if err is None and d0.hw != d1.hw:
        err = f"size mismatch: {d0.hw[0]}x{d0.hw[1]} vs {d1.hw[0]}x{d1.hw[1]} (use --resize HxW)"
    if err is not None:
        return HeatMap(error=err)
    heat, total = source.spatial_map(d0, d1)
    hm = heat.numpy()
    top = float(hm.max()) if vmax is None else float(vmax)
    colored = heat_colors(hm / top if top > 0 else np.zeros_like(hm))
    gap = np.full((d0.hw[0], 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([d0.array, gap, d1.array, gap, colored], axis=1)
    return HeatMap(None, float(total), hm.astype(np.float32), top, picture)
