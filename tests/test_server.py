"""``mmgen serve`` for real: the server process on 127.0.0.1 (a free port) with the demo models,
driven over HTTP with httpx (and the OpenAI client). Every load loop is bounded in count and time."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the test extra)")
pytest.importorskip("fastapi", reason="mmgen serve needs the serve extra (fastapi, uvicorn)")
import PIL.Image  # noqa: E402
import soundfile  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from servers import demo_models, running_server, wait_until  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo import gesture_world, world  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def server():
    with running_server(*demo_models(), "--slots", "4") as s:
        yield s


@pytest.fixture(scope="module")
def scenes():
    return [world.render(world.scene_for_seed(world.HELD_OUT_SEED + i)) for i in range(3)]


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    audio, _ = gesture_world.speech(np.random.default_rng(7), 8.0)
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    soundfile.write(path, audio, gesture_world.SAMPLE_RATE)
    return path


def png_bytes(image: PIL.Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(image: PIL.Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def decoded(b64_png: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64_png))))


def sse_events(text: str) -> list[tuple[str, dict]]:
    """``(event, data)`` of an SSE body; each data is a JSON line naming its type."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


def metrics(url: str) -> dict:
    """``{(name, labels...): value}`` of the server's Prometheus samples."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def sample(url: str, name: str, **labels) -> float:
    return metrics(url).get((name, *sorted(labels.items())), 0.0)


def assert_one_line_error(response, status: int, kind: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    message = body["error"]["message"]
    assert body["error"]["code"] == status and "\n" not in message and "Traceback" not in response.text
    assert "mmgen-upload" not in message and " object at 0x" not in message  # no server internals
    if kind:
        assert body["error"]["type"] == kind
    return message


# -- the endpoints ----------------------------------------------------------------------------------
def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {
        "status": "ok", "models": {"captioning": "captioning", "text-to-image": "text-to-image",
                                   "speech-to-gesture": "speech-to-gesture"}}
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert models["text-to-image"]["size"] == "64x64" and models["captioning"]["slots"] == 4
    assert models["speech-to-gesture"]["fps"] == 15 and models["speech-to-gesture"]["joints"] == 52
    m = metrics(server.url)
    assert m[("mmgen_slots", ("model", "captioning"))] == 4
    assert ("mmgen_queue_depth", ("model", "text-to-image")) in m and ("mmgen_busy_slots", ("model", "captioning")) in m
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")


def test_captions_json_and_multipart_equal_the_pipeline(server, scenes, captioner):
    expected = captioner.caption(scenes)
    r = httpx.post(f"{server.url}/v1/captions", json={"images": [b64(im) for im in scenes]}, timeout=60)
    assert r.status_code == 200 and r.json() == {"model": "captioning", "captions": expected}
    files = [("image", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(scenes)]
    r = httpx.post(f"{server.url}/v1/captions", files=files, data={"max_new_tokens": "3"}, timeout=60)
    assert r.json()["captions"] == captioner.caption(scenes, max_new_tokens=3)
    data_url = "data:image/png;base64," + b64(scenes[0])
    r = httpx.post(f"{server.url}/v1/captions", json={"images": [data_url], "num_beams": 3, "num_return_sequences": 2},
                   timeout=60)
    beams = dataclasses.replace(captioner.default_sampling, num_beams=3, num_return_sequences=2)
    assert r.json()["captions"] == [captioner.caption([scenes[0]], sampling=beams)]


def test_captions_stream(server, scenes, captioner):
    r = httpx.post(f"{server.url}/v1/captions", json={"images": [b64(im) for im in scenes[:2]], "stream": True},
                   timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    expected = captioner.caption(scenes[:2])
    for i in range(2):
        deltas = [d["text"] for kind, d in events if kind == "caption.delta" and d["index"] == i]
        assert "".join(deltas) == expected[i] and len(deltas) > 1
        assert ("caption.completed", {"type": "caption.completed", "index": i, "caption": expected[i]}) in events
    assert events[-1] == ("done", {"type": "done", "model": "captioning", "captions": expected})


def test_images_equal_the_pipeline(server, txt2img):
    r = httpx.post(f"{server.url}/v1/images/generations",
                   json={"prompt": PROMPT, "n": 2, "seed": 11, "size": "64x64", "response_format": "b64_json",
                         "quality": "standard"}, timeout=120)
    body = r.json()
    assert r.status_code == 200 and set(body) == {"created", "data"} and abs(body["created"] - time.time()) < 300
    seeded = dataclasses.replace(txt2img.default_sampling, seed=11)
    expected = txt2img.generate(PROMPT, images_per_prompt=2, sampling=seeded)
    for item, image in zip(body["data"], expected, strict=True):
        np.testing.assert_array_equal(decoded(item["b64_json"]), np.asarray(image))
    r = httpx.post(f"{server.url}/v1/images/generations",
                   json={"prompt": PROMPT, "seed": 11, "top_k": 1, "guidance_scale": 3.0}, timeout=120)
    greedy = dataclasses.replace(txt2img.default_sampling, seed=11, top_k=1, guidance_scale=3.0)
    np.testing.assert_array_equal(decoded(r.json()["data"][0]["b64_json"]),
                                  np.asarray(txt2img.generate(PROMPT, sampling=greedy)[0]))


def test_images_through_the_openai_client(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(model="text-to-image", prompt=PROMPT, n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 5})
    assert len(result.data) == 2 and decoded(result.data[0].b64_json).shape == (64, 64, 3)
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(model="text-to-image", prompt=PROMPT, size="1024x1024")


def test_images_stream_partials_then_the_images(server):
    body = {"prompt": PROMPT, "n": 2, "seed": 3, "partial_every": 64}
    r = httpx.post(f"{server.url}/v1/images/generations", json={**body, "stream": True}, timeout=120)
    events = sse_events(r.text)
    partials = [d for kind, d in events if kind == "image_generation.partial_image"]
    assert sorted((d["index"], d["tokens"]) for d in partials) == [(i, t) for i in range(2) for t in (64, 128, 192)]
    assert all(d["total"] == 256 and decoded(d["b64_json"]).shape == (64, 64, 3) for d in partials)
    completed = [d for kind, d in events if kind == "image_generation.completed"]
    kind, done = events[-1]
    assert kind == "done" and [d["b64_json"] for d in completed] == [d["b64_json"] for d in done["data"]]
    plain = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120).json()
    assert [d["b64_json"] for d in plain["data"]] == [d["b64_json"] for d in done["data"]]


def test_gestures_json_npz_mp4_and_stream(server, speech_wav):
    pipe = mm.load(mm.demo_model("speech-to-gesture"))
    expected = pipe.generate(str(speech_wav))
    files = {"audio": ("speech.wav", speech_wav.read_bytes(), "audio/wav")}
    body = httpx.post(f"{server.url}/v1/gestures", files=files, timeout=120).json()
    assert body["fps"] == 15 and body["frames"] == expected.shape[0] and body["joints"] == 52
    assert len(body["joint_names"]) == 52 and body["skeleton"] == pipe.skeleton
    np.testing.assert_allclose(np.array(body["poses"]), expected, atol=1e-5)
    r = httpx.post(f"{server.url}/v1/gestures", files=files, data={"format": "npz"}, timeout=120)
    assert r.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(r.content)) as npz:
        np.testing.assert_array_equal(npz["poses"], expected)
        assert float(npz["fps"]) == 15
    r = httpx.post(f"{server.url}/v1/gestures", files=files, data={"format": "mp4"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    r = httpx.post(f"{server.url}/v1/gestures", files=files, data={"stream": "true", "seed": "0"}, timeout=120)
    events = sse_events(r.text)
    chunks = [d for kind, d in events if kind == "poses"]
    starts = np.cumsum([0] + [len(c["poses"]) for c in chunks])[:-1]
    assert len(chunks) > 1 and [c["start"] for c in chunks] == starts.tolist()
    np.testing.assert_allclose(np.concatenate([np.array(c["poses"]) for c in chunks]), expected, atol=1e-5)
    assert events[-1][0] == "done" and events[-1][1]["frames"] == expected.shape[0]


# -- bad requests ----------------------------------------------------------------------------------
def _truncated_multipart() -> tuple[bytes, dict]:
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\nabc")
    return body, {"content-type": "multipart/form-data; boundary=XyZ"}


BAD = [
    ("post", "/v1/captions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("post", "/v1/captions", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, "object"),
    ("post", "/v1/captions", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
    ("post", "/v1/captions", {"json": {}}, 400, "no images"),
    ("post", "/v1/captions", {"json": {"images": ["@@@"]}}, 400, "base64"),
    ("post", "/v1/captions", {"json": {"images": [{"url": "x"}]}}, 400, "base64 string"),
    ("post", "/v1/captions", {"json": {"images": "AAAA"}}, 400, "no images"),
    ("post", "/v1/captions", {"json": {"images": [base64.b64encode(b"GIF89a nonsense").decode()]}}, 400, "image"),
    ("post", "/v1/captions", {"json": {"images": ["AAAA"], "temperature": "hot"}}, 400, "temperature"),
    ("post", "/v1/captions", {"json": {"images": ["AAAA"], "colour": 1}}, 400, "unknown field"),
    ("post", "/v1/captions", {"json": {"images": ["AAAA"], "model": "nope"}}, 404, "no model named"),
    ("post", "/v1/captions", {"json": {"images": ["AAAA"], "model": "text-to-image"}}, 400, "not captioning"),
    ("post", "/v1/captions", {"json": {"images": ["AAAA"] * 17}}, 413, "at most 16"),
    ("post", "/v1/captions", {"data": {"top_k": "many"}, "files": {"image": ("a.png", b"x")}}, 400, "top_k"),
    ("post", "/v1/captions", dict(zip(("content", "headers"), _truncated_multipart())), 400, "multipart"),
    ("post", "/v1/images/generations", {"json": {"n": 2}}, 400, "prompt is required"),
    ("post", "/v1/images/generations", {"json": {"prompt": "x" * 5000}}, 413, "characters"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "n": 1000}}, 413, "at most 16"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "n": 0}}, 400, "n must be"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "size": "1024x1024"}}, 400, "64x64"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "response_format": "url"}}, 400, "b64_json"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "guidance_scale": -2}}, 400, "guidance_scale"),
    ("post", "/v1/images/generations", {"json": {"prompt": "a", "top_p": 0.5}}, 400, "unknown field"),
    ("post", "/v1/gestures", {"data": {"format": "json"}}, 415, "Content-Type"),
    ("post", "/v1/gestures", {"data": {"format": "avi"}, "files": {"audio": ("a.wav", b"RIFF")}}, 400, "format"),
    ("post", "/v1/gestures", {"files": {"audio": ("a.wav", b"RIFF....WAVEfmt nonsense")}}, 400, "audio"),
    ("post", "/v1/gestures", {"files": {"speech": ("a.wav", b"RIFF")}}, 400, "unexpected file field"),
    ("get", "/v1/captions", {}, 405, None),
    ("get", "/v2/anything", {}, 404, None),
]


@pytest.mark.parametrize("method,path,kwargs,status,words", BAD, ids=[f"{b[1]}-{b[4]}" for b in BAD])
def test_bad_requests_are_4xx_with_one_line(server, method, path, kwargs, status, words):
    message = assert_one_line_error(getattr(httpx, method)(f"{server.url}{path}", timeout=60, **kwargs), status)
    assert words is None or words in message


def test_oversize_bodies_are_refused_before_they_are_read(server):
    big = b"0" * (33 * 2**20)
    r = httpx.post(f"{server.url}/v1/captions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert "at most 33554432" in assert_one_line_error(r, 413, "request_too_large")

    def chunks():  # no Content-Length: refused once the count passes the limit
        for _ in range(40):
            yield b"1" * 2**20

    try:
        r = httpx.post(f"{server.url}/v1/captions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=60)
        assert_one_line_error(r, 413, "request_too_large")
    except httpx.WriteError:  # the server answered and closed while the client still sent
        pass
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- cancellation -----------------------------------------------------------------------------------
def _cancelled(url: str, model: str) -> float:
    return sample(url, "mmgen_requests_total", model=model, outcome="cancelled")


def _idle(url: str, model: str) -> bool:
    m = metrics(url)
    return m[("mmgen_busy_slots", ("model", model))] == 0 and m[("mmgen_queue_depth", ("model", model))] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slots(server):
    before = _cancelled(server.url, "text-to-image")
    body = {"prompt": PROMPT, "n": 8, "seed": 1, "stream": True, "partial_every": 8}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
        for line in lines:
            if line.startswith("event: image_generation.partial_image"):
                break
        assert sample(server.url, "mmgen_busy_slots", model="text-to-image") > 0
    wait_until(lambda: _cancelled(server.url, "text-to-image") == before + 1, 30, what="the request cancelled")
    wait_until(lambda: _idle(server.url, "text-to-image"), 30, what="the slots freed")


def test_a_client_that_disconnects_while_waiting_cancels(server):
    before = _cancelled(server.url, "text-to-image")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "n": 8, "seed": 2}, timeout=0.5)
    wait_until(lambda: _cancelled(server.url, "text-to-image") == before + 1, 30, what="the request cancelled")
    wait_until(lambda: _idle(server.url, "text-to-image"), 30, what="the slots freed")


# -- load --------------------------------------------------------------------------------------------
async def _burst(url: str, images: list[str], count: int, interval: float, cancel_every: int,
                 budget: float) -> dict:
    """``count`` caption requests, one every ``interval`` seconds; every ``cancel_every``-th is
    cancelled by its client 20 ms after it was sent. Returns the outcomes counted by the client."""
    outcomes = {"200": 0, "429": 0, "cancelled": 0, "other": []}
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=budget, limits=limits) as client:
        async def one(i):
            request = client.post("/v1/captions", json={"images": [images[i % len(images)]]})
            if i % cancel_every == cancel_every - 1:
                try:
                    r = await asyncio.wait_for(request, 0.02)
                except asyncio.TimeoutError:
                    outcomes["cancelled"] += 1
                    return
            else:
                r = await request
            if str(r.status_code) in ("200", "429"):
                outcomes[str(r.status_code)] += 1
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
            else:
                outcomes["other"].append((r.status_code, r.text[:200]))

        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(interval)
        await asyncio.wait_for(asyncio.gather(*tasks), budget)
    return outcomes


def test_a_burst_over_capacity_answers_200_or_429_and_memory_returns(scenes):
    images = [b64(im) for im in scenes]
    with running_server(*demo_models("captioning"), "--slots", "4", "--max-queued", "8") as s:
        asyncio.run(_burst(s.url, images, 60, 0.002, 10, 60))  # warm-up: allocator pools, worker threads
        wait_until(lambda: _idle(s.url, "captioning"), 30, what="the server idle after the warm-up")
        before_rss, before = s.rss(), metrics(s.url)
        count = 300
        t0 = time.monotonic()
        client = asyncio.run(_burst(s.url, images, count, 0.002, 10, 120))
        assert time.monotonic() - t0 < 150
        assert client["other"] == [] and client["200"] + client["429"] + client["cancelled"] == count
        assert client["200"] > 0 and client["429"] > 0, client
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"
        wait_until(lambda: _idle(s.url, "captioning"), 30, what="the server idle after the burst")

        after = metrics(s.url)

        def delta(outcome):
            key = ("mmgen_requests_total", ("model", "captioning"), ("outcome", outcome))
            return after[key] - before[key]

        assert delta("failed") == 0
        assert delta("completed") + delta("rejected") + delta("cancelled") == count
        assert delta("completed") >= client["200"] and delta("rejected") >= client["429"]
        assert client["200"] + client["429"] >= count - client["cancelled"]
        # a cancelled request ended as cancelled, or as completed/rejected if that came first
        assert delta("cancelled") <= client["cancelled"]
        assert s.rss() - before_rss < 64 * 2**20, (before_rss, s.rss())


# -- shutdown ---------------------------------------------------------------------------------------
def _post_in_thread(url: str, body: dict, timeout: float) -> tuple[threading.Thread, list]:
    out: list = []

    def run():
        try:
            out.append(httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout))
        except httpx.HTTPError as e:
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_sigterm_lets_requests_in_flight_finish(txt2img):
    with running_server(*demo_models("text-to-image"), "--slots", "2", "--grace", "60") as s:
        thread, out = _post_in_thread(s.url, {"prompt": PROMPT, "n": 2, "seed": 4}, 60)
        wait_until(lambda: sample(s.url, "mmgen_busy_slots", model="text-to-image") > 0, 30, what="decoding")
        t0 = time.monotonic()
        assert s.terminate(90) == 0
        thread.join(60)
        assert isinstance(out[0], httpx.Response) and out[0].status_code == 200, out
        expected = txt2img.generate(PROMPT, images_per_prompt=2,
                                    sampling=dataclasses.replace(txt2img.default_sampling, seed=4))
        np.testing.assert_array_equal(decoded(out[0].json()["data"][1]["b64_json"]), np.asarray(expected[1]))
        assert time.monotonic() - t0 < 60
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health", timeout=5)


def test_sigterm_cancels_what_outlives_the_grace_period():
    with running_server(*demo_models("text-to-image"), "--slots", "2", "--grace", "0.5") as s:
        thread, out = _post_in_thread(s.url, {"prompt": PROMPT, "n": 16, "seed": 4}, 120)
        wait_until(lambda: sample(s.url, "mmgen_busy_slots", model="text-to-image") > 0, 30, what="decoding")
        t0 = time.monotonic()
        assert s.terminate(60) == 0
        assert time.monotonic() - t0 < 20
        thread.join(30)
        assert not thread.is_alive()
        response = out[0]
        assert isinstance(response, httpx.HTTPError) or response.status_code in (500, 503), response


def test_the_readme_curl_call(server, scenes, tmp_path):
    """The README's curl call, as printed there, against the served demo captioner."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## HTTP server: `mmgen serve`"):]
    line = re.search(r"^curl -s localhost:8000/v1/captions -F image=@(\S+)$", section, re.M)
    assert line and 'mm.demo_model(\'captioning\')' in section[:line.start()]
    scenes[0].save(tmp_path / "scene.png")
    command = line.group(0).replace("localhost:8000", server.url).replace(line.group(1), str(tmp_path / "scene.png"))
    out = subprocess.run(command.split(), capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == {"model": "captioning", "captions": [mm.load(mm.demo_model("captioning")).caption(
        [scenes[0]])[0]]}


@pytest.mark.parametrize("args,words", [
    (["--model", "/nonexistent/ckpt"], "not a converted checkpoint"),
    (["--model", "a={c}", "--model", "a={c}"], "served already"),
    (["--model", "{c}", "--port", "70000"], "--port"),
    (["--model", "{c}", "--replicas", "2"], "--ray"),
    (["--model", "{c}", "--autoscale", "1:2"], "--ray"),
    (["--model", "{c}", "--ray", "--autoscale", "3:1"], "MIN:MAX"),
    (["--model", "{c}", "--max-images", "0"], "max_images"),
    (["--model", "{c}", "--grace", "-1"], "grace"),
])
def test_serve_command_errors_are_one_line(args, words):
    import subprocess
    import sys

    ckpt = str(mm.demo_model("captioning"))
    cmd = [sys.executable, "-m", "mmgen_engine.cli", "serve", *[a.format(c=ckpt) for a in args]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mmgen: error:") and words in out.stderr, out.stderr
