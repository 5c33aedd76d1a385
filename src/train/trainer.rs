//! The training step: a backbone, a head, an optimizer and a schedule, as
//! insightface's arcface_torch train_v2.py runs them.
//!
//! One [`Trainer::step`] is one micro-batch (insightface's `global_step`):
//! the backbone's forward in training mode, the head's forward and
//! backward, the backbone's backward, each gradient added into buffers the
//! trainer owns; every `gradient_acc`-th micro-batch the optimizer steps
//! on the accumulated gradients times 1/`gradient_acc` (train_v2.py divides
//! each micro-batch's loss by `gradient_acc`), clipping the backbone's
//! gradient norm (insightface: 5; the head is not clipped), at the rate
//! `schedule.lr(t)` with t the micro-batches before this one (train_v2.py
//! steps its scheduler once per micro-batch).
//!
//! Two parameter groups, as train_v2.py: the backbone (group 0) and the
//! head (group 1, its rate times `head_lr_scale`, 1 in insightface); both
//! with `weight_decay`.
//!
//! The heads:
//! - [`TrainHead::Code`]: GIF's code head over a [`CodeTable`]; its
//!   parameters `centres` `[l, v, d_p]` and `projections` `[l, d_p, d]`;
//! - [`TrainHead::Softmax`]: the full margin softmax (ArcFace); `weight`
//!   `[N, d]`;
//! - [`TrainHead::PartialFc`]: Partial FC; `weight` `[N, d]`, with
//!   insightface's PartialFC_V2 semantics: the sampled rows' gradient is
//!   scattered into a dense N × d gradient (zeros elsewhere), and the
//!   optimizer updates every row (momentum and weight decay move rows
//!   outside the sample too, as they do in PyTorch on a dense gradient).
//!
//! Data parallelism ([`Trainer::set_communicator`], insightface's DDP): W
//! ranks, each with its own micro-batches (the sampler's shard), compute
//! their gradients alone; before every optimizer step the gradients are
//! summed across ranks (in 16 MiB buckets, as insightface's
//! `bucket_cap_mb=16`) and the step scales them by 1/(W · gradient_acc):
//! the mean over every rank's samples, so every rank takes the same step
//! and the parameters stay equal. BatchNorm is per rank, as insightface
//! leaves it (`broadcast_buffers=False`, no SyncBatchNorm): each rank
//! normalizes with its own batch's statistics and keeps its own running
//! ones. A W-rank step therefore equals one process accumulating the W
//! ranks' micro-batches (`gradient_acc` = W), up to summation order.
//!
//! The model-parallel heads ([`TrainHead::ModelParallel`], insightface's
//! PartialFC_V2 on W ranks): each rank holds its shard of the centres
//! ([`crate::distributed::ModelParallelHead`]); the head's loss is the
//! mean over every rank's rows, so its features' gradient is the global
//! batch's: the backbone's gradients are summed over ranks and scaled by
//! 1/`gradient_acc` only, the shard's gradient is not communicated (every
//! rank updates its own rows). Partial FC's dense shard gradient takes the
//! sampled rows as above. Such a head needs a communicator (its world);
//! each rank checkpoints its own shard ([`Trainer::checkpoint_path`]).
//!
//! Buffers: every gradient (the backbone's, the head's, Partial FC's dense
//! one) is allocated once, at the first step (a second set for
//! `gradient_acc` > 1: the micro-batches after the first compute into it
//! and add); the images' device buffer is reused while B stays (two of
//! them for page-locked batches). Nothing waits for the device in a step
//! but the upload of images in ordinary memory ([`Trainer::step`]); a
//! page-locked batch ([`Trainer::step_batch`] of a
//! [`crate::data::Loader::pinned`] loader's batches) is uploaded on a
//! second stream without a wait, beside the step before. The metrics stay
//! on the device until [`Trainer::metrics`] reads them (the last
//! micro-batch's: call it every k steps).

use std::collections::BTreeMap;

use std::sync::Arc;

use crate::backbone::norm::add_assign;
use crate::backbone::IResNet;
use crate::data::Batch;
use crate::distributed::{self, Communicator, ModelParallelHead, ModelParallelStep, OverlapStats, OverlappedReducer};
use crate::error::{Error, Result};
use crate::head::{
    CodeHead, CodeTable, HeadGrads, HeadMetrics, PartialFc, PfcGrads, SoftmaxGrads, SoftmaxHead, SoftmaxMetrics,
};
use crate::runtime::device::Mark;
use crate::runtime::pinned::PinnedBuffer;
use crate::runtime::tensor::{DType, Tensor};
use crate::train::{GroupConfig, Optimizer, OptimizerKind, ParamRef, Schedule};

/// The head a [`Trainer`] trains (one per trainer: the variants' sizes do
/// not matter).
#[allow(clippy::large_enum_variant)]
pub enum TrainHead {
    /// GIF: the code head and the identities' codes (and code vectors).
    Code {
        /// The head.
        head: CodeHead,
        /// Codes (and vectors for γ > 0) of the N identities.
        table: CodeTable,
    },
    /// The full margin softmax.
    Softmax(SoftmaxHead),
    /// Partial FC.
    PartialFc(PartialFc),
    /// One rank's shard of the model-parallel full softmax or Partial FC
    /// (trained on several ranks: [`Trainer::set_communicator`]).
    ModelParallel(ModelParallelHead),
}

impl TrainHead {
    /// "gif", "arcface" or "partial_fc" (the config's `head` values).
    pub fn name(&self) -> &'static str {
        match self {
            TrainHead::Code { .. } => "gif",
            TrainHead::Softmax(_) => "arcface",
            TrainHead::PartialFc(_) => "partial_fc",
            TrainHead::ModelParallel(h) => match h.sample_rate() {
                Some(_) => "partial_fc",
                None => "arcface",
            },
        }
    }

    /// The identities N.
    pub fn classes(&self) -> usize {
        match self {
            TrainHead::Code { table, .. } => table.len(),
            TrainHead::Softmax(h) => h.config().classes,
            TrainHead::PartialFc(p) => p.head().config().classes,
            TrainHead::ModelParallel(h) => h.config().classes,
        }
    }

    /// The feature size d.
    pub fn dim(&self) -> usize {
        match self {
            TrainHead::Code { head, .. } => head.config().dim,
            TrainHead::Softmax(h) => h.config().dim,
            TrainHead::PartialFc(p) => p.head().config().dim,
            TrainHead::ModelParallel(h) => h.config().dim,
        }
    }

    /// The parameters by name with their values (`centres`, `projections`
    /// for the code head; `weight` for the others, insightface's name).
    pub fn params(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            TrainHead::Code { head, .. } => {
                let mut v = vec![("centres", head.centres())];
                if let Some(p) = head.projections() {
                    v.push(("projections", p));
                }
                v
            }
            TrainHead::Softmax(h) => vec![("weight", h.centres())],
            TrainHead::PartialFc(p) => vec![("weight", p.head().centres())],
            TrainHead::ModelParallel(h) => vec![("weight", h.centres())],
        }
    }

    /// [`TrainHead::params`], mutably.
    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            TrainHead::Code { head, .. } => head.weights_mut(),
            TrainHead::Softmax(h) => vec![("weight", h.centres_mut())],
            TrainHead::PartialFc(p) => vec![("weight", p.centres_mut())],
            TrainHead::ModelParallel(h) => vec![("weight", h.centres_mut())],
        }
    }
}

/// The trainer's settings (insightface's defaults: [`TrainerConfig::insightface`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Weight decay of both groups (insightface: 5e-4 with SGD, 0.1 with AdamW).
    pub weight_decay: f32,
    /// The head group's rate relative to the backbone's (insightface: 1).
    pub head_lr_scale: f32,
    /// Clip the backbone's gradient norm to this (insightface: 5; None: no
    /// clipping; the norm still decides whether a step is skipped).
    pub max_grad_norm: Option<f32>,
    /// Micro-batches per optimizer step (insightface's `gradient_acc`).
    pub gradient_acc: usize,
    /// The learning rate per micro-batch.
    pub schedule: Schedule,
}

impl TrainerConfig {
    /// SGD with momentum 0.9, weight decay 5e-4, clipping at 5, no
    /// accumulation, over `schedule` (insightface's `optimizer = "sgd"`).
    pub fn insightface(schedule: Schedule) -> TrainerConfig {
        TrainerConfig {
            optimizer: OptimizerKind::SGD,
            weight_decay: 5e-4,
            head_lr_scale: 1.0,
            max_grad_norm: Some(5.0),
            gradient_acc: 1,
            schedule,
        }
    }

    /// The optimizer's parameter groups: 0 the backbone (clipped), 1 the
    /// head (its rate scaled by `head_lr_scale`, not clipped); bf16
    /// parameters (a head stored in bf16) keep an f32 master copy, as
    /// PyTorch's autocast keeps the parameters in f32.
    pub fn groups(&self) -> Vec<GroupConfig> {
        let backbone = GroupConfig { lr_scale: 1.0, weight_decay: self.weight_decay, clip: true, master_weights: true };
        vec![backbone, GroupConfig { lr_scale: self.head_lr_scale, clip: false, ..backbone }]
    }

    fn validate(&self) -> Result<()> {
        if self.gradient_acc == 0 || self.gradient_acc > 1 << 20 {
            return Err(Error::invalid(
                "Trainer",
                format!("gradient_acc must be in 1..=2^20, got {}", self.gradient_acc),
            ));
        }
        self.schedule.validate()
    }
}

/// What [`Trainer::metrics`] reads.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainMetrics {
    /// Micro-batches trained (insightface's `global_step`).
    pub step: u64,
    /// Optimizer steps applied.
    pub optimizer_steps: u64,
    /// Optimizer steps skipped for a non-finite gradient.
    pub skipped: u64,
    /// The rate of the last optimizer step.
    pub lr: f64,
    /// The last micro-batch's loss (the code head: Σ_j λ_j·CE_j + γ·L_AR).
    pub loss: f64,
    /// Its training accuracy: the identity predicted (the code head: every
    /// position's greedy token right; the others: the arg-max class).
    pub accuracy: f64,
    /// The code head's accuracy per position (empty for the others).
    pub position_accuracy: Vec<f64>,
    /// The last optimizer step's gradient norm of the backbone, before
    /// clipping.
    pub grad_norm: f32,
}

/// Wall seconds of each part of every micro-batch since
/// [`Trainer::set_profiling`] turned profiling on (one entry per
/// micro-batch; `optimizer` one per optimizer step). Each part ends with a
/// device synchronization, so a part's time is its own work.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepProfile {
    /// The backbone's forward (the images' upload included).
    pub forward: Vec<f64>,
    /// The head's forward and backward (Partial FC: and the scatter of its
    /// sampled gradient into the dense one).
    pub head: Vec<f64>,
    /// The backbone's backward.
    pub backward: Vec<f64>,
    /// The gradients' all-reduce on several ranks (one per optimizer step):
    /// what of it the overlap with the backward left to wait for.
    pub communication: Vec<f64>,
    /// The optimizer step (backbone and head together).
    pub optimizer: Vec<f64>,
    /// The whole micro-batch, from the call to its return.
    pub step: Vec<f64>,
}

/// A head's memory on its device, from the sizes of the buffers a
/// [`Trainer`] holds for it ([`Trainer::head_memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadMemory {
    /// The parameters (`weight`; `centres`, `projections`).
    pub weights: usize,
    /// The gradient buffers, the features' gradient excluded (Partial FC:
    /// the dense `[N, d]` one and the sampled rows').
    pub gradients: usize,
    /// The optimizer's state of the head's group.
    pub optimizer: usize,
    /// The code head's table: codes (u16) and code vectors.
    pub table: usize,
}

impl HeadMemory {
    /// The sum.
    pub fn total(&self) -> usize {
        self.weights + self.gradients + self.optimizer + self.table
    }
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Per head: the accumulated gradients, the second set for accumulation,
/// and the last micro-batch's metrics (one per trainer).
#[allow(clippy::large_enum_variant)]
pub(crate) enum HeadState {
    Code {
        acc: Option<HeadGrads>,
        scratch: Option<HeadGrads>,
        metrics: HeadMetrics,
    },
    Softmax {
        acc: Option<SoftmaxGrads>,
        scratch: Option<SoftmaxGrads>,
        metrics: SoftmaxMetrics,
    },
    PartialFc {
        dense: Tensor,
        step: Option<PfcGrads>,
        metrics: SoftmaxMetrics,
    },
    /// The shard's dense gradient, the last micro-batch's step (its
    /// features' gradient) and loss.
    ModelParallel {
        dense: Tensor,
        step: Option<ModelParallelStep>,
    },
}

impl HeadState {
    /// The features' gradient of the micro-batch just computed (`first`:
    /// the first of its step, written into the accumulator).
    fn features_grad(&self, first: bool) -> Result<&Tensor> {
        let missing = || Error::invalid("Trainer::step", "no features' gradient (internal error)");
        match self {
            HeadState::Code { acc, scratch, .. } => {
                let g = if first { acc.as_ref() } else { scratch.as_ref() };
                g.map(|g| &g.features).ok_or_else(missing)
            }
            HeadState::Softmax { acc, scratch, .. } => {
                let g = if first { acc.as_ref() } else { scratch.as_ref() };
                g.map(|g| &g.features).ok_or_else(missing)
            }
            HeadState::PartialFc { step, .. } => step.as_ref().map(|g| &g.grads.features).ok_or_else(missing),
            HeadState::ModelParallel { step, .. } => step.as_ref().map(|s| &s.features).ok_or_else(missing),
        }
    }

    /// The head's accumulated gradients that data parallelism sums over
    /// ranks, named (none for a model-parallel head: each rank's shard is
    /// its own).
    fn reduced_grads_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            HeadState::Code { acc: Some(g), .. } => {
                let mut v = vec![("head.centres", &mut g.centres)];
                v.extend(g.projections.as_mut().map(|p| ("head.projections", p)));
                v
            }
            HeadState::Softmax { acc: Some(g), .. } => vec![("head.centres", &mut g.centres)],
            HeadState::PartialFc { dense, .. } => vec![("head.centres", dense)],
            _ => Vec::new(),
        }
    }
}

/// Where a step's pixels are.
#[derive(Clone, Copy)]
enum Pixels<'a> {
    /// Ordinary memory: uploaded with a wait.
    Host(&'a [f32]),
    /// Page-locked for the trainer's device: uploaded without one.
    Pinned(&'a PinnedBuffer),
}

impl Pixels<'_> {
    fn as_slice(&self) -> &[f32] {
        match self {
            Pixels::Host(s) => s,
            Pixels::Pinned(p) => p.as_slice(),
        }
    }
}

/// A backbone and a head in training (see the module documentation).
pub struct Trainer {
    pub(crate) cfg: TrainerConfig,
    pub(crate) backbone: IResNet,
    pub(crate) head: TrainHead,
    pub(crate) optimizer: Optimizer,
    pub(crate) backbone_grads: BTreeMap<String, Tensor>,
    pub(crate) state: HeadState,
    /// The images' device buffers: steps from ordinary memory use the
    /// first; steps from page-locked batches alternate, so that the next
    /// batch's upload runs beside the step before.
    images: [Option<Tensor>; 2],
    /// The last work that read each image buffer (its step's backward).
    image_marks: [Option<Mark>; 2],
    /// The buffer the last page-locked batch went to.
    pinned_slot: usize,
    /// A step uploaded its images but ended (an error) before marking the
    /// last work that reads them: the next step marks both buffers first.
    unmarked: bool,
    /// The embeddings' buffer (`[B, E]`), reused while B stays.
    emb: Option<Tensor>,
    /// Micro-batches so far.
    pub(crate) micro: u64,
    pub(crate) last_lr: f64,
    /// Per-part times, when profiling.
    profile: Option<StepProfile>,
    /// The ranks this trainer's gradients are averaged across (None: one).
    comm: Option<Arc<dyn Communicator>>,
    /// The gradients' all-reduce overlapping the backward (on several
    /// ranks), created at the first step that uses it.
    overlap: Option<OverlappedReducer>,
    /// Whether to overlap, and the buckets' size in bytes.
    overlap_on: bool,
    bucket_bytes: usize,
}

const OP: &str = "Trainer::step";

impl Trainer {
    /// A trainer of `backbone` with `head` (on the backbone's device, of
    /// its embedding size).
    pub fn new(backbone: IResNet, head: TrainHead, cfg: TrainerConfig) -> Result<Trainer> {
        cfg.validate()?;
        let dev = backbone.device().clone();
        if head.dim() != backbone.config().embedding {
            return Err(Error::invalid(
                "Trainer",
                format!("the head takes {} features, the backbone embeds {}", head.dim(), backbone.config().embedding),
            ));
        }
        for (name, t) in head.params() {
            if t.device() != &dev {
                return Err(Error::DeviceMismatch { op: "Trainer", a: dev.to_string(), b: format!("head {name}") });
            }
        }
        let optimizer = Optimizer::new(&dev, cfg.optimizer, cfg.groups(), cfg.max_grad_norm)?;
        let state = match &head {
            TrainHead::Code { .. } => HeadState::Code { acc: None, scratch: None, metrics: HeadMetrics::new() },
            TrainHead::Softmax(_) => HeadState::Softmax { acc: None, scratch: None, metrics: SoftmaxMetrics::new() },
            TrainHead::PartialFc(p) => {
                let c = p.head().config();
                HeadState::PartialFc {
                    dense: Tensor::zeros(&dev, &[c.classes, c.dim], DType::F32)?,
                    step: None,
                    metrics: SoftmaxMetrics::new(),
                }
            }
            TrainHead::ModelParallel(h) => {
                HeadState::ModelParallel { dense: Tensor::zeros(&dev, h.centres().shape(), DType::F32)?, step: None }
            }
        };
        let mut backbone = backbone;
        let backbone_grads = backbone
            .params_mut()
            .into_iter()
            .map(|(name, t)| Ok((name, Tensor::zeros(&dev, t.shape(), DType::F32)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Trainer {
            cfg,
            backbone,
            head,
            optimizer,
            backbone_grads,
            state,
            images: [None, None],
            image_marks: [None, None],
            pinned_slot: 1,
            unmarked: false,
            emb: None,
            micro: 0,
            last_lr: 0.0,
            profile: None,
            comm: None,
            overlap: None,
            overlap_on: true,
            bucket_bytes: distributed::BUCKET_BYTES,
        })
    }

    /// Turns profiling on (a fresh [`StepProfile`]) or off. While on, every
    /// micro-batch waits for the device at the end of each part (4 waits a
    /// step), which a GPU run pays for in overlap; off (the default), a
    /// step waits only for the images' upload.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(StepProfile::default);
    }

    /// The head's memory: its parameters, gradient buffers, optimizer state
    /// and code table, as allocated now (after a step: everything).
    pub fn head_memory(&self) -> HeadMemory {
        let bytes = |t: &Tensor| t.numel() * t.dtype().size();
        let weights = self.head.params().iter().map(|(_, t)| bytes(t)).sum();
        let gradients = match &self.state {
            HeadState::Code { acc, scratch, .. } => [acc, scratch]
                .iter()
                .filter_map(|g| g.as_ref())
                .map(|g| bytes(&g.centres) + g.projections.as_ref().map_or(0, bytes))
                .sum(),
            HeadState::Softmax { acc, scratch, .. } => {
                [acc, scratch].iter().filter_map(|g| g.as_ref()).map(|g| bytes(&g.centres)).sum()
            }
            HeadState::PartialFc { dense, step, .. } => {
                bytes(dense) + step.as_ref().map_or(0, |g| bytes(&g.grads.centres))
            }
            HeadState::ModelParallel { dense, step } => bytes(dense) + step.as_ref().map_or(0, |g| bytes(&g.centres)),
        };
        let table = match &self.head {
            TrainHead::Code { table, .. } => table.codes().len() * 2 + table.vector_bytes(),
            _ => 0,
        };
        HeadMemory { weights, gradients, optimizer: self.optimizer.state_bytes(1), table }
    }

    /// Trains data-parallel on `comm`'s ranks (see the module
    /// documentation); a collective: every rank calls it, with the same
    /// configuration. Checks that every rank's trainer is configured alike
    /// (its settings, head, code table and parameter shapes: an error on
    /// every rank names the ranks that differ), then broadcasts rank 0's
    /// parameters and BatchNorm statistics, as DDP does when it wraps a
    /// model. The optimizer's state is not sent: the steps taken are part
    /// of the check, and ranks resuming must read the same checkpoint.
    /// A model-parallel head's shards are each rank's own (not broadcast);
    /// its world must be `comm`'s.
    /// Errors: Partial FC on more than one rank (its model-parallel form
    /// is [`TrainHead::ModelParallel`]), a model-parallel head sharded for
    /// another world, a collective failing.
    pub fn set_communicator(&mut self, comm: Arc<dyn Communicator>) -> Result<()> {
        const OP: &str = "Trainer::set_communicator";
        if comm.world() > 1 && matches!(self.head, TrainHead::PartialFc(_)) {
            return Err(Error::invalid(
                OP,
                "Partial FC on several ranks needs its model-parallel form, each rank sampling its shard of the \
                 centres: TrainHead::ModelParallel (a ModelParallelHead with a sample rate, what gif-fr train uses \
                 for head = \"partial_fc\" on several ranks)",
            ));
        }
        if let TrainHead::ModelParallel(h) = &self.head {
            if h.world() != comm.world() {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "the model-parallel head was sharded for {} ranks, the world has {}",
                        h.world(),
                        comm.world()
                    ),
                ));
            }
        }
        distributed::check_same(comm.as_ref(), "the trainer's configuration", self.rank_fingerprint())?;
        if comm.world() > 1 {
            // One broadcast of the backbone's state (copies, then set:
            // `set` checks each value and drops the folded network).
            let mut state: Vec<(String, Tensor)> =
                self.backbone.state().into_iter().map(|(n, t)| Ok((n, t.to_f32()?))).collect::<Result<_>>()?;
            distributed::broadcast_tensors(
                comm.as_ref(),
                &mut state.iter_mut().map(|(_, t)| t).collect::<Vec<_>>(),
                0,
            )?;
            for (name, t) in state {
                self.backbone.set(&name, t)?;
            }
            if !matches!(self.head, TrainHead::ModelParallel(_)) {
                let mut head: Vec<&mut Tensor> = self.head.params_mut().into_iter().map(|(_, t)| t).collect();
                distributed::broadcast_tensors(comm.as_ref(), &mut head, 0)?;
            }
        }
        self.comm = Some(comm);
        self.overlap = None;
        Ok(())
    }

    /// Whether the gradients' all-reduce overlaps the backward (DDP's
    /// default; on by default here too), and the size of its buckets in
    /// bytes (`distributed::BUCKET_BYTES` by default, the `bucket_cap_mb`
    /// arcface_torch gives DDP). The overlap ([`OverlappedReducer`]) applies
    /// to every rank of a world of two or more: CPU ranks; GPU ranks with a
    /// host communicator (MPI), whose gradients are staged through
    /// page-locked buckets on a second stream; NCCL ranks, whose gradients
    /// are copied into device buckets reduced on that stream. Without it the
    /// gradients are all-reduced after the backward, in buckets of the same
    /// size (NCCL: in place). A collective setting: every rank must choose
    /// the same.
    /// Errors (on every rank): the ranks chose differently (their buckets
    /// would not match: MPI would sum unrelated gradients or fail).
    pub fn set_overlap(&mut self, on: bool, bucket_bytes: usize) -> Result<()> {
        self.overlap_on = on;
        self.bucket_bytes = bucket_bytes.max(4);
        self.overlap = None;
        match self.comm.as_ref().filter(|c| c.world() > 1) {
            Some(comm) => {
                let setting = distributed::fingerprint(self.reduction_setting().as_bytes());
                distributed::check_same(comm.as_ref(), "the all-reduce's overlap and bucket size", setting)
            }
            None => Ok(()),
        }
    }

    /// How the gradients are all-reduced, in words: the ranks must agree
    /// (part of the configuration check).
    pub(crate) fn reduction_setting(&self) -> String {
        let host = !self.backbone.device().runs_kernels();
        format!("overlap {} bucket {} host {host}", self.overlap_on, self.bucket_bytes)
    }

    /// What the last optimizer step's overlapped all-reduce achieved (None
    /// when it did not overlap: one rank, or overlap turned off).
    pub fn overlap_stats(&self) -> Option<OverlapStats> {
        self.overlap.as_ref().map(|o| o.stats())
    }

    /// Whether this step's gradients go through the overlapped reducer.
    fn overlapping(&self) -> bool {
        self.overlap_on && self.comm.as_ref().is_some_and(|c| c.world() > 1)
    }

    /// The communicator, when training data-parallel.
    pub fn communicator(&self) -> Option<&Arc<dyn Communicator>> {
        self.comm.as_ref()
    }

    /// The times recorded since profiling was turned on.
    pub fn profile(&self) -> Option<&StepProfile> {
        self.profile.as_ref()
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    /// The backbone.
    pub fn backbone(&self) -> &IResNet {
        &self.backbone
    }
    /// The backbone, mutably (evaluation between steps: `infer`, `embed`).
    pub fn backbone_mut(&mut self) -> &mut IResNet {
        &mut self.backbone
    }
    /// The head.
    pub fn head(&self) -> &TrainHead {
        &self.head
    }
    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }
    /// Micro-batches trained so far.
    pub fn steps(&self) -> u64 {
        self.micro
    }
    /// Consumes the trainer, returning the backbone and the head.
    pub fn into_parts(self) -> (IResNet, TrainHead) {
        (self.backbone, self.head)
    }

    /// One micro-batch: `images` NHWC `[B, H, W, 3]` f32 normalized as
    /// insightface's `(x/255 − 0.5)/0.5`, `labels` the B identities (< N).
    /// Returns whether an optimizer step ended it. Errors (before any
    /// state changes): an empty batch, sizes that do not match, a label
    /// out of range or a non-finite pixel (naming the sample).
    pub fn step(&mut self, images: &[f32], labels: &[u32]) -> Result<bool> {
        self.step_from(Pixels::Host(images), labels)
    }

    /// One micro-batch from a loader ([`Trainer::step`]). A batch in
    /// page-locked memory for this trainer's device ([`Loader::pinned`]) is
    /// uploaded without waiting: on a GPU the copy runs on a second stream
    /// beside the previous step's kernels (into the other of two image
    /// buffers), and the step's kernels wait for it on the device. Other
    /// batches go through [`Trainer::step`].
    ///
    /// [`Loader::pinned`]: crate::data::Loader::pinned
    pub fn step_batch(&mut self, batch: &Batch) -> Result<bool> {
        match batch.images.pinned() {
            Some(p) if p.device() == self.backbone.device() => self.step_from(Pixels::Pinned(p), &batch.labels),
            _ => self.step_from(Pixels::Host(&batch.images), &batch.labels),
        }
    }

    fn step_from(&mut self, pixels: Pixels<'_>, labels: &[u32]) -> Result<bool> {
        // On the CPU, on one of rayon's workers: the step's parallel loops
        // (hundreds) then split among the workers instead of each being sent
        // from this thread, which would sleep and be woken once per loop.
        if !self.backbone.device().runs_kernels() && rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.step_from(pixels, labels));
        }
        let images = pixels.as_slice();
        let s = self.backbone.config().input;
        let per = s * s * 3;
        let b = labels.len();
        if b == 0 {
            return Err(Error::invalid(OP, "empty batch"));
        }
        if Some(images.len()) != b.checked_mul(per) {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{b} images of {s} x {s} x 3 values ({b} labels)"),
                got: format!("{} values", images.len()),
            });
        }
        let n = self.head.classes();
        if let Some(p) = labels.iter().position(|&y| y as usize >= n) {
            return Err(Error::invalid(OP, format!("labels[{p}] = {} is not below the {n} identities", labels[p])));
        }
        if let Some(i) = images.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("image {} holds a non-finite value ({}) at element {}", i / per, images[i], i % per),
            ));
        }
        let dev = self.backbone.device().clone();
        let started = std::time::Instant::now();
        let mut clock = started;
        // Ends a part when profiling: waits for the device, records the time.
        let lap = |profile: &mut Option<StepProfile>,
                   clock: &mut std::time::Instant,
                   part: fn(&mut StepProfile) -> &mut Vec<f64>|
         -> Result<()> {
            if let Some(p) = profile {
                dev.synchronize()?;
                let now = std::time::Instant::now();
                part(p).push((now - *clock).as_secs_f64());
                *clock = now;
            }
            Ok(())
        };
        if std::mem::take(&mut self.unmarked) {
            // Everything queued so far, the failed step's reads included.
            self.image_marks = [Some(dev.mark()?), Some(dev.mark()?)];
        }
        let slot = match pixels {
            Pixels::Host(_) => {
                match &mut self.images[0] {
                    Some(t) if t.shape()[0] == b => t.copy_from_host(images)?,
                    t => *t = Some(Tensor::from_slice(&dev, &[b, s, s, 3], images)?),
                }
                0
            }
            Pixels::Pinned(p) => {
                let slot = 1 - self.pinned_slot;
                if !matches!(&self.images[slot], Some(t) if t.shape()[0] == b) {
                    self.images[slot] = Some(Tensor::empty(&dev, &[b, s, s, 3], DType::F32)?);
                    // A GPU's allocations are ordered on the device's stream:
                    // the copy on the second stream must follow this one.
                    self.image_marks[slot] = Some(dev.mark()?);
                }
                let t =
                    self.images[slot].as_mut().ok_or_else(|| Error::invalid(OP, "no image buffer (internal error)"))?;
                t.copy_from_pinned(p, 0, self.image_marks[slot].as_ref())?;
                self.pinned_slot = slot;
                slot
            }
        };
        self.unmarked = true;
        let first = self.micro.is_multiple_of(self.cfg.gradient_acc as u64);
        let e = self.backbone.config().embedding;
        match &self.emb {
            Some(t) if t.shape()[0] == b => {}
            _ => self.emb = Some(Tensor::empty(&dev, &[b, e], DType::F32)?),
        }
        // The step's last micro-batch all-reduces its gradients as the
        // backward finishes them, when overlapping.
        let overlap = self.overlapping() && (self.micro + 1).is_multiple_of(self.cfg.gradient_acc as u64);
        if overlap && self.overlap.is_none() {
            let comm = self.comm.clone().ok_or_else(|| Error::invalid(OP, "no communicator (internal error)"))?;
            self.overlap = Some(OverlappedReducer::new(comm, self.bucket_bytes)?);
        }
        let Trainer {
            backbone,
            head,
            state,
            images,
            image_marks,
            unmarked,
            emb: Some(emb),
            backbone_grads,
            profile,
            comm,
            micro,
            overlap: reducer,
            ..
        } = self
        else {
            return Err(Error::invalid(OP, "no embedding buffer (internal error)"));
        };
        let images = images[slot].as_ref().ok_or_else(|| Error::invalid(OP, "no image buffer (internal error)"))?;
        backbone.forward_into(images, true, emb)?;
        lap(profile, &mut clock, |p| &mut p.forward)?;
        let emb = &*emb;
        let d = head.dim();
        match (&mut *state, &*head) {
            (HeadState::Code { acc, scratch, metrics }, TrainHead::Code { head, table }) => {
                let fresh = || HeadGrads::new(head, b);
                let acc = sized(acc, fresh, b, d)?;
                if first {
                    head.forward_backward_into(emb, labels, table, acc, metrics)?;
                } else {
                    let sc = sized(scratch, fresh, b, d)?;
                    head.forward_backward_into(emb, labels, table, sc, metrics)?;
                    add_assign(&mut acc.centres, &sc.centres)?;
                    if let (Some(a), Some(g)) = (acc.projections.as_mut(), sc.projections.as_ref()) {
                        add_assign(a, g)?;
                    }
                }
            }
            (HeadState::Softmax { acc, scratch, metrics }, TrainHead::Softmax(h)) => {
                let c = h.config();
                let fresh = || SoftmaxGrads::new(h.device(), b, c.classes, c.dim);
                let acc = sized(acc, fresh, b, d)?;
                if first {
                    h.forward_backward_into(emb, labels, acc, metrics)?;
                } else {
                    let sc = sized(scratch, fresh, b, d)?;
                    h.forward_backward_into(emb, labels, sc, metrics)?;
                    add_assign(&mut acc.centres, &sc.centres)?;
                }
            }
            (HeadState::PartialFc { dense, step, metrics }, TrainHead::PartialFc(p)) => {
                let g = match step {
                    Some(g) if g.grads.features.shape()[0] == b => g,
                    slot => slot.insert(PfcGrads::new(p, b)?),
                };
                p.forward_backward_into(emb, labels, self.micro, g, metrics)?;
                if first {
                    dense.fill_zeros()?;
                }
                crate::ops::rows::axpy_sampled_rows(dense, g.sampled(), &g.grads.centres, 1.0)?;
            }
            (HeadState::ModelParallel { dense, step }, TrainHead::ModelParallel(h)) => {
                let Some(comm) = comm.as_ref() else {
                    return Err(Error::invalid(
                        OP,
                        "a model-parallel head trains on a communicator's ranks: call set_communicator first",
                    ));
                };
                let out = step.insert(h.forward_backward(comm.as_ref(), emb, labels, *micro)?);
                if first {
                    dense.fill_zeros()?;
                }
                match (&out.sampled_rows, &out.sampled) {
                    // Drawn on the device (GPU ranks): no upload.
                    (Some(rows), _) => crate::ops::rows::axpy_sampled_rows(dense, rows, &out.centres, 1.0)?,
                    (None, Some(rows)) => {
                        let rows = Tensor::from_slice(&dev, &[rows.len()], rows)?;
                        crate::ops::rows::axpy_sampled_rows(dense, &rows, &out.centres, 1.0)?;
                    }
                    (None, None) => add_assign(dense, &out.centres)?,
                }
            }
            _ => return Err(Error::invalid(OP, "head state of another head (internal error)")),
        }
        // The head's gradients are final already: they lead.
        let lead = match reducer.as_mut().filter(|_| overlap) {
            Some(r) => state.reduced_grads_mut().into_iter().try_for_each(|(name, g)| r.ready(name, g)),
            None => Ok(()),
        };
        let state = &*state;
        let d_emb = state.features_grad(first)?;
        lap(profile, &mut clock, |p| &mut p.head)?;
        match reducer.as_mut().filter(|_| overlap) {
            Some(r) => {
                let run = lead.and_then(|()| {
                    backbone.backward_notify(d_emb, backbone_grads, !first, &mut |name, g| r.ready(name, g))
                });
                r.end_backward();
                if let Err(e) = run {
                    // Buckets may be in flight: the reducer waits for them
                    // as it is dropped; the next step starts a fresh one.
                    *reducer = None;
                    return Err(e);
                }
            }
            None if first => backbone.backward_into(d_emb, backbone_grads)?,
            None => backbone.backward_accumulate(d_emb, backbone_grads)?,
        }
        // The backward was the last to read the images: the upload of the
        // batch after next into this buffer waits for it.
        image_marks[slot] = Some(dev.mark()?);
        *unmarked = false;
        lap(profile, &mut clock, |p| &mut p.backward)?;
        let t = self.micro;
        self.micro += 1;
        let stepped = self.micro.is_multiple_of(self.cfg.gradient_acc as u64);
        if stepped {
            let lr = self.cfg.schedule.lr(t);
            self.reduce()?;
            if self.comm.as_ref().is_some_and(|c| c.world() > 1) {
                lap(&mut self.profile, &mut clock, |p| &mut p.communication)?;
            }
            self.apply(lr)?;
            lap(&mut self.profile, &mut clock, |p| &mut p.optimizer)?;
        }
        if let Some(p) = &mut self.profile {
            p.step.push(started.elapsed().as_secs_f64());
        }
        Ok(stepped)
    }

    /// Sums the accumulated gradients over the ranks (data parallelism):
    /// waits for the buckets the backward sent, or all-reduces them now.
    fn reduce(&mut self) -> Result<()> {
        let Trainer { state, backbone_grads, comm, overlap, bucket_bytes, .. } = self;
        if let Some(r) = overlap.as_mut().filter(|r| r.in_progress()) {
            // The buckets sent during the backward: wait, write the sums.
            let mut grads: BTreeMap<&str, &mut Tensor> =
                backbone_grads.iter_mut().map(|(n, t)| (n.as_str(), t)).collect();
            grads.extend(state.reduced_grads_mut());
            r.finish(&mut grads, 1.0)?;
        } else if let Some(comm) = comm.as_ref().filter(|c| c.world() > 1) {
            // The sum over ranks; the step's scale makes it the mean.
            let mut grads: Vec<&mut Tensor> = backbone_grads.values_mut().collect();
            grads.extend(state.reduced_grads_mut().into_iter().map(|(_, t)| t));
            comm.all_reduce_tensors(&mut grads, 1.0, *bucket_bytes)?;
        }
        Ok(())
    }

    /// The optimizer step over the accumulated (and reduced) gradients.
    fn apply(&mut self, lr: f64) -> Result<()> {
        // A model-parallel head's loss is already the mean over every rank's
        // rows: its gradients are summed over ranks, not averaged.
        let sharded = matches!(self.head, TrainHead::ModelParallel(_));
        let world = if sharded { 1 } else { self.comm.as_ref().map_or(1, |c| c.world()) };
        let scale = 1.0 / (self.cfg.gradient_acc as f32 * world as f32);
        let Trainer { backbone, head, state, backbone_grads, optimizer, .. } = self;
        let head_refs: Vec<ParamRef<'_>> = match (state, head) {
            (HeadState::Code { acc: Some(g), .. }, TrainHead::Code { head, .. }) => head.param_refs(g)?,
            (HeadState::Softmax { acc: Some(g), .. }, TrainHead::Softmax(h)) => h.param_refs(g)?,
            (HeadState::PartialFc { dense, .. }, TrainHead::PartialFc(p)) => {
                vec![ParamRef { value: p.centres_mut(), grad: dense }]
            }
            (HeadState::ModelParallel { dense, .. }, TrainHead::ModelParallel(h)) => {
                vec![ParamRef { value: h.centres_mut(), grad: dense }]
            }
            _ => return Err(Error::invalid(OP, "no head gradient (internal error)")),
        };
        let mut groups = vec![backbone.param_refs(backbone_grads)?, head_refs];
        optimizer.step_scaled(&mut groups, lr as f32, scale)?;
        self.last_lr = lr;
        Ok(())
    }

    /// The counters and the last micro-batch's loss and accuracy: reads the
    /// device (one synchronization); call it every k steps. Errors: no step
    /// yet, a non-finite loss (the step's optimizer update was skipped and
    /// counted), a label the device found out of range.
    pub fn metrics(&self) -> Result<TrainMetrics> {
        let (loss, accuracy, position_accuracy) = match &self.state {
            HeadState::Code { metrics, .. } => {
                let l = metrics.read()?;
                (l.total, l.identity_accuracy, l.accuracy)
            }
            HeadState::Softmax { metrics, .. } | HeadState::PartialFc { metrics, .. } => {
                let l = metrics.read()?;
                (l.loss, l.accuracy, Vec::new())
            }
            HeadState::ModelParallel { step, .. } => {
                const OP: &str = "Trainer::metrics";
                let l = step.as_ref().ok_or_else(|| Error::invalid(OP, "no step yet"))?.loss;
                if !l.loss.is_finite() {
                    return Err(Error::invalid(OP, "the loss is not finite (a non-finite feature or centre?)"));
                }
                (l.loss, l.accuracy, Vec::new())
            }
        };
        Ok(TrainMetrics {
            step: self.micro,
            optimizer_steps: self.optimizer.steps()?,
            skipped: self.optimizer.skipped()?,
            lr: self.last_lr,
            loss,
            accuracy,
            position_accuracy,
            grad_norm: self.optimizer.last_norms()?.0,
        })
    }
}

/// Gradient buffers whose features' gradient holds `b` rows: the slot's
/// (its features re-sized when B changed), or new ones.
fn sized<G: FeatureGrad>(
    slot: &mut Option<G>,
    fresh: impl FnOnce() -> Result<G>,
    b: usize,
    d: usize,
) -> Result<&mut G> {
    let g = match slot {
        Some(g) => g,
        None => slot.insert(fresh()?),
    };
    let f = g.features_mut();
    if f.shape() != [b, d] {
        *f = Tensor::empty(f.device(), &[b, d], DType::F32)?;
    }
    Ok(g)
}

trait FeatureGrad {
    fn features_mut(&mut self) -> &mut Tensor;
}
impl FeatureGrad for HeadGrads {
    fn features_mut(&mut self) -> &mut Tensor {
        &mut self.features
    }
}
impl FeatureGrad for SoftmaxGrads {
    fn features_mut(&mut self) -> &mut Tensor {
        &mut self.features
    }
}
