"""Sampling parameters and the per-request sampler (math in :mod:`mmgen_engine.ops.sampling`)."""
from __future__ import annotations

import math
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
    """Turns logits ``[B, V]`` into next tokens ``[B]`` for one request of ``batch`` rows.

    The random stream is a ``torch.Generator`` on the logits' device seeded from ``params.seed``
    (fresh entropy when None): the same seed, batch and model give the same tokens.
    """

    def __init__(self, params: SamplingParams | None, batch: int, device: torch.device):
        params = params or SamplingParams()
        self.temperature = torch.full((batch,), float(params.temperature), device=device)
        self.top_k = torch.full((batch,), params.top_k, dtype=torch.int64, device=device)
        self.top_p = torch.full((batch,), float(params.top_p), device=device)
        self.do_sample = torch.full((batch,), params.do_sample, dtype=torch.bool, device=device)
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        noise = None
        if self.generator is not None:
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            noise.exponential_(generator=self.generator)
        return ops.sample(logits, self.temperature, self.top_k, self.top_p, self.do_sample, noise)
