// conv.cu: 2-D convolution on NHWC activations as implicit GEMM
// (src/backbone/conv.rs), on the fp32 SIMT tile of tile_f32.cuh. Weights are
// OHWI ([Co, k, k, Ci]); the taps are t = r·k + q, and a GEMM index over
// (tap, channel) is tap·C + c, channels fastest, so 4 consecutive indices
// are 4 consecutive channels of one pixel when C % 4 == 0 (the _v kernels'
// vector loads). No im2col buffer: the operands below compute each
// element's address (or zero for padding) when the tile is loaded.
//
// conv_fwd    y[m, co] = Σ_{t,ci} x[pixel(m, t), ci]·w[co, t, ci]
//             GEMM M = B·Ho·Wo (output pixels), N = Co, K = k·k·Ci;
//             A = Im2colOp (k-contiguous), B = w as [Co, K].
// conv_dgrad  dx[p, ci] = Σ_{t,co} dy[out(p, t), co]·w[co, t, ci] over the
//             taps whose output pixel exists (h + pad − r divisible by the
//             stride and in range); M = B·H·W, N = Ci, K = k·k·Co;
//             A = GatherDyOp, B = TapRowsOp (w read as [(t, co), ci]).
// conv_wgrad  dw[co, (t, ci)] = Σ_m dy[m, co]·x[pixel(m, t), ci];
//             M = Co, N = k·k·Ci, K = B·Ho·Wo (output pixels); A = dy,
//             B = Im2colOp (the forward's A, read n-contiguous); split over
//             gridDim.z ranges of K (multiples of 32) whose partial tiles
//             are added with atomicAdd into dw (zeroed by the caller,
//             or holding the gradient to accumulate onto; one split: each
//             element has one writer, reproducible).
//
// Geometry arguments: B, H, W, Ci, Co, k, stride, pad, Ho, Wo.
//
// Two families: conv_<op>_f32[_v] on the fp32 SIMT tile (tile_f32.cuh;
// _v: float4 loads, channel counts multiples of 4) and conv_<op>_bf16[_a]
// on the bf16 tensor-core tile (tile_bf16.cuh; bf16 x, w, dy; f32 results;
// _a: 16-byte cp.async chunks of 8 channels, channel counts multiples of 8;
// the weight gradient's pixel splits are then multiples of 32).
#include "tile_bf16.cuh"
#include "tile_f32.cuh"

namespace {

struct Geom {
  int B, H, W, Ci, Co, k, stride, pad, Ho, Wo;
};

// Output pixel m → (b, oy, ox).
GIF_DEVICE void out_pixel(const Geom& g, int m, int& b, int& oy, int& ox) {
  ox = m % g.Wo;
  oy = (m / g.Wo) % g.Ho;
  b = m / (g.Wo * g.Ho);
}

// x at output pixel (b, oy, ox), tap t, channel c; 0 in the padding.
template <typename T>
GIF_DEVICE const T* x_at(const T* x, const Geom& g, int b, int oy, int ox, int t, int c) {
  const int iy = oy * g.stride - g.pad + t / g.k, ix = ox * g.stride - g.pad + t % g.k;
  if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return nullptr;
  return x + (((long long)b * g.H + iy) * g.W + ix) * g.Ci + c;
}

// dy of the output pixel that input pixel (b, h, w) feeds through tap t,
// channel c; null when there is none (the stride does not divide, or it is
// outside the output).
template <typename T>
GIF_DEVICE const T* dy_at(const T* dy, const Geom& g, int b, int h, int w, int t, int c) {
  const int ty = h + g.pad - t / g.k, tx = w + g.pad - t % g.k;
  if (ty < 0 || tx < 0 || ty % g.stride || tx % g.stride) return nullptr;
  const int oy = ty / g.stride, ox = tx / g.stride;
  if (oy >= g.Ho || ox >= g.Wo) return nullptr;
  return dy + (((long long)b * g.Ho + oy) * g.Wo + ox) * g.Co + c;
}

// The implicit-GEMM operands, by element address. For the operand as
// stored (rows x contiguous columns), `row(r)` decodes stored row r once
// (its pixel, or its weight row) and `at(row, c)` is the address of column
// c in it, or null for a zero (outside the operand, in the padding, or a
// tap with no output pixel). Both tiles read them: the fp32 SIMT tile
// through AddressSrc (tile_f32.cuh), the bf16 tensor-core tile directly
// (tile_bf16.cuh); each decodes a row once per run of columns. Columns over
// (tap, channel) have channels fastest, so a run of 4 (f32 _v) or 8 (bf16
// _a) columns starting at a multiple of the run is one pixel's consecutive
// channels when C is a multiple of it.

// A decoded pixel (b, y, x) of a row; b < 0: the row is outside the operand.
struct PixelRow {
  int b, y, x;
};

// conv_fwd A and conv_wgrad B: the im2col matrix, stored [output pixel][(tap, ci)]
// (M = pixels, K = k·k·Ci).
template <typename T>
struct Im2colOp {
  const T* base;
  Geom g;
  int M, K;
  GIF_DEVICE PixelRow row(int m) const {
    PixelRow r;
    out_pixel(g, m, r.b, r.y, r.x);
    if (m >= M) r.b = -1;
    return r;
  }
  GIF_DEVICE const T* at(const PixelRow& r, int k) const {
    return r.b >= 0 && k < K ? x_at(base, g, r.b, r.y, r.x, k / g.Ci, k % g.Ci) : nullptr;
  }
};

// conv_dgrad A, stored [m = input pixel][k = (tap, co)].
template <typename T>
struct GatherDyOp {
  const T* base;
  Geom g;
  int M, K;
  GIF_DEVICE PixelRow row(int m) const {
    return PixelRow{m < M ? m / (g.W * g.H) : -1, (m / g.W) % g.H, m % g.W};
  }
  GIF_DEVICE const T* at(const PixelRow& r, int k) const {
    return r.b >= 0 && k < K ? dy_at(base, g, r.b, r.y, r.x, k / g.Co, k % g.Co) : nullptr;
  }
};

// conv_dgrad B, stored [k = (tap, co)][n = ci]: the weights' rows.
template <typename T>
struct TapRowsOp {
  const T* base;
  Geom g;
  int K;
  GIF_DEVICE const T* row(int k) const {
    return k < K ? base + ((long long)(k % g.Co) * g.k * g.k + k / g.Co) * g.Ci : nullptr;
  }
  GIF_DEVICE const T* at(const T* r, int n) const { return r && n < g.Ci ? r + n : nullptr; }
};

template <bool kVec>
GIF_DEVICE void conv_fwd(const float* __restrict__ x, const float* __restrict__ w, Geom g, float* __restrict__ y) {
  __shared__ __align__(16) float As[2][kF32K * kF32Pitch];
  __shared__ __align__(16) float Bs[2][kF32K * kF32Pitch];
  const int M = g.B * g.Ho * g.Wo, K = g.k * g.k * g.Ci;
  const int m0 = blockIdx.y * kF32Tile, n0 = blockIdx.x * kF32Tile;
  float acc[8][8];
  const AddressSrc<true, kVec, Im2colOp<float>> a{{x, g, M, K}};
  const MatrixSrc<true, kVec, float> b{w, K, nullptr, g.Co, K};
  f32_tile_loop(acc, As, Bs, a, m0, b, n0, 0, K);
  store_tile<false>(acc, y, g.Co, m0, M, n0, g.Co);
}

template <bool kVec>
GIF_DEVICE void conv_dgrad(const float* __restrict__ dy, const float* __restrict__ w, Geom g, float* __restrict__ dx) {
  __shared__ __align__(16) float As[2][kF32K * kF32Pitch];
  __shared__ __align__(16) float Bs[2][kF32K * kF32Pitch];
  const int M = g.B * g.H * g.W, K = g.k * g.k * g.Co;
  const int m0 = blockIdx.y * kF32Tile, n0 = blockIdx.x * kF32Tile;
  float acc[8][8];
  const AddressSrc<true, kVec, GatherDyOp<float>> a{{dy, g, M, K}};
  const AddressSrc<false, kVec, TapRowsOp<float>> b{{w, g, K}};
  f32_tile_loop(acc, As, Bs, a, m0, b, n0, 0, K);
  store_tile<false>(acc, dx, g.Ci, m0, M, n0, g.Ci);
}

template <bool kVec>
GIF_DEVICE void conv_wgrad(const float* __restrict__ x, const float* __restrict__ dy, Geom g, int chunk,
                           float* __restrict__ dw) {
  __shared__ __align__(16) float As[2][kF32K * kF32Pitch];
  __shared__ __align__(16) float Bs[2][kF32K * kF32Pitch];
  const int M = g.B * g.Ho * g.Wo, N = g.k * g.k * g.Ci;
  const int m0 = blockIdx.y * kF32Tile, n0 = blockIdx.x * kF32Tile;
  const int kb = blockIdx.z * chunk, ke = kb + chunk < M ? kb + chunk : M;
  if (kb >= M) return;
  float acc[8][8];
  const MatrixSrc<false, kVec, float> a{dy, g.Co, nullptr, g.Co, M};
  const AddressSrc<false, kVec, Im2colOp<float>> b{{x, g, M, N}};
  f32_tile_loop(acc, As, Bs, a, m0, b, n0, kb, ke);
  store_tile<true>(acc, dw, N, m0, g.Co, n0, N);
}

// ---------------------------------------------------------------------------
// bf16 tensor cores (tile_bf16.cuh): the same three GEMMs and operands with
// bf16 elements and f32 results; kAsync (both channel counts multiples of 8)
// moves 8 channels of one pixel per 16-byte cp.async.

template <bool kAsync>
GIF_DEVICE void conv_fwd_tc(const bf16* __restrict__ x, const bf16* __restrict__ w, Geom g, float* __restrict__ y) {
  GIF_DYNAMIC_SMEM(bf16, smem);
  const int M = g.B * g.Ho * g.Wo, K = g.k * g.k * g.Ci;
  const int m0 = blockIdx.y * kTcTile, n0 = blockIdx.x * kTcTile;
  float acc[4][4][4];
  tc_tile_loop<true, true, kAsync>(acc, smem, Im2colOp<bf16>{x, g, M, K}, m0, TcMatrix{w, K, g.Co, K}, n0, 0, K);
  tc_store_tile<false>(acc, y, g.Co, m0, M, n0, g.Co);
}

template <bool kAsync>
GIF_DEVICE void conv_dgrad_tc(const bf16* __restrict__ dy, const bf16* __restrict__ w, Geom g,
                              float* __restrict__ dx) {
  GIF_DYNAMIC_SMEM(bf16, smem);
  const int M = g.B * g.H * g.W, K = g.k * g.k * g.Co;
  const int m0 = blockIdx.y * kTcTile, n0 = blockIdx.x * kTcTile;
  float acc[4][4][4];
  tc_tile_loop<true, false, kAsync>(acc, smem, GatherDyOp<bf16>{dy, g, M, K}, m0, TapRowsOp<bf16>{w, g, K}, n0, 0, K);
  tc_store_tile<false>(acc, dx, g.Ci, m0, M, n0, g.Ci);
}

// Split over gridDim.z ranges of output pixels (multiples of kTcK).
template <bool kAsync>
GIF_DEVICE void conv_wgrad_tc(const bf16* __restrict__ x, const bf16* __restrict__ dy, Geom g, int chunk,
                              float* __restrict__ dw) {
  GIF_DYNAMIC_SMEM(bf16, smem);
  const int P = g.B * g.Ho * g.Wo, N = g.k * g.k * g.Ci;
  const int m0 = blockIdx.y * kTcTile, n0 = blockIdx.x * kTcTile;
  const int kb = blockIdx.z * chunk, ke = kb + chunk < P ? kb + chunk : P;
  if (kb >= P) return;
  float acc[4][4][4];
  tc_tile_loop<false, false, kAsync>(acc, smem, TcMatrix{dy, g.Co, P, g.Co}, m0, Im2colOp<bf16>{x, g, P, N}, n0, kb, ke);
  tc_store_tile<true>(acc, dw, N, m0, g.Co, n0, N);
}

}  // namespace

// The element-load f32 kernels (channel counts not multiples of 4: the
// 3-channel stem) decode addresses per element; they run without the
// 2-blocks-per-SM register cap, which would make them spill.
// clang-format off
extern "C" __global__ void __launch_bounds__(256) conv_fwd_f32(const float* x, const float* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* y) { conv_fwd<false>(x, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, y); }
extern "C" __global__ void __launch_bounds__(256, 2) conv_fwd_f32_v(const float* x, const float* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* y) { conv_fwd<true>(x, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, y); }
extern "C" __global__ void __launch_bounds__(256) conv_dgrad_f32(const float* dy, const float* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* dx) { conv_dgrad<false>(dy, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, dx); }
extern "C" __global__ void __launch_bounds__(256, 2) conv_dgrad_f32_v(const float* dy, const float* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* dx) { conv_dgrad<true>(dy, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, dx); }
extern "C" __global__ void __launch_bounds__(256) conv_wgrad_f32(const float* x, const float* dy, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, int chunk, float* dw) { conv_wgrad<false>(x, dy, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, chunk, dw); }
extern "C" __global__ void __launch_bounds__(256, 2) conv_wgrad_f32_v(const float* x, const float* dy, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, int chunk, float* dw) { conv_wgrad<true>(x, dy, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, chunk, dw); }
extern "C" __global__ void __launch_bounds__(256) conv_fwd_bf16(const bf16* x, const bf16* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* y) { conv_fwd_tc<false>(x, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, y); }
extern "C" __global__ void __launch_bounds__(256) conv_fwd_bf16_a(const bf16* x, const bf16* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* y) { conv_fwd_tc<true>(x, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, y); }
extern "C" __global__ void __launch_bounds__(256) conv_dgrad_bf16(const bf16* dy, const bf16* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* dx) { conv_dgrad_tc<false>(dy, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, dx); }
extern "C" __global__ void __launch_bounds__(256) conv_dgrad_bf16_a(const bf16* dy, const bf16* w, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, float* dx) { conv_dgrad_tc<true>(dy, w, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, dx); }
extern "C" __global__ void __launch_bounds__(256) conv_wgrad_bf16(const bf16* x, const bf16* dy, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, int chunk, float* dw) { conv_wgrad_tc<false>(x, dy, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, chunk, dw); }
extern "C" __global__ void __launch_bounds__(256) conv_wgrad_bf16_a(const bf16* x, const bf16* dy, int B, int H, int W, int Ci, int Co, int k, int stride, int pad, int Ho, int Wo, int chunk, float* dw) { conv_wgrad_tc<true>(x, dy, Geom{B, H, W, Ci, Co, k, stride, pad, Ho, Wo}, chunk, dw); }
// clang-format on
