"""A/B comparison of two metric configurations on the same image pairs.

    from lpips_fast import compare           # the function (module: lpips_fast.deploy.comparison)
    rep = compare("net=alex,version=0.1", "net=alex,version=0.0", dirs=("out/", "gt/"))
    print(rep.markdown())

A configuration (:class:`Config`) is net, LPIPS version, named lin set (``lpips_fast.weights.registry``),
dtype, distance-op backend and device. Both score the same pairs through
``lpips_fast.evaluate_pairs`` in chunks of ``batch_size`` pairs, alternating A and B chunk by
chunk (so drifting machine load hits both alike); each chunk's wall time is one latency sample.
The report holds Pearson, Spearman and Kendall (tau-b) correlations, max/mean absolute
difference, 2AFC agreement on triplets (when given), the pairs where the two disagree most, and
the mean latency per batch of each with a paired bootstrap 95% interval on the ratio B/A.
Statistics are computed with numpy (formulas: Pearson's r; Spearman = Pearson of average ranks;
Kendall's tau-b, Kendall 1945).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model import LPIPS
from ..ops import lpips_distance

__all__ = ["Config", "CompareReport", "compare", "read_pairs_file", "read_triplets_file", "pearson", "spearman", "kendall_tau_b"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_BACKENDS = ("auto", "cpp", "torch", "triton")


@dataclass(frozen=True)
class Config:
    """One metric configuration. ``backend``: the distance op's ('auto' = C++ on CPU, Triton on CUDA)."""

    net: str = "alex"
    version: str = "0.1"
    lin: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ..model import canonical_version
        from ..nets import canonical_net_name

        object.__setattr__(self, "net", canonical_net_name(self.net))
        object.__setattr__(self, "version", canonical_version(self.version))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: got {self.dtype!r}, expected one of {sorted(_DTYPES)}")
        object.__setattr__(self, "dtype", str(_DTYPES[self.dtype]).replace("torch.", ""))
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend: got {self.backend!r}, expected one of {_BACKENDS}")
        torch.device(self.device)  # raises on a malformed device string

    @classmethod
    def parse(cls, text: str) -> "Config":
        """``'net=vgg,version=0.0,lin=mine@2,dtype=bfloat16,backend=torch,device=cpu'``; a bare
        first token is the net (``'vgg,version=0.0'``); ``precision`` is an alias of ``dtype``."""
        if isinstance(text, Config):
            return text
        kw: dict[str, str] = {}
        names = {f.name for f in fields(cls)}
        for i, part in enumerate(p.strip() for p in str(text).split(",") if p.strip()):
            key, eq, value = part.partition("=")
            if not eq:
                if i == 0:
                    key, value = "net", part
                else:
                    raise ValueError(f"config: got {text!r}; expected key=value items separated by commas, e.g. net=alex,version=0.0")
            key = "dtype" if key.strip() == "precision" else key.strip()
            if key not in names:
                raise ValueError(f"config: unknown key {key!r} in {text!r}; expected keys {sorted(names)}")
            kw[key] = value.strip()
        return cls(**kw)

    def label(self) -> str:
        parts = [self.net, f"v{self.version}"]
        if self.lin:
            parts.append(f"lin={self.lin}")
        parts += [self.dtype] + ([f"backend={self.backend}"] if self.backend != "auto" else []) + [self.device]
        return " ".join(parts)

    def build(self) -> LPIPS:
        """The configured module, on its device and dtype, in eval mode."""
        cls = LPIPS if self.backend == "auto" else _OpBackendLPIPS
        m = cls(net=self.net, version=self.version, **({"lin": self.lin} if self.lin else {}))
        if self.backend != "auto":
            m.op_backend = self.backend
        return m.to(device=self.device, dtype=_DTYPES[self.dtype]).eval().requires_grad_(False)


class _OpBackendLPIPS(LPIPS):
    """``LPIPS`` whose per-pair values go through ``lpips_distance(..., backend=op_backend)``."""

    op_backend = "torch"

    def distances(self, feats0, feats1, out_hw=None, retPerLayer=False, spatial=None, **kwargs):
        spatial = self.spatial if spatial is None else spatial
        if spatial or retPerLayer or (self.training and self.use_dropout):
            return super().distances(feats0, feats1, out_hw=out_hw, retPerLayer=retPerLayer, spatial=spatial, **kwargs)
        val = None
        for f0, f1, w in zip(feats0, feats1, self.lin_weights()):
            d = lpips_distance(f0, f1, w, backend=self.op_backend).view(-1, 1, 1, 1)
            val = d if val is None else val + d
        same = kwargs.get("same")
        if same is not None:
            val = torch.where(same.view(-1, 1, 1, 1), torch.zeros((), dtype=val.dtype, device=val.device), val)
        return val


# -- statistics --------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r (None when either side is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return None
    if np.array_equal(a, b):
        return 1.0 if np.ptp(a) > 0 else None
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt((da * da).sum() * (db * db).sum())
    return None if den == 0 else float(np.clip((da * db).sum() / den, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank)."""
    return pearson(_average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64)))


def kendall_tau_b(a: np.ndarray, b: np.ndarray, block: int = 2048) -> float | None:
    """Kendall's tau-b over all pairs (O(n^2) in blocks of rows; fine to ~50k values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.size
    if n < 2:
        return None
    s = n1 = n2 = 0.0
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sa = np.sign(a[lo:hi, None] - a[None, :])
        sb = np.sign(b[lo:hi, None] - b[None, :])
        s += float((sa * sb).sum())
        n1 += float(np.count_nonzero(sa))
        n2 += float(np.count_nonzero(sb))
    # each unordered pair counted twice in s, n1 and n2: the factors cancel
    den = np.sqrt(n1 * n2)
    return None if den == 0 else float(np.clip(s / den, -1.0, 1.0))


def _bootstrap_ratio(ta: np.ndarray, tb: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of mean(tb)/mean(ta), resampling batches jointly (paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ta), size=(resamples, len(ta)))
    ratios = tb[idx].mean(axis=1) / ta[idx].mean(axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


# -- inputs ------------------------------------------------------------------------------------
def _split_line(line: str) -> list[str]:
    for sep in ("\t", ","):
        if sep in line:
            return [p.strip() for p in line.split(sep)]
    return line.split()


def _read_tuples(path: str | os.PathLike, width: int, what: str) -> list[tuple[str, ...]]:
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    out = []
    for i, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = _split_line(line)
        if len(parts) != width:
            raise ValueError(f"{what}: {p} line {i}: expected {width} paths, got {len(parts)} ({line!r})")
        if i == 1 and parts[0] in ("path0", "ref"):
            continue  # a header
        out.append(tuple(x if os.path.isabs(x) else str(p.parent / x) for x in parts))
    return out


def read_pairs_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Two image paths per line (tab, comma or space separated; relative to the file's folder)."""
    return _read_tuples(path, 2, "pairs")


def read_triplets_file(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """``ref p0 p1`` per line: which of p0, p1 is closer to ref (2AFC)."""
    return _read_tuples(path, 3, "triplets")


def _dir_pairs(dir0: str | os.PathLike, dir1: str | os.PathLike) -> list[tuple[str, str]]:
    from ..dataset.data import list_images

    d0, d1 = Path(os.fspath(dir0)), Path(os.fspath(dir1))
    for d in (d0, d1):
        if not d.is_dir():
            raise NotADirectoryError(f"dirs: {d} is not a folder")
    common = sorted(set(list_images(str(d0))) & set(list_images(str(d1))))
    return [(str(d0 / r), str(d1 / r)) for r in common]


# -- the report --------------------------------------------------------------------------------
@dataclass
class CompareReport:
    a: dict
    b: dict
    n_pairs: int
    n_errors: int
    pearson: float | None
    spearman: float | None
    kendall: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    two_afc_agreement: float | None
    n_triplets: int
    top_disagreements: list[dict]
    latency_ms_a: float
    latency_ms_b: float
    latency_ratio: float
    latency_ratio_ci95: tuple[float, float]
    batch_size: int
    n_batches: int
    scores_a: list = field(default_factory=list, repr=False)
    scores_b: list = field(default_factory=list, repr=False)

    def to_dict(self, include_scores: bool = False) -> dict:
        d = asdict(self)
        d["latency_ratio_ci95"] = list(self.latency_ratio_ci95)
        if not include_scores:
            d.pop("scores_a")
            d.pop("scores_b")
        return d

    def markdown(self) -> str:
        def f(v, spec=".6f"):
            return "n/a" if v is None else format(v, spec)

        lo, hi = self.latency_ratio_ci95
        lines = [
            "| | configuration | ms / batch |",
            "|---|---|---|",
            f"| A | {self.a['label']} | {self.latency_ms_a:.2f} |",
            f"| B | {self.b['label']} | {self.latency_ms_b:.2f} |",
            "",
            f"{self.n_pairs} pairs scored by both ({self.n_errors} error rows skipped), "
            f"{self.n_batches} batches of {self.batch_size}.",
            "",
            "| statistic | value |",
            "|---|---|",
            f"| Pearson | {f(self.pearson)} |",
            f"| Spearman | {f(self.spearman)} |",
            f"| Kendall tau-b | {f(self.kendall)} |",
            f"| max abs diff | {f(self.max_abs_diff, '.3g')} |",
            f"| mean abs diff | {f(self.mean_abs_diff, '.3g')} |",
            f"| 2AFC agreement | {f(self.two_afc_agreement, '.4f')}"
            + (f" ({self.n_triplets} triplets)" if self.n_triplets else " (no triplets given)") + " |",
            f"| latency B/A | {self.latency_ratio:.3f} (95% CI {lo:.3f}-{hi:.3f}) |",
        ]
        if self.top_disagreements:
            lines += ["", "Largest disagreements:", "", "| path0 | path1 | A | B | B - A |", "|---|---|---|---|---|"]
            for r in self.top_disagreements:
                lines.append(f"| {r['path0']} | {r['path1']} | {r['a']:.6f} | {r['b']:.6f} | {r['b'] - r['a']:+.3g} |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """A scatter of B against A and a histogram of B - A (needs matplotlib: the ``plot`` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("plot: needs matplotlib (pip install 'lpips-fast[plot]')") from e
        a, b = np.asarray(self.scores_a), np.asarray(self.scores_b)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
        ax1.scatter(a, b, s=6, alpha=0.6)
        if a.size:
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
            ax1.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax1.set_xlabel(f"A: {self.a['label']}")
        ax1.set_ylabel(f"B: {self.b['label']}")
        ax1.set_title(f"Spearman {self.spearman if self.spearman is None else round(self.spearman, 4)}")
        ax2.hist(b - a, bins=40)
        ax2.set_xlabel("B - A")
        ax2.set_ylabel("pairs")
        fig.tight_layout()
        out = Path(os.fspath(path))
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def _score_chunks(models, pairs, cfgs, batch_size: int) -> tuple[list[list], np.ndarray]:
    """Rows per model and per-chunk wall times (chunks alternate A, B, A, B...)."""
    from ..dataset.evaluate import evaluate_pairs

    chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    rows: list[list] = [[] for _ in models]
    times = np.zeros((len(chunks), len(models)))
    # one untimed warm-up chunk per model (first-call costs: kernel builds, allocator)
    for m, c in zip(models, cfgs):
        evaluate_pairs(chunks[0][:1], model=m, device=c.device, dtype=_DTYPES[c.dtype], batch_size=batch_size)
    for i, ch in enumerate(chunks):
        order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))
        for k in order:
            c = cfgs[k]
            if c.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = evaluate_pairs(ch, model=models[k], device=c.device, dtype=_DTYPES[c.dtype], batch_size=batch_size)
            if c.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[i, k] = time.perf_counter() - t0
            rows[k].extend(r)
    return rows, times


def _triplet_agreement(va: np.ndarray, vb: np.ndarray, n_main: int, t: int) -> tuple[float | None, int]:
    """2AFC agreement of ``a`` and ``b`` over the ``t`` triplets scored after the ``n_main`` pairs
    (``d(ref, p0)`` then ``d(ref, p1)``), and how many triplets both scored."""
    if not t:
        return None, 0
    a0, a1 = va[n_main : n_main + t], va[n_main + t :]
    b0, b1 = vb[n_main : n_main + t], vb[n_main + t :]
    good = np.isfinite(a0) & np.isfinite(a1) & np.isfinite(b0) & np.isfinite(b1)
    n_trip = int(good.sum())
    if not n_trip:
        return None, 0
    return float((np.sign(a1 - a0)[good] == np.sign(b1 - b0)[good]).mean()), n_trip


def compare(
    a: Config | str,
    b: Config | str,
    *,
    pairs: Sequence[Sequence[str]] | str | os.PathLike | None = None,
    dirs: tuple[str | os.PathLike, str | os.PathLike] | None = None,
    triplets: Sequence[Sequence[str]] | str | os.PathLike | None = None,
    batch_size: int = 16,
    top: int = 10,
    resamples: int = 2000,
    seed: int = 0,
) -> CompareReport:
    """Score the same pairs with configurations ``a`` and ``b`` and compare (see the module doc).

    ``pairs``: a list of (path0, path1) or a pairs file; ``dirs``: two folders (same relative
    paths); exactly one of them. ``triplets``: (ref, p0, p1) list or file for 2AFC agreement.
    """
    ca, cb = Config.parse(a), Config.parse(b)
    if (pairs is None) == (dirs is None):
        raise ValueError("compare: give exactly one of pairs= (list or pairs file) and dirs=(DIR0, DIR1)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}, expected a positive integer")
    if dirs is not None:
        plist = _dir_pairs(*dirs)
    elif isinstance(pairs, (str, os.PathLike)):
        plist = read_pairs_file(pairs)
    else:
        plist = [tuple(map(str, p)) for p in pairs]
    tlist: list = []
    if triplets is not None:
        tlist = read_triplets_file(triplets) if isinstance(triplets, (str, os.PathLike)) else [tuple(map(str, t)) for t in triplets]
    n_main = len(plist)
    if n_main == 0:
        raise ValueError("compare: no pairs to score (empty list, file or folders without common names)")
    all_pairs = list(plist) + [(t[0], t[1]) for t in tlist] + [(t[0], t[2]) for t in tlist]

    models = [ca.build(), cb.build()]
    rows, times = _score_chunks(models, all_pairs, [ca, cb], batch_size)
    va = np.array([np.nan if r.lpips is None else r.lpips for r in rows[0]], np.float64)
    vb = np.array([np.nan if r.lpips is None else r.lpips for r in rows[1]], np.float64)

    ok = np.isfinite(va[:n_main]) & np.isfinite(vb[:n_main])
    sa, sb = va[:n_main][ok], vb[:n_main][ok]
    diff = np.abs(sb - sa)
    idx = np.flatnonzero(ok)
    order = np.argsort(-diff, kind="mergesort")[: max(0, top)]
    topd = [{"path0": plist[idx[i]][0], "path1": plist[idx[i]][1], "a": float(sa[i]), "b": float(sb[i])} for i in order]

    agree, n_trip = _triplet_agreement(va, vb, n_main, len(tlist))

    ta, tb = times[:, 0], times[:, 1]
    return CompareReport(
        a={**asdict(ca), "label": ca.label()},
        b={**asdict(cb), "label": cb.label()},
        n_pairs=int(ok.sum()),
        n_errors=int((~ok).sum()),
        pearson=pearson(sa, sb),
        spearman=spearman(sa, sb),
        kendall=kendall_tau_b(sa, sb),
        max_abs_diff=float(diff.max()) if diff.size else None,
        mean_abs_diff=float(diff.mean()) if diff.size else None,
        two_afc_agreement=agree,
        n_triplets=n_trip,
        top_disagreements=topd,
        latency_ms_a=float(ta.mean() * 1e3),
        latency_ms_b=float(tb.mean() * 1e3),
        latency_ratio=float(tb.mean() / ta.mean()),
        latency_ratio_ci95=_bootstrap_ratio(ta, tb, resamples, seed),
        batch_size=batch_size,
        n_batches=len(ta),
        scores_a=sa.tolist(),
        scores_b=sb.tolist(),
    )
