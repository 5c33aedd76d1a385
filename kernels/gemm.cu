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
#include "arch.cuh"
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
// bf16 tensor cores.
constexpr int kTcTile = 128;  // BM = BN
constexpr int kTcK = 32;      // BK
constexpr int kStages = 3;
constexpr int kPad = 8;  // bf16 elements = 16 bytes

// Shared-memory shape of one operand tile: kRows rows of kLen contiguous
// elements (+ kPad). For A: k-contiguous [128 m][32 k] or else [32 k][128 m];
// for B: n-contiguous [32 k][128 n] or else [128 n][32 k].
template <bool kKContig>
struct TcTile {
  static constexpr int kRows = kKContig ? kTcTile : kTcK;
  static constexpr int kLen = kKContig ? kTcK : kTcTile;
  static constexpr int kPitch = kLen + kPad;
  static constexpr int kElems = kRows * kPitch;
  static constexpr int kChunks = kRows * kLen / 8;  // 16-byte chunks per tile
};

// Copies the tile whose first row is `row0` and first contiguous index
// `col0` from X (rows_total x cols_total, leading dimension ld) into S.
// With kAsync: 16-byte cp.async copies, zero-filled outside the operand
// (cols_total is a multiple of 8, so a chunk is either inside or outside).
// Without: element loads, predicated one by one.
template <bool kKContig, bool kAsync>
GIF_DEVICE void tc_load(bf16* S, const bf16* __restrict__ X, int ld, int row0, int col0, int rows_total,
                        int cols_total) {
  using Tile = TcTile<kKContig>;
  constexpr int kPerRow = Tile::kLen / 8;
#pragma unroll
  for (int p = 0; p < Tile::kChunks / kThreads; ++p) {
    const int c = threadIdx.x + kThreads * p;
    const int r = c / kPerRow, col = (c % kPerRow) * 8;
    const int gr = row0 + r, gc = col0 + col;
    bf16* dst = S + r * Tile::kPitch + col;
    if constexpr (kAsync) {
      const bool ok = gr < rows_total && gc < cols_total;
      const bf16* src = ok ? X + (long long)gr * ld + gc : X;  // any valid address when nothing is read
      cp_async<16>(dst, src, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bf16 v;
        v.bits = 0;
        if (gr < rows_total && gc + i < cols_total) v = X[(long long)gr * ld + gc + i];
        dst[i] = v;
      }
    }
  }
}

template <bool kTA, bool kTB, bool kAsync>
GIF_DEVICE void gemm_bf16(int M, int N, int K, float alpha, const bf16* __restrict__ A, int lda,
                          const bf16* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc) {
  constexpr bool kAK = !kTA, kBK = kTB;
  using TA = TcTile<kAK>;
  using TB = TcTile<kBK>;
  constexpr int kStage = TA::kElems + TB::kElems;
  GIF_DYNAMIC_SMEM(bf16, smem);

  const int m0 = blockIdx.y * kTcTile, n0 = blockIdx.x * kTcTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // warp tile origin in the block tile
  const int g = lane >> 2, t = lane & 3;
  const int mi = lane >> 3, r8 = lane & 7;  // ldmatrix: this lane's matrix and row

  // Operand extents as stored: rows x contiguous columns.
  const int a_rows = kAK ? M : K, a_cols = kAK ? K : M;
  const int b_rows = kBK ? N : K, b_cols = kBK ? K : N;

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int ktiles = (K + kTcK - 1) / kTcK;
  auto load_stage = [&](int kt) {
    bf16* sa = smem + (kt % kStages) * kStage;
    bf16* sb = sa + TA::kElems;
    const int k0 = kt * kTcK;
    tc_load<kAK, kAsync>(sa, A, lda, kAK ? m0 : k0, kAK ? k0 : m0, a_rows, a_cols);
    tc_load<kBK, kAsync>(sb, B, ldb, kBK ? n0 : k0, kBK ? k0 : n0, b_rows, b_cols);
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s);
    cp_async_commit();  // an empty group keeps the wait counts uniform
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in shared memory; stage (kt-1) % kStages is free
    if (kt + kStages - 1 < ktiles) load_stage(kt + kStages - 1);
    cp_async_commit();

    const bf16* sa = smem + (kt % kStages) * kStage;
    const bf16* sb = sa + TA::kElems;
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      unsigned af[4][4], bfr[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm + i * 16;
        if constexpr (kAK) {  // S[m][k]: matrices (m 0-7 | 8-15) x (k 0-7 | 8-15)
          ldmatrix<4, false>(af[i], &sa[(m + r8 + (mi & 1) * 8) * TA::kPitch + kk + (mi >> 1) * 8]);
        } else {  // S[k][m]
          ldmatrix<4, true>(af[i], &sa[(kk + r8 + (mi >> 1) * 8) * TA::kPitch + m + (mi & 1) * 8]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        const int n = wn + j * 8;
        unsigned r[4];
        if constexpr (kBK) {  // S[n][k]: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
          ldmatrix<4, false>(r, &sb[(n + r8 + (mi >> 1) * 8) * TB::kPitch + kk + (mi & 1) * 8]);
        } else {  // S[k][n]: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
          ldmatrix<4, true>(r, &sb[(kk + r8 + (mi & 1) * 8) * TB::kPitch + n + (mi >> 1) * 8]);
        }
        bfr[j][0] = r[0];
        bfr[j][1] = r[1];
        bfr[j + 1][0] = r[2];
        bfr[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_m16n8k16<bf16>(acc[i][j], af[i], bfr[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm + i * 16 + g + (e >= 2 ? 8 : 0);
        const int n = n0 + wn + j * 8 + 2 * t + (e & 1);
        if (m < M && n < N) {
          float* c = C + (long long)m * ldc + n;
          const float v = alpha * acc[i][j][e];
          *c = beta != 0.0f ? v + beta * *c : v;
        }
      }
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
