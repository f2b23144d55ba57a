"""``nn.Linear`` whose product goes through :func:`mmgen_engine.ops.linear` (the dispatch table), and
its weight-only int8 counterpart.

A layer's ``op_weight`` is what ``ops.linear`` takes for it (the float weight, or an
:class:`~mmgen_engine.ops.quant.Int8Weight`): code that runs the product itself, to fuse the bias
with an activation, passes ``layer.op_weight`` and works on both.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from ..ops.quant import DEFAULT_GROUP_SIZE, Int8Weight, quantize_int8


class Linear(nn.Linear):
    @property
    def op_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class QuantizedLinear(nn.Module):
    """``y = x (q * scale)^T + bias``, activations in their own dtype (:mod:`mmgen_engine.ops.quant`).

    State dict (the names a quantized checkpoint uses): ``weight`` int8 ``[out, in]``,
    ``weight_scale`` float32 ``[out]`` (per output channel) or ``[out, ceil(in / group_size)]``
    (grouped; ``group_size`` is not in the state dict and must come from the config), ``bias``
    ``[out]`` when the layer has one. The scales stay float32 whatever dtype the module is cast to;
    the bias follows the module's dtype like any parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int | None = DEFAULT_GROUP_SIZE, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._packed: Int8Weight | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = DEFAULT_GROUP_SIZE) -> QuantizedLinear:
        """A quantized copy of ``linear`` (on its device; the bias keeps its dtype)."""
        q = quantize_int8(linear.weight, group_size)
        layer = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size, device="meta")
        layer.weight, layer.weight_scale = q.qweight, q.scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def op_weight(self) -> Int8Weight:
        # rebuilt only when a buffer was replaced (.to(), load_state_dict(assign=True)); the checks of
        # Int8Weight then run once, not on every product
        packed = self._packed
        if packed is None or packed.qweight is not self.weight or packed.scale is not self.weight_scale:
            packed = self._packed = Int8Weight(self.weight, self.weight_scale, self.group_size)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.op_weight, self.bias)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the float32 scales: move them, keep their dtype
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self._buffers["weight_scale"] = scale.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, int8 {group}"


def quantize_linears(module: nn.Module, group_size: int | None = DEFAULT_GROUP_SIZE,
                     include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` (and :class:`Linear`) under ``module`` for which
    ``include(qualified_name, layer)`` holds (default: all) by a :class:`QuantizedLinear` built from
    its weight. Returns the qualified names replaced, in module order. A weight tied to another
    module (an embedding) is copied: the other module keeps the float tensor."""
    replaced = []
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            qualified = f"{name}.{attr}" if name else attr
            if isinstance(layer, nn.Linear) and (include is None or include(qualified, layer)):
                setattr(child, attr, QuantizedLinear.from_linear(layer, group_size))
                replaced.append(qualified)
    return replaced
