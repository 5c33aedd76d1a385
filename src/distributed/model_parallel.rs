//! The model-parallel O(N) heads: the full margin softmax and Partial FC
//! with the N centres sharded over the ranks, as insightface's
//! PartialFC_V2 trains them.
//!
//! Rank r of W holds the classes `shard_range(N, r, W)` (insightface's
//! split: ⌊N/W⌋ each, one more on the first N mod W ranks). A step:
//! 1. the ranks' features (f32, `[B, d]` each) and labels are all-gathered
//!    (every rank must bring the same B, checked first: one all-gather of
//!    8 bytes);
//! 2. each rank runs the fused forward over its centres for all W·B rows
//!    (the margin on the rank that owns the row's label; Partial FC first
//!    samples its shard with [`PartialFc`]'s rule, seeded per shard);
//! 3. the row's largest non-target logit is all-reduced (max), then the
//!    non-target Σ exp at that maximum, the target's logit `s·f(c_y)` and
//!    the accuracy hit (sum; only the owner adds a non-zero target and
//!    hit): 16 bytes per gathered row, after which every rank has the
//!    same log-sum-exp, loss and accuracy;
//! 4. each rank's backward gives its centres' gradient (kept: the centres
//!    never travel) and its share of every row's feature gradient, summed
//!    back to the rows' ranks by a reduce-scatter (4·W·B·d bytes).
//!
//! The loss is the mean over the W·B gathered rows, so the features'
//! gradient is already the global batch's: a data-parallel backbone sums
//! its gradients over ranks (scale 1, not 1/W: insightface multiplies the
//! gathered gradient by W to undo DDP's average; same result).
//!
//! Differences from one process on the concatenated batch: summation order
//! (the shards' partial sums, f32), and accuracy ties: a target cosine equal
//! to another rank's best counts as a hit (one process gives the tie to the
//! lower class).
//!
//! On CPU ranks the shard's passes are the CPU path's (the same functions
//! as one process's chunked head). On GPU ranks they are the fused kernels
//! (kernels/softmax_head.cu) with the shard's rows' targets negative where
//! another rank owns the label: the forward's per-split partials are merged
//! per row by `softmax_shard_stats` (24 bytes a row, with the target's
//! cosine and sine, come to the host in one download for the collectives,
//! and the log-sum-exp, target gradient and singular weight go back, 12
//! bytes a row), then the one-process backward; Partial
//! FC draws its sample on the device. The features are all-gathered and
//! their gradient reduce-scattered as device tensors
//! ([`Communicator::all_gather_tensor`], `reduce_scatter_tensor`): on the
//! device itself over NCCL, staged through the host by a host communicator
//! (MPI). The per-row stats (the max and sum all-reduces, 28 bytes a row)
//! go through the host on every back end.
use std::ops::Range;

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::head::margin::Target;
use crate::head::softmax_head::{cpu, DevicePass, Targets};
use crate::head::{PartialFc, SoftmaxHead, SoftmaxHeadConfig, SoftmaxLoss};
use crate::runtime::device::{Device, DeviceKind, LaunchConfig};
use crate::runtime::launch;
use crate::runtime::tensor::{DType, Tensor};

const OP: &str = "ModelParallelHead::forward_backward";

/// The classes rank `rank` of `world` holds: insightface's split (⌊N/W⌋
/// each, one more on the first N mod W ranks). Errors: no ranks, a rank
/// outside the world, fewer classes than ranks.
pub fn shard_range(classes: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    const OP: &str = "shard_range";
    if world == 0 || rank >= world {
        return Err(Error::invalid(OP, format!("rank {rank} is not in a world of {world}")));
    }
    if classes < world {
        return Err(Error::invalid(OP, format!("{classes} classes cannot be sharded over {world} ranks")));
    }
    let (each, extra) = (classes / world, classes % world);
    let start = each * rank + rank.min(extra);
    Ok(start..start + each + usize::from(rank < extra))
}

/// The centres of one shard, on the CPU: the full head, or Partial FC over
/// the shard.
enum Local {
    Full(SoftmaxHead),
    Partial(PartialFc),
}

/// One rank's part of a model-parallel full softmax or Partial FC.
pub struct ModelParallelHead {
    cfg: SoftmaxHeadConfig,
    shard: Range<usize>,
    rank: usize,
    world: usize,
    local: Local,
}

impl std::fmt::Debug for ModelParallelHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelParallelHead")
            .field("config", &self.cfg)
            .field("shard", &self.shard)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("sample_rate", &self.sample_rate())
            .finish()
    }
}

/// What one model-parallel step gives a rank.
#[derive(Debug)]
pub struct ModelParallelStep {
    /// The mean loss and accuracy over the W·B gathered rows (the same on
    /// every rank).
    pub loss: SoftmaxLoss,
    /// The gradient with respect to this rank's features, f32 `[B, d]`.
    pub features: Tensor,
    /// The gradient of this rank's centres, f32: `[shard, d]` for the full
    /// head, `[k, d]` (the sampled rows, in the order of `sampled`) for
    /// Partial FC.
    pub centres: Tensor,
    /// Partial FC's sample: rows of the shard (0-based within it),
    /// ascending. None for the full head.
    pub sampled: Option<Vec<u32>>,
    /// The same sample on a GPU rank's device (u32 `[k]`), where it was
    /// drawn: the trainer scatters the centre gradient with it.
    pub(crate) sampled_rows: Option<Tensor>,
}

impl ModelParallelHead {
    /// This rank's shard of random centres (normal, variance 1/d, drawn
    /// from `seed` and the shard's first class; f32 on `device`), the full
    /// head when `sample_rate` is None, Partial FC over the shard otherwise.
    pub fn new(
        cfg: SoftmaxHeadConfig,
        device: &Device,
        comm: &dyn Communicator,
        sample_rate: Option<f32>,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate("ModelParallelHead")?;
        let shard = shard_range(cfg.classes, comm.rank(), comm.world())?;
        let n = shard.len().checked_mul(cfg.dim).ok_or_else(|| Error::invalid("ModelParallelHead", "N·d overflows"))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(shard_seed(seed, shard.start));
        let sd = 1.0 / (cfg.dim as f32).sqrt();
        let w: Vec<f32> = (0..n).map(|_| sd * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect();
        let centres = Tensor::from_f32(device, &[shard.len(), cfg.dim], &w, DType::F32)?;
        ModelParallelHead::from_shard(cfg, centres, comm, sample_rate, seed)
    }

    /// This rank's shard of given centres (`[shard, d]`, f32 or bf16, on the
    /// device the shard computes on), the full head or Partial FC over the
    /// shard (its sample seeded by `seed` and the shard's first class).
    pub fn from_shard(
        cfg: SoftmaxHeadConfig,
        centres: Tensor,
        comm: &dyn Communicator,
        sample_rate: Option<f32>,
        seed: u64,
    ) -> Result<Self> {
        const OP: &str = "ModelParallelHead::from_shard";
        cfg.validate(OP)?;
        let shard = shard_range(cfg.classes, comm.rank(), comm.world())?;
        let local_cfg = SoftmaxHeadConfig { classes: shard.len(), ..cfg.clone() };
        let head = SoftmaxHead::from_weights(local_cfg, centres)?;
        let local = match sample_rate {
            None => Local::Full(head),
            Some(rate) => Local::Partial(PartialFc::new(head, rate, shard_seed(seed, shard.start))?),
        };
        Ok(ModelParallelHead { cfg, shard, rank: comm.rank(), world: comm.world(), local })
    }

    /// The settings (N: all ranks' classes).
    pub fn config(&self) -> &SoftmaxHeadConfig {
        &self.cfg
    }
    /// The classes this rank holds.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }
    /// The ranks the centres are sharded over.
    pub fn world(&self) -> usize {
        self.world
    }
    /// The rank whose shard this is.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Partial FC's sample rate (None: the full head).
    pub fn sample_rate(&self) -> Option<f32> {
        match &self.local {
            Local::Full(_) => None,
            Local::Partial(p) => Some(p.rate()),
        }
    }
    /// Partial FC's seed as given (each shard samples with
    /// [`shard_seed`] of it, which is its own inverse; None: the full
    /// head).
    pub fn seed(&self) -> Option<u64> {
        match &self.local {
            Local::Full(_) => None,
            Local::Partial(p) => Some(shard_seed(p.seed(), self.shard.start)),
        }
    }
    fn head(&self) -> &SoftmaxHead {
        match &self.local {
            Local::Full(h) => h,
            Local::Partial(p) => p.head(),
        }
    }
    /// This rank's centres, `[shard, d]`.
    pub fn centres(&self) -> &Tensor {
        self.head().centres()
    }
    /// This rank's centres, to update (the optimizer's step).
    pub fn centres_mut(&mut self) -> &mut Tensor {
        match &mut self.local {
            Local::Full(h) => h.centres_mut(),
            Local::Partial(p) => p.centres_mut(),
        }
    }

    /// Partial FC's sample of this shard at `step` for the gathered labels
    /// (all ranks' labels, global classes): rows of the shard, ascending —
    /// [`PartialFc::sample`] on the shard's own labels. None for the full
    /// head.
    pub fn sample(&self, gathered_labels: &[u32], step: u64) -> Result<Option<Vec<u32>>> {
        let Local::Partial(p) = &self.local else { return Ok(None) };
        p.sample(&self.local_labels(gathered_labels), step).map(Some)
    }

    /// The gathered labels of this shard's classes, 0-based within it.
    fn local_labels(&self, gathered_labels: &[u32]) -> Vec<u32> {
        gathered_labels.iter().filter(|&&y| self.shard.contains(&(y as usize))).map(|&y| y - self.start()).collect()
    }

    fn start(&self) -> u32 {
        self.shard.start as u32
    }

    /// One training step over this rank's `features` (`[B, d]`, f32 or bf16,
    /// on the shard's device) and `labels` (global classes < N): collective, so every
    /// rank of `comm` calls it with the same B. `step` keys Partial FC's
    /// sample. Errors (on every rank alike, after the collectives): a label
    /// out of range on any rank, ranks with different batch sizes; a shape
    /// mismatch, features on another device or an empty batch on this rank. A non-finite feature or
    /// centre on any rank makes the loss NaN on every rank (returned, not an
    /// error: the trainer's optimizer then skips the step everywhere, as on
    /// one process).
    pub fn forward_backward(
        &self,
        comm: &dyn Communicator,
        features: &Tensor,
        labels: &[u32],
        step: u64,
    ) -> Result<ModelParallelStep> {
        let (cfg, d) = (&self.cfg, self.cfg.dim);
        if comm.world() != self.world {
            return Err(Error::invalid(
                OP,
                format!("a world of {}, the head was sharded for {}", comm.world(), self.world),
            ));
        }
        let dev = self.centres().device().clone();
        let b = crate::head::softmax_head::check_batch(OP, cfg, &dev, features, labels.len())?;
        let w = self.world;
        // Every rank's batch size, before anything sized by it.
        let mut sizes = vec![0u64; w];
        comm.all_gather_u64(&[b as u64], &mut sizes)?;
        if let Some(q) = sizes.iter().position(|&s| s != b as u64) {
            return Err(Error::invalid(
                OP,
                format!("rank {q} brought {} rows, this rank {b}: equal batches", sizes[q]),
            ));
        }
        let rows = w.checked_mul(b).ok_or_else(|| Error::invalid(OP, "W·B overflows"))?;
        // (The kernels index rows with i32, in tiles of 128: the same bound
        // as one process's batch, on every rank alike.)
        if dev.kind() != DeviceKind::Cpu && rows > i32::MAX as usize / 128 {
            return Err(Error::invalid(OP, format!("{rows} gathered rows are more than a GPU step takes")));
        }
        let gathered = rows.checked_mul(d).ok_or_else(|| Error::invalid(OP, "W·B·d overflows"))?;
        // Every rank's features: on the host for the CPU path, on the device
        // otherwise (NCCL gathers there; a host communicator stages).
        let (x, xt) = if dev.kind() == DeviceKind::Cpu {
            let mut x = vec![0f32; gathered];
            comm.all_gather_f32(&features.host_f32()?, &mut x)?;
            (x, None)
        } else {
            let mut xt = Tensor::empty(&dev, &[rows, d], DType::F32)?;
            comm.all_gather_tensor(features, &mut xt)?;
            (Vec::new(), Some(xt))
        };
        let mut y = vec![0u32; rows];
        comm.all_gather_u32(labels, &mut y)?;
        if let Some(p) = y.iter().position(|&l| l as usize >= cfg.classes) {
            return Err(Error::invalid(
                OP,
                format!("rank {}'s labels[{}] = {} is not below N = {}", p / b, p % b, y[p], cfg.classes),
            ));
        }
        // This shard's logical classes: all of it, or Partial FC's sample.
        // (Drawn on the device on a GPU, and its rows read there.)
        let (sampled, sampled_rows) = match &self.local {
            Local::Partial(p) if dev.kind() != DeviceKind::Cpu => {
                let rows = p.sample_on_device(&self.local_labels(&y), step)?;
                (Some(rows.to_vec::<u32>()?), Some(rows))
            }
            _ => (self.sample(&y, step)?, None),
        };
        let k = sampled.as_ref().map_or(self.shard.len(), Vec::len);
        let local_target = |l: u32| -> i32 {
            if !self.shard.contains(&(l as usize)) {
                return -1;
            }
            let l = l - self.start();
            match &sampled {
                // The sample holds every local positive.
                Some(s) => s.binary_search(&l).map_or(-1, |p| p as i32),
                None => l as i32,
            }
        };
        let targets: Vec<i32> = y.iter().map(|&l| local_target(l)).collect();
        let (loss, features, centres) = if let Some(xt) = xt {
            self.device_step(comm, &xt, sampled_rows.as_ref(), k, targets)?
        } else {
            let wv = self.centres().host_f32()?;
            let map = sampled.as_deref();
            let (u, norms) = cpu::normalize_rows(&x, d);
            let inv = cpu::inv_norms(&wv, map, d, k);
            let chunk = rows.checked_mul(crate::head::softmax_head::CPU_CHUNK.min(k));
            let mut logits = vec![0f32; chunk.ok_or_else(|| Error::invalid(OP, "W·B·chunk overflows"))?];
            let pass = cpu::Pass { cfg, x: &x, u: &u, w: &wv, rows: map, inv: &inv, n: k, targets: &targets };
            let state = pass.forward(&mut logits);
            let angles = pass.target_angles();
            let tgs: Vec<Option<Target>> = state
                .iter()
                .zip(&targets)
                .zip(&angles)
                .map(|((st, &t), a)| (t >= 0).then(|| cpu::target_of(cfg, st.target_c, a.as_ref())))
                .collect();
            let (rowv, loss) = combine_rows(comm, cfg, &state, &targets, &tgs)?;
            // k ≤ the shard's classes, whose k·d the constructor checked; b·d ≤
            // W·B·d, checked above.
            let mut dw = vec![0f32; k * d];
            let mut du = pass.backward(&rowv, &mut logits, &mut dw);
            pass.add_singular(&rowv, &angles, &mut du, &mut dw);
            let mut dx = vec![0f32; gathered];
            crate::ops::rowwise::cpu::l2_normalize_backward(
                &u,
                &norms,
                &du,
                d,
                crate::head::softmax_head::EPS,
                &mut dx,
            );
            // Every shard's part of each row's gradient, summed on its rank.
            let mut mine = vec![0f32; b * d];
            comm.reduce_scatter_f32(&dx, &mut mine)?;
            (loss, Tensor::from_slice(&dev, &[b, d], &mine)?, Tensor::from_slice(&dev, &[k, d], &dw)?)
        };
        Ok(ModelParallelStep { loss, features, centres, sampled, sampled_rows })
    }

    /// The device phases of [`ModelParallelHead::forward_backward`] over
    /// the gathered features `xt` (`[W·B, d]`): each row's stats and target
    /// angle (24 bytes) come to the host for the collectives, and go back
    /// as the backward's log-sum-exp, target gradient and singular weight;
    /// the feature gradient is reduce-scattered on the device (NCCL; a host
    /// communicator stages it). Returns the loss, this rank's `[B, d]`
    /// feature gradient and the shard's centre gradient.
    fn device_step(
        &self,
        comm: &dyn Communicator,
        xt: &Tensor,
        sampled_rows: Option<&Tensor>,
        k: usize,
        targets: Vec<i32>,
    ) -> Result<(SoftmaxLoss, Tensor, Tensor)> {
        let (cfg, d, dev) = (&self.cfg, self.cfg.dim, xt.device());
        // W·B gathered rows, B of them this rank's.
        let (rows, b) = (xt.shape()[0], xt.shape()[0] / self.world);
        let weight = 1.0 / rows as f32;
        let mut pass = DevicePass::forward(cfg, self.centres(), sampled_rows, k, xt, Targets::Host(targets.clone()))?;
        let partial = pass.partial.take().ok_or_else(|| Error::invalid(OP, "no partials (internal error)"))?;
        let mut stats = Tensor::empty(dev, &[rows, 6], DType::F32)?;
        // SAFETY: partial is [W·B, splits, 4], the target cosines and
        // sines [W·B] (sines absent: null) and stats [W·B, 6] f32.
        unsafe {
            launch::softmax_shard_stats(
                dev,
                LaunchConfig::linear(rows.div_ceil(8) as u32, 256, 0),
                partial.ptr()?,
                pass.splits as i32,
                rows as i32,
                pass.tgt_cos.ptr()?,
                Tensor::ptr_or_null(pass.tgt_sin.as_ref())?,
                stats.ptr_mut()?,
            )
        }?;
        drop(partial);
        // One download: the merged stats, the target cosine and sine.
        let stats = stats.to_vec::<f32>()?;
        let state: Vec<cpu::RowState> = stats
            .chunks_exact(6)
            .zip(&targets)
            .map(|(st, &t)| cpu::RowState {
                max: st[0],
                sum: st[1],
                best_c: st[2],
                best_class: st[3].to_bits() as usize,
                target_c: if t >= 0 { st[4] } else { f32::NAN },
            })
            .collect();
        let tgs: Vec<Option<Target>> = stats
            .chunks_exact(6)
            .zip(&targets)
            .map(|(st, &t)| (t >= 0).then(|| cfg.margin.target(f64::from(st[4]), f64::from(st[5]))))
            .collect();
        let (rowv, loss) = combine_rows(comm, cfg, &state, &targets, &tgs)?;
        let mut per_row = Vec::with_capacity(rows * 3);
        per_row.extend(rowv.iter().map(|r| r.lse));
        per_row.extend(rowv.iter().map(|r| r.gy));
        per_row.extend(rowv.iter().map(|r| r.sing as f32));
        let mut per_row = Tensor::from_slice(dev, &[3, rows], &per_row)?;
        let mut row = |r| per_row.rows_ptr_mut::<f32>(r, 1).map(|p| p.as_const());
        let (lse, gy, sing) = (row(0)?, row(1)?, row(2)?);
        let mut dw = Tensor::empty(dev, &[k, d], DType::F32)?;
        let mut dx = Tensor::empty(dev, &[rows, d], DType::F32)?;
        pass.backward(lse, gy, sing, weight, &mut dw, &mut dx)?;
        // Every shard's part of each row's gradient, summed on its rank.
        let mut mine = Tensor::empty(dev, &[b, d], DType::F32)?;
        comm.reduce_scatter_tensor(&dx, &mut mine)?;
        Ok((loss, mine, dw))
    }
}

/// Each row's results from this shard's [`cpu::RowState`]s and the owner's
/// margin target (`tgs`, on the rank owning the row's label): the largest
/// non-target logit all-reduced (max), then [Σ exp at it | the target's
/// logit | the hit] (sum); the mean loss and accuracy over the rows.
fn combine_rows(
    comm: &dyn Communicator,
    cfg: &SoftmaxHeadConfig,
    state: &[cpu::RowState],
    targets: &[i32],
    tgs: &[Option<Target>],
) -> Result<(Vec<cpu::RowOut>, SoftmaxLoss)> {
    let (rows, s) = (state.len(), cfg.scale);
    // The largest non-target logit of each row over every shard (a NaN
    // travels in the sums below: MPI's max may drop it).
    let mut max: Vec<f32> = state.iter().map(|st| if st.max.is_nan() { f32::NEG_INFINITY } else { st.max }).collect();
    comm.all_reduce_f32(&mut max, ReduceOp::Max)?;
    // [Σ exp at the global max | the target's logit | the hit], summed.
    let mut sums = vec![0f32; rows.checked_mul(3).ok_or_else(|| Error::invalid(OP, "3·W·B overflows"))?];
    for (i, st) in state.iter().enumerate() {
        sums[i] = if st.max.is_nan() {
            f32::NAN
        } else if st.max == f32::NEG_INFINITY {
            0.0
        } else {
            st.sum * (st.max - max[i]).exp()
        };
        if let Some(tg) = &tgs[i] {
            let t = s * tg.f as f32;
            sums[rows + i] = if st.target_c.is_nan() { f32::NAN } else { t };
            let hit = st.best_class == targets[i] as usize && s * st.best_c >= max[i];
            sums[2 * rows + i] = f32::from(u8::from(hit));
        }
    }
    comm.all_reduce_f32(&mut sums, ReduceOp::Sum)?;
    let weight = 1.0 / rows as f32;
    let rowv: Vec<cpu::RowOut> = (0..rows)
        .map(|i| {
            let (se, t) = (sums[i], sums[rows + i]);
            // The owner's margin terms; the other ranks need only the
            // log-sum-exp.
            let tg = tgs[i].unwrap_or(Target { f: f64::from(t / s), df: 1.0, sing: 0.0 });
            cpu::finish_row(cfg, weight, max[i], se, t, &tg, se.is_nan() || t.is_nan(), sums[2 * rows + i] > 0.5)
        })
        .collect();
    let loss = rowv.iter().map(|r| r.loss).sum::<f64>() / rows as f64;
    let accuracy = rowv.iter().filter(|r| r.hit).count() as f64 / rows as f64;
    Ok((rowv, SoftmaxLoss { loss, accuracy }))
}

/// The seed of a shard's draws (its random centres, Partial FC's sample):
/// the user's seed mixed with the shard's first class, so shards differ (a
/// shard starting at class 0 uses the seed itself). Its own inverse:
/// `shard_seed(shard_seed(s, start), start) == s`.
pub fn shard_seed(seed: u64, start: usize) -> u64 {
    seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
