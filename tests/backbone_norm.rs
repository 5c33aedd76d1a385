//! The backbone's per-channel layers: BatchNorm (training, eval, backward,
//! running statistics), PReLU, the residual add and dropout. Finite differences of
//! the CPU reference; the kernels against it on the simulator (three
//! orders) and a GPU when present, with row and channel counts off the
//! kernels' tiles (32 channels x 8 row lanes) and an IResNet shape.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::backbone::{add, add_assign, prelu, prelu_backward, prelu_into, BatchNorm, Dropout};
use gif_fr::{Device, Error, Tensor};

fn bn_with(dev: &Device, c: usize, seed: u64) -> BatchNorm {
    let mut r = rng(seed);
    let mut bn = BatchNorm::new(dev, c, 1e-5).unwrap();
    bn.weight = Tensor::from_slice(dev, &[c], &uniform(&mut r, c, 0.5, 1.5)).unwrap();
    bn.bias = Tensor::from_slice(dev, &[c], &uniform(&mut r, c, -0.5, 0.5)).unwrap();
    bn.running_mean = Tensor::from_slice(dev, &[c], &uniform(&mut r, c, -0.2, 0.2)).unwrap();
    bn.running_var = Tensor::from_slice(dev, &[c], &uniform(&mut r, c, 0.5, 2.0)).unwrap();
    bn
}

/// Σ y·w for a fixed random w: a scalar loss whose dy is w.
fn loss(y: &[f32], w: &[f32]) -> f64 {
    y.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn batchnorm_reference_gradients_match_finite_differences() {
    let (rows, c) = (9, 3);
    let mut r = rng(1);
    let x = uniform(&mut r, rows * c, -2.0, 2.0);
    let w = uniform(&mut r, rows * c, -1.0, 1.0);
    let dev = Device::cpu();
    for training in [true, false] {
        let f = |x: &[f32], gamma: &[f32], beta: &[f32]| {
            let mut bn = bn_with(&dev, c, 2);
            bn.weight = Tensor::from_slice(&dev, &[c], gamma).unwrap();
            bn.bias = Tensor::from_slice(&dev, &[c], beta).unwrap();
            let (y, _) = bn.forward(&Tensor::from_slice(&dev, &[rows, c], x).unwrap(), training).unwrap();
            loss(&y.to_vec::<f32>().unwrap(), &w)
        };
        let mut bn = bn_with(&dev, c, 2);
        let (gamma, beta) = (bn.weight.to_vec::<f32>().unwrap(), bn.bias.to_vec::<f32>().unwrap());
        let xt = Tensor::from_slice(&dev, &[rows, c], &x).unwrap();
        let (_, cache) = bn.forward(&xt, training).unwrap();
        let g = bn.backward(&xt, &cache, &Tensor::from_slice(&dev, &[rows, c], &w).unwrap()).unwrap();
        let h = 1e-2f32;
        let check = |what: String, analytic: f32, plus: f64, minus: f64| {
            let fd = (plus - minus) / (2.0 * h as f64);
            assert!(
                (fd - analytic as f64).abs() <= 2e-3 + 2e-3 * fd.abs(),
                "train {training} {what}: fd {fd} analytic {analytic}"
            );
        };
        let dx = g.input.to_vec::<f32>().unwrap();
        for i in 0..rows * c {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            check(format!("dx[{i}]"), dx[i], f(&p, &gamma, &beta), f(&m, &gamma, &beta));
        }
        let (dg, db) = (g.weight.to_vec::<f32>().unwrap(), g.bias.to_vec::<f32>().unwrap());
        for k in 0..c {
            let (mut p, mut m) = (gamma.clone(), gamma.clone());
            p[k] += h;
            m[k] -= h;
            check(format!("dgamma[{k}]"), dg[k], f(&x, &p, &beta), f(&x, &m, &beta));
            let (mut p, mut m) = (beta.clone(), beta.clone());
            p[k] += h;
            m[k] -= h;
            check(format!("dbeta[{k}]"), db[k], f(&x, &gamma, &p), f(&x, &gamma, &m));
        }
    }
}

#[test]
fn batchnorm_kernels_match_the_reference() {
    // (rows, C): off-tile, a 1d BatchNorm (rows = B), an IResNet stage shape (B·7·7, 512).
    for (rows, c) in [(1003usize, 67usize), (37, 512), (2 * 7 * 7, 512), (5, 3)] {
        let mut r = rng(rows as u64 * 31 + c as u64);
        let x = uniform(&mut r, rows * c, -3.0, 3.0);
        let dy = uniform(&mut r, rows * c, -1.0, 1.0);
        let cpu = Device::cpu();
        for training in [true, false] {
            let mut want_bn = bn_with(&cpu, c, 9);
            let xt = Tensor::from_slice(&cpu, &[rows, c], &x).unwrap();
            let (want_y, wc) = want_bn.forward(&xt, training).unwrap();
            let want_g = want_bn.backward(&xt, &wc, &Tensor::from_slice(&cpu, &[rows, c], &dy).unwrap()).unwrap();
            for dev in gpu_devices() {
                let what = format!("{dev} rows {rows} C {c} train {training}");
                let mut bn = bn_with(&dev, c, 9);
                let xd = Tensor::from_slice(&dev, &[rows, c], &x).unwrap();
                let (y, cache) = bn.forward(&xd, training).unwrap();
                assert_close(
                    &format!("{what} y"),
                    &y.to_vec::<f32>().unwrap(),
                    &want_y.to_vec::<f32>().unwrap(),
                    1e-4,
                    1e-4,
                );
                for (got, want, name) in [
                    (&bn.running_mean, &want_bn.running_mean, "running mean"),
                    (&bn.running_var, &want_bn.running_var, "running var"),
                ] {
                    assert_close(
                        &format!("{what} {name}"),
                        &got.to_vec::<f32>().unwrap(),
                        &want.to_vec::<f32>().unwrap(),
                        1e-5,
                        1e-4,
                    );
                }
                let g = bn.backward(&xd, &cache, &Tensor::from_slice(&dev, &[rows, c], &dy).unwrap()).unwrap();
                let pairs = [
                    (&g.input, &want_g.input, "dx"),
                    (&g.weight, &want_g.weight, "dgamma"),
                    (&g.bias, &want_g.bias, "dbeta"),
                ];
                for (got, want, name) in pairs {
                    let w = want.to_vec::<f32>().unwrap();
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert_close(
                        &format!("{what} {name}"),
                        &got.to_vec::<f32>().unwrap(),
                        &w,
                        1e-4 * scale.max(1.0),
                        1e-4,
                    );
                }
            }
        }
    }
}

#[test]
fn prelu_and_add_match_the_reference() {
    let (rows, c) = (517usize, 45usize);
    let mut r = rng(7);
    let x = uniform(&mut r, rows * c, -2.0, 2.0);
    let b = uniform(&mut r, rows * c, -2.0, 2.0);
    let alpha = uniform(&mut r, c, 0.05, 0.5);
    let dy = uniform(&mut r, rows * c, -1.0, 1.0);
    let cpu = Device::cpu();
    let t = |dev: &Device, v: &[f32], shape: &[usize]| Tensor::from_slice(dev, shape, v).unwrap();
    let want_y = prelu(&t(&cpu, &x, &[rows, c]), &t(&cpu, &alpha, &[c])).unwrap().to_vec::<f32>().unwrap();
    let (wdx, wda) =
        prelu_backward(&t(&cpu, &x, &[rows, c]), &t(&cpu, &alpha, &[c]), &t(&cpu, &dy, &[rows, c])).unwrap();
    let want_sum = add(&t(&cpu, &x, &[rows, c]), &t(&cpu, &b, &[rows, c])).unwrap().to_vec::<f32>().unwrap();
    // The reference's slope gradient by finite differences (PReLU is linear in α).
    let h = 1e-2f32;
    for k in 0..c {
        let (mut p, mut m) = (alpha.clone(), alpha.clone());
        p[k] += h;
        m[k] -= h;
        let f = |a: &[f32]| {
            loss(&prelu(&t(&cpu, &x, &[rows, c]), &t(&cpu, a, &[c])).unwrap().to_vec::<f32>().unwrap(), &dy)
        };
        let fd = (f(&p) - f(&m)) / (2.0 * h as f64);
        let got = wda.to_vec::<f32>().unwrap()[k] as f64;
        assert!((fd - got).abs() < 1e-3 + 1e-3 * fd.abs(), "dalpha[{k}]: fd {fd} analytic {got}");
    }
    for dev in gpu_devices() {
        let y = prelu(&t(&dev, &x, &[rows, c]), &t(&dev, &alpha, &[c])).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), want_y, "{dev} prelu");
        let (dx, da) =
            prelu_backward(&t(&dev, &x, &[rows, c]), &t(&dev, &alpha, &[c]), &t(&dev, &dy, &[rows, c])).unwrap();
        assert_eq!(dx.to_vec::<f32>().unwrap(), wdx.to_vec::<f32>().unwrap(), "{dev} prelu dx");
        assert_close(&format!("{dev} dalpha"), &da.to_vec::<f32>().unwrap(), &wda.to_vec::<f32>().unwrap(), 1e-3, 1e-4);
        let s = add(&t(&dev, &x, &[rows, c]), &t(&dev, &b, &[rows, c])).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), want_sum, "{dev} add");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    for dev in [Device::cpu(), Device::sim()] {
        let mut bn = BatchNorm::new(&dev, 4, 1e-5).unwrap();
        let wrong = Tensor::from_slice(&dev, &[3, 5], &[1.0f32; 15]).unwrap();
        assert!(matches!(bn.forward(&wrong, true), Err(Error::Shape { .. })));
        let one = Tensor::from_slice(&dev, &[1, 4], &[1.0f32; 4]).unwrap();
        assert!(matches!(bn.forward(&one, true), Err(Error::InvalidArgument { .. })), "one row cannot train");
        assert!(bn.forward(&one, false).is_ok(), "one row in eval mode is fine");
        let alpha = Tensor::from_slice(&dev, &[5], &[0.25f32; 5]).unwrap();
        let x = Tensor::from_slice(&dev, &[2, 4], &[1.0f32; 8]).unwrap();
        assert!(matches!(prelu(&x, &alpha), Err(Error::Shape { .. })));
        assert!(matches!(add(&x, &wrong), Err(Error::Shape { .. })));
    }
    assert!(BatchNorm::new(&Device::cpu(), 0, 1e-5).is_err());
    assert!(BatchNorm::new(&Device::cpu(), 4, f32::NAN).is_err());
}

#[test]
fn batchnorm_and_dropout_check_their_public_fields() {
    // The kernels trust these fields: a parameter of the wrong length or
    // dtype used to be read out of bounds, a p outside [0, 1) reached the
    // kernel.
    for dev in [Device::cpu(), Device::sim()] {
        let x = Tensor::from_slice(&dev, &[3, 4], &[0.5f32, -1.0, 2.0, 0.25, 1.0, 0.0, -2.0, 3.0, 0.1, 0.2, 0.3, 0.4])
            .unwrap();
        let (d1, d2) = (dev.clone(), dev.clone());
        let short = move || Tensor::from_slice(&d1, &[3], &[1.0f32; 3]).unwrap();
        let bf16 = move || Tensor::from_f32(&d2, &[4], &[1.0; 4], gif_fr::DType::BF16).unwrap();
        type Edit = Box<dyn Fn(&mut BatchNorm)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "weight",
                Box::new({
                    let short = short.clone();
                    move |b: &mut BatchNorm| b.weight = short()
                }),
            ),
            (
                "bias",
                Box::new({
                    let short = short.clone();
                    move |b: &mut BatchNorm| b.bias = short()
                }),
            ),
            ("running_mean", Box::new(move |b: &mut BatchNorm| b.running_mean = short())),
            ("running_var bf16", Box::new(move |b: &mut BatchNorm| b.running_var = bf16())),
            ("channels", Box::new(|b: &mut BatchNorm| b.channels = 5)),
            ("eps", Box::new(|b: &mut BatchNorm| b.eps = -1.0)),
            ("momentum", Box::new(|b: &mut BatchNorm| b.momentum = f32::NAN)),
        ];
        for (what, edit) in edits {
            let mut bn = BatchNorm::new(&dev, 4, 1e-5).unwrap();
            let (_, cache) = bn.forward(&x, true).unwrap();
            edit(&mut bn);
            assert!(bn.forward(&x, true).is_err(), "{dev}: forward with a bad {what}");
            assert!(bn.forward(&x, false).is_err(), "{dev}: eval with a bad {what}");
            assert!(bn.backward(&x, &cache, &x).is_err(), "{dev}: backward with a bad {what}");
        }
        // A cache from a layer of other channels.
        let mut five = BatchNorm::new(&dev, 5, 1e-5).unwrap();
        let x5 = Tensor::from_slice(&dev, &[2, 5], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 0.0, 1.0, 0.0]).unwrap();
        let (_, other) = five.forward(&x5, true).unwrap();
        let bn = BatchNorm::new(&dev, 4, 1e-5).unwrap();
        assert!(matches!(bn.backward(&x, &other, &x), Err(Error::Shape { .. })), "{dev}");
        // Dropout's public p.
        for p in [1.0f32, -0.5, f32::NAN] {
            let mut d = Dropout::new(0.5, 1, 2).unwrap();
            d.p = p;
            let mut y = Tensor::empty(&dev, &[3, 4], gif_fr::DType::F32).unwrap();
            assert!(matches!(d.apply_into(&x, &mut y), Err(Error::InvalidArgument { .. })), "{dev}: p {p}");
        }
    }
}

#[test]
fn in_place_and_into_forms_equal_the_allocating_ones() {
    let (rows, c) = (301usize, 37usize);
    let mut r = rng(21);
    let x = uniform(&mut r, rows * c, -2.0, 2.0);
    let b = uniform(&mut r, rows * c, -2.0, 2.0);
    let alpha = uniform(&mut r, c, 0.05, 0.5);
    for dev in all_devices() {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(&dev, shape, v).unwrap();
        let want = add(&t(&x, &[rows, c]), &t(&b, &[rows, c])).unwrap().to_vec::<f32>().unwrap();
        let mut y = t(&x, &[rows, c]);
        add_assign(&mut y, &t(&b, &[rows, c])).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), want, "{dev} add_assign");
        // Into a used buffer (the earlier result): every element rewritten.
        prelu_into(&t(&x, &[rows, c]), &t(&alpha, &[c]), &mut y).unwrap();
        let want = prelu(&t(&x, &[rows, c]), &t(&alpha, &[c])).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), want, "{dev} prelu_into");
        let mut bn = bn_with(&dev, c, 3);
        let want = bn.forward(&t(&x, &[rows, c]), true).unwrap().0.to_vec::<f32>().unwrap();
        let mut bn = bn_with(&dev, c, 3);
        bn.forward_into(&t(&x, &[rows, c]), true, &mut y).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), want, "{dev} BatchNorm::forward_into");
        let mut wrong = t(&x[..rows * c - c], &[rows - 1, c]);
        assert!(matches!(prelu_into(&t(&x, &[rows, c]), &t(&alpha, &[c]), &mut wrong), Err(Error::Shape { .. })));
        assert!(matches!(add_assign(&mut wrong, &t(&b, &[rows, c])), Err(Error::Shape { .. })));
    }
}

#[test]
fn dropout_masks_agree_across_backends_and_keep_one_minus_p() {
    let n = 70_001usize;
    let mut r = rng(22);
    let x = uniform(&mut r, n, 0.5, 1.5);
    for (p, seed, step) in [(0.0f32, 1u64, 0u64), (0.2, 1, 0), (0.2, 1, 1), (0.5, 9, 3)] {
        let d = Dropout::new(p, seed, step).unwrap();
        let cpu = Device::cpu();
        let mut want = Tensor::empty(&cpu, &[n], gif_fr::DType::F32).unwrap();
        d.apply_into(&Tensor::from_slice(&cpu, &[n], &x).unwrap(), &mut want).unwrap();
        let want = want.to_vec::<f32>().unwrap();
        let kept = want.iter().filter(|&&v| v != 0.0).count();
        let expect = (1.0 - p as f64) * n as f64;
        // Binomial: 5 standard deviations.
        let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
        assert!((kept as f64 - expect).abs() <= 5.0 * sd + 1.0, "p {p}: kept {kept} of {n}");
        for (i, (&y, &v)) in want.iter().zip(&x).enumerate() {
            assert!(y == 0.0 || y == v * (1.0 / (1.0 - p)), "p {p}: element {i} scaled wrong");
            assert_eq!(y != 0.0, d.keeps(i as u32));
        }
        for dev in gpu_devices() {
            let mut y = Tensor::empty(&dev, &[n], gif_fr::DType::F32).unwrap();
            d.apply_into(&Tensor::from_slice(&dev, &[n], &x).unwrap(), &mut y).unwrap();
            assert_eq!(y.to_vec::<f32>().unwrap(), want, "{dev} p {p} seed {seed} step {step}");
        }
    }
    // Different steps draw different masks.
    let (a, b) = (Dropout::new(0.5, 1, 0).unwrap(), Dropout::new(0.5, 1, 1).unwrap());
    assert!((0..1000).filter(|&i| a.keeps(i) != b.keeps(i)).count() > 300);
    for bad in [-0.1f32, 1.0, f32::NAN] {
        assert!(matches!(Dropout::new(bad, 0, 0), Err(Error::InvalidArgument { .. })), "p {bad}");
    }
}
