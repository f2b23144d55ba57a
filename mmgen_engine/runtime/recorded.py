"""Recorded CPU decode steps: a decoder's ``decode_step`` replayed without Python.

On CPU a small decoder's step is bound by Python, not by arithmetic: a step of the speech-to-gesture
demo model (3 layers, width 128) is ~1500 ATen calls made through modules, the dispatch table and
shape checks, ~1.0 ms on the 2-core CPU box, while the same calls replayed from a recording take
~0.37 ms (benchmarks/RESULTS.md, "Per-step overhead on CPU"). (Such a small GPT-2 now takes its whole
step as one native call, :mod:`mmgen_engine.ops.decoder_step`, and a sampled pick another,
:func:`mmgen_engine.ops.sampling.sample_drawn`: a recording of its step holds those two calls and the
loop's bookkeeping; every other decoder's recording holds its ATen calls.) A recording is made with
``torch.jit.trace``: it holds exactly the ATen calls the eager step made, on the same kernels and
shapes, so a replay's logits and cache writes are bitwise those of the eager step (tokens never
change); the graph executor's optimizations are switched off around replays so that nothing fuses or
reorders them.

A recording is valid only for what it was made with: the rows, the cache's and the cross cache's
shapes and strides, ``cache.span`` (the slots a step reads: one recording per span, since reading
more slots under a mask rounds differently), the dtype, the backend table (``MMGEN_BACKEND``,
``MMGEN_CPU_NATIVE_STEP``) and the thread count (``ops.linear`` splits by threads). Those are the
key. The weights are held by reference: replacing a parameter's tensor (``p.data = ...``) after a
recording leaves it stale, so build a new :class:`RecordedSteps` after changing a model.

:meth:`RecordedSteps.bind` records any function of a loop's tensors the same way:
:func:`~mmgen_engine.runtime.generate.generate_stream` records a whole step with it - the decoder's
step, the pick of the next tokens and the bookkeeping - so a replay is one call without Python (the
sampler's random numbers are drawn ahead for that, :meth:`~.sampler.Sampler.draw_ahead`).
``span_bucket`` > 1 makes the loop read the cache in spans rounded up to a multiple of it (the
unused slots masked), so that the steps of a request share a few recordings and a one-off request
replays too; the rounding of a wider masked read can differ from the exact span's in the last bit,
so tokens equal the eager loop's only where no two logits are that close (the default, 1, reads
exact spans: bitwise the eager loop).

Recording a step costs about 50 eager steps (~50 ms on the demo model), so a key is recorded only
once it has run eagerly ``record_after`` times (rent, then buy: a one-off request with few steps of
a shape never records it, a repeated one is soon replayed). Where ``torch.jit`` is missing
(a torch without TorchScript) every step runs eagerly.

Why not ``torch.compile``: its C++ backend fuses further, but compiles for ~20 s on that box,
rounds differently (tokens would change), and ``ops.linear``'s thread-count query breaks its graph
into one per layer, which ran slower than eager (1.5 ms against 1.0 ms, measured). ``torch.export``
replays its graph from Python, op by op. ``torch.jit.trace`` is deprecated in torch 2.x; its
warning is silenced here, and :data:`AVAILABLE` turns the recordings off where it is gone.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..ops.registry import ENV_VAR, NATIVE_STEP_ENV
from .decoder import Decoder
from .kv_cache import CrossKVCache, KVCache

AVAILABLE = hasattr(torch, "jit") and hasattr(torch.jit, "trace")
RECORD_AFTER = 32  # eager runs of a key before it is recorded (a recording costs ~50 of them)
MAX_RECORDINGS = 128  # least recently used recordings beyond this are dropped


class RecordedSteps:
    """``decoder.decode_step(tokens, positions, cache, cross) -> logits`` (calling it),
    ``decoder.prefill`` (:meth:`prefill`) and a loop's own steps (:meth:`bind`) for CPU tensors, run
    eagerly or, once a key (see the module docstring) has run ``record_after`` times (0: at once),
    replayed from a recording. ``span_bucket``: the multiple the decode loop rounds its CPU spans up
    to (1: exact spans)."""

    def __init__(self, decoder: Decoder, record_after: int = RECORD_AFTER, max_recordings: int = MAX_RECORDINGS,
                 span_bucket: int = 1):
        self.decoder = decoder
        self.span_bucket = span_bucket
        self.record_after, self.max_recordings = record_after, max_recordings
        self._runs: dict[tuple, int] = {}
        self._recorded: OrderedDict[tuple, Callable] = OrderedDict()

    def __len__(self) -> int:
        """The recordings held."""
        return len(self._recorded)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 cross: CrossKVCache) -> torch.Tensor:
        decoder = self.decoder
        span = cache.span

        def step(tokens, positions, k, v, cross_k, cross_v, cross_lengths):
            return decoder.decode_step(tokens, positions, KVCache(k, v, span),
                                       CrossKVCache(cross_k, cross_v, cross_lengths))

        return self._run("step", step, span, (tokens, positions, cache.k, cache.v, cross.k, cross.v, cross.lengths))

    def prefill(self, tokens: torch.Tensor, encoder_states: torch.Tensor, cache: KVCache,
                cross: CrossKVCache) -> torch.Tensor:
        """``decoder.prefill`` (the same keys, the prompt's and the encoder states' shapes in them)."""
        decoder = self.decoder

        def prefill(tokens, encoder_states, k, v, cross_k, cross_v, cross_lengths):
            return decoder.prefill(tokens, encoder_states, KVCache(k, v, cache.span),
                                   CrossKVCache(cross_k, cross_v, cross_lengths))

        return self._run("prefill", prefill, cache.span,
                         (tokens, encoder_states, cache.k, cache.v, cross.k, cross.v, cross.lengths))

    def bind(self, kind: str, make: Callable[[int], Callable], inputs: tuple[torch.Tensor, ...],
             extra: tuple = ()) -> Callable[[int], object]:
        """``run(span)`` for a loop that calls the same function on the same tensors at every step:
        ``make(span)(*inputs)``, eager or replayed as :meth:`__call__` is. The key is made once here,
        from ``inputs`` and ``extra`` (what ``make``'s function reads from the host besides ``span``:
        it is baked into a recording), plus ``span`` per call."""
        base = (kind, _shapes(inputs), extra, os.environ.get(ENV_VAR, ""), torch.get_num_threads(),
                os.environ.get(NATIVE_STEP_ENV, ""))
        return lambda span: self._replay(base + (span,), lambda: make(span), inputs)

    def _run(self, kind: str, fn: Callable, span: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        key = (kind, _shapes(inputs), (), os.environ.get(ENV_VAR, ""), torch.get_num_threads(),
               os.environ.get(NATIVE_STEP_ENV, ""), span)
        return self._replay(key, lambda: fn, inputs)

    def _replay(self, key: tuple, make: Callable[[], Callable], inputs: tuple[torch.Tensor, ...]):
        replay = self._recorded.get(key)
        if replay is None:
            runs = self._runs.get(key, 0)
            if (not AVAILABLE or runs < self.record_after or inputs[0].device.type != "cpu"
                    or not _reference_backends(key[3])):
                self._runs[key] = runs + 1
                return make()(*inputs)
            replay, result = self._record(make(), inputs)
            self._runs.pop(key, None)
            self._recorded[key] = replay
            if len(self._recorded) > self.max_recordings:
                self._recorded.popitem(last=False)
            return result
        self._recorded.move_to_end(key)
        with torch.jit.optimized_execution(False):
            return replay(*inputs)

    @staticmethod
    def _record(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> tuple[Callable, object]:
        """The recording of ``fn`` and what the run that made it returned: that run is the step
        (its writes into the input tensors happened once, as an eager step's do)."""
        result = []

        def run(*args):
            result.append(fn(*args))
            return result[-1]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with torch.jit.optimized_execution(False):
                return torch.jit.trace(run, inputs, check_trace=False), result[0]

def _shapes(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)


@functools.lru_cache(maxsize=64)
def _reference_backends(forced: str) -> bool:
    """Whether ``MMGEN_BACKEND=forced`` leaves every op on its plain-torch reference: the Triton
    interpreter (what forcing ``triton`` runs on CPU) cannot be traced, so steps then run eagerly."""
    value = forced.strip().lower()
    items = value.split(",") if "=" in value else [f"={value}"]
    return all(item.partition("=")[2].strip() in ("", "reference") for item in items)
