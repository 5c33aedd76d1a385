//! Row operations on a row-major `[rows, cols]` matrix (kernels/rowwise.cu):
//! L2 normalization (forward and backward), softmax, log-softmax and row
//! sums. f32 and bf16 elements; arithmetic in f32 on the GPU, f64 in the CPU
//! reference.
//!
//! NaN in a row propagates to that row's outputs; a row of all -inf has a
//! NaN softmax (0/0), as in PyTorch. Zero rows give empty outputs.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::device::LaunchConfig;
use crate::runtime::launch::launch_one_of;
use crate::runtime::tensor::{same_device, DType, HostData, Tensor};

/// Threads per block in every rowwise kernel.
const BLOCK: u32 = 256;
/// Rows up to this many columns get one warp each; longer rows a block.
pub const WARP_PER_ROW_MAX_COLS: usize = 1024;

/// CPU reference implementations on f32 slices, accumulating in f64. They
/// are also the CPU backend.
pub mod cpu {
    use super::*;

    /// `y = x / max(||x||, eps)` and `norms = ||x||` per row.
    pub fn l2_normalize(x: &[f32], cols: usize, eps: f32, y: &mut [f32], norms: &mut [f32]) {
        if cols == 0 {
            norms.fill(0.0);
            return;
        }
        y.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(norms.par_iter_mut()).for_each(|((yr, xr), n)| {
            let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
            let norm = ss.sqrt();
            let inv = 1.0 / norm.max(eps as f64);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v as f64 * inv) as f32;
            }
            *n = norm as f32;
        });
    }

    /// `dx = (dy - y (y·dy)) / n` where `n > eps`, else `dy / eps`.
    pub fn l2_normalize_backward(y: &[f32], norms: &[f32], dy: &[f32], cols: usize, eps: f32, dx: &mut [f32]) {
        if cols == 0 {
            return;
        }
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
            let yr = &y[r * cols..(r + 1) * cols];
            let dyr = &dy[r * cols..(r + 1) * cols];
            let n = norms[r];
            if n > eps {
                let dot: f64 = yr.iter().zip(dyr).map(|(&a, &b)| a as f64 * b as f64).sum();
                for ((o, &a), &b) in dxr.iter_mut().zip(yr).zip(dyr) {
                    *o = ((b as f64 - a as f64 * dot) / n as f64) as f32;
                }
            } else {
                for (o, &b) in dxr.iter_mut().zip(dyr) {
                    *o = (b as f64 / eps as f64) as f32;
                }
            }
        });
    }

    /// Softmax (or log-softmax when `log`) of each row.
    pub fn softmax(x: &[f32], cols: usize, log: bool, y: &mut [f32]) {
        if cols == 0 {
            return;
        }
        y.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(yr, xr)| {
            let m = xr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let s: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
            if xr.iter().any(|v| v.is_nan()) {
                yr.fill(f32::NAN);
                return;
            }
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = if log { (v as f64 - m - s.ln()) as f32 } else { ((v as f64 - m).exp() / s) as f32 };
            }
        });
    }

    /// Sum of each row.
    pub fn row_sum(x: &[f32], cols: usize, out: &mut [f32]) {
        if cols == 0 {
            out.fill(0.0);
            return;
        }
        out.par_iter_mut().zip(x.par_chunks(cols)).for_each(|(o, xr)| {
            *o = xr.iter().map(|&v| v as f64).sum::<f64>() as f32;
        });
    }
}

/// Checks a rowwise input: 2-D, f32 or bf16, sizes that fit the kernels'
/// `int` arguments. Returns (rows, cols).
fn check_input(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = x.dims2(op)?;
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::invalid(op, format!("supports f32 and bf16 elements, got {:?}", x.dtype())));
    }
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            format!("rows and cols must each be at most {}, got [{rows}, {cols}]", i32::MAX),
        ));
    }
    Ok((rows, cols))
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid(op, format!("eps must be finite and positive, got {eps}")));
    }
    Ok(())
}

/// The variant (`true`: the `_w` kernels, a warp per row, up to
/// [`WARP_PER_ROW_MAX_COLS`] columns; else `_b`, a block per row) and the
/// launch that covers `rows` rows of `cols` columns.
fn plan(rows: usize, cols: usize) -> (bool, LaunchConfig) {
    let warp = cols <= WARP_PER_ROW_MAX_COLS;
    let blocks = if warp { rows.div_ceil((BLOCK / 32) as usize) } else { rows };
    (warp, LaunchConfig::linear(blocks as u32, BLOCK, 0))
}

/// L2-normalizes each row: `y = x / max(||x||, eps)`.
///
/// `x`: `[rows, cols]`, f32 or bf16. Returns `y` (same shape and dtype) and
/// `norms`, f32 `[rows]`, the unclamped `||x||` that
/// [`l2_normalize_backward`] takes. `eps` must be finite and positive
/// (PyTorch's `F.normalize` uses 1e-12).
pub fn l2_normalize(x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    normalize_impl("l2_normalize", x, eps, x.dtype())
}

/// [`l2_normalize`] with `y` in f32 whatever `x`'s dtype (f32 or bf16):
/// bf16 rows normalized without a widened copy.
pub fn l2_normalize_f32(x: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    normalize_impl("l2_normalize_f32", x, eps, DType::F32)
}

fn normalize_impl(op: &'static str, x: &Tensor, eps: f32, out: DType) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = check_input(op, x)?;
    check_eps(op, eps)?;
    let dev = x.device();
    if !dev.runs_kernels() {
        let xs = x.host_f32()?;
        let (mut y, mut n) = (vec![0f32; rows * cols], vec![0f32; rows]);
        cpu::l2_normalize(&xs, cols, eps, &mut y, &mut n);
        return Ok((
            Tensor::from_host(dev, vec![rows, cols], HostData::from_f32(y, out)),
            Tensor::from_host(dev, vec![rows], HostData::F32(n)),
        ));
    }
    let mut y = Tensor::empty(dev, &[rows, cols], out)?;
    let mut norms = Tensor::empty(dev, &[rows], DType::F32)?;
    if rows > 0 {
        let (warp, cfg) = plan(rows, cols);
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: x and y hold rows·cols elements, norms rows (checked above,
        // allocated here); the launch covers exactly those rows.
        unsafe {
            launch_one_of!((x.dtype(), out, warp), {
                (DType::F32, _, true) => l2norm_fwd_f32_w, (DType::F32, _, false) => l2norm_fwd_f32_b,
                (_, DType::F32, true) => l2norm_fwd_bf16f32_w, (_, DType::F32, false) => l2norm_fwd_bf16f32_b,
                (_, _, true) => l2norm_fwd_bf16_w, (_, _, false) => l2norm_fwd_bf16_b,
            }, (dev, cfg, x.ptr()?, y.ptr_mut()?, norms.ptr_mut()?, r, c, eps))
        }?;
    }
    Ok((y, norms))
}

/// The gradient of [`l2_normalize`]: given its output `y`, its `norms` and
/// the gradient `dy` of the loss with respect to `y`, returns `dx`:
/// `dx = (dy - y (y·dy)) / n` for rows with `n > eps`, `dy / eps` for rows
/// that were clamped. Shapes: `y`, `dy`: `[rows, cols]` of one dtype;
/// `norms`: f32 `[rows]`.
pub fn l2_normalize_backward(y: &Tensor, norms: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    let mut dx = Tensor::empty(y.device(), y.shape(), y.dtype())?;
    l2_normalize_backward_into(y, norms, dy, eps, &mut dx)?;
    Ok(dx)
}

/// [`l2_normalize_backward`] into `dx` (`y`'s shape, dtype and device),
/// every element overwritten.
pub fn l2_normalize_backward_into(y: &Tensor, norms: &Tensor, dy: &Tensor, eps: f32, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "l2_normalize_backward";
    let (rows, cols) = check_input(OP, y)?;
    check_eps(OP, eps)?;
    let dev = same_device(OP, &[y, norms, dy])?;
    if dy.shape() != y.shape() {
        return Err(Error::Shape {
            op: OP,
            expected: format!("dy of shape {:?}", y.shape()),
            got: format!("{:?}", dy.shape()),
        });
    }
    if dy.dtype() != y.dtype() {
        return Err(Error::DType { op: OP, expected: y.dtype(), got: dy.dtype() });
    }
    if norms.shape() != [rows] {
        return Err(Error::Shape {
            op: OP,
            expected: format!("norms of shape [{rows}]"),
            got: format!("{:?}", norms.shape()),
        });
    }
    if norms.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, expected: DType::F32, got: norms.dtype() });
    }
    if dx.shape() != y.shape() || dx.dtype() != y.dtype() {
        return Err(Error::Shape {
            op: OP,
            expected: format!("dx of shape {:?}, {:?}", y.shape(), y.dtype()),
            got: format!("{:?} {:?}", dx.shape(), dx.dtype()),
        });
    }
    same_device(OP, &[y, dx])?;
    if !dev.runs_kernels() {
        let (ys, ns, dys) = (y.host_f32()?, norms.host_f32()?, dy.host_f32()?);
        let mut v = vec![0f32; rows * cols];
        cpu::l2_normalize_backward(&ys, &ns, &dys, cols, eps, &mut v);
        return dx.write_host_f32(&v);
    }
    if rows > 0 {
        let (warp, cfg) = plan(rows, cols);
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: y, dy and dx hold rows·cols elements, norms rows (checked
        // above, dx allocated here).
        unsafe {
            launch_one_of!((y.dtype(), warp), {
                (DType::F32, true) => l2norm_bwd_f32_w, (DType::F32, false) => l2norm_bwd_f32_b,
                (_, true) => l2norm_bwd_bf16_w, (_, false) => l2norm_bwd_bf16_b,
            }, (dev, cfg, y.ptr()?, norms.ptr()?, dy.ptr()?, dx.ptr_mut()?, r, c, eps))
        }?;
    }
    Ok(())
}

fn softmax_impl(op: &'static str, x: &Tensor, log: bool) -> Result<Tensor> {
    let (rows, cols) = check_input(op, x)?;
    let dev = x.device();
    if !dev.runs_kernels() {
        let xs = x.host_f32()?;
        let mut y = vec![0f32; rows * cols];
        cpu::softmax(&xs, cols, log, &mut y);
        return Ok(Tensor::from_host(dev, vec![rows, cols], HostData::from_f32(y, x.dtype())));
    }
    let mut y = Tensor::empty(dev, &[rows, cols], x.dtype())?;
    if rows > 0 {
        let (warp, cfg) = plan(rows, cols);
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: x and y hold rows·cols elements (checked, allocated here).
        unsafe {
            launch_one_of!((log, x.dtype(), warp), {
                (false, DType::F32, true) => softmax_f32_w, (false, DType::F32, false) => softmax_f32_b,
                (false, _, true) => softmax_bf16_w, (false, _, false) => softmax_bf16_b,
                (true, DType::F32, true) => log_softmax_f32_w, (true, DType::F32, false) => log_softmax_f32_b,
                (true, _, true) => log_softmax_bf16_w, (true, _, false) => log_softmax_bf16_b,
            }, (dev, cfg, x.ptr()?, y.ptr_mut()?, r, c))
        }?;
    }
    Ok(y)
}

/// Softmax of each row: `y = exp(x - max x) / sum exp(x - max x)`.
/// `x`: `[rows, cols]`, f32 or bf16; `y` has its shape and dtype.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_impl("softmax", x, false)
}

/// Log-softmax of each row: `y = x - max x - log sum exp(x - max x)`.
/// `x`: `[rows, cols]`, f32 or bf16; `y` has its shape and dtype.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    softmax_impl("log_softmax", x, true)
}

/// Sum of each row. `x`: `[rows, cols]`, f32 or bf16; returns f32 `[rows]`.
pub fn row_sum(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "row_sum";
    let (rows, cols) = check_input(OP, x)?;
    let dev = x.device();
    if !dev.runs_kernels() {
        let xs = x.host_f32()?;
        let mut out = vec![0f32; rows];
        cpu::row_sum(&xs, cols, &mut out);
        return Ok(Tensor::from_host(dev, vec![rows], HostData::F32(out)));
    }
    let mut out = Tensor::empty(dev, &[rows], DType::F32)?;
    if rows > 0 {
        let (warp, cfg) = plan(rows, cols);
        let (r, c) = (rows as i32, cols as i32);
        // SAFETY: x holds rows·cols elements, out rows (checked, allocated here).
        unsafe {
            launch_one_of!((x.dtype(), warp), {
                (DType::F32, true) => row_sum_f32_w, (DType::F32, false) => row_sum_f32_b,
                (_, true) => row_sum_bf16_w, (_, false) => row_sum_bf16_b,
            }, (dev, cfg, x.ptr()?, out.ptr_mut()?, r, c))
        }?;
    }
    Ok(out)
}
