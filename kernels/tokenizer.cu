// tokenizer.cu: the identity tokenizer's GPU steps (src/tokenizer/).
// GEMMs (Gram matrices, gradients, point-centroid scores) go through
// kernels/gemm.cu and row gathers through kernels/rows.cu; these kernels
// are what lies between them.
//
//   uniformity_weights_f32
//                     w[i, j] = exp(-t·(2 - 2·g[i, j])) for i != j, 0 on the
//                     diagonal (= exp(-t‖h_i − h_j‖²) for unit rows h), and
//                     rowsum[i] = Σ_j w[i, j]. g is the Gram matrix H·Hᵀ of
//                     the B sampled unit rows. In place: w may alias g.
//   sphere_step_f32   h_i ← normalize(h_i − scale / S · grad_i), with
//                     S = *sum (Σ_ij w_ij, from row_sum) and scale = 4·t·lr:
//                     one SGD step on L = log mean_{i≠j} exp(-t‖h_i − h_j‖²),
//                     whose gradient is ∂L/∂h_i = (4t / S) Σ_j w_ij h_j, then
//                     back onto the sphere.
//   argmax_rows_f32   best[i] = argmax_j s[i, j] (lowest j on ties),
//                     best_score[i] = s[i, best[i]]   (k-means assignment)
//
// Grid mapping: every kernel is row-parallel with one warp per row, 8 rows
// per 256-thread block (grid = ceil(rows / 8)), lanes striding the row, so
// loads are coalesced. Costs are one read and one write of each row
// (memory-bound); the exp in uniformity_weights is B² per step.
// Limits: rows, d, k fit in int; offsets are 64-bit.
#include "common.cuh"

namespace {
constexpr int kBlock = 256;
constexpr int kRowsPerBlock = kBlock / 32;

GIF_DEVICE int warp_row() { return blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5); }
}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock)
    uniformity_weights_f32(const float* g, float* w, float* __restrict__ rowsum, int b, float t) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= b) return;
  const long long off = (long long)row * b;
  float s = 0.0f;
  for (int j = lane; j < b; j += 32) {
    const float v = j == row ? 0.0f : expf(-t * (2.0f - 2.0f * g[off + j]));
    w[off + j] = v;
    s += v;
  }
  s = warp_reduce(s, SumOp{});
  if (lane == 0) rowsum[row] = s;
}

extern "C" __global__ void __launch_bounds__(kBlock) sphere_step_f32(float* __restrict__ h, const float* __restrict__ grad,
                                                                     const float* __restrict__ sum, int b, int d,
                                                                     float scale) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= b) return;
  const float step = scale / *sum;
  float* hr = h + (long long)row * d;
  const float* gr = grad + (long long)row * d;
  float ss = 0.0f;
  for (int c = lane; c < d; c += 32) {
    const float v = hr[c] - step * gr[c];
    hr[c] = v;
    ss += v * v;
  }
  ss = warp_reduce(ss, SumOp{});
  // A row that lands on zero (it cannot in exact arithmetic for step < 1/‖g‖) keeps its direction scale 1.
  const float inv = ss > 0.0f ? 1.0f / sqrtf(ss) : 1.0f;
  for (int c = lane; c < d; c += 32) hr[c] *= inv;
}

extern "C" __global__ void __launch_bounds__(kBlock)
    argmax_rows_f32(const float* __restrict__ s, int n, int k, int* __restrict__ best, float* __restrict__ best_score) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= n) return;
  const float* sr = s + (long long)row * k;
  float bv = -gif_inf();
  int bi = 0x7fffffff;
  for (int j = lane; j < k; j += 32) {
    const float v = sr[j];
    if (v > bv || (v == bv && j < bi)) {
      bv = v;
      bi = j;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    best[row] = bi == 0x7fffffff ? 0 : bi;
    best_score[row] = bv;
  }
}
