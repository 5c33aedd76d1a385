// tile_bf16.cuh: the bf16 tensor-core tile of gemm.cu (gemm_bf16_*), shared
// with the convolutions (conv.cu), which feed it implicit-GEMM operands.
//
// A 256-thread block (2 x 4 warps of 64 x 32) computes a 128 x 128 tile of
// A·B with k-tiles of 32 through mma.sync.m16n8k16 (f32 accumulators,
// acc[4][4][4] per thread), ldmatrix, and a 3-stage cp.async pipeline. Each
// operand tile is stored in shared memory the way it lies in global memory
// (rows along its contiguous dimension, padded by 8 elements = 16 bytes so
// the 8 row addresses of an ldmatrix hit 8 different 16-byte bank groups);
// ldmatrix or ldmatrix.trans turns it into mma fragments:
//   A k-contiguous ([M, K]): S[m][32+8], ldmatrix.x4   else ([K, M]): S[k][128+8], .x4.trans
//   B n-contiguous ([K, N]): S[k][128+8], .x4.trans    else ([N, K]): S[n][32+8], .x4
//
// Operands come from *sources*: `row(r)` decodes stored row r and
// `at(row, col)` gives the address of the element at (row, contiguous
// column), or null for a zero (outside the operand, or in a convolution's
// padding); `base` is any valid global address. With kAsync the tile moves in 16-byte cp.async chunks, so the 8
// elements at col..col+7 (col a multiple of 8) must be contiguous in memory
// and all present or all absent, and present chunks 16-byte aligned; without
// it, element by element (any shape).
#pragma once
#include "arch.cuh"

constexpr int kTcThreads = 256;
constexpr int kTcTile = 128;  // BM = BN
constexpr int kTcK = 32;      // BK
constexpr int kTcStages = 3;
constexpr int kTcPad = 8;  // bf16 elements = 16 bytes

// Shared-memory shape of one operand tile: kRows rows of kLen contiguous
// elements (+ kTcPad). For A: k-contiguous [128 m][32 k] or else [32 k][128 m];
// for B: k-contiguous [128 n][32 k] or else [32 k][128 n].
template <bool kKContig>
struct TcTile {
  static constexpr int kRows = kKContig ? kTcTile : kTcK;
  static constexpr int kLen = kKContig ? kTcK : kTcTile;
  static constexpr int kPitch = kLen + kTcPad;
  static constexpr int kElems = kRows * kPitch;
  static constexpr int kChunks = kRows * kLen / 8;  // 16-byte chunks per tile
};

// A matrix operand: rows x cols as stored, leading dimension ld.
struct TcMatrix {
  const bf16* base;
  long long ld;
  int rows, cols;
  GIF_DEVICE const bf16* row(int r) const { return r < rows ? base + r * ld : nullptr; }
  GIF_DEVICE const bf16* at(const bf16* r, int c) const { return r && c < cols ? r + c : nullptr; }
};

// Copies the tile whose first stored row is `row0` and first contiguous
// index `col0` from `src` into S.
template <bool kKContig, bool kAsync, typename Src>
GIF_DEVICE void tc_load(bf16* S, const Src& src, int row0, int col0) {
  using Tile = TcTile<kKContig>;
  constexpr int kPerRow = Tile::kLen / 8;
#pragma unroll
  for (int p = 0; p < Tile::kChunks / kTcThreads; ++p) {
    const int c = threadIdx.x + kTcThreads * p;
    const int r = c / kPerRow, col = (c % kPerRow) * 8;
    bf16* dst = S + r * Tile::kPitch + col;
    if constexpr (kAsync) {
      const bf16* p = src.at(src.row(row0 + r), col0 + col);
      cp_async<16>(dst, p ? p : src.base, p ? 16 : 0);  // 0 bytes: zero-filled, nothing read
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bf16* p = src.at(src.row(row0 + r), col0 + col + i);
        bf16 v;
        v.bits = 0;
        if (p) v = *p;
        dst[i] = v;
      }
    }
  }
}

// acc = the (m0, n0) tile of A·B over k in [k_begin, k_end) (k_begin a
// multiple of kTcK; the sources must read zeros past k_end unless it is a
// multiple of kTcK or the operand's end). kAK / kBK: A / B stored
// k-contiguous. smem: kTcStages x (TcTile<kAK>::kElems + TcTile<kBK>::kElems)
// elements of dynamic shared memory (src/gemm.rs bf16_shared_bytes).
template <bool kAK, bool kBK, bool kAsync, typename SrcA, typename SrcB>
GIF_DEVICE void tc_tile_loop(float (&acc)[4][4][4], bf16* smem, const SrcA& a, int m0, const SrcB& b, int n0,
                             int k_begin, int k_end) {
  using TA = TcTile<kAK>;
  using TB = TcTile<kBK>;
  constexpr int kStage = TA::kElems + TB::kElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // warp tile origin in the block tile
  const int mi = lane >> 3, r8 = lane & 7;              // ldmatrix: this lane's matrix and row

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int ktiles = (k_end - k_begin + kTcK - 1) / kTcK;
  auto load_stage = [&](int kt) {
    bf16* sa = smem + (kt % kTcStages) * kStage;
    bf16* sb = sa + TA::kElems;
    const int k0 = k_begin + kt * kTcK;
    tc_load<kAK, kAsync>(sa, a, kAK ? m0 : k0, kAK ? k0 : m0);
    tc_load<kBK, kAsync>(sb, b, kBK ? n0 : k0, kBK ? k0 : n0);
  };

#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < ktiles) load_stage(s);
    cp_async_commit();  // an empty group keeps the wait counts uniform
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kTcStages - 2>();
    __syncthreads();  // tile kt is in shared memory; stage (kt-1) % kTcStages is free
    if (kt + kTcStages - 1 < ktiles) load_stage(kt + kTcStages - 1);
    cp_async_commit();

    const bf16* sa = smem + (kt % kTcStages) * kStage;
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
}

// Row and column, within the 128 x 128 tile, of accumulator acc[i][j][e].
GIF_DEVICE int tc_tile_row(int i, int e) { return ((threadIdx.x / 32) / 4) * 64 + i * 16 + ((threadIdx.x % 32) >> 2) + (e >= 2 ? 8 : 0); }
GIF_DEVICE int tc_tile_col(int j, int e) { return ((threadIdx.x / 32) % 4) * 32 + j * 8 + 2 * ((threadIdx.x % 32) & 3) + (e & 1); }

// Calls f(row, col, value) for each accumulator of the (r0, c0) tile inside
// r_total x c_total.
template <typename F>
GIF_DEVICE void tc_for_each(const float (&acc)[4][4][4], int r0, int r_total, int c0, int c_total, F f) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + tc_tile_row(i, e), c = c0 + tc_tile_col(j, e);
        if (r < r_total && c < c_total) f(r, c, acc[i][j][e]);
      }
}

// out[(r0 + row)·ld + c0 + col] = acc (or += with atomics) inside the bounds.
template <bool kAtomic>
GIF_DEVICE void tc_store_tile(const float (&acc)[4][4][4], float* out, long long ld, int r0, int r_total, int c0,
                              int c_total) {
  tc_for_each(acc, r0, r_total, c0, c_total, [&](int r, int c, float v) {
    if (kAtomic) {
      atomicAdd(out + r * ld + c, v);
    } else {
      out[r * ld + c] = v;
    }
  });
}
