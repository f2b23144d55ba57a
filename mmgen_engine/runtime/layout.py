"""Weight memory layouts: column-major float32 / float16 linears for matrix-vector products on the CPU
(bfloat16 ones stay row-major), channels-last conv weights for the image decoders.

A decode step multiplies a few rows by every weight: ``y = x W^T`` with ``W [out, in]``. On CPU
that product is bound by how fast ``W`` streams from memory. Stored column-major (``W^T``
contiguous, the layout of GPT-2's ``Conv1D``), ``W`` splits along its input dimension into
contiguous slices that :func:`mmgen_engine.ops.linear` multiplies on all threads at once; BLAS's
own single-threaded GEMV on the row-major weight is 1.5-2.6x slower at batch 1 (per-shape figures
in ``benchmarks/RESULTS.md``). The logical tensor (shape, values, state-dict name) is unchanged;
only its strides differ, so embedding lookups in a tied ``wte`` keep working.
"""
from __future__ import annotations

import torch
from torch import nn


def column_major_weights(module: nn.Module) -> None:
    """Re-store every 2-D float32 or float16 parameter of ``module`` column-major (a
    transposed-contiguous view). bfloat16 weights stay row-major: under float32 compute (bf16
    storage, op ``linear_bf16_weight``) the native kernel streams ``W [out, in]`` row by row and
    takes no other layout (the fallback on a column-major one is 1.4-2.3x slower); under bfloat16
    compute torch's own product on the row-major weight beats the split over the column-major one
    (one row, one thread, loaded 2-core box: 768->3072 771 against 942 us, 3072->768 451 against
    648, 768->50257 8.4 against 10.0 ms)."""
    for p in module.parameters():
        if p.dim() == 2 and p.dtype in (torch.float32, torch.float16) and p.is_contiguous():
            p.data = p.data.t().contiguous().t()


def channels_last_weights(module: nn.Module) -> None:
    """Re-store every 4-D floating parameter (conv weights ``[Cout, Cin, k, k]``) of ``module``
    channels-last (``Cin`` innermost), the layout of the channels-last activations the image
    decoders keep: the Triton conv reads it contiguously along ``Cin`` and torch's CPU conv does not
    re-layout it on every call. Values, shapes and names are unchanged."""
    for p in module.parameters():
        if p.dim() == 4 and p.is_floating_point():
            p.data = p.data.contiguous(memory_format=torch.channels_last)
