"""Audio front end of the speech-to-gesture pipeline: an audio file or array -> mono -> 16 kHz ->
log-mel, block by block, so that memory does not grow with the length of the audio.

* Decoding is libsndfile's, through :mod:`soundfile` (which bundles it): WAV (8-bit unsigned and
  16/24/32-bit PCM, 32/64-bit float, A-law, µ-law, IMA/MS ADPCM, GSM 6.10), WAVEX, RF64, W64, AIFF,
  FLAC, Ogg Vorbis and Opus, MP3 and the rest of ``soundfile.available_formats()``. Integers are
  scaled by ``2 ** -(bits - 1)`` (``int16 / 32768``); float samples are kept as they are (not
  clipped). A path that is not a regular file (a FIFO, a device such as ``/dev/zero``) is refused
  before anything is read from it.
* :class:`AudioStream` yields the mono mix (the mean over channels, float32) in blocks of about
  ``BLOCK_SAMPLES`` decoded samples; :meth:`AudioStream.resampled` converts the rate as it goes.
* Resampling is libsoxr's (:mod:`soxr`, quality ``HQ``, streamed with ``soxr.ResampleStream``): any
  split of the input into blocks gives the same output as ``soxr.resample`` of the whole, and cut or
  zero-padded to ``ceil(n * target / rate)`` samples it is exactly ``librosa.resample`` (librosa's
  default ``soxr_hq``, what ``librosa.load(sr=16000)`` does). Chosen over scipy's ``resample_poly``
  (which the former home-made resampler reproduced) by measurement on 48 kHz and 44.1 kHz input: 4x
  faster (9 against 35 ms per minute of audio), streams natively, flat to 7.6 kHz and silent above 8
  kHz, where ``resample_poly``'s Kaiser filter still passes 8.1 kHz at -7 dB (aliased to 7.9 kHz,
  inside ``log_mel_400``'s top band): against an ideal brick-wall resampler the log-mel of wideband
  speech is off by 0.0001 (top 8 bands, mean) with soxr and 0.012 with ``resample_poly``. The demo
  model's greedy poses were the same with either.
* :func:`log_mel_400` is the PATS dataset's ``log_mel_400`` feature (librosa's STFT and mel
  filterbank with the parameters below); the speech-to-gesture pipeline takes it window by window.
"""
from __future__ import annotations

import functools
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

from ..errors import InputError, one_line

MIN_RATE, MAX_RATE = 1000, 384000
MAX_CHANNELS = 32  # an array with more columns than this (and few rows) is taken for [channels, n]
BLOCK_SAMPLES = 1 << 18  # samples (all channels) decoded per block: 1 MiB of float32
# Longer audio is refused: a header that declares more is corrupt, and a day of speech already
# makes 540 MB of poses.
MAX_SECONDS = 24 * 3600


def _check_length(frames: int, rate: int, what: str) -> None:
    """InputError if ``frames`` at ``rate`` Hz last longer than ``MAX_SECONDS``."""
    if frames > MAX_SECONDS * rate:
        raise InputError(f"{what}: {frames} samples at {rate} Hz are {frames / rate / 3600:.3g} hours of audio; "
                         f"at most {MAX_SECONDS // 3600} hours are accepted")


def _check_rate(rate, what: str) -> int:
    """``rate`` as an int if it is an integer in ``MIN_RATE..MAX_RATE`` Hz, else InputError."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)):
        raise InputError(f"{what}: sample rate must be an integer number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{what}: absurd sample rate {int(rate)} Hz (expected {MIN_RATE}..{MAX_RATE})")
    return int(rate)


class AudioStream:
    """Mono float32 audio, ``frames`` samples at ``rate`` Hz, decoded block by block while it is
    iterated (once). ``name`` (a path, or "audio array") is what its errors name."""

    def __init__(self, name: str, rate: int, frames: int, blocks: Iterator[np.ndarray]):
        self.name, self.rate, self.frames, self._blocks = name, rate, frames, blocks

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._blocks

    def resampled(self, rate: int) -> AudioStream:
        """This audio at ``rate`` Hz, ``ceil(frames * rate / self.rate)`` samples, equal to
        ``librosa.resample`` of the whole (see the module's docstring), and checked to be finite
        (what the model is fed)."""
        frames = -(-self.frames * rate // self.rate)
        blocks = self._blocks if rate == self.rate else _resample_blocks(self._blocks, self.rate, rate, frames)
        return AudioStream(self.name, rate, frames, _finite_blocks(blocks, self.name))

    def read(self) -> np.ndarray:
        """All the samples, in a new array ``[frames]``, joined from the blocks as they come (memory
        is taken for what is decoded, never for what a header declares)."""
        return np.concatenate([np.zeros(0, np.float32), *self])


def _resample_blocks(blocks: Iterator[np.ndarray], rate: int, target: int, frames: int) -> Iterator[np.ndarray]:
    """``blocks`` at ``rate`` -> blocks at ``target`` Hz through one ``soxr.ResampleStream`` (its
    filter state carries over between blocks), cut or zero-padded to ``frames`` samples."""
    stream = soxr.ResampleStream(rate, target, 1, dtype="float32", quality="HQ")
    left = frames
    for block in blocks:
        out = stream.resample_chunk(block)[:left]
        left -= len(out)
        yield out
    out = stream.resample_chunk(np.zeros(0, np.float32), last=True)[:left]
    yield np.concatenate([out, np.zeros(left - len(out), np.float32)])


def _finite_blocks(blocks: Iterator[np.ndarray], name: str) -> Iterator[np.ndarray]:
    """``blocks``, each checked to be finite: finite samples far beyond [-1, 1] (1e38 in a float
    file, 1e300 in a float64 array) overflow float32 when mixed or resampled, and inf would reach
    the model as NaN."""
    for block in blocks:
        if not np.isfinite(block).all():
            raise InputError(f"{name}: samples too large or not finite (NaN or inf once mixed and resampled); "
                             f"audio must be finite floats in [-1, 1]")
        yield block


def open_audio(audio, sample_rate: int | None = None) -> AudioStream:
    """An audio file path, or a float array ``[n]`` / ``[n, channels]`` in [-1, 1] at
    ``sample_rate`` Hz -> its mono :class:`AudioStream`, checked but not decoded yet (a file's header
    is read; an array is checked whole). For a path, ``sample_rate`` may be left out or must equal
    the file's. An :class:`AudioStream` (opened earlier, not yet iterated) is returned as it is."""
    if isinstance(audio, AudioStream):
        if sample_rate is not None and sample_rate != audio.rate:
            raise InputError(f"{audio.name}: sample_rate={sample_rate} given but the audio is {audio.rate} Hz")
        return audio
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if sample_rate is not None:
            sample_rate = _check_rate(sample_rate, "sample_rate")
        f = _open_file(path)
        if sample_rate is not None and sample_rate != f.samplerate:
            f.close()
            raise InputError(f"{path}: sample_rate={sample_rate} given but the file is {f.samplerate} Hz")
        return AudioStream(str(path), f.samplerate, f.frames, _file_blocks(f, path, mono=True))
    if isinstance(audio, np.ndarray):
        if sample_rate is None:
            raise InputError("audio arrays need a sample_rate")
        rate = _check_rate(sample_rate, "sample_rate")
        _check_array(audio, rate)
        return AudioStream("audio array", rate, audio.shape[0], _array_blocks(audio))
    raise InputError(f"unsupported audio input of type {type(audio).__name__}; "
                     f"pass an audio file path or a float array")


def _open_file(path: Path) -> soundfile.SoundFile:
    """``path`` opened with libsndfile and its header checked. It is opened non-blocking and
    checked to be a regular file before libsndfile reads it: a FIFO or a device would block or never
    end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{path}: audio file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open the audio file ({e.strerror})") from None
    except ValueError as e:  # a NUL character in the path
        raise InputError(f"{str(path)!r}: not a usable path ({e})") from None
    info = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = "is a directory, not an audio file"
    elif not stat.S_ISREG(info.st_mode):
        problem = "not a regular file (a FIFO, socket or device); pass an audio file"
    elif info.st_size == 0:
        problem = "empty file"
    if problem:
        os.close(fd)
        raise InputError(f"{path}: {problem}")
    try:
        f = soundfile.SoundFile(fd, closefd=True)  # libsndfile closes fd if this fails
    except soundfile.LibsndfileError as e:
        raise InputError(f"{path}: not a readable audio file ({_reason(e)})") from None
    try:
        _check_rate(f.samplerate, str(path))
        if f.frames == 0:
            raise InputError(f"{path}: no audio samples")
        _check_length(f.frames, f.samplerate, str(path))
    except InputError:
        f.close()
        raise
    return f


def _reason(e: soundfile.LibsndfileError) -> str:
    """libsndfile's one-line reason for an error, for our messages."""
    return one_line(e.error_string).rstrip(".")


def _file_blocks(f: soundfile.SoundFile, path: Path, mono: bool) -> Iterator[np.ndarray]:
    """The ``f.frames`` frames of an open file in blocks ``[n, channels]`` float32 (or with ``mono``
    their mean ``[n]``), then ``f`` closed. Data that ends early or fails to decode, and NaN or inf
    samples, raise InputError."""
    with f:
        step = max(1, BLOCK_SAMPLES // f.channels)
        done = 0
        while done < f.frames:
            try:
                block = f.read(min(step, f.frames - done), dtype="float32", always_2d=True)
            except soundfile.LibsndfileError as e:
                raise InputError(f"{path}: corrupt or truncated audio data after {done} frames "
                                 f"({_reason(e)})") from None
            if len(block) == 0:
                raise InputError(f"{path}: truncated audio (the data ends after {done} of {f.frames} frames)")
            if not np.isfinite(block).all():
                raise InputError(f"{path}: audio file has non-finite samples (NaN or inf) after {done} frames")
            done += len(block)
            yield to_mono(block) if mono else block


def _array_blocks(audio: np.ndarray) -> Iterator[np.ndarray]:
    """A checked array's mono mix in contiguous float32 blocks."""
    step = max(1, BLOCK_SAMPLES // (audio.shape[1] if audio.ndim == 2 else 1))
    for start in range(0, audio.shape[0], step):
        block = audio[start:start + step]
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, which the stream reports
            block = to_mono(block) if block.ndim == 2 else np.ascontiguousarray(block, np.float32)
        yield block


def _check_array(audio: np.ndarray, rate: int) -> None:
    """Checks a caller's audio array: ``[n]`` or ``[n, channels]``, float32/64, not empty, at most
    ``MAX_SECONDS`` long at ``rate`` Hz, finite."""
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
    _check_length(audio.shape[0], rate, "audio array")
    step = max(1, BLOCK_SAMPLES // (audio.size // audio.shape[0]))  # in blocks: no array-sized mask
    if not all(np.isfinite(audio[i:i + step]).all() for i in range(0, audio.shape[0], step)):
        raise InputError("audio array has non-finite samples (NaN or inf)")


def read_wav(path, mono: bool = False) -> tuple[np.ndarray, int]:
    """An audio file (any format :func:`open_audio` reads; the name is historical) -> ``(samples
    [n, channels] float32, sample rate)``, or with ``mono`` the channels' mean ``[n]``, mixed block
    by block (a long multichannel file is never held whole). Anything wrong with the file raises
    InputError naming it. The blocks are joined at the end (memory is taken for what is decoded,
    never for what a header declares)."""
    path = Path(path)
    f = _open_file(path)
    rate = f.samplerate
    return np.concatenate(list(_file_blocks(f, path, mono))), rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[n, channels]`` -> ``[n]`` float32, the mean over channels (a sum that overflows float32
    gives inf quietly: the stream's finite check reports it)."""
    with np.errstate(over="ignore"):
        return samples.mean(axis=1, dtype=np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """1-D ``x`` at ``orig_sr`` Hz -> a new float32 array at ``target_sr`` Hz, ``ceil(n * target_sr /
    orig_sr)`` samples: libsoxr HQ, exactly ``librosa.resample(x, orig_sr=orig_sr,
    target_sr=target_sr)`` (:meth:`AudioStream.resampled` over one block)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise InputError(f"resample takes 1-D audio, got shape {x.shape}")
    for rate in (orig_sr, target_sr):
        if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)) or rate < 1:
            raise InputError(f"sample rates must be positive integers, got {orig_sr!r} -> {target_sr!r}")
    x = np.ascontiguousarray(x)
    return AudioStream("audio array", int(orig_sr), len(x), iter([x])).resampled(int(target_sr)).read()


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
    """A file path or an array (as :func:`open_audio` takes them) -> a new 1-D float32 array at
    ``target_rate`` Hz: the mono mix, resampled. It holds the whole result; the speech-to-gesture
    pipeline streams ``open_audio(...).resampled(...)`` instead."""
    target_rate = _check_rate(target_rate, "target_rate")
    return open_audio(audio, sample_rate).resampled(target_rate).read()
