//! Identification over valid codes: given per-position log-probabilities
//! (`[B, l, v]`, from `CodeHead::log_probs`), the k best codes that belong
//! to real identities, by the prefix trie of a codebook (kernels/decode.cu).
//!
//! The score of a code is the sum of its tokens' log-probabilities over the
//! positions, in f32, added in position order (every path sums the same
//! way, so results match bit for bit). Results are ordered by score
//! descending, then identity ascending.
//!
//! - [`Mode::Exact`]: branch and bound with the admissible bound "partial
//!   score + Σ per-position maxima over the remaining positions" (best-first
//!   on the CPU, depth-first on the GPU); equals brute force.
//! - [`Mode::Beam`]`(W)`: keeps the W best prefixes per level; cheaper, not
//!   exact (see `decoder_recall` in benches/decode.rs).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use crate::ops::topk::TopK;
use crate::ops::topk::{pack, score_cmp};
use crate::runtime::device::{Device, DeviceBuffer, LaunchConfig};
use crate::runtime::kernels::{Ptr, PtrMut};
use crate::runtime::launch;
use crate::runtime::tensor::{DType, Tensor};
use crate::tokenizer::{Codebook, Trie};

/// Longest code and largest k the GPU kernel takes (kernels/decode.cu).
pub const MAX_LENGTH: usize = 16;
/// Largest k of the GPU kernel.
pub const MAX_K: usize = 64;
/// Widest beam the GPU kernel takes (wider beams run on the CPU).
pub const MAX_BEAM: usize = 64;

/// The relative rounding slack of the exact search's bound for codes of
/// length `l`: at least 4·(l + 2) units in the last place of f32, so that it
/// covers the rounding of an f32 sum of l terms and of the bound itself
/// (kernels/decode.cu, `upper_bound`).
fn slack_rel(l: usize) -> f32 {
    (4.0 * (l as f32 + 2.0) * f32::EPSILON / 2.0).max(1e-5)
}

/// Search mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Exact top-k.
    Exact,
    /// Beam search keeping this many prefixes per level (at least k).
    Beam(usize),
}

struct DeviceTrie {
    node_ptr: DeviceBuffer,
    token: DeviceBuffer,
    child: DeviceBuffer,
    node_off: DeviceBuffer,
    edge_off: DeviceBuffer,
}

/// The trie's buffers as the search kernels take them.
type TriePtrs = (Ptr<u32>, Ptr<u16>, Ptr<u32>, Ptr<i32>, Ptr<i32>);

impl DeviceTrie {
    fn ptrs(&self, dev: &Device) -> TriePtrs {
        (
            dev.ptr_of(&self.node_ptr),
            dev.ptr_of(&self.token),
            dev.ptr_of(&self.child),
            dev.ptr_of(&self.node_off),
            dev.ptr_of(&self.edge_off),
        )
    }
}

/// A codebook's trie, ready for batched decoding on a device (uploaded
/// once).
pub struct PrefixDecoder {
    n: usize,
    length: usize,
    vocab: usize,
    trie: Trie,
    codes: Vec<u16>,
    /// Most children of any node (sizes the beam kernel's shared memory).
    max_children: usize,
    device: Device,
    gpu: Option<DeviceTrie>,
}

impl PrefixDecoder {
    /// The decoder of `book` on `device` (the codes and the trie copied;
    /// [`PrefixDecoder::from_codebook`] takes them without a copy).
    pub fn new(book: &Codebook, device: &Device) -> Result<PrefixDecoder> {
        let (n, length, vocab) = (book.len(), book.length(), book.vocab());
        PrefixDecoder::build(n, length, vocab, book.codes().to_vec(), book.trie().clone(), device)
    }

    /// The decoder of `book` on `device`, keeping the codebook's codes and
    /// trie (its vectors, unread when it was loaded from a file, are
    /// dropped).
    pub fn from_codebook(book: Codebook, device: &Device) -> Result<PrefixDecoder> {
        let (n, length, vocab) = (book.len(), book.length(), book.vocab());
        let (codes, trie) = book.into_codes_and_trie();
        PrefixDecoder::build(n, length, vocab, codes, trie, device)
    }

    fn build(
        n: usize,
        length: usize,
        vocab: usize,
        codes: Vec<u16>,
        trie: Trie,
        device: &Device,
    ) -> Result<PrefixDecoder> {
        let gpu = if device.runs_kernels() {
            let cat_u32 = |v: &[Vec<u32>]| v.iter().flatten().copied().collect::<Vec<u32>>();
            let tokens: Vec<u16> = trie.token.iter().flatten().copied().collect();
            let mut node_off = vec![0i32];
            let mut edge_off = vec![0i32];
            for j in 0..length {
                node_off.push(node_off[j] + trie.node_ptr[j].len() as i32);
                edge_off.push(edge_off[j] + trie.token[j].len() as i32);
            }
            Some(DeviceTrie {
                node_ptr: device.upload(bytemuck::cast_slice(&cat_u32(&trie.node_ptr)))?,
                token: device.upload(bytemuck::cast_slice(&tokens))?,
                child: device.upload(bytemuck::cast_slice(&cat_u32(&trie.child)))?,
                node_off: device.upload(bytemuck::cast_slice(&node_off))?,
                edge_off: device.upload(bytemuck::cast_slice(&edge_off))?,
            })
        } else {
            None
        };
        let max_children =
            trie.node_ptr.iter().flat_map(|p| p.windows(2).map(|w| (w[1] - w[0]) as usize)).max().unwrap_or(1);
        Ok(PrefixDecoder { max_children, n, length, vocab, trie, codes, device: device.clone(), gpu })
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The k best valid codes of every query of `log_probs` (`[B, l·v]` or
    /// `[B, l, v]`, f32, on the decoder's device), with an optional open-set
    /// threshold on the best score (every id of a query whose best score is
    /// below it becomes −1). Errors: k = 0 or k > N, a beam narrower than
    /// k, a shape, dtype or device that does not match, a NaN or +inf
    /// log-probability (−inf is allowed: a token that cannot occur), a NaN
    /// threshold.
    pub fn top_k(&self, log_probs: &Tensor, k: usize, mode: Mode, threshold: Option<f32>) -> Result<TopK> {
        const OP: &str = "PrefixDecoder::top_k";
        let b = self.check(OP, log_probs, k)?;
        let (l, v) = (self.length, self.vocab);
        if let Mode::Beam(w) = mode {
            if w < k {
                return Err(Error::invalid(OP, format!("the beam width ({w}) must be at least k ({k})")));
            }
        }
        if threshold.is_some_and(f32::is_nan) {
            return Err(Error::invalid(OP, "the threshold is NaN"));
        }
        let beam_smem = |w: usize| 4 * (2 * w + 2 * w * self.max_children) * 4;
        let mut out = match (&self.gpu, mode) {
            (Some(g), Mode::Exact) if k <= MAX_K && l <= MAX_LENGTH => self.exact_device(g, log_probs, b, k)?,
            (Some(g), Mode::Beam(w)) if w <= MAX_BEAM && beam_smem(w) <= 200 * 1024 => {
                self.beam_device(g, log_probs, b, k, w)?
            }
            _ => {
                let lp = log_probs.to_vec::<f32>()?;
                if let Some(i) = lp.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "log-probability {} of query {} is {} (NaN and +inf are not log-probabilities)",
                            i % (l * v),
                            i / (l * v),
                            lp[i]
                        ),
                    ));
                }
                let rel = slack_rel(l);
                let rows: Vec<Vec<(f32, u32)>> = lp
                    .par_chunks(l * v)
                    .map(|q| match mode {
                        Mode::Exact => cpu::exact(q, &self.trie, l, v, k, rel),
                        Mode::Beam(w) => cpu::beam(q, &self.trie, l, v, k, w),
                    })
                    .collect();
                pack(&rows, k)
            }
        };
        if let Some(t) = threshold {
            for q in 0..b {
                if out.scores[q * k].is_nan() || out.scores[q * k] < t {
                    out.ids[q * k..(q + 1) * k].fill(-1);
                }
            }
        }
        Ok(out)
    }

    /// The one validation of a batch of log-probabilities and k: returns B.
    fn check(&self, op: &'static str, log_probs: &Tensor, k: usize) -> Result<usize> {
        let (l, v) = (self.length, self.vocab);
        let b = match log_probs.shape() {
            [b, lv] if Some(*lv) == l.checked_mul(v) => *b,
            [b, ll, vv] if *ll == l && *vv == v => *b,
            s => {
                return Err(Error::Shape {
                    op,
                    expected: format!("[B, {l}, {v}] or [B, {}]", l * v),
                    got: format!("{s:?}"),
                })
            }
        };
        if log_probs.dtype() != DType::F32 {
            return Err(Error::DType { op, expected: DType::F32, got: log_probs.dtype() });
        }
        if log_probs.device() != &self.device {
            return Err(Error::DeviceMismatch { op, a: self.device.to_string(), b: log_probs.device().to_string() });
        }
        if k == 0 || k > self.n {
            return Err(Error::invalid(op, format!("k must be in 1..={}, got {k}", self.n)));
        }
        if b > i32::MAX as usize / k {
            return Err(Error::invalid(op, format!("B·k = {b}·{k} results do not fit the kernels' int indices")));
        }
        Ok(b)
    }

    fn exact_device(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize) -> Result<TopK> {
        self.exact_kernel(g, log_probs, b, k, true)
    }

    /// Runs `decode_exact_warp` (a warp per query) or, with `warp` false,
    /// the simpler `decode_exact` (a thread per query).
    fn exact_kernel(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize, warp: bool) -> Result<TopK> {
        let dev = &self.device;
        let (l, v, rel) = (self.length as i32, self.vocab as i32, slack_rel(self.length));
        let lp = log_probs.ptr()?;
        let t = g.ptrs(dev);
        self.search(b, k, |scores, ids| {
            // SAFETY: lp is [B, l, v] (checked by `check`); the trie buffers
            // are the codebook's (uploaded by `new`, consistent by
            // construction); scores and ids hold B·k entries; l ≤ MAX_LENGTH
            // and k ≤ MAX_K (the kernels' arrays).
            unsafe {
                if warp {
                    let cfg = LaunchConfig::linear(b.div_ceil(4) as u32, 128, 0);
                    launch::decode_exact_warp(
                        dev, cfg, lp, b as i32, l, v, t.0, t.1, t.2, t.3, t.4, k as i32, rel, scores, ids,
                    )
                } else {
                    let cfg = LaunchConfig::linear(b.div_ceil(128) as u32, 128, 0);
                    launch::decode_exact(
                        dev, cfg, lp, b as i32, l, v, t.0, t.1, t.2, t.3, t.4, k as i32, rel, scores, ids,
                    )
                }
            }
        })
    }

    fn beam_device(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize, w: usize) -> Result<TopK> {
        let dev = &self.device;
        let cap = w * self.max_children;
        let smem = 4 * (2 * w + 2 * cap) * 4;
        let (l, v) = (self.length as i32, self.vocab as i32);
        let lp = log_probs.ptr()?;
        let t = g.ptrs(dev);
        self.search(b, k, |scores, ids| {
            let cfg = LaunchConfig::linear(b.div_ceil(4) as u32, 128, smem as u32);
            // SAFETY: as in exact_kernel; the dynamic shared memory holds 4
            // warps' beams of w and candidates of cap = w·(most children).
            unsafe {
                launch::decode_beam_warp(
                    dev, cfg, lp, b as i32, l, v, t.0, t.1, t.2, t.3, t.4, k as i32, w as i32, cap as i32, scores, ids,
                )
            }
        })
    }

    /// Allocates the `[B, k]` results, runs `run(scores, ids)` (one of the
    /// search kernels), downloads them and turns the kernels' NaN/+inf flag
    /// (id −2) into an error.
    fn search(&self, b: usize, k: usize, run: impl FnOnce(PtrMut<f32>, PtrMut<i32>) -> Result<()>) -> Result<TopK> {
        let dev = &self.device;
        if b == 0 {
            return Ok(TopK { k, ids: Vec::new(), scores: Vec::new() });
        }
        let mut scores = Tensor::empty(dev, &[b, k], DType::F32)?;
        let mut ids = dev.alloc(b * k * 4)?;
        run(scores.ptr_mut()?, dev.ptr_mut_of(&mut ids))?;
        let ids: Vec<i32> = bytemuck::pod_collect_to_vec(&dev.download(&ids, b * k * 4)?);
        if let Some(q) = ids.chunks(k).position(|r| r[0] == -2) {
            return Err(Error::invalid(
                "PrefixDecoder::top_k",
                format!("the log-probabilities of query {q} hold a NaN or +inf"),
            ));
        }
        Ok(TopK { k, ids: ids.into_iter().map(i64::from).collect(), scores: scores.to_vec::<f32>()? })
    }

    /// Exact top-k with the thread-per-query kernel (`decode_exact`), the
    /// simplest correct GPU version, kept as the reference of the
    /// warp-per-query kernel that [`PrefixDecoder::top_k`] uses. The same
    /// checks as [`PrefixDecoder::top_k`], and k ≤ [`MAX_K`], l ≤
    /// [`MAX_LENGTH`], a GPU or the simulator.
    pub fn top_k_thread_per_query(&self, log_probs: &Tensor, k: usize) -> Result<TopK> {
        const OP: &str = "top_k_thread_per_query";
        let b = self.check(OP, log_probs, k)?;
        let g = self.gpu.as_ref().ok_or_else(|| Error::invalid(OP, "needs a GPU or the simulator"))?;
        if k > MAX_K || self.length > MAX_LENGTH {
            return Err(Error::invalid(
                OP,
                format!("the kernel takes k <= {MAX_K} and l <= {MAX_LENGTH}, got k = {k}, l = {}", self.length),
            ));
        }
        self.exact_kernel(g, log_probs, b, k, false)
    }

    /// Brute force: every identity's code scored, the k best kept (the
    /// reference of the exact mode, and the O(N) baseline of the benches).
    /// `log_probs` holds B queries of `l·v` values on the host. Errors: k
    /// outside 1..=N, a length that is not a whole number of queries.
    pub fn brute_force(&self, log_probs: &[f32], k: usize) -> Result<TopK> {
        const OP: &str = "PrefixDecoder::brute_force";
        let (l, v) = (self.length, self.vocab);
        if k == 0 || k > self.n {
            return Err(Error::invalid(OP, format!("k must be in 1..={}, got {k}", self.n)));
        }
        if !log_probs.len().is_multiple_of(l * v) {
            return Err(Error::Shape {
                op: OP,
                expected: format!("queries of l·v = {} values", l * v),
                got: format!("{} values", log_probs.len()),
            });
        }
        let rows: Vec<Vec<(f32, u32)>> = log_probs
            .par_chunks(l * v)
            .map(|q| {
                let mut all: Vec<(f32, u32)> = (0..self.n)
                    .map(|id| {
                        let mut s = 0f32;
                        for (j, &t) in self.codes[id * l..(id + 1) * l].iter().enumerate() {
                            s += q[j * v + t as usize];
                        }
                        (s, id as u32)
                    })
                    .collect();
                all.select_nth_unstable_by(k - 1, score_cmp);
                all.truncate(k);
                all.sort_by(score_cmp);
                all
            })
            .collect();
        Ok(pack(&rows, k))
    }
}

/// The CPU searches, one query at a time (`q` is its `[l, v]` log-probs,
/// without NaN or +inf; the trie is a codebook's, k ≥ 1: checked by
/// [`PrefixDecoder::top_k`]).
mod cpu {
    use super::*;

    /// `suffix[j] = Σ_{i ≥ j} max_t q[i, t]` and `suffix_abs[j] = Σ_{i ≥ j}
    /// |max_t q[i, t]|`.
    fn bounds(q: &[f32], l: usize, v: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut suffix, mut suffix_abs) = (vec![0f32; l + 1], vec![0f32; l + 1]);
        for j in (0..l).rev() {
            let m = q[j * v..(j + 1) * v].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            suffix[j] = suffix[j + 1] + m;
            suffix_abs[j] = suffix_abs[j + 1] + m.abs();
        }
        (suffix, suffix_abs)
    }

    /// An upper bound of the f32 score of every code below a prefix of
    /// partial score `s`, as kernels/decode.cu's `upper_bound`: `s + Σ m_i`
    /// plus `rel·(|s| + Σ |m_i|)` for rounding, −inf when any term is.
    fn upper_bound(s: f32, suf: f32, suf_abs: f32, rel: f32) -> f32 {
        if s == f32::NEG_INFINITY || suf == f32::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        s + suf + rel * (s.abs() + suf_abs) + 1e-30
    }

    #[derive(PartialEq)]
    struct Entry {
        bound: f32,
        partial: f32,
        level: usize,
        node: u32,
    }
    impl Eq for Entry {}
    impl Ord for Entry {
        fn cmp(&self, o: &Self) -> Ordering {
            self.bound.total_cmp(&o.bound).then(o.node.cmp(&self.node)).then(o.level.cmp(&self.level))
        }
    }
    impl PartialOrd for Entry {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }

    /// A found identity; the max-heap of them has the worst on top.
    #[derive(PartialEq)]
    struct Found(f32, u32);
    impl Eq for Found {}
    impl Ord for Found {
        fn cmp(&self, o: &Self) -> Ordering {
            score_cmp(&(self.0, self.1), &(o.0, o.1))
        }
    }
    impl PartialOrd for Found {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }

    /// Exact top-k by best-first search; level `l` entries are identities.
    /// The k best so far are a bounded heap, so a query costs O(visited ·
    /// log) even when nothing can be pruned (−inf scores, ties).
    pub(super) fn exact(q: &[f32], trie: &Trie, l: usize, v: usize, k: usize, rel: f32) -> Vec<(f32, u32)> {
        exact_counted(q, trie, l, v, k, rel).0
    }

    /// [`exact`], and how many entries it pushed (its work, for tests).
    pub(super) fn exact_counted(
        q: &[f32],
        trie: &Trie,
        l: usize,
        v: usize,
        k: usize,
        rel: f32,
    ) -> (Vec<(f32, u32)>, usize) {
        let (suffix, suffix_abs) = bounds(q, l, v);
        let mut pushed = 1usize;
        let mut heap = BinaryHeap::new();
        heap.push(Entry { bound: upper_bound(0.0, suffix[0], suffix_abs[0], rel), partial: 0.0, level: 0, node: 0 });
        let mut found: BinaryHeap<Found> = BinaryHeap::with_capacity(k + 1);
        // The k-th best score once k are found: nothing bounded below it can enter.
        let kth = |found: &BinaryHeap<Found>| if found.len() == k { found.peek().map(|f| f.0) } else { None };
        while let Some(e) = heap.pop() {
            if kth(&found).is_some_and(|t| e.bound < t) {
                break; // every entry left is bounded by e.bound
            }
            if e.level == l {
                found.push(Found(e.partial, e.node));
                if found.len() > k {
                    found.pop();
                }
                continue;
            }
            let j = e.level;
            let (lo, hi) = (trie.node_ptr[j][e.node as usize] as usize, trie.node_ptr[j][e.node as usize + 1] as usize);
            let cut = kth(&found);
            for edge in lo..hi {
                let s = e.partial + q[j * v + trie.token[j][edge] as usize];
                let bound = if j + 1 == l { s } else { upper_bound(s, suffix[j + 1], suffix_abs[j + 1], rel) };
                if cut.is_some_and(|t| bound < t) {
                    continue;
                }
                heap.push(Entry { bound, partial: s, level: j + 1, node: trie.child[j][edge] });
                pushed += 1;
            }
        }
        let mut out: Vec<(f32, u32)> = found.into_iter().map(|f| (f.0, f.1)).collect();
        out.sort_by(score_cmp);
        (out, pushed)
    }

    /// Beam search keeping the `w` best prefixes (by partial score, then
    /// node) per level.
    pub(super) fn beam(q: &[f32], trie: &Trie, l: usize, v: usize, k: usize, w: usize) -> Vec<(f32, u32)> {
        let mut beams: Vec<(f32, u32)> = vec![(0.0, 0)];
        for j in 0..l {
            let mut next: Vec<(f32, u32)> = Vec::new();
            for &(p, node) in &beams {
                let (lo, hi) = (trie.node_ptr[j][node as usize] as usize, trie.node_ptr[j][node as usize + 1] as usize);
                for edge in lo..hi {
                    next.push((p + q[j * v + trie.token[j][edge] as usize], trie.child[j][edge]));
                }
            }
            next.sort_by(score_cmp);
            next.truncate(if j + 1 == l { k } else { w });
            beams = next;
        }
        beams
    }
}

/// Features to identities in one call: `head.log_probs(features)` then
/// `decoder.top_k`. The head's code length and vocabulary must match the
/// decoder's codebook.
pub fn identify(
    head: &crate::head::CodeHead,
    decoder: &PrefixDecoder,
    features: &Tensor,
    k: usize,
    mode: Mode,
    threshold: Option<f32>,
) -> Result<TopK> {
    let cfg = head.config();
    if cfg.length != decoder.length || cfg.vocab != decoder.vocab {
        return Err(Error::invalid(
            "identify",
            format!(
                "the codebook has codes of length {} over {} tokens, the head predicts {} positions of {}",
                decoder.length, decoder.vocab, cfg.length, cfg.vocab
            ),
        ));
    }
    decoder.top_k(&head.log_probs(features)?, k, mode, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A masked token (−inf) or a huge magnitude (−1e9) used to make the
    /// rounding slack infinite or huge: the search stopped pruning and
    /// re-sorted its results on every step (98.7 s for one query at N =
    /// 2^18). The bound is now per entry and the results a bounded heap: the
    /// work stays within a small factor of the same query without them.
    #[test]
    fn exact_search_work_does_not_blow_up_with_masked_or_huge_scores() {
        let n = 1 << 14;
        let cfg =
            crate::tokenizer::Config { vocab: 16, seed: 1, steps: Some(0), kmeans_iters: 1, ..Default::default() };
        let book =
            crate::tokenizer::tokenize(crate::tokenizer::Input::Random { count: n, dim: 4 }, &cfg, &Device::cpu())
                .unwrap();
        let (l, v, k) = (book.length(), 16, 5);
        let dec = PrefixDecoder::new(&book, &Device::cpu()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for q in 0..20 {
            let base: Vec<f32> = (0..l * v).map(|_| rng.random_range(-6.0f32..0.0)).collect();
            let (_, plain) = cpu::exact_counted(&base, &dec.trie, l, v, k, slack_rel(l));
            for odd in [f32::NEG_INFINITY, -1e9] {
                let mut lp = base.clone();
                lp[rng.random_range(0..l * v)] = odd;
                let (got, work) = cpu::exact_counted(&lp, &dec.trie, l, v, k, slack_rel(l));
                assert_eq!(pack(&[got], k), dec.brute_force(&lp, k).unwrap(), "query {q} with {odd}");
                assert!(work <= 2 * plain + l * v, "query {q} with {odd}: {work} entries pushed, {plain} without");
                assert!(work < n / 8, "query {q} with {odd}: {work} entries pushed for N = {n}");
            }
        }
    }
}
