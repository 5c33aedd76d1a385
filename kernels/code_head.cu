// code_head.cu: the GIF code head (src/head/code_head.rs), per position j
// of the code, and the dot-regression loss.
//
// margin_ce_<T>  (one launch per position; T = f32 or bf16 for z)
//   For sample b (one 128-thread block each), z = z_j[b] (d_p values):
//     ‖z‖, u = z / ‖z‖                       (written to u, f32)
//     c_k = u · ŵ_k for the v normalized centres ŵ (f32, [v, d_p])
//     target logit s·f(c_y) with f the margin (margin.rs):
//       none: c; CosFace: c − m; ArcFace: cos(θ + m) while c > cos(π − m),
//       else c − m·sin m (insightface's fallback)
//     other logits s·c_k; p = softmax; loss_b = w·(−log p_y), w = λ_j / B
//     dC_k = w·s·(p_k − [k = y]), times f'(c_y) for the target when the
//       margin gradient is exact (straight-through: f' = 1, as insightface)
//     dU = Σ_k dC_k ŵ_k;  dz = (dU − u (u·dU)) / ‖z‖   (through the
//       feature normalization; the centre normalization's gradient is
//       applied by rowwise l2norm_bwd after dŴ = dCᵀ·U, a GEMM)
//   Outputs per sample: loss, correct (argmax_k c_k == y, as 1/0), dC row,
//   u row, dz row (written, or added to dz when accumulate != 0: the
//   no-projection case sums all positions into the feature gradient).
//   Grid: B blocks x 128 threads; dynamic shared memory (2 d_p + 2 v)
//   floats. Limits: v <= 4096 and d_p <= 8192 (the launcher checks); ‖z‖ = 0 gives
//   a non-finite loss, which the launcher reports as an error.
//
// code_regression_<T>_<U>  (features T, code-vector table U; f32 or bf16)
//   For sample b (one warp each, 8 per block): x̂ = x / ‖x‖, h = table[label],
//   r = x̂·h − 1, loss_b = γ/(2B)·r², dx = (γ r / B)(h − x̂ (x̂·h)) / ‖x‖,
//   written to dx (the first term of the feature gradient). A null table
//   (γ = 0) writes zeros.
//
// Costs per step and position: B·d_p·(2 v + 4) FLOP and B·(d_p·3 + 2 v)·4
// bytes plus the centres (v·d_p·4, from L2 after the first block).
#include "margin.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

GIF_DEVICE float block_sum4(float v, float* scratch) {
  // 4 warps: reduce in the warp, then across the 4 partials.
  v = warp_reduce(v, SumOp{});
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  return scratch[0] + scratch[1] + scratch[2] + scratch[3];
}

GIF_DEVICE float block_max4(float v, float* scratch) {
  v = warp_reduce(v, MaxOp{});
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  return fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
}

template <typename T>
GIF_DEVICE void margin_ce(const T* __restrict__ z, const float* __restrict__ w_hat, const int* __restrict__ target, int b_rows,
                          int dp, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight,
                          float* __restrict__ u_out, float* __restrict__ dz, int accumulate, float* __restrict__ dc,
                          float* __restrict__ loss, float* __restrict__ correct) {
  (void)b_rows;  // the grid has one block per sample
  GIF_DYNAMIC_SMEM(float, sm);
  float* u = sm;            // d_p: the normalized feature
  float* dus = sm + dp;     // d_p: the gradient with respect to u
  float* cos_k = dus + dp;  // v cosines
  float* grad = cos_k + v;  // v gradients of the cosines
  __shared__ float scratch[kWarps];
  const int b = blockIdx.x;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const T* zr = z + (long long)b * dp;

  float ss = 0.0f;
  for (int c = t; c < dp; c += kThreads) {
    const float x = to_float(zr[c]);
    u[c] = x;
    ss += x * x;
  }
  const float norm = sqrtf(block_sum4(ss, scratch));
  const float inv = 1.0f / norm;
  for (int c = t; c < dp; c += kThreads) {
    u[c] *= inv;
    u_out[(long long)b * dp + c] = u[c];
  }
  __syncthreads();
  // Cosines: warp `warp` takes centres warp, warp + 4, ...
  for (int k = warp; k < v; k += kWarps) {
    const float* wk = w_hat + (long long)k * dp;
    float acc = 0.0f;
    for (int c = lane; c < dp; c += 32) acc += u[c] * wk[c];
    acc = warp_reduce(acc, SumOp{});
    if (lane == 0) cos_k[k] = acc;
  }
  __syncthreads();
  const int y = target[b];
  const Target tg = margin_target(cos_k[y], margin, m, cos_m, sin_m);
  const float fy = tg.f;
  const float df = exact_grad ? tg.df : 1.0f;
  // Softmax over the logits s·c (target: s·f(c_y)); argmax of the plain cosines.
  float mx = -gif_inf();
  float best = -gif_inf();
  int arg = 0x7fffffff;
  for (int k = t; k < v; k += kThreads) {
    const float lg = s * (k == y ? fy : cos_k[k]);
    mx = fmaxf(mx, lg);
    if (cos_k[k] > best || (cos_k[k] == best && k < arg)) {
      best = cos_k[k];
      arg = k;
    }
  }
  mx = block_max4(mx, scratch);
  // The argmax across the block: the largest cosine, lowest index on ties.
  const float top = block_max4(best, scratch);
  const float first = -block_max4(best == top ? -(float)arg : -gif_inf(), scratch);
  float se = 0.0f;
  for (int k = t; k < v; k += kThreads) se += expf(s * (k == y ? fy : cos_k[k]) - mx);
  se = block_sum4(se, scratch);
  const float log_se = logf(se);
  for (int k = t; k < v; k += kThreads) {
    const float p = expf(s * (k == y ? fy : cos_k[k]) - mx - log_se);
    float g = weight * s * (p - (k == y ? 1.0f : 0.0f));
    if (k == y) g *= df;
    grad[k] = g;
    dc[(long long)b * v + k] = g;
  }
  if (t == 0) {
    loss[b] = weight * (mx + log_se - s * fy);
    correct[b] = (int)first == y ? 1.0f : 0.0f;
  }
  __syncthreads();
  // dU = Σ_k grad_k ŵ_k, then through the normalization:
  // dz = (dU − u (u·dU)) / ‖z‖.
  float du_dot_u = 0.0f;
  for (int c = t; c < dp; c += kThreads) {
    float du = 0.0f;
    for (int k = 0; k < v; ++k) du += grad[k] * w_hat[(long long)k * dp + c];
    dus[c] = du;
    du_dot_u += du * u[c];
  }
  const float proj = block_sum4(du_dot_u, scratch);
  for (int c = t; c < dp; c += kThreads) {
    const float g = (dus[c] - u[c] * proj) * inv;
    float* o = dz + (long long)b * dp + c;
    *o = accumulate ? *o + g : g;
  }
}

template <typename T, typename U>
GIF_DEVICE void code_regression(const T* __restrict__ x, const int* __restrict__ labels, const U* __restrict__ table, int b_rows,
                                int d, float gamma_over_b, float* __restrict__ dx, float* __restrict__ loss) {
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= b_rows) return;
  const T* xr = x + (long long)row * d;
  float* g = dx + (long long)row * d;
  if (table == nullptr) {
    for (int c = lane; c < d; c += 32) g[c] = 0.0f;
    if (lane == 0) loss[row] = 0.0f;
    return;
  }
  const U* h = table + (long long)labels[row] * d;
  float xx = 0.0f, xh = 0.0f;
  for (int c = lane; c < d; c += 32) {
    const float xv = to_float(xr[c]), hv = to_float(h[c]);
    xx += xv * xv;
    xh += xv * hv;
  }
  xx = warp_reduce(xx, SumOp{});
  xh = warp_reduce(xh, SumOp{});
  const float norm = sqrtf(xx), inv = 1.0f / norm;
  const float dot = xh * inv;  // x̂·h
  const float r = dot - 1.0f;
  const float k = gamma_over_b * r * inv;
  for (int c = lane; c < d; c += 32) g[c] = k * (to_float(h[c]) - to_float(xr[c]) * inv * dot);
  if (lane == 0) loss[row] = 0.5f * gamma_over_b * r * r;
}

}  // namespace

// clang-format off
extern "C" __global__ void __launch_bounds__(kThreads) margin_ce_f32(const float* z, const float* w_hat, const int* target, int b, int dp, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight, float* u, float* dz, int accumulate, float* dc, float* loss, float* correct) { margin_ce<float>(z, w_hat, target, b, dp, v, s, margin, m, cos_m, sin_m, exact_grad, weight, u, dz, accumulate, dc, loss, correct); }
extern "C" __global__ void __launch_bounds__(kThreads) margin_ce_bf16(const bf16* z, const float* w_hat, const int* target, int b, int dp, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight, float* u, float* dz, int accumulate, float* dc, float* loss, float* correct) { margin_ce<bf16>(z, w_hat, target, b, dp, v, s, margin, m, cos_m, sin_m, exact_grad, weight, u, dz, accumulate, dc, loss, correct); }
extern "C" __global__ void __launch_bounds__(256) code_regression_f32_f32(const float* x, const int* labels, const float* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<float, float>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_f32_bf16(const float* x, const int* labels, const bf16* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<float, bf16>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_bf16_f32(const bf16* x, const int* labels, const float* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<bf16, float>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_bf16_bf16(const bf16* x, const int* labels, const bf16* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<bf16, bf16>(x, labels, table, b, d, gamma_over_b, dx, loss); }
// clang-format on
