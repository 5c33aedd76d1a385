//! Hypersphere homogenization: spread unit vectors evenly over the sphere
//! by SGD on the uniformity loss of random subsets,
//!
//! `L = log( mean_{i != j} exp(-t·‖h_i − h_j‖²) )`,
//!
//! re-projecting every updated vector onto the sphere. With unit rows,
//! `‖h_i − h_j‖² = 2 − 2·h_i·h_j`, so one step over a subset H (B x d) is two
//! GEMMs: the Gram matrix `G = H·Hᵀ`, then the gradient
//! `∂L/∂h_i = (4t / S) Σ_j w_ij h_j` with `w_ij = exp(-t(2 − 2 g_ij))`
//! (`w_ii = 0`) and `S = Σ_ij w_ij`, i.e. `(4t / S)·W·H`.
//!
//! Each epoch visits every identity once, in a seeded random order, in
//! subsets of `subset` identities.

use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::config::Config;
use super::ops;
use crate::error::Result;
use crate::runtime::device::Device;
use crate::runtime::tensor::Tensor;

/// The uniformity loss of the unit rows of `h` (`n x d`), computed directly
/// in f64 (a reference for tests; O(n²·d)). Errors: d = 0, a length that is
/// not whole rows, fewer than 2 rows (the mean over pairs is empty).
pub fn uniformity_loss(h: &[f32], d: usize, t: f64) -> Result<f64> {
    const OP: &str = "uniformity_loss";
    if d == 0 || !h.len().is_multiple_of(d) || h.len() / d < 2 {
        return Err(crate::Error::invalid(
            OP,
            format!("needs at least 2 whole rows of d >= 1 values, got {} values, d = {d}", h.len()),
        ));
    }
    let n = h.len() / d;
    let mut s = 0f64;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let dist: f64 = (0..d).map(|c| (h[i * d + c] as f64 - h[j * d + c] as f64).powi(2)).sum();
                s += (-t * dist).exp();
            }
        }
    }
    Ok((s / (n as f64 * (n as f64 - 1.0))).ln())
}

/// The subsets of one run: `steps` batches of `b` ids, epochs of seeded
/// permutations of `0..n`.
fn batches(n: usize, b: usize, steps: usize, seed: u64) -> impl Iterator<Item = Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x686f_6d6f_6765_6e69);
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut pos = n; // forces a shuffle first
    (0..steps).map(move |_| {
        if pos + b > n {
            perm.shuffle(&mut rng);
            pos = 0;
        }
        pos += b;
        perm[pos - b..pos].to_vec()
    })
}

/// One homogenization run over `vectors` (`n x d`, unit rows), in place.
/// Returns the loss of each step's subset before its update.
pub(crate) fn run(
    vectors: &mut [f32],
    n: usize,
    d: usize,
    cfg: &Config,
    device: &Device,
    bar: &ProgressBar,
) -> Result<Vec<f64>> {
    let b = cfg.subset.min(n);
    let steps = cfg.steps.unwrap_or_else(|| n.div_ceil(cfg.subset.max(1)));
    if n < 2 || b < 2 || steps == 0 {
        return Ok(Vec::new());
    }
    bar.set_length(steps as u64);
    if device.runs_kernels() {
        run_device(vectors, n, d, b, steps, cfg, device, bar)
    } else {
        run_cpu(vectors, d, b, steps, cfg, bar)
    }
}

fn run_cpu(vectors: &mut [f32], d: usize, b: usize, steps: usize, cfg: &Config, bar: &ProgressBar) -> Result<Vec<f64>> {
    let n = vectors.len() / d;
    // Grows with the steps run (steps may be any number; nothing is reserved for them).
    let mut losses = Vec::new();
    let buf = |what: &str, len: usize| crate::runtime::host_memory::try_filled("tokenize", what, len, 0f32);
    // b ≤ N and b ≤ MAX_SUBSET (checked by tokenize): the products fit.
    let (mut h, mut g, mut grad) =
        (buf("a homogenization subset", b * d)?, buf("its Gram matrix", b * b)?, buf("its gradient", b * d)?);
    for ids in batches(n, b, steps, cfg.seed) {
        h.par_chunks_mut(d).zip(ids.par_iter()).for_each(|(row, &i)| {
            row.copy_from_slice(&vectors[i as usize * d..(i as usize + 1) * d]);
        });
        let s = ops::uniformity_step_cpu(&mut h, d, cfg.temperature, cfg.learning_rate, &mut g, &mut grad);
        losses.push((s / (b * (b - 1)) as f64).ln());
        for (row, &i) in h.chunks(d).zip(&ids) {
            vectors[i as usize * d..(i as usize + 1) * d].copy_from_slice(row);
        }
        bar.inc(1);
    }
    Ok(losses)
}

#[allow(clippy::too_many_arguments)]
fn run_device(
    vectors: &mut [f32],
    n: usize,
    d: usize,
    b: usize,
    steps: usize,
    cfg: &Config,
    device: &Device,
    bar: &ProgressBar,
) -> Result<Vec<f64>> {
    let mut all = Tensor::from_slice(device, &[n, d], vectors)?;
    let mut losses = Vec::new();
    for ids in batches(n, b, steps, cfg.seed) {
        let mut h = crate::ops::rows::gather_rows(&all, &ids)?;
        let s = ops::uniformity_step(&mut h, cfg.temperature, cfg.learning_rate)?;
        crate::ops::rows::scatter_rows(&h, &ids, &mut all)?;
        losses.push((s / (b * (b - 1)) as f64).ln());
        bar.inc(1);
    }
    vectors.copy_from_slice(&all.to_vec::<f32>()?);
    Ok(losses)
}
