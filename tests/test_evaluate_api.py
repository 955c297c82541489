"""The dataset API's options object and model reuse across calls."""

from __future__ import annotations

import os

import pytest

import lpips_fast
from lpips_fast import model_cache
from lpips_fast.dataset.evaluate import dir_specs, evaluate_specs
from lpips_fast.dataset.options import EvalOptions, OptionError
from test_data_helpers import distort, make_flat_dir, photos, reference_model, save_state_dict


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    d0, d1 = str(root / "a"), str(root / "b")
    make_flat_dir(d0, 2)
    os.makedirs(d1)
    from PIL import Image

    for k, img in enumerate(photos(2)):
        Image.fromarray(distort(img, k)).save(os.path.join(d1, f"img{k:03d}.png"))
    ref, _ = reference_model()
    return {"d0": d0, "d1": d1, "sd": save_state_dict(ref, str(root / "sd.safetensors"))}


def test_repeated_calls_reuse_one_model(w, monkeypatch):
    built = []
    real = model_cache.build_model
    monkeypatch.setattr(model_cache, "build_model", lambda *a, **k: built.append(1) or real(*a, **k))
    model_cache.clear()
    opts = EvalOptions(state_dict=w["sd"], device="cpu")
    first = evaluate_specs(dir_specs(w["d0"], w["d1"]), opts)
    second = evaluate_specs(dir_specs(w["d0"], w["d1"]), opts.replace(batch_size=1))
    assert len(built) == 1
    assert [r.path0 for r in first] == [r.path0 for r in second]
    assert all(a.lpips > 1e-3 and abs(a.lpips - b.lpips) <= 1e-6 for a, b in zip(first, second))
    evaluate_specs(dir_specs(w["d0"], w["d1"]), opts.replace(dtype="bfloat16"))
    assert len(built) == 2  # another dtype: another model
    st = os.stat(w["sd"])  # the weights file changed: rebuilt, never a stale model
    os.utime(w["sd"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    evaluate_specs(dir_specs(w["d0"], w["d1"]), opts)
    assert len(built) == 3


def test_public_functions_build_the_options_object(w, monkeypatch):
    seen = []
    import lpips_fast.dataset.evaluate as ev

    real = ev.evaluate_specs
    monkeypatch.setattr(ev, "evaluate_specs", lambda specs, options, **k: seen.append(options) or real(specs, options, **k))
    _, ours = reference_model()
    rows = lpips_fast.evaluate_dirs(w["d0"], w["d1"], model=ours, batch_size=3, resize="48x64", device="cpu")
    assert len(rows) == 2 and all(r.error is None for r in rows)
    (o,) = seen
    assert isinstance(o, EvalOptions) and o.batch_size == 3 and o.resize == "48x64" and o.model is ours


@pytest.mark.parametrize("kw,says", [
    ({"batch_size": 0}, "batch_size"), ({"dtype": "int8"}, "dtype"), ({"net": "resnet"}, "net"),
    ({"resize": "0x5"}, "resize"), ({"device": "meta"}, "device"), ({"cache_max_bytes": -1}, "cache_max_bytes"),
    ({"lin": "/nonexistent.pth"}, "lin"),
])
def test_bad_options_name_the_option(w, kw, says):
    with pytest.raises(OptionError, match=says):
        EvalOptions(**kw).validate()
    if "lin" not in kw:  # the public functions check them before any work
        with pytest.raises(OptionError, match=says):
            lpips_fast.evaluate_dirs(w["d0"], w["d1"], **kw)
