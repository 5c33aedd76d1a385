//! Identification over valid codes (kernels/decode.cu, src/decode.rs):
//! queries per second of exact top-k, beam search (W = 16, with its recall
//! against exact) and brute-force
//! scoring of all N codes, for N from 2^10 to 2^24 (v = 16), B ∈ {1, 64,
//! 4096}, k ∈ {1, 5}. Codes are synthesized (distinct, spread over the code
//! space); each query's log-probabilities favour a random identity's tokens
//! (+4 on its logits, others standard normal). Brute force runs for B <= 64
//! and N <= 2^21 (beyond, it takes minutes per sample on a CPU). The O(N)
//! cosine top-k against N centres joins when the softmax head lands.
//!
//! Run: `cargo bench --bench decode`.

mod common;

use criterion::BenchmarkId;
use gif_fr::decode::{Mode, PrefixDecoder};
use gif_fr::Tensor;

use common::codes::V;

fn main() {
    let mut c = common::criterion();
    let mut rows = Vec::new();
    let mut recall = std::collections::HashMap::new();
    for dev in common::devices() {
        let label = common::label(&dev);
        let mut g = c.benchmark_group(format!("decode/{label}"));
        for log2n in [10usize, 14, 18, 21, 24] {
            let book = common::codes::codebook(1 << log2n);
            let dec = PrefixDecoder::new(&book, &dev).expect("decoder");
            for b in [1usize, 64, 4096] {
                let lp = common::codes::queries(&book, b, log2n as u64);
                let t = Tensor::from_slice(&dev, &[b, book.length() * V], &lp).expect("upload");
                for k in [1usize, 5] {
                    // Beam recall against exact: the share of exact top-k ids the beam also returns.
                    let exact = dec.top_k(&t, k, Mode::Exact, None).expect("exact");
                    let beam = dec.top_k(&t, k, Mode::Beam(16), None).expect("beam");
                    let hit: usize = exact
                        .ids
                        .chunks(k)
                        .zip(beam.ids.chunks(k))
                        .map(|(e, b)| e.iter().filter(|i| b.contains(i)).count())
                        .sum();
                    recall.insert((label.clone(), log2n, b, k), hit as f64 / exact.ids.len() as f64);
                    let mut methods: Vec<&str> = vec!["exact", "beam16"];
                    if b <= 64 && log2n <= 21 && dev.kind() == gif_fr::DeviceKind::Cpu {
                        methods.push("brute");
                    }
                    for m in methods {
                        let case = format!("{m} N=2^{log2n} B={b} k={k}");
                        let run = || -> gif_fr::Result<()> {
                            match m {
                                "exact" => dec.top_k(&t, k, Mode::Exact, None).map(drop),
                                "beam16" => dec.top_k(&t, k, Mode::Beam(16), None).map(drop),
                                _ => dec.brute_force(&lp, k).map(drop),
                            }
                        };
                        let mut run = run;
                        run().expect("warm-up");
                        g.bench_function(BenchmarkId::new(format!("{m}/B{b}/k{k}"), format!("2^{log2n}")), |bch| {
                            bch.iter_custom(|iters| common::timed(&dev, &case, 0.0, 0.0, iters, &mut run))
                        });
                        rows.push((label.clone(), m, log2n, b, k));
                    }
                }
            }
        }
        g.finish();
    }
    c.final_summary();
    println!("\n### decoder throughput (queries/s), v = {V}\n");
    println!("| device | N | B | k | exact | beam W=16 | beam recall | brute force | exact / brute |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut done = std::collections::HashSet::new();
    for (dev, _, log2n, b, k) in &rows {
        if !done.insert((dev.clone(), *log2n, *b, *k)) {
            continue;
        }
        let qps = |m: &str| common::mean_seconds(&format!("{m} N=2^{log2n} B={b} k={k}"), dev).map(|s| *b as f64 / s);
        let cell = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3e}"));
        let (e, bm, bf) = (qps("exact"), qps("beam16"), qps("brute"));
        let ratio = match (e, bf) {
            (Some(e), Some(bf)) => format!("{:.0}x", e / bf),
            _ => "-".into(),
        };
        let rc = recall.get(&(dev.clone(), *log2n, *b, *k)).map_or("-".to_string(), |r| format!("{r:.4}"));
        println!("| {dev} | 2^{log2n} | {b} | {k} | {} | {} | {rc} | {} | {ratio} |", cell(e), cell(bm), cell(bf));
    }
    common::print_summary("decode");
}
