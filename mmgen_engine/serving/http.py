"""``mmgen serve``: an HTTP server (FastAPI on uvicorn) over one :class:`~mmgen_engine.Engine` per model.

    POST /v1/captions             JSON {"images": [base64...], ...} or multipart `image` files -> {"captions"}
    POST /v1/images/generations   the OpenAI Images API shape -> {"created", "data": [{"b64_json"}]}
    POST /v1/gestures             multipart `audio` file -> JSON poses, or format=npz|mp4 as a file
    GET  /  /health  /v1/models  /metrics (Prometheus text)

``stream=true`` answers Server-Sent Events (``event: <type>`` + one line of JSON), ending with ``done``
(the non-streaming answer) or ``error``. The README's "HTTP server" section is the reference.

The handlers only parse, check and submit: decoding images and audio runs on the engine's
preprocessing threads, generation on its scheduler threads, so the event loop never waits on a
model. Every error a client can cause is a 4xx with ``{"error": {"message": <one line>, "type",
"code"}}``; a full queue is a 429 with ``Retry-After``; nothing answers with a traceback. A client
that disconnects cancels its requests, which frees their slots at the next decode step. Limits on
the body, the images, ``n`` and the prompt are checked before any work (the body's size before it
is read). On SIGTERM uvicorn stops accepting, lets requests in flight finish for ``grace_s``
seconds, then cancels the rest; the engines shut down last.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..config import QuantizationConfig
from ..errors import DeadlineExceeded, EngineClosed, EngineFailed, EngineOverloaded, InputError, MMGenError, one_line
from ..gesture_format import JOINT_NAMES
from ..pipelines import weight_format
from ..runtime.limits import MAX_IMAGES_PER_CALL, MAX_PROMPT_CHARS, check_int
from .engine import Engine
from .requests import CaptionRequest, GestureRequest, ImageRequest, PartialImage, PoseChunk, TextDelta

log = logging.getLogger("mmgen.serve")

PLAYGROUND = Path(__file__).with_name("playground.html")
SAMPLING_FIELDS = {
    "captioning": ("do_sample", "temperature", "top_k", "top_p", "seed", "num_beams", "length_penalty",
                   "early_stopping", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size"),
    "text-to-image": ("do_sample", "temperature", "top_k", "seed", "guidance_scale"),
    "speech-to-gesture": ("do_sample", "temperature", "top_p", "seed"),
}
# the type of every field a request may carry (form fields arrive as text and are parsed to it)
FIELD_TYPES = {"prompt": str, "model": str, "size": str, "response_format": str, "format": str, "stream": bool,
               "max_new_tokens": int, "n": int, "partial_images": int, "partial_every": int,
               "do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "seed": int,
               "guidance_scale": float, "num_beams": int, "length_penalty": float, "early_stopping": "early_stopping",
               "num_return_sequences": int, "repetition_penalty": float, "no_repeat_ngram_size": int}
# OpenAI Images API fields this server accepts and ignores (what they ask for is what it does anyway)
OPENAI_IGNORED = {"quality": None, "style": None, "user": None, "background": None, "moderation": None,
                  "output_format": "png"}
DEFAULT_PARTIAL_IMAGES = 3
KEEP_ALIVE_S = 75
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ROUTES = ("/", "/health", "/v1/models", "/metrics", "/v1/captions", "/v1/images/generations", "/v1/gestures")


@dataclass(frozen=True)
class ServerConfig:
    """What ``mmgen serve`` serves and its limits. ``models``: ``{name: checkpoint directory}`` (paths,
    so that the config pickles for Ray Serve's replicas); the rest as the CLI flags of the same names."""

    models: dict
    device: str = "cpu"
    dtype: str | None = None
    slots: int = 8
    max_queued: int = 64
    max_body_bytes: int = 32 * 2**20
    max_images: int = 16
    max_n: int = 16
    max_prompt_chars: int = MAX_PROMPT_CHARS
    request_timeout: float | None = None
    grace_s: float = 30.0
    cuda_graphs: bool = True
    quantize: str | None = None  # None | "int8" | "int8-gN", as mm.load's

    def __post_init__(self):
        if not isinstance(self.models, dict) or not self.models:
            raise InputError("serve at least one model (--model DIR)")
        check_int("max_body_bytes", self.max_body_bytes, 1, 2**40)
        check_int("max_images", self.max_images, 1, MAX_IMAGES_PER_CALL)
        check_int("max_n", self.max_n, 1, MAX_IMAGES_PER_CALL)
        check_int("max_prompt_chars", self.max_prompt_chars, 1, MAX_PROMPT_CHARS)
        if not (isinstance(self.grace_s, (int, float)) and 0 <= self.grace_s <= 3600):
            raise InputError(f"grace must be in [0, 3600] seconds, got {self.grace_s!r}")
        QuantizationConfig.parse(self.quantize, InputError)  # refused here, before any model loads


def parse_model_args(values: list[str]) -> dict[str, str]:
    """``--model`` values (``DIR`` or ``NAME=DIR``) -> ``{name: dir}``; a bare ``DIR`` is named by its
    last path component. Duplicate names and missing directories are InputErrors."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or os.sep in name:
            name, path = Path(value).resolve().name, value
        if not Path(path, "config.json").is_file():
            raise InputError(f"--model {value}: {path} is not a converted checkpoint (no config.json there)")
        if name in models:
            raise InputError(f"--model {value}: a model named {name!r} is served already; name them NAME=DIR")
        models[name] = path
    return models


def start_engines(config: ServerConfig) -> dict[str, Engine]:
    """One engine per model of ``config`` (all or none: those started are shut down if one fails)."""
    engines: dict[str, Engine] = {}
    try:
        for name, path in config.models.items():
            engines[name] = Engine({name: path}, config.device, config.dtype, config.slots, config.max_queued,
                                   config.cuda_graphs, config.quantize)
    except BaseException:
        for engine in engines.values():
            engine.shutdown(drain=False, timeout=10)
        raise
    return engines


# -- errors -----------------------------------------------------------------------------------------
class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    """The client disconnected before its answer: its requests are cancelled; nobody reads the 499."""


def _error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def _as_http_error(e: BaseException) -> HTTPError:
    """What an exception raised while serving a request is answered with."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, _ClientGone):
        return HTTPError(499, "the client disconnected", "client_closed_request")
    if isinstance(e, _BodyTooLarge):
        return HTTPError(413, str(e), "request_too_large")
    if isinstance(e, EngineOverloaded):
        return HTTPError(429, one_line(e), "overloaded", {"Retry-After": "1"})
    if isinstance(e, (EngineClosed, EngineFailed)):
        return HTTPError(503, one_line(e), "unavailable", {"Retry-After": "5"})
    if isinstance(e, DeadlineExceeded):
        return HTTPError(504, one_line(e), "timeout")
    if isinstance(e, MMGenError):
        return HTTPError(400, one_line(e))
    if isinstance(e, HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return HTTPError(e.status_code, one_line(Exception(e.detail)), kind, e.headers)
    log.error("unexpected error serving a request", exc_info=e)
    return HTTPError(500, f"internal error: {type(e).__name__}: {one_line(e)}", "server_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _as_http_error(e)
    return JSONResponse(_error_body(err.status, str(err), err.kind), err.status, headers=err.headers)


class _Limits:
    """ASGI middleware: the body limit (a ``Content-Length`` over it is answered 413 before anything
    is read; a chunked body fails its request once it passes it) and the per-route status counter."""

    def __init__(self, app, limit: int, counter: Counter):
        self.app, self.limit, self.counter = app, limit, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                problem = (f"the request body is {int(length)} bytes; at most {self.limit}" if length.isdigit()
                           else "bad Content-Length header")
                response = _error_response(_BodyTooLarge(problem) if length.isdigit() else HTTPError(400, problem))
                return await response(scope, receive, counted_send)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise _BodyTooLarge(f"the request body passed {self.limit} bytes")
                return message

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.counter.labels(route, str(status)).inc()


# -- parsing requests -------------------------------------------------------------------------------
def _typed(name: str, value, from_form: bool):
    """``value`` of field ``name`` as its type (text from a form is parsed); InputError otherwise."""
    kind = FIELD_TYPES[name]
    if from_form and kind is not str:
        text = value.strip().lower()
        if kind is bool or kind == "early_stopping":
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            if kind == "early_stopping" and text == "never":
                return "never"
            raise InputError(f"{name} must be true or false{' or never' if kind is not bool else ''}, got {value!r}")
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            raise InputError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    ok = {str: isinstance(value, str), bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          "early_stopping": isinstance(value, bool) or value == "never"}[kind]
    if not ok:
        what = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
                "early_stopping": "true, false or \"never\""}[kind]
        raise InputError(f"{name} must be {what}, got {json.dumps(value)[:40]}")
    return value


async def _read_request(request: Request, files: str, max_files: int) -> tuple[dict, list[bytes]]:
    """The request's fields (JSON object or form fields, typed) and its uploaded files named
    ``files`` (multipart only)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"the body is not valid JSON ({one_line(e)})") from None
        if not isinstance(body, dict):
            raise InputError("the JSON body must be an object")
        return body, []
    if ctype == "multipart/form-data":
        boundary = request.headers["content-type"].partition("boundary=")[2].split(";")[0].strip().strip('"')
        raw = await request.body()  # within the body limit; the form is parsed from it
        if not boundary or not raw.rstrip(b"\r\n").endswith(b"--" + boundary.encode("latin-1") + b"--"):
            raise InputError("bad multipart body: no boundary, or truncated (it does not end with its closing "
                             "boundary)")
        try:
            form = await request.form(max_files=max_files, max_fields=64, max_part_size=1 << 20)
        except HTTPException as e:  # Starlette's parser: truncated or malformed multipart, too many parts
            raise InputError(f"bad multipart body ({e.detail})") from None
        fields, uploads = {}, []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != files:
                    raise InputError(f"unexpected file field {key!r}; upload {files!r}")
                uploads.append(await value.read())
            elif key in fields:
                raise InputError(f"field {key!r} given twice")
            else:
                fields[key] = value
        await form.close()
        return {"__form__": True, **fields}, uploads
    raise HTTPError(415, f"Content-Type must be application/json or multipart/form-data, got {ctype or 'none'}",
                    "unsupported_media_type")


def _fields(body: dict, allowed: tuple[str, ...], ignored: dict | None = None) -> dict:
    """The typed fields of a request body (nulls left out); unknown fields are InputErrors."""
    from_form = bool(body.pop("__form__", False))
    out = {}
    for name, value in body.items():
        if ignored is not None and name in ignored:
            if ignored[name] is not None and value is not None and value != ignored[name]:
                raise InputError(f"{name} must be {ignored[name]!r} (or left out), got {json.dumps(value)[:40]}")
            continue
        if name not in allowed:
            raise InputError(f"unknown field {name!r}; this endpoint takes {', '.join(allowed)}")
        if value is not None:
            out[name] = _typed(name, value, from_form)
    return out


def _sampling(pipe, fields: dict):
    """The checkpoint's generation defaults with the fields given; a temperature, top-k or top-p
    given means sampling with it (unless do_sample says otherwise), as on the command line."""
    given = {name: fields[name] for name in SAMPLING_FIELDS[pipe.task] if name in fields}
    if not given:
        return None
    if {"temperature", "top_k", "top_p"} & given.keys() and "do_sample" not in given:
        given["do_sample"] = True
    return dataclasses.replace(pipe.default_sampling, **given)  # SamplingParams checks every value


def _check_prompt(prompt: str | None, limit: int) -> None:
    if prompt is not None and len(prompt) > limit:
        raise HTTPError(413, f"prompt has {len(prompt)} characters; at most {limit}", "request_too_large")


def _image(data, where: str) -> PIL.Image.Image:
    """A base64 string (or data: URL) or uploaded bytes -> a lazily decoded PIL image (its header
    read and checked; the pixels are decoded on the engine's preprocessing threads)."""
    if not isinstance(data, (str, bytes)):
        raise InputError(f"{where} must be a base64 string, got {json.dumps(data)[:40]}")
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{where}: not base64 ({one_line(e)})") from None
    if not data:
        raise InputError(f"{where}: empty image")
    try:
        return PIL.Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError:
        raise InputError(f"{where}: not an image format Pillow reads (PNG, JPEG, ...)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data: all mean unreadable
        raise InputError(f"{where}: unreadable image ({one_line(e)})") from None


def _png(image: PIL.Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _poses_json(poses: np.ndarray) -> list:
    return np.round(poses.astype(np.float64), 6).tolist()


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


# -- waiting on handles -----------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _results(request: Request, handles: list) -> list:
    """The handles' results, in order; the first failure raises (the others are cancelled), and a
    client that disconnects cancels them all."""
    gathered = asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise _ClientGone()
        return gathered.result()
    finally:
        gone.cancel()
        for handle in handles:
            handle.cancel()
        if not gathered.done():
            gathered.cancel()
        with contextlib.suppress(BaseException):
            await gathered


async def _events(handles: list):
    """``(index, event)`` of all handles as they come, then ``(index, None)`` as each ends; the first
    failure raises."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, handle):
        try:
            async for event in handle:
                queue.put_nowait((i, event, None))
            queue.put_nowait((i, None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                left -= 1
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def _stream(handles: list, events, finish, named=lambda e: e):
    """The SSE body: the task's events (``events(i, event)`` -> SSE bytes or None), then the ``done``
    event with ``await finish(results)``, or an ``error`` event (of ``named(error)``). Ending early
    (the client went, the server shuts down) cancels the handles."""
    try:
        async for i, event in _events(handles):
            chunk = events(i, event)
            if chunk:
                yield chunk
        yield _sse("done", await finish([h.result() for h in handles]))
    except Exception as e:  # noqa: BLE001 - the status line has gone: the error becomes the last event
        err = _as_http_error(named(e))
        yield _sse("error", _error_body(err.status, str(err), err.kind))
    finally:
        for handle in handles:
            handle.cancel()


# -- the app ----------------------------------------------------------------------------------------
class _EngineCollector:
    """Prometheus gauges and counters read from the engines at each scrape."""

    def __init__(self, app: FastAPI):
        self.app = app

    def collect(self):
        queue = GaugeMetricFamily("mmgen_queue_depth", "Requests waiting for a slot", labels=["model"])
        busy = GaugeMetricFamily("mmgen_busy_slots", "Decoder rows in use", labels=["model"])
        slots = GaugeMetricFamily("mmgen_slots", "Decoder rows per model", labels=["model"])
        requests = CounterMetricFamily("mmgen_requests", "Requests by outcome", labels=["model", "outcome"])
        steps = CounterMetricFamily("mmgen_decode_steps", "Decode steps run", labels=["model"])
        for name, engine in getattr(self.app.state, "engines", {}).items():
            m = engine.metrics()
            queue.add_metric([name], m["queued"])
            busy.add_metric([name], m["models"][name]["active"])
            slots.add_metric([name], engine.slots)
            steps.add_metric([name], m["models"][name]["steps"])
            for outcome in ("completed", "failed", "cancelled", "rejected"):
                requests.add_metric([name, outcome], m[outcome])
        yield from (queue, busy, slots, requests, steps)


def create_app(config: ServerConfig, engines: dict[str, Engine] | None = None) -> FastAPI:
    """The FastAPI app serving ``config``'s models. ``engines`` (from :func:`start_engines`) are used
    as given; without them the app starts its own in its lifespan startup (as Ray Serve's replicas
    do). Either way the app shuts them down in its lifespan shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engines = engines if engines is not None else await asyncio.to_thread(start_engines, config)
        app.state.status = "ok"
        try:
            yield
        finally:
            app.state.status = "shutting down"
            for engine in app.state.engines.values():
                await asyncio.to_thread(engine.shutdown, False, 10.0)

    app = FastAPI(title="mmgen_engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(_EngineCollector(app))
    http_requests = Counter("mmgen_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    ttft = Histogram("mmgen_time_to_first_token_seconds", "From submit to the first generated token", ["model"],
                     registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    duration = Histogram("mmgen_request_duration_seconds", "From submit to the end of a request", ["model"],
                         registry=registry, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
    generated = Counter("mmgen_generated_tokens", "Tokens generated", ["model"], registry=registry)
    app.add_middleware(_Limits, limit=config.max_body_bytes, counter=http_requests)

    # expected errors are answered by the exception middleware; anything else by the outermost one,
    # which also logs it with its traceback (server-side only)
    for kind in (MMGenError, HTTPError, HTTPException, _BodyTooLarge, _ClientGone, Exception):
        app.add_exception_handler(kind, lambda request, e: _error_response(e))

    def observe(name: str, handle) -> None:
        t = handle.times
        if "first_token" in t:
            ttft.labels(name).observe(t["first_token"] - t["submitted"])
        if "finished" in t:
            duration.labels(name).observe(t["finished"] - t["submitted"])
        generated.labels(name).inc(handle.tokens)

    def engine_for(task: str, model: str | None) -> tuple[str, Engine]:
        engines = app.state.engines
        if model is not None:
            if model not in engines:
                raise HTTPError(404, f"no model named {model!r}; this server has {', '.join(engines)}", "not_found")
            if engines[model].models[model].task != task:
                raise InputError(f"model {model!r} is a {engines[model].models[model].task} model, not {task}")
            return model, engines[model]
        names = [n for n, e in engines.items() if e.models[n].task == task]
        if len(names) != 1:
            raise HTTPError(404, f"this server has no {task} model", "not_found") if not names else InputError(
                f"several {task} models ({', '.join(names)}): name one in the request's model field")
        return names[0], engines[names[0]]

    def submit(name: str, engine: Engine, requests: list) -> list:
        """Submit all or none (a refusal part way cancels those submitted)."""
        handles = []
        try:
            for request in requests:
                handles.append(engine.submit(request))
                handles[-1].future.add_done_callback(lambda _, h=handles[-1]: observe(name, h))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def sse(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def playground():
        if not PLAYGROUND.is_file():
            raise HTTPError(404, "the playground page is not installed with this build", "not_found")
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        engines = getattr(app.state, "engines", {})
        failed = [n for n, e in engines.items() if isinstance(e.closed, EngineFailed)]
        status = "failed" if failed else getattr(app.state, "status", "starting")
        body = {"status": status, "models": {n: e.models[n].task for n, e in engines.items()}}
        return JSONResponse(body, 200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        data = []
        for name, engine in app.state.engines.items():
            pipe = engine.models[name]
            info = {"id": name, "object": "model", "owned_by": "mmgen_engine", "task": pipe.task,
                    "slots": engine.slots, **weight_format(pipe),
                    "generation_defaults": dataclasses.asdict(pipe.default_sampling)}
            if pipe.task == "text-to-image":
                info["size"] = "{0}x{0}".format(_image_side(pipe))
            elif pipe.task == "speech-to-gesture":
                info.update(fps=pipe.fps, joints=len(pipe.skeleton))
            data.append(info)
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/captions")
    async def captions(request: Request):
        body, uploads = await _read_request(request, "image", config.max_images)
        if uploads and "images" in body:
            raise InputError("give the images as `image` file fields or as the JSON `images` list, not both")
        images = uploads or body.pop("images", None)
        if not isinstance(images, list) or not images:
            raise InputError("no images: give `images`, a list of base64 images (or `image` file fields)")
        if len(images) > config.max_images:
            raise HTTPError(413, f"{len(images)} images; at most {config.max_images} per request",
                            "request_too_large")
        fields = _fields(body, ("prompt", "max_new_tokens", "model", "stream", *SAMPLING_FIELDS["captioning"]))
        _check_prompt(fields.get("prompt"), config.max_prompt_chars)
        name, engine = engine_for("captioning", fields.get("model"))
        pipe = engine.models[name]
        requests = [CaptionRequest(_image(image, f"images[{i}]"), fields.get("prompt"), fields.get("max_new_tokens"),
                                   _sampling(pipe, fields), config.request_timeout, name)
                    for i, image in enumerate(images)]
        handles = submit(name, engine, requests)
        if not fields.get("stream"):
            return {"model": name, "captions": await _results(request, handles)}

        def events(i, event):
            if isinstance(event, TextDelta):
                return _sse("caption.delta", {"index": i, "text": event.text})
            if event is None:
                return _sse("caption.completed", {"index": i, "caption": handles[i].result()})
            return None

        async def finish(results):
            return {"model": name, "captions": results}

        return sse(_stream(handles, events, finish))

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body, _ = await _read_request(request, "image", 0)
        fields = _fields(body, ("prompt", "n", "size", "response_format", "model", "stream", "partial_images",
                                "partial_every", *SAMPLING_FIELDS["text-to-image"]), OPENAI_IGNORED)
        if "prompt" not in fields:
            raise InputError("prompt is required")
        _check_prompt(fields["prompt"], config.max_prompt_chars)
        n = fields.get("n", 1)
        if n > config.max_n:
            raise HTTPError(413, f"n is {n}; at most {config.max_n} images per request", "request_too_large")
        check_int("n", n, 1, config.max_n)
        if fields.get("response_format", "b64_json") != "b64_json":
            raise InputError(f"response_format {fields['response_format']!r} is not supported; use b64_json")
        name, engine = engine_for("text-to-image", fields.get("model"))
        pipe = engine.models[name]
        size = "{0}x{0}".format(_image_side(pipe))
        if fields.get("size", size) not in (size, "auto"):
            raise InputError(f"size {fields['size']!r} is not supported; model {name!r} makes {size} images")
        every = None
        if fields.get("stream"):
            every = fields.get("partial_every")
            if every is None:
                count = check_int("partial_images", fields.get("partial_images", DEFAULT_PARTIAL_IMAGES), 0, 64)
                every = pipe.num_tokens // (count + 1) if count else None
        request_ = ImageRequest(fields["prompt"], n, _sampling(pipe, fields), every, config.request_timeout, name)
        handles = submit(name, engine, [request_])

        encoded: list[str] = []

        async def finish(results):
            if not encoded:
                encoded.extend(await asyncio.to_thread(lambda: [_png(image) for image in results[0]]))
            return {"created": int(time.time()), "data": [{"b64_json": b} for b in encoded]}

        if not fields.get("stream"):
            return await finish(await _results(request, handles))
        partials: dict[int, int] = {}

        def events(_, event):
            if isinstance(event, PartialImage):
                k = partials[event.index] = partials.get(event.index, -1) + 1
                return _sse("image_generation.partial_image",
                            {"index": event.index, "partial_image_index": k, "tokens": event.tokens,
                             "total": event.total, "b64_json": _png(event.image)})
            if event is None:  # the request ended: each image's completed event, then done
                encoded.extend(_png(image) for image in handles[0].result())
                return b"".join(_sse("image_generation.completed", {"index": k, "b64_json": b})
                                for k, b in enumerate(encoded))
            return None

        return sse(_stream(handles, events, finish))

    @app.post("/v1/gestures")
    async def gestures(request: Request):
        body, uploads = await _read_request(request, "audio", 1)
        fields = _fields(body, ("format", "model", "stream", *SAMPLING_FIELDS["speech-to-gesture"]))
        if len(uploads) != 1:
            raise InputError("upload the speech as one multipart file field named `audio`")
        fmt = fields.get("format", "json")
        if fmt not in ("json", "npz", "mp4"):
            raise InputError(f"format must be json, npz or mp4, got {fmt!r}")
        if fields.get("stream") and fmt != "json":
            raise InputError("stream=true answers JSON events; leave out format or give format=json")
        name, engine = engine_for("speech-to-gesture", fields.get("model"))
        pipe = engine.models[name]
        audio = _upload_file(uploads[0])
        try:
            handles = submit(name, engine, [GestureRequest(str(audio), None, _sampling(pipe, fields),
                                                           config.request_timeout, name)])
        except BaseException:
            audio.unlink(missing_ok=True)
            raise
        handles[0].future.add_done_callback(lambda _: audio.unlink(missing_ok=True) if fmt != "mp4" else None)

        def named(e: BaseException) -> BaseException:
            """The error with the upload named as the client knows it, not by its temporary path."""
            if isinstance(e, InputError) and str(audio) in str(e):
                return InputError(str(e).replace(str(audio), "audio"))
            return e

        def answer(poses: np.ndarray) -> dict:
            return {"model": name, "fps": pipe.fps, "frames": int(poses.shape[0]), "joints": int(poses.shape[1]),
                    "joint_names": list(JOINT_NAMES), "skeleton": pipe.skeleton, "poses": _poses_json(poses)}

        if fields.get("stream"):
            start = 0

            def events(_, event):
                nonlocal start
                if isinstance(event, PoseChunk):
                    chunk = _sse("poses", {"window": event.window, "start": start, "poses": _poses_json(event.poses)})
                    start += event.poses.shape[0]
                    return chunk
                return None

            async def finish(results):
                return answer(results[0])

            return sse(_stream(handles, events, finish, named))
        try:
            try:
                poses = (await _results(request, handles))[0]
            except MMGenError as e:
                raise named(e) from None
            if fmt == "json":
                return answer(poses)
            data = await asyncio.to_thread(_pose_file, fmt, poses, pipe, audio)
        finally:
            audio.unlink(missing_ok=True)
        media = "video/mp4" if fmt == "mp4" else "application/octet-stream"
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="poses.{fmt}"'})

    return app


def _image_side(pipe) -> int:
    """The side of a text-to-image model's square images in pixels."""
    return pipe.config.generation.grid_size * pipe.config.detokenizer.downsample_factor


def _upload_file(data: bytes) -> Path:
    """An uploaded file's bytes in a temporary file (the audio reader opens files by path)."""
    if not data:
        raise InputError("audio: empty upload")
    fd, path = tempfile.mkstemp(prefix="mmgen-upload-", suffix=".audio")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(path)


def _pose_file(fmt: str, poses: np.ndarray, pipe, audio: Path) -> bytes:
    """The poses as the file ``mmgen gesture -o poses.<fmt>`` writes (an MP4 with the speech)."""
    from ..pipelines.audio import read_wav
    from ..pipelines.poses import save_mp4, save_npz

    with tempfile.TemporaryDirectory(prefix="mmgen-serve-") as tmp:
        out = Path(tmp, f"poses.{fmt}")
        if fmt == "npz":
            save_npz(out, poses, pipe.fps, pipe.skeleton)
        else:
            speech, rate = read_wav(audio, mono=True)
            save_mp4(out, poses, pipe.fps, audio=speech, sample_rate=rate)
        return out.read_bytes()


class _Server(uvicorn.Server):
    """uvicorn's server that prints the ready line once it listens (with the port it got)."""

    def __init__(self, config: uvicorn.Config, ready: str):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit:
            print(self.ready, flush=True)

    async def shutdown(self, sockets=None):
        await super().shutdown(sockets)
        # uvicorn re-raises the SIGTERM/SIGINT it caught once it has stopped, which kills the process
        # with that signal; a graceful shutdown exits with status 0 instead, as other servers do
        getattr(self, "_captured_signals", []).clear()


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          engines: dict[str, Engine] | None = None) -> None:
    """Run the server until SIGTERM or SIGINT (then shut down gracefully, see the module docstring).
    Prints ``mmgen serve: listening on http://HOST:PORT (models: ...)`` once it accepts connections;
    ``port`` 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    port = sock.getsockname()[1]
    app = create_app(config, engines)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    ready = f"mmgen serve: listening on http://{shown}:{port} (models: {', '.join(config.models)})"
    # keep-alive: idle connections stay open longer than clients keep them (httpx 5 s, aiohttp 15 s), so a
    # client never sends a request on a connection the server is closing (uvicorn's default is 5 s)
    server = _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=config.grace_s,
                                    timeout_keep_alive=KEEP_ALIVE_S, lifespan="on"), ready)
    server.run(sockets=[sock])
