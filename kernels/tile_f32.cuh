// tile_f32.cuh: the fp32 SIMT tile of gemm.cu (gemm_f32_*), shared with the
// fused softmax head (softmax_head.cu), which runs the same main loop and
// replaces the epilogue.
//
// A 256-thread block computes a 128 x 128 tile of op(A)·op(B) with k-tiles
// of 16 (siboehm's 2D block tiling): thread (ty, tx) = (t / 16, t % 16) owns
// rows ty*4 + i and 64 + ty*4 + i, columns tx*4 + j and 64 + tx*4 + j
// (acc[i][j], i, j < 8; rows/columns 4..7 are the second group), so its
// shared-memory operands are two float4 each, conflict-free across the warp.
// Both operand tiles live k-major in shared memory, S[k][128 + 4]; global
// loads of the next k-tile go to registers before the current tile's math
// and to the other buffer after it: one __syncthreads per k-tile.
//
// Operands may be f32 or bf16 (widened when stored to shared memory), and
// may read their stored rows through a row map (`rows`: stored row r is
// X[rows[r]]; null for the identity), which is how Partial FC reads its
// sampled centres in place.
#pragma once
#include "common.cuh"

constexpr int kF32Threads = 256;
constexpr int kF32Tile = 128;  // BM = BN
constexpr int kF32K = 16;      // BK
constexpr int kF32Pitch = kF32Tile + 4;

// Row `o` or `k` of a row-mapped operand.
GIF_DEVICE long long f32_row(const int* __restrict__ rows, int r) { return rows ? (long long)rows[r] : (long long)r; }

// Registers holding one thread's share of a 128 x 16 tile: two runs of 4
// consecutive elements along the operand's contiguous dimension.
struct F32Stage {
  float v[2][4];
};

GIF_DEVICE void f32_set4(float (&d)[4], float4 v) {
  d[0] = v.x;
  d[1] = v.y;
  d[2] = v.z;
  d[3] = v.w;
}

// Loads this thread's share of the tile at (o0, k0), where o runs along M
// (for A) or N (for B). kKContig: the operand is stored [o][k] (contiguous
// along k), else [k][o]; `rows` maps its stored rows. `o_total`, `k_total`
// bound the operand; elements outside read as 0. kVec: one 16-byte (f32) or
// 8-byte (bf16) load per run, which needs the contiguous dimension and ld to
// be multiples of 4 and an aligned base.
template <bool kKContig, bool kVec, typename T>
GIF_DEVICE void f32_load(F32Stage& r, const T* __restrict__ X, int ld, const int* __restrict__ rows, int o0, int k0,
                         int o_total, int k_total) {
  const int t = threadIdx.x;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    // k-contiguous: 128 rows (o) x 4 runs of 4 along k; else 16 rows (k) x 32 runs along o.
    const int o = kKContig ? o0 + t / 4 + 64 * p : o0 + (t % 32) * 4;
    const int k = kKContig ? k0 + (t % 4) * 4 : k0 + t / 32 + 8 * p;
    const int run_len = kKContig ? k_total - k : o_total - o;  // elements left along the run
    const bool row_ok = kKContig ? o < o_total : k < k_total;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[p][i] = 0.0f;
    if (!row_ok || run_len <= 0) continue;  // the row map is read only inside the operand
    const T* src = kKContig ? X + f32_row(rows, o) * ld + k : X + f32_row(rows, k) * ld + o;
    if constexpr (kVec && gif_is_bf16<T>::value) {
      const uint2 w = *reinterpret_cast<const uint2*>(src);
      r.v[p][0] = gif_bits_float(w.x << 16);
      r.v[p][1] = gif_bits_float(w.x & 0xffff0000u);
      r.v[p][2] = gif_bits_float(w.y << 16);
      r.v[p][3] = gif_bits_float(w.y & 0xffff0000u);
    } else if constexpr (kVec) {
      f32_set4(r.v[p], *reinterpret_cast<const float4*>(src));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < run_len) r.v[p][i] = to_float(src[i]);
    }
  }
}

// The k index of element p of this thread's share, for a [k][o] operand.
GIF_DEVICE int f32_stage_k(int p) { return threadIdx.x / 32 + 8 * p; }

// Stores the registers into the k-major shared tile S[k][o].
template <bool kKContig>
GIF_DEVICE void f32_store(const F32Stage& r, float* S) {
  const int t = threadIdx.x;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    if constexpr (kKContig) {
      const int o = t / 4 + 64 * p, k = (t % 4) * 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) S[(k + i) * kF32Pitch + o] = r.v[p][i];
    } else {
      const int o = (t % 32) * 4, k = t / 32 + 8 * p;
      *reinterpret_cast<float4*>(&S[k * kF32Pitch + o]) = make_float4(r.v[p][0], r.v[p][1], r.v[p][2], r.v[p][3]);
    }
  }
}

// One k step of the 8 x 8 outer product from two k-major tiles.
GIF_DEVICE void f32_outer(float (&acc)[8][8], const float* as, const float* bs, int k) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float4 a0 = *reinterpret_cast<const float4*>(&as[k * kF32Pitch + ty * 4]);
  const float4 a1 = *reinterpret_cast<const float4*>(&as[k * kF32Pitch + 64 + ty * 4]);
  const float4 b0 = *reinterpret_cast<const float4*>(&bs[k * kF32Pitch + tx * 4]);
  const float4 b1 = *reinterpret_cast<const float4*>(&bs[k * kF32Pitch + 64 + tx * 4]);
  const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
  const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
}

// An operand read as a matrix (optionally through a row map): the source
// every GEMM uses. Sources load a thread's share of the tile at (o0, k0)
// into registers; f32_tile_loop stores them k-major.
template <bool kKContig, bool kVec, typename T>
struct MatrixSrc {
  static constexpr bool kK = kKContig;
  const T* X;
  int ld;
  const int* rows;
  int o_total, k_total;
  GIF_DEVICE void load(F32Stage& r, int o0, int k0) const {
    f32_load<kKContig, kVec>(r, X, ld, rows, o0, k0, o_total, k_total);
  }
};

// An f32 operand given by element addresses (the implicit-GEMM operands of
// conv.cu): for the operand as stored (k-contiguous: [o][k], else [k][o]),
// `op.row(r)` decodes a stored row and `op.at(row, col)` is an address or
// null (zero). kVec: a run of 4 columns starting at a multiple of 4 is
// contiguous, 16-byte aligned and all present or all absent (one float4).
template <bool kKContig, bool kVec, typename Op>
struct AddressSrc {
  static constexpr bool kK = kKContig;
  Op op;
  GIF_DEVICE void load(F32Stage& r, int o0, int k0) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      // The same shares as f32_load: k-contiguous, 128 rows x 4 runs; else 16 rows x 32 runs.
      const int o = kKContig ? o0 + t / 4 + 64 * p : o0 + (t % 32) * 4;
      const int k = kKContig ? k0 + (t % 4) * 4 : k0 + t / 32 + 8 * p;
      const auto row = op.row(kKContig ? o : k);
      const int col = kKContig ? k : o;
      if constexpr (kVec) {
        const float* src = op.at(row, col);
        f32_set4(r.v[p], src ? *reinterpret_cast<const float4*>(src) : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) r.v[p][i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (const float* src = op.at(row, col + i)) r.v[p][i] = *src;
      }
    }
  }
};

// acc = the (m0, n0) tile of A·B over k in [k_begin, k_end) (multiples of
// kF32K but the last), the operands given by sources (SrcA: o along M,
// SrcB: o along N). As, Bs: 2 x kF32K x kF32Pitch floats of shared memory
// each. Starts and ends with a __syncthreads, so the caller may reuse As /
// Bs and read what it wrote before the call.
template <typename SrcA, typename SrcB>
GIF_DEVICE void f32_tile_loop(float (&acc)[8][8], float (*As)[kF32K * kF32Pitch], float (*Bs)[kF32K * kF32Pitch],
                              const SrcA& a, int m0, const SrcB& b, int n0, int k_begin, int k_end) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  const int ktiles = (k_end - k_begin + kF32K - 1) / kF32K;
  F32Stage ra, rb;
  __syncthreads();
  if (ktiles > 0) {
    a.load(ra, m0, k_begin);
    b.load(rb, n0, k_begin);
    f32_store<SrcA::kK>(ra, As[0]);
    f32_store<SrcB::kK>(rb, Bs[0]);
  }
  __syncthreads();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < ktiles;
    if (more) {  // next tile's global loads overlap this tile's math
      a.load(ra, m0, k_begin + (kt + 1) * kF32K);
      b.load(rb, n0, k_begin + (kt + 1) * kF32K);
    }
#pragma unroll
    for (int k = 0; k < kF32K; ++k) f32_outer(acc, As[cur], Bs[cur], k);
    if (more) {
      f32_store<SrcA::kK>(ra, As[cur ^ 1]);
      f32_store<SrcB::kK>(rb, Bs[cur ^ 1]);
    }
    __syncthreads();
  }
}

// acc = the (m0, n0) tile of op(A)·op(B) over K for matrices. kAK / kBK: A /
// B is k-contiguous ([M, K] / [N, K]); a_rows / b_rows map stored rows.
template <bool kAK, bool kBK, bool kVec, typename TA, typename TB>
GIF_DEVICE void f32_tile_mainloop(float (&acc)[8][8], float (*As)[kF32K * kF32Pitch], float (*Bs)[kF32K * kF32Pitch],
                                  const TA* __restrict__ A, int lda, int m0, int M, const int* __restrict__ a_rows,
                                  const TB* __restrict__ B, int ldb, int n0, int N, const int* __restrict__ b_rows,
                                  int K) {
  const MatrixSrc<kAK, kVec, TA> a{A, lda, a_rows, M, K};
  const MatrixSrc<kBK, kVec, TB> b{B, ldb, b_rows, N, K};
  f32_tile_loop(acc, As, Bs, a, m0, b, n0, 0, K);
}

// Row and column of acc[i][j] within the 128 x 128 tile.
GIF_DEVICE int f32_tile_row(int i) { return (i < 4 ? 0 : 64) + (threadIdx.x / 16) * 4 + (i & 3); }
GIF_DEVICE int f32_tile_col(int j) { return (j < 4 ? 0 : 64) + (threadIdx.x % 16) * 4 + (j & 3); }

// out[(r0 + i)·ld + c0 + j] = acc (or += with atomics) inside the bounds.
template <bool kAtomic>
GIF_DEVICE void store_tile(const float (&acc)[8][8], float* out, long long ld, int r0, int r_total, int c0, int c_total) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = r0 + f32_tile_row(i);
    if (r >= r_total) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = c0 + f32_tile_col(j);
      if (c >= c_total) continue;
      if (kAtomic) {
        atomicAdd(out + r * ld + c, acc[i][j]);
      } else {
        out[r * ld + c] = acc[i][j];
      }
    }
  }
}
