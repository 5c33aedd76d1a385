// gemm.cu: C = alpha·op(A)·op(B) + beta·C, row-major, f32 output.
// src/gemm.rs holds the CPU path (the `gemm` crate), the f64 reference, the
// launches and the cuBLAS baseline.
//
//   op(A) is M x K: A stored [M, K] (n) or [K, M] (t), leading dimension lda.
//   op(B) is K x N: B stored [K, N] (n) or [N, K] (t), leading dimension ldb.
//   C is M x N, leading dimension ldc. beta == 0 never reads C (NaN there is
//   ignored, as in BLAS). Any M, N, K >= 0; offsets are 64-bit.
//
// Two kernel families, each a template on the two transposes; the launcher
// picks the fast-load instance when the alignment rules below hold.
//
// 1. gemm_f32_<ta><tb>[_v]: fp32 SIMT (FFMA), siboehm's 2D block tiling with
//    vectorized loads and shared-memory double buffering.
//    - Block tile 128 x 128, k-tile 16, 256 threads; each thread owns an
//      8 x 8 block of C split 4+4 rows and 4+4 columns 64 apart, so that its
//      shared-memory operands are two float4 each, conflict-free across the
//      warp (the 16 column groups of a warp read 256 contiguous bytes).
//    - Both operand tiles live k-major in shared memory, S[k][128 + 4], so
//      the inner loop is: per k, 4 LDS.128 and 64 FFMA. Global loads of the
//      next k-tile go to registers before the current tile's math and to the
//      other buffer after it: one __syncthreads per k-tile. Tiles that
//      arrive transposed relative to S are stored with 4 scalar STS (2-way
//      bank conflict, once per k-tile; the 16-step inner loop dominates).
//    - 32 KiB of static shared memory (2 buffers x 2 operands x 16 x 132 x 4).
//    - _v: float4 global loads and stores. Needs the contiguous dimension of
//      each operand and of C, and every leading dimension, to be multiples
//      of 4, and 16-byte aligned pointers. Without _v: scalar, predicated.
//    - Registers (ptxas -arch=sm_90 -v, CUDA 13.0, 2026-11-28): 125 to 128,
//      no spills, 0 bytes of stack, 33792 bytes of shared memory.
//      __launch_bounds__(256, 2) caps them at 128 so that two blocks (16
//      warps) fit per SM: 64 accumulators + 2 x 8 operand registers + 16
//      prefetch registers + addressing.
//    - Why 128 x 128 x 16: 64 accumulators per thread give 64 FFMA per
//      4 LDS.128 (arithmetic intensity of 16 FLOP per shared byte loaded per
//      thread-row), the largest tile that keeps two blocks resident within
//      the 128-register cap; a larger k-tile halves barriers per FLOP again
//      but needs 64 KiB of shared memory for double buffering.
//
// 2. gemm_bf16_<ta><tb>[_a]: bf16 inputs, f32 accumulators, tensor cores
//    through mma.sync.m16n8k16 (kernels/arch.cuh), ldmatrix, and a 3-stage
//    cp.async pipeline.
//    - Block tile 128 x 128, k-tile 32, 256 threads as 2 x 4 warps, each warp
//      a 64 x 32 tile: 4 x 4 mma tiles, 64 f32 accumulators per thread.
//    - Each operand tile is stored in shared memory the way it lies in
//      global memory (rows along its contiguous dimension, padded by 8
//      elements = 16 bytes so the 8 row addresses of an ldmatrix hit 8
//      different 16-byte bank groups); ldmatrix or ldmatrix.trans turns it
//      into mma fragments, so no transposition is done by hand:
//        A [M,K] (n): S[m][32+8], ldmatrix.x4       A [K,M] (t): S[k][128+8], .x4.trans
//        B [K,N] (n): S[k][128+8], ldmatrix.x4.trans B [N,K] (t): S[n][32+8], .x4
//    - 3 stages x (A + B) tiles <= 60 KiB of dynamic shared memory (the
//      launcher raises the 48 KiB default).
//    - Registers (ptxas -arch=sm_90 -v, CUDA 13.0, 2026-11-28): 122 to 124
//      for _a, 128 for the element-load path, no spills: 64 accumulators +
//      16 A and 8 B fragment registers + addressing; two blocks fit per SM.
//    - _a: 16-byte cp.async copies (zero-filled past the edges). Needs the
//      contiguous dimension of A and B and their leading dimensions to be
//      multiples of 8 and 16-byte aligned pointers. Without _a: predicated
//      element loads into the same stages (correct for any shape, slower).
//    - Why 128 x 128 x 32 with 2 x 4 warps: per warp and k16 step, 4 + 2
//      ldmatrix.x4 feed 16 mma (a 64 x 32 warp tile), and three stages keep
//      two k-tiles of copies in flight behind the math.
//
// Cost: 2·M·N·K FLOP; at least (M·K + K·N)·S_in + M·N·4·(beta ? 2 : 1)
// bytes. Compute-bound for M, N, K >= 256 or so.
#include "tile_bf16.cuh"
#include "tile_f32.cuh"

namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// fp32 SIMT: the tile main loop lives in tile_f32.cuh (shared with the fused
// softmax head); the epilogue writes alpha·acc + beta·C.
template <bool kTA, bool kTB, bool kVec>
GIF_DEVICE void gemm_f32(int M, int N, int K, float alpha, const float* __restrict__ A, int lda,
                         const float* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc) {
  __shared__ __align__(16) float As[2][kF32K * kF32Pitch];
  __shared__ __align__(16) float Bs[2][kF32K * kF32Pitch];
  const int m0 = blockIdx.y * kF32Tile, n0 = blockIdx.x * kF32Tile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[8][8];
  // A is k-contiguous when not transposed ([M, K]); B when transposed ([N, K]).
  f32_tile_mainloop<!kTA, kTB, kVec>(acc, As, Bs, A, lda, m0, M, nullptr, B, ldb, n0, N, nullptr, K);

  // Epilogue: rows ty*4 + i and 64 + ty*4 + i, columns tx*4 + j and 64 + tx*4 + j.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
    if (m >= M) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + h * 64 + tx * 4;
      float* c = C + (long long)m * ldc + n;
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = alpha * acc[i][4 * h + j];
      if (kVec && n + 3 < N) {
        float4 o = make_float4(v[0], v[1], v[2], v[3]);
        if (beta != 0.0f) {
          const float4 old = *reinterpret_cast<const float4*>(c);
          o.x += beta * old.x;
          o.y += beta * old.y;
          o.z += beta * old.z;
          o.w += beta * old.w;
        }
        *reinterpret_cast<float4*>(c) = o;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (n + j < N) c[j] = beta != 0.0f ? v[j] + beta * c[j] : v[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// bf16 tensor cores: the tile main loop lives in tile_bf16.cuh (shared with
// the convolutions); the epilogue writes alpha·acc + beta·C.
template <bool kTA, bool kTB, bool kAsync>
GIF_DEVICE void gemm_bf16(int M, int N, int K, float alpha, const bf16* __restrict__ A, int lda,
                          const bf16* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc) {
  constexpr bool kAK = !kTA, kBK = kTB;
  GIF_DYNAMIC_SMEM(bf16, smem);
  const int m0 = blockIdx.y * kTcTile, n0 = blockIdx.x * kTcTile;
  // Operands as stored: rows x contiguous columns.
  const TcMatrix a{A, lda, kAK ? M : K, kAK ? K : M};
  const TcMatrix b{B, ldb, kBK ? N : K, kBK ? K : N};
  float acc[4][4][4];
  tc_tile_loop<kAK, kBK, kAsync>(acc, smem, a, m0, b, n0, 0, K);
  tc_for_each(acc, m0, M, n0, N, [&](int m, int n, float v) {
    float* c = C + (long long)m * ldc + n;
    *c = beta != 0.0f ? alpha * v + beta * *c : alpha * v;
  });
}

}  // namespace

// Instances: gemm_f32_<ta><tb>[_v], gemm_bf16_<ta><tb>[_a]. The bf16 kernels
// take 3 stages x (A tile + B tile) of dynamic shared memory; src/gemm.rs
// (bf16_shared_bytes) computes it from TcTile's shapes.
// clang-format off
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_nn(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<false, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_nt(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<false, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_tn(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<true, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_tt(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<true, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_nn_v(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<false, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_nt_v(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<false, true, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_tn_v(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<true, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) gemm_f32_tt_v(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) { gemm_f32<true, true, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_nn(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<false, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_nt(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<false, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_tn(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<true, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_tt(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<true, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_nn_a(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<false, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_nt_a(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<false, true, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_tn_a(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<true, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
extern "C" __global__ void __launch_bounds__(kThreads) gemm_bf16_tt_a(int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc) { gemm_bf16<true, true, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); }
// clang-format on
