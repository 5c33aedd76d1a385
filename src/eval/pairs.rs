//! All-pairs verification of a gallery, as open-set evaluations score it:
//! every unordered pair of `n` embeddings, same-identity pairs positive,
//! counted into histograms of their cosine scores ([`PairHistogram`]),
//! from which TAR at any FAR, the EER and the AUC follow at the
//! histogram's resolution. The scores are made one tile at a time by the
//! GEMM (`S = E[rows]·E[cols]ᵀ`, tiles of the upper triangle only) and
//! counted on the device (kernels/pairs.cu), so a 10^5-image gallery
//! (5·10^9 pairs) holds no more than a tile of scores (64 MiB at the
//! default 4,096 × 4,096 tile) and downloads only the histograms.
//!
//! Bin `k` of `bins` holds the scores in `[-1 + 2k/bins, -1 + 2(k+1)/bins)`
//! (the first and last also what lies beyond ±1), binned in f32 as
//! `floor((s + 1) · 0.5 · bins)`. A threshold read from the histogram is a
//! bin edge: "accept s ≥ edge". With 4,096 bins an edge is 4.9e-4 of
//! cosine apart; [`crate::eval::metrics::Roc`] on the scores themselves is
//! exact, for galleries whose pairs fit in memory.

use crate::error::{Error, Result};
use crate::eval::metrics::{Roc, RocPoint};
use crate::ops::gemm::{gemm, Op};
use crate::runtime::device::{DeviceKind, LaunchConfig};
use crate::runtime::launch;
use crate::runtime::tensor::{DType, Tensor};

/// Most bins (the kernel's shared histogram).
pub const MAX_BINS: usize = 4096;
/// The default tile: 4,096 × 4,096 scores.
pub const DEFAULT_TILE: usize = 4096;

const OP: &str = "all_pairs_histogram";

/// The score histograms of every pair of a gallery (see the module
/// documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct PairHistogram {
    /// Bins over the cosine range [−1, 1].
    pub bins: usize,
    /// Same-identity pairs per bin.
    pub positives: Vec<u64>,
    /// Different-identity pairs per bin.
    pub negatives: Vec<u64>,
}

impl PairHistogram {
    /// The lower edge of bin `k`: −1 + 2k / bins.
    pub fn edge(&self, k: usize) -> f64 {
        -1.0 + 2.0 * k as f64 / self.bins as f64
    }

    /// Pairs counted: positive and negative.
    pub fn counts(&self) -> (u64, u64) {
        (self.positives.iter().sum(), self.negatives.iter().sum())
    }

    /// The ROC at the bin edges: after the point that accepts nothing, one
    /// point per non-empty bin from the highest down (threshold: its lower
    /// edge), as [`Roc::new`] makes one per distinct score. Errors: no
    /// positive or no negative pair.
    pub fn roc(&self) -> Result<Roc> {
        let (p, n) = self.counts();
        if p == 0 || n == 0 {
            return Err(Error::invalid(
                "PairHistogram::roc",
                format!("{p} positive and {n} negative pairs: a ROC needs both"),
            ));
        }
        let mut points = vec![RocPoint { threshold: f64::INFINITY, far: 0.0, tar: 0.0 }];
        let (mut tp, mut fp) = (0u64, 0u64);
        for k in (0..self.bins).rev() {
            if self.positives[k] + self.negatives[k] == 0 {
                continue;
            }
            tp += self.positives[k];
            fp += self.negatives[k];
            points.push(RocPoint { threshold: self.edge(k), far: fp as f64 / n as f64, tar: tp as f64 / p as f64 });
        }
        Ok(Roc { points, positives: p as usize, negatives: n as usize })
    }
}

/// Counts every unordered pair of the rows of `emb` (`[n, d]` f32, unit
/// rows for cosines; on any device) into `bins` score bins, positive when
/// `labels` (one per row) are equal (see the module documentation);
/// `tile` rows and columns of scores at a time (a multiple of 64). The CPU
/// path makes the same tiles with the CPU GEMM and bins them in the same
/// f32 arithmetic. Errors: fewer than 2 rows, labels of another length,
/// `bins` outside 2..=[`MAX_BINS`], a tile that is 0 or not a multiple of
/// 64, a score that is NaN or beyond ±1.001 (embeddings that are not
/// finite unit rows).
pub fn all_pairs_histogram(emb: &Tensor, labels: &[u32], bins: usize, tile: usize) -> Result<PairHistogram> {
    let n = check_gallery(OP, emb, labels)?;
    if !(2..=MAX_BINS).contains(&bins) {
        return Err(Error::invalid(OP, format!("bins: {bins} is outside 2..={MAX_BINS}")));
    }
    check_tile(OP, tile)?;
    let dev = emb.device().clone();
    let mut hist = PairHistogram { bins, positives: vec![0; bins], negatives: vec![0; bins] };
    let mut nans = 0u64;
    // Device buffers: labels, the counts (zeroed once), the tiles' scores.
    let gpu = dev.kind() != DeviceKind::Cpu;
    let counts_bytes = bins * 8;
    let (labels_buf, mut pos, mut neg, mut nan) = if gpu {
        (
            Some(dev.upload(bytemuck::cast_slice(labels))?),
            Some(dev.alloc_zeroed(counts_bytes)?),
            Some(dev.alloc_zeroed(counts_bytes)?),
            Some(dev.alloc_zeroed(8)?),
        )
    } else {
        (None, None, None, None)
    };
    for_each_tile(emb, tile, |s, rows, cols, r0, c0| {
        if gpu {
            let blocks = (rows * cols).div_ceil(256 * 16).clamp(1, 1024) as u32;
            let cfg = LaunchConfig::linear(blocks, 256, 0);
            let (Some(lb), Some(p), Some(q), Some(z)) = (&labels_buf, pos.as_mut(), neg.as_mut(), nan.as_mut()) else {
                return Err(Error::invalid(OP, "no device buffers (internal error)"));
            };
            let (pp, qp, zp) = (dev.ptr_mut_of(p), dev.ptr_mut_of(q), dev.ptr_mut_of(z));
            // SAFETY: s holds rows × cols f32 (a tile of for_each_tile);
            // labels n u32, uploaded; the counts bins u64 each and one u64;
            // r0 + rows and c0 + cols are at most n, so every label index is
            // in range; bins ≤ MAX_BINS (the kernel's shared histogram),
            // checked above.
            unsafe {
                launch::pair_histogram(
                    &dev,
                    cfg,
                    s.ptr()?,
                    rows as i32,
                    cols as i32,
                    r0 as i64,
                    c0 as i64,
                    dev.ptr_of(lb),
                    bins as i32,
                    pp,
                    qp,
                    zp,
                )
            }
        } else {
            nans += cpu::bin_tile(&s.host_f32()?, rows, cols, r0, c0, labels, &mut hist);
            Ok(())
        }
    })?;
    if gpu {
        let read = |b: &Option<crate::runtime::device::DeviceBuffer>, len: usize| -> Result<Vec<u64>> {
            let b = b.as_ref().ok_or_else(|| Error::invalid(OP, "no device buffers (internal error)"))?;
            Ok(bytemuck::pod_collect_to_vec(&dev.download(b, len * 8)?))
        };
        hist.positives = read(&pos, bins)?;
        hist.negatives = read(&neg, bins)?;
        nans = read(&nan, 1)?[0];
    }
    if nans > 0 {
        return Err(Error::invalid(
            OP,
            format!("{nans} pair scores are NaN or beyond ±1.001: the embeddings must be finite unit rows"),
        ));
    }
    let total = (n as u64) * (n as u64 - 1) / 2;
    let (p, q) = hist.counts();
    if p + q != total {
        return Err(Error::invalid(OP, format!("{} pairs counted of {total} (internal error)", p + q)));
    }
    Ok(hist)
}

/// The rows of an f32 gallery `[n, d]` with a label per row and n ≥ 2
/// (what both pair passes take): n, or a typed error.
fn check_gallery(op: &'static str, emb: &Tensor, labels: &[u32]) -> Result<usize> {
    let (n, _) = emb.dims2(op)?;
    if emb.dtype() != DType::F32 {
        return Err(Error::invalid(op, format!("embeddings must be f32, got {:?}", emb.dtype())));
    }
    if n < 2 {
        return Err(Error::invalid(op, format!("{n} embeddings: at least 2 make a pair")));
    }
    if labels.len() != n {
        return Err(Error::Shape {
            op,
            expected: format!("a label per embedding ({n})"),
            got: format!("{} labels", labels.len()),
        });
    }
    Ok(n)
}

fn check_tile(op: &'static str, tile: usize) -> Result<()> {
    if tile == 0 || !tile.is_multiple_of(64) || tile > 1 << 15 {
        return Err(Error::invalid(op, format!("tile: {tile} is not a multiple of 64 up to 32768")));
    }
    Ok(())
}

/// Calls `f(scores, rows, cols, r0, c0)` on each tile of the upper
/// triangle of `emb·embᵀ` (`tile` rows and columns; tiles of the diagonal
/// whole): `scores` `[rows, cols]` f32 on `emb`'s device holds rows
/// r0.. against rows c0.. (c0 ≥ r0). At most four tile buffers are made
/// (the full tile and the partial last row / column / corner).
fn for_each_tile(
    emb: &Tensor,
    tile: usize,
    mut f: impl FnMut(&Tensor, usize, usize, usize, usize) -> Result<()>,
) -> Result<()> {
    let n = emb.shape()[0];
    let dev = emb.device();
    let mut tiles: Vec<Tensor> = Vec::new();
    for r0 in (0..n).step_by(tile) {
        let rows = tile.min(n - r0);
        let a = emb.narrow(0, r0, rows)?;
        for c0 in (r0..n).step_by(tile) {
            let cols = tile.min(n - c0);
            let b = emb.narrow(0, c0, cols)?;
            let s = match tiles.iter().position(|t| t.shape() == [rows, cols]) {
                Some(k) => &mut tiles[k],
                None => {
                    tiles.push(Tensor::empty(dev, &[rows, cols], DType::F32)?);
                    tiles.last_mut().expect("just pushed")
                }
            };
            gemm(1.0, &a, Op::N, &b, Op::T, 0.0, s)?;
            f(s, rows, cols, r0, c0)?;
        }
    }
    Ok(())
}

/// Most pairs [`all_pair_scores`] returns (2^28: 2 GiB of f64 scores).
pub const MAX_SCORED_PAIRS: usize = 1 << 28;

/// Every unordered pair's score of the rows of `emb` (`[n, d]` f32, on any
/// device), in the order (0, 1), (0, 2), …, (1, 2), …, with whether its
/// `labels` are equal: the exact scores [`Roc::new`] takes, made by the
/// same GEMM tiles as [`all_pairs_histogram`] and downloaded a tile at a
/// time (`tile` as there). Errors: fewer than 2 rows, labels of another
/// length, a tile that is 0 or not a multiple of 64, more than
/// [`MAX_SCORED_PAIRS`] pairs (use [`all_pairs_histogram`]), a non-finite
/// score.
pub fn all_pair_scores(emb: &Tensor, labels: &[u32], tile: usize) -> Result<(Vec<f64>, Vec<bool>)> {
    const OP: &str = "all_pair_scores";
    let n = check_gallery(OP, emb, labels)?;
    let pairs = n.checked_mul(n - 1).map(|p| p / 2).filter(|&p| p <= MAX_SCORED_PAIRS).ok_or_else(|| {
        Error::invalid(
            OP,
            format!("{n} embeddings: more than {MAX_SCORED_PAIRS} pairs; count them with all_pairs_histogram"),
        )
    })?;
    check_tile(OP, tile)?;
    // Row i's pairs (i, j > i) start at offset(i) in the output.
    let offset = |i: usize| i * (2 * n - i - 1) / 2;
    let mut scores = vec![0f64; pairs];
    let mut issame = vec![false; pairs];
    for_each_tile(emb, tile, |s, rows, cols, r0, c0| {
        let v = s.host_f32()?;
        for a in 0..rows {
            let i = r0 + a;
            // Columns j > i of this tile.
            let first = (i + 1).max(c0);
            for j in first..c0 + cols {
                let (k, x) = (offset(i) + j - i - 1, v[a * cols + j - c0]);
                if !x.is_finite() {
                    return Err(Error::invalid(OP, format!("the score of pair ({i}, {j}) is {x}")));
                }
                scores[k] = x as f64;
                issame[k] = labels[i] == labels[j];
            }
        }
        Ok(())
    })?;
    Ok((scores, issame))
}

/// The kernel's arithmetic on the host (the CPU path and the reference).
pub mod cpu {
    use super::PairHistogram;

    /// The bin of score `s` (f32, as the kernel).
    pub fn bin(s: f32, bins: usize) -> usize {
        let b = ((s + 1.0f32) * 0.5f32 * bins as f32).floor();
        if b < 0.0 {
            0
        } else {
            (b as usize).min(bins - 1)
        }
    }

    /// Counts the pairs i < j of a tile (`rows × cols` scores of gallery
    /// rows r0.. and columns c0..) into `hist`; returns the scores that
    /// are NaN or beyond ±1.001 (not counted).
    pub fn bin_tile(
        scores: &[f32],
        rows: usize,
        cols: usize,
        r0: usize,
        c0: usize,
        labels: &[u32],
        hist: &mut PairHistogram,
    ) -> u64 {
        let mut nans = 0;
        for a in 0..rows {
            let i = r0 + a;
            for b in 0..cols {
                let j = c0 + b;
                if i >= j {
                    continue;
                }
                let s = scores[a * cols + b];
                if s.is_nan() || s.abs() > 1.001 {
                    nans += 1;
                    continue;
                }
                let k = bin(s, hist.bins);
                if labels[i] == labels[j] {
                    hist.positives[k] += 1;
                } else {
                    hist.negatives[k] += 1;
                }
            }
        }
        nans
    }
}
