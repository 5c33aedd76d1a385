//! The tokenizer's building blocks, on any device: row gather and scatter,
//! one homogenization step, and the k-means assignment (best centroid per
//! row). On a GPU or the simulator they run kernels/tokenizer.cu with the
//! GEMMs of kernels/gemm.cu; on the CPU, the references below (which the
//! CPU path of the tokenizer uses directly on slices).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::gemm::{self, Op};
use crate::ops::rowwise;
use crate::runtime::device::{DeviceKind, LaunchConfig};
use crate::runtime::launch;
use crate::runtime::tensor::{same_device, DType, Tensor};

/// Nodes with at least this many identities use the GEMM path (chunked, all
/// cores) on the CPU; smaller ones run one per thread.
pub(crate) const CPU_GEMM_MIN: usize = 4096;
/// Rows per chunk of the CPU assignment and of the centroid sums, at most.
pub(crate) const CHUNK: usize = 8192;
/// Most scores (`rows × k` floats) a CPU chunk or a device assignment holds
/// at once: 64 MiB, whatever the vocabulary.
pub const SCORE_BUDGET: usize = 1 << 24;
/// Rows per chunk of a `rows × k` score matrix within [`SCORE_BUDGET`].
pub(crate) fn score_rows(k: usize) -> usize {
    (SCORE_BUDGET / k.max(1)).clamp(1, CHUNK)
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scores of the points in `members` against `centroids` (k x d): the best
/// centroid and its score per member.
pub(crate) struct Best {
    pub(crate) idx: Vec<u32>,
    pub(crate) score: Vec<f32>,
}

/// Best centroid per member on the CPU: chunks of gathered rows times the
/// centroids (GEMM) for large nodes, direct dot products for small ones.
pub(crate) fn best_cpu(vectors: &[f32], d: usize, members: &[u32], centroids: &[f32], k: usize) -> Best {
    let one = |i: u32| {
        let x = &vectors[i as usize * d..(i as usize + 1) * d];
        let mut best = (0u32, f32::NEG_INFINITY);
        for c in 0..k {
            let s = dot(x, &centroids[c * d..(c + 1) * d]);
            if s > best.1 {
                best = (c as u32, s);
            }
        }
        best
    };
    if members.len() < CPU_GEMM_MIN {
        let (idx, score) = members.iter().map(|&i| one(i)).unzip();
        return Best { idx, score };
    }
    let mut idx = vec![0u32; members.len()];
    let mut score = vec![0f32; members.len()];
    let rows = score_rows(k);
    let mut x = vec![0f32; rows * d];
    let mut s = vec![0f32; rows * k];
    for (ci, chunk) in members.chunks(rows).enumerate() {
        let m = chunk.len();
        x[..m * d].par_chunks_mut(d).zip(chunk.par_iter()).for_each(|(row, &i)| {
            row.copy_from_slice(&vectors[i as usize * d..(i as usize + 1) * d]);
        });
        gemm::cpu::gemm_sized(m, k, d, 1.0, &x[..m * d], d, Op::N, centroids, d, Op::T, 0.0, &mut s[..m * k], k);
        for (r, row) in s[..m * k].chunks(k).enumerate() {
            let mut best = (0u32, f32::NEG_INFINITY);
            for (c, &v) in row.iter().enumerate() {
                if v > best.1 {
                    best = (c as u32, v);
                }
            }
            idx[ci * rows + r] = best.0;
            score[ci * rows + r] = best.1;
        }
    }
    Best { idx, score }
}

/// A warp per row, 8 rows per 256-thread block.
fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(8) as u32, 256, 0)
}

fn f32_matrix(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    let (r, c) = t.dims2(op)?;
    if t.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: DType::F32, got: t.dtype() });
    }
    if r > i32::MAX as usize || c > i32::MAX as usize {
        return Err(Error::invalid(op, format!("[{r}, {c}] does not fit the kernels' int sizes")));
    }
    Ok((r, c))
}

/// One homogenization step on `h` (`[b, d]`, unit rows), on the CPU:
/// `G = H·Hᵀ`, `w_ij = exp(-t(2 − 2 g_ij))` (0 on the diagonal),
/// `S = Σ w_ij`, `h_i ← normalize(h_i − lr·(4t/S)·Σ_j w_ij h_j)`. `g` and
/// `grad` are scratch of `b·b` and `b·d` values. Returns S (the subset's
/// loss is `ln(S / (b(b − 1)))`). Deterministic for any thread count.
pub(crate) fn uniformity_step_cpu(h: &mut [f32], d: usize, t: f32, lr: f32, g: &mut [f32], grad: &mut [f32]) -> f64 {
    let b = h.len() / d;
    gemm::cpu::gemm_sized(b, b, d, 1.0, h, d, Op::N, h, d, Op::T, 0.0, g, b);
    let row_sums: Vec<f64> = g
        .par_chunks_mut(b)
        .enumerate()
        .map(|(i, row)| {
            let mut s = 0f64;
            for (j, w) in row.iter_mut().enumerate() {
                *w = if i == j { 0.0 } else { (-t * (2.0 - 2.0 * *w)).exp() };
                s += *w as f64;
            }
            s
        })
        .collect();
    let s: f64 = row_sums.iter().sum();
    gemm::cpu::gemm_sized(b, d, b, 1.0, g, b, Op::N, h, d, Op::N, 0.0, grad, d);
    let step = (4.0 * t as f64 * lr as f64 / s) as f32;
    h.par_chunks_mut(d).zip(grad.par_chunks(d)).for_each(|(row, gr)| {
        let mut ss = 0f64;
        for (x, &gv) in row.iter_mut().zip(gr) {
            *x -= step * gv;
            ss += *x as f64 * *x as f64;
        }
        let inv = if ss > 0.0 { (1.0 / ss.sqrt()) as f32 } else { 1.0 };
        row.iter_mut().for_each(|x| *x *= inv);
    });
    s
}

/// One homogenization step on the subset `h` (`[b, d]` f32 unit rows, b ≥
/// 2), in place, on its device (see `uniformity_step_cpu` for the math).
/// Returns `S = Σ_{i≠j} exp(-t‖h_i − h_j‖²)` before the step; the subset's
/// uniformity loss is `ln(S / (b(b − 1)))`. Waits for the device.
pub fn uniformity_step(h: &mut Tensor, temperature: f32, learning_rate: f32) -> Result<f64> {
    const OP: &str = "uniformity_step";
    let (b, d) = f32_matrix(OP, h)?;
    if b < 2 || d == 0 {
        return Err(Error::invalid(OP, format!("needs at least 2 rows and 1 column, got [{b}, {d}]")));
    }
    let dev = h.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let Some(hv) = h.host_slice_mut::<f32>() else { return Err(Error::invalid(OP, "expected f32 host data")) };
        let (mut g, mut grad) = (vec![0f32; b * b], vec![0f32; b * d]);
        return Ok(uniformity_step_cpu(hv, d, temperature, learning_rate, &mut g, &mut grad));
    }
    let mut g = gemm::matmul(h, Op::N, h, Op::T)?;
    let mut row_sums = Tensor::empty(&dev, &[1, b], DType::F32)?;
    // SAFETY: g is [b, b] (read and rewritten in place: the kernel's g and w
    // are not restrict), row_sums [b].
    unsafe {
        launch::uniformity_weights_f32(
            &dev,
            rows_cfg(b),
            g.ptr()?,
            g.ptr_mut()?,
            row_sums.ptr_mut()?,
            b as i32,
            temperature,
        )
    }?;
    let s = rowwise::row_sum(&row_sums)?;
    let grad = gemm::matmul(&g, Op::N, h, Op::N)?;
    // SAFETY: h and grad are [b, d], s one f32.
    unsafe {
        launch::sphere_step_f32(
            &dev,
            rows_cfg(b),
            h.ptr_mut()?,
            grad.ptr()?,
            s.ptr()?,
            b as i32,
            d as i32,
            4.0 * temperature * learning_rate,
        )
    }?;
    Ok(s.to_vec::<f32>()?[0] as f64)
}

/// For each row of `x` (`[n, d]`), the centroid of `centroids` (`[k, d]`,
/// k ≥ 1) with the largest dot product (the lowest index on ties) and that
/// dot product: the spherical k-means assignment. GEMM + argmax on a GPU,
/// which holds the `n × k` scores at once (the tokenizer calls it on chunks
/// of rows; on the CPU the scores are chunked inside).
pub fn best_centroids(x: &Tensor, centroids: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    const OP: &str = "best_centroids";
    let (n, d) = f32_matrix(OP, x)?;
    let (k, dc) = f32_matrix(OP, centroids)?;
    same_device(OP, &[x, centroids])?;
    if dc != d || k == 0 {
        return Err(Error::Shape { op: OP, expected: format!("centroids [k >= 1, {d}]"), got: format!("[{k}, {dc}]") });
    }
    let dev = x.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let (Some(xv), Some(cv)) = (x.host_slice::<f32>(), centroids.host_slice::<f32>()) else {
            return Err(Error::invalid(OP, "expected f32 host data"));
        };
        let members: Vec<u32> = (0..n as u32).collect();
        let best = best_cpu(xv, d, &members, cv, k);
        return Ok((best.idx, best.score));
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let s = gemm::matmul(x, Op::N, centroids, Op::T)?;
    let (mut bi, mut bs) = (dev.alloc(n * 4)?, Tensor::empty(&dev, &[n], DType::F32)?);
    // SAFETY: s is [n, k]; bi holds n i32, bs n f32.
    unsafe {
        launch::argmax_rows_f32(&dev, rows_cfg(n), s.ptr()?, n as i32, k as i32, dev.ptr_mut_of(&mut bi), bs.ptr_mut()?)
    }?;
    let idx: Vec<i32> = bytemuck::pod_collect_to_vec(&dev.download(&bi, n * 4)?);
    Ok((idx.into_iter().map(|i| i as u32).collect(), bs.to_vec::<f32>()?))
}
