"""Speech-to-gesture: speech audio -> log-mel -> audio encoder -> GPT over motion tokens (cross-attention
to the audio) -> motion VQ decoder -> 2D upper-body poses, window by window.

The audio (an audio file or an array; any rate, mixed down to mono and resampled to 16 kHz) is
decoded, mixed and resampled block by block (:mod:`.audio`) and cut into the fixed windows of
:mod:`.gesture_windows` as it arrives, so memory does not grow with its length: per window the
encoder runs once, the decoder continues the previous window's last tokens with the window's new
tokens (only motion codes are drawn), and the decoded window is cross-faded into the output.
:meth:`SpeechToGesturePipeline.generate_stream` yields the poses as windows complete;
:meth:`~SpeechToGesturePipeline.generate` returns them all. Window ``w`` samples with its own seed
mixed from the request's seed and ``w`` (:func:`window_seed`), so the same audio and seed give the
same poses whether streamed or not.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import SpeechToGestureConfig
from ..errors import InputError
from ..models import build_model
from ..runtime import CUDAGraphs, RecordedSteps, SamplingParams
from ..runtime.layout import column_major_weights
from .audio import LOG_MEL_HOP, LOG_MEL_N_FFT, AudioStream, log_mel_400, open_audio
from .generation_defaults import builtin_sampling, default_sampling
from .gesture_windows import Stitcher, WindowPlan
from .stages import Stages

# sampling when none is given and the checkpoint has no generation defaults: seeded, so a call is
# reproducible; a lowered temperature and top-p keep a silent speaker still (at temperature 1 the demo
# model jitters between near-rest codes in silence)
DEFAULT_SAMPLING = builtin_sampling("speech-to-gesture")


def window_seed(seed: int, w: int) -> int:
    """The sampling seed of window ``w``: SplitMix64 of ``seed`` and ``w``, in ``[0, 2**63)`` (neighbouring
    seeds or windows give unrelated streams)."""
    z = (seed + (w + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class SpeechToGesturePipeline(Stages):
    """Generates gestures with a converted a2g-gpt checkpoint (see :func:`mmgen_engine.load`)."""

    task = "speech-to-gesture"

    def __init__(self, model, config: SpeechToGestureConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.dtype = model.decoder.wte.dtype
        g = config.gesture
        self.plan = WindowPlan(g.sample_rate, g.fps, LOG_MEL_HOP, LOG_MEL_N_FFT, g.window_frames,
                               g.seed_tokens * config.motion.downsample_factor)
        # sampling=None: the checkpoint's generation defaults, else DEFAULT_SAMPLING
        self.default_sampling = default_sampling(config)
        self.use_cuda_graphs = device.type == "cuda"
        if device.type == "cuda":
            self._graphs = CUDAGraphs(model.decoder, self.dtype, device, vocab_limit=config.motion.codebook_size)
        # CPU: the decoder's steps (and the audio encoder and motion decoder), replayed from recordings
        # once a shape repeats (every window has the same shapes); a small model's eager step is mostly
        # Python (runtime.recorded). False: every step eager (the same tokens and poses)
        self.record_cpu_steps = device.type == "cpu"
        self.recorded_steps = RecordedSteps(model.decoder)
        self._init_stages({"audio_encoder": model.encode, "motion_decoder": model.poses}, graphed=("audio_encoder",))

    @classmethod
    def from_checkpoint(cls, path: Path, config: SpeechToGestureConfig, device: torch.device,
                        dtype: torch.dtype | None, rebuild=None) -> SpeechToGesturePipeline:
        default_sampling(config, str(path / "config.json"))  # refused before the weights are read
        model = load_model(path, config, build_model, device, dtype, rebuild)  # rebuild: quantize at load
        if device.type == "cpu":
            column_major_weights(model.decoder)
        return cls(model, config, device)

    @property
    def fps(self) -> float:
        return float(self.config.gesture.fps)

    @property
    def skeleton(self) -> list[int]:
        """The parent of each joint, -1 for the root (the neck)."""
        return list(self.config.gesture.skeleton)

    def generate(self, audio, sample_rate: int | None = None, sampling: SamplingParams | None = None,
                 progress: Callable[[int, int | None], object] | None = None) -> np.ndarray:
        """Poses ``[T, joints, 2]`` float32 (neck-relative, y up, ``fps`` frames per second, ``T =
        round(seconds * fps)``) for ``audio``: an audio file path, or a 1-D (or ``[n, channels]``)
        float array with its ``sample_rate``. ``sampling`` None: the checkpoint's generation
        defaults (:attr:`default_sampling`), else :data:`DEFAULT_SAMPLING`.
        ``progress``, if given, is called as ``progress(done, total)`` after each generated window:
        ``done`` windows of ``total`` (None where the length is not known up front; files and
        arrays always know theirs)."""
        samples, sampling = self._inputs(audio, sample_rate, sampling)
        return np.concatenate(list(self._stream(samples, sampling, progress)))

    def generate_stream(self, audio, sample_rate: int | None = None,
                        sampling: SamplingParams | None = None) -> Iterator[np.ndarray]:
        """The poses of :meth:`generate` in chunks ``[n, joints, 2]``, each yielded as soon as its
        window is decoded (the last window's final frames come last)."""
        samples, sampling = self._inputs(audio, sample_rate, sampling)
        return self._stream(samples, sampling)

    def generate_tokens(self, audio, sample_rate: int | None = None,
                        sampling: SamplingParams | None = None) -> list[list[int]]:
        """The motion tokens of every window of :meth:`generate` (each window's full
        ``window_frames / 4`` tokens, its seed included)."""
        samples, sampling = self._inputs(audio, sample_rate, sampling)
        return [tokens for tokens, _ in self._windows(samples, sampling)]

    def _inputs(self, audio, sample_rate, sampling) -> tuple[AudioStream, SamplingParams]:
        """The checked request: its audio as a stream at the model's rate (decoded only as windows
        need it) and its sampling."""
        sampling = self.default_sampling if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if sampling.guidance_scale is not None:
            raise InputError("speech-to-gesture has no guidance; leave guidance_scale unset")
        return open_audio(audio, sample_rate).resampled(self.config.gesture.sample_rate), sampling

    def _stream(self, samples: AudioStream, sampling: SamplingParams,
                progress: Callable[[int, int | None], object] | None = None) -> Iterator[np.ndarray]:
        stitch = Stitcher(self.plan, self.plan.frames(samples.frames))
        total = self.plan.windows(samples.frames)
        for done, (_, poses) in enumerate(self._windows(samples, sampling), 1):
            chunk = stitch.add(poses)
            if progress is not None:
                progress(done, total)
            if chunk.shape[0]:
                yield chunk
        chunk = stitch.finish()
        if chunk.shape[0]:
            yield chunk

    def _windows(self, samples: AudioStream, sampling: SamplingParams) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(tokens, poses [window_frames, joints, 2])`` of every window in turn."""
        context: list[int] = []
        for w, window_audio in enumerate(self.plan.stream_windows(samples, samples.frames)):
            window_sampling = sampling
            if sampling.seed is not None:
                window_sampling = dataclasses.replace(sampling, seed=window_seed(sampling.seed, w))
            tokens = self.decode_window(window_audio, context, window_sampling)
            context = tokens[-self.config.gesture.seed_tokens:]
            with torch.inference_mode():
                poses = self._run_stage("motion_decoder", torch.tensor([tokens], device=self.device))[0]
            yield tokens, poses.cpu().numpy()

    def _run_stage(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        """``self.stage(name)(*inputs)``; on CPU with the engine's own stages and ``record_cpu_steps``,
        replayed from a recording per input shape as the decode steps are (every window has the same
        shapes; a replay runs the same ATen calls, so the same values bitwise)."""
        if self.record_cpu_steps and self.device.type == "cpu" and self.stage_backend == "engine":
            fn = self.stages[name]
            return self.recorded_steps.bind(name, lambda span: fn, inputs)(0)
        return self.stage(name)(*inputs)

    def _step_options(self) -> dict:
        """The decode loop's ``recorded`` option where the engine's own loop runs the steps on CPU."""
        if self.record_cpu_steps and self.runtime == "engine" and self.device.type == "cpu":
            return {"recorded": self.recorded_steps}
        return {}

    def decode_window(self, window_audio: np.ndarray, context: list[int], sampling: SamplingParams) -> list[int]:
        """The motion tokens of one window: ``context`` (the previous window's last tokens, or none)
        continued to a full window, conditioned on ``window_audio`` (16 kHz, ``plan.window_samples``)."""
        cfg = self.config
        mel = log_mel_400(window_audio)[None].to(self.device, self.dtype)  # (1, F, 64)
        with torch.inference_mode():
            states = self._run_stage("audio_encoder", mel)
            prompt = torch.tensor([[cfg.gesture.bos_token_id, *context]], dtype=torch.int64, device=self.device)
            lengths = torch.full((1,), states.shape[1], dtype=torch.int64, device=self.device)
            new = self.decode_ids(prompt, states, lengths, cfg.window_tokens - len(context), eos_token_id=None,
                                  pad_token_id=cfg.gesture.eos_token_id, sampling=sampling,
                                  vocab_limit=cfg.motion.codebook_size, **self._step_options())
        return context + new[0].tolist()
