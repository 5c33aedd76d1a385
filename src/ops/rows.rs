//! Row gathers, scatters and updates of row-major `[rows, d]` matrices
//! (kernels/rows.cu), on any device: the tokenizer's subsets, the heads'
//! sparse and dense SGD steps.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::kernels::Ptr;
use crate::runtime::launch::{self, launch_one_of};
use crate::runtime::tensor::{same_device, DType, HostData, Tensor};

/// A warp per row, 8 rows per 256-thread block.
fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(8) as u32, 256, 0)
}

/// `(rows, cols)` of a 2-D tensor of `dtypes` whose sizes fit the kernels'
/// int arguments.
fn matrix(op: &'static str, t: &Tensor, dtypes: &[DType]) -> Result<(usize, usize)> {
    let (r, c) = t.dims2(op)?;
    if !dtypes.contains(&t.dtype()) {
        return Err(Error::DType { op, expected: dtypes[0], got: t.dtype() });
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

fn upload_ids(device: &Device, ids: &[u32]) -> Result<DeviceBuffer> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    device.upload(bytemuck::cast_slice(&v))
}

/// Rows `ids` of `src` (`[n, d]`, f32) as a new `[ids.len(), d]` tensor.
pub fn gather_rows(src: &Tensor, ids: &[u32]) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let (n, d) = matrix(OP, src, &[DType::F32])?;
    check_ids(OP, ids, n)?;
    let dev = src.device();
    if dev.kind() == DeviceKind::Cpu {
        let Some(s) = src.host_slice::<f32>() else { return Err(Error::invalid(OP, "expected f32 host data")) };
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
    let (m, d) = matrix(OP, src, &[DType::F32])?;
    let (n, dd) = matrix(OP, dst, &[DType::F32])?;
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
        let Some(s) = src.host_slice::<f32>() else { return Err(Error::invalid(OP, "expected f32 host data")) };
        let s = s.to_vec();
        let Some(t) = dst.host_slice_mut::<f32>() else { return Err(Error::invalid(OP, "expected f32 host data")) };
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

/// `w[rows[i]] += a·g[i]` for each row i of `g` (`[n, d]`, f32), into `w`
/// (`[m, d]`, f32 or bf16, rounded to nearest even), on w's device; `rows`
/// None: the identity (n = m). Errors: shapes, dtypes or devices that do
/// not match, a row ≥ m. With repeated rows the updates race on a GPU.
pub fn axpy_rows(w: &mut Tensor, rows: Option<&[u32]>, g: &Tensor, a: f32) -> Result<()> {
    const OP: &str = "axpy_rows";
    let (m, d) = matrix(OP, w, &[DType::F32, DType::BF16])?;
    let (n, dg) = matrix(OP, g, &[DType::F32])?;
    same_device(OP, &[w, g])?;
    let want = rows.map_or(m, <[u32]>::len);
    if dg != d || n != want {
        return Err(Error::Shape {
            op: OP,
            expected: format!("a gradient [{want}, {d}]"),
            got: format!("[{n}, {dg}]"),
        });
    }
    if let Some(r) = rows {
        check_ids(OP, r, m)?;
    }
    let dev = w.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let gv = g.host_f32()?.into_owned();
        let row = |i: usize| rows.map_or(i, |r| r[i] as usize);
        if let Some(v) = w.host_slice_mut::<f32>() {
            (0..n).for_each(|i| {
                let r = row(i);
                v[r * d..(r + 1) * d].iter_mut().zip(&gv[i * d..(i + 1) * d]).for_each(|(p, q)| *p += a * q);
            });
        } else if let Some(v) = w.host_slice_mut::<half::bf16>() {
            (0..n).for_each(|i| {
                let r = row(i);
                v[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(&gv[i * d..(i + 1) * d])
                    .for_each(|(p, q)| *p = half::bf16::from_f32(p.to_f32() + a * q));
            });
        } else {
            return Err(Error::invalid(OP, "expected f32 or bf16 host data"));
        }
        return Ok(());
    }
    if n == 0 {
        return Ok(());
    }
    let rows_buf = rows.map(|r| upload_ids(&dev, r)).transpose()?;
    let rows_p = rows_buf.as_ref().map_or(Ptr::null(), |r| dev.ptr_of(r));
    // SAFETY: rows holds n indices < m (checked), or is null and n = m.
    unsafe { axpy_launch(w, rows_p, g, n, d, a) }
}

/// `rows_axpy` on a GPU backend.
///
/// # Safety
///
/// g is `[n, d]` f32 and w `[m, d]` on one device (checked by the caller);
/// `rows` addresses n i32 row indices < m of that device, or is null with
/// n = m.
unsafe fn axpy_launch(w: &mut Tensor, rows: Ptr<i32>, g: &Tensor, n: usize, d: usize, a: f32) -> Result<()> {
    let dev = w.device().clone();
    // SAFETY: the caller's contract.
    unsafe {
        launch_one_of!(w.dtype(), { DType::F32 => rows_axpy_f32, _ => rows_axpy_bf16 },
            (&dev, rows_cfg(n), w.ptr_mut()?, rows, g.ptr()?, n as i32, d as i32, a))
    }
}

/// [`axpy_rows`] through a sample the crate drew (u32 `[n]` on w's device,
/// every id < m by construction: Partial FC's), read where it lies: no
/// upload, no download.
pub(crate) fn axpy_sampled_rows(w: &mut Tensor, rows: &Tensor, g: &Tensor, a: f32) -> Result<()> {
    const OP: &str = "axpy_rows";
    let n = check_sample(OP, rows, w)?;
    if let Some(r) = rows.host_slice::<u32>() {
        return axpy_rows(w, Some(r), g, a);
    }
    let (_, d) = matrix(OP, w, &[DType::F32, DType::BF16])?;
    let (ng, dg) = matrix(OP, g, &[DType::F32])?;
    same_device(OP, &[w, g])?;
    if (ng, dg) != (n, d) {
        return Err(Error::Shape { op: OP, expected: format!("a gradient [{n}, {d}]"), got: format!("[{ng}, {dg}]") });
    }
    if n == 0 {
        return Ok(());
    }
    let rows_p = Ptr::<i32>::from_addr(rows.ptr::<u32>()?.addr());
    // SAFETY: the n sampled ids are rows of w, drawn by the crate's own
    // sampling kernels (check_sample); shapes checked above.
    unsafe { axpy_launch(w, rows_p, g, n, d, a) }
}

/// Rows `ids` (a sample the crate drew: u32 `[n]` on `src`'s device, every
/// id a row of `src`) of `src` (`[m, d]`, f32 or bf16) as a new `[n, d]`
/// tensor of its dtype, read where the ids lie (no upload).
pub(crate) fn gather_sampled_rows(src: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather_rows";
    let n = check_sample(OP, ids, src)?;
    let (_, d) = matrix(OP, src, &[DType::F32, DType::BF16])?;
    let dev = src.device();
    if let Some(i) = ids.host_slice::<u32>() {
        return match src.dtype() {
            DType::F32 => gather_rows(src, i),
            _ => Err(Error::invalid(OP, "bf16 rows are gathered on a GPU backend")),
        };
    }
    let mut out = Tensor::empty(dev, &[n, d], src.dtype())?;
    if n > 0 {
        let ids_p = Ptr::<i32>::from_addr(ids.ptr::<u32>()?.addr());
        // SAFETY: the n ids are rows of src ([m, d]: check_sample); out
        // holds n rows of d of src's dtype.
        unsafe {
            launch_one_of!(src.dtype(), { DType::F32 => gather_rows_f32, _ => gather_rows_bf16 },
                (dev, rows_cfg(n), src.ptr()?, ids_p, out.ptr_mut()?, n as i32, d as i32))
        }?;
    }
    Ok(out)
}

/// The length of a crate-drawn sample of rows of `of`: a u32 vector on its
/// device, no longer than `of` has rows.
fn check_sample(op: &'static str, ids: &Tensor, of: &Tensor) -> Result<usize> {
    if ids.dtype() != DType::U32 || ids.shape().len() != 1 {
        return Err(Error::invalid(op, "the sample must be a u32 vector"));
    }
    same_device(op, &[ids, of])?;
    let (m, _) = of.dims2(op)?;
    if ids.numel() > m {
        return Err(Error::invalid(op, format!("a sample of {} rows of a {m}-row matrix", ids.numel())));
    }
    Ok(ids.numel())
}
