// gif_sim.h: the CUDA dialect that kernels/*.cu use, implemented for the host.
//
// The simulator compiles the crate's own kernels/*.cu, unmodified, as C++20
// for the CPU (build.rs generates one translation unit per module that
// includes this header first, then the .cu file). Every CUDA thread of a
// block becomes a fiber with its own stack; a fiber runs until its next
// synchronization point (__syncthreads, a warp collective, a tensor-core or
// ldmatrix wrapper), then yields to the block scheduler in kernels/sim/sim.cpp.
//
// What it checks (docs/simulator.md has the full list):
//   - __syncthreads releases only when every live thread has arrived, all at
//     the same call site; a thread that exits while others wait, or threads
//     waiting at different barriers, are errors naming the kernel and line;
//   - warp collectives release when every lane named in the mask arrives
//     with the same mask and operation; a named lane that exited or does not
//     exist is an error;
//   - the order in which runnable threads (and blocks) run is forward,
//     reverse or a seeded shuffle, so a missing barrier shows as a result
//     that changes with the order;
//   - __shared__ memory is refilled with 0xFF bytes (NaN for every float
//     type) at the start of every block;
//   - global buffers carry guard bands, checked after each launch (src/sim.rs).
//
// Only one block runs at a time, so atomics are plain read-modify-writes.
#pragma once

#ifndef GIF_SIM
#error "gif_sim.h is the simulator's host header; it needs GIF_SIM defined"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <source_location>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// Keywords and qualifiers.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// Every static __shared__ variable lands in one linker section; build.rs
// gives each kernel the table of those its code reaches, which the
// scheduler poisons before each of its blocks (see sim.cpp).
#define __shared__ __attribute__((section("gif_sim_shared"), aligned(16))) static
#define __syncthreads() ::gif_sim::syncthreads(std::source_location::current())

// ---------------------------------------------------------------------------
// Built-in vector types, with CUDA's sizes and alignments.
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace gif_sim {

// One CUDA thread.
struct ThreadState {
  uint3 thread_idx;
  unsigned int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};

// The launch and block being run.
struct BlockState {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_smem;
  size_t dynamic_smem_bytes;
};

// Set by the scheduler on every switch; read by the macros below. A block
// runs entirely on one OS thread, so thread_local is per block.
extern thread_local ThreadState* g_thread;
extern thread_local BlockState* g_block;

// Synchronization points (src/sim.cpp).
void syncthreads(std::source_location loc);
// A block-wide collective with a value: op 0 = count, 1 = and, 2 = or.
int syncthreads_reduce(int op, int pred, std::source_location loc);

// A warp collective. Each participating lane passes pointers to its own
// input and output; when every lane named in `mask` has arrived at the same
// call with the same mask, `complete` runs once with all lanes' arrivals and
// the lanes resume. Pointers stay valid because arrived lanes are suspended.
struct Arrival {
  const void* in;
  void* out;
  int p0, p1;
};
using CompleteFn = void (*)(Arrival* lanes[32], unsigned mask, const char** error);
void warp_collective(unsigned mask, CompleteFn complete, const char* op_name, const void* in, void* out, int p0,
                     int p1, std::source_location loc);

// Reports an error from inside a kernel (trap, bad argument to a wrapper)
// and ends the launch.
[[noreturn]] void fail(const char* what, std::source_location loc);

// cp.async emulation: copies queue per thread and are carried out by the
// issuing thread at cp.async.wait_group, so a missing wait leaves poison.
void cp_async_enqueue(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int newest_pending_allowed);

inline unsigned lane_id() { return g_thread->linear & 31u; }

template <typename T>
inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type larger than 8 bytes");
  unsigned long long b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(unsigned long long b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

void complete_shfl_idx(Arrival* lanes[32], unsigned mask, const char** error);
void complete_shfl_up(Arrival* lanes[32], unsigned mask, const char** error);
void complete_shfl_down(Arrival* lanes[32], unsigned mask, const char** error);
void complete_shfl_xor(Arrival* lanes[32], unsigned mask, const char** error);
void complete_ballot(Arrival* lanes[32], unsigned mask, const char** error);
void complete_syncwarp(Arrival* lanes[32], unsigned mask, const char** error);

template <typename T>
inline T shfl(CompleteFn fn, const char* name, unsigned mask, T var, int p, int width, std::source_location loc) {
  unsigned long long in = to_bits(var), out = 0;
  warp_collective(mask, fn, name, &in, &out, p, width, loc);
  return from_bits<T>(out);
}

}  // namespace gif_sim

#define threadIdx (::gif_sim::g_thread->thread_idx)
#define blockIdx (::gif_sim::g_block->block_idx)
#define blockDim (::gif_sim::g_block->block_dim)
#define gridDim (::gif_sim::g_block->grid_dim)
#define warpSize 32

// ---------------------------------------------------------------------------
// Warp intrinsics. `width` splits the warp into segments as in CUDA.
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     std::source_location loc = std::source_location::current()) {
  return gif_sim::shfl(gif_sim::complete_shfl_idx, "__shfl_sync", mask, var, src_lane, width, loc);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        std::source_location loc = std::source_location::current()) {
  return gif_sim::shfl(gif_sim::complete_shfl_up, "__shfl_up_sync", mask, var, (int)delta, width, loc);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          std::source_location loc = std::source_location::current()) {
  return gif_sim::shfl(gif_sim::complete_shfl_down, "__shfl_down_sync", mask, var, (int)delta, width, loc);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
  return gif_sim::shfl(gif_sim::complete_shfl_xor, "__shfl_xor_sync", mask, var, lane_mask, width, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  unsigned long long in = pred ? 1 : 0, out = 0;
  gif_sim::warp_collective(mask, gif_sim::complete_ballot, "__ballot_sync", &in, &out, 0, 0, loc);
  return (unsigned)out;
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return (__ballot_sync(mask, pred, loc) & mask) != 0;
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return (__ballot_sync(mask, pred, loc) & mask) == mask;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  gif_sim::warp_collective(mask, gif_sim::complete_syncwarp, "__syncwarp", nullptr, nullptr, 0, 0, loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return gif_sim::syncthreads_reduce(0, pred, loc);
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return gif_sim::syncthreads_reduce(1, pred, loc);
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return gif_sim::syncthreads_reduce(2, pred, loc);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap(std::source_location loc = std::source_location::current()) {
  gif_sim::fail("__trap() called", loc);
}

// ---------------------------------------------------------------------------
// Atomics: one block runs at a time and fibers switch only at
// synchronization points, so a plain read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T>
inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <typename T>
inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <typename T>
inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  unsigned old = *p; *p = (old >= limit) ? 0u : old + 1u; return old;
}

// ---------------------------------------------------------------------------
// fmaf. Without -mfma (the build targets any x86-64) the compiler calls the
// library's fmaf, a dispatch and a call per multiply-add: a quarter of a
// simulated GEMM's time. Where the CPU has FMA3 (checked once, at start-up)
// it is the one instruction instead; both are the exactly rounded fused
// multiply-add, so the results are the same bits either way (tests/sim.rs
// compares them with Rust's f32::mul_add on cases where a separate multiply
// and add would differ).
namespace gif_sim {
#if defined(__x86_64__) && !defined(__FMA__) && defined(__GNUC__)
inline const bool kHostFma = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("fma") != 0;
}();
inline float fma32(float a, float b, float c) {
  if (__builtin_expect(kHostFma, 1)) {
    __asm__("vfmadd231ss %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
    return c;
  }
  return std::fma(a, b, c);
}
#else
inline float fma32(float a, float b, float c) { return std::fma(a, b, c); }
#endif
}  // namespace gif_sim
#define fmaf(a, b, c) ::gif_sim::fma32((a), (b), (c))

// ---------------------------------------------------------------------------
// Math. <cmath> gives expf, logf, sqrtf, fmaxf, fabsf and friends; these are
// the CUDA-only spellings. The fast intrinsics compute the exact function
// here: kernels must not depend on their error.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return ::gif_sim::fma32(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------
// The kernel registry. build.rs finds every `extern "C" __global__` kernel in
// a module and generates a table of these; the launcher checks the argument
// list against each kernel's signature before running it.
namespace gif_sim {

enum ArgKind : unsigned char { kArgPointer = 1, kArgInteger = 2, kArgFloat = 3, kArgOther = 4 };

template <typename A>
constexpr unsigned char arg_kind() {
  if constexpr (std::is_pointer_v<A>) return kArgPointer;
  else if constexpr (std::is_integral_v<A> || std::is_enum_v<A>) return kArgInteger;
  else if constexpr (std::is_floating_point_v<A>) return kArgFloat;
  else return kArgOther;
}

using AnyFn = void (*)();
// A static __shared__ variable a kernel can reach (build.rs's tables).
struct SharedVar {
  void* addr;
  unsigned long long bytes;
};
struct Kernel {
  const char* name;
  AnyFn fn;
  void (*thunk)(AnyFn fn, void** args);
  unsigned nargs;
  const unsigned* sizes;
  const unsigned char* kinds;
  const SharedVar* shared;  // poisoned before each block; ends with {nullptr, 0}
};
struct Module {
  const char* name;
  const Kernel* kernels;
  unsigned count;
};

template <typename... A>
struct Signature {
  static constexpr unsigned sizes[] = {(unsigned)sizeof(A)..., 0u};
  static constexpr unsigned char kinds[] = {arg_kind<A>()..., 0};
  template <size_t... I>
  static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_cv_t<A>*>(args[I])...);
  }
  static void thunk(AnyFn fn, void** args) {
    call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
  }
};

template <typename... A>
constexpr Kernel make_kernel(const char* name, void (*f)(A...), const SharedVar* shared) {
  return Kernel{name,       reinterpret_cast<AnyFn>(f), &Signature<A...>::thunk, (unsigned)sizeof...(A),
                Signature<A...>::sizes, Signature<A...>::kinds, shared};
}

}  // namespace gif_sim
