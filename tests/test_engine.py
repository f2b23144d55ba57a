"""``mm.Engine`` with the bundled demo models: many threads submitting mixed requests to one engine
of all three tasks, each result equal to its request run alone through the pipeline; joining
mid-batch, leaving early at eos, cancellation, deadlines, overload, bad inputs, shutdown, an internal
error, the asyncio face and the event streams.

Every blocking wait here has a timeout (``WAIT``): a broken engine fails these tests, it does not
hang them. The family-by-family captioner checks and the Triton scenario are in
``test_engine_families.py``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import random
import threading
import time

import numpy as np
import pytest

import mmgen_engine as mm
from mmgen_engine import SamplingParams
from mmgen_engine.demo import gesture_world, world
from mmgen_engine.serving import scheduler as scheduler_module

WAIT = 120.0  # the longest any one wait may take (two shared cores); nothing here should come close
RATE = gesture_world.SAMPLE_RATE


def hot(seed: int) -> SamplingParams:
    """Sampling hot enough that the confident demo captioner's output depends on the seed."""
    return SamplingParams(do_sample=True, temperature=4.0, top_k=40, top_p=0.95, seed=seed)


def image_sampling(seed: int) -> SamplingParams:
    return SamplingParams(do_sample=True, top_k=16, seed=seed)


IMAGES = [image for image, _ in world.sample(6, seed=40)]  # 64x64 PIL images of the demo world
PROMPTS = [None, "a", "a blue", "a purple circle left of"]  # 0, 1, 2 and 5 prompt tokens


@pytest.fixture(scope="module")
def gesture():
    return mm.load(mm.demo_model("speech-to-gesture"))


@pytest.fixture(scope="module")
def clips():
    return {seed: gesture_world.clip(seed, seconds)[0] for seed, seconds in [(1, 1.0), (2, 1.5), (3, 7.0)]}


# ---- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(models, **options):
    """An engine that is shut down (cancelling what is left, bounded in time) whatever the test did."""
    engine = mm.Engine(models, **options)
    try:
        yield engine
    finally:
        engine.shutdown(drain=False, timeout=WAIT)


def bounded(handle, timeout: float = WAIT):
    """The handle's events from its own (sync) iterator, read in a helper thread so that no single
    wait exceeds ``timeout`` (``queue.Empty`` then fails the test); re-raises what ended the stream."""
    items: queue.Queue = queue.Queue()

    def pump():
        try:
            for event in handle:
                items.put((True, event))
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            items.put((False, e))
        else:
            items.put((False, None))

    threading.Thread(target=pump, daemon=True).start()
    while True:
        ok, item = items.get(timeout=timeout)
        if not ok:
            if item is not None:
                raise item
            return
        yield item


def wait_until(predicate, timeout: float = WAIT, what: str = "condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def counts_settle(engine, expected: dict, timeout: float = 10.0) -> dict:
    """``engine.metrics()`` once its counters equal ``expected`` (the handles' done-callbacks that
    count them may run just after a waiter saw the result), failing after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        metrics = engine.metrics()
        if all(metrics[k] == v for k, v in expected.items()) or time.monotonic() > end:
            break
        time.sleep(0.01)
    assert {k: metrics[k] for k in expected} == expected
    return metrics


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def same_images(a, b) -> bool:
    return len(a) == len(b) and all(x.size == y.size and np.array_equal(p, q)
                                    for x, y, p, q in zip(a, b, pixels(a), pixels(b)))


def near_images(a, b) -> bool:
    """Equal but for rounding flips (at most one level, in a few values): what the engine gives
    where it decodes an image's tokens in another batch than the pipeline does (see
    test_an_image_is_decoded_as_the_pipeline_decodes_it); a wrong token changes a whole patch."""
    if len(a) != len(b) or any(x.size != y.size for x, y in zip(a, b)):
        return False
    diff = np.abs(np.stack(pixels(a)).astype(np.int16) - np.stack(pixels(b)).astype(np.int16))
    return diff.max() <= 1 and (diff > 0).mean() < 0.005


def solo_caption(pipe, image, prompt=None, max_new_tokens=None, sampling=None) -> str:
    return pipe.caption([image], max_new_tokens=max_new_tokens, sampling=sampling, prompt=prompt)[0]


_SOLO_IMAGES: dict = {}


def solo_images(pipe, prompt, n=1, sampling=None) -> list:
    """``pipe.generate`` of the request alone (cached: each costs 256 decode steps)."""
    key = (pipe, prompt, n, sampling)  # the pipeline itself, so that no later one can take its id
    if key not in _SOLO_IMAGES:
        _SOLO_IMAGES[key] = pipe.generate(prompt, images_per_prompt=n, sampling=sampling)
    return _SOLO_IMAGES[key]


def solo_poses(pipe, audio, sampling=None) -> np.ndarray:
    return pipe.generate(audio, sample_rate=RATE, sampling=sampling)


# ---- 1. many threads, mixed tasks ---------------------------------------------------------------

def _script(thread: int) -> list[tuple[str, object]]:
    """Thread ``thread``'s requests: ("caption", (image, prompt, max_new_tokens, sampling)),
    ("gesture", (clip seed, sampling)), ("image", (prompt, n, sampling)) and the injected ones."""
    rng = random.Random(thread)
    script: list[tuple[str, object]] = []
    if thread < 2:  # two text-to-image requests, submitted first
        script.append(("image", ("a red circle" if thread == 0 else "a blue square above a green circle",
                                 1 + thread, image_sampling(thread))))
    for i in range(5):
        sampling = [None, SamplingParams(do_sample=False), hot(100 * thread + i)][(thread + i) % 3]
        script.append(("caption", (rng.randrange(len(IMAGES)), PROMPTS[(thread + 2 * i) % 4],
                                   [2, 5, 9, 20][(i + thread) % 4], sampling)))
    gesture_sampling = None if thread % 2 else SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=thread)
    script.insert(3, ("gesture", (1 + thread % 3, gesture_sampling)))
    if thread == 2:
        script.insert(2, ("garbage", None))    # an unreadable image file: fails at preprocessing
    if thread == 3:
        script.insert(4, ("too-long", None))   # 5 prompt tokens + 30 new ones > 32 positions: fails at admission
    return script


def test_many_threads_mixed_requests_each_equal_to_its_pipeline_result(captioner, txt2img, gesture, clips,
                                                                        tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all" * 10)
    threads_n = 5
    submitted: list[tuple[str, object, object]] = []  # (kind, args, handle)
    rejected: list[tuple[str, object]] = []
    cancel_asked: set[int] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def request(kind, args):
        if kind == "caption":
            image, prompt, max_new, sampling = args
            return mm.CaptionRequest(IMAGES[image], prompt=prompt, max_new_tokens=max_new, sampling=sampling)
        if kind == "gesture":
            seed, sampling = args
            return mm.GestureRequest(clips[seed], sample_rate=RATE, sampling=sampling)
        if kind == "image":
            prompt, n, sampling = args
            return mm.ImageRequest(prompt, n=n, sampling=sampling)
        if kind == "garbage":
            return mm.CaptionRequest(str(garbage))
        return mm.CaptionRequest(IMAGES[0], prompt=PROMPTS[3], max_new_tokens=30)

    def client(thread: int, engine):
        rng = random.Random(1000 + thread)
        try:
            for j, (kind, args) in enumerate(_script(thread)):
                try:
                    handle = engine.submit(request(kind, args))
                except mm.EngineOverloaded:
                    with lock:
                        rejected.append((kind, args))
                    continue
                with lock:
                    submitted.append((kind, args, handle))
                if thread == 4 and j == 2:  # one request cancelled as soon as it is in
                    with lock:
                        cancel_asked.add(handle.id)
                    handle.cancel()
                time.sleep(rng.uniform(0, 0.015))
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    attempts = sum(len(_script(t)) for t in range(threads_n))
    with serving({"caption": captioner, "image": txt2img, "gesture": gesture}, slots=4, max_queued=24) as engine:
        clients = [threading.Thread(target=client, args=(t, engine)) for t in range(threads_n)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(WAIT)
        assert not any(c.is_alive() for c in clients) and not errors, errors
        outcomes = {"completed": 0, "failed": 0, "cancelled": 0}
        for kind, args, handle in submitted:
            try:
                handle.exception(timeout=WAIT)
            except concurrent.futures.CancelledError:
                pass
            assert handle.done()
            if handle.cancelled():
                assert handle.id in cancel_asked, f"{kind} {args} cancelled without being asked to"
                outcomes["cancelled"] += 1
            elif handle.exception() is not None:
                assert kind in ("garbage", "too-long"), f"{kind} {args} failed: {handle.exception()!r}"
                assert isinstance(handle.exception(), mm.InputError)
                outcomes["failed"] += 1
            else:
                outcomes["completed"] += 1
        # no request lost: every attempt is accounted for, and the engine's counters agree
        assert len(submitted) + len(rejected) == attempts
        assert sum(outcomes.values()) == len(submitted)
        metrics = counts_settle(engine, {**outcomes, "submitted": len(submitted), "rejected": len(rejected)})
        assert metrics["queued"] == 0 and metrics["in_flight"] == 0
        assert all(m["active"] == 0 for m in metrics["models"].values())
        assert metrics["models"]["caption"]["steps"] > 0 and metrics["models"]["image"]["steps"] >= 255
        assert outcomes["failed"] == sum(kind in ("garbage", "too-long") for kind, _, _ in submitted)
        assert outcomes["completed"] >= 20, f"too few requests got through to prove much: {outcomes}, " \
                                            f"{len(rejected)} rejected"
        assert {kind for kind, _, h in submitted if not h.cancelled() and h.exception() is None} == \
            {"caption", "gesture", "image"}
        # started in one engine, whenever they joined: each result is what the pipeline gives alone
        sampled_differ = False
        for kind, args, handle in submitted:
            if handle.cancelled() or handle.exception() is not None:
                continue
            result = handle.result(timeout=WAIT)
            if kind == "caption":
                image, prompt, max_new, sampling = args
                expected = solo_caption(captioner, IMAGES[image], prompt, max_new, sampling)
                assert result == expected, (args, result, expected)
                if sampling is not None and sampling.do_sample and max_new > 2:
                    sampled_differ |= result != solo_caption(captioner, IMAGES[image], prompt, max_new)
            elif kind == "gesture":
                seed, sampling = args
                expected = solo_poses(gesture, clips[seed], sampling)
                assert result.shape == expected.shape and np.array_equal(result, expected), args
            else:
                prompt, n, sampling = args
                assert len(result) == n and near_images(result, solo_images(txt2img, prompt, n, sampling)), args
        assert sampled_differ, "no sampled caption differed from greedy: the seeds would go unchecked"
    with pytest.raises(mm.InputError):  # the injected late failure is what the pipeline raises too
        solo_caption(captioner, IMAGES[0], PROMPTS[3], 30)


# ---- 2. joining, leaving, cancelling ------------------------------------------------------------

def test_a_request_joins_a_batch_mid_decode(txt2img):
    """B (three images, more than the free slots) is submitted while A decodes; B's first image
    starts before A ends, the others when slots free up; all equal their solo runs."""
    a_args, b_args = ("a red circle", 1, image_sampling(1)), ("a yellow triangle", 3, image_sampling(2))
    with serving(txt2img, slots=2) as engine:
        a = engine.submit(mm.ImageRequest(a_args[0], n=a_args[1], sampling=a_args[2]))
        wait_until(lambda: a.tokens >= 8 or a.done(), what="A's first tokens")
        assert not a.done()
        b = engine.submit(mm.ImageRequest(b_args[0], n=b_args[1], sampling=b_args[2]))
        a_images, b_images = a.result(timeout=WAIT), b.result(timeout=WAIT)
        assert a.times["started"] < b.times["started"] < a.times["finished"] < b.times["finished"]
        assert a.tokens == 256 and b.tokens == 3 * 256
        steps = engine.metrics()["models"]["default"]["steps"]
        assert steps < 256 + 3 * 256 - 3, "B's rows should have shared steps with A's"
    assert same_images(a_images, solo_images(txt2img, *a_args))  # decoded alone, as in the pipeline
    assert near_images(b_images, solo_images(txt2img, *b_args))


def test_partial_images_of_rows_at_different_lengths(txt2img):
    """Two streamed requests that joined at different steps are due partial images at the same steps
    with different token counts: each gets its own, and both end as their solo runs."""
    with serving(txt2img, slots=4) as engine:
        a = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1), every=1))
        wait_until(lambda: a.tokens >= 3 or a.done(), what="A's first tokens")
        b = engine.submit(mm.ImageRequest("a yellow triangle", sampling=image_sampling(2), every=1))
        a_events, b_events = list(a), list(b)
        for events in (a_events, b_events):  # (the last token's partial image is the final image)
            assert [e.tokens for e in events][:255] == list(range(1, 256)), [e.tokens for e in events]
        assert same_images(a.result(timeout=WAIT), solo_images(txt2img, "a red circle", 1, image_sampling(1)))
        assert near_images(b.result(timeout=WAIT), solo_images(txt2img, "a yellow triangle", 1, image_sampling(2)))
        assert engine.closed is None


def test_a_caption_ending_at_eos_frees_its_slot(captioner):
    """One slot, a queue of captions that all end at eos well before max_new_tokens: every one
    completes, one after another, and no decode step is spent past an eos."""
    requests = [(IMAGES[i], prompt) for i, prompt in [(0, None), (1, "a"), (2, None), (3, "a blue")]]
    with serving(captioner, slots=1) as engine:
        handles = [engine.submit(mm.CaptionRequest(image, prompt=prompt, max_new_tokens=25))
                   for image, prompt in requests]
        results = [h.result(timeout=WAIT) for h in handles]
        metrics = counts_settle(engine, {"completed": 4})
    assert results == [solo_caption(captioner, image, prompt, 25) for image, prompt in requests]
    assert all(1 < h.tokens < 25 for h in handles)
    order = sorted(handles, key=lambda h: h.times["started"])
    assert all(x.times["finished"] <= y.times["started"] for x, y in zip(order, order[1:]))
    model = metrics["models"]["default"]
    assert model["steps"] == sum(h.tokens - 1 for h in handles)  # the first token of each comes from prefill
    assert model["occupancy"] == 1.0


def test_cancel_mid_stream_frees_the_slot_and_the_engine_keeps_serving(captioner, txt2img):
    with serving({"caption": captioner, "image": txt2img}, slots=1) as engine:
        handle = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1), every=16))
        events = []
        with pytest.raises(concurrent.futures.CancelledError):
            for event in bounded(handle):
                events.append(event)
                if len(events) == 1:
                    assert handle.cancel() is True
        assert handle.cancelled() and not handle.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            handle.result(timeout=WAIT)
        assert isinstance(events[0], mm.PartialImage) and events[0].tokens == 16
        assert len(events) < 255 // 16 and handle.tokens < 256
        # the slot is free again: the next image request runs (to its solo result)
        after = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1)))
        caption = engine.submit(mm.CaptionRequest(IMAGES[0]))
        assert same_images(after.result(timeout=WAIT), solo_images(txt2img, "a red circle", 1, image_sampling(1)))
        assert caption.result(timeout=WAIT) == solo_caption(captioner, IMAGES[0])
        counts_settle(engine, {"submitted": 3, "completed": 2, "cancelled": 1, "failed": 0})


def test_deadlines(captioner, txt2img):
    with serving({"caption": captioner, "image": txt2img}, slots=2) as engine:
        instant = engine.submit(mm.CaptionRequest(IMAGES[0], max_new_tokens=20, timeout=1e-3))
        short = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1), timeout=0.05))
        relaxed = engine.submit(mm.CaptionRequest(IMAGES[1], prompt="a", timeout=WAIT))
        for handle in (instant, short):
            error = handle.exception(timeout=WAIT)
            assert isinstance(error, mm.DeadlineExceeded) and isinstance(error, TimeoutError), error
            with pytest.raises(mm.DeadlineExceeded, match="timeout"):
                handle.result(timeout=0)
        assert short.tokens < 256  # expired at a step, not at the end
        assert relaxed.result(timeout=WAIT) == solo_caption(captioner, IMAGES[1], "a")
        later = engine.submit(mm.CaptionRequest(IMAGES[2]))  # the expired rows' slots are free
        assert later.result(timeout=WAIT) == solo_caption(captioner, IMAGES[2])
        metrics = counts_settle(engine, {"completed": 2, "failed": 2})
        assert metrics["models"]["image"]["active"] == 0


def test_overload_rejects_beyond_max_queued(txt2img):
    with serving(txt2img, slots=1, max_queued=0) as engine:
        with pytest.raises(mm.EngineOverloaded, match="max_queued 0"):
            engine.submit(mm.ImageRequest("a red circle"))
        assert engine.metrics()["rejected"] == 1 and engine.metrics()["submitted"] == 0
    with serving(txt2img, slots=1, max_queued=2) as engine:
        sampling = image_sampling(1)
        running = engine.submit(mm.ImageRequest("a red circle", sampling=sampling))
        wait_until(lambda: "started" in running.times or running.done(), what="the first request to start")
        waiting = [engine.submit(mm.ImageRequest(p, sampling=sampling)) for p in ("a blue square", "a green circle")]
        assert engine.metrics()["queued"] == 2
        with pytest.raises(mm.EngineOverloaded, match="2 requests already wait"):
            engine.submit(mm.ImageRequest("a red square", sampling=sampling))
        assert engine.metrics()["rejected"] == 1
        for handle in waiting:  # cancelling a queued request frees its place in the queue
            assert handle.cancel()
        for handle in waiting:
            with pytest.raises(concurrent.futures.CancelledError):
                handle.result(timeout=WAIT)
            assert "started" not in handle.times
        wait_until(lambda: engine.metrics()["queued"] == 0, what="the queue to empty")
        again = engine.submit(mm.ImageRequest("a red square", sampling=sampling))
        assert same_images(running.result(timeout=WAIT), solo_images(txt2img, "a red circle", 1, sampling))
        again.cancel()
        with contextlib.suppress(concurrent.futures.CancelledError):
            again.exception(timeout=WAIT)
        counts_settle(engine, {"submitted": 4, "rejected": 1, "cancelled": 3 - (not again.cancelled()),
                               "completed": 1 + (not again.cancelled())})


def test_bad_inputs_fail_only_their_own_handle(captioner, txt2img, gesture, clips, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 4)
    photo = tmp_path / "photo.png"
    IMAGES[4].save(photo)
    good = [(IMAGES[0], None), (np.asarray(IMAGES[1]), "a"), (str(photo), None), (IMAGES[3], "a blue")]
    bad = [
        mm.CaptionRequest(str(tmp_path / "missing.png")),
        mm.CaptionRequest(str(garbage)),
        mm.CaptionRequest(np.zeros((4, 4), np.float32)),
        mm.CaptionRequest(IMAGES[0], max_new_tokens=0),
        mm.CaptionRequest(IMAGES[0], sampling="greedy"),
        mm.CaptionRequest(IMAGES[0], prompt=PROMPTS[3], max_new_tokens=31),  # past the 32 positions
        mm.ImageRequest("   "),
        mm.ImageRequest("a red circle", n=0),
        mm.GestureRequest(str(garbage)),
        mm.GestureRequest(clips[1]),  # an array needs its sample_rate
    ]
    models = {"caption": captioner, "image": txt2img, "gesture": gesture}
    with serving(models, slots=2) as engine:
        good_handles, bad_handles = [], []
        for i, (image, prompt) in enumerate(good):  # interleaved with the bad ones
            good_handles.append(engine.submit(mm.CaptionRequest(image, prompt=prompt, max_new_tokens=12)))
            bad_handles.extend(engine.submit(r) for r in bad[i * 3:i * 3 + 3])
        poses = engine.submit(mm.GestureRequest(clips[1], sample_rate=RATE))
        # what the task does not have: refused in preprocessing, before the scheduler sees it
        not_yet = [engine.submit(mm.GestureRequest(clips[1], sample_rate=RATE, sampling=SamplingParams(num_beams=2))),
                   engine.submit(mm.ImageRequest("a red circle", sampling=SamplingParams(repetition_penalty=1.3)))]
        for handle in not_yet:
            with pytest.raises(mm.InputError, match="beam search|not supported by this task"):
                handle.result(timeout=WAIT)
        handles = good_handles + bad_handles + not_yet
        for handle in handles:
            handle.exception(timeout=WAIT)
        assert [h.result(timeout=0) for h in good_handles] == [
            solo_caption(captioner, image, prompt, 12) for image, prompt in good]
        for handle in bad_handles:
            assert isinstance(handle.exception(), mm.InputError), (handle.request, handle.exception())
            assert "\n" not in str(handle.exception())
            with pytest.raises(mm.InputError):
                list(bounded(handle))
        assert np.array_equal(poses.result(timeout=WAIT), solo_poses(gesture, clips[1]))
        counts_settle(engine, {"submitted": len(handles) + 1, "completed": len(good) + 1,
                               "failed": len(bad) + len(not_yet)})
    # each bad request fails the pipeline too
    for request in bad:
        with pytest.raises(mm.InputError):
            if isinstance(request, mm.CaptionRequest):
                captioner.caption([request.image], max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                                  prompt=request.prompt)
            elif isinstance(request, mm.ImageRequest):
                txt2img.generate(request.prompt, images_per_prompt=request.n)
            else:
                gesture.generate(request.audio, sample_rate=request.sample_rate)


def test_shutdown_drains_what_was_submitted(captioner, gesture, clips):
    engine = mm.Engine({"caption": captioner, "gesture": gesture}, slots=2)
    try:
        captions = [engine.submit(mm.CaptionRequest(IMAGES[i], prompt=PROMPTS[i % 4], max_new_tokens=9))
                    for i in range(5)]
        poses = engine.submit(mm.GestureRequest(clips[3], sample_rate=RATE, sampling=SamplingParams(seed=5)))
        engine.shutdown(drain=True, timeout=WAIT)
        assert all(not s.thread.is_alive() for s in engine.schedulers.values())
        assert all(h.done() and not h.cancelled() for h in [*captions, poses])
        assert [h.result(timeout=0) for h in captions] == [solo_caption(captioner, IMAGES[i], PROMPTS[i % 4], 9)
                                                           for i in range(5)]
        assert np.array_equal(poses.result(timeout=0), solo_poses(gesture, clips[3], SamplingParams(seed=5)))
        with pytest.raises(mm.EngineClosed):
            engine.submit(mm.CaptionRequest(IMAGES[0]))
        counts_settle(engine, {"submitted": 6, "completed": 6, "rejected": 0})
    finally:
        engine.shutdown(drain=False, timeout=WAIT)


def test_shutdown_without_drain_cancels_what_is_left(captioner, txt2img):
    engine = mm.Engine({"caption": captioner, "image": txt2img}, slots=1)
    try:
        images = [engine.submit(mm.ImageRequest(prompt, sampling=image_sampling(3)))
                  for prompt in ("a red circle", "a green square")]
        captions = [engine.submit(mm.CaptionRequest(IMAGES[i])) for i in range(3)]
        # either image may start first (two preprocessing threads); the other waits for the slot
        wait_until(lambda: any("started" in h.times for h in images), what="an image to start")
        start = time.monotonic()
        engine.shutdown(drain=False, timeout=WAIT)
        assert time.monotonic() - start < 30, "an undrained shutdown should not wait for the images"
        assert all(not s.thread.is_alive() for s in engine.schedulers.values())
        handles = [*images, *captions]
        assert all(h.done() for h in handles)
        assert all(h.cancelled() for h in images)
        for handle in images:
            with pytest.raises(concurrent.futures.CancelledError):
                handle.result(timeout=0)
            with pytest.raises(concurrent.futures.CancelledError):
                list(bounded(handle))
        cancelled = sum(h.cancelled() for h in handles)
        for handle in captions:  # a caption may have finished before the shutdown
            if not handle.cancelled():
                assert handle.result(timeout=0) == solo_caption(captioner, handle.request.image)
        with pytest.raises(mm.EngineClosed, match="shut down"):
            engine.submit(mm.ImageRequest("a red circle"))
        counts_settle(engine, {"submitted": 5, "cancelled": cancelled, "completed": 5 - cancelled, "failed": 0})
    finally:
        engine.shutdown(drain=False, timeout=WAIT)


@pytest.mark.parametrize("where", ["decode_step", "prefill"])
def test_an_internal_error_fails_every_pending_request(monkeypatch, clips, where):
    """The captioner's scheduler dies (its decode step or prefill raises) while a gesture request
    decodes in the other model's thread: every pending request of both fails with EngineFailed,
    every thread stops, later submits raise it."""
    captioner = mm.load(mm.demo_model("captioning"))  # own copies: the patches stay off the shared ones
    gesture = mm.load(mm.demo_model("speech-to-gesture"))
    gesture_decoding, release = threading.Event(), threading.Event()
    real_step = scheduler_module.decode_step

    def boom(*args, **kwargs):
        gesture_decoding.wait(WAIT)  # fail only once the other model has a request in flight
        raise RuntimeError("simulated device fault")

    def decode_step(decoder, state):
        if decoder is gesture.model.decoder:
            gesture_decoding.set()
            release.wait(WAIT)  # hold the gesture request mid-decode until the engine has failed
        elif where == "decode_step":
            boom()
        return real_step(decoder, state)

    monkeypatch.setattr(scheduler_module, "decode_step", decode_step)
    if where == "prefill":
        monkeypatch.setattr(captioner.model.decoder, "prefill", boom)
    engine = mm.Engine({"caption": captioner, "gesture": gesture}, slots=1)
    try:
        handles = [engine.submit(mm.GestureRequest(clips[2], sample_rate=RATE))]
        handles += [engine.submit(mm.CaptionRequest(IMAGES[i], max_new_tokens=6)) for i in range(3)]
        for handle in handles:
            error = handle.exception(timeout=WAIT)
            assert isinstance(error, mm.EngineFailed), error
            assert "simulated device fault" in str(error) and "'caption'" in str(error)
            assert isinstance(error.__cause__, RuntimeError)
            with pytest.raises(mm.EngineFailed):
                list(bounded(handle))
        release.set()
        for scheduler in engine.schedulers.values():
            scheduler.thread.join(WAIT)
            assert not scheduler.thread.is_alive()
        with pytest.raises(mm.EngineFailed):
            engine.submit(mm.CaptionRequest(IMAGES[0]))
        with pytest.raises(mm.EngineFailed):
            engine.submit(mm.GestureRequest(clips[1], sample_rate=RATE))
        counts_settle(engine, {"submitted": 4, "failed": 4, "completed": 0})
        start = time.monotonic()
        engine.shutdown(timeout=WAIT)
        assert time.monotonic() - start < 10
    finally:
        release.set()
        engine.shutdown(drain=False, timeout=WAIT)


# ---- asyncio ------------------------------------------------------------------------------------

def test_asyncio_face_does_not_block_the_event_loop(captioner, txt2img, gesture, clips):
    image_args = ("a red circle", 1, image_sampling(1))

    async def main(engine):
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        results = await asyncio.gather(
            engine.generate(mm.CaptionRequest(IMAGES[0], max_new_tokens=9)),
            engine.generate(mm.CaptionRequest(IMAGES[1], prompt="a blue", sampling=hot(7))),
            engine.generate(mm.GestureRequest(clips[2], sample_rate=RATE)),
            engine.generate(mm.ImageRequest(image_args[0], n=image_args[1], sampling=image_args[2])),
        )
        end = time.perf_counter()
        during = [t for t in ticks if start <= t <= end]
        deltas = [ev async for ev in engine.stream(mm.CaptionRequest(IMAGES[2], prompt="a"))]
        handle = engine.submit(mm.GestureRequest(clips[1], sample_rate=RATE))
        chunks = [ev async for ev in handle]
        # cancelling the awaiting task cancels the request
        task = asyncio.create_task(engine.generate(mm.ImageRequest("a green square", sampling=image_sampling(9))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tick_task.cancel()
        return results, end - start, during, deltas, handle, chunks

    with serving({"caption": captioner, "image": txt2img, "gesture": gesture}, slots=4) as engine:
        results, elapsed, during, deltas, handle, chunks = asyncio.run(asyncio.wait_for(main(engine), WAIT))
        counts_settle(engine, {"submitted": 7, "completed": 6, "cancelled": 1})
    caption, sampled, poses, images = results
    assert caption == solo_caption(captioner, IMAGES[0], None, 9)
    assert sampled == solo_caption(captioner, IMAGES[1], "a blue", 20, hot(7))
    assert np.array_equal(poses, solo_poses(gesture, clips[2]))
    assert same_images(images, solo_images(txt2img, *image_args))
    # the loop kept running while the engine worked: it ticked throughout, never stalled for long
    gaps = np.diff(during)
    assert elapsed > 0.2 and len(during) >= min(50, elapsed / 0.005 / 10), (elapsed, len(during))
    assert gaps.max() < 1.5, gaps.max()
    assert all(isinstance(d, mm.TextDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == solo_caption(captioner, IMAGES[2], "a")
    assert all(isinstance(c, mm.PoseChunk) for c in chunks)
    assert np.array_equal(np.concatenate([c.poses for c in chunks]), handle.result(timeout=0))


# ---- event streams ------------------------------------------------------------------------------

def test_text_deltas_join_to_the_caption(captioner):
    requests = [(IMAGES[i], PROMPTS[i % 4], [3, 9, 20][i % 3], [None, hot(i)][i % 2]) for i in range(6)]
    with serving(captioner, slots=3) as engine:
        handles = [engine.submit(mm.CaptionRequest(image, prompt=prompt, max_new_tokens=n, sampling=sampling))
                   for image, prompt, n, sampling in requests]
        streams = [list(bounded(handle)) for handle in handles]  # read while they decode
        for handle, deltas, (image, prompt, n, sampling) in zip(handles, streams, requests):
            caption = handle.result(timeout=WAIT)
            assert caption == solo_caption(captioner, image, prompt, n, sampling)
            assert all(isinstance(d, mm.TextDelta) and d.text for d in deltas)
            assert "".join(d.text for d in deltas) == caption
            assert list(bounded(handle)) == deltas  # a second reader sees the same events from the first
    assert max(len(deltas) for deltas in streams) >= 5  # streamed token by token, not only at the end


def test_text_deltas_join_to_a_caption_ending_in_a_partial_character(captioner):
    sampling = SamplingParams(do_sample=True, temperature=6.0, seed=1)  # byte tokens of the demo's byte-level BPE
    image = world.sample(2, seed=0)[1][0]
    expected = solo_caption(captioner, image, None, 3, sampling)
    assert expected.endswith("\ufffd")  # what the pipeline gives: the decoded bytes, cut mid-character
    with serving(captioner) as engine:
        handle = engine.submit(mm.CaptionRequest(image, max_new_tokens=3, sampling=sampling))
        deltas = list(bounded(handle))
        assert handle.result(timeout=WAIT) == expected
    assert "".join(d.text for d in deltas) == expected


def test_pose_chunks_concatenate_to_the_result(gesture, clips):
    sampling = SamplingParams(do_sample=True, temperature=0.7, seed=4)
    with serving(gesture, slots=2) as engine:
        handles = {seed: engine.submit(mm.GestureRequest(clips[seed], sample_rate=RATE, sampling=sampling))
                   for seed in clips}
        streams = {seed: list(bounded(handle)) for seed, handle in handles.items()}
    for seed, handle in handles.items():
        chunks, poses = streams[seed], handle.result(timeout=WAIT)
        assert np.array_equal(poses, solo_poses(gesture, clips[seed], sampling))
        assert all(isinstance(c, mm.PoseChunk) for c in chunks) and len(chunks) >= 1 + (seed == 3)  # 1 or 3 windows
        assert np.array_equal(np.concatenate([c.poses for c in chunks]), poses)
        windows = [c.window for c in chunks]
        assert windows == sorted(windows) and windows[0] == 0
        assert poses.shape == (round(len(clips[seed]) / RATE * gesture.fps), 52, 2)
        solo_chunks = list(gesture.generate_stream(clips[seed], RATE, sampling))  # the pipeline's chunks
        assert len(chunks) == len(solo_chunks)
        assert all(np.array_equal(c.poses, s) for c, s in zip(chunks, solo_chunks))


def test_partial_images_every_n_tokens(txt2img):
    prompt, sampling, every = "a blue square", image_sampling(5), 64
    with serving(txt2img, slots=4) as engine:
        handle = engine.submit(mm.ImageRequest(prompt, n=2, sampling=sampling, every=every))
        other = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1), every=100))
        events = list(bounded(handle))
        final = handle.result(timeout=WAIT)
        other_events = list(bounded(other))
    total = txt2img.num_tokens
    assert total == 256
    assert all(isinstance(e, mm.PartialImage) and e.total == total for e in events + other_events)
    assert len(events) == 2 * ((total - 1) // every) and len(other_events) == (total - 1) // 100
    assert sorted((e.index, e.tokens) for e in events) == [(i, k * every) for i in range(2) for k in (1, 2, 3)]
    assert [e.tokens for e in other_events] == [100, 200]
    stream = list(txt2img.generate_stream(prompt, images_per_prompt=2, sampling=sampling, every=every))
    assert len(stream) == 4 and near_images(final, stream[-1])
    for e in events:  # each partial image is the pipeline's partial image at that many tokens
        assert near_images([e.image], [stream[e.tokens // every - 1][e.index]])
    assert near_images(other.result(timeout=0), solo_images(txt2img, "a red circle", 1, image_sampling(1)))


# ---- refusals at submit -------------------------------------------------------------------------

def test_submit_refuses_requests_it_cannot_route(captioner, txt2img):
    with serving({"caption": captioner, "image": txt2img}) as engine:
        with pytest.raises(mm.InputError, match="CaptionRequest, ImageRequest or GestureRequest"):
            engine.submit("caption this")
        with pytest.raises(mm.InputError, match="no model named 'nope'"):
            engine.submit(mm.CaptionRequest(IMAGES[0], model="nope"))
        with pytest.raises(mm.InputError, match="text-to-image model, not captioning"):
            engine.submit(mm.CaptionRequest(IMAGES[0], model="image"))
        with pytest.raises(mm.InputError, match="no speech-to-gesture model"):
            engine.submit(mm.GestureRequest(np.zeros(16000, np.float32), sample_rate=RATE))
        assert engine.submit(mm.CaptionRequest(IMAGES[0], model="caption")).result(timeout=WAIT) == \
            solo_caption(captioner, IMAGES[0])
        metrics = counts_settle(engine, {"submitted": 1, "completed": 1, "rejected": 0, "failed": 0})
        assert set(metrics["models"]) == {"caption", "image"}
    with serving({"one": captioner, "two": captioner}) as engine:
        with pytest.raises(mm.InputError, match="several captioning models"):
            engine.submit(mm.CaptionRequest(IMAGES[0]))
        assert engine.submit(mm.CaptionRequest(IMAGES[0], model="two")).result(timeout=WAIT) == \
            solo_caption(captioner, IMAGES[0])
    for make in [lambda: mm.CaptionRequest(IMAGES[0], timeout=0), lambda: mm.CaptionRequest(IMAGES[0], model=3),
                 lambda: mm.ImageRequest("a red circle", every=0), lambda: mm.GestureRequest(None, timeout=-1.0)]:
        with pytest.raises(mm.InputError):
            make()
    for models, options in [({}, {}), (object(), {}), ({"": captioner}, {}), (captioner, {"slots": 0}),
                            (captioner, {"max_queued": -1})]:
        with pytest.raises(mm.InputError):
            mm.Engine(models, **options)


def test_engine_loads_a_checkpoint_path(captioner):
    with mm.Engine(mm.demo_model("captioning"), slots=2) as engine:
        assert "captioning" in repr(engine)
        handles = [engine.submit(mm.CaptionRequest(IMAGES[i], prompt=PROMPTS[i % 4], max_new_tokens=8))
                   for i in range(3)]
        assert [h.result(timeout=WAIT) for h in handles] == [
            solo_caption(captioner, IMAGES[i], PROMPTS[i % 4], 8) for i in range(3)]
        assert all(h.times["submitted"] <= h.times["started"] <= h.times["first_token"] <= h.times["finished"]
                   for h in handles)
    with pytest.raises(mm.EngineClosed):
        engine.submit(mm.CaptionRequest(IMAGES[0]))


# ---- regressions: async iterators, partial characters, detokenizer batches, metrics -------------

def test_an_abandoned_async_iterator_does_not_fail_the_engine(captioner, txt2img):
    with serving({"caption": captioner, "image": txt2img}, slots=2) as engine:
        handle = engine.submit(mm.ImageRequest("a red circle", sampling=image_sampling(1), every=32))

        async def consume():
            async for _ in handle:
                pass

        async def main():
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(consume(), 0.02)  # gives up while waiting for the first event

        asyncio.run(main())
        images = handle.result(timeout=WAIT)
        assert same_images(images, solo_images(txt2img, "a red circle", 1, image_sampling(1)))
        assert engine.submit(mm.CaptionRequest(IMAGES[0])).result(timeout=WAIT) == solo_caption(captioner, IMAGES[0])


def test_an_image_has_the_pipelines_tokens_whatever_its_detokenizer_batch(txt2img):
    """With one slot the two images of a request decode one after the other, and each is
    detokenized alone (the engine detokenizes the grids that end in one step together, across
    requests); the pipeline detokenizes both in one batch. The tokens are the same; the pixels
    only within the detokenizer's batch-size-dependent float rounding."""
    args = ("a blue square", 2, image_sampling(5))
    with serving(txt2img, slots=1) as engine:
        handle = engine.submit(mm.ImageRequest(args[0], n=args[1], sampling=args[2]))
        images = handle.result(timeout=WAIT)
    text, params = txt2img._request(*args)
    assert handle.token_ids == txt2img.generate_tokens(text, params).tolist()
    assert near_images(images, solo_images(txt2img, *args))


def test_metrics_count_a_request_once_its_result_is_available(captioner, monkeypatch):
    with serving(captioner) as engine:
        resolved = engine._resolved

        def slow_resolved(job, outcome):  # widens the window between the result's arrival and its count
            time.sleep(0.3)
            resolved(job, outcome)

        monkeypatch.setattr(engine, "_resolved", slow_resolved)
        handle = engine.submit(mm.CaptionRequest(IMAGES[0], max_new_tokens=4))
        handle.result(timeout=WAIT)
        metrics = engine.metrics()
        assert (metrics["completed"], metrics["in_flight"]) == (1, 0)
