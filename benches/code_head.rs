//! The GIF code head's training step (forward + backward) as the number of
//! identities N grows from 2^10 to 2^24: l = ceil(log_16 N) positions of a
//! 16-way margin softmax, so the time should grow like l, not like N.
//! B ∈ {64, 512}, d = 512, ArcFace, no projection, γ = 1; codes are
//! synthesized (the base-16 digits of the identity). The code-vector table
//! (N x d, bf16) is read at every N: on the device while it fits 16 GiB,
//! else resident in page-locked host memory the kernel reads in place (the table
//! says where). On the CPU, N whose table needs more than 12 GiB to
//! build (2^24) is skipped, as the output says, rather than run without it.
//!
//! Run: `cargo bench --bench code_head`.

mod common;

use common::heads::{code_table, table_place, V};
use criterion::BenchmarkId;
use gif_fr::head::{CodeHead, CodeHeadConfig};
use gif_fr::Tensor;
use rand::{Rng, SeedableRng};

const D: usize = 512;
/// Host memory the CPU sweep may spend on building a table (the
/// development machines have 16 to 32 GiB).
const HOST_TABLE_BUDGET: usize = 12 << 30;

fn main() {
    let mut c = common::criterion();
    let mut rows: Vec<(String, usize, usize, usize, &'static str, usize)> = Vec::new();
    for dev in common::devices() {
        let label = common::label(&dev);
        let mut g = c.benchmark_group(format!("code_head/{label}"));
        for log2n in (10..=24).step_by(2) {
            let n = 1usize << log2n;
            let l = gif_fr::tokenizer::min_length(V, n).expect("V >= 2");
            // Building the table holds N·d f32 values and their bf16 copy.
            if dev.kind() == gif_fr::DeviceKind::Cpu && n * D * 6 > HOST_TABLE_BUDGET {
                println!(
                    "N = 2^{log2n} skipped on the CPU: building its code-vector table needs {} GiB",
                    (n * D * 6) >> 30
                );
                continue;
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(log2n as u64);
            let table = code_table(&dev, n, l, D, log2n as u64).expect("table");
            let (place, bytes) = (table_place(&dev, &table), table.vector_bytes());
            let head = CodeHead::new(CodeHeadConfig::new(D, l, V), &dev, 1).expect("head");
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
                rows.push((label.clone(), b, log2n, l, place, bytes));
            }
        }
        g.finish();
    }
    c.final_summary();
    println!("\n### code head forward+backward vs N (d = {D}, v = {V})\n");
    println!("| device | B | N | l | code-vector table (bf16) | time per step | time / l |");
    println!("|---|---|---|---|---|---|---|");
    for (dev, b, log2n, l, place, bytes) in rows {
        if let Some(s) = common::mean_seconds(&format!("B={b} N=2^{log2n} l={l}"), &dev) {
            println!(
                "| {dev} | {b} | 2^{log2n} | {l} | {:.0} MiB on the {place} | {:.3} ms | {:.3} ms |",
                common::heads::mib(bytes),
                s * 1e3,
                s * 1e3 / l as f64
            );
        }
    }
    common::print_summary("code_head");
}
