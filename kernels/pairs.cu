// pairs.cu: all-pairs verification scoring on the device (src/eval/pairs.rs).
// A gallery's pair scores are made one tile at a time by the GEMM
// (S = E[rows]·E[cols]ᵀ); this kernel counts a tile's pairs into score
// histograms, so a 10^5-image gallery (5·10^9 pairs) never holds more than
// a tile of scores.
//
//   pair_histogram  for each (a, b) of the tile S [rows, cols] (row-major)
//                   whose gallery indices i = r0 + a < j = c0 + b (each
//                   unordered pair once, no self-pairs): bin =
//                   floor((s + 1) · 0.5 · bins) clamped to [0, bins), into
//                   pos[bin] when labels[i] == labels[j] else neg[bin]
//                   (u64); a score that is NaN or beyond ±1.001 (not
//                   unit rows, or not finite) into bad[0]. Counts gather in a
//                   shared u32 histogram per block (at most kMaxBins bins;
//                   a block sees at most rows·cols ≤ 2^31 pairs), then one
//                   atomicAdd per non-empty bin into the global u64 ones.
//
// Grid: any (grid-stride over the tile); 256 threads. Cost: one read of
// the tile, shared atomics per pair, 2·bins global atomics per block.
#include "common.cuh"

namespace {
constexpr int kBlock = 256;
constexpr int kMaxBins = 4096;
}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock)
    pair_histogram(const float* __restrict__ scores, int rows, int cols, long long r0, long long c0,
                   const unsigned int* __restrict__ labels, int bins, unsigned long long* __restrict__ pos,
                   unsigned long long* __restrict__ neg, unsigned long long* __restrict__ bad) {
  __shared__ unsigned int hist[2 * kMaxBins];
  for (int k = threadIdx.x; k < 2 * bins; k += kBlock) hist[k] = 0;
  __syncthreads();
  const long long total = (long long)rows * cols;
  unsigned int bads = 0;
  for (long long idx = (long long)blockIdx.x * kBlock + threadIdx.x; idx < total; idx += (long long)gridDim.x * kBlock) {
    const long long a = idx / cols, b = idx - a * cols;
    const long long i = r0 + a, j = c0 + b;
    if (i >= j) continue;
    const float s = scores[idx];
    if (!(fabsf(s) <= 1.001f)) {
      ++bads;
      continue;
    }
    int bin = (int)floorf((s + 1.0f) * 0.5f * (float)bins);
    bin = bin < 0 ? 0 : (bin >= bins ? bins - 1 : bin);
    atomicAdd(&hist[(labels[i] == labels[j] ? 0 : bins) + bin], 1u);
  }
  if (bads) atomicAdd(bad, (unsigned long long)bads);
  __syncthreads();
  for (int k = threadIdx.x; k < 2 * bins; k += kBlock) {
    const unsigned int c = hist[k];
    if (c) atomicAdd(k < bins ? &pos[k] : &neg[k - bins], (unsigned long long)c);
  }
}
