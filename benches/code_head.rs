//! The GIF code head's training step (forward + backward) as the number of
//! identities N grows from 2^10 to 2^24: l = ceil(log_16 N) positions of a
//! 16-way margin softmax, so the time should grow like l, not like N.
//! B ∈ {64, 512}, d = 512, ArcFace, no projection; codes are synthesized
//! (the base-16 digits of the identity). The code-vector table (N x d f32)
//! is used while it is at most 512 MiB; beyond, γ = 0 (said in the output).
//!
//! Run: `cargo bench --bench code_head`.

mod common;

use criterion::BenchmarkId;
use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable};
use gif_fr::{DType, Tensor};
use rand::{Rng, SeedableRng};

const D: usize = 512;
const V: usize = 16;
const TABLE_LIMIT: usize = 512 << 20;

fn main() {
    let mut c = common::criterion();
    let mut rows: Vec<(String, usize, usize, usize, bool)> = Vec::new();
    for dev in common::devices() {
        let label = common::label(&dev);
        let mut g = c.benchmark_group(format!("code_head/{label}"));
        for log2n in (10..=24).step_by(2) {
            let n = 1usize << log2n;
            let l = gif_fr::tokenizer::min_length(V, n).expect("V >= 2");
            let codes: Vec<u16> = (0..n).flat_map(|i| (0..l).map(move |j| ((i >> (4 * j)) & 15) as u16)).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(log2n as u64);
            let with_table = n * D * 4 <= TABLE_LIMIT;
            let table_values: Vec<f32> =
                if with_table { (0..n * D).map(|_| rng.random_range(-1.0f32..1.0)).collect() } else { Vec::new() };
            let table = CodeTable::new(&dev, codes, l, V, with_table.then_some((&table_values[..], D, DType::F32)))
                .expect("table");
            drop(table_values);
            let cfg = CodeHeadConfig { gamma: if with_table { 1.0 } else { 0.0 }, ..CodeHeadConfig::new(D, l, V) };
            if !with_table {
                println!(
                    "N = 2^{log2n}: the code-vector table ({} GiB) is not materialized: gamma = 0",
                    (n * D * 4) >> 30
                );
            }
            let head = CodeHead::new(cfg, &dev, 1).expect("head");
            for b in [64usize, 512] {
                let x: Vec<f32> = (0..b * D).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let xt = Tensor::from_slice(&dev, &[b, D], &x).expect("features");
                let labels: Vec<u32> = (0..b).map(|_| rng.random_range(0..n as u32)).collect();
                head.forward_backward(&xt, &labels, &table).expect("warm-up");
                let case = format!("B={b} N=2^{log2n} l={l}");
                let flops = (b * l * (2 * V * D * 3)) as f64;
                g.bench_function(BenchmarkId::new(format!("B{b}"), format!("2^{log2n}")), |bch| {
                    bch.iter_custom(|iters| {
                        common::timed(&dev, &case, 0.0, flops, iters, || {
                            head.forward_backward(&xt, &labels, &table).map(drop)
                        })
                    })
                });
                rows.push((label.clone(), b, log2n, l, with_table));
            }
        }
        g.finish();
    }
    c.final_summary();
    println!("\n### code head forward+backward vs N (d = {D}, v = {V})\n");
    println!("| device | B | N | l | gamma | time per step | time / l |");
    println!("|---|---|---|---|---|---|---|");
    for (dev, b, log2n, l, table) in rows {
        if let Some(s) = common::mean_seconds(&format!("B={b} N=2^{log2n} l={l}"), &dev) {
            println!(
                "| {dev} | {b} | 2^{log2n} | {l} | {} | {:.3} ms | {:.3} ms |",
                if table { 1 } else { 0 },
                s * 1e3,
                s * 1e3 / l as f64
            );
        }
    }
    common::print_summary("code_head");
}
