"""The swappable calls of a pipeline: its one-shot stages and its decode loop.

A pipeline calls each stage that runs once per request (an encoder, the image detokenizer, the
motion decoder) through ``self.stages[name]``, named as the ONNX parts of
:data:`mmgen_engine.onnx.PARTS` are, with the part's inputs and output (the text encoder takes the
rows alone and masks their padding itself); and its autoregressive loop through
:meth:`Stages.decode_stream`, :func:`mmgen_engine.runtime.generate_stream` without the decoder and
the graphs. By default these are the engine's own; :meth:`Stages.use_stages` and
:meth:`Stages.use_runtime` put others in their place (``mm.load(..., stage_backend="onnxruntime",
runtime="onnxruntime")``: ONNX Runtime sessions, see :mod:`mmgen_engine.onnx.backend`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import InputError
from ..runtime import GraphedCall, generate_stream

BACKENDS = ("engine", "onnxruntime")


class Stages:
    """Mixin of the pipelines: ``stages`` ``{part: callable}``, ``stage_backend`` and ``runtime`` (who
    runs them: "engine" or "onnxruntime"), :meth:`stage` and :meth:`decode_stream`."""

    def _init_stages(self, stages: dict[str, Callable], graphed: tuple[str, ...] = ()) -> None:
        """``stages``: the engine's callables; ``graphed``: those replayed from a CUDA graph per input
        shape on a CUDA device while ``use_cuda_graphs`` is true."""
        self.stages = dict(stages)
        cuda = self.device.type == "cuda"
        self._graphed_stages = {name: GraphedCall(stages[name]) for name in graphed} if cuda else {}
        self.stage_backend = self.runtime = "engine"
        self.onnx_dir = None  # the ONNX export ONNX Runtime runs from, when it runs stages or the decoder
        self._runtime_stream = None

    def stage(self, name: str) -> Callable:
        """The callable that runs stage ``name`` now: its CUDA-graphed form where it has one and
        ``use_cuda_graphs`` is on, else ``stages[name]``."""
        graphed = self._graphed_stages.get(name)
        return graphed if graphed is not None and self.use_cuda_graphs else self.stages[name]

    def use_stages(self, stages: dict[str, Callable], backend: str) -> None:
        """Run the stages ``{name: callable}`` with these callables (never CUDA-graphed by the engine)."""
        unknown = set(stages) - set(self.stages)
        if unknown:
            raise InputError(f"a {self.task} pipeline has no stage {', '.join(sorted(unknown))}; it has "
                             f"{', '.join(self.stages)}")
        for name, fn in stages.items():
            self.stages[name] = fn
            self._graphed_stages.pop(name, None)
        self.stage_backend = backend

    def use_runtime(self, stream: Callable[..., Iterator[torch.Tensor]], backend: str) -> None:
        """Decode with ``stream(prompt, encoder_states, encoder_lengths, max_new_tokens, **options)``
        (the arguments and yields of :func:`~mmgen_engine.runtime.generate_stream` without the
        decoder and the graphs)."""
        self._runtime_stream = stream
        self.runtime = backend

    def decode_stream(self, prompt: torch.Tensor, encoder_states: torch.Tensor, encoder_lengths: torch.Tensor,
                      max_new_tokens: int, **options) -> Iterator[torch.Tensor]:
        """:func:`~mmgen_engine.runtime.generate_stream` over this pipeline's decoder (its CUDA graphs
        where ``use_cuda_graphs``), or the runtime put in its place by :meth:`use_runtime`."""
        if self._runtime_stream is not None:
            return self._runtime_stream(prompt, encoder_states, encoder_lengths, max_new_tokens, **options)
        return generate_stream(self.model.decoder, prompt, encoder_states, encoder_lengths, max_new_tokens,
                               graphs=self._graphs if self.use_cuda_graphs else None, **options)

    def decode_ids(self, *args, **options) -> torch.Tensor:
        """The tokens :meth:`decode_stream` ends with ``[B, max_new_tokens]``."""
        for tokens in self.decode_stream(*args, **options):
            pass
        return tokens
