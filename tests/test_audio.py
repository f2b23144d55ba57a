"""Audio front end: decoding with libsndfile (WAVs of our own writer, scipy's and the wave module's;
FLAC, Ogg, MP3), bad files and paths, resampling against librosa.resample (libsoxr), log_mel_400
against librosa, and load_audio."""
from __future__ import annotations

import io
import os
import struct
import tracemalloc
import warnings
import wave

import librosa
import numpy as np
import pytest
import scipy.io.wavfile
import soundfile
import torch

from mmgen_engine.errors import InputError
from mmgen_engine.pipelines.audio import (
    AudioStream,
    load_audio,
    log_mel_400,
    mel_filterbank,
    read_wav,
    resample,
    to_mono,
)

GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


# ----------------------------------------------------------------------------------- WAV writer
def chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
    """One RIFF chunk; ``size`` overrides the declared size. Odd bodies get RIFF's pad byte."""
    return cid + struct.pack("<I", len(body) if size is None else size) + body + b"\0" * (len(body) & 1)


def fmt(tag: int, channels: int, rate: int, bits: int, block_align: int | None = None) -> bytes:
    block_align = channels * (bits // 8) if block_align is None else block_align
    return chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * block_align, block_align, bits))


def ext_fmt(sub_tag: int, channels: int, rate: int, bits: int, valid_bits: int, guid_tail=GUID_TAIL) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE fmt chunk (40 bytes) with sub-format ``sub_tag``."""
    block_align = channels * bits // 8
    body = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block_align, block_align, bits)
    body += struct.pack("<HHI", 22, valid_bits, 0) + struct.pack("<H", sub_tag) + guid_tail
    return chunk(b"fmt ", body)


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write(tmp_path, data: bytes, name: str = "a.wav"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def int_bytes(ints: np.ndarray, width: int) -> bytes:
    """Signed ints as little-endian ``width``-byte samples (uint8 with an offset of 128 for width 1)."""
    if width == 1:
        return (ints + 128).astype(np.uint8).tobytes()
    return ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width].tobytes()


def random_ints(rng, bits: int, shape) -> np.ndarray:
    """Signed ints of ``bits`` bits including both extremes."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    ints = rng.integers(lo, hi, shape, endpoint=True, dtype=np.int64)
    ints.flat[:2] = lo, hi
    return ints


def scaled(ints: np.ndarray, bits: int) -> np.ndarray:
    return (ints.astype(np.float64) / 2.0 ** (bits - 1)).astype(np.float32)


# ------------------------------------------------------------------------------- reading WAVs
@pytest.mark.parametrize("bits", [8, 16, 24, 32])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_pcm(tmp_path, bits, channels):
    ints = random_ints(np.random.default_rng(bits + channels), bits, (101, channels))
    path = write(tmp_path, riff(fmt(1, channels, 22050, bits), chunk(b"data", int_bytes(ints, bits // 8))))
    samples, rate = read_wav(path)
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == (101, channels)
    np.testing.assert_array_equal(samples, scaled(ints, bits))


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_float(tmp_path, dtype):
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (64, 2)).astype(dtype)  # kept as is, not clipped
    path = write(tmp_path, riff(fmt(3, 2, 48000, x.itemsize * 8), chunk(b"fact", b"\x40\0\0\0"),
                                chunk(b"data", x.tobytes())))
    samples, rate = read_wav(path)
    assert rate == 48000
    np.testing.assert_array_equal(samples, x.astype(np.float32))


def test_extensible(tmp_path):
    rng = np.random.default_rng(1)
    ints16 = random_ints(rng, 16, (50, 2))
    path = write(tmp_path, riff(ext_fmt(1, 2, 16000, 16, 16), chunk(b"data", int_bytes(ints16, 2))))
    np.testing.assert_array_equal(read_wav(path)[0], scaled(ints16, 16))
    # 24 valid bits left-justified in 32-bit containers: the container width gives the scale
    ints24 = random_ints(rng, 24, (50, 1))
    path = write(tmp_path, riff(ext_fmt(1, 1, 16000, 32, 24), chunk(b"data", int_bytes(ints24 << 8, 4))))
    np.testing.assert_array_equal(read_wav(path)[0], scaled(ints24, 24))
    x = rng.uniform(-1, 1, (50, 6)).astype("<f4")
    path = write(tmp_path, riff(ext_fmt(3, 6, 96000, 32, 32), chunk(b"data", x.tobytes())))
    samples, rate = read_wav(path)
    assert rate == 96000
    np.testing.assert_array_equal(samples, x)


def test_g711_known_values(tmp_path):
    codes = bytes([0xD5, 0x55, 0xAA, 0x2A])  # A-law: +8, -8, +32256, -32256
    path = write(tmp_path, riff(fmt(6, 1, 8000, 8), chunk(b"data", codes)))
    np.testing.assert_array_equal(read_wav(path)[0][:, 0] * 32768, [8, -8, 32256, -32256])
    codes = bytes([0xFF, 0x00, 0x80, 0xF0])  # µ-law: 0, -32124, +32124, +120
    path = write(tmp_path, riff(ext_fmt(7, 1, 8000, 8, 8), chunk(b"data", codes)))
    np.testing.assert_array_equal(read_wav(path)[0][:, 0] * 32768, [0, -32124, 32124, 120])


def test_g711_matches_audioop(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    codes = bytes(range(256))
    for tag, decode in ((6, audioop.alaw2lin), (7, audioop.ulaw2lin)):
        path = write(tmp_path, riff(fmt(tag, 1, 8000, 8), chunk(b"data", codes)))
        want = np.frombuffer(decode(codes, 2), "<i2") / 32768
        np.testing.assert_array_equal(read_wav(path)[0][:, 0], want.astype(np.float32))


def test_skips_chunks_and_pad_bytes(tmp_path):
    ints = random_ints(np.random.default_rng(2), 8, (7, 1))  # 7 bytes: odd, padded
    data = riff(chunk(b"LIST", b"INFOISFT\x05\0\0\0abcd\0"), fmt(1, 1, 8000, 8), chunk(b"junk", b"xyz"),
                chunk(b"data", int_bytes(ints, 1)), chunk(b"LIST", b"trailing"))
    np.testing.assert_array_equal(read_wav(write(tmp_path, data))[0], scaled(ints, 8))


def test_streaming_data_size_reads_to_end(tmp_path):
    ints = random_ints(np.random.default_rng(3), 16, (40, 2))
    raw = int_bytes(ints, 2) + b"\x01\x02"  # a partial frame at the end is dropped
    path = write(tmp_path, riff(fmt(1, 2, 16000, 16), chunk(b"data", raw, size=0xFFFFFFFF)))
    np.testing.assert_array_equal(read_wav(path)[0], scaled(ints, 16))


def test_reads_in_pieces(tmp_path, monkeypatch):
    import mmgen_engine.pipelines.audio as audio
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 30)
    ints = random_ints(np.random.default_rng(4), 24, (101, 2))
    path = write(tmp_path, riff(fmt(1, 2, 16000, 24), chunk(b"data", int_bytes(ints, 3))))
    np.testing.assert_array_equal(read_wav(path)[0], scaled(ints, 24))
    mono, rate = read_wav(path, mono=True)  # mixed block by block: the same as mixing the whole
    assert rate == 16000 and mono.shape == (101,)
    np.testing.assert_array_equal(mono, to_mono(scaled(ints, 24)))


@pytest.mark.parametrize("dtype,bits", [(np.int16, 16), (np.int32, 32), (np.uint8, 8),
                                        (np.float32, None), (np.float64, None)])
@pytest.mark.parametrize("channels", [1, 2])
def test_scipy_written(tmp_path, dtype, bits, channels):
    rng = np.random.default_rng(channels)
    if bits is None:
        x = rng.uniform(-1, 1, (333, channels)).astype(dtype)
        want = x.astype(np.float32)
    elif bits == 8:
        x = rng.integers(0, 255, (333, channels), endpoint=True).astype(np.uint8)
        want = scaled(x.astype(np.int64) - 128, 8)
    else:
        x = random_ints(rng, bits, (333, channels)).astype(dtype)
        want = scaled(x, bits)
    path = tmp_path / "scipy.wav"
    scipy.io.wavfile.write(path, 44100, x if channels > 1 else x[:, 0])
    samples, rate = read_wav(path)
    assert rate == 44100
    np.testing.assert_array_equal(samples, want)


@pytest.mark.parametrize("width", [2, 3])
@pytest.mark.parametrize("channels", [1, 2])
def test_wave_module_written(tmp_path, width, channels):
    ints = random_ints(np.random.default_rng(width), 8 * width, (257, channels))
    path = tmp_path / "wave.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(11025)
        w.writeframes(int_bytes(ints, width))
    samples, rate = read_wav(path)
    assert rate == 11025
    np.testing.assert_array_equal(samples, scaled(ints, 8 * width))


# ----------------------------------------------------------------------- other formats
def encoded(x: np.ndarray, rate: int, fmt_name: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt_name, subtype=subtype)
    return buf.getvalue()


def test_flac_is_lossless(tmp_path):
    ints = random_ints(np.random.default_rng(9), 16, (3001, 2))
    path = write(tmp_path, encoded(ints.astype(np.int16), 22050, "FLAC", "PCM_16"), "a.flac")
    samples, rate = read_wav(path)
    assert rate == 22050
    np.testing.assert_array_equal(samples, scaled(ints, 16))


@pytest.mark.parametrize("fmt_name,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_lossy_formats(tmp_path, fmt_name, subtype):
    """Ogg Vorbis and MP3 (where the bundled libsndfile has them) decode to the length and level
    written (both codecs drop the encoder's delay); a 440 Hz tone comes back within 1 dB."""
    if fmt_name not in soundfile.available_formats():
        pytest.skip(f"this libsndfile has no {fmt_name}")
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    path = write(tmp_path, encoded(np.stack([x, x], 1), 44100, fmt_name, subtype), "a." + fmt_name.lower())
    samples, rate = read_wav(path, mono=True)
    assert rate == 44100 and samples.shape == x.shape
    assert abs(20 * np.log10(np.sqrt(np.mean(samples ** 2)) / np.sqrt(np.mean(x ** 2)))) < 1


# --------------------------------------------------------------------------------- bad files
PCM16 = fmt(1, 1, 16000, 16)
DATA = chunk(b"data", b"\0\1" * 10)
UNREADABLE = "not a readable audio file"  # followed by libsndfile's reason in parentheses
BAD_FILES = {
    "empty": (b"", "empty file"),
    "mp3": (b"ID3\x04\0\0\0\0\0\x21\xff\xfb\x90\x64" + bytes(200), UNREADABLE),
    "text": (b"hello, this is not audio\n", UNREADABLE),
    "short header": (b"RIFF\x24\0", UNREADABLE),
    "not wave": (b"RIFF\x24\0\0\0AVI " + PCM16 + DATA, UNREADABLE),
    "rf64": (b"RF64\xff\xff\xff\xffWAVE", UNREADABLE),
    "no fmt": (riff(chunk(b"LIST", b"abcd"), DATA), UNREADABLE),
    "no data": (riff(PCM16, chunk(b"LIST", b"abcd")), UNREADABLE),
    "data before fmt": (riff(DATA, fmt(1, 1, 8000, 8)), UNREADABLE),
    "short fmt": (riff(chunk(b"fmt ", bytes(10)), DATA), UNREADABLE),
    "fmt past end": (riff(chunk(b"fmt ", bytes(16), size=100)), UNREADABLE),
    "zero channels": (riff(fmt(1, 0, 16000, 16), DATA), "Channel count is zero"),
    "rate too low": (riff(fmt(1, 1, 100, 16), DATA), "absurd sample rate 100 Hz"),
    "rate too high": (riff(fmt(1, 1, 10_000_000, 16), DATA), "absurd sample rate 10000000 Hz"),
    "mp3 tag": (riff(fmt(0x55, 1, 16000, 16), DATA), UNREADABLE),
    "unknown tag": (riff(fmt(0x1234, 1, 16000, 16), DATA), UNREADABLE),
    "16-bit float": (riff(fmt(3, 1, 16000, 16), DATA), UNREADABLE),
    "ext guid": (riff(ext_fmt(1, 1, 16000, 16, 16, guid_tail=bytes(14)), DATA), UNREADABLE),
    "ext short": (riff(fmt(0xFFFE, 1, 16000, 16), DATA), UNREADABLE),
    "empty data": (riff(PCM16, chunk(b"data", b"")), "no audio samples"),
    "partial frame": (riff(PCM16, chunk(b"data", b"\1")), "no audio samples"),
    "zero data size": (riff(PCM16, chunk(b"data", b"\0\1" * 10, size=0)), "no audio samples"),
    "nan": (riff(fmt(3, 1, 16000, 32), chunk(b"data", np.array([0, np.nan], "<f4").tobytes())), "non-finite"),
    "inf": (riff(fmt(3, 2, 16000, 64), chunk(b"data", np.array([0, 0, 0, -np.inf], "<f8").tobytes())),
            "non-finite"),
    "flac header cut": (encoded(np.zeros(1000, np.int16), 16000, "FLAC")[:40], UNREADABLE),
    "flac data cut": (encoded(np.zeros(1000, np.int16), 16000, "FLAC")[:-10], "corrupt or truncated audio data"),
}


def assert_one_line(e, path, message):
    text = str(e.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(tmp_path, case):
    data, message = BAD_FILES[case]
    path = write(tmp_path, data)
    for read in (read_wav, load_audio):
        with pytest.raises(InputError) as e:
            read(path)
        assert_one_line(e, path, message)


# libsndfile reads these, which the former home-made parser refused: a data chunk declared longer
# than the file is read up to the file's end (as sox, ffmpeg and librosa do; a cut FLAC stream is an
# error, above), and fmt fields it does not need (bits of µ-law, block align, valid bits) are ignored.
LENIENT = {
    "truncated": (riff(PCM16, chunk(b"data", b"\0\1" * 10, size=1000)), 10, 1),
    "12-bit pcm in 16": (riff(fmt(1, 1, 16000, 12, block_align=2), DATA), 10, 1),
    "16-bit mulaw": (riff(fmt(7, 1, 16000, 16), DATA), 20, 1),
    "block align": (riff(fmt(1, 2, 16000, 16, block_align=2), DATA), 5, 2),
    "ext valid bits": (riff(ext_fmt(1, 1, 16000, 16, 24), DATA), 10, 1),
}


@pytest.mark.parametrize("case", list(LENIENT))
def test_libsndfile_leniency(tmp_path, case):
    data, frames, channels = LENIENT[case]
    samples, rate = read_wav(write(tmp_path, data))
    assert rate == 16000 and samples.shape == (frames, channels) and np.isfinite(samples).all()


def test_nan_found_while_streaming(tmp_path, monkeypatch):
    import mmgen_engine.pipelines.audio as audio
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", 64)
    x = np.zeros(1000, "<f4")
    x[700] = np.nan
    path = write(tmp_path, riff(fmt(3, 1, 16000, 32), chunk(b"data", x.tobytes())))
    with pytest.raises(InputError) as e:
        load_audio(path)
    assert_one_line(e, path, "non-finite samples (NaN or inf) after 640 frames")


def test_too_long_audio_is_refused_before_decoding(tmp_path):
    """More than MAX_SECONDS (a day): a FLAC header declaring 2**36 - 1 frames, and an array (a
    broadcast view: no memory behind it)."""
    data = bytearray(encoded(np.zeros(1000, np.int16), 16000, "FLAC"))
    data[21] |= 0x0F  # STREAMINFO's 36-bit total sample count, all ones
    data[22:26] = b"\xff" * 4
    path = write(tmp_path, bytes(data), "long.flac")
    with pytest.raises(InputError) as e:
        load_audio(path)
    assert_one_line(e, path, "1.19e+03 hours of audio; at most 24 hours are accepted")
    long = np.broadcast_to(np.zeros(1, np.float32), (24 * 3600 * 8000 + 1,))
    with pytest.raises(InputError, match="audio array: 691200001 samples at 8000 Hz are 24 hours"):
        load_audio(long, sample_rate=8000)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="audio file not found"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="is a directory"):
        load_audio(str(tmp_path))
    with pytest.raises(InputError, match="not a usable path"):
        load_audio("a\0.wav")


@pytest.mark.parametrize("kind", ["fifo", "device", "link to a device"])
def test_paths_that_are_not_files_are_refused_unread(tmp_path, kind):
    """A FIFO (no writer: opening it would wait forever) or a device such as /dev/zero (reading it
    would never end) is refused from its stat before libsndfile reads anything."""
    path = tmp_path / "audio.wav"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    else:
        path.symlink_to("/dev/zero")
    for read in (read_wav, load_audio):
        with pytest.raises(InputError) as e:
            read(path)
        assert_one_line(e, path, "not a regular file (a FIFO, socket or device)")


def test_to_mono():
    x = np.array([[1, 0.5], [-1, 0.25], [0.2, 0.2]], np.float32)
    np.testing.assert_allclose(to_mono(x), [0.75, -0.375, 0.2], rtol=1e-7)
    assert to_mono(x).dtype == np.float32 and to_mono(x[:, :1]).shape == (3,)


# --------------------------------------------------------------------------------- resampling
def speech_like(n: int, sr: int, seed: int) -> np.ndarray:
    """Harmonics of a gliding 120 Hz voice, amplitude modulated, plus noise, a silent stretch and a
    clipped loud stretch; float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / sr
    y = sum(np.sin(k * phase) / k for k in range(1, 30)) * 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    y = 0.3 * y + 0.003 * rng.standard_normal(n)
    y[n // 5:n // 3] = 0
    y[n // 2:n // 2 + n // 8] *= 8
    return np.clip(y, -1, 1).astype(np.float32)


@pytest.mark.parametrize("orig", [44100, 48000, 22050, 8000, 11025, 96000, 16000])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_resample_matches_librosa(orig, n):
    """Exactly librosa.resample (its default soxr_hq: the same libsoxr, then fix_length)."""
    x = speech_like(n, orig, n) if n > 100 else np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    want = librosa.resample(x, orig_sr=orig, target_sr=16000)
    got = resample(x, orig, 16000)
    assert got.dtype == np.float32 and got.shape == want.shape == (-(-n * 16000 // orig),)
    np.testing.assert_array_equal(got, want)


def test_resample_upsampling_and_odd_ratio():
    x = speech_like(5000, 16000, 0)
    for up, down in ((44100, 16000), (16001, 16000)):  # 16000 -> 44100, and a 16001/16000 ratio
        np.testing.assert_array_equal(resample(x, down, up), librosa.resample(x, orig_sr=down, target_sr=up))


@pytest.mark.parametrize("orig", [44100, 48000, 22050])
def test_resample_frequency_response(orig):
    """Flat to 7 kHz (log_mel_400 reaches 7.5 kHz), and nothing at or above 8 kHz folds back:
    tones there come out 100 dB down (at float32's noise floor, about -140 dB, in fact)."""
    def gain_db(f0):
        x = np.sin(2 * np.pi * f0 * np.arange(orig) / orig).astype(np.float32)
        y = resample(x, orig, 16000)[2000:-2000]  # away from the edges
        return 20 * np.log10(np.sqrt(2 * np.mean(y.astype(np.float64) ** 2)) + 1e-12)
    for f0 in (100, 1000, 3000, 5000, 7000):
        assert abs(gain_db(f0)) < 0.05, f0
    for f0 in (8000, 8500, 9000, 10000):
        assert gain_db(f0) < -100, f0


@pytest.mark.parametrize("orig", [48000, 44100, 8000])
def test_resample_streamed_in_any_blocks_equals_whole(orig):
    """One soxr stream over blocks of any sizes gives the whole array's result, bit for bit."""
    x = speech_like(30011, orig, 3)
    whole = resample(x, orig, 16000)
    rng = np.random.default_rng(orig)
    for _ in range(3):
        cuts = np.sort(rng.integers(0, len(x), rng.integers(1, 40)))
        blocks = iter(np.split(x, cuts))
        streamed = np.concatenate(list(AudioStream("x", orig, len(x), blocks).resampled(16000)))
        np.testing.assert_array_equal(streamed, whole)


def test_resample_identity_is_a_copy():
    x = speech_like(1000, 16000, 1)
    y = resample(x, 16000, 16000)
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(x, y)


def test_resample_memory_is_bounded():
    x = speech_like(1_000_000, 44100, 2)
    tracemalloc.start()
    try:
        y = resample(x, 44100, 16000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # upsampling by 160 first would need 1.28 GB; the output itself is 1.45 MB
    assert peak < y.nbytes + 16 * 2**20


def test_resample_bad_input():
    with pytest.raises(InputError, match="1-D"):
        resample(np.zeros((10, 2), np.float32), 16000, 8000)
    with pytest.raises(InputError, match="positive integers"):
        resample(np.zeros(10, np.float32), 0, 8000)


# ------------------------------------------------------------------------------------ log-mel
def librosa_log_mel_400(y: np.ndarray) -> np.ndarray:
    spec = np.abs(librosa.stft(y, n_fft=512, hop_length=160, win_length=400, center=False))
    mel = librosa.feature.melspectrogram(S=spec, sr=16000, n_fft=512, hop_length=160, power=1, n_mels=64,
                                         fmin=125.0, fmax=7500.0, norm=None)
    return np.log(np.maximum(mel, 1e-6)).T


def test_mel_filterbank_matches_librosa():
    want = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=125, fmax=7500, norm=None, htk=False)
    got = mel_filterbank(16000, 512, 64, 125.0, 7500.0)
    assert got.shape == (64, 257) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [512, 513, 672, 16000, 16000 * 3 + 77])
def test_log_mel_matches_librosa(n):
    y = speech_like(n, 16000, n)
    got = log_mel_400(y)
    assert got.dtype == torch.float32 and got.shape == (1 + (n - 512) // 160, 64)
    np.testing.assert_allclose(got.numpy(), librosa_log_mel_400(y), rtol=0, atol=1e-4)


def test_log_mel_pure_tone_and_silence():
    """A wide dynamic range (weak bins far below a tone): a float32 FFT would be off by 0.15 here."""
    y = np.zeros(32000, np.float32)
    y[8000:24000] = 0.9 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    np.testing.assert_allclose(log_mel_400(y).numpy(), librosa_log_mel_400(y), rtol=0, atol=1e-4)


def test_log_mel_long_input_in_blocks(monkeypatch):
    import mmgen_engine.pipelines.audio as audio
    y = speech_like(16000, 16000, 5)
    whole = log_mel_400(torch.from_numpy(y))
    monkeypatch.setattr(audio, "_LOG_MEL_BLOCK", 7)
    torch.testing.assert_close(log_mel_400(y), whole, rtol=0, atol=1e-6)  # BLAS sums differ by size


def test_log_mel_bad_input():
    with pytest.raises(InputError, match=r"audio too short: 511 samples.*at least 512 samples \(32 ms\) at 16 kHz"):
        log_mel_400(np.zeros(511, np.float32))
    with pytest.raises(InputError, match="1-D float audio"):
        log_mel_400(np.zeros((600, 2), np.float32))


# --------------------------------------------------------------------------------- load_audio
def test_load_audio_file_equals_array(tmp_path):
    x = speech_like(30000, 44100, 6)
    stereo = np.stack([x, 0.5 * x[::-1]], axis=1)
    path = write(tmp_path, riff(fmt(3, 2, 44100, 32), chunk(b"data", stereo.astype("<f4").tobytes())))
    from_file = load_audio(path)
    from_array = load_audio(stereo, sample_rate=44100)
    assert from_file.dtype == np.float32 and from_file.shape == (-(-30000 * 160 // 441),)
    np.testing.assert_array_equal(from_file, from_array)
    np.testing.assert_array_equal(load_audio(str(path), sample_rate=44100), from_file)
    # an int16 file equals the array of its values / 32768
    ints = random_ints(np.random.default_rng(7), 16, (8000, 1))
    path = write(tmp_path, riff(fmt(1, 1, 8000, 16), chunk(b"data", int_bytes(ints, 2))), "b.wav")
    np.testing.assert_array_equal(load_audio(path), load_audio(ints[:, 0] / 32768, sample_rate=8000))


def test_load_audio_returns_new_array():
    x = speech_like(1000, 16000, 8)
    y = load_audio(x, sample_rate=16000)
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(x, y)


@pytest.mark.parametrize("audio,rate,message", [
    (np.zeros(100, np.float32), None, "audio arrays need a sample_rate"),
    (np.zeros(100, np.int16), 16000, "pass floats in [-1, 1]"),
    (np.zeros((10, 2, 2), np.float32), 16000, "[n] or [n, channels]"),
    (np.zeros(0, np.float32), 16000, "no audio samples"),
    (np.zeros((10, 0), np.float32), 16000, "no audio samples"),
    (np.array([0.0, np.nan]), 16000, "non-finite"),
    (np.array([0.0, np.inf], np.float32), 16000, "non-finite"),
    (np.zeros(100, np.float32), 500, "absurd sample rate 500 Hz"),
    (np.zeros(100, np.float32), 16000.0, "sample rate must be an integer"),
    ([0.0, 0.1], 16000, "unsupported audio input of type list"),
])
def test_load_audio_bad_input(audio, rate, message):
    with pytest.raises(InputError) as e:
        load_audio(audio, sample_rate=rate)
    assert message in str(e.value)


def test_load_audio_file_rate_mismatch(tmp_path):
    path = write(tmp_path, riff(PCM16, DATA))
    with pytest.raises(InputError, match="sample_rate=8000 given but the file is 16000 Hz"):
        load_audio(path, sample_rate=8000)
    with pytest.raises(InputError, match="sample rate must be an integer"):
        load_audio(path, sample_rate=np.array([16000, 16000]))
