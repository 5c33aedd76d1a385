// margin.cuh: the angular margins on the target cosine, the kernel side of
// src/head/margin.rs (Margin::target, Angle). Shared by the code head and
// the O(N) softmax heads.
//
// margin (kind): 0 none, 1 ArcFace with insightface's old fallback, 2
// CosFace (c − m; also insightface's CombinedMarginLoss with m3 > 0), 3
// ArcFace without fallback (cos(θ + m) for every θ: CombinedMarginLoss with
// m1 = 1, m3 = 0). cm = cos m, sm = sin m come from the host.
#pragma once
#include "common.cuh"

// f(c), and f'(c) = df + sing / sin θ split into its regular part and the
// coefficient of its singular part (the exact ArcFace gradient's unit
// tangent term, applied along the tangents of warp_angle below).
struct Target {
  float f, df, sing;
};
// c: the target's cosine; sin_t: the sine of its angle from the vectors
// (read by kinds 1 and 3 only).
GIF_DEVICE Target margin_target(float c, float sin_t, int margin, float m, float cm, float sm) {
  c = fminf(fmaxf(c, -1.0f), 1.0f);
  if (margin == 2) return Target{c - m, 1.0f, 0.0f};
  if (margin == 1 && c <= -cm) return Target{c - m * sm, 1.0f, 0.0f};  // θ + m ≥ π: the fallback
  if (margin == 1 || margin == 3) return Target{c * cm - sin_t * sm, cm, c * sm};
  return Target{c, 1.0f, 0.0f};
}

// The angle between z and w (d values each) from the raw vectors, in f64:
// c = z·w / (‖z‖‖w‖) clamped to [−1, 1] and sin θ = ‖ŵ − c·ẑ‖, accurate at
// any angle (not sqrt(1 − c²)). A zero vector gives c = 0, sin = 1 and no
// tangent. Every lane of a full warp calls it and gets the result.
struct Angle64 {
  double c, sin;
  double rz, rw, rs;  // 1/‖z‖, 1/‖w‖, 1/sin θ; 0 where there is no tangent
  // Component i of the unit tangent at ẑ toward ŵ, (ŵ − c ẑ) / sin θ, and
  // at ŵ toward ẑ, (ẑ − c ŵ) / sin θ; 0 when there is none. (Reciprocals
  // once per row: an f64 division is a subroutine, and spilled registers.)
  GIF_DEVICE double toward_w(double zi, double wi) const { return (wi * rw - c * zi * rz) * rs; }
  GIF_DEVICE double toward_z(double zi, double wi) const { return (zi * rz - c * wi * rw) * rs; }
};

GIF_DEVICE double warp_sum_f64(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// z and w: pointers (f32, bf16) or anything indexable the same way.
template <typename A, typename B>
GIF_DEVICE Angle64 warp_angle(A z, B w, int d) {
  const int lane = threadIdx.x & 31;
  double zz = 0.0, ww = 0.0, zw = 0.0;
  for (int i = lane; i < d; i += 32) {
    const double a = (double)to_float(z[i]), b = (double)to_float(w[i]);
    zz += a * a;
    ww += b * b;
    zw += a * b;
  }
  zz = warp_sum_f64(zz);
  ww = warp_sum_f64(ww);
  zw = warp_sum_f64(zw);
  Angle64 r;
  const double nz = sqrt(zz), nw = sqrt(ww);
  r.rs = 0.0;
  if (!(nz > 0.0 && nw > 0.0)) {
    r.c = nz == nz && nw == nw ? 0.0 : nz + nw;  // NaN stays NaN
    r.sin = 1.0;
    r.rz = r.rw = 0.0;
    return r;
  }
  r.rz = 1.0 / nz;
  r.rw = 1.0 / nw;
  r.c = fmin(fmax(zw * r.rz * r.rw, -1.0), 1.0);
  double ss = 0.0;
  for (int i = lane; i < d; i += 32) {
    const double t = (double)to_float(w[i]) * r.rw - r.c * (double)to_float(z[i]) * r.rz;
    ss += t * t;
  }
  r.sin = sqrt(warp_sum_f64(ss));
  r.rs = r.sin > 0.0 ? 1.0 / r.sin : 0.0;
  return r;
}
