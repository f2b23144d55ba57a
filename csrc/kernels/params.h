// Argument blocks of the kernels in csrc/kernels/*.cuh: plain C++ (no CUDA header), shared by the
// kernels, their launchers in csrc/cuda and the bindings. Pointers are device pointers; strides
// and sizes are in elements.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace mmgen {
namespace kernels {

// Element type codes passed through the bindings (mmgen_engine/ops/cuda_ops.py: DTYPES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Limits the Python wrappers check against (exposed by the bindings).
constexpr int kDecodeChunk = 256;        // keys per split of decode attention
constexpr int kDecodeMaxHeadDim = 512;
constexpr int kNormMaxDim = 16384;      // LayerNorm: widest row (1024 threads holding 16 values each)

// The host dispatchers' argument checks (the Python wrappers check first, with friendlier messages).
inline void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

struct DecodeAttentionParams {
  const void* q;       // [B * group, H, D], unit last stride: query row r attends to cache row r / group
  void* k;             // [B, Hkv, S, D] (a view of the first S slots of a cache is fine); query head h
  void* v;             //   reads K/V head h / (H / Hkv)
  const void* new_k;   // [B, Hkv, D] or null
  const void* new_v;
  const int64_t* lengths;  // [B], each in [1, S] (clamped by the kernel: a bad value stays in bounds)
  void* out;           // [B * group, H, D] contiguous
  float* partial;      // [B * group * H * splits, D] fp32, when splits > 1
  float* ml;           // [B * group * H * splits, 2] (max, sum), when splits > 1
  int batch, heads, slots, head_dim;  // batch: cache rows B
  int group;           // query rows per cache row (>= 1; 1 with new_k / new_v)
  int chunk, splits;   // keys per split, cdiv(slots, chunk)
  int64_t q_b, q_h;            // strides in elements
  int64_t k_b, k_h, k_s;
  int64_t v_b, v_h, v_s;
  int64_t new_b, new_h;
  float scale;
  int kv_heads;        // Hkv, dividing heads (H)
  const float* cos;    // [B, D / 2] contiguous fp32 (RoPE of q and new_k at the new position), or null
  const float* sin;
};

struct LayerNormParams {
  const void* x;         // [rows, D] contiguous
  const void* residual;  // [rows, D] contiguous, or null (plain layer_norm)
  void* out;             // [rows, D]
  void* h;               // [rows, D] (x + residual), when residual is given
  const void* weight;    // [D]
  const void* bias;      // [D]
  int64_t rows;
  int dim;
  float eps;
};

struct TokenGatherParams {
  const int64_t* tokens;  // [N], each in [0, V) (clamped by the kernel: a bad id stays in bounds)
  const void* table;      // [V, D], rows `table_stride` elements apart, unit last stride
  const void* bias;       // [D] or null
  void* out;              // [N, D] contiguous
  int64_t count;          // N
  int64_t vocab;          // V
  int64_t table_stride;
  int dim;
};

struct SampleParams {
  const void* logits;        // R rows `stride` elements apart (R = B, or 2B with guidance), unit last stride
  int64_t stride;
  const float* guidance;     // [B] or null
  const float* inv_t;        // [B] fp32 1 / temperature (computed by torch)
  const int64_t* top_k;      // [B], 0 = off
  const float* top_p;        // [B] in (0, 1]
  const bool* do_sample;     // [B]
  const int64_t* seeds;      // [B], >= 0
  const int64_t* offset;     // step counters: row b reads offset[b * offset_stride]
  const int64_t* rows;       // [B] each row's index in the random stream (counter word 1), or null (b)
  int64_t* out;              // [B]
  int batch;
  int n;                     // columns taking part (the vocabulary slice)
  int offset_stride;         // 0: offset [1], one step counter for every row; 1: offset [B], per row
  bool greedy;               // the caller's promise that no row samples
};

}  // namespace kernels
}  // namespace mmgen
