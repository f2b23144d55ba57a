"""A small decoder's whole decode step as one native call on CPU (csrc/cpu/decoder_step.cpp).

A decoder of a few million parameters is bound on CPU by the number of tensor ops per step, not by
arithmetic or bytes: the speech-to-gesture demo decoder (3 layers, 128 wide) makes ~400 ops per
token, 1-3 us each even replayed from a recording, for ~0.75 M multiply-adds. The native step runs
the GPT-2 block's math - embedding, LayerNorms, projections, attention over the KV cache with the
new K/V written into it, cross-attention, MLP, final LayerNorm, head - as plain loops over the
weights in place, on the calling thread. Its spec is the decoder's own per-op step (the ops of this
package): the same float32 math in another summation order (logits within ~1e-6 relative;
``tests/test_decoder_step.py`` compares them over awkward shapes).

It runs where :func:`native_step` finds it can: a CPU step in float32 with plain float32 weights
(no int8, no bf16 storage), a decoder of at most :data:`MAX_BYTES` of weights (larger ones are bound
by streaming their weights, which the per-op path splits over every core), the native library
built with it, and neither ``MMGEN_BACKEND`` forcing one backend for every op (then the per-op path
runs) nor ``MMGEN_CPU_NATIVE_STEP=0`` set, and not while ``torch.compile`` / ``torch.export`` trace
the step. Under ``torch.jit.trace`` (the recorded CPU steps,
:mod:`mmgen_engine.runtime.recorded`) the call goes through the torch op ``mmgen::decoder_step``,
which the tracer records as one node.

The weights are read through pointers with the GIL released: a step holds aliases of the tensors it
was built from (their storage outlives a ``p.data = ...`` swap, so a recording replayed after one
runs on the old weights, as a recording of the per-op step would: build a new
:class:`~mmgen_engine.runtime.recorded.RecordedSteps` after changing a model), but changing a
model's weights while another thread runs a step of it is not supported.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import NATIVE_STEP_ENV, native_library, native_step_allowed

_C = native_library() if hasattr(native_library(), "DecoderStep") else None
ENV_VAR = NATIVE_STEP_ENV  # "0": every step through the per-op path
# Decoders above this many bytes of weights take the per-op path: their step streams the weights
# from memory, which ops.linear splits over every core while the native step runs on one
# (benchmarks/RESULTS.md, "Per-step overhead on CPU").
MAX_BYTES = 32 << 20
ACTIVATIONS = {"none": 0, "tanh": 1, "sigmoid": 2}  # ops.bias_gelu's forms


@dataclass
class StepSpec:
    """A GPT-2-style decoder for the native step: pre-LayerNorm blocks ``h += out(attn(ln1(h)))``,
    optionally ``h += cross_out(cross(lnx(h)))``, ``h += fc2(act(fc1(ln2(h)) + fc1_b))``; logits
    ``ln_f(h) head^T``. ``layers``: per block the tensors under the names of the native binding
    (``ln1_w, ln1_b, qkv, qkv_b, out, out_b, [lnx_w, lnx_b, cross_q, cross_q_b, cross_out,
    cross_out_b], ln2_w, ln2_b, fc1, fc1_b, fc2, fc2_b``) and its attention ``scale``;
    ``activation`` a key of :data:`ACTIVATIONS`."""

    heads: int
    eps: float
    activation: str
    wte: torch.Tensor
    wpe: torch.Tensor
    head: torch.Tensor
    ln_f: tuple[torch.Tensor, torch.Tensor]
    layers: list[dict]

    def tensors(self) -> list[torch.Tensor]:
        return [self.wte, self.wpe, self.head, *self.ln_f] + [
            t for layer in self.layers for t in layer.values() if isinstance(t, torch.Tensor)]


def _matrix(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    return (t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1))


class NativeDecoderStep:
    """``step(tokens, positions, k, v, span, cross_k, cross_v, cross_lengths) -> logits [R, V]``: a
    decoder's ``decode_step`` (the arguments of :class:`~mmgen_engine.runtime.kv_cache.KVCache` and
    :class:`~mmgen_engine.runtime.kv_cache.CrossKVCache`, no cross cache for a decoder without
    cross-attention) in one native call. Holds aliases of the weights (never copies)."""

    _live: weakref.WeakValueDictionary[int, NativeDecoderStep] = weakref.WeakValueDictionary()
    _ids = itertools.count()

    def __init__(self, spec: StepSpec):
        self.spec = spec
        self._keep = [t.detach() for t in spec.tensors()]  # the storages the pointers below point into
        layers = [{name: _matrix(t) if isinstance(t, torch.Tensor) and t.dim() == 2
                   else t.data_ptr() if isinstance(t, torch.Tensor) else t
                   for name, t in layer.items()} for layer in spec.layers]
        fc1 = spec.layers[0]["fc1"]
        self.vocab = spec.head.shape[0]
        self.geometry = (len(spec.layers), spec.heads, spec.wte.shape[1] // spec.heads)
        self.cross = "cross_q" in spec.layers[0]
        self._step = _C.DecoderStep(spec.wte.shape[1], spec.heads, fc1.shape[0], spec.eps,
                                    ACTIVATIONS[spec.activation], _matrix(spec.wte), _matrix(spec.wpe),
                                    _matrix(spec.head), spec.ln_f[0].data_ptr(), spec.ln_f[1].data_ptr(), layers)
        self.id = next(NativeDecoderStep._ids)  # never reused: a recording names its step by it
        NativeDecoderStep._live[self.id] = self

    def __call__(self, tokens, positions, k, v, span, cross_k=None, cross_v=None, cross_lengths=None):
        if torch.jit.is_tracing():
            return torch.ops.mmgen.decoder_step(self.id, tokens, positions, k, v, span, cross_k, cross_v,
                                                cross_lengths)
        return self.run(tokens, positions, k, v, span, cross_k, cross_v, cross_lengths)

    def run(self, tokens, positions, k, v, span, cross_k, cross_v, cross_lengths) -> torch.Tensor:
        rows = tokens.shape[0] if tokens.dim() == 1 else -1
        if positions.shape != (rows,) or tokens.dtype.is_floating_point or positions.dtype.is_floating_point:
            raise ValueError(f"decoder step: tokens and positions must be integer [rows], got {tokens.dtype} "
                             f"{tuple(tokens.shape)} and {positions.dtype} {tuple(positions.shape)}")
        tensors = (tokens, positions, k, v) + ((cross_k, cross_v, cross_lengths) if self.cross else ())
        if not all(t.is_cpu for t in tensors):
            raise ValueError("decoder step: every tensor must be on the CPU, got "
                             + ", ".join(str(t.device) for t in tensors))
        layers, heads, head_dim = self.geometry
        want = f"[{layers}, rows, {heads}, slots, {head_dim}] float32 with a contiguous last dimension"
        for name, t in (("k", k), ("v", v)) + ((("cross k", cross_k), ("cross v", cross_v)) if self.cross else ()):
            if not (t.dim() == 5 and (t.shape[0], t.shape[2], t.shape[4]) == (layers, heads, head_dim)
                    and t.dtype == torch.float32 and t.stride(4) == 1):
                raise ValueError(f"decoder step: {name} must be {want}, got {t.dtype} {tuple(t.shape)}")
        if k.shape != v.shape or k.shape[1] != rows:
            raise ValueError(f"decoder step: k and v must have {rows} rows and one shape, got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        tokens, positions = tokens.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
        logits = torch.empty(rows, self.vocab)
        if self.cross:
            if cross_k.shape != cross_v.shape or cross_lengths.shape != (cross_k.shape[1],) or \
                    cross_lengths.dtype != torch.int64:
                raise ValueError(f"decoder step: cross k, v of one shape and int64 lengths per cross row, got "
                                 f"{tuple(cross_k.shape)}, {tuple(cross_v.shape)} and {cross_lengths.dtype} "
                                 f"{tuple(cross_lengths.shape)}")
            cross_lengths = cross_lengths.contiguous()
            cross = (cross_k.data_ptr(), cross_v.data_ptr(), cross_k.stride()[:4], cross_v.stride()[:4],
                     cross_k.shape[1], cross_k.shape[3], cross_lengths.data_ptr())
        else:
            cross = (0, 0, (0,) * 4, (0,) * 4, 0, 0, 0)
        self._step(tokens.data_ptr(), positions.data_ptr(), rows, k.data_ptr(), v.data_ptr(), k.stride()[:4],
                   v.stride()[:4], k.shape[3], span, *cross, logits.data_ptr(), self.vocab)
        return logits


def _traced_step(plan: int, tokens, positions, k, v, span: int, cross_k, cross_v, cross_lengths):
    step = NativeDecoderStep._live.get(plan)
    if step is None:
        raise RuntimeError("decoder step: this recording's model changed after it was recorded; build a new "
                           "RecordedSteps after changing a model")
    return step.run(tokens, positions, k, v, span, cross_k, cross_v, cross_lengths)


if _C is not None:
    _LIB = torch.library.Library("mmgen", "FRAGMENT")
    _LIB.define("decoder_step(int plan, Tensor tokens, Tensor positions, Tensor(a!) k, Tensor(b!) v, int span, "
                "Tensor? cross_k, Tensor? cross_v, Tensor? cross_lengths) -> Tensor")
    _LIB.impl("decoder_step", _traced_step, "CPU")


def _fits(spec: StepSpec, k: torch.Tensor) -> bool:
    tensors = list({id(t): t for t in spec.tensors()}.values())  # a tied head counted once
    return (k.dtype == torch.float32 and all(t.dtype == torch.float32 and t.is_cpu for t in tensors)
            and sum(t.numel() for t in tensors) * 4 <= MAX_BYTES
            and all(t.dim() == 1 and t.is_contiguous() or t.dim() == 2 and 1 in t.stride() for t in tensors))


# per decoder: ((its parameters' storages, the cache dtype), its native step or None)
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def native_step(owner: torch.nn.Module, spec: Callable[[], StepSpec | None], tokens: torch.Tensor,
                k: torch.Tensor) -> NativeDecoderStep | None:
    """The native step of the decoder ``owner`` for a step on ``tokens`` with the cache ``k``, or None
    where it cannot run (see the module docstring). ``spec()`` describes the decoder (None: it has
    what the native step cannot run, e.g. int8 weights). Decided once per decoder and cache dtype,
    again when a parameter's storage changed since (``p.data = ...``, a dtype or layout change)."""
    if _C is None or not tokens.is_cpu or not native_step_allowed() or torch.compiler.is_compiling():
        return None
    key = (tuple(p.data_ptr() for p in owner.parameters()), tuple(b.data_ptr() for b in owner.buffers()), k.dtype)
    cached = _STEPS.get(owner)
    if cached is None or cached[0] != key:
        built = spec()
        cached = _STEPS[owner] = (key, NativeDecoderStep(built) if built is not None and _fits(built, k) else None)
    return cached[1]
