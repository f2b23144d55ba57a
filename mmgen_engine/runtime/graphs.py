"""CUDA graphs of the decode step, one per batch bucket.

A decode step is a few dozen small kernels per layer; launched one by one from Python, the launch
overhead, not the GPU, sets the speed. :class:`CUDAGraphs` captures the whole step (all layers,
the head and the sampler: :func:`~mmgen_engine.runtime.generate.decode_step`) once per
(batch bucket, encoder length) on static buffers sized for the model's longest sequence, and
replays it. The prefill, which fills the caches, stays eager and writes into the same buffers.
Nothing in a step depends on host values that change per token: positions, lengths, the step index
and the sampler's RNG counter are device tensors the step itself advances, so replays and eager
steps compute the same thing.
"""
from __future__ import annotations

from typing import Callable

import torch

from .generate import DecodeState, decode_step

WARMUP_STEPS = 2  # run before capture: compiles Triton kernels and creates library handles


class CUDAGraphs:
    """Captured decode steps of one decoder (weights on one CUDA device, one dtype)."""

    def __init__(self, decoder, dtype: torch.dtype, device: torch.device):
        self.decoder, self.dtype, self.device = decoder, dtype, torch.device(device)
        self._graphs: dict[tuple[int, int, int, int], tuple[DecodeState, Callable[[], None]]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, batch: int, enc_len: int, eos: int, pad: int) -> tuple[DecodeState, Callable[[], None]]:
        """The static state for ``batch`` rows (a bucket size) and a function replaying one step on it
        (``eos`` and ``pad`` ids are part of the captured step)."""
        key = (batch, enc_len, eos, pad)
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        return self._graphs[key]

    @torch.inference_mode()
    def _capture(self, batch: int, enc_len: int, eos: int, pad: int):
        max_positions = self.decoder.cache_geometry()[3]
        st = DecodeState.allocate(self.decoder, batch, max_positions, enc_len, max_positions, self.dtype,
                                  self.device, eos, pad)
        st.cache.span = max_positions
        # warm up on a side stream (as torch.cuda.graphs requires); the steps write garbage into the
        # state, which generate() resets before every request
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                decode_step(self.decoder, st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_step(self.decoder, st)
        return st, graph.replay
