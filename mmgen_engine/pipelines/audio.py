"""Audio front end of the speech-to-gesture pipeline: WAV file or array -> 16 kHz mono -> log-mel.

* :func:`read_wav` parses RIFF/WAVE itself: integer PCM (8-bit unsigned, 16/24/32-bit signed
  little-endian), IEEE float 32/64, G.711 A-law and µ-law, and ``WAVE_FORMAT_EXTENSIBLE`` with a PCM,
  float, A-law or µ-law sub-format. Integers are scaled by ``2 ** -(8 * width - 1)`` (uint8 first
  has 128 subtracted), so ``int16 / 32768``, ``int24 / 8388608``, ``int32 / 2147483648`` and
  ``(uint8 - 128) / 128``; float samples are kept as they are (not clipped).
* :func:`resample` is ``scipy.signal.resample_poly(x, up, down)`` with its defaults, computed with
  a polyphase filter bank in blocks (scipy is not needed at run time).
* :func:`log_mel_400` is the PATS dataset's ``log_mel_400`` feature (librosa's STFT and mel
  filterbank with the parameters below).
"""
from __future__ import annotations

import functools
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

MIN_RATE, MAX_RATE = 1000, 384000
MAX_CHANNELS = 32  # an array with more columns than this (and few rows) is taken for [channels, n]

_PCM, _FLOAT, _ALAW, _MULAW, _EXTENSIBLE = 0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE
_WIDTHS = {_PCM: (1, 2, 3, 4), _FLOAT: (4, 8), _ALAW: (1,), _MULAW: (1,)}  # bytes per sample
_FORMAT_NAMES = {_PCM: "PCM", _FLOAT: "IEEE float", _ALAW: "A-law", _MULAW: "µ-law", 0x0002: "MS ADPCM",
                 0x0011: "IMA ADPCM", 0x0050: "MPEG", 0x0055: "MPEG layer 3"}
# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag (2 bytes LE) followed by these 14 bytes
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # data sizes written by writers that could not seek back
_READ_BYTES = 1 << 22  # data is decoded in pieces of about this size


def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    """A-law and µ-law byte -> float32 sample, the 16-bit linear values of ITU-T G.711 (as in Sun's
    reference ``g711.c``) divided by 32768."""
    code = np.arange(256, dtype=np.int32)
    a = code ^ 0x55
    seg, mant = (a >> 4) & 7, a & 15
    t = np.where(seg == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(seg - 1, 0))
    alaw = np.where(a & 0x80, t, -t)
    u = ~code & 0xFF
    t = ((((u & 15) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    mulaw = np.where(u & 0x80, -t, t)
    return (alaw / 32768).astype(np.float32), (mulaw / 32768).astype(np.float32)


_ALAW_TABLE, _MULAW_TABLE = _g711_tables()


def _check_rate(rate, what: str) -> int:
    """``rate`` as an int if it is an integer in ``MIN_RATE..MAX_RATE`` Hz, else InputError."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)):
        raise InputError(f"{what}: sample rate must be an integer number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{what}: absurd sample rate {int(rate)} Hz (expected {MIN_RATE}..{MAX_RATE})")
    return int(rate)


def _parse_fmt(raw: bytes, path: Path) -> tuple[int, int, int, int]:
    """A ``fmt `` chunk body -> ``(format tag, channels, sample rate, bytes per sample)``; an
    extensible format is replaced by its sub-format (its valid bits only have to fit the container:
    samples are stored left-justified in ``wBitsPerSample`` bits)."""
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", raw[:16])
    if tag == _EXTENSIBLE:
        if len(raw) < 40:
            raise InputError(f"{path}: corrupt WAVE_FORMAT_EXTENSIBLE fmt chunk ({len(raw)} bytes, expected 40)")
        valid_bits, guid = struct.unpack("<H", raw[18:20])[0], raw[24:40]
        if guid[2:] != _GUID_TAIL:
            raise InputError(f"{path}: unsupported WAVE_FORMAT_EXTENSIBLE sub-format {guid.hex()}")
        tag = struct.unpack("<H", guid[:2])[0]
        if valid_bits > bits:
            raise InputError(f"{path}: corrupt fmt chunk ({valid_bits} valid bits in {bits}-bit samples)")
    if tag not in _WIDTHS:
        name = f" ({_FORMAT_NAMES[tag]})" if tag in _FORMAT_NAMES else ""
        raise InputError(f"{path}: unsupported WAV format tag 0x{tag:04x}{name}")
    width = bits // 8
    if bits % 8 or width not in _WIDTHS[tag]:
        raise InputError(f"{path}: unsupported {bits}-bit {_FORMAT_NAMES[tag]} WAV samples")
    if channels == 0:
        raise InputError(f"{path}: WAV file has zero channels")
    if block_align != channels * width:
        raise InputError(f"{path}: corrupt fmt chunk (block align {block_align} for {channels} "
                         f"channels of {bits} bits)")
    return tag, channels, _check_rate(rate, str(path)), width


def _find_chunks(f, path: Path, size: int) -> tuple[tuple[int, int, int, int], int, int]:
    """Walks the RIFF chunks -> ``(fmt, data offset, data bytes)``. Chunks other than ``fmt `` and
    ``data`` are skipped (odd sizes are followed by a pad byte); a data size of 0 or 0xFFFFFFFF
    means "up to the end of the file"."""
    head = f.read(12)
    if head[:4] == b"RF64":
        raise InputError(f"{path}: RF64 WAV files are not supported")
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        what = "empty file" if not head else f"starts with {head[:12]!r}"
        raise InputError(f"{path}: not a RIFF/WAVE file ({what})")
    fmt = data = None
    pos = 12
    while pos + 8 <= size and (fmt is None or data is None):
        f.seek(pos)
        cid, csize = struct.unpack("<4sI", f.read(8))
        body = pos + 8
        if cid == b"fmt ":
            if csize < 16 or body + csize > size:
                raise InputError(f"{path}: corrupt fmt chunk ({csize} bytes)")
            fmt = _parse_fmt(f.read(csize), path)
        elif cid == b"data":
            if csize in _STREAMING_SIZES:
                data = (body, size - body)
                break
            data = (body, csize)
        pos = body + csize + (csize & 1)
    if fmt is None:
        raise InputError(f"{path}: WAV file has no fmt chunk")
    if data is None:
        raise InputError(f"{path}: WAV file has no data chunk")
    if data[0] + data[1] > size:
        raise InputError(f"{path}: truncated WAV data ({size - data[0]} of {data[1]} bytes)")
    return fmt, data[0], data[1]


def _decode(raw: bytes, tag: int, width: int) -> np.ndarray:
    """Little-endian samples -> float32, integers scaled by ``2 ** -(8 * width - 1)``."""
    if tag == _ALAW:
        return _ALAW_TABLE[np.frombuffer(raw, np.uint8)]
    if tag == _MULAW:
        return _MULAW_TABLE[np.frombuffer(raw, np.uint8)]
    if tag == _FLOAT:
        return np.frombuffer(raw, f"<f{width}").astype(np.float32)
    if width == 1:
        ints = np.frombuffer(raw, np.uint8).astype(np.float32) - 128
    elif width == 3:  # each sample into the top 3 bytes of an int32, then an arithmetic shift
        wide = np.zeros((len(raw) // 3, 4), np.uint8)
        wide[:, 1:] = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        ints = (wide.view("<i4")[:, 0] >> 8).astype(np.float32)
    else:
        ints = np.frombuffer(raw, f"<i{width}").astype(np.float32)
    return ints * np.float32(2.0 ** (1 - 8 * width))


def read_wav(path, mono: bool = False) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file -> ``(samples [n, channels] float32, sample rate)``, or with ``mono`` the
    channels' mean ``[n]``, mixed block by block (a long multichannel file is never held whole). Only
    whole frames of the ``data`` chunk are read; anything wrong with the file raises InputError naming it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an audio file")
    if not path.is_file():
        raise InputError(f"{path}: audio file not found")
    with open(path, "rb") as f:
        (tag, channels, rate, width), offset, nbytes = _find_chunks(f, path, os.fstat(f.fileno()).st_size)
        frame = channels * width
        frames = nbytes // frame
        if frames == 0:
            raise InputError(f"{path}: no audio samples")
        out = np.empty((frames,) if mono else (frames, channels), np.float32)
        step = max(1, _READ_BYTES // frame)
        f.seek(offset)
        for start in range(0, frames, step):
            count = min(step, frames - start)
            raw = f.read(count * frame)
            if len(raw) < count * frame:  # the file shrank while we read it
                raise InputError(f"{path}: truncated WAV data")
            block = _decode(raw, tag, width).reshape(count, channels)
            out[start:start + count] = to_mono(block) if mono else block
    if tag == _FLOAT and not np.isfinite(out).all():
        raise InputError(f"{path}: WAV file has non-finite samples (NaN or inf)")
    return out, rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[n, channels]`` -> ``[n]`` float32, the mean over channels."""
    return samples.mean(axis=1, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _polyphase_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    """scipy's ``resample_poly`` filter as a polyphase bank -> ``(coef [up, taps] float64, lag)``.

    The filter is ``firwin(2 * half + 1, 1 / max(up, down), window=('kaiser', 5.0))`` with ``half =
    10 * max(up, down)``: ``h[k] = fc * sinc(fc * k) * I0(5 sqrt(1 - (k / half)^2)) / I0(5)`` for
    ``|k| <= half``, normalized to sum 1, rounded to float32 (scipy's dtype for float32 input) and
    multiplied by ``up``. Output ``i`` is ``y[i] = sum_n x[n] h[i * down - n * up]``; with ``n0 =
    (i * down) // up`` and phase ``p = (i * down) % up`` that is ``sum_t x[n0 - lag + t] coef[p, t]``
    where ``coef[p, t] = h[p + (lag - t) * up]`` (zero outside the filter).
    """
    max_rate = max(up, down)
    half = 10 * max_rate
    k = np.arange(-half, half + 1, dtype=np.float64)
    fc = 1.0 / max_rate
    window = np.i0(5.0 * np.sqrt(1 - (k / half) ** 2.0)) / np.i0(5.0)
    h = fc * np.sinc(fc * k) * window
    h = (h / h.sum()).astype(np.float32) * np.float32(up)
    lag, lead = half // up, (half + up - 1) // up  # taps reach lag inputs back, lead inputs ahead
    taps = lag + lead + 1
    idx = np.arange(up)[:, None] + (lag - np.arange(taps))[None, :] * up + half
    inside = (idx >= 0) & (idx <= 2 * half)
    coef = np.where(inside, h[np.clip(idx, 0, 2 * half)], 0).astype(np.float64)
    coef.flags.writeable = False
    return coef, lag


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """1-D float32 ``x`` at ``orig_sr`` Hz -> float32 at ``target_sr`` Hz, equal to
    ``scipy.signal.resample_poly(x, target_sr // g, orig_sr // g)`` (``g`` their gcd; zero padding,
    ``ceil(n * up / down)`` samples, the first output at the first input). Sums are taken in float64
    over blocks of outputs, so neither the upsampled signal nor a float64 copy of ``x`` is ever made."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise InputError(f"resample takes 1-D audio, got shape {x.shape}")
    for rate in (orig_sr, target_sr):
        if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)) or rate < 1:
            raise InputError(f"sample rates must be positive integers, got {orig_sr!r} -> {target_sr!r}")
    g = math.gcd(orig_sr, target_sr)
    up, down = int(target_sr) // g, int(orig_sr) // g
    if up == down == 1:
        return x.copy()
    coef, lag = _polyphase_bank(up, down)
    taps = coef.shape[1]
    n_out = -(-len(x) * up // down)
    block = up * max(1, (1 << 18) // (up * taps))  # a multiple of up: every block has the same phases
    phases = coef[np.arange(block) * down % up]
    out = np.empty(n_out, np.float32)
    for i0 in range(0, n_out, block):
        i = np.arange(i0, min(i0 + block, n_out), dtype=np.int64)
        first = i * down // up - lag  # the input each output's window starts at
        lo, hi = int(first[0]), int(first[-1]) + taps
        seg = np.zeros(hi - lo, np.float64)
        seg[max(0, -lo):min(hi, len(x)) - lo] = x[max(0, lo):min(hi, len(x))]
        windows = np.lib.stride_tricks.sliding_window_view(seg, taps)[first - lo]
        out[i0:i0 + len(i)] = np.einsum("ij,ij->i", windows, phases[:len(i)])
    return out


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` float32 (read-only, cached), librosa's
    ``filters.mel(..., htk=False, norm=None)``: Slaney's mel scale (``f / (200 / 3)`` below 1 kHz,
    ``15 + ln(f / 1000) / (ln 6.4 / 27)`` above), ``n_mels + 2`` points equally spaced in mel from
    ``fmin`` to ``fmax``, filter ``m`` rising from point ``m`` to 1 at point ``m + 1`` and back to 0
    at point ``m + 2``, evaluated at the FFT bin frequencies ``k * sr / n_fft``; no area
    normalization (peaks are 1)."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    hz = np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)
    bins = np.arange(n_fft // 2 + 1) * (sr / n_fft)
    ramps = hz[:, None] - bins[None, :]
    fdiff = np.diff(hz)[:, None]
    lower = -ramps[:-2] / fdiff[:-1]
    upper = ramps[2:] / fdiff[1:]
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    weights.flags.writeable = False
    return weights


LOG_MEL_RATE, LOG_MEL_N_FFT, LOG_MEL_WIN, LOG_MEL_HOP = 16000, 512, 400, 160
_LOG_MEL_BLOCK = 4096  # frames per STFT call, to bound memory on long audio


def log_mel_400(audio_16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """PATS ``log_mel_400``: 1-D 16 kHz audio -> ``[frames, 64]`` float32, ``frames = 1 + (n - 512)
    // 160``. Frame ``t`` is samples ``160 t .. 160 t + 511`` times a periodic Hann window of 400
    centred in 512 (zeros 56 on the left); ``S = |rfft|`` (power 1); ``M = mel_filterbank(16000, 512,
    64, 125, 7500) @ S``; result ``log(max(M, 1e-6))``. The FFT is taken in float64 (as librosa's is):
    in float32 its rounding error is large next to the weak bins of a frame."""
    x = torch.as_tensor(audio_16k)
    if x.dim() != 1 or not x.is_floating_point():
        raise InputError(f"log_mel_400 takes 1-D float audio, got {x.dtype} of shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < LOG_MEL_N_FFT:
        raise InputError(f"audio too short: {n} samples, log_mel_400 needs at least 512 samples (32 ms) at 16 kHz")
    frames = 1 + (n - LOG_MEL_N_FFT) // LOG_MEL_HOP
    window = torch.hann_window(LOG_MEL_WIN, periodic=True, dtype=torch.float64, device=x.device)
    fb = torch.tensor(mel_filterbank(LOG_MEL_RATE, LOG_MEL_N_FFT, 64, 125.0, 7500.0), device=x.device)
    out = torch.empty(frames, 64, dtype=torch.float32, device=x.device)
    for t0 in range(0, frames, _LOG_MEL_BLOCK):
        t1 = min(t0 + _LOG_MEL_BLOCK, frames)
        seg = x[t0 * LOG_MEL_HOP:(t1 - 1) * LOG_MEL_HOP + LOG_MEL_N_FFT].to(torch.float64)
        spec = torch.stft(seg, LOG_MEL_N_FFT, hop_length=LOG_MEL_HOP, win_length=LOG_MEL_WIN, window=window,
                          center=False, return_complex=True)
        out[t0:t1] = spec.abs().to(torch.float32).T @ fb.T
    return out.clamp_min_(1e-6).log_()


def load_audio(audio, sample_rate: int | None = None, target_rate: int = 16000) -> np.ndarray:
    """A WAV path, or a float array ``[n]`` / ``[n, channels]`` in [-1, 1] at ``sample_rate`` Hz ->
    a new 1-D float32 array at ``target_rate`` Hz (channels averaged, then :func:`resample`). For a
    path, ``sample_rate`` may be left out or must equal the file's."""
    target_rate = _check_rate(target_rate, "target_rate")
    if isinstance(audio, (str, os.PathLike)):
        samples, rate = read_wav(audio, mono=True)
        if sample_rate is not None and sample_rate != rate:
            raise InputError(f"{audio}: sample_rate={sample_rate} given but the file is {rate} Hz")
    elif isinstance(audio, np.ndarray):
        if sample_rate is None:
            raise InputError("audio arrays need a sample_rate")
        rate = _check_rate(sample_rate, "sample_rate")
        samples = _check_array(audio)
    else:
        raise InputError(f"unsupported audio input of type {type(audio).__name__}; "
                         f"pass a WAV file path or a float array")
    mono = to_mono(samples) if samples.ndim == 2 else samples
    return resample(mono, rate, target_rate)


def _check_array(audio: np.ndarray) -> np.ndarray:
    """A caller's audio array, checked: ``[n]`` or ``[n, channels]``, float32/64, finite, not empty."""
    if audio.dtype not in (np.float32, np.float64):
        raise InputError(f"audio arrays must be float32 or float64 in [-1, 1], got {audio.dtype}; "
                         f"pass floats in [-1, 1] (e.g. int16 / 32768)")
    if audio.ndim not in (1, 2):
        raise InputError(f"audio arrays must be [n] or [n, channels], got shape {audio.shape}")
    if audio.ndim == 2 and audio.shape[1] > MAX_CHANNELS and audio.shape[0] <= MAX_CHANNELS:
        raise InputError(f"audio array of shape {audio.shape} looks like [channels, n]; pass [n, channels] "
                         f"(transpose it)")
    if audio.size == 0:
        raise InputError(f"no audio samples (array of shape {audio.shape})")
    if not np.isfinite(audio).all():
        raise InputError("audio array has non-finite samples (NaN or inf)")
    return audio
