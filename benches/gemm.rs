//! GEMM throughput (kernels/gemm.cu), GFLOP/s = 2·M·N·K / time.
//!
//! - CPU: the `gemm` crate (f32; bf16 widened to f32) at 256..1024.
//! - GPU, when present: square sizes 256..8192, gif-fr's fp32 SIMT and bf16
//!   tensor-core kernels next to cuBLAS on the same inputs in the same run
//!   (cublasSgemm with TF32 off; cublasGemmEx bf16 -> f32), timed with
//!   events on the device's stream after a warm-up, and the ratio printed.
//!
//! Run: `cargo bench --bench gemm`.

mod common;

use criterion::{BenchmarkId, Throughput};
use gif_fr::ops::gemm::{self, Op};
use gif_fr::{DType, Device, DeviceKind, Tensor};
use rand::{Rng, SeedableRng};

fn operands(dev: &Device, n: usize, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    let mut data = |len: usize| (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
    let a = Tensor::from_f32(dev, &[n, n], &data(n * n), dtype).expect("upload A");
    let b = Tensor::from_f32(dev, &[n, n], &data(n * n), dtype).expect("upload B");
    let c = Tensor::from_f32(dev, &[n, n], &data(n * n), DType::F32).expect("upload C");
    (a, b, c)
}

fn main() {
    let mut c = common::criterion();
    let mut gpu_sizes = Vec::new();
    for dev in common::devices() {
        let gpu = dev.kind() == DeviceKind::Cuda;
        let label = common::label(&dev);
        let sizes: &[usize] = if gpu { &[256, 512, 1024, 2048, 4096, 8192] } else { &[256, 512, 1024] };
        let cublas_ok = gpu && {
            let (a, b, mut cc) = operands(&dev, 64, DType::F32);
            match gemm::cublas_gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut cc) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("no cuBLAS baseline: {e}");
                    false
                }
            }
        };
        for dtype in [DType::F32, DType::BF16] {
            let mut g = c.benchmark_group(format!("gemm/{label}/{dtype:?}"));
            for &n in sizes {
                if gpu {
                    gpu_sizes.push(n);
                }
                let (a, b, mut out) = operands(&dev, n, dtype);
                let flops = 2.0 * (n as f64).powi(3);
                let bytes = 2.0 * (n * n * dtype.size()) as f64 + 4.0 * (n * n) as f64;
                g.throughput(Throughput::Elements(flops as u64));
                // Warm-up outside timing (module load, cuBLAS heuristics).
                gemm::gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut out).expect("gemm");
                let case = format!("{dtype:?} {n}^3 gif-fr");
                g.bench_function(BenchmarkId::new("gif-fr", n), |bch| {
                    bch.iter_custom(|iters| {
                        common::timed(&dev, &case, bytes, flops, iters, || {
                            gemm::gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut out)
                        })
                    })
                });
                if cublas_ok {
                    gemm::cublas_gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut out).expect("cublas");
                    let case = format!("{dtype:?} {n}^3 cuBLAS");
                    g.bench_function(BenchmarkId::new("cuBLAS", n), |bch| {
                        bch.iter_custom(|iters| {
                            common::timed(&dev, &case, bytes, flops, iters, || {
                                gemm::cublas_gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut out)
                            })
                        })
                    });
                }
            }
            g.finish();
        }
        if gpu {
            gpu_sizes.sort_unstable();
            gpu_sizes.dedup();
            println!("\n### gemm on {label}: gif-fr / cuBLAS (TFLOP/s)\n");
            println!("| size | f32 gif-fr | f32 cuBLAS | ratio | bf16 gif-fr | bf16 cuBLAS | ratio |");
            println!("|---|---|---|---|---|---|---|");
            for &n in &gpu_sizes {
                let tf =
                    |case: String| common::mean_seconds(&case, &label).map(|s| 2.0 * (n as f64).powi(3) / s / 1e12);
                let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) => format!("{:.0}%", 100.0 * a / b),
                    _ => "-".into(),
                };
                let (f, fc) = (tf(format!("F32 {n}^3 gif-fr")), tf(format!("F32 {n}^3 cuBLAS")));
                let (h, hc) = (tf(format!("BF16 {n}^3 gif-fr")), tf(format!("BF16 {n}^3 cuBLAS")));
                println!(
                    "| {n} | {} | {} | {} | {} | {} | {} |",
                    cell(f),
                    cell(fc),
                    ratio(f, fc),
                    cell(h),
                    cell(hc),
                    ratio(h, hc)
                );
            }
        }
    }
    c.final_summary();
    common::print_summary("gemm");
}
