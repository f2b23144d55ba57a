"""Fuzzing the audio input path with hypothesis: random bytes, valid WAV and FLAC files with mutated
headers or cut short, and random arrays and sample rates given to ``load_audio`` either decode to
finite 16 kHz audio or raise an MMGenError; no other exception, no hang (the inputs are small)."""
from __future__ import annotations

import io

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import soundfile
from hypothesis import given
from hypothesis import strategies as st

from mmgen_engine.errors import MMGenError
from mmgen_engine.pipelines.audio import load_audio


def encoded(fmt: str, subtype: str, rate: int = 22050, frames: int = 600, channels: int = 2) -> bytes:
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


VALID = {"wav16": encoded("WAV", "PCM_16"), "wav_float": encoded("WAV", "FLOAT", channels=1),
         "wav_ulaw": encoded("WAV", "ULAW", rate=8000), "wavex24": encoded("WAVEX", "PCM_24"),
         "flac": encoded("FLAC", "PCM_16")}
HEADER_BYTES = 96  # a WAV's fmt and data chunk headers, FLAC's STREAMINFO and first frame header
SIZES = [0, 1, 2, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]  # edge values for length fields


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input"


def decode(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` and loads it: finite float32 audio, or an MMGenError."""
    path.write_bytes(data)
    try:
        out = load_audio(path)
    except MMGenError:
        return
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) > 0 and np.isfinite(out).all()


@given(data=st.binary(max_size=4096))
def test_random_bytes(scratch, data):
    decode(scratch, data)


@given(data=st.sampled_from(sorted(VALID)).map(VALID.get).map(lambda b: b"RIFF" + b[4:12]) | st.just(b"fLaC"),
       tail=st.binary(max_size=512))
def test_random_bytes_after_a_real_magic(scratch, data, tail):
    decode(scratch, data + tail)


@st.composite
def mutated(draw):
    """A valid file with bytes of its header overwritten (single bytes or 16/32-bit edge values),
    then maybe cut short."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, HEADER_BYTES - 1))
        width = draw(st.sampled_from([1, 2, 4]))
        value = draw(st.sampled_from(SIZES) | st.integers(0, 2 ** (8 * width) - 1)) % 2 ** (8 * width)
        data[at:at + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
    cut = draw(st.none() | st.integers(0, len(data)))
    return bytes(data[:cut])


@given(data=mutated())
def test_mutated_headers(scratch, data):
    decode(scratch, data)


@given(name=st.sampled_from(sorted(VALID)), cut=st.integers(0, 4096))
def test_cut_files(scratch, name, cut):
    decode(scratch, VALID[name][:cut])


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int16, np.int32, np.uint8, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
    elements={"allow_nan": True, "allow_infinity": True},
)
RATES = (st.none() | st.integers(-10, 10**7) | st.sampled_from([8000, 16000, 22050, 44100, 48000, 384000])
         | st.floats(allow_nan=True) | st.booleans() | st.just("16000") | st.just(np.int64(44100)))


@given(audio=ARRAYS, rate=RATES)
def test_random_arrays_and_rates(audio, rate):
    try:
        out = load_audio(audio, sample_rate=rate)
    except MMGenError:
        return
    assert out.dtype == np.float32 and out.shape == (-(-audio.shape[0] * 16000 // int(rate)),)
    assert np.isfinite(out).all()
