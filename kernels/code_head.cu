// code_head.cu: the GIF code head (src/head/code_head.rs), per position j
// of the code, and the dot-regression loss.
//
// margin_ce_<T>  (one launch per position; T = f32 or bf16 for z)
//   For sample b (one 128-thread block each), z = z_j[b] (d_p values):
//     ‖z‖, u = z / ‖z‖                       (written to u, f32)
//     c_k = u · ŵ_k for the v normalized centres ŵ (f32, [v, d_p])
//     for the angular margins (kinds 1, 3), the target's c_y and sin θ from
//       z and the raw centre w_y in f64 (margin.cuh warp_angle), so both are
//       accurate at small angles
//     target logit s·f(c_y) with f the margin (margin.cuh), other logits
//       s·c_k; with M the max logit, S = Σ_{k≠y} exp(s c_k − M), e_y =
//       exp(s f − M), Z = e_y + S: loss_b = w·log1p(S) when the target is
//       the max, else w·((M − s f) + log Z), w = λ_j / B
//     dC_k = w·s·exp(s c_k − M)/Z (k ≠ y); G = −w·s·S/Z (= w·s·(p_y − 1)
//       without cancellation); dC_y = G·df (exact) or G (straight-through);
//       the exact ArcFace gradient's singular part a = G·sing goes along
//       the unit tangents (margin.rs)
//     dU = Σ_k dC_k ŵ_k;  dz = (dU − u (u·dU) + a·t_z) / ‖z‖ with t_z the
//       unit tangent at u toward ŵ_y (through the feature normalization;
//       the centre normalization's gradient is applied by rowwise
//       l2norm_bwd after dŴ = dCᵀ·U, a GEMM)
//   Outputs per sample: loss, correct (argmax_k c_k == y, as 1/0), dC row,
//   u row, dz row (written, or added to dz when accumulate != 0: the
//   no-projection case sums all positions into the feature gradient). With
//   `singular` != 0, also rows B + b of dC (one-hot at y) and of u (a·t_w,
//   t_w the unit tangent at ŵ_y toward u), so that the GEMM over 2B rows
//   adds the singular part to dŴ_y.
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
GIF_DEVICE void margin_ce(const T* __restrict__ z, const float* __restrict__ w_hat, const float* __restrict__ w_raw,
                          const int* __restrict__ target, int b_rows, int dp, int v, float s, int margin, float m,
                          float cos_m, float sin_m, int exact_grad, float weight, float* __restrict__ u_out,
                          float* __restrict__ dz, int accumulate, float* __restrict__ dc, int singular,
                          float* __restrict__ loss, float* __restrict__ correct) {
  GIF_DYNAMIC_SMEM(float, sm);
  float* u = sm;            // d_p: the normalized feature
  float* dus = sm + dp;     // d_p: the gradient with respect to u
  float* cos_k = dus + dp;  // v cosines
  float* grad = cos_k + v;  // v gradients of the cosines
  __shared__ float scratch[kWarps];
  const int b = blockIdx.x;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const T* zr = z + (long long)b * dp;
  const int y = target[b];
  const float* wy = w_raw + (long long)y * dp;

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
  // The target's angle from the raw vectors (every warp computes the same).
  const bool angular = margin == 1 || margin == 3;
  Angle64 ang{0.0, 0.0, 0.0, 0.0, 0.0};
  if (angular) ang = warp_angle(zr, wy, dp);
  __syncthreads();
  if (angular && t == 0) cos_k[y] = (float)ang.c;
  __syncthreads();
  const Target tg = margin_target(cos_k[y], (float)ang.sin, margin, m, cos_m, sin_m);
  // Softmax over the logits s·c (target: s·f(c_y)); argmax of the plain cosines.
  float mx = -gif_inf();
  float best = -gif_inf();
  int arg = 0x7fffffff;
  for (int k = t; k < v; k += kThreads) {
    const float lg = s * (k == y ? tg.f : cos_k[k]);
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
  for (int k = t; k < v; k += kThreads) se += k == y ? 0.0f : expf(s * cos_k[k] - mx);
  se = block_sum4(se, scratch);  // S: the other classes
  const float ty = s * tg.f;
  const float zsum = expf(ty - mx) + se;
  const float g_y = -weight * s * se / zsum;  // w·s·(p_y − 1)
  for (int k = t; k < v; k += kThreads) {
    const float g = k == y ? g_y * (exact_grad ? tg.df : 1.0f) : weight * s * expf(s * cos_k[k] - mx) / zsum;
    grad[k] = g;
    dc[(long long)b * v + k] = g;
    if (singular) dc[((long long)b_rows + b) * v + k] = k == y ? 1.0f : 0.0f;
  }
  if (t == 0) {
    loss[b] = weight * (ty >= mx ? log1pf(se) : (mx - ty) + logf(zsum));
    correct[b] = (int)first == y ? 1.0f : 0.0f;
  }
  // The singular part of the exact gradient, along the unit tangents.
  const double a = exact_grad ? (double)g_y * tg.sing : 0.0;
  __syncthreads();
  // dU = Σ_k grad_k ŵ_k, then through the normalization:
  // dz = (dU − u (u·dU) + a·t_z) / ‖z‖.
  float du_dot_u = 0.0f;
  for (int c = t; c < dp; c += kThreads) {
    float du = 0.0f;
    for (int k = 0; k < v; ++k) du += grad[k] * w_hat[(long long)k * dp + c];
    dus[c] = du;
    du_dot_u += du * u[c];
  }
  const float proj = block_sum4(du_dot_u, scratch);
  for (int c = t; c < dp; c += kThreads) {
    const double zc = (double)to_float(zr[c]), wc = (double)wy[c];
    float g = (dus[c] - u[c] * proj) * inv;
    if (a != 0.0) g += (float)(a * ang.toward_w(zc, wc) * ang.rz);
    float* o = dz + (long long)b * dp + c;
    *o = accumulate ? *o + g : g;
    if (singular) u_out[((long long)b_rows + b) * dp + c] = (float)(a * ang.toward_z(zc, wc));
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
extern "C" __global__ void __launch_bounds__(kThreads) margin_ce_f32(const float* z, const float* w_hat, const float* w_raw, const int* target, int b, int dp, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight, float* u, float* dz, int accumulate, float* dc, int singular, float* loss, float* correct) { margin_ce<float>(z, w_hat, w_raw, target, b, dp, v, s, margin, m, cos_m, sin_m, exact_grad, weight, u, dz, accumulate, dc, singular, loss, correct); }
extern "C" __global__ void __launch_bounds__(kThreads) margin_ce_bf16(const bf16* z, const float* w_hat, const float* w_raw, const int* target, int b, int dp, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight, float* u, float* dz, int accumulate, float* dc, int singular, float* loss, float* correct) { margin_ce<bf16>(z, w_hat, w_raw, target, b, dp, v, s, margin, m, cos_m, sin_m, exact_grad, weight, u, dz, accumulate, dc, singular, loss, correct); }
extern "C" __global__ void __launch_bounds__(256) code_regression_f32_f32(const float* x, const int* labels, const float* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<float, float>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_f32_bf16(const float* x, const int* labels, const bf16* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<float, bf16>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_bf16_f32(const bf16* x, const int* labels, const float* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<bf16, float>(x, labels, table, b, d, gamma_over_b, dx, loss); }
extern "C" __global__ void __launch_bounds__(256) code_regression_bf16_bf16(const bf16* x, const int* labels, const bf16* table, int b, int d, float gamma_over_b, float* dx, float* loss) { code_regression<bf16, bf16>(x, labels, table, b, d, gamma_over_b, dx, loss); }
// clang-format on
