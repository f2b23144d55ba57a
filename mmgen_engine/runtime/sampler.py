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
    next tokens ``[B]`` for one request of ``batch`` rows.

    The random stream is Philox keyed by ``params.seed`` (a fresh 63-bit seed from OS entropy when
    None) and counted by the row and ``offset``, a ``[1]`` device tensor advanced in place after each
    call: the same seed, batch and model give the same tokens, and a CUDA graph that captured a call
    replays with the next offset. ``guidance`` says whether the task combines guided rows (then
    ``params.guidance_scale`` is required, otherwise rejected); ``vocab_limit`` restricts tokens to
    ``0..vocab_limit-1``.
    """

    def __init__(self, params: SamplingParams | None, batch: int, device: torch.device, guidance: bool = False,
                 vocab_limit: int | None = None):
        params = params or SamplingParams()
        if guidance and params.guidance_scale is None:
            raise InputError("this task needs guidance_scale")
        if not guidance and params.guidance_scale is not None:
            raise InputError("guidance_scale is not supported by this task")

        def rows(value, dtype):
            return torch.full((batch,), value, dtype=dtype, device=device)

        self.temperature = rows(float(params.temperature), torch.float32)
        self.top_k = rows(params.top_k, torch.int64)
        self.top_p = rows(float(params.top_p), torch.float32)
        self.do_sample = rows(params.do_sample, torch.bool)
        self.seeds = rows(secrets.randbits(63) if params.seed is None else params.seed, torch.int64)
        self.offset = torch.zeros(1, dtype=torch.int64, device=device)
        self.guidance = rows(float(params.guidance_scale), torch.float32) if guidance else None
        self.vocab_limit = vocab_limit
        self.greedy = not params.do_sample  # host-known: no row samples, the sampler only takes argmaxes

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = ops.sample(logits, self.temperature, self.top_k, self.top_p, self.do_sample, self.seeds,
                            self.offset, self.guidance, self.vocab_limit, self.greedy)
        self.offset += 1  # a tensor op, so a captured graph advances it too
        return tokens
