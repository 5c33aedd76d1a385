//! Hierarchical, capacity-constrained spherical k-means: unique codes of
//! exactly `l` tokens by construction.
//!
//! Level by level, every node (the identities sharing a prefix) is split
//! into at most v children by spherical k-means (centroids are normalized
//! means; a point goes to the centroid of largest dot product). A child at
//! remaining depth r can hold at most `v^(r−1)` identities, the codes left
//! below it, so every assignment is capacity-constrained: points take their
//! best centroid in order of decreasing score, and a point whose best child
//! is full takes its best child with room. A node holds at most `v^r`
//! identities (the root: N ≤ v^l), so there is always room, and at the last
//! level (capacity 1) every identity gets its own token: codes are unique.
//!
//! Scores for large nodes are a GEMM (points x centroids) and an argmax, on
//! the GPU when the device is one (or the simulator); small nodes run on
//! the CPU, many in parallel. Every random choice is seeded from the config
//! seed and the node, so the CPU path is deterministic.

use indicatif::ProgressBar;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

use super::config::Config;
use super::ops::{self, best_cpu, dot, score_rows, Best, CHUNK, CPU_GEMM_MIN};
use crate::error::Result;
use crate::runtime::device::Device;
use crate::runtime::tensor::Tensor;

/// Most bytes of per-chunk partial centroid sums (`k·d` f64 per chunk),
/// unless one chunk's sums alone are larger (then there is one chunk).
pub const PARTIAL_BUDGET: usize = 1 << 26;

/// `v^e`, saturating (O(1): `e` may be up to the code length).
fn pow_sat(v: usize, e: usize) -> usize {
    u32::try_from(e).ok().and_then(|e| v.checked_pow(e)).unwrap_or(usize::MAX)
}

fn node_seed(seed: u64, level: usize, first: u32) -> u64 {
    let mut z = seed ^ ((level as u64) << 56) ^ (first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// The GPU side of assignment: all vectors on the device, uploaded once.
pub(crate) struct DeviceData {
    all: Tensor,
}

impl DeviceData {
    pub(crate) fn new(device: &Device, vectors: &[f32], n: usize, d: usize) -> Result<DeviceData> {
        Ok(DeviceData { all: Tensor::from_slice(device, &[n, d], vectors)? })
    }

    /// The members' rows, gathered on the device once per node (they do not
    /// change across the node's Lloyd iterations), in chunks whose scores
    /// against k centroids stay within [`ops::SCORE_BUDGET`].
    fn gather(&self, members: &[u32], k: usize) -> Result<Vec<Tensor>> {
        members.chunks(score_rows(k)).map(|c| crate::ops::rows::gather_rows(&self.all, c)).collect()
    }
}

/// Best centroid of every row of `xs` (a node's gathered members on the
/// device, in chunks): one small upload of the centroids, then a GEMM and
/// an argmax per chunk.
fn best_device(xs: &[Tensor], centroids: &[f32], k: usize, d: usize) -> Result<Best> {
    let Some(first) = xs.first() else { return Ok(Best { idx: Vec::new(), score: Vec::new() }) };
    let c = Tensor::from_slice(first.device(), &[k, d], centroids)?;
    let mut best = Best { idx: Vec::new(), score: Vec::new() };
    for x in xs {
        let (idx, score) = ops::best_centroids(x, &c)?;
        best.idx.extend(idx);
        best.score.extend(score);
    }
    Ok(best)
}

/// Capacity-constrained assignment: members in order of decreasing best
/// score keep their best cluster while it has room; the rest take their
/// best cluster with room. Returns the cluster of each member.
fn constrain(
    vectors: &[f32],
    d: usize,
    members: &[u32],
    centroids: &[f32],
    k: usize,
    cap: usize,
    best: &Best,
) -> Vec<u32> {
    let mut counts = vec![0usize; k];
    for &c in &best.idx {
        counts[c as usize] += 1;
    }
    if counts.iter().all(|&c| c <= cap) {
        return best.idx.clone();
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| best.score[b].total_cmp(&best.score[a]).then(a.cmp(&b)));
    let mut room = vec![cap; k];
    let mut out = vec![u32::MAX; members.len()];
    let mut deferred = Vec::new();
    for &p in &order {
        let c = best.idx[p] as usize;
        if room[c] > 0 {
            room[c] -= 1;
            out[p] = c as u32;
        } else {
            deferred.push(p);
        }
    }
    for p in deferred {
        let i = members[p] as usize;
        let x = &vectors[i * d..(i + 1) * d];
        let mut cands: Vec<(f32, usize)> = (0..k).map(|c| (dot(x, &centroids[c * d..(c + 1) * d]), c)).collect();
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // There is room: the node holds at most k·cap members.
        let c = cands.iter().find(|(_, c)| room[*c] > 0).map_or(0, |&(_, c)| c);
        room[c] -= 1;
        out[p] = c as u32;
    }
    out
}

/// Normalized means of the clusters (f64 sums in member order); an empty
/// cluster keeps its centroid.
fn update_centroids(vectors: &[f32], d: usize, members: &[u32], assign: &[u32], centroids: &mut [f32], k: usize) {
    // Fixed chunks summed in order: the same result for any thread count.
    // Chunks of at least CHUNK members, fewer when the k·d partial sums of
    // every chunk would pass PARTIAL_BUDGET (a large vocabulary).
    let chunks = (PARTIAL_BUDGET / (k * d * 8).max(1)).clamp(1, members.len().div_ceil(CHUNK).max(1));
    let size = members.len().div_ceil(chunks).max(1);
    let partial: Vec<Vec<f64>> = members
        .par_chunks(size)
        .zip(assign.par_chunks(size))
        .map(|(ms, asg)| {
            let mut sums = vec![0f64; k * d];
            for (&i, &c) in ms.iter().zip(asg) {
                let x = &vectors[i as usize * d..(i as usize + 1) * d];
                for (s, &v) in sums[c as usize * d..(c as usize + 1) * d].iter_mut().zip(x) {
                    *s += v as f64;
                }
            }
            sums
        })
        .collect();
    for c in 0..k {
        let mut sum = vec![0f64; d];
        for p in &partial {
            for (s, &v) in sum.iter_mut().zip(&p[c * d..(c + 1) * d]) {
                *s += v;
            }
        }
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            for (o, s) in centroids[c * d..(c + 1) * d].iter_mut().zip(&sum) {
                *o = (s / norm) as f32;
            }
        }
    }
}

/// Splits one node: the child token of each member.
#[allow(clippy::too_many_arguments)]
fn split(
    vectors: &[f32],
    d: usize,
    members: &[u32],
    v: usize,
    cap: usize,
    iters: usize,
    seed: u64,
    gpu: Option<(&DeviceData, usize)>,
) -> Result<Vec<u32>> {
    let n = members.len();
    if cap == 1 || n == 1 {
        // Every member needs its own child (n <= v here), or there is one member.
        return Ok((0..n as u32).collect());
    }
    let k = v.min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut centroids = vec![0f32; k * d];
    for (c, p) in sample(&mut rng, n, k).into_iter().enumerate() {
        let i = members[p] as usize;
        centroids[c * d..(c + 1) * d].copy_from_slice(&vectors[i * d..(i + 1) * d]);
    }
    let on_gpu = match gpu.filter(|(_, min)| n >= *min) {
        Some((g, _)) => Some(g.gather(members, k)?),
        None => None,
    };
    let mut assign: Vec<u32> = Vec::new();
    for it in 0..iters.max(1) {
        let best = match &on_gpu {
            Some(x) => best_device(x, &centroids, k, d)?,
            None => best_cpu(vectors, d, members, &centroids, k),
        };
        let next = constrain(vectors, d, members, &centroids, k, cap, &best);
        let done = next == assign;
        assign = next;
        if done || it + 1 == iters.max(1) {
            break;
        }
        update_centroids(vectors, d, members, &assign, &mut centroids, k);
    }
    Ok(assign)
}

/// Codes for all `n` identities (row-major `[n, l]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assign_codes(
    vectors: &[f32],
    n: usize,
    d: usize,
    l: usize,
    cfg: &Config,
    gpu: Option<&DeviceData>,
    bar: &ProgressBar,
) -> Result<Vec<u16>> {
    let v = cfg.vocab;
    // n·l was checked by tokenize; the allocation may still be refused.
    let mut codes = crate::runtime::host_memory::try_filled("tokenize", "the codes", n * l, 0u16)?;
    // Members of the nodes of the current level, node after node.
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut bounds: Vec<(usize, usize)> = vec![(0, n)];
    bar.set_length(l as u64);
    for j in 0..l {
        let cap = pow_sat(v, l - j - 1);
        let gpu_arg = gpu.map(|g| (g, cfg.gpu_min_rows));
        let big: Vec<usize> = (0..bounds.len()).filter(|&b| bounds[b].1 - bounds[b].0 >= CPU_GEMM_MIN).collect();
        let mut tokens: Vec<Option<Vec<u32>>> = vec![None; bounds.len()];
        // Large nodes one after another (each uses all cores or the GPU) ...
        for &b in &big {
            let (s, e) = bounds[b];
            tokens[b] = Some(split(
                vectors,
                d,
                &perm[s..e],
                v,
                cap,
                cfg.kmeans_iters,
                node_seed(cfg.seed, j, perm[s]),
                gpu_arg,
            )?);
        }
        // ... small ones in parallel.
        let small: Vec<(usize, Result<Vec<u32>>)> = (0..bounds.len())
            .into_par_iter()
            .filter(|&b| tokens[b].is_none())
            .map(|b| {
                let (s, e) = bounds[b];
                (b, split(vectors, d, &perm[s..e], v, cap, cfg.kmeans_iters, node_seed(cfg.seed, j, perm[s]), gpu_arg))
            })
            .collect();
        for (b, t) in small {
            tokens[b] = Some(t?);
        }
        // Record the tokens and regroup each node's members by child (stable).
        let mut next_bounds = Vec::with_capacity(bounds.len() * 2);
        for (b, &(s, e)) in bounds.iter().enumerate() {
            let tok = tokens[b].take().expect("every node was split above");
            for (&i, &t) in perm[s..e].iter().zip(&tok) {
                codes[i as usize * l + j] = t as u16;
            }
            let mut order: Vec<usize> = (0..e - s).collect();
            order.sort_by_key(|&p| tok[p]); // stable: members keep their order within a child
            let seg: Vec<u32> = order.iter().map(|&p| perm[s + p]).collect();
            let mut start = s;
            for (q, &p) in order.iter().enumerate() {
                if q + 1 == order.len() || tok[order[q + 1]] != tok[p] {
                    next_bounds.push((start, s + q + 1));
                    start = s + q + 1;
                }
            }
            perm[s..e].copy_from_slice(&seg);
        }
        bounds = next_bounds;
        bar.inc(1);
    }
    Ok(codes)
}
