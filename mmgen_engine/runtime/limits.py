"""Request limits and the value checks that the pipelines and the CLI share.

A request is checked before any work is done for it (before the CLI loads a model, before an image
is decoded or a buffer allocated), so an absurd request fails at once with one line that names the
option and the limit instead of running out of memory minutes later. The limits sit far above
ordinary use:

- :data:`MAX_IMAGES_PER_CALL` 256: images captioned, generated or decoded by one call, prompts of
  one call and ``images_per_prompt`` (``mmgen txt2img --grid`` up to 16; ``mmgen caption`` splits
  longer image lists into calls of this size).
- :data:`MAX_NEW_TOKENS` 4096: tokens one row may generate (the supported models have at most 1024
  positions; min-dalle draws 256 image tokens).
- :data:`MAX_PROMPT_CHARS` 4096 and :data:`MAX_PROMPT_TOKENS` 1024: a text prompt (min-dalle cuts
  its prompts to 64 tokens anyway).
- :data:`MAX_RESIZED_PIXELS` 2**26: an image after a shortest-edge resize (CLIP's processor scales
  the shorter side, so a 1 x 40000 image would become 224 x 8960000, 5.6 GiB of RGB, before its
  center crop): an aspect ratio beyond about 1300:1 at 224 pixels is refused.
- :data:`MAX_TOKEN_GRID_SIDE` 128 and :data:`MAX_IMAGE_TOKENS_PER_CALL` 2**18: image-token grids
  (min-dalle's is 16 x 16, the dVAE's 32 x 32; a 128 x 128 VQGAN grid is a 2048 x 2048 image).

Float options are refused where float32, the dtype the sampler computes in, would overflow them to
infinity or flush them to zero (a ``top_p`` of 1e-46 is 0 in float32, a ``temperature`` of 1e300 is
infinite): a positive value must lie in ``[FLOAT32_TINY, FLOAT32_MAX]``.
"""
from __future__ import annotations

import numbers
import reprlib

import numpy as np

from ..errors import InputError

MAX_IMAGES_PER_CALL = 256
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 4096
MAX_PROMPT_TOKENS = 1024
MAX_RESIZED_PIXELS = 2 ** 26
MAX_TOKEN_GRID_SIDE = 128
MAX_IMAGE_TOKENS_PER_CALL = 2 ** 18

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e+38
FLOAT32_TINY = float(np.finfo(np.float32).smallest_normal)  # 1.1754944e-38 (its reciprocal is finite too)


def show(value) -> str:
    """``repr(value)`` cut to a few dozen characters, for one-line error messages."""
    try:
        return reprlib.repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"an integer of {value.bit_length()} bits"


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an ``int`` if it is an integer (a Python or numpy integer; a bool is not) in
    ``[low, high]``; otherwise InputError naming ``name`` and the range."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}], got {show(value)}")
    return int(value)


def check_float32(name: str, value, low: float, high: float, zero: bool = False) -> float:
    """``value`` as a ``float`` if it is a real number (a Python, numpy or ``Fraction`` number; not a
    bool) in ``[low, high]``, or exactly 0 when ``zero``; otherwise InputError naming ``name`` and
    the range. ``low >= FLOAT32_TINY`` and ``high <= FLOAT32_MAX`` keep the value finite and nonzero
    in float32."""
    x = float("nan")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            x = float(value)
        except OverflowError:  # an int or Fraction beyond float64
            x = float("inf")
    if not (low <= x <= high or (zero and x == 0)):
        allowed = f"0 or a number in [{low:.8g}, {high:.8g}]" if zero else f"a number in [{low:.8g}, {high:.8g}]"
        raise InputError(f"{name} must be {allowed} (float32 without overflow or underflow), got {show(value)}")
    return x


def check_count(what: str, count: int, limit: int = MAX_IMAGES_PER_CALL) -> None:
    """InputError if a call asks for more than ``limit`` ``what`` (e.g. "images")."""
    if count > limit:
        raise InputError(f"{count} {what} in one call; at most {limit} (split the request)")


def check_new_tokens(max_new_tokens, min_new_tokens=0) -> tuple[int, int]:
    """``(max_new_tokens, min_new_tokens)`` as ints: ``1 <= max_new_tokens <= MAX_NEW_TOKENS`` and
    ``0 <= min_new_tokens <= max_new_tokens``; InputError otherwise."""
    max_new = check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    return max_new, check_int("min_new_tokens", min_new_tokens, 0, max_new)


def check_prompt(prompt, name: str = "prompt") -> str:
    """``prompt`` if it is a ``str`` of at most :data:`MAX_PROMPT_CHARS` characters that UTF-8 can
    encode (the tokenizers take UTF-8; a lone surrogate has no encoding); InputError otherwise."""
    if not isinstance(prompt, str):
        hint = " (decode bytes to str first)" if isinstance(prompt, (bytes, bytearray)) else ""
        raise InputError(f"{name} must be a string, got {type(prompt).__name__}{hint}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{name} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    return prompt
