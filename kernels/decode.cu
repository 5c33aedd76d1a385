// decode.cu: exact top-k over the valid codes of a prefix trie
// (src/decode.rs holds the CPU search, the beam search and the launch).
//
// decode_exact: one thread per query. For query b with log-probabilities
// lp[b, j, t] (B x l x v, row-major), the score of a code is
// S = (((lp[b,0,t0] + lp[b,1,t1]) + lp[b,2,t2]) + ...) in f32, summed in
// position order (the CPU sums the same way, so scores match bit for bit).
// The search is a depth-first branch and bound over the trie: a child is
// skipped when an upper bound of every f32 score below it is below the k-th
// best score found so far. With P the child's partial score and m_i the
// per-position maxima of the positions left, every completion scores at
// most P + Σ m_i up to the rounding of its f32 sum, and since t + γ|t| grows
// with t, at most  P + Σ m_i + rel·(|P| + Σ |m_i|)  (upper_bound below; rel
// covers l additions and the bound's own rounding, set by the launcher).
// It is −inf when P or a remaining maximum is −inf, so a −inf score prunes
// like any other and huge magnitudes elsewhere in a row do not widen it:
// nothing that could tie is pruned, and the result equals brute force. A
// NaN or +inf in a query's log-probabilities sets its ids to −2.
//
// Trie layout (per level j, concatenated over levels): node_ptr (CSR row
// pointers, nodes_j + 1 entries, starting at node_off[j]; edge indices are
// per level), token and child per edge (starting at edge_off[j]); the last
// level's child is the identity.
// Limits: l <= kMaxL, k <= kMaxK (the launcher checks). Grid: ceil(B/128)
// blocks of 128 threads. Cost per query: l·v reads for the bounds, then one
// read of lp and of the trie per visited edge.
#include "common.cuh"

namespace {
constexpr int kMaxL = 16;
constexpr int kMaxK = 64;

// suffix[j] = Σ_{i >= j} max_t p[i, t] and suffix_abs[j] = Σ_{i >= j} |max_t
// p[i, t]| for one query; sets *bad if a value is NaN or +inf.
// kWarp: the 32 lanes of a warp share the work (every lane gets the result);
// else one thread does it all.
template <bool kWarp>
GIF_DEVICE void query_bounds(const float* p, int l, int v, float* suffix, float* suffix_abs, bool* bad) {
  const int lane = kWarp ? (threadIdx.x & 31) : 0, stride = kWarp ? 32 : 1;
  suffix[l] = 0.0f;
  suffix_abs[l] = 0.0f;
  for (int j = l - 1; j >= 0; --j) {
    float m = -gif_inf();
    for (int t = lane; t < v; t += stride) {
      const float x = p[j * v + t];
      *bad |= x != x || x == gif_inf();
      m = fmaxf(m, x);
    }
    if constexpr (kWarp) m = warp_reduce(m, MaxOp{});
    suffix[j] = suffix[j + 1] + m;
    suffix_abs[j] = suffix_abs[j + 1] + fabsf(m);
  }
  if constexpr (kWarp) *bad = __any_sync(0xffffffffu, *bad);
}

// The upper bound of every f32 score below a prefix of partial score s with
// `suf` / `suf_abs` the sums over the positions left (see the header).
GIF_DEVICE float upper_bound(float s, float suf, float suf_abs, float rel) {
  if (s == -gif_inf() || suf == -gif_inf()) return -gif_inf();
  return s + suf + rel * (fabsf(s) + suf_abs) + 1e-30f;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(128)
    decode_exact(const float* __restrict__ lp, int b_rows, int l, int v, const unsigned* __restrict__ node_ptr,
                 const unsigned short* __restrict__ token, const unsigned* __restrict__ child,
                 const int* __restrict__ node_off, const int* __restrict__ edge_off, int k, float rel,
                 float* __restrict__ out_score, int* __restrict__ out_id) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= b_rows) return;
  const float* p = lp + (long long)q * l * v;
  float suffix[kMaxL + 1], suffix_abs[kMaxL + 1];
  bool bad = false;
  query_bounds<false>(p, l, v, suffix, suffix_abs, &bad);
  if (bad) {  // reported by the launcher as an error
    for (int i = 0; i < k; ++i) {
      out_score[(long long)q * k + i] = -gif_inf();
      out_id[(long long)q * k + i] = -2;
    }
    return;
  }
  float best_s[kMaxK];
  int best_id[kMaxK];
  int found = 0;
  unsigned cursor[kMaxL], end[kMaxL];
  float partial[kMaxL];
  int level = 0;
  cursor[0] = node_ptr[node_off[0]];
  end[0] = node_ptr[node_off[0] + 1];
  partial[0] = 0.0f;
  while (level >= 0) {
    if (cursor[level] == end[level]) {
      --level;
      continue;
    }
    const unsigned e = cursor[level]++;
    const int tok = token[edge_off[level] + e];
    const float s = partial[level] + p[level * v + tok];
    if (found == k && upper_bound(s, suffix[level + 1], suffix_abs[level + 1], rel) < best_s[k - 1]) continue;
    const unsigned c = child[edge_off[level] + e];
    if (level + 1 < l) {
      ++level;
      partial[level] = s;
      cursor[level] = node_ptr[node_off[level] + c];
      end[level] = node_ptr[node_off[level] + c + 1];
      continue;
    }
    // A leaf: identity c with score s. Insert in (score desc, id asc) order.
    const int id = (int)c;
    if (found == k && !(s > best_s[k - 1] || (s == best_s[k - 1] && id < best_id[k - 1]))) continue;
    int pos = found < k ? found++ : k - 1;
    while (pos > 0 && (s > best_s[pos - 1] || (s == best_s[pos - 1] && id < best_id[pos - 1]))) {
      best_s[pos] = best_s[pos - 1];
      best_id[pos] = best_id[pos - 1];
      --pos;
    }
    best_s[pos] = s;
    best_id[pos] = id;
  }
  for (int i = 0; i < k; ++i) {
    out_score[(long long)q * k + i] = i < found ? best_s[i] : -gif_inf();
    out_id[(long long)q * k + i] = i < found ? best_id[i] : -1;
  }
}

// decode_exact_warp: the same search with one warp per query (4 per
// 128-thread block, grid = ceil(B / 4)), so a batch keeps far more of the
// GPU busy than one thread per query. At each node the lanes evaluate up to
// 32 children at once (score, bound, prune test); the warp descends into the
// first surviving child and comes back for the rest (re-tested then, against
// the k-th score found meanwhile); at the last level all surviving leaves of
// a chunk are inserted in edge order. The top-k lives in shared memory, the
// search state in every lane's registers (uniform across the warp).
// decode_exact above is kept as the simplest correct version.
extern "C" __global__ void __launch_bounds__(128)
    decode_exact_warp(const float* __restrict__ lp, int b_rows, int l, int v, const unsigned* __restrict__ node_ptr,
                      const unsigned short* __restrict__ token, const unsigned* __restrict__ child,
                      const int* __restrict__ node_off, const int* __restrict__ edge_off, int k, float rel,
                      float* __restrict__ out_score, int* __restrict__ out_id) {
  __shared__ float s_best[4][kMaxK];
  __shared__ int s_id[4][kMaxK];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q = blockIdx.x * 4 + warp;
  if (q >= b_rows) return;  // the whole warp leaves together
  float* best_s = s_best[warp];
  int* best_id = s_id[warp];
  const float* p = lp + (long long)q * l * v;
  float suffix[kMaxL + 1], suffix_abs[kMaxL + 1];
  bool bad = false;
  query_bounds<true>(p, l, v, suffix, suffix_abs, &bad);
  if (bad) {
    for (int i = lane; i < k; i += 32) {
      out_score[(long long)q * k + i] = -gif_inf();
      out_id[(long long)q * k + i] = -2;
    }
    return;
  }
  int found = 0;
  unsigned cursor[kMaxL], end[kMaxL];
  float partial[kMaxL];
  int level = 0;
  cursor[0] = node_ptr[node_off[0]];
  end[0] = node_ptr[node_off[0] + 1];
  partial[0] = 0.0f;
  while (level >= 0) {
    if (cursor[level] >= end[level]) {
      --level;
      continue;
    }
    const unsigned e0 = cursor[level];
    const unsigned cnt = min(32u, end[level] - e0);
    const float kth = found == k ? best_s[k - 1] : -gif_inf();
    float s = -gif_inf();
    unsigned c = 0;
    bool pass = false;
    if ((unsigned)lane < cnt) {
      const unsigned e = edge_off[level] + e0 + lane;
      s = partial[level] + p[level * v + token[e]];
      c = child[e];
      pass = !(found == k && upper_bound(s, suffix[level + 1], suffix_abs[level + 1], rel) < kth);
    }
    unsigned mask = __ballot_sync(0xffffffffu, pass);
    if (level + 1 < l) {
      if (mask == 0) {
        cursor[level] = e0 + cnt;
        continue;
      }
      const int src = __ffs((int)mask) - 1;
      cursor[level] = e0 + src + 1;
      const float ss = __shfl_sync(0xffffffffu, s, src);
      const unsigned cc = __shfl_sync(0xffffffffu, c, src);
      ++level;
      partial[level] = ss;
      cursor[level] = node_ptr[node_off[level] + cc];
      end[level] = node_ptr[node_off[level] + cc + 1];
      continue;
    }
    cursor[level] = e0 + cnt;
    while (mask) {
      const int src = __ffs((int)mask) - 1;
      mask &= mask - 1;
      const float ss = __shfl_sync(0xffffffffu, s, src);
      const int id = (int)__shfl_sync(0xffffffffu, c, src);
      const bool ins = found < k || ss > best_s[k - 1] || (ss == best_s[k - 1] && id < best_id[k - 1]);
      __syncwarp();  // every lane has read the list before lane 0 changes it
      if (!ins) continue;  // uniform: every lane read the same values
      if (lane == 0) {
        int pos = found < k ? found : k - 1;
        while (pos > 0 && (ss > best_s[pos - 1] || (ss == best_s[pos - 1] && id < best_id[pos - 1]))) {
          best_s[pos] = best_s[pos - 1];
          best_id[pos] = best_id[pos - 1];
          --pos;
        }
        best_s[pos] = ss;
        best_id[pos] = id;
      }
      found = found < k ? found + 1 : k;
      __syncwarp();
    }
  }
  for (int i = lane; i < k; i += 32) {
    out_score[(long long)q * k + i] = i < found ? best_s[i] : -gif_inf();
    out_id[(long long)q * k + i] = i < found ? best_id[i] : -1;
  }
}

// decode_beam_warp: beam search, one warp per query (4 per block). Level by
// level, the children of the W kept prefixes are scored into shared memory
// and the W best (score descending, node ascending; the CPU's order) are
// kept by W rounds of a warp-wide argmax; at the last level the k best
// leaves are written. Dynamic shared memory per warp: 2·W + 2·C words for
// the beam and C = W·(most children of a node) candidates (the launcher
// sizes it; 4 warps per block).
extern "C" __global__ void __launch_bounds__(128)
    decode_beam_warp(const float* __restrict__ lp, int b_rows, int l, int v, const unsigned* __restrict__ node_ptr,
                     const unsigned short* __restrict__ token, const unsigned* __restrict__ child,
                     const int* __restrict__ node_off, const int* __restrict__ edge_off, int k, int w, int cap,
                     float* __restrict__ out_score, int* __restrict__ out_id) {
  GIF_DYNAMIC_SMEM(float, smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q = blockIdx.x * 4 + warp;
  if (q >= b_rows) return;
  const int per_warp = 2 * w + 2 * cap;
  float* beam_s = smem + warp * per_warp;
  unsigned* beam_n = reinterpret_cast<unsigned*>(beam_s + w);
  float* cand_s = beam_s + 2 * w;
  unsigned* cand_n = reinterpret_cast<unsigned*>(cand_s + cap);
  const float* p = lp + (long long)q * l * v;
  int nbeam = 1;
  if (lane == 0) {
    beam_s[0] = 0.0f;
    beam_n[0] = 0;
  }
  __syncwarp();
  bool bad = false;
  for (int level = 0; level < l; ++level) {
    // Gather every child of every beam (lanes stride over a beam's edges).
    int ncand = 0;
    for (int i = 0; i < nbeam; ++i) {
      const unsigned node = beam_n[i];
      const float base = beam_s[i];
      const unsigned lo = node_ptr[node_off[level] + node], hi = node_ptr[node_off[level] + node + 1];
      for (unsigned e = lo + lane; e < hi; e += 32) {
        const unsigned ge = edge_off[level] + e;
        const float x = p[level * v + token[ge]];
        bad |= x != x || x == gif_inf();
        cand_s[ncand + (e - lo)] = base + x;
        cand_n[ncand + (e - lo)] = child[ge];
      }
      ncand += (int)(hi - lo);
    }
    __syncwarp();
    const int keep = min(level + 1 == l ? k : w, ncand);
    // Select the `keep` best in order: repeated warp argmax, taking each winner out.
    for (int r = 0; r < keep; ++r) {
      float bs = -gif_inf();
      unsigned bn = 0xffffffffu;
      int bi = -1;
      for (int c = lane; c < ncand; c += 32) {
        const float s = cand_s[c];
        const unsigned n = cand_n[c];
        if (bi < 0 || s > bs || (s == bs && n < bn)) {
          bs = s;
          bn = n;
          bi = c;
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float os = __shfl_xor_sync(0xffffffffu, bs, o);
        const unsigned on = __shfl_xor_sync(0xffffffffu, bn, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || os > bs || (os == bs && on < bn))) {
          bs = os;
          bn = on;
          bi = oi;
        }
      }
      __syncwarp();
      if (lane == 0) {
        cand_s[bi] = -gif_inf();
        cand_n[bi] = 0xffffffffu;  // out of every later round
        if (level + 1 == l) {
          out_score[(long long)q * k + r] = bs;
          out_id[(long long)q * k + r] = (int)bn;
        } else {
          beam_s[r] = bs;  // the beam is read only before this selection
          beam_n[r] = bn;
        }
      }
      __syncwarp();
    }
    nbeam = keep;
    if (level + 1 == l)
      for (int i = keep + lane; i < k; i += 32) {
        out_score[(long long)q * k + i] = -gif_inf();
        out_id[(long long)q * k + i] = -1;
      }
  }
  if (__any_sync(0xffffffffu, bad) && lane == 0) out_id[(long long)q * k] = -2;
}
