"""Training: steps equal to the reference ``lpips.Trainer``, the schedule, resume, the output file,
and recovery of a teacher's judgments."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast.training import (
    Dist2LogitLayer,
    learning_rates,
    make_optimizer,
    open_2afc,
    score_2afc,
    synthetic,
    to_input,
    train,
    train_step,
)
from lpips_fast.training.bapps import iter_batches
from lpips_fast.training.trainer import lin_distance, ranking_step, unit_diff_sq


def _sources():
    skd = pytest.importorskip("skimage.data")
    return [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]


def _sparse_teacher(seed=0):
    teacher = lpips_fast.LPIPS(net="alex")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in teacher.lin_weights():
            w.copy_(torch.rand(w.shape, generator=g).pow(8))
    return teacher


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory):
    """64 triplets on which a sparse random teacher and the uniform metric often disagree."""
    root = tmp_path_factory.mktemp("teach")
    synthetic.make_2afc(root / "train", _sources(), n=64, teacher=_sparse_teacher(), max_gap=0.3, seed=3)
    return root / "train"


def _reference_trainer():
    """lpips.Trainer in training mode on a random trunk (no download), then our alex trunk loaded."""
    import lpips

    from lpips_fast import weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = lpips.Trainer()
        tr.initialize(model="lpips", net="alex", use_gpu=False, is_train=True, pnet_rand=True)
    tmp = lpips_fast.nets.build_trunk("alex")
    tmp.load_torchvision_features(weights.trunk_state_dict("alex"))
    tr.net.net.load_state_dict(tmp.state_dict())
    return tr


def _batch(data, rows):
    _, imgs = next(iter_batches(data, len(rows), indices=rows))
    ref, p0, p1 = (to_input(imgs[k]) for k in range(3))
    judge = torch.as_tensor(data.judge[rows]).view(-1, 1, 1, 1)
    return ref, p0, p1, judge


def test_steps_equal_reference_trainer(hard_set):
    """Three steps of lpips.Trainer against both of our step paths, from the same state and masks:
    ``train_step`` on trunk features (no cache) and ``ranking_step`` on cached squared unit
    differences through ``lin_distance`` (the cached path ``train`` takes with dropout)."""
    tr = _reference_trainer()
    ours = []
    for _ in range(2):
        model = lpips_fast.LPIPS(pretrained=False, net="alex", pnet_rand=True, use_dropout=True, eval_mode=False)
        model.load_state_dict(tr.net.state_dict())
        head = Dist2LogitLayer()
        head.load_state_dict(tr.rankLoss.net.state_dict())
        ours.append((model, head, make_optimizer(model, head, lr=1e-4, beta1=0.5)))

    data = open_2afc(hard_set)
    for step, rows in enumerate([list(range(0, 8)), list(range(8, 16)), list(range(30, 40))]):
        if step == 2:
            # Every weight in play (the random start loses about half to the first clamp).
            with torch.no_grad():
                for k, lin in enumerate(tr.net.lins):
                    lin.model[1].weight.add_(0.05)
                    for model, _, _ in ours:
                        model.lins[k].weight.add_(0.05)
        ref, p0, p1, judge = _batch(data, rows)
        torch.manual_seed(100 + step)  # the same dropout masks on every side
        tr.set_input({"ref": ref, "p0": p0, "p1": p1, "judge": judge})
        tr.optimize_parameters()
        b = len(rows)
        results = []
        for path, (model, head, opt) in zip(("features", "diffs"), ours):
            with torch.no_grad():
                feats = model.features(torch.cat([ref, p0, p1]))
            fr, f0, f1 = ([f[i * b:(i + 1) * b] for f in feats] for i in range(3))
            torch.manual_seed(100 + step)
            if path == "features":
                results.append(train_step(model, head, opt, fr, f0, f1, judge))
            else:
                with torch.no_grad():
                    diffs0 = [unit_diff_sq(a, c) for a, c in zip(fr, f0)]
                    diffs1 = [unit_diff_sq(a, c) for a, c in zip(fr, f1)]
                d0, d1 = lin_distance(model, diffs0), lin_distance(model, diffs1)
                results.append(ranking_step(model, head, opt, d0, d1, judge))
        for out, (model, head, _) in zip(results, ours):
            assert out["loss"] == pytest.approx(float(tr.loss_total.detach()), abs=1e-6)
            for k, lin in enumerate(model.lins):
                torch.testing.assert_close(lin.weight, tr.net.lins[k].model[1].weight, rtol=0, atol=1e-6)
            for (name, a), (_, r) in zip(head.state_dict().items(), tr.rankLoss.net.state_dict().items()):
                torch.testing.assert_close(a, r, rtol=0, atol=1e-6, msg=name)
    for model, _, _ in ours:
        assert all(float(lin.weight.detach().min()) >= 0 for lin in model.lins)
        assert sum(int((lin.weight > 0).sum()) for lin in model.lins) > 1000  # of 1152


def test_learning_rates_follow_reference_decay():
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = lpips.Trainer()
        tr.initialize(model="lpips", net="alex", use_gpu=False, is_train=True, pnet_rand=True, lr=3e-4)
    want = []
    for epoch in range(1, 5 + 3 + 1):
        want.append(tr.optimizer_net.param_groups[0]["lr"])
        if epoch > 5:
            tr.update_learning_rate(3)
    assert learning_rates(3e-4, 5, 3) == want


def test_resume_after_a_kill_gives_the_same_weights(hard_set, tmp_path):
    kw = dict(epochs=1, decay_epochs=2, batch_size=32, lr=1e-3, init="uniform", seed=5)
    full = train(hard_set, out=tmp_path / "full.safetensors", **kw)

    class Killed(Exception):
        pass

    def die(epoch, row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(hard_set, out=tmp_path / "part.safetensors", on_epoch_end=die, **kw)
    assert not (tmp_path / "part.safetensors").exists()
    assert (tmp_path / "part.safetensors.ckpt").exists()
    resumed = train(hard_set, out=tmp_path / "part.safetensors", **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(full.model.lin_weights(), resumed.model.lin_weights()):
        assert torch.equal(a, b)
    for a, b in zip(full.head.state_dict().values(), resumed.head.state_dict().values()):
        assert torch.equal(a, b)
    # Different settings against an existing checkpoint: refused, naming the setting.
    with pytest.raises(ValueError, match=r"batch_size: 32 -> 8"):
        train(hard_set, out=tmp_path / "part.safetensors", **{**kw, "batch_size": 8})


def test_output_loads_with_metadata_and_scores_as_reported(hard_set, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "mine.safetensors"
    res = train(hard_set, epochs=1, decay_epochs=0, batch_size=32, init="packaged", dropout=False, out=out)
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["net"] == "alex" and md["epochs"] == "1" and md["triplets"] == "64"
    assert os.fspath(hard_set) in md["train_datasets"]
    m = lpips_fast.LPIPS(net="alex", model_path=out)
    for a, b in zip(m.lin_weights(), res.model.lin_weights()):
        assert torch.equal(a, b)
        assert float(a.detach().min()) >= 0
    # The recorded final 2AFC score is the loaded model's score on the training set.
    assert float(md["final_2afc"]) == pytest.approx(score_2afc(m, hard_set), abs=1e-6)


def test_training_recovers_the_teacher(hard_set):
    uniform = lpips_fast.LPIPS(net="alex", lpips=False)
    start = score_2afc(uniform, hard_set)
    res = train(hard_set, epochs=5, decay_epochs=0, batch_size=16, lr=1e-2, init="uniform", dropout=False)
    assert res.train_2afc >= start + 0.1, (start, res.train_2afc)


def test_bad_arguments_name_themselves(hard_set):
    with pytest.raises(ValueError, match="epochs: got -1"):
        train(hard_set, epochs=-1)
    with pytest.raises(ValueError, match="init: got 'nope'"):
        train(hard_set, init="nope", epochs=1, decay_epochs=0)
    with pytest.raises(ValueError, match="lr: got 0"):
        train(hard_set, lr=0)


def test_head_matches_reference_head():
    import lpips

    torch.manual_seed(0)
    ref = lpips.Dist2LogitLayer()
    ours = Dist2LogitLayer()
    ours.load_state_dict(ref.state_dict())
    d0, d1 = torch.rand(7, 1, 1, 1), torch.rand(7, 1, 1, 1)
    torch.testing.assert_close(ours(d0, d1), ref(d0, d1), rtol=0, atol=0)
    assert np.isfinite(ours(d0, d1).detach().numpy()).all()


def test_cached_and_streamed_training_agree(hard_set):
    """The feature cache changes where the trunk runs, not the result (float rounding only)."""
    kw = dict(epochs=1, decay_epochs=0, batch_size=32, lr=1e-3, init="uniform", seed=1)
    cached = train(hard_set, **kw)
    streamed = train(hard_set, cache_features=False, **kw)
    for a, b in zip(cached.model.lin_weights(), streamed.model.lin_weights()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in streamed.history], abs=1e-6)


def test_pnet_tune_trains_and_saves_the_trunk(hard_set, tmp_path):
    out = tmp_path / "tuned.safetensors"
    before = lpips_fast.LPIPS(net="alex").net.state_dict()
    res = train(hard_set, epochs=1, decay_epochs=0, batch_size=32, lr=1e-3, pnet_tune=True, init="packaged", out=out)
    after = res.model.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    loaded = lpips_fast.LPIPS(net="alex", model_path=out)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), res.model(x, y), rtol=0, atol=1e-6)


def test_register_stores_the_result_as_a_named_lin_set(hard_set, tmp_path, monkeypatch):
    from lpips_fast.weights import registry

    monkeypatch.setattr(registry, "models_dir", lambda: tmp_path / "models")
    out = tmp_path / "reg.safetensors"
    res = train(hard_set, epochs=1, decay_epochs=0, batch_size=32, init="packaged", out=out, register="mine")
    assert res.registered == "mine@1"
    named = lpips_fast.LPIPS(net="alex", lin="mine")
    for a, b in zip(named.lin_weights(), res.model.lin_weights()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="register: got 'x' without out"):
        train(hard_set, register="x")


def test_autocast_trunk_trains_close_to_fp32(hard_set):
    """amp=True (bf16 autocast of the trunk; CUDA's default, here on the CPU) gives weights close
    to the fp32 run and the same kind of progress; the setting is part of the checkpoint config."""
    kw = dict(epochs=2, decay_epochs=0, batch_size=32, lr=1e-3, init="uniform", dropout=False, seed=2)
    fp32 = train(hard_set, **kw)
    amp = train(hard_set, amp=True, **kw)
    for k in range(5):
        a = amp.model.lins[k].weight.detach()
        b = fp32.model.lins[k].weight.detach()
        assert torch.allclose(a, b, rtol=0.05, atol=0.02 * float(b.abs().max())), k


@pytest.mark.parametrize("dropout", [True, False])
def test_feature_cache_on_disk_trains_the_same_weights(hard_set, tmp_path, monkeypatch, dropout):
    """No room in memory: the cache goes to memory-mapped scratch files, removed afterwards; same weights bitwise."""
    from lpips_fast.training import trainer

    kw = dict(epochs=1, decay_epochs=1, batch_size=32, lr=1e-3, init="uniform", seed=1, dropout=dropout)
    in_memory = train(hard_set, **kw)
    said: list[str] = []
    monkeypatch.setattr(trainer, "free_memory", lambda device: 0)
    on_disk = train(hard_set, feature_dir=tmp_path / "scratch", log=said.append, **kw)
    assert any("files under" in m and str(tmp_path / "scratch") in m for m in said), said
    for a, b in zip(in_memory.model.lin_weights(), on_disk.model.lin_weights()):
        assert torch.equal(a, b)
    assert in_memory.train_2afc == on_disk.train_2afc
    assert [h["loss"] for h in in_memory.history] == [h["loss"] for h in on_disk.history]
    assert os.listdir(tmp_path / "scratch") == []  # scratch files removed


def test_feature_cache_too_large_for_memory_and_disk_is_a_clear_error(hard_set, tmp_path, monkeypatch):
    from lpips_fast.training import FeatureCacheError, trainer

    monkeypatch.setattr(trainer, "free_memory", lambda device: 0)
    monkeypatch.setattr(trainer, "free_disk", lambda path: 1 << 20)
    with pytest.raises(FeatureCacheError, match=r"64 triplets need .* GiB.*--no-cache") as e:
        train(hard_set, epochs=1, decay_epochs=0, feature_dir=tmp_path / "small", out=tmp_path / "w.safetensors")
    assert "--feature-dir" in str(e.value)
    assert not (tmp_path / "w.safetensors").exists() and os.listdir(tmp_path / "small") == []


def test_orphaned_scratch_folders_are_removed(tmp_path):
    from lpips_fast.training import trainer

    dead = tmp_path / "features-999999999-abc"  # no such process
    mine = tmp_path / f"features-{os.getpid()}-xyz"
    other = tmp_path / "notes"
    for d in (dead, mine, other):
        d.mkdir()
    trainer._remove_orphaned_scratch(str(tmp_path))
    assert not dead.exists() and mine.exists() and other.exists()


def test_feature_dir_that_is_a_file_is_refused_before_work(hard_set, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"feature_dir: .* is not a directory"):
        train(hard_set, epochs=1, decay_epochs=0, feature_dir=f)
