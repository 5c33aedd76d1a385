//! One training step (src/train/trainer.rs) per head and N, and its parts
//! timed apart: the backbone's forward and backward, the head's forward
//! and backward, the optimizer's step over the backbone and the head
//! (SGD, momentum 0.9, wd 5e-4, clip 5: insightface's), and the whole
//! `Trainer::step` (the images' upload included).
//!
//! - GPU: IResNet-50, B = 128, N = 2^16 and 2^20 (GIF: v = 16, l = ⌈log₁₆
//!   N⌉, γ = 1 with its bf16 code-vector table; Partial FC r = 0.1).
//! - CPU: an IResNet-18 at 112 × 112, B = 4, N = 2^12 and 2^16 (the CPU
//!   path is a fallback; a full-size step takes seconds).
//!
//! Run: `cargo bench --bench train_step`.

mod common;

use std::collections::BTreeMap;

use common::heads::{bench_or_time, code_table, fill};
use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::head::{
    CodeHead, CodeHeadConfig, HeadGrads, HeadMetrics, PartialFc, PfcGrads, SoftmaxGrads, SoftmaxHead,
    SoftmaxHeadConfig, SoftmaxMetrics,
};
use gif_fr::train::{Optimizer, ParamRef, Schedule, TrainHead, Trainer, TrainerConfig};
use gif_fr::{DType, Device, DeviceKind, Result, Tensor};

const HEADS: [&str; 3] = ["gif", "arcface", "partial_fc"];

fn head(dev: &Device, kind: &str, n: usize, d: usize) -> Result<TrainHead> {
    Ok(match kind {
        "gif" => {
            let l = (n as f64).log(16.0).ceil().max(1.0) as usize;
            let table = code_table(dev, n, l, d, 3)?;
            TrainHead::Code { head: CodeHead::new(CodeHeadConfig::new(d, l, 16), dev, 4)?, table }
        }
        "arcface" => TrainHead::Softmax(SoftmaxHead::new(SoftmaxHeadConfig::new(d, n), dev, DType::F32, 4)?),
        _ => TrainHead::PartialFc(PartialFc::new(
            SoftmaxHead::new(SoftmaxHeadConfig::new(d, n), dev, DType::F32, 4)?,
            0.1,
            5,
        )?),
    })
}

/// The head's forward and backward alone, into kept buffers.
fn head_step(dev: &Device, h: TrainHead, b: usize, d: usize) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let n = h.classes();
    let x = Tensor::from_slice(dev, &[b, d], &fill(b * d, 1.0, 9))?;
    let labels: Vec<u32> = (0..b).map(|i| (i.wrapping_mul(2654435761) % n) as u32).collect();
    Ok(match h {
        TrainHead::Code { head, table } => {
            let (mut g, mut m) = (HeadGrads::new(&head, b)?, HeadMetrics::new());
            Box::new(move || head.forward_backward_into(&x, &labels, &table, &mut g, &mut m))
        }
        TrainHead::Softmax(s) => {
            let (mut g, mut m) = (SoftmaxGrads::new(dev, b, n, d)?, SoftmaxMetrics::new());
            Box::new(move || s.forward_backward_into(&x, &labels, &mut g, &mut m))
        }
        TrainHead::PartialFc(p) => {
            let (mut g, mut m) = (PfcGrads::new(&p, b)?, SoftmaxMetrics::new());
            let mut t = 0u64;
            Box::new(move || {
                t += 1;
                p.forward_backward_into(&x, &labels, t, &mut g, &mut m)
            })
        }
        TrainHead::ModelParallel(_) => unreachable!("one-process heads only"),
    })
}

fn main() {
    let mut c = common::criterion();
    for dev in common::devices() {
        let gpu = dev.kind() != DeviceKind::Cpu;
        let label = common::label(&dev);
        let (arch, b, ns) = if gpu { ("r50", 128, [1 << 16, 1 << 20]) } else { ("r18", 4, [1 << 12, 1 << 16]) };
        let net_cfg = IResNetConfig::arch(arch).expect("arch");
        let d = net_cfg.embedding;
        let s = net_cfg.input;
        let images = fill(b * s * s * 3, 1.0, 1);
        let mut g = c.benchmark_group(format!("train_step/{label}"));
        g.sampling_mode(criterion::SamplingMode::Flat);

        // The backbone alone: forward (training) and backward into kept gradients.
        {
            let mut net = IResNet::new(net_cfg.clone(), &dev, 1).expect("net");
            let x = Tensor::from_slice(&dev, &[b, s, s, 3], &images).expect("images");
            let d_emb = Tensor::from_slice(&dev, &[b, d], &fill(b * d, 0.01, 2)).expect("d_emb");
            let mut grads = BTreeMap::new();
            let mut step = move || -> Result<()> {
                net.forward(&x, true)?;
                net.backward_into(&d_emb, &mut grads)
            };
            let case = format!("backbone {arch} fwd+bwd B={b}");
            bench_or_time(&mut g, &dev, "backbone", b, &case, 0.0, None, &mut step);
        }
        for n in ns {
            let labels: Vec<u32> = (0..b).map(|i| (i.wrapping_mul(2654435761) % n) as u32).collect();
            for kind in HEADS {
                let tag = format!("{kind} N={n} B={b}");
                // The head alone.
                match head(&dev, kind, n, d).and_then(|h| head_step(&dev, h, b, d)) {
                    Ok(mut step) => bench_or_time(
                        &mut g,
                        &dev,
                        &format!("head {kind}"),
                        n,
                        &format!("head {tag}"),
                        0.0,
                        None,
                        &mut step,
                    ),
                    Err(e) => {
                        eprintln!("{tag}: skipped ({e})");
                        continue;
                    }
                }
                // The optimizer over the backbone and the head (gradients
                // of the parameters' shapes; Partial FC's dense [N, d]).
                {
                    let mut net = IResNet::new(net_cfg.clone(), &dev, 1).expect("net");
                    let mut h = head(&dev, kind, n, d).expect("head");
                    let zeros = |t: &Tensor| Tensor::from_slice(&dev, t.shape(), &fill(t.numel(), 1e-3, 7));
                    let bg: BTreeMap<String, Tensor> =
                        net.params_mut().into_iter().map(|(k, t)| (k, zeros(t).expect("grad"))).collect();
                    let hg: Vec<Tensor> = h.params().iter().map(|(_, t)| zeros(t).expect("grad")).collect();
                    let cfg = TrainerConfig::insightface(Schedule::Constant { base: 0.1 });
                    let mut opt = Optimizer::new(&dev, cfg.optimizer, cfg.groups(), cfg.max_grad_norm).expect("opt");
                    let mut step = move || -> Result<()> {
                        let head_refs: Vec<ParamRef<'_>> = h
                            .params_mut()
                            .into_iter()
                            .zip(&hg)
                            .map(|((_, value), grad)| ParamRef { value, grad })
                            .collect();
                        let mut p = vec![net.param_refs(&bg)?, head_refs];
                        opt.step(&mut p, 0.1)
                    };
                    bench_or_time(
                        &mut g,
                        &dev,
                        &format!("optimizer {kind}"),
                        n,
                        &format!("optimizer {tag}"),
                        0.0,
                        None,
                        &mut step,
                    );
                }
                // The whole step.
                {
                    let net = IResNet::new(net_cfg.clone(), &dev, 1).expect("net");
                    let cfg = TrainerConfig::insightface(Schedule::Constant { base: 0.1 });
                    let mut tr = Trainer::new(net, head(&dev, kind, n, d).expect("head"), cfg).expect("trainer");
                    let (imgs, labs) = (images.clone(), labels.clone());
                    let mut step = move || tr.step(&imgs, &labs).map(|_| ());
                    bench_or_time(
                        &mut g,
                        &dev,
                        &format!("step {kind}"),
                        n,
                        &format!("trainer step {tag}"),
                        0.0,
                        None,
                        &mut step,
                    );
                }
            }
        }
        g.finish();
    }
    c.final_summary();
    common::print_summary("train_step");
}
