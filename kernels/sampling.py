"""Fused sampling: guidance combine, temperature, top-k, top-p and a Gumbel-max draw in one kernel.

Computes :func:`mmgen_engine.ops.sample` (spec in :mod:`mmgen_engine.ops.sampling`). Pass 1 (max
and first argmax of ``z``, which is the greedy token) is split over slices of ``CHUNK`` columns so
that a row is read by many SMs; the rest runs one program per output row, looping over the row in
blocks of ``BLOCK`` columns. Every pass reads the row once (``n`` logits, twice that with guidance)
and nothing else is written but the token and pass 1's per-slice partials:

- greedy rows: pass 1 only;
- sampling rows: pass 1, then 8 passes for the top-k threshold (when ``0 < top_k < n``), 1 + 8 for
  the top-p threshold (when ``top_p < 1``: sum of exp, then the search), and 1 for the Gumbel
  argmax - 2 to 19 passes; after the first the row is usually served from L2.

Thresholds are found by a radix search on order-preserving uint32 keys of the fp32 values of ``l``
(non-negative: ``bits ^ 0x80000000``, negative: ``~bits``; -0.0 is keyed as +0.0, since they tie):
the largest key T with ``sum over {key >= T} of w >= target``, 4 bits per pass (16 candidate
thresholds compared at once, 8 passes). Top-k: ``w = 1``, ``target = k``, giving the k-th largest
key. Top-p: ``w`` = the softmax probability over the top-k survivors (row max from pass 1), ``target
= top_p``, giving the key of the last token whose mass above is ``< top_p``. A token is kept iff its
key is >= both thresholds. The random words come from ``tl.philox`` with the spec's key and counter.

The kernel reads every per-step value (the offset included) from device memory, so it can be
captured in a CUDA graph. Launched with ``enable_fp_fusion=False`` (no FMA contraction, so ``z *
inv_t + gumbel`` rounds like torch), and on CUDA with libdevice's ``logf``/``expf``, the functions
torch's CUDA ``log``/``exp`` call, and IEEE division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024  # columns per step; the radix passes hold [BLOCK, 16] comparisons
CHUNK = 2048  # columns per program of pass 1 (25 programs per row for GPT-2's 50257)


@triton.jit
def _log(x, CUDA_MATH: tl.constexpr):
    if CUDA_MATH:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _exp(x, CUDA_MATH: tl.constexpr):
    if CUDA_MATH:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _key(x):
    """Order-preserving uint32 key of fp32 ``x`` (-0.0 gets +0.0's key)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE: tl.constexpr):
    """Combined fp32 logits of row ``b`` at ``cols``; ``-inf`` where ``mask`` is false."""
    z = tl.load(logits_ptr + b.to(tl.int64) * stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GUIDANCE:
        cond = tl.load(logits_ptr + (b + B).to(tl.int64) * stride + cols, mask=mask, other=0.0).to(tl.float32)
        z = z * (1.0 - g) + cond * g
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _threshold(logits_ptr, stride, b, B, g, n, inv_t, floor, m, s, target,
               PROB: tl.constexpr, HAS_GUIDANCE: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key T with ``sum over {key >= T} of w >= target`` (0 when none), with w = 1 (top-k)
    or, when ``PROB``, ``exp(l - m) / s`` over the tokens with key >= ``floor`` (top-p)."""
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16).to(tl.uint32)
    prefix = tl.full((), 0, tl.uint32)
    shift = tl.full((), 32, tl.uint32)
    for _ in range(8):
        shift -= 4
        candidates = prefix | (digits << shift)
        if PROB:
            mass = tl.zeros([16], tl.float32)
        else:
            mass = tl.zeros([16], tl.int32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            mask = cols < n
            l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
            key = _key(l)
            if PROB:
                w = tl.where(mask & (key >= floor), tl.math.div_rn(_exp(l - m, CUDA_MATH), s), 0.0)
            else:
                w = mask.to(tl.int32)
            mass += tl.sum(tl.where(key[:, None] >= candidates[None, :], w[:, None], 0), axis=0)
        prefix = prefix | (tl.max(tl.where(mass >= target, digits, 0), axis=0) << shift)
    return prefix


@triton.jit
def _max_kernel(logits_ptr, stride, guidance_ptr, part_max_ptr, part_arg_ptr, B, n, chunk,
                HAS_GUIDANCE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1, split over ``num_programs(1)`` slices of ``chunk`` columns per row so that even one
    row is read by many SMs: each slice's max of z and its first index."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    g = 0.0
    if HAS_GUIDANCE:
        g = tl.load(guidance_ptr + b)
    z_max = tl.full((), float("-inf"), tl.float32)
    token = tl.full((), 0, tl.int32)
    for start in range(part * chunk, tl.minimum(part * chunk + chunk, n), BLOCK):
        cols = start + offs
        mask = cols < n
        z = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE)
        block_max = tl.max(z, axis=0)
        block_first = tl.min(tl.where(z == block_max, cols, n), axis=0)
        token = tl.where(block_max > z_max, block_first, token)
        z_max = tl.maximum(block_max, z_max)
    tl.store(part_max_ptr + b * tl.num_programs(1) + part, z_max)
    tl.store(part_arg_ptr + b * tl.num_programs(1) + part, token)


@triton.jit
def _sample_kernel(logits_ptr, stride, inv_t_ptr, top_k_ptr, top_p_ptr, do_sample_ptr, seeds_ptr, offset_ptr,
                   guidance_ptr, part_max_ptr, part_arg_ptr, out_ptr, B, n, parts,
                   HAS_GUIDANCE: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    g = 0.0
    if HAS_GUIDANCE:
        g = tl.load(guidance_ptr + b)

    # max of z and its first index (the greedy token) from pass 1's slices, taken in column order
    p = tl.arange(0, BLOCK_P)
    part_max = tl.load(part_max_ptr + b * parts + p, mask=p < parts, other=float("-inf"))
    part_arg = tl.load(part_arg_ptr + b * parts + p, mask=p < parts, other=n)
    z_max = tl.max(part_max, axis=0)
    token = tl.min(tl.where(part_max == z_max, part_arg, n), axis=0)
    if tl.load(do_sample_ptr + b) != 0:
        inv_t = tl.load(inv_t_ptr + b)
        m = z_max * inv_t  # max of l: multiplying by inv_t > 0 is monotone
        floor = tl.full((), 0, tl.uint32)  # keep tokens with key >= floor
        k = tl.load(top_k_ptr + b)
        if (k > 0) & (k < n):
            floor = _threshold(logits_ptr, stride, b, B, g, n, inv_t, floor, m, 1.0, k,
                               False, HAS_GUIDANCE, CUDA_MATH, BLOCK)
        top_p = tl.load(top_p_ptr + b)
        if top_p < 1.0:
            s = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n, BLOCK):
                cols = start + offs
                mask = cols < n
                l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
                s += tl.where(mask & (_key(l) >= floor), _exp(l - m, CUDA_MATH), 0.0)
            floor = tl.maximum(floor, _threshold(logits_ptr, stride, b, B, g, n, inv_t, floor, m, tl.sum(s, axis=0),
                                                 top_p, True, HAS_GUIDANCE, CUDA_MATH, BLOCK))

        # Gumbel-max over the kept tokens
        offset = tl.load(offset_ptr)
        offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
        offset_hi = (offset >> 32).to(tl.uint32)
        seed = tl.load(seeds_ptr + b)
        best = tl.full((), float("-inf"), tl.float32)
        token = tl.full((), 0, tl.int32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            mask = cols < n
            l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
            x0, _, _, _ = tl.philox(seed, cols.to(tl.uint32), b.to(tl.uint32), offset_lo, offset_hi)
            u = ((x0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
            v = tl.where(mask & (_key(l) >= floor), l + -_log(-_log(u, CUDA_MATH), CUDA_MATH), float("-inf"))
            block_max = tl.max(v, axis=0)
            block_first = tl.min(tl.where(v == block_max, cols, n), axis=0)
            token = tl.where(block_max > best, block_first, token)
            best = tl.maximum(block_max, best)
    tl.store(out_ptr + b, token.to(tl.int64))


def sample(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance=None, vocab_limit=None):
    """Launcher with the reference's signature (shapes already checked by ``ops.sample``)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    batch = seeds.shape[0]
    n = logits.shape[1] if vocab_limit is None else vocab_limit
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    inv_t = temperature.float().reciprocal()
    has_guidance = guidance is not None
    guidance = guidance.float() if has_guidance else inv_t  # without guidance the pointer is never read
    parts = triton.cdiv(n, CHUNK)
    part_max = torch.empty(batch, parts, dtype=torch.float32, device=logits.device)
    part_arg = torch.empty(batch, parts, dtype=torch.int32, device=logits.device)
    _max_kernel[(batch, parts)](logits, logits.stride(0), guidance, part_max, part_arg, batch, n, CHUNK,
                                HAS_GUIDANCE=has_guidance, BLOCK=BLOCK, num_warps=4)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), inv_t, top_k, top_p.float(), do_sample, seeds, offset, guidance, part_max,
        part_arg, out, batch, n, parts, HAS_GUIDANCE=has_guidance, CUDA_MATH=logits.is_cuda, BLOCK=BLOCK,
        BLOCK_P=triton.next_power_of_2(parts), num_warps=8, enable_fp_fusion=False)
    return out
