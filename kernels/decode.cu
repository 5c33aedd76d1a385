// decode.cu: exact top-k over the valid codes of a prefix trie
// (src/decode.rs holds the CPU search, the beam search and the launch).
//
// decode_exact: one thread per query. For query b with log-probabilities
// lp[b, j, t] (B x l x v, row-major), the score of a code is
// S = (((lp[b,0,t0] + lp[b,1,t1]) + lp[b,2,t2]) + ...) in f32, summed in
// position order (the CPU sums the same way, so scores match bit for bit).
// The search is a depth-first branch and bound over the trie: a child is
// skipped when its partial score plus the sum of per-position maxima over
// the remaining positions (an admissible bound), plus `slack`, is below the
// k-th best score found so far. The k best are kept sorted by score
// descending, then identity ascending. slack (relative, times 1 + Σ_j max
// |lp|) absorbs the rounding between the f32 bound and an f32 score (a few
// ulps), so nothing that could tie is pruned: the result equals brute
// force. A NaN in a query's log-probabilities sets its ids to -2.
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
}  // namespace

extern "C" __global__ void __launch_bounds__(128)
    decode_exact(const float* __restrict__ lp, int b_rows, int l, int v, const unsigned* __restrict__ node_ptr,
                 const unsigned short* __restrict__ token, const unsigned* __restrict__ child,
                 const int* __restrict__ node_off, const int* __restrict__ edge_off, int k, float slack,
                 float* __restrict__ out_score, int* __restrict__ out_id) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= b_rows) return;
  const float* p = lp + (long long)q * l * v;
  // suffix[j] = Σ_{i >= j} max_t lp[i, t]
  float suffix[kMaxL + 1];
  suffix[l] = 0.0f;
  float mag = 0.0f;
  bool nan = false;
  for (int j = l - 1; j >= 0; --j) {
    float m = -gif_inf(), a = 0.0f;
    for (int t = 0; t < v; ++t) {
      const float x = p[j * v + t];
      nan |= x != x;
      m = fmaxf(m, x);
      a = fmaxf(a, fabsf(x));
    }
    suffix[j] = suffix[j + 1] + m;
    mag += a;
  }
  if (nan) {  // reported by the launcher as an error
    for (int i = 0; i < k; ++i) {
      out_score[(long long)q * k + i] = -gif_inf();
      out_id[(long long)q * k + i] = -2;
    }
    return;
  }
  slack *= 1.0f + mag;
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
    if (found == k && s + suffix[level + 1] + slack < best_s[k - 1]) continue;
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
