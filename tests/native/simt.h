// simt.h -- run CUDA-style kernels on the CPU, for testing kernel sources without a GPU.
//
// Include this header BEFORE any kernel header, in a host-only C++17 compilation (g++/clang++, not
// nvcc). It includes <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> (__half, __nv_bfloat16, dim3, uint4...)
// and turns the CUDA qualifiers into plain C++: __global__/__device__/__host__ vanish, __shared__ is
// `static` (one block runs at a time on one OS thread, so a function-local static is exactly one
// block's shared memory), __forceinline__ is `inline`. It defines MMGEN_SIMT_EMULATION.
//
// Covers: simt::launch(kernel, grid, block, 0, args...); threadIdx/blockIdx/blockDim/gridDim;
// __syncthreads (threads that returned no longer count, as on current GPUs); full-mask warp
// collectives __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync (with width, PTX
// semantics), __syncwarp, __any_sync, __all_sync, __ballot_sync; deadlock and misuse detection
// (launch throws std::runtime_error naming the block and the barriers); a few intrinsics
// (__umulhi, __f*_rn, bit casts, __ldg, __popc, __clz, __ffs, rsqrtf) and atomics.
//
// How: blocks run one after another (x fastest, then y, z). The threads of a block are fibers
// (ucontext) on the calling OS thread; a fiber runs until it reaches a barrier or returns, then the
// next runnable fiber runs. Warp collectives deposit a value in a per-warp slot, wait for the 32
// lanes, read the partner's slot, and wait again.
//
// Does NOT cover: a memory model (no reordering, no caches, no fences needed), preemption between
// barriers (so races between threads, even inside a warp, go unnoticed: fibers never interleave
// mid-statement and atomics are plain read-modify-writes), partial-mask collectives (and collectives
// in a partial warp, when blockDim is not a multiple of 32: reported as errors), dynamic
// (extern) shared memory, streams, cooperative groups, warp-level matrix ops, clusters. Shared
// memory is not cleared between blocks or launches (as on a GPU, do not rely on its content).
// When a launch fails, the C++ objects living on the abandoned fibers' stacks are not destroyed.
#pragma once
#define MMGEN_SIMT_EMULATION 1

#include <cuda_runtime.h>  // first, so that kernel headers including it later see its include guard
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __constant__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace simt {
namespace detail {

constexpr size_t kStackBytes = 256 * 1024, kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
enum State { READY, AT_BLOCK, AT_WARP, DONE };

struct Fiber { ucontext_t ctx; uint3 tid; State state; const char* kind; };
struct Warp { uint64_t slot[32]; int arrived; };

// Fiber stacks (with a guard page below each), kept per OS thread and reused by every launch.
struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, kGuardBytes, PROT_NONE);
      stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i] + kGuardBytes;
  }
  ~StackPool() { for (char* s : stacks) munmap(s, kStackBytes + kGuardBytes); }
};
inline StackPool& stack_pool() { static thread_local StackPool pool; return pool; }

struct Sched {
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  int n = 0, cur = -1, done = 0, at_block = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> queue;  // ring buffer of READY fibers not yet resumed
  int q_head = 0, q_len = 0;
  ucontext_t main_ctx;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;

  void push(int i) { queue[(q_head + q_len++) % n] = i; }
  int pop() { int i = queue[q_head]; q_head = (q_head + 1) % n; --q_len; return i; }
  std::string where() const {
    std::ostringstream s;
    s << "block (" << block_idx.x << "," << block_idx.y << "," << block_idx.z << ")";
    if (cur >= 0) { const uint3& t = fibers[cur].tid; s << " thread (" << t.x << "," << t.y << "," << t.z << ")"; }
    return s.str();
  }
};
inline thread_local Sched* g_sched = nullptr;

inline Sched& sched() {
  if (!g_sched) { std::fprintf(stderr, "simt: CUDA builtin used outside simt::launch\n"); std::abort(); }
  return *g_sched;
}

// Leave the current fiber (its state is already set): resume the next ready one, else the scheduler.
inline void switch_away() {
  Sched& s = sched();
  Fiber& f = s.fibers[s.cur];
  if (s.q_len > 0 && s.error.empty()) { s.cur = s.pop(); swapcontext(&f.ctx, &s.fibers[s.cur].ctx); }
  else swapcontext(&f.ctx, &s.main_ctx);
}

// Misuse detected inside a kernel: thrown through the kernel's frames, caught by fiber_entry.
struct KernelError : std::runtime_error { using std::runtime_error::runtime_error; };
[[noreturn]] inline void fail(const std::string& msg) { throw KernelError(msg); }

inline void release_block_if_complete(Sched& s) {
  if (s.at_block == 0 || s.at_block != s.n - s.done) return;
  s.at_block = 0;
  for (int i = 0; i < s.n; ++i)
    if (s.fibers[i].state == AT_BLOCK) { s.fibers[i].state = READY; if (i != s.cur) s.push(i); }
}

inline void syncthreads() {
  Sched& s = sched();
  s.fibers[s.cur].state = AT_BLOCK;
  s.fibers[s.cur].kind = "__syncthreads";
  ++s.at_block;
  release_block_if_complete(s);
  if (s.fibers[s.cur].state != READY) switch_away();
}

// Wait until the 32 lanes of the current warp arrive (all must be alive and at the same collective).
inline void warp_barrier(const char* kind) {
  Sched& s = sched();
  int w = s.cur / 32, base = w * 32;
  if (base + 32 > s.n) fail(std::string(kind) + " in a partial warp (blockDim not a multiple of 32)");
  for (int l = base; l < base + 32; ++l)
    if (s.fibers[l].state == DONE)
      fail(std::string(kind) + " with full mask, but lane " + std::to_string(l - base) + " of warp " +
           std::to_string(w) + " has returned");
  s.fibers[s.cur].state = AT_WARP;
  s.fibers[s.cur].kind = kind;
  if (++s.warps[w].arrived < 32) { switch_away(); return; }
  s.warps[w].arrived = 0;
  for (int l = base; l < base + 32; ++l)
    if (s.fibers[l].kind != kind && std::strcmp(s.fibers[l].kind, kind) != 0)
      fail(std::string("lanes of warp ") + std::to_string(w) + " reached different collectives: " + kind +
           " and " + s.fibers[l].kind);
  for (int l = base; l < base + 32; ++l) {
    s.fibers[l].state = READY;
    if (l != s.cur) s.push(l);
  }
}

inline void check_mask(unsigned mask, const char* kind) {
  char hex[16];
  if (mask != 0xffffffffu && std::snprintf(hex, sizeof hex, "0x%08x", mask))
    fail(std::string(kind) + ": only the full mask 0xffffffff is emulated, got " + hex);
}

// Deposit v, wait for the warp, return every lane's slot via `read`, wait again so slots can be reused.
template <class T, class Read>
inline auto exchange(unsigned mask, const char* kind, T v, Read read) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp collectives need a <= 8-byte trivially copyable type");
  check_mask(mask, kind);
  Sched& s = sched();
  Warp& w = s.warps[s.cur / 32];
  std::memcpy(&w.slot[s.cur % 32], static_cast<const void*>(&v), sizeof(T));
  warp_barrier(kind);
  auto result = read(w.slot, s.cur % 32);
  warp_barrier(kind);
  return result;
}

// PTX shfl: lanes in segments of `width`; an invalid source lane yields the caller's own value.
enum class Shfl { IDX, XOR, DOWN, UP };
template <class T>
inline T shuffle(const char* kind, Shfl mode, unsigned mask, T v, int b, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(std::string(kind) + ": width must be a power of 2 in [1, 32], got " + std::to_string(width));
  return exchange(mask, kind, v, [&](const uint64_t* slot, int lane) {
    int seg = lane & ~(width - 1), last = seg + width - 1, bv = b & 31, j = lane;
    bool ok = true;
    switch (mode) {
      case Shfl::IDX: j = seg | (bv & (width - 1)); break;
      case Shfl::XOR: j = lane ^ bv; ok = j <= last; break;
      case Shfl::DOWN: j = lane + bv; ok = j <= last; break;
      case Shfl::UP: j = lane - bv; ok = j >= seg; break;
    }
    T r;
    std::memcpy(static_cast<void*>(&r), &slot[ok ? j : lane], sizeof(T));
    return r;
  });
}

inline unsigned ballot(unsigned mask, int pred, const char* kind) {
  return exchange(mask, kind, static_cast<uint64_t>(pred != 0), [](const uint64_t* slot, int) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= static_cast<unsigned>(slot[l] != 0) << l;
    return bits;
  });
}

inline void fiber_entry() {
  Sched& s = sched();
  try {
    s.body(s.body_arg);
    s.fibers[s.cur].state = DONE;
    ++s.done;
    for (int l = s.cur / 32 * 32; l < s.cur / 32 * 32 + 32 && l < s.n; ++l)
      if (s.fibers[l].state == AT_WARP) fail(std::string("returned while lanes of its warp wait at ") + s.fibers[l].kind);
    release_block_if_complete(s);
  } catch (const std::exception& e) {
    s.error = "simt: " + s.where() + ": " + (dynamic_cast<const KernelError*>(&e) ? "" : "kernel threw: ") + e.what();
  } catch (...) {
    s.error = "simt: " + s.where() + ": kernel threw a non-std exception";
  }
  s.fibers[s.cur].state = DONE;
  switch_away();  // to the next ready fiber, or to the scheduler (always, after an error)
  std::abort();   // a finished fiber is never resumed
}

inline void run_grid(Sched& s) {
  StackPool& pool = stack_pool();
  for (int i = 0; i < s.n; ++i) pool.get(i);  // may throw: do it before any fiber runs
  for (unsigned bz = 0; bz < s.grid_dim.z; ++bz)
    for (unsigned by = 0; by < s.grid_dim.y; ++by)
      for (unsigned bx = 0; bx < s.grid_dim.x; ++bx) {
        s.block_idx = uint3{bx, by, bz};
        s.done = s.at_block = s.q_head = s.q_len = 0;
        for (Warp& w : s.warps) w.arrived = 0;
        for (int i = 0; i < s.n; ++i) {
          Fiber& f = s.fibers[i];
          unsigned bxy = s.block_dim.x * s.block_dim.y;
          f.tid = uint3{i % s.block_dim.x, (i % bxy) / s.block_dim.x, i / bxy};
          f.state = READY;
          f.kind = "";
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = pool.get(i);
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &s.main_ctx;
          makecontext(&f.ctx, fiber_entry, 0);
          if (i > 0) s.push(i);
        }
        s.cur = 0;
        swapcontext(&s.main_ctx, &s.fibers[0].ctx);
        s.cur = -1;
        if (!s.error.empty()) throw std::runtime_error(s.error);
        if (s.done == s.n) continue;
        std::ostringstream m;
        m << "simt: deadlock in " << s.where() << ": no thread can run;";
        if (s.at_block) m << " " << s.at_block << " thread(s) wait at __syncthreads;";
        for (size_t w = 0; w < s.warps.size(); ++w)
          for (int l = int(w) * 32; l < int(w) * 32 + 32 && l < s.n; ++l)
            if (s.fibers[l].state == AT_WARP) {
              m << " warp " << w << ": " << s.warps[w].arrived << " lane(s) wait at " << s.fibers[l].kind << ";";
              break;
            }
        m << " " << s.done << " of " << s.n << " thread(s) returned";
        throw std::runtime_error(m.str());
      }
}

template <class Tuple, class... P>
void invoke(void* arg) {
  auto* a = static_cast<std::pair<void (*)(P...), Tuple>*>(arg);
  Tuple copy = a->second;  // every thread gets its own copy of the parameters, as on a GPU
  std::apply(a->first, copy);
}

}  // namespace detail

// Run kernel<<<grid, block>>>(args...) to completion. Throws std::runtime_error on deadlock or misuse.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "simt::launch: wrong number of kernel arguments");
  using Tuple = std::tuple<std::decay_t<P>...>;
  if (detail::g_sched) throw std::logic_error("simt::launch: nested launch from inside a kernel");
  if (dynamic_smem_bytes != 0) throw std::invalid_argument("simt::launch: dynamic shared memory is not emulated");
  unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > detail::kMaxThreads) throw std::invalid_argument("simt::launch: block must have 1..1024 threads");
  if (1ull * grid.x * grid.y * grid.z == 0) throw std::invalid_argument("simt::launch: empty grid");
  std::pair<void (*)(P...), Tuple> call(kernel, Tuple(std::forward<A>(args)...));
  detail::Sched s;
  s.grid_dim = grid;
  s.block_dim = block;
  s.n = static_cast<int>(n);
  s.fibers.resize(n);
  s.warps.resize((n + 31) / 32);
  s.queue.resize(n);
  s.body = &detail::invoke<Tuple, P...>;
  s.body_arg = &call;
  struct Reset { ~Reset() { detail::g_sched = nullptr; } } reset;
  detail::g_sched = &s;
  detail::run_grid(s);
}

}  // namespace simt

#define threadIdx (static_cast<const uint3&>(::simt::detail::sched().fibers[::simt::detail::sched().cur].tid))
#define blockIdx (static_cast<const uint3&>(::simt::detail::sched().block_idx))
#define blockDim (static_cast<const dim3&>(::simt::detail::sched().block_dim))
#define gridDim (static_cast<const dim3&>(::simt::detail::sched().grid_dim))
inline constexpr int warpSize = 32;

inline void __syncthreads() { simt::detail::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::detail::check_mask(mask, "__syncwarp");
  simt::detail::warp_barrier("__syncwarp");
}
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return simt::detail::shuffle("__shfl_sync", simt::detail::Shfl::IDX, mask, v, src_lane, width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt::detail::shuffle("__shfl_xor_sync", simt::detail::Shfl::XOR, mask, v, lane_mask, width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::detail::shuffle("__shfl_down_sync", simt::detail::Shfl::DOWN, mask, v, int(delta), width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::detail::shuffle("__shfl_up_sync", simt::detail::Shfl::UP, mask, v, int(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return simt::detail::ballot(mask, pred, "__ballot_sync"); }
inline int __any_sync(unsigned mask, int pred) { return simt::detail::ballot(mask, pred, "__any_sync") != 0; }
inline int __all_sync(unsigned mask, int pred) { return simt::detail::ballot(mask, pred, "__all_sync") == 0xffffffffu; }

// Intrinsics cuda_fp16.h/cuda_bf16.h do not declare for the host.
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((1ull * a * b) >> 32); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class T> inline T __ldg(const T* p) { return *p; }

// Atomics: plain read-modify-write (fibers never switch inside a statement). Return the old value.
#define SIMT_ATOMICS(T)                                                                    \
  inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }                  \
  inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }                  \
  inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }        \
  inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }        \
  inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
SIMT_ATOMICS(int)
SIMT_ATOMICS(unsigned)
SIMT_ATOMICS(unsigned long long)
SIMT_ATOMICS(float)
#undef SIMT_ATOMICS
inline int atomicCAS(int* p, int cmp, int v) { int old = *p; if (old == cmp) *p = v; return old; }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { unsigned old = *p; if (old == cmp) *p = v; return old; }
