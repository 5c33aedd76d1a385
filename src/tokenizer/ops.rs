//! The tokenizer's building blocks, on any device: row gather and scatter,
//! one homogenization step, and the k-means assignment (best centroid per
//! row). On a GPU or the simulator they run kernels/tokenizer.cu with the
//! GEMMs of kernels/gemm.cu; on the CPU, the references below (which the
//! CPU path of the tokenizer uses directly on slices).

use rayon::prelude::*;

use crate::device::{Device, DeviceKind, LaunchConfig};
use crate::error::{Error, Result};
use crate::gemm::{self, Op};
use crate::kernels::launch;
use crate::rowwise;
use crate::tensor::{same_device, DType, HostData, Tensor};

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

fn check_ids(op: &'static str, ids: &[u32], n: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= n) {
        Some(p) => Err(Error::invalid(op, format!("ids[{p}] = {} is not a row of a {n}-row matrix", ids[p]))),
        None => Ok(()),
    }
}

fn upload_ids(device: &Device, ids: &[u32]) -> Result<crate::device::DeviceBuffer> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    device.upload(bytemuck::cast_slice(&v))
}

/// Rows `ids` of `src` (`[n, d]`, f32) as a new `[ids.len(), d]` tensor.
pub fn gather_rows(src: &Tensor, ids: &[u32]) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let (n, d) = f32_matrix(OP, src)?;
    check_ids(OP, ids, n)?;
    let dev = src.device();
    if dev.kind() == DeviceKind::Cpu {
        let Some(HostData::F32(s)) = src.host() else { return Err(Error::invalid(OP, "expected f32 host data")) };
        let mut out = vec![0f32; ids.len() * d];
        out.par_chunks_mut(d.max(1)).zip(ids.par_iter()).for_each(|(row, &i)| {
            row.copy_from_slice(&s[i as usize * d..(i as usize + 1) * d]);
        });
        return Ok(Tensor::from_host(dev, vec![ids.len(), d], HostData::F32(out)));
    }
    let mut out = Tensor::empty(dev, &[ids.len(), d], DType::F32)?;
    if !ids.is_empty() {
        let idx = upload_ids(dev, ids)?;
        // SAFETY: ids (checked < n) index rows of src ([n, d]); out holds
        // ids.len() rows of d; idx holds ids.len() i32.
        unsafe {
            launch::gather_rows_f32(
                dev,
                rows_cfg(ids.len()),
                src.ptr()?,
                dev.ptr_of(&idx),
                out.ptr_mut()?,
                ids.len() as i32,
                d as i32,
            )
        }?;
    }
    Ok(out)
}

/// Writes row `i` of `src` (`[ids.len(), d]`) to row `ids[i]` of `dst`
/// (`[n, d]`). With repeated ids the last write wins on the CPU; on a GPU
/// the order is unspecified.
pub fn scatter_rows(src: &Tensor, ids: &[u32], dst: &mut Tensor) -> Result<()> {
    const OP: &str = "scatter_rows";
    let (m, d) = f32_matrix(OP, src)?;
    let (n, dd) = f32_matrix(OP, dst)?;
    same_device(OP, &[src, dst])?;
    if m != ids.len() || d != dd {
        return Err(Error::Shape {
            op: OP,
            expected: format!("src [{}, {dd}]", ids.len()),
            got: format!("[{m}, {d}]"),
        });
    }
    check_ids(OP, ids, n)?;
    let dev = src.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let Some(HostData::F32(s)) = src.host() else { return Err(Error::invalid(OP, "expected f32 host data")) };
        let s = s.clone();
        let Some(HostData::F32(t)) = dst.host_mut() else { return Err(Error::invalid(OP, "expected f32 host data")) };
        for (row, &i) in s.chunks(d.max(1)).zip(ids) {
            t[i as usize * d..(i as usize + 1) * d].copy_from_slice(row);
        }
        return Ok(());
    }
    if !ids.is_empty() {
        let idx = upload_ids(&dev, ids)?;
        // SAFETY: src holds m = ids.len() rows of d; ids (checked < n) index
        // rows of dst ([n, d]); idx holds m i32.
        unsafe {
            launch::scatter_rows_f32(
                &dev,
                rows_cfg(m),
                src.ptr()?,
                dev.ptr_of(&idx),
                dst.ptr_mut()?,
                m as i32,
                d as i32,
            )
        }?;
    }
    Ok(())
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
        let Some(HostData::F32(hv)) = h.host_mut() else { return Err(Error::invalid(OP, "expected f32 host data")) };
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
        let (Some(HostData::F32(xv)), Some(HostData::F32(cv))) = (x.host(), centroids.host()) else {
            return Err(Error::invalid(OP, "expected f32 host data"));
        };
        let members: Vec<u32> = (0..n as u32).collect();
        let best = super::kmeans::best_cpu(xv, d, &members, cv, k);
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
