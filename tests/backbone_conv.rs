//! The convolution's CPU reference (the kernels' future oracle): an
//! independent direct formula for the forward pass, finite differences for
//! both gradients (the loss Σ y·g is linear, so central differences are
//! exact up to rounding), the adjoint identity <conv(x), g> = <x, dgrad(g)>,
//! and the OIHW → OHWI conversion, at IResNet's kinds of layers: 3x3 pad 1
//! stride 1 and 2, 1x1 stride 2 (the downsample), the 3-channel stem.

mod common;

use common::*;
use gif_fr::backbone::conv::cpu;
use gif_fr::backbone::ConvShape;

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
        let (nx, nw, ny) = s.sizes();
        let (x, w) = (uniform(&mut r, nx, -1.0, 1.0), uniform(&mut r, nw, -1.0, 1.0));
        let y = cpu::forward(s, &x, &w);
        assert_eq!(y.len(), ny);
        let (ho, wo) = s.out_hw();
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
        let (nx, nw, ny) = s.sizes();
        let (x, w, g) =
            (uniform(&mut r, nx, -1.0, 1.0), uniform(&mut r, nw, -1.0, 1.0), uniform(&mut r, ny, -1.0, 1.0));
        let dx = cpu::data_grad(s, &g, &w);
        let dw = cpu::weight_grad(s, &x, &g);
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
    ] {
        assert!(bad.validate("t").is_err(), "{bad:?}");
    }
}
