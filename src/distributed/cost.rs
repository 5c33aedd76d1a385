//! The communication and memory cost of one training step per rank, for
//! each head (docs/distributed.md's tables come from here; the tests check
//! the data-parallel terms against the bytes the collectives counted).
//!
//! - The code head trains data-parallel: its l·v·d weights (and
//!   projections) are all-reduced with the backbone's gradients; the
//!   identities' codes (2·l bytes each) are held on every rank.
//! - The full margin softmax and Partial FC train model-parallel, as
//!   insightface's PartialFC_V2 ([`super::model_parallel`]): rank r holds
//!   ⌈N/W⌉ centres; the batch sizes (8 bytes a rank), the W·B features
//!   (f32) and labels (u32) are all-gathered; per gathered row, the largest
//!   non-target logit (max), then the non-target Σ exp, the target's logit
//!   and the hit (sum) are all-reduced (16 bytes a row; insightface's
//!   PyTorch code all-reduces the maximum, the Σ exp and the loss, 12);
//!   the features' gradient (W·B·d f32) is reduce-scattered back. Their
//!   bytes do not grow with N: memory and arithmetic do, by N/W.
//!
//! Bytes "on the wire" are those one rank sends in the ring algorithms
//! NCCL and MPI use for large messages: an all-reduce of S bytes sends
//! 2(W−1)/W·S, an all-gather of c bytes from each rank (W−1)·c, a
//! reduce-scatter of S bytes (W−1)/W·S.

use crate::tokenizer::min_length;

/// The head of a [`Setup`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Head {
    /// GIF's code head: l positions of v tokens, optional projections of
    /// width d_p (l·d_p·d more weights).
    Code {
        /// Code length l.
        length: usize,
        /// Vocabulary v.
        vocab: usize,
        /// Projection width d_p, if any.
        projection: Option<usize>,
    },
    /// The full margin softmax, model-parallel.
    Softmax {
        /// Whether the logits are materialized ([W·B, ⌈N/W⌉] f32 on each
        /// rank, as insightface's PyTorch code does); gif-fr's fused
        /// kernels do not.
        materialized_logits: bool,
    },
    /// Partial FC, model-parallel, sampling `rate` of each shard.
    PartialFc {
        /// The sample rate r.
        rate: f64,
    },
}

/// One training configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setup {
    /// Ranks W.
    pub world: usize,
    /// Images per rank per step B.
    pub batch: usize,
    /// Embedding size d.
    pub dim: usize,
    /// Identities N.
    pub classes: u64,
    /// The backbone's trainable parameters.
    pub backbone_params: u64,
    /// f32 copies of each parameter the optimizer keeps besides the
    /// weight and its gradient (SGD with momentum: 1, AdamW: 2).
    pub optimizer_states: u64,
    /// The head.
    pub head: Head,
}

/// What one step costs one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCost {
    /// Bytes all-reduced (the buffers' size: gradients, and the model-
    /// parallel heads' per-sample max, Σ exp, target logit and hit).
    pub all_reduce_bytes: u64,
    /// Bytes this rank contributes to all-gathers (batch size, features and
    /// labels).
    pub all_gather_bytes: u64,
    /// Bytes this rank puts into reduce-scatters (the features' gradient).
    pub reduce_scatter_bytes: u64,
    /// Bytes this rank sends in ring algorithms (see the module
    /// documentation).
    pub wire_bytes: f64,
    /// The head's bytes on this rank: weights, gradients, optimizer
    /// state, codes, logits.
    pub head_memory: u64,
    /// The backbone's bytes: weights, gradients, optimizer state
    /// (activations excluded: they depend on B and the network, not on N).
    pub backbone_memory: u64,
}

/// ⌈N / W⌉, the centres of one shard.
fn shard(s: &Setup) -> u64 {
    s.classes.div_ceil(s.world.max(1) as u64)
}

/// The head's trainable parameters on one rank.
pub fn head_params(s: &Setup) -> u64 {
    let d = s.dim as u64;
    match s.head {
        Head::Code { length, vocab, projection } => {
            let (l, v) = (length as u64, vocab as u64);
            match projection {
                Some(p) => prod(&[l, v, p as u64]).saturating_add(prod(&[l, p as u64, d])),
                None => prod(&[l, v, d]),
            }
        }
        Head::Softmax { .. } | Head::PartialFc { .. } => prod(&[shard(s), d]),
    }
}

/// The product, saturating at u64::MAX (a size past any memory: sizes come
/// from the caller's [`Setup`]).
fn prod(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |p, &f| p.saturating_mul(f))
}

/// The cost of one step of `s` on one rank (see the module documentation).
/// Sizes saturate at u64::MAX rather than wrap.
pub fn step_cost(s: &Setup) -> StepCost {
    let (w, b, d) = (s.world.max(1) as u64, s.batch as u64, s.dim as u64);
    let copies = s.optimizer_states.saturating_add(2);
    let ring = |bytes: u64, factor: f64| bytes as f64 * factor;
    let wf = w as f64;
    let backbone_grads = prod(&[4, s.backbone_params]);
    let backbone_memory = prod(&[4, copies, s.backbone_params]);
    let head_state = prod(&[4, copies, head_params(s)]);
    match s.head {
        Head::Code { length, .. } => {
            let reduced = backbone_grads.saturating_add(prod(&[4, head_params(s)]));
            StepCost {
                all_reduce_bytes: reduced,
                wire_bytes: if w > 1 { ring(reduced, 2.0 * (wf - 1.0) / wf) } else { 0.0 },
                head_memory: head_state.saturating_add(prod(&[2, length as u64, s.classes])),
                backbone_memory,
                ..StepCost::default()
            }
        }
        Head::Softmax { .. } | Head::PartialFc { .. } => {
            // The batch size, features f32 and labels u32 gathered; max,
            // then Σ exp, target logit and hit per gathered sample
            // all-reduced; the features' gradient reduce-scattered.
            let gathered = prod(&[b, d.saturating_mul(4).saturating_add(4)]).saturating_add(8);
            let per_sample = prod(&[16, w, b]);
            let scattered = prod(&[4, w, b, d]);
            let reduced = backbone_grads.saturating_add(per_sample);
            let logits = match s.head {
                Head::Softmax { materialized_logits: true } => prod(&[4, w, b, shard(s)]),
                Head::PartialFc { rate } => prod(&[4, w, b, (shard(s) as f64 * rate).ceil() as u64]),
                _ => 0,
            };
            StepCost {
                all_reduce_bytes: reduced,
                all_gather_bytes: gathered,
                reduce_scatter_bytes: scattered,
                wire_bytes: if w > 1 {
                    ring(reduced, 2.0 * (wf - 1.0) / wf)
                        + (w - 1) as f64 * gathered as f64
                        + ring(scattered, (wf - 1.0) / wf)
                } else {
                    0.0
                },
                head_memory: head_state.saturating_add(logits),
                backbone_memory,
            }
        }
    }
}

/// `s` with N identities; the code head's length follows N (the least l
/// with v^l ≥ N, [`crate::tokenizer::min_length`]).
pub fn with_classes(s: &Setup, classes: u64) -> Setup {
    let head = match s.head {
        Head::Code { vocab, projection, .. } => Head::Code {
            length: min_length(vocab, usize::try_from(classes).unwrap_or(usize::MAX)).unwrap_or(1),
            vocab,
            projection,
        },
        other => other,
    };
    Setup { classes, head, ..*s }
}

/// The largest N whose step fits `budget` bytes on one rank (head and
/// backbone memory of [`StepCost`], the code length following N); 0 if
/// not even one identity fits.
pub fn largest_classes(s: &Setup, budget: u64) -> u64 {
    let fits = |n: u64| {
        let c = step_cost(&with_classes(s, n));
        c.head_memory.saturating_add(c.backbone_memory) <= budget
    };
    if !fits(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1u64, 2u64);
    while fits(hi) {
        lo = hi;
        match hi.checked_mul(2) {
            Some(h) if h < 1 << 62 => hi = h,
            _ => return lo,
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    lo
}
