// Decode attention (flash-decoding): one query token per row against a KV cache.
//
//   out[r, h] = sum_{s < lengths[b]} softmax_s(q[r, h] . k[b, h, s] * scale) v[b, h, s],  b = r / group
//
// q and out have p.group query rows per cache row: group = 1 is one query per cache row; with
// group > 1 a request's beams share one copy of its cross-attention K/V (nothing is copied per beam).
// The same kernel serves causal self-attention over the static KV cache (lengths = tokens so far)
// and cross-attention over the cached encoder K/V (lengths = the row's encoder length). With
// new_k / new_v [B, H, D] (self-attention, group = 1 only) the new token's key and value are written
// into cache slot lengths[b] - 1 by the kernel, and read from new_k / new_v for that slot.
//
// Work split: the key axis is cut into chunks of `chunk` keys; block (r * H + h, split) reduces one
// chunk of query row r against cache row r / group with an online softmax (running max, sum and fp32
// accumulator) and writes a partial result (or, with one split, the output). A second kernel combines
// a row's partials, weighting each by exp(m_split - m_max). Chunks past a row's length write an empty
// partial (m = -inf), so the launch can cover a whole static cache, as CUDA-graph capture needs. The
// group * H blocks of one cache row and split are consecutive, so repeated reads of shared K/V mostly
// hit L2.
//
// Inside a block, groups of TPK threads (thread groups, unrelated to p.group) own one key at a time;
// a thread holds NCHUNK vectors of VEC elements of q (and of its accumulator): element
// d = (c * TPK + lane) * VEC + i, so the group's lanes read consecutive 16-byte pieces of a key.
// Scores are reduced over the group by shuffles; at the end the groups' (m, l, acc) are merged
// through shared memory.
//
// Arithmetic as in the Triton kernel (kernels/decode_attention.py): q is multiplied by the scale in
// fp32 first, scores and softmax in fp32; exp is expf here (Triton's is exp2-based), so the two agree
// to rounding, not bit for bit.
#pragma once

#include <cmath>

#include "common.cuh"
#include "params.h"

namespace mmgen {
namespace kernels {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeUnroll = 2;  // keys per group and iteration

template <class T, int VEC, int TPK, int NCHUNK>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_kernel(DecodeAttentionParams p) {
  constexpr int kGroups = kDecodeThreads / TPK;
  constexpr int kMaxDim = TPK * VEC * NCHUNK;
  __shared__ float group_m[kGroups];
  __shared__ float group_l[kGroups];
  __shared__ float group_acc[kGroups * kMaxDim];

  const int bh = blockIdx.x, split = blockIdx.y;  // bh: query row * heads + head
  const int r = bh / p.heads, h = bh % p.heads;
  const int b = r / p.group;  // the query row's cache row
  const int D = p.head_dim;
  // in [1, S] (the wrapper checks eagerly; clamped so that a bad value in a captured graph stays in bounds)
  const int length = static_cast<int>(p.lengths[b] < 1 ? 1 : p.lengths[b] > p.slots ? p.slots : p.lengths[b]);
  const int start = split * p.chunk;
  const int end = start + p.chunk < length ? start + p.chunk : length;
  const int group = threadIdx.x / TPK, lane = threadIdx.x % TPK;
  const bool has_new = p.new_k != nullptr;

  T* k_row = static_cast<T*>(p.k) + b * p.k_b + h * p.k_h;
  T* v_row = static_cast<T*>(p.v) + b * p.v_b + h * p.v_h;
  const T* new_k = has_new ? static_cast<const T*>(p.new_k) + b * p.new_b + h * p.new_h : nullptr;
  const T* new_v = has_new ? static_cast<const T*>(p.new_v) + b * p.new_b + h * p.new_h : nullptr;

  if (has_new && split == 0) {  // the cache write; this launch reads slot length-1 from new_k/new_v
    for (int d = threadIdx.x * VEC; d < D; d += kDecodeThreads * VEC) {
      copy_elements<T, VEC>(k_row + (length - 1) * p.k_s + d, new_k + d);
      copy_elements<T, VEC>(v_row + (length - 1) * p.v_s + d, new_v + d);
    }
  }

  const T* q_row = static_cast<const T*>(p.q) + r * p.q_b + h * p.q_h;
  float q[NCHUNK][VEC], acc[NCHUNK][VEC];
#pragma unroll
  for (int c = 0; c < NCHUNK; ++c) {
    const int d = (c * TPK + lane) * VEC;
    if (d < D) {
      load_floats<T, VEC>(q_row + d, q[c]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) q[c][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      q[c][i] *= p.scale;
      acc[c][i] = 0.f;
    }
  }

  float m = -INFINITY, l = 0.f;
  // A group takes keys group, group + kGroups, ... in order, kDecodeUnroll of them per iteration
  // with all their loads issued first (more bytes in flight). Every group runs the same number of
  // iterations: the score reduction is a warp collective.
  for (int n0 = start; n0 < end; n0 += kGroups * kDecodeUnroll) {
    float s[kDecodeUnroll], vals[kDecodeUnroll][NCHUNK][VEC];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int n = n0 + u * kGroups + group;
      const bool valid = n < end;
      const bool is_new = has_new && n == length - 1;
      const T* k_vec = is_new ? new_k : k_row + static_cast<int64_t>(n) * p.k_s;
      const T* v_vec = is_new ? new_v : v_row + static_cast<int64_t>(n) * p.v_s;
      s[u] = 0.f;
#pragma unroll
      for (int c = 0; c < NCHUNK; ++c) {
        const int d = (c * TPK + lane) * VEC;
        if (valid && d < D) {
          float kv[VEC];
          load_floats<T, VEC>(k_vec + d, kv);
          load_floats<T, VEC>(v_vec + d, vals[u][c]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) s[u] += q[c][i] * kv[i];
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) vals[u][c][i] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const float score = group_sum<TPK>(s[u]);
      if (n0 + u * kGroups + group < end) {
        const float m_new = fmaxf(m, score);
        const float alpha = expf(m - m_new);  // 0 on the first key (m = -inf)
        const float e = expf(score - m_new);
        l = l * alpha + e;
#pragma unroll
        for (int c = 0; c < NCHUNK; ++c)
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[c][i] = acc[c][i] * alpha + e * vals[u][c][i];
        m = m_new;
      }
    }
  }

  // merge the groups: weights exp(m_g - max), empty groups (m = -inf) weigh nothing
  if (lane == 0) group_m[group] = m;
  __syncthreads();
  float m_max = -INFINITY;
  for (int g = 0; g < kGroups; ++g) m_max = fmaxf(m_max, group_m[g]);
  const float w = m == -INFINITY ? 0.f : expf(m - m_max);
  if (lane == 0) group_l[group] = l * w;
#pragma unroll
  for (int c = 0; c < NCHUNK; ++c) {
    const int d = (c * TPK + lane) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) group_acc[group * kMaxDim + d + i] = acc[c][i] * w;
  }
  __syncthreads();
  float l_sum = 0.f;
  for (int g = 0; g < kGroups; ++g) l_sum += group_l[g];
  const int row = bh * p.splits + split;
  for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
    float total = 0.f;
    for (int g = 0; g < kGroups; ++g) total += group_acc[g * kMaxDim + d];
    if (p.splits == 1) {
      static_cast<T*>(p.out)[static_cast<int64_t>(bh) * D + d] = from_float<T>(total / l_sum);
    } else {
      p.partial[static_cast<int64_t>(row) * D + d] = total;
    }
  }
  if (p.splits > 1 && threadIdx.x == 0) {
    p.ml[2 * row] = m_max;
    p.ml[2 * row + 1] = l_sum;
  }
}

template <class T>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_combine_kernel(DecodeAttentionParams p) {
  const int bh = blockIdx.x;
  const float* ml = p.ml + 2 * static_cast<int64_t>(bh) * p.splits;
  const float* partial = p.partial + static_cast<int64_t>(bh) * p.splits * p.head_dim;
  float m_max = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m_max = fmaxf(m_max, ml[2 * s]);
  for (int d = threadIdx.x; d < p.head_dim; d += kDecodeThreads) {
    float total = 0.f, l_sum = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float m = ml[2 * s];
      if (m == -INFINITY) continue;  // a chunk past the row's length
      const float w = expf(m - m_max);
      total += partial[static_cast<int64_t>(s) * p.head_dim + d] * w;
      l_sum += ml[2 * s + 1] * w;
    }
    static_cast<T*>(p.out)[static_cast<int64_t>(bh) * p.head_dim + d] = from_float<T>(total / l_sum);
  }
}

// Host side: picks the instantiation for the head dim and alignment, and launches through
// `launch(kernel, grid, block, params)` (a CUDA launch in csrc/cuda, the emulator in the tests).
// `vectorized`: every pointer is 16-byte aligned and every stride a multiple of 16 bytes.
template <class T, class Launch>
void launch_decode_attention(const DecodeAttentionParams& p, bool vectorized, Launch&& launch) {
  const int rows = p.batch * p.group * p.heads;  // query rows x heads (checked: fits an int)
  const dim3 grid(rows, p.splits), block(kDecodeThreads);
  auto go = [&](auto kernel) {
    launch(kernel, grid, block, p);
    if (p.splits > 1) launch(&decode_attention_combine_kernel<T>, dim3(rows), block, p);
  };
  constexpr int V = 16 / sizeof(T);
  const int D = p.head_dim;
  if (vectorized && D % V == 0) {
    const int vecs = D / V;
    if (vecs <= 1) return go(&decode_attention_kernel<T, V, 1, 1>);
    if (vecs <= 2) return go(&decode_attention_kernel<T, V, 2, 1>);
    if (vecs <= 4) return go(&decode_attention_kernel<T, V, 4, 1>);
    if (vecs <= 8) return go(&decode_attention_kernel<T, V, 8, 1>);
    if (vecs <= 16) return go(&decode_attention_kernel<T, V, 16, 1>);
    if (vecs <= 32) return go(&decode_attention_kernel<T, V, 32, 1>);
    return go(&decode_attention_kernel<T, V, 32, kDecodeMaxHeadDim / (32 * V)>);
  }
  if (D <= 32) return go(&decode_attention_kernel<T, 1, 32, 1>);
  if (D <= 64) return go(&decode_attention_kernel<T, 1, 32, 2>);
  if (D <= 128) return go(&decode_attention_kernel<T, 1, 32, 4>);
  if (D <= 256) return go(&decode_attention_kernel<T, 1, 32, 8>);
  return go(&decode_attention_kernel<T, 1, 32, 16>);
}

// Checks the arguments and launches for `dtype` (float16 or bfloat16). Keys per split are fixed
// (kDecodeChunk, not derived from the cache size or the batch), so a row's result never depends on
// either, as in the Triton kernel.
template <class Launch>
void dispatch_decode_attention(const DecodeAttentionParams& p, DType dtype, bool vectorized, Launch&& launch) {
  require(p.q && p.k && p.v && p.lengths && p.out, "decode_attention: null pointer");
  require((p.new_k == nullptr) == (p.new_v == nullptr), "decode_attention: new_k and new_v go together");
  require(p.batch > 0 && p.heads > 0 && p.slots > 0, "decode_attention: empty batch, heads or cache");
  require(p.group >= 1, "decode_attention: group must be >= 1");
  require(p.group == 1 || p.new_k == nullptr,
          "decode_attention: group > 1 with new_k / new_v (a cache write needs one query row per cache row)");
  require(p.head_dim > 0 && p.head_dim <= kDecodeMaxHeadDim, "decode_attention: head dim out of range");
  require(p.chunk == kDecodeChunk && p.splits == (p.slots + kDecodeChunk - 1) / kDecodeChunk,
          "decode_attention: chunk / splits do not match the cache size");
  require(p.splits == 1 || (p.partial && p.ml), "decode_attention: split-K needs the partial buffers");
  require(p.splits <= 65535, "decode_attention: cache too long (more than 65535 splits)");
  // block and partial-row indices are ints
  require(static_cast<int64_t>(p.batch) * p.group * p.heads * p.splits <= 0x7fffffff,
          "decode_attention: too many query rows x heads x splits");
  switch (dtype) {
    case DType::kFloat16: return launch_decode_attention<__half>(p, vectorized, launch);
    case DType::kBFloat16: return launch_decode_attention<__nv_bfloat16>(p, vectorized, launch);
    default: throw std::invalid_argument("decode_attention: dtype must be float16 or bfloat16");
  }
}

}  // namespace kernels
}  // namespace mmgen
