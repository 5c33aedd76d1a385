//! The convolution: its CPU reference against an independent direct formula,
//! finite differences for both gradients (the loss Σ y·g is linear, so
//! central differences are exact up to rounding) and the adjoint identity
//! <conv(x), g> = <x, dgrad(g)>; the OIHW → OHWI conversion; and the
//! implicit-GEMM kernels (forward, data and weight gradient) against the
//! reference on the simulator (three orders) and a GPU when present, at
//! IResNet's kinds of layers (3x3 pad 1 stride 1 and 2, 1x1 stride 2, the
//! 3-channel stem), scalar and vector-load paths, several tiles; the same
//! for the bf16 tensor-core kernels (and the CPU path with bf16 operands).
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::backbone::conv::cpu;
use gif_fr::backbone::{conv2d, conv2d_data_grad, conv2d_weight_grad, ConvShape};
use gif_fr::{DType, Device, Error, Tensor};

const SHAPES: [ConvShape; 4] = [
    ConvShape { batch: 2, height: 5, width: 6, c_in: 3, c_out: 4, kernel: 3, stride: 1, pad: 1 },
    ConvShape { batch: 1, height: 7, width: 6, c_in: 4, c_out: 5, kernel: 3, stride: 2, pad: 1 },
    ConvShape { batch: 2, height: 6, width: 5, c_in: 4, c_out: 3, kernel: 1, stride: 2, pad: 0 },
    ConvShape { batch: 1, height: 4, width: 4, c_in: 3, c_out: 6, kernel: 3, stride: 1, pad: 1 },
];

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[test]
fn forward_matches_the_direct_formula() {
    for (n, s) in SHAPES.iter().enumerate() {
        let mut r = rng(n as u64);
        let (nx, nw, ny) = s.sizes().unwrap();
        let (x, w) = (uniform(&mut r, nx, -1.0, 1.0), uniform(&mut r, nw, -1.0, 1.0));
        let y = cpu::forward(s, &x, &w);
        assert_eq!(y.len(), ny);
        close(&format!("{s:?} forward_gemm"), &cpu::forward_gemm(s, &x, &w), &y, 1e-5);
        let (ho, wo) = s.out_hw().unwrap();
        let k = s.kernel;
        for b in 0..s.batch {
            for oy in 0..ho {
                for ox in 0..wo {
                    for co in 0..s.c_out {
                        let mut acc = 0f64;
                        for r_ in 0..k {
                            for q in 0..k {
                                let (iy, ix) = (
                                    (oy * s.stride + r_) as i64 - s.pad as i64,
                                    (ox * s.stride + q) as i64 - s.pad as i64,
                                );
                                if iy < 0 || ix < 0 || iy >= s.height as i64 || ix >= s.width as i64 {
                                    continue;
                                }
                                for ci in 0..s.c_in {
                                    let xv = x[((b * s.height + iy as usize) * s.width + ix as usize) * s.c_in + ci];
                                    acc += xv as f64 * w[((co * k + r_) * k + q) * s.c_in + ci] as f64;
                                }
                            }
                        }
                        let got = y[((b * ho + oy) * wo + ox) * s.c_out + co];
                        assert!((got as f64 - acc).abs() < 1e-5, "{s:?} ({b},{oy},{ox},{co}): {got} vs {acc}");
                    }
                }
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences_and_the_adjoint() {
    for (n, s) in SHAPES.iter().enumerate() {
        let mut r = rng(100 + n as u64);
        let (nx, nw, ny) = s.sizes().unwrap();
        let (x, w, g) =
            (uniform(&mut r, nx, -1.0, 1.0), uniform(&mut r, nw, -1.0, 1.0), uniform(&mut r, ny, -1.0, 1.0));
        let dx = cpu::data_grad(s, &g, &w);
        let dw = cpu::weight_grad(s, &x, &g);
        // The CPU path's im2col / col2im + GEMM gradients equal the direct reference.
        close(&format!("{s:?} data_grad_gemm"), &cpu::data_grad_gemm(s, &g, &w), &dx, 1e-5);
        close(&format!("{s:?} weight_grad_gemm"), &cpu::weight_grad_gemm(s, &x, &g), &dw, 1e-5);
        // Adjoint: <conv(x, w), g> = <x, dgrad(g, w)> = <w, wgrad(x, g)>.
        let lhs = dot(&cpu::forward(s, &x, &w), &g);
        assert!((lhs - dot(&x, &dx)).abs() < 1e-4 * lhs.abs().max(1.0), "{s:?}: data-gradient adjoint");
        assert!((lhs - dot(&w, &dw)).abs() < 1e-4 * lhs.abs().max(1.0), "{s:?}: weight-gradient adjoint");
        let h = 1e-2f32;
        let loss = |x: &[f32], w: &[f32]| dot(&cpu::forward(s, x, w), &g);
        for i in (0..nx).step_by(3) {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p, &w) - loss(&m, &w)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 1e-3, "{s:?} dx[{i}]: fd {fd} vs {}", dx[i]);
        }
        for i in (0..nw).step_by(2) {
            let (mut p, mut m) = (w.clone(), w.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&x, &p) - loss(&x, &m)) / (2.0 * h as f64);
            assert!((fd - dw[i] as f64).abs() < 1e-3, "{s:?} dw[{i}]: fd {fd} vs {}", dw[i]);
        }
    }
}

#[test]
fn oihw_weights_convert_to_ohwi() {
    let (co, ci, k) = (3, 2, 3);
    let w: Vec<f32> = (0..co * ci * k * k).map(|i| i as f32).collect();
    let o = cpu::oihw_to_ohwi(&w, co, ci, k);
    // OIHW [o][i][r][q] = ((o·ci + i)·k + r)·k + q lands at OHWI [o][r][q][i].
    for (oo, ii, r, q) in [(0, 0, 0, 0), (2, 1, 2, 1), (1, 0, 1, 2)] {
        assert_eq!(o[((oo * k + r) * k + q) * ci + ii], (((oo * ci + ii) * k + r) * k + q) as f32);
    }
    let mut sorted = o.clone();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(sorted, w, "a permutation");
}

#[test]
fn bad_shapes_are_errors() {
    let good = SHAPES[0];
    assert!(good.validate("t").is_ok());
    for bad in [
        ConvShape { stride: 0, ..good },
        ConvShape { c_in: 0, ..good },
        ConvShape { kernel: 9, pad: 0, ..good },
        ConvShape { batch: 0, ..good },
        ConvShape { height: 0, ..good },
        // Sizes that overflow (unchecked, they wrapped or panicked).
        ConvShape { pad: usize::MAX / 2 + 1, ..good },
        ConvShape { kernel: usize::MAX, ..good },
        ConvShape { batch: usize::MAX / 2, ..good },
        ConvShape { c_in: 1 << 40, c_out: 1 << 40, ..good },
    ] {
        assert!(bad.validate("t").is_err(), "{bad:?}");
        assert!(bad.sizes().is_err(), "{bad:?}");
    }
    // A kernel larger than the padded input has no output (it underflowed).
    assert!(ConvShape { kernel: 9, pad: 0, ..good }.out_hw().is_err());
    assert!(ConvShape { stride: 0, ..good }.out_hw().is_err());
    let (h, w) = good.out_hw().unwrap();
    assert_eq!(
        (h, w),
        (
            (good.height + 2 * good.pad - good.kernel) / good.stride + 1,
            (good.width + 2 * good.pad - good.kernel) / good.stride + 1
        )
    );
}

/// |got − want| ≤ tol·max|want|.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale})");
    }
}

/// The three convolution ops on `dev` at `s` with `dtype` operands (the
/// random values rounded to it first) against the f64 reference of the
/// rounded values.
fn compare(dev: &Device, s: &ConvShape, dtype: DType, seed: u64) {
    let mut r = rng(seed);
    let (nx, nw, ny) = s.sizes().unwrap();
    let (ho, wo) = s.out_hw().unwrap();
    let round = |v: Vec<f32>| -> Vec<f32> {
        if dtype == DType::BF16 {
            v.into_iter().map(|a| half::bf16::from_f32(a).to_f32()).collect()
        } else {
            v
        }
    };
    let (x, w, g) = (
        round(uniform(&mut r, nx, -1.0, 1.0)),
        round(uniform(&mut r, nw, -1.0, 1.0)),
        round(uniform(&mut r, ny, -1.0, 1.0)),
    );
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(dev, shape, v, dtype).unwrap();
    let xt = t(&x, &[s.batch, s.height, s.width, s.c_in]);
    let wt = t(&w, &[s.c_out, s.kernel, s.kernel, s.c_in]);
    let gt = t(&g, &[s.batch, ho, wo, s.c_out]);
    let what = format!("{dev} {dtype:?} {s:?}");
    close(&format!("{what} y"), &conv2d(&xt, &wt, s).unwrap().to_vec::<f32>().unwrap(), &cpu::forward(s, &x, &w), 1e-5);
    close(
        &format!("{what} dx"),
        &conv2d_data_grad(&gt, &wt, s).unwrap().to_vec::<f32>().unwrap(),
        &cpu::data_grad(s, &g, &w),
        1e-5,
    );
    close(
        &format!("{what} dw"),
        &conv2d_weight_grad(&xt, &gt, s).unwrap().to_vec::<f32>().unwrap(),
        &cpu::weight_grad(s, &x, &g),
        1e-5,
    );
}

#[test]
fn kernels_match_the_reference() {
    let cases = [
        SHAPES[0],
        SHAPES[1],
        SHAPES[2],
        SHAPES[3],
        // Vector loads (C % 4 == 0), stride 2, several pixel tiles.
        ConvShape { batch: 2, height: 13, width: 11, c_in: 8, c_out: 12, kernel: 3, stride: 2, pad: 1 },
        // An IResNet block's conv at reduced size: K = 9·16 > one k-tile; M = 2·10·9 > 128.
        ConvShape { batch: 2, height: 10, width: 9, c_in: 16, c_out: 20, kernel: 3, stride: 1, pad: 1 },
        // The downsample (1x1 stride 2) and a scalar path with K not a multiple of 16.
        ConvShape { batch: 3, height: 8, width: 8, c_in: 8, c_out: 16, kernel: 1, stride: 2, pad: 0 },
        ConvShape { batch: 1, height: 9, width: 9, c_in: 5, c_out: 7, kernel: 3, stride: 2, pad: 1 },
    ];
    for (n, s) in cases.iter().enumerate() {
        for dev in gpu_devices() {
            compare(&dev, s, DType::F32, 500 + n as u64);
        }
    }
}

/// The bf16 tensor-core kernels: element-load paths (channels not multiples
/// of 8) and cp.async paths (multiples of 8), several 128-wide tiles along
/// M and N, K over several 32-wide k-tiles, the weight gradient split over
/// pixel ranges; and the CPU path with bf16 operands.
#[test]
fn bf16_kernels_match_the_reference() {
    let cases = [
        SHAPES[0],
        SHAPES[1],
        ConvShape { batch: 1, height: 9, width: 9, c_in: 5, c_out: 7, kernel: 3, stride: 2, pad: 1 },
        ConvShape { batch: 2, height: 12, width: 11, c_in: 24, c_out: 136, kernel: 3, stride: 1, pad: 1 },
        ConvShape { batch: 2, height: 13, width: 11, c_in: 16, c_out: 8, kernel: 3, stride: 2, pad: 1 },
        ConvShape { batch: 3, height: 8, width: 8, c_in: 8, c_out: 16, kernel: 1, stride: 2, pad: 0 },
        ConvShape { batch: 1, height: 12, width: 12, c_in: 136, c_out: 16, kernel: 3, stride: 1, pad: 1 },
    ];
    for (n, s) in cases.iter().enumerate() {
        for dev in all_devices() {
            compare(&dev, s, DType::BF16, 700 + n as u64);
        }
    }
}

#[test]
fn kernels_match_at_iresnet_shapes_on_a_gpu() {
    let Some(dev) = cuda() else { return };
    for s in [
        ConvShape { batch: 8, height: 56, width: 56, c_in: 64, c_out: 64, kernel: 3, stride: 1, pad: 1 },
        ConvShape { batch: 8, height: 28, width: 28, c_in: 64, c_out: 128, kernel: 3, stride: 2, pad: 1 },
        ConvShape { batch: 8, height: 28, width: 28, c_in: 64, c_out: 128, kernel: 1, stride: 2, pad: 0 },
        ConvShape { batch: 4, height: 112, width: 112, c_in: 3, c_out: 64, kernel: 3, stride: 1, pad: 1 },
        ConvShape { batch: 8, height: 14, width: 14, c_in: 256, c_out: 512, kernel: 3, stride: 2, pad: 1 },
    ] {
        for dtype in [DType::F32, DType::BF16] {
            compare(&dev, &s, dtype, s.c_out as u64);
        }
    }
}

#[test]
fn kernel_bad_input_is_a_clear_error() {
    let s = SHAPES[0];
    for dev in [Device::cpu(), Device::sim()] {
        let x = Tensor::from_slice(&dev, &[2, 5, 6, 4], &[0.5f32; 240]).unwrap();
        let w = Tensor::from_slice(&dev, &[4, 3, 3, 3], &[0.5f32; 108]).unwrap();
        assert!(matches!(conv2d(&x, &w, &s), Err(Error::Shape { .. })), "{dev}: channels");
        let bad = ConvShape { stride: 0, ..s };
        assert!(matches!(conv2d(&x, &w, &bad), Err(Error::InvalidArgument { .. })), "{dev}: stride 0");
        assert!(matches!(conv2d_data_grad(&x, &w, &bad), Err(Error::InvalidArgument { .. })), "{dev}: stride 0");
        // Mixed operand dtypes, and f16 operands, are errors.
        let (x3, w3) = (
            Tensor::from_slice(&dev, &[2, 5, 6, 3], &[0.5f32; 180]).unwrap(),
            Tensor::from_f32(&dev, &[4, 3, 3, 3], &[0.5f32; 108], DType::BF16).unwrap(),
        );
        assert!(matches!(conv2d(&x3, &w3, &s), Err(Error::Shape { .. })), "{dev}: f32 x, bf16 w");
        let h = Tensor::from_f32(&dev, &[2, 5, 6, 3], &[0.5f32; 180], DType::F16).unwrap();
        assert!(matches!(conv2d(&h, &w3, &s), Err(Error::InvalidArgument { .. })), "{dev}: f16");
    }
}
