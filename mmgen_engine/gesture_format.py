"""The gesture domain's definitions, below everything that uses them (config, converters, training,
pipelines): the PATS upper-body skeleton and a2g-gpt's source format. Imports nothing of the package.

Skeleton: ``JOINT_NAMES[i]`` is joint ``i``, ``PARENTS[i]`` its parent (``-1`` for the root, joint 0 =
Neck); 'R' and 'L' are the person's right and left, as in OpenPose (see
:mod:`mmgen_engine.pipelines.poses` for the pose arrays and their drawing).

a2g-gpt's source format: a directory with ``a2g_gpt.json`` (:class:`A2GConfig`) and ``model.safetensors``,
written by :func:`mmgen_engine.training.a2g_gpt.save` and read by the ``a2g-gpt`` converter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

FINGERS = ("Thumb", "Index", "Middle", "Ring", "Little")
JOINT_NAMES = ["Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "Nose", "REye", "LEye"] + [
    name for side in "LR"  # each hand: its root, then 4 joints per finger from the palm out
    for name in [f"{side}HandRoot"] + [f"{side}Hand{finger}{i}" for finger in FINGERS for i in range(1, 5)]]
PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 7,
           6, 10, 11, 12, 13, 10, 15, 16, 17, 10, 19, 20, 21, 10, 23, 24, 25, 10, 27, 28, 29,
           3, 31, 32, 33, 34, 31, 36, 37, 38, 31, 40, 41, 42, 31, 44, 45, 46, 31, 48, 49, 50]
ROOT = 0
NUM_JOINTS = 52

SAMPLE_RATE, HOP, N_FFT, N_MELS = 16000, 160, 512, 64  # PATS log_mel_400
FPS, DOWNSAMPLE = 15, 4  # pose frames per second; audio frames per motion token
JOINTS = NUM_JOINTS
CONFIG_FILE, WEIGHTS_FILE = "a2g_gpt.json", "model.safetensors"


@dataclass(frozen=True)
class A2GConfig:
    """The sizes of an a2g-gpt model (``a2g_gpt.json``); :meth:`check` validates them."""

    width: int = 128            # audio encoder output = decoder width
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ff: int = 512
    layers: int = 3             # decoder
    heads: int = 4
    ff: int = 512
    codebook_size: int = 512
    code_dim: int = 64
    vq_width: int = 128
    vq_depth: int = 2
    vq_growth: int = 3
    window_frames: int = 64
    seed_tokens: int = 4

    @property
    def window_tokens(self) -> int:
        return self.window_frames // DOWNSAMPLE

    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def eos(self) -> int:
        return self.codebook_size + 1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 2

    @property
    def max_positions(self) -> int:
        """Positions of a training sequence ``[bos, t_0 .. t_n-1, eos]`` (eos is a target, never an input:
        the last row of ``wpe`` is not trained)."""
        return self.window_tokens + 2

    @property
    def mel_frames(self) -> int:
        return math.ceil(self.window_frames * (SAMPLE_RATE // HOP) / FPS)

    @property
    def audio_positions(self) -> int:
        """Audio encoder states per window (two stride-2 convolutions)."""
        n = self.mel_frames
        for _ in range(2):
            n = (n - 1) // 2 + 1
        return n

    def check(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be a positive integer, got {getattr(self, f.name)!r}")
        if self.window_frames % DOWNSAMPLE or not self.seed_tokens < self.window_tokens:
            raise ValueError(f"window_frames must be a multiple of {DOWNSAMPLE} and seed_tokens < "
                             f"window_frames / {DOWNSAMPLE}")
        if ((self.window_frames - DOWNSAMPLE * self.seed_tokens) * (SAMPLE_RATE // HOP)) % FPS:
            raise ValueError(f"windows of {self.window_frames} frames seeded with {self.seed_tokens} tokens do not "
                             f"start on a log-mel frame (window_frames - 4 seed_tokens must be a multiple of 3)")
        if self.width % self.audio_heads or self.width % self.heads:
            raise ValueError("width must be divisible by audio_heads and heads")
