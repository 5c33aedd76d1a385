//! The GIF code head (GIF §2): l parallel v-way margin softmaxes on
//! normalized features and centres, plus the dot-regression loss that
//! pulls each feature to its identity's code vector.
//!
//! For features `x` (`[B, d]`) and labels (identities), position `j`:
//! `z = P_j x` (optional projection, `[d_p, d]`; else `z = x`),
//! `c_k = (z/‖z‖)·(w_k/‖w_k‖)` for the v centres `W_j` (`[v, d_p]`),
//! `CE_j = −log softmax(s·[f(c_y), c_k≠y])_y` with the margin f on the
//! target token `y = code(label)_j` ([`Margin`]). Losses are means over the
//! batch: `L = Σ_j λ_j·mean CE_j + γ·mean ½(x̂·h_label − 1)²`, with `x̂ =
//! x/‖x‖` and `h` the code vectors (fixed). kernels/code_head.cu computes
//! each position in one fused kernel (normalize → cosines → margin →
//! softmax → CE → gradients through the feature normalization), GEMMs do the
//! projections and the centres' gradient, rowwise l2norm_bwd the centre
//! normalization's gradient.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::margin::{margin_ce_row, Angle, Margin, MarginGrad, RowCe};
use super::stats::StepStats;
use crate::error::{Error, Result};
use crate::ops::gemm::{self, Op};
use crate::ops::labels::{self, Codes, Labels};
use crate::ops::rows::{axpy_rows, scatter_rows};
use crate::ops::rowwise;
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::launch::launch_one_of;
use crate::runtime::tensor::{same_device, DType, HostData, Tensor};
use crate::tokenizer::Codebook;

/// Normalization floor for the centres (as PyTorch's F.normalize).
const EPS: f32 = 1e-12;

/// Settings of a [`CodeHead`].
#[derive(Clone, Debug, PartialEq)]
pub struct CodeHeadConfig {
    /// Embedding size d.
    pub dim: usize,
    /// Code length l (positions).
    pub length: usize,
    /// Vocabulary v (classes per position).
    pub vocab: usize,
    /// Per-position projection `d → d_p`: `Some(d_p)` (use `dim` for the
    /// default d_p = d), or `None` for no projection.
    pub projection: Option<usize>,
    /// Margin on the target token.
    pub margin: Margin,
    /// Logit scale s (64 by default).
    pub scale: f32,
    /// Per-position loss weights λ_j; `None`: all 1.
    pub lambdas: Option<Vec<f32>>,
    /// Weight γ of the dot-regression loss (1 by default; 0 disables it).
    pub gamma: f32,
    /// Exact or straight-through margin gradient.
    pub margin_grad: MarginGrad,
    /// Storage of the centres and projections: f32 (default) or bf16 (math
    /// in f32 either way; gradients are f32).
    pub weight_dtype: DType,
}

impl CodeHeadConfig {
    /// insightface's defaults: `margin_list = (1.0, 0.5, 0.0)` (ArcFace,
    /// [`Margin::INSIGHTFACE_ARCFACE`]) with its straight-through gradient,
    /// s = 64; no projection, λ = 1, γ = 1.
    pub fn new(dim: usize, length: usize, vocab: usize) -> Self {
        CodeHeadConfig {
            dim,
            length,
            vocab,
            projection: None,
            margin: Margin::INSIGHTFACE_ARCFACE,
            scale: 64.0,
            lambdas: None,
            gamma: 1.0,
            margin_grad: MarginGrad::StraightThrough,
            weight_dtype: DType::F32,
        }
    }
    /// d_p: the projection's output size, or d without projection.
    pub fn dp(&self) -> usize {
        self.projection.unwrap_or(self.dim)
    }
    fn lambda(&self, j: usize) -> f32 {
        self.lambdas.as_ref().map_or(1.0, |l| l[j])
    }
    fn validate(&self) -> Result<()> {
        const OP: &str = "CodeHead";
        if self.dim == 0 || self.length == 0 || self.projection == Some(0) {
            return Err(Error::invalid(OP, "dim, length and the projection size must be positive"));
        }
        if !(2..=4096).contains(&self.vocab) {
            return Err(Error::invalid(OP, format!("vocab must be in 2..=4096, got {}", self.vocab)));
        }
        if self.dp() > 8192 {
            return Err(Error::invalid(OP, format!("d_p must be at most 8192, got {}", self.dp())));
        }
        if let Some(l) = &self.lambdas {
            if l.len() != self.length || l.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(OP, format!("lambdas must be {} finite values", self.length)));
            }
        }
        if !matches!(self.weight_dtype, DType::F32 | DType::BF16) {
            return Err(Error::invalid(OP, format!("weights must be f32 or bf16, got {:?}", self.weight_dtype)));
        }
        if !(self.scale.is_finite() && self.scale > 0.0 && self.gamma.is_finite()) {
            return Err(Error::invalid(OP, "scale must be finite and positive, gamma finite"));
        }
        self.margin.validate(OP)
    }
}

/// The identities' codes (on the host) and code vectors (on the device, f32
/// or bf16; only B rows a step are read).
pub struct CodeTable {
    codes: Vec<u16>,
    /// The codes on `device` (GPU backends): device labels map to tokens
    /// there.
    codes_device: Option<(Device, DeviceBuffer)>,
    n: usize,
    length: usize,
    vocab: usize,
    vectors: Option<Tensor>,
}

impl CodeTable {
    /// From `codes` (`[n, length]`, tokens < `vocab`) and, optionally, code
    /// vectors (`[n, d]` values stored as `dtype` on `device`). Without
    /// vectors the head needs γ = 0.
    pub fn new(
        device: &Device,
        codes: Vec<u16>,
        length: usize,
        vocab: usize,
        vectors: Option<(&[f32], usize, DType)>,
    ) -> Result<CodeTable> {
        const OP: &str = "CodeTable";
        if length == 0 || codes.is_empty() || codes.len() % length != 0 {
            return Err(Error::invalid(OP, format!("{} tokens are not codes of length {length}", codes.len())));
        }
        let n = codes.len() / length;
        if let Some(i) = codes.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::invalid(OP, format!("identity {} has token {} >= vocab {vocab}", i / length, codes[i])));
        }
        let vectors = match vectors {
            Some((v, d, dtype)) => {
                if v.len() != n * d {
                    return Err(Error::Shape {
                        op: OP,
                        expected: format!("[{n}, {d}] code vectors"),
                        got: format!("{} values", v.len()),
                    });
                }
                Some(Tensor::from_f32(device, &[n, d], v, dtype)?)
            }
            None => None,
        };
        let codes_device = match device.runs_kernels() {
            true => Some((device.clone(), device.upload(bytemuck::cast_slice(&codes))?)),
            false => None,
        };
        Ok(CodeTable { codes, codes_device, n, length, vocab, vectors })
    }

    /// The codes and code vectors of a tokenizer codebook.
    pub fn from_codebook(device: &Device, book: &Codebook, vector_dtype: DType) -> Result<CodeTable> {
        CodeTable::new(
            device,
            book.codes().to_vec(),
            book.length(),
            book.vocab(),
            Some((book.vectors(), book.dim(), vector_dtype)),
        )
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Always false (a table has at least one identity).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    /// Token `j` of identity `id`; `None` when `id` ≥ N or `j` ≥ l.
    pub fn token(&self, id: usize, j: usize) -> Option<u16> {
        if id >= self.n || j >= self.length {
            return None;
        }
        Some(self.codes[id * self.length + j])
    }
}

/// Losses and accuracies of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadLoss {
    /// `Σ_j λ_j·CE_j + γ·L_AR`.
    pub total: f64,
    /// `λ_j·CE_j` (batch means).
    pub per_position: Vec<f64>,
    /// `γ·L_AR` (batch mean).
    pub regression: f64,
    /// Fraction of samples whose plain-cosine argmax is the target token.
    pub accuracy: Vec<f64>,
}

/// Losses, accuracies and the device label check of one step, left on the
/// device that ran it ([`CodeHead::forward_backward_into`]) until
/// [`HeadMetrics::read`]: per-sample rows `[2l + 1, B]` (the regression
/// term, then each position's loss and hit), summed at reading. Reusable
/// from step to step (no allocation while B stays the same).
#[derive(Debug, Default)]
pub struct HeadMetrics {
    state: StepStats<HeadLoss>,
}

impl HeadMetrics {
    /// Metrics before any step.
    pub fn new() -> HeadMetrics {
        HeadMetrics::default()
    }

    /// The step's losses and accuracies: one download of `(2l + 1)·B`
    /// floats (and the 4-byte label flag) on a GPU backend, the only host
    /// synchronization of a step. Errors as
    /// [`CodeHead::forward_backward`]: a label out of range (found on the
    /// device), a non-finite loss; and before any step.
    pub fn read(&self) -> Result<HeadLoss> {
        const OP: &str = "CodeHead::forward_backward";
        let loss = match self.state.read(OP, "HeadMetrics::read")? {
            Ok(loss) => loss,
            Err((sums, b)) => {
                // Rows: the regression term, then each position's loss and hit.
                let l = (sums.len() - 1) / 2;
                let per_position: Vec<f64> = (0..l).map(|j| sums[1 + 2 * j]).collect();
                let accuracy: Vec<f64> = (0..l).map(|j| sums[2 + 2 * j] / b as f64).collect();
                let total = per_position.iter().sum::<f64>() + sums[0];
                HeadLoss { total, per_position, regression: sums[0], accuracy }
            }
        };
        if let Some(j) = loss.per_position.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("the loss at position {j} is not finite (a zero or non-finite feature or centre?)"),
            ));
        }
        if !loss.regression.is_finite() {
            return Err(Error::invalid(OP, "the dot-regression loss is not finite (a zero or non-finite feature?)"));
        }
        Ok(loss)
    }
}

/// Gradients of the total loss.
#[derive(Debug)]
pub struct HeadGrads {
    /// With respect to the features, f32 `[B, d]`.
    pub features: Tensor,
    /// With respect to each position's centres, f32 `[v, d_p]`.
    pub centres: Vec<Tensor>,
    /// With respect to each projection, f32 `[d_p, d]`, when there are.
    pub projections: Option<Vec<Tensor>>,
}

impl HeadGrads {
    /// Buffers for the gradients of `head` at batch size `batch` (unwritten:
    /// NaN where the device poisons), for
    /// [`CodeHead::forward_backward_into`]. A caller may build a
    /// `HeadGrads` of its own tensors instead (views of its memory
    /// included), of these shapes, f32, on the head's device.
    pub fn new(head: &CodeHead, batch: usize) -> Result<HeadGrads> {
        let (d, dp, v, l) = (head.cfg.dim, head.cfg.dp(), head.cfg.vocab, head.cfg.length);
        let dev = &head.device;
        Ok(HeadGrads {
            features: Tensor::empty(dev, &[batch, d], DType::F32)?,
            centres: (0..l).map(|_| Tensor::empty(dev, &[v, dp], DType::F32)).collect::<Result<_>>()?,
            projections: match head.projections {
                Some(_) => Some((0..l).map(|_| Tensor::empty(dev, &[dp, d], DType::F32)).collect::<Result<_>>()?),
                None => None,
            },
        })
    }

    fn check(&self, op: &'static str, head: &CodeHead, b: usize) -> Result<()> {
        let (d, dp, v, l) = (head.cfg.dim, head.cfg.dp(), head.cfg.vocab, head.cfg.length);
        self.features.check_output(op, &head.device, &[&[b, d]])?;
        if self.centres.len() != l || self.projections.as_ref().map(Vec::len) != head.projections.as_ref().map(|_| l) {
            return Err(Error::invalid(
                op,
                format!("the gradients need {l} centre matrices and, with projections, {l} projections"),
            ));
        }
        for c in &self.centres {
            c.check_output(op, &head.device, &[&[v, dp]])?;
        }
        for p in self.projections.iter().flatten() {
            p.check_output(op, &head.device, &[&[dp, d]])?;
        }
        Ok(())
    }
}

/// The trainable head: centres (and projections) per position, f32.
pub struct CodeHead {
    cfg: CodeHeadConfig,
    device: Device,
    centres: Vec<Tensor>,
    projections: Option<Vec<Tensor>>,
}

impl CodeHead {
    /// A head with seeded random centres (normal with variance 1/d_p, rows
    /// of norm about 1) and projections (normal with variance 1/d), stored as
    /// `cfg.weight_dtype` on `device`.
    pub fn new(cfg: CodeHeadConfig, device: &Device, seed: u64) -> Result<CodeHead> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, dp, v) = (cfg.dim, cfg.dp(), cfg.vocab);
        let mut normal = |n: usize, sd: f32| -> Vec<f32> {
            (0..n).map(|_| sd * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect()
        };
        // Rows of norm about 1, so that an SGD step moves directions by about lr·‖g‖.
        let centres = (0..cfg.length)
            .map(|_| Tensor::from_f32(device, &[v, dp], &normal(v * dp, 1.0 / (dp as f32).sqrt()), cfg.weight_dtype))
            .collect::<Result<Vec<_>>>()?;
        let projections = match cfg.projection {
            Some(_) => Some(
                (0..cfg.length)
                    .map(|_| {
                        Tensor::from_f32(device, &[dp, d], &normal(dp * d, 1.0 / (d as f32).sqrt()), cfg.weight_dtype)
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(CodeHead { cfg, device: device.clone(), centres, projections })
    }

    /// A head from given weights: `centres[j]` is `[v, d_p]` and
    /// `projections[j]` `[d_p, d]`, all of `cfg.weight_dtype` on one device.
    pub fn from_weights(
        cfg: CodeHeadConfig,
        centres: Vec<Tensor>,
        projections: Option<Vec<Tensor>>,
    ) -> Result<CodeHead> {
        const OP: &str = "CodeHead::from_weights";
        cfg.validate()?;
        let (d, dp, v) = (cfg.dim, cfg.dp(), cfg.vocab);
        let wt = cfg.weight_dtype;
        if centres.len() != cfg.length || centres.iter().any(|c| c.shape() != [v, dp] || c.dtype() != wt) {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{} {wt:?} centre matrices [{v}, {dp}]", cfg.length),
                got: format!("{:?}", centres.iter().map(|c| c.shape().to_vec()).collect::<Vec<_>>()),
            });
        }
        match (&projections, cfg.projection) {
            (None, None) => {}
            (Some(p), Some(_))
                if p.len() == cfg.length && p.iter().all(|t| t.shape() == [dp, d] && t.dtype() == wt) => {}
            _ => {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("{} {wt:?} projections [{dp}, {d}] exactly when configured", cfg.length),
                    got: "other".into(),
                })
            }
        }
        let device = centres[0].device().clone();
        let all: Vec<&Tensor> = centres.iter().chain(projections.iter().flatten()).collect();
        same_device(OP, &all)?;
        Ok(CodeHead { cfg, device, centres, projections })
    }

    /// The configuration.
    pub fn config(&self) -> &CodeHeadConfig {
        &self.cfg
    }
    /// Each position's centres, `[v, d_p]`.
    pub fn centres(&self) -> &[Tensor] {
        &self.centres
    }
    /// Each position's projection, `[d_p, d]`, when configured.
    pub fn projections(&self) -> Option<&[Tensor]> {
        self.projections.as_deref()
    }

    fn check_batch(&self, op: &'static str, features: &Tensor) -> Result<usize> {
        let (b, d) = features.dims2(op)?;
        if d != self.cfg.dim {
            return Err(Error::Shape {
                op,
                expected: format!("features [B, {}]", self.cfg.dim),
                got: format!("{:?}", features.shape()),
            });
        }
        if !matches!(features.dtype(), DType::F32 | DType::BF16) {
            return Err(Error::invalid(op, format!("features must be f32 or bf16, got {:?}", features.dtype())));
        }
        if features.device() != &self.device {
            return Err(Error::DeviceMismatch { op, a: self.device.to_string(), b: features.device().to_string() });
        }
        if b > i32::MAX as usize {
            return Err(Error::invalid(op, "batch too large"));
        }
        Ok(b)
    }

    /// One training step's forward and backward pass: losses, accuracies and
    /// gradients for `features` (`[B, d]`, f32 or bf16) whose identities are
    /// `labels` (indices into `table`: host `u32`s, or a u32 / i64 tensor on
    /// the head's device). A label out of range, a shape or vocabulary
    /// mismatch, γ > 0 without code vectors, or a non-finite loss (e.g. a
    /// zero feature) is an error. New gradient buffers each call, and the
    /// losses read back: [`CodeHead::forward_backward_into`] is the step
    /// without either.
    pub fn forward_backward<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
        table: &CodeTable,
    ) -> Result<(HeadLoss, HeadGrads)> {
        let b = self.check_batch("CodeHead::forward_backward", features)?;
        let mut grads = HeadGrads::new(self, b)?;
        let mut metrics = HeadMetrics::new();
        self.forward_backward_into(features, labels, table, &mut grads, &mut metrics)?;
        Ok((metrics.read()?, grads))
    }

    /// [`CodeHead::forward_backward`] into given buffers: the gradients
    /// overwrite `grads` (shapes of [`HeadGrads::new`], f32, on the head's
    /// device; a caller's memory through [`Tensor::from_device_ptr`]), and
    /// the losses stay in `metrics` on the device until
    /// [`HeadMetrics::read`]. Nothing waits for the device: with device
    /// labels, a label out of range is found by a kernel and reported by
    /// `read` (the gradients of such a step are meaningless, computed as if
    /// the label were 0); host labels are checked here. A non-finite loss,
    /// too, is reported by `read`.
    pub fn forward_backward_into<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
        table: &CodeTable,
        grads: &mut HeadGrads,
        metrics: &mut HeadMetrics,
    ) -> Result<()> {
        const OP: &str = "CodeHead::forward_backward";
        let labels = labels.into();
        let b = self.check_batch(OP, features)?;
        let cfg = &self.cfg;
        if labels.len() != b {
            return Err(Error::Shape { op: OP, expected: format!("{b} labels"), got: format!("{}", labels.len()) });
        }
        if b == 0 {
            return Err(Error::invalid(OP, "empty batch"));
        }
        if table.length != cfg.length || table.vocab != cfg.vocab {
            return Err(Error::invalid(
                OP,
                format!(
                    "the table has codes of length {} over {} tokens; the head expects {} over {}",
                    table.length, table.vocab, cfg.length, cfg.vocab
                ),
            ));
        }
        if cfg.gamma != 0.0 {
            match &table.vectors {
                None => return Err(Error::invalid(OP, "gamma > 0 needs code vectors in the table")),
                Some(v) if v.shape()[1] != cfg.dim => {
                    return Err(Error::Shape {
                        op: OP,
                        expected: format!("code vectors [N, {}]", cfg.dim),
                        got: format!("{:?}", v.shape()),
                    })
                }
                Some(v) if v.device() != &self.device => {
                    return Err(Error::DeviceMismatch { op: OP, a: self.device.to_string(), b: v.device().to_string() })
                }
                _ => {}
            }
        }
        grads.check(OP, self, b)?;
        if self.device.kind() == DeviceKind::Cpu {
            let host = labels.host_checked(OP, &self.device, table.n)?;
            let loss = self.step_cpu(features, &host, table, grads)?;
            metrics.state = StepStats::Host(loss);
            return Ok(());
        }
        // The table keeps its codes on its own device; on another one they
        // are uploaded for this step.
        let uploaded;
        let codes_device = match &table.codes_device {
            Some((d, buf)) if d == &self.device => buf,
            _ => {
                uploaded = self.device.upload(bytemuck::cast_slice(&table.codes))?;
                &uploaded
            }
        };
        let codes = Codes { device: codes_device, length: table.length };
        let prepared = labels::prepare(OP, &self.device, labels, table.n, Some(&codes))?;
        self.step_device(features, prepared, table, grads, metrics)
    }

    fn step_cpu(
        &self,
        features: &Tensor,
        labels: &[u32],
        table: &CodeTable,
        grads: &mut HeadGrads,
    ) -> Result<HeadLoss> {
        let x = features.host_f32()?;
        let host = |t: &Tensor| t.host_f32().map(|c| c.into_owned());
        let centres = self.centres.iter().map(host).collect::<Result<Vec<_>>>()?;
        let projections = match &self.projections {
            Some(p) => Some(p.iter().map(host).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        // Only the batch's code vectors are read, never the whole N x d table.
        let h = match (&table.vectors, self.cfg.gamma != 0.0) {
            (Some(v), true) => Some(rows_f32(v, labels)?),
            _ => None,
        };
        let (loss, g) = cpu::fast_forward_backward(
            &self.cfg,
            &x,
            labels,
            &table.codes,
            h.as_deref(),
            &centres,
            projections.as_deref(),
        );
        grads.features.write_host_f32(&g.features)?;
        for (t, c) in grads.centres.iter_mut().zip(&g.centres) {
            t.write_host_f32(c)?;
        }
        for (t, p) in grads.projections.iter_mut().flatten().zip(g.projections.iter().flatten()) {
            t.write_host_f32(p)?;
        }
        Ok(loss)
    }

    fn step_device(
        &self,
        features: &Tensor,
        prepared: labels::DeviceLabels,
        table: &CodeTable,
        grads: &mut HeadGrads,
        metrics: &mut HeadMetrics,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let dev = &self.device;
        let (b, d, dp, v, l) = (features.shape()[0], cfg.dim, cfg.dp(), cfg.vocab, cfg.length);
        let labels::DeviceLabels { labels: label_buf, targets, bad } = prepared;
        let target_buf = targets.as_ref().ok_or_else(|| Error::invalid("CodeHead", "no targets"))?;
        let HeadGrads { features: dx, centres: centre_grads, projections: proj_grads } = grads;
        // Per-sample statistics, one row each, left in the metrics (read in
        // one copy): the regression loss, then the loss and hit of every
        // position. Reused while the shape stays.
        let mut stats = metrics.state.take_buffer(dev, 2 * l + 1, b)?;
        let stat_rows: Vec<_> = (0..2 * l + 1).map(|r| stats.rows_ptr_mut::<f32>(r, 1)).collect::<Result<_>>()?;
        let stat_row = |r: usize| stat_rows[r];
        let use_table = cfg.gamma != 0.0;
        let table_t = table.vectors.as_ref().filter(|_| use_table);
        let rcfg = LaunchConfig::linear(b.div_ceil(8) as u32, 256, 0);
        let labels_p = dev.ptr_of::<i32>(&label_buf);
        let gb = cfg.gamma / b as f32;
        let (bi, di) = (b as i32, d as i32);
        // SAFETY: features [B, d] and dx [B, d]; labels B i32 < N (checked);
        // the table [N, d] or null (γ = 0: the kernel writes zeros); row 0
        // of stats holds B floats.
        unsafe {
            launch_one_of!((features.dtype(), table_t.map(Tensor::dtype)), {
                (DType::F32, None | Some(DType::F32)) => code_regression_f32_f32,
                (DType::F32, Some(_)) => code_regression_f32_bf16,
                (_, None | Some(DType::F32)) => code_regression_bf16_f32,
                (_, Some(_)) => code_regression_bf16_bf16,
            }, (dev, rcfg, features.ptr()?, labels_p, Tensor::ptr_or_null(table_t)?, bi, di, gb, dx.ptr_mut()?, stat_row(0)))
        }?;
        let (kind, m) = cfg.margin.kernel_args();
        let exact = i32::from(cfg.margin_grad == MarginGrad::Exact);
        let singular = cfg.margin.is_angular() && cfg.margin_grad == MarginGrad::Exact;
        // bf16 features meet f32 (or widened) projections in an f32 GEMM.
        let x_wide = if self.projections.is_some() { features.widened()? } else { None };
        let x32 = x_wide.as_ref().unwrap_or(features);
        for j in 0..l {
            let p_wide = match &self.projections {
                Some(p) => Some((&p[j], p[j].widened()?)),
                None => None,
            };
            let p32: Option<&Tensor> = p_wide.as_ref().map(|(p, w)| w.as_ref().unwrap_or(p));
            let z_owned;
            let z = match p32 {
                Some(p) => {
                    z_owned = gemm::matmul(x32, Op::N, p, Op::T)?;
                    &z_owned
                }
                None => features,
            };
            let c_wide = self.centres[j].widened()?;
            let w_raw = c_wide.as_ref().unwrap_or(&self.centres[j]);
            let (w_hat, w_norm) = rowwise::l2_normalize(w_raw, EPS)?;
            // With the exact ArcFace gradient, rows B.. of dC and U carry its
            // singular part into the same dŴ GEMM (kernels/code_head.cu).
            let rows = if singular { 2 * b } else { b };
            let mut u = Tensor::empty(dev, &[rows, dp], DType::F32)?;
            let mut dc = Tensor::empty(dev, &[rows, v], DType::F32)?;
            let mut dz_owned =
                if self.projections.is_some() { Some(Tensor::empty(dev, &[b, dp], DType::F32)?) } else { None };
            let mcfg = LaunchConfig::linear(b as u32, 128, ((2 * dp + 2 * v) * 4) as u32);
            // Position j's B targets (the prepared buffer holds l·B).
            let target_p = dev.ptr_of::<i32>(target_buf).offset(j * b);
            let dz_p = match dz_owned.as_mut() {
                Some(t) => t.ptr_mut()?,
                None => dx.ptr_mut()?,
            };
            let (u_p, dc_p) = (u.ptr_mut()?, dc.ptr_mut()?);
            // SAFETY: z is [B, d_p] (f32 or bf16), ŵ and the raw centres
            // [v, d_p]; the targets B tokens < v (from the table); u and dC
            // hold B rows (2B with the singular part), dz [B, d_p], stats
            // rows B floats; v ≤ 4096 and d_p ≤ 8192 fit the shared memory.
            unsafe {
                launch_one_of!(z.dtype(), { DType::F32 => margin_ce_f32, _ => margin_ce_bf16 }, (
                    dev,
                    mcfg,
                    z.ptr()?,
                    w_hat.ptr()?,
                    w_raw.ptr()?,
                    target_p,
                    b as i32,
                    dp as i32,
                    v as i32,
                    cfg.scale,
                    kind,
                    m,
                    m.cos(),
                    m.sin(),
                    exact,
                    cfg.lambda(j) / b as f32,
                    u_p,
                    dz_p,
                    i32::from(dz_owned.is_none()),
                    dc_p,
                    i32::from(singular),
                    stat_row(1 + 2 * j),
                    stat_row(2 + 2 * j),
                ))
            }?;
            let dw_hat = gemm::matmul(&dc, Op::T, &u, Op::N)?;
            rowwise::l2_normalize_backward_into(&w_hat, &w_norm, &dw_hat, EPS, &mut centre_grads[j])?;
            if let (Some(p), Some(dzj), Some(pg)) = (p32, &dz_owned, proj_grads.as_mut()) {
                gemm::gemm(1.0, dzj, Op::T, x32, Op::N, 0.0, &mut pg[j])?;
                gemm::gemm(1.0, dzj, Op::N, p, Op::N, 1.0, dx)?;
            }
        }
        metrics.state = StepStats::Device { stats, bad, n: table.n };
        Ok(())
    }

    /// Per-position log-softmax of `s·cos`, without margin: `[B, l·v]` f32,
    /// row b holding position 0's v log-probabilities, then position 1's, ...
    /// (that is, `[B, l, v]` row-major). The decoder consumes this.
    pub fn log_probs(&self, features: &Tensor) -> Result<Tensor> {
        const OP: &str = "CodeHead::log_probs";
        let b = self.check_batch(OP, features)?;
        let (l, v) = (self.cfg.length, self.cfg.vocab);
        if self.device.kind() == DeviceKind::Cpu {
            let x = features.host_f32()?;
            let centres = self.centres.iter().map(|t| t.to_f32_vec()).collect::<Result<Vec<_>>>()?;
            // f64 (the reference): inference batches are small on the CPU.
            let projections = match &self.projections {
                Some(p) => Some(p.iter().map(|t| t.to_f32_vec()).collect::<Result<Vec<_>>>()?),
                None => None,
            };
            let out = cpu::log_probs(&self.cfg, &x, b, &centres, projections.as_deref());
            return Ok(Tensor::from_host(
                &self.device,
                vec![b, l * v],
                HostData::F32(out.iter().map(|&x| x as f32).collect()),
            ));
        }
        // bf16 features are widened once (the projections and centres are f32).
        let x_wide = features.widened()?;
        let x = x_wide.as_ref().unwrap_or(features);
        let mut out = Tensor::empty(&self.device, &[b * l, v], DType::F32)?;
        // Without projections every position normalizes the same features.
        let shared_u = match &self.projections {
            Some(_) => None,
            None => Some(rowwise::l2_normalize(x, EPS)?.0),
        };
        for j in 0..l {
            let projected;
            let u = match (&self.projections, &shared_u) {
                (Some(p), _) => {
                    let z = gemm::matmul(x, Op::N, p[j].widened()?.as_ref().unwrap_or(&p[j]), Op::T)?;
                    projected = rowwise::l2_normalize(&z, EPS)?.0;
                    &projected
                }
                (None, Some(u)) => u,
                (None, None) => return Err(Error::invalid(OP, "no normalized features (internal error)")),
            };
            let c_wide = self.centres[j].widened()?;
            let (w_hat, _) = rowwise::l2_normalize(c_wide.as_ref().unwrap_or(&self.centres[j]), EPS)?;
            let mut c = Tensor::empty(&self.device, &[b, v], DType::F32)?;
            gemm::gemm(self.cfg.scale, u, Op::N, &w_hat, Op::T, 0.0, &mut c)?;
            let lp = rowwise::log_softmax(&c)?;
            let ids: Vec<u32> = (0..b).map(|i| (i * l + j) as u32).collect();
            scatter_rows(&lp, &ids, &mut out)?;
        }
        out.reshape(&[b, l * v])
    }

    /// Plain SGD on the head's weights: `w ← w − lr·g` for every centre and
    /// projection.
    pub fn sgd_step(&mut self, grads: &HeadGrads, lr: f32) -> Result<()> {
        const OP: &str = "CodeHead::sgd_step";
        if grads.centres.len() != self.centres.len()
            || grads.projections.as_ref().map(Vec::len) != self.projections.as_ref().map(Vec::len)
        {
            return Err(Error::invalid(OP, "gradients do not match the head"));
        }
        let mut pairs: Vec<(&mut Tensor, &Tensor)> = self.centres.iter_mut().zip(grads.centres.iter()).collect();
        if let (Some(p), Some(g)) = (self.projections.as_mut(), grads.projections.as_ref()) {
            pairs.extend(p.iter_mut().zip(g.iter()));
        }
        for (w, g) in pairs {
            axpy_rows(w, None, g, -lr)?;
        }
        Ok(())
    }
}

impl CodeHead {
    /// Rescales every centre row to unit norm. The loss depends on centres
    /// only through their directions, so this changes no output; it resets
    /// the growth of their norms under SGD (each step adds `lr²‖g‖²` to
    /// ‖w‖², which shrinks the effective learning rate of the directions by
    /// `1/‖w‖²`). Call it after [`CodeHead::sgd_step`] for SGD on the sphere.
    pub fn renormalize_centres(&mut self) -> Result<()> {
        for c in &mut self.centres {
            *c = rowwise::l2_normalize(c, EPS)?.0;
        }
        Ok(())
    }
}

/// Rows `ids` of a CPU tensor (`[n, d]`, f32 or bf16) as f32.
fn rows_f32(t: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
    let d = t.shape()[1];
    let pick = |get: &dyn Fn(usize) -> f32| {
        ids.iter().flat_map(|&i| (0..d).map(move |c| i as usize * d + c)).map(get).collect::<Vec<f32>>()
    };
    if let Some(v) = t.host_slice::<f32>() {
        return Ok(pick(&|k| v[k]));
    }
    if let Some(v) = t.host_slice::<half::bf16>() {
        return Ok(pick(&|k| v[k].to_f32()));
    }
    if let Some(v) = t.host_slice::<half::f16>() {
        return Ok(pick(&|k| v[k].to_f32()));
    }
    Err(Error::invalid("CodeHead", "the code vectors are not on the CPU"))
}

/// The f64 reference, and the f32 CPU path.
pub mod cpu {
    use super::*;

    /// Gradients in f64.
    #[derive(Clone, Debug)]
    pub struct Grads64 {
        /// `[B, d]`.
        pub features: Vec<f64>,
        /// Per position, `[v, d_p]`.
        pub centres: Vec<Vec<f64>>,
        /// Per position, `[d_p, d]`.
        pub projections: Option<Vec<Vec<f64>>>,
    }

    fn normalize(z: &[f64]) -> (Vec<f64>, f64) {
        let n = z.iter().map(|x| x * x).sum::<f64>().sqrt();
        (z.iter().map(|x| x / n).collect(), n)
    }

    fn project(cfg: &CodeHeadConfig, x: &[f32], p: Option<&[f32]>) -> Vec<f64> {
        match p {
            None => x.iter().map(|&v| v as f64).collect(),
            Some(p) => {
                (0..cfg.dp()).map(|r| (0..cfg.dim).map(|c| p[r * cfg.dim + c] as f64 * x[c] as f64).sum()).collect()
            }
        }
    }

    fn unit_centres(cfg: &CodeHeadConfig, w: &[f32]) -> (Vec<Vec<f64>>, Vec<f64>) {
        let dp = cfg.dp();
        (0..cfg.vocab)
            .map(|k| {
                let row: Vec<f64> = w[k * dp..(k + 1) * dp].iter().map(|&v| v as f64).collect();
                let n = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(EPS as f64);
                (row.iter().map(|x| x / n).collect::<Vec<f64>>(), n)
            })
            .unzip()
    }

    /// γ·L_AR (batch mean) in f64, passing each feature-gradient term
    /// `(index into [B, d], value)` to `add`.
    fn regression(
        cfg: &CodeHeadConfig,
        x: &[f32],
        h: Option<&[f32]>,
        b: usize,
        mut add: impl FnMut(usize, f64),
    ) -> f64 {
        if cfg.gamma == 0.0 {
            return 0.0;
        }
        let d = cfg.dim;
        let h = h.expect("gamma != 0 needs code vectors (checked by the caller)");
        let gb = cfg.gamma as f64 / b as f64;
        let mut total = 0f64;
        for s in 0..b {
            let xs: Vec<f64> = x[s * d..(s + 1) * d].iter().map(|&v| v as f64).collect();
            let (xh, xn) = normalize(&xs);
            let hv: Vec<f64> = h[s * d..(s + 1) * d].iter().map(|&v| v as f64).collect();
            let dot: f64 = xh.iter().zip(&hv).map(|(a, c)| a * c).sum();
            let r = dot - 1.0;
            total += 0.5 * gb * r * r;
            for c in 0..d {
                add(s * d + c, gb * r * (hv[c] - xh[c] * dot) / xn);
            }
        }
        total
    }

    /// Losses and gradients in f64 for features `x` (`[B, d]`), `labels`,
    /// codes (`[N, l]`), each sample's code vector `h` (`[B, d]`: row b is
    /// the code vector of `labels[b]`; needed when γ ≠ 0), centres and
    /// projections (per position, row-major).
    pub fn forward_backward(
        cfg: &CodeHeadConfig,
        x: &[f32],
        labels: &[u32],
        codes: &[u16],
        h: Option<&[f32]>,
        centres: &[Vec<f32>],
        projections: Option<&[Vec<f32>]>,
    ) -> (HeadLoss, Grads64) {
        let (b, d, dp, v, l) = (labels.len(), cfg.dim, cfg.dp(), cfg.vocab, cfg.length);
        let mut dx = vec![0f64; b * d];
        let mut per_position = vec![0f64; l];
        let mut accuracy = vec![0f64; l];
        let mut dcentres = Vec::with_capacity(l);
        let mut dproj: Vec<Vec<f64>> = Vec::new();
        for j in 0..l {
            let (w_hat, w_norm) = unit_centres(cfg, &centres[j]);
            let weight = cfg.lambda(j) as f64 / b as f64;
            let mut dw_hat = vec![vec![0f64; dp]; v];
            let mut dp_j = vec![0f64; if projections.is_some() { dp * d } else { 0 }];
            for s in 0..b {
                let xs = &x[s * d..(s + 1) * d];
                let z = project(cfg, xs, projections.map(|p| &p[j][..]));
                let (u, zn) = normalize(&z);
                let mut cos: Vec<f64> = w_hat.iter().map(|w| w.iter().zip(&u).map(|(a, c)| a * c).sum()).collect();
                let y = codes[labels[s] as usize * l + j] as usize;
                // The target's angle from the vectors (accurate at small angles).
                let wy = &centres[j][y * dp..(y + 1) * dp];
                let ang = Angle::of(&z, wy);
                cos[y] = ang.c;
                let row = margin_ce_row(&cos, y, ang.sin, cfg.scale as f64, cfg.margin, cfg.margin_grad)
                    .unwrap_or_else(|_| RowCe::nan(v));
                per_position[j] += weight * row.loss;
                accuracy[j] += if row.correct { 1.0 / b as f64 } else { 0.0 };
                let g: Vec<f64> = row.grad.iter().map(|x| x * weight).collect();
                let du: Vec<f64> = (0..dp).map(|c| (0..v).map(|k| g[k] * w_hat[k][c]).sum()).collect();
                let proj: f64 = du.iter().zip(&u).map(|(a, c)| a * c).sum();
                // Through the normalization, plus the singular part along the unit tangent.
                let sing = weight * row.singular;
                let dz: Vec<f64> =
                    (0..dp).map(|c| (du[c] - u[c] * proj + sing * ang.toward_w(&z, wy, c)) / zn).collect();
                for k in 0..v {
                    for c in 0..dp {
                        dw_hat[k][c] += g[k] * u[c];
                    }
                }
                for (c, o) in dw_hat[y].iter_mut().enumerate() {
                    *o += sing * ang.toward_z(&z, wy, c);
                }
                match projections {
                    Some(p) => {
                        for r in 0..dp {
                            for c in 0..d {
                                dp_j[r * d + c] += dz[r] * xs[c] as f64;
                                dx[s * d + c] += p[j][r * d + c] as f64 * dz[r];
                            }
                        }
                    }
                    None => (0..d).for_each(|c| dx[s * d + c] += dz[c]),
                }
            }
            let mut dw = vec![0f64; v * dp];
            for k in 0..v {
                let dot: f64 = (0..dp).map(|c| w_hat[k][c] * dw_hat[k][c]).sum();
                for c in 0..dp {
                    dw[k * dp + c] = (dw_hat[k][c] - w_hat[k][c] * dot) / w_norm[k];
                }
            }
            dcentres.push(dw);
            if projections.is_some() {
                dproj.push(dp_j);
            }
        }
        let regression = regression(cfg, x, h, b, |i, g| dx[i] += g);
        let total = per_position.iter().sum::<f64>() + regression;
        (
            HeadLoss { total, per_position, regression, accuracy },
            Grads64 { features: dx, centres: dcentres, projections: projections.map(|_| dproj) },
        )
    }

    /// Gradients in f32.
    #[derive(Clone, Debug)]
    pub struct Grads32 {
        /// `[B, d]`.
        pub features: Vec<f32>,
        /// Per position, `[v, d_p]`.
        pub centres: Vec<Vec<f32>>,
        /// Per position, `[d_p, d]`.
        pub projections: Option<Vec<Vec<f32>>>,
    }

    /// Rows divided by their norms (floored at `eps`), and the unclamped norms.
    fn unit_rows32(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
        let (mut u, mut n) = (vec![0f32; x.len()], vec![0f32; x.len() / d]);
        crate::ops::rowwise::cpu::l2_normalize(x, d, eps, &mut u, &mut n);
        (u, n)
    }

    /// The CPU path: the same step as [`forward_backward`] in f32, with the
    /// products through the `gemm` crate (projections `B·d·d_p`, cosines and
    /// their gradients `B·v·d_p`) and the per-row margin softmax in f64.
    pub fn fast_forward_backward(
        cfg: &CodeHeadConfig,
        x: &[f32],
        labels: &[u32],
        codes: &[u16],
        h: Option<&[f32]>,
        centres: &[Vec<f32>],
        projections: Option<&[Vec<f32>]>,
    ) -> (HeadLoss, Grads32) {
        use crate::ops::gemm::cpu::gemm_sized as g;
        let (b, d, dp, v, l) = (labels.len(), cfg.dim, cfg.dp(), cfg.vocab, cfg.length);
        let mut dx = vec![0f32; b * d];
        let (mut per_position, mut accuracy) = (vec![0f64; l], vec![0f64; l]);
        let (mut dcentres, mut dproj) = (Vec::with_capacity(l), Vec::new());
        for j in 0..l {
            let z_owned;
            let z: &[f32] = match projections {
                Some(p) => {
                    let mut zz = vec![0f32; b * dp];
                    g(b, dp, d, 1.0, x, d, Op::N, &p[j], d, Op::T, 0.0, &mut zz, dp);
                    z_owned = zz;
                    &z_owned
                }
                None => x,
            };
            // Features: plain norms (a zero feature gives a non-finite loss, as on the GPU).
            let zn: Vec<f32> = z.chunks(dp).map(|r| r.iter().map(|a| a * a).sum::<f32>().sqrt()).collect();
            let u: Vec<f32> = z.chunks(dp).zip(&zn).flat_map(|(r, n)| r.iter().map(move |a| a / n)).collect();
            let (w_hat, w_norm) = unit_rows32(&centres[j], dp, EPS);
            let mut cos = vec![0f32; b * v];
            g(b, v, dp, 1.0, &u, dp, Op::N, &w_hat, dp, Op::T, 0.0, &mut cos, v);
            let weight = cfg.lambda(j) as f64 / b as f64;
            let mut gc = vec![0f32; b * v];
            // Per sample: the target's angle from the vectors (f64), and the
            // singular part of the exact gradient, applied along the unit
            // tangents below (0 for most margins).
            let mut singular: Vec<(usize, Angle, f64)> = Vec::new();
            for s in 0..b {
                let mut row: Vec<f64> = cos[s * v..(s + 1) * v].iter().map(|&c| c as f64).collect();
                let y = codes[labels[s] as usize * l + j] as usize;
                let zs = &z[s * dp..(s + 1) * dp];
                let ang = if cfg.margin.is_angular() {
                    let a = Angle::of(zs, &centres[j][y * dp..(y + 1) * dp]);
                    row[y] = a.c;
                    a
                } else {
                    Angle { c: row[y], sin: (1.0 - row[y] * row[y]).max(0.0).sqrt(), nz: 1.0, nw: 1.0 }
                };
                let r = margin_ce_row(&row, y, ang.sin, cfg.scale as f64, cfg.margin, cfg.margin_grad)
                    .unwrap_or_else(|_| RowCe::nan(v));
                per_position[j] += weight * r.loss;
                accuracy[j] += if r.correct { 1.0 / b as f64 } else { 0.0 };
                gc[s * v..(s + 1) * v].iter_mut().zip(&r.grad).for_each(|(o, &q)| *o = (q * weight) as f32);
                if r.singular != 0.0 {
                    singular.push((s, ang, r.singular * weight));
                }
            }
            let mut du = vec![0f32; b * dp];
            g(b, dp, v, 1.0, &gc, v, Op::N, &w_hat, dp, Op::N, 0.0, &mut du, dp);
            let mut dz = vec![0f32; b * dp];
            for s in 0..b {
                let (us, dus) = (&u[s * dp..(s + 1) * dp], &du[s * dp..(s + 1) * dp]);
                let proj: f32 = us.iter().zip(dus).map(|(a, c)| a * c).sum();
                dz[s * dp..(s + 1) * dp].iter_mut().enumerate().for_each(|(c, o)| *o = (dus[c] - us[c] * proj) / zn[s]);
            }
            let mut dw_hat = vec![0f32; v * dp];
            g(v, dp, b, 1.0, &gc, v, Op::T, &u, dp, Op::N, 0.0, &mut dw_hat, dp);
            for &(s, ang, a) in &singular {
                let y = codes[labels[s] as usize * l + j] as usize;
                let (zs, wy) = (&z[s * dp..(s + 1) * dp], &centres[j][y * dp..(y + 1) * dp]);
                for c in 0..dp {
                    dz[s * dp + c] += (a * ang.toward_w(zs, wy, c) / ang.nz) as f32;
                    dw_hat[y * dp + c] += (a * ang.toward_z(zs, wy, c)) as f32;
                }
            }
            let mut dw = vec![0f32; v * dp];
            crate::ops::rowwise::cpu::l2_normalize_backward(&w_hat, &w_norm, &dw_hat, dp, EPS, &mut dw);
            dcentres.push(dw);
            match projections {
                Some(p) => {
                    let mut dpj = vec![0f32; dp * d];
                    g(dp, d, b, 1.0, &dz, dp, Op::T, x, d, Op::N, 0.0, &mut dpj, d);
                    g(b, d, dp, 1.0, &dz, dp, Op::N, &p[j], d, Op::N, 1.0, &mut dx, d);
                    dproj.push(dpj);
                }
                None => dx.iter_mut().zip(&dz).for_each(|(a, c)| *a += c),
            }
        }
        let regression = regression(cfg, x, h, b, |i, g| dx[i] += g as f32);
        let total = per_position.iter().sum::<f64>() + regression;
        (
            HeadLoss { total, per_position, regression, accuracy },
            Grads32 { features: dx, centres: dcentres, projections: projections.map(|_| dproj) },
        )
    }

    /// Per-position log-softmax of `s·cos` (no margin), `[B, l, v]`.
    pub fn log_probs(
        cfg: &CodeHeadConfig,
        x: &[f32],
        b: usize,
        centres: &[Vec<f32>],
        projections: Option<&[Vec<f32>]>,
    ) -> Vec<f64> {
        let (d, v, l) = (cfg.dim, cfg.vocab, cfg.length);
        let mut out = vec![0f64; b * l * v];
        for j in 0..l {
            let (w_hat, _) = unit_centres(cfg, &centres[j]);
            for s in 0..b {
                let (u, _) = normalize(&project(cfg, &x[s * d..(s + 1) * d], projections.map(|p| &p[j][..])));
                let lg: Vec<f64> = w_hat
                    .iter()
                    .map(|w| cfg.scale as f64 * w.iter().zip(&u).map(|(a, c)| a * c).sum::<f64>())
                    .collect();
                let mx = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + lg.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                for k in 0..v {
                    out[(s * l + j) * v + k] = lg[k] - lse;
                }
            }
        }
        out
    }
}
