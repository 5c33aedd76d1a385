//! The heads as the benches run them: one training step (forward +
//! backward) of the full margin softmax, Partial FC or the GIF code head at
//! (N, B, d), the analytical multiply-adds and weights of each, and the peak
//! extra memory of a step (the device's allocation meter on a GPU, a
//! counting global allocator on the CPU).

use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, PartialFc, SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::runtime::host_memory::{self, CountingAllocator};
use gif_fr::{DType, Device, DeviceKind, Result, Tensor};
use rayon::prelude::*;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A head of the study.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// The full margin softmax: fp32 SIMT fully fused (f32), or bf16 on the
    /// tensor cores in chunks (`SoftmaxHeadConfig::tensor_cores`).
    Full { bf16: bool },
    /// Partial FC with this sample rate, in either precision.
    Pfc { rate: f32, bf16: bool },
    /// The GIF code head (v = 16), with or without per-position
    /// projections; bf16: features, weights and code vectors in bf16.
    Code { projection: bool, bf16: bool },
}

pub use super::codes::V;

/// The name suffix of a precision.
fn tag(bf16: bool) -> &'static str {
    if bf16 {
        " (bf16)"
    } else {
        ""
    }
}

/// Every head of the study in one precision.
pub fn kinds(bf16: bool) -> [Kind; 5] {
    [
        Kind::Full { bf16 },
        Kind::Pfc { rate: 0.1, bf16 },
        Kind::Pfc { rate: 0.3, bf16 },
        Kind::Code { projection: false, bf16 },
        Kind::Code { projection: true, bf16 },
    ]
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Full { bf16 } => format!("full softmax{}", tag(bf16)),
            Kind::Pfc { rate, bf16 } => format!("partial fc r={rate}{}", tag(bf16)),
            Kind::Code { projection: false, bf16 } => format!("code head{}", tag(bf16)),
            Kind::Code { projection: true, bf16 } => format!("code head + proj{}", tag(bf16)),
        }
    }

    /// Multiply-adds of one step (forward + backward, the textbook count:
    /// three products of the logits' size).
    pub fn macs(self, n: usize, b: usize, d: usize) -> f64 {
        let (n, b, d) = (n as f64, b as f64, d as f64);
        match self {
            Kind::Full { .. } => 3.0 * b * n * d,
            Kind::Pfc { rate, .. } => 3.0 * b * (rate as f64 * n).ceil().max(b.min(n)) * d,
            Kind::Code { projection, .. } => {
                let l = gif_fr::tokenizer::min_length(V, n as usize).expect("V >= 2") as f64;
                l * (3.0 * b * V as f64 * d + if projection { 3.0 * b * d * d } else { 0.0 })
            }
        }
    }

    /// Trainable weights.
    pub fn weights(self, n: usize, d: usize) -> usize {
        match self {
            Kind::Full { .. } | Kind::Pfc { .. } => n * d,
            Kind::Code { projection, .. } => {
                let l = gif_fr::tokenizer::min_length(V, n).expect("V >= 2");
                l * (V * d + if projection { d * d } else { 0 })
            }
        }
    }
}

/// `n` values uniform in [−a, a), fast and in parallel (benchmark weights:
/// their values only need to be generic).
pub fn fill(n: usize, a: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for x in chunk {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
        }
    });
    v
}

/// One step of `kind` at (n, b, d) on `dev`, ready to run repeatedly.
pub type Step = Box<dyn FnMut() -> Result<()>>;

/// A GPU keeps the bf16 code vectors in its memory up to this size; larger
/// tables stay in page-locked host memory, read in place by the kernel.
pub const DEVICE_TABLE_LIMIT: usize = 16 << 30;

/// The code table of n identities (codes: the base-16 digits of the
/// identity) with bf16 code vectors at every N: GIF's one O(N) state, never
/// dropped to fit (γ = 1 always). On a GPU the vectors live on the device
/// while they fit [`DEVICE_TABLE_LIMIT`], else on the host.
pub fn code_table(dev: &Device, n: usize, l: usize, d: usize, seed: u64) -> Result<CodeTable> {
    let codes: Vec<u16> = (0..n).flat_map(|i| (0..l).map(move |j| ((i >> (4 * j)) & 15) as u16)).collect();
    let count = n.checked_mul(d).expect("N·d fits in memory sizes");
    let values = fill(count, 0.05, seed);
    let vectors = (&values[..], d, DType::BF16);
    if dev.kind() == DeviceKind::Cpu || count * 2 <= DEVICE_TABLE_LIMIT {
        CodeTable::new(dev, codes, l, V, Some(vectors))
    } else {
        CodeTable::with_host_vectors(dev, codes, l, V, vectors)
    }
}

/// Where a table's code vectors are, for the printed tables.
pub fn table_place(dev: &Device, table: &CodeTable) -> &'static str {
    match table.vector_device() {
        Some(_) if dev.kind() == DeviceKind::Cpu => "host",
        Some(v) if v == dev => "device",
        Some(_) => "host",
        None => "none",
    }
}

/// Builds `kind` at (n, b, d): weights, a batch of features and labels; and
/// the bytes of the fixed data the step reads (the code head's code-vector
/// table; 0 for the O(N) heads, whose O(N) state is their weights).
pub fn prepare(dev: &Device, kind: Kind, n: usize, b: usize, d: usize) -> Result<(Step, usize)> {
    let bf16 = match kind {
        Kind::Full { bf16 } | Kind::Pfc { bf16, .. } | Kind::Code { bf16, .. } => bf16,
    };
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let x = Tensor::from_f32(dev, &[b, d], &fill(b * d, 1.0, 7), dtype)?;
    let labels: Vec<u32> = (0..b as u64).map(|i| ((i.wrapping_mul(0x9E37_79B9) >> 3) % n as u64) as u32).collect();
    match kind {
        Kind::Full { .. } | Kind::Pfc { .. } => {
            let w = Tensor::from_f32(dev, &[n, d], &fill(n * d, 1.0 / (d as f32).sqrt(), 3), dtype)?;
            // bf16 on a GPU: the tensor-core path (no effect on the CPU).
            let cfg = SoftmaxHeadConfig { tensor_cores: bf16, ..SoftmaxHeadConfig::new(d, n) };
            let head = SoftmaxHead::from_weights(cfg, w)?;
            if let Kind::Pfc { rate: r, .. } = kind {
                let pfc = PartialFc::new(head, r, 11)?;
                let mut step = 0u64;
                Ok((
                    Box::new(move || {
                        step += 1;
                        pfc.forward_backward(&x, &labels, step).map(drop)
                    }),
                    0,
                ))
            } else {
                Ok((Box::new(move || head.forward_backward(&x, &labels).map(drop)), 0))
            }
        }
        Kind::Code { projection, .. } => {
            let l = gif_fr::tokenizer::min_length(V, n).expect("V >= 2");
            let table = code_table(dev, n, l, d, 5)?;
            let bytes = table.vector_bytes();
            let cfg = CodeHeadConfig {
                projection: projection.then_some(d),
                weight_dtype: dtype,
                ..CodeHeadConfig::new(d, l, V)
            };
            let head = CodeHead::new(cfg, dev, 1)?;
            Ok((Box::new(move || head.forward_backward(&x, &labels, &table).map(drop)), bytes))
        }
    }
}

/// Peak bytes allocated beyond what was held before, over one call of `step`.
pub fn peak_extra(dev: &Device, step: &mut Step) -> Result<usize> {
    if dev.kind() == DeviceKind::Cpu {
        let before = host_memory::reset_peak();
        step()?;
        Ok(host_memory::stats().peak - before)
    } else {
        dev.synchronize()?;
        dev.reset_peak_memory();
        let before = dev.memory_stats().map_or(0, |m| m.current);
        step()?;
        dev.synchronize()?;
        Ok(dev.memory_stats().map_or(0, |m| m.peak) - before)
    }
}

/// One measured point of a sweep.
#[derive(Clone, Debug)]
pub struct Measured {
    pub device: String,
    pub kind: Kind,
    pub n: usize,
    pub b: usize,
    pub d: usize,
    /// Mean seconds per step.
    pub seconds: f64,
    /// Peak extra bytes of a step (including the gradients it returns).
    pub peak: usize,
    /// Bytes of the fixed data the step reads besides its weights (the code
    /// head's code-vector table).
    pub table: usize,
}

/// A step slower than this (the first, untimed one) is timed over 2 steps
/// without criterion, so that a CPU sweep to N = 2M stays within minutes.
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(500);

/// Criterion times `f` as `id`/`n` and records it as `case`; but when the
/// first (warm-up) call took longer than [`SLOW`], it is timed over 2 more
/// calls (1 beyond 5 s) outside criterion, as the output says. `first`: the
/// duration of a warm-up call already made, or None to make one here.
#[allow(clippy::too_many_arguments)]
pub fn bench_or_time(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    id: &str,
    n: usize,
    case: &str,
    flops: f64,
    first: Option<std::time::Duration>,
    f: &mut dyn FnMut() -> Result<()>,
) {
    let first = first.unwrap_or_else(|| {
        let t0 = std::time::Instant::now();
        f().unwrap_or_else(|e| panic!("{case}: {e}"));
        dev.synchronize().expect("synchronize");
        t0.elapsed()
    });
    if first > SLOW {
        let calls = if first.as_secs_f64() > 5.0 { 1 } else { 2 };
        println!("{case}: {:.2} s per call, timed over {calls} call(s) outside criterion", first.as_secs_f64());
        super::timed(dev, case, 0.0, flops, calls, f);
    } else {
        g.bench_function(criterion::BenchmarkId::new(id, n), |bch| {
            bch.iter_custom(|iters| super::timed(dev, case, 0.0, flops, iters, &mut *f))
        });
    }
}

/// Times every `kind` at every N (criterion group `group/<device>`), one head
/// alive at a time, and measures each one's peak extra memory.
pub fn sweep(
    c: &mut criterion::Criterion,
    group: &str,
    dev: &Device,
    kinds: &[Kind],
    ns: &[usize],
    b: usize,
    d: usize,
) -> Vec<Measured> {
    let label = super::label(dev);
    let mut out = Vec::new();
    let mut g = c.benchmark_group(format!("{group}/{label}"));
    // Flat sampling: 10 samples of equal iteration counts (linear sampling
    // would run at least 55 iterations of a slow step).
    g.sampling_mode(criterion::SamplingMode::Flat);
    for &n in ns {
        for &kind in kinds {
            let (mut step, table) = match prepare(dev, kind, n, b, d) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{} at N = {n} on {label}: skipped ({e})", kind.name());
                    continue;
                }
            };
            // The first call warms up and measures the peak memory.
            let t0 = std::time::Instant::now();
            let peak = peak_extra(dev, &mut step).unwrap_or_else(|e| panic!("{} N = {n}: {e}", kind.name()));
            let first = t0.elapsed();
            let case = format!("{} N={n} B={b}", kind.name());
            let flops = 2.0 * kind.macs(n, b, d);
            bench_or_time(&mut g, dev, &kind.name(), n, &case, flops, Some(first), &mut step);
            let seconds = super::mean_seconds(&case, &label).unwrap_or(f64::NAN);
            out.push(Measured { device: label.clone(), kind, n, b, d, seconds, peak, table });
        }
    }
    g.finish();
    out
}

/// Mebibytes.
pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
