"""BAPPS loader and 2AFC/JND scores against the reference lpips 0.1.4 definitions.

The reference's loader (PerceptualSimilarity ``data/dataset/*``) is not in the pip package: the
reference side here reads the same folders the way it does (sorted paths, PIL, torchvision
``Resize(64)`` + ``ToTensor`` + ``Normalize(0.5, 0.5)``) and calls ``lpips.score_2afc_dataset`` /
``lpips.score_jnd_dataset`` with the reference model.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_pair

from lpips_fast.training import (
    BappsError,
    open_2afc,
    open_jnd,
    read_rgb,
    score_2afc,
    score_jnd,
    score_table,
    to_input,
    voc_ap,
)
from lpips_fast.training import synthetic


def _sources():
    skd = pytest.importorskip("skimage.data")
    return [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]


@pytest.fixture(scope="module")
def models():
    ref, ours = make_pair("alex", "0.1", pretrained_trunk=True)
    return ref, ours


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("bapps")
    _, ours = models
    # Soft judges from the teacher so ties and fractions both occur in the labels.
    synthetic.make_2afc(root / "a", _sources(), n=36, teacher=ours, temperature=0.05, seed=0)
    synthetic.make_2afc(root / "b", _sources(), n=20, teacher=ours, seed=1)
    synthetic.make_jnd(root / "j", _sources(), n=36, teacher=ours, temperature=0.05, seed=2)
    return root


class _RefLoader:
    """The reference's TwoAFCDataset/JNDDataset reading, batched as its DataLoader does."""

    def __init__(self, roots, subs, label, batch_size=50):
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose([transforms.Resize(64), transforms.ToTensor(),
                                 transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        paths = {s: sorted(os.path.join(r, s, f) for r in roots for f in os.listdir(os.path.join(r, s)))
                 for s in subs + [label]}
        n = len(paths[subs[0]])
        rows = []
        for i in range(n):
            row = {s: tf(Image.open(paths[s][i]).convert("RGB")) for s in subs}
            row[label] = torch.FloatTensor(np.load(paths[label][i]).reshape((1, 1, 1)))
            rows.append(row)
        self.batches = [torch.utils.data.default_collate(rows[i:i + batch_size]) for i in range(0, n, batch_size)]

    def load_data(self):
        return self.batches


def test_read_rgb_matches_torchvision_resize(tmp_path):
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for h, w in [(80, 96), (96, 70), (64, 64), (50, 64)]:
        p = tmp_path / f"{h}x{w}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        tf = transforms.Compose([transforms.Resize(64), transforms.ToTensor(),
                                 transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        want = tf(Image.open(p).convert("RGB"))
        got = to_input(read_rgb(p, 64)[None])[0]
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_score_2afc_equals_reference(models, data_root):
    import lpips

    ref, ours = models
    dirs = [str(data_root / "a"), str(data_root / "b")]
    want, details = lpips.score_2afc_dataset(_RefLoader(dirs, ["ref", "p0", "p1"], "judge"), ref.forward)
    got = score_2afc(ours, dirs, batch_size=16)
    assert abs(got - want) <= 1e-6
    # Per dataset: the reference's per-triplet scores, in its order (sorted paths: a/ then b/).
    rows = score_table(ours, dirs, "2afc", batch_size=16)
    assert [r["n"] for r in rows] == [36, 20, 56]
    per = details["scores"]
    assert abs(rows[0]["score"] - per[:36].mean()) <= 1e-6
    assert abs(rows[1]["score"] - per[36:].mean()) <= 1e-6
    assert abs(rows[-1]["score"] - want) <= 1e-6
    # The teacher's hard-judged folder: the teacher agrees with itself everywhere.
    assert rows[1]["score"] == 1.0


def test_score_jnd_equals_reference(models, data_root):
    import lpips

    ref, ours = models
    d = str(data_root / "j")
    flat = lambda a, b: ref.forward(a, b).flatten()  # noqa: E731 - the definition's (N,) distances
    want, _ = lpips.score_jnd_dataset(_RefLoader([d], ["p0", "p1"], "same", batch_size=8), flat)
    got = score_jnd(ours, d, batch_size=8)
    assert abs(got - want) <= 1e-6
    assert 0.5 < got <= 1.0


def test_workers_give_the_same_scores(models, data_root):
    _, ours = models
    d = str(data_root / "a")
    assert score_2afc(ours, d, batch_size=8, workers=2) == score_2afc(ours, d, batch_size=8)


def test_voc_ap_equals_reference():
    import lpips

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        rec = np.sort(rng.random(n))
        prec = rng.random(n)
        assert voc_ap(rec, prec) == pytest.approx(lpips.voc_ap(rec, prec), abs=1e-12)
        assert voc_ap(rec, prec, True) == pytest.approx(lpips.voc_ap(rec, prec, True), abs=1e-12)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_judge_folder_is_an_error(data_root, tmp_path):
    d = _copy(data_root / "b", tmp_path / "b")
    shutil.rmtree(d / "judge")
    with pytest.raises(BappsError, match=r"missing sub-folder\(s\) \['judge'\]"):
        open_2afc(d)


def test_missing_and_extra_files_are_reported_by_name(data_root, tmp_path):
    d = _copy(data_root / "b", tmp_path / "b")
    os.remove(d / "p1" / "000003.png")
    os.remove(d / "judge" / "000007.npy")
    np.save(d / "judge" / "extra.npy", np.array([0.5], np.float32))
    with pytest.raises(BappsError) as e:
        open_2afc(d)
    msg = str(e.value)
    assert "000003" in msg and "p1/" in msg
    assert "000007" in msg and "judge/" in msg
    assert "extra" in msg


def test_bad_labels_and_folders(data_root, tmp_path):
    with pytest.raises(BappsError, match="does not exist"):
        open_2afc(tmp_path / "nowhere")
    d = _copy(data_root / "b", tmp_path / "b")
    np.save(d / "judge" / "000002.npy", np.array([1.5], np.float32))
    with pytest.raises(BappsError, match=r"000002\.npy: expected a value in \[0, 1\], got 1.5"):
        open_2afc(d)
    with pytest.raises(BappsError, match="JND folder holds p0/, p1/, same/"):
        open_jnd(data_root / "a")
    with pytest.raises(ValueError, match="load_size"):
        open_2afc(data_root / "a", load_size=0)


def test_undecodable_image_names_the_file(data_root, tmp_path, models):
    d = _copy(data_root / "b", tmp_path / "b")
    (d / "p0" / "000004.png").write_bytes(b"not a png")
    with pytest.raises(BappsError, match=r"000004\.png: cannot decode"):
        score_2afc(models[1], d)
