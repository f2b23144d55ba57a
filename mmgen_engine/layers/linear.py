"""``nn.Linear`` whose product goes through :func:`mmgen_engine.ops.linear` (the dispatch table)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
