"""a2g-gpt's sliding windows: which audio each window hears and how decoded windows join.

Any length of audio becomes poses in fixed-size windows, so that every window has the same shapes
(one CUDA graph, bounded memory). With ``window_frames`` W (64 at 15 fps, 16 motion tokens) and
``seed_tokens`` s (4 tokens = ``overlap`` 16 frames), window ``w`` covers motion frames
``[w * stride, w * stride + W)`` with ``stride = W - overlap`` (48): its decoder prompt holds the
previous window's last s tokens, and it generates the other ``W / 4 - s``.

Audio: log-mel frames come every ``hop`` samples; a window hears the ``mel_frames = ceil(W * 100 /
fps)`` frames (427) starting at mel frame ``w * stride * 100 / fps`` (320 w), i.e. the samples
``[w * stride_samples, w * stride_samples + window_samples)`` with ``window_samples = n_fft + (mel_frames
- 1) * hop``. Because each window starts on a hop boundary, its log-mel is exactly the slice of the
whole clip's log-mel, so windows can be computed one at a time (streaming, bounded memory):
:meth:`WindowPlan.stream_windows` cuts them from the audio's blocks as they are decoded. The audio
is zero-padded at the end to fill the last window.

Joining: the ``overlap`` frames a window shares with the previous one are cross-faded linearly
(weights ``(i + 0.5) / overlap`` for the new window); each window then contributes its frames up to
its own last ``overlap``, which wait for the next window (or the end). Output length: ``round(n *
fps / sample_rate)`` frames (at least 1).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class WindowPlan:
    sample_rate: int
    fps: int
    hop: int
    n_fft: int
    window_frames: int
    overlap: int  # frames shared with the previous window (seed tokens x downsampling)

    def __post_init__(self):
        if (self.stride * self.mels_per_second) % self.fps:
            raise InputError(f"a window stride of {self.stride} frames at {self.fps} fps does not start on a "
                             f"log-mel frame ({self.mels_per_second} per second)")

    @property
    def mels_per_second(self) -> int:
        return self.sample_rate // self.hop

    @property
    def stride(self) -> int:
        return self.window_frames - self.overlap

    @property
    def mel_frames(self) -> int:
        """Log-mel frames one window hears."""
        return math.ceil(self.window_frames * self.mels_per_second / self.fps)

    @property
    def window_samples(self) -> int:
        return self.n_fft + (self.mel_frames - 1) * self.hop

    @property
    def stride_samples(self) -> int:
        return self.stride * self.mels_per_second // self.fps * self.hop

    def frames(self, samples: int) -> int:
        """Output pose frames for ``samples`` audio samples."""
        return max(1, round(samples * self.fps / self.sample_rate))

    def windows(self, samples: int) -> int:
        return 1 + math.ceil(max(0, self.frames(samples) - self.window_frames) / self.stride)

    def window_audio(self, audio: np.ndarray, w: int) -> np.ndarray:
        """The samples window ``w`` hears (zero-padded past the end of ``audio``)."""
        start = w * self.stride_samples
        piece = audio[start:start + self.window_samples]
        if piece.shape[0] < self.window_samples:
            piece = np.concatenate([piece, np.zeros(self.window_samples - piece.shape[0], dtype=audio.dtype)])
        return piece

    def stream_windows(self, blocks: Iterable[np.ndarray], samples: int) -> Iterator[np.ndarray]:
        """:meth:`window_audio` of each of the ``windows(samples)`` windows in turn, cut from
        ``blocks``: 1-D pieces of any sizes of ``samples``-long audio, read only as far as the
        current window needs, so only that window's samples and one block are held at a time."""
        blocks = iter(blocks)
        held, offset = np.zeros(0, np.float32), 0  # held = the audio's samples [offset, offset + len(held))
        for w in range(self.windows(samples)):
            start = w * self.stride_samples  # < offset + window_samples: consecutive windows overlap
            pieces = [held[start - offset:]]
            have = len(pieces[0])
            while have < self.window_samples and (block := next(blocks, None)) is not None:
                pieces.append(block)
                have += len(block)
            held, offset = np.concatenate(pieces), start
            yield self.window_audio(held, 0)


class Stitcher:
    """Joins decoded windows ``[window_frames, ...]`` into one stream of ``total`` frames:
    :meth:`add` returns the frames a window completes, :meth:`finish` the rest."""

    def __init__(self, plan: WindowPlan, total: int):
        self.plan, self.total, self.done = plan, total, 0
        self.tail: np.ndarray | None = None
        self.ramp = (np.arange(plan.overlap, dtype=np.float32) + 0.5) / plan.overlap

    def _emit(self, frames: np.ndarray) -> np.ndarray:
        frames = frames[:max(0, self.total - self.done)]
        self.done += frames.shape[0]
        return frames

    def add(self, window: np.ndarray) -> np.ndarray:
        k = self.plan.overlap
        head = window[:window.shape[0] - k]
        if self.tail is not None:
            r = self.ramp.reshape(-1, *([1] * (window.ndim - 1)))
            head = np.concatenate([self.tail * (1 - r) + window[:k] * r, head[k:]])
        self.tail = window[window.shape[0] - k:]
        return self._emit(head)

    def finish(self) -> np.ndarray:
        return self._emit(self.tail)
