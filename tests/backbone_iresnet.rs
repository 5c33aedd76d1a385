//! The assembled IResNet: a small network of the same structure (stem, four
//! stages, downsample and plain blocks, BN, flatten, dropout, Linear, BN1d)
//! — the kernels' forward and backward equal the CPU path's on the
//! simulator (and a GPU), with and without dropout, and the CPU path's
//! gradients match finite differences for parameters of every kind;
//! buffers are reused from step to step (no growth) and across batch sizes
//! correctly; the full-size r18 on a GPU equals the CPU path; the state
//! names are insightface's.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::{DType, Device, Error, Tensor};

fn tiny() -> IResNetConfig {
    tiny_iresnet()
}

fn tiny_dropout() -> IResNetConfig {
    IResNetConfig { dropout: 0.3, ..tiny() }
}

/// F32 steps' bounds: embeddings (absolute, relative), gradients relative
/// (absolute: that times the gradient's largest magnitude).
const F32_TOL: (f32, f32) = (2e-4, 2e-3);

/// Compares embeddings and every gradient with the CPU path's.
fn assert_same_step(what: &str, emb: &Tensor, want_emb: &[f32], g: &Grads, want_g: &Grads, tol: (f32, f32)) {
    assert_close(&format!("{what} emb"), &emb.to_vec::<f32>().unwrap(), want_emb, tol.0, tol.1);
    assert_eq!(g.keys().collect::<Vec<_>>(), want_g.keys().collect::<Vec<_>>());
    for (k, want) in want_g {
        let w = want.to_vec::<f32>().unwrap();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        assert_close(&format!("{what} {k}"), &g[k].to_vec::<f32>().unwrap(), &w, tol.1 * scale, tol.1);
    }
}

type Grads = std::collections::BTreeMap<String, Tensor>;

/// Copies every parameter and buffer of `from` into `to`.
fn copy_state(from: &IResNet, to: &mut IResNet, dev: &Device) {
    for (k, v) in from.state() {
        to.set(&k, Tensor::from_slice(dev, v.shape(), &v.to_vec::<f32>().unwrap()).unwrap()).unwrap();
    }
}

fn images(dev: &Device, b: usize, seed: u64) -> (Vec<f32>, Tensor) {
    let mut r = rng(seed);
    let v = uniform(&mut r, b * 16 * 16 * 3, -1.0, 1.0);
    let t = Tensor::from_slice(dev, &[b, 16, 16, 3], &v).unwrap();
    (v, t)
}

fn loss_of(emb: &[f32], w: &[f32]) -> f64 {
    emb.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn state_names_follow_insightface() {
    let net = IResNet::new(IResNetConfig::arch("r18").unwrap(), &Device::cpu(), 1).unwrap();
    let st = net.state();
    for k in [
        "conv1.weight",
        "bn1.running_var",
        "prelu.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer1.1.conv2.weight",
        "layer4.1.bn3.bias",
        "bn2.weight",
        "fc.weight",
        "fc.bias",
        "features.weight",
    ] {
        assert!(st.contains_key(k), "{k}");
    }
    assert!(!st.contains_key("layer1.1.downsample.0.weight"));
    assert_eq!(st["fc.weight"].shape(), &[512, 7 * 7 * 512]);
    assert_eq!(st["layer2.0.conv2.weight"].shape(), &[128, 3, 3, 128]);
}

#[test]
fn kernels_match_the_cpu_path_forward_and_backward() {
    let b = 3;
    let cpu = Device::cpu();
    let (img, xt) = images(&cpu, b, 6);
    let mut r = rng(7);
    let d_emb = uniform(&mut r, b * 6, -1.0, 1.0);
    for cfg in [tiny(), tiny_dropout()] {
        let mut want_net = IResNet::new(cfg.clone(), &cpu, 5).unwrap();
        for training in [true, false] {
            let want_emb = want_net.forward(&xt, training).unwrap().to_vec::<f32>().unwrap();
            let want_g = want_net.backward(&Tensor::from_slice(&cpu, &[b, 6], &d_emb).unwrap()).unwrap();
            for dev in gpu_devices() {
                let mut net = IResNet::new(cfg.clone(), &dev, 5).unwrap();
                if !training {
                    // Same running statistics as the CPU network after its training pass.
                    copy_state(&want_net, &mut net, &dev);
                }
                let x = Tensor::from_slice(&dev, &[b, 16, 16, 3], &img).unwrap();
                let emb = net.forward(&x, training).unwrap();
                let g = net.backward(&Tensor::from_slice(&dev, &[b, 6], &d_emb).unwrap()).unwrap();
                let what = format!("{dev} dropout {} training {training}", cfg.dropout);
                assert_same_step(&what, &emb, &want_emb, &g, &want_g, F32_TOL);
            }
        }
    }
}

/// bf16 convolutions (tensor cores on the simulator; widened operands on
/// the CPU): the kernels equal the CPU path with the same roundings, and
/// the network stays close to the f32 one.
#[test]
fn bf16_convolutions_match_the_cpu_path() {
    let b = 3;
    let cpu = Device::cpu();
    let (img, xt) = images(&cpu, b, 40);
    let mut r = rng(41);
    let d_emb = uniform(&mut r, b * 6, -1.0, 1.0);
    let cfg = IResNetConfig { conv_dtype: DType::BF16, ..tiny() };
    let mut want_net = IResNet::new(cfg.clone(), &cpu, 5).unwrap();
    let want_emb = want_net.forward(&xt, true).unwrap().to_vec::<f32>().unwrap();
    let want_g = want_net.backward(&Tensor::from_slice(&cpu, &[b, 6], &d_emb).unwrap()).unwrap();
    // Against the f32 network: bf16 rounding (2^-9 relative) through 5 blocks.
    let mut f32_net = IResNet::new(tiny(), &cpu, 5).unwrap();
    let f32_emb = f32_net.forward(&xt, true).unwrap().to_vec::<f32>().unwrap();
    assert_close("bf16 vs f32 network", &want_emb, &f32_emb, 5e-2, 5e-2);
    assert_ne!(want_emb, f32_emb, "the bf16 network rounds");
    for dev in [Device::sim(), Device::sim_with(gif_fr::SimOrder::Reverse)].into_iter().chain(cuda()) {
        let mut net = IResNet::new(cfg.clone(), &dev, 5).unwrap();
        let x = Tensor::from_slice(&dev, &[b, 16, 16, 3], &img).unwrap();
        let emb = net.forward(&x, true).unwrap();
        let g = net.backward(&Tensor::from_slice(&dev, &[b, 6], &d_emb).unwrap()).unwrap();
        // Summation-order differences can flip a bf16 rounding: a looser bound
        // than f32's, still far below a wrong convolution's error.
        assert_same_step(&format!("{dev} bf16"), &emb, &want_emb, &g, &want_g, (1e-2, 2e-2));
        // Inference in bf16 equals an eval forward.
        let mut inf = IResNet::new(cfg.clone(), &dev, 5).unwrap();
        let mut fwd = IResNet::new(cfg.clone(), &dev, 5).unwrap();
        assert_eq!(
            inf.infer(&x).unwrap().to_vec::<f32>().unwrap(),
            fwd.forward(&x, false).unwrap().to_vec::<f32>().unwrap(),
            "{dev} bf16 infer"
        );
    }
}

/// The training loop's entry points: `backward_into` overwrites kept
/// (poisoned) buffers in place with what `backward` returns, and
/// `backward_accumulate` adds onto what they hold (the convolutions' and
/// the Linear's kernels in place, the per-channel sums through a
/// temporary), on the CPU and the simulator (shuffled order; the kernels
/// themselves are checked in three orders above), f32 and bf16
/// convolutions.
#[test]
fn gradients_overwrite_or_add_onto_kept_buffers_in_place() {
    let b = 3;
    let d_emb = uniform(&mut rng(50), b * 6, -1.0, 1.0);
    let sim = || Device::sim_with(gif_fr::SimOrder::Shuffle(0x5eed));
    let runs = [(Device::cpu(), DType::F32), (sim(), DType::F32), (sim(), DType::BF16)];
    for (dev, conv_dtype) in runs {
        let what = format!("{dev} {conv_dtype:?}");
        let mut net = IResNet::new(IResNetConfig { conv_dtype, ..tiny() }, &dev, 5).unwrap();
        let (_, x) = images(&dev, b, 51);
        let d = Tensor::from_slice(&dev, &[b, 6], &d_emb).unwrap();
        net.forward(&x, true).unwrap();
        let want: Vec<(String, Vec<f32>)> =
            net.backward(&d).unwrap().into_iter().map(|(k, v)| (k, v.to_vec::<f32>().unwrap())).collect();
        // Poisoned buffers, overwritten where they are.
        let mut kept: Grads = want
            .iter()
            .map(|(k, v)| (k.clone(), Tensor::from_slice(&dev, &[v.len()], &vec![f32::NAN; v.len()]).unwrap()))
            .collect();
        let shapes: Vec<(String, Vec<usize>)> = net
            .state()
            .into_iter()
            .map(|(k, t)| (k, t.shape().to_vec()))
            .filter(|(k, _)| kept.contains_key(k))
            .collect();
        for (k, shape) in &shapes {
            let t = kept.remove(k).unwrap().reshape(shape).unwrap();
            kept.insert(k.clone(), t);
        }
        let addrs: Vec<Option<u64>> = kept.values().map(Tensor::device_addr).collect();
        net.forward(&x, true).unwrap();
        net.backward_into(&d, &mut kept).unwrap();
        assert_eq!(kept.values().map(Tensor::device_addr).collect::<Vec<_>>(), addrs, "{what}: written in place");
        for (k, v) in &want {
            assert_eq!(&kept[k].to_vec::<f32>().unwrap(), v, "{what} {k}: backward_into vs backward");
        }
        // Random starting values, then one accumulation.
        let mut r = rng(52);
        let start: Vec<Vec<f32>> = want.iter().map(|(_, v)| uniform(&mut r, v.len(), -1.0, 1.0)).collect();
        for ((k, _), s) in want.iter().zip(&start) {
            kept.get_mut(k).unwrap().copy_from_host(s).unwrap();
        }
        net.forward(&x, true).unwrap();
        net.backward_accumulate(&d, &mut kept).unwrap();
        assert_eq!(kept.values().map(Tensor::device_addr).collect::<Vec<_>>(), addrs, "{what}: added in place");
        for ((k, v), s) in want.iter().zip(&start) {
            let sum: Vec<f32> = v.iter().zip(s).map(|(a, b)| a + b).collect();
            assert_close(&format!("{what} {k} accumulated"), &kept[k].to_vec::<f32>().unwrap(), &sum, 1e-5, 1e-5);
        }
        // A buffer of another shape is refused before anything is written.
        let mut bad = Grads::new();
        bad.insert("fc.bias".into(), Tensor::zeros(&dev, &[5], DType::F32).unwrap());
        net.forward(&x, true).unwrap();
        assert!(matches!(net.backward_into(&d, &mut bad), Err(Error::Shape { .. })), "{what}: wrong shape");
        assert!(matches!(net.backward_accumulate(&d, &mut Grads::new()), Err(Error::InvalidArgument { .. })));
    }
}

#[test]
fn buffers_are_reused_from_step_to_step() {
    let b = 3;
    let mut r = rng(12);
    let d_emb = uniform(&mut r, b * 6, -1.0, 1.0);
    for dev in [Device::sim()] {
        let (_, x) = images(&dev, b, 6);
        let d = Tensor::from_slice(&dev, &[b, 6], &d_emb).unwrap();
        let mut net = IResNet::new(tiny(), &dev, 5).unwrap();
        let first = net.forward(&x, true).unwrap().to_vec::<f32>().unwrap();
        let g1 = net.backward(&d).unwrap();
        let g1: Vec<(String, Vec<f32>)> = g1.into_iter().map(|(k, v)| (k, v.to_vec::<f32>().unwrap())).collect();
        let held = net.buffer_bytes();
        let mem = dev.memory_stats().unwrap();
        dev.reset_peak_memory();
        // Step 2 at the same batch size: the same results (training mode
        // ignores the running statistics), from the same buffers.
        let second = net.forward(&x, true).unwrap().to_vec::<f32>().unwrap();
        let g2 = net.backward(&d).unwrap();
        assert_eq!(second, first, "embeddings of step 2");
        for (k, v) in &g1 {
            assert_eq!(&g2[k].to_vec::<f32>().unwrap(), v, "{k} of step 2");
        }
        drop(g2);
        assert_eq!(net.buffer_bytes(), held, "the pool grew");
        let after = dev.memory_stats().unwrap();
        assert_eq!(after.current, mem.current, "device memory after step 2 vs step 1");
        // Step 2 allocates only the outputs (embeddings, gradients, per-channel
        // statistics), far less than the activations it reuses.
        assert!(after.peak - mem.current < held / 4, "step 2 peak extra {} vs held {held}", after.peak - mem.current);
        // Inference keeps no activations: its buffers do not grow with the
        // depth (4 more plain blocks in stage 3), a forward's do.
        let held_by = |layers: [usize; 4], infer: bool| {
            let mut n = IResNet::new(IResNetConfig { layers, ..tiny() }, &dev, 5).unwrap();
            let e = if infer { n.infer(&x) } else { n.forward(&x, false) };
            (e.unwrap().to_vec::<f32>().unwrap(), n.buffer_bytes(), n)
        };
        let (want, fwd_shallow, _) = held_by([1, 1, 2, 1], false);
        let (e, inf_shallow, _) = held_by([1, 1, 2, 1], true);
        assert_eq!(e, want, "infer vs eval forward");
        let (_, fwd_deep, _) = held_by([1, 1, 6, 1], false);
        let (_, inf_deep, mut inf) = held_by([1, 1, 6, 1], true);
        assert!(fwd_deep > fwd_shallow, "forward keeps the extra blocks' activations");
        assert_eq!(inf_deep, inf_shallow, "infer's buffers grew with the depth");
        assert!(matches!(inf.backward(&d), Err(Error::InvalidArgument { .. })), "backward after infer");
        net.release_buffers();
        assert_eq!(net.buffer_bytes(), 0);
    }
}

#[test]
fn batch_sizes_can_change_between_steps() {
    let cpu = Device::cpu();
    let mut r = rng(13);
    for dev in [Device::sim()] {
        let mut net = IResNet::new(tiny(), &dev, 8).unwrap();
        let mut want = IResNet::new(tiny(), &cpu, 8).unwrap();
        for b in [3usize, 2, 3] {
            let (img, xc) = images(&cpu, b, 20 + b as u64);
            let d = uniform(&mut r, b * 6, -1.0, 1.0);
            let want_emb = want.forward(&xc, true).unwrap().to_vec::<f32>().unwrap();
            let want_g = want.backward(&Tensor::from_slice(&cpu, &[b, 6], &d).unwrap()).unwrap();
            let x = Tensor::from_slice(&dev, &[b, 16, 16, 3], &img).unwrap();
            let emb = net.forward(&x, true).unwrap();
            let g = net.backward(&Tensor::from_slice(&dev, &[b, 6], &d).unwrap()).unwrap();
            assert_same_step(&format!("{dev} batch {b}"), &emb, &want_emb, &g, &want_g, F32_TOL);
            let wrong = Tensor::from_slice(&dev, &[b + 1, 6], &uniform(&mut r, (b + 1) * 6, -1.0, 1.0)).unwrap();
            assert!(matches!(net.backward(&wrong), Err(Error::Shape { .. })), "a gradient for another batch");
        }
    }
}

/// The full-size r18 (112x112, B = 2) in training mode, forward and
/// backward, on a GPU against the CPU path; skipped without a GPU.
#[test]
fn r18_forward_and_backward_on_a_gpu_equal_the_cpu_path() {
    let Some(gpu) = cuda() else { return };
    let (b, cpu) = (2, Device::cpu());
    let cfg = IResNetConfig::arch("r18").unwrap();
    let mut r = rng(30);
    let img = uniform(&mut r, b * 112 * 112 * 3, -1.0, 1.0);
    let d_emb = uniform(&mut r, b * 512, -1.0, 1.0);
    let mut want_net = IResNet::new(cfg.clone(), &cpu, 31).unwrap();
    let want_emb = want_net.forward(&Tensor::from_slice(&cpu, &[b, 112, 112, 3], &img).unwrap(), true).unwrap();
    let want_g = want_net.backward(&Tensor::from_slice(&cpu, &[b, 512], &d_emb).unwrap()).unwrap();
    let mut net = IResNet::new(cfg, &gpu, 31).unwrap();
    let emb = net.forward(&Tensor::from_slice(&gpu, &[b, 112, 112, 3], &img).unwrap(), true).unwrap();
    let g = net.backward(&Tensor::from_slice(&gpu, &[b, 512], &d_emb).unwrap()).unwrap();
    // 18 layers of f32 in different summation orders: a little looser than the tiny network's.
    assert_same_step("r18 on the GPU", &emb, &want_emb.to_vec::<f32>().unwrap(), &g, &want_g, (5e-4, 5e-3));
    for (k, v) in net.state() {
        let w = want_net.state()[&k].to_vec::<f32>().unwrap();
        assert_close(&format!("r18 {k} after the step"), &v.to_vec::<f32>().unwrap(), &w, 1e-4, 1e-3);
    }
}

#[test]
fn cpu_gradients_match_finite_differences() {
    // B = 4: with 2 samples BatchNorm1d's output is ±1 whatever its input,
    // and every gradient below it vanishes.
    let b = 4;
    let cpu = Device::cpu();
    let (_, xt) = images(&cpu, b, 10);
    let mut r = rng(11);
    let w = uniform(&mut r, b * 6, -1.0, 1.0);
    for cfg in [tiny(), tiny_dropout()] {
        let mut net = IResNet::new(cfg.clone(), &cpu, 9).unwrap();
        // One dropout mask for every evaluation: the same seed and step.
        net.set_dropout_seed(77);
        net.forward(&xt, true).unwrap();
        let g = net.backward(&Tensor::from_slice(&cpu, &[b, 6], &w).unwrap()).unwrap();
        // h: small enough that few PReLU kinks are crossed (the truncation
        // error at 1e-2 is ~5 % in the first layers), large enough for f32.
        let h = 1e-3f32;
        for (name, idx) in [
            ("conv1.weight", 5usize),
            ("bn1.weight", 1),
            ("prelu.weight", 2),
            ("layer1.0.conv2.weight", 17),
            ("layer1.0.downsample.0.weight", 3),
            ("layer1.1.bn3.bias", 0),
            ("layer4.0.prelu.weight", 4),
            ("bn2.weight", 7),
            ("fc.weight", 11),
            ("fc.bias", 2),
            ("features.bias", 1),
        ] {
            let base = net.state()[name].to_vec::<f32>().unwrap();
            let shape = net.state()[name].shape().to_vec();
            let mut eval = |v: Vec<f32>| {
                net.set(name, Tensor::from_slice(&cpu, &shape, &v).unwrap()).unwrap();
                net.set_dropout_seed(77);
                let emb = net.forward(&xt, true).unwrap();
                loss_of(&emb.to_vec::<f32>().unwrap(), &w)
            };
            let (mut p, mut m) = (base.clone(), base.clone());
            p[idx] += h;
            m[idx] -= h;
            let fd = (eval(p) - eval(m)) / (2.0 * h as f64);
            eval(base);
            let analytic = g[name].to_vec::<f32>().unwrap()[idx] as f64;
            assert!(
                (fd - analytic).abs() <= 2e-3 + 3e-2 * analytic.abs(),
                "dropout {}: {name}[{idx}]: fd {fd}, analytic {analytic}",
                cfg.dropout
            );
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dev = Device::cpu();
    let mut net = IResNet::new(tiny(), &dev, 1).unwrap();
    let wrong = Tensor::from_slice(&dev, &[1, 16, 16, 4], &[0.5f32; 1024]).unwrap();
    assert!(matches!(net.forward(&wrong, true), Err(Error::Shape { .. })));
    assert!(IResNetConfig::arch("r42").is_err());
    for p in [1.0f32, -0.5, f32::NAN] {
        assert!(IResNet::new(IResNetConfig { dropout: p, ..tiny() }, &dev, 1).is_err(), "dropout {p}");
    }
    assert!(IResNet::new(IResNetConfig { conv_dtype: DType::F16, ..tiny() }, &dev, 1).is_err(), "f16 convs");
    let mut px = vec![0.5f32; 2 * 16 * 16 * 3];
    px[700] = f32::NAN;
    assert!(matches!(net.embed(&px, 1), Err(Error::InvalidArgument { .. })), "a NaN pixel");
    assert!(matches!(net.embed(&px[..100], 1), Err(Error::InvalidArgument { .. })), "not whole images");
    let d = Tensor::from_slice(&dev, &[2, 6], &[0.5f32; 12]).unwrap();
    assert!(matches!(net.backward(&d), Err(Error::InvalidArgument { .. })), "backward before any forward");
    let bad = Tensor::from_slice(&dev, &[3], &[1.0f32; 3]).unwrap();
    assert!(matches!(net.set("bn1.weight", bad), Err(Error::Shape { .. })));
    assert!(matches!(
        net.set("nope.weight", Tensor::from_slice(&dev, &[1], &[1.0f32]).unwrap()),
        Err(Error::InvalidArgument { .. })
    ));
}

/// `cfg`'s network with every BatchNorm's statistics and affine
/// parameters and every PReLU slope random: a fresh network's (γ = 1,
/// β = 0, mean 0, variance 1) would fold to almost nothing and hide a
/// wrong fold.
fn randomized(cfg: IResNetConfig, dev: &Device, seed: u64) -> IResNet {
    let mut net = IResNet::new(cfg, dev, seed).unwrap();
    let mut r = rng(seed + 100);
    let names: Vec<(String, Vec<usize>)> = net.state().iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
    for (name, shape) in names {
        let n: usize = shape.iter().product();
        let v = if name.ends_with("running_var") {
            uniform(&mut r, n, 0.3, 2.0)
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            uniform(&mut r, n, -0.5, 0.5)
        } else if name.ends_with(".weight") && shape.len() == 1 {
            // BatchNorm γ and PReLU slopes.
            uniform(&mut r, n, 0.5, 1.5)
        } else {
            continue;
        };
        net.set(&name, Tensor::from_slice(dev, &shape, &v).unwrap()).unwrap();
    }
    net
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The folded CPU network (BatchNorms folded, epilogues fused, Winograd)
/// against the layer-by-layer eval forward, at an input of 48: feature
/// maps of 48, 24, 12, 6 and 3, so F(4x4, 3x3)'s tiles overhang the maps of
/// 6 and 3 and F(2x2, 3x3)'s the map of 3; every variant and the
/// per-size choice; batches of 3, then 1, then 3 again through the same
/// (kept) buffers. Channel counts of 4-12 (every vector of the tile
/// transforms and every GEMM panel partial), then 16-40 (whole vectors of
/// 16 channels and partial ones after them).
#[test]
fn folded_network_equals_the_layer_by_layer_eval_forward() {
    for cfg in [
        IResNetConfig { input: 48, ..tiny() },
        IResNetConfig { input: 48, stem: 16, widths: [16, 20, 33, 40], ..tiny() },
    ] {
        check_folded(cfg);
    }
}

fn check_folded(cfg: IResNetConfig) {
    use gif_fr::backbone::{Kernels, Winograd};
    let dev = Device::cpu();
    let mut net = randomized(cfg, &dev, 21);
    let mut r = rng(22);
    let x3 = uniform(&mut r, 3 * 48 * 48 * 3, -1.0, 1.0);
    let x1 = x3[..48 * 48 * 3].to_vec();
    let want3 =
        net.forward(&Tensor::from_slice(&dev, &[3, 48, 48, 3], &x3).unwrap(), false).unwrap().to_vec::<f32>().unwrap();
    let want1 = want3[..6].to_vec();
    // Measured: 2-6e-7 (no Winograd, F2), 3e-6 (F4), 1e-6 (per size); the
    // bounds leave ~18x, far below what one wrong transform coefficient
    // gives (0.28, tried).
    // Kernels::Auto is the packed AVX-512 kernel on a CPU that has AVX-512F
    // (channel counts 4-12: every panel narrower than 32, masked), the gemm
    // crate elsewhere; GemmCrate is the gemm crate everywhere.
    for kernels in [Kernels::Auto, Kernels::GemmCrate] {
        for (w, tol) in [(Winograd::Off, 1e-5), (Winograd::F2, 1e-5), (Winograd::F4, 5e-5), (Winograd::Auto, 1e-5)] {
            let f = net.folded(w, kernels).unwrap();
            assert!(f.weight_bytes() > 0);
            for (x, b, want) in [(&x3, 3, &want3), (&x1, 1, &want1), (&x3, 3, &want3)] {
                let got = f.embed(x, b).unwrap();
                let e = rel_err(&got, want);
                assert!(
                    e <= tol,
                    "{w:?} {kernels:?} B = {b}: max |folded − layer by layer| / max |y| = {e:e} > {tol:e}"
                );
            }
        }
    }
    // Bad input: typed errors, nothing computed.
    let f = net.folded(Winograd::Auto, Kernels::Auto).unwrap();
    assert!(matches!(f.embed(&x3, 2), Err(Error::Shape { .. })), "3 images given as 2");
    assert!(matches!(f.embed(&[], 0), Err(Error::Shape { .. })), "an empty batch");
    assert!(matches!(f.embed(&x3, usize::MAX / 2), Err(Error::Shape { .. })), "an overflowing batch");
}

/// `infer` on the CPU runs the folded network, and refolds after anything
/// that changes a parameter or a running statistic: `set`, `params_mut`,
/// a training forward (new running statistics).
#[test]
fn cpu_infer_is_folded_and_follows_parameter_changes() {
    let dev = Device::cpu();
    let mut net = randomized(tiny(), &dev, 31);
    let (_, x) = images(&dev, 3, 32);
    let eval = |net: &mut IResNet| net.forward(&x, false).unwrap().to_vec::<f32>().unwrap();
    let check = |net: &mut IResNet, what: &str| -> Vec<f32> {
        let got = net.infer(&x).unwrap().to_vec::<f32>().unwrap();
        let e = rel_err(&got, &eval(net));
        assert!(e <= 1e-5, "{what}: infer differs from the eval forward by {e:e}");
        got
    };
    let before = check(&mut net, "fresh");
    assert_eq!(net.infer(&x).unwrap().to_vec::<f32>().unwrap(), before, "a second call (kept folding) differs");
    let mean = net.state()["layer1.0.bn2.running_mean"].to_vec::<f32>().unwrap();
    let moved: Vec<f32> = mean.iter().map(|m| m + 0.7).collect();
    net.set("layer1.0.bn2.running_mean", Tensor::from_slice(&dev, &[mean.len()], &moved).unwrap()).unwrap();
    let after_set = check(&mut net, "after set");
    assert!(rel_err(&after_set, &before) > 1e-3, "set did not reach infer");
    for (name, t) in net.params_mut() {
        if name == "conv1.weight" {
            let v: Vec<f32> = t.to_vec::<f32>().unwrap().iter().map(|w| -w).collect();
            *t = Tensor::from_slice(&dev, t.shape(), &v).unwrap();
        }
    }
    let after_params = check(&mut net, "after params_mut");
    assert!(rel_err(&after_params, &after_set) > 1e-3, "params_mut did not reach infer");
    net.forward(&x, true).unwrap();
    let after_training = check(&mut net, "after a training forward");
    assert!(rel_err(&after_training, &after_params) > 1e-3, "new running statistics did not reach infer");
}
