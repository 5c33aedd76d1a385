//! docs/distributed.md's cost tables: bytes each rank moves per step and
//! memory per GPU for the code head (data-parallel) and the model-parallel
//! full softmax and Partial FC, W = 8 … 1024, N = 2^20 … 2^27, from
//! `gif_fr::distributed::cost` (whose data-parallel terms the MPI tests
//! check against the collectives' byte counts).
//!
//!     cargo run --release --example distributed_cost [r50|r100]

use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::distributed::cost::{largest_classes, step_cost, with_classes, Head, Setup};

fn main() -> gif_fr::Result<()> {
    let arch = std::env::args().nth(1).unwrap_or_else(|| "r100".into());
    let mut net = IResNet::new(IResNetConfig::arch(&arch)?, &gif_fr::Device::cpu(), 0)?;
    let params: u64 = net.params_mut().iter().map(|(_, t)| t.numel() as u64).sum();
    let (batch, dim) = (128, 512);
    let heads: [(&str, Head); 4] = [
        ("GIF (v = 16), data-parallel", Head::Code { length: 0, vocab: 16, projection: None }),
        ("full softmax, fused (gif-fr)", Head::Softmax { materialized_logits: false }),
        ("full softmax, logits materialized (insightface)", Head::Softmax { materialized_logits: true }),
        ("Partial FC r = 0.1", Head::PartialFc { rate: 0.1 }),
    ];
    let setup = |w: usize, n: u64, head: Head| {
        with_classes(&Setup { world: w, batch, dim, classes: n, backbone_params: params, optimizer_states: 1, head }, n)
    };
    let mb = |b: f64| b / 1e6;
    let gb = |b: f64| b / 1e9;
    println!("{arch}: {params} backbone parameters; B = {batch} per GPU, d = {dim}, SGD with momentum (f32 state)\n");
    println!("Bytes per step per GPU at N = 2^27 (MB; the same at every N but for GIF's l·v·d, 0.2 MB here):\n");
    println!("| head | W | all-reduced | all-gathered (own) | reduce-scattered | sent on the wire (ring) |");
    println!("|---|---|---|---|---|---|");
    // The model-parallel heads move the same bytes (features, labels,
    // per-sample values, the features' gradient): one row each W.
    let moving = [(heads[0].0, heads[0].1), ("full softmax or Partial FC, model-parallel", heads[1].1)];
    for (name, head) in moving {
        for w in [8, 64, 1024] {
            let c = step_cost(&setup(w, 1 << 27, head));
            println!(
                "| {name} | {w} | {:.1} | {:.3} | {:.1} | {:.1} |",
                mb(c.all_reduce_bytes as f64),
                mb(c.all_gather_bytes as f64),
                mb(c.reduce_scatter_bytes as f64),
                mb(c.wire_bytes)
            );
        }
    }
    println!(
        "\nThe head's memory per GPU (GB: weights, gradient, momentum, codes, logits; the backbone adds {:.2} GB):\n",
        gb(step_cost(&setup(8, 1, heads[0].1)).backbone_memory as f64)
    );
    print!("| head | W |");
    let ns = [20, 24, 27];
    for n in ns {
        print!(" N = 2^{n} |");
    }
    println!(" largest N in 80 GB |");
    println!("|---|---|{}---|", "---|".repeat(ns.len()));
    for (name, head) in heads {
        for w in [8, 64, 1024] {
            print!("| {name} | {w} |");
            for n in ns {
                print!(" {:.2} |", gb(step_cost(&setup(w, 1u64 << n, head)).head_memory as f64));
            }
            let most = largest_classes(&setup(w, 1, head), 80_000_000_000);
            println!(" {:.3e} |", most as f64);
        }
    }
    Ok(())
}
