"""A/B comparison: identical configurations agree exactly; v0.0 vs v0.1 differ by the known amount."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import lpips_fast
from lpips_fast.deploy.comparison import Config, compare, kendall_tau_b, pearson, spearman

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "clean"


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """Clean 64x64 photographs and distorted versions (noise, blur, JPEG) in two folders."""
    root = tmp_path_factory.mktemp("cmp")
    (root / "a").mkdir()
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for src in sorted(EXAMPLES.glob("*.png")):
        im = Image.open(src).convert("RGB").resize((64, 64), Image.BICUBIC)
        for j, kind in enumerate(["noise8", "noise24", "blur1", "blur2", "jpeg20"]):
            if kind.startswith("noise"):
                arr = np.asarray(im, np.float64) + rng.normal(0, float(kind[5:]), (64, 64, 3))
                dist = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            elif kind.startswith("blur"):
                dist = im.filter(ImageFilter.GaussianBlur(int(kind[4:])))
            else:
                im.save(root / "tmp.jpg", quality=20)
                dist = Image.open(root / "tmp.jpg").convert("RGB")
            name = f"{src.stem}_{kind}.png"
            im.save(root / "a" / name)
            dist.save(root / "b" / name)
            names.append(name)
    trip = root / "triplets.txt"
    lines = [f"a/{names[i]}\tb/{names[i]}\tb/{names[i + 1]}" for i in range(0, len(names) - 1)]
    trip.write_text("\n".join(lines) + "\n")
    return root, sorted(names)


def _direct(version: str, root: Path, names: list[str]) -> np.ndarray:
    m = lpips_fast.LPIPS(net="alex", version=version)
    load = lambda p: lpips_fast.im2tensor(lpips_fast.load_image(p))  # noqa: E731
    with torch.no_grad():
        return np.array([float(m(load(root / "a" / n), load(root / "b" / n))) for n in names])


def test_identical_configs(photo_set):
    root, names = photo_set
    rep = compare("alex", "net=alex,version=0.1", dirs=(root / "a", root / "b"), batch_size=4,
                  triplets=root / "triplets.txt")
    assert rep.n_pairs == len(names) and rep.n_errors == 0
    assert rep.pearson == 1.0 and rep.spearman == 1.0 and rep.kendall == 1.0
    assert rep.max_abs_diff == 0.0 and rep.mean_abs_diff == 0.0
    assert rep.two_afc_agreement == 1.0 and rep.n_triplets == len(names) - 1
    assert rep.n_batches == -(-(len(names) + 2 * (len(names) - 1)) // 4)  # pairs + both sides of each triplet
    lo, hi = rep.latency_ratio_ci95
    assert lo <= rep.latency_ratio <= hi and rep.latency_ms_a > 0


def test_v00_vs_v01_known_difference(photo_set, tmp_path):
    root, names = photo_set
    want01, want00 = _direct("0.1", root, names), _direct("0.0", root, names)
    assert np.abs(want01 - want00).max() > 1e-3  # the two versions really differ here
    rep = compare("alex", "alex,version=0.0", dirs=(root / "a", root / "b"), batch_size=4, top=3)
    a, b = np.array(rep.scores_a), np.array(rep.scores_b)
    np.testing.assert_allclose(a, want01, atol=1e-6, rtol=0)
    np.testing.assert_allclose(b, want00, atol=1e-6, rtol=0)
    assert rep.max_abs_diff == pytest.approx(np.abs(want01 - want00).max(), abs=2e-6)
    assert rep.mean_abs_diff == pytest.approx(np.abs(want01 - want00).mean(), abs=2e-6)
    assert rep.pearson == pytest.approx(np.corrcoef(want01, want00)[0, 1], abs=1e-5)
    assert rep.pearson < 1.0
    top = rep.top_disagreements
    assert len(top) == 3 and abs(top[0]["b"] - top[0]["a"]) == pytest.approx(rep.max_abs_diff)
    md = rep.markdown()
    assert "Spearman" in md and "Largest disagreements" in md
    rep.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_top_level_name_is_the_function():
    assert lpips_fast.compare is compare and callable(lpips_fast.compare)


def test_statistics_against_definitions():
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.5, size=200)
    b[:20] = b[0]  # ties
    # brute-force tau-b over all pairs
    sa = np.sign(a[:, None] - a[None, :])
    sb = np.sign(b[:, None] - b[None, :])
    tau = (sa * sb).sum() / np.sqrt(np.count_nonzero(sa) * np.count_nonzero(sb))
    assert kendall_tau_b(a, b, block=37) == pytest.approx(tau, abs=1e-12)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    ra = np.argsort(np.argsort(a)) + 1.0  # no ties in a
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert pearson(ra, ra) == 1.0 and pearson(np.ones(5), np.ones(5)) is None


def test_cli_json_and_errors(photo_set, tmp_path, capsys):
    from lpips_fast.cli import main

    root, names = photo_set
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{root / 'a' / n},{root / 'b' / n}\n" for n in names[:4]))
    out = tmp_path / "r.json"
    rc = main(["compare", "alex", "alex,backend=torch", str(pairs), "--json", str(out), "--batch-size", "2"])
    assert rc == 0
    d = json.loads(out.read_text())
    for k in ("pearson", "spearman", "kendall", "max_abs_diff", "mean_abs_diff", "latency_ratio_ci95"):
        assert k in d
    assert d["n_pairs"] == 4 and d["max_abs_diff"] < 1e-6  # C++ kernel vs eager composite
    assert "| Pearson |" in capsys.readouterr().out
    assert main(["compare", "alex", "net=alex,dtype=float8", str(pairs)]) == 2
    assert "dtype" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown key"):
        Config.parse("alex,colour=red")
