// selftest.cu: kernels that test the test machinery, not face recognition.
// src/selftest.rs launches them and holds their CPU references.
//
// Two kinds:
//   - planted bugs the simulator must catch: a block sum missing its barrier
//     (wrong in forward order, right in reverse: why every kernel is tested
//     under two orders), an off-by-one write past a buffer, a thread that
//     exits before a barrier, a divergent barrier, a shuffle that names an
//     exited lane, a cp.async read without its wait;
//   - known-answer kernels for the simulator's emulations, which the CUDA
//     test runs on a GPU too, so the emulated semantics are checked against
//     hardware: shuffles with segment widths and votes; block votes;
//     ldmatrix in every form; cp.async + ldmatrix + mma.sync on one 16x8x16
//     tile; the bf16 / f16 conversions.
// Every kernel here runs with one block of at most 1024 threads unless its
// comment says otherwise.
#include "arch.cuh"

// out[b] = sum of x[b * blockDim.x .. +blockDim.x); thread 0 adds the
// partials that every thread wrote to shared memory. With kSync false the
// barrier between the writes and thread 0's reads is missing.
template <bool kSync>
GIF_DEVICE void block_sum(const float* x, float* out) {
  __shared__ float part[1024];
  const int t = threadIdx.x;
  part[t] = x[blockIdx.x * blockDim.x + t];
  if constexpr (kSync) __syncthreads();
  if (t == 0) {
    float s = 0.0f;
    for (int i = 0; i < (int)blockDim.x; ++i) s += part[i];
    out[blockIdx.x] = s;
  }
}
// Grid: one block per sum, any number of blocks.
extern "C" __global__ void selftest_block_sum(const float* x, float* out) { block_sum<true>(x, out); }
extern "C" __global__ void selftest_block_sum_nosync(const float* x, float* out) { block_sum<false>(x, out); }

// Writes y[0..n] inclusive: one element past the end.
extern "C" __global__ void selftest_oob_write(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 1.0f;
}

// Threads at or past n leave before the barrier the others wait at.
extern "C" __global__ void selftest_exit_before_barrier(float* y, int n) {
  __shared__ float s[1024];
  const int t = threadIdx.x;
  if (t >= n) return;
  s[t] = (float)t;
  __syncthreads();
  y[t] = s[n - 1 - t];
}

// A static shared array in a helper kept out of line: the simulator poisons
// it before each block all the same (build.rs follows the kernel's calls).
// Each thread reads its element before writing blockIdx.x + 1 there, so
// every block reads poison: a planted read of unwritten shared memory, for
// the simulator only. One block of at most 256 threads, any grid.
__device__ __noinline__ float swap_in_helper_shared(int t, float v) {
  __shared__ float s[256];
  const float before = s[t];
  s[t] = v;
  return before;
}
extern "C" __global__ void selftest_unwritten_shared_in_helper(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = swap_in_helper_shared(threadIdx.x, (float)(blockIdx.x + 1));
}

// Odd and even threads wait at two different barriers.
extern "C" __global__ void selftest_divergent_barrier(float* y) {
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.0f;
}

// Lanes 16..31 leave; lanes 0..15 shuffle with a full mask.
extern "C" __global__ void selftest_shfl_exited_lane(float* y) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  y[t] = __shfl_sync(0xffffffffu, (float)t, 0);
}

// Copies x to shared memory with cp.async and reads it back after a
// barrier but without cp.async.wait_group. 4 floats per thread.
extern "C" __global__ void selftest_cp_async_nowait(const float* x, float* y) {
  __shared__ __align__(16) float s[1024 * 4];
  const int t = threadIdx.x;
  cp_async<16>(&s[4 * t], &x[4 * t]);
  cp_async_commit();
  __syncthreads();
  for (int i = 0; i < 4; ++i) y[4 * t + i] = s[4 * t + i];
}

// Known answers for shuffles and votes. One block of whole warps; each
// thread writes 8 ints: shfl idx (lane (3·lane + 1) mod width of its
// segment), up by 3, down by 5, xor 9, xor 17, ballot of odd inputs, any of
// (input > 1000), all of (input >= 0).
extern "C" __global__ void selftest_warp_ops(const int* in, int* out, int width) {
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int v = in[t];
  int* o = out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, v, (3 * lane + 1) % width, width);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3, width);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5, width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 9, width);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 17, width);
  o[5] = (int)__ballot_sync(0xffffffffu, v & 1);
  o[6] = __any_sync(0xffffffffu, v > 1000);
  o[7] = __all_sync(0xffffffffu, v >= 0);
}

// Known answers for ldmatrix. `m` holds four 8x8 matrices of 16-bit values,
// row-major, matrix i at m[64 i]. One warp; each lane writes 14 words:
// x1, x2, x4, x1.trans, x2.trans, x4.trans.
extern "C" __global__ void selftest_ldmatrix(const bf16* m, unsigned* out) {
  __shared__ __align__(16) bf16 s[256];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) s[i] = m[i];
  __syncthreads();
  const bf16* row = &s[64 * (lane >> 3) + 8 * (lane & 7)];  // lane 8i+r: row r of matrix i
  unsigned* o = out + 14 * lane;
  unsigned r1[1], r2[2], r4[4];
  ldmatrix<1, false>(r1, row);
  o[0] = r1[0];
  ldmatrix<2, false>(r2, row);
  o[1] = r2[0];
  o[2] = r2[1];
  ldmatrix<4, false>(r4, row);
  for (int i = 0; i < 4; ++i) o[3 + i] = r4[i];
  ldmatrix<1, true>(r1, row);
  o[7] = r1[0];
  ldmatrix<2, true>(r2, row);
  o[8] = r2[0];
  o[9] = r2[1];
  ldmatrix<4, true>(r4, row);
  for (int i = 0; i < 4; ++i) o[10 + i] = r4[i];
}

// D = A·B + C for one tile: A 16x16 and B 16x8 (k x n), row-major 16-bit;
// C, D 16x8 f32 row-major. One warp: cp.async brings A and B to shared
// memory, ldmatrix.x4 loads A's fragments, ldmatrix.x2.trans B's, mma.sync
// multiplies.
template <typename T>
GIF_DEVICE void mma_tile(const T* a, const T* b, const float* c, float* d) {
  __shared__ __align__(16) T sa[16 * 16];
  __shared__ __align__(16) T sb[16 * 8];
  const int lane = threadIdx.x;
  cp_async<16>(&sa[8 * lane], &a[8 * lane]);  // 32 chunks of 8 values
  if (lane < 16) cp_async<16>(&sb[8 * lane], &b[8 * lane]);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  const int mi = lane >> 3, r = lane & 7;
  unsigned af[4], bf[2];
  ldmatrix<4, false>(af, &sa[(r + (mi & 1) * 8) * 16 + (mi >> 1) * 8]);
  ldmatrix<2, true>(bf, &sb[(r + (mi & 1) * 8) * 8]);
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  float df[4];
  mma_m16n8k16<T>(df, af, bf, cf);
  d[g * 8 + 2 * t] = df[0];
  d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2];
  d[(g + 8) * 8 + 2 * t + 1] = df[3];
}
extern "C" __global__ void selftest_mma_bf16(const bf16* a, const bf16* b, const float* c, float* d) {
  mma_tile<bf16>(a, b, c, d);
}
extern "C" __global__ void selftest_mma_f16(const f16* a, const f16* b, const float* c, float* d) {
  mma_tile<f16>(a, b, c, d);
}

// Known answers for the 16-bit conversions of common.cuh: x -> bf16 and
// x -> f16 (round to nearest even), and back to float. Any grid.
extern "C" __global__ void selftest_convert(const float* x, bf16* b, f16* h, float* b_back, float* h_back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bf16 bv = from_float<bf16>(x[i]);
  const f16 hv = from_float<f16>(x[i]);
  b[i] = bv;
  h[i] = hv;
  b_back[i] = to_float(bv);
  h_back[i] = to_float(hv);
}

// Known answers for __syncthreads_count / _and / _or: each thread writes 3
// ints for the predicate in[t] > 0. One block.
extern "C" __global__ void selftest_block_votes(const int* in, int* out) {
  const int t = threadIdx.x;
  const int p = in[t] > 0;
  out[3 * t] = __syncthreads_count(p);
  out[3 * t + 1] = __syncthreads_and(p);
  out[3 * t + 2] = __syncthreads_or(p);
}

// Known answers for fmaf and __fmaf_rn: the exactly rounded a * b + c (one
// rounding), per element. Any grid.
extern "C" __global__ void selftest_fma(const float* a, const float* b, const float* c, float* fused, float* fused_rn,
                                        int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  fused[i] = fmaf(a[i], b[i], c[i]);
  fused_rn[i] = __fmaf_rn(a[i], b[i], c[i]);
}
