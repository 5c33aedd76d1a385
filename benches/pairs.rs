//! All-pairs verification scoring (src/eval/pairs.rs, kernels/pairs.cu):
//! every pair of a gallery of n unit embeddings (d = 512) scored by tiles
//! of GEMM and counted into 4,096-bin histograms, in pairs/s. The CPU
//! scores a 4,096-image gallery (8.4M pairs); a GPU the 10^5-image
//! open-set gallery (5·10^9 pairs) in tiles of 4,096 × 4,096.
//!
//! Run: `cargo bench --bench pairs`.

mod common;

use gif_fr::eval::pairs::{all_pairs_histogram, DEFAULT_TILE, MAX_BINS};
use gif_fr::{DType, Tensor};

fn main() {
    let mut c = common::criterion();
    let d = 512;
    let mut rows = Vec::new();
    for dev in common::devices() {
        let n = if dev.kind() == gif_fr::DeviceKind::Cpu { 4096 } else { 100_000 };
        let ids = n / 10;
        let mut r = common_rng(n as u64);
        let emb = unit_rows(&mut r, n, d);
        let labels: Vec<u32> = (0..n).map(|i| (i % ids) as u32).collect();
        let t = match Tensor::from_f32(&dev, &[n, d], &emb, DType::F32) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipping {dev}: {e}");
                continue;
            }
        };
        let pairs = (n as f64) * (n as f64 - 1.0) / 2.0;
        let case = format!("all pairs of {n} x {d}, {MAX_BINS} bins");
        // The GEMM's multiply-adds: the upper triangle of tiles (diagonal
        // tiles whole).
        let tiles = n.div_ceil(DEFAULT_TILE) as f64;
        let flops = 2.0 * (tiles * (tiles + 1.0) / 2.0) * (DEFAULT_TILE.min(n) as f64).powi(2) * d as f64;
        let mut g = c.benchmark_group(format!("pairs/{}", common::label(&dev)));
        g.sample_size(10);
        g.sampling_mode(criterion::SamplingMode::Flat);
        let mut one = || all_pairs_histogram(&t, &labels, MAX_BINS, DEFAULT_TILE).map(drop);
        g.bench_function(format!("n={n}"), |b| {
            b.iter_custom(|iters| common::timed(&dev, &case, (n * d * 4) as f64, flops, iters, &mut one))
        });
        g.finish();
        rows.push((case, common::label(&dev), pairs));
    }
    c.final_summary();
    println!("\n### all-pairs scoring, pairs/s\n");
    println!("| case | device | mean per call | pairs/s |");
    println!("|---|---|---|---|");
    for (case, dev, pairs) in rows {
        if let Some(s) = common::mean_seconds(&case, &dev) {
            println!("| {case} | {dev} | {:.3} s | {:.3e} |", s, pairs / s);
        }
    }
    common::print_summary("pairs");
}

fn common_rng(seed: u64) -> rand::rngs::StdRng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// Seeded unit rows (Gaussian directions).
fn unit_rows(r: &mut rand::rngs::StdRng, n: usize, d: usize) -> Vec<f32> {
    use rand::Rng;
    let mut v = Vec::with_capacity(n * d);
    for _ in 0..n {
        let row: Vec<f32> = (0..d).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.extend(row.iter().map(|x| x / norm));
    }
    v
}
