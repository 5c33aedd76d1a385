// optim.cu: the optimizers' updates and the global gradient norm
// (src/train/optim.rs), each one launch over a list of tensors (PyTorch's
// multi-tensor apply): the tensors' device addresses come as arrays
// (u64), `offsets` [T + 1] the prefix sums of their element counts; a
// thread finds its tensor by binary search over the offsets (T is small).
//
// grad_sq_partial   grid-stride Σ g² over every gradient element, one pair
//                   of partial sums per block (f32 per thread, f64 across
//                   the block): partial[2 b] over the tensors with
//                   in_clip[t] != 0, partial[2 b + 1] over all of them.
// grad_norm_finish  one thread: with s the gradients' scale (1/k for k
//                   accumulated micro-batches, as insightface's loss / k;
//                   1 otherwise): norm[0] = s·sqrt(Σ partial[2 b]) (the
//                   clipped tensors' norm), norm[1] = s·sqrt(Σ partial[2 b
//                   + 1]) (all: its finiteness decides the step), f64 sums
//                   in block order (deterministic); clip[0] = s·min(1,
//                   max_norm / (norm[0] + 1e-6)) (torch.nn.utils.
//                   clip_grad_norm_; s·1 when max_norm <= 0: no clipping),
//                   clip[1] = s (the factor of the groups not clipped).
// sgd_step_<T>      torch.optim.SGD (dampening 0, no Nesterov): g = c·grad
//                   + wd·p; buf = g on the first step, else momentum·buf +
//                   g; p −= lr·buf (momentum 0: p −= lr·g, no buffer).
// adamw_step_<T>    torch.optim.AdamW: p ·= 1 − lr·wd; m = β1·m + (1 −
//                   β1)·g; v = β2·v + (1 − β2)·g²; p −= (lr / (1 − β1^t))·m /
//                   (sqrt(v) / sqrt(1 − β2^t) + eps), g = c·grad.
//   c: the gradient's factor (clip[0] for tensors of a clipped group,
//   clip[1] for the others; 1 when clip is null).
//   t: step[0] + 1 (the device's count of applied steps). Both skip every
//   write when norm[1] is not finite (the step is dropped, the state kept).
//   T: the parameters' storage, f32 or bf16; bf16 parameters with a master
//   copy (masters non-null, f32) update the master and round it into the
//   parameter; without, they are read, updated in f32 and rounded (nearest
//   even).
// optim_advance     one thread: step[0] += 1 when the norm is finite, else
//                   skipped[0] += 1.
#include "common.cuh"

namespace {

constexpr int kBlock = 256;

// The tensor holding flat element e: the t with offsets[t] <= e < offsets[t + 1].
GIF_DEVICE int find_tensor(const long long* __restrict__ offsets, int tensors, long long e) {
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename P>
GIF_DEVICE P* at(const unsigned long long* addrs, int t) {
  return reinterpret_cast<P*>(addrs[t]);
}

// Finite: x − x is 0 (NaN for ±inf and NaN).
// Element i of tensor t of a parameter list: the parameter, its master
// copy if any (the value updates read and write), and its gradient.
template <typename T>
struct Elem {
  T* p;
  float* master;
  long long i;
  float g;
  GIF_DEVICE Elem(const unsigned long long* params, const unsigned long long* masters,
                  const unsigned long long* grads, const long long* offsets, int tensors, long long e, int& t) {
    t = find_tensor(offsets, tensors, e);
    i = e - offsets[t];
    p = at<T>(params, t);
    master = masters != nullptr ? at<float>(masters, t) : nullptr;
    g = at<const float>(grads, t)[i];
  }
  GIF_DEVICE float value() const { return master != nullptr ? master[i] : to_float(p[i]); }
  GIF_DEVICE void store(float w) const {
    if (master != nullptr) master[i] = w;
    p[i] = from_float<T>(w);
  }
};

GIF_DEVICE bool norm_ok(const float* norm) { return norm == nullptr || norm[1] - norm[1] == 0.0f; }
GIF_DEVICE float clip_factor(const float* clip) { return clip == nullptr ? 1.0f : clip[0]; }

GIF_DEVICE double block_sum_f64(double v, double* warp_sums) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < kBlock / 32; ++w) s += warp_sums[w];
  return s;
}

GIF_DEVICE void sq_partial(const unsigned long long* __restrict__ grads, const int* __restrict__ in_clip,
                           const long long* __restrict__ offsets, int tensors, double* __restrict__ partial) {
  __shared__ double warp_sums[kBlock / 32];
  const long long total = offsets[tensors];
  float clipped = 0.0f, all = 0.0f;
  for (long long e = blockIdx.x * (long long)kBlock + threadIdx.x; e < total; e += (long long)gridDim.x * kBlock) {
    const int t = find_tensor(offsets, tensors, e);
    const float g = at<const float>(grads, t)[e - offsets[t]];
    all += g * g;
    if (in_clip[t]) clipped += g * g;
  }
  const double c = block_sum_f64(clipped, warp_sums);
  const double a = block_sum_f64(all, warp_sums);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = c;
    partial[2 * blockIdx.x + 1] = a;
  }
}

GIF_DEVICE void norm_finish(const double* __restrict__ partial, int blocks, float max_norm, float scale,
                            float* __restrict__ norm, float* __restrict__ clip) {
  if (threadIdx.x != 0) return;
  double c = 0.0, a = 0.0;
  for (int b = 0; b < blocks; ++b) {
    c += partial[2 * b];
    a += partial[2 * b + 1];
  }
  const float n = scale * (float)sqrt(c);
  norm[0] = n;
  norm[1] = scale * (float)sqrt(a);
  clip[0] = scale * (max_norm > 0.0f ? fminf(1.0f, max_norm / (n + 1e-6f)) : 1.0f);
  clip[1] = scale;
}

template <typename T>
GIF_DEVICE void sgd(const unsigned long long* __restrict__ params, const unsigned long long* __restrict__ grads,
                    const unsigned long long* __restrict__ bufs, const unsigned long long* __restrict__ masters,
                    const long long* __restrict__ offsets, int tensors, float lr, float momentum, float wd,
                    const int* __restrict__ step, const float* __restrict__ norm, const float* __restrict__ clip) {
  if (!norm_ok(norm)) return;
  const float c = clip_factor(clip);
  const bool first = step[0] == 0;
  const long long total = offsets[tensors];
  for (long long e = blockIdx.x * (long long)kBlock + threadIdx.x; e < total; e += (long long)gridDim.x * kBlock) {
    int t;
    const Elem<T> x(params, masters, grads, offsets, tensors, e, t);
    const float w = x.value();
    float g = c * x.g + wd * w;
    if (momentum != 0.0f) {
      float* b = at<float>(bufs, t) + x.i;
      g = first ? g : momentum * *b + g;
      *b = g;
    }
    x.store(w - lr * g);
  }
}

template <typename T>
GIF_DEVICE void adamw(const unsigned long long* __restrict__ params, const unsigned long long* __restrict__ grads,
                      const unsigned long long* __restrict__ ms, const unsigned long long* __restrict__ vs,
                      const unsigned long long* __restrict__ masters, const long long* __restrict__ offsets,
                      int tensors, float lr, float beta1, float beta2, float eps, float wd,
                      const int* __restrict__ step, const float* __restrict__ norm, const float* __restrict__ clip) {
  if (!norm_ok(norm)) return;
  const float c = clip_factor(clip);
  const double tt = (double)step[0] + 1.0;
  const float bias1 = (float)(1.0 - pow((double)beta1, tt));
  const float bias2_sqrt = (float)sqrt(1.0 - pow((double)beta2, tt));
  const float step_size = lr / bias1;
  const long long total = offsets[tensors];
  for (long long e = blockIdx.x * (long long)kBlock + threadIdx.x; e < total; e += (long long)gridDim.x * kBlock) {
    int t;
    const Elem<T> x(params, masters, grads, offsets, tensors, e, t);
    const float g = c * x.g;
    float w = x.value() * (1.0f - lr * wd);
    float* m = at<float>(ms, t) + x.i;
    float* v = at<float>(vs, t) + x.i;
    const float mi = beta1 * *m + (1.0f - beta1) * g;
    const float vi = beta2 * *v + (1.0f - beta2) * g * g;
    *m = mi;
    *v = vi;
    const float denom = sqrtf(vi) / bias2_sqrt + eps;
    w -= step_size * (mi / denom);
    x.store(w);
  }
}

}  // namespace

// clang-format off
extern "C" __global__ void __launch_bounds__(kBlock) grad_sq_partial(const unsigned long long* grads, const int* in_clip, const long long* offsets, int tensors, double* partial) { sq_partial(grads, in_clip, offsets, tensors, partial); }
extern "C" __global__ void __launch_bounds__(32) grad_norm_finish(const double* partial, int blocks, float max_norm, float scale, float* norm, float* clip) { norm_finish(partial, blocks, max_norm, scale, norm, clip); }
extern "C" __global__ void __launch_bounds__(kBlock) sgd_step_f32(const unsigned long long* params, const unsigned long long* grads, const unsigned long long* bufs, const unsigned long long* masters, const long long* offsets, int tensors, float lr, float momentum, float wd, const int* step, const float* norm, const float* clip) { sgd<float>(params, grads, bufs, masters, offsets, tensors, lr, momentum, wd, step, norm, clip); }
extern "C" __global__ void __launch_bounds__(kBlock) sgd_step_bf16(const unsigned long long* params, const unsigned long long* grads, const unsigned long long* bufs, const unsigned long long* masters, const long long* offsets, int tensors, float lr, float momentum, float wd, const int* step, const float* norm, const float* clip) { sgd<bf16>(params, grads, bufs, masters, offsets, tensors, lr, momentum, wd, step, norm, clip); }
extern "C" __global__ void __launch_bounds__(kBlock) adamw_step_f32(const unsigned long long* params, const unsigned long long* grads, const unsigned long long* ms, const unsigned long long* vs, const unsigned long long* masters, const long long* offsets, int tensors, float lr, float beta1, float beta2, float eps, float wd, const int* step, const float* norm, const float* clip) { adamw<float>(params, grads, ms, vs, masters, offsets, tensors, lr, beta1, beta2, eps, wd, step, norm, clip); }
extern "C" __global__ void __launch_bounds__(kBlock) adamw_step_bf16(const unsigned long long* params, const unsigned long long* grads, const unsigned long long* ms, const unsigned long long* vs, const unsigned long long* masters, const long long* offsets, int tensors, float lr, float beta1, float beta2, float eps, float wd, const int* step, const float* norm, const float* clip) { adamw<bf16>(params, grads, ms, vs, masters, offsets, tensors, lr, beta1, beta2, eps, wd, step, norm, clip); }
extern "C" __global__ void __launch_bounds__(32) optim_advance(const float* norm, int* step, unsigned int* skipped) { if (threadIdx.x == 0 && blockIdx.x == 0) { if (norm_ok(norm)) step[0] += 1; else skipped[0] += 1; } }
// clang-format on
