// rows.cu: row gathers, scatters and updates of row-major [rows, d]
// matrices (src/ops/rows.rs), shared by the tokenizer, the heads and the
// optimizers.
//
//   gather_rows_<T>   dst[i, :] = src[idx[i], :]   (n rows of d; T = f32, bf16)
//   scatter_rows_f32  dst[idx[i], :] = src[i, :]
//   rows_axpy_<T>     W[rows[i], :] += a·G[i, :] (rows null: i), T = f32 or
//                     bf16 (rounded to nearest even); G f32
//
// Grid mapping: one warp per row, 8 rows per 256-thread block (grid =
// ceil(n / 8)), lanes striding the row (coalesced). Cost: one read and one
// write of each row (memory-bound). Limits: n and d fit in int; offsets
// are 64-bit; indices must be valid rows (checked by the launcher).
#include "common.cuh"

namespace {
constexpr int kBlock = 256;
constexpr int kRowsPerBlock = kBlock / 32;

GIF_DEVICE int warp_row() { return blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5); }
GIF_DEVICE long long row_of(const int* __restrict__ rows, int r) { return rows ? (long long)rows[r] : (long long)r; }

// W[rows[i]] += a·G[i] (row i of G, d values): Partial FC's sparse SGD step;
// bf16 weights are rounded to nearest even. One warp per row.
template <typename T>
GIF_DEVICE void rows_axpy(T* __restrict__ W, const int* __restrict__ rows, const float* __restrict__ G, int n, int d, float a) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= n) return;
  T* w = W + row_of(rows, row) * d;
  const float* g = G + (long long)row * d;
  for (int c = lane; c < d; c += 32) w[c] = from_float<T>(to_float(w[c]) + a * g[c]);
}

template <typename T>
GIF_DEVICE void gather_rows(const T* __restrict__ src, const int* __restrict__ idx, T* __restrict__ dst, int n, int d) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= n) return;
  const T* s = src + (long long)idx[row] * d;
  T* o = dst + (long long)row * d;
  for (int c = lane; c < d; c += 32) o[c] = s[c];
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock)
    scatter_rows_f32(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst, int n, int d) {
  const int row = warp_row(), lane = threadIdx.x & 31;
  if (row >= n) return;
  const float* s = src + (long long)row * d;
  float* o = dst + (long long)idx[row] * d;
  for (int c = lane; c < d; c += 32) o[c] = s[c];
}

// clang-format off
extern "C" __global__ void __launch_bounds__(kBlock) gather_rows_f32(const float* src, const int* idx, float* dst, int n, int d) { gather_rows<float>(src, idx, dst, n, d); }
extern "C" __global__ void __launch_bounds__(kBlock) gather_rows_bf16(const bf16* src, const int* idx, bf16* dst, int n, int d) { gather_rows<bf16>(src, idx, dst, n, d); }
extern "C" __global__ void __launch_bounds__(kBlock) rows_axpy_f32(float* W, const int* rows, const float* G, int n, int d, float a) { rows_axpy<float>(W, rows, G, n, d, a); }
extern "C" __global__ void __launch_bounds__(kBlock) rows_axpy_bf16(bf16* W, const int* rows, const float* G, int n, int d, float a) { rows_axpy<bf16>(W, rows, G, n, d, a); }
// clang-format on
