// One decode step of a small GPT-2-style decoder in one call (declared in native.h).
//
// Why a kernel of our own: a decoder of a few million parameters (the speech-to-gesture demo's: 3
// layers, 128 wide) does ~0.75 M multiply-adds per token, microseconds of arithmetic, but its step
// is ~400 tensor ops, each a dispatcher call of 1-3 us even when replayed from a recording
// (benchmarks/RESULTS.md, "Per-step overhead on CPU"). Here the whole step - embedding, every
// block's LayerNorms, projections, attention over the KV cache (the new K/V written into it),
// cross-attention, MLP, the final LayerNorm and the head - runs as plain loops over the weights
// in place (no copies), one row after another on the calling thread: at these sizes every weight
// sits in cache and a thread pool's wake-up would cost more than the products.
//
// The math is the reference's (torch ops of mmgen_engine.models.gpt2), in float32 throughout; only
// the summation order differs (logits within ~1e-6 relative). The hot loops (axpy over a contiguous
// weight row, dot products) are compiled for AVX-512, AVX2+FMA and plain x86-64, picked at load.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "native.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MMGEN_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define MMGEN_CLONES
#endif

namespace mmgen {
namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("decoder step: " + what);
}

// y[0:n] += a * w[0:n]
MMGEN_CLONES void axpy(float a, const float* __restrict w, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

// y[r, 0:kTile] = b[0:kTile] + sum_i x[r, i] w[i * ldw + 0:kTile] for r < kRows (x and y rows
// `ldx`/`ldy` apart): a tile of outputs of a column-major product for a block of rows, kept in
// registers over the whole reduction, each weight read once for the block (an axpy per input would
// store y every time).
constexpr int64_t kTile = 64;
template <int kRows>
MMGEN_CLONES void column_tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t ldw,
                              int64_t k, const float* __restrict b, float* __restrict y, int64_t ldy) {
  float acc[kRows][kTile];
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < kTile; ++j) acc[r][j] = b ? b[j] : 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float* wi = w + i * ldw;
    for (int r = 0; r < kRows; ++r) {
      const float a = x[r * ldx + i];
      for (int64_t j = 0; j < kTile; ++j) acc[r][j] += a * wi[j];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < kTile; ++j) y[r * ldy + j] = acc[r][j];
}

// sum x[i] * w[i]: sixteen partial sums (vectorizable without reassociating a single sum), added as a tree
MMGEN_CLONES float dot(const float* __restrict x, const float* __restrict w, int64_t n) {
  float s[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) s[j] += x[i + j] * w[i + j];
  for (int j = 0; i < n; ++i, ++j) s[j] += x[i] * w[i];  // the tail (< 16) into the partial sums
  for (int half = 8; half >= 1; half /= 2)  // a tree: 4 dependent steps, not 16
    for (int j = 0; j < half; ++j) s[j] += s[j + half];
  return s[0];
}

// y[r, :] = x[r, :] W^T (+ b) for r < rows; x [rows, k] and y [rows, n] contiguous.
void linear(const float* x, const StepMatrix& m, const float* b, float* y, int64_t rows) {
  if (m.sk == 1) {  // row-major: one dot product per output
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < m.n; ++j)
        y[r * m.n + j] = dot(x + r * m.k, m.w + j * m.sn, m.k) + (b ? b[j] : 0.0f);
    return;
  }
  // column-major (W^T contiguous): tiles of outputs over the whole reduction, four rows at a time,
  // the last partial tile by axpys
  const int64_t full = m.n - m.n % kTile;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    for (int64_t j = 0; j < full; j += kTile)
      column_tile<4>(x + r * m.k, m.k, m.w + j, m.sk, m.k, b ? b + j : nullptr, y + r * m.n + j, m.n);
  for (; r < rows; ++r)
    for (int64_t j = 0; j < full; j += kTile)
      column_tile<1>(x + r * m.k, m.k, m.w + j, m.sk, m.k, b ? b + j : nullptr, y + r * m.n + j, m.n);
  if (full == m.n) return;
  for (r = 0; r < rows; ++r) {
    float* yr = y + r * m.n;
    for (int64_t j = full; j < m.n; ++j) yr[j] = b ? b[j] : 0.0f;
    for (int64_t i = 0; i < m.k; ++i) axpy(x[r * m.k + i], m.w + i * m.sk + full, yr + full, m.n - full);
  }
}

// out = LayerNorm(x) over `dim` (biased variance, float32), per row
void layer_norm(const float* x, const float* w, const float* b, float eps, float* out, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float mean = 0.0f;
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<float>(dim);
    float var = 0.0f;
    for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = (xr[i] - mean) * inv * w[i] + b[i];
  }
}

float activate(float x, StepActivation act) {
  switch (act) {
    case StepActivation::kGeluErf:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case StepActivation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case StepActivation::kGeluSigmoid:
      return x / (1.0f + std::exp(-1.702f * x));
  }
  return x;
}

// out[0:dh] = softmax(scale q.K_j, j < n) V over slots j of K/V (slot stride `ks`/`vs`, dh contiguous)
void attend(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t n, int64_t dh,
            float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot(q, k + j * ks, dh) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + dh, 0.0f);
  for (int64_t j = 0; j < n; ++j) axpy(scores[j] / total, v + j * vs, out, dh);
}

void check_matrix(const StepMatrix& m, int64_t n, int64_t k, const char* name) {
  require(m.w != nullptr, std::string(name) + ": null weight");
  require(m.n == n && m.k == k, std::string(name) + ": shape [" + std::to_string(m.n) + ", " + std::to_string(m.k) +
                                    "], expected [" + std::to_string(n) + ", " + std::to_string(k) + "]");
  require((m.sk == 1 && m.sn >= k) || (m.sn == 1 && m.sk >= n), std::string(name) + ": needs a unit stride");
}

}  // namespace

void check_decoder_step(const DecoderStepModel& m) {
  require(m.dim >= 1 && m.heads >= 1 && m.head_dim * m.heads == m.dim, "dim must be heads * head_dim");
  require(m.hidden >= 1 && !m.layers.empty(), "empty model");
  check_matrix(m.wte, m.wte.n, m.dim, "wte");
  check_matrix(m.wpe, m.wpe.n, m.dim, "wpe");
  check_matrix(m.head, m.head.n, m.dim, "head");
  require(m.lnf_w && m.lnf_b, "ln_f: null pointer");
  const bool cross = m.layers[0].cross_q.w != nullptr;
  for (const DecoderStepLayer& l : m.layers) {
    require((l.cross_q.w != nullptr) == cross, "cross-attention in some layers only");
    require(l.ln1_w && l.ln1_b && l.ln2_w && l.ln2_b, "null LayerNorm");
    check_matrix(l.qkv, 3 * m.dim, m.dim, "qkv");
    check_matrix(l.out, m.dim, m.dim, "out");
    check_matrix(l.fc1, m.hidden, m.dim, "fc1");
    check_matrix(l.fc2, m.dim, m.hidden, "fc2");
    if (l.cross_q.w) {
      require(l.lnx_w && l.lnx_b, "null cross LayerNorm");
      check_matrix(l.cross_q, m.dim, m.dim, "cross q");
      check_matrix(l.cross_out, m.dim, m.dim, "cross out");
    }
  }
}

void decoder_step(const DecoderStepModel& m, const DecoderStepIO& io) {
  const int64_t rows = io.rows, d = m.dim, dh = m.head_dim;
  require(rows >= 1 && io.tokens && io.positions && io.k && io.v && io.logits, "null input");
  require(io.span >= 1 && io.span <= io.slots, "span must be 1..slots");
  const bool cross = m.layers[0].cross_q.w != nullptr;
  int64_t group = 1;
  if (cross) {
    require(io.cross_k && io.cross_v && io.cross_lengths && io.cross_rows >= 1 && rows % io.cross_rows == 0,
            "cross-attention needs its cache and rows a multiple of its rows");
    group = rows / io.cross_rows;
    for (int64_t c = 0; c < io.cross_rows; ++c)
      require(io.cross_lengths[c] >= 1 && io.cross_lengths[c] <= io.cross_len, "cross length out of range");
  }
  for (int64_t r = 0; r < rows; ++r) {
    require(io.tokens[r] >= 0 && io.tokens[r] < m.wte.n, "token id out of range");
    require(io.positions[r] >= 0 && io.positions[r] < io.span && io.positions[r] < m.wpe.n,
            "position out of range");
  }
  const int64_t width = std::max({3 * d, m.hidden, m.head.n});
  std::vector<float> buf(static_cast<size_t>(rows * (3 * d + width) + std::max(io.span, io.cross_len)));
  float* h = buf.data();    // [rows, d] the residual stream
  float* x = h + rows * d;  // [rows, d] normalized input of a sublayer
  float* o = x + rows * d;  // [rows, d] attention output (heads concatenated)
  float* t = o + rows * d;  // [rows, width] projections
  float* scores = t + rows * width;

  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < d; ++i)
      h[r * d + i] = m.wte.w[io.tokens[r] * m.wte.sn + i * m.wte.sk] + m.wpe.w[io.positions[r] * m.wpe.sn + i * m.wpe.sk];

  auto add_into_h = [&](const float* y) {
    for (int64_t i = 0; i < rows * d; ++i) h[i] += y[i];
  };
  for (size_t li = 0; li < m.layers.size(); ++li) {
    const DecoderStepLayer& l = m.layers[li];
    const int64_t L = static_cast<int64_t>(li);
    // self-attention: the new K/V into slot positions[r], then attention over slots 0..positions[r]
    layer_norm(h, l.ln1_w, l.ln1_b, m.eps, x, rows, d);
    linear(x, l.qkv, l.qkv_b, t, rows);  // [rows, 3d]: q, k, v
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t slot = io.positions[r];
      for (int64_t hh = 0; hh < m.heads; ++hh) {
        float* kc = io.k + L * io.k_strides[0] + r * io.k_strides[1] + hh * io.k_strides[2];
        float* vc = io.v + L * io.v_strides[0] + r * io.v_strides[1] + hh * io.v_strides[2];
        const float* row = t + r * 3 * d;
        std::copy(row + d + hh * dh, row + d + (hh + 1) * dh, kc + slot * io.k_strides[3]);
        std::copy(row + 2 * d + hh * dh, row + 2 * d + (hh + 1) * dh, vc + slot * io.v_strides[3]);
        attend(row + hh * dh, kc, io.k_strides[3], vc, io.v_strides[3], slot + 1, dh, l.scale, scores,
               o + r * d + hh * dh);
      }
    }
    linear(o, l.out, l.out_b, t, rows);
    add_into_h(t);
    if (cross) {
      layer_norm(h, l.lnx_w, l.lnx_b, m.eps, x, rows, d);
      linear(x, l.cross_q, l.cross_q_b, t, rows);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r / group;
        for (int64_t hh = 0; hh < m.heads; ++hh) {
          const float* kc = io.cross_k + L * io.ck_strides[0] + c * io.ck_strides[1] + hh * io.ck_strides[2];
          const float* vc = io.cross_v + L * io.cv_strides[0] + c * io.cv_strides[1] + hh * io.cv_strides[2];
          attend(t + r * d + hh * dh, kc, io.ck_strides[3], vc, io.cv_strides[3], io.cross_lengths[c], dh, l.scale,
                 scores, o + r * d + hh * dh);
        }
      }
      linear(o, l.cross_out, l.cross_out_b, t, rows);
      add_into_h(t);
    }
    layer_norm(h, l.ln2_w, l.ln2_b, m.eps, x, rows, d);
    linear(x, l.fc1, l.fc1_b, t, rows);
    for (int64_t i = 0; i < rows * m.hidden; ++i) t[i] = activate(t[i], m.activation);
    linear(t, l.fc2, l.fc2_b, o, rows);
    add_into_h(o);
  }
  layer_norm(h, m.lnf_w, m.lnf_b, m.eps, x, rows, d);
  if (io.ld_logits == m.head.n) {
    linear(x, m.head, nullptr, io.logits, rows);
  } else {
    linear(x, m.head, nullptr, t, rows);
    for (int64_t r = 0; r < rows; ++r) std::copy(t + r * m.head.n, t + (r + 1) * m.head.n, io.logits + r * io.ld_logits);
  }
}

}  // namespace mmgen
