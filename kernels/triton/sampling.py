"""Fused sampling: guidance combine, temperature, top-k, top-p and a Gumbel-max draw.

Computes :func:`mmgen_engine.ops.sample` (spec in :mod:`mmgen_engine.ops.sampling`). Every pass over
a row is split over ``parts = cdiv(n, CHUNK)`` programs (grid ``(B, parts)``), each reading one slice
of ``CHUNK`` columns in blocks of ``BLOCK``, so that even one row is read by many SMs. A pass's
programs cannot see each other's results, so each pass writes per-block partials and the next launch
reduces them. The launch sequence depends on host-known values only (it can be captured in a CUDA
graph; nothing is read back from the device): 20 launches per call, or 2 (passes 1 and 6) when the
caller promises that no row samples (``greedy=True``). Every kernel reads the row's parameters and
returns at once for rows that do not need it:

1. ``_max_kernel``: every row. Each slice's max of z and its first index (the greedy token).
2. ``_radix_kernel`` x 8, top-k (rows with ``do_sample`` and ``0 < top_k < n``).
3. ``_exp_sum_kernel``: sampling rows. Finishes the top-k threshold (0 = keep all) and, for top-p
   rows, sums ``exp(l - m)`` over the survivors per block (``m`` = row max, from pass 1).
4. ``_radix_kernel`` x 8, top-p (rows with ``do_sample`` and ``top_p < 1``).
5. ``_gumbel_kernel``: sampling rows. Finishes the top-p threshold; each slice's max of
   ``l + gumbel`` over the kept tokens and its first index, written over pass 1's partials.
6. ``_combine_kernel``, one program per row: the max over the slices, first index on ties - the
   greedy token or the draw - written as the token.

Bytes: each working pass reads the row once (``n`` logits, twice that with guidance): 1 read for a
greedy row, 2 to 19 for a sampling row, after the first usually from L2. A program that follows a
radix pass also reads that pass's partials, ``16 * cdiv(n, BLOCK)`` words (3.2 KB for GPT-2's 50257
columns), and a top-p program ``parts`` + ``cdiv(n, BLOCK)`` floats for ``m`` and the softmax
denominator ``s``; a working program writes 16 words per block of its slice (1 for the exp sums, 2
for the Gumbel pass). The output is the only other write.

Thresholds are found by a radix search on order-preserving uint32 keys of the fp32 values of ``l``
(non-negative: ``bits ^ 0x80000000``, negative: ``~bits``; -0.0 is keyed as +0.0, since they tie):
the largest key T with ``sum over {key >= T} of w >= target``, 4 bits per pass (16 candidate
thresholds ``prefix | d << shift`` compared at once, 8 passes). Top-k: ``w = 1``, ``target = k``,
giving the k-th largest key. Top-p: ``w`` = the softmax probability over the top-k survivors,
``exp(l - m) / s``, ``target = top_p``, giving the key of the last token whose mass above is
``< top_p``. A token is kept iff its key is >= both thresholds. The launch of radix pass ``i``
first derives its prefix: the prefix of pass ``i - 1`` (recorded in a per-row prefix buffer by that
launch's program 0) with the digit pass ``i - 1`` found, the largest d whose sum over the row - its
per-block partials summed over the blocks - reaches the target. Every program of the launch does
this (a few KB from L2) and its program 0 records the new prefix; then each program writes the 16
sums of each block of its slice. Prefix slots are per pass and the partials alternate between two
buffers, so no launch reads what it writes. The random words come from ``tl.philox`` with the
spec's key and counter (below).

Exactness against the reference. Exact (bit for bit, so decisions match): z and l (the same fp32
operations, no FMA contraction), the keys, ``m`` and the first argmax, the top-k counts (int32) and
so the top-k threshold, each ``e = exp(l - m)``, each ``p = e / s`` given ``s``, and ``l + gumbel``.
Not exact: ``s`` and the top-p masses are fp32 sums in another order than the reference's
(``e.sum()`` over the row; ``cumsum`` of the sorted probabilities), so a token whose mass above is
closer to ``top_p`` than the two fp32 summations can differ (typically a few ulps of 1; the bound
grows with n) can be kept or dropped differently. These sums are deterministic: each is a
``tl.sum`` over each ``BLOCK`` of columns, then a ``tl.sum`` over the blocks - a fixed order that
depends on ``n`` and ``BLOCK`` only, never on ``CHUNK`` (the number of parts) or on scheduling; no
atomics are used.

Random words: ``tl.philox`` with key ``seed_b`` and counter ``(i, r_b, o_b & 0xffffffff, o_b >> 32)``
(the spec's): ``i`` the column, ``r_b = rows[b]`` the row's index in the random stream (``b`` when
``rows`` is None, a ``HAS_ROWS`` constexpr), ``o_b`` the row's step counter, read at ``offset +
b * offset_stride`` (stride 0 for a ``[1]`` offset, 1 for a per-row ``[B]`` one).

The kernels read every per-step value (the offsets and rows included) from device memory, so a call
can be captured in a CUDA graph. Launched with ``enable_fp_fusion=False`` (no FMA contraction, so
``uncond * (1 - g) + cond * g`` and ``z * inv_t + gumbel`` round like torch), and on CUDA with
libdevice's ``logf``/``expf``, the functions torch's CUDA ``log``/``exp`` call, and IEEE division.
"""
from __future__ import annotations

from functools import partial

import torch

import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024  # columns per step; the radix passes hold [BLOCK, 16] comparisons; partials are per block
CHUNK = 2048  # columns per program, a multiple of BLOCK (25 programs per row for GPT-2's 50257)
STEPS = 8  # radix passes per threshold, 4 bits of the 32-bit key each

# per-row prefix buffer [B, _SLOTS] (uint32 keys stored as int32)
_K_SLOT = tl.constexpr(0)  # slots 0..7: the prefix each top-k pass searched under
_P_SLOT = tl.constexpr(8)  # slots 8..15: the same for top-p
_K_FLOOR = tl.constexpr(16)  # the top-k threshold (0 = keep all), set for every sampling row
_SLOTS = tl.constexpr(17)
_LAST = tl.constexpr(STEPS - 1)  # the last radix step


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
def _row_max(part_max_ptr, part_arg_ptr, b, parts, n, BLOCK_P: tl.constexpr):
    """The max over a row's slices and the first index holding it (slice results in column order)."""
    p = tl.arange(0, BLOCK_P)
    part_max = tl.load(part_max_ptr + b * parts + p, mask=p < parts, other=float("-inf"))
    part_arg = tl.load(part_arg_ptr + b * parts + p, mask=p < parts, other=n)
    best = tl.max(part_max, axis=0)
    return best, tl.min(tl.where(part_max == best, part_arg, n), axis=0)


@triton.jit
def _searched(prefix_ptr, partial_ptr, b, B, nblocks, slot, step, target, NB_P: tl.constexpr):
    """The key prefix after radix pass ``step`` (of the search whose prefixes start at ``slot``): the
    prefix it searched under, with the digit it found - the largest d whose candidate ``prefix | d <<
    shift`` has ``sum of w >= target`` over the row (0 when none). The row's sums are its per-block
    partials ``[nblocks, 16]`` summed over the blocks."""
    prefix = tl.load(prefix_ptr + b * _SLOTS + slot + step).to(tl.uint32, bitcast=True)
    blocks = tl.arange(0, NB_P)[:, None]
    digits = tl.arange(0, 16)
    partial = partial_ptr + (b + (step % 2) * B).to(tl.int64) * nblocks * 16
    total = tl.sum(tl.load(partial + blocks * 16 + digits[None, :], mask=blocks < nblocks, other=0), axis=0)
    digit = tl.max(tl.where(total >= target, digits, 0), axis=0).to(tl.uint32)
    return prefix | (digit << tl.cast(28 - 4 * step, tl.uint32))


@triton.jit
def _max_kernel(logits_ptr, stride, guidance_ptr, part_max_ptr, part_arg_ptr, B, n, chunk,
                HAS_GUIDANCE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1, every row: each slice's max of z and its first index."""
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


@triton.jit(do_not_specialize=["step"])
def _radix_kernel(logits_ptr, stride, guidance_ptr, inv_t_ptr, top_k_ptr, top_p_ptr, do_sample_ptr,
                  part_max_ptr, part_arg_ptr, exp_sum_ptr, prefix_ptr, partial_ptr, B, n, chunk, parts, nblocks,
                  step, TOP_P: tl.constexpr, HAS_GUIDANCE: tl.constexpr, CUDA_MATH: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, NB_P: tl.constexpr):
    """Radix pass ``step`` of the top-k search (``w = 1``) or, with ``TOP_P``, the top-p search (``w``
    = probability among the top-k survivors): for this slice's blocks, the sums of ``w`` over ``{key >=
    candidate}`` for the 16 candidates, to ``partial[step % 2, b, block, :]``."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    if TOP_P:
        slot = _P_SLOT
        target = tl.load(top_p_ptr + b)
        active = target < 1.0
    else:
        slot = _K_SLOT
        target = tl.load(top_k_ptr + b)
        active = (target > 0) & (target < n)
    if (tl.load(do_sample_ptr + b) != 0) & active:
        prefix = tl.full((), 0, tl.uint32)
        if step > 0:
            prefix = _searched(prefix_ptr, partial_ptr, b, B, nblocks, slot, step - 1, target, NB_P)
        if part == 0:  # read by the next launch; this one only reads slot + step - 1
            tl.store(prefix_ptr + b * _SLOTS + slot + step, prefix.to(tl.int32, bitcast=True))
        digits = tl.arange(0, 16)
        candidates = prefix | (digits.to(tl.uint32) << tl.cast(28 - 4 * step, tl.uint32))
        g = 0.0
        if HAS_GUIDANCE:
            g = tl.load(guidance_ptr + b)
        inv_t = tl.load(inv_t_ptr + b)
        if TOP_P:
            floor = tl.load(prefix_ptr + b * _SLOTS + _K_FLOOR).to(tl.uint32, bitcast=True)
            z_max, _ = _row_max(part_max_ptr, part_arg_ptr, b, parts, n, BLOCK_P)
            m = z_max * inv_t  # max of l: multiplying by inv_t > 0 is monotone
            blocks = tl.arange(0, NB_P)
            s = tl.sum(tl.load(exp_sum_ptr + b * nblocks + blocks, mask=blocks < nblocks, other=0.0), axis=0)
        partial = partial_ptr + (b + (step % 2) * B).to(tl.int64) * nblocks * 16
        offs = tl.arange(0, BLOCK)
        for start in range(part * chunk, tl.minimum(part * chunk + chunk, n), BLOCK):
            cols = start + offs
            mask = cols < n
            l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
            key = _key(l)
            if TOP_P:
                w = tl.where(mask & (key >= floor), tl.math.div_rn(_exp(l - m, CUDA_MATH), s), 0.0)
            else:
                w = mask.to(tl.int32)
            sums = tl.sum(tl.where(key[:, None] >= candidates[None, :], w[:, None], 0), axis=0)
            tl.store(partial + (start // BLOCK) * 16 + digits, sums)


@triton.jit
def _exp_sum_kernel(logits_ptr, stride, guidance_ptr, inv_t_ptr, top_k_ptr, top_p_ptr, do_sample_ptr,
                    part_max_ptr, part_arg_ptr, exp_sum_ptr, prefix_ptr, counts_ptr, B, n, chunk, parts, nblocks,
                    HAS_GUIDANCE: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_P: tl.constexpr, NB_P: tl.constexpr):
    """Sampling rows: the top-k threshold (from the last top-k pass; 0 without top-k) to the prefix
    buffer; top-p rows: ``sum of exp(l - m)`` over the survivors of each of this slice's blocks."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    if tl.load(do_sample_ptr + b) != 0:
        k = tl.load(top_k_ptr + b)
        floor = tl.full((), 0, tl.uint32)
        if (k > 0) & (k < n):
            floor = _searched(prefix_ptr, counts_ptr, b, B, nblocks, _K_SLOT, _LAST, k, NB_P)
        if part == 0:
            tl.store(prefix_ptr + b * _SLOTS + _K_FLOOR, floor.to(tl.int32, bitcast=True))
        if tl.load(top_p_ptr + b) < 1.0:
            g = 0.0
            if HAS_GUIDANCE:
                g = tl.load(guidance_ptr + b)
            inv_t = tl.load(inv_t_ptr + b)
            z_max, _ = _row_max(part_max_ptr, part_arg_ptr, b, parts, n, BLOCK_P)
            m = z_max * inv_t
            offs = tl.arange(0, BLOCK)
            for start in range(part * chunk, tl.minimum(part * chunk + chunk, n), BLOCK):
                cols = start + offs
                mask = cols < n
                l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
                e = tl.where(mask & (_key(l) >= floor), _exp(l - m, CUDA_MATH), 0.0)
                tl.store(exp_sum_ptr + b * nblocks + start // BLOCK, tl.sum(e, axis=0))


@triton.jit
def _gumbel_kernel(logits_ptr, stride, guidance_ptr, inv_t_ptr, top_p_ptr, do_sample_ptr, seeds_ptr, offset_ptr,
                   offset_stride, rows_ptr, part_max_ptr, part_arg_ptr, prefix_ptr, mass_ptr, B, n, chunk, nblocks,
                   HAS_GUIDANCE: tl.constexpr, HAS_ROWS: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
                   NB_P: tl.constexpr):
    """Sampling rows: the top-p threshold (from the last top-p pass), then this slice's max of ``l +
    gumbel`` over the kept tokens and its first index, written over pass 1's result for the slice
    (which no program of this launch reads). The row's step counter is ``offset[b * offset_stride]``,
    its counter word 1 ``rows[b]`` (``b`` without ``HAS_ROWS``)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    if tl.load(do_sample_ptr + b) != 0:
        floor = tl.load(prefix_ptr + b * _SLOTS + _K_FLOOR).to(tl.uint32, bitcast=True)
        top_p = tl.load(top_p_ptr + b)
        if top_p < 1.0:
            floor = tl.maximum(floor, _searched(prefix_ptr, mass_ptr, b, B, nblocks, _P_SLOT, _LAST, top_p,
                                                NB_P))
        g = 0.0
        if HAS_GUIDANCE:
            g = tl.load(guidance_ptr + b)
        inv_t = tl.load(inv_t_ptr + b)
        offset = tl.load(offset_ptr + b * offset_stride)
        offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
        offset_hi = (offset >> 32).to(tl.uint32)
        seed = tl.load(seeds_ptr + b)
        row = b.to(tl.uint32)
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.uint32)  # int64 in [0, 2**32): its low word
        best = tl.full((), float("-inf"), tl.float32)
        token = tl.full((), 0, tl.int32)
        offs = tl.arange(0, BLOCK)
        for start in range(part * chunk, tl.minimum(part * chunk + chunk, n), BLOCK):
            cols = start + offs
            mask = cols < n
            l = _load_z(logits_ptr, stride, b, B, g, cols, mask, HAS_GUIDANCE) * inv_t
            x0, _, _, _ = tl.philox(seed, cols.to(tl.uint32), row, offset_lo, offset_hi)
            u = ((x0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
            v = tl.where(mask & (_key(l) >= floor), l + -_log(-_log(u, CUDA_MATH), CUDA_MATH), float("-inf"))
            block_max = tl.max(v, axis=0)
            block_first = tl.min(tl.where(v == block_max, cols, n), axis=0)
            token = tl.where(block_max > best, block_first, token)
            best = tl.maximum(block_max, best)
        tl.store(part_max_ptr + b * tl.num_programs(1) + part, best)
        tl.store(part_arg_ptr + b * tl.num_programs(1) + part, token)


@triton.jit
def _combine_kernel(part_max_ptr, part_arg_ptr, out_ptr, n, parts, BLOCK_P: tl.constexpr):
    """One program per row: the token, from the slices' (max, first index) - pass 1's for greedy rows,
    the Gumbel pass's for sampling rows."""
    b = tl.program_id(0)
    _, token = _row_max(part_max_ptr, part_arg_ptr, b, parts, n, BLOCK_P)
    tl.store(out_ptr + b, token.to(tl.int64))


def sample(logits, temperature, top_k, top_p, do_sample, seeds, offset, guidance=None, vocab_limit=None,
           greedy=False, rows=None):
    """Launcher with the reference's signature (shapes already checked by ``ops.sample``): ``offset``
    ``[1]`` or ``[B]`` int64, ``rows`` None or ``[B]`` int64, both on the logits' device."""
    if CHUNK % BLOCK:
        raise ValueError(f"CHUNK ({CHUNK}) must be a multiple of BLOCK ({BLOCK})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    batch = seeds.shape[0]
    n = logits.shape[1] if vocab_limit is None else vocab_limit
    parts, nblocks = triton.cdiv(n, CHUNK), triton.cdiv(n, BLOCK)
    has_guidance = guidance is not None
    guidance = guidance.float() if has_guidance else logits  # without guidance the pointer is never read
    out = torch.empty(batch, dtype=torch.int64, device=device)
    part_max = torch.empty(batch, parts, dtype=torch.float32, device=device)
    part_arg = torch.empty(batch, parts, dtype=torch.int32, device=device)
    grid = (batch, parts)
    _max_kernel[grid](logits, logits.stride(0), guidance, part_max, part_arg, batch, n, CHUNK,
                      HAS_GUIDANCE=has_guidance, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    combine = partial(_combine_kernel[(batch,)], part_max, part_arg, out, n, parts,
                      BLOCK_P=triton.next_power_of_2(parts), num_warps=1)
    if greedy:  # no row samples (known on the host): pass 1's argmax is the answer
        combine()
        return out

    inv_t = temperature.float().reciprocal()
    top_p = top_p.float()
    prefix = torch.empty(batch, _SLOTS.value, dtype=torch.int32, device=device)
    counts = torch.empty(2, batch, nblocks, 16, dtype=torch.int32, device=device)  # top-k partials, by step % 2
    mass = torch.empty(2, batch, nblocks, 16, dtype=torch.float32, device=device)  # top-p partials
    exp_sum = torch.empty(batch, nblocks, dtype=torch.float32, device=device)

    row = (logits, logits.stride(0), guidance, inv_t)
    params = (top_k, top_p, do_sample)
    sizes = (batch, n, CHUNK, parts, nblocks)
    flags = dict(HAS_GUIDANCE=has_guidance, CUDA_MATH=logits.is_cuda, BLOCK=BLOCK,
                 BLOCK_P=triton.next_power_of_2(parts), NB_P=triton.next_power_of_2(nblocks), num_warps=8,
                 enable_fp_fusion=False)
    for step in range(STEPS):
        _radix_kernel[grid](*row, *params, part_max, part_arg, exp_sum, prefix, counts, *sizes, step,
                            TOP_P=False, **flags)
    _exp_sum_kernel[grid](*row, *params, part_max, part_arg, exp_sum, prefix, counts, *sizes, **flags)
    for step in range(STEPS):
        _radix_kernel[grid](*row, *params, part_max, part_arg, exp_sum, prefix, mass, *sizes, step,
                            TOP_P=True, **flags)
    # offset [1]: every row reads offset[0] (stride 0); [B]: row b reads its element (a view's stride,
    # 0 for an expanded [1]). Without rows the pointer is never read (HAS_ROWS=False: the row word is b).
    offset_stride = 0 if offset.numel() == 1 else offset.stride(0)
    has_rows = rows is not None
    rows = rows.contiguous() if has_rows else seeds  # a copy (captured with the rest) only for a strided view
    _gumbel_kernel[grid](*row, top_p, do_sample, seeds, offset, offset_stride, rows,
                         part_max, part_arg, prefix, mass, batch, n, CHUNK, nblocks, HAS_GUIDANCE=has_guidance,
                         HAS_ROWS=has_rows, CUDA_MATH=logits.is_cuda, BLOCK=BLOCK,
                         NB_P=triton.next_power_of_2(nblocks), num_warps=8, enable_fp_fusion=False)
    combine()
    return out
