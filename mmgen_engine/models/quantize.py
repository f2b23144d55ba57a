"""Weight-only int8 of a model's decoder (``config.quantization``, :class:`~mmgen_engine.config.QuantizationConfig`).

:func:`quantize_model` turns every linear layer of ``model.decoder`` and its LM head into a
:class:`~mmgen_engine.layers.QuantizedLinear`; the encoders and detokenizers keep their floating
weights. It works on a model built on the meta device (the structure a quantized checkpoint loads
into) as on one holding weights, and returns, for each floating tensor of the unquantized state
dict it replaces, the function that makes the quantized tensors from it: the loader applies them
while it reads a floating checkpoint (``mm.load(quantize=...)``) and the converter to the tensors it
writes (``mmgen convert --quantize``), so both give the same bytes.

The head: a decoder's ``lm_head`` parameter becomes a ``QuantizedLinear`` of the same name. A head
tied to the token embeddings (``tie_word_embeddings``) gets an int8 copy ``decoder.lm_head`` and the
floating ``decoder.wte`` stays for the embedding lookups: the quantized model holds ``V x D`` int8
bytes (plus the scales) more than the floating one's tied matrix alone, and each decode step reads
the int8 copy instead of the floating matrix.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import QuantizationConfig
from ..layers import QuantizedLinear, quantize_linears
from ..ops.quant import Int8Weight, quantize_int8

TensorMap = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def head_weight(decoder: nn.Module) -> torch.Tensor | Int8Weight:
    """What a decoder's LM head multiplies by (:func:`mmgen_engine.ops.linear`'s weight): its
    ``lm_head`` (a floating ``[V, D]`` parameter, or the ``QuantizedLinear`` :func:`quantize_model`
    made of it or of the tied embeddings), else the tied token embeddings ``wte``."""
    head = getattr(decoder, "lm_head", None)
    if head is None:
        return decoder.wte
    return head.op_weight if isinstance(head, QuantizedLinear) else head


def _int8(module: str, group_size: int | None, keep: str | None = None) -> TensorMap:
    """The tensors of ``QuantizedLinear`` ``module`` from a floating weight (and the weight itself as
    ``keep`` when another module still reads it)."""
    def make(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q = quantize_int8(weight, group_size)
        out = {f"{module}.weight": q.qweight, f"{module}.weight_scale": q.scale}
        if keep is not None:
            out[keep] = weight
        return out
    return make


def quantize_model(model: nn.Module, quantization: QuantizationConfig) -> dict[str, TensorMap]:
    """Quantize ``model.decoder``'s linear layers and LM head in place, as ``quantization`` says.
    Returns ``{name of a floating tensor of the unquantized state dict: its map to the quantized
    tensors}``. The scales join the model's ``fp32_tensors`` (float32 at any load dtype)."""
    if quantization.method != "int8" or quantization.modules != "decoder":
        raise ValueError(f"unsupported quantization {quantization}")
    decoder, group = model.decoder, quantization.group_size
    maps = {f"decoder.{name}.weight": _int8(f"decoder.{name}", group) for name in quantize_linears(decoder, group)}
    head = getattr(decoder, "lm_head", None)
    tied = head is None and getattr(decoder.cfg, "tie_word_embeddings", False)
    if head is not None or tied:
        source = decoder.wte if tied else head
        linear = nn.Linear(source.shape[1], source.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(source, requires_grad=False)  # the same storage: no copy
        if not tied:
            del decoder.lm_head  # the parameter; a module takes its name
        decoder.lm_head = QuantizedLinear.from_linear(linear, group)
        name = "decoder.wte" if tied else "decoder.lm_head"
        maps[name] = _int8("decoder.lm_head", group, keep=name if tied else None)
    scales = {f"{name}.weight_scale" for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    model.fp32_tensors = frozenset(getattr(model, "fp32_tensors", ())) | scales
    return maps


def quantize_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                     quantization: QuantizationConfig) -> dict[str, torch.Tensor]:
    """The state dict ``tensors`` of unquantized ``model`` (built on the meta device, quantized here
    in place) with the decoder's weights quantized: the converter's ``--quantize``."""
    maps = quantize_model(model, quantization)
    out = {name: t for name, t in tensors.items() if name not in maps}
    for name, make in maps.items():
        out.update(make(tensors[name]))
    return out
