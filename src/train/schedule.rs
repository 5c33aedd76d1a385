//! Learning-rate schedules, as closed forms of the step t (the number of
//! optimizer steps taken before this one: 0 for the first).
//!
//! - [`Schedule::Poly`][]: insightface's `PolynomialLRWarmup`
//!   (arcface_torch/lr_scheduler.py, power 2 in train_v2.py): with w warmup
//!   steps and T total steps, lr(t) = base·t/w for 1 ≤ t ≤ w, base·(1 −
//!   (min(t, T) − w)/(T − w))^power after. Its first step (t = 0) trains at
//!   the full base rate: the PyTorch scheduler returns the optimizer's
//!   initial rate before its first `step()`, and train_v2.py steps it after
//!   each optimizer step. We keep that, so a run matches insightface's.
//! - [`Schedule::Cosine`][]: linear warmup from base/w to base over w steps
//!   (t = 0 … w − 1: base·(t + 1)/w), then base·½(1 + cos(π·(t − w)/(T −
//!   w))) down to 0 at T (and 0 after).
//! - [`Schedule::Step`][]: base·γ^k with k the number of milestones ≤ t
//!   (torch.optim.lr_scheduler.MultiStepLR; insightface's older configs,
//!   e.g. milestones at epochs 8, 14, 20 with γ = 0.1).
//! - [`Schedule::Constant`][]: base.

use crate::error::{Error, Result};

/// A learning-rate schedule (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// insightface's polynomial decay with linear warmup.
    Poly {
        /// Base rate (insightface: 0.1 for SGD at batch 128 per GPU ×8).
        base: f64,
        /// Warmup steps w.
        warmup: u64,
        /// Total steps T (> w).
        total: u64,
        /// Power (insightface: 2).
        power: f64,
    },
    /// Cosine decay with linear warmup.
    Cosine {
        /// Base rate.
        base: f64,
        /// Warmup steps w.
        warmup: u64,
        /// Total steps T (> w).
        total: u64,
    },
    /// Multiply by `gamma` at each milestone step.
    Step {
        /// Base rate.
        base: f64,
        /// Steps at which the rate drops, ascending.
        milestones: Vec<u64>,
        /// The factor per milestone.
        gamma: f64,
    },
    /// A constant rate.
    Constant {
        /// The rate.
        base: f64,
    },
}

impl Schedule {
    /// insightface's schedule: warmup then power-2 decay.
    pub fn insightface(base: f64, warmup: u64, total: u64) -> Schedule {
        Schedule::Poly { base, warmup, total, power: 2.0 }
    }

    /// Checks the parameters: a finite positive base, T > w, milestones
    /// ascending, γ in (0, 1], a finite positive power.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Schedule";
        let base = match self {
            Schedule::Poly { base, .. }
            | Schedule::Cosine { base, .. }
            | Schedule::Step { base, .. }
            | Schedule::Constant { base } => *base,
        };
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::invalid(OP, format!("the base learning rate must be finite and positive, got {base}")));
        }
        match self {
            Schedule::Poly { warmup, total, power, .. } => {
                if total <= warmup || !(power.is_finite() && *power > 0.0) {
                    return Err(Error::invalid(OP, "poly: total steps must exceed the warmup, power > 0"));
                }
            }
            Schedule::Cosine { warmup, total, .. } => {
                if total <= warmup {
                    return Err(Error::invalid(OP, "cosine: total steps must exceed the warmup"));
                }
            }
            Schedule::Step { milestones, gamma, .. } => {
                if milestones.windows(2).any(|w| w[0] >= w[1]) || !(*gamma > 0.0 && *gamma <= 1.0) {
                    return Err(Error::invalid(OP, "step: milestones strictly ascending, gamma in (0, 1]"));
                }
            }
            Schedule::Constant { .. } => {}
        }
        Ok(())
    }

    /// The rate of the step that follows `t` steps.
    pub fn lr(&self, t: u64) -> f64 {
        match self {
            Schedule::Poly { base, warmup, total, power } => {
                let (w, tt) = (*warmup as f64, *total as f64);
                if t == 0 {
                    *base
                } else if t <= *warmup {
                    base * t as f64 / w
                } else {
                    base * (1.0 - (t.min(*total) as f64 - w) / (tt - w)).powf(*power)
                }
            }
            Schedule::Cosine { base, warmup, total } => {
                if t < *warmup {
                    base * (t + 1) as f64 / *warmup as f64
                } else if t >= *total {
                    0.0
                } else {
                    let x = (t - warmup) as f64 / (total - warmup) as f64;
                    base * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
                }
            }
            Schedule::Step { base, milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= t).count() as i32)
            }
            Schedule::Constant { base } => *base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// insightface's PolynomialLRWarmup as PyTorch steps it: the initial
    /// rate until the first `step()`, then its recursive `get_lr`.
    fn insightface_recursive(base: f64, w: u64, total: u64, power: f64, steps: u64) -> Vec<f64> {
        let mut lr = base;
        let mut out = vec![lr];
        for t in 1..steps {
            if t > total {
                // get_lr returns the group's current rate.
            } else if t <= w {
                lr = base * t as f64 / w as f64;
            } else {
                let (l, wf, tf) = (t as f64, w as f64, total as f64);
                lr *= ((1.0 - (l - wf) / (tf - wf)) / (1.0 - (l - 1.0 - wf) / (tf - wf))).powf(power);
            }
            out.push(lr);
        }
        out
    }

    #[test]
    fn poly_matches_insightfaces_recursive_scheduler() {
        let s = Schedule::insightface(0.1, 10, 100);
        s.validate().unwrap();
        let want = insightface_recursive(0.1, 10, 100, 2.0, 110);
        for (t, w) in want.iter().enumerate() {
            let got = s.lr(t as u64);
            assert!((got - w).abs() <= 1e-12 + 1e-9 * w.abs(), "t = {t}: {got} vs {w}");
        }
        assert_eq!(s.lr(0), 0.1, "the first step at the base rate, as insightface");
        assert!((s.lr(5) - 0.05).abs() < 1e-15);
        assert!((s.lr(55) - 0.1 * 0.25).abs() < 1e-15, "halfway through the decay: (1/2)^2");
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(s.lr(1000), 0.0);
    }

    #[test]
    fn cosine_step_and_constant_closed_forms() {
        let c = Schedule::Cosine { base: 2.0, warmup: 4, total: 104 };
        c.validate().unwrap();
        assert_eq!(c.lr(0), 0.5);
        assert_eq!(c.lr(3), 2.0);
        assert!((c.lr(4) - 2.0).abs() < 1e-15);
        assert!((c.lr(54) - 1.0).abs() < 1e-12, "halfway: half the rate");
        assert!(c.lr(103) > 0.0 && c.lr(103) < 1e-3);
        assert_eq!(c.lr(104), 0.0);
        let st = Schedule::Step { base: 0.1, milestones: vec![8, 14, 20], gamma: 0.1 };
        st.validate().unwrap();
        let want = [(0, 0.1), (7, 0.1), (8, 0.01), (13, 0.01), (14, 0.001), (25, 0.0001)];
        for (t, w) in want {
            assert!((st.lr(t) - w).abs() < 1e-15, "t = {t}");
        }
        assert_eq!(Schedule::Constant { base: 0.3 }.lr(12345), 0.3);
    }

    #[test]
    fn bad_schedules_are_typed_errors() {
        for s in [
            Schedule::Poly { base: 0.0, warmup: 1, total: 10, power: 2.0 },
            Schedule::Poly { base: 0.1, warmup: 10, total: 10, power: 2.0 },
            Schedule::Poly { base: 0.1, warmup: 1, total: 10, power: f64::NAN },
            Schedule::Cosine { base: f64::INFINITY, warmup: 0, total: 10 },
            Schedule::Step { base: 0.1, milestones: vec![5, 5], gamma: 0.1 },
            Schedule::Step { base: 0.1, milestones: vec![5], gamma: 1.5 },
        ] {
            assert!(matches!(s.validate(), Err(Error::InvalidArgument { .. })), "{s:?}");
        }
    }
}
