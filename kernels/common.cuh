// common.cuh: what every kernel module shares, for both builds.
//
//   - nvcc / NVRTC (CUDA): plain CUDA C++; no system or CUDA headers are
//     included, so NVRTC compiles the flattened source without include paths.
//   - the simulator (GIF_SIM): kernels/sim/gif_sim.h is included first by the
//     generated translation unit and supplies the CUDA dialect for the host.
//
// Contents: the bf16 / f16 storage types and their conversions (round to
// nearest even, identical on both builds), the dynamic shared memory macro,
// and warp / block reductions.
#pragma once

#if defined(GIF_SIM)
#include <cstring>
#define GIF_DEVICE inline
#else
#define GIF_DEVICE __device__ __forceinline__
#endif

// Declares `T* name` pointing at the launch's dynamic shared memory
// (the shared_bytes of the launch), aligned to at least 16 bytes.
#if defined(GIF_SIM)
#define GIF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::gif_sim::g_block->dynamic_smem)
#else
#define GIF_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char gif_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(gif_dynamic_smem)
#endif

// ---------------------------------------------------------------------------
// 16-bit floating-point storage. Kernels load them, convert to float, compute
// in float and convert back; the bit layout is IEEE binary16 / bfloat16, the
// same as CUDA's __half / __nv_bfloat16 and the `half` crate.
struct __align__(2) bf16 {
  unsigned short bits;
};
struct __align__(2) f16 {
  unsigned short bits;
};

GIF_DEVICE unsigned int gif_float_bits(float x) {
#if defined(GIF_SIM)
  unsigned int u;
  std::memcpy(&u, &x, 4);
  return u;
#else
  return __float_as_uint(x);
#endif
}
// Whether T is bf16 (for `if constexpr` without <type_traits>).
template <typename T>
struct gif_is_bf16 {
  static constexpr bool value = false;
};
template <>
struct gif_is_bf16<bf16> {
  static constexpr bool value = true;
};

GIF_DEVICE float gif_bits_float(unsigned int u) {
#if defined(GIF_SIM)
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#else
  return __uint_as_float(u);
#endif
}

// +infinity, spelled so that NVRTC (no headers, no GCC builtins) takes it.
GIF_DEVICE float gif_inf() { return gif_bits_float(0x7f800000u); }

GIF_DEVICE float to_float(float x) { return x; }
GIF_DEVICE float to_float(bf16 x) { return gif_bits_float((unsigned int)x.bits << 16); }
GIF_DEVICE float to_float(f16 x) {
#if defined(GIF_SIM)
  unsigned int h = x.bits;
  unsigned int sign = (h & 0x8000u) << 16;
  unsigned int exp = (h >> 10) & 0x1fu;
  unsigned int man = h & 0x3ffu;
  if (exp == 0) {
    float v = (float)man * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return gif_bits_float(sign | 0x7f800000u | (man << 13));
  return gif_bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#else
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
  return r;
#endif
}

template <typename T>
GIF_DEVICE T from_float(float x);
template <>
GIF_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
GIF_DEVICE bf16 from_float<bf16>(float x) {
  bf16 r;
#if defined(GIF_SIM)
  unsigned int u = gif_float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = 0x7fff;  // the canonical NaN that cvt.rn.bf16.f32 produces
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
  }
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
  return r;
}
template <>
GIF_DEVICE f16 from_float<f16>(float x) {
  f16 r;
#if defined(GIF_SIM)
  unsigned int u = gif_float_bits(x);
  unsigned int sign = (u >> 16) & 0x8000u;
  unsigned int a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {
    r.bits = 0x7fff;  // the canonical NaN that cvt.rn.f16.f32 produces
  } else if (a >= 0x47800000u) {
    r.bits = (unsigned short)(sign | 0x7c00u);  // >= 65536: infinity
  } else if (a < 0x38800000u) {
    // Below 2^-14: a subnormal half, value * 2^24 rounded to nearest even.
    float v = gif_bits_float(a) * 16777216.0f;
    r.bits = (unsigned short)(sign | (unsigned int)std::nearbyint(v));
  } else {
    unsigned int m = a - (112u << 23);
    m += 0xfffu + ((m >> 13) & 1u);
    r.bits = (unsigned short)(sign | (m >> 13));  // a carry into 0x7c00 is the correct infinity
  }
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
  return r;
}

// ---------------------------------------------------------------------------
// Reductions. Warp reductions use every lane of a full warp; block
// reductions need a one-dimensional block whose size is a multiple of 32 and
// a 32-float scratch array in shared memory; every thread gets the result.
struct SumOp {
  GIF_DEVICE float operator()(float a, float b) const { return a + b; }
  static GIF_DEVICE float identity() { return 0.0f; }
};
struct MaxOp {
  GIF_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
  static GIF_DEVICE float identity() { return -gif_inf(); }
};

template <typename Op>
GIF_DEVICE float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename Op>
GIF_DEVICE float block_reduce(float v, float* scratch, Op op) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // the scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : Op::identity();
  return warp_reduce(v, op);
}

// Online softmax state: running maximum m and sum s of exp(x - m).
struct MaxSum {
  float m, s;
};
GIF_DEVICE MaxSum max_sum_merge(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  if (m == -gif_inf()) return MaxSum{m, 0.0f};
  return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
GIF_DEVICE MaxSum warp_reduce_max_sum(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = max_sum_merge(v, o);
  }
  return v;
}
// `scratch` holds 64 floats.
GIF_DEVICE MaxSum block_reduce_max_sum(MaxSum v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_reduce_max_sum(v);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = v.m;
    scratch[32 + warp] = v.s;
  }
  __syncthreads();
  v = lane < nwarps ? MaxSum{scratch[lane], scratch[32 + lane]} : MaxSum{-gif_inf(), 0.0f};
  return warp_reduce_max_sum(v);
}

// A keyed 32-bit hash of n: xor, odd multiplies and xorshifts, so a
// bijection of n for each key (distinct inputs give distinct outputs).
// Partial FC's sampling keys and dropout's masks; src/hash.rs is the same
// function on the host.
GIF_DEVICE unsigned int keyed_hash32(unsigned int n, unsigned int key_a, unsigned int key_b) {
  unsigned int x = n ^ key_a;
  x *= 0x9E3779B1u;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x + key_b;
}
