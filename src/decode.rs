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

use crate::device::{Arg, Device, DeviceBuffer, LaunchConfig};
use crate::error::{Error, Result};
use crate::kernels::{self, ModuleId};
use crate::tensor::{DType, Tensor};
use crate::tokenizer::{Codebook, Trie};

/// Longest code and largest k the GPU kernel takes (kernels/decode.cu).
pub const MAX_LENGTH: usize = 16;
/// Largest k of the GPU kernel.
pub const MAX_K: usize = 64;
/// Widest beam the GPU kernel takes (wider beams run on the CPU).
pub const MAX_BEAM: usize = 64;
const SLACK_REL: f32 = 1e-5;

/// Search mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Exact top-k.
    Exact,
    /// Beam search keeping this many prefixes per level (at least k).
    Beam(usize),
}

/// The k best identities of each query: `ids[b·k + i]` (−1 where there is
/// none, or for every entry of a query whose best score is below the
/// open-set threshold), with `scores[b·k + i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    /// Results per query.
    pub k: usize,
    /// Identity ids, `[B, k]`.
    pub ids: Vec<i64>,
    /// Scores, `[B, k]`.
    pub scores: Vec<f32>,
}

struct DeviceTrie {
    node_ptr: DeviceBuffer,
    token: DeviceBuffer,
    child: DeviceBuffer,
    node_off: DeviceBuffer,
    edge_off: DeviceBuffer,
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

fn score_cmp(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl PrefixDecoder {
    /// The decoder of `book` on `device`.
    pub fn new(book: &Codebook, device: &Device) -> Result<PrefixDecoder> {
        let trie = book.trie().clone();
        let gpu = if device.runs_kernels() {
            let cat_u32 = |v: &[Vec<u32>]| v.iter().flatten().copied().collect::<Vec<u32>>();
            let tokens: Vec<u16> = trie.token.iter().flatten().copied().collect();
            let mut node_off = vec![0i32];
            let mut edge_off = vec![0i32];
            for j in 0..book.length() {
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
        Ok(PrefixDecoder {
            max_children,
            n: book.len(),
            length: book.length(),
            vocab: book.vocab(),
            trie,
            codes: book.codes().to_vec(),
            device: device.clone(),
            gpu,
        })
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
    /// threshold on the best score. Errors: k = 0 or k > N, a beam narrower
    /// than k, a shape that does not match the codebook, NaN log-probs.
    pub fn top_k(&self, log_probs: &Tensor, k: usize, mode: Mode, threshold: Option<f32>) -> Result<TopK> {
        const OP: &str = "PrefixDecoder::top_k";
        let (l, v) = (self.length, self.vocab);
        let b = match log_probs.shape() {
            [b, lv] if *lv == l * v => *b,
            [b, ll, vv] if *ll == l && *vv == v => *b,
            s => {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("[B, {l}, {v}] or [B, {}]", l * v),
                    got: format!("{s:?}"),
                })
            }
        };
        if log_probs.dtype() != DType::F32 {
            return Err(Error::DType { op: OP, expected: DType::F32, got: log_probs.dtype() });
        }
        if k == 0 || k > self.n {
            return Err(Error::invalid(OP, format!("k must be in 1..={}, got {k}", self.n)));
        }
        if let Mode::Beam(w) = mode {
            if w < k {
                return Err(Error::invalid(OP, format!("the beam width ({w}) must be at least k ({k})")));
            }
        }
        if log_probs.device() != &self.device {
            return Err(Error::DeviceMismatch {
                op: OP,
                a: self.device.to_string(),
                b: log_probs.device().to_string(),
            });
        }
        let beam_smem = |w: usize| 4 * (2 * w + 2 * w * self.max_children) * 4;
        let mut out = match (&self.gpu, mode) {
            (Some(g), Mode::Exact) if k <= MAX_K && l <= MAX_LENGTH => self.exact_device(g, log_probs, b, k)?,
            (Some(g), Mode::Beam(w)) if w <= MAX_BEAM && beam_smem(w) <= 200 * 1024 => {
                self.beam_device(g, log_probs, b, k, w)?
            }
            _ => {
                let lp = log_probs.to_vec::<f32>()?;
                if let Some(i) = lp.iter().position(|x| x.is_nan()) {
                    return Err(Error::invalid(
                        OP,
                        format!("log-probability {} of query {} is NaN", i % (l * v), i / (l * v)),
                    ));
                }
                let rows: Vec<Vec<(f32, u32)>> = lp
                    .par_chunks(l * v)
                    .map(|q| match mode {
                        Mode::Exact => cpu::exact(q, &self.trie, l, v, k),
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

    fn exact_device(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize) -> Result<TopK> {
        self.exact_kernel(g, log_probs, b, k, true)
    }

    /// Runs `decode_exact_warp` (a warp per query) or, with `warp` false,
    /// the simpler `decode_exact` (a thread per query).
    fn exact_kernel(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize, warp: bool) -> Result<TopK> {
        let (name, blocks) =
            if warp { ("decode_exact_warp", b.div_ceil(4)) } else { ("decode_exact", b.div_ceil(128)) };
        self.search_kernel(g, log_probs, b, k, name, blocks, 0, &[Arg::F32(SLACK_REL)])
    }

    fn beam_device(&self, g: &DeviceTrie, log_probs: &Tensor, b: usize, k: usize, w: usize) -> Result<TopK> {
        let cap = w * self.max_children;
        let smem = 4 * (2 * w + 2 * cap) * 4;
        self.search_kernel(
            g,
            log_probs,
            b,
            k,
            "decode_beam_warp",
            b.div_ceil(4),
            smem,
            &[Arg::I32(w as i32), Arg::I32(cap as i32)],
        )
    }

    /// Launches one of the search kernels, whose arguments are the
    /// log-probabilities, B, l, v, the trie, k, `extra`, then the outputs;
    /// downloads the result and turns the kernels' NaN flag (id −2) into an
    /// error.
    #[allow(clippy::too_many_arguments)]
    fn search_kernel(
        &self,
        g: &DeviceTrie,
        log_probs: &Tensor,
        b: usize,
        k: usize,
        name: &str,
        blocks: usize,
        smem: usize,
        extra: &[Arg],
    ) -> Result<TopK> {
        let dev = &self.device;
        if b == 0 {
            return Ok(TopK { k, ids: Vec::new(), scores: Vec::new() });
        }
        let scores = Tensor::empty(dev, &[b, k], DType::F32)?;
        let ids = dev.alloc(b * k * 4)?;
        let mut args = vec![
            log_probs.arg(),
            Arg::I32(b as i32),
            Arg::I32(self.length as i32),
            Arg::I32(self.vocab as i32),
            Arg::Ptr(dev.ptr(&g.node_ptr)),
            Arg::Ptr(dev.ptr(&g.token)),
            Arg::Ptr(dev.ptr(&g.child)),
            Arg::Ptr(dev.ptr(&g.node_off)),
            Arg::Ptr(dev.ptr(&g.edge_off)),
            Arg::I32(k as i32),
        ];
        args.extend_from_slice(extra);
        args.extend([scores.arg(), Arg::Ptr(dev.ptr(&ids))]);
        dev.launch(
            ModuleId::Decode,
            kernels::find(ModuleId::Decode, name)?,
            LaunchConfig::linear(blocks as u32, 128, smem as u32),
            &args,
        )?;
        let ids: Vec<i32> = bytemuck::pod_collect_to_vec(&dev.download(&ids, b * k * 4)?);
        if let Some(q) = ids.chunks(k).position(|r| r[0] == -2) {
            return Err(Error::invalid(
                "PrefixDecoder::top_k",
                format!("the log-probabilities of query {q} hold a NaN"),
            ));
        }
        Ok(TopK { k, ids: ids.into_iter().map(i64::from).collect(), scores: scores.to_vec::<f32>()? })
    }

    /// Exact top-k with the thread-per-query kernel (`decode_exact`), the
    /// simplest correct GPU version, kept as the reference of the
    /// warp-per-query kernel that [`PrefixDecoder::top_k`] uses.
    pub fn top_k_thread_per_query(&self, log_probs: &Tensor, k: usize) -> Result<TopK> {
        let g = self
            .gpu
            .as_ref()
            .ok_or_else(|| Error::invalid("top_k_thread_per_query", "needs a GPU or the simulator"))?;
        let b = log_probs.shape()[0];
        if k == 0
            || k > self.n.min(MAX_K)
            || log_probs.numel() != b * self.length * self.vocab
            || self.length > MAX_LENGTH
        {
            return Err(Error::invalid("top_k_thread_per_query", "k, shape or code length out of range"));
        }
        self.exact_kernel(g, log_probs, b, k, false)
    }

    /// Brute force: every identity's code scored, the k best kept (the
    /// reference of the exact mode, and the O(N) baseline of the benches).
    pub fn brute_force(&self, log_probs: &[f32], k: usize) -> TopK {
        let (l, v) = (self.length, self.vocab);
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
                let k = k.min(all.len());
                all.select_nth_unstable_by(k - 1, score_cmp);
                all.truncate(k);
                all.sort_by(score_cmp);
                all
            })
            .collect();
        pack(&rows, k)
    }
}

fn pack(rows: &[Vec<(f32, u32)>], k: usize) -> TopK {
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut scores = Vec::with_capacity(rows.len() * k);
    for r in rows {
        for i in 0..k {
            match r.get(i) {
                Some(&(s, id)) => {
                    ids.push(id as i64);
                    scores.push(s);
                }
                None => {
                    ids.push(-1);
                    scores.push(f32::NEG_INFINITY);
                }
            }
        }
    }
    TopK { k, ids, scores }
}

/// The CPU searches, one query at a time (`q` is its `[l, v]` log-probs).
pub mod cpu {
    use super::*;

    /// `suffix[j] = Σ_{i ≥ j} max_t q[i, t]` and the slack that absorbs f32
    /// rounding between a bound and a score.
    fn bounds(q: &[f32], l: usize, v: usize) -> (Vec<f32>, f32) {
        let mut suffix = vec![0f32; l + 1];
        let mut mag = 0f32;
        for j in (0..l).rev() {
            let row = &q[j * v..(j + 1) * v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            suffix[j] = suffix[j + 1] + m;
            mag += row.iter().fold(0f32, |a, x| a.max(x.abs()));
        }
        (suffix, SLACK_REL * (1.0 + mag))
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

    /// Exact top-k by best-first search; level `l` entries are identities.
    pub fn exact(q: &[f32], trie: &Trie, l: usize, v: usize, k: usize) -> Vec<(f32, u32)> {
        let (suffix, slack) = bounds(q, l, v);
        let mut heap = BinaryHeap::new();
        heap.push(Entry { bound: suffix[0], partial: 0.0, level: 0, node: 0 });
        let mut found: Vec<(f32, u32)> = Vec::new();
        while let Some(e) = heap.pop() {
            if found.len() >= k {
                // Every identity still in the heap scores at most its bound
                // (up to rounding, covered by slack): stop once that is below
                // the k-th best score found.
                found.sort_by(score_cmp);
                if e.bound + slack < found[k - 1].0 {
                    break;
                }
            }
            if e.level == l {
                found.push((e.partial, e.node));
                continue;
            }
            let j = e.level;
            let (lo, hi) = (trie.node_ptr[j][e.node as usize] as usize, trie.node_ptr[j][e.node as usize + 1] as usize);
            for edge in lo..hi {
                let s = e.partial + q[j * v + trie.token[j][edge] as usize];
                heap.push(Entry { bound: s + suffix[j + 1], partial: s, level: j + 1, node: trie.child[j][edge] });
            }
        }
        found.sort_by(score_cmp);
        found.truncate(k);
        found
    }

    /// Beam search keeping the `w` best prefixes (by partial score, then
    /// node) per level.
    pub fn beam(q: &[f32], trie: &Trie, l: usize, v: usize, k: usize, w: usize) -> Vec<(f32, u32)> {
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

impl TopK {
    /// Writes the result as safetensors: "ids" (I64 `[B, k]`) and "scores"
    /// (F32 `[B, k]`).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let b = self.ids.len() / self.k.max(1);
        let ids: Vec<u8> = self.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let scores: Vec<u8> = self.scores.iter().flat_map(|x| x.to_le_bytes()).collect();
        fn view<'a>(
            dt: safetensors::Dtype,
            shape: Vec<usize>,
            data: &'a [u8],
            path: &std::path::Path,
        ) -> Result<safetensors::tensor::TensorView<'a>> {
            safetensors::tensor::TensorView::new(dt, shape, data).map_err(|e| Error::file(path, e.to_string()))
        }
        let tensors = vec![
            ("ids", view(safetensors::Dtype::I64, vec![b, self.k], &ids, path)?),
            ("scores", view(safetensors::Dtype::F32, vec![b, self.k], &scores, path)?),
        ];
        safetensors::serialize_to_file(tensors, None, path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
    }
}
