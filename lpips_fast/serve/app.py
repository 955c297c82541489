"""The LPIPS HTTP service: a FastAPI app over one ``Scorer`` per A/B arm.

    app = create_app(load_settings())          # then: uvicorn.run(app, ...) or run(settings)

Endpoints (errors are always JSON ``{"code": ..., "message": ...}``):

- ``POST /v1/distance``: two images as multipart fields ``img0``/``img1``, or JSON
  ``{"img0": "<base64>", "img1": "<base64>"}`` -> ``{"lpips", "model", "arm", "ms"}``.
- ``POST /v1/distance/batch``: JSON ``{"pairs": [{"img0", "img1"}, ...]}`` (or repeated multipart
  fields) -> ``{"results": [{"lpips"} | {"error": {"code", "message"}}], "model", "arm", "ms"}``.
- ``POST /v1/map``: the same inputs -> the spatial LPIPS map as a PNG in the colours of
  ``lpips-fast map`` (``?palette=gray``: 8-bit grayscale), 0 = black, ``?vmax=`` (default: the
  map's maximum) = white; the mean, ``vmax``, arm and model in ``X-LPIPS-*`` headers.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (every arm loaded and warmed up),
  ``GET /metrics`` (Prometheus text), ``GET /v1/models``.

A/B: ``serve.models`` names the arms (``a=alex-v0.1``), ``serve.split`` their traffic shares. A
request carrying the ``serve.key_header`` header goes to the arm its key hashes to (sha256, so the
same key always lands on the same arm for a given split); without it, an arm is drawn at random.
Every response names its arm (body and ``X-LPIPS-Arm``).

Limits: ``serve.max_body_bytes`` (413), ``serve.max_pixels`` (413, from the image header, before
decoding), ``serve.request_timeout_s`` (504), ``serve.max_concurrency`` requests in progress (503),
the scorer's queue (503). A bad request never takes the server down: each failure is answered and
counted. On shutdown (SIGTERM) uvicorn stops accepting, lets requests in flight finish
(``serve.shutdown_timeout_s``), then every scorer drains.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import hashlib
import hmac
import io
import json
import logging
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # the serve extra; FastAPI resolves handler annotations from module globals

from ..inference.scorer import InvalidInput, Overloaded, Scorer, model_from_settings
from ..deploy.settings import Settings, SettingsError
from ..inference.telemetry import LATENCY_BUCKETS_S, LOGGER_NAME, Metrics, configure_logging, prometheus_collector

__all__ = ["create_app", "run", "check_arms", "ModelSpec", "parse_model_spec", "pick_arm"]

log = logging.getLogger(LOGGER_NAME)

MAX_PAIRS_PER_BATCH_REQUEST = 1024

_SPEC = re.compile(r"(alex|vgg16|vgg|squeeze)(?:-v?(0\.[01]))?(?:@(.+))?")


@dataclass(frozen=True)
class ModelSpec:
    """What an arm serves: a trunk, an LPIPS version, and a full state dict or a registered lin set."""

    net: str
    version: str
    state_dict: str | None = None
    lin: str | None = None  # a lpips_fast.weights.registry spec, NAME@N

    @property
    def name(self) -> str:
        if self.lin is not None:
            return self.lin
        base = f"{self.net}-v{self.version}"
        return base if self.state_dict is None else f"{base}@{self.state_dict.rsplit('/', 1)[-1]}"


def parse_model_spec(text: str) -> ModelSpec:
    """An arm's model from its spec.

    - ``NET[-vVERSION]`` (``alex``, ``alex-v0.1``, ``vgg-v0.0``): the packaged lin weights;
    - ``NET[-vVERSION]@STATE_DICT``: a complete LPIPS state dict file (.safetensors or torch);
    - ``NAME`` or ``NAME@N``: a lin set registered with ``lpips-fast weights register``
      (``lpips_fast.weights.registry``; net and version come from its entry).
    """
    text = text.strip()
    m = _SPEC.fullmatch(text)
    if m and not (m.group(3) or "").isdigit():
        net = "vgg" if m.group(1) == "vgg16" else m.group(1)
        return ModelSpec(net=net, version=m.group(2) or "0.1", state_dict=m.group(3))
    from ..weights import registry

    try:
        entry = registry.resolve(text)
    except Exception as e:
        raise ValueError(
            f"got {text!r}, expected NET[-vVERSION][@STATE_DICT] (NET alex, vgg or squeeze; VERSION 0.1 or 0.0; "
            f"e.g. alex-v0.1) or a registered lin set NAME[@N] ({' '.join(str(e).split())})"
        ) from None
    return ModelSpec(net=entry.net, version=entry.version, lin=entry.spec)


def check_arms(settings: Settings) -> list[tuple[str, ModelSpec, float]]:
    """(arm name, spec, traffic share) per arm, validated; ``SettingsError`` names the bad key."""
    models = settings["serve.models"]
    if models:
        arms = []
        for name, text in models.items():
            try:
                arms.append((name, parse_model_spec(text)))
            except ValueError as e:
                raise SettingsError(f"serve.models: arm {name!r} from {settings.source('serve.models')}: {e}") from None
    else:  # one arm from [model]; its state_dict applies here only (arms name their own)
        arms = [("default", ModelSpec(settings["model.net"].replace("vgg16", "vgg"),
                                      settings["model.version"].lstrip("v"), state_dict=settings["model.state_dict"]))]
    split = settings["serve.split"]
    names = [a[0] for a in arms]
    if split:
        if set(split) != set(names):
            raise SettingsError(
                f"serve.split: got arms {sorted(split)} from {settings.source('serve.split')}, "
                f"expected exactly the arms of serve.models: {names}"
            )
        total = sum(split.values())
        if total <= 0:
            raise SettingsError(f"serve.split: got all-zero weights from {settings.source('serve.split')}, "
                                "expected at least one weight > 0")
        shares = [split[n] / total for n in names]
    else:
        shares = [1.0 / len(arms)] * len(arms)
    return [(n, s, w) for (n, s), w in zip(arms, shares)]


def pick_arm(names: list[str], shares: list[float], key: str | None, rng: random.Random | None = None) -> str:
    """The arm for a request: a stable hash of ``key`` into [0, 1), or a random draw without one."""
    if key:
        u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    else:
        u = (rng or random).random()
    acc = 0.0
    for name, share in zip(names, shares):
        acc += share
        if u < acc:
            return name
    return [n for n, s in zip(names, shares) if s > 0][-1]


@dataclass(eq=False)
class Arm:
    name: str
    spec: ModelSpec
    share: float
    model: Any = None
    scorer: Scorer | None = None
    map_scorer: Scorer | None = None
    map_lock: threading.Lock = field(default_factory=threading.Lock)


class HTTPError(Exception):
    """An answer other than 200, with its JSON body ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


_INPUT_STATUS = {"too_large": 413}


class Service:
    """The app's state: arms and their scorers, readiness, HTTP metrics, limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arms = [Arm(n, s, w) for n, s, w in check_arms(settings)]
        self.names = [a.name for a in self.arms]
        self.shares = [a.share for a in self.arms]
        self.by_name = {a.name: a for a in self.arms}
        self.state = "loading"
        self.error: str | None = None
        self.load_exception: BaseException | None = None
        self.on_load_failure: Any = None  # called (from the loading thread) when loading fails
        self.in_flight = 0
        self.rng = random.Random()
        self.key_header = settings["serve.key_header"].lower()
        self.timeout = settings["serve.request_timeout_s"]
        self.max_body = settings["serve.max_body_bytes"]
        self.max_concurrency = settings["serve.max_concurrency"]
        token = settings["serve.auth_token"]
        self.auth = None if token is None else f"Bearer {token}".encode()
        m = self.metrics = Metrics(prefix="lpips_fast_http")
        self.m_requests = m.counter("requests_total", "HTTP requests answered", ["arm", "endpoint", "status"])
        self.m_latency = m.histogram("request_seconds", "HTTP request latency", LATENCY_BUCKETS_S, ["arm", "endpoint"])
        m.gauge("in_flight", "HTTP requests in progress", lambda: self.in_flight)
        m.gauge("ready", "1 once every arm is loaded and warm", lambda: 1.0 if self.state == "ready" else 0.0)

    # -- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Build, warm up and start every arm's scorer (in a thread: /healthz answers meanwhile)."""
        st = self.settings
        try:
            # [model] trunk/lin/random_trunk/seed apply to every arm; the spec picks the rest.
            section = dict(st.section("model"), state_dict=None)
            for arm in self.arms:
                t = time.perf_counter()
                spec = arm.spec
                arm.model = model_from_settings(section, net=spec.net, version=spec.version,
                                                state_dict=spec.state_dict, lin_set=spec.lin)
                arm.scorer = self._scorer(arm, arm.model, "distance")
                arm.scorer.warmup(st["serve.warmup_size"])
                log.info("arm %s: %s ready on %s in %.1f s", arm.name, arm.spec.name, arm.scorer.devices,
                         time.perf_counter() - t)
            self.state = "ready"
        except Exception as e:
            self.state, self.error, self.load_exception = "failed", f"{type(e).__name__}: {e}", e
            log.error("loading the models failed: %s", self.error)
            if self.on_load_failure is not None:
                self.on_load_failure()

    def _scorer(self, arm: Arm, model: Any, kind: str) -> Scorer:
        return Scorer.from_settings(self.settings, model=model, max_pixels=self.settings["serve.max_pixels"],
                                    name=arm.name, metric_labels={"arm": arm.name, "kind": kind})

    def map_scorer(self, arm: Arm) -> Scorer:
        """The arm's spatial scorer, built on first use (a copy of its model with ``spatial=True``)."""
        with arm.map_lock:
            if arm.map_scorer is None:
                m = copy.deepcopy(arm.model)
                m.spatial = True
                arm.map_scorer = self._scorer(arm, m, "map")
            return arm.map_scorer

    def close(self) -> None:
        for arm in self.arms:
            for s in (arm.scorer, arm.map_scorer):
                if s is not None:
                    s.close()
        path = self.settings["serve.metrics_json"]
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.snapshot(), f, indent=2)

    def snapshot(self) -> dict[str, Any]:
        """Every counter and histogram as plain values: HTTP, then each arm's scorers' ``stats()``."""
        arms = {}
        for arm in self.arms:
            arms[arm.name] = {"model": arm.spec.name, "share": arm.share,
                              "distance": arm.scorer.stats() if arm.scorer else None,
                              "map": arm.map_scorer.stats() if arm.map_scorer else None}
        return {"http": self.metrics.snapshot(), "arms": arms}

    def scorers_metrics(self) -> list[Metrics]:
        out = [self.metrics]
        for arm in self.arms:
            out += [s.metrics for s in (arm.scorer, arm.map_scorer) if s is not None]
        return out

    # -- requests -----------------------------------------------------------------------------
    def route(self, request) -> Arm:
        if self.state != "ready":
            msg = "models are loading" if self.state == "loading" else f"models failed to load: {self.error}"
            raise HTTPError(503, "not_ready", msg, {"Retry-After": "1"})
        key = request.headers.get(self.key_header)
        arm = self.by_name[pick_arm(self.names, self.shares, key, self.rng)]
        request.state.arm = arm.name
        return arm

    async def score(self, scorer: Scorer, img0: bytes, img1: bytes) -> Any:
        try:
            return await asyncio.wait_for(scorer.score_async(img0, img1, wait=False), self.timeout)
        except InvalidInput as e:
            raise HTTPError(_INPUT_STATUS.get(e.kind, 400), e.kind, str(e)) from None
        except Overloaded as e:
            raise HTTPError(503, "overloaded", str(e), {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise HTTPError(504, "timeout", f"no result within serve.request_timeout_s={self.timeout:g} s") from None


# -- request bodies ---------------------------------------------------------------------------
def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise HTTPError(400, "bad_request", f"{name}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    value = "".join(value.split())  # line-wrapped base64 (the base64 tool's default)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "bad_request", f"{name}: not valid base64 ({len(value)} characters)") from None


async def _read_pairs(request, batch: bool, max_body: int) -> list[tuple[bytes, bytes]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            doc = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
            raise HTTPError(400, "bad_request", f"body: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise HTTPError(400, "bad_request", f"body: expected a JSON object, got {type(doc).__name__}")
        if batch:
            items = doc.get("pairs")
            if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
                raise HTTPError(400, "bad_request", 'body: expected {"pairs": [{"img0": "<base64>", "img1": "<base64>"}, ...]}')
        else:
            items = [doc]
        out = []
        for i, p in enumerate(items):
            where = f"pairs[{i}]." if batch else ""
            for f in ("img0", "img1"):
                if f not in p:
                    raise HTTPError(400, "bad_request", f"{where}{f}: missing (expected a base64-encoded image)")
            out.append((_b64(p["img0"], where + "img0"), _b64(p["img1"], where + "img1")))
        return out
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_part_size=max_body)
        except Exception as e:
            raise HTTPError(400, "bad_request", f"body: not valid multipart form data ({e})") from None
        parts = {}
        for f in ("img0", "img1"):
            values = form.getlist(f)
            if not values:
                raise HTTPError(400, "bad_request", f"{f}: missing (expected a multipart field holding an image file)")
            parts[f] = [await v.read() if hasattr(v, "read") else _b64(v, f) for v in values]
        if len(parts["img0"]) != len(parts["img1"]) or (not batch and len(parts["img0"]) != 1):
            raise HTTPError(400, "bad_request", f"img0/img1: got {len(parts['img0'])} and {len(parts['img1'])} fields, "
                            f"expected {'as many of each' if batch else 'one of each'}")
        return list(zip(parts["img0"], parts["img1"]))
    raise HTTPError(415, "unsupported_media_type",
                    f"content-type: got {ctype or 'none'!r}, expected multipart/form-data or application/json")


# -- the app ----------------------------------------------------------------------------------
def create_app(settings: Settings):
    """The FastAPI app. Models load in a background thread at startup; /readyz says when done."""
    from fastapi import FastAPI

    service = Service(settings)
    app = FastAPI(title="lpips-fast", lifespan=_lifespan(service), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_probe_routes(app, service)
    _add_models_route(app, service)
    _add_distance_route(app, service)
    _add_batch_route(app, service)
    _add_map_route(app, service)
    return _Limits(app, service)


def _lifespan(service: Service):
    """The app's lifespan: the models load in a thread from startup on; at shutdown that thread is
    joined, then every scorer drains (``Service.close``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=service.load, name="lpips-serve-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            await asyncio.to_thread(service.close)
            log.info("scorers drained; bye")

    return lifespan


# -- error handlers: every answer other than 200 is JSON {"code", "message"} -------------------
def _add_error_handlers(app) -> None:
    """``HTTPError`` as raised; Starlette's (404, 405, ...); FastAPI's validation errors (400);
    anything else (500, logged with its traceback)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(StarletteHTTPException, _starlette_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


async def _http_error(request, e: HTTPError):
    return _error_response(e.status, e.code, e.message, e.headers)


async def _starlette_error(request, e):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return _error_response(e.status_code, code, str(e.detail))


async def _validation_error(request, e):
    return _error_response(400, "bad_request", str(e.errors()))


async def _unexpected(request, e):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(500, "internal", f"{type(e).__name__}: {e}")


# -- what the scoring endpoints share ---------------------------------------------------------
_UNAUTHORIZED = "missing or wrong 'Authorization: Bearer <token>' header"


def _authorized(service: Service, header: bytes) -> bool:
    """Whether an ``Authorization`` header value carries ``serve.auth_token`` (always, when unset)."""
    return service.auth is None or hmac.compare_digest(header, service.auth)


def _check_auth(service: Service, request: Request) -> None:
    """401 unless the request carries ``serve.auth_token`` as its bearer token (when one is set)."""
    if not _authorized(service, request.headers.get("authorization", "").encode()):
        raise HTTPError(401, "unauthorized", _UNAUTHORIZED)


async def _arm_and_pairs(service: Service, request: Request, batch: bool) -> tuple[Arm, list[tuple[bytes, bytes]]]:
    """A scoring request's arm and image pairs, checked in this order: the token (401), readiness
    (503), then the body (400, 415; one pair unless ``batch``)."""
    _check_auth(service, request)
    arm = service.route(request)
    return arm, await _read_pairs(request, batch=batch, max_body=service.max_body)


def _arm_headers(arm: Arm) -> dict[str, str]:
    return {"X-LPIPS-Arm": arm.name, "X-LPIPS-Model": arm.spec.name}


def _scored_response(arm: Arm, started: float, fields: dict[str, Any]):
    """A JSON answer: ``fields``, then the arm's model, the arm and the milliseconds since ``started``."""
    from starlette.responses import JSONResponse

    body = {**fields, "model": arm.spec.name, "arm": arm.name, "ms": round(1000 * (time.perf_counter() - started), 3)}
    return JSONResponse(body, headers=_arm_headers(arm))


async def _score_or_error(service: Service, arm: Arm, img0: bytes, img1: bytes) -> dict:
    """One batch result: ``{"lpips"}``, or ``{"error": {"code", "message"}}`` where the pair fails."""
    try:
        return {"lpips": await service.score(arm.scorer, img0, img1)}
    except HTTPError as e:
        return {"error": {"code": e.code, "message": e.message}}


# -- endpoints --------------------------------------------------------------------------------
def _add_probe_routes(app, service: Service) -> None:
    """``GET /healthz`` (the process answers), ``/readyz`` (every arm warm, else 503), ``/metrics``."""
    from starlette.responses import Response

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if service.state == "ready":
            return {"status": "ready", "arms": service.names}
        msg = "models are loading" if service.state == "loading" else f"models failed to load: {service.error}"
        return _error_response(503, "not_ready", msg)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        reg = CollectorRegistry(auto_describe=False)
        reg.register(prometheus_collector(service.scorers_metrics))
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


def _add_models_route(app, service: Service) -> None:
    """``GET /v1/models``: each arm's model, traffic share, readiness, devices and batch size."""

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(service, request)
        out = []
        for arm in service.arms:
            s = arm.scorer
            out.append({
                "arm": arm.name, "model": arm.spec.name, "net": arm.spec.net, "version": arm.spec.version,
                "share": arm.share, "ready": s is not None and service.state == "ready",
                "devices": s.devices if s else None, "max_batch": s.max_batch if s else None,
            })
        return {"models": out, "key_header": service.key_header}


def _add_distance_route(app, service: Service) -> None:
    """``POST /v1/distance``: one pair -> ``{"lpips", "model", "arm", "ms"}``."""

    @app.post("/v1/distance")
    async def distance(request: Request):
        t = time.perf_counter()
        arm, ((img0, img1),) = await _arm_and_pairs(service, request, batch=False)
        value = await service.score(arm.scorer, img0, img1)
        return _scored_response(arm, t, {"lpips": value})


def _add_batch_route(app, service: Service) -> None:
    """``POST /v1/distance/batch``: up to ``MAX_PAIRS_PER_BATCH_REQUEST`` pairs (else 413), scored
    concurrently on one arm -> ``{"results", "model", "arm", "ms"}``, a result or an error per pair."""

    @app.post("/v1/distance/batch")
    async def distance_batch(request: Request):
        t = time.perf_counter()
        arm, pairs = await _arm_and_pairs(service, request, batch=True)
        if len(pairs) > MAX_PAIRS_PER_BATCH_REQUEST:
            raise HTTPError(413, "too_many_pairs", f"pairs: got {len(pairs)}, expected at most {MAX_PAIRS_PER_BATCH_REQUEST}")
        results = await asyncio.gather(*(_score_or_error(service, arm, a, b) for a, b in pairs))
        return _scored_response(arm, t, {"results": results})


def _add_map_route(app, service: Service) -> None:
    """``POST /v1/map``: one pair -> the spatial map as a PNG (``_map_png``); the palette is checked
    first (400), the map scorer built on the arm's first map request."""
    from starlette.responses import Response

    @app.post("/v1/map")
    async def spatial_map(request: Request, vmax: float | None = None, palette: str = "heat"):
        if palette not in ("heat", "gray"):
            raise HTTPError(400, "bad_request", f"palette: got {palette!r}, expected heat or gray")
        arm, ((img0, img1),) = await _arm_and_pairs(service, request, batch=False)
        scorer = await asyncio.to_thread(service.map_scorer, arm)
        heat = await service.score(scorer, img0, img1)
        png, top = await asyncio.to_thread(_map_png, heat, vmax, palette)
        headers = _arm_headers(arm) | {"X-LPIPS-Value": repr(float(heat.mean())), "X-LPIPS-Vmax": repr(top)}
        return Response(png, media_type="image/png", headers=headers)


def _map_png(heat, vmax: float | None, palette: str) -> tuple[bytes, float]:
    """(H, W) map scaled by ``vmax`` (default: the map's maximum) -> PNG: ``heat`` colours (those of
    ``lpips-fast map``) or 8-bit ``gray`` (value = gray / 255 * vmax)."""
    import numpy as np
    from PIL import Image

    from ..dataset.heatmap import heat_colors

    hm = heat.numpy()
    top = float(hm.max()) if vmax is None else float(vmax)
    scaled = np.clip(hm / top, 0.0, 1.0) if top > 0 else np.zeros_like(hm)
    if palette == "gray":
        im = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")
    else:
        im = Image.fromarray(heat_colors(scaled), mode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), top


class _Limits:
    """ASGI wrapper: body size and concurrency limits, per-request metrics and the debug log line."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service
        self.state = app.state  # what tests and callers reach through the wrapper

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc = self.service
        t = time.perf_counter()
        path = scope["path"]
        status = {"code": 500}
        scope.setdefault("state", {})

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        limited = path.startswith("/v1/")
        try:
            header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            if limited and not _authorized(svc, header):
                # Before the body is read: a client without the token gets no buffer and no slot.
                await self._reply(send, 401, "unauthorized", _UNAUTHORIZED, status, {"connection": "close"})
                return
            if limited and svc.in_flight >= svc.max_concurrency:
                await self._reply(send, 503, "overloaded",
                                  f"{svc.in_flight} requests in progress (serve.max_concurrency={svc.max_concurrency})",
                                  status, {"retry-after": "1"})
                return
            svc.in_flight += limited
            try:
                try:  # a client dribbling its body must not hold a slot past the request timeout
                    body = await asyncio.wait_for(self._read_body(scope, receive), svc.timeout)
                except asyncio.TimeoutError:
                    await self._reply(send, 408, "timeout",
                                      f"request body not received within serve.request_timeout_s={svc.timeout:g} s",
                                      status, {"connection": "close"})
                    return
                if body is None:
                    await self._reply(send, 413, "body_too_large",
                                      f"request body exceeds serve.max_body_bytes={svc.max_body}", status)
                    return
                sent = False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                try:
                    await self.app(scope, replay, send_wrapped)
                except Exception as e:
                    # The app's handler has answered (500) and logged it; a bad request must not
                    # reach the server as an error.
                    if status["code"] == 500 and not status.get("started"):
                        await self._reply(send, 500, "internal", f"{type(e).__name__}: {e}", status)
            finally:
                svc.in_flight -= limited
        finally:
            dt = time.perf_counter() - t
            arm = scope["state"].get("arm", "")
            endpoint = path if path in _ENDPOINTS else "other"
            svc.m_requests.inc(arm=arm, endpoint=endpoint, status=status["code"])
            svc.m_latency.observe(dt, arm=arm, endpoint=endpoint)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %d %.1f ms arm=%s", scope["method"], path, status["code"], 1000 * dt, arm or "-",
                          extra={"method": scope["method"], "path": path, "status": status["code"],
                                 "ms": round(1000 * dt, 3), "arm": arm or None})

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit (Content-Length is checked first)."""
        limit = self.service.max_body
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    async def _reply(send, code: int, err: str, message: str, status: dict, headers: dict | None = None) -> None:
        body = json.dumps({"code": err, "message": message}).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        status["code"] = code
        await send({"type": "http.response.start", "status": code, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})


_ENDPOINTS = {"/v1/distance", "/v1/distance/batch", "/v1/map", "/v1/models", "/healthz", "/readyz", "/metrics"}


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn drains requests in flight, then the scorers drain).

    Returns 0 after a graceful shutdown; 2 (a bad or missing weights file) or 1 when the models
    cannot be loaded, in which case the server stops at once.
    """
    import uvicorn

    logger = configure_logging(settings["log.level"], settings["log.format"])
    ulog = logging.getLogger("uvicorn")
    ulog.handlers = list(logger.handlers)
    ulog.setLevel(logger.level)
    ulog.propagate = False
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings["serve.host"], port=settings["serve.port"], log_config=None,
        log_level=settings["log.level"], access_log=False, lifespan="on",
        timeout_graceful_shutdown=settings["serve.shutdown_timeout_s"],
    )
    server = uvicorn.Server(config)
    service = app.service
    service.on_load_failure = lambda: setattr(server, "should_exit", True)  # a server that cannot score stops
    log.info("serving %s on http://%s:%d", [a.name for a in service.arms], settings["serve.host"], settings["serve.port"])
    # uvicorn drains on SIGTERM, restores the previous handler and raises the signal again; with
    # this no-op handler in place that last step returns, and a drained shutdown exits with 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if service.state == "failed":
        print(f"lpips-fast serve: error: loading the models failed: {service.error}", file=sys.stderr)
        # A missing or bad weights file is the caller's to fix (status 2, as the other commands).
        return 2 if isinstance(service.load_exception, (ValueError, FileNotFoundError)) else 1
    return 0
