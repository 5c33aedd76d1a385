// labels.cu: a batch's class labels, checked and converted on the device
// (src/ops/labels.rs), so that labels a framework holds on the GPU (u32, or
// i64 as PyTorch stores them) never travel to the host.
//
//   labels_check_<L>  out[b] = labels[b] when 0 <= labels[b] < n, else 0 and
//                     bad = max(bad, 0xFFFFFFFF - b): the first bad sample
//                     gives the largest value, and a zeroed flag (a memset,
//                     no upload) means none; with codes
//                     ([n, length] u16, the identity codes) also
//                     targets[j·B + b] = codes[out[b]·length + j]
//                     (position-major: position j's B targets together).
//                     L = u32 or i64.
//
// A bad label becomes class 0, so the kernels downstream never index out
// of range; the step's metrics carry `bad`, and reading them reports the
// error (no host synchronization inside the step). Grid: one thread per
// sample (grid = ceil(B / 256)). Cost: B reads, B + l·B writes.
#include "common.cuh"

namespace {
constexpr int kBlock = 256;

template <typename L>
GIF_DEVICE void labels_check(const L* __restrict__ labels, int batch, long long n, const unsigned short* __restrict__ codes,
                             int length, int* __restrict__ out, int* __restrict__ targets, unsigned int* __restrict__ bad) {
  const int b = blockIdx.x * kBlock + threadIdx.x;
  if (b >= batch) return;
  const long long y = (long long)labels[b];
  const bool ok = y >= 0 && y < n;
  const long long c = ok ? y : 0;
  if (!ok) atomicMax(bad, 0xFFFFFFFFu - (unsigned int)b);
  out[b] = (int)c;
  if (codes)
    for (int j = 0; j < length; ++j) targets[(long long)j * batch + b] = (int)codes[c * length + j];
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock)
    labels_check_u32(const unsigned int* __restrict__ labels, int batch, long long n,
                     const unsigned short* __restrict__ codes, int length, int* __restrict__ out,
                     int* __restrict__ targets, unsigned int* __restrict__ bad) {
  labels_check(labels, batch, n, codes, length, out, targets, bad);
}

extern "C" __global__ void __launch_bounds__(kBlock)
    labels_check_i64(const long long* __restrict__ labels, int batch, long long n,
                     const unsigned short* __restrict__ codes, int length, int* __restrict__ out,
                     int* __restrict__ targets, unsigned int* __restrict__ bad) {
  labels_check(labels, batch, n, codes, length, out, targets, bad);
}
