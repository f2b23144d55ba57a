"""Request limits and option checks come before any work, in the CLI and in the Python API, as one
InputError line that names the option and the limit: too many images, prompts or tokens, absurd
grids, float options that overflow or underflow float32, arguments of the wrong type, and output
paths that cannot be written."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch

import mmgen_engine as mm
from mmgen_engine import InputError, SamplingParams, TextToImagePipeline
from mmgen_engine.cli import main
from mmgen_engine.runtime import Sampler, limits

RED = PIL.Image.new("RGB", (64, 64), "red")


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading a model fail the test: what is checked before work never gets there."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")
    monkeypatch.setattr(mm, "load", load)


def cli_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mmgen: error: "), err
    return err


def test_the_limits_leave_normal_use_alone():
    assert limits.MAX_IMAGES_PER_CALL >= 16 ** 2 and limits.MAX_NEW_TOKENS >= 1024
    assert limits.MAX_PROMPT_CHARS >= 1000 and limits.MAX_PROMPT_TOKENS >= 512
    assert limits.MAX_TOKEN_GRID_SIDE >= 64 and limits.MAX_IMAGE_TOKENS_PER_CALL >= 256 * 32 * 32  # 256 dVAE images


# --- the CLI: checked before the model loads ----------------------------------------------------

@pytest.mark.parametrize("grid", ["100", "1000000", "0", "17"])
def test_txt2img_grid_limit(grid, tmp_path, capsys, no_model_load):
    err = cli_error(capsys, ["txt2img", "a red circle", "--model", mm.demo_model("text-to-image"),
                             "-o", tmp_path / "x.png", "--grid", grid])
    assert f"--grid must be in [1, 16] (an NxN grid; at most 256 images per call), got {grid}" in err


@pytest.mark.parametrize("option", ["--guidance", "--temperature"])
@pytest.mark.parametrize("value", ["1e300", "1e-300", "inf", "nan"])
def test_txt2img_float_options_out_of_float32(option, value, tmp_path, capsys, no_model_load):
    err = cli_error(capsys, ["txt2img", "a red circle", "--model", mm.demo_model("text-to-image"),
                             "-o", tmp_path / "x.png", option, value])
    assert "[1.1754944e-38, 3.4028235e+38]" in err and "float32" in err


def test_txt2img_output_is_checked_first_and_written_whole(tmp_path, capsys, monkeypatch):
    model = mm.demo_model("text-to-image")
    with monkeypatch.context() as m:
        m.setattr(mm, "load", lambda *a, **k: pytest.fail("loaded a model for an unwritable output"))
        assert "missing_dir does not exist" in cli_error(
            capsys, ["txt2img", "a red circle", "--model", model, "-o", tmp_path / "missing_dir" / "x.png"])
        (tmp_path / "taken.png").mkdir()
        assert "is a directory" in cli_error(capsys, ["txt2img", "a red circle", "--model", model,
                                                      "-o", tmp_path / "taken.png"])
        assert "one of .png" in cli_error(capsys, ["txt2img", "a red circle", "--model", model,
                                                   "-o", tmp_path / "x.jpg"])
        assert "5000 characters; at most 4096" in cli_error(capsys, ["txt2img", "a" * 5000, "--model", model,
                                                                     "-o", tmp_path / "x.png"])

    def failing(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    # the grid's write fails: no file, no leftovers (the generation itself is not what is tested here)
    monkeypatch.setattr(TextToImagePipeline, "generate", lambda self, prompts, images_per_prompt, **kw: [RED] * 4)
    monkeypatch.setattr(PIL.Image.Image, "save", failing)
    before = set(tmp_path.iterdir())
    assert "No space left" in cli_error(capsys, ["txt2img", "a red circle", "--model", model, "-o", tmp_path / "g.png",
                                                 "--grid", "2"])
    assert set(tmp_path.iterdir()) == before


def test_gesture_and_demo_outputs_are_checked_first(tmp_path, capsys, no_model_load, monkeypatch):
    import mmgen_engine.demo as demo
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran for an unwritable --out"))
    wav = tmp_path / "speech.wav"  # never read: the output is checked first
    assert "does not exist" in cli_error(capsys, ["gesture", wav, "--model", mm.demo_model("speech-to-gesture"),
                                                  "-o", tmp_path / "missing" / "x.npz"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not a directory" in cli_error(capsys, ["demo", "--out", blocker])
    assert "is not a directory" in cli_error(capsys, ["demo", "--out", blocker / "sub" / "dir"])


def test_caption_cli_checks_options_and_files_first(tmp_path, capsys, no_model_load):
    image = tmp_path / "img.png"
    RED.save(image)
    model = mm.demo_model("captioning")
    assert "max_new_tokens must be an integer in [1, 4096], got 5000" in cli_error(
        capsys, ["caption", image, "--model", model, "--max-new-tokens", "5000"])
    assert "prompt has 5000 characters" in cli_error(capsys, ["caption", image, "--model", model,
                                                              "--prompt", "a" * 5000])
    assert "image file not found" in cli_error(capsys, ["caption", image, tmp_path / "gone.png", "--model", model])
    assert "not a regular file" in cli_error(capsys, ["caption", image, "/dev/zero", "--model", model])


def test_caption_cli_takes_more_images_than_one_call(tmp_path, capsys, monkeypatch, captioner):
    paths = []
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple"]):
        paths.append(tmp_path / f"{i}.png")
        PIL.Image.new("RGB", (64, 64), color).save(paths[-1])
    monkeypatch.setattr(limits, "MAX_IMAGES_PER_CALL", 2)  # the CLI splits into calls of 2, 2, 1
    assert main(["caption", *map(str, paths), "--model", str(mm.demo_model("captioning")),
                 "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}: {c}" for p, c in zip(paths, captioner.caption(paths, max_new_tokens=4))]


# --- the Python API ------------------------------------------------------------------------------

def test_decode_tokens_grid_and_batch_limits(txt2img):
    huge = torch.zeros(1, 1, 1, dtype=torch.long).expand(1, 4096, 4096)  # no memory: a broadcast view
    with pytest.raises(InputError, match="4096x4096; at most 128 tokens a side"):
        txt2img.decode_tokens(huge)
    with pytest.raises(InputError, match="4096x4096"):
        txt2img.decode_tokens(huge.reshape(1, -1))
    with pytest.raises(InputError, match="257 images in one call; at most 256"):
        txt2img.decode_tokens(torch.zeros(1, 1, 1, dtype=torch.long).expand(257, 16, 16))
    with pytest.raises(InputError, match="1048576 image tokens in one call; at most 262144"):
        txt2img.decode_tokens(torch.zeros(1, 1, 1, dtype=torch.long).expand(64, 128, 128))
    with pytest.raises(InputError, match="integer array"):
        txt2img.decode_tokens(np.array([[1, "a"]], dtype=object))


def test_txt2img_request_limits_and_types(txt2img):
    for prompts, images_per_prompt, match in [
        (["a red circle"] * 257, 1, "257 prompts in one call; at most 256"),
        ("a red circle", 10 ** 9, r"images_per_prompt must be an integer in \[1, 256\], got 1000000000"),
        (["a red circle"] * 20, 20, r"400 images \(20 prompts x 20 images_per_prompt\) in one call; at most 256"),
        ("a red circle", True, "images_per_prompt"),
        ("a" * 5000, 1, "prompt has 5000 characters; at most 4096"),
        (["a red circle", "b" * 4097], 1, "prompt 1 has 4097 characters"),
        (123, 1, "prompts must be a string or a list of strings, got int"),
        (b"a red circle", 1, "got bytes"),
        ([b"a red circle"], 1, "prompt must be a string, got bytes"),
        ("a \ud800 circle", 1, "lone surrogate"),
    ]:
        with pytest.raises(InputError, match=match):
            txt2img.generate(prompts, images_per_prompt)
    with pytest.raises(InputError, match="sampling must be a SamplingParams or None, got dict"):
        txt2img.generate("a red circle", sampling={"top_k": 1})
    with pytest.raises(InputError, match="text_tokens rows"):
        txt2img.generate_tokens(txt2img.tokenize("a red circle").expand(300, -1))
    for every in (0, -1, True, 2.5):
        with pytest.raises(InputError, match=r"every must be an integer in \[1, 4096\]"):
            next(txt2img.generate_stream("a red circle", every=every))


def test_caption_limits_and_types(captioner):
    size = captioner.config.encoder.image_size
    pixels = torch.zeros(1, 3, size, size)
    with pytest.raises(InputError, match="257 images in one call; at most 256"):
        captioner.caption(["never_read.png"] * 257)  # counted before any file is opened
    for kwargs, match in [
        (dict(sampling={}), "sampling must be a SamplingParams or None, got dict"),
        (dict(sampling={"do_sample": True}), "got dict"),
        (dict(max_new_tokens=True), r"max_new_tokens must be an integer in \[1, 4096\], got True"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(max_new_tokens=limits.MAX_NEW_TOKENS + 1), "4096"),
        (dict(prompt=b"a red"), "prompt must be a string, got bytes"),
        (dict(prompt="a" * 5000), "5000 characters"),
        (dict(prompt="\udcff"), "lone surrogate"),
    ]:
        with pytest.raises(InputError, match=match):
            captioner.caption([RED], **kwargs)
    for prompt_ids, match in [([1.5], "integer token ids, got float32"), ([True], "got bool"),
                              ([[1], [2, 3]], "integer token ids"), (["a"], "integer token ids"),
                              ([2 ** 70], "integer token ids"), (list(range(2000)), "2000 tokens; at most 1024"),
                              ([-1], "vocabulary")]:
        with pytest.raises(InputError, match=match):
            captioner.generate_ids(pixels, 2, prompt_ids=prompt_ids)
    with pytest.raises(InputError, match="float tensor"):
        captioner.generate_ids(pixels.long(), 2)
    with pytest.raises(InputError, match=r"prompt has \d+ tokens; at most 1024"):
        captioner.tokenize_prompt("a " * 1500)
    # numpy integers are integers
    assert captioner.generate_ids(pixels, np.int64(2), prompt_ids=np.array([3])).shape == (1, 2)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e300), dict(temperature=1e-46), dict(temperature=1e-40), dict(temperature=10 ** 400),
    dict(top_p=1e-46), dict(top_p=Fraction(1, 10 ** 400)), dict(guidance_scale=1e300), dict(guidance_scale=1e-300),
    dict(top_k=2 ** 64), dict(top_k=True), dict(seed=2 ** 63), dict(do_sample=1), dict(temperature="1"),
    dict(temperature=complex(1, 0)), dict(top_p=np.float32("nan")),
])
def test_sampling_params_out_of_float32_or_of_the_wrong_type(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_sampling_params_accept_numpy_numbers_and_store_python_ones():
    p = SamplingParams(do_sample=np.bool_(True), temperature=np.float32(0.5), top_k=np.int64(3), top_p=Fraction(1, 2),
                       guidance_scale=0, seed=np.uint64(7))
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.guidance_scale, p.seed) == (True, 0.5, 3, 0.5, 0.0, 7)
    assert all(type(v) in (bool, int, float) for v in (p.do_sample, p.temperature, p.top_k, p.top_p, p.seed))
    tiny, huge = limits.FLOAT32_TINY, limits.FLOAT32_MAX
    edge = SamplingParams(do_sample=True, temperature=tiny, top_p=tiny, guidance_scale=huge)
    sampler = Sampler(edge, 2, torch.device("cpu"), guidance=True)
    assert torch.isfinite(sampler.temperature).all() and bool((sampler.top_p > 0).all())
    assert torch.isfinite(sampler.guidance).all()
    with pytest.raises(InputError, match="got dict"):
        sampler.load({"temperature": 1.0})
    assert math.isfinite(SamplingParams(temperature=limits.FLOAT32_MAX).temperature)


def test_image_tokens_are_decoded_in_chunks_of_bounded_pixels(txt2img, monkeypatch):
    """A batch is decoded DECODE_PIXELS at a time (the decoder's full-resolution activations would
    otherwise grow with the batch); the chunks give the images the whole batch gives."""
    from mmgen_engine.pipelines import detokenizer

    grid = txt2img.config.generation.grid_size
    tokens = torch.randint(0, txt2img.config.generation.image_vocab_size, (5, grid, grid),
                           generator=torch.Generator().manual_seed(0))
    calls = []
    model = txt2img.model.detokenizer
    monkeypatch.setattr(model, "forward", lambda t, f=model.forward: calls.append(len(t)) or f(t))
    whole = txt2img.decode_tokens(tokens)
    pixels = (grid * model.cfg.downsample_factor) ** 2
    monkeypatch.setattr(detokenizer, "DECODE_PIXELS", 2 * pixels)
    chunked = txt2img.decode_tokens(tokens)
    assert calls == [5, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)  # float32 convolutions pick algorithms by batch
