"""Sampling parameters and the per-request sampler (math in :mod:`mmgen_engine.ops.sampling`)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from .. import ops
from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    ``do_sample=False`` is greedy decoding (the other fields then only matter for guidance).
    ``temperature > 0`` divides the logits; ``top_k`` keeps the k most likely tokens (0 = all,
    ties at the boundary kept); ``top_p`` in (0, 1] keeps the smallest set whose probability
    reaches it; ``guidance_scale`` is classifier-free guidance / min-dalle's supercondition factor
    (tasks without guidance reject it); ``seed`` makes sampling reproducible.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or not (0 < self.temperature < math.inf):
            raise InputError(f"temperature must be a positive finite number, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.guidance_scale is not None and (not _is_number(self.guidance_scale)
                                                or not (0 <= self.guidance_scale < math.inf)):
            raise InputError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and not math.isnan(x)


class Sampler:
    """Turns logits ``[B, V]`` (``[2B, V]`` with guidance: unconditioned rows, then conditioned) into
    next tokens ``[B]`` for ``batch`` rows, with one request's :class:`SamplingParams` held as per-row
    device tensors (:meth:`load` puts another request's in place, so a captured CUDA graph sees them).

    The random stream is Philox keyed by ``params.seed`` (a fresh 63-bit seed from OS entropy when
    None) and counted by the row and the caller's step counter ``offset``, a ``[1]`` int64 device
    tensor: the same seed, offset, batch and model give the same tokens, also when a CUDA graph
    replays the call after the caller advanced ``offset`` on the device. ``guidance`` says whether
    the task combines guided rows (then ``params.guidance_scale`` is required, otherwise rejected);
    ``vocab_limit`` restricts tokens to ``0..vocab_limit-1``.
    """

    def __init__(self, params: SamplingParams | None, batch: int, device: torch.device, guidance: bool = False,
                 vocab_limit: int | None = None):
        def rows(dtype):
            return torch.empty(batch, dtype=dtype, device=device)

        self.temperature, self.top_p = rows(torch.float32), rows(torch.float32)
        self.top_k, self.seeds = rows(torch.int64), rows(torch.int64)
        self.do_sample = rows(torch.bool)
        self.guidance = rows(torch.float32) if guidance else None
        self.vocab_limit = vocab_limit
        self.load(params)

    def load(self, params: SamplingParams | None) -> None:
        """Take ``params`` (None: greedy) for every row, in place."""
        params = params or SamplingParams()
        if self.guidance is not None and params.guidance_scale is None:
            raise InputError("this task needs guidance_scale")
        if self.guidance is None and params.guidance_scale is not None:
            raise InputError("guidance_scale is not supported by this task")
        self.temperature.fill_(float(params.temperature))
        self.top_k.fill_(params.top_k)
        self.top_p.fill_(float(params.top_p))
        self.do_sample.fill_(params.do_sample)
        self.seeds.fill_(secrets.randbits(63) if params.seed is None else params.seed)
        if self.guidance is not None:
            self.guidance.fill_(float(params.guidance_scale))
        self.greedy = not params.do_sample  # host-known: no row samples, the sampler only takes argmaxes

    def __call__(self, logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return ops.sample(logits, self.temperature, self.top_k, self.top_p, self.do_sample, self.seeds, offset,
                          self.guidance, self.vocab_limit, self.greedy)
