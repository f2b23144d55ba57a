"""Sampling parameters and the per-request sampler (math in :mod:`mmgen_engine.ops.sampling`)."""
from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..errors import InputError
from ..ops.random import uniform_cpu
from ..ops.registry import dispatch
from ..ops.sampling import sample_drawn, sample_reference
from .limits import FLOAT32_MAX, FLOAT32_TINY, MAX_NEW_TOKENS, check_float32, check_int, show

MAX_BEAMS = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    ``do_sample=False`` is greedy decoding (the other fields then only matter for guidance).
    ``temperature > 0`` divides the logits; ``top_k`` keeps the k most likely tokens (0 = all,
    ties at the boundary kept); ``top_p`` in (0, 1] keeps the smallest set whose probability
    reaches it; ``guidance_scale`` is classifier-free guidance / min-dalle's supercondition factor
    (tasks without guidance reject it); ``seed`` makes sampling reproducible.

    Beam search (``num_beams > 1``, greedy only) and the repetition controls follow transformers'
    ``generate``: ``length_penalty`` divides a finished hypothesis' summed log-probabilities by its
    length ** length_penalty; ``early_stopping`` True stops a request once ``num_beams`` hypotheses
    are finished, False when the heuristic says no running beam can beat them, ``"never"`` only
    when none can; ``num_return_sequences`` (at most ``num_beams``) best hypotheses are returned per
    input. ``repetition_penalty`` (CTRL's rule: a token already in the sequence has its logit divided
    by it if positive, multiplied if negative) and ``no_repeat_ngram_size`` (no n-gram twice).

    The sampler computes in float32, so ``temperature``, ``guidance_scale`` and
    ``repetition_penalty`` must lie in ``[FLOAT32_TINY, FLOAT32_MAX]`` (about 1.2e-38 to 3.4e38;
    ``guidance_scale`` may also be 0) and ``top_p`` in ``[FLOAT32_TINY, 1]``: see :mod:`.limits`.
    ``top_k`` and ``seed`` fit int64.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float | None = None
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        # each field is checked and stored as a plain bool / int / float (numpy numbers are accepted),
        # so the sampler's float32 and int64 buffers take it without overflow
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InputError(f"do_sample must be True or False, got {show(self.do_sample)}")
        fields = {"do_sample": bool(self.do_sample),
                  "temperature": check_float32("temperature", self.temperature, FLOAT32_TINY, FLOAT32_MAX),
                  "top_k": check_int("top_k", self.top_k, 0, 2**63 - 1),
                  "top_p": check_float32("top_p", self.top_p, FLOAT32_TINY, 1.0)}
        if self.guidance_scale is not None:
            fields["guidance_scale"] = check_float32("guidance_scale", self.guidance_scale, FLOAT32_TINY, FLOAT32_MAX,
                                                     zero=True)
        if self.seed is not None:
            fields["seed"] = check_int("seed", self.seed, 0, 2**63 - 1)
        fields["num_beams"] = check_int("num_beams", self.num_beams, 1, MAX_BEAMS)
        fields["length_penalty"] = check_float32("length_penalty", self.length_penalty, -FLOAT32_MAX, FLOAT32_MAX)
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or (isinstance(self.early_stopping, str)
                                                                        and self.early_stopping == "never")):
            raise InputError(f"early_stopping must be True, False or 'never', got {show(self.early_stopping)}")
        fields["early_stopping"] = "never" if isinstance(self.early_stopping, str) else bool(self.early_stopping)
        fields["num_return_sequences"] = check_int("num_return_sequences", self.num_return_sequences, 1,
                                                   fields["num_beams"])
        fields["repetition_penalty"] = check_float32("repetition_penalty", self.repetition_penalty, FLOAT32_TINY,
                                                     FLOAT32_MAX)
        fields["no_repeat_ngram_size"] = check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0,
                                                   MAX_NEW_TOKENS)
        if fields["do_sample"] and fields["num_beams"] > 1:
            raise InputError("beam search samples no tokens: use num_beams > 1 with do_sample=False")
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def check_sampling(sampling) -> SamplingParams | None:
    """``sampling`` if it is a :class:`SamplingParams` or None; InputError otherwise (e.g. a dict)."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")
    return sampling


class Sampler:
    """Turns logits ``[B, V]`` (``[2B, V]`` with guidance: unconditioned rows, then conditioned) into
    next tokens ``[B]`` for ``batch`` rows, with :class:`SamplingParams` held as per-row device
    tensors (:meth:`load` puts another request's in place, so a captured CUDA graph sees them).

    The random stream is Philox keyed by each row's seed (a fresh 63-bit seed from OS entropy when
    ``params.seed`` is None) and counted by the row's stream index (``rows``, ``0..B-1`` unless
    :meth:`load` sets others) and the caller's step counter ``offset`` (a ``[1]`` or ``[B]`` int64
    device tensor): the same seed, row index, offset and model give the same token, also when a
    CUDA graph replays the call after the caller advanced ``offset`` on the device, and also for a
    row of a continuous batch that shares the call with rows of other requests. ``guidance`` says
    whether the task combines guided rows (then ``params.guidance_scale`` is required, otherwise
    rejected); ``vocab_limit`` restricts tokens to ``0..vocab_limit-1``.
    """

    FIELDS = ("temperature", "top_k", "top_p", "do_sample", "seeds", "rows", "guidance", "repetition_penalty",
              "no_repeat_ngram_size")

    def __init__(self, params: SamplingParams | None, batch: int, device: torch.device, guidance: bool = False,
                 vocab_limit: int | None = None):
        def rows(dtype):
            return torch.empty(batch, dtype=dtype, device=device)

        self.temperature, self.top_p = rows(torch.float32), rows(torch.float32)
        self.top_k, self.seeds = rows(torch.int64), rows(torch.int64)
        self.do_sample = rows(torch.bool)
        self.repetition_penalty, self.no_repeat_ngram_size = rows(torch.float32), rows(torch.int64)
        self.rows = torch.arange(batch, dtype=torch.int64, device=device)
        self.guidance = rows(torch.float32) if guidance else None
        self.vocab_limit = vocab_limit
        self.drawn = None  # see draw_ahead
        self.load(params)

    def load(self, params: SamplingParams | None, index=None, stream_rows=None) -> None:
        """Take ``params`` (None: greedy) for every row, or for the rows ``index`` (then ``greedy``
        and ``penalize`` are left to the caller), in place; ``stream_rows`` (with ``index``) are those rows' indices
        in the random stream, as in the request's own batch."""
        params = check_sampling(params) or SamplingParams()
        if self.guidance is not None and params.guidance_scale is None:
            raise InputError("this task needs guidance_scale")
        if self.guidance is None and params.guidance_scale is not None:
            raise InputError("guidance_scale is not supported by this task")
        if params.num_beams > 1:
            raise InputError("beam search is not supported by this task")
        penalize = params.repetition_penalty != 1 or params.no_repeat_ngram_size > 0
        if penalize and self.guidance is not None:
            raise InputError("repetition_penalty and no_repeat_ngram_size are not supported by this task")
        at = slice(None) if index is None else index
        self.temperature[at] = params.temperature
        self.top_k[at] = params.top_k
        self.top_p[at] = params.top_p
        self.do_sample[at] = params.do_sample
        self.seeds[at] = secrets.randbits(63) if params.seed is None else params.seed
        if self.guidance is not None:
            self.guidance[at] = params.guidance_scale
        self.repetition_penalty[at] = params.repetition_penalty
        self.no_repeat_ngram_size[at] = params.no_repeat_ngram_size
        if index is None:
            self.greedy = not params.do_sample  # host-known: no row samples, the sampler only takes argmaxes
            self.penalize = penalize  # host-known: some row has repetition controls
        if stream_rows is not None:
            self.rows[at] = torch.as_tensor(stream_rows, dtype=torch.int64)

    def view(self, index) -> Sampler:
        """A sampler over the rows ``index`` (a slice gives views of these tensors, an index tensor
        copies); ``greedy`` and ``penalize`` are the caller's to set."""
        sub = copy.copy(self)
        for name in self.FIELDS:
            if getattr(self, name) is not None:
                setattr(sub, name, getattr(self, name)[index])
        return sub

    def __call__(self, logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if self.drawn is not None and not self.greedy:
            return sample_drawn(logits, self.temperature, self.top_k, self.top_p, self.do_sample, offset,
                                self.guidance, self.vocab_limit, self.drawn)
        # while a recording is made (runtime.recorded) the shapes are traced values that ops.sample's
        # shape checks cannot compare; the runtime's own tensors are right by construction
        sample = dispatch("sample", logits) if torch.jit.is_tracing() else ops.sample
        return sample(logits, self.temperature, self.top_k, self.top_p, self.do_sample, self.seeds, offset,
                      self.guidance, self.vocab_limit, self.greedy, self.rows)

    def draw_ahead(self, offsets: int, vocab: int, capacity: int | None = None) -> bool:
        """CPU: draw the random numbers of the steps at offsets ``0..offsets-1`` up front, as Gumbel
        noise ``drawn [B, capacity (default offsets), n] = log(-log(u))`` (``n = vocab_limit or
        vocab``; the offsets from ``offsets`` on are left unset; one call of
        :func:`~mmgen_engine.ops.random.uniform_cpu`), so that a step samples without a host call
        (:func:`~mmgen_engine.ops.sampling.sample_drawn`, one native call where built) instead of
        ``ops.sample``'s reference, which draws only the tokens its filters keep, per step. Only where
        ``ops.sample`` dispatches to that reference and the table holds at most
        :data:`DRAW_AHEAD_MAX` numbers; returns whether it drew (else ``drawn`` is None)."""
        self.drawn = None
        n = vocab if self.vocab_limit is None else self.vocab_limit
        batch = self.seeds.shape[0]
        capacity = offsets if capacity is None else capacity
        if (self.greedy or self.seeds.device.type != "cpu" or batch * capacity * n > DRAW_AHEAD_MAX
                or dispatch("sample", self.temperature) is not sample_reference):
            return False
        # one call over the whole (row, offset, token) grid: the counters of the per-step draws
        grid = (batch, offsets, n)
        u = uniform_cpu(self.seeds[:, None, None].expand(grid), torch.arange(offsets)[None, :, None].expand(grid),
                          self.rows[:, None, None].expand(grid), torch.arange(n)[None, None, :].expand(grid))
        self.drawn = torch.zeros(batch, capacity, n)
        torch.log(-torch.log(u), out=self.drawn[:, :offsets])
        return True


# the largest table Sampler.draw_ahead makes (float32 numbers; ~0.5 ms natively on the 2-core box)
DRAW_AHEAD_MAX = 1 << 16
