//! The optimizers' step (kernels/optim.cu, src/train/optim.rs) over an
//! IResNet-50-sized parameter list (about 43.6 M f32 values in 160
//! tensors), against a copy of as many bytes on the same device: the step
//! is memory-bound, so its bandwidth (bytes it must move / time) over the
//! copy's is the figure of merit (the training issue's target: >= 80 % on
//! a GPU). Bytes per f32 parameter: SGD with momentum reads p, g, b and
//! writes p, b (20); AdamW reads p, g, m, v and writes p, m, v (28); the
//! gradient norm pass reads g once more (4).
//!
//! Run: `cargo bench --bench optim`.

mod common;

use gif_fr::train::{GroupConfig, Optimizer, OptimizerKind, ParamRef};
use gif_fr::{DType, Tensor};

/// 160 tensors, 43.6 M values: IResNet-50's convolution, BatchNorm, PReLU
/// and fc shapes, approximately (sizes only matter through their sum and
/// spread).
fn sizes() -> Vec<usize> {
    let mut v = Vec::new();
    for (count, c) in [(3usize, 64usize), (4, 128), (14, 256), (3, 512)] {
        for _ in 0..count {
            v.extend([c * c * 9, c * c * 9, c, c, c, c]);
        }
    }
    v.push(512 * 7 * 7 * 512);
    v.extend([512, 512]);
    v
}

fn main() {
    let mut c = common::criterion();
    let mut rows = Vec::new();
    for dev in common::devices() {
        let label = common::label(&dev);
        let sizes = sizes();
        let total: usize = sizes.iter().sum();
        let mk = |n: usize, v: f32| Tensor::from_f32(&dev, &[n], &vec![v; n], DType::F32).expect("tensor");
        let mut values: Vec<Tensor> = sizes.iter().map(|&n| mk(n, 0.01)).collect();
        let grads: Vec<Tensor> = sizes.iter().map(|&n| mk(n, 1e-3)).collect();
        let mut g = c.benchmark_group(format!("optim/{label}"));
        g.sampling_mode(criterion::SamplingMode::Flat);
        for (name, kind, bytes_per) in
            [("sgd momentum", OptimizerKind::SGD, 20 + 4), ("adamw", OptimizerKind::ADAMW, 28 + 4)]
        {
            let mut opt = Optimizer::new(&dev, kind, vec![GroupConfig::new(5e-4)], Some(5.0)).expect("optimizer");
            let mut step = || -> gif_fr::Result<()> {
                let mut p: Vec<Vec<ParamRef<'_>>> =
                    vec![values.iter_mut().zip(&grads).map(|(value, grad)| ParamRef { value, grad }).collect()];
                opt.step(&mut p, 0.1)
            };
            step().expect("warm-up");
            let bytes = (bytes_per * total) as f64;
            let case = format!("{name} {total} params");
            g.bench_function(name, |b| b.iter_custom(|iters| common::timed(&dev, &case, bytes, 0.0, iters, &mut step)));
            rows.push((label.clone(), case, bytes));
        }
        // The reference: a copy moving as many bytes as the AdamW step
        // (n f32 read and n written: 8n = 32 bytes per parameter).
        let n = 4 * total;
        let src = mk(n, 1.0);
        let mut dst = mk(n, 0.0);
        let case = format!("copy of {:.0} MB", (8 * n) as f64 / 1e6);
        let mut copy = || dst.copy_from(&src);
        copy().expect("copy");
        g.bench_function("copy", |b| {
            b.iter_custom(|iters| common::timed(&dev, &case, (8 * n) as f64, 0.0, iters, &mut copy))
        });
        rows.push((label.clone(), case, (8 * n) as f64));
        g.finish();
    }
    c.final_summary();
    println!("\n### optimizer step vs a copy of the same bytes\n");
    println!("| device | case | bytes moved | mean per call | GB/s |");
    println!("|---|---|---|---|---|");
    for (dev, case, bytes) in rows {
        if let Some(s) = common::mean_seconds(&case, &dev) {
            println!("| {dev} | {case} | {:.0} MB | {:.2} ms | {:.1} |", bytes / 1e6, s * 1e3, bytes / s / 1e9);
        }
    }
    common::print_summary("optim");
}
