"""Property-based fuzzing of what users pass in: image files, arrays and PIL images, prompts and
prompt ids, image tokens and SamplingParams, of random types and values. The only exceptions
allowed are MMGenError subclasses; whatever is accepted must work (an RGB image, a caption, a
sampled token). Inputs stay small and generation short (the bundled demo models, 1-2 new tokens;
text-to-image only through its tokenizer and request checks)."""
from __future__ import annotations

import io
import tempfile
from decimal import Decimal
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmgen_engine import MMGenError, SamplingParams
from mmgen_engine.pipelines.captioning import load_image
from mmgen_engine.pipelines.detokenizer import check_image_tokens
from mmgen_engine.runtime import Sampler

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16L", "I;16B", "I;16N"]
RED = PIL.Image.new("RGB", (64, 64), "red")


def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


def corrupted(data: bytes, length: int, edits: dict[int, int]) -> bytes:
    """``data`` cut to ``length`` bytes, with the byte at each position of ``edits`` replaced."""
    out = bytearray(data[:length])
    for position, value in edits.items():
        if position < len(out):
            out[position] = value
    return bytes(out)


VALID_FILES = [encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
# anything a caller might pass where a number, string or list is expected
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.fractions(), st.decimals(allow_nan=True),
    st.complex_numbers(), st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.floats(width=32).map(np.float32), st.integers(-2 ** 63, 2 ** 63 - 1).map(np.int64), st.just(object()))
# text with control characters, emoji, combining marks and lone surrogates
TEXT = st.text(st.characters(categories=("Lu", "Ll", "Nd", "Zs", "Cc", "So", "Mn", "Cs")), max_size=30)


def check_rgb(load, *args):
    """``load(*args)`` is an RGB PIL image, or raised an MMGenError (anything else fails the test)."""
    try:
        im = load(*args)
    except MMGenError:
        return None
    assert isinstance(im, PIL.Image.Image) and im.mode == "RGB" and im.width > 0 and im.height > 0
    return im


@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00",
                               b"RIFF\x00\x00\x00\x00WEBPVP8 "]), st.binary(max_size=200)).map(b"".join),
    st.builds(corrupted, st.sampled_from(VALID_FILES), st.integers(0, 2000),
              st.dictionaries(st.integers(0, 2000), st.integers(0, 255), max_size=4)),
))
def test_image_files_of_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(data)
        check_rgb(load_image, path)
        check_rgb(load_image, str(path))


@given(hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int8, np.int64, np.float32, np.float64, np.bool_,
                                   np.complex64]),
                  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_arrays_of_random_dtypes_and_shapes(array):
    im = check_rgb(load_image, array)
    ok = array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and 0 not in array.shape
    assert (im is not None) == ok
    if ok:
        assert np.array_equal(np.asarray(im), array)


@given(st.data(), st.sampled_from(MODES), st.integers(0, 6), st.integers(0, 6))
def test_pil_images_of_random_modes_and_sizes(data, mode, width, height):
    if width and height:
        size = len(PIL.Image.new(mode, (width, height)).tobytes())
        image = PIL.Image.frombytes(mode, (width, height), data.draw(st.binary(min_size=size, max_size=size)))
    else:
        image = PIL.Image.new(mode, (width, height))
    im = check_rgb(load_image, image)
    assert (im is None) == (not width or not height or mode == "La")
    if im is not None:
        assert im.size == (width, height)


@given(prompt=st.one_of(st.none(), TEXT, ODD_VALUES), max_new_tokens=st.one_of(st.integers(1, 2), ODD_VALUES),
       sampling=st.one_of(st.none(), st.just(SamplingParams(do_sample=True, seed=1)), ODD_VALUES))
def test_captioning_prompts_and_options(captioner, prompt, max_new_tokens, sampling):
    try:
        captions = captioner.caption([RED], max_new_tokens=max_new_tokens, sampling=sampling, prompt=prompt)
    except MMGenError:
        return
    assert len(captions) == 1 and isinstance(captions[0], str)


@given(prompt_ids=st.one_of(st.lists(st.integers(-5, 300), max_size=4), st.lists(ODD_VALUES, max_size=3),
                            st.lists(st.lists(st.integers(0, 50), max_size=3), max_size=3), ODD_VALUES),
       max_new_tokens=st.integers(1, 2))
def test_captioning_prompt_ids(captioner, prompt_ids, max_new_tokens):
    size = captioner.config.encoder.image_size
    try:
        ids = captioner.generate_ids(torch.zeros(1, 3, size, size), max_new_tokens, prompt_ids=prompt_ids)
    except MMGenError:
        return
    assert ids.shape == (1, max_new_tokens) and ids.dtype == torch.int64


@given(prompts=st.one_of(TEXT, st.lists(st.one_of(TEXT, ODD_VALUES), max_size=3), ODD_VALUES),
       images_per_prompt=st.one_of(st.integers(-2, 300), ODD_VALUES),
       sampling=st.one_of(st.none(), st.just(SamplingParams(top_k=1)), ODD_VALUES))
def test_text_to_image_prompts_and_request_checks(txt2img, prompts, images_per_prompt, sampling):
    """The tokenizer and the request checks of ``generate`` (what runs before generation)."""
    try:
        rows, params = txt2img._request(prompts, images_per_prompt, sampling)
    except MMGenError:
        return
    assert isinstance(params, SamplingParams) and params.guidance_scale is not None
    assert rows.dtype == torch.int64 and rows.shape[1] == 64 and 1 <= rows.shape[0] <= 256
    txt2img._check_text(rows)  # rows a generation takes


@given(hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint8, np.uint64, np.float32, np.bool_]),
                  hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_image_tokens_of_random_dtypes_shapes_and_values(tokens):
    try:
        checked = check_image_tokens(tokens, 16)
    except MMGenError:
        return
    assert checked.dtype == torch.int64 and checked.dim() == 3 and checked.numel() == tokens.size
    assert 0 <= int(checked.min()) and int(checked.max()) < 16


@given(st.fixed_dictionaries({}, optional={
    "do_sample": st.one_of(st.booleans(), ODD_VALUES), "temperature": ODD_VALUES, "top_k": ODD_VALUES,
    "top_p": st.one_of(st.floats(0, 1), ODD_VALUES), "guidance_scale": ODD_VALUES, "seed": ODD_VALUES}))
def test_sampling_params_of_random_types_and_values(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except MMGenError:
        return
    for value in (params.temperature, params.top_p, params.guidance_scale or 0.0):
        assert type(value) is float and np.isfinite(np.float32(value))
    assert type(params.top_k) is int and type(params.do_sample) is bool
    assert not isinstance(kwargs.get("temperature"), (str, bytes, Decimal, complex))
    guided = params.guidance_scale is not None
    sampler = Sampler(params, 2, torch.device("cpu"), guidance=guided)
    logits = torch.randn(4 if guided else 2, 8, generator=torch.Generator().manual_seed(0))
    tokens = sampler(logits, torch.zeros(1, dtype=torch.int64))
    assert tokens.shape == (2,) and bool(((tokens >= 0) & (tokens < 8)).all())
