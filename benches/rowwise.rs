//! Row operations (kernels/rowwise.cu) on the CPU and, when present, a GPU.
//! Memory-bound: the table reports GB/s against the minimal traffic (each
//! input read once, each output written once).
//!
//! Run: `cargo bench --bench rowwise` (add `-- --quick`-style criterion
//! flags to shorten it).

mod common;

use criterion::{BenchmarkId, Throughput};
use gif_fr::ops::rowwise;
use gif_fr::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn input(dev: &Device, rows: usize, cols: usize, dtype: DType) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
    Tensor::from_f32(dev, &[rows, cols], &x, dtype).expect("upload")
}

fn main() {
    let mut c = common::criterion();
    // Embedding normalization (d = 512), GIF's per-position softmax
    // (v = 16, batch 4096 x l = 8 positions), and a long row.
    let shapes = [(4096usize, 512usize), (32768, 16), (256, 65536)];
    for dev in common::devices() {
        for dtype in [DType::F32, DType::BF16] {
            let mut g = c.benchmark_group(format!("rowwise/{}/{:?}", common::label(&dev), dtype));
            for &(rows, cols) in &shapes {
                let x = input(&dev, rows, cols, dtype);
                let n = (rows * cols) as f64;
                let es = dtype.size() as f64;
                let shape = format!("{rows}x{cols}");
                // Warm-up outside timing: module load (and NVRTC) on a GPU.
                rowwise::softmax(&x).expect("softmax");
                rowwise::l2_normalize(&x, 1e-12).expect("l2_normalize");

                let bytes = 2.0 * n * es;
                g.throughput(Throughput::Bytes(bytes as u64));
                let case = format!("softmax {dtype:?} {shape}");
                g.bench_function(BenchmarkId::new("softmax", &shape), |b| {
                    b.iter_custom(|iters| {
                        common::timed(&dev, &case, bytes, 0.0, iters, || rowwise::softmax(&x).map(drop))
                    })
                });
                let bytes = 2.0 * n * es + 4.0 * rows as f64;
                g.throughput(Throughput::Bytes(bytes as u64));
                let case = format!("l2_normalize {dtype:?} {shape}");
                g.bench_function(BenchmarkId::new("l2_normalize", &shape), |b| {
                    b.iter_custom(|iters| {
                        common::timed(&dev, &case, bytes, 0.0, iters, || rowwise::l2_normalize(&x, 1e-12).map(drop))
                    })
                });
            }
            g.finish();
        }
    }
    c.final_summary();
    common::print_summary("rowwise");
}
