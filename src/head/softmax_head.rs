//! The O(N) baseline: the full N-way margin softmax over cosine logits,
//! fused so that the B × N logits never exist (kernels/softmax_head.cu), and
//! the nearest-centre top-k. [`super::partial_fc`] runs the same kernels over
//! a sample of the classes.
//!
//! For features `x` (`[B, d]`) with labels `y` and centres `W` (`[N, d]`, f32
//! or bf16): `u = x/‖x‖`, `c_bn = u_b·w_n/‖w_n‖`, logits `s·c` with the
//! margin f on the target (`s·f(c_by)`), `L = mean_b CE_b`. Gradients: with
//! respect to the features (f32 `[B, d]`) and the centres (f32 `[N, d]`, also
//! for bf16 centres).
//!
//! Device memory beyond the weights and their gradient: `O(B·d + B·splits +
//! N)` (the normalized features and their gradient, per-split partial
//! log-sum-exps, the centres' inverse norms). [`Device::memory_stats`]
//! measures it; tests/softmax_memory.rs checks it.
//!
//! Determinism: the loss, accuracy and centre gradient are reproducible run
//! to run when every class tile is owned by one block (N ≥ 128·528 classes;
//! below, the backward splits the batch across blocks, which then add their
//! parts of a centre gradient in any order); the feature gradient is summed
//! over class tiles with atomic adds, so its last bits may vary run to run on
//! a GPU (as in Cut Cross-Entropy and FlashAttention's backward). The
//! simulator runs in a fixed order and is reproducible.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::margin::{margin_ce_row, Angle, Margin, MarginGrad, RowCe};
use super::stats::{DeviceRows, StepStats};
use crate::error::{Error, Result};
use crate::ops::gemm::{cpu::gemm_sized as cpu_gemm, Op};
use crate::ops::labels::{self, Labels};
use crate::ops::rowwise;
use crate::ops::topk::TopK;
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::kernels::Ptr;
use crate::runtime::launch::{self, launch_one_of};
use crate::runtime::tensor::{DType, Tensor};

/// Normalization floor (as PyTorch's F.normalize).
pub(crate) const EPS: f32 = 1e-12;
/// Blocks the forward and backward aim for (about 4 per SM on an H100).
const TARGET_BLOCKS: usize = 528;
/// Most splits of the class range in the forward.
const MAX_SPLITS: usize = 1024;
/// Largest k of [`SoftmaxHead::top_k`] on a GPU (shared memory holds 128
/// sorted lists of k).
pub const MAX_DEVICE_K: usize = 128;
/// Classes per chunk of the CPU path (its extra memory is `B·C + 2·C·d`,
/// plus the `gemm` crate's packing workspace for GEMMs of that size).
pub const CPU_CHUNK: usize = 4096;
const TILE: usize = 128;

/// Settings of a [`SoftmaxHead`] (and of [`super::PartialFc`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxHeadConfig {
    /// Embedding size d.
    pub dim: usize,
    /// Number of classes N.
    pub classes: usize,
    /// Margin on the target class.
    pub margin: Margin,
    /// Logit scale s (64 by default).
    pub scale: f32,
    /// Exact or straight-through (insightface) margin gradient.
    pub margin_grad: MarginGrad,
    /// Splits of the class range in the forward pass (`None`: enough blocks
    /// to fill a GPU). A tuning knob; results do not depend on it beyond
    /// rounding.
    pub splits: Option<usize>,
    /// On a GPU backend, run the products on the bf16 tensor-core tile
    /// (f32 accumulation), as PyTorch's autocast does: the normalized
    /// features are rounded to bf16, the centres must be bf16, the
    /// softmax's gradient is rounded to bf16 for the two backward GEMMs.
    /// The classes go in chunks ([`SoftmaxHeadConfig::chunk`]), each
    /// chunk's logits held once (never all B × N). Off by default (the
    /// fp32 SIMT kernels, fully fused); no effect on the CPU.
    pub tensor_cores: bool,
    /// Classes per chunk of the tensor-core path (`None`: as many as fit
    /// 256 MiB of chunk buffers, 8 bytes per logit, a multiple of 128;
    /// a given size is rounded up to a multiple of 8).
    pub chunk: Option<usize>,
}

impl SoftmaxHeadConfig {
    /// insightface's defaults: `margin_list = (1.0, 0.5, 0.0)` (ArcFace,
    /// [`Margin::INSIGHTFACE_ARCFACE`]) with its straight-through gradient,
    /// s = 64.
    pub fn new(dim: usize, classes: usize) -> Self {
        SoftmaxHeadConfig {
            dim,
            classes,
            margin: Margin::INSIGHTFACE_ARCFACE,
            scale: 64.0,
            margin_grad: MarginGrad::StraightThrough,
            splits: None,
            tensor_cores: false,
            chunk: None,
        }
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        if self.dim == 0 || self.classes == 0 {
            return Err(Error::invalid(op, "dim and classes must be positive"));
        }
        if self.classes > i32::MAX as usize || self.dim > i32::MAX as usize / 4 {
            return Err(Error::invalid(op, "classes or dim too large for 32-bit indices"));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::invalid(op, "scale must be finite and positive"));
        }
        if self.splits == Some(0) || self.chunk == Some(0) {
            return Err(Error::invalid(op, "splits and chunk must be positive"));
        }
        self.margin.validate(op)
    }
}

/// Loss and accuracy of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxLoss {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Fraction of samples whose largest plain cosine is the label's.
    pub accuracy: f64,
}

/// Gradients of the mean loss.
#[derive(Debug)]
pub struct SoftmaxGrads {
    /// With respect to the features, f32 `[B, d]`.
    pub features: Tensor,
    /// With respect to the centres, f32 `[N, d]` (for [`super::PartialFc`],
    /// `[k, d]`: the sampled rows, in the order of the sample).
    pub centres: Tensor,
}

impl SoftmaxGrads {
    /// Buffers for the gradients at batch size `batch` over `classes`
    /// centre rows (N for [`SoftmaxHead`]), f32 on `device`, unwritten (NaN
    /// where the device poisons), for the `_into` steps.
    pub fn new(device: &Device, batch: usize, classes: usize, dim: usize) -> Result<SoftmaxGrads> {
        Ok(SoftmaxGrads {
            features: Tensor::empty(device, &[batch, dim], DType::F32)?,
            centres: Tensor::empty(device, &[classes, dim], DType::F32)?,
        })
    }
}

/// Loss, accuracy and the device label check of one step, left on the
/// device until [`SoftmaxMetrics::read`] (per-sample rows, summed at
/// reading). Reusable from step to step.
#[derive(Debug, Default)]
pub struct SoftmaxMetrics {
    /// Device rows `[5, B]`: lse, gy, loss, hit, singular weight.
    state: StepStats<SoftmaxLoss>,
}

impl SoftmaxMetrics {
    /// Metrics before any step.
    pub fn new() -> SoftmaxMetrics {
        SoftmaxMetrics::default()
    }

    /// The step's loss and accuracy (a download of 5·B floats and the label
    /// flag on a GPU backend). Errors: a label out of range found on the
    /// device, a non-finite loss, no step yet.
    pub fn read(&self) -> Result<SoftmaxLoss> {
        const OP: &str = "SoftmaxHead::forward_backward";
        let loss = match self.state.read(OP, "SoftmaxMetrics::read")? {
            Ok(loss) => loss,
            Err(DeviceRows { sums, b, .. }) => SoftmaxLoss { loss: sums[2], accuracy: sums[3] / b as f64 },
        };
        if !loss.loss.is_finite() {
            return Err(Error::invalid(OP, "the loss is not finite (a non-finite feature or centre?)"));
        }
        Ok(loss)
    }
}

/// The full margin-softmax head: N centres on one device.
pub struct SoftmaxHead {
    cfg: SoftmaxHeadConfig,
    centres: Tensor,
}

impl SoftmaxHead {
    /// Seeded random centres (normal with variance 1/d), stored as `dtype`
    /// (f32 or bf16) on `device`.
    pub fn new(cfg: SoftmaxHeadConfig, device: &Device, dtype: DType, seed: u64) -> Result<SoftmaxHead> {
        cfg.validate("SoftmaxHead")?;
        let n = cfg.classes.checked_mul(cfg.dim).ok_or_else(|| Error::invalid("SoftmaxHead", "N·d overflows"))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let sd = 1.0 / (cfg.dim as f32).sqrt();
        let w: Vec<f32> = (0..n).map(|_| sd * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect();
        let centres = Tensor::from_f32(device, &[cfg.classes, cfg.dim], &w, dtype)?;
        SoftmaxHead::from_weights(cfg, centres)
    }

    /// A head over given centres, `[N, d]`, f32 or bf16.
    pub fn from_weights(cfg: SoftmaxHeadConfig, centres: Tensor) -> Result<SoftmaxHead> {
        const OP: &str = "SoftmaxHead::from_weights";
        cfg.validate(OP)?;
        check_centres(OP, &centres, cfg.classes, cfg.dim)?;
        if cfg.tensor_cores && centres.dtype() != DType::BF16 {
            return Err(Error::invalid(OP, "tensor_cores needs bf16 centres (the tensor cores' operands)"));
        }
        Ok(SoftmaxHead { cfg, centres })
    }

    /// The configuration.
    pub fn config(&self) -> &SoftmaxHeadConfig {
        &self.cfg
    }
    /// The centres, `[N, d]`.
    pub fn centres(&self) -> &Tensor {
        &self.centres
    }
    /// The device.
    pub fn device(&self) -> &Device {
        self.centres.device()
    }
    /// The centres (insightface's `weight`) with their gradient from
    /// `grads`, for [`crate::train::Optimizer::step`] (a full head's
    /// gradient: `[N, d]`).
    pub fn param_refs<'a>(&'a mut self, grads: &'a SoftmaxGrads) -> Result<Vec<crate::train::ParamRef<'a>>> {
        if grads.centres.shape() != self.centres.shape() {
            return Err(Error::Shape {
                op: "SoftmaxHead::param_refs",
                expected: format!("a centre gradient {:?}", self.centres.shape()),
                got: format!("{:?}", grads.centres.shape()),
            });
        }
        Ok(vec![crate::train::ParamRef { value: &mut self.centres, grad: &grads.centres }])
    }
    pub(crate) fn centres_mut(&mut self) -> &mut Tensor {
        &mut self.centres
    }

    /// One training step's forward and backward pass (labels: host `u32`s
    /// or a u32 / i64 tensor on the head's device). Labels out of range, a
    /// shape mismatch, an empty batch or a non-finite loss are errors. New
    /// gradient buffers, and the loss read back:
    /// [`SoftmaxHead::forward_backward_into`] is the step without either.
    pub fn forward_backward<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
    ) -> Result<(SoftmaxLoss, SoftmaxGrads)> {
        let b = features.shape().first().copied().unwrap_or(0);
        let mut grads = SoftmaxGrads::new(self.device(), b, self.cfg.classes, self.cfg.dim)?;
        let mut metrics = SoftmaxMetrics::new();
        self.forward_backward_into(features, labels, &mut grads, &mut metrics)?;
        Ok((metrics.read()?, grads))
    }

    /// [`SoftmaxHead::forward_backward`] into given buffers: the gradients
    /// overwrite `grads` (features `[B, d]`, centres `[N, d]`, f32, on the
    /// head's device), the loss stays in `metrics` until
    /// [`SoftmaxMetrics::read`]. Nothing waits for the device, except with
    /// device labels and the exact ArcFace gradient (its singular part
    /// groups the batch by target on the host: one download of B labels).
    pub fn forward_backward_into<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
        grads: &mut SoftmaxGrads,
        metrics: &mut SoftmaxMetrics,
    ) -> Result<()> {
        const OP: &str = "SoftmaxHead::forward_backward";
        let labels = labels.into();
        let b = check_batch(OP, &self.cfg, self.device(), features, labels.len())?;
        let n = self.cfg.classes;
        grads.check(OP, self.device(), b, n, self.cfg.dim)?;
        let targets = if self.device().kind() == DeviceKind::Cpu {
            let host = labels.host_checked(OP, self.device(), n)?;
            Targets::Host(host.iter().map(|&y| y as i32).collect())
        } else {
            Targets::Device(labels::prepare(OP, self.device(), labels, n, None)?)
        };
        fused_step(OP, &self.cfg, &self.centres, None, n, features, targets, grads, metrics)
    }

    /// The k nearest centres of each feature by cosine, best first (ties:
    /// the lower class first): the O(N) identification baseline. Ids are
    /// class indices, scores cosines. k must be in 1..=N (and at most
    /// [`MAX_DEVICE_K`] on a GPU).
    pub fn top_k(&self, features: &Tensor, k: usize) -> Result<TopK> {
        const OP: &str = "SoftmaxHead::top_k";
        let (b, d) = features.dims2(OP)?;
        check_features(OP, &self.cfg, self.device(), features, b, d)?;
        let n = self.cfg.classes;
        if k == 0 || k > n {
            return Err(Error::invalid(OP, format!("k must be in 1..={n}, got {k}")));
        }
        let dev = self.device();
        if dev.kind() == DeviceKind::Cpu {
            let (u, _) = cpu::normalize_rows(&features.host_f32()?, d);
            let w = self.centres.host_f32()?;
            return Ok(cpu::top_k(&u, &w, d, k));
        }
        if k > MAX_DEVICE_K {
            return Err(Error::invalid(OP, format!("k must be at most {MAX_DEVICE_K} on a GPU, got {k}")));
        }
        if b == 0 {
            return Ok(TopK { k, ids: vec![], scores: vec![] });
        }
        let (u, _) = normalized_f32(features)?;
        let rnorm = inv_norms(&self.centres, None, n)?;
        let (btiles, ntiles) = (b.div_ceil(TILE), n.div_ceil(TILE));
        let splits = self.cfg.splits.unwrap_or_else(|| auto_splits(btiles)).min(ntiles).min(MAX_SPLITS);
        let mut cand_s = Tensor::empty(dev, &[b * splits * k], DType::F32)?;
        let mut cand_i = dev.alloc(b * splits * k * 4)?;
        let smem = (TILE * (TILE + 1) * 4 + TILE * k * 8) as u32;
        let cfg = LaunchConfig { grid: (splits as u32, btiles as u32, 1), block: (256, 1, 1), shared_bytes: smem };
        let (bi, ni, di, ki, si) = (b as i32, n as i32, d as i32, k as i32, splits as i32);
        // SAFETY: u is [B, d], the centres [N, d], rnorm N; the candidates
        // hold B·splits·k entries; k ≤ MAX_DEVICE_K fits the shared memory.
        unsafe {
            launch_one_of!((self.centres.dtype(), d % 4 == 0), {
                (DType::F32, false) => topk_fwd_f32, (DType::F32, true) => topk_fwd_f32_v,
                (_, false) => topk_fwd_bf16, (_, true) => topk_fwd_bf16_v,
            }, (dev, cfg, u.ptr()?, self.centres.ptr()?, rnorm.ptr()?, bi, ni, di, ki, si, cand_s.ptr_mut()?, dev.ptr_mut_of(&mut cand_i)))
        }?;
        let mut out_s = Tensor::empty(dev, &[b, k], DType::F32)?;
        let mut out_i = dev.alloc(b * k * 4)?;
        // SAFETY: the candidates as above; the outputs hold B·k entries.
        unsafe {
            launch::topk_merge(
                dev,
                LaunchConfig::linear(b.div_ceil(256) as u32, 256, 0),
                cand_s.ptr()?,
                dev.ptr_of(&cand_i),
                bi,
                si,
                ki,
                out_s.ptr_mut()?,
                dev.ptr_mut_of(&mut out_i),
            )
        }?;
        let ids: Vec<i32> = bytemuck::pod_collect_to_vec(&dev.download(&out_i, b * k * 4)?);
        Ok(TopK { k, ids: ids.into_iter().map(i64::from).collect(), scores: out_s.to_vec::<f32>()? })
    }

    /// Plain SGD: `W ← W − lr·g` (bf16 centres are rounded to nearest even).
    pub fn sgd_step(&mut self, grads: &SoftmaxGrads, lr: f32) -> Result<()> {
        crate::ops::rows::axpy_rows(&mut self.centres, None, &grads.centres, -lr)
    }
}

pub(crate) fn check_centres(op: &'static str, centres: &Tensor, n: usize, d: usize) -> Result<()> {
    if centres.shape() != [n, d] || !matches!(centres.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::Shape {
            op,
            expected: format!("f32 or bf16 centres [{n}, {d}]"),
            got: format!("{:?} {:?}", centres.shape(), centres.dtype()),
        });
    }
    Ok(())
}

fn check_features(
    op: &'static str,
    cfg: &SoftmaxHeadConfig,
    dev: &Device,
    x: &Tensor,
    b: usize,
    d: usize,
) -> Result<()> {
    if d != cfg.dim || !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::Shape {
            op,
            expected: format!("f32 or bf16 features [B, {}]", cfg.dim),
            got: format!("{:?} {:?}", x.shape(), x.dtype()),
        });
    }
    if x.device() != dev {
        return Err(Error::DeviceMismatch { op, a: dev.to_string(), b: x.device().to_string() });
    }
    if b > i32::MAX as usize / TILE {
        return Err(Error::invalid(op, "batch too large"));
    }
    Ok(())
}

impl SoftmaxGrads {
    pub(crate) fn check(&self, op: &'static str, dev: &Device, b: usize, n: usize, d: usize) -> Result<()> {
        self.features.check_output(op, dev, &[&[b, d]])?;
        self.centres.check_output(op, dev, &[&[n, d]])
    }
}

/// The targets of a step: logical classes on the host, or labels checked on
/// the device (their flag goes into the metrics).
pub(crate) enum Targets {
    Host(Vec<i32>),
    Device(labels::DeviceLabels),
}

pub(crate) fn check_batch(
    op: &'static str,
    cfg: &SoftmaxHeadConfig,
    dev: &Device,
    features: &Tensor,
    labels: usize,
) -> Result<usize> {
    let (b, d) = features.dims2(op)?;
    check_features(op, cfg, dev, features, b, d)?;
    if labels != b {
        return Err(Error::Shape { op, expected: format!("{b} labels"), got: format!("{labels}") });
    }
    if b == 0 {
        return Err(Error::invalid(op, "empty batch"));
    }
    Ok(b)
}

fn auto_splits(btiles: usize) -> usize {
    TARGET_BLOCKS.div_ceil(btiles).max(1)
}

/// The features as f32, normalized: `(u, norms)`.
fn normalized_f32(x: &Tensor) -> Result<(Tensor, Tensor)> {
    // bf16 features are widened on the device (no trip through the host).
    let wide = x.widened()?;
    rowwise::l2_normalize(wide.as_ref().unwrap_or(x), EPS)
}

/// The row map's address for the kernels (null: the identity).
fn rows_ptr(rows: Option<&Tensor>) -> Result<Ptr<i32>> {
    Ok(rows.map(|r| r.ptr::<u32>()).transpose()?.map_or(Ptr::null(), |p| Ptr::from_addr(p.addr())))
}

/// `1 / max(‖w_n‖, eps)` of the n logical rows (through `rows`).
fn inv_norms(w: &Tensor, rows: Option<&Tensor>, n: usize) -> Result<Tensor> {
    let dev = w.device();
    let mut r = Tensor::empty(dev, &[n], DType::F32)?;
    let cfg = LaunchConfig::linear(n.div_ceil(8) as u32, 256, 0);
    let rows_p = rows_ptr(rows)?;
    // SAFETY: w holds the n logical rows (through rows: n stored row
    // indices, checked by the caller) of d = w.shape()[1]; r holds n.
    unsafe {
        launch_one_of!(w.dtype(), { DType::F32 => inv_norms_f32, _ => inv_norms_bf16 },
            (dev, cfg, w.ptr()?, rows_p, n as i32, w.shape()[1] as i32, EPS, r.ptr_mut()?))
    }?;
    Ok(r)
}

/// The fused step over `n` logical classes: row i of the logical centre
/// matrix is `w[rows[i]]` (`rows`: a device buffer of n i32 on a GPU, a host
/// slice on the CPU; None: the identity). `targets` index logical classes.
/// The gradients overwrite `grads`; the loss goes to `metrics`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_step(
    op: &'static str,
    cfg: &SoftmaxHeadConfig,
    w: &Tensor,
    rows: Option<Rows<'_>>,
    n: usize,
    features: &Tensor,
    targets: Targets,
    grads: &mut SoftmaxGrads,
    metrics: &mut SoftmaxMetrics,
) -> Result<()> {
    let dev = w.device();
    if dev.kind() == DeviceKind::Cpu {
        let Targets::Host(targets) = targets else { return Err(Error::invalid(op, "device targets on the CPU")) };
        let host_rows = match rows {
            Some(Rows::Host(r)) => Some(r),
            None => None,
            Some(Rows::Device(_)) => return Err(Error::invalid(op, "device rows on the CPU")),
        };
        let x = features.host_f32()?;
        let wv = w.host_f32()?;
        let dw = grads.centres.host_slice_mut::<f32>().ok_or_else(|| Error::invalid(op, "no host storage"))?;
        let (loss, dx) = cpu::fused_into(cfg, &x, &wv, host_rows, n, &targets, dw);
        grads.features.write_host_f32(&dx)?;
        metrics.state = StepStats::Host(loss);
        Ok(())
    } else {
        let dev_rows = match rows {
            Some(Rows::Device(r)) => Some(r),
            None => None,
            Some(Rows::Host(_)) => return Err(Error::invalid(op, "host rows on a GPU")),
        };
        device_step(cfg, w, dev_rows, n, features, targets, grads, metrics)
    }
}

/// A row map of the logical centres.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    Host(&'a [u32]),
    /// A crate-drawn sample: u32 `[n]` on the device (read as i32).
    Device(&'a Tensor),
}

#[allow(clippy::too_many_arguments)]
fn device_step(
    cfg: &SoftmaxHeadConfig,
    w: &Tensor,
    rows: Option<&Tensor>,
    n: usize,
    features: &Tensor,
    targets: Targets,
    grads: &mut SoftmaxGrads,
    metrics: &mut SoftmaxMetrics,
) -> Result<()> {
    let dev = w.device();
    let mut pass = DevicePass::forward(cfg, w, rows, n, features, targets)?;
    let b = pass.b;
    // stats rows: lse, gy, loss, correct, gsing (kept in the metrics).
    let mut stats = metrics.state.take_buffer(dev, 5, b)?;
    let stat_rows: Vec<_> = (0..5).map(|r| stats.rows_ptr_mut::<f32>(r, 1)).collect::<Result<_>>()?;
    let row = |r: usize| stat_rows[r];
    let weight = 1.0 / b as f32;
    let exact = cfg.margin_grad == MarginGrad::Exact;
    let (kind, m) = cfg.margin.kernel_args();
    let partial = pass.partial.take().ok_or_else(|| Error::invalid("SoftmaxHead", "no partials (internal error)"))?;
    // SAFETY: partial is [B, splits, 4], tgt_cos and tgt_sin (or null) [B],
    // the targets B classes < n, the stats rows B floats each.
    unsafe {
        launch::softmax_merge(
            dev,
            LaunchConfig::linear(b.div_ceil(8) as u32, 256, 0),
            partial.ptr()?,
            pass.splits as i32,
            pass.tgt_cos.ptr()?,
            Tensor::ptr_or_null(pass.tgt_sin.as_ref())?,
            pass.target_ptr(),
            b as i32,
            cfg.scale,
            kind,
            m,
            m.cos(),
            m.sin(),
            i32::from(exact),
            weight,
            row(0),
            row(1),
            row(2),
            row(3),
            row(4),
        )
    }?;
    drop(partial);
    let bad = pass.bad.take();
    pass.backward(
        row(0).as_const(),
        row(1).as_const(),
        row(4).as_const(),
        weight,
        &mut grads.centres,
        &mut grads.features,
    )?;
    metrics.state = StepStats::Device { stats, bad, n };
    Ok(())
}

/// A device step's operands and its forward's results, kept for the
/// backward: the one-process step ([`device_step`]: the forward, the merge
/// per row, the backward) and a model-parallel shard
/// ([`crate::distributed::ModelParallelHead`]: the forward, each row's stats
/// combined over the ranks, the backward) run the same phases. Targets may
/// be negative (a row whose target is another shard's class: every class
/// here is a non-target for it).
pub(crate) struct DevicePass<'a> {
    cfg: &'a SoftmaxHeadConfig,
    w: &'a Tensor,
    rows: Option<&'a Tensor>,
    n: usize,
    /// Rows of the batch.
    pub b: usize,
    target: DeviceBuffer,
    host_targets: Option<Vec<i32>>,
    /// The device label check's flag (device targets).
    pub bad: Option<DeviceBuffer>,
    features: &'a Tensor,
    x_wide: Option<Tensor>,
    u: Tensor,
    norms: Tensor,
    rnorm: Tensor,
    tc: Option<TcOperands<'a>>,
    /// The forward's per-split (max, Σ exp, best c, best index bits) of
    /// each row's non-target classes: `[B, splits, 4]`.
    pub partial: Option<Tensor>,
    pub splits: usize,
    /// The target's cosine of each row (written for rows whose target is
    /// among the classes), `[B]`.
    pub tgt_cos: Tensor,
    /// The sine of the target's angle (angular margins), `[B]`.
    pub tgt_sin: Option<Tensor>,
}

impl<'a> DevicePass<'a> {
    /// The forward over `n` logical classes (`rows` as [`fused_step`]'s).
    pub(crate) fn forward(
        cfg: &'a SoftmaxHeadConfig,
        w: &'a Tensor,
        rows: Option<&'a Tensor>,
        n: usize,
        features: &'a Tensor,
        targets: Targets,
    ) -> Result<DevicePass<'a>> {
        let dev = w.device();
        let (b, d) = (features.shape()[0], cfg.dim);
        let (btiles, ntiles) = (b.div_ceil(TILE), n.div_ceil(TILE));
        let rows_p = rows_ptr(rows)?;
        let (target, host_targets, bad) = match targets {
            Targets::Host(t) => (dev.upload(bytemuck::cast_slice(&t))?, Some(t), None),
            Targets::Device(p) => (p.labels, None, p.bad),
        };
        let target_p = dev.ptr_of::<i32>(&target);
        let (u, norms) = normalized_f32(features)?;
        let rnorm = inv_norms(w, rows, n)?;
        let vec = d % 4 == 0;
        let (bi, ni, di) = (b as i32, n as i32, d as i32);
        // SAFETY (every launch of this pass): u, du and the features are
        // [B, d], the centres hold the n logical rows (rows: n stored row
        // indices from the validated sample, or null) of d, rnorm n; the
        // targets are B logical classes < n, or negative (checked by the
        // callers; the kernels skip a negative target's row where they would
        // read its centre); every other buffer is allocated here with the
        // size its kernel's header states: partial [B, splits, 4], tgt_cos
        // and tgt_sin [B], dw [n, d]; order and starts index the rows.
        // Forward: per-split partial log-sum-exps.
        let mut tgt_cos = Tensor::empty(dev, &[b], DType::F32)?;
        let mut tc = match cfg.tensor_cores {
            true => Some(TcOperands::new(cfg, &u, w, rows, n)?),
            false => None,
        };
        let (partial, splits) = match &mut tc {
            Some(tc) => (tc.forward(cfg, &rnorm, target_p, &mut tgt_cos)?, 1),
            None => {
                let splits = cfg.splits.unwrap_or_else(|| auto_splits(btiles)).min(ntiles).min(MAX_SPLITS);
                let mut partial = Tensor::empty(dev, &[b, splits, 4], DType::F32)?;
                let fwd = LaunchConfig { grid: (splits as u32, btiles as u32, 1), block: (256, 1, 1), shared_bytes: 0 };
                // SAFETY: see above.
                unsafe {
                    launch_one_of!((w.dtype(), vec), {
                        (DType::F32, false) => softmax_fwd_f32, (DType::F32, true) => softmax_fwd_f32_v,
                        (_, false) => softmax_fwd_bf16, (_, true) => softmax_fwd_bf16_v,
                    }, (dev, fwd, u.ptr()?, w.ptr()?, rows_p, rnorm.ptr()?, target_p, bi, ni, di, cfg.scale,
                        splits as i32, partial.ptr_mut()?, tgt_cos.ptr_mut()?))
                }?;
                (partial, splits)
            }
        };
        // The angular margins take the target's angle from the raw vectors (f64).
        let x_wide = features.widened()?;
        let x32 = x_wide.as_ref().unwrap_or(features);
        let tgt_sin = if cfg.margin.is_angular() {
            let mut sin = Tensor::empty(dev, &[b], DType::F32)?;
            // SAFETY: see above.
            unsafe {
                launch_one_of!(w.dtype(), { DType::F32 => softmax_target_angle_f32, _ => softmax_target_angle_bf16 },
                    (dev, LaunchConfig::linear(b.div_ceil(8) as u32, 256, 0), x32.ptr()?, w.ptr()?, rows_p, target_p,
                     bi, di, tgt_cos.ptr_mut()?, sin.ptr_mut()?))
            }?;
            Some(sin)
        } else {
            None
        };
        Ok(DevicePass {
            cfg,
            w,
            rows,
            n,
            b,
            target,
            host_targets,
            bad,
            features,
            x_wide,
            u,
            norms,
            rnorm,
            tc,
            partial: Some(partial),
            splits,
            tgt_cos,
            tgt_sin,
        })
    }

    /// The targets' device buffer (B i32).
    pub(crate) fn target_ptr(&self) -> Ptr<i32> {
        self.w.device().ptr_of::<i32>(&self.target)
    }

    /// The backward from each row's log-sum-exp, target gradient and
    /// singular weight (`[B]` f32 each on the device; the singular part is
    /// added for the exact gradient of an angular margin): overwrites the
    /// centre gradient `dw` (`[n, d]`) and the features' `dx` (`[B, d]`).
    pub(crate) fn backward(
        mut self,
        lse: Ptr<f32>,
        gy: Ptr<f32>,
        gsing: Ptr<f32>,
        weight: f32,
        dw: &mut Tensor,
        dx: &mut Tensor,
    ) -> Result<()> {
        let (cfg, w, n, b, d) = (self.cfg, self.w, self.n, self.b, self.cfg.dim);
        let dev = w.device();
        let (rows_p, target_p) = (rows_ptr(self.rows)?, self.target_ptr());
        let (btiles, ntiles) = (b.div_ceil(TILE), n.div_ceil(TILE));
        let (bi, ni, di, vec) = (b as i32, n as i32, d as i32, d % 4 == 0);
        // Recompute each tile, accumulate both gradients.
        let mut du = Tensor::zeros(dev, &[b, d], DType::F32)?;
        dw.fill_zeros()?;
        let u = &self.u;
        match &mut self.tc {
            Some(tc) => tc.backward(cfg, &self.rnorm, target_p, lse, gy, weight, &mut du, dw)?,
            None => {
                let b_splits = (TARGET_BLOCKS / ntiles).clamp(1, btiles);
                let bwd = LaunchConfig {
                    grid: (ntiles as u32, b_splits as u32, 1),
                    block: (256, 1, 1),
                    shared_bytes: (TILE * (TILE + 4) * 4) as u32,
                };
                // SAFETY: see the forward.
                unsafe {
                    launch_one_of!((w.dtype(), vec), {
                        (DType::F32, false) => softmax_bwd_f32, (DType::F32, true) => softmax_bwd_f32_v,
                        (_, false) => softmax_bwd_bf16, (_, true) => softmax_bwd_bf16_v,
                    }, (dev, bwd, u.ptr()?, w.ptr()?, rows_p, self.rnorm.ptr()?, target_p, lse, gy, bi, ni, di,
                        cfg.scale, weight, du.ptr_mut()?, dw.ptr_mut()?))
                }?;
            }
        }
        self.tc = None;
        if cfg.margin_grad == MarginGrad::Exact && cfg.margin.is_angular() {
            // The singular part, one warp per distinct target class, its rows
            // in order (grouped on the host: device labels come down once;
            // rows of another shard's target have none).
            let targets = match self.host_targets.take() {
                Some(t) => t,
                None => bytemuck::pod_collect_to_vec(&dev.download(&self.target, b * 4)?),
            };
            let mut order: Vec<i32> = (0..b as i32).filter(|&r| targets[r as usize] >= 0).collect();
            order.sort_by_key(|&r| (targets[r as usize], r));
            let mut starts = vec![0i32];
            for i in 1..order.len() {
                if targets[order[i] as usize] != targets[order[i - 1] as usize] {
                    starts.push(i as i32);
                }
            }
            starts.push(order.len() as i32);
            let groups = starts.len() - 1;
            if groups > 0 {
                let (order_buf, starts_buf) =
                    (dev.upload(bytemuck::cast_slice(&order))?, dev.upload(bytemuck::cast_slice(&starts))?);
                let cfg1 = LaunchConfig::linear(groups as u32, 32, 0);
                let (order_p, starts_p) = (dev.ptr_of(&order_buf), dev.ptr_of(&starts_buf));
                let x32 = self.x_wide.as_ref().unwrap_or(self.features);
                // SAFETY: see the forward.
                unsafe {
                    launch_one_of!(w.dtype(), { DType::F32 => softmax_target_singular_f32, _ => softmax_target_singular_bf16 },
                        (dev, cfg1, x32.ptr()?, w.ptr()?, rows_p, target_p, order_p, starts_p, di, gsing,
                         du.ptr_mut()?, dw.ptr_mut()?))
                }?;
            }
        }
        let fin = LaunchConfig::linear(n.div_ceil(8) as u32, 256, 0);
        // SAFETY: see the forward.
        unsafe {
            launch_one_of!(w.dtype(), { DType::F32 => centre_grad_finish_f32, _ => centre_grad_finish_bf16 },
                (dev, fin, w.ptr()?, rows_p, self.rnorm.ptr()?, ni, di, dw.ptr_mut()?))
        }?;
        rowwise::l2_normalize_backward_into(u, &self.norms, &du, EPS, dx)
    }
}

/// Bytes of chunk buffers the tensor-core path aims for (logits f32 and
/// two bf16 gradients: 8 bytes per logit).
const TC_CHUNK_BYTES: usize = 256 << 20;

/// Classes per chunk of the tensor-core path for a batch of `b` over `n`
/// classes: a multiple of 128 (whole GEMM tiles) filling
/// [`TC_CHUNK_BYTES`], or the given size rounded up to a multiple of 8
/// (which keeps every chunk's rows 16-byte aligned, bf16 centres and f32
/// gradient, whatever d); at most n.
pub(crate) fn tc_chunk(given: Option<usize>, b: usize, n: usize) -> usize {
    let fit = (TC_CHUNK_BYTES / (8 * b.max(1))).max(128) / 128 * 128;
    given.map_or(fit, |c| c.div_ceil(8) * 8).min(n).max(1)
}

/// The tensor-core path's operands (SoftmaxHeadConfig::tensor_cores): the
/// normalized features in bf16 and the logical centres as one contiguous
/// bf16 matrix (the centres themselves, or Partial FC's sampled rows
/// gathered once), walked in chunks of C classes.
struct TcOperands<'a> {
    u16: Tensor,
    base: &'a Tensor,
    gathered: Option<Tensor>,
    chunk: usize,
    /// A chunk's logits (B·C f32), shared by the forward and the backward.
    logits: Option<Tensor>,
}

impl<'a> TcOperands<'a> {
    fn new(cfg: &SoftmaxHeadConfig, u: &Tensor, w: &'a Tensor, rows: Option<&Tensor>, n: usize) -> Result<Self> {
        let dev = w.device();
        let (b, d) = (u.shape()[0], cfg.dim);
        if w.dtype() != DType::BF16 {
            return Err(Error::invalid("SoftmaxHead", "tensor_cores needs bf16 centres"));
        }
        let mut u16 = Tensor::empty(dev, &[b, d], DType::BF16)?;
        u.narrow_into(&mut u16)?;
        // Partial FC's sampled rows, gathered once into a contiguous matrix.
        let gathered = rows.map(|r| crate::ops::rows::gather_sampled_rows(w, r)).transpose()?;
        let chunk = tc_chunk(cfg.chunk, b, n);
        let logits = Some(Tensor::empty(dev, &[b * chunk], DType::F32)?);
        Ok(TcOperands { u16, base: w, gathered, chunk, logits })
    }

    /// The logical centres, contiguous.
    fn w(&self) -> &Tensor {
        self.gathered.as_ref().unwrap_or(self.base)
    }

    /// Chunks (start, columns) over the n classes.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.w().shape()[0];
        (0..n).step_by(self.chunk).map(move |c0| (c0, self.chunk.min(n - c0)))
    }

    /// The chunk's logits `U·W_cᵀ` into the first B·cols values of
    /// `logits`; returns W_c (classes c0..c0 + cols), a view.
    fn chunk_logits(
        &self,
        logits: &mut Tensor,
        c0: usize,
        cols: usize,
    ) -> Result<crate::runtime::tensor::TensorView<'_>> {
        let b = self.u16.shape()[0];
        let wc = self.w().narrow(0, c0, cols)?;
        logits.narrow_mut(0, 0, b * cols, |lg| {
            lg.view_mut(&[b, cols], |lg| crate::ops::gemm::gemm(1.0, &self.u16, Op::N, &wc, Op::T, 0.0, lg))
        })?;
        Ok(wc)
    }

    /// The forward's partial (`[B, 1, 4]`, one split) and the target
    /// cosines: per chunk, the logits' GEMM and their reduction.
    fn forward(
        &mut self,
        cfg: &SoftmaxHeadConfig,
        rnorm: &Tensor,
        target: Ptr<i32>,
        tgt_cos: &mut Tensor,
    ) -> Result<Tensor> {
        let dev = self.w().device().clone();
        let dev = &dev;
        let b = self.u16.shape()[0];
        let mut partial = Tensor::empty(dev, &[b, 1, 4], DType::F32)?;
        let mut logits =
            self.logits.take().ok_or_else(|| Error::invalid("SoftmaxHead", "no logits (internal error)"))?;
        for (c0, cols) in self.chunks() {
            self.chunk_logits(&mut logits, c0, cols)?;
            // SAFETY: logits holds B × cols f32 (written above), rnorm the n
            // logical classes (c0 + cols ≤ n), the targets B classes < n,
            // partial [B, 1, 4] and tgt_cos [B].
            unsafe {
                launch::tc_chunk_stats_k(
                    dev,
                    LaunchConfig::linear(b.div_ceil(8) as u32, 256, 0),
                    logits.ptr()?,
                    cols as i32,
                    c0 as i32,
                    rnorm.ptr()?,
                    target,
                    b as i32,
                    cfg.scale,
                    i32::from(c0 == 0),
                    partial.ptr_mut()?,
                    tgt_cos.ptr_mut()?,
                )
            }?;
        }
        self.logits = Some(logits);
        Ok(partial)
    }

    /// Per chunk: the logits again, the gradient of the cosines (bf16, and
    /// scaled by r), then `dU += (G·diag(r))·W_c` and `dŴ_c = Gᵀ·U`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        cfg: &SoftmaxHeadConfig,
        rnorm: &Tensor,
        target: Ptr<i32>,
        lse: Ptr<f32>,
        gy: Ptr<f32>,
        weight: f32,
        du: &mut Tensor,
        dw_hat: &mut Tensor,
    ) -> Result<()> {
        let dev = self.w().device().clone();
        let dev = &dev;
        let b = self.u16.shape()[0];
        let mut logits =
            self.logits.take().ok_or_else(|| Error::invalid("SoftmaxHead", "no logits (internal error)"))?;
        let mut g = Tensor::empty(dev, &[b * self.chunk], DType::BF16)?;
        let mut gr = Tensor::empty(dev, &[b * self.chunk], DType::BF16)?;
        for (c0, cols) in self.chunks() {
            let wc = self.chunk_logits(&mut logits, c0, cols)?;
            let m = b * cols;
            // SAFETY: logits holds B × cols f32, g and gr B × cols bf16;
            // rnorm the n classes (c0 + cols ≤ n), the targets B classes,
            // lse and gy B floats.
            unsafe {
                launch::tc_chunk_grad_k(
                    dev,
                    LaunchConfig::linear(b.div_ceil(8) as u32, 256, 0),
                    logits.ptr()?,
                    cols as i32,
                    c0 as i32,
                    rnorm.ptr()?,
                    target,
                    lse,
                    gy,
                    b as i32,
                    cfg.scale,
                    weight,
                    g.ptr_mut()?,
                    gr.ptr_mut()?,
                )
            }?;
            let (gv, grv) = (g.narrow(0, 0, m)?, gr.narrow(0, 0, m)?);
            let (gv, grv) = (gv.view(&[b, cols])?, grv.view(&[b, cols])?);
            crate::ops::gemm::gemm(1.0, &grv, Op::N, &wc, Op::N, 1.0, du)?;
            dw_hat
                .narrow_mut(0, c0, cols, |dwc| crate::ops::gemm::gemm(1.0, &gv, Op::T, &self.u16, Op::N, 0.0, dwc))?;
        }
        Ok(())
    }
}

/// The CPU path: the f64 reference (materializes the logits; small N) and
/// the chunked f32 fallback (never holds more than a chunk of logits).
pub mod cpu {
    use super::*;

    /// Rows of `x` (`[·, d]`, d ≥ 1) divided by `max(‖x‖, eps)`, and the norms.
    pub(crate) fn normalize_rows(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
        let b = x.len() / d;
        let (mut u, mut n) = (vec![0f32; x.len()], vec![0f32; b]);
        crate::ops::rowwise::cpu::l2_normalize(x, d, EPS, &mut u, &mut n);
        (u, n)
    }

    /// Loss, accuracy and gradients in f64 (`dx` `[B, d]`, `dw` `[n, d]`),
    /// materializing the B × n cosines. `w` holds the stored centres; logical
    /// class i is row `rows[i]` (None: i).
    #[allow(clippy::type_complexity)]
    pub fn reference(
        cfg: &SoftmaxHeadConfig,
        x: &[f32],
        w: &[f32],
        rows: Option<&[u32]>,
        n: usize,
        targets: &[i32],
    ) -> (SoftmaxLoss, Vec<f64>, Vec<f64>) {
        let (b, d) = (targets.len(), cfg.dim);
        let unit = |v: &[f32], eps: f64| -> (Vec<f64>, f64) {
            let nn = v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
            let r = 1.0 / nn.max(eps);
            (v.iter().map(|&a| a as f64 * r).collect(), nn)
        };
        let row = |i: usize| rows.map_or(i, |r| r[i] as usize);
        let (w_hat, w_norm): (Vec<Vec<f64>>, Vec<f64>) =
            (0..n).map(|i| unit(&w[row(i) * d..(row(i) + 1) * d], EPS as f64)).unzip();
        let mut dx = vec![0f64; b * d];
        let mut dw_hat = vec![0f64; n * d];
        let (mut loss, mut acc) = (0f64, 0f64);
        for s in 0..b {
            let xs = &x[s * d..(s + 1) * d];
            let (u, un) = unit(xs, EPS as f64);
            let mut cos: Vec<f64> = w_hat.iter().map(|wh| wh.iter().zip(&u).map(|(a, c)| a * c).sum()).collect();
            let y = targets[s] as usize;
            // The target's angle from the vectors (accurate at small angles).
            let wy = &w[row(y) * d..(row(y) + 1) * d];
            let ang = Angle::of(xs, wy);
            cos[y] = ang.c;
            let r = margin_ce_row(&cos, y, ang.sin, cfg.scale as f64, cfg.margin, cfg.margin_grad)
                .unwrap_or_else(|_| RowCe::nan(n));
            loss += r.loss / b as f64;
            acc += if r.correct { 1.0 / b as f64 } else { 0.0 };
            let mut du = vec![0f64; d];
            for k in 0..n {
                let gk = r.grad[k] / b as f64;
                for c in 0..d {
                    du[c] += gk * w_hat[k][c];
                    dw_hat[k * d + c] += gk * u[c];
                }
            }
            // The singular part of the exact gradient, along the unit tangents.
            let sing = r.singular / b as f64;
            for c in 0..d {
                du[c] += sing * ang.toward_w(xs, wy, c);
                dw_hat[y * d + c] += sing * ang.toward_z(xs, wy, c);
            }
            let proj: f64 = du.iter().zip(&u).map(|(a, c)| a * c).sum();
            for c in 0..d {
                dx[s * d + c] = (du[c] - u[c] * proj) / un.max(EPS as f64);
            }
        }
        let mut dw = vec![0f64; n * d];
        for k in 0..n {
            let g = &dw_hat[k * d..(k + 1) * d];
            let dot: f64 = w_hat[k].iter().zip(g).map(|(a, c)| a * c).sum();
            for c in 0..d {
                dw[k * d + c] = (g[c] - w_hat[k][c] * dot) / w_norm[k].max(EPS as f64);
            }
        }
        (SoftmaxLoss { loss, accuracy: acc }, dx, dw)
    }

    /// Logical rows [c0, c0 + len) of the centres: borrowed when they are
    /// stored contiguously (no row map), else gathered.
    fn chunk<'a>(w: &'a [f32], rows: Option<&[u32]>, d: usize, c0: usize, len: usize) -> std::borrow::Cow<'a, [f32]> {
        match rows {
            None => std::borrow::Cow::Borrowed(&w[c0 * d..(c0 + len) * d]),
            Some(m) => {
                let mut out = vec![0f32; len * d];
                out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
                    let src = m[c0 + i] as usize;
                    o.copy_from_slice(&w[src * d..(src + 1) * d]);
                });
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// `1 / max(‖w_i‖, eps)` of the n logical rows.
    pub(crate) fn inv_norms(w: &[f32], rows: Option<&[u32]>, d: usize, n: usize) -> Vec<f32> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let r = rows.map_or(i, |m| m[i] as usize);
                1.0 / w[r * d..(r + 1) * d].iter().map(|a| a * a).sum::<f32>().sqrt().max(EPS)
            })
            .collect()
    }

    /// `lg[r][i] *= inv[i]` for every row of a `[rows, inv.len()]` block.
    fn scale_columns(lg: &mut [f32], inv: &[f32]) {
        lg.par_chunks_mut(inv.len()).for_each(|row| row.iter_mut().zip(inv).for_each(|(a, r)| *a *= r));
    }

    /// The cosines of the normalized rows `u` (`[B, d]`) with the n logical
    /// centres (through `rows`; inverse norms `inv`), chunk after chunk of
    /// up to [`CPU_CHUNK`] classes: `each(c0, cosines)` with the chunk's
    /// `[B, len]` block, computed in `logits` (`B·min(n, CPU_CHUNK)`).
    #[allow(clippy::too_many_arguments)]
    fn cosine_chunks(
        u: &[f32],
        w: &[f32],
        rows: Option<&[u32]>,
        inv: &[f32],
        n: usize,
        d: usize,
        logits: &mut [f32],
        mut each: impl FnMut(usize, &[f32]),
    ) {
        let b = u.len() / d;
        for c0 in (0..n).step_by(CPU_CHUNK) {
            let len = CPU_CHUNK.min(n - c0);
            let wc = chunk(w, rows, d, c0, len);
            let lg = &mut logits[..b * len];
            cpu_gemm(b, len, d, 1.0, u, d, Op::N, &wc, d, Op::T, 0.0, lg, len);
            scale_columns(lg, &inv[c0..c0 + len]);
            each(c0, lg);
        }
    }

    /// The chunked f32 step: loss, `dx` `[B, d]`, `dw` `[n, d]`. Extra memory
    /// `B·C` floats for chunks of C classes (plus a gathered chunk of `C·d`
    /// through a row map), and the n inverse norms, whatever n is.
    pub fn fused(
        cfg: &SoftmaxHeadConfig,
        x: &[f32],
        w: &[f32],
        rows: Option<&[u32]>,
        n: usize,
        targets: &[i32],
    ) -> (SoftmaxLoss, Vec<f32>, Vec<f32>) {
        let mut dw = vec![0f32; n * cfg.dim];
        let (loss, dx) = fused_into(cfg, x, w, rows, n, targets, &mut dw);
        (loss, dx, dw)
    }

    /// [`fused`] with the centre gradient written into `dw` (`n·d` floats,
    /// every one overwritten): the `_into` steps' CPU path.
    pub fn fused_into(
        cfg: &SoftmaxHeadConfig,
        x: &[f32],
        w: &[f32],
        rows: Option<&[u32]>,
        n: usize,
        targets: &[i32],
        dw: &mut [f32],
    ) -> (SoftmaxLoss, Vec<f32>) {
        let (b, d, s) = (targets.len(), cfg.dim, cfg.scale);
        let (u, norms) = normalize_rows(x, d);
        let inv = inv_norms(w, rows, d, n);
        let mut logits = vec![0f32; b * CPU_CHUNK.min(n)];
        let pass = Pass { cfg, x, u: &u, w, rows, inv: &inv, n, targets };
        let state = pass.forward(&mut logits);
        let angles = pass.target_angles();
        let weight = 1.0 / b as f32;
        let rowv: Vec<RowOut> = state
            .iter()
            .zip(targets)
            .zip(&angles)
            .map(|((st, &y), ang)| {
                let tg = target_of(cfg, st.target_c, ang.as_ref());
                let nan = st.target_c.is_nan();
                finish_row(cfg, weight, st.max, st.sum, s * tg.f as f32, &tg, nan, st.best_class == y as usize)
            })
            .collect();
        let loss = rowv.iter().map(|r| r.loss).sum::<f64>() / b as f64;
        let accuracy = rowv.iter().filter(|r| r.hit).count() as f64 / b as f64;
        let mut du = pass.backward(&rowv, &mut logits, dw);
        pass.add_singular(&rowv, &angles, &mut du, dw);
        let mut dx = vec![0f32; b * d];
        crate::ops::rowwise::cpu::l2_normalize_backward(&u, &norms, &du, d, EPS, &mut dx);
        (SoftmaxLoss { loss, accuracy }, dx)
    }

    /// One row's forward state over the classes of a call.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct RowState {
        /// The largest logit `s·c` of the non-target classes (−∞: none).
        pub max: f32,
        /// `Σ exp(s·c − max)` over the non-target classes.
        pub sum: f32,
        /// The largest cosine (of any class) and its class (the lowest on
        /// ties).
        pub best_c: f32,
        pub best_class: usize,
        /// The target's cosine (NaN: the target is not among the classes).
        pub target_c: f32,
    }

    /// The operands of a CPU step: the features `x` and their normalized
    /// rows `u` (`[B, d]`), the stored centres `w` read through the row map
    /// `rows` (logical class i is row `rows[i]`; None: i), the n logical
    /// classes' inverse norms, each row's target (a logical class; negative:
    /// none among these classes, another rank's).
    #[derive(Clone, Copy)]
    pub(crate) struct Pass<'a> {
        pub cfg: &'a SoftmaxHeadConfig,
        pub x: &'a [f32],
        pub u: &'a [f32],
        pub w: &'a [f32],
        pub rows: Option<&'a [u32]>,
        pub inv: &'a [f32],
        pub n: usize,
        pub targets: &'a [i32],
    }

    impl Pass<'_> {
        /// The forward pass in chunks of classes: each row's [`RowState`].
        /// Rows without a target among the classes have every class a
        /// non-target. `logits` holds `B·min(n, CPU_CHUNK)` floats.
        pub(crate) fn forward(&self, logits: &mut [f32]) -> Vec<RowState> {
            let Pass { cfg, u, w, rows, inv, n, targets, .. } = *self;
            let (b, d, s) = (targets.len(), cfg.dim, cfg.scale);
            let fresh = RowState {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                best_c: f32::NEG_INFINITY,
                best_class: usize::MAX,
                target_c: f32::NAN,
            };
            let mut state = vec![fresh; b];
            cosine_chunks(u, w, rows, inv, n, d, logits, |c0, lg| {
                let len = lg.len() / b;
                state.par_iter_mut().zip(lg.par_chunks(len)).enumerate().for_each(|(r, (st, cs))| {
                    // (A negative target wraps past every class.)
                    let y = targets[r] as usize;
                    // The chunk's max and sum of exp over non-targets (branch-free
                    // passes), merged into the running pair; then the argmax.
                    let yi = y.wrapping_sub(c0);
                    let mut m = f32::NEG_INFINITY;
                    for (i, &c) in cs.iter().enumerate() {
                        if i != yi {
                            m = m.max(s * c);
                        }
                        if c.is_nan() {
                            m = f32::NAN;
                        }
                    }
                    if yi < len {
                        st.target_c = cs[yi];
                    }
                    if m > f32::NEG_INFINITY || m.is_nan() {
                        let sum: f32 =
                            cs.iter().enumerate().map(|(i, &c)| if i == yi { 0.0 } else { (s * c - m).exp() }).sum();
                        let mm = st.max.max(m);
                        let old = if st.max == f32::NEG_INFINITY { 0.0 } else { st.sum * (st.max - mm).exp() };
                        st.sum = old + sum * (m - mm).exp();
                        st.max = if m.is_nan() { m } else { mm };
                    }
                    for (i, &c) in cs.iter().enumerate() {
                        if c > st.best_c || (c == st.best_c && c0 + i < st.best_class) {
                            st.best_c = c;
                            st.best_class = c0 + i;
                        }
                    }
                });
            });
            state
        }

        /// The angular margins' target angle of each row whose target is among
        /// the classes (`0 ≤ y`), from the raw vectors in f64.
        pub(crate) fn target_angles(&self) -> Vec<Option<Angle>> {
            let Pass { cfg, x, w, rows, targets, .. } = *self;
            let d = cfg.dim;
            let angular = cfg.margin.is_angular();
            targets
                .par_iter()
                .enumerate()
                .map(|(r, &y)| {
                    (angular && y >= 0).then(|| {
                        let wy = rows.map_or(y as usize, |m| m[y as usize] as usize);
                        Angle::of(&x[r * d..(r + 1) * d], &w[wy * d..(wy + 1) * d])
                    })
                })
                .collect()
        }
    }

    /// The margin's target value at a row's target cosine (from its angle
    /// when the margin is angular).
    pub(crate) fn target_of(cfg: &SoftmaxHeadConfig, c: f32, angle: Option<&Angle>) -> super::super::margin::Target {
        let (c, sin) = angle.map_or((c as f64, 0.0), |a| (a.c, a.sin));
        cfg.margin.target(c, sin)
    }

    /// One row's results: log-sum-exp, the target's gradient, the loss,
    /// the hit, the gradient's singular part.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct RowOut {
        pub lse: f32,
        pub gy: f32,
        pub loss: f64,
        pub hit: bool,
        pub sing: f64,
    }

    /// A row's results from the other classes' `(max, Σ exp(· − max))`
    /// and the target's logit `t = s·f(c_y)` (margin `tg`); `nan`: a
    /// non-finite input made the row's loss NaN.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish_row(
        cfg: &SoftmaxHeadConfig,
        weight: f32,
        m: f32,
        se: f32,
        t: f32,
        tg: &super::super::margin::Target,
        nan: bool,
        hit: bool,
    ) -> RowOut {
        let (s, exact) = (cfg.scale, cfg.margin_grad == MarginGrad::Exact);
        let mm = m.max(t);
        // The other classes' Σ exp at the row's max, and Z.
        let others = if m == f32::NEG_INFINITY { 0.0 } else { se * (m - mm).exp() };
        let z = others + (t - mm).exp();
        let lse = mm + z.ln();
        let g = -weight * s * others / z; // weight·s·(p_y − 1)
        let gy = g * if exact { tg.df as f32 } else { 1.0 };
        let loss = if t >= mm { (others as f64).ln_1p() } else { (mm - t) as f64 + (z as f64).ln() };
        let loss = if nan || m.is_nan() { f64::NAN } else { loss };
        RowOut { lse, gy, loss, hit, sing: if exact { g as f64 * tg.sing } else { 0.0 } }
    }

    impl Pass<'_> {
        /// The backward pass in chunks of classes: writes the centre gradient
        /// into `dw` (`n·d`, every value), returns the gradient with respect to
        /// the normalized features (`B·d`).
        pub(crate) fn backward(&self, rowv: &[RowOut], logits: &mut [f32], dw: &mut [f32]) -> Vec<f32> {
            let Pass { cfg, u, w, rows, inv, n, targets, .. } = *self;
            let (b, d, s) = (targets.len(), cfg.dim, cfg.scale);
            let weight = 1.0 / b as f32;
            let mut du = vec![0f32; b * d];
            for c0 in (0..n).step_by(CPU_CHUNK) {
                let len = CPU_CHUNK.min(n - c0);
                let inv_c = &inv[c0..c0 + len];
                let wc = chunk(w, rows, d, c0, len);
                let g = &mut logits[..b * len];
                cpu_gemm(b, len, d, 1.0, u, d, Op::N, &wc, d, Op::T, 0.0, g, len);
                g.par_chunks_mut(len).enumerate().for_each(|(r, gs)| {
                    let RowOut { lse, gy, .. } = rowv[r];
                    let y = targets[r] as usize;
                    for (i, v) in gs.iter_mut().enumerate() {
                        *v = if c0 + i == y { gy } else { weight * s * (s * *v * inv_c[i] - lse).exp() };
                    }
                });
                // dŴ = Gᵀ·U into this chunk's rows of dw; dU += G·diag(r)·W.
                let dwc = &mut dw[c0 * d..(c0 + len) * d];
                cpu_gemm(len, d, b, 1.0, g, len, Op::T, u, d, Op::N, 0.0, dwc, d);
                scale_columns(g, inv_c);
                cpu_gemm(b, d, len, 1.0, g, len, Op::N, &wc, d, Op::N, 1.0, &mut du, d);
                // dW_i = r_i (dŴ_i − ŵ_i (ŵ_i·dŴ_i)), ŵ = r w.
                dwc.par_chunks_mut(d).zip(wc.par_chunks(d)).zip(inv_c.par_iter()).for_each(|((gh, wr), &r)| {
                    let dot: f32 = wr.iter().zip(gh.iter()).map(|(a, c)| a * c).sum::<f32>() * r;
                    gh.iter_mut().zip(wr).for_each(|(g, h)| *g = r * (*g - r * h * dot));
                });
            }
            du
        }

        /// The singular part of the exact ArcFace gradient, along the unit
        /// tangents, row after row: into `du` (before the feature
        /// normalization's backward) and the target class's finished centre
        /// gradient. Rows without an angle (another rank's target) are skipped.
        pub(crate) fn add_singular(&self, rowv: &[RowOut], angles: &[Option<Angle>], du: &mut [f32], dw: &mut [f32]) {
            let Pass { cfg, x, w, rows, inv, targets, .. } = *self;
            let d = cfg.dim;
            let row_of = |y: usize| rows.map_or(y, |m| m[y] as usize);
            for (r, (row, ang)) in rowv.iter().zip(angles).enumerate() {
                let (Some(ang), a) = (ang, row.sing) else { continue };
                if a == 0.0 {
                    continue;
                }
                let y = targets[r] as usize;
                let (xs, wy) = (&x[r * d..(r + 1) * d], &w[row_of(y) * d..(row_of(y) + 1) * d]);
                for c in 0..d {
                    du[r * d + c] += (a * ang.toward_w(xs, wy, c)) as f32;
                    dw[y * d + c] += (a * ang.toward_z(xs, wy, c)) as f32 * inv[y];
                }
            }
        }
    }

    /// The k nearest centres by cosine of each normalized feature in `u`,
    /// chunked like [`fused`].
    pub fn top_k(u: &[f32], w: &[f32], d: usize, k: usize) -> TopK {
        let (b, n) = (u.len() / d, w.len() / d);
        let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::with_capacity(k + 1); b];
        let mut lg = vec![0f32; b * CPU_CHUNK.min(n)];
        let inv = inv_norms(w, None, d, n);
        cosine_chunks(u, w, None, &inv, n, d, &mut lg, |c0, lg| {
            let len = lg.len() / b;
            best.par_iter_mut().zip(lg.par_chunks(len)).for_each(|(list, cs)| {
                for (i, &c) in cs.iter().enumerate() {
                    if c.is_nan() {
                        continue;
                    }
                    let better = |e: &(f32, usize)| c > e.0 || (c == e.0 && c0 + i < e.1);
                    if list.len() == k && !list.last().is_some_and(better) {
                        continue;
                    }
                    let at = list.iter().position(better).unwrap_or(list.len());
                    list.insert(at, (c, c0 + i));
                    list.truncate(k);
                }
            });
        });
        TopK {
            k,
            ids: best.iter().flat_map(|l| l.iter().map(|e| e.1 as i64)).collect(),
            scores: best.iter().flat_map(|l| l.iter().map(|e| e.0)).collect(),
        }
    }
}
