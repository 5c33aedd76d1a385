//! Verification metrics on pair scores, as face recognition reports them.
//!
//! - [`kfold_accuracy`]: insightface's LFW-style accuracy (arcface_torch
//!   eval/verification.py `calculate_roc`): squared L2 distances `d` of
//!   the normalized embeddings of each pair, a pair predicted "same" when
//!   `d < t`, thresholds `t = 0, 0.01, …, 3.99`; the pairs cut into 10
//!   consecutive folds (scikit-learn's KFold without shuffling: the first
//!   `P mod 10` folds one pair longer); for each fold, the threshold of
//!   best accuracy on the other nine (the first, on ties) is applied to
//!   it. Reported: the mean and the population standard deviation of the
//!   ten test accuracies.
//! - [`kfold_val`]: its `calculate_val`: per fold, the threshold (on a
//!   0.001 grid) at which the training folds' FAR reaches the target, by
//!   linear interpolation of threshold against FAR, then VAL (the test
//!   fold's true-accept rate) and FAR there; mean and std of VAL, mean FAR.
//! - [`Roc`]: the exact ROC from every distinct score (no grid): a pair is
//!   accepted when its similarity is ≥ the threshold; TAR at a FAR, the
//!   equal error rate, the area under the curve.

use crate::error::{Error, Result};

/// insightface's accuracy grid: 400 thresholds 0, 0.01, …, 3.99 (as
/// `np.arange(0, 4, 0.01)` computes them: i · 0.01 in f64).
pub fn accuracy_thresholds() -> Vec<f64> {
    (0..400).map(|i| i as f64 * 0.01).collect()
}

/// insightface's VAL grid: 4000 thresholds 0, 0.001, …, 3.999.
pub fn val_thresholds() -> Vec<f64> {
    (0..4000).map(|i| i as f64 * 0.001).collect()
}

/// The folds of `n` items: scikit-learn's `KFold(n_splits, shuffle=False)`
/// ranges (the first `n mod k` one longer).
pub fn folds(n: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|f| {
            let len = base + usize::from(f < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

fn check(op: &'static str, scores: &[f64], issame: &[bool], min: usize) -> Result<()> {
    if scores.len() != issame.len() {
        return Err(Error::Shape {
            op,
            expected: format!("one score per pair ({} pairs)", issame.len()),
            got: format!("{} scores", scores.len()),
        });
    }
    if scores.len() < min {
        return Err(Error::invalid(op, format!("{} pairs; at least {min} are needed", scores.len())));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::invalid(op, format!("the score of pair {i} is NaN")));
    }
    Ok(())
}

/// Sorted distances of the positive and the negative pairs among `idx`.
fn split_sorted(dist: &[f64], issame: &[bool], idx: impl Iterator<Item = usize>) -> (Vec<f64>, Vec<f64>) {
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for i in idx {
        if issame[i] {
            pos.push(dist[i]);
        } else {
            neg.push(dist[i]);
        }
    }
    pos.sort_by(f64::total_cmp);
    neg.sort_by(f64::total_cmp);
    (pos, neg)
}

/// How many of the sorted `v` are below `t`.
fn below(v: &[f64], t: f64) -> usize {
    v.partition_point(|&d| d < t)
}

/// insightface's 10-fold verification accuracy (see the module
/// documentation) from squared L2 distances: `(mean, std, per-fold)`.
/// At least `folds` pairs; a distance that is NaN is an error.
pub fn kfold_accuracy(dist: &[f64], issame: &[bool], k: usize) -> Result<(f64, f64, Vec<f64>)> {
    const OP: &str = "kfold_accuracy";
    check(OP, dist, issame, k.max(1))?;
    let thresholds = accuracy_thresholds();
    let n = dist.len();
    let mut acc = Vec::with_capacity(k);
    for test in folds(n, k) {
        let (pos, neg) = split_sorted(dist, issame, (0..n).filter(|i| !test.contains(i)));
        let train_n = (pos.len() + neg.len()) as f64;
        // Accuracy = (TP + TN) / n; the first best threshold wins.
        let mut best = (f64::NEG_INFINITY, 0.0);
        for &t in &thresholds {
            let a = (below(&pos, t) + neg.len() - below(&neg, t)) as f64 / train_n;
            if a > best.0 {
                best = (a, t);
            }
        }
        let (tp, tn) = test.clone().fold((0usize, 0usize), |(tp, tn), i| {
            let accept = dist[i] < best.1;
            (tp + usize::from(accept && issame[i]), tn + usize::from(!accept && !issame[i]))
        });
        acc.push((tp + tn) as f64 / test.len() as f64);
    }
    let (mean, std) = mean_std(&acc);
    Ok((mean, std, acc))
}

/// VAL at FAR = `far_target` as insightface's `calculate_val` (see the
/// module documentation): `(val_mean, val_std, far_mean)`. Where insightface
/// divides by zero (a fold without positive or without negative pairs:
/// NaN), the missing rate counts as 0.
pub fn kfold_val(dist: &[f64], issame: &[bool], far_target: f64, k: usize) -> Result<(f64, f64, f64)> {
    const OP: &str = "kfold_val";
    check(OP, dist, issame, k.max(1))?;
    if !(far_target.is_finite() && far_target > 0.0 && far_target <= 1.0) {
        return Err(Error::invalid(OP, format!("FAR {far_target} is not in (0, 1]")));
    }
    let thresholds = val_thresholds();
    let n = dist.len();
    let rate = |num: usize, den: usize| if den == 0 { 0.0 } else { num as f64 / den as f64 };
    let (mut vals, mut fars) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for test in folds(n, k) {
        let (_, neg) = split_sorted(dist, issame, (0..n).filter(|i| !test.contains(i)));
        let far: Vec<f64> = thresholds.iter().map(|&t| rate(below(&neg, t), neg.len())).collect();
        // scipy's interp1d(far, thresholds, kind='slinear') at the target:
        // FAR does not decrease with the threshold; between the last
        // threshold at or below the target and the next one.
        let threshold = if far.last().copied().unwrap_or(0.0) >= far_target {
            let j = far.partition_point(|&f| f <= far_target).saturating_sub(1);
            match far.get(j + 1) {
                Some(&f1) if f1 > far[j] => {
                    thresholds[j] + (far_target - far[j]) / (f1 - far[j]) * (thresholds[j + 1] - thresholds[j])
                }
                _ => thresholds[j],
            }
        } else {
            0.0
        };
        let (test_pos, test_neg) = split_sorted(dist, issame, test);
        vals.push(rate(below(&test_pos, threshold), test_pos.len()));
        fars.push(rate(below(&test_neg, threshold), test_neg.len()));
    }
    let (val, std) = mean_std(&vals);
    Ok((val, std, fars.iter().sum::<f64>() / fars.len() as f64))
}

/// Mean and population standard deviation (numpy's `np.std`).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// One point of a ROC: accepting pairs of similarity ≥ `threshold` gives
/// the false-accept rate `far` and the true-accept rate `tar`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RocPoint {
    /// The similarity threshold (+∞ for the point that accepts nothing).
    pub threshold: f64,
    /// False accepts / negative pairs.
    pub far: f64,
    /// True accepts / positive pairs.
    pub tar: f64,
}

/// The exact ROC of similarity scores: one point per distinct score (from
/// the highest down), after the point (0, 0) that accepts nothing; the
/// last point accepts everything (1, 1). Ties are accepted together.
#[derive(Clone, Debug)]
pub struct Roc {
    /// The points, FAR and TAR non-decreasing.
    pub points: Vec<RocPoint>,
    /// Positive pairs.
    pub positives: usize,
    /// Negative pairs.
    pub negatives: usize,
}

impl Roc {
    /// The ROC of `scores` (similarities: higher is "more alike") with
    /// their labels; at least one positive and one negative pair, no NaN.
    pub fn new(scores: &[f64], issame: &[bool]) -> Result<Roc> {
        const OP: &str = "Roc";
        check(OP, scores, issame, 2)?;
        let positives = issame.iter().filter(|&&s| s).count();
        let negatives = issame.len() - positives;
        if positives == 0 || negatives == 0 {
            return Err(Error::invalid(
                OP,
                format!("{positives} positive and {negatives} negative pairs: a ROC needs both"),
            ));
        }
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut points = vec![RocPoint { threshold: f64::INFINITY, far: 0.0, tar: 0.0 }];
        let (mut tp, mut fp) = (0usize, 0usize);
        for (k, &i) in order.iter().enumerate() {
            if issame[i] {
                tp += 1;
            } else {
                fp += 1;
            }
            // A point after the last pair of each distinct score.
            if order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]) {
                points.push(RocPoint {
                    threshold: scores[i],
                    far: fp as f64 / negatives as f64,
                    tar: tp as f64 / positives as f64,
                });
            }
        }
        Ok(Roc { points, positives, negatives })
    }

    /// The highest TAR at a FAR of at most `far` (and the threshold that
    /// gives it, the highest such); a FAR below 1 / negatives gets the
    /// TAR of accepting only pairs scored above every negative (possibly
    /// 0, at the threshold +∞).
    pub fn tar_at_far(&self, far: f64) -> RocPoint {
        // FAR is non-decreasing: the last point within the bound has the
        // highest TAR among them.
        let k = self.points.partition_point(|p| p.far <= far);
        self.points[k.saturating_sub(1)]
    }

    /// TAR at FAR as insightface's IJB evaluation reads it: the point of
    /// scikit-learn's `roc_curve` (collinear points dropped) whose FAR is
    /// nearest `far`, which may lie above it; on ties the last such point
    /// (insightface flips the arrays before taking the first minimum, "the
    /// largest TPR at the same FPR").
    pub fn tar_at_far_nearest(&self, far: f64) -> RocPoint {
        let kept = self.sklearn_points();
        let mut best = kept[0];
        for p in kept {
            if (p.far - far).abs() <= (best.far - far).abs() {
                best = p;
            }
        }
        best
    }

    /// The points scikit-learn's `roc_curve(drop_intermediate=True)` keeps:
    /// the first and last, and every point where the FAR or the TAR bends.
    fn sklearn_points(&self) -> Vec<RocPoint> {
        let p = &self.points;
        // Counts (exact), for the second differences.
        let fps: Vec<f64> = p.iter().map(|q| (q.far * self.negatives as f64).round()).collect();
        let tps: Vec<f64> = p.iter().map(|q| (q.tar * self.positives as f64).round()).collect();
        (0..p.len())
            .filter(|&i| {
                i == 0
                    || i + 1 == p.len()
                    || fps[i + 1] - 2.0 * fps[i] + fps[i - 1] != 0.0
                    || tps[i + 1] - 2.0 * tps[i] + tps[i - 1] != 0.0
            })
            .map(|i| p[i])
            .collect()
    }

    /// The equal error rate: where FAR = 1 − TAR along the curve (linear
    /// between points), with the threshold interpolated the same way.
    pub fn eer(&self) -> (f64, f64) {
        let gap = |p: &RocPoint| p.far - (1.0 - p.tar);
        for w in self.points.windows(2) {
            let (a, b) = (gap(&w[0]), gap(&w[1]));
            if a <= 0.0 && b >= 0.0 {
                let t = if b > a { -a / (b - a) } else { 0.0 };
                let far = w[0].far + t * (w[1].far - w[0].far);
                let th = if w[0].threshold.is_finite() {
                    w[0].threshold + t * (w[1].threshold - w[0].threshold)
                } else {
                    w[1].threshold
                };
                return (far, th);
            }
        }
        // Unreachable: the gap goes from −1 at (0, 0) to +1 at (1, 1).
        (0.5, f64::NAN)
    }

    /// The area under the curve (trapezoids between the points; ties are
    /// one diagonal step, the probability that a positive outscores a
    /// negative with ties counted half).
    pub fn auc(&self) -> f64 {
        self.points.windows(2).map(|w| (w[1].far - w[0].far) * (w[1].tar + w[0].tar) / 2.0).sum()
    }
}
