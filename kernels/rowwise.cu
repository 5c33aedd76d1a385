// rowwise.cu: row operations on a row-major [rows, cols] matrix, the ones the
// heads need. src/rowwise.rs holds the CPU references and the launches.
//
//   l2norm_fwd   y = x / max(||x||, eps),  norm = ||x||           (per row;
//                bf16f32: bf16 rows, f32 y)
//   l2norm_bwd   dx = (dy - y (y·dy)) / n  if n > eps, else dy / eps
//   softmax      y = exp(x - m) / s,  m = max x, s = sum exp(x - m)
//   log_softmax  y = x - m - log s
//   row_sum      out = sum_c x[r, c]   (f32 output)
//
// Grid mapping. Every kernel is a template on the element type T (float or
// bf16; arithmetic in float) and on kRowThreads, the threads that share a
// row:
//   kRowThreads = 32:  one warp per row, 8 rows per 256-thread block,
//                      grid = ceil(rows / 8); for cols <= 1024.
//   kRowThreads = 256: one 256-thread block per row, grid = rows; for longer
//                      rows. Reductions go through 32 or 64 floats of
//                      shared memory (common.cuh block_reduce*).
// Lane / thread i reads elements i, i + kRowThreads, ... so every warp load
// is coalesced. Instances are named op_dtype_w (warp) / op_dtype_b (block).
//
// Cost per call, n = rows·cols elements of size S bytes:
//   l2norm_fwd   reads 2nS (two passes; the second usually hits L2), writes
//                nS + 4 rows; ~3n FLOP.
//   l2norm_bwd   reads 4nS, writes nS; ~4n FLOP.
//   softmax, log_softmax: reads 2nS, writes nS; n exp in pass 1 and n in
//                pass 2 (softmax) or none (log_softmax).
//   row_sum      reads nS, writes 4 rows bytes.
// Memory-bound everywhere; the floor is bytes / DRAM bandwidth.
//
// Limits: rows and cols fit in int (checked by the launcher); element
// offsets use 64-bit arithmetic. NaN in a row propagates to that row's
// outputs; a row of all -inf gives NaN in softmax, as in PyTorch.
#include "common.cuh"

namespace {

constexpr int kBlock = 256;

// Per-row reduction over the kRowThreads threads that own a row.
template <int kRowThreads, typename Op>
GIF_DEVICE float row_reduce(float v, float* scratch, Op op) {
  if constexpr (kRowThreads == 32) {
    return warp_reduce(v, op);
  } else {
    return block_reduce(v, scratch, op);
  }
}
template <int kRowThreads>
GIF_DEVICE MaxSum row_reduce_max_sum(MaxSum v, float* scratch) {
  if constexpr (kRowThreads == 32) {
    return warp_reduce_max_sum(v);
  } else {
    return block_reduce_max_sum(v, scratch);
  }
}

// Which row this thread works on, and its index among the row's threads.
// Returns false for warps past the last row (a whole warp leaves together).
template <int kRowThreads>
GIF_DEVICE bool row_of(int rows, int& row, int& t) {
  if constexpr (kRowThreads == 32) {
    row = blockIdx.x * (kBlock / 32) + (threadIdx.x >> 5);
    t = threadIdx.x & 31;
  } else {
    row = blockIdx.x;
    t = threadIdx.x;
  }
  return row < rows;
}

// U: y's type, T by default; bf16 rows into f32 (l2norm_fwd_bf16f32_*)
// serve the code head's centres.
template <typename T, int kRowThreads, typename U = T>
GIF_DEVICE void l2norm_fwd(const T* __restrict__ x, U* __restrict__ y, float* __restrict__ norms, int rows, int cols,
                           float eps) {
  __shared__ float scratch[32];
  int row, t;
  if (!row_of<kRowThreads>(rows, row, t)) return;
  const T* xr = x + (long long)row * cols;
  U* yr = y + (long long)row * cols;
  float ss = 0.0f;
  for (int c = t; c < cols; c += kRowThreads) {
    float v = to_float(xr[c]);
    ss += v * v;
  }
  ss = row_reduce<kRowThreads>(ss, scratch, SumOp{});
  const float norm = sqrtf(ss);
  const float inv = 1.0f / fmaxf(norm, eps);
  for (int c = t; c < cols; c += kRowThreads) yr[c] = from_float<U>(to_float(xr[c]) * inv);
  if (t == 0) norms[row] = norm;
}

template <typename T, int kRowThreads>
GIF_DEVICE void l2norm_bwd(const T* __restrict__ y, const float* __restrict__ norms, const T* __restrict__ dy,
                           T* __restrict__ dx, int rows, int cols, float eps) {
  __shared__ float scratch[32];
  int row, t;
  if (!row_of<kRowThreads>(rows, row, t)) return;
  const long long off = (long long)row * cols;
  float dot = 0.0f;
  for (int c = t; c < cols; c += kRowThreads) dot += to_float(y[off + c]) * to_float(dy[off + c]);
  dot = row_reduce<kRowThreads>(dot, scratch, SumOp{});
  const float n = norms[row];
  if (n > eps) {
    const float inv = 1.0f / n;
    for (int c = t; c < cols; c += kRowThreads)
      dx[off + c] = from_float<T>((to_float(dy[off + c]) - to_float(y[off + c]) * dot) * inv);
  } else {
    const float inv = 1.0f / eps;
    for (int c = t; c < cols; c += kRowThreads) dx[off + c] = from_float<T>(to_float(dy[off + c]) * inv);
  }
}

template <typename T, int kRowThreads, bool kLog>
GIF_DEVICE void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
  __shared__ float scratch[64];
  int row, t;
  if (!row_of<kRowThreads>(rows, row, t)) return;
  const T* xr = x + (long long)row * cols;
  T* yr = y + (long long)row * cols;
  MaxSum ms{-gif_inf(), 0.0f};
  for (int c = t; c < cols; c += kRowThreads) ms = max_sum_merge(ms, MaxSum{to_float(xr[c]), 1.0f});
  ms = row_reduce_max_sum<kRowThreads>(ms, scratch);
  if constexpr (kLog) {
    const float shift = ms.m + logf(ms.s);
    for (int c = t; c < cols; c += kRowThreads) yr[c] = from_float<T>(to_float(xr[c]) - shift);
  } else {
    const float inv = 1.0f / ms.s;
    for (int c = t; c < cols; c += kRowThreads) yr[c] = from_float<T>(expf(to_float(xr[c]) - ms.m) * inv);
  }
}

template <typename T, int kRowThreads>
GIF_DEVICE void row_sum(const T* __restrict__ x, float* __restrict__ out, int rows, int cols) {
  __shared__ float scratch[32];
  int row, t;
  if (!row_of<kRowThreads>(rows, row, t)) return;
  const T* xr = x + (long long)row * cols;
  float s = 0.0f;
  for (int c = t; c < cols; c += kRowThreads) s += to_float(xr[c]);
  s = row_reduce<kRowThreads>(s, scratch, SumOp{});
  if (t == 0) out[row] = s;
}

}  // namespace

// Explicit instances: op_dtype_w (a warp per row) and op_dtype_b (a block per row).
// clang-format off
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_f32_w(const float* x, float* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<float, 32>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_bwd_f32_w(const float* y, const float* norms, const float* dy, float* dx, int rows, int cols, float eps) { l2norm_bwd<float, 32>(y, norms, dy, dx, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) softmax_f32_w(const float* x, float* y, int rows, int cols) { softmax_fwd<float, 32, false>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) log_softmax_f32_w(const float* x, float* y, int rows, int cols) { softmax_fwd<float, 32, true>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) row_sum_f32_w(const float* x, float* out, int rows, int cols) { row_sum<float, 32>(x, out, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_f32_b(const float* x, float* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<float, 256>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_bwd_f32_b(const float* y, const float* norms, const float* dy, float* dx, int rows, int cols, float eps) { l2norm_bwd<float, 256>(y, norms, dy, dx, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) softmax_f32_b(const float* x, float* y, int rows, int cols) { softmax_fwd<float, 256, false>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) log_softmax_f32_b(const float* x, float* y, int rows, int cols) { softmax_fwd<float, 256, true>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) row_sum_f32_b(const float* x, float* out, int rows, int cols) { row_sum<float, 256>(x, out, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_bf16_w(const bf16* x, bf16* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<bf16, 32>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_bwd_bf16_w(const bf16* y, const float* norms, const bf16* dy, bf16* dx, int rows, int cols, float eps) { l2norm_bwd<bf16, 32>(y, norms, dy, dx, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) softmax_bf16_w(const bf16* x, bf16* y, int rows, int cols) { softmax_fwd<bf16, 32, false>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) log_softmax_bf16_w(const bf16* x, bf16* y, int rows, int cols) { softmax_fwd<bf16, 32, true>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) row_sum_bf16_w(const bf16* x, float* out, int rows, int cols) { row_sum<bf16, 32>(x, out, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_bf16_b(const bf16* x, bf16* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<bf16, 256>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_bf16f32_w(const bf16* x, float* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<bf16, 32, float>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_fwd_bf16f32_b(const bf16* x, float* y, float* norms, int rows, int cols, float eps) { l2norm_fwd<bf16, 256, float>(x, y, norms, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) l2norm_bwd_bf16_b(const bf16* y, const float* norms, const bf16* dy, bf16* dx, int rows, int cols, float eps) { l2norm_bwd<bf16, 256>(y, norms, dy, dx, rows, cols, eps); }
extern "C" __global__ void __launch_bounds__(kBlock) softmax_bf16_b(const bf16* x, bf16* y, int rows, int cols) { softmax_fwd<bf16, 256, false>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) log_softmax_bf16_b(const bf16* x, bf16* y, int rows, int cols) { softmax_fwd<bf16, 256, true>(x, y, rows, cols); }
extern "C" __global__ void __launch_bounds__(kBlock) row_sum_bf16_b(const bf16* x, float* out, int rows, int cols) { row_sum<bf16, 256>(x, out, rows, cols); }
// widen_<T>: y = float(x), n elements (grid-stride; f32: a copy); Tensor::to_f32.
extern "C" __global__ void __launch_bounds__(256) widen_bf16(const bf16* x, float* y, long long n) { for (long long i = blockIdx.x * 256ll + threadIdx.x; i < n; i += 256ll * gridDim.x) y[i] = to_float(x[i]); }
extern "C" __global__ void __launch_bounds__(256) widen_f32(const float* x, float* y, long long n) { for (long long i = blockIdx.x * 256ll + threadIdx.x; i < n; i += 256ll * gridDim.x) y[i] = x[i]; }
extern "C" __global__ void __launch_bounds__(256) widen_f16(const f16* x, float* y, long long n) { for (long long i = blockIdx.x * 256ll + threadIdx.x; i < n; i += 256ll * gridDim.x) y[i] = to_float(x[i]); }
// narrow_bf16: y = bf16(x), round to nearest even (NaN stays NaN); Tensor::narrow_into.
extern "C" __global__ void __launch_bounds__(256) narrow_bf16(const float* x, bf16* y, long long n) { for (long long i = blockIdx.x * 256ll + threadIdx.x; i < n; i += 256ll * gridDim.x) y[i] = from_float<bf16>(x[i]); }
// clang-format on
