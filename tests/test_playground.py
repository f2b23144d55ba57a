"""The playground page of ``mmgen serve`` (GET /) driven in a real headless Chromium.

The real server runs as a subprocess with the three demo models; every panel is used the way a person
would: upload an image and watch the caption stream in, type a prompt and watch the partial images
sharpen into the final ones, upload speech and watch the stick figure move with it. Skipped when
Selenium, Chromium or chromedriver is missing (Selenium Manager is never asked to download one).
"""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from servers import running_server

import mmgen_engine as mm

webdriver = pytest.importorskip("selenium.webdriver", reason="the playground test needs selenium")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "google-chrome-stable")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="the playground test needs Chromium (chromium, chromium-browser or "
                                       "google-chrome) and chromedriver on PATH")

SERVER_START_S = 90  # loading three demo models and starting uvicorn
WAIT_S = 30          # any one thing the page is waited for
SPEECH_SECONDS = 4.0


# ---- the server and the browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    """``mmgen serve`` with the three demo models (as captioner, painter, gesturer): yields its base URL."""
    args = []
    for name, task in (("captioner", "captioning"), ("painter", "text-to-image"), ("gesturer", "speech-to-gesture")):
        args += ["--model", f"{name}={mm.demo_model(task)}"]
    with running_server(*args, ready_timeout=SERVER_START_S) as running:
        yield running.url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(server, browser):
    """The playground freshly loaded, its panels built."""
    browser.get(server + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true",
         "the page to list the models")
    return browser


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def panel(driver, name: str):
    return driver.find_element(By.CSS_SELECTOR, f'section.panel[data-model="{name}"]')


def panel_error(section) -> str:
    return section.find_element(By.CSS_SELECTOR, ".error").text


def settled(section) -> bool:
    """The panel's request has finished (done or failed); a failure fails the test with its message."""
    state = section.get_attribute("data-state")
    if state == "error":
        pytest.fail(f"the panel failed: {panel_error(section)}")
    return state == "done"


# ---- the tests ------------------------------------------------------------------------------------

def test_page_lists_every_served_model(page):
    panels = page.find_elements(By.CSS_SELECTOR, "section.panel")
    assert {(p.get_attribute("data-model"), p.get_attribute("data-task")) for p in panels} == {
        ("captioner", "captioning"), ("painter", "text-to-image"), ("gesturer", "speech-to-gesture")}
    assert page.title == "mmgen playground"
    assert page.find_element(By.ID, "global-error").text == ""


def test_caption_streams_token_by_token(page, captioner, tmp_path):
    from mmgen_engine.demo.world import HELD_OUT_SEED, sample

    image, _ = sample(1, HELD_OUT_SEED + 7)[0]
    path = tmp_path / "scene.png"
    image.save(path)
    expected = captioner.caption([image])[0]
    section = panel(page, "captioner")
    output = section.find_element(By.CSS_SELECTOR, ".caption-output")
    # every text the output shows, in order (each delta replaces its text node)
    page.execute_script("""
        const out = arguments[0];
        window.captionTexts = [];
        new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes) window.captionTexts.push(n.textContent);
        }).observe(out, {childList: true});""", output)
    section.find_element(By.CSS_SELECTOR, ".image-input").send_keys(str(path))
    preview = section.find_element(By.CSS_SELECTOR, ".image-preview")
    wait(page, lambda d: page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview),
         "the image preview")
    section.find_element(By.CSS_SELECTOR, ".caption-button").click()
    wait(page, lambda d: settled(section), "the caption")
    assert output.text == expected
    assert output.get_attribute("data-final") == "true"
    texts = page.execute_script("return window.captionTexts")
    assert texts[-1] == expected
    assert len(texts) >= 2, f"the caption did not stream: {texts}"
    for shorter, longer in zip(texts, texts[1:]):  # each delta extends what was shown
        assert longer.startswith(shorter)


def test_images_sharpen_from_partials_to_final(page, server):
    import httpx

    size = next(m["size"] for m in httpx.get(server + "/v1/models", timeout=WAIT_S).json()["data"]
                if m["id"] == "painter")
    width, height = map(int, size.split("x"))
    section = panel(page, "painter")
    output = section.find_element(By.CSS_SELECTOR, ".image-output")
    # every state an image left (an image that was partial and became final leaves "partial")
    page.execute_script("""
        window.leftStates = [];
        new MutationObserver((records) => {
          for (const r of records) if (r.oldValue) window.leftStates.push(r.oldValue);
        }).observe(arguments[0], {subtree: true, attributes: true, attributeFilter: ["data-state"],
                                  attributeOldValue: true});""", output)
    prompt = section.find_element(By.CSS_SELECTOR, ".prompt-input")
    prompt.send_keys("a red circle")
    n = section.find_element(By.CSS_SELECTOR, ".n-input")
    n.clear()
    n.send_keys("2")
    section.find_element(By.CSS_SELECTOR, ".seed-input").send_keys("3")
    section.find_element(By.CSS_SELECTOR, ".generate-button").click()
    # a partial image shows while the request is still running
    wait(page, lambda d: section.find_elements(By.CSS_SELECTOR, '.image-output img[data-state="partial"]')
         or settled(section), "a partial image")
    wait(page, lambda d: settled(section), "the final images")
    assert "partial" in page.execute_script("return window.leftStates")
    images = section.find_elements(By.CSS_SELECTOR, ".image-output img")
    assert len(images) == 2
    for img in images:
        assert img.get_attribute("data-state") == "final"
        assert int(img.get_attribute("data-partials")) >= 1
        src = img.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert decoded.format == "PNG" and decoded.size == (width, height)
        natural = page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert natural == [width, height]


def test_gestures_animate_with_the_speech(page, tmp_path):
    import soundfile

    from mmgen_engine.demo import gesture_world as world

    audio, _ = world.clip(world.HELD_OUT_SEED + 3, SPEECH_SECONDS)
    path = tmp_path / "speech.wav"
    soundfile.write(path, audio, world.SAMPLE_RATE, subtype="PCM_16")
    frames = round(SPEECH_SECONDS * world.FPS)
    section = panel(page, "gesturer")
    canvas = section.find_element(By.CSS_SELECTOR, "canvas.gesture")
    section.find_element(By.CSS_SELECTOR, ".audio-input").send_keys(str(path))
    assert section.find_element(By.CSS_SELECTOR, "audio.gesture-audio").get_attribute("src").startswith("blob:")
    section.find_element(By.CSS_SELECTOR, ".gesture-button").click()
    wait(page, lambda d: settled(section), "the poses")
    assert int(canvas.get_attribute("data-frames")) == frames
    drawn = page.execute_script("""
        const c = arguments[0];
        const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
        return n;""", canvas)
    assert drawn > 500, f"the stick figure is not drawn ({drawn} painted pixels)"
    first = int(canvas.get_attribute("data-frame"))
    wait(page, lambda d: int(canvas.get_attribute("data-frame")) > first, "the animation to advance", timeout=10)
    # the frame follows the audio's clock (or the page's own clock, where the browser cannot play audio)
    state = page.execute_script("""
        const a = arguments[0].querySelector("audio.gesture-audio");
        return {paused: a.paused, time: a.currentTime,
                frame: Number(arguments[0].querySelector("canvas.gesture").dataset.frame)};""", section)
    if not state["paused"]:
        assert abs(state["frame"] - int(state["time"] * world.FPS)) <= 2, state


def test_errors_show_in_the_panel(page, tmp_path):
    # unreadable audio: the server reports it as an `error` event of the stream
    junk = tmp_path / "not-audio.wav"
    junk.write_bytes(b"this is no audio")
    gestures = panel(page, "gesturer")
    gestures.find_element(By.CSS_SELECTOR, ".audio-input").send_keys(str(junk))
    gestures.find_element(By.CSS_SELECTOR, ".gesture-button").click()
    wait(page, lambda d: gestures.get_attribute("data-state") == "error", "the gesture error")
    message = panel_error(gestures)
    assert "audio" in message and "\n" not in message and "Traceback" not in message
    assert gestures.find_element(By.CSS_SELECTOR, "canvas.gesture").get_attribute("data-frames") == "0"
    # an error answer ({"error": {"message"}} with a 400)
    path = tmp_path / "not-an-image.png"
    path.write_bytes(b"this is no image")
    section = panel(page, "captioner")
    section.find_element(By.CSS_SELECTOR, ".image-input").send_keys(str(path))
    section.find_element(By.CSS_SELECTOR, ".caption-button").click()
    wait(page, lambda d: section.get_attribute("data-state") == "error", "the error")
    message = panel_error(section)
    assert "image" in message and "\n" not in message and "Traceback" not in message
    assert section.find_element(By.CSS_SELECTOR, ".caption-output").text == ""
    # the panel works again after a failure
    image = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    good = tmp_path / "plain.png"
    image.save(good)
    section.find_element(By.CSS_SELECTOR, ".image-input").send_keys(str(good))
    section.find_element(By.CSS_SELECTOR, ".caption-button").click()
    wait(page, lambda d: settled(section), "a caption after the error")
    assert panel_error(section) == ""


def test_the_event_stream_reader_takes_any_chunking(page):
    """The page's SSE reader (fetch + ReadableStream) on one stream cut at every byte, with \\r\\n, \\r
    and \\n line ends, a comment and multi-byte UTF-8: the same events each time."""
    result = page.execute_async_script("""
        const finish = arguments[arguments.length - 1];
        const text = ': keep-alive\\r\\n' +
                     'event: caption.delta\\r\\ndata: {"index": 0, "text": "caf\\u00e9 "}\\r\\n\\r\\n' +
                     'event: caption.delta\\rdata: {"index": 0, "text": "\\u2713"}\\r\\r' +
                     'event: done\\ndata: {"captions": ["caf\\u00e9 \\u2713"]}\\n\\n';
        const bytes = new TextEncoder().encode(text);
        const realFetch = window.fetch;
        (async () => {
          const runs = [];
          try {
            for (const size of [1, 2, 3, 7, bytes.length]) {
              window.fetch = async () => new Response(new ReadableStream({
                start(controller) {
                  for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
                  controller.close();
                }}), {headers: {"Content-Type": "text/event-stream"}});
              const events = [];
              const done = await postStream("/v1/captions", new FormData(), (type, data) => events.push([type, data]));
              runs.push({events, done});
            }
            window.fetch = async () => new Response('event: error\\ndata: {"type": "error", "error": ' +
                '{"message": "it broke", "code": 500}}\\n\\n', {headers: {"Content-Type": "text/event-stream"}});
            try { await postStream("/v1/captions", new FormData(), () => {}); runs.push("no error"); }
            catch (e) { runs.push([e.constructor.name, e.message]); }
          } finally {
            window.fetch = realFetch;
          }
          finish(runs);
        })().catch((e) => finish(String(e)));""")
    expected = {"events": [["caption.delta", {"index": 0, "text": "café "}],
                           ["caption.delta", {"index": 0, "text": "✓"}], ["done", {"captions": ["café ✓"]}]],
                "done": {"captions": ["café ✓"]}}
    assert result[:-1] == [expected] * 5
    assert result[-1] == ["RequestFailed", "it broke"]
