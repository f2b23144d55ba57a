"""Decode attention (flash-decoding): one query token per row against a KV cache.

``out[r, h] = sum_{s < lengths[b]} softmax_s(q[r, h] . k[b, h, s] * scale) v[b, h, s]``, ``b = r // group``

(``q``, ``out`` have ``group`` query rows per cache row; ``group = 1`` is one query per cache row,
``group > 1`` lets a request's beams share one copy of its cross-attention K/V.)

The same kernel serves causal self-attention over the static KV cache (``lengths`` = tokens so far)
and cross-attention over the cached encoder K/V (``lengths`` = the row's encoder length, a key
padding mask). For self-attention the new token's key/value can be passed as ``new_k, new_v [B, H, D]``:
they are written into cache slot ``lengths[b] - 1`` by the kernel (and used from registers there),
which saves the two scatter launches of an unfused step (``group == 1`` only).

Grouped-query attention: k, v may have ``Hkv`` heads for ``Hq`` query heads (``Hkv`` dividing
``Hq``); query head ``h`` reads K/V head ``h // (Hq / Hkv)``. One program serves the ``Hq / Hkv`` query
heads of one K/V head, so each key and value is read once for all of them (scores
``[Hq / Hkv, keys]``), with no repeated copy of the cache.

Rotary step (``cos, sin [B, D / 2]`` float32, each cache row's new position): the query heads and
``new_k`` are rotated on load (:func:`mmgen_engine.kernels.rotary.rotate`); the rotated key, rounded
to the cache dtype, is what is written and scored, the rotated query stays in fp32.

Work split (Dao et al., "Flash-Decoding"): the key axis is cut into fixed-size chunks so that
``B * group * Hkv * chunks`` programs fill the GPU at long contexts even at batch 1; each program keeps
a running max, sum and fp32 accumulator (online softmax) over its chunk and writes a partial result;
a second kernel combines the partials of a row. With one split the first kernel writes the output
directly.
Chunks past a row's length exit at once, so the launch can cover a whole static cache (what
CUDA-graph capture needs) while each row is read only up to its length.

Program ``(r * Hkv + j, split)`` serves query row ``r``'s heads of K/V head ``j`` and reads cache row
``r // group`` (and its length): for one chunk, the ``group * Hkv`` programs of a cache row are
consecutive in launch order, so with ``group > 1`` the repeated reads of the row's K/V mostly hit L2.

Bytes moved: the K and V read once, ``2 * B * Hkv * L * D * e`` for lengths L and element size e
(with ``group > 1``: from DRAM, when L2 serves the repeats), plus q, the output and
``B * group * Hq * splits * (D + 2) * 4`` bytes of partials written and read back.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .rotary import rotate


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, newk_ptr, newv_ptr, len_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, ml_ptr,
                   HKV, REP, D, chunk, scale, group,
                   sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sn_b, sn_h, sc_b, ss_b,
                   HAS_NEW: tl.constexpr, ROPE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # query row * HKV + K/V head
    split = tl.program_id(1)
    r = pid // HKV  # the query row
    kvh = pid % HKV
    b = r // group  # its cache row
    length = tl.load(len_ptr + b).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    g = tl.arange(0, BLOCK_R)  # the REP query heads of this K/V head
    heads = kvh * REP + g
    qmask = (g < REP)[:, None] & dmask[None, :]
    q_rows = q_ptr + r * sq_b + heads[:, None] * sq_h  # (BLOCK_R, 1)
    if ROPE:
        q = rotate(q_rows, d[None, :], D, cos_ptr + b * sc_b, sin_ptr + b * ss_b, qmask)
    else:
        q = tl.load(q_rows + d[None, :], mask=qmask, other=0.0).to(tl.float32)
    q = q * scale  # (BLOCK_R, BLOCK_D)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    if HAS_NEW:
        # the new token's K/V: used for slot length-1 by whichever chunk holds it, stored by split 0
        if ROPE:  # rounded to the cache's dtype: the scores use the key the cache holds
            new_k = rotate(newk_ptr + b * sn_b + kvh * sn_h, d, D, cos_ptr + b * sc_b, sin_ptr + b * ss_b,
                           dmask).to(k_ptr.dtype.element_ty)
        else:
            new_k = tl.load(newk_ptr + b * sn_b + kvh * sn_h + d, mask=dmask, other=0.0)
        new_v = tl.load(newv_ptr + b * sn_b + kvh * sn_h + d, mask=dmask, other=0.0)
        if split == 0:
            tl.store(k_base + (length - 1) * sk_s + d, new_k, mask=dmask)
            tl.store(v_base + (length - 1) * sv_s + d, new_v, mask=dmask)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None] * sk_s + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * sv_s + d[None, :], mask=kv_mask, other=0.0)
        if HAS_NEW:
            is_new = (n == length - 1)[:, None]
            k = tl.where(is_new, new_k[None, :], k)
            v = tl.where(is_new, new_v[None, :], v)
        # each key is read once for the REP query heads: scores (BLOCK_R, BLOCK_N). A sum of products,
        # not tl.dot: REP is often below tl.dot's 16 rows, and the interpreter's bf16 tl.dot is wrong.
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    row = r * HKV * REP + heads  # (BLOCK_R,) output rows (query row, head)
    if SPLIT:
        slot = row * tl.num_programs(1) + split
        tl.store(part_ptr + slot[:, None] * D + d[None, :], acc, mask=qmask)
        tl.store(ml_ptr + slot * 2, m, mask=g < REP)
        tl.store(ml_ptr + slot * 2 + 1, l, mask=g < REP)
    else:
        tl.store(out_ptr + row[:, None] * D + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=qmask)


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, D, splits,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < splits
    m = tl.load(ml_ptr + (bh * splits + s) * 2, mask=smask, other=float("-inf"))
    l = tl.load(ml_ptr + (bh * splits + s) * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty chunks weigh nothing
    acc = tl.load(part_ptr + (bh * splits + s)[:, None] * D + d[None, :],
                  mask=smask[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def blocks(device: torch.device) -> tuple[int, int]:
    """(keys per chunk, keys per loop iteration). The chunk is fixed, not derived from the cache size
    or the batch, so a row's result never depends on either (eager and graph steps, a batch padded
    to its bucket or not, all sum in the same order). 256 keys give 16 chunks per row at 4k context
    and 4 at GPT-2's 1024; the interpreter uses small chunks so tests cross chunk boundaries."""
    return (256, 64) if device.type == "cuda" else (64, 32)


def decode_attention(q, k, v, lengths, scale, new_k=None, new_v=None, group=1, cos=None, sin=None):
    b, hkv, s, d = k.shape
    if new_k is not None and group != 1:
        raise ValueError(f"decode_attention: group={group} with new_k/new_v: a cache write needs one query "
                         "row per cache row (group=1)")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"decode_attention: group must be an int >= 1, got {group!r}")
    hq = q.shape[1] if q.dim() == 3 else 0
    if q.shape != (b * group, hq, d) or hq % hkv or hq < hkv or lengths.shape != (b,):
        raise ValueError(f"decode_attention: q must be [B * group, Hq, D] (Hq a multiple of Hkv) and lengths [B] "
                         f"for k [B, Hkv, S, D]; got q {tuple(q.shape)}, lengths {tuple(lengths.shape)}, "
                         f"k {tuple(k.shape)}, group={group}")
    for name, t in (("q", q), ("k", k), ("v", v), ("new_k", new_k), ("new_v", new_v), ("cos", cos), ("sin", sin)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} needs a unit last stride, got strides {t.stride()}")
    rows = b * group  # query rows
    rep = hq // hkv  # query heads per K/V head, served by one program
    chunk, block_n = blocks(q.device)
    block_r = triton.next_power_of_2(rep)
    block_n = max(4, block_n // block_r)  # the (BLOCK_R, BLOCK_N, BLOCK_D) product stays the same size
    splits = triton.cdiv(s, chunk)
    out = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(d)
    if splits > 1:
        part = torch.empty(rows * hq * splits * d, dtype=torch.float32, device=q.device)
        ml = torch.empty(rows * hq * splits * 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    has_new, rope = new_k is not None, cos is not None
    nk, nv = (new_k, new_v) if has_new else (q, q)
    cos, sin = (cos, sin) if rope else (q, q)
    _decode_kernel[(rows * hkv, splits)](
        q, k, v, nk, nv, lengths, cos, sin, out, part, ml, hkv, rep, d, chunk, scale, group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), nk.stride(0), nk.stride(1), cos.stride(0), sin.stride(0),
        HAS_NEW=has_new, ROPE=rope, SPLIT=splits > 1, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4)
    if splits > 1:
        _combine_kernel[(rows * hq,)](part, ml, out, d, splits, BLOCK_S=triton.next_power_of_2(splits),
                                      BLOCK_D=block_d)
    return out
