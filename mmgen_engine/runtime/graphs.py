"""CUDA graphs: the decode step per batch bucket, the prefill per prompt length, and any tensor
function (an encoder) per input shape.

A decode step is a few dozen small kernels per layer, and a prefill or encoder pass a few hundred;
launched one by one from Python, the launch overhead, not the GPU, sets the speed. Each of these is
captured once on static buffers and replayed:

- :class:`CUDAGraphs` holds, per (batch bucket, encoder length, eos, pad), a
  :class:`~mmgen_engine.runtime.generate.DecodeState` sized for the model's longest sequence, the
  captured :func:`~mmgen_engine.runtime.generate.decode_step` (all layers, the head and the
  sampler) and, per prompt length, the captured prefill + first pick, whose inputs are copied into
  static buffers before a replay.
- :class:`GraphedCall` captures ``fn(x)`` per input shape (the pipelines' image encoders).

Nothing captured depends on host values that change per request or token: positions, lengths, the
step index, sampling parameters and the sampler's RNG counter are device tensors, so a replay
computes exactly what the same calls made eagerly compute.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .decoder import Decoder
from .generate import DecodeState, decode_step, pick

WARMUP_CALLS = 2  # before capture: compiles Triton kernels and creates library handles


def capture(fn: Callable, device: torch.device):
    """Run ``fn()`` a few times on a side stream, then capture one call; returns ``(replay, output)``
    where ``output`` is what the captured call returned (static tensors a replay overwrites)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedCall:
    """``fn(x)`` of one tensor, replayed from a CUDA graph captured per input shape and dtype. The
    result is a static tensor, overwritten by the next call: use it before calling again."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self._graphs: dict = {}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            static = x.clone()
            replay, out = capture(lambda: self.fn(static), x.device)
            self._graphs[key] = (static, replay, out)
        static, replay, out = self._graphs[key]
        static.copy_(x)
        replay()
        return out


class DecodeGraphs:
    """One bucket: its state and its captured decode steps and prefills. Each exists in variants for
    greedy requests (the sampler only takes argmaxes) and sampling ones, with and without repetition
    controls, chosen by the state's ``sampler.greedy`` and ``sampler.penalize`` when called."""

    def __init__(self, decoder: Decoder, state: DecodeState, device: torch.device):
        self.decoder, self.state, self.device = decoder, state, device
        self._steps: dict = {}
        self._prefills: dict = {}

    def _capture(self, fn):
        self.state.cache.span = self.state.cache.k.shape[3]  # static: the whole cache
        return capture(fn, self.device)[0]

    def step(self) -> Callable[[], None]:
        """A function replaying one captured decode step (captured on first use of the mode)."""
        mode = self.state.sampler.greedy, self.state.sampler.penalize
        if mode not in self._steps:
            self._steps[mode] = self._capture(lambda: decode_step(self.decoder, self.state))
        return self._steps[mode]

    def prefill(self, prompt: torch.Tensor, encoder_states: torch.Tensor) -> Callable[[], None]:
        """A function replaying the captured ``pick(prefill(prompt, encoder_states))`` on the state for
        these inputs (padded to the bucket already). Capture, on first use of the shapes and mode,
        writes into the state: call this and :meth:`step` before resetting the state, and the
        returned functions after."""
        key = (tuple(prompt.shape), tuple(encoder_states.shape), self.state.sampler.greedy, self.state.sampler.penalize)
        if key not in self._prefills:
            st = self.state
            tokens, states = prompt.clone(), encoder_states.clone()
            replay = self._capture(lambda: pick(self.decoder.prefill(tokens, states, st.cache, st.cross), st))
            self._prefills[key] = (tokens, states, replay)
        tokens, states, replay = self._prefills[key]

        def run():
            tokens.copy_(prompt)
            states.copy_(encoder_states)
            replay()
        return run


class CUDAGraphs:
    """Captured decode steps and prefills of one decoder (weights on one CUDA device, one dtype)."""

    def __init__(self, decoder: Decoder, dtype: torch.dtype, device: torch.device, guided: bool = False,
                 vocab_limit: int | None = None):
        self.decoder, self.dtype, self.device = decoder, dtype, torch.device(device)
        self.guided, self.vocab_limit = guided, vocab_limit  # as generate() is called with
        self._buckets: dict[tuple, DecodeGraphs] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    @torch.inference_mode()
    def get(self, batch: int, enc_len: int, eos: int | None, pad: int) -> DecodeGraphs:
        """The bucket for ``batch`` rows (a bucket size); ``eos`` and ``pad`` are part of its graphs.
        Capturing writes garbage into the state, which ``generate`` resets before every request."""
        key = (batch, enc_len, eos, pad)
        if key not in self._buckets:
            max_positions = self.decoder.cache_geometry()[3]
            st = DecodeState.allocate(self.decoder, batch, max_positions, enc_len, max_positions, self.dtype,
                                      self.device, eos, pad, self.guided, self.vocab_limit)
            self._buckets[key] = DecodeGraphs(self.decoder, st, self.device)
        return self._buckets[key]
