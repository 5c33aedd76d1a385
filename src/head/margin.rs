//! Angular margins on the target logit and the margin softmax
//! cross-entropy of one row of cosines, in f64: the reference of the kernels
//! (kernels/margin.cuh `margin_target`, the heads' softmax kernels).
//!
//! Every margin is a function f of the target's cosine c = cos θ; the
//! target logit is `s·f(c)`, every other logit `s·c`. docs/margins.md
//! states each formula and its gradient.
//!
//! Precision. For the angular margins, f and f′ need sin θ. Derived from a
//! cosine that rounds to 1 (θ below about 3e-4 in f32), `sqrt(1 − c²)` is
//! wrong by orders of magnitude, and the exact gradient carries the term
//! `c·sin m / sin θ` — a unit vector times `c·sin m`, whose direction is
//! lost in f32 cancellation. So the heads compute the target's cosine, sine
//! and unit tangent directions from the raw vectors in f64 ([`Angle`]), and
//! split the exact derivative `f′(c) = df + sing/sin θ` into a regular part
//! (through the cosine, like every other logit) and a singular part applied
//! along the unit tangent. The loss uses `log1p` and the target's gradient
//! `−s·Σ_{k≠y} p_k`, so confident rows keep their (tiny) loss and gradient.

use crate::error::{Error, Result};

/// The margin applied to the target class's cosine `c = cos θ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Margin {
    /// Plain normalized softmax: `f(c) = c`.
    None,
    /// insightface arcface_torch's `CombinedMarginLoss(s, m1, m2, m3)`, the
    /// training config's `margin_list = (m1, m2, m3)`, exactly:
    /// - `m1 = 1, m3 = 0`: `f(c) = cos(arccos(c) + m2)` for every θ (no
    ///   fallback; c clamped to [−1, 1]): ArcFace, `(1.0, 0.5, 0.0)`;
    /// - `m3 > 0`: `f(c) = c − m3`, m1 and m2 ignored (as insightface's code
    ///   does): CosFace, `(1.0, 0.0, 0.4)`;
    /// - anything else is an error (insightface raises).
    ///
    /// insightface computes the margin under `no_grad`: use it with
    /// [`MarginGrad::StraightThrough`] to reproduce its gradients.
    Combined {
        /// Multiplicative angular margin; must be 1 unless m3 > 0.
        m1: f32,
        /// Additive angular margin (ArcFace).
        m2: f32,
        /// Additive cosine margin (CosFace).
        m3: f32,
    },
    /// ArcFace with the fallback of insightface's earlier `ArcFace` module
    /// (`easy_margin = False`): `f(c) = cos(θ + m)` while `θ + m < π`, else
    /// `c − m·sin m`, which keeps f decreasing in θ.
    ArcFace(f32),
    /// CosFace: `f(c) = c − m`.
    CosFace(f32),
}

/// How the gradient passes through the margin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarginGrad {
    /// The derivative of `f`.
    Exact,
    /// As if `f(c) = c + const`: the gradient with respect to the cosine is
    /// `s·(p − y)`, as insightface computes it (its margin is applied
    /// under no_grad).
    StraightThrough,
}

/// The target's margin at one cosine: `f(c)`, and `f′(c) = df + sing / sin θ`
/// split into its regular part `df` and the coefficient `sing` of the
/// singular part (0 for margins without one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// `f(c)`.
    pub f: f64,
    /// The regular part of `f′(c)`.
    pub df: f64,
    /// `f′(c) − df = sing / sin θ`.
    pub sing: f64,
}

impl Margin {
    /// insightface's default: `margin_list = (1.0, 0.5, 0.0)`, ArcFace.
    pub const INSIGHTFACE_ARCFACE: Margin = Margin::Combined { m1: 1.0, m2: 0.5, m3: 0.0 };
    /// insightface's CosFace: `margin_list = (1.0, 0.0, 0.4)`.
    pub const INSIGHTFACE_COSFACE: Margin = Margin::Combined { m1: 1.0, m2: 0.0, m3: 0.4 };

    /// (kind, m) as the kernels take them: 0 none, 1 ArcFace with fallback,
    /// 2 CosFace (`c − m`), 3 ArcFace without fallback (`cos(θ + m)`).
    pub(crate) fn kernel_args(self) -> (i32, f32) {
        match self {
            Margin::None => (0, 0.0),
            Margin::ArcFace(m) => (1, m),
            Margin::CosFace(m) => (2, m),
            Margin::Combined { m3, .. } if m3 > 0.0 => (2, m3),
            Margin::Combined { m2, .. } => (3, m2),
        }
    }

    /// Whether f depends on sin θ (the angular margins): the heads then
    /// compute the target's angle from the vectors in f64.
    pub(crate) fn is_angular(self) -> bool {
        matches!(self.kernel_args().0, 1 | 3)
    }

    /// The margin at cosine `c` whose angle has sine `sin_t` (≥ 0; from the
    /// vectors, see [`Angle`]).
    pub fn target(self, c: f64, sin_t: f64) -> Target {
        let (kind, m) = self.kernel_args();
        let (m, c) = (m as f64, c.clamp(-1.0, 1.0));
        let (cm, sm) = (m.cos(), m.sin());
        let plain = |f: f64| Target { f, df: 1.0, sing: 0.0 };
        match kind {
            2 => plain(c - m),
            1 if c <= -cm => plain(c - m * sm),
            1 | 3 => Target { f: c * cm - sin_t * sm, df: cm, sing: c * sm },
            _ => plain(c),
        }
    }

    /// Checks the margin is usable: finite; ArcFace and CosFace in [0, π/2];
    /// `Combined` with m3 in [0, 2], m2 in [0, π], and m1 = 1 unless m3 > 0.
    pub(crate) fn validate(self, op: &'static str) -> Result<()> {
        match self {
            Margin::None => Ok(()),
            Margin::ArcFace(m) | Margin::CosFace(m) => {
                if !(m.is_finite() && (0.0..=std::f32::consts::FRAC_PI_2).contains(&m)) {
                    return Err(Error::invalid(op, format!("margin must be in [0, π/2], got {m}")));
                }
                Ok(())
            }
            Margin::Combined { m1, m2, m3 } => {
                if !(m1.is_finite() && m2.is_finite() && m3.is_finite()) {
                    return Err(Error::invalid(op, format!("margin_list ({m1}, {m2}, {m3}) is not finite")));
                }
                if !(0.0..=2.0).contains(&m3) || !(0.0..=std::f32::consts::PI).contains(&m2) {
                    return Err(Error::invalid(
                        op,
                        format!("margin_list ({m1}, {m2}, {m3}): m2 must be in [0, π] and m3 in [0, 2]"),
                    ));
                }
                if m3 == 0.0 && m1 != 1.0 {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "margin_list ({m1}, {m2}, {m3}): insightface's CombinedMarginLoss takes m1 = 1 (ArcFace) \
                             or m3 > 0 (CosFace); the multiplicative margin m1 is not implemented there either"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The angle between a feature (or its projection) `z` and a centre `w`,
/// from the raw vectors in f64: cosine, sine, norms. Accurate at any angle
/// (sin θ is the norm of the tangent `ŵ − c·ẑ`, not `sqrt(1 − c²)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Angle {
    /// cos θ, in [−1, 1].
    pub c: f64,
    /// sin θ ≥ 0.
    pub sin: f64,
    /// ‖z‖.
    pub nz: f64,
    /// ‖w‖.
    pub nw: f64,
}

impl Angle {
    /// The angle of `z` and `w` (same length). A zero vector gives c = 0 and
    /// sin θ = 1 (the cosine of a zero vector normalized with an eps floor)
    /// and no tangent; a non-finite value gives NaN.
    pub fn of<A: Copy + Into<f64>, B: Copy + Into<f64>>(z: &[A], w: &[B]) -> Angle {
        let (mut zz, mut ww, mut zw) = (0f64, 0f64, 0f64);
        for (&a, &b) in z.iter().zip(w) {
            let (a, b): (f64, f64) = (a.into(), b.into());
            zz += a * a;
            ww += b * b;
            zw += a * b;
        }
        let (nz, nw) = (zz.sqrt(), ww.sqrt());
        if !(nz > 0.0 && nw > 0.0) {
            let c = if nz.is_nan() || nw.is_nan() { f64::NAN } else { 0.0 };
            return Angle { c, sin: 1.0, nz, nw };
        }
        let c = (zw / (nz * nw)).clamp(-1.0, 1.0);
        let mut ss = 0f64;
        for (&a, &b) in z.iter().zip(w) {
            let t = b.into() / nw - c * a.into() / nz;
            ss += t * t;
        }
        Angle { c, sin: ss.sqrt(), nz, nw }
    }

    /// Component i of the unit tangent at ẑ pointing to ŵ, `(ŵ − c·ẑ)/sin θ`
    /// (0 when there is none: sin θ = 0 or a zero vector).
    pub fn toward_w<A: Copy + Into<f64>, B: Copy + Into<f64>>(&self, z: &[A], w: &[B], i: usize) -> f64 {
        if !(self.sin > 0.0 && self.nz > 0.0 && self.nw > 0.0) {
            return 0.0;
        }
        (w[i].into() / self.nw - self.c * z[i].into() / self.nz) / self.sin
    }

    /// Component i of the unit tangent at ŵ pointing to ẑ, `(ẑ − c·ŵ)/sin θ`
    /// (0 when there is none: sin θ = 0 or a zero vector).
    pub fn toward_z<A: Copy + Into<f64>, B: Copy + Into<f64>>(&self, z: &[A], w: &[B], i: usize) -> f64 {
        if !(self.sin > 0.0 && self.nz > 0.0 && self.nw > 0.0) {
            return 0.0;
        }
        (z[i].into() / self.nz - self.c * w[i].into() / self.nw) / self.sin
    }
}

/// The margin softmax cross-entropy of one row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowCe {
    /// `−log p_y`.
    pub loss: f64,
    /// The gradient with respect to every cosine; the target's entry holds
    /// `G·df` (exact) or `G` (straight-through), with `G = s·(p_y − 1)`.
    pub grad: Vec<f64>,
    /// `G·sing`: the gradient's singular part, along the unit tangents
    /// ([`Angle::toward_w`] for the feature, [`Angle::toward_z`] for the
    /// centre); 0 unless the margin has one and the gradient is exact.
    pub singular: f64,
    /// Whether the plain cosines' argmax (lowest index on ties) is y.
    pub correct: bool,
}

/// The margin softmax cross-entropy of one row of cosines `cos` with target
/// `y` (whose angle has sine `sin_y`), scale `s`. Errors: an empty row, y out
/// of range, non-finite values.
pub fn margin_ce_row(cos: &[f64], y: usize, sin_y: f64, s: f64, margin: Margin, grad: MarginGrad) -> Result<RowCe> {
    const OP: &str = "margin_ce_row";
    if y >= cos.len() {
        return Err(Error::invalid(OP, format!("target {y} is not one of the row's {} classes", cos.len())));
    }
    if cos.iter().any(|c| !c.is_finite()) || !(sin_y.is_finite() && s.is_finite()) {
        return Err(Error::invalid(OP, "cosines, sine and scale must be finite"));
    }
    let t = margin.target(cos[y], sin_y);
    let logit = |k: usize| s * if k == y { t.f } else { cos[k] };
    let mx = (0..cos.len()).map(logit).fold(f64::NEG_INFINITY, f64::max);
    // Σ over the other classes of exp(logit − max), and the target's term.
    let others: f64 = (0..cos.len()).filter(|&k| k != y).map(|k| (logit(k) - mx).exp()).sum();
    let ey = (logit(y) - mx).exp();
    let z = ey + others;
    let loss = if logit(y) >= mx { others.ln_1p() } else { (mx - logit(y)) + z.ln() };
    let g_target = -s * others / z; // s·(p_y − 1), without cancellation
    let exact = grad == MarginGrad::Exact;
    let g = (0..cos.len())
        .map(|k| if k == y { g_target * if exact { t.df } else { 1.0 } } else { s * (logit(k) - mx).exp() / z })
        .collect();
    let singular = if exact && sin_y > 0.0 { g_target * t.sing } else { 0.0 };
    let mut arg = 0;
    for k in 1..cos.len() {
        if cos[k] > cos[arg] {
            arg = k;
        }
    }
    Ok(RowCe { loss, grad: g, singular, correct: arg == y })
}

impl RowCe {
    /// The row of a failed [`margin_ce_row`] (a zero or non-finite feature):
    /// NaN everywhere, which the heads report as a non-finite loss.
    pub(crate) fn nan(classes: usize) -> RowCe {
        RowCe { loss: f64::NAN, grad: vec![f64::NAN; classes], singular: f64::NAN, correct: false }
    }
}
