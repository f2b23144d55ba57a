"""Recorded CPU decode steps: a decoder's ``decode_step`` replayed without Python.

On CPU a small decoder's step is bound by Python, not by arithmetic: a step of the speech-to-gesture
demo model (3 layers, width 128) is ~1500 ATen calls made through modules, the dispatch table and
shape checks, ~1.0 ms on the 2-core CPU box, while the same calls replayed from a recording take
~0.37 ms (benchmarks/RESULTS.md, "Per-step overhead on CPU"). A recording is made with
``torch.jit.trace``: it holds exactly the ATen calls the eager step made, on the same kernels and
shapes, so a replay's logits and cache writes are bitwise those of the eager step (tokens never
change); the graph executor's optimizations are switched off around replays so that nothing fuses or
reorders them.

A recording is valid only for what it was made with: the rows, the cache's and the cross cache's
shapes and strides, ``cache.span`` (the slots a step reads: one recording per span, since reading
more slots under a mask rounds differently), the dtype, the backend table (``MMGEN_BACKEND``) and the
thread count (``ops.linear`` splits by threads). Those are the key. The weights are held by
reference: replacing a parameter's tensor (``p.data = ...``) after a recording leaves it stale, so
build a new :class:`RecordedSteps` after changing a model.

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

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..ops.registry import ENV_VAR
from .decoder import Decoder
from .kv_cache import CrossKVCache, KVCache

AVAILABLE = hasattr(torch, "jit") and hasattr(torch.jit, "trace")
RECORD_AFTER = 32  # eager runs of a key before it is recorded (a recording costs ~50 of them)
MAX_RECORDINGS = 128  # least recently used recordings beyond this are dropped


class RecordedSteps:
    """``decoder.decode_step(tokens, positions, cache, cross) -> logits`` (calling it) and
    ``decoder.prefill`` (:meth:`prefill`) for CPU tensors, run eagerly or, once a key (see the module
    docstring) has run ``record_after`` times (0: at once), replayed from a recording."""

    def __init__(self, decoder: Decoder, record_after: int = RECORD_AFTER, max_recordings: int = MAX_RECORDINGS):
        self.decoder = decoder
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

    def _run(self, kind: str, fn: Callable, span: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        key = (kind, tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs), span,
               os.environ.get(ENV_VAR, ""), torch.get_num_threads())
        replay = self._recorded.get(key)
        if replay is None:
            runs = self._runs.get(key, 0)
            if not AVAILABLE or runs < self.record_after or inputs[0].device.type != "cpu":
                self._runs[key] = runs + 1
                return fn(*inputs)
            replay = self._record(fn, inputs)
            self._runs.pop(key, None)
            self._recorded[key] = replay
            if len(self._recorded) > self.max_recordings:
                self._recorded.popitem(last=False)
        else:
            self._recorded.move_to_end(key)
        with torch.jit.optimized_execution(False):
            return replay(*inputs)

    @staticmethod
    def _record(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Callable:
        # the recording run writes the step's K/V into the caches; the replay that follows writes the
        # same values into the same slots
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with torch.jit.optimized_execution(False):
                return torch.jit.trace(fn, inputs, check_trace=False)
