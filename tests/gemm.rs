//! GEMM against an f64 reference: every transpose variant, odd shapes
//! (1, 17, 127, 513 in every position), both load paths of each kernel,
//! alpha/beta; on the CPU, the simulator in three orders, and a GPU when
//! present (where cuBLAS is checked too).
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::ops::gemm::{self, cpu, Op};
use gif_fr::{DType, Device, Error, Tensor};
use half::bf16;

const OPS: [(Op, Op); 4] = [(Op::N, Op::N), (Op::N, Op::T), (Op::T, Op::N), (Op::T, Op::T)];

/// (M, N, K): each of 1, 17, 127, 513 in each position; multiples of 4
/// and 8 (vector loads, cp.async) that are not multiples of the tiles; more
/// than one block in M and N.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (17, 17, 17),
    (513, 17, 127),
    (127, 513, 17),
    (17, 127, 513),
    (1, 513, 1),
    (136, 264, 96),
    (260, 132, 36),
];

fn round(x: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => x.to_vec(),
    }
}

/// Σ_k |op(A)_ik op(B)_kj| scaled by |alpha|, plus |beta c|: the scale of
/// each element's rounding error.
#[allow(clippy::too_many_arguments)]
fn magnitude(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    beta: f32,
    c: &[f32],
) -> Vec<f64> {
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
    let cc = if beta != 0.0 { abs(c) } else { Vec::new() };
    cpu::reference_f64(m, n, k, alpha.abs() as f64, &abs(a), op_a, &abs(b), op_b, beta.abs() as f64, &cc)
}

#[allow(clippy::too_many_arguments)]
fn check_case(
    dev: &Device,
    dtype: DType,
    op_a: Op,
    op_b: Op,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    seed: u64,
) {
    let mut rng = rng(seed);
    let a = uniform(&mut rng, m * k, -1.0, 1.0);
    let b = uniform(&mut rng, k * n, -1.0, 1.0);
    let c0 = uniform(&mut rng, m * n, -1.0, 1.0);
    let a_shape = if op_a == Op::N { [m, k] } else { [k, m] };
    let b_shape = if op_b == Op::N { [k, n] } else { [n, k] };
    let at = Tensor::from_f32(dev, &a_shape, &a, dtype).unwrap();
    let bt = Tensor::from_f32(dev, &b_shape, &b, dtype).unwrap();
    let (ar, br) = (round(&a, dtype), round(&b, dtype));
    let want = cpu::reference_f64(m, n, k, alpha as f64, &ar, op_a, &br, op_b, beta as f64, &c0);
    let scale = magnitude(m, n, k, alpha, &ar, op_a, &br, op_b, beta, &c0);

    let mut runs: Vec<(&str, Vec<f32>)> = Vec::new();
    let mut ct = Tensor::from_slice(dev, &[m, n], &c0).unwrap();
    gemm::gemm(alpha, &at, op_a, &bt, op_b, beta, &mut ct).unwrap();
    runs.push(("gif-fr", ct.to_vec::<f32>().unwrap()));
    if dev.kind() == gif_fr::DeviceKind::Cuda {
        let mut ct = Tensor::from_slice(dev, &[m, n], &c0).unwrap();
        gemm::cublas_gemm(alpha, &at, op_a, &bt, op_b, beta, &mut ct).unwrap();
        runs.push(("cuBLAS", ct.to_vec::<f32>().unwrap()));
    }
    for (who, got) in runs {
        for i in 0..m * n {
            // fp32 accumulation over k terms: far below 2e-5 of the magnitude;
            // a wrong index or a missing tile is of the order of the magnitude.
            let tol = 2e-5 * scale[i] + 1e-6;
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{who} on {dev} {dtype:?} {op_a:?}{op_b:?} {m}x{n}x{k} alpha {alpha} beta {beta}: C[{}, {}] = {}, want {} (err {err:e}, tol {tol:e})",
                i / n,
                i % n,
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn gemm_f32_every_variant_on_odd_shapes_matches_f64() {
    for dev in all_devices() {
        for (i, &(op_a, op_b)) in OPS.iter().enumerate() {
            for (j, &shape) in SHAPES.iter().enumerate() {
                check_case(&dev, DType::F32, op_a, op_b, shape, 1.0, 0.0, (i * 100 + j) as u64);
            }
        }
    }
}

#[test]
fn gemm_bf16_every_variant_on_odd_shapes_matches_f64() {
    for dev in all_devices() {
        for (i, &(op_a, op_b)) in OPS.iter().enumerate() {
            for (j, &shape) in SHAPES.iter().enumerate() {
                check_case(&dev, DType::BF16, op_a, op_b, shape, 1.0, 0.0, (1000 + i * 100 + j) as u64);
            }
        }
    }
}

#[test]
fn gemm_applies_alpha_and_beta() {
    for dev in all_devices() {
        for dtype in [DType::F32, DType::BF16] {
            for &(alpha, beta) in &[(0.75f32, -0.5f32), (-2.0, 1.0), (0.0, 0.25)] {
                check_case(&dev, dtype, Op::N, Op::T, (33, 40, 72), alpha, beta, 7);
                check_case(&dev, dtype, Op::T, Op::N, (19, 130, 9), alpha, beta, 8);
            }
        }
    }
}

#[test]
fn bf16_gemm_is_within_1e_2_of_the_unrounded_product() {
    // METHOD.md: bf16 operands land between 1e-3 and 1e-2 relative error.
    let (m, n, k) = (96, 80, 256);
    let mut rng = rng(9);
    let a = uniform(&mut rng, m * k, -1.0, 1.0);
    let b = uniform(&mut rng, k * n, -1.0, 1.0);
    let exact = cpu::reference_f64(m, n, k, 1.0, &a, Op::N, &b, Op::N, 0.0, &[]);
    for dev in all_devices() {
        let at = Tensor::from_f32(&dev, &[m, k], &a, DType::BF16).unwrap();
        let bt = Tensor::from_f32(&dev, &[k, n], &b, DType::BF16).unwrap();
        let got = gemm::matmul(&at, Op::N, &bt, Op::N).unwrap().to_vec::<f32>().unwrap();
        let num: f64 = got.iter().zip(&exact).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
        let den: f64 = exact.iter().map(|w| w * w).sum();
        let rel = (num / den).sqrt();
        assert!(rel < 1e-2 && rel > 1e-5, "{dev}: relative error {rel:e}");
    }
}

#[test]
fn beta_zero_overwrites_nan_in_c_and_k_zero_scales_c() {
    for dev in all_devices() {
        for dtype in [DType::F32, DType::BF16] {
            let a = Tensor::from_f32(&dev, &[3, 5], &[0.5; 15], dtype).unwrap();
            let b = Tensor::from_f32(&dev, &[5, 2], &[2.0; 10], dtype).unwrap();
            let c = gemm::matmul(&a, Op::N, &b, Op::N).unwrap(); // C starts as NaN
            assert_eq!(c.to_vec::<f32>().unwrap(), vec![5.0; 6], "{dev} {dtype:?}");

            let a0 = Tensor::from_f32(&dev, &[3, 0], &[], dtype).unwrap();
            let b0 = Tensor::from_f32(&dev, &[0, 2], &[], dtype).unwrap();
            let mut c = Tensor::from_slice(&dev, &[3, 2], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
            gemm::gemm(1.0, &a0, Op::N, &b0, Op::N, 0.5, &mut c).unwrap();
            assert_eq!(c.to_vec::<f32>().unwrap(), vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "{dev} {dtype:?} K = 0");
        }
    }
}

#[test]
fn bad_gemm_inputs_get_typed_errors() {
    let dev = Device::sim();
    let a = Tensor::from_slice(&dev, &[4, 3], &[1.0f32; 12]).unwrap();
    let b = Tensor::from_slice(&dev, &[4, 2], &[1.0f32; 8]).unwrap();
    let mut c = Tensor::empty(&dev, &[4, 2], DType::F32).unwrap();
    assert!(matches!(gemm::gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut c), Err(Error::Shape { .. })));
    let b = Tensor::from_slice(&dev, &[3, 2], &[1.0f32; 6]).unwrap();
    let mut wrong_c = Tensor::empty(&dev, &[2, 4], DType::F32).unwrap();
    assert!(matches!(gemm::gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut wrong_c), Err(Error::Shape { .. })));
    let mut bf_c = Tensor::empty(&dev, &[4, 2], DType::BF16).unwrap();
    assert!(matches!(gemm::gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut bf_c), Err(Error::DType { .. })));
    let b16 = Tensor::from_f32(&dev, &[3, 2], &[1.0; 6], DType::BF16).unwrap();
    assert!(matches!(gemm::gemm(1.0, &a, Op::N, &b16, Op::N, 0.0, &mut c), Err(Error::InvalidArgument { .. })));
    assert!(matches!(gemm::gemm(f32::NAN, &a, Op::N, &b, Op::N, 0.0, &mut c), Err(Error::InvalidArgument { .. })));
    let elsewhere = Tensor::from_slice(&Device::sim(), &[3, 2], &[1.0f32; 6]).unwrap();
    assert!(matches!(gemm::gemm(1.0, &a, Op::N, &elsewhere, Op::N, 0.0, &mut c), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(gemm::cublas_gemm(1.0, &a, Op::N, &b, Op::N, 0.0, &mut c), Err(Error::InvalidArgument { .. })));
}

#[test]
fn cpu_gemm_checks_its_slices_instead_of_trusting_them() {
    use gif_fr::ops::gemm::cpu::gemm;
    let (a, b) = (vec![1.0f32; 6], vec![1.0f32; 6]);
    let mut c = vec![0f32; 4];
    // 2x3 · 3x2 fits.
    gemm(2, 2, 3, 1.0, &a, 3, Op::N, &b, 2, Op::N, 0.0, &mut c, 2).unwrap();
    assert_eq!(c, vec![3.0; 4]);
    // Too short, a leading dimension below the row, and strides whose span
    // overflows (it wrapped past the old assert: an out-of-bounds read).
    assert!(gemm(2, 2, 4, 1.0, &a, 4, Op::N, &b, 2, Op::N, 0.0, &mut c, 2).is_err());
    assert!(gemm(2, 2, 3, 1.0, &a, 2, Op::N, &b, 2, Op::N, 0.0, &mut c, 2).is_err());
    assert!(gemm(2, 2, 3, 1.0, &a, 3, Op::N, &b, 2, Op::N, 0.0, &mut c[..3], 2).is_err());
    assert!(gemm(2, 2, 3, 1.0, &a, usize::MAX / 2 + 2, Op::N, &b, 2, Op::N, 0.0, &mut c, 2).is_err());
    assert!(gemm(3, 2, 1, 1.0, &a, 1, Op::N, &b, 2, Op::N, 0.0, &mut c, usize::MAX).is_err());
    assert_eq!(c, vec![3.0; 4], "nothing is written on an error");
}
