//! Angular margins on the target logit (ArcFace, CosFace) and the margin
//! softmax cross-entropy of one row of cosines, in f64: the reference of
//! the kernels (kernels/code_head.cu `margin_target`, `margin_ce`).

/// The margin applied to the target class's cosine `c`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Margin {
    /// Plain normalized softmax: `f(c) = c`.
    None,
    /// ArcFace: `f(c) = cos(θ + m)`, `θ = acos c`, while `θ + m < π`;
    /// beyond, insightface's fallback `c − m·sin m`. insightface: m = 0.5.
    ArcFace(f32),
    /// CosFace: `f(c) = c − m`. insightface: m = 0.4.
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

impl Margin {
    /// (kind, m) as the kernels take them: 0 none, 1 ArcFace, 2 CosFace.
    pub(crate) fn kernel_args(self) -> (i32, f32) {
        match self {
            Margin::None => (0, 0.0),
            Margin::ArcFace(m) => (1, m),
            Margin::CosFace(m) => (2, m),
        }
    }

    /// `(f(c), f'(c))`.
    pub fn target(self, c: f64) -> (f64, f64) {
        match self {
            Margin::None => (c, 1.0),
            Margin::CosFace(m) => (c - m as f64, 1.0),
            Margin::ArcFace(m) => {
                let (cm, sm) = ((m as f64).cos(), (m as f64).sin());
                if c > -cm {
                    let cc = c.min(1.0);
                    let sin_t = (1.0 - cc * cc).max(1e-12).sqrt();
                    (cc * cm - sin_t * sm, cm + cc * sm / sin_t)
                } else {
                    (c - m as f64 * sm, 1.0)
                }
            }
        }
    }

    /// Checks the margin is finite and in a sensible range.
    pub(crate) fn validate(self, op: &'static str) -> crate::Result<()> {
        let m = match self {
            Margin::None => return Ok(()),
            Margin::ArcFace(m) | Margin::CosFace(m) => m,
        };
        if !(m.is_finite() && (0.0..=std::f32::consts::PI / 2.0).contains(&m)) {
            return Err(crate::Error::invalid(op, format!("margin must be in [0, π/2], got {m}")));
        }
        Ok(())
    }
}

/// The margin softmax cross-entropy of one row of cosines `cos` with
/// target `y` and scale `s`: returns the loss `−log p_y`, the gradient with
/// respect to every cosine, and whether the plain cosines' argmax (lowest
/// index on ties) is `y`.
pub fn margin_ce_row(cos: &[f64], y: usize, s: f64, margin: Margin, grad: MarginGrad) -> (f64, Vec<f64>, bool) {
    let (fy, df) = margin.target(cos[y]);
    let df = if grad == MarginGrad::Exact { df } else { 1.0 };
    let logit = |k: usize| s * if k == y { fy } else { cos[k] };
    let mx = (0..cos.len()).map(logit).fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + (0..cos.len()).map(|k| (logit(k) - mx).exp()).sum::<f64>().ln();
    let g = (0..cos.len())
        .map(|k| {
            let p = (logit(k) - lse).exp();
            let d = s * (p - if k == y { 1.0 } else { 0.0 });
            if k == y {
                d * df
            } else {
                d
            }
        })
        .collect();
    let mut arg = 0;
    for k in 1..cos.len() {
        if cos[k] > cos[arg] {
            arg = k;
        }
    }
    (lse - logit(y), g, arg == y)
}
