// Decode attention (flash-decoding): one query token per row against a KV cache.
//
//   out[r, h] = sum_{s < lengths[b]} softmax_s(q[r, h] . k[b, h, s] * scale) v[b, h, s],  b = r / group
//
// q and out have p.group query rows per cache row: group = 1 is one query per cache row; with
// group > 1 a request's beams share one copy of its cross-attention K/V (nothing is copied per beam).
// The same kernel serves causal self-attention over the static KV cache (lengths = tokens so far)
// and cross-attention over the cached encoder K/V (lengths = the row's encoder length). With
// new_k / new_v [B, Hkv, D] (self-attention, group = 1 only) the new token's key and value are written
// into cache slot lengths[b] - 1 by the kernel: by the block(s) whose chunk holds that slot, which then
// read it back like any other (a barrier between), so the key loop has no special case.
//
// Work split: the key axis is cut into chunks of `chunk` keys; block ((r * H + h) / HPB, split)
// reduces one chunk of query row r's heads h .. h + HPB - 1 against cache row r / group with an
// online softmax (running max, sum and fp32 accumulator) and writes a partial result (or, with one split, the output). A second kernel combines
// a row's partials, weighting each by exp(m_split - m_max). Chunks past a row's length write an empty
// partial (m = -inf), so the launch can cover a whole static cache, as CUDA-graph capture needs. The
// group * H / HPB blocks of one cache row and split are consecutive, so repeated reads of shared K/V mostly
// hit L2.
//
// Inside a block, groups of TPK threads (thread groups, unrelated to p.group) own one key at a time;
// a thread holds NCHUNK vectors of VEC elements of q (and of its accumulator): element
// d = (c * TPK + lane) * VEC + i, so the group's lanes read consecutive 16-byte pieces of a key.
// Scores are reduced over the group by shuffles; at the end the groups' (m, l, acc) are merged
// through shared memory.
//
// Grouped-query attention: k, v have kv_heads (Hkv) heads for the H query heads (Hkv dividing H);
// query head h reads K/V head h / (H / Hkv). A block serves HPB consecutive query heads of one K/V
// head (HPB = 4, 2 or 1, the largest dividing H / Hkv; 1 on the scalar-load path), so each key and
// value it loads is scored against HPB queries; the blocks of one K/V head are consecutive, so any
// further repeats mostly hit L2. Nothing is copied.
//
// Rotary step (cos, sin [B, D / 2] fp32, each cache row's new position): q and new_k are rotated on
// load (rotate-half convention, ops/rotary.py); the rotated key, rounded to T, is what the cache holds
// and what is scored, the rotated query stays in fp32.
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

// VEC elements of the row at `row` from element d, as floats; rotated by RoPE when cos is given
// (element e < D/2 with partner e + D/2: x_e cos_e - x_(e+D/2) sin_e; element e >= D/2:
// x_e cos_(e-D/2) + x_(e-D/2) sin_(e-D/2)). The partners are scalar loads: rotation is per row, once.
template <class T, int VEC>
__device__ __forceinline__ void load_row(const T* row, int d, int D, const float* cos, const float* sin,
                                         float (&out)[VEC]) {
  load_floats<T, VEC>(row + d, out);
  if (cos == nullptr) return;
  const int half = D / 2;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const int e = d + i;
    const bool first = e < half;
    const int j = first ? e : e - half;
    const float partner = to_float(row[first ? e + half : e - half]);
    out[i] = out[i] * cos[j] + (first ? -partner : partner) * sin[j];
  }
}

template <class T, int VEC, int TPK, int NCHUNK, int HPB>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_kernel(DecodeAttentionParams p) {
  constexpr int kGroups = kDecodeThreads / TPK;
  constexpr int kMaxDim = TPK * VEC * NCHUNK;
  __shared__ float group_m[kGroups];
  __shared__ float group_l[kGroups];
  __shared__ float group_acc[kGroups * kMaxDim];

  const int blocks_per_row = p.heads / HPB, split = blockIdx.y;
  const int r = blockIdx.x / blocks_per_row;            // the query row
  const int h0 = blockIdx.x % blocks_per_row * HPB;     // its first query head here
  const int kv_head = h0 / (p.heads / p.kv_heads);
  const int b = r / p.group;  // the query row's cache row
  const int D = p.head_dim;
  // in [1, S] (the wrapper checks eagerly; clamped so that a bad value in a captured graph stays in bounds)
  const int length = static_cast<int>(p.lengths[b] < 1 ? 1 : p.lengths[b] > p.slots ? p.slots : p.lengths[b]);
  const int start = split * p.chunk;
  const int end = start + p.chunk < length ? start + p.chunk : length;
  const int group = threadIdx.x / TPK, lane = threadIdx.x % TPK;
  const bool has_new = p.new_k != nullptr;
  const float* cos = p.cos != nullptr ? p.cos + static_cast<int64_t>(b) * (D / 2) : nullptr;
  const float* sin = p.sin != nullptr ? p.sin + static_cast<int64_t>(b) * (D / 2) : nullptr;

  T* k_row = static_cast<T*>(p.k) + b * p.k_b + kv_head * p.k_h;
  T* v_row = static_cast<T*>(p.v) + b * p.v_b + kv_head * p.v_h;
  const T* new_k = has_new ? static_cast<const T*>(p.new_k) + b * p.new_b + kv_head * p.new_h : nullptr;
  const T* new_v = has_new ? static_cast<const T*>(p.new_v) + b * p.new_b + kv_head * p.new_h : nullptr;

  // The cache write: the block whose chunk holds slot length-1 stores the new key (rotated with cos)
  // and value there, then reads that slot like any other (with Hkv < H, each block of the K/V head
  // holding the slot stores the same values).
  if (has_new) {
    if (start <= length - 1 && length - 1 < end) {
      for (int d = threadIdx.x * VEC; d < D; d += kDecodeThreads * VEC) {
        float kv[VEC];
        load_row<T, VEC>(new_k, d, D, cos, sin, kv);
        store_floats<T, VEC>(k_row + (length - 1) * p.k_s + d, kv);
        copy_elements<T, VEC>(v_row + (length - 1) * p.v_s + d, new_v + d);
      }
    }
    __syncthreads();  // the block's writes are visible to all its threads
  }

  float q[HPB][NCHUNK][VEC], acc[HPB][NCHUNK][VEC];
#pragma unroll
  for (int j = 0; j < HPB; ++j) {
    const T* q_row = static_cast<const T*>(p.q) + r * p.q_b + (h0 + j) * p.q_h;
#pragma unroll
    for (int c = 0; c < NCHUNK; ++c) {
      const int d = (c * TPK + lane) * VEC;
      if (d < D) {
        load_row<T, VEC>(q_row, d, D, cos, sin, q[j][c]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) q[j][c][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        q[j][c][i] *= p.scale;
        acc[j][c][i] = 0.f;
      }
    }
  }

  float m[HPB], l[HPB];
#pragma unroll
  for (int j = 0; j < HPB; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
  }
  // A group takes keys group, group + kGroups, ... in order, kDecodeUnroll of them per iteration
  // with all their loads issued first (more bytes in flight). Every group runs the same number of
  // iterations: the score reduction is a warp collective.
  for (int n0 = start; n0 < end; n0 += kGroups * kDecodeUnroll) {
    float s[kDecodeUnroll][HPB], vals[kDecodeUnroll][NCHUNK][VEC];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int n = n0 + u * kGroups + group;
      const bool valid = n < end;
      const T* k_vec = k_row + static_cast<int64_t>(n) * p.k_s;
      const T* v_vec = v_row + static_cast<int64_t>(n) * p.v_s;
#pragma unroll
      for (int j = 0; j < HPB; ++j) s[u][j] = 0.f;
#pragma unroll
      for (int c = 0; c < NCHUNK; ++c) {
        const int d = (c * TPK + lane) * VEC;
        if (valid && d < D) {
          float kv[VEC];
          load_floats<T, VEC>(k_vec + d, kv);
          load_floats<T, VEC>(v_vec + d, vals[u][c]);
#pragma unroll
          for (int j = 0; j < HPB; ++j)
#pragma unroll
            for (int i = 0; i < VEC; ++i) s[u][j] += q[j][c][i] * kv[i];
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) vals[u][c][i] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < HPB; ++j) {
        const float score = group_sum<TPK>(s[u][j]);
        if (n0 + u * kGroups + group < end) {
          const float m_new = fmaxf(m[j], score);
          const float alpha = expf(m[j] - m_new);  // 0 on the first key (m = -inf)
          const float e = expf(score - m_new);
          l[j] = l[j] * alpha + e;
#pragma unroll
          for (int c = 0; c < NCHUNK; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[j][c][i] = acc[j][c][i] * alpha + e * vals[u][c][i];
          m[j] = m_new;
        }
      }
    }
  }

  // merge the groups, head by head: weights exp(m_g - max), empty groups (m = -inf) weigh nothing
#pragma unroll
  for (int j = 0; j < HPB; ++j) {
    if (lane == 0) group_m[group] = m[j];
    __syncthreads();
    float m_max = -INFINITY;
    for (int g = 0; g < kGroups; ++g) m_max = fmaxf(m_max, group_m[g]);
    const float w = m[j] == -INFINITY ? 0.f : expf(m[j] - m_max);
    if (lane == 0) group_l[group] = l[j] * w;
#pragma unroll
    for (int c = 0; c < NCHUNK; ++c) {
      const int d = (c * TPK + lane) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) group_acc[group * kMaxDim + d + i] = acc[j][c][i] * w;
    }
    __syncthreads();
    float l_sum = 0.f;
    for (int g = 0; g < kGroups; ++g) l_sum += group_l[g];
    const int bh = blockIdx.x * HPB + j;  // query row * heads + head
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
    __syncthreads();  // the next head reuses the shared arrays
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
template <class T, int HPB, class Launch>
void launch_decode_attention_heads(const DecodeAttentionParams& p, bool vectorized, Launch&& launch) {
  const int rows = p.batch * p.group * p.heads;  // query rows x heads (checked: fits an int)
  const dim3 grid(rows / HPB, p.splits), block(kDecodeThreads);
  auto go = [&](auto kernel) {
    launch(kernel, grid, block, p);
    if (p.splits > 1) launch(&decode_attention_combine_kernel<T>, dim3(rows), block, p);
  };
  constexpr int V = 16 / sizeof(T);
  const int D = p.head_dim;
  if (vectorized && D % V == 0) {
    const int vecs = D / V;
    if (vecs <= 1) return go(&decode_attention_kernel<T, V, 1, 1, HPB>);
    if (vecs <= 2) return go(&decode_attention_kernel<T, V, 2, 1, HPB>);
    if (vecs <= 4) return go(&decode_attention_kernel<T, V, 4, 1, HPB>);
    if (vecs <= 8) return go(&decode_attention_kernel<T, V, 8, 1, HPB>);
    if (vecs <= 16) return go(&decode_attention_kernel<T, V, 16, 1, HPB>);
    if (vecs <= 32) return go(&decode_attention_kernel<T, V, 32, 1, HPB>);
    return go(&decode_attention_kernel<T, V, 32, kDecodeMaxHeadDim / (32 * V), HPB>);
  }
  if constexpr (HPB == 1) {  // the scalar-load path (unaligned views, odd head dims): one head per block
    if (D <= 32) return go(&decode_attention_kernel<T, 1, 32, 1, 1>);
    if (D <= 64) return go(&decode_attention_kernel<T, 1, 32, 2, 1>);
    if (D <= 128) return go(&decode_attention_kernel<T, 1, 32, 4, 1>);
    if (D <= 256) return go(&decode_attention_kernel<T, 1, 32, 8, 1>);
    return go(&decode_attention_kernel<T, 1, 32, 16, 1>);
  } else {
    return launch_decode_attention_heads<T, 1>(p, vectorized, launch);
  }
}

// Query heads per block: the largest of 4, 2, 1 dividing the heads per K/V head.
template <class T, class Launch>
void launch_decode_attention(const DecodeAttentionParams& p, bool vectorized, Launch&& launch) {
  const int per_kv_head = p.heads / p.kv_heads;
  if (per_kv_head % 4 == 0) return launch_decode_attention_heads<T, 4>(p, vectorized, launch);
  if (per_kv_head % 2 == 0) return launch_decode_attention_heads<T, 2>(p, vectorized, launch);
  return launch_decode_attention_heads<T, 1>(p, vectorized, launch);
}

// Checks the arguments and launches for `dtype` (float16 or bfloat16). Keys per split are fixed
// (kDecodeChunk, not derived from the cache size or the batch), so a row's result never depends on
// either, as in the Triton kernel.
template <class Launch>
void dispatch_decode_attention(const DecodeAttentionParams& p, DType dtype, bool vectorized, Launch&& launch) {
  require(p.q && p.k && p.v && p.lengths && p.out, "decode_attention: null pointer");
  require((p.new_k == nullptr) == (p.new_v == nullptr), "decode_attention: new_k and new_v go together");
  require(p.batch > 0 && p.heads > 0 && p.slots > 0, "decode_attention: empty batch, heads or cache");
  require(p.kv_heads > 0 && p.heads % p.kv_heads == 0, "decode_attention: K/V heads must divide the query heads");
  require((p.cos == nullptr) == (p.sin == nullptr), "decode_attention: cos and sin go together");
  require(p.cos == nullptr || p.head_dim % 2 == 0, "decode_attention: rotary needs an even head dim");
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
