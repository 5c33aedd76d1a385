//! Margins at the edges of f32, against an independent oracle: forward-mode
//! automatic differentiation in f64 of the margin softmax written from its
//! definition (the target angle as 2·atan2(‖û − ŵ‖, ‖û + ŵ‖), accurate at
//! any angle), compared with both heads' CPU paths, f64 references and
//! kernels (simulator; a GPU when present):
//! - the exact ArcFace gradient when the target angle θ is tiny (1e-5 ..
//!   1e-2 rad; it was wrong by 30-200x at θ ≈ 1e-4), s = 1 and s = 64;
//! - confident rows, whose loss (1e-8 and below) was computed as 0;
//! - insightface's CombinedMarginLoss semantics (no fallback, CosFace when
//!   m3 > 0, an error for m1 ≠ 1 without m3).
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use std::ops::{Add, Div, Mul, Neg, Sub};

use common::*;
use gif_fr::head::margin::margin_ce_row;
use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, Margin, MarginGrad, SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::{DType, Device, Tensor};
use rand::Rng;

/// A dual number: value and one directional derivative.
#[derive(Clone, Copy, Debug)]
struct D {
    v: f64,
    d: f64,
}
fn c(v: f64) -> D {
    D { v, d: 0.0 }
}
impl Add for D {
    type Output = D;
    fn add(self, o: D) -> D {
        D { v: self.v + o.v, d: self.d + o.d }
    }
}
impl Sub for D {
    type Output = D;
    fn sub(self, o: D) -> D {
        D { v: self.v - o.v, d: self.d - o.d }
    }
}
impl Mul for D {
    type Output = D;
    fn mul(self, o: D) -> D {
        D { v: self.v * o.v, d: self.d * o.v + self.v * o.d }
    }
}
impl Div for D {
    type Output = D;
    fn div(self, o: D) -> D {
        D { v: self.v / o.v, d: (self.d * o.v - self.v * o.d) / (o.v * o.v) }
    }
}
impl Neg for D {
    type Output = D;
    fn neg(self) -> D {
        D { v: -self.v, d: -self.d }
    }
}
impl D {
    fn sqrt(self) -> D {
        let r = self.v.sqrt();
        D { v: r, d: self.d / (2.0 * r) }
    }
    fn exp(self) -> D {
        let e = self.v.exp();
        D { v: e, d: self.d * e }
    }
    fn ln_1p(self) -> D {
        D { v: self.v.ln_1p(), d: self.d / (1.0 + self.v) }
    }
    fn ln(self) -> D {
        D { v: self.v.ln(), d: self.d / self.v }
    }
    fn cos(self) -> D {
        D { v: self.v.cos(), d: -self.d * self.v.sin() }
    }
    fn atan2(self, x: D) -> D {
        let r2 = self.v * self.v + x.v * x.v;
        D { v: self.v.atan2(x.v), d: (x.v * self.d - self.v * x.d) / r2 }
    }
}

fn norm(a: &[D]) -> D {
    a.iter().fold(c(0.0), |s, &x| s + x * x).sqrt()
}
fn dot(a: &[D], b: &[D]) -> D {
    a.iter().zip(b).fold(c(0.0), |s, (&x, &y)| s + x * y)
}

/// The margin on the target, from its angle θ (kind as the kernels: 1
/// ArcFace with fallback, 2 CosFace, 3 ArcFace without fallback).
fn margin_of(margin: Margin, theta: D) -> D {
    match margin {
        Margin::ArcFace(m) if theta.v + m as f64 >= std::f64::consts::PI => {
            theta.cos() - c(m as f64 * (m as f64).sin())
        }
        Margin::ArcFace(m) => (theta + c(m as f64)).cos(),
        Margin::Combined { m3, .. } if m3 > 0.0 => theta.cos() - c(m3 as f64),
        Margin::Combined { m2, .. } => (theta + c(m2 as f64)).cos(),
        Margin::CosFace(m) => theta.cos() - c(m as f64),
        Margin::None => theta.cos(),
    }
}

/// The mean margin-softmax cross-entropy of features `x` ([B, d]) against
/// centres `w` ([N, d]) with targets `y`, straight from the definition, in
/// dual numbers.
fn oracle_loss(x: &[D], w: &[D], y: &[usize], d: usize, s: f64, margin: Margin) -> D {
    let n = w.len() / d;
    let mut total = c(0.0);
    for (b, &t) in y.iter().enumerate() {
        let xb = &x[b * d..(b + 1) * d];
        let nx = norm(xb);
        let u: Vec<D> = xb.iter().map(|&v| v / nx).collect();
        let logits: Vec<D> = (0..n)
            .map(|k| {
                let wk = &w[k * d..(k + 1) * d];
                let nw = norm(wk);
                let wh: Vec<D> = wk.iter().map(|&v| v / nw).collect();
                if k == t {
                    let diff: Vec<D> = u.iter().zip(&wh).map(|(&a, &b)| a - b).collect();
                    let sum: Vec<D> = u.iter().zip(&wh).map(|(&a, &b)| a + b).collect();
                    let theta = c(2.0) * norm(&diff).atan2(norm(&sum));
                    c(s) * margin_of(margin, theta)
                } else {
                    c(s) * dot(&u, &wh)
                }
            })
            .collect();
        // −log p_t = log Σ_k exp(l_k − l_t) = log1p(Σ_{k≠t} exp(l_k − l_t)).
        let others = (0..n).filter(|&k| k != t).fold(c(0.0), |acc, k| acc + (logits[k] - logits[t]).exp());
        let ce = if others.v < 1e300 { others.ln_1p() } else { others.ln() };
        total = total + ce;
    }
    total / c(y.len() as f64)
}

/// Loss and gradients (features, centres) of the oracle, one direction at a
/// time.
fn oracle(x: &[f32], w: &[f32], y: &[usize], d: usize, s: f64, margin: Margin) -> (f64, Vec<f64>, Vec<f64>) {
    let lift = |v: &[f32], seed: Option<usize>| -> Vec<D> {
        v.iter().enumerate().map(|(i, &a)| D { v: a as f64, d: if seed == Some(i) { 1.0 } else { 0.0 } }).collect()
    };
    let loss = oracle_loss(&lift(x, None), &lift(w, None), y, d, s, margin).v;
    let gx = (0..x.len()).map(|i| oracle_loss(&lift(x, Some(i)), &lift(w, None), y, d, s, margin).d).collect();
    let gw = (0..w.len()).map(|i| oracle_loss(&lift(x, None), &lift(w, Some(i)), y, d, s, margin).d).collect();
    (loss, gx, gw)
}

/// A case: B = 3 features, N = 5 centres of d = 7; samples 0 and 1 share
/// target 2 at angles θ and 2θ from their features, sample 2 has target 4
/// at `theta2`. Values are f32 (the oracle differentiates the f32 inputs).
fn case(theta: f64, theta2: f64, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
    let (n, d) = (5, 7);
    let mut rng = rng(seed);
    let x64: Vec<f64> = (0..3 * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut w64: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    // A centre at angle a from feature b, of norm 1.7.
    let mut aim = |b: usize, k: usize, a: f64| {
        let xb = &x64[b * d..(b + 1) * d];
        let xn = xb.iter().map(|v| v * v).sum::<f64>().sqrt();
        let xh: Vec<f64> = xb.iter().map(|v| v / xn).collect();
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let along = r.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>();
        let p: Vec<f64> = r.iter().zip(&xh).map(|(a, b)| a - along * b).collect();
        let pn = p.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..d {
            w64[k * d + i] = 1.7 * (a.cos() * xh[i] + a.sin() * p[i] / pn);
        }
    };
    aim(0, 2, theta);
    aim(2, 4, theta2);
    // Sample 1: a feature at 2θ from centre 2.
    let w2: Vec<f64> = w64[2 * d..3 * d].to_vec();
    let mut x = x64.clone();
    {
        let wn = w2.iter().map(|v| v * v).sum::<f64>().sqrt();
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let along = r.iter().zip(&w2).map(|(a, b)| a * b / wn).sum::<f64>();
        let p: Vec<f64> = r.iter().zip(&w2).map(|(a, b)| a - along * b / wn).collect();
        let pn = p.iter().map(|v| v * v).sum::<f64>().sqrt();
        for i in 0..d {
            x[d + i] = 0.8 * ((2.0 * theta).cos() * w2[i] / wn + (2.0 * theta).sin() * p[i] / pn);
        }
    }
    (x.iter().map(|&v| v as f32).collect(), w64.iter().map(|&v| v as f32).collect(), vec![2, 2, 4])
}

/// ‖got − want‖ ≤ tol·‖want‖ for each row of `d` values, and overall.
fn close_rows(what: &str, got: &[f32], want: &[f64], d: usize, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let all: f64 = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    for (r, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let err = g.iter().zip(w).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
        let scale = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        // A row far below the rest (a class no sample is near) is held to
        // the overall scale: f32 cannot resolve it relative to itself.
        let bound = tol * scale.max(1e-3 * all);
        assert!(err <= bound, "{what} row {r}: error {err:e} > {bound:e} (|row| {scale:e}, |all| {all:e})");
    }
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol * want.abs(), "{what}: {got:e} vs {want:e}");
}

/// What the oracle says of a case: loss, feature and centre gradients.
struct Want {
    loss: f64,
    gx: Vec<f64>,
    gw: Vec<f64>,
}

/// Both heads on `dev` (the softmax head over the 5 centres; the code head
/// with one position over 5 tokens, identity i having code [i]) against
/// the oracle. `grads`: compare the gradients too (they equal the oracle's
/// only for exact gradients or without a margin).
#[allow(clippy::too_many_arguments)]
fn check_heads(
    dev: &Device,
    x: &[f32],
    w: &[f32],
    y: &[usize],
    (margin, grad, s): (Margin, MarginGrad, f32),
    want: &Want,
    grads: bool,
    what: &str,
) {
    let d = 7;
    let labels: Vec<u32> = y.iter().map(|&t| t as u32).collect();
    let xt = Tensor::from_slice(dev, &[3, d], x).unwrap();
    let centres = || Tensor::from_slice(dev, &[5, d], w).unwrap();
    let cfg = SoftmaxHeadConfig { margin, margin_grad: grad, scale: s, ..SoftmaxHeadConfig::new(d, 5) };
    let (loss, g) = SoftmaxHead::from_weights(cfg, centres()).unwrap().forward_backward(&xt, &labels).unwrap();
    let mut runs = vec![("softmax head", loss.loss, g.features, g.centres)];
    let cfg = CodeHeadConfig { margin, margin_grad: grad, scale: s, gamma: 0.0, ..CodeHeadConfig::new(d, 1, 5) };
    let table = CodeTable::new(dev, (0..5).collect(), 1, 5, None).unwrap();
    let code = CodeHead::from_weights(cfg, centres().reshape(&[1, 5, d]).unwrap(), None).unwrap();
    let (loss, g) = code.forward_backward(&xt, &labels, &table).unwrap();
    runs.push(("code head", loss.total, g.features, g.centres.reshape(&[5, d]).unwrap()));
    for (head, loss, gx, gw) in runs {
        let h = format!("{head} on {dev}, {margin:?} {grad:?}, s {s}, {what}");
        close(&format!("{h}: loss"), loss, want.loss, 1e-4);
        if grads {
            close_rows(&format!("{h}: features"), &gx.to_vec().unwrap(), &want.gx, d, 1e-4);
            close_rows(&format!("{h}: centres"), &gw.to_vec().unwrap(), &want.gw, d, 1e-4);
        }
    }
}

const EXACT_ARCS: [Margin; 2] = [Margin::ArcFace(0.5), Margin::INSIGHTFACE_ARCFACE];

#[test]
fn exact_arcface_gradients_hold_at_tiny_angles_on_both_heads() {
    let d = 7;
    for margin in EXACT_ARCS {
        for s in [1.0f32, 64.0] {
            for (i, theta) in [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.4].into_iter().enumerate() {
                let (x, w, y) = case(theta, 1.3, 100 + i as u64);
                let (loss, gx, gw) = oracle(&x, &w, &y, d, s as f64, margin);
                let want = Want { loss, gx, gw };
                for dev in all_devices() {
                    let what = format!("θ {theta:e}");
                    check_heads(&dev, &x, &w, &y, (margin, MarginGrad::Exact, s), &want, true, &what);
                }
                // The f64 references.
                let cfg = SoftmaxHeadConfig {
                    margin,
                    margin_grad: MarginGrad::Exact,
                    scale: s,
                    ..SoftmaxHeadConfig::new(d, 5)
                };
                let t: Vec<i32> = y.iter().map(|&v| v as i32).collect();
                let (loss, gx, gw) = gif_fr::head::softmax_head::cpu::reference(&cfg, &x, &w, None, 5, &t);
                let h = format!("softmax reference, {margin:?}, s {s}, θ {theta:e}");
                close(&format!("{h}: loss"), loss.loss, want.loss, 1e-6);
                let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
                close_rows(&format!("{h}: features"), &f(&gx), &want.gx, d, 1e-5);
                close_rows(&format!("{h}: centres"), &f(&gw), &want.gw, d, 1e-5);
            }
        }
    }
}

#[test]
fn confident_rows_keep_their_loss_and_gradient() {
    // Targets at 0.05 rad, other centres far: losses from 3.9e-4 (s = 12)
    // down to 1e-21 (s = 48); below about 1e-7 they were computed as 0.
    let d = 7;
    for margin in [Margin::INSIGHTFACE_ARCFACE, Margin::CosFace(0.35), Margin::None] {
        for grad in [MarginGrad::Exact, MarginGrad::StraightThrough] {
            for s in [12.0f32, 30.0, 48.0] {
                let (x, mut w, y) = case(0.05, 0.05, 7);
                // Push the other centres away from every feature.
                for k in [0usize, 1, 3] {
                    for i in 0..d {
                        w[k * d + i] = -x[i] - x[d + i] - x[2 * d + i] + 0.1 * i as f32;
                    }
                }
                let (loss, gx, gw) = oracle(&x, &w, &y, d, s as f64, margin);
                assert!(loss > 0.0 && loss < 1e-3, "the case is confident: {loss:e}");
                let want = Want { loss, gx, gw };
                let grads = grad == MarginGrad::Exact || margin == Margin::None;
                for dev in all_devices() {
                    check_heads(&dev, &x, &w, &y, (margin, grad, s), &want, grads, &format!("loss {loss:e}"));
                }
            }
        }
    }
}

#[test]
fn combined_margin_follows_insightface() {
    let sin = |c: f64| (1.0 - c * c).sqrt();
    // (1, m2, 0): cos(θ + m2) for every θ, no fallback past θ + m2 = π.
    let arc = Margin::Combined { m1: 1.0, m2: 0.5, m3: 0.0 };
    for c in [0.9f64, 0.1, -0.8, -0.95, -0.999] {
        let want = (c.acos() + 0.5).cos();
        assert!((arc.target(c, sin(c)).f - want).abs() < 1e-12, "c {c}");
    }
    // The old ArcFace falls back to c − m·sin m past π − m.
    assert!((Margin::ArcFace(0.5).target(-0.95, sin(-0.95)).f - (-0.95 - 0.5 * 0.5f64.sin())).abs() < 1e-12);
    // m3 > 0: CosFace, m1 and m2 ignored as insightface does.
    for m in [Margin::Combined { m1: 1.0, m2: 0.0, m3: 0.4 }, Margin::Combined { m1: 0.7, m2: 0.3, m3: 0.4 }] {
        assert!((m.target(0.6, 0.8).f - 0.2).abs() < 1e-7, "{m:?}");
    }
    // Straight-through: the gradient with respect to the cosines is s·(p − onehot).
    let cos = [0.2, 0.7, -0.1];
    let r = margin_ce_row(&cos, 1, sin(0.7), 8.0, arc, MarginGrad::StraightThrough).unwrap();
    let lg: Vec<f64> = (0..3).map(|k| 8.0 * if k == 1 { (0.7f64.acos() + 0.5).cos() } else { cos[k] }).collect();
    let z: f64 = lg.iter().map(|v| v.exp()).sum();
    for (k, (&g, &l)) in r.grad.iter().zip(&lg).enumerate() {
        assert!((g - 8.0 * (l.exp() / z - if k == 1 { 1.0 } else { 0.0 })).abs() < 1e-12);
    }
    assert!((r.loss - (z.ln() - lg[1])).abs() < 1e-12);
    // What insightface refuses, and bad rows, are errors.
    let dev = Device::cpu();
    for bad in [
        Margin::Combined { m1: 1.35, m2: 0.0, m3: 0.0 },
        Margin::Combined { m1: 1.0, m2: f32::NAN, m3: 0.0 },
        Margin::Combined { m1: 1.0, m2: 0.5, m3: -0.1 },
    ] {
        let cfg = SoftmaxHeadConfig { margin: bad, ..SoftmaxHeadConfig::new(4, 3) };
        assert!(SoftmaxHead::new(cfg, &dev, DType::F32, 0).is_err(), "{bad:?}");
        let cfg = CodeHeadConfig { margin: bad, ..CodeHeadConfig::new(4, 1, 3) };
        assert!(CodeHead::new(cfg, &dev, 0).is_err(), "{bad:?}");
    }
    assert!(margin_ce_row(&cos, 3, 0.5, 8.0, arc, MarginGrad::Exact).is_err(), "target out of range");
    assert!(margin_ce_row(&[], 0, 0.5, 8.0, arc, MarginGrad::Exact).is_err(), "empty row");
    assert!(margin_ce_row(&[0.1, f64::NAN], 0, 0.5, 8.0, arc, MarginGrad::Exact).is_err(), "NaN cosine");
}

#[test]
fn defaults_are_insightfaces() {
    let c = CodeHeadConfig::new(512, 6, 16);
    assert_eq!((c.margin, c.margin_grad, c.scale), (Margin::INSIGHTFACE_ARCFACE, MarginGrad::StraightThrough, 64.0));
    let s = SoftmaxHeadConfig::new(512, 1000);
    assert_eq!((s.margin, s.margin_grad, s.scale), (Margin::INSIGHTFACE_ARCFACE, MarginGrad::StraightThrough, 64.0));
}
