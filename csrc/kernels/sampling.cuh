// Fused sampling: guidance combine, temperature, top-k, top-p and a Gumbel-max draw, one block per
// row, one launch. Computes mmgen_engine.ops.sample (the spec is mmgen_engine/ops/sampling.py) with
// the same decisions as the Triton kernel (kernels/sampling.py) and the same random numbers.
//
// Per row b, every value in fp32 with explicitly rounded operations (no FMA contraction), as torch
// computes them: z = logits[b] (guided: uncond * (1 - g) + cond * g), l = z * inv_t. Tokens are
// compared through order-preserving uint32 keys of l (-0.0 keyed as +0.0).
//   1. Max pass: max z and its first index - the token of a greedy row, which stops here. NaN
//      logits are skipped (torch's argmax would return the first NaN); a row of NaN gives token 0.
//   2. Top-k (0 < k < n): the k-th largest key by radix select, 8 bits per pass (4 passes, a
//      256-bin count histogram in shared memory; integer counts, so exact and deterministic).
//      Tokens with key >= it are kept (ties at the boundary kept).
//   3. Top-p (p < 1): s = sum of exp(l - m) over the top-k survivors (m = max l = max z * inv_t),
//      weights w = exp(l - m) / s; the threshold is the largest key T whose mass at or above
//      reaches p (a token is kept iff the mass strictly above it is < p). It is searched among
//      candidates: the survivors when at most kCandidates of them, else the kCandidates largest
//      (radix select as in 2), copied in index order to shared memory. When their mass reaches p
//      the threshold lies among them and a radix search over the copy finds it (4 bits per pass,
//      16 candidate thresholds summed at once, 8 passes); otherwise (a flat distribution, or
//      ties overflowing the copy) the same search runs over the whole row.
//   4. Gumbel pass: argmax over kept tokens of l - log(-log(u)), first index on ties - over the
//      copy when every kept token is in it, else over the row.
// Each pass re-reads the row (from L2 after the first): top-k + top-p at a peaked distribution
// takes about 7 light passes; no workspace in global memory.
//
// Sums are per-thread sums over a fixed strided slice, then fixed-order warp and block
// reductions: deterministic for a given n. Like the Triton kernel's, the fp32 sums (s and the
// top-p masses) are in another order than the reference's, so a token whose mass above is within
// rounding of top_p can be kept or dropped differently; every other decision is exact.
//
// Random numbers: u[b, i] from Philox4x32-10 with key (seed_b & 0xffffffff, seed_b >> 32) and
// counter (i, r_b, o_b & 0xffffffff, o_b >> 32), first word x0, u = ((x0 >> 9) + 0.5) * 2^-23
// (mmgen_engine/ops/random.py; tl.philox computes the same), so a seed gives the same tokens as the
// Triton sampler. r_b = rows[b] (b when rows is null): the row's index in the random stream, so a
// row of a continuous batch draws what it would as row r_b of its own batch; o_b = offset[b *
// offset_stride] (stride 0: one step counter for every row; 1: per row). Both are read on the
// device (a CUDA graph replays with new ones).
#pragma once

#include <cmath>

#include "common.cuh"
#include "params.h"

namespace mmgen {
namespace kernels {

__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

// Philox4x32-10 (Salmon et al. 2011), the first output word.
__device__ __forceinline__ uint32_t philox_x0(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Reduces 16 per-lane values over the warp by halving exchanges (8 + 4 + 2 + 1 + 1 shuffles
// instead of 16 * 5): afterwards lanes 2j and 2j + 1 hold the warp's total of digit
// ((lane & 16) >> 1) | ((lane & 8) >> 1) | ((lane & 4) >> 1) | ((lane & 2) >> 1), returned.
// Deterministic (a fixed order of additions per digit).
template <class V>
__device__ __forceinline__ V warp_digit_sums(V (&v)[16], int& digit) {
  const int lane = threadIdx.x % kWarpSize;
  digit = 0;
#pragma unroll
  for (int half = 8, offset = 16; half >= 1; half /= 2, offset /= 2) {
    const bool upper = lane & offset;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const V send = upper ? v[j] : v[j + half];
      const V keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(kFullMask, send, offset);
    }
    digit += upper ? half : 0;
  }
  return v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
}

template <class T>
struct SampleRow {
  const T* uncond;
  const T* cond;  // null without guidance
  float g, inv_t;

  __device__ __forceinline__ float z(int i) const {
    const float u = to_float(uncond[i]);
    if (cond == nullptr) return u;
    return __fadd_rn(__fmul_rn(u, __fsub_rn(1.f, g)), __fmul_rn(to_float(cond[i]), g));
  }
  __device__ __forceinline__ float l(int i) const { return __fmul_rn(z(i), inv_t); }
};

// (value, index) of the max, first index on ties, over the block; returned to every thread.
__device__ __forceinline__ void block_argmax(float& value, int& index, float* values, int* indices) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(kFullMask, value, offset);
    const int i = __shfl_xor_sync(kFullMask, index, offset);
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    values[warp] = value;
    indices[warp] = index;
  }
  __syncthreads();
  value = values[0];
  index = indices[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
    if (values[w] > value || (values[w] == value && indices[w] < index)) {
      value = values[w];
      index = indices[w];
    }
  }
  __syncthreads();
}

constexpr int kCandidates = 2048;  // top-p candidates copied to shared memory

// Shared memory of the sampling kernel.
struct SampleShared {
  float values[kWarpSize];
  int indices[kWarpSize];
  int counts[kWarpSize];
  int histogram[256];
  float masses[kWarpSize * 16];
  uint32_t word;
  int number;
  float cand_l[kCandidates];
  int cand_i[kCandidates];
};

// The k-th largest key (1 <= k <= count of the keys) among key(l(j)), j < count: the largest T with
// #{key >= T} >= k. Radix select from the top byte down; block-uniform result.
template <class L>
__device__ uint32_t select_kth_key(int count, L l, int k, SampleShared& sh) {
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  const int lane = threadIdx.x % kWarpSize;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) sh.histogram[d] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      const uint32_t key = order_key(l(j));
      if ((key & mask) == prefix) atomicAdd(&sh.histogram[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) {  // warp 0: the largest digit whose count from the top reaches `remaining`
      int bins[8], local = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) local += bins[j] = sh.histogram[lane * 8 + j];
      int above = local;  // this lane's bins and every higher lane's
#pragma unroll
      for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int other = __shfl_down_sync(kFullMask, above, offset);
        if (lane + offset < kWarpSize) above += other;
      }
      int suffix = above - local, hit = -1, beyond = 0;  // suffix: count of the digits above bin j
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        if (hit < 0 && suffix + bins[j] >= remaining) {
          hit = j;
          beyond = suffix;
        }
        suffix += bins[j];
      }
      const unsigned lanes = __ballot_sync(kFullMask, hit >= 0);
      if (lanes != 0 && lane == 31 - __clz(lanes)) {
        sh.word = prefix | (static_cast<uint32_t>(lane * 8 + hit) << shift);
        sh.number = remaining - beyond;
      }
    }
    __syncthreads();
    prefix = sh.word;
    remaining = sh.number;
    mask |= 255u << shift;
    __syncthreads();  // the histogram and the words are rewritten by the next pass
  }
  return prefix;
}

// The largest key T with sum of weight(l, key) over {j < count : key(l(j)) >= T} reaching `target`
// (0 when even T = 0 does not). 4 bits per pass, the 16 candidate thresholds summed at once.
template <class L, class Weight>
__device__ uint32_t mass_search(int count, L l, float target, Weight weight, SampleShared& sh) {
  const int warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  uint32_t prefix = 0;
  for (int shift = 28; shift >= 0; shift -= 4) {
    float sums[16];
#pragma unroll
    for (int d = 0; d < 16; ++d) sums[d] = 0.f;
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      const float x = l(j);
      const uint32_t key = order_key(x);
      const float w = weight(x, key);
#pragma unroll
      for (int d = 0; d < 16; ++d) sums[d] += key >= (prefix | (static_cast<uint32_t>(d) << shift)) ? w : 0.f;
    }
    int digit;
    const float total = warp_digit_sums(sums, digit);
    if (threadIdx.x % 2 == 0) sh.masses[warp * 16 + digit] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      int best = 0;  // the largest digit whose candidate reaches the target
      for (int d = 1; d < 16; ++d) {
        float row_total = 0.f;
        for (int w = 0; w < warps; ++w) row_total += sh.masses[w * 16 + d];
        if (row_total >= target) best = d;
      }
      sh.word = prefix | (static_cast<uint32_t>(best) << shift);
    }
    __syncthreads();
    prefix = sh.word;
    __syncthreads();  // the masses and the word are rewritten by the next pass
  }
  return prefix;
}

// Copies (l, column) of every column with key >= floor to sh.cand_l / sh.cand_i in column order;
// returns how many, or -1 when more than kCandidates.
template <class Row>
__device__ int gather_candidates(const Row& row, int n, uint32_t floor, SampleShared& sh) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  int total = 0;
  for (int base = 0; base < n; base += blockDim.x) {  // the same trip count in every thread
    const int i = base + threadIdx.x;
    const float l = i < n ? row.l(i) : 0.f;
    const bool keep = i < n && order_key(l) >= floor;
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (lane == 0) sh.counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? sh.counts[w] : 0;
      all += sh.counts[w];
    }
    const int slot = total + before + __popc(ballot & ((1u << lane) - 1u));
    if (keep && slot < kCandidates) {
      sh.cand_l[slot] = l;
      sh.cand_i[slot] = i;
    }
    total += all;
    __syncthreads();  // counts are rewritten by the next round
    if (total > kCandidates) return -1;  // block-uniform
  }
  return total;
}

// The Gumbel-max draw over the tokens with key >= floor among count items (l(j), column(j)): the
// block-uniform first column of the max of l - log(-log(u)).
template <class L, class Column>
__device__ int gumbel_argmax(int count, L l, Column column, uint32_t floor, const SampleParams& p, int b,
                             SampleShared& sh) {
  const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
  const uint64_t offset = static_cast<uint64_t>(p.offset[static_cast<int64_t>(b) * p.offset_stride]);
  const uint32_t off_lo = static_cast<uint32_t>(offset), off_hi = static_cast<uint32_t>(offset >> 32);
  const uint32_t row = p.rows != nullptr ? static_cast<uint32_t>(p.rows[b]) : static_cast<uint32_t>(b);
  float best = -INFINITY;
  int arg = p.n;
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const float x = l(j);
    if (order_key(x) < floor) continue;
    const int i = column(j);
    const uint32_t x0 = philox_x0(seed, static_cast<uint32_t>(i), row, off_lo, off_hi);
    const float u = (static_cast<float>(x0 >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
    const float v = __fsub_rn(x, logf(-logf(u)));
    if (v > best || (v == best && i < arg)) {
      best = v;
      arg = i;
    }
  }
  block_argmax(best, arg, sh.values, sh.indices);
  return arg < p.n ? arg : 0;  // a row of -inf: token 0, as argmax
}

template <class T>
__global__ void __launch_bounds__(1024) sample_kernel(SampleParams p) {
  __shared__ SampleShared sh;
  const int b = blockIdx.x;
  const int n = p.n;
  const T* logits = static_cast<const T*>(p.logits);
  SampleRow<T> row{logits + b * p.stride, nullptr, 0.f, 1.f};
  if (p.guidance != nullptr) {
    row.cond = logits + (b + p.batch) * p.stride;
    row.g = p.guidance[b];
  }
  const auto row_l = [&](int i) { return row.l(i); };
  const auto identity = [](int i) { return i; };

  // 1. max z and its first index (the greedy token); all -inf: index 0, as argmax gives
  float best = -INFINITY;
  int arg = n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float z = row.z(i);
    if (z > best || (z == best && i < arg)) {
      best = z;
      arg = i;
    }
  }
  block_argmax(best, arg, sh.values, sh.indices);
  if (p.greedy || !p.do_sample[b]) {
    if (threadIdx.x == 0) p.out[b] = arg < n ? arg : 0;  // a row of NaN: token 0, never n
    return;
  }
  row.inv_t = p.inv_t[b];

  // 2. top-k threshold (key 0 keeps everything)
  const int64_t k = p.top_k[b];
  uint32_t floor = k > 0 && k < n ? select_kth_key(n, row_l, static_cast<int>(k), sh) : 0u;

  // 3. top-p threshold over the softmax of the top-k survivors
  const float top_p = p.top_p[b];
  int candidates = -1;  // how many (l, column) pairs sh.cand_* holds; -1: none
  uint32_t cand_floor = floor;
  if (top_p < 1.f) {
    const float m = __fmul_rn(best, row.inv_t);
    float e = 0.f;
    int survivors = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float l = row.l(i);
      if (order_key(l) >= floor) {
        e += expf(__fsub_rn(l, m));
        ++survivors;
      }
    }
    const float s = block_sum(e, sh.values);
    survivors = block_sum(survivors, sh.counts);
    if (survivors > kCandidates) cand_floor = select_kth_key(n, row_l, kCandidates, sh);
    candidates = gather_candidates(row, n, cand_floor, sh);
    const auto weight = [&](float l, uint32_t key) {
      return key >= floor ? __fdiv_rn(expf(__fsub_rn(l, m)), s) : 0.f;
    };
    bool inside = false;  // the threshold lies among the candidates
    if (candidates >= 0) {
      float mass = 0.f;
      for (int j = threadIdx.x; j < candidates; j += blockDim.x) mass += weight(sh.cand_l[j], order_key(sh.cand_l[j]));
      inside = block_sum(mass, sh.values) >= top_p;
    }
    const uint32_t top_p_floor = inside
        ? mass_search(candidates, [&](int j) { return sh.cand_l[j]; }, top_p, weight, sh)
        : mass_search(n, row_l, top_p, weight, sh);
    if (top_p_floor > floor) floor = top_p_floor;
  }

  // 4. Gumbel-max over the kept tokens
  const int token = candidates >= 0 && floor >= cand_floor
      ? gumbel_argmax(candidates, [&](int j) { return sh.cand_l[j]; }, [&](int j) { return sh.cand_i[j]; }, floor,
                      p, b, sh)
      : gumbel_argmax(n, row_l, identity, floor, p, b, sh);
  if (threadIdx.x == 0) p.out[b] = token;
}

// Host side: one block per row, 128 to 1024 threads (about 16 columns per thread).
template <class T, class Launch>
void launch_sample(const SampleParams& p, Launch&& launch) {
  int threads = 128;
  while (threads < 1024 && threads * 16 < p.n) threads *= 2;
  launch(&sample_kernel<T>, dim3(p.batch), dim3(threads), p);
}

// Checks the arguments and launches for the logits' `dtype` (float32, float16 or bfloat16).
template <class Launch>
void dispatch_sample(const SampleParams& p, DType dtype, Launch&& launch) {
  require(p.logits && p.out && p.inv_t && p.top_k && p.top_p && p.do_sample && p.seeds && p.offset,
          "sample: null pointer");
  require(p.batch > 0 && p.n > 0 && p.stride >= 0, "sample: batch, vocabulary or row stride out of range");
  require(p.offset_stride == 0 || p.offset_stride == 1, "sample: offset stride must be 0 ([1]) or 1 ([B])");
  switch (dtype) {
    case DType::kFloat32: return launch_sample<float>(p, launch);
    case DType::kFloat16: return launch_sample<__half>(p, launch);
    case DType::kBFloat16: return launch_sample<__nv_bfloat16>(p, launch);
  }
  throw std::invalid_argument("sample: unknown dtype");
}

}  // namespace kernels
}  // namespace mmgen
