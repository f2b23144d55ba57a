// Self-test of simt.h (the CPU emulator for CUDA kernels). Run by tests/test_simt.py; exits non-zero
// with a message on the first failed group of checks.
#include "simt.h"

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

static int g_failures = 0;
#define CHECK(cond, ...)                                                    \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ++g_failures;                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
    }                                                                       \
  } while (0)

// ---- block reduction: warp shuffles + static shared memory + __syncthreads -------------------------
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[32];
  unsigned tid = threadIdx.x, nwarps = blockDim.x / 32;
  float v = in[blockIdx.x * blockDim.x + tid];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  if (tid % 32 == 0) partial[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    float w = tid < nwarps ? partial[tid] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffff, w, o);
    if (tid == 0) out[blockIdx.x] = w;
  }
}

static void test_block_sum() {
  for (unsigned threads : {32u, 96u, 1024u}) {
    const unsigned blocks = 3;
    std::vector<float> in(blocks * threads), out(blocks, -1.0f);
    std::vector<double> expect(blocks, 0.0);
    for (unsigned i = 0; i < in.size(); ++i) {
      in[i] = float(int(i * 7 % 13) - 6);
      expect[i / threads] += in[i];
    }
    for (int rep = 0; rep < 2; ++rep) {  // twice: the scheduler and the static shared memory are reused
      simt::launch(block_sum, dim3(blocks), dim3(threads), 0, in.data(), out.data());
      for (unsigned b = 0; b < blocks; ++b)
        CHECK(out[b] == float(expect[b]), "threads=%u block=%u: got %g, want %g", threads, b, out[b], expect[b]);
    }
  }
}

// ---- shuffles with width 8 and 16, several types, lanes in a 3D block -----------------------------
// out[t * 8 + k]: results of eight shuffles for thread t (linear index).
__global__ void shuffles(int* out, int width) {
  unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  int v = int(t) * 10 + 1;
  int* o = out + t * 8;
  o[0] = __shfl_xor_sync(0xffffffff, v, 1, width);
  o[1] = __shfl_xor_sync(0xffffffff, v, width / 2 + 1, width);
  o[2] = __shfl_down_sync(0xffffffff, v, 3, width);
  o[3] = __shfl_sync(0xffffffff, v, 5, width);
  o[4] = __shfl_up_sync(0xffffffff, v, 2, width);
  o[5] = __shfl_xor_sync(0xffffffff, v, width, width);  // to the next segment: own value; previous: allowed
  o[6] = int(__half2float(__shfl_down_sync(0xffffffff, __float2half(float(t)), 1, width)));
  long long big = (1LL << 40) + t;
  o[7] = int(__shfl_sync(0xffffffff, big, 0) - (1LL << 40));  // full width: lane 0 of the warp
}

static void test_shuffles() {
  for (int width : {8, 16}) {
    const int n = 64;  // 2 warps, as an 8x4x2 block
    std::vector<int> out(n * 8, -1);
    simt::launch(shuffles, dim3(1), dim3(8, 4, 2), 0, out.data(), width);
    for (int t = 0; t < n; ++t) {
      int lane = t % 32, warp0 = t - lane, seg = lane / width * width;
      auto val = [&](int l) { return (warp0 + l) * 10 + 1; };
      int x1 = lane ^ 1, xh = lane ^ (width / 2 + 1), d = lane + 3, u = lane - 2, xw = lane ^ width;
      int want[8] = {val(x1), val(xh), d < seg + width ? val(d) : val(lane), val(seg + 5),
                     u >= seg ? val(u) : val(lane), xw < seg ? val(xw) : val(lane),
                     lane + 1 < seg + width ? t + 1 : t, warp0};
      for (int k = 0; k < 8; ++k)
        CHECK(out[t * 8 + k] == want[k], "width=%d thread=%d shuffle %d: got %d, want %d", width, t, k,
              out[t * 8 + k], want[k]);
    }
  }
}

// ---- ballot / any / all ----------------------------------------------------------------------------
__global__ void votes(unsigned* out) {
  unsigned t = threadIdx.x, lane = t % 32;
  bool pred = t < 32 ? lane % 3 == 0 : lane >= 20;
  unsigned* o = out + t * 5;
  o[0] = __ballot_sync(0xffffffff, pred);
  o[1] = __any_sync(0xffffffff, pred);
  o[2] = __any_sync(0xffffffff, t == 1000);
  o[3] = __all_sync(0xffffffff, lane < 32);
  o[4] = __all_sync(0xffffffff, pred);
  __syncwarp();
}

static void test_votes() {
  std::vector<unsigned> out(64 * 5, 7);
  simt::launch(votes, dim3(1), dim3(64), 0, out.data());
  unsigned every3 = 0;
  for (int l = 0; l < 32; l += 3) every3 |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    unsigned want[5] = {t < 32 ? every3 : 0xfff00000u, 1, 0, 1, 0};
    for (int k = 0; k < 5; ++k)
      CHECK(out[t * 5 + k] == want[k], "thread %d vote %d: got 0x%x, want 0x%x", t, k, out[t * 5 + k], want[k]);
  }
}

// ---- 3D grid and block indices; blocks run in order x, y, z ------------------------------------------
__global__ void indices(unsigned* out, unsigned* order, unsigned* counter) {
  unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + (b * blockDim.x * blockDim.y * blockDim.z + t) * 4;
  o[0] = blockIdx.x * 100 + blockIdx.y * 10 + blockIdx.z;
  o[1] = threadIdx.x * 100 + threadIdx.y * 10 + threadIdx.z;
  o[2] = gridDim.x * 100 + gridDim.y * 10 + gridDim.z;
  o[3] = blockDim.x * 100 + blockDim.y * 10 + blockDim.z;
  if (t == 0) order[b] = atomicAdd(counter, 1u);
}

static void test_indices() {
  const unsigned gx = 3, gy = 2, gz = 2, bx = 4, by = 3, bz = 2, nb = gx * gy * gz, nt = bx * by * bz;
  std::vector<unsigned> out(nb * nt * 4, 0), order(nb, 99);
  unsigned counter = 0;
  simt::launch(indices, dim3(gx, gy, gz), dim3(bx, by, bz), 0, out.data(), order.data(), &counter);
  for (unsigned b = 0; b < nb; ++b) {
    CHECK(order[b] == b, "block %u ran as number %u", b, order[b]);
    for (unsigned t = 0; t < nt; ++t) {
      const unsigned* o = out.data() + (b * nt + t) * 4;
      unsigned want[4] = {b % gx * 100 + b / gx % gy * 10 + b / (gx * gy), t % bx * 100 + t / bx % by * 10 + t / (bx * by),
                          gx * 100 + gy * 10 + gz, bx * 100 + by * 10 + bz};
      for (int k = 0; k < 4; ++k) CHECK(o[k] == want[k], "block %u thread %u field %d: got %u, want %u", b, t, k, o[k], want[k]);
    }
  }
}

// ---- threads returning before __syncthreads do not hold it up ------------------------------------------
__global__ void early_exit(int* out, int odd_exit) {
  __shared__ int buf[128];
  int t = int(threadIdx.x);
  if (odd_exit ? t % 2 == 1 : t >= 64) return;
  buf[t] = t * 3;
  __syncthreads();
  int partner = odd_exit ? (t + 2) % 128 : 63 - t;
  out[t] = buf[partner];
  __syncthreads();
  atomicAdd(&out[128], 1);
}

static void test_early_exit() {
  for (int odd : {0, 1}) {
    std::vector<int> out(129, -1);
    out[128] = 0;
    simt::launch(early_exit, dim3(2), dim3(128), 0, out.data(), odd);
    for (int t = 0; t < 128; ++t) {
      bool alive = odd ? t % 2 == 0 : t < 64;
      int want = !alive ? -1 : odd ? (t + 2) % 128 * 3 : (63 - t) * 3;
      CHECK(out[t] == want, "odd=%d thread %d: got %d, want %d", odd, t, out[t], want);
    }
    CHECK(out[128] == 128, "odd=%d: %d threads passed the second barrier, want 128", odd, out[128]);
  }
}

// ---- misuse: deadlocks and bad collectives make launch throw -------------------------------------------
__global__ void sync_vs_shuffle(float* out, unsigned split) {  // below split at __syncthreads, others shuffle
  if (threadIdx.x < split) __syncthreads();
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffff, 1.0f, 1);
}
__global__ void shuffle_dead_lanes_first(float* out) {  // warp 0 at __syncthreads; in warp 1 half returned
  if (threadIdx.x < 32) { __syncthreads(); return; }
  if (threadIdx.x < 48) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffff, 1.0f, 1);
}
__global__ void shuffle_dead_lanes_last(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffff, 1.0f, 0);
}
__global__ void mixed_collectives(unsigned* out) {
  if (threadIdx.x % 2) out[threadIdx.x] = __ballot_sync(0xffffffff, 1);
  else out[threadIdx.x] = __shfl_sync(0xffffffff, 1u, 0);
}
__global__ void partial_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffff, 1, 0); }
__global__ void partial_warp(int* out) { out[threadIdx.x] = __shfl_sync(0xffffffff, 1, 0); }
__global__ void throws_inside(int* out) {
  if (threadIdx.x == 5) throw std::out_of_range("index 5 is out of range");
  __syncthreads();
  out[threadIdx.x] = 1;
}

static void expect_throw(const char* name, const std::function<void()>& f, std::vector<std::string> words) {
  try {
    f();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::printf("  %-26s threw: %s\n", name, msg.c_str());
    for (const std::string& w : words) CHECK(msg.find(w) != std::string::npos, "%s: message lacks '%s'", name, w.c_str());
    return;
  }
  CHECK(false, "%s: launch did not throw", name);
}

static void test_misuse() {
  std::vector<float> f(128);
  std::vector<unsigned> u(128);
  std::vector<int> i(128);
  expect_throw("sync_vs_shuffle", [&] { simt::launch(sync_vs_shuffle, dim3(2), dim3(32), 0, f.data(), 16u); },
               {"deadlock", "block (0,0,0)", "16 thread(s) wait at __syncthreads", "warp 0: 16 lane(s) wait at __shfl_xor_sync"});
  expect_throw("sync_vs_shuffle_2warps", [&] { simt::launch(sync_vs_shuffle, dim3(2), dim3(64), 0, f.data(), 48u); },
               {"deadlock", "48 thread(s) wait at __syncthreads", "warp 1: 16 lane(s) wait at __shfl_xor_sync"});
  expect_throw("shuffle_dead_lanes_first", [&] { simt::launch(shuffle_dead_lanes_first, dim3(1, 2), dim3(64), 0, f.data()); },
               {"block (0,0,0)", "__shfl_down_sync", "returned"});
  expect_throw("shuffle_dead_lanes_last", [&] { simt::launch(shuffle_dead_lanes_last, dim3(1), dim3(32), 0, f.data()); },
               {"__shfl_sync", "returned"});
  expect_throw("mixed_collectives", [&] { simt::launch(mixed_collectives, dim3(1), dim3(32), 0, u.data()); },
               {"different collectives", "__ballot_sync", "__shfl_sync"});
  expect_throw("partial_mask", [&] { simt::launch(partial_mask, dim3(1), dim3(32), 0, i.data()); }, {"0x0000ffff"});
  expect_throw("partial_warp", [&] { simt::launch(partial_warp, dim3(1), dim3(48), 0, i.data()); }, {"partial warp"});
  expect_throw("throws_inside", [&] { simt::launch(throws_inside, dim3(1), dim3(64), 0, i.data()); },
               {"thread (5,0,0)", "index 5 is out of range"});
  expect_throw("dynamic_smem", [&] { simt::launch(partial_warp, dim3(1), dim3(32), 16, i.data()); }, {"dynamic shared"});
  expect_throw("too_many_threads", [&] { simt::launch(partial_warp, dim3(1), dim3(64, 32), 0, i.data()); }, {"1..1024"});
  test_block_sum();  // launches still work after failed ones
}

// ---- intrinsics, atomics, fp16/bf16 --------------------------------------------------------------------
__global__ void atomics(int* imax, unsigned* counts, float* fsum, float* fmax) {
  __shared__ unsigned local[4];
  unsigned t = threadIdx.x;
  if (t < 4) local[t] = 0;
  __syncthreads();
  atomicAdd(&local[t % 4], 1u);
  atomicMax(imax, int(t) - 100);
  atomicAdd(fsum, 0.5f);
  atomicMax(fmax, float(t) * 0.25f);
  __syncthreads();
  if (t < 4) counts[t] = local[t];
}

static void test_intrinsics() {
  CHECK(__umulhi(0xffffffffu, 0xffffffffu) == 0xfffffffeu, "umulhi max");
  CHECK(__umulhi(0x80000000u, 4u) == 2u, "umulhi 2^31*4");
  CHECK(__umulhi(123456789u, 987654321u) == 28389652u, "umulhi got %u", __umulhi(123456789u, 987654321u));
  CHECK(__umulhi(12345u, 6789u) == 0u, "umulhi small");
  CHECK(__float_as_uint(1.0f) == 0x3f800000u && __float_as_int(-2.0f) == int(0xc0000000u), "float_as_*");
  CHECK(__uint_as_float(0x40490fdbu) == 3.14159274f && __int_as_float(0x3f000000) == 0.5f, "*_as_float");
  volatile float a = 1.0f, b = 3.0f;
  CHECK(__fdiv_rn(a, b) == a / b && __fmul_rn(a, b) == 3.0f && __fadd_rn(a, b) == 4.0f && __fsub_rn(a, b) == -2.0f, "f*_rn");
  CHECK(rsqrtf(4.0f) == 0.5f && __ldg(&b) == 3.0f && fmaxf(a, b) == 3.0f && std::isinf(INFINITY), "rsqrtf/ldg");
  CHECK(__popc(0xf0f0u) == 8 && __clz(1) == 31 && __ffs(8) == 4, "bit intrinsics");
  __half h = __float2half(0.1f);
  CHECK(__half_as_ushort(h) == 0x2e66 && __half2float(h) == 0.0999755859375f, "half 0.1");
  for (float x : {0.0f, 1.5f, -2.25f, 65504.0f, 0.000061035156f})
    CHECK(__half2float(__float2half(x)) == x, "half round trip %g", x);
  __nv_bfloat16 bf = __float2bfloat16(0.1f);
  CHECK(__bfloat16_as_ushort(bf) == 0x3dcd && __bfloat162float(bf) == 0.10009765625f, "bf16 0.1");
  for (float x : {0.0f, 1.5f, -2.25f, 0x1p100f, 0x1.fep127f /* largest finite bf16 */, 0x1p-126f})
    CHECK(__bfloat162float(__float2bfloat16(x)) == x, "bf16 round trip %g", x);
  int imax = -1000;
  unsigned counts[4] = {};
  float fsum = 0.0f, fmx = -1.0f;
  simt::launch(atomics, dim3(3), dim3(256), 0, &imax, counts, &fsum, &fmx);
  CHECK(imax == 155 && fsum == 384.0f && fmx == 63.75f, "atomics: imax=%d fsum=%g fmax=%g", imax, fsum, fmx);
  for (int k = 0; k < 4; ++k) CHECK(counts[k] == 64, "shared atomicAdd bucket %d: %u", k, counts[k]);
}

// ---- 1024 threads x 100 __syncthreads: checks the ordering and reports the time ------------------------
__global__ void many_syncs(int* errors, int rounds) {
  __shared__ int buf[2];
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) buf[r % 2] = r;
    __syncthreads();
    if (buf[r % 2] != r) atomicAdd(errors, 1);
  }
}

static void test_timing() {
  int errors = 0;
  auto t0 = std::chrono::steady_clock::now();
  simt::launch(many_syncs, dim3(1), dim3(1024), 0, &errors, 100);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(errors == 0, "many_syncs: %d threads saw a stale value", errors);
  std::printf("  1024 threads x 100 __syncthreads: %.3f s\n", s);
}

int main() {
  struct { const char* name; void (*fn)(); } tests[] = {
      {"block_sum", test_block_sum}, {"shuffles", test_shuffles},   {"votes", test_votes},
      {"indices", test_indices},     {"early_exit", test_early_exit}, {"misuse", test_misuse},
      {"intrinsics", test_intrinsics}, {"timing", test_timing},
  };
  for (auto& t : tests) {
    int before = g_failures;
    try {
      t.fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", t.name, e.what());
    }
    std::printf("%s %s\n", g_failures == before ? "ok  " : "FAIL", t.name);
  }
  if (g_failures) {
    std::fprintf(stderr, "simt self-test: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("simt self-test: all passed\n");
  return 0;
}
