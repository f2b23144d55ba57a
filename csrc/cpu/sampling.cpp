// CPU sampling (declared in native.h): the Philox uniforms of mmgen_engine.ops.random, and the next
// tokens from logits and Gumbel noise drawn ahead.
//
// philox_uniform: u = ((x0 >> 9) + 0.5) * 2^-23 with x0 the first word of Philox4x32-10 (key: the
// seed's two halves; counter: column, row, the offset's two halves), exactly ops.random.uniform_at's
// numbers (integer rounds, an exact conversion), ~10x sooner than the NumPy version.
//
// sample_drawn: the sampler's CPU pick
// of a recorded decode step in one call instead of ~60 tensor ops (temperature, top-k, top-p's
// softmax, sort and cumulative sum, the Gumbel argmax).
//
// The math is mmgen_engine.ops.sampling's (filter_logits, then argmax of l - drawn), in its order:
// float32 logits times a float32 reciprocal of the temperature, the top-k threshold, then the top-p
// threshold from probabilities exp(l - max) / sum (the running sum in double, rounded to float32 as
// torch's CPU cumsum gives it), ties kept or removed together. The exponential and the total (here
// in double, rounded once; torch sums float32 in its own order) may differ from torch's in the last
// bit, which can move a token that sits exactly on the top-p boundary.
#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "native.h"

namespace mmgen {
namespace {

// The index of the largest value, the first on ties; a NaN counts as the largest (torch's argmax).
int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

}  // namespace

void philox_uniform(const int64_t* seeds, const int64_t* offsets, const int64_t* rows, const int64_t* cols,
                    int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t seed = static_cast<uint64_t>(seeds[j]), offset = static_cast<uint64_t>(offsets[j]);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    uint32_t c0 = static_cast<uint32_t>(cols[j]), c1 = static_cast<uint32_t>(rows[j]);
    uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t{0xD2511F53u} * c0, p1 = uint64_t{0xCD9E8D57u} * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c1 = static_cast<uint32_t>(p1);
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c3 = static_cast<uint32_t>(p0);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    out[j] = (static_cast<float>(c0 >> 9) + 0.5f) * 0x1p-23f;
  }
}

void sample_drawn(const SampleDrawnParams& p) {
  if (!p.logits || !p.drawn || !p.out || p.rows < 1 || p.n < 1 || p.ld_logits < p.n)
    throw std::invalid_argument("sample_drawn: bad logits");
  if (p.offset_len != 1 && p.offset_len != p.rows) throw std::invalid_argument("sample_drawn: offset must be [1] or [rows]");
  for (int64_t b = 0; b < p.rows; ++b) {
    const int64_t o = p.offset[p.offset_len == 1 ? 0 : b];
    if (o < 0 || o >= p.offsets) throw std::invalid_argument("sample_drawn: offset " + std::to_string(o) + " not drawn");
  }
  bool any_k = false, any_p = false;  // a filter no row uses is skipped for every row (filter_logits)
  for (int64_t b = 0; b < p.rows; ++b) {
    any_k = any_k || std::min<int64_t>(std::max<int64_t>(p.top_k[b], 0), p.n) > 0;
    any_p = any_p || p.top_p[b] < 1.0f;
  }
  std::vector<float> l(p.n), e(p.n), sorted(p.n);
  std::vector<int64_t> order(p.n);
  for (int64_t b = 0; b < p.rows; ++b) {
    const float* z = p.logits + b * p.ld_logits;
    if (!p.do_sample[b]) {
      p.out[b] = argmax(z, p.n);
      continue;
    }
    const float inv_t = 1.0f / p.temperature[b];
    for (int64_t i = 0; i < p.n; ++i) l[i] = z[i] * inv_t;
    const int64_t k = std::min<int64_t>(std::max<int64_t>(p.top_k[b], 0), p.n);
    if (any_k && k > 0) {  // everything >= the k-th largest
      sorted.assign(l.begin(), l.end());
      std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
      const float kth = sorted[k - 1];
      for (int64_t i = 0; i < p.n; ++i)
        if (l[i] < kth) l[i] = -INFINITY;
    }
    if (any_p) {  // keep i iff the mass strictly above l_i is < top_p: one threshold in sorted order
      const float top = *std::max_element(l.begin(), l.end());
      double sum = 0.0;
      for (int64_t i = 0; i < p.n; ++i) {
        e[i] = std::exp(l[i] - top);
        sum += e[i];
      }
      const float total = static_cast<float>(sum);
      for (int64_t i = 0; i < p.n; ++i) order[i] = i;
      auto by_value = [&](int64_t a, int64_t c) { return l[a] > l[c]; };
      // the kept set is usually a few tokens: sort a head of the order first, all of it if needed
      int64_t sorted_len = std::min<int64_t>(p.n, 64), last = -1;
      double cum = 0.0;
      for (int64_t done = 0; last < 0;) {
        std::partial_sort(order.begin() + done, order.begin() + sorted_len, order.end(), by_value);
        for (int64_t j = done; j < sorted_len && j < p.n - 1; ++j) {
          cum += static_cast<double>(e[order[j]] / total);
          if (static_cast<float>(cum) >= p.top_p[b]) {
            last = j;
            break;
          }
        }
        if (last < 0 && sorted_len >= p.n - 1) last = p.n - 1;  // cum[j] < top_p for every j < n - 1
        done = sorted_len;
        sorted_len = p.n;
      }
      const float threshold = l[order[last]];
      for (int64_t i = 0; i < p.n; ++i)
        if (l[i] < threshold) l[i] = -INFINITY;
    }
    const int64_t o = p.offset[p.offset_len == 1 ? 0 : b];
    const float* g = p.drawn + b * p.drawn_row_stride + o * p.drawn_offset_stride;
    for (int64_t i = 0; i < p.n; ++i) l[i] -= g[i];
    p.out[b] = argmax(l.data(), p.n);
  }
}

}  // namespace mmgen
