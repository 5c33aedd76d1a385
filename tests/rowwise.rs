//! rowwise kernels against their CPU references, on the simulator in three
//! orders and on a GPU when present; and the references against finite
//! differences and the definitions.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::ops::rowwise::{self, cpu};
use gif_fr::{DType, Device, Error, Tensor};
use half::bf16;

/// Shapes around the warp/block switch (1024 columns) and the tile sizes:
/// none of them multiples of 32 or 256 except where the point is the edge.
const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 17), (9, 33), (17, 256), (5, 1000), (2, 1024), (3, 1025), (2, 3001)];

fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        _ => (1e-2, 1e-2),
    }
}

/// Input values as the device will see them (rounded to `dtype`).
fn rounded(x: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => x.to_vec(),
    }
}

#[test]
fn l2_normalize_matches_reference_on_odd_shapes() {
    let mut rng = rng(1);
    for dev in gpu_devices() {
        for dtype in [DType::F32, DType::BF16] {
            for &(r, c) in SHAPES {
                let x = uniform(&mut rng, r * c, -2.0, 2.0);
                let xr = rounded(&x, dtype);
                let (mut y, mut n) = (vec![0.0; r * c], vec![0.0; r]);
                cpu::l2_normalize(&xr, c, 1e-12, &mut y, &mut n);
                let xt = Tensor::from_f32(&dev, &[r, c], &x, dtype).unwrap();
                let (yt, nt) = rowwise::l2_normalize(&xt, 1e-12).unwrap();
                let (atol, rtol) = tol(dtype);
                let what = format!("{dev} {dtype:?} [{r},{c}]");
                assert_close(&format!("y {what}"), &yt.to_f32_vec().unwrap(), &y, atol, rtol);
                assert_close(&format!("norm {what}"), &nt.to_f32_vec().unwrap(), &n, 1e-5, 1e-5);
                // f32 out whatever the input: bf16 rows are not rounded on the way out.
                let (y32, n32) = rowwise::l2_normalize_f32(&xt, 1e-12).unwrap();
                assert_eq!(y32.dtype(), DType::F32);
                assert_close(&format!("y f32 {what}"), &y32.to_vec::<f32>().unwrap(), &y, 1e-5, 1e-4);
                assert_close(&format!("norm f32 {what}"), &n32.to_f32_vec().unwrap(), &n, 1e-5, 1e-5);
            }
        }
    }
}

#[test]
fn l2_normalize_backward_matches_reference_on_odd_shapes() {
    let mut rng = rng(2);
    for dev in gpu_devices() {
        for dtype in [DType::F32, DType::BF16] {
            for &(r, c) in SHAPES {
                let x = rounded(&uniform(&mut rng, r * c, -2.0, 2.0), dtype);
                let dy = rounded(&uniform(&mut rng, r * c, -1.0, 1.0), dtype);
                let (mut y, mut n) = (vec![0.0; r * c], vec![0.0; r]);
                cpu::l2_normalize(&x, c, 1e-12, &mut y, &mut n);
                let y = rounded(&y, dtype);
                let mut dx = vec![0.0; r * c];
                cpu::l2_normalize_backward(&y, &n, &dy, c, 1e-12, &mut dx);
                let yt = Tensor::from_f32(&dev, &[r, c], &y, dtype).unwrap();
                let nt = Tensor::from_slice(&dev, &[r], &n).unwrap();
                let dyt = Tensor::from_f32(&dev, &[r, c], &dy, dtype).unwrap();
                let dxt = rowwise::l2_normalize_backward(&yt, &nt, &dyt, 1e-12).unwrap();
                let (atol, rtol) = tol(dtype);
                assert_close(&format!("dx {dev} {dtype:?} [{r},{c}]"), &dxt.to_f32_vec().unwrap(), &dx, atol, rtol);
            }
        }
    }
}

#[test]
fn softmax_and_log_softmax_match_reference_on_odd_shapes() {
    let mut rng = rng(3);
    for dev in gpu_devices() {
        for dtype in [DType::F32, DType::BF16] {
            for &(r, c) in SHAPES {
                // Large magnitudes: exp would overflow without the max shift.
                let mut x = uniform(&mut rng, r * c, -90.0, 90.0);
                if c > 2 {
                    x[1] = f32::NEG_INFINITY; // a masked logit
                }
                let xr = rounded(&x, dtype);
                let xt = Tensor::from_f32(&dev, &[r, c], &x, dtype).unwrap();
                for log in [false, true] {
                    let mut y = vec![0.0; r * c];
                    cpu::softmax(&xr, c, log, &mut y);
                    let yt = if log { rowwise::log_softmax(&xt) } else { rowwise::softmax(&xt) }.unwrap();
                    let (atol, rtol) = tol(dtype);
                    let what = format!("{} {dev} {dtype:?} [{r},{c}]", if log { "log_softmax" } else { "softmax" });
                    assert_close(&what, &yt.to_f32_vec().unwrap(), &y, atol, rtol);
                }
            }
        }
    }
}

#[test]
fn row_sum_matches_reference_on_odd_shapes() {
    let mut rng = rng(4);
    for dev in gpu_devices() {
        for dtype in [DType::F32, DType::BF16] {
            for &(r, c) in SHAPES {
                let x = rounded(&uniform(&mut rng, r * c, -1.0, 1.0), dtype);
                let mut want = vec![0.0; r];
                cpu::row_sum(&x, c, &mut want);
                let xt = Tensor::from_f32(&dev, &[r, c], &x, dtype).unwrap();
                let got = rowwise::row_sum(&xt).unwrap().to_f32_vec().unwrap();
                // f32 accumulation of c values in [-1, 1).
                assert_close(&format!("row_sum {dev} {dtype:?} [{r},{c}]"), &got, &want, 1e-5 * c as f32, 1e-5);
            }
        }
    }
}

#[test]
fn cpu_device_rounds_bf16_outputs_like_the_kernels() {
    let mut rng = rng(5);
    let x = uniform(&mut rng, 7 * 19, -3.0, 3.0);
    let cpu_t = Tensor::from_f32(&Device::cpu(), &[7, 19], &x, DType::BF16).unwrap();
    let sim_t = Tensor::from_f32(&Device::sim(), &[7, 19], &x, DType::BF16).unwrap();
    let a = rowwise::softmax(&cpu_t).unwrap().to_vec::<bf16>().unwrap();
    let b = rowwise::softmax(&sim_t).unwrap().to_vec::<bf16>().unwrap();
    let ulps = a.iter().zip(&b).map(|(p, q)| (p.to_bits() as i32 - q.to_bits() as i32).abs()).max().unwrap();
    assert!(ulps <= 1, "bf16 softmax differs by {ulps} ulp between CPU and simulator");
}

#[test]
fn l2_normalize_backward_reference_matches_finite_differences() {
    // L(x) = sum_i w_i y_i(x); dL/dx by central differences in f64 against
    // the reference gradient with dy = w.
    let mut rng = rng(6);
    let (r, c) = (3, 11);
    let x = uniform(&mut rng, r * c, -1.0, 1.0);
    let w = uniform(&mut rng, r * c, -1.0, 1.0);
    let loss = |x: &[f32]| -> f64 {
        let (mut y, mut n) = (vec![0.0; r * c], vec![0.0; r]);
        cpu::l2_normalize(x, c, 1e-12, &mut y, &mut n);
        y.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let (mut y, mut n) = (vec![0.0; r * c], vec![0.0; r]);
    cpu::l2_normalize(&x, c, 1e-12, &mut y, &mut n);
    let mut dx = vec![0.0; r * c];
    cpu::l2_normalize_backward(&y, &n, &w, c, 1e-12, &mut dx);
    for i in 0..r * c {
        let h = 1e-3f32;
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        assert!((fd - dx[i] as f64).abs() < 2e-3, "element {i}: finite difference {fd}, analytic {}", dx[i]);
    }
}

#[test]
fn clamped_rows_use_eps_in_both_directions() {
    // A row of zeros has norm 0 < eps: y = 0, dx = dy / eps.
    for dev in [Device::cpu(), Device::sim()] {
        let x = Tensor::from_slice(&dev, &[2, 3], &[0.0f32, 0.0, 0.0, 3.0, 0.0, 4.0]).unwrap();
        let (y, n) = rowwise::l2_normalize(&x, 1e-3).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![0.0, 0.0, 0.0, 0.6, 0.0, 0.8]);
        assert_eq!(n.to_vec::<f32>().unwrap(), vec![0.0, 5.0]);
        let dy = Tensor::from_slice(&dev, &[2, 3], &[1.0f32, -2.0, 0.5, 1.0, 1.0, 1.0]).unwrap();
        let dx = rowwise::l2_normalize_backward(&y, &n, &dy, 1e-3).unwrap().to_vec::<f32>().unwrap();
        assert_close("clamped row", &dx[..3], &[1000.0, -2000.0, 500.0], 1e-3, 1e-6);
    }
}

#[test]
fn softmax_rows_sum_to_one_and_log_softmax_is_its_log() {
    let mut rng = rng(7);
    let dev = Device::sim_with(gif_fr::SimOrder::Shuffle(9));
    let x = uniform(&mut rng, 4 * 1500, -5.0, 5.0);
    let xt = Tensor::from_slice(&dev, &[4, 1500], &x).unwrap();
    let p = rowwise::softmax(&xt).unwrap().to_vec::<f32>().unwrap();
    let lp = rowwise::log_softmax(&xt).unwrap().to_vec::<f32>().unwrap();
    for row in 0..4 {
        let s: f64 = p[row * 1500..(row + 1) * 1500].iter().map(|&v| v as f64).sum();
        assert!((s - 1.0).abs() < 1e-4, "row {row} sums to {s}");
    }
    let exp_lp: Vec<f32> = lp.iter().map(|v| v.exp()).collect();
    assert_close("exp(log_softmax)", &exp_lp, &p, 1e-7, 1e-4);
}

#[test]
fn empty_batches_give_empty_outputs() {
    for dev in [Device::cpu(), Device::sim()] {
        let x = Tensor::from_slice::<f32>(&dev, &[0, 7], &[]).unwrap();
        assert_eq!(rowwise::softmax(&x).unwrap().shape(), &[0, 7]);
        let (y, n) = rowwise::l2_normalize(&x, 1e-12).unwrap();
        assert_eq!((y.shape(), n.shape()), (&[0usize, 7][..], &[0usize][..]));
        assert_eq!(rowwise::row_sum(&x).unwrap().numel(), 0);
    }
}

#[test]
fn bad_inputs_get_typed_errors() {
    let dev = Device::sim();
    let x3 = Tensor::from_slice(&dev, &[2, 2, 2], &[1.0f32; 8]).unwrap();
    assert!(matches!(rowwise::softmax(&x3), Err(Error::Shape { .. })));
    let h = Tensor::from_f32(&dev, &[2, 2], &[1.0; 4], DType::F16).unwrap();
    assert!(matches!(rowwise::softmax(&h), Err(Error::InvalidArgument { .. })));
    let x = Tensor::from_slice(&dev, &[2, 2], &[1.0f32; 4]).unwrap();
    for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(rowwise::l2_normalize(&x, eps), Err(Error::InvalidArgument { .. })), "eps {eps}");
    }
    let (y, n) = rowwise::l2_normalize(&x, 1e-12).unwrap();
    let dy_wrong = Tensor::from_slice(&dev, &[2, 3], &[1.0f32; 6]).unwrap();
    assert!(matches!(rowwise::l2_normalize_backward(&y, &n, &dy_wrong, 1e-12), Err(Error::Shape { .. })));
    let dy_bf16 = Tensor::from_f32(&dev, &[2, 2], &[1.0; 4], DType::BF16).unwrap();
    assert!(matches!(rowwise::l2_normalize_backward(&y, &n, &dy_bf16, 1e-12), Err(Error::DType { .. })));
    let other = Tensor::from_slice(&Device::sim(), &[2, 2], &[1.0f32; 4]).unwrap();
    assert!(matches!(rowwise::l2_normalize_backward(&y, &n, &other, 1e-12), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(Tensor::from_slice(&dev, &[3, 2], &[1.0f32; 4]), Err(Error::Shape { .. })));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Any shape (both sides of the warp/block switch), any shuffled order:
    /// the simulated kernels agree with the references.
    #[test]
    fn any_shape_and_order_matches_reference(rows in 1usize..12, cols in 1usize..1400, seed in 0u64..1000) {
        let mut rng = rng(seed);
        let dev = Device::sim_with(gif_fr::SimOrder::Shuffle(seed));
        let x = uniform(&mut rng, rows * cols, -4.0, 4.0);
        let xt = Tensor::from_slice(&dev, &[rows, cols], &x).unwrap();
        let mut y = vec![0.0; rows * cols];
        cpu::softmax(&x, cols, true, &mut y);
        assert_close("log_softmax", &rowwise::log_softmax(&xt).unwrap().to_vec::<f32>().unwrap(), &y, 1e-5, 1e-4);
        let (mut yn, mut n) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::l2_normalize(&x, cols, 1e-12, &mut yn, &mut n);
        let (yt, nt) = rowwise::l2_normalize(&xt, 1e-12).unwrap();
        assert_close("l2 y", &yt.to_vec::<f32>().unwrap(), &yn, 1e-6, 1e-4);
        assert_close("l2 norm", &nt.to_vec::<f32>().unwrap(), &n, 1e-6, 1e-5);
    }
}

#[test]
fn to_f32_widens_on_the_device() {
    let mut r = rng(77);
    let v = uniform(&mut r, 1000, -3.0, 3.0);
    for dev in all_devices() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::from_f32(&dev, &[40, 25], &v, dtype).unwrap();
            let w = t.to_f32().unwrap();
            assert_eq!(w.dtype(), DType::F32);
            assert_eq!(w.shape(), &[40, 25]);
            assert_eq!(w.device(), &dev);
            assert_eq!(w.to_vec::<f32>().unwrap(), t.to_f32_vec().unwrap(), "{dev} {dtype:?}");
        }
    }
}

#[test]
fn narrow_into_rounds_to_nearest_even_on_the_device() {
    let mut r = rng(78);
    let mut v = uniform(&mut r, 997, -3.0, 3.0);
    // Ties (1 + 2^-8 lies halfway between two bf16 values), infinities, NaN,
    // a subnormal and signed zero.
    v[..8].copy_from_slice(&[
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-40,
        3e38,
        -1.5,
    ]);
    v[8] = f32::NAN;
    let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    for dev in all_devices() {
        let x = Tensor::from_slice(&dev, &[997], &v).unwrap();
        let mut out = Tensor::empty(&dev, &[997], DType::BF16).unwrap();
        x.narrow_into(&mut out).unwrap();
        let got: Vec<u16> = out.to_vec::<bf16>().unwrap().iter().map(|b| b.to_bits()).collect();
        assert!(bf16::from_bits(got[8]).is_nan(), "{dev}: NaN stays NaN");
        assert_eq!(got[..8], want[..8], "{dev}: special values");
        assert_eq!(got[9..], want[9..], "{dev}");
        let mut wrong = Tensor::empty(&dev, &[996], DType::BF16).unwrap();
        assert!(matches!(x.narrow_into(&mut wrong), Err(gif_fr::Error::Shape { .. })));
    }
}
