//! What one training step of each head costs by construction on a GPU
//! backend, before any GPU runs it: kernel launches (the counts
//! tests/step_counts.rs measures on the simulator), floating-point
//! operations, and the bytes the kernels move through device memory, as a
//! model: every operand read once and every result written once
//! (compulsory traffic; re-reads that L1 or L2 serve are not counted,
//! atomic updates count as one write). Their ratio, the arithmetic
//! intensity, places a step against a GPU's ridge point (peak FLOP/s over
//! memory bandwidth): below it a step is bound by memory, above it by
//! arithmetic. docs/performance.md tabulates them (scripts/efficiency-table).

/// Launches, FLOPs and bytes of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCost {
    /// Kernel launches.
    pub launches: u64,
    /// Floating-point operations (a multiply-add is 2).
    pub flops: f64,
    /// Bytes read and written in device memory (the model above).
    pub bytes: f64,
}

impl StepCost {
    /// FLOPs per byte.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }
}

/// A GPU's peaks, from its data sheet: what a modeled step is bounded by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Card {
    /// Its name in the tables.
    pub name: &'static str,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// fp32 SIMT peak, FLOP/s.
    pub fp32: f64,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub bf16_tensor: f64,
}

impl Card {
    /// The ridge points, FLOP/byte: (fp32 SIMT, bf16 tensor cores).
    pub fn ridges(&self) -> (f64, f64) {
        (self.fp32 / self.bandwidth, self.bf16_tensor / self.bandwidth)
    }

    /// The fastest a step of `c` can run, seconds: max(FLOPs / peak,
    /// bytes / bandwidth), at the peak of the tensor cores (`tensor`) or
    /// of the SIMT units.
    pub fn bound(&self, c: &StepCost, tensor: bool) -> f64 {
        self.arithmetic_time(c, tensor).max(c.bytes / self.bandwidth)
    }

    /// Whether moving `c`'s bytes takes longer than its arithmetic
    /// (its intensity is below the ridge point of the units it runs on).
    pub fn memory_bound(&self, c: &StepCost, tensor: bool) -> bool {
        c.bytes / self.bandwidth > self.arithmetic_time(c, tensor)
    }

    fn arithmetic_time(&self, c: &StepCost, tensor: bool) -> f64 {
        c.flops / if tensor { self.bf16_tensor } else { self.fp32 }
    }
}

/// The NVIDIA H100 SXM (80 GB HBM3): 3.35 TB/s, 67 TFLOP/s fp32, 989
/// TFLOP/s dense bf16 (its data sheet).
pub const H100_SXM: Card = Card { name: "H100", bandwidth: 3.35e12, fp32: 67e12, bf16_tensor: 989e12 };

/// The NVIDIA H200 SXM (141 GB HBM3e): the H100's chip and arithmetic
/// peaks with 4.8 TB/s of memory bandwidth (its data sheet), so its ridge
/// points are lower: a memory-bound step gains up to 1.43x over an H100,
/// an arithmetic-bound one nothing.
pub const H200_SXM: Card = Card { name: "H200", bandwidth: 4.8e12, fp32: 67e12, bf16_tensor: 989e12 };

/// Bytes of an element: 4 for f32, 2 for bf16 (the `bf16` flags below).
fn size(bf16: bool) -> f64 {
    if bf16 {
        2.0
    } else {
        4.0
    }
}

/// The shape and precision of a code-head step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CodeStep {
    /// Batch B.
    pub batch: usize,
    /// Embedding size d.
    pub dim: usize,
    /// Vocabulary v.
    pub vocab: usize,
    /// Code length l.
    pub length: usize,
    /// The projection's d_p, if any.
    pub projection: Option<usize>,
    /// bf16 features (else f32).
    pub bf16_features: bool,
    /// bf16 centres and projections (else f32).
    pub bf16_weights: bool,
    /// The code-vector table's element size when γ ≠ 0: Some(bf16?).
    pub table_bf16: Option<bool>,
    /// The exact ArcFace gradient (2B rows into the centre gradient).
    pub singular: bool,
    /// Labels already on the device (else uploaded).
    pub device_labels: bool,
}

/// One [`crate::head::CodeHead::forward_backward_into`] step on a GPU
/// backend (kernels/code_head.cu), code vectors on the device.
pub fn code_head(c: &CodeStep) -> StepCost {
    let (b, d, v, l) = (c.batch as f64, c.dim as f64, c.vocab as f64, c.length as f64);
    let dp = c.projection.unwrap_or(c.dim) as f64;
    let (fb, wb) = (size(c.bf16_features), size(c.bf16_weights));
    let r = if c.singular { 2.0 * b } else { b };
    // Centre-gradient slices, as code_head.rs picks them.
    let slices = (c.batch * if c.singular { 2 } else { 1 }).div_ceil(128).clamp(1, 16) as f64;
    let proj = c.projection.is_some();
    let mixed = proj && c.bf16_features != c.bf16_weights;
    let mut launches = 5;
    let mut flops = 0.0;
    // Labels: read, checked, mapped through the codes to l·B tokens.
    let mut bytes = b * 4.0 + b * 4.0 + l * b * (2.0 + 4.0) + if c.device_labels { b * 4.0 } else { 0.0 };
    // The centres' normalization (Ŵ f32 and the norms).
    bytes += l * v * dp * (wb + 4.0) + l * v * 4.0;
    flops += 3.0 * l * v * dp;
    if mixed {
        // The bf16 operand widened: read 2, write 4 bytes per element.
        launches += 1;
        bytes += 6.0 * if c.bf16_features { b * d } else { l * dp * d };
    }
    let gemm_bytes = if proj && !mixed { fb } else { 4.0 };
    let dz_bytes = if proj && c.bf16_features && c.bf16_weights { 2.0 } else { 4.0 };
    if proj {
        // Z = X·Pᵀ.
        launches += 1;
        flops += 2.0 * b * l * dp * d;
        bytes += b * d * gemm_bytes + l * dp * d * gemm_bytes + b * l * dp * 4.0;
    }
    // The fused step: the regression term, then l positions.
    let table = c.table_bf16.map_or(0.0, size);
    flops += b * (6.0 * d) + b * l * (4.0 * v + 9.0) * dp;
    bytes += b * d * fb + b * d * table + l * v * dp * 4.0 + (l + 1.0) * b * 4.0;
    if proj {
        bytes += b * l * dp * 4.0 + b * l * dp * dz_bytes;
    }
    bytes += l * r * (dp + v) * 4.0 + b * d * 4.0 + (2.0 * l + 1.0) * b * 4.0;
    // The centre gradient: split sums, then their sum through the normalization.
    flops += 2.0 * l * r * v * dp + (slices + 4.0) * l * v * dp;
    bytes += l * r * (dp + v) * 4.0 + 2.0 * slices * l * v * dp * 4.0 + 2.0 * l * v * dp * 4.0 + l * v * 4.0;
    if proj {
        // dP = dZᵀ·X and dX += dZ·P.
        launches += 2;
        flops += 4.0 * b * l * dp * d;
        let g = if dz_bytes == 2.0 { 2.0 } else { 4.0 };
        bytes +=
            (b * l * dp * g + b * d * g + l * dp * d * 4.0) + (b * l * dp * g + l * dp * d * g + 2.0 * b * d * 4.0);
    }
    StepCost { launches, flops, bytes }
}

/// The shape and precision of a full-softmax or Partial FC step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxStep {
    /// Batch B.
    pub batch: usize,
    /// Classes N.
    pub classes: usize,
    /// Embedding size d.
    pub dim: usize,
    /// bf16 features (else f32).
    pub bf16_features: bool,
    /// bf16 centres (else f32).
    pub bf16_weights: bool,
    /// An angular margin (ArcFace, the default): the target angles' pass.
    pub angular: bool,
    /// The bf16 tensor-core path (`SoftmaxHeadConfig::tensor_cores`) with
    /// this chunk setting (`SoftmaxHeadConfig::chunk`), instead of the
    /// fused fp32 SIMT kernels.
    pub tensor_cores: Option<Option<usize>>,
    /// Labels already on the device (else uploaded).
    pub device_labels: bool,
}

/// The fused full margin softmax over `n` classes (kernels/softmax_head.cu),
/// without the label handling.
fn fused(b: f64, n: f64, d: f64, fb: f64, wb: f64, angular: bool) -> (u64, f64, f64) {
    // Features normalized (U f32), the centre norms, the forward over class
    // tiles (partials), the merge, the backward (recomputed tile, dU and dŴ),
    // the centres' finish, the features' gradient through the normalization.
    let bytes = b * d * (fb + 4.0)
        + n * d * wb
        + n * 4.0
        + n * d * wb
        + b * 64.0
        + b * 32.0
        + n * d * wb
        + b * d * 4.0 * 2.0
        + n * d * 4.0
        + n * d * (4.0 + wb + 4.0)
        + b * d * 4.0 * 3.0;
    let flops = 8.0 * b * n * d + 2.0 * b * n + 3.0 * n * d + 6.0 * n * d + 9.0 * b * d;
    // The target angles from the raw vectors (f64).
    let (angle_bytes, angle_flops) = if angular { (b * d * (fb + wb) + b * 8.0, 8.0 * b * d) } else { (0.0, 0.0) };
    (7 + u64::from(angular), flops + angle_flops, bytes + angle_bytes)
}

/// The tensor-core path over `n` classes in chunks: per chunk the logits'
/// GEMM twice (written f32, read by the reductions), the bf16 gradients
/// (written, read by the two backward GEMMs), the features' bf16 copy read
/// by three GEMMs, dU read and written by one; the centres read three times.
fn chunked(b: usize, n: usize, d: f64, fb: f64, angular: bool, chunk: Option<usize>) -> (u64, f64, f64) {
    let chunk = crate::head::softmax_head::tc_chunk(chunk, b, n);
    let chunks = n.div_ceil(chunk) as f64;
    let (bf, nf) = (b as f64, n as f64);
    let mut bytes = bf * d * (fb + 4.0 + 4.0 + 2.0) + nf * d * 2.0 + nf * 4.0;
    bytes += 2.0 * bf * nf * (4.0 + 4.0) + bf * nf * 2.0 * 2.0 * 2.0;
    bytes += chunks * (3.0 * bf * d * 2.0 + 2.0 * bf * d * 4.0) + 3.0 * nf * d * 2.0 + nf * d * 4.0;
    bytes += bf * 64.0 + nf * d * (4.0 + 2.0 + 4.0) + bf * d * 4.0 * 3.0;
    let mut flops = 8.0 * bf * nf * d + 3.0 * bf * nf + 9.0 * nf * d + 9.0 * bf * d;
    let mut launches = 6 + 6 * n.div_ceil(chunk) as u64;
    if angular {
        launches += 1;
        bytes += bf * d * (4.0 + 2.0) + bf * 8.0;
        flops += 8.0 * bf * d;
    }
    (launches, flops, bytes)
}

/// One [`crate::head::SoftmaxHead::forward_backward_into`] step on a GPU
/// backend (the straight-through gradient: no singular pass).
pub fn full_softmax(s: &SoftmaxStep) -> StepCost {
    let (b, n, d) = (s.batch as f64, s.classes as f64, s.dim as f64);
    let (launches, flops, mut bytes) = match s.tensor_cores {
        Some(chunk) => chunked(s.batch, s.classes, d, size(s.bf16_features), s.angular, chunk),
        None => fused(b, n, d, size(s.bf16_features), size(s.bf16_weights), s.angular),
    };
    bytes += if s.device_labels { b * 12.0 } else { b * 4.0 };
    StepCost { launches: launches + u64::from(s.device_labels), flops, bytes }
}

/// One [`crate::head::PartialFc::forward_backward_into`] step on a GPU
/// backend with a sample of `k ≥ B` classes (the path without a host wait).
pub fn partial_fc(s: &SoftmaxStep, k: usize) -> StepCost {
    let (b, n, d, kf) = (s.batch as f64, s.classes as f64, s.dim as f64, k as f64);
    let (launches, flops, mut bytes) = match s.tensor_cores {
        // The sampled rows gathered once (read and written in bf16).
        Some(chunk) => {
            let (l, f, by) = chunked(s.batch, k, d, size(s.bf16_features), s.angular, chunk);
            (l + 1, f, by + kf * d * 4.0 + kf * 4.0)
        }
        None => fused(b, kf, d, size(s.bf16_features), size(s.bf16_weights), s.angular),
    };
    let k = kf;
    // The sample: the positive flags zeroed and marked, two radix passes
    // over the flags (and histograms of 65536 bins), the count, the scan,
    // the ordered write, the labels' binary search; the row map read by the
    // fused step.
    bytes += n * 4.0 + b * 8.0 + 2.0 * (n * 4.0 + 65536.0 * 4.0 * 2.0) + n * 4.0 + n * 4.0 + k * 4.0;
    bytes += b * (4.0 + 4.0 * k.log2().ceil() + 4.0) + 2.0 * k * 4.0;
    bytes += if s.device_labels { b * 12.0 } else { b * 4.0 };
    let flops = flops + 3.0 * n;
    StepCost { launches: launches + 9 + u64::from(s.device_labels), flops, bytes }
}
