// code_head.cu: the GIF code head (src/head/code_head.rs), every position
// of the code in one launch, and the dot-regression loss fused in.
//
// Layouts: centres W [l, v, d_p] (f32 or bf16), their normalized copy Ŵ
// and norms f32 [l·v, d_p] and [l·v] (rowwise.cu l2norm_fwd, f32 out); targets (tokens) [l, B] i32;
// projected features Z [B, l, d_p] f32 (one GEMM X·Pᵀ with P [l·d_p, d]);
// per-position kernel outputs U [l, R, d_p] and dC [l, R, v] with R = B, or
// 2B with the exact ArcFace gradient's singular rows; dZ [B, l, d_p] (f32,
// or bf16 for the bf16 backward GEMMs); statistics [2l + 1, B].
// An operand that may be f32 or bf16 comes as two pointers, one of them
// null (In below): one kernel serves every dtype mix.
//
// code_head_step  (one 128-thread block per sample b, looping over j; at
//   least 8 blocks per SM: 64 registers, which ptxas otherwise picks for sm_90
//   anyway, with a spill)
//   The regression term first (x = features[b], d values): x̂ = x/‖x‖,
//   h = table[label] (device memory, or host memory mapped for the
//   device: a host-resident table read across the bus), r = x̂·h − 1, loss = γ/(2B)·r², dx = (γ r / B)(h −
//   x̂ (x̂·h)) / ‖x‖ written to dx[b] (zeros and loss 0 without a table).
//   Then for each position j, with z = Z[b, j] (or x when Z is null):
//     ‖z‖, u = z / ‖z‖                       (written to U[j, b])
//     c_k = u · ŵ_k for the v normalized centres of position j
//     for the angular margins (kinds 1, 3), the target's c_y and sin θ from
//       z and the raw centre w_y in f64 (margin.cuh warp_angle), so both are
//       accurate at small angles
//     target logit s·f(c_y) with f the margin (margin.cuh), other logits
//       s·c_k; with M the max logit, S = Σ_{k≠y} exp(s c_k − M), e_y =
//       exp(s f − M), Z = e_y + S: loss = w·log1p(S) when the target is
//       the max, else w·((M − s f) + log Z), w = λ_j / B
//     dC_k = w·s·exp(s c_k − M)/Z (k ≠ y); G = −w·s·S/Z (= w·s·(p_y − 1)
//       without cancellation); dC_y = G·df (exact) or G (straight-through);
//       the exact ArcFace gradient's singular part a = G·sing goes along
//       the unit tangents (margin.rs)
//     dU = Σ_k dC_k ŵ_k;  dz = (dU − u (u·dU) + a·t_z) / ‖z‖ with t_z the
//       unit tangent at u toward ŵ_y (through the feature normalization)
//     dz goes to dZ[b, j] when projected, else is added to dx[b] (the block
//       owns row b, each thread the same columns throughout: no race)
//   With `singular` != 0, also rows B + b of dC[j] (one-hot at y) and of
//   U[j] (a·t_w, t_w the unit tangent at ŵ_y toward u), so that the centre
//   gradient over 2B rows adds the singular part to dŴ_y.
//   Dynamic shared memory (2 d_p + 2 v) floats. Limits: v <= 4096, d_p <=
//   8192 (the launcher checks); ‖z‖ = 0 gives a non-finite loss, reported
//   by the host as an error.
//
// code_centre_grad  (a GEMM shaped for v = 16…64: 16 × 128 tiles, split K)
//   partial[s, j] = Σ_{r in slice s} dC[j, r, :]ᵀ U[j, r, :] ([v, d_p]):
//   grid (⌈d_p/128⌉, ⌈v/16⌉, l·S), 256 threads; rows in slices of ⌈R/S⌉.
//
// code_centre_grad_finish  (one warp per row of l·v)
//   dŴ = Σ_s partial[s] in slice order (deterministic), then through the
//   centre normalization: dW = (dŴ − ŵ (ŵ·dŴ)) / n, or dŴ / eps where the
//   norm n <= eps (as rowwise l2norm_bwd).
//
// code_log_probs  (one 128-thread block per sample, looping over j)
//   u = z / max(‖z‖, eps), out[b, j, k] = log softmax_k(s·u·ŵ_k).
//
// Costs per step and position: B·d_p·(2 v + 4) FLOP in the step kernel,
// 2·R·v·d_p in the centre gradient; bytes B·(d + d_p·3 + 2 v)·4 plus the
// centres (v·d_p·4, from L2 after the first block).
#include "margin.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// An f32-or-bf16 operand: exactly one pointer is non-null (the host
// checks). Indexing converts to f32; the branch is uniform across a launch.
struct In {
  const float* f;
  const bf16* h;
  GIF_DEVICE float operator[](long long i) const { return f != nullptr ? f[i] : to_float(h[i]); }
  GIF_DEVICE In at(long long off) const { return In{f != nullptr ? f + off : nullptr, h != nullptr ? h + off : nullptr}; }
};

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

// The regression term of sample b (every thread of the block calls it);
// thread t writes columns t, t + 128, ... of dx[b].
GIF_DEVICE void regression(In x, int d, int label, In table, float gamma_over_b, float* dx, float* loss,
                           float* scratch) {
  const int t = threadIdx.x;
  if (table.f == nullptr && table.h == nullptr) {
    for (int c = t; c < d; c += kThreads) dx[c] = 0.0f;
    if (t == 0) *loss = 0.0f;
    return;
  }
  const In h = table.at((long long)label * d);
  float xx = 0.0f, xh = 0.0f;
  for (int c = t; c < d; c += kThreads) {
    const float xv = x[c], hv = h[c];
    xx += xv * xv;
    xh += xv * hv;
  }
  xx = block_sum4(xx, scratch);
  xh = block_sum4(xh, scratch);
  const float inv = 1.0f / sqrtf(xx);
  const float dot = xh * inv;  // x̂·h
  const float r = dot - 1.0f;
  const float k = gamma_over_b * r * inv;
  for (int c = t; c < d; c += kThreads) dx[c] = k * (h[c] - x[c] * inv * dot);
  if (t == 0) *loss = 0.5f * gamma_over_b * r * r;
}

// One position of sample b: the margin softmax and its gradient (see the
// file comment). dz_f / dz_h: this row of dZ (one non-null), or both null
// to add dz to dx.
GIF_DEVICE void position(In z, const float* __restrict__ w_hat, In w_raw, int y, int b, int b_rows, int dp, int v,
                         float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float weight,
                         float* __restrict__ u_out, float* __restrict__ dc, int singular, float* dx, float* dz_f,
                         bf16* dz_h, float* loss, float* correct, float* sm, float* scratch) {
  float* u = sm;            // d_p: the normalized feature
  float* dus = sm + dp;     // d_p: the gradient with respect to u
  float* cos_k = dus + dp;  // v cosines
  float* grad = cos_k + v;  // v gradients of the cosines
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const In wy = w_raw.at((long long)y * dp);

  float ss = 0.0f;
  for (int c = t; c < dp; c += kThreads) {
    const float x = z[c];
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
  if (angular) ang = warp_angle(z, wy, dp);
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
    *loss = weight * (ty >= mx ? log1pf(se) : (mx - ty) + logf(zsum));
    *correct = (int)first == y ? 1.0f : 0.0f;
  }
  // The singular part of the exact gradient, along the unit tangents (a
  // float across the dU loop: as a double it spilled).
  const float a = exact_grad ? g_y * tg.sing : 0.0f;
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
    const double zc = (double)z[c], wc = (double)wy[c];
    float g = (dus[c] - u[c] * proj) * inv;
    if (a != 0.0f) g += (float)((double)a * ang.toward_w(zc, wc) * ang.rz);
    if (dz_f != nullptr) {
      dz_f[c] = g;
    } else if (dz_h != nullptr) {
      dz_h[c] = from_float<bf16>(g);
    } else {
      dx[c] += g;
    }
    if (singular) u_out[((long long)b_rows + b) * dp + c] = (float)((double)a * ang.toward_z(zc, wc));
  }
  // The next position reuses the shared memory.
  __syncthreads();
}

GIF_DEVICE void head_step(In x, int d, const int* __restrict__ labels, In table, float gamma_over_b,
                               const float* __restrict__ z, int dp, const float* __restrict__ w_hat, In w_raw,
                               const int* __restrict__ targets, const float* __restrict__ lambdas, int b_rows,
                               int l, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad,
                               float* __restrict__ u_out, float* __restrict__ dc, int singular, float* dx,
                               float* dz_f, bf16* dz_h, float* __restrict__ stats) {
  GIF_DYNAMIC_SMEM(float, sm);
  __shared__ float scratch[kWarps];
  const int b = blockIdx.x;
  const int rows = singular ? 2 * b_rows : b_rows;
  const In xb = x.at((long long)b * d);
  float* dxb = dx + (long long)b * d;
  regression(xb, d, labels[b], table, gamma_over_b, dxb, stats + b, scratch);
  const float inv_b = 1.0f / (float)b_rows;
  for (int j = 0; j < l; ++j) {
    // The projected row, or the features themselves (d_p = d).
    const In zj = z != nullptr ? In{z + ((long long)b * l + j) * dp, nullptr} : xb;
    const long long dz_off = ((long long)b * l + j) * dp;
    const float weight = (lambdas != nullptr ? lambdas[j] : 1.0f) * inv_b;
    position(zj, w_hat + (long long)j * v * dp, w_raw.at((long long)j * v * dp), targets[(long long)j * b_rows + b],
             b, b_rows, dp, v, s, margin, m, cos_m, sin_m, exact_grad, weight, u_out + (long long)j * rows * dp,
             dc + (long long)j * rows * v, singular, dxb, dz_f != nullptr ? dz_f + dz_off : nullptr,
             dz_h != nullptr ? dz_h + dz_off : nullptr, stats + (long long)(1 + 2 * j) * b_rows + b,
             stats + (long long)(2 + 2 * j) * b_rows + b, sm, scratch);
  }
}

constexpr int kGradRows = 16;   // v rows per tile
constexpr int kGradCols = 128;  // d_p columns per tile
constexpr int kGradK = 32;      // rows of dC and U staged per step

GIF_DEVICE void centre_grad(const float* __restrict__ dc, const float* __restrict__ u, int rows, int dp, int v, int l,
                            int slices, float* __restrict__ partial) {
  __shared__ float sdc[kGradK][kGradRows];
  __shared__ float su[kGradK][kGradCols];
  const int t = threadIdx.x, tk = t >> 4, tc = t & 15;
  const int c0 = blockIdx.x * kGradCols, k0 = blockIdx.y * kGradRows;
  const int j = blockIdx.z % l, slice = blockIdx.z / l;
  const int per = (rows + slices - 1) / slices;
  const int r_begin = slice * per, r_end = min(rows, r_begin + per);
  const float* dcj = dc + (long long)j * rows * v;
  const float* uj = u + (long long)j * rows * dp;
  float acc[kGradCols / 16];
#pragma unroll
  for (int q = 0; q < kGradCols / 16; ++q) acc[q] = 0.0f;
  for (int r0 = r_begin; r0 < r_end; r0 += kGradK) {
    for (int i = t; i < kGradK * kGradRows; i += 256) {
      const int rr = i / kGradRows, kk = i % kGradRows, r = r0 + rr, k = k0 + kk;
      sdc[rr][kk] = r < r_end && k < v ? dcj[(long long)r * v + k] : 0.0f;
    }
    for (int i = t; i < kGradK * kGradCols; i += 256) {
      const int rr = i / kGradCols, cc = i % kGradCols, r = r0 + rr, c = c0 + cc;
      su[rr][cc] = r < r_end && c < dp ? uj[(long long)r * dp + c] : 0.0f;
    }
    __syncthreads();
    for (int rr = 0; rr < kGradK; ++rr) {
      const float a = sdc[rr][tk];
#pragma unroll
      for (int q = 0; q < kGradCols / 16; ++q) acc[q] += a * su[rr][tc + 16 * q];
    }
    __syncthreads();
  }
  const int k = k0 + tk;
  if (k >= v) return;
  float* out = partial + (((long long)slice * l + j) * v + k) * dp;
#pragma unroll
  for (int q = 0; q < kGradCols / 16; ++q) {
    const int c = c0 + tc + 16 * q;
    if (c < dp) out[c] = acc[q];
  }
}

GIF_DEVICE void centre_grad_finish(const float* __restrict__ partial, int slices, const float* __restrict__ w_hat,
                                   const float* __restrict__ norms, int rows, int dp, float eps, float* dw) {
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const long long off = (long long)row * dp, stride = (long long)rows * dp;
  const float* y = w_hat + off;
  float* g = dw + off;
  float dot = 0.0f;
  for (int c = lane; c < dp; c += 32) {
    float sum = 0.0f;
    for (int sl = 0; sl < slices; ++sl) sum += partial[sl * stride + off + c];
    g[c] = sum;
    dot += sum * y[c];
  }
  dot = warp_reduce(dot, SumOp{});
  const float n = norms[row];
  if (n > eps) {
    const float inv = 1.0f / n;
    for (int c = lane; c < dp; c += 32) g[c] = (g[c] - y[c] * dot) * inv;
  } else {
    for (int c = lane; c < dp; c += 32) g[c] = g[c] / eps;
  }
}

GIF_DEVICE void log_probs(In x, int d, const float* __restrict__ z, int dp, const float* __restrict__ w_hat,
                          int l, int v, float s, float eps, float* __restrict__ out) {
  GIF_DYNAMIC_SMEM(float, sm);
  float* u = sm;        // d_p
  float* lg = sm + dp;  // v logits
  __shared__ float scratch[kWarps];
  const int b = blockIdx.x, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  for (int j = 0; j < l; ++j) {
    const In zj = z != nullptr ? In{z + ((long long)b * l + j) * dp, nullptr} : x.at((long long)b * d);
    float ss = 0.0f;
    for (int c = t; c < dp; c += kThreads) {
      const float val = zj[c];
      u[c] = val;
      ss += val * val;
    }
    const float inv = 1.0f / fmaxf(sqrtf(block_sum4(ss, scratch)), eps);
    for (int c = t; c < dp; c += kThreads) u[c] *= inv;
    __syncthreads();
    const float* wj = w_hat + (long long)j * v * dp;
    for (int k = warp; k < v; k += kWarps) {
      float acc = 0.0f;
      for (int c = lane; c < dp; c += 32) acc += u[c] * wj[(long long)k * dp + c];
      acc = warp_reduce(acc, SumOp{});
      if (lane == 0) lg[k] = s * acc;
    }
    __syncthreads();
    float mx = -gif_inf();
    for (int k = t; k < v; k += kThreads) mx = fmaxf(mx, lg[k]);
    mx = block_max4(mx, scratch);
    float se = 0.0f;
    for (int k = t; k < v; k += kThreads) se += expf(lg[k] - mx);
    const float lse = mx + logf(block_sum4(se, scratch));
    float* o = out + ((long long)b * l + j) * v;
    for (int k = t; k < v; k += kThreads) o[k] = lg[k] - lse;
    __syncthreads();
  }
}

}  // namespace

// clang-format off
extern "C" __global__ void __launch_bounds__(kThreads, 8) code_head_step(const float* x32, const bf16* x16, int d, const int* labels, const float* table32, const bf16* table16, float gamma_over_b, const float* z, int dp, const float* w_hat, const float* w32, const bf16* w16, const int* targets, const float* lambdas, int b, int l, int v, float s, int margin, float m, float cos_m, float sin_m, int exact_grad, float* u, float* dc, int singular, float* dx, float* dz32, bf16* dz16, float* stats) { head_step(In{x32, x16}, d, labels, In{table32, table16}, gamma_over_b, z, dp, w_hat, In{w32, w16}, targets, lambdas, b, l, v, s, margin, m, cos_m, sin_m, exact_grad, u, dc, singular, dx, dz32, dz16, stats); }
extern "C" __global__ void __launch_bounds__(256) code_centre_grad(const float* dc, const float* u, int rows, int dp, int v, int l, int slices, float* partial) { centre_grad(dc, u, rows, dp, v, l, slices, partial); }
extern "C" __global__ void __launch_bounds__(256) code_centre_grad_finish(const float* partial, int slices, const float* w_hat, const float* norms, int rows, int dp, float eps, float* dw) { centre_grad_finish(partial, slices, w_hat, norms, rows, dp, eps, dw); }
extern "C" __global__ void __launch_bounds__(kThreads) code_log_probs(const float* x32, const bf16* x16, int d, const float* z, int dp, const float* w_hat, int l, int v, float s, float eps, float* out) { log_probs(In{x32, x16}, d, z, dp, w_hat, l, v, s, eps, out); }
// clang-format on
