"""A checkpoint's generation defaults as the pipelines use them (the ``generation_defaults`` block of
``config.json``, :class:`~mmgen_engine.config.GenerationDefaults`).

An argument a call leaves out (``sampling=None``, ``max_new_tokens=None``) takes the checkpoint's
default, and where the checkpoint has none (an older checkpoint without the block, or a block that
leaves the part out) the task's built-in default,
:data:`~mmgen_engine.config.BUILTIN_GENERATION_DEFAULTS`: explicit argument > checkpoint > built-in.
"""
from __future__ import annotations

from ..config import BUILTIN_GENERATION_DEFAULTS
from ..errors import CheckpointError, InputError
from ..runtime.sampler import SamplingParams


def builtin_sampling(task: str) -> SamplingParams:
    """The built-in ``sampling=None`` of ``task``: what a checkpoint without defaults uses."""
    return SamplingParams(**BUILTIN_GENERATION_DEFAULTS[task]["sampling"])


def default_sampling(config, where: str = "config.json") -> SamplingParams:
    """The :class:`SamplingParams` of ``sampling=None`` for a checkpoint with task config ``config``: its
    block's sampling, else the task's built-in one. A block the sampler refuses (the config's schema
    repeats its checks, so this is a safety net) is a one-line CheckpointError naming ``where``."""
    block = config.generation_defaults
    if block is None or block.sampling is None:
        return builtin_sampling(config.task)
    try:
        return SamplingParams(**block.sampling.fields())
    except InputError as e:
        raise CheckpointError(f"{where}: generation_defaults.sampling: {e}") from None


def default_new_tokens(config, prompt_length: int) -> tuple[int, int]:
    """``(max_new_tokens, min_new_tokens)`` of a captioning call that leaves them out, whose decoder
    prompt (start token and text prompt) is ``prompt_length`` tokens: the checkpoint's block (its
    ``max_length`` / ``min_length`` count the prompt, as transformers' do), else the built-in 20 and 0;
    the minimum is cut to the maximum."""
    builtin = BUILTIN_GENERATION_DEFAULTS[config.task]
    top, low = (None, None) if config.generation_defaults is None else \
        config.generation_defaults.new_tokens(prompt_length)
    top = builtin["max_new_tokens"] if top is None else top
    low = builtin["min_new_tokens"] if low is None else low
    return top, min(low, top)
