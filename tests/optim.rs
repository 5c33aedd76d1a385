//! The optimizers (src/train/optim.rs, kernels/optim.cu) against PyTorch's
//! update rules in f64, on the CPU and the simulator (three orders): SGD
//! with momentum and AdamW over several steps, two parameter groups (own
//! lr scale and weight decay, one clipped), tensors of odd sizes across
//! block boundaries; AdamW's bias correction at step 1; a skipped
//! non-finite step; bf16 parameters with and without a master copy; the
//! launch count; bad input.
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::train::{GroupConfig, Optimizer, OptimizerKind, ParamRef};
use gif_fr::{DType, Device, Tensor};

const SIZES: [&[usize]; 2] = [&[1, 7, 1000], &[4097, 33]];

/// Initial values of a tensor of n elements: uniform, bf16-representable
/// (so that bf16 and f32 parameters start equal).
fn init(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    uniform(r, n, -1.0, 1.0).into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

/// PyTorch's rules in f64 (torch.optim.SGD / AdamW, clip_grad_norm_).
struct Reference {
    kind: OptimizerKind,
    groups: Vec<GroupConfig>,
    max_norm: Option<f64>,
    w: Vec<Vec<Vec<f64>>>,
    a: Vec<Vec<Vec<f64>>>,
    b: Vec<Vec<Vec<f64>>>,
    t: u64,
}

impl Reference {
    /// The initial values of `run` (seed 5), zero state.
    fn new(kind: OptimizerKind, groups: Vec<GroupConfig>, max_norm: Option<f32>) -> Reference {
        let mut r = rng(5);
        let w: Vec<Vec<Vec<f64>>> = SIZES
            .iter()
            .map(|sizes| sizes.iter().map(|&n| init(&mut r, n).iter().map(|&x| x as f64).collect()).collect())
            .collect();
        let zeros: Vec<Vec<Vec<f64>>> = w.iter().map(|g| g.iter().map(|v| vec![0.0; v.len()]).collect()).collect();
        Reference { kind, groups, max_norm: max_norm.map(f64::from), w, a: zeros.clone(), b: zeros, t: 0 }
    }

    fn step(&mut self, grads: &[Vec<Vec<f32>>], lr: f64) {
        let sq = |g: usize| -> f64 { grads[g].iter().flatten().map(|&x| x as f64 * x as f64).sum() };
        let all: f64 = (0..grads.len()).map(sq).sum();
        if !all.is_finite() {
            return;
        }
        let clipped: f64 = (0..grads.len()).filter(|&g| self.groups[g].clip).map(sq).sum();
        let c = self.max_norm.map_or(1.0, |m| (m / (clipped.sqrt() + 1e-6)).min(1.0));
        self.t += 1;
        let t = self.t as f64;
        for (g, cfg) in self.groups.iter().enumerate() {
            let (lr, wd) = (lr * cfg.lr_scale as f64, cfg.weight_decay as f64);
            let c = if cfg.clip { c } else { 1.0 };
            for (i, w) in self.w[g].iter_mut().enumerate() {
                for k in 0..w.len() {
                    let gk = c * grads[g][i][k] as f64;
                    match self.kind {
                        OptimizerKind::Sgd { momentum } => {
                            let gk = gk + wd * w[k];
                            let m = momentum as f64;
                            let buf = if self.t == 1 { gk } else { m * self.a[g][i][k] + gk };
                            self.a[g][i][k] = buf;
                            w[k] -= lr * if m != 0.0 { buf } else { gk };
                        }
                        OptimizerKind::AdamW { beta1, beta2, eps } => {
                            let (b1, b2) = (beta1 as f64, beta2 as f64);
                            w[k] *= 1.0 - lr * wd;
                            let m = b1 * self.a[g][i][k] + (1.0 - b1) * gk;
                            let v = b2 * self.b[g][i][k] + (1.0 - b2) * gk * gk;
                            self.a[g][i][k] = m;
                            self.b[g][i][k] = v;
                            let denom = v.sqrt() / (1.0 - b2.powf(t)).sqrt() + eps as f64;
                            w[k] -= lr / (1.0 - b1.powf(t)) * m / denom;
                        }
                    }
                }
            }
        }
    }
}

fn groups() -> Vec<GroupConfig> {
    vec![
        GroupConfig { lr_scale: 1.0, weight_decay: 5e-4, clip: true, master_weights: false },
        GroupConfig { lr_scale: 1.0 / 3.0, weight_decay: 0.0, clip: false, master_weights: false },
    ]
}

/// Runs `steps` steps of `kind` on `dev` through `step_scaled` with
/// gradient scale `scale`; returns the parameters per group and tensor,
/// and the optimizer.
#[allow(clippy::too_many_arguments)]
fn run(
    dev: &Device,
    kind: OptimizerKind,
    groups: Vec<GroupConfig>,
    dtype: DType,
    grads_of: &dyn Fn(usize) -> Vec<Vec<Vec<f32>>>,
    steps: usize,
    max_norm: Option<f32>,
    scale: f32,
) -> (Vec<Vec<Vec<f32>>>, Optimizer) {
    let mut r = rng(5);
    let mut values: Vec<Vec<Tensor>> = SIZES
        .iter()
        .map(|sizes| sizes.iter().map(|&n| Tensor::from_f32(dev, &[n], &init(&mut r, n), dtype).unwrap()).collect())
        .collect();
    let mut opt = Optimizer::new(dev, kind, groups, max_norm).unwrap();
    for s in 0..steps {
        let g = grads_of(s);
        let grads: Vec<Vec<Tensor>> = g
            .iter()
            .map(|group| group.iter().map(|v| Tensor::from_slice(dev, &[v.len()], v).unwrap()).collect())
            .collect();
        let mut params: Vec<Vec<ParamRef<'_>>> = values
            .iter_mut()
            .zip(&grads)
            .map(|(vs, gs)| vs.iter_mut().zip(gs).map(|(value, grad)| ParamRef { value, grad }).collect())
            .collect();
        opt.step_scaled(&mut params, 0.05 * (1.0 + s as f32), scale).unwrap();
    }
    let out = values.iter().map(|vs| vs.iter().map(|v| v.to_f32_vec().unwrap()).collect()).collect();
    (out, opt)
}

fn random_grads(step: usize) -> Vec<Vec<Vec<f32>>> {
    let mut r = rng(100 + step as u64);
    SIZES.iter().map(|sizes| sizes.iter().map(|&n| uniform(&mut r, n, -2.0, 2.0)).collect()).collect()
}

fn reference(
    kind: OptimizerKind,
    groups: Vec<GroupConfig>,
    grads_of: &dyn Fn(usize) -> Vec<Vec<Vec<f32>>>,
    steps: usize,
    max_norm: Option<f32>,
) -> Vec<Vec<Vec<f64>>> {
    let mut rf = Reference::new(kind, groups, max_norm);
    for s in 0..steps {
        rf.step(&grads_of(s), 0.05 * (1.0 + s as f64));
    }
    rf.w
}

fn assert_params(what: &str, got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f64>>], tol: f64) {
    for (g, (gg, wg)) in got.iter().zip(want).enumerate() {
        for (i, (gv, wv)) in gg.iter().zip(wg).enumerate() {
            for (k, (&a, &b)) in gv.iter().zip(wv).enumerate() {
                assert!((a as f64 - b).abs() <= tol * (1.0 + b.abs()), "{what}: group {g} tensor {i}[{k}]: {a} vs {b}");
            }
        }
    }
}

#[test]
fn sgd_and_adamw_follow_pytorch_over_several_steps_with_groups_and_clipping() {
    for kind in [OptimizerKind::SGD, OptimizerKind::Sgd { momentum: 0.0 }, OptimizerKind::ADAMW] {
        for max_norm in [None, Some(3.0)] {
            let want = reference(kind, groups(), &random_grads, 4, max_norm);
            for dev in all_devices() {
                let (got, opt) = run(&dev, kind, groups(), DType::F32, &random_grads, 4, max_norm, 1.0);
                assert_params(&format!("{dev} {kind:?} clip {max_norm:?}"), &got, &want, 2e-5);
                assert_eq!((opt.steps().unwrap(), opt.skipped().unwrap()), (4, 0), "{dev}");
                // The clipped group's gradient norm is far above 3: clipping acted.
                let (clipped, all) = opt.last_norms().unwrap();
                assert!(clipped > 3.0 && all > clipped, "{dev}: norms {clipped} {all}");
            }
        }
    }
}

#[test]
fn a_gradient_scale_acts_as_scaled_gradients_before_the_norm_and_the_clipping() {
    // 1/4: four accumulated micro-batches. The reference sees the scaled
    // gradients; clipping at 3 still acts on them (their norm is ~ 18).
    let scale = 0.25f32;
    let scaled = |s: usize| -> Vec<Vec<Vec<f32>>> {
        random_grads(s)
            .into_iter()
            .map(|g| g.into_iter().map(|v| v.iter().map(|x| x * scale).collect()).collect())
            .collect()
    };
    for kind in [OptimizerKind::SGD, OptimizerKind::ADAMW] {
        for max_norm in [None, Some(3.0)] {
            let want = reference(kind, groups(), &scaled, 3, max_norm);
            let unscaled = reference(kind, groups(), &random_grads, 3, max_norm);
            for dev in all_devices() {
                let (got, opt) = run(&dev, kind, groups(), DType::F32, &random_grads, 3, max_norm, scale);
                let what = format!("{dev} {kind:?} clip {max_norm:?}");
                assert_params(&what, &got, &want, 2e-5);
                // The scale mattered: the unscaled run ends elsewhere (SGD;
                // AdamW is invariant to a gradient scale but for eps).
                if matches!(kind, OptimizerKind::Sgd { .. }) {
                    let moved = got.iter().flatten().flatten().zip(unscaled.iter().flatten().flatten());
                    assert!(moved.map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max) > 1e-3, "{what}");
                }
                let (clipped, all) = opt.last_norms().unwrap();
                let sq = |g: &Vec<Vec<f32>>| g.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>();
                let last = scaled(2);
                let want_norms = (sq(&last[0]).sqrt(), (sq(&last[0]) + sq(&last[1])).sqrt());
                assert!(
                    (clipped as f64 - want_norms.0).abs() < 1e-4 * want_norms.0,
                    "{what}: {clipped} {want_norms:?}"
                );
                assert!((all as f64 - want_norms.1).abs() < 1e-4 * want_norms.1, "{what}: {all} {want_norms:?}");
            }
        }
    }
}

#[test]
fn adamw_bias_correction_at_step_one() {
    // One step from zero state: m̂ = g, v̂ = g², so p1 = p0·(1 − lr·wd) −
    // lr·g / (|g| + eps): within eps of lr·sign(g), whatever |g|.
    let one = vec![GroupConfig { lr_scale: 1.0, weight_decay: 0.1, clip: false, master_weights: false }; 2];
    let g = |_: usize| -> Vec<Vec<Vec<f32>>> {
        SIZES
            .iter()
            .map(|sizes| {
                sizes.iter().map(|&n| (0..n).map(|k| if k % 2 == 0 { 1e-3 } else { -50.0 }).collect()).collect()
            })
            .collect()
    };
    let mut r = rng(5);
    let p0: Vec<Vec<Vec<f32>>> = SIZES.iter().map(|sizes| sizes.iter().map(|&n| init(&mut r, n)).collect()).collect();
    for dev in all_devices() {
        let (got, _) = run(&dev, OptimizerKind::ADAMW, one.clone(), DType::F32, &g, 1, None, 1.0);
        for (grp, tensors) in got.iter().enumerate() {
            for (i, v) in tensors.iter().enumerate() {
                for (k, &w) in v.iter().enumerate() {
                    let lr = 0.05f64;
                    let gk = if k % 2 == 0 { 1e-3f64 } else { -50.0 };
                    let want = p0[grp][i][k] as f64 * (1.0 - lr * 0.1) - lr * gk / (gk.abs() + 1e-8);
                    assert!((w as f64 - want).abs() < 1e-6, "{dev}: group {grp} tensor {i}[{k}]: {w} vs {want}");
                }
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_skips_the_step_and_keeps_the_state() {
    // Step 1 of 4 carries a NaN (and step 2 an inf): both skipped; the run
    // equals the reference that never saw them.
    let bad = |s: usize| {
        let mut g = random_grads(s);
        if s == 1 {
            g[1][0][3] = f32::NAN;
        }
        if s == 2 {
            g[0][2][999] = f32::INFINITY;
        }
        g
    };
    for kind in [OptimizerKind::SGD, OptimizerKind::ADAMW] {
        let good = |s: usize| random_grads(s);
        // The reference: steps 0 and 3 only, at their own learning rates.
        let mut rf = Reference::new(kind, groups(), Some(3.0));
        rf.step(&good(0), 0.05);
        rf.step(&good(3), 0.05 * 4.0);
        for dev in all_devices() {
            let (got, opt) = run(&dev, kind, groups(), DType::F32, &bad, 4, Some(3.0), 1.0);
            assert_params(&format!("{dev} {kind:?} skipped"), &got, &rf.w, 2e-5);
            assert_eq!((opt.steps().unwrap(), opt.skipped().unwrap()), (2, 2), "{dev} {kind:?}");
        }
    }
}

#[test]
fn bf16_parameters_keep_an_f32_master_when_asked() {
    let with_master: Vec<GroupConfig> =
        groups().into_iter().map(|g| GroupConfig { master_weights: true, ..g }).collect();
    for dev in all_devices() {
        let (f32_run, _) = run(&dev, OptimizerKind::SGD, groups(), DType::F32, &random_grads, 5, Some(3.0), 1.0);
        // The master copy follows the f32 run; the bf16 parameter is it rounded.
        let (master_run, _) =
            run(&dev, OptimizerKind::SGD, with_master.clone(), DType::BF16, &random_grads, 5, Some(3.0), 1.0);
        // Without: each step rounds, and the error accumulates.
        let (plain_run, _) = run(&dev, OptimizerKind::SGD, groups(), DType::BF16, &random_grads, 5, Some(3.0), 1.0);
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        let (mut plain_err, mut master_err) = (0f64, 0f64);
        for g in 0..2 {
            for i in 0..SIZES[g].len() {
                for k in 0..SIZES[g][i] {
                    let w = f32_run[g][i][k];
                    assert_eq!(master_run[g][i][k], round(w), "{dev}: group {g} tensor {i}[{k}]");
                    master_err += (master_run[g][i][k] - w).abs() as f64;
                    plain_err += (plain_run[g][i][k] - w).abs() as f64;
                }
            }
        }
        assert!(
            plain_err > master_err,
            "{dev}: without a master copy the rounding accumulates ({plain_err} vs {master_err})"
        );
    }
}

#[test]
fn one_launch_per_group_and_dtype() {
    let dev = Device::sim();
    let mut r = rng(9);
    let mut v32 = Tensor::from_slice(&dev, &[300], &uniform(&mut r, 300, -1.0, 1.0)).unwrap();
    let mut v32b = Tensor::from_slice(&dev, &[77], &uniform(&mut r, 77, -1.0, 1.0)).unwrap();
    let mut v16 = Tensor::from_f32(&dev, &[50], &uniform(&mut r, 50, -1.0, 1.0), DType::BF16).unwrap();
    let g300 = Tensor::from_slice(&dev, &[300], &uniform(&mut r, 300, -1.0, 1.0)).unwrap();
    let g77 = Tensor::from_slice(&dev, &[77], &uniform(&mut r, 77, -1.0, 1.0)).unwrap();
    let g50 = Tensor::from_slice(&dev, &[50], &uniform(&mut r, 50, -1.0, 1.0)).unwrap();
    let mut opt = Optimizer::new(&dev, OptimizerKind::ADAMW, groups(), Some(5.0)).unwrap();
    let mut step = |opt: &mut Optimizer| {
        let mut p = vec![
            vec![ParamRef { value: &mut v32, grad: &g300 }, ParamRef { value: &mut v16, grad: &g50 }],
            vec![ParamRef { value: &mut v32b, grad: &g77 }],
        ];
        opt.step(&mut p, 0.01).unwrap();
    };
    step(&mut opt);
    dev.reset_stats();
    step(&mut opt);
    let s = dev.stats().unwrap();
    // The norm (2), group 0's f32 and bf16 lists, group 1's f32 list, and
    // the step count: 6 launches; the tensor lists and the norm's partial
    // sums are kept from the first step (no upload, no allocation), nothing
    // waits.
    assert_eq!((s.launches, s.uploads, s.downloads, s.syncs, s.allocations), (6, 0, 0, 0, 0), "{s:?}");
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = Device::sim();
    assert!(Optimizer::new(&dev, OptimizerKind::Sgd { momentum: 1.0 }, groups(), None).is_err());
    assert!(Optimizer::new(&dev, OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 0.0 }, groups(), None).is_err());
    assert!(Optimizer::new(&dev, OptimizerKind::SGD, vec![], None).is_err());
    assert!(Optimizer::new(&dev, OptimizerKind::SGD, groups(), Some(f32::NAN)).is_err());
    let neg = vec![GroupConfig { weight_decay: -1.0, ..groups()[0] }];
    assert!(Optimizer::new(&dev, OptimizerKind::SGD, neg, None).is_err());
    let one = vec![groups()[0]];
    let mut opt = Optimizer::new(&dev, OptimizerKind::SGD, one, None).unwrap();
    let mut v = Tensor::zeros(&dev, &[8], DType::F32).unwrap();
    let g = Tensor::zeros(&dev, &[8], DType::F32).unwrap();
    let g7 = Tensor::zeros(&dev, &[7], DType::F32).unwrap();
    let g16 = Tensor::zeros(&dev, &[8], DType::BF16).unwrap();
    let elsewhere = Tensor::zeros(&Device::cpu(), &[8], DType::F32).unwrap();
    for (what, lr, grad) in [
        ("lr < 0", -0.1, &g),
        ("lr NaN", f32::NAN, &g),
        ("short grad", 0.1, &g7),
        ("bf16 grad", 0.1, &g16),
        ("cpu grad", 0.1, &elsewhere),
    ] {
        let mut p = vec![vec![ParamRef { value: &mut v, grad }]];
        assert!(opt.step(&mut p, lr).is_err(), "{what}");
    }
    let mut p = vec![vec![ParamRef { value: &mut v, grad: &g }]];
    opt.step(&mut p, 0.1).unwrap();
    // Another parameter list than the first step's.
    let mut w = Tensor::zeros(&dev, &[7], DType::F32).unwrap();
    let mut p = vec![vec![ParamRef { value: &mut w, grad: &g7 }]];
    assert!(opt.step(&mut p, 0.1).is_err());
    let mut p: Vec<Vec<ParamRef<'_>>> = vec![vec![], vec![]];
    assert!(opt.step(&mut p, 0.1).is_err(), "two groups for one");
}

#[test]
fn a_backbone_and_a_code_head_train_with_the_optimizer() {
    use gif_fr::backbone::IResNet;
    use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, Margin};
    use gif_fr::train::Schedule;
    // 12 identities, one image each, in a tiny IResNet; a code head with
    // l = 2 over v = 4 (codes: the base-4 digits), γ = 0; SGD with
    // momentum (insightface's optimizer: the backbone clipped at 5, the head
    // in its own group), insightface's schedule. The CPU trains 30 steps;
    // the simulator's first 3 steps follow the CPU's losses.
    let (ids, b) = (12u32, 12usize);
    let mut cpu_losses = Vec::new();
    for (dev, steps) in [(Device::cpu(), 30u64), (Device::sim(), 3)] {
        let cfg = tiny_iresnet();
        let mut net = IResNet::new(cfg.clone(), &dev, 3).unwrap();
        let (images, _) = iresnet_batch(&dev, &cfg, b, 4);
        // Every trainable parameter has a gradient, and nothing else does.
        net.forward(&images, true).unwrap();
        let (_, d_emb) = iresnet_batch(&dev, &cfg, b, 5);
        let grads = net.backward(&d_emb).unwrap();
        let names: Vec<String> = net.params_mut().into_iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, grads.keys().cloned().collect::<Vec<_>>(), "{dev}");
        assert!(!names.iter().any(|n| n.contains("running") || n == "features.weight"));

        let codes: Vec<u16> = (0..ids as u16).flat_map(|i| [i % 4, i / 4]).collect();
        let table = CodeTable::new(&dev, codes, 2, 4, None).unwrap();
        let hcfg = CodeHeadConfig {
            gamma: 0.0,
            margin: Margin::CosFace(0.1),
            scale: 8.0,
            ..CodeHeadConfig::new(cfg.embedding, 2, 4)
        };
        let mut head = CodeHead::new(hcfg, &dev, 6).unwrap();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % ids).collect();
        let backbone = GroupConfig { lr_scale: 1.0, weight_decay: 5e-4, clip: true, master_weights: false };
        let head_group = GroupConfig { clip: false, ..backbone };
        let mut opt = Optimizer::new(&dev, OptimizerKind::SGD, vec![backbone, head_group], Some(5.0)).unwrap();
        let schedule = Schedule::insightface(0.1, 3, 30);
        let mut losses = Vec::new();
        for t in 0..steps {
            let emb = net.forward(&images, true).unwrap();
            let (loss, hg) = head.forward_backward(&emb, &labels, &table).unwrap();
            losses.push(loss.total);
            let g = net.backward(&hg.features).unwrap();
            let mut params = vec![net.param_refs(&g).unwrap(), head.param_refs(&hg).unwrap()];
            opt.step(&mut params, schedule.lr(t) as f32).unwrap();
        }
        assert_eq!((opt.steps().unwrap(), opt.skipped().unwrap()), (steps, 0));
        if dev.kind() == gif_fr::DeviceKind::Cpu {
            let (first, last) = (losses[..3].iter().sum::<f64>() / 3.0, losses[27..].iter().sum::<f64>() / 3.0);
            // Measured 0.0103 of the start (any thread count); 0.1 leaves room.
            assert!(last < 0.1 * first, "the loss went from {first} to {last}: {losses:?}");
            cpu_losses = losses;
        } else {
            for (t, (a, c)) in losses.iter().zip(&cpu_losses).enumerate() {
                assert!((a - c).abs() <= 1e-3 * c.abs().max(1.0), "{dev} step {t}: loss {a}, the CPU's {c}");
            }
        }
    }
}
