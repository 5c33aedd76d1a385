// norm.cu: the IResNet backbone's per-channel layers on NHWC activations
// (src/backbone/norm.rs): BatchNorm (2d and 1d alike: a [rows, C] matrix,
// rows = B·H·W), PReLU, the residual add. f32.
//
// chan_sums_<mode>     grid (⌈C/32⌉, splits) x (32, 8): lane = channel of a
//                      32-channel group (coalesced rows), 8 row lanes; each
//                      block sums two per-channel quantities over its rows
//                      (rows y·8 + ty, strided by splits·8) and writes
//                      partial[split][c][2]; reduction across the 8 row lanes
//                      in shared memory. Modes:
//                        0: (x, 0)                       the mean
//                        1: ((x − m)², 0)                 the variance (two-pass)
//                        2: (dy, dy·(x − m))              BatchNorm backward
//                        3: (dy·x·[x ≤ 0], 0)             PReLU's slope gradient
// chan_finalize        one thread per channel: sums the splits in order
//                      (deterministic): out_a[c] = scale_a·Σa, out_b[c] =
//                      scale_b[c]·Σb (either output optional).
// bn_stats_finalize    invstd from the variance, and the running statistics.
// bn_eval_stats        invstd from the running variance.
// bn_apply             y = (x − m)·invstd·γ + β (training: batch statistics;
//                      eval: running ones folded into m and invstd).
// bn_backward          dx = γ·invstd·(dy − Σdy/M − x̂·Σ(dy·x̂)/M), x̂ = (x − m)·invstd.
// prelu_fwd / _bwd     y = x > 0 ? x : a_c·x;  dx = dy·(x > 0 ? 1 : a_c).
// add_assign_f32       y += b (the residual, in place).
// dropout_f32          y = keyed_hash32(i) >= threshold ? x·scale : 0
//                      (inverted dropout; also its backward, on dy).
// bias_add_f32         y[r, c] += b[c] (Linear's bias).
//
// Element kernels are grid-stride over rows·C (64-bit indices).
#include "common.cuh"

namespace {

constexpr int kLanes = 32, kRowLanes = 8;

template <int kMode>
GIF_DEVICE void chan_sums(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ mean,
                          long long rows, int C, float* __restrict__ partial) {
  __shared__ float s0[kRowLanes][kLanes], s1[kRowLanes][kLanes];
  const int lane = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kLanes + lane;
  const int split = blockIdx.y, splits = gridDim.y;
  float a = 0.0f, b = 0.0f;
  if (c < C) {
    const float m = mean ? mean[c] : 0.0f;
    for (long long r = (long long)split * kRowLanes + ty; r < rows; r += (long long)splits * kRowLanes) {
      const float v = x[r * C + c];
      if (kMode == 0) {
        a += v;
      } else if (kMode == 1) {
        a += (v - m) * (v - m);
      } else if (kMode == 2) {
        const float g = dy[r * C + c];
        a += g;
        b += g * (v - m);
      } else {
        if (v <= 0.0f) a += dy[r * C + c] * v;
      }
    }
  }
  s0[ty][lane] = a;
  s1[ty][lane] = b;
  __syncthreads();
  if (ty == 0 && c < C) {
    float ta = 0.0f, tb = 0.0f;
    for (int q = 0; q < kRowLanes; ++q) {
      ta += s0[q][lane];
      tb += s1[q][lane];
    }
    partial[((long long)split * C + c) * 2] = ta;
    partial[((long long)split * C + c) * 2 + 1] = tb;
  }
}

GIF_DEVICE void chan_finalize_rows(const float* __restrict__ partial, int splits, int C, float scale_a,
                                   const float* __restrict__ scale_b, float* __restrict__ out_a, float* __restrict__ out_b) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float a = 0.0f, b = 0.0f;
  for (int s = 0; s < splits; ++s) {
    a += partial[((long long)s * C + c) * 2];
    b += partial[((long long)s * C + c) * 2 + 1];
  }
  if (out_a) out_a[c] = a * scale_a;
  if (out_b) out_b[c] = b * (scale_b ? scale_b[c] : 1.0f);
}

// invstd from the centred sums of squares (pass 1); the running statistics
// updated with the mean and the unbiased variance when `running_mean` is set.
GIF_DEVICE void bn_stats_finalize_rows(const float* __restrict__ variance, long long rows, int C, float eps, float momentum,
                                  const float* __restrict__ mean, float* __restrict__ invstd, float* __restrict__ running_mean,
                                  float* __restrict__ running_var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float m = mean[c];
  const float var = variance[c];
  invstd[c] = 1.0f / sqrtf(var + eps);
  if (running_mean) {
    const float unbiased = rows > 1 ? var * (float)rows / (float)(rows - 1) : var;
    running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * m;
    running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
  }
}

// invstd = 1/sqrt(running_var + eps) (eval mode).
GIF_DEVICE void bn_eval_stats_rows(const float* __restrict__ running_var, int C, float eps, float* __restrict__ invstd) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < C) invstd[c] = 1.0f / sqrtf(running_var[c] + eps);
}

GIF_DEVICE void bn_apply_rows(const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ invstd,
                         const float* __restrict__ gamma, const float* __restrict__ beta, long long rows, int C,
                         float* __restrict__ y) {
  const long long n = rows * C;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % C);
    y[i] = (x[i] - mean[c]) * invstd[c] * gamma[c] + beta[c];
  }
}

// dbeta = Σdy, dgamma = Σdy·x̂ (chan_sums mode 2, finalized). Training:
// the batch statistics depend on x; eval (train = 0): dx = γ·invstd·dy.
GIF_DEVICE void bn_backward_rows(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ mean,
                                 const float* __restrict__ invstd, const float* __restrict__ gamma,
                                 const float* __restrict__ dbeta, const float* __restrict__ dgamma, long long rows, int C,
                                 int train, float* __restrict__ dx) {
  const long long n = rows * C;
  const float inv_m = 1.0f / (float)rows;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % C);
    const float is = invstd[c];
    if (!train) {
      dx[i] = gamma[c] * is * dy[i];
      continue;
    }
    const float xh = (x[i] - mean[c]) * is;
    dx[i] = gamma[c] * is * (dy[i] - dbeta[c] * inv_m - xh * dgamma[c] * inv_m);
  }
}

GIF_DEVICE void prelu_fwd_rows(const float* __restrict__ x, const float* __restrict__ alpha, long long rows, int C,
                          float* __restrict__ y) {
  const long long n = rows * C;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float v = x[i];
    y[i] = v > 0.0f ? v : alpha[i % C] * v;
  }
}

GIF_DEVICE void prelu_bwd_rows(const float* __restrict__ x, const float* __restrict__ alpha, const float* __restrict__ dy,
                          long long rows, int C, float* __restrict__ dx) {
  const long long n = rows * C;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dx[i] = x[i] > 0.0f ? dy[i] : alpha[i % C] * dy[i];
}

// y[r, c] += b[c] (a Linear layer's bias).
GIF_DEVICE void bias_add_rows(float* __restrict__ y, const float* __restrict__ b, long long rows, int C) {
  const long long n = rows * C;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] += b[i % C];
}

GIF_DEVICE void add_assign_rows(float* __restrict__ y, const float* __restrict__ b, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] += b[i];
}

// n ≤ 2^32 (the element index is the hash's input).
GIF_DEVICE void dropout_rows(const float* __restrict__ x, long long n, unsigned int threshold, float scale,
                             unsigned int key_a, unsigned int key_b, float* __restrict__ y) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = keyed_hash32((unsigned int)i, key_a, key_b) >= threshold ? x[i] * scale : 0.0f;
}

}  // namespace

// clang-format off
extern "C" __global__ void __launch_bounds__(256) chan_sums_mean(const float* x, const float* dy, const float* mean, long long rows, int C, float* partial) { chan_sums<0>(x, dy, mean, rows, C, partial); }
extern "C" __global__ void __launch_bounds__(256) chan_sums_var(const float* x, const float* dy, const float* mean, long long rows, int C, float* partial) { chan_sums<1>(x, dy, mean, rows, C, partial); }
extern "C" __global__ void __launch_bounds__(256) chan_sums_bn_bwd(const float* x, const float* dy, const float* mean, long long rows, int C, float* partial) { chan_sums<2>(x, dy, mean, rows, C, partial); }
extern "C" __global__ void __launch_bounds__(256) chan_sums_prelu_bwd(const float* x, const float* dy, const float* mean, long long rows, int C, float* partial) { chan_sums<3>(x, dy, mean, rows, C, partial); }
extern "C" __global__ void __launch_bounds__(256) chan_finalize(const float* partial, int splits, int C, float scale_a, const float* scale_b, float* out_a, float* out_b) { chan_finalize_rows(partial, splits, C, scale_a, scale_b, out_a, out_b); }
extern "C" __global__ void __launch_bounds__(256) bn_stats_finalize(const float* variance, long long rows, int C, float eps, float momentum, const float* mean, float* invstd, float* running_mean, float* running_var) { bn_stats_finalize_rows(variance, rows, C, eps, momentum, mean, invstd, running_mean, running_var); }
extern "C" __global__ void __launch_bounds__(256) bn_eval_stats(const float* running_var, int C, float eps, float* invstd) { bn_eval_stats_rows(running_var, C, eps, invstd); }
extern "C" __global__ void __launch_bounds__(256) bn_apply(const float* x, const float* mean, const float* invstd, const float* gamma, const float* beta, long long rows, int C, float* y) { bn_apply_rows(x, mean, invstd, gamma, beta, rows, C, y); }
extern "C" __global__ void __launch_bounds__(256) bn_backward(const float* x, const float* dy, const float* mean, const float* invstd, const float* gamma, const float* dbeta, const float* dgamma, long long rows, int C, int train, float* dx) { bn_backward_rows(x, dy, mean, invstd, gamma, dbeta, dgamma, rows, C, train, dx); }
extern "C" __global__ void __launch_bounds__(256) prelu_fwd(const float* x, const float* alpha, long long rows, int C, float* y) { prelu_fwd_rows(x, alpha, rows, C, y); }
extern "C" __global__ void __launch_bounds__(256) prelu_bwd(const float* x, const float* alpha, const float* dy, long long rows, int C, float* dx) { prelu_bwd_rows(x, alpha, dy, rows, C, dx); }
extern "C" __global__ void __launch_bounds__(256) bias_add_f32(float* y, const float* b, long long rows, int C) { bias_add_rows(y, b, rows, C); }
extern "C" __global__ void __launch_bounds__(256) add_assign_f32(float* y, const float* b, long long n) { add_assign_rows(y, b, n); }
extern "C" __global__ void __launch_bounds__(256) dropout_f32(const float* x, long long n, unsigned int threshold, float scale, unsigned int key_a, unsigned int key_b, float* y) { dropout_rows(x, n, threshold, scale, key_a, key_b, y); }
// clang-format on
