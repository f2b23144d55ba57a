"""``mmgen serve --quantize``: a real server on 127.0.0.1 serving the demo captioner with int8 weights
answers what the quantized pipeline answers and reports the quantization; bad values are refused in
one line before any model loads."""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the test extra)")
pytest.importorskip("fastapi", reason="mmgen serve needs the serve extra (fastapi, uvicorn)")
from servers import demo_models, running_server  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo import world  # noqa: E402
from mmgen_engine.errors import InputError  # noqa: E402
from mmgen_engine.serving.http import ServerConfig  # noqa: E402


def b64(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_serve_quantize_int8_captions_as_the_quantized_pipeline():
    scenes = [world.render(world.scene_for_seed(world.HELD_OUT_SEED + i)) for i in range(2)]
    expected = mm.load(mm.demo_model("captioning"), quantize="int8").caption(scenes)
    with running_server(*demo_models("captioning"), "--quantize", "int8", "--slots", "2") as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["quantization"], m["dtype"]) for m in models] == [("captioning", "int8", "float32")]
        r = httpx.post(f"{server.url}/v1/captions", json={"images": [b64(im) for im in scenes]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "captioning", "captions": expected}


def test_serve_without_quantize_reports_none():
    from mmgen_engine.pipelines import weight_format

    assert weight_format(mm.load(mm.demo_model("captioning"))) == {"dtype": "float32", "decoder_weights": "float32",
                                                                "quantization": None}
    assert weight_format(mm.load(mm.demo_model("captioning"), quantize="int8-g32"))["quantization"] == "int8-g32"


@pytest.mark.parametrize("value", ["int4", "int8-g", "int8-g8"])
def test_bad_quantize_values_are_one_line_before_loading(value):
    with pytest.raises(InputError, match="quantize") as e:
        ServerConfig({"a": "/nonexistent"}, quantize=value)
    with pytest.raises(InputError) as direct:
        mm.load(mm.demo_model("captioning"), quantize=value)
    assert str(e.value) == str(direct.value)  # the same line as mm.load's
    ckpt = str(mm.demo_model("captioning"))
    out = subprocess.run([sys.executable, "-m", "mmgen_engine.cli", "serve", "--model", ckpt, "--quantize", value],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mmgen: error:") and "quantize" in out.stderr
