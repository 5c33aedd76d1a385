//! The O(N) baselines: the fused full margin-softmax head and Partial FC.
//! f64 finite-difference checks of the reference under every margin; the
//! chunked CPU path and the kernels (simulator, three orders; a GPU when
//! present) against the reference, f32 and bf16 centres, shapes off the
//! tile; top-k; Partial FC's device sample against the host's, r = 1 against
//! the full head, sparse SGD; bad input.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::head::softmax_head::{cpu, MAX_DEVICE_K};
use gif_fr::head::{Margin, MarginGrad, PartialFc, SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::{DType, Device, Error, Tensor};
use rand::Rng;

fn config(d: usize, n: usize, margin: Margin, grad: MarginGrad, s: f32) -> SoftmaxHeadConfig {
    SoftmaxHeadConfig { margin, margin_grad: grad, scale: s, ..SoftmaxHeadConfig::new(d, n) }
}

/// |got − want| ≤ tol · max|want| for every element.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale}, tol {tol})");
    }
}

fn labels(rng: &mut rand::rngs::StdRng, b: usize, n: usize) -> Vec<u32> {
    (0..b).map(|_| rng.random_range(0..n as u32)).collect()
}

/// Centres `[n, d]`, features `[b, d]` and labels, seeded.
fn problem(b: usize, d: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let mut r = rng(seed);
    let w = uniform(&mut r, n * d, -1.0, 1.0);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let y = labels(&mut r, b, n);
    (w, x, y)
}

#[test]
fn reference_gradients_match_finite_differences() {
    let (b, d, n) = (3, 5, 7);
    let mut r = rng(3);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let w = uniform(&mut r, n * d, -1.0, 1.0);
    let t: Vec<i32> = vec![2, 6, 2];
    for margin in MARGINS {
        let cfg = config(d, n, margin, MarginGrad::Exact, 5.0);
        let loss = |x: &[f32], w: &[f32]| cpu::reference(&cfg, x, w, None, n, &t).0.loss;
        let (_, dx, dw) = cpu::reference(&cfg, &x, &w, None, n, &t);
        let h = 1e-3f32;
        let check = |what: String, analytic: f64, plus: f64, minus: f64| {
            let fd = (plus - minus) / (2.0 * h as f64);
            assert!((fd - analytic).abs() <= 2e-3 + 2e-3 * fd.abs(), "{margin:?} {what}: fd {fd}, analytic {analytic}");
        };
        for i in 0..b * d {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            check(format!("dx[{i}]"), dx[i], loss(&p, &w), loss(&m, &w));
        }
        for i in 0..n * d {
            let (mut p, mut m) = (w.clone(), w.clone());
            p[i] += h;
            m[i] -= h;
            check(format!("dw[{i}]"), dw[i], loss(&x, &p), loss(&x, &m));
        }
    }
}

#[test]
fn straight_through_gradient_skips_the_margin_derivative() {
    // With f(c) = c − m (CosFace) both modes agree; ArcFace differs on the target.
    let (b, d, n) = (4, 6, 9);
    let mut r = rng(4);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let w = uniform(&mut r, n * d, -1.0, 1.0);
    let t: Vec<i32> = vec![0, 3, 8, 3];
    let g = |m, gr| cpu::reference(&config(d, n, m, gr, 8.0), &x, &w, None, n, &t);
    let (a, b_) = (g(Margin::CosFace(0.3), MarginGrad::Exact), g(Margin::CosFace(0.3), MarginGrad::StraightThrough));
    assert_eq!(a.1, b_.1);
    let (a, b_) = (g(Margin::ArcFace(0.5), MarginGrad::Exact), g(Margin::ArcFace(0.5), MarginGrad::StraightThrough));
    assert_eq!(a.0.loss, b_.0.loss);
    assert_ne!(a.1, b_.1);
}

#[test]
fn chunked_cpu_path_matches_the_reference() {
    // n = 4096 + 905: two chunks, the second partial.
    let (b, d, n) = (9, 19, 5001);
    let mut r = rng(5);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let w = uniform(&mut r, n * d, -1.0, 1.0);
    let t: Vec<i32> = labels(&mut r, b, n).iter().map(|&y| y as i32).collect();
    for (margin, grad) in [
        (Margin::ArcFace(0.5), MarginGrad::Exact),
        (Margin::CosFace(0.4), MarginGrad::StraightThrough),
        (Margin::INSIGHTFACE_ARCFACE, MarginGrad::StraightThrough),
        (Margin::INSIGHTFACE_ARCFACE, MarginGrad::Exact),
    ] {
        let cfg = config(d, n, margin, grad, 30.0);
        let (l64, dx64, dw64) = cpu::reference(&cfg, &x, &w, None, n, &t);
        let (l, dx, dw) = cpu::fused(&cfg, &x, &w, None, n, &t);
        assert!((l.loss - l64.loss).abs() < 1e-4 * l64.loss.abs().max(1.0), "{} vs {}", l.loss, l64.loss);
        assert_eq!(l.accuracy, l64.accuracy);
        close("dx", &dx, &dx64, 1e-4);
        close("dw", &dw, &dw64, 1e-4);
    }
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// The full head on `dev` against the f64 reference.
fn check_head(dev: &Device, b: usize, d: usize, n: usize, dtype: DType, splits: Option<usize>, seed: u64) {
    let mut r = rng(seed);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let mut w = uniform(&mut r, n * d, -1.0, 1.0);
    if dtype == DType::BF16 {
        w = bf16_round(&w);
    }
    let y = labels(&mut r, b, n);
    let t: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    for (margin, grad) in [
        (Margin::ArcFace(0.5), MarginGrad::Exact),
        (Margin::CosFace(0.4), MarginGrad::StraightThrough),
        (Margin::INSIGHTFACE_ARCFACE, MarginGrad::StraightThrough),
        (Margin::INSIGHTFACE_ARCFACE, MarginGrad::Exact),
    ] {
        let cfg = SoftmaxHeadConfig { splits, ..config(d, n, margin, grad, 32.0) };
        let head = SoftmaxHead::from_weights(cfg.clone(), Tensor::from_f32(dev, &[n, d], &w, dtype).unwrap()).unwrap();
        let xt = Tensor::from_slice(dev, &[b, d], &x).unwrap();
        let (loss, g) = head.forward_backward(&xt, &y).unwrap();
        let (l64, dx64, dw64) = cpu::reference(&cfg, &x, &w, None, n, &t);
        let what = format!("{dev} b{b} d{d} n{n} {dtype:?} {margin:?}");
        assert!((loss.loss - l64.loss).abs() < 1e-4 * l64.loss.abs().max(1.0), "{what}: {} vs {}", loss.loss, l64.loss);
        assert!((loss.accuracy - l64.accuracy).abs() <= 1.0 / b as f64 + 1e-12, "{what}: accuracy");
        close(&format!("{what} dx"), &g.features.to_vec::<f32>().unwrap(), &dx64, 2e-4);
        close(&format!("{what} dw"), &g.centres.to_vec::<f32>().unwrap(), &dw64, 2e-4);
    }
}

#[test]
fn fused_kernels_match_the_reference() {
    for dev in gpu_devices() {
        // Off-tile shapes: two row tiles, 6 class tiles; d not a multiple of 4 (scalar loads) and of 4 (vector).
        check_head(&dev, 150, 36, 700, DType::F32, None, 11);
        check_head(&dev, 150, 37, 700, DType::F32, Some(2), 12);
        check_head(&dev, 33, 40, 300, DType::BF16, None, 13);
        check_head(&dev, 20, 18, 129, DType::BF16, Some(1), 14);
    }
}

#[test]
fn fused_kernels_match_at_real_sizes_on_a_gpu() {
    let Some(dev) = cuda() else { return };
    check_head(&dev, 512, 512, 20011, DType::F32, None, 15);
    check_head(&dev, 300, 512, 70001, DType::BF16, None, 16);
}

#[test]
#[allow(clippy::needless_range_loop)]
fn top_k_matches_brute_force() {
    let (b, d, n, k) = (70, 24, 333, 7);
    let mut r = rng(21);
    let x = uniform(&mut r, b * d, -1.0, 1.0);
    let w = uniform(&mut r, n * d, -1.0, 1.0);
    // f64 cosines, for the check.
    let unit = |v: &[f32]| {
        let s = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|&a| a as f64 / s).collect::<Vec<f64>>()
    };
    let cos = |q: usize, c: usize| {
        let (a, bb) = (unit(&x[q * d..(q + 1) * d]), unit(&w[c * d..(c + 1) * d]));
        a.iter().zip(&bb).map(|(p, q)| p * q).sum::<f64>()
    };
    for dev in all_devices() {
        for splits in [None, Some(2)] {
            let cfg = SoftmaxHeadConfig { splits, ..SoftmaxHeadConfig::new(d, n) };
            let head = SoftmaxHead::from_weights(cfg, Tensor::from_slice(&dev, &[n, d], &w).unwrap()).unwrap();
            let top = head.top_k(&Tensor::from_slice(&dev, &[b, d], &x).unwrap(), k).unwrap();
            for q in 0..b {
                let mut all: Vec<f64> = (0..n).map(|c| cos(q, c)).collect();
                all.sort_by(|a, b| b.total_cmp(a));
                for j in 0..k {
                    let (id, s) = (top.ids[q * k + j] as usize, top.scores[q * k + j] as f64);
                    assert!((s - cos(q, id)).abs() < 1e-5, "{dev}: score of id {id}");
                    assert!((s - all[j]).abs() < 1e-5, "{dev}: query {q} rank {j}: {s} vs {}", all[j]);
                    if j > 0 {
                        assert!(top.scores[q * k + j - 1] >= top.scores[q * k + j], "{dev}: order");
                    }
                }
            }
        }
    }
}

#[test]
fn top_k_rejects_bad_k() {
    let dev = Device::sim();
    let head = SoftmaxHead::new(SoftmaxHeadConfig::new(8, 200), &dev, DType::F32, 1).unwrap();
    let x = Tensor::from_slice(&dev, &[2, 8], &[0.5f32; 16]).unwrap();
    for k in [0, 201, MAX_DEVICE_K + 1] {
        assert!(matches!(head.top_k(&x, k), Err(Error::InvalidArgument { .. })), "k = {k}");
    }
}

#[test]
fn partial_fc_device_sample_equals_the_host_sample() {
    let mut r = rng(31);
    for dev in gpu_devices() {
        for (n, rate, b) in [(3000usize, 0.1f32, 40usize), (1025, 0.3, 200), (777, 1.0, 10), (500, 0.01, 64)] {
            let head = SoftmaxHead::new(SoftmaxHeadConfig::new(8, n), &dev, DType::F32, 2).unwrap();
            let pfc = PartialFc::new(head, rate, 99).unwrap();
            let y = labels(&mut r, b, n);
            let x = Tensor::from_slice(&dev, &[b, 8], &uniform(&mut r, b * 8, -1.0, 1.0)).unwrap();
            for step in [0u64, 7] {
                let (loss, g) = pfc.forward_backward(&x, &y, step).unwrap();
                let host = pfc.sample(&y, step).unwrap();
                assert_eq!(g.sampled_host().unwrap(), host, "{dev} n {n} r {rate} step {step}");
                // Device labels (u32 and i64): the same sample, loss and
                // gradients; drawn and remapped on the device when the
                // sample holds a batch (all but the last case).
                let y64: Vec<i64> = y.iter().map(|&a| a as i64).collect();
                for yt in [Tensor::from_slice(&dev, &[b], &y).unwrap(), Tensor::from_slice(&dev, &[b], &y64).unwrap()] {
                    let (l2, g2) = pfc.forward_backward(&x, &yt, step).unwrap();
                    assert_eq!(g2.sampled_host().unwrap(), host, "{dev} n {n} device labels");
                    assert_eq!(l2, loss, "{dev} n {n} device labels");
                    assert_eq!(g2.grads.centres.to_vec::<f32>().unwrap(), g.grads.centres.to_vec::<f32>().unwrap());
                }
                let distinct = y.iter().collect::<std::collections::BTreeSet<_>>().len();
                assert_eq!(host.len(), pfc.sample_size().max(distinct));
                assert!(y.iter().all(|l| host.binary_search(l).is_ok()), "every positive is sampled");
            }
            let distinct = y.iter().collect::<std::collections::BTreeSet<_>>().len();
            if distinct < pfc.sample_size() && pfc.sample_size() < n {
                assert_ne!(pfc.sample(&y, 1).unwrap(), pfc.sample(&y, 2).unwrap(), "steps draw different samples");
            }
        }
    }
}

#[test]
fn partial_fc_with_rate_one_equals_the_full_head() {
    let (b, d, n) = (40, 20, 300);
    let (w, x, y) = problem(b, d, n, 41);
    // insightface's default, and the exact ArcFace gradient (whose singular
    // part reads the centres through Partial FC's row map).
    let exact = config(d, n, Margin::ArcFace(0.5), MarginGrad::Exact, 64.0);
    for (dev, cfg) in
        all_devices().into_iter().flat_map(|d| [(d.clone(), SoftmaxHeadConfig::new(20, 300)), (d, exact.clone())])
    {
        let full = SoftmaxHead::from_weights(cfg.clone(), Tensor::from_slice(&dev, &[n, d], &w).unwrap()).unwrap();
        let xt = Tensor::from_slice(&dev, &[b, d], &x).unwrap();
        let (l1, g1) = full.forward_backward(&xt, &y).unwrap();
        let pfc = PartialFc::new(full, 1.0, 5).unwrap();
        let (l2, g2) = pfc.forward_backward(&xt, &y, 3).unwrap();
        assert_eq!(g2.sampled_host().unwrap(), (0..n as u32).collect::<Vec<_>>());
        assert_eq!(l1, l2, "{dev}");
        assert_eq!(g1.centres.to_vec::<f32>().unwrap(), g2.grads.centres.to_vec::<f32>().unwrap(), "{dev}");
        let (f1, f2) = (g1.features.to_vec::<f32>().unwrap(), g2.grads.features.to_vec::<f32>().unwrap());
        if dev.kind() == gif_fr::DeviceKind::Cuda {
            // Atomic adds over class tiles: equal up to the order of the sums.
            assert_close("features", &f2, &f1, 1e-6, 1e-5);
        } else {
            assert_eq!(f1, f2, "{dev}");
        }
    }
}

#[test]
fn partial_fc_trains_the_sampled_rows_only() {
    let (b, d, n) = (16, 12, 400);
    let (w, x, y) = problem(b, d, n, 51);
    for dev in all_devices() {
        for dtype in [DType::F32, DType::BF16] {
            let cfg = config(d, n, Margin::ArcFace(0.5), MarginGrad::Exact, 16.0);
            let head =
                SoftmaxHead::from_weights(cfg.clone(), Tensor::from_f32(&dev, &[n, d], &w, dtype).unwrap()).unwrap();
            let mut pfc = PartialFc::new(head, 0.2, 8).unwrap();
            let xt = Tensor::from_slice(&dev, &[b, d], &x).unwrap();
            let (loss, g) = pfc.forward_backward(&xt, &y, 0).unwrap();
            let sampled = g.sampled_host().unwrap();
            // The loss over the sample equals the reference over the sampled rows.
            let stored = pfc.head().centres().to_f32_vec().unwrap();
            let t: Vec<i32> = y.iter().map(|l| sampled.binary_search(l).unwrap() as i32).collect();
            let (l64, dx64, dw64) = cpu::reference(&cfg, &x, &stored, Some(&sampled), sampled.len(), &t);
            assert!((loss.loss - l64.loss).abs() < 1e-4 * l64.loss.max(1.0), "{dev} {dtype:?}");
            close("pfc dx", &g.grads.features.to_vec::<f32>().unwrap(), &dx64, 2e-4);
            close("pfc dw", &g.grads.centres.to_vec::<f32>().unwrap(), &dw64, 2e-4);
            pfc.sgd_step(&g, 0.5).unwrap();
            let after = pfc.head().centres().to_f32_vec().unwrap();
            for c in 0..n {
                let moved = (0..d).any(|i| after[c * d + i] != stored[c * d + i]);
                let was_sampled = sampled.binary_search(&(c as u32)).is_ok();
                assert!(was_sampled || !moved, "{dev} {dtype:?}: class {c} moved without being sampled");
            }
            assert!(sampled.iter().any(|&c| (0..d).any(|i| after[c as usize * d + i] != stored[c as usize * d + i])));
        }
    }
}

#[test]
fn sgd_lowers_the_full_head_loss() {
    let (b, d, n) = (64, 16, 50);
    let mut r = rng(61);
    let y = labels(&mut r, b, n);
    // Features near their class's direction.
    let dirs = unit_rows(&mut r, n, d);
    let x: Vec<f32> = y
        .iter()
        .flat_map(|&c| dirs[c as usize * d..(c as usize + 1) * d].iter().map(|v| v + 0.05).collect::<Vec<_>>())
        .collect();
    for dev in [Device::cpu(), Device::sim()] {
        let cfg = config(d, n, Margin::CosFace(0.2), MarginGrad::Exact, 16.0);
        let mut head = SoftmaxHead::new(cfg, &dev, DType::F32, 3).unwrap();
        let xt = Tensor::from_slice(&dev, &[b, d], &x).unwrap();
        let first = head.forward_backward(&xt, &y).unwrap().0;
        for _ in 0..30 {
            let (_, g) = head.forward_backward(&xt, &y).unwrap();
            head.sgd_step(&g, 2.0).unwrap();
        }
        let last = head.forward_backward(&xt, &y).unwrap().0;
        assert!(last.loss < 0.5 * first.loss, "{dev}: {} -> {}", first.loss, last.loss);
        assert!(last.accuracy > first.accuracy, "{dev}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    for dev in [Device::cpu(), Device::sim()] {
        let head = SoftmaxHead::new(SoftmaxHeadConfig::new(8, 100), &dev, DType::F32, 1).unwrap();
        let x = Tensor::from_slice(&dev, &[2, 8], &[0.25f32; 16]).unwrap();
        assert!(matches!(head.forward_backward(&x, &[1, 100]), Err(Error::InvalidArgument { .. })));
        assert!(matches!(head.forward_backward(&x, &[1]), Err(Error::Shape { .. })));
        let wrong = Tensor::from_slice(&dev, &[2, 7], &[0.25f32; 14]).unwrap();
        assert!(matches!(head.forward_backward(&wrong, &[1, 2]), Err(Error::Shape { .. })));
        let empty = Tensor::from_slice::<f32>(&dev, &[0, 8], &[]).unwrap();
        assert!(matches!(head.forward_backward(&empty, &[]), Err(Error::InvalidArgument { .. })));
        let mut v = vec![0.25f32; 16];
        v[3] = f32::NAN;
        let nan = Tensor::from_slice(&dev, &[2, 8], &v).unwrap();
        assert!(matches!(head.forward_backward(&nan, &[1, 2]), Err(Error::InvalidArgument { .. })), "{dev}: NaN");
        for rate in [0.0, -0.5, 1.5, f32::NAN] {
            let h = SoftmaxHead::new(SoftmaxHeadConfig::new(8, 100), &dev, DType::F32, 1).unwrap();
            assert!(matches!(PartialFc::new(h, rate, 0), Err(Error::InvalidArgument { .. })), "rate {rate}");
        }
        let h = SoftmaxHead::new(SoftmaxHeadConfig::new(8, 100), &dev, DType::F32, 1).unwrap();
        let pfc = PartialFc::new(h, 0.1, 0).unwrap();
        assert!(matches!(pfc.forward_backward(&x, &[1, 100], 0), Err(Error::InvalidArgument { .. })));
    }
    let bad = SoftmaxHeadConfig { scale: 0.0, ..SoftmaxHeadConfig::new(8, 10) };
    assert!(SoftmaxHead::new(bad, &Device::cpu(), DType::F32, 0).is_err());
    let f16 = Tensor::from_f32(&Device::cpu(), &[10, 8], &[0.5; 80], DType::F16).unwrap();
    assert!(matches!(SoftmaxHead::from_weights(SoftmaxHeadConfig::new(8, 10), f16), Err(Error::Shape { .. })));
}

#[test]
fn tensor_core_path_matches_the_reference_to_bf16_rounding() {
    // The chunked bf16 tensor-core path: the normalized features and the
    // softmax's gradient are rounded to bf16, so it agrees with the f64
    // reference (on the bf16-stored centres) to bf16 rounding, relative to
    // each gradient's largest entry. Chunks of 128 (rounded from 120) over
    // 500 classes leave a partial last chunk; d = 40 takes the GEMM's
    // element path, d = 64 its cp.async path.
    for (d, margin, grad) in [
        (40, Margin::INSIGHTFACE_ARCFACE, MarginGrad::StraightThrough),
        (64, Margin::ArcFace(0.5), MarginGrad::Exact),
        (40, Margin::CosFace(0.35), MarginGrad::StraightThrough),
    ] {
        let (b, n) = (37, 500);
        let (w, x, y) = problem(b, d, n, 71 + d as u64);
        let stored: Vec<f32> = w.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect();
        let cfg = SoftmaxHeadConfig { tensor_cores: true, chunk: Some(120), ..config(d, n, margin, grad, 32.0) };
        let t: Vec<i32> = y.iter().map(|&a| a as i32).collect();
        let (l64, dx64, dw64) = cpu::reference(&cfg, &x, &stored, None, n, &t);
        for dev in gpu_devices() {
            let what = format!("{dev} d {d} {margin:?} {grad:?}");
            let head =
                SoftmaxHead::from_weights(cfg.clone(), Tensor::from_f32(&dev, &[n, d], &w, DType::BF16).unwrap())
                    .unwrap();
            let xt = Tensor::from_slice(&dev, &[b, d], &x).unwrap();
            let (loss, g) = head.forward_backward(&xt, &y).unwrap();
            assert!((loss.loss - l64.loss).abs() <= 1e-2 * l64.loss.max(1.0), "{what}: {} vs {}", loss.loss, l64.loss);
            assert!((loss.accuracy - l64.accuracy).abs() <= 2.0 / b as f64, "{what}: accuracy");
            close(&format!("{what}: dx"), &g.features.to_vec::<f32>().unwrap(), &dx64, 1.0 / 64.0);
            close(&format!("{what}: dw"), &g.centres.to_vec::<f32>().unwrap(), &dw64, 1.0 / 64.0);
            // Partial FC reads its sample through the same path (the
            // sampled rows gathered once).
            let pfc = PartialFc::new(head, 0.3, 4).unwrap();
            let (pl, pg) = pfc.forward_backward(&xt, &y, 2).unwrap();
            let sampled = pfc.sample(&y, 2).unwrap();
            let ts: Vec<i32> = y.iter().map(|l| sampled.binary_search(l).unwrap() as i32).collect();
            let (p64, pdx, pdw) = cpu::reference(&cfg, &x, &stored, Some(&sampled), sampled.len(), &ts);
            assert!((pl.loss - p64.loss).abs() <= 1e-2 * p64.loss.max(1.0), "{what}: pfc {} vs {}", pl.loss, p64.loss);
            close(&format!("{what}: pfc dx"), &pg.grads.features.to_vec::<f32>().unwrap(), &pdx, 1.0 / 64.0);
            close(&format!("{what}: pfc dw"), &pg.grads.centres.to_vec::<f32>().unwrap(), &pdw, 1.0 / 64.0);
        }
    }
    // f32 centres cannot feed the tensor cores: a typed error.
    let cfg = SoftmaxHeadConfig { tensor_cores: true, ..SoftmaxHeadConfig::new(8, 10) };
    let err = SoftmaxHead::new(cfg, &Device::sim(), DType::F32, 1).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
}
