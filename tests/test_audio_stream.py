"""Streaming the speech-to-gesture audio: windows cut from decoded blocks equal the whole array's,
the streamed file path gives the whole-array path's poses, the progress callback, and a peak memory
that does not grow with the audio's length."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

import mmgen_engine as mm
import mmgen_engine.pipelines.audio as audio
from mmgen_engine.errors import InputError
from mmgen_engine.pipelines.gesture_windows import WindowPlan

PLAN = WindowPlan(16000, 15, 160, 512, 64, 16)  # the demo model's windows
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_audio_memory.py"


def speech_like(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """Noise bursts at a syllable rate, a new loudness every half second: ``[n, channels]`` float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    gain = np.repeat(rng.uniform(0.02, 0.5, n // (rate // 2) + 1), rate // 2)[:n]
    envelope = np.maximum(0, np.sin(2 * np.pi * 4 * np.arange(n) / rate)) ** 2
    return (rng.standard_normal((n, channels)) * (gain * envelope)[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("samples", [1, 100, PLAN.window_samples - 1, PLAN.window_samples, PLAN.window_samples + 1,
                                     3 * PLAN.stride_samples + PLAN.window_samples, 16000 * 20 + 7])
def test_stream_windows_equal_the_whole_arrays(samples):
    x = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    want = [PLAN.window_audio(x, w) for w in range(PLAN.windows(samples))]
    rng = np.random.default_rng(0)
    for cuts in ([], np.arange(1000, samples, 1000), np.sort(rng.integers(0, samples, 30))):
        got = list(PLAN.stream_windows(np.split(x, cuts), samples))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_stream_windows_read_only_what_the_window_needs():
    """When window ``w`` is yielded, the blocks read reach at most one block past its end."""
    samples, block = 16000 * 30, 5000
    read = []

    def blocks():
        for start in range(0, samples, block):
            read.append(start + block)
            yield np.zeros(min(block, samples - start), np.float32)

    for w, _ in enumerate(PLAN.stream_windows(blocks(), samples)):
        end = w * PLAN.stride_samples + PLAN.window_samples
        assert read[-1] < end + block


# ----------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe():
    return mm.load(mm.demo_model("speech-to-gesture"))


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory):
    """10 s (3 windows) of 48 kHz stereo speech-like audio, 16-bit PCM."""
    path = tmp_path_factory.mktemp("stream") / "speech.wav"
    soundfile.write(path, speech_like(10.0, 48000, 2, seed=1), 48000, subtype="PCM_16")
    return path


def test_streamed_file_gives_the_whole_array_poses(pipe, stereo_wav, monkeypatch):
    """The file decoded and resampled in many small blocks, and the whole file read at once, mixed
    and resampled by librosa then fed as one array (one block), give the same windows, tokens and
    poses for a seed."""
    sampling = mm.SamplingParams(do_sample=True, top_k=8, seed=3)
    samples, rate = soundfile.read(stereo_wav, dtype="float32")
    whole = librosa.resample(samples.mean(axis=1, dtype=np.float32), orig_sr=rate, target_sr=16000)
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 1 << 40)
    from_array = pipe.generate(whole, 16000, sampling=sampling)
    tokens = pipe.generate_tokens(whole, 16000, sampling)
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 4097)
    streamed = pipe.generate(stereo_wav, sampling=sampling)
    assert streamed.shape == (150, 52, 2) and len(tokens) == 3
    np.testing.assert_array_equal(streamed, from_array)
    np.testing.assert_array_equal(np.concatenate(list(pipe.generate_stream(stereo_wav, sampling=sampling))), streamed)
    assert pipe.generate_tokens(stereo_wav, sampling=sampling) == tokens


def test_progress_is_called_after_each_window(pipe, stereo_wav):
    calls = []
    poses = pipe.generate(stereo_wav, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(poses, pipe.generate(stereo_wav))  # the callback changes nothing
    calls.clear()
    pipe.generate(np.zeros(16000 * 30, np.float32), 16000, progress=lambda *args: calls.append(args))
    assert calls == [(w, 10) for w in range(1, 11)] and pipe.plan.windows(16000 * 30) == 10


def test_errors_found_while_streaming_are_input_errors(pipe, tmp_path, monkeypatch):
    """A NaN deep in a float file surfaces as InputError once decoding reaches it; an array too
    large for float32 once it is mixed."""
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 8192)
    x = speech_like(10.0, 16000, 1, seed=2)
    x[150000] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match="non-finite samples"):
        pipe.generate(path)
    with pytest.raises(InputError, match="samples too large or not finite"):
        pipe.generate(np.full((16000, 2), 1e300), 16000)


# ------------------------------------------------------------------------------------- memory
def front_end_peak(tmp_path, minutes: float) -> dict:
    """The front end's row of bench_audio_memory.py over ``minutes`` of 48 kHz stereo (a WAV written
    block by block in ``tmp_path``; decode, mix, resample, windows and log-mel in a fresh process)."""
    out = tmp_path / f"{minutes:g}.json"
    subprocess.run([sys.executable, str(BENCH), "--minutes", str(minutes), "--stages", "front-end",
                    "--dir", str(tmp_path), "--threads", "1", "--json", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())["rows"][0]


def test_front_end_memory_does_not_grow_with_the_audio(tmp_path):
    """2 and 20 minutes of 48 kHz stereo: the audio front end's peak RSS above its setup differs by
    less than 10 MB (measured 22.3 and 23.9 MB, and 24.7 MB for 90 minutes; the former whole-file
    path held the whole decoded and resampled audio: 18 more minutes is 300 MB more)."""
    short, long = front_end_peak(tmp_path, 2), front_end_peak(tmp_path, 20)
    assert long["windows"] > 9 * short["windows"]
    assert long["audio_mb"] - short["audio_mb"] < 10, (short, long)
