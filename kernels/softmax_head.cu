// softmax_head.cu: the O(N) baselines (src/head/softmax_head.rs,
// src/head/partial_fc.rs): the N-way margin softmax over cosine logits,
// fused so that the B x N logits never exist in device memory (Cut
// Cross-Entropy's scheme on the fp32 SIMT tile of tile_f32.cuh), the
// nearest-centre top-k, and Partial FC's class sampling.
//
// Notation: U = the normalized features [B, d] (f32), W the centres [N, d]
// (f32 or bf16, read in place through an optional row map `rows`: logical
// class n is stored row rows[n]; Partial FC's sample), r[n] = 1 / max(‖w_n‖,
// eps), c = U·Wᵀ·diag(r) the cosines, y the target class of each row, f the
// margin (margin.cuh), s the scale, weight = 1 / B.
//
// inv_norms_<T>           r[n]; one warp per class.
// softmax_fwd_<T>[_v]     grid (splits, ⌈B/128⌉): block (sp, bt) walks class
//                         tiles sp, sp + splits, ... for rows bt·128.., keeping
//                         per row in shared memory the running max and sum of
//                         exp(s·c) over the non-target classes, and the
//                         argmax of c (lowest index on ties). Writes partial
//                         [B][splits][4] = (max, sum, best c, best index bits)
//                         and the target cosine c_y (its one tile writes it).
// softmax_target_angle_<T> (angular margins) one warp per row: the
//                         target's c_y and sin θ from the raw feature and
//                         centre in f64 (margin.cuh), replacing the tile's c_y
//                         (rows whose target is negative are left alone).
// softmax_shard_stats     (the model-parallel heads) one warp per row: the
//                         splits merged into stats [B][6] = (max, Σ exp(· −
//                         max), best c, best index bits) over this shard's
//                         non-target classes, max and sum NaN when a
//                         non-finite input reached the row, then the row's
//                         target cosine and sine (0 without sines) copied
//                         beside them, so one download brings all six; the
//                         ranks then combine their rows' stats
//                         (all-reduce).
// softmax_merge           one warp per row: merges the splits, adds the
//                         target logit s·f(c_y): lse, loss = weight·log1p(S)
//                         when the target is the max logit, else weight·(lse
//                         − s·f(c_y)) (S: the other classes' Σ exp at the
//                         max), correct = (argmax == y), G = −weight·s·S/Z
//                         (= weight·s·(p_y − 1) without cancellation), gy =
//                         G·df (G when straight-through) and gsing = G·sing,
//                         the exact ArcFace gradient's singular part.
// softmax_target_singular_<T> (exact ArcFace) one warp per distinct target
//                         class: adds gsing along the unit tangents to the
//                         rows' dU and the class's dŴ, in row order.
// softmax_bwd_<T>[_v]     grid (⌈N/128⌉, b_splits): block (nt, bs) owns class
//                         tile nt and walks row tiles bs, bs + b_splits, ...:
//                         recomputes the tile of c, G = weight·s·p (gy on the
//                         target) into shared memory, then per 128-column
//                         chunk of d: dU[rows] += G·diag(r)·W[tile]
//                         (atomicAdd: many class tiles share a row) and
//                         dŴ[tile] += Gᵀ·U[rows] (atomicAdd too, but one
//                         block owns the tile when b_splits = 1, so the
//                         centre gradient is then bit-reproducible).
// centre_grad_finish_<T>  dW_n = r_n (dŴ_n − ŵ_n (ŵ_n·dŴ_n)), ŵ = r w, in
//                         place; one warp per class.
// topk_fwd_<T>[_v]        grid (splits, ⌈B/128⌉): per class tile, the cosines
//                         go to shared memory and thread t < 128 inserts its
//                         row's winners into a sorted list of k (shared
//                         memory); writes [B][splits][k] candidates.
// topk_merge              one thread per row: the best k of splits·k.
// tc_chunk_stats_k,       the tensor-core path's reductions of a chunk of
// tc_chunk_grad_k         logits (see their definitions below).
// pfc_*                   Partial FC's sample (see partial_fc.rs): mark the
//                         positives (counting the negatives still to draw),
//                         a 2-pass 16-bit radix select of the negatives with
//                         the largest keys (a seeded bijective hash of the
//                         class, so keys are distinct), an ordered compaction
//                         (scan) into the sorted index, and the labels'
//                         positions in it (pfc_remap, a binary search).
//
// Memory beyond the weights and their gradient: U, dU ([B, d]), r ([N]),
// partial ([B, splits, 4]), lse, gy, loss, correct ([B]); splits <= 1024.
// Cost: 8·B·N·d FLOP (the forward tile, its recompute in the backward, and
// the two gradient products; the unfused head does 6·B·N·d but writes and
// reads the B x N logits and their gradient), plus 2·B·N exps.
#include "margin.cuh"
#include "tile_f32.cuh"

namespace {

constexpr int kTile = kF32Tile;
constexpr int kP = kF32Pitch;

struct Lse {
  float m, s;  // max and sum of exp(x − max); m = −inf: empty
};
GIF_DEVICE Lse lse_merge(Lse a, Lse b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -gif_inf()) return a;
  const float sa = a.m == -gif_inf() ? 0.0f : a.s * expf(a.m - m);
  const float sb = b.m == -gif_inf() ? 0.0f : b.s * expf(b.m - m);
  return Lse{m, sa + sb};
}
// (value, index): larger value first, lower index on ties.
GIF_DEVICE bool better(float v1, int i1, float v2, int i2) { return v1 > v2 || (v1 == v2 && i1 < i2); }

GIF_DEVICE float idx_bits(int i) { return gif_bits_float((unsigned int)i); }

// Merges a warp's (log-sum-exp, best cosine and index) into every lane.
GIF_DEVICE void warp_merge(Lse& l, float& bc, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    l = lse_merge(l, Lse{__shfl_xor_sync(0xffffffffu, l.m, o), __shfl_xor_sync(0xffffffffu, l.s, o)});
    const float oc = __shfl_xor_sync(0xffffffffu, bc, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(oc, oi, bc, bi)) {
      bc = oc;
      bi = oi;
    }
  }
}
GIF_DEVICE int bits_idx(float f) { return (int)gif_float_bits(f); }

template <typename T>
GIF_DEVICE void inv_norms(const T* __restrict__ W, const int* __restrict__ rows, int n, int d, float eps,
                          float* __restrict__ r) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;
  const T* w = W + f32_row(rows, row) * d;
  float ss = 0.0f;
  for (int c = lane; c < d; c += 32) {
    const float x = to_float(w[c]);
    ss += x * x;
  }
  ss = warp_reduce(ss, SumOp{});
  if (lane == 0) r[row] = 1.0f / fmaxf(sqrtf(ss), eps);
}

// The cosines of this thread's 8 x 8 share of tile (m0, n0).
template <bool kVec, typename T>
GIF_DEVICE void cos_tile(float (&acc)[8][8], float (*As)[kF32K * kP], float (*Bs)[kF32K * kP], const float* U, const T* W,
                         const int* rows, const float* rnorm, int m0, int n0, int B, int N, int d) {
  f32_tile_mainloop<true, true, kVec>(acc, As, Bs, U, d, m0, B, nullptr, W, d, n0, N, rows, d);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int n = n0 + f32_tile_col(j);
    const float rn = n < N ? rnorm[n] : 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i][j] *= rn;
  }
}

template <typename T, bool kVec>
GIF_DEVICE void softmax_fwd(const float* __restrict__ U, const T* __restrict__ W, const int* __restrict__ rows,
                            const float* __restrict__ rnorm, const int* __restrict__ target, int B, int N, int d, float s,
                            int splits, float* __restrict__ partial, float* __restrict__ tgt_cos) {
  __shared__ __align__(16) float As[2][kF32K * kP];
  __shared__ __align__(16) float Bs[2][kF32K * kP];
  __shared__ float st_m[kTile], st_s[kTile], st_c[kTile];
  __shared__ int st_i[kTile];
  const int sp = blockIdx.x, m0 = blockIdx.y * kTile, t = threadIdx.x;
  const int tx = t % 16;
  if (t < kTile) {
    st_m[t] = -gif_inf();
    st_s[t] = 0.0f;
    st_c[t] = -gif_inf();
    st_i[t] = 0x7fffffff;
  }
  const int ntiles = (N + kTile - 1) / kTile;
  for (int nt = sp; nt < ntiles; nt += splits) {
    const int n0 = nt * kTile;
    float acc[8][8];
    cos_tile<kVec>(acc, As, Bs, U, W, rows, rnorm, m0, n0, B, N, d);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int y = m0 + f32_tile_row(i) < B ? target[m0 + f32_tile_row(i)] : -1;
      float mt = -gif_inf(), bc = -gif_inf();
      int bi = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = n0 + f32_tile_col(j);
        if (n >= N) continue;
        const float c = acc[i][j];
        if (better(c, n, bc, bi)) {
          bc = c;
          bi = n;
        }
        if (n == y) {
          tgt_cos[m0 + f32_tile_row(i)] = c;
        } else {
          mt = fmaxf(mt, s * c);
        }
        if (c != c) mt = c;  // NaN: keep it (fmaxf would drop it)
      }
      float se = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = n0 + f32_tile_col(j);
        if (n < N && n != y && mt != -gif_inf()) se += expf(s * acc[i][j] - mt);
      }
      Lse l{mt, se};
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) {
        const Lse other{__shfl_xor_sync(0xffffffffu, l.m, o), __shfl_xor_sync(0xffffffffu, l.s, o)};
        l = lse_merge(l, other);
        const float oc = __shfl_xor_sync(0xffffffffu, bc, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(oc, oi, bc, bi)) {
          bc = oc;
          bi = oi;
        }
      }
      if (tx == 0) {  // this row's one owner
        const int r = f32_tile_row(i);
        const Lse cur = lse_merge(Lse{st_m[r], st_s[r]}, l);
        st_m[r] = cur.m;
        st_s[r] = cur.s;
        if (better(bc, bi, st_c[r], st_i[r])) {
          st_c[r] = bc;
          st_i[r] = bi;
        }
      }
    }
  }
  __syncthreads();
  if (t < kTile && m0 + t < B) {
    float* p = partial + ((long long)(m0 + t) * splits + sp) * 4;
    p[0] = st_m[t];
    p[1] = st_s[t];
    p[2] = st_c[t];
    p[3] = idx_bits(st_i[t]);
  }
}

// A row's forward partials [splits][4] merged by its warp (every lane
// gets the result): the other classes' (max, Σ exp), the best cosine and
// its class (lowest on ties), and whether a partial was NaN.
struct RowMerge {
  Lse l;
  float bc;
  int bi;
  bool nan;
};
GIF_DEVICE RowMerge merge_splits(const float* __restrict__ partial, int splits, int row, int lane) {
  Lse l{-gif_inf(), 0.0f};
  float bc = -gif_inf();
  int bi = 0x7fffffff;
  bool nan = false;
  for (int sp = lane; sp < splits; sp += 32) {
    const float* p = partial + ((long long)row * splits + sp) * 4;
    nan |= p[0] != p[0] || p[1] != p[1];
    l = lse_merge(l, Lse{p[0], p[1]});
    if (better(p[2], bits_idx(p[3]), bc, bi)) {
      bc = p[2];
      bi = bits_idx(p[3]);
    }
  }
  warp_merge(l, bc, bi);
  nan = __any_sync(0xffffffffu, nan);
  return RowMerge{l, bc, bi, nan};
}

GIF_DEVICE void merge_rows(const float* __restrict__ partial, int splits, const float* __restrict__ tgt_cos,
                           const float* __restrict__ tgt_sin, const int* __restrict__ target, int B, float s, int margin,
                           float m, float cos_m, float sin_m, int exact_grad, float weight, float* __restrict__ lse_out,
                           float* __restrict__ gy, float* __restrict__ loss, float* __restrict__ correct,
                           float* __restrict__ gsing) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= B) return;
  const RowMerge mr = merge_splits(partial, splits, row, lane);
  if (lane != 0) return;
  const Lse l = mr.l;
  const int y = target[row];
  const float cy = tgt_cos[row];
  const Target tg = margin_target(cy, tgt_sin ? tgt_sin[row] : 0.0f, margin, m, cos_m, sin_m);
  const float ty = s * tg.f;
  // l holds (max, Σ exp) of the other classes: S = their sum at the row's
  // max M, Z = S + exp(s f − M).
  const float mx = fmaxf(l.m, ty);
  const float others = l.m == -gif_inf() ? 0.0f : l.s * expf(l.m - mx);
  const float zsum = others + expf(ty - mx);
  const float g = -weight * s * others / zsum;  // weight·s·(p_y − 1), without cancellation
  lse_out[row] = mx + logf(zsum);
  gy[row] = g * (exact_grad ? tg.df : 1.0f);
  gsing[row] = exact_grad ? g * tg.sing : 0.0f;
  loss[row] = mr.nan || cy != cy ? gif_bits_float(0x7fc00000u) : weight * (ty >= mx ? log1pf(others) : (mx - ty) + logf(zsum));
  correct[row] = mr.bi == y ? 1.0f : 0.0f;
}

// One row's stats over this shard's classes (the splits merged as in
// merge_rows), for the ranks to combine, and the row's target cosine and
// sine (tgt_sin may be null: 0); one warp per row.
GIF_DEVICE void shard_stats(const float* __restrict__ partial, int splits, int B, const float* __restrict__ tgt_cos,
                            const float* __restrict__ tgt_sin, float* __restrict__ out) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= B) return;
  const RowMerge mr = merge_splits(partial, splits, row, lane);
  if (lane != 0) return;
  float* o = out + (long long)row * 6;
  o[0] = mr.nan ? gif_bits_float(0x7fc00000u) : mr.l.m;
  o[1] = mr.nan ? gif_bits_float(0x7fc00000u) : mr.l.s;
  o[2] = mr.bc;
  o[3] = idx_bits(mr.bi);
  o[4] = tgt_cos[row];
  o[5] = tgt_sin ? tgt_sin[row] : 0.0f;
}

// The target's cosine and the sine of its angle from the raw feature (f32)
// and centre in f64, one warp per row; overwrites the tile's f32 cosine.
template <typename T>
GIF_DEVICE void target_angle(const float* __restrict__ X, const T* __restrict__ W, const int* __restrict__ rows,
                             const int* __restrict__ target, int B, int d, float* __restrict__ tgt_cos,
                             float* __restrict__ tgt_sin) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= B || target[row] < 0) return;  // (another shard's target)
  const Angle64 a = warp_angle(X + (long long)row * d, W + f32_row(rows, target[row]) * d, d);
  if (lane == 0) {
    tgt_cos[row] = (float)a.c;
    tgt_sin[row] = (float)a.sin;
  }
}

// The singular part of the exact ArcFace gradient: one warp per distinct
// target class (rows order[starts[g] .. starts[g + 1]], ascending), adding
// a·t (a = gsing of the row) to the row's dU along the unit tangent at u
// toward ŵ, and to the class's dŴ along the tangent at ŵ toward u, row after
// row: the centre gradient stays reproducible.
template <typename T>
GIF_DEVICE void target_singular(const float* __restrict__ X, const T* __restrict__ W, const int* __restrict__ rows,
                                const int* __restrict__ target, const int* __restrict__ order,
                                const int* __restrict__ starts, int d, const float* __restrict__ gsing,
                                float* __restrict__ dU, float* __restrict__ dW_hat) {
  const int g = blockIdx.x, lane = threadIdx.x & 31;
  for (int i = starts[g]; i < starts[g + 1]; ++i) {
    const int row = order[i];
    const float a = gsing[row];
    if (a == 0.0f) continue;  // the same for every lane
    const int n = target[row];
    const float* x = X + (long long)row * d;
    const T* w = W + f32_row(rows, n) * d;
    const Angle64 ang = warp_angle(x, w, d);
    for (int c = lane; c < d; c += 32) {
      const double xc = x[c], wc = to_float(w[c]);
      dU[(long long)row * d + c] += (float)(a * ang.toward_w(xc, wc));
      dW_hat[(long long)n * d + c] += (float)(a * ang.toward_z(xc, wc));
    }
  }
}

// acc = A·X over the 128-deep k range of a resident tile: A(o, k) is
// Gs[k][o] (kKMajor) or Gs[o][k]; X is read from global memory as [k][o]
// rows k0.. (through `rows`), columns o0.., each row k scaled by kscale[k]
// when given. Uses Bs as its double buffer; starts and ends with a barrier.
template <bool kKMajor, bool kVec, typename T>
GIF_DEVICE void resident_gemm(float (&acc)[8][8], const float* Gs, float (*Bs)[kF32K * kP], const T* __restrict__ X, int ld,
                              const int* __restrict__ rows, const float* __restrict__ kscale, int o0, int k0, int o_total,
                              int k_total) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  F32Stage rb;
  auto load = [&](int kt) {
    f32_load<false, kVec>(rb, X, ld, rows, o0, k0 + kt * kF32K, o_total, k_total);
    if (kscale) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int k = k0 + kt * kF32K + f32_stage_k(p);
        const float sc = k < k_total ? kscale[k] : 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) rb.v[p][i] *= sc;
      }
    }
  };
  __syncthreads();
  load(0);
  f32_store<false>(rb, Bs[0]);
  __syncthreads();
  constexpr int kTiles = kTile / kF32K;
  for (int kt = 0; kt < kTiles; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < kTiles;
    if (more) load(kt + 1);
    const float* bs = Bs[cur];
#pragma unroll
    for (int k = 0; k < kF32K; ++k) {
      const int kk = kt * kF32K + k;
      float a[8];
      if constexpr (kKMajor) {
        const float4 a0 = *reinterpret_cast<const float4*>(&Gs[kk * kP + ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&Gs[kk * kP + 64 + ty * 4]);
        a[0] = a0.x, a[1] = a0.y, a[2] = a0.z, a[3] = a0.w;
        a[4] = a1.x, a[5] = a1.y, a[6] = a1.z, a[7] = a1.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = Gs[f32_tile_row(i) * kP + kk];
      }
      const float4 b0 = *reinterpret_cast<const float4*>(&bs[k * kP + tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&bs[k * kP + 64 + tx * 4]);
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) f32_store<false>(rb, Bs[cur ^ 1]);
    __syncthreads();
  }
}

template <typename T, bool kVec>
GIF_DEVICE void softmax_bwd(const float* __restrict__ U, const T* __restrict__ W, const int* __restrict__ rows,
                            const float* __restrict__ rnorm, const int* __restrict__ target, const float* __restrict__ lse,
                            const float* __restrict__ gy, int B, int N, int d, float s, float weight, float* __restrict__ dU,
                            float* __restrict__ dW_hat) {
  __shared__ __align__(16) float As[2][kF32K * kP];
  __shared__ __align__(16) float Bs[2][kF32K * kP];
  GIF_DYNAMIC_SMEM(float, Gs);  // [class][row]: the tile's gradient of the cosines
  const int n0 = blockIdx.x * kTile;
  const int btiles = (B + kTile - 1) / kTile;
  for (int bt = blockIdx.y; bt < btiles; bt += gridDim.y) {
    const int m0 = bt * kTile;
    {
      float acc[8][8];
      cos_tile<kVec>(acc, As, Bs, U, W, rows, rnorm, m0, n0, B, N, d);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int row = m0 + f32_tile_row(i);
        const int y = row < B ? target[row] : -1;
        const float l = row < B ? lse[row] : 0.0f, g_y = row < B ? gy[row] : 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int n = n0 + f32_tile_col(j);
          float g = 0.0f;
          if (row < B && n < N) g = n == y ? g_y : weight * s * expf(s * acc[i][j] - l);
          acc[i][j] = g;
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int c = f32_tile_col(j), r = (threadIdx.x / 16) * 4;
        *reinterpret_cast<float4*>(&Gs[c * kP + r]) = make_float4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        *reinterpret_cast<float4*>(&Gs[c * kP + 64 + r]) = make_float4(acc[4][j], acc[5][j], acc[6][j], acc[7][j]);
      }
    }
    for (int c0 = 0; c0 < d; c0 += kTile) {
      float acc[8][8];
      // dU[rows m0.., c0..] += Σ_n G[n][row] r_n W[n][c]
      resident_gemm<true, kVec>(acc, Gs, Bs, W, d, rows, rnorm, c0, n0, d, N);
      store_tile<true>(acc, dU, d, m0, B, c0, d);
      // dŴ[classes n0.., c0..] += Σ_row G[n][row] U[row][c]
      resident_gemm<false, kVec>(acc, Gs, Bs, U, d, nullptr, nullptr, c0, m0, d, B);
      store_tile<true>(acc, dW_hat, d, n0, N, c0, d);
    }
  }
}

template <typename T>
GIF_DEVICE void centre_grad_finish(const T* __restrict__ W, const int* __restrict__ rows, const float* __restrict__ rnorm,
                                   int n, int d, float* __restrict__ dW) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;
  const T* w = W + f32_row(rows, row) * d;
  float* g = dW + (long long)row * d;
  const float r = rnorm[row];
  float dot = 0.0f;
  for (int c = lane; c < d; c += 32) dot += r * to_float(w[c]) * g[c];
  dot = warp_reduce(dot, SumOp{});
  for (int c = lane; c < d; c += 32) g[c] = r * (g[c] - r * to_float(w[c]) * dot);
}

// Inserts (v, n) into the sorted list (s_, i_) of k when it beats the last;
// NaN never enters.
GIF_DEVICE void insert_sorted(float* s_, int* i_, int k, float v, int n) {
  if (!better(v, n, s_[k - 1], i_[k - 1])) return;
  int q = k - 1;
  while (q > 0 && better(v, n, s_[q - 1], i_[q - 1])) {
    s_[q] = s_[q - 1];
    i_[q] = i_[q - 1];
    --q;
  }
  s_[q] = v;
  i_[q] = n;
}

// Top-k: the cosine tile goes to Gs[row][class] (pitch kTopPitch), then
// thread t < 128 owns row t's sorted list (dynamic shared memory after Gs).
constexpr int kTopPitch = kTile + 1;

template <typename T, bool kVec>
GIF_DEVICE void topk_fwd(const float* __restrict__ U, const T* __restrict__ W, const float* __restrict__ rnorm, int B, int N,
                         int d, int k, int splits, float* __restrict__ cand_score, int* __restrict__ cand_idx) {
  __shared__ __align__(16) float As[2][kF32K * kP];
  __shared__ __align__(16) float Bs[2][kF32K * kP];
  GIF_DYNAMIC_SMEM(float, Ts);
  float* ls = Ts + kTile * kTopPitch;            // [128][k] scores
  int* li = reinterpret_cast<int*>(ls + kTile * k);  // [128][k] indices
  const int sp = blockIdx.x, m0 = blockIdx.y * kTile, t = threadIdx.x;
  if (t < kTile)
    for (int q = 0; q < k; ++q) {
      ls[t * k + q] = -gif_inf();
      li[t * k + q] = 0x7fffffff;
    }
  const int ntiles = (N + kTile - 1) / kTile;
  for (int nt = sp; nt < ntiles; nt += splits) {
    const int n0 = nt * kTile;
    float acc[8][8];
    cos_tile<kVec>(acc, As, Bs, U, W, nullptr, rnorm, m0, n0, B, N, d);
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Ts[f32_tile_row(i) * kTopPitch + f32_tile_col(j)] = acc[i][j];
    __syncthreads();
    if (t < kTile && m0 + t < B) {
      float* s_ = ls + t * k;
      int* i_ = li + t * k;
      const int cols = N - n0 < kTile ? N - n0 : kTile;
      for (int c = 0; c < cols; ++c) {
        const float v = Ts[t * kTopPitch + c];
        const int n = n0 + c;
        insert_sorted(s_, i_, k, v, n);
      }
    }
    // the next tile's main loop begins with a barrier before Ts is rewritten
  }
  if (t < kTile && m0 + t < B)
    for (int q = 0; q < k; ++q) {
      const long long o = ((long long)(m0 + t) * splits + sp) * k + q;
      cand_score[o] = ls[t * k + q];
      cand_idx[o] = li[t * k + q];
    }
}

GIF_DEVICE void topk_merge_rows(const float* __restrict__ cand_score, const int* __restrict__ cand_idx, int B, int splits, int k,
                           float* __restrict__ out_score, int* __restrict__ out_idx) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= B) return;
  float* s_ = out_score + (long long)row * k;
  int* i_ = out_idx + (long long)row * k;
  for (int q = 0; q < k; ++q) {
    s_[q] = -gif_inf();
    i_[q] = 0x7fffffff;
  }
  for (long long c = 0; c < (long long)splits * k; ++c) {
    const float v = cand_score[(long long)row * splits * k + c];
    const int n = cand_idx[(long long)row * splits * k + c];
    insert_sorted(s_, i_, k, v, n);
  }
}

// ---------------------------------------------------------------------------
// Partial FC sampling. key(n) = keyed_hash32 (common.cuh): a bijection of
// the 32-bit class index keyed by the seed: distinct keys, so "the k'
// largest keys among the negatives" is one exact set.
GIF_DEVICE unsigned int pfc_key(unsigned int n, unsigned int seed_a, unsigned int seed_b) {
  return keyed_hash32(n, seed_a, seed_b);
}

// positive[labels[b]] = 1 (positive starts zeroed), and count[0] += 1
// per distinct positive (count starts zeroed).
GIF_DEVICE void mark_positives(const int* __restrict__ labels, int B, int* __restrict__ positive, int* count) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < B && atomicExch(&positive[labels[b]], 1) == 0) atomicAdd(count, 1);
}

// targets[b] = the position of labels[b] in the sorted index (k classes,
// every label among them): a binary search per sample.
GIF_DEVICE void remap_targets(const int* __restrict__ labels, int B, const int* __restrict__ index, int k,
                              int* __restrict__ targets) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int y = labels[b];
  int lo = 0, hi = k;  // the first position whose class is >= y
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (index[mid] < y) lo = mid + 1;
    else hi = mid;
  }
  targets[b] = lo;
}

// Histogram of 16 key bits of the negatives: pass 1 (match_hi < 0) bins the
// high half; pass 2 bins the low half of keys whose high half is match_hi.
GIF_DEVICE void key_hist(const int* __restrict__ positive, int N, unsigned int seed_a, unsigned int seed_b,
                         const int* __restrict__ match_hi, unsigned int* __restrict__ hist) {
  const int hi = match_hi ? match_hi[0] : -1;
  for (long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x; n < N; n += (long long)gridDim.x * blockDim.x) {
    if (positive[n]) continue;
    const unsigned int key = pfc_key((unsigned int)n, seed_a, seed_b);
    if (hi < 0) {
      atomicAdd(&hist[key >> 16], 1u);
    } else if ((int)(key >> 16) == hi) {
      atomicAdd(&hist[key & 0xffffu], 1u);
    }
  }
}

// One block of 256 threads: with need = total − taken[0] keys to take, the
// bin b of a 65536-bin histogram where the count from the top first reaches
// need: out[0] = b, out[1] = −(need − the count of the bins above b), minus
// what is still to take inside b (the next pass's `taken`, with total 0).
// need <= 0 (no negative to take): out = {65536, 0}, a bin no key reaches.
GIF_DEVICE void find_bin(const unsigned int* __restrict__ hist, int total, const int* __restrict__ taken,
                         int* __restrict__ out) {
  __shared__ unsigned int warp_tot[8];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  // Thread t takes bins [65536 − 256 (t + 1), 65536 − 256 t), from the top.
  const int hi_bin = 65535 - 256 * t;
  unsigned int c = 0;
  for (int q = 0; q < 256; ++q) c += hist[hi_bin - q];
  // Exclusive prefix over t: the count of the bins above this thread's.
  unsigned int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  unsigned int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_tot[w];
  unsigned int above = before + incl - c;
  const int need = total - taken[0];
  if (need <= 0) {
    if (t == 0) {
      out[0] = 65536;
      out[1] = 0;
    }
    return;
  }
  const unsigned int want = (unsigned int)need;
  if (above < want && want <= above + c) {
    for (int q = 0; q < 256; ++q) {
      const unsigned int h = hist[hi_bin - q];
      if (above + h >= want) {
        out[0] = hi_bin - q;
        out[1] = -(int)(want - above);
        return;
      }
      above += h;
    }
  }
}

// keep(n): a positive, or a negative whose key is among the k' largest:
// key >> 16 > hi, or key >> 16 == hi and key & 0xffff >= lo (sel = {hi, ., lo, .};
// null when no negative is taken).
GIF_DEVICE bool pfc_keep(const int* positive, long long n, unsigned int seed_a, unsigned int seed_b, const int* sel) {
  if (positive[n]) return true;
  if (!sel) return false;
  const unsigned int key = pfc_key((unsigned int)n, seed_a, seed_b);
  const int hi = (int)(key >> 16), lo = (int)(key & 0xffffu);
  return hi > sel[0] || (hi == sel[0] && lo >= sel[2]);
}

constexpr int kScanItems = 4;                         // per thread
constexpr int kScanBlock = kF32Threads * kScanItems;  // classes per block

// Block-wide exclusive scan of one value per thread (256 threads); *total gets the sum.
GIF_DEVICE int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_tot[8];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  __syncthreads();
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < 8; ++w) {
    before += w < warp ? warp_tot[w] : 0;
    all += warp_tot[w];
  }
  *total = all;
  return before + incl - v;
}

// Pass 1 of the compaction: kept classes per block of kScanBlock.
GIF_DEVICE void count_kept(const int* __restrict__ positive, int N, unsigned int seed_a, unsigned int seed_b,
                          const int* __restrict__ sel, int* __restrict__ block_count) {
  const long long base = (long long)blockIdx.x * kScanBlock + threadIdx.x * kScanItems;
  int c = 0;
  for (int q = 0; q < kScanItems; ++q) c += base + q < N && pfc_keep(positive, base + q, seed_a, seed_b, sel);
  int total;
  block_exclusive_scan(c, &total);
  if (threadIdx.x == 0) block_count[blockIdx.x] = total;
}

// Pass 2: exclusive scan of the block counts in place (one block of 256).
GIF_DEVICE void scan_counts(int* __restrict__ block_count, int nblocks) {
  int carry = 0;
  for (int b0 = 0; b0 < nblocks; b0 += kF32Threads) {
    const int b = b0 + threadIdx.x;
    const int v = b < nblocks ? block_count[b] : 0;
    int total;
    const int ex = block_exclusive_scan(v, &total);
    if (b < nblocks) block_count[b] = carry + ex;
    carry += total;
  }
}

// Pass 3: each kept class writes itself at its rank: the sorted index.
GIF_DEVICE void write_kept(const int* __restrict__ positive, int N, unsigned int seed_a, unsigned int seed_b,
                          const int* __restrict__ sel, const int* __restrict__ block_offset, int* __restrict__ index) {
  const long long base = (long long)blockIdx.x * kScanBlock + threadIdx.x * kScanItems;
  bool keep[kScanItems];
  int c = 0;
  for (int q = 0; q < kScanItems; ++q) {
    keep[q] = base + q < N && pfc_keep(positive, base + q, seed_a, seed_b, sel);
    c += keep[q];
  }
  int total;
  int at = block_offset[blockIdx.x] + block_exclusive_scan(c, &total);
  for (int q = 0; q < kScanItems; ++q)
    if (keep[q]) index[at++] = (int)(base + q);
}

// The tensor-core path (SoftmaxHeadConfig::tensor_cores): the classes in
// chunks of C, each chunk's cosines a bf16 tensor-core GEMM (gemm.cu)
// into logits [B, C] f32 (U·W_cᵀ, not yet scaled by r), reduced here.
//
// tc_chunk_stats: one warp per row b, over the chunk's columns j (class
// n = c0 + j, c = logits[b, j]·r[n]): the running (max of s·c over the
// other classes, Σ exp at that max, best c, best index) in stats[b][4]
// (the forward's partial with one split; `first` starts it), and the
// target's c into tgt_cos[b] when it lies in the chunk. A NaN cosine
// makes the row's max NaN for good (the merge then reports it).
GIF_DEVICE void tc_chunk_stats(const float* __restrict__ logits, int cols, int c0, const float* __restrict__ rnorm,
                               const int* __restrict__ target, int B, float s, int first, float* __restrict__ stats,
                               float* __restrict__ tgt_cos) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= B) return;
  const int y = target[row];
  const float* lg = logits + (long long)row * cols;
  Lse l{-gif_inf(), 0.0f};
  float bc = -gif_inf();
  int bi = 0x7fffffff;
  bool nan = false;
  for (int j = lane; j < cols; j += 32) {
    const int n = c0 + j;
    const float c = lg[j] * rnorm[n];
    nan |= c != c;
    if (better(c, n, bc, bi)) {
      bc = c;
      bi = n;
    }
    if (n == y) {
      tgt_cos[row] = c;
    } else {
      l = lse_merge(l, Lse{s * c, 1.0f});
    }
  }
  warp_merge(l, bc, bi);
  nan = __any_sync(0xffffffffu, nan);
  if (lane != 0) return;
  float* st = stats + (long long)row * 4;
  if (!first) {
    nan |= st[0] != st[0];
    l = lse_merge(Lse{st[0], st[1]}, l);
    if (better(st[2], bits_idx(st[3]), bc, bi)) {
      bc = st[2];
      bi = bits_idx(st[3]);
    }
  }
  st[0] = nan ? gif_bits_float(0x7fc00000u) : l.m;
  st[1] = l.s;
  st[2] = bc;
  st[3] = idx_bits(bi);
}

// tc_chunk_grad: one warp per row b, over the chunk's columns: the
// gradient of the loss with respect to the chunk's cosines, g = weight·s·
// exp(s·c − lse) (gy on the target), as bf16 operands of the two backward
// GEMMs: G [B, C] (for dŴ = Gᵀ·U) and G·diag(r) (for dU = (G·diag(r))·W).
GIF_DEVICE void tc_chunk_grad(const float* __restrict__ logits, int cols, int c0, const float* __restrict__ rnorm,
                              const int* __restrict__ target, const float* __restrict__ lse,
                              const float* __restrict__ gy, int B, float s, float weight, bf16* __restrict__ g,
                              bf16* __restrict__ gr) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= B) return;
  const int y = target[row];
  const float z = lse[row], gt = gy[row];
  const long long off = (long long)row * cols;
  for (int j = lane; j < cols; j += 32) {
    const int n = c0 + j;
    const float r = rnorm[n];
    const float v = n == y ? gt : weight * s * expf(s * logits[off + j] * r - z);
    g[off + j] = from_float<bf16>(v);
    gr[off + j] = from_float<bf16>(v * r);
  }
}

}  // namespace

// clang-format off
extern "C" __global__ void __launch_bounds__(256) inv_norms_f32(const float* W, const int* rows, int n, int d, float eps, float* r) { inv_norms<float>(W, rows, n, d, eps, r); }
extern "C" __global__ void __launch_bounds__(256) inv_norms_bf16(const bf16* W, const int* rows, int n, int d, float eps, float* r) { inv_norms<bf16>(W, rows, n, d, eps, r); }
extern "C" __global__ void __launch_bounds__(256, 2) softmax_fwd_f32(const float* U, const float* W, const int* rows, const float* rnorm, const int* target, int B, int N, int d, float s, int splits, float* partial, float* tgt_cos) { softmax_fwd<float, false>(U, W, rows, rnorm, target, B, N, d, s, splits, partial, tgt_cos); }
extern "C" __global__ void __launch_bounds__(256, 2) softmax_fwd_f32_v(const float* U, const float* W, const int* rows, const float* rnorm, const int* target, int B, int N, int d, float s, int splits, float* partial, float* tgt_cos) { softmax_fwd<float, true>(U, W, rows, rnorm, target, B, N, d, s, splits, partial, tgt_cos); }
extern "C" __global__ void __launch_bounds__(256, 2) softmax_fwd_bf16(const float* U, const bf16* W, const int* rows, const float* rnorm, const int* target, int B, int N, int d, float s, int splits, float* partial, float* tgt_cos) { softmax_fwd<bf16, false>(U, W, rows, rnorm, target, B, N, d, s, splits, partial, tgt_cos); }
extern "C" __global__ void __launch_bounds__(256, 2) softmax_fwd_bf16_v(const float* U, const bf16* W, const int* rows, const float* rnorm, const int* target, int B, int N, int d, float s, int splits, float* partial, float* tgt_cos) { softmax_fwd<bf16, true>(U, W, rows, rnorm, target, B, N, d, s, splits, partial, tgt_cos); }
extern "C" __global__ void __launch_bounds__(256) softmax_merge(const float* partial, int splits, const float* tgt_cos, const float* tgt_sin, const int* target, int B, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight, float* lse, float* gy, float* loss, float* correct, float* gsing) { merge_rows(partial, splits, tgt_cos, tgt_sin, target, B, s, margin, m, cos_m, sin_m, exact_grad, weight, lse, gy, loss, correct, gsing); }
extern "C" __global__ void __launch_bounds__(256) softmax_shard_stats(const float* partial, int splits, int B, const float* tgt_cos, const float* tgt_sin, float* stats) { shard_stats(partial, splits, B, tgt_cos, tgt_sin, stats); }
extern "C" __global__ void __launch_bounds__(256) softmax_target_angle_f32(const float* X, const float* W, const int* rows, const int* target, int B, int d, float* tgt_cos, float* tgt_sin) { target_angle<float>(X, W, rows, target, B, d, tgt_cos, tgt_sin); }
extern "C" __global__ void __launch_bounds__(256) softmax_target_angle_bf16(const float* X, const bf16* W, const int* rows, const int* target, int B, int d, float* tgt_cos, float* tgt_sin) { target_angle<bf16>(X, W, rows, target, B, d, tgt_cos, tgt_sin); }
extern "C" __global__ void __launch_bounds__(32) softmax_target_singular_f32(const float* X, const float* W, const int* rows, const int* target, const int* order, const int* starts, int d, const float* gsing, float* dU, float* dW_hat) { target_singular<float>(X, W, rows, target, order, starts, d, gsing, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(32) softmax_target_singular_bf16(const float* X, const bf16* W, const int* rows, const int* target, const int* order, const int* starts, int d, const float* gsing, float* dU, float* dW_hat) { target_singular<bf16>(X, W, rows, target, order, starts, d, gsing, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(256, 1) softmax_bwd_f32(const float* U, const float* W, const int* rows, const float* rnorm, const int* target, const float* lse, const float* gy, int B, int N, int d, float s, float weight, float* dU, float* dW_hat) { softmax_bwd<float, false>(U, W, rows, rnorm, target, lse, gy, B, N, d, s, weight, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(256, 1) softmax_bwd_f32_v(const float* U, const float* W, const int* rows, const float* rnorm, const int* target, const float* lse, const float* gy, int B, int N, int d, float s, float weight, float* dU, float* dW_hat) { softmax_bwd<float, true>(U, W, rows, rnorm, target, lse, gy, B, N, d, s, weight, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(256, 1) softmax_bwd_bf16(const float* U, const bf16* W, const int* rows, const float* rnorm, const int* target, const float* lse, const float* gy, int B, int N, int d, float s, float weight, float* dU, float* dW_hat) { softmax_bwd<bf16, false>(U, W, rows, rnorm, target, lse, gy, B, N, d, s, weight, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(256, 1) softmax_bwd_bf16_v(const float* U, const bf16* W, const int* rows, const float* rnorm, const int* target, const float* lse, const float* gy, int B, int N, int d, float s, float weight, float* dU, float* dW_hat) { softmax_bwd<bf16, true>(U, W, rows, rnorm, target, lse, gy, B, N, d, s, weight, dU, dW_hat); }
extern "C" __global__ void __launch_bounds__(256) centre_grad_finish_f32(const float* W, const int* rows, const float* rnorm, int n, int d, float* dW) { centre_grad_finish<float>(W, rows, rnorm, n, d, dW); }
extern "C" __global__ void __launch_bounds__(256) centre_grad_finish_bf16(const bf16* W, const int* rows, const float* rnorm, int n, int d, float* dW) { centre_grad_finish<bf16>(W, rows, rnorm, n, d, dW); }
extern "C" __global__ void __launch_bounds__(256, 1) topk_fwd_f32(const float* U, const float* W, const float* rnorm, int B, int N, int d, int k, int splits, float* cand_score, int* cand_idx) { topk_fwd<float, false>(U, W, rnorm, B, N, d, k, splits, cand_score, cand_idx); }
extern "C" __global__ void __launch_bounds__(256, 1) topk_fwd_f32_v(const float* U, const float* W, const float* rnorm, int B, int N, int d, int k, int splits, float* cand_score, int* cand_idx) { topk_fwd<float, true>(U, W, rnorm, B, N, d, k, splits, cand_score, cand_idx); }
extern "C" __global__ void __launch_bounds__(256, 1) topk_fwd_bf16(const float* U, const bf16* W, const float* rnorm, int B, int N, int d, int k, int splits, float* cand_score, int* cand_idx) { topk_fwd<bf16, false>(U, W, rnorm, B, N, d, k, splits, cand_score, cand_idx); }
extern "C" __global__ void __launch_bounds__(256, 1) topk_fwd_bf16_v(const float* U, const bf16* W, const float* rnorm, int B, int N, int d, int k, int splits, float* cand_score, int* cand_idx) { topk_fwd<bf16, true>(U, W, rnorm, B, N, d, k, splits, cand_score, cand_idx); }
extern "C" __global__ void __launch_bounds__(256) topk_merge(const float* cand_score, const int* cand_idx, int B, int splits, int k, float* out_score, int* out_idx) { topk_merge_rows(cand_score, cand_idx, B, splits, k, out_score, out_idx); }
extern "C" __global__ void __launch_bounds__(256) tc_chunk_stats_k(const float* logits, int cols, int c0, const float* rnorm, const int* target, int B, float s, int first, float* stats, float* tgt_cos) { tc_chunk_stats(logits, cols, c0, rnorm, target, B, s, first, stats, tgt_cos); }
extern "C" __global__ void __launch_bounds__(256) tc_chunk_grad_k(const float* logits, int cols, int c0, const float* rnorm, const int* target, const float* lse, const float* gy, int B, float s, float weight, bf16* g, bf16* gr) { tc_chunk_grad(logits, cols, c0, rnorm, target, lse, gy, B, s, weight, g, gr); }
extern "C" __global__ void __launch_bounds__(256) pfc_mark(const int* labels, int B, int* positive, int* count) { mark_positives(labels, B, positive, count); }
extern "C" __global__ void __launch_bounds__(256) pfc_remap(const int* labels, int B, const int* index, int k, int* targets) { remap_targets(labels, B, index, k, targets); }
extern "C" __global__ void __launch_bounds__(256) pfc_hist(const int* positive, int N, unsigned int seed_a, unsigned int seed_b, const int* match_hi, unsigned int* hist) { key_hist(positive, N, seed_a, seed_b, match_hi, hist); }
extern "C" __global__ void __launch_bounds__(256) pfc_find(const unsigned int* hist, int total, const int* taken, int* out) { find_bin(hist, total, taken, out); }
extern "C" __global__ void __launch_bounds__(256) pfc_count(const int* positive, int N, unsigned int seed_a, unsigned int seed_b, const int* sel, int* block_count) { count_kept(positive, N, seed_a, seed_b, sel, block_count); }
extern "C" __global__ void __launch_bounds__(256) pfc_scan_blocks(int* block_count, int nblocks) { scan_counts(block_count, nblocks); }
extern "C" __global__ void __launch_bounds__(256) pfc_write(const int* positive, int N, unsigned int seed_a, unsigned int seed_b, const int* sel, const int* block_offset, int* index) { write_kept(positive, N, seed_a, seed_b, sel, block_offset, index); }
// clang-format on

