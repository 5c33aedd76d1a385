//! The backbone's per-channel layers: BatchNorm (training, eval, backward,
//! running statistics), PReLU and the residual add. Finite differences of
//! the CPU reference; the kernels against it on the simulator (three
//! orders) and a GPU when present, with row and channel counts off the
//! kernels' tiles (32 channels x 8 row lanes) and an IResNet shape.

mod common;

use common::*;
use gif_fr::backbone::{add, prelu, prelu_backward, BatchNorm};
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
