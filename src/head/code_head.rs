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
//! x/‖x‖` and `h` the code vectors (fixed). The centres of every position
//! are one tensor `[l, v, d_p]` (projections `[l, d_p, d]`), and
//! kernels/code_head.cu computes every position in one launch: the
//! regression term and each position's margin softmax fused (normalize →
//! cosines → margin → softmax → CE → gradients through the feature
//! normalization), then the centres' gradient as a small-v GEMM over all
//! positions; the projections are one GEMM each way. A step is 5 launches
//! whatever l (8 with projections; docs/code_head.md).

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::margin::{margin_ce_row, Angle, Margin, MarginGrad, RowCe};
use super::stats::{DeviceRows, StepStats};
use crate::error::{Error, Result};
use crate::ops::gemm::{self, Op};
use crate::ops::labels::{self, Codes, Labels};
use crate::ops::rows::axpy_rows;
use crate::ops::rowwise;
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, HostMapping, LaunchConfig};
use crate::runtime::kernels::{Ptr, PtrMut};
use crate::runtime::tensor::{same_device, DType, HostData, Tensor};
use crate::tokenizer::Codebook;
use crate::train::ParamRef;

/// Normalization floor for the centres (as PyTorch's F.normalize).
const EPS: f32 = 1e-12;
/// Longest code (a v ≥ 2 code of 256 tokens names 2^256 identities).
pub const MAX_LENGTH: usize = 256;
/// Row slices of the centre gradient's split reduction, at most.
const MAX_SLICES: usize = 16;

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
        if self.length > MAX_LENGTH {
            return Err(Error::invalid(OP, format!("length must be at most {MAX_LENGTH}, got {}", self.length)));
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

/// The identities' codes (on the host) and code vectors (f32 or bf16; only
/// B rows a step are read): on the head's device ([`CodeTable::new`]), or
/// resident in page-locked host memory that the kernels read in place
/// ([`CodeTable::with_host_vectors`]). GIF's one O(N) state: fixed data, no
/// gradient, no optimizer state.
pub struct CodeTable {
    codes: Vec<u16>,
    /// The codes on `device` (GPU backends): device labels map to tokens
    /// there.
    codes_device: Option<(Device, DeviceBuffer)>,
    n: usize,
    length: usize,
    vocab: usize,
    /// Host-resident vectors mapped for the device's kernels (declared
    /// before `vectors`: unmapped before the memory goes).
    mapped: Option<HostMapping>,
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
        CodeTable::build(device, device, codes, length, vocab, vectors)
    }

    /// As [`CodeTable::new`], the code vectors (`[n, d]` stored as `dtype`)
    /// kept in host memory, page-locked and mapped into the device's
    /// address space (CUDA: `cuMemHostRegister` with DEVICEMAP): the step
    /// kernel reads its B rows across the bus in place, with no upload and
    /// no host wait, device labels included. For tables larger than the
    /// device's memory allows next to the model (N·d·2 bytes in bf16: 2 GiB
    /// at N = 2^21, d = 512). Page-locking N·d values needs that much
    /// locked memory (`ulimit -l`): a refusal is a typed error.
    pub fn with_host_vectors(
        device: &Device,
        codes: Vec<u16>,
        length: usize,
        vocab: usize,
        vectors: (&[f32], usize, DType),
    ) -> Result<CodeTable> {
        let mut table = CodeTable::build(device, &Device::cpu(), codes, length, vocab, Some(vectors))?;
        if device.runs_kernels() {
            if let Some(bytes) = table.vectors.as_ref().and_then(Tensor::host_bytes) {
                // SAFETY: the vectors' host allocation lives in `table`, never
                // moves or changes, and outlives the mapping (dropped first).
                table.mapped = Some(unsafe { device.map_host(bytes)? });
            }
        }
        Ok(table)
    }

    fn build(
        device: &Device,
        vector_device: &Device,
        codes: Vec<u16>,
        length: usize,
        vocab: usize,
        vectors: Option<(&[f32], usize, DType)>,
    ) -> Result<CodeTable> {
        const OP: &str = "CodeTable";
        if length == 0 || codes.is_empty() || !codes.len().is_multiple_of(length) {
            return Err(Error::invalid(OP, format!("{} tokens are not codes of length {length}", codes.len())));
        }
        let n = codes.len() / length;
        if let Some(i) = codes.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::invalid(OP, format!("identity {} has token {} >= vocab {vocab}", i / length, codes[i])));
        }
        let vectors = match vectors {
            Some((v, d, dtype)) => {
                if n.checked_mul(d) != Some(v.len()) {
                    return Err(Error::Shape {
                        op: OP,
                        expected: format!("[{n}, {d}] code vectors"),
                        got: format!("{} values", v.len()),
                    });
                }
                Some(Tensor::from_f32(vector_device, &[n, d], v, dtype)?)
            }
            None => None,
        };
        let codes_device = match device.runs_kernels() {
            true => Some((device.clone(), device.upload(bytemuck::cast_slice(&codes))?)),
            false => None,
        };
        Ok(CodeTable { codes, codes_device, n, length, vocab, mapped: None, vectors })
    }

    /// The codes and code vectors of a tokenizer codebook.
    pub fn from_codebook(device: &Device, book: &Codebook, vector_dtype: DType) -> Result<CodeTable> {
        CodeTable::new(
            device,
            book.codes().to_vec(),
            book.length(),
            book.vocab(),
            Some((book.vectors()?, book.dim(), vector_dtype)),
        )
    }

    /// The codes, `[N, l]` row-major.
    pub fn codes(&self) -> &[u16] {
        &self.codes
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Bytes of the code vectors (0 without), wherever they are.
    pub fn vector_bytes(&self) -> usize {
        self.vectors.as_ref().map_or(0, Tensor::nbytes)
    }
    /// The device holding the code vectors, if any (the CPU for a
    /// host-resident table).
    pub fn vector_device(&self) -> Option<&Device> {
        self.vectors.as_ref().map(Tensor::device)
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
    /// Per position: the fraction of samples whose plain-cosine argmax is
    /// the target token.
    pub accuracy: Vec<f64>,
    /// The fraction of samples whose every position is right (the whole
    /// code predicted greedily: the identity found).
    pub identity_accuracy: f64,
}

impl HeadLoss {
    /// The CPU paths' result: the total, and the identity accuracy from
    /// each sample's all-positions-right flag.
    fn from_parts(per_position: Vec<f64>, regression: f64, accuracy: Vec<f64>, all_right: &[bool]) -> HeadLoss {
        let total = per_position.iter().sum::<f64>() + regression;
        let identity_accuracy = all_right.iter().filter(|&&r| r).count() as f64 / all_right.len().max(1) as f64;
        HeadLoss { total, per_position, regression, accuracy, identity_accuracy }
    }
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
            Err(DeviceRows { sums, b, rows }) => {
                // Rows: the regression term, then each position's loss and hit.
                let l = (sums.len() - 1) / 2;
                let per_position: Vec<f64> = (0..l).map(|j| sums[1 + 2 * j]).collect();
                let accuracy: Vec<f64> = (0..l).map(|j| sums[2 + 2 * j] / b as f64).collect();
                let total = per_position.iter().sum::<f64>() + sums[0];
                let all = (0..b).filter(|&s| (0..l).all(|j| rows[(2 + 2 * j) * b + s] > 0.5)).count();
                let identity_accuracy = all as f64 / b as f64;
                HeadLoss { total, per_position, regression: sums[0], accuracy, identity_accuracy }
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
    /// With respect to the centres, f32 `[l, v, d_p]` (position j's
    /// `[v, d_p]` is block j).
    pub centres: Tensor,
    /// With respect to the projections, f32 `[l, d_p, d]`, when there are.
    pub projections: Option<Tensor>,
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
            centres: Tensor::empty(dev, &[l, v, dp], DType::F32)?,
            projections: match head.projections {
                Some(_) => Some(Tensor::empty(dev, &[l, dp, d], DType::F32)?),
                None => None,
            },
        })
    }

    fn check(&self, op: &'static str, head: &CodeHead, b: usize) -> Result<()> {
        let (d, dp, v, l) = (head.cfg.dim, head.cfg.dp(), head.cfg.vocab, head.cfg.length);
        self.features.check_output(op, &head.device, &[&[b, d]])?;
        self.centres.check_output(op, &head.device, &[&[l, v, dp]])?;
        match (&self.projections, &head.projections) {
            (Some(p), Some(_)) => p.check_output(op, &head.device, &[&[l, dp, d]]),
            (None, None) => Ok(()),
            _ => Err(Error::invalid(op, "the gradients hold projections exactly when the head has them")),
        }
    }
}

/// The trainable head: the centres of every position in one tensor
/// `[l, v, d_p]` (and the projections `[l, d_p, d]`), so that one launch
/// serves every position.
pub struct CodeHead {
    cfg: CodeHeadConfig,
    device: Device,
    centres: Tensor,
    projections: Option<Tensor>,
    /// λ on the device (GPU backends, when configured).
    lambdas: Option<DeviceBuffer>,
}

impl CodeHead {
    /// A head with seeded random centres (normal with variance 1/d_p, rows
    /// of norm about 1) and projections (normal with variance 1/d), stored as
    /// `cfg.weight_dtype` on `device`.
    pub fn new(cfg: CodeHeadConfig, device: &Device, seed: u64) -> Result<CodeHead> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, dp, v, l) = (cfg.dim, cfg.dp(), cfg.vocab, cfg.length);
        let mut normal = |n: usize, sd: f32| -> Vec<f32> {
            (0..n).map(|_| sd * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect()
        };
        let count = |dims: &[usize]| -> Result<usize> {
            dims.iter()
                .try_fold(1usize, |a, &x| a.checked_mul(x))
                .ok_or_else(|| Error::invalid("CodeHead", "size overflows"))
        };
        // Rows of norm about 1, so that an SGD step moves directions by about lr·‖g‖.
        let centres = Tensor::from_f32(
            device,
            &[l, v, dp],
            &normal(count(&[l, v, dp])?, 1.0 / (dp as f32).sqrt()),
            cfg.weight_dtype,
        )?;
        let projections = match cfg.projection {
            Some(_) => Some(Tensor::from_f32(
                device,
                &[l, dp, d],
                &normal(count(&[l, dp, d])?, 1.0 / (d as f32).sqrt()),
                cfg.weight_dtype,
            )?),
            None => None,
        };
        let lambdas = device_lambdas(&cfg, device)?;
        Ok(CodeHead { cfg, device: device.clone(), centres, projections, lambdas })
    }

    /// A head from given weights: `centres` `[l, v, d_p]` and `projections`
    /// `[l, d_p, d]`, of `cfg.weight_dtype` on one device.
    pub fn from_weights(cfg: CodeHeadConfig, centres: Tensor, projections: Option<Tensor>) -> Result<CodeHead> {
        const OP: &str = "CodeHead::from_weights";
        cfg.validate()?;
        let (d, dp, v, l) = (cfg.dim, cfg.dp(), cfg.vocab, cfg.length);
        let wt = cfg.weight_dtype;
        if centres.shape() != [l, v, dp] || centres.dtype() != wt {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{wt:?} centres [{l}, {v}, {dp}]"),
                got: format!("{:?} {:?}", centres.dtype(), centres.shape()),
            });
        }
        match (&projections, cfg.projection) {
            (None, None) => {}
            (Some(p), Some(_)) if p.shape() == [l, dp, d] && p.dtype() == wt => {}
            _ => {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("{wt:?} projections [{l}, {dp}, {d}] exactly when configured"),
                    got: format!("{:?}", projections.as_ref().map(|p| (p.dtype(), p.shape().to_vec()))),
                })
            }
        }
        let device = centres.device().clone();
        let all: Vec<&Tensor> = std::iter::once(&centres).chain(projections.as_ref()).collect();
        same_device(OP, &all)?;
        let lambdas = device_lambdas(&cfg, &device)?;
        Ok(CodeHead { cfg, device, centres, projections, lambdas })
    }

    /// The configuration.
    pub fn config(&self) -> &CodeHeadConfig {
        &self.cfg
    }
    /// The centres of every position, `[l, v, d_p]`.
    pub fn centres(&self) -> &Tensor {
        &self.centres
    }
    /// The projections of every position, `[l, d_p, d]`, when configured.
    pub fn projections(&self) -> Option<&Tensor> {
        self.projections.as_ref()
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
        // The exact ArcFace gradient sends 2B rows through i32 indices.
        if b > i32::MAX as usize / 2 {
            return Err(Error::invalid(op, format!("a batch of {b} exceeds {} samples", i32::MAX / 2)));
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
                Some(v) if v.device() != &self.device && v.device().kind() != DeviceKind::Cpu => {
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
        let (centres, projections) = self.host_weights()?;
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
        grads.centres.write_host_f32(&g.centres.concat())?;
        if let (Some(t), Some(p)) = (grads.projections.as_mut(), &g.projections) {
            t.write_host_f32(&p.concat())?;
        }
        Ok(loss)
    }

    /// The weights of a CPU head as f32, one vector per position.
    fn host_weights(&self) -> Result<(PerPosition, Option<PerPosition>)> {
        let (d, dp, v) = (self.cfg.dim, self.cfg.dp(), self.cfg.vocab);
        let split = |t: &Tensor, n: usize| t.host_f32().map(|w| w.chunks(n).map(<[f32]>::to_vec).collect::<Vec<_>>());
        let centres = split(&self.centres, v * dp)?;
        let projections = self.projections.as_ref().map(|p| split(p, dp * d)).transpose()?;
        Ok((centres, projections))
    }

    /// Ŵ (f32 `[l·v, d_p]`) and the centres' norms (`[l·v]`): one launch
    /// over every position (bf16 centres normalized straight into f32).
    fn normalized_centres(&self) -> Result<(Tensor, Tensor)> {
        let flat = self.centres.view(&[self.cfg.length * self.cfg.vocab, self.cfg.dp()])?;
        rowwise::l2_normalize_f32(&flat, EPS)
    }

    /// Copies that bring the features and projections to the dtype their
    /// GEMMs share: none when they match, else the bf16 one widened (one
    /// launch).
    fn widen_mismatch(features: &Tensor, p: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if features.dtype() == p.dtype() {
            return Ok((None, None));
        }
        Ok((features.widened()?, p.widened()?))
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
        // Per-sample statistics, one row each, left in the metrics (read in
        // one copy): the regression loss, then the loss and hit of every
        // position. Reused while the shape stays.
        let mut stats = metrics.state.take_buffer(dev, 2 * l + 1, b)?;
        let table_t = table.vectors.as_ref().filter(|_| cfg.gamma != 0.0);
        // The table's address for this device: its own memory, or the host
        // memory mapped for it.
        let (t32, t16) = match table_t {
            None => (Ptr::null(), Ptr::null()),
            Some(t) if t.device() == dev => f32_or_bf16(t)?,
            Some(t) => {
                let m = table.mapped.as_ref().filter(|m| m.device() == dev).ok_or_else(|| {
                    Error::invalid("CodeHead", "the table's host vectors are mapped for another device")
                })?;
                match t.dtype() {
                    DType::F32 => (Ptr::from_addr(m.addr()), Ptr::null()),
                    _ => (Ptr::null(), Ptr::from_addr(m.addr())),
                }
            }
        };
        let (w_hat, w_norm) = self.normalized_centres()?;
        // The projections of every position in one GEMM: Z = X·Pᵀ, [B, l·d_p].
        let p_flat = self.projections.as_ref().map(|p| p.view(&[l * dp, d])).transpose()?;
        let widened = p_flat.as_ref().map(|p| Self::widen_mismatch(features, p)).transpose()?;
        let operands: Option<(&Tensor, &Tensor)> = match (&p_flat, &widened) {
            (Some(p), Some((xw, pw))) => Some((xw.as_ref().unwrap_or(features), pw.as_ref().unwrap_or(p))),
            _ => None,
        };
        let z = match operands {
            Some((x, p)) => Some(gemm::matmul(x, Op::N, p, Op::T)?),
            None => None,
        };
        // With bf16 operands the backward GEMMs run on bf16 too (dZ rounded,
        // as autocast does), on the tensor cores.
        let dz_dtype = operands.map_or(DType::F32, |(x, _)| x.dtype());
        let mut dz = z.as_ref().map(|_| Tensor::empty(dev, &[b, l * dp], dz_dtype)).transpose()?;
        // With the exact ArcFace gradient, rows B.. of dC and U carry its
        // singular part into the centre gradient (kernels/code_head.cu).
        let singular = cfg.margin.is_angular() && cfg.margin_grad == MarginGrad::Exact;
        let rows = if singular { 2 * b } else { b };
        let mut u = Tensor::empty(dev, &[l * rows, dp], DType::F32)?;
        let mut dc = Tensor::empty(dev, &[l * rows, v], DType::F32)?;
        let (kind, m) = cfg.margin.kernel_args();
        let (x32, x16) = f32_or_bf16(features)?;
        let (w32, w16) = f32_or_bf16(&self.centres)?;
        let (dz32, dz16) = match dz.as_mut() {
            Some(t) if t.dtype() == DType::F32 => (t.ptr_mut()?, PtrMut::null()),
            Some(t) => (PtrMut::null(), t.ptr_mut()?),
            None => (PtrMut::null(), PtrMut::null()),
        };
        let lambdas = self.lambdas.as_ref().map_or(Ptr::null(), |buf| dev.ptr_of::<f32>(buf));
        let step_cfg = LaunchConfig::linear(b as u32, 128, ((2 * dp + 2 * v) * 4) as u32);
        // SAFETY: features [B, d] (f32 or bf16: one pointer null); labels B
        // i32 < N and targets l·B tokens < v (prepared and checked); the
        // table [N, d] (device memory, or host memory mapped for this
        // device and owned by `table`), or null; Z [B, l·d_p] or null (then d_p = d); Ŵ and
        // the centres [l·v, d_p]; λ l floats or null; U [l·R, d_p] and dC
        // [l·R, v] with R = 2B when singular, else B; dx [B, d]; dZ
        // [B, l·d_p] or null; stats [2l + 1, B]; v ≤ 4096 and d_p ≤ 8192 fit
        // the shared memory (validated).
        unsafe {
            crate::runtime::launch::code_head_step(
                dev,
                step_cfg,
                x32,
                x16,
                d as i32,
                dev.ptr_of::<i32>(&label_buf),
                t32,
                t16,
                cfg.gamma / b as f32,
                Tensor::ptr_or_null(z.as_ref())?,
                dp as i32,
                w_hat.ptr()?,
                w32,
                w16,
                dev.ptr_of::<i32>(target_buf),
                lambdas,
                b as i32,
                l as i32,
                v as i32,
                cfg.scale,
                kind,
                m,
                m.cos(),
                m.sin(),
                i32::from(cfg.margin_grad == MarginGrad::Exact),
                u.ptr_mut()?,
                dc.ptr_mut()?,
                i32::from(singular),
                grads.features.ptr_mut()?,
                dz32,
                dz16,
                stats.ptr_mut()?,
            )
        }?;
        self.centre_grad(&dc, &u, rows, &w_hat, &w_norm, &mut grads.centres)?;
        if let (Some((x, p)), Some(dz), Some(dp_out)) = (operands, &dz, grads.projections.as_mut()) {
            // dP = dZᵀ·X ([l·d_p, d]) and dX += dZ·P, each one GEMM over every position.
            dp_out.view_mut(&[l * dp, d], |g| gemm::gemm(1.0, dz, Op::T, x, Op::N, 0.0, g))?;
            gemm::gemm(1.0, dz, Op::N, p, Op::N, 1.0, &mut grads.features)?;
        }
        metrics.state = StepStats::Device { stats, bad, n: table.n };
        Ok(())
    }

    /// dW = the centre normalization's backward of dŴ = dCᵀ·U per position,
    /// in two launches for every position: split partial sums over row
    /// slices, then their ordered sum and the normalization's gradient.
    fn centre_grad(
        &self,
        dc: &Tensor,
        u: &Tensor,
        rows: usize,
        w_hat: &Tensor,
        w_norm: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let dev = &self.device;
        let (dp, v, l) = (self.cfg.dp(), self.cfg.vocab, self.cfg.length);
        // Slices of at least 128 rows: enough blocks to fill a GPU at v = 16
        // (a 16 × 128 tile per block), a fixed summation order on every card.
        let slices = rows.div_ceil(128).clamp(1, MAX_SLICES);
        let mut partial = Tensor::empty(dev, &[slices * l * v, dp], DType::F32)?;
        let grid = (dp.div_ceil(128) as u32, v.div_ceil(16) as u32, (l * slices) as u32);
        // SAFETY: dC [l·rows, v] and U [l·rows, d_p] (allocated by the
        // caller), partial [slices·l·v, d_p]; the grid covers v and d_p in
        // tiles of 16 and 128, l·slices ≤ 256·16 < 65536.
        unsafe {
            crate::runtime::launch::code_centre_grad(
                dev,
                LaunchConfig { grid, block: (256, 1, 1), shared_bytes: 0 },
                dc.ptr()?,
                u.ptr()?,
                rows as i32,
                dp as i32,
                v as i32,
                l as i32,
                slices as i32,
                partial.ptr_mut()?,
            )
        }?;
        let lv = l * v;
        // SAFETY: partial as above, Ŵ [l·v, d_p], norms [l·v], out [l, v, d_p]
        // (checked by HeadGrads::check); one warp per row.
        unsafe {
            crate::runtime::launch::code_centre_grad_finish(
                dev,
                LaunchConfig::linear(lv.div_ceil(8) as u32, 256, 0),
                partial.ptr()?,
                slices as i32,
                w_hat.ptr()?,
                w_norm.ptr()?,
                lv as i32,
                dp as i32,
                EPS,
                out.ptr_mut()?,
            )
        }
    }

    /// Per-position log-softmax of `s·cos`, without margin: `[B, l·v]` f32,
    /// row b holding position 0's v log-probabilities, then position 1's, ...
    /// (that is, `[B, l, v]` row-major). The decoder consumes this. On a GPU
    /// backend: the centres' normalization, the projections' GEMM when there
    /// are, and one kernel for every position (2 or 3 launches, whatever l).
    pub fn log_probs(&self, features: &Tensor) -> Result<Tensor> {
        const OP: &str = "CodeHead::log_probs";
        let b = self.check_batch(OP, features)?;
        let (d, dp, l, v) = (self.cfg.dim, self.cfg.dp(), self.cfg.length, self.cfg.vocab);
        if self.device.kind() == DeviceKind::Cpu {
            let x = features.host_f32()?;
            // f64 (the reference): inference batches are small on the CPU.
            let (centres, projections) = self.host_weights()?;
            let out = cpu::log_probs(&self.cfg, &x, b, &centres, projections.as_deref());
            return Ok(Tensor::from_host(
                &self.device,
                vec![b, l * v],
                HostData::F32(out.iter().map(|&x| x as f32).collect()),
            ));
        }
        let dev = &self.device;
        let (w_hat, _) = self.normalized_centres()?;
        let p_flat = self.projections.as_ref().map(|p| p.view(&[l * dp, d])).transpose()?;
        let z = match &p_flat {
            Some(p) => {
                let (xw, pw) = Self::widen_mismatch(features, p)?;
                Some(gemm::matmul(xw.as_ref().unwrap_or(features), Op::N, pw.as_ref().unwrap_or(p), Op::T)?)
            }
            None => None,
        };
        let mut out = Tensor::empty(dev, &[b, l * v], DType::F32)?;
        let (x32, x16) = f32_or_bf16(features)?;
        // SAFETY: features [B, d] (one pointer null), Z [B, l·d_p] or null
        // (then d_p = d), Ŵ [l·v, d_p], out [B, l·v]; (d_p + v) floats of
        // shared memory (v ≤ 4096, d_p ≤ 8192).
        unsafe {
            crate::runtime::launch::code_log_probs(
                dev,
                LaunchConfig::linear(b as u32, 128, ((dp + v) * 4) as u32),
                x32,
                x16,
                d as i32,
                Tensor::ptr_or_null(z.as_ref())?,
                dp as i32,
                w_hat.ptr()?,
                l as i32,
                v as i32,
                self.cfg.scale,
                EPS,
                out.ptr_mut()?,
            )
        }?;
        Ok(out)
    }

    /// The head's parameters with their gradients from `grads`, for
    /// [`crate::train::Optimizer::step`]: `centres` (`[l, v, d_p]`), then
    /// `projections` (`[l, d_p, d]`) when configured. Shapes must match.
    pub fn param_refs<'a>(&'a mut self, grads: &'a HeadGrads) -> Result<Vec<ParamRef<'a>>> {
        const OP: &str = "CodeHead::param_refs";
        if grads.centres.shape() != self.centres.shape()
            || grads.projections.as_ref().map(|p| p.shape()) != self.projections.as_ref().map(|p| p.shape())
        {
            return Err(Error::invalid(OP, "gradients do not match the head"));
        }
        let mut v = vec![ParamRef { value: &mut self.centres, grad: &grads.centres }];
        if let (Some(p), Some(g)) = (self.projections.as_mut(), grads.projections.as_ref()) {
            v.push(ParamRef { value: p, grad: g });
        }
        Ok(v)
    }

    /// The weights by name, mutably: `centres`, then `projections`.
    pub(crate) fn weights_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![("centres", &mut self.centres)];
        if let Some(p) = self.projections.as_mut() {
            v.push(("projections", p));
        }
        v
    }

    /// Plain SGD on the head's weights: `w ← w − lr·g` for the centres and
    /// projections.
    pub fn sgd_step(&mut self, grads: &HeadGrads, lr: f32) -> Result<()> {
        const OP: &str = "CodeHead::sgd_step";
        let (d, dp, v, l) = (self.cfg.dim, self.cfg.dp(), self.cfg.vocab, self.cfg.length);
        if grads.centres.shape() != self.centres.shape()
            || grads.projections.as_ref().map(|p| p.shape()) != self.projections.as_ref().map(|p| p.shape())
        {
            return Err(Error::invalid(OP, "gradients do not match the head"));
        }
        let g = grads.centres.view(&[l * v, dp])?;
        self.centres.view_mut(&[l * v, dp], |w| axpy_rows(w, None, &g, -lr))?;
        if let (Some(p), Some(g)) = (self.projections.as_mut(), grads.projections.as_ref()) {
            let g = g.view(&[l * dp, d])?;
            p.view_mut(&[l * dp, d], |w| axpy_rows(w, None, &g, -lr))?;
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
        let (dp, v, l) = (self.cfg.dp(), self.cfg.vocab, self.cfg.length);
        let flat = self.centres.view(&[l * v, dp])?;
        let unit = rowwise::l2_normalize(&flat, EPS)?.0;
        drop(flat);
        self.centres = unit.reshape(&[l, v, dp])?;
        Ok(())
    }
}

/// λ uploaded for the kernels (GPU backends, when configured).
fn device_lambdas(cfg: &CodeHeadConfig, device: &Device) -> Result<Option<DeviceBuffer>> {
    match (&cfg.lambdas, device.runs_kernels()) {
        (Some(l), true) => Ok(Some(device.upload(bytemuck::cast_slice(l))?)),
        _ => Ok(None),
    }
}

/// One f32 vector per position.
type PerPosition = Vec<Vec<f32>>;

/// An f32-or-bf16 operand as the kernels take it: one pointer null.
fn f32_or_bf16(t: &Tensor) -> Result<(Ptr<f32>, Ptr<half::bf16>)> {
    Ok(match t.dtype() {
        DType::F32 => (t.ptr()?, Ptr::null()),
        _ => (Ptr::null(), t.ptr()?),
    })
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
        let mut all_right = vec![true; b];
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
                all_right[s] &= row.correct;
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
        (
            HeadLoss::from_parts(per_position, regression, accuracy, &all_right),
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
        let mut all_right = vec![true; b];
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
                all_right[s] &= r.correct;
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
        (
            HeadLoss::from_parts(per_position, regression, accuracy, &all_right),
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
