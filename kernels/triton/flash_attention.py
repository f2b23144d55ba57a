"""Prefill / encoder attention: a FlashAttention-2 style forward pass.

Computes, for every batch row ``b``, head ``h`` and query ``t``,
``out[b, h, t] = sum_s softmax_s(q[b, h, t] . k[b, h, s] * scale) v[b, h, s]`` over the keys ``s``
the mask keeps: ``s <= t`` when ``causal`` and ``s < key_lengths[b]`` when lengths are given (the
spec is :func:`mmgen_engine.ops.attention.attention_reference`). q ``[B, Hq, Tq, D]``, k/v
``[B, Hkv, Tk, D]`` (grouped-query attention: ``Hkv`` divides ``Hq``, query head ``h`` reads K/V head
``h // (Hq / Hkv)`` in place, no repeated copy) may be any strided views (the layers pass
``.view(b, t, h, d).transpose(1, 2)`` of a fused projection); the output is a new contiguous
``[B, Hq, Tq, D]`` in q's dtype.

One program owns ``BLOCK_M`` queries of one (batch, head). It loads its q block once and walks the
key blocks, keeping a running row maximum ``m``, row sum ``l`` and output accumulator in fp32 (the
online softmax), so the ``Tq x Tk`` score matrix never reaches memory. It stops at the last key any
of its queries can see: the diagonal block when causal, ``key_lengths[b]`` when given. The head dim
is padded to a power of two (at least 16, for ``tl.dot``) with masked loads; heads wider than 128
(up to 512: the VQGAN's single head) take smaller blocks (:func:`plan`).

Traffic and work, in elements of q's dtype, with ``n_q = ceil(Tq / BLOCK_M)`` query blocks:

- q read once (``B H Tq D``), k and v read once per query block (``2 B H n_q Tk D``, about half of
  that when causal), the output written once (``B H Tq D``);
- ``4 B H Tq Tk D`` FLOPs (``2`` for ``q k^T``, ``2`` for ``p v``), about half when causal.

A row with ``key_lengths[b] == 0`` has no key to attend to; its output is undefined (the reference
gives NaN, this kernel writes zeros). Every other row sees key 0, so the running maximum is finite
after the first key block and the softmax never computes ``-inf - -inf``.

On CPU (Triton's interpreter, for tests) bfloat16 is refused: the interpreter stores it as uint16 and
``tl.dot`` multiplies the bit patterns (triton-lang/triton#11584).
"""
from __future__ import annotations

import math

import torch

import triton
import triton.language as tl
from mmgen_engine.errors import BackendError

MAX_HEAD_DIM = 512  # the VQGAN's single attention head is 512 wide


def plan(block_d: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M queries per program, BLOCK_N keys per step, num_warps, num_stages)`` for a padded
    head dim: the q block and the fp32 accumulator (``BLOCK_M x BLOCK_D``) live in registers and a
    k and a v tile (``BLOCK_N x BLOCK_D`` each, per stage) in shared memory, so wider heads take
    fewer queries and keys per step."""
    if block_d <= 128:
        return 64, 64, 4, 2
    if block_d <= 256:
        return 32, 32, 4, 1
    return 16, 32, 8, 1


@triton.jit
def _attention_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, lengths_ptr,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_heads, kv_group, tq, tk, head_dim,  # kv_group: query heads per K/V head
    CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # 64-bit offsets: caches can be large
    h = (pid_bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :] * stride_qd,
                mask=(rows[:, None] < tq) & dim_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + (h // kv_group) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // kv_group) * stride_vh

    # keys [0, n_keys) are valid for this row; this program needs keys [0, end)
    n_keys = tk
    if HAS_LENGTHS:
        n_keys = tl.minimum(tl.load(lengths_ptr + b), tk).to(tl.int32)
    end = n_keys
    shift = tk - tq  # causal queries are the last tq positions: query t sees keys s <= t + shift
    if CAUSAL:  # key blocks entirely above the diagonal are skipped
        end = tl.minimum(end, (pid_m + 1) * BLOCK_M + shift)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, end, BLOCK_N):
        keys = start + cols
        key_ok = keys < n_keys
        k_t = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        # "ieee" keeps fp32 inputs out of TF32 (it is ignored for fp16/bf16)
        s = tl.dot(q, k_t, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), fp32
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= rows[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vt + dims[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # l_i is 0 only in a row without keys (key_lengths[b] == 0): write zeros there, not NaN
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < tq) & dim_ok[None, :])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              key_lengths: torch.Tensor | None) -> torch.Tensor:
    """``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, optional ``key_lengths [B]`` -> ``[B, Hq, Tq, D]``."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1:3]
    if k.shape != (b, hkv, tk, d) or v.shape != k.shape or h % hkv:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise BackendError("attention: Triton's interpreter cannot run tl.dot on bfloat16; "
                           "use float32 or float16 on CPU")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention: the triton kernel supports head dims up to {MAX_HEAD_DIM}, got {d}")
    out = torch.empty((b, h, tq, d), dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n, warps, stages = plan(block_d)
    grid = (triton.cdiv(tq, block_m), b * h)
    _attention_fwd[grid](
        q, k, v, out, key_lengths,
        scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, h // hkv, tq, tk, d,
        CAUSAL=causal, HAS_LENGTHS=key_lengths is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return out
