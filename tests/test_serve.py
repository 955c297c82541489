"""``lpips-fast serve`` as a real server process on a free 127.0.0.1 port, driven by httpx.

Random-trunk models saved as state dicts keep start-up cheap; values are compared with ``LPIPS``
built from the same files, in this process.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
prom_parser = pytest.importorskip("prometheus_client.parser")

import lpips_fast  # noqa: E402
from lpips_fast.serve.app import pick_arm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_harness import START_TIMEOUT_S, Server, random_model  # noqa: E402
from serve_harness import as_tensor as _as_tensor  # noqa: E402
from serve_harness import free_port as _free_port  # noqa: E402
from serve_harness import image as _image  # noqa: E402
from serve_harness import png as _png  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random-trunk alex models (arms a and b), saved as state dicts."""
    d = tmp_path_factory.mktemp("serve_models")
    out = {}
    for arm, seed in (("a", 0), ("b", 1)):
        path = d / f"{arm}.pt"
        out[arm] = (random_model(path, seed), path)
    return out


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    srv = Server(
        ["--model", f"a=alex-v0.1@{models['a'][1]}", "--model", f"b=alex-v0.1@{models['b'][1]}", "--split", "a=0.5,b=0.5",
         "--max-body-bytes", "200k", "--max-pixels", "40000", "--max-delay-ms", "20",
         "--log-level", "debug", "--log-format", "json"],
        log,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _ref(model, a: np.ndarray, b: np.ndarray, spatial: bool = False):
    with torch.no_grad():
        if spatial:
            m = lpips_fast.LPIPS(net="alex", pnet_rand=True, pretrained=False, spatial=True)
            m.load_state_dict(model.state_dict())
            return m(_as_tensor(a), _as_tensor(b))[0, 0]
        return model(_as_tensor(a), _as_tensor(b)).item()


def _key_for(arm: str) -> str:
    return next(k for k in (f"user-{i}" for i in range(1000)) if pick_arm(["a", "b"], [0.5, 0.5], k) == arm)


def test_distance_multipart_and_json_equal_lpips(server, models):
    a, b = _image(1), _image(2)
    for arm in ("a", "b"):
        key = {"x-request-key": _key_for(arm)}
        r = server.client.post("/v1/distance", files={"img0": _png(a), "img1": _png(b)}, headers=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["arm"] == arm and r.headers["x-lpips-arm"] == arm
        assert body["model"].startswith("alex-v0.1@") and body["ms"] > 0
        assert abs(body["lpips"] - _ref(models[arm][0], a, b)) <= TOL
        doc = {"img0": base64.encodebytes(_png(a)).decode(),  # wrapped at 76 characters
               "img1": "data:image/png;base64," + base64.b64encode(_png(b)).decode()}
        r2 = server.client.post("/v1/distance", json=doc, headers=key)
        assert r2.status_code == 200 and r2.json()["lpips"] == body["lpips"]


def test_ab_split_is_stable_per_key_and_random_without(server):
    a, b = _png(_image(3)), _png(_image(4))
    seen = {}
    for i in range(12):
        key = f"k{i}"
        r = server.client.post("/v1/distance", files={"img0": a, "img1": b}, headers={"x-request-key": key})
        assert r.status_code == 200
        seen[key] = r.json()["arm"]
        assert seen[key] == pick_arm(["a", "b"], [0.5, 0.5], key)
    assert set(seen.values()) == {"a", "b"}
    arms = {server.client.post("/v1/distance", files={"img0": a, "img1": b}).json()["arm"] for _ in range(16)}
    assert arms == {"a", "b"}  # 16 draws at 50/50 miss an arm with probability 2 * 2**-16


def test_concurrent_clients_get_their_own_values_batched(server, models):
    imgs = [_image(10 + i) for i in range(17)]
    key = {"x-request-key": _key_for("a")}

    def one(i):
        r = server.client.post("/v1/distance", files={"img0": _png(imgs[i]), "img1": _png(imgs[i + 1])}, headers=key)
        return r.status_code, r.json()

    before = _samples(server, "lpips_fast_batches_total", arm="a", kind="distance")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert abs(body["lpips"] - _ref(models["a"][0], imgs[i], imgs[i + 1])) <= TOL
    batches = _samples(server, "lpips_fast_batches_total", arm="a", kind="distance") - before
    assert 1 <= batches < 16  # coalesced across connections


def test_bad_requests_get_json_errors_and_the_server_stays_up(server, models):
    good = _png(_image(5))
    c = server.client
    cases = [
        (c.post("/v1/distance", files={"img0": b"not an image", "img1": good}), 400, "undecodable"),
        (c.post("/v1/distance", files={"img0": good}), 400, "bad_request"),
        (c.post("/v1/distance", json={"img0": "%%%", "img1": "x"}), 400, "bad_request"),
        (c.post("/v1/distance", content=b"{", headers={"content-type": "application/json"}), 400, "bad_request"),
        (c.post("/v1/distance", files={"img0": _png(_image(6, 16, 16)), "img1": _png(_image(7, 16, 16))}), 400, "too_small"),
        (c.post("/v1/distance", files={"img0": good, "img1": _png(_image(8, 64, 48))}), 400, "shape_mismatch"),
        (c.post("/v1/distance", content=b"abc", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        # 256x256 = 65536 pixels > max_pixels 40000: refused from the header (a few hundred bytes of PNG).
        (c.post("/v1/distance", files={"img0": _png(np.zeros((256, 256, 3), np.uint8)), "img1": good}), 413, "too_large"),
        (c.post("/v1/distance", files={"img0": os.urandom(300_000), "img1": good}), 413, "body_too_large"),
        (c.get("/v1/nothing"), 404, "not_found"),
        (c.get("/v1/distance"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (code, r.status_code, r.text)
        body = r.json()
        assert body["code"] == code and isinstance(body["message"], str) and body["message"], body
    # One bad pair in a batch fails alone.
    pairs = [{"img0": base64.b64encode(_png(_image(20))).decode(), "img1": base64.b64encode(_png(_image(21))).decode()},
             {"img0": base64.b64encode(b"junk").decode(), "img1": base64.b64encode(good).decode()}]
    r = c.post("/v1/distance/batch", json={"pairs": pairs}, headers={"x-request-key": _key_for("b")})
    assert r.status_code == 200
    res = r.json()["results"]
    assert abs(res[0]["lpips"] - _ref(models["b"][0], _image(20), _image(21))) <= TOL
    assert res[1]["error"]["code"] == "undecodable"
    assert c.get("/healthz").json() == {"status": "ok"}
    assert server.proc.poll() is None


def test_map_png_and_models(server, models):
    from PIL import Image

    a, b = _image(30), _image(31)
    files, key = {"img0": _png(a), "img1": _png(b)}, {"x-request-key": _key_for("a")}
    r = server.client.post("/v1/map", files=files, headers=key)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).mode == "RGB"  # the colours of `lpips-fast map`
    r = server.client.post("/v1/map", params={"palette": "gray"}, files=files, headers=key)
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (64, 64) and im.mode == "L"
    want = _ref(models["a"][0], a, b, spatial=True)
    assert abs(float(r.headers["x-lpips-value"]) - want.mean().item()) <= TOL
    assert abs(float(r.headers["x-lpips-vmax"]) - want.max().item()) <= TOL
    got = np.asarray(im, dtype=np.float64) / 255.0 * float(r.headers["x-lpips-vmax"])
    assert np.abs(got - want.numpy()).max() <= want.max().item() / 255.0  # 8-bit quantisation
    m = server.client.get("/v1/models").json()
    assert [(x["arm"], x["share"], x["ready"]) for x in m["models"]] == [("a", 0.5, True), ("b", 0.5, True)]


def _samples(server, name: str, **labels) -> float:
    text = server.client.get("/metrics").text
    total = 0.0
    for fam in prom_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_text_parses_with_per_arm_series(server):
    a, b = _png(_image(40)), _png(_image(41))
    for arm in ("a", "b"):
        assert server.client.post("/v1/distance", files={"img0": a, "img1": b},
                                  headers={"x-request-key": _key_for(arm)}).status_code == 200
    r = server.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(r.text)}
    assert fams["lpips_fast_http_requests"].type == "counter"
    assert fams["lpips_fast_http_request_seconds"].type == "histogram"
    for arm in ("a", "b"):
        assert _samples(server, "lpips_fast_http_requests_total", arm=arm, endpoint="/v1/distance", status="200") >= 1
        assert _samples(server, "lpips_fast_http_request_seconds_count", arm=arm, endpoint="/v1/distance") >= 1
        assert _samples(server, "lpips_fast_pairs_total", arm=arm, kind="distance") >= 1
    assert _samples(server, "lpips_fast_errors_total", kind="undecodable") >= 0
    assert _samples(server, "lpips_fast_http_ready") == 1.0


def test_debug_log_has_one_json_line_per_request(server):
    server.client.get("/healthz", headers={"x-probe": "1"})
    time.sleep(0.2)
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    req = [ln for ln in lines if ln.get("path") == "/healthz"]
    assert req and req[-1]["status"] == 200 and req[-1]["level"] == "debug" and "ms" in req[-1]


def test_sigterm_drains_requests_in_flight_and_auth(models, tmp_path):
    token = "t0ken-for-the-test"
    metrics_json = tmp_path / "metrics.json"
    srv = Server(["--state-dict", str(models["a"][1]), "--max-delay-ms", "3000", "--shutdown-timeout", "20",
                  "--log-level", "info", "--metrics-json", str(metrics_json)],
                 tmp_path / "server.log", env={"LPIPS_FAST_SERVE_AUTH_TOKEN": token})
    try:
        srv.wait_ready()
        a, b = _image(50), _image(51)
        auth = {"authorization": f"Bearer {token}"}
        r = srv.client.post("/v1/distance", files={"img0": _png(a), "img1": _png(b)})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        out = {}
        t = threading.Thread(target=lambda: out.update(r=srv.client.post(
            "/v1/distance", files={"img0": _png(a), "img1": _png(b)}, headers=auth)))
        t.start()
        deadline = time.monotonic() + 20  # until the request is inside (its pair waits 3 s to batch)
        while "lpips_fast_http_in_flight 1.0" not in srv.client.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert not t.is_alive()
        assert out["r"].status_code == 200, out["r"].text
        assert abs(out["r"].json()["lpips"] - _ref(models["a"][0], a, b)) <= TOL
        assert srv.proc.wait(30) == 0
        log = srv.log()
        assert "scorers drained" in log and token not in log
        final = json.loads(metrics_json.read_text())
        assert final["arms"]["default"]["distance"]["pairs_scored"] == 1  # the 401 never reached the scorer
        assert final["http"]["requests_total"]["arm=,endpoint=/v1/distance,status=401"] == 1
        assert final["http"]["requests_total"]["arm=default,endpoint=/v1/distance,status=200"] == 1
    finally:
        srv.stop()


# -- in-process: arm specs and routing ----------------------------------------------------------
def test_model_specs_include_registered_lin_sets(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from lpips_fast import weights
    from lpips_fast.weights import registry
    from lpips_fast.inference.scorer import model_from_settings
    from lpips_fast.serve.app import ModelSpec, parse_model_spec

    assert parse_model_spec("alex") == ModelSpec("alex", "0.1")
    assert parse_model_spec("vgg16-v0.0") == ModelSpec("vgg", "0.0")
    assert parse_model_spec("alex-v0.1@/w/x.pt") == ModelSpec("alex", "0.1", state_dict="/w/x.pt")
    assert parse_model_spec("vgg-v0.1@1") == ModelSpec("vgg", "0.1", lin="vgg-v0.1@1")
    with pytest.raises(ValueError, match="registered lin set NAME"):
        parse_model_spec("alexnet")
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path))
    lin = {k: v.clone() * 2 for k, v in weights.lin_state_dict("alex", "0.1").items()}
    save_file(lin, str(tmp_path / "lin.safetensors"))
    registry.register("mine", str(tmp_path / "lin.safetensors"), net="alex", version="0.1")
    spec = parse_model_spec("mine")
    assert spec == ModelSpec("alex", "0.1", lin="mine@1") and spec.name == "mine@1"
    section = {"net": "vgg", "version": "0.0", "trunk": None, "random_trunk": True, "seed": 0, "lin": None, "state_dict": None}
    m = model_from_settings(section, net=spec.net, version=spec.version, lin_set=spec.lin)
    for k, v in lin.items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)


def test_split_routing_shares_and_errors(tmp_path):
    from lpips_fast.serve.app import check_arms
    from lpips_fast.deploy.settings import SettingsError, load_settings

    keys = [f"u{i}" for i in range(4000)]
    share_a = sum(pick_arm(["a", "b"], [0.9, 0.1], k) == "a" for k in keys) / len(keys)
    assert 0.87 < share_a < 0.93
    assert all(pick_arm(["a", "b"], [1.0, 0.0], k) == "a" for k in keys[:200])

    def arms(**flags):
        s = load_settings(env={}, start_dir=tmp_path, flags={k.replace("_", ".", 1): (v, "--x") for k, v in flags.items()})
        return check_arms(s)

    assert [(n, s.net, w) for n, s, w in arms(serve_models="a=alex-v0.1,b=vgg-v0.1", serve_split="a=9,b=1")] == [
        ("a", "alex", 0.9), ("b", "vgg", 0.1)]
    assert [(n, s.net) for n, s, _ in arms(model_net="vgg16")] == [("default", "vgg")]
    with pytest.raises(SettingsError, match=r"serve\.split: got arms \['a', 'c'\] from flag --x"):
        arms(serve_models="a=alex,b=vgg", serve_split="a=1,c=1")
    with pytest.raises(SettingsError, match=r"serve\.models: arm 'b' from flag --x"):
        arms(serve_models="a=alex,b=resnet")


def test_readme_serve_example_runs_as_written(tmp_path):
    """The README's curl session, on a free port (pretrained alex, as written)."""
    import re
    import shutil

    from lpips_fast import weights

    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    try:
        weights.trunk_state_dict("alex")
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pretrained alex trunk not fetched")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "lpips-fast serve" in b)
    port = str(_free_port())
    script = "set -e\n" + block.replace("8080", port)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=400)  # bounded; see START_TIMEOUT_S
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server, if the script stopped before `kill $!`
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out
    values = [float(v) for v in re.findall(r'"lpips":([-+0-9.eE]+)', out)]  # curl prints no newline
    assert len(values) == 2 and values[0] == values[1] and 0 < values[0] < 1, out
    assert "lpips_fast_pairs_total{" in out
    assert Path("/tmp/map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeout_and_concurrency_limits_in_process(models, tmp_path):
    """uvicorn in a thread of this process (cheap to start): 504 past the timeout, 503 past the limit."""
    import uvicorn

    from lpips_fast.serve.app import create_app
    from lpips_fast.deploy.settings import load_settings

    flags = {"model.state_dict": (str(models["a"][1]), "--state-dict"), "scorer.max_delay_ms": ("20000", "--x"),
             "serve.request_timeout_s": ("2", "--x"), "serve.max_concurrency": ("1", "--x")}
    settings = load_settings(env={}, start_dir=tmp_path, flags=flags)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            files = {"img0": _png(_image(60)), "img1": _png(_image(61))}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(c.post, "/v1/distance", files=files)
                # Wait until the first request holds the only slot (its pair would wait 20 s to batch).
                deadline = time.monotonic() + 10
                while "lpips_fast_http_in_flight 1.0" not in c.get("/metrics").text and time.monotonic() < deadline:
                    time.sleep(0.02)
                r = c.post("/v1/distance", files=files)
                assert r.status_code == 503 and r.json()["code"] == "overloaded" and r.headers["retry-after"] == "1"
                r = slow.result(30)
            assert r.status_code == 504 and r.json()["code"] == "timeout", r.text
            assert c.get("/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_server_that_cannot_load_its_model_exits_with_an_error(tmp_path):
    srv = Server(["--state-dict", str(tmp_path / "missing.pt")], tmp_path / "server.log")
    try:
        assert srv.proc.wait(START_TIMEOUT_S) == 2
        log = srv.log()
        assert "lpips-fast serve: error: loading the models failed" in log and "missing.pt" in log, log
    finally:
        srv.stop()
