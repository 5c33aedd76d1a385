//! 2-D convolution on NHWC activations, the IResNet way: square kernels,
//! zero padding, stride 1 or 2, no bias (every conv is followed by a
//! BatchNorm). Weights are stored OHWI (`[C_out, k, k, C_in]`): each output
//! channel's filter is one contiguous row of the implicit-GEMM B operand
//! (checkpoints' OIHW is converted on load).
//!
//! [`conv2d`], [`conv2d_data_grad`], [`conv2d_weight_grad`]: implicit GEMM
//! (kernels/conv.cu), no im2col buffer, with f32 operands on the fp32 SIMT
//! tile or bf16 operands on the bf16 tensor-core tile (f32 accumulation
//! and results either way). On the CPU all three are im2col / col2im per
//! image + the `gemm` crate (f32; bf16 operands widened);
//! `cpu::{forward, data_grad, weight_grad}` are the direct f64 reference
//! (the tests' oracle).

use crate::error::{Error, Result};
use crate::ops::gemm::{bf16_shared_bytes, Op};
use crate::runtime::device::{DeviceKind, LaunchConfig};
use crate::runtime::launch::launch_one_of;
use crate::runtime::tensor::{same_device, DType, Tensor};

const TILE: usize = 128;

/// Checks `t` is `dtype` of `shape` or its `[pixels, channels]`
/// flattening; returns whether it is the flattening.
fn check(op: &'static str, t: &Tensor, what: &str, shape: [usize; 4], dtype: DType) -> Result<bool> {
    let flat = [shape[0] * shape[1] * shape[2], shape[3]];
    if t.dtype() == dtype && t.shape() == shape {
        return Ok(false);
    }
    if t.dtype() == dtype && t.shape() == flat {
        return Ok(true);
    }
    Err(Error::Shape {
        op,
        expected: format!("{what} {dtype:?} {shape:?} (or {flat:?})"),
        got: format!("{:?} {:?}", t.shape(), t.dtype()),
    })
}

/// The operands' dtype: f32 or bf16 (the first operand's; the checks then
/// require the other to match).
fn operand_dtype(op: &'static str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        d @ (DType::F32 | DType::BF16) => Ok(d),
        d => Err(Error::invalid(op, format!("operands must be f32 or bf16, got {d:?}"))),
    }
}

/// `shape`, or its `[pixels, channels]` flattening.
fn shaped(shape: [usize; 4], flat: bool) -> Vec<usize> {
    if flat {
        vec![shape[0] * shape[1] * shape[2], shape[3]]
    } else {
        shape.to_vec()
    }
}

impl ConvShape {
    fn input(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.c_in]
    }
    fn weights(&self) -> [usize; 4] {
        [self.c_out, self.kernel, self.kernel, self.c_in]
    }
    fn output(&self) -> [usize; 4] {
        let (ho, wo) = self.hw();
        [self.batch, ho, wo, self.c_out]
    }
    /// B, H, W, C_in, C_out, k, stride, pad, H_o, W_o as the kernels take
    /// them (after checking they fit their 32-bit indices).
    fn geometry(&self) -> Result<[i32; 10]> {
        let (ho, wo) = self.hw();
        let pixels = self.height.max(ho).checked_mul(self.width.max(wo)).and_then(|p| p.checked_mul(self.batch));
        let taps = self.kernel * self.kernel * self.c_in.max(self.c_out);
        if pixels.is_none_or(|p| p > i32::MAX as usize) || taps > i32::MAX as usize {
            return Err(Error::invalid("conv2d", format!("{self:?} is too large for 32-bit indices")));
        }
        Ok([self.batch, self.height, self.width, self.c_in, self.c_out, self.kernel, self.stride, self.pad, ho, wo]
            .map(|v| v as i32))
    }
    /// Launches `conv_<op>_<variant>` for `dtype` operands: f32 (`_v`:
    /// float4 loads, both channel counts multiples of 4) or bf16 on tensor
    /// cores (`_a`: 16-byte cp.async, multiples of 8; dynamic shared memory
    /// of gemm's tile with A, B stored as the op reads them). The grid
    /// covers an `m x n` output in 128 x 128 tiles, x `splits`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        op: ConvOp,
        dtype: DType,
        a: &Tensor,
        b: &Tensor,
        out: &mut Tensor,
        (m, n): (usize, usize),
        splits: usize,
    ) -> Result<()> {
        let ops = match op {
            ConvOp::Fwd => (Op::N, Op::T),
            ConvOp::Dgrad => (Op::N, Op::N),
            ConvOp::Wgrad(_) => (Op::T, Op::N),
        };
        let bf16 = dtype == DType::BF16;
        let wide = if bf16 {
            self.c_in.is_multiple_of(8) && self.c_out.is_multiple_of(8)
        } else {
            self.c_in.is_multiple_of(4) && self.c_out.is_multiple_of(4)
        };
        let cfg = LaunchConfig {
            grid: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, splits as u32),
            block: (256, 1, 1),
            shared_bytes: if bf16 { bf16_shared_bytes(ops.0, ops.1) as u32 } else { 0 },
        };
        let [bb, h, w, ci, co, k, st, pd, ho, wo] = self.geometry()?;
        let dev = a.device();
        // SAFETY: the callers checked a, b and out against this shape (input,
        // weights, output or their gradients, as the op reads them) and the
        // geometry fits the kernels' 32-bit indices; the weight gradient's
        // chunks cover m rows in `splits` parts.
        unsafe {
            match op {
                ConvOp::Fwd => launch_one_of!((bf16, wide), {
                    (false, false) => conv_fwd_f32, (false, true) => conv_fwd_f32_v,
                    (true, false) => conv_fwd_bf16, (true, true) => conv_fwd_bf16_a,
                }, (dev, cfg, a.ptr()?, b.ptr()?, bb, h, w, ci, co, k, st, pd, ho, wo, out.ptr_mut()?)),
                ConvOp::Dgrad => launch_one_of!((bf16, wide), {
                    (false, false) => conv_dgrad_f32, (false, true) => conv_dgrad_f32_v,
                    (true, false) => conv_dgrad_bf16, (true, true) => conv_dgrad_bf16_a,
                }, (dev, cfg, a.ptr()?, b.ptr()?, bb, h, w, ci, co, k, st, pd, ho, wo, out.ptr_mut()?)),
                ConvOp::Wgrad(chunk) => launch_one_of!((bf16, wide), {
                    (false, false) => conv_wgrad_f32, (false, true) => conv_wgrad_f32_v,
                    (true, false) => conv_wgrad_bf16, (true, true) => conv_wgrad_bf16_a,
                }, (dev, cfg, a.ptr()?, b.ptr()?, bb, h, w, ci, co, k, st, pd, ho, wo, chunk, out.ptr_mut()?)),
            }
        }
    }
}

/// Which convolution kernel family: the forward, the data gradient, or the
/// weight gradient over chunks of this many output pixels.
#[derive(Clone, Copy)]
enum ConvOp {
    Fwd,
    Dgrad,
    Wgrad(i32),
}

/// `y = conv(x, w)`: x `[B, H, W, C_in]`, w `[C_out, k, k, C_in]`, y
/// `[B, H_o, W_o, C_out]`. Activations may also be given flattened to
/// `[pixels, channels]` (the layout BatchNorm takes); the result is then
/// flattened too. x and w both f32 (the fp32 SIMT kernels) or both bf16
/// (tensor cores, f32 accumulation); y is f32 either way.
pub fn conv2d(x: &Tensor, w: &Tensor, s: &ConvShape) -> Result<Tensor> {
    s.validate("conv2d")?;
    let flat = check("conv2d", x, "input", s.input(), operand_dtype("conv2d", x)?)?;
    let mut y = Tensor::empty(x.device(), &shaped(s.output(), flat), DType::F32)?;
    conv2d_into(x, w, s, &mut y)?;
    Ok(y)
}

/// [`conv2d`] into `y` (`[B, H_o, W_o, C_out]` or its flattening, f32, on
/// the same device), which is overwritten: no allocation on a GPU backend.
pub fn conv2d_into(x: &Tensor, w: &Tensor, s: &ConvShape, y: &mut Tensor) -> Result<()> {
    const OP: &str = "conv2d";
    s.validate(OP)?;
    let dtype = operand_dtype(OP, x)?;
    check(OP, x, "input", s.input(), dtype)?;
    check(OP, w, "weights", s.weights(), dtype)?;
    let dev = same_device(OP, &[x, w])?;
    y.check_output(OP, dev, &[&s.output(), &shaped(s.output(), true)])?;
    if dev.kind() == DeviceKind::Cpu {
        return y.write_host_f32(&cpu::forward_gemm(s, &x.host_f32()?, &w.host_f32()?));
    }
    let (ho, wo) = s.hw();
    s.launch(ConvOp::Fwd, dtype, x, w, y, (s.batch * ho * wo, s.c_out), 1)
}

/// The gradient with respect to the input: dy `[B, H_o, W_o, C_out]` →
/// dx `[B, H, W, C_in]` (f32; dy and w both f32 or both bf16).
pub fn conv2d_data_grad(dy: &Tensor, w: &Tensor, s: &ConvShape) -> Result<Tensor> {
    const OP: &str = "conv2d_data_grad";
    s.validate(OP)?;
    let flat = check(OP, dy, "output gradient", s.output(), operand_dtype(OP, dy)?)?;
    let mut dx = Tensor::empty(dy.device(), &shaped(s.input(), flat), DType::F32)?;
    conv2d_data_grad_into(dy, w, s, &mut dx)?;
    Ok(dx)
}

/// [`conv2d_data_grad`] into `dx` (`[B, H, W, C_in]` or its flattening),
/// which is overwritten.
pub fn conv2d_data_grad_into(dy: &Tensor, w: &Tensor, s: &ConvShape, dx: &mut Tensor) -> Result<()> {
    const OP: &str = "conv2d_data_grad";
    s.validate(OP)?;
    let dtype = operand_dtype(OP, dy)?;
    check(OP, dy, "output gradient", s.output(), dtype)?;
    check(OP, w, "weights", s.weights(), dtype)?;
    let dev = same_device(OP, &[dy, w])?;
    dx.check_output(OP, dev, &[&s.input(), &shaped(s.input(), true)])?;
    if dev.kind() == DeviceKind::Cpu {
        return dx.write_host_f32(&cpu::data_grad_gemm(s, &dy.host_f32()?, &w.host_f32()?));
    }
    s.launch(ConvOp::Dgrad, dtype, dy, w, dx, (s.batch * s.height * s.width, s.c_in), 1)
}

/// The gradient with respect to the weights: `[C_out, k, k, C_in]`, f32
/// (x and dy both f32 or both bf16). On a GPU the sum over output pixels is
/// split across blocks (to fill the GPU) whose parts are added atomically,
/// so the last bits may vary run to run unless one split covers all pixels.
pub fn conv2d_weight_grad(x: &Tensor, dy: &Tensor, s: &ConvShape) -> Result<Tensor> {
    s.validate("conv2d_weight_grad")?;
    let mut dw = Tensor::empty(x.device(), &s.weights(), DType::F32)?;
    conv2d_weight_grad_into(x, dy, s, &mut dw, false)?;
    Ok(dw)
}

/// [`conv2d_weight_grad`] into `dw` (`[C_out, k, k, C_in]` f32, on the same
/// device): overwritten, or with `accumulate` the gradient is added to what
/// it holds (gradient accumulation without a temporary: the kernel adds
/// its parts into `dw` either way, which is zeroed first unless
/// accumulating).
pub fn conv2d_weight_grad_into(
    x: &Tensor,
    dy: &Tensor,
    s: &ConvShape,
    dw: &mut Tensor,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "conv2d_weight_grad";
    s.validate(OP)?;
    let dtype = operand_dtype(OP, x)?;
    check(OP, x, "input", s.input(), dtype)?;
    check(OP, dy, "output gradient", s.output(), dtype)?;
    let dev = same_device(OP, &[x, dy])?;
    dw.check_output(OP, dev, &[&s.weights()])?;
    if dev.kind() == DeviceKind::Cpu {
        let mut g = cpu::weight_grad_gemm(s, &x.host_f32()?, &dy.host_f32()?);
        if accumulate {
            g.iter_mut().zip(dw.host_f32()?.iter()).for_each(|(a, b)| *a += b);
        }
        return dw.write_host_f32(&g);
    }
    if !accumulate {
        dw.fill_zeros()?;
    }
    let (ho, wo) = s.hw();
    let m = s.batch * ho * wo;
    let n = s.kernel * s.kernel * s.c_in;
    let tiles = n.div_ceil(TILE) * s.c_out.div_ceil(TILE);
    let splits = 528usize.div_ceil(tiles).clamp(1, m.div_ceil(16));
    // Multiples of 32, a k-tile of both kernels' families (16 and 32).
    let chunk = m.div_ceil(splits).div_ceil(32) * 32;
    s.launch(ConvOp::Wgrad(chunk as i32), dtype, x, dy, dw, (s.c_out, n), m.div_ceil(chunk))
}

/// Shape of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch B.
    pub batch: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size k (k x k).
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl ConvShape {
    /// Output height and width, `(n + 2·pad − k) / stride + 1`. Errors
    /// (checked arithmetic): a zero stride, a kernel larger than the padded
    /// input, sizes that overflow.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let o = |n: usize| {
            self.pad
                .checked_mul(2)
                .and_then(|p| p.checked_add(n))
                .and_then(|p| p.checked_sub(self.kernel))
                .and_then(|p| p.checked_div(self.stride))
                .map(|q| q + 1)
        };
        match (o(self.height), o(self.width)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(Error::invalid(
                "ConvShape::out_hw",
                format!("no output for {self:?}: the stride must be positive and the kernel fit the padded input"),
            )),
        }
    }

    /// The output size of a shape [`ConvShape::validate`] accepted.
    fn hw(&self) -> (usize, usize) {
        self.out_hw().unwrap_or((0, 0))
    }

    /// Checks the shape is usable, with checked arithmetic: every size
    /// positive, an output, and element counts that fit in `usize` (the
    /// kernels' own 32-bit limits are checked at launch). `op` names the
    /// caller.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let positive = [self.batch, self.c_in, self.c_out, self.kernel, self.stride, self.height, self.width]
            .iter()
            .all(|&v| v > 0);
        let sizes = self.checked_sizes();
        if !positive || self.out_hw().is_err() || sizes.is_none() {
            return Err(Error::invalid(op, format!("unusable convolution shape {self:?}")));
        }
        Ok(())
    }

    fn checked_sizes(&self) -> Option<(usize, usize, usize)> {
        let (ho, wo) = self.out_hw().ok()?;
        let prod = |v: &[usize]| v.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        Some((
            prod(&[self.batch, self.height, self.width, self.c_in])?,
            prod(&[self.c_out, self.kernel, self.kernel, self.c_in])?,
            prod(&[self.batch, ho, wo, self.c_out])?,
        ))
    }

    /// Elements of the input `[B, H, W, C_in]`, weights `[C_out, k, k, C_in]`
    /// and output `[B, H_o, W_o, C_out]`; an error for a shape
    /// [`ConvShape::validate`] refuses.
    pub fn sizes(&self) -> Result<(usize, usize, usize)> {
        self.validate("ConvShape::sizes")?;
        self.checked_sizes().ok_or_else(|| Error::invalid("ConvShape::sizes", format!("{self:?} is too large")))
    }
}

/// The CPU reference.
pub mod cpu {
    use super::ConvShape;
    use crate::ops::gemm::Op;

    /// Calls `f(out_index, in_index, weight_index)` for every product of the
    /// convolution (out-of-range taps skipped).
    fn taps(s: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo) = s.hw();
        let k = s.kernel;
        for b in 0..s.batch {
            for oy in 0..ho {
                for ox in 0..wo {
                    for r in 0..k {
                        let iy = (oy * s.stride + r) as isize - s.pad as isize;
                        if iy < 0 || iy >= s.height as isize {
                            continue;
                        }
                        for q in 0..k {
                            let ix = (ox * s.stride + q) as isize - s.pad as isize;
                            if ix < 0 || ix >= s.width as isize {
                                continue;
                            }
                            let in_base = ((b * s.height + iy as usize) * s.width + ix as usize) * s.c_in;
                            let out_base = ((b * ho + oy) * wo + ox) * s.c_out;
                            for co in 0..s.c_out {
                                let w_base = ((co * k + r) * k + q) * s.c_in;
                                for ci in 0..s.c_in {
                                    f(out_base + co, in_base + ci, w_base + ci);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Fills `col` (`H_o·W_o x k²·C_in`, row per output pixel, columns
    /// (tap, channel)) from one image `xb` (`H x W x C_in`); padding is 0.
    fn im2col(s: &ConvShape, xb: &[f32], col: &mut [f32]) {
        use rayon::prelude::*;
        let (_, wo) = s.hw();
        let (k, kk) = (s.kernel, s.kernel * s.kernel * s.c_in);
        col.par_chunks_mut(kk).enumerate().for_each(|(pix, row)| {
            let (oy, ox) = (pix / wo, pix % wo);
            for r in 0..k {
                for q in 0..k {
                    let dst = &mut row[(r * k + q) * s.c_in..(r * k + q + 1) * s.c_in];
                    match in_pixel(s, oy, ox, r, q) {
                        Some(at) => dst.copy_from_slice(&xb[at * s.c_in..(at + 1) * s.c_in]),
                        None => dst.fill(0.0),
                    }
                }
            }
        });
    }

    /// The input pixel (y·W + x within the image) under output pixel
    /// (oy, ox) at tap (r, q), or None in the padding.
    fn in_pixel(s: &ConvShape, oy: usize, ox: usize, r: usize, q: usize) -> Option<usize> {
        let iy = (oy * s.stride + r).checked_sub(s.pad)?;
        let ix = (ox * s.stride + q).checked_sub(s.pad)?;
        (iy < s.height && ix < s.width).then_some(iy * s.width + ix)
    }

    /// `c = a·op(b)` (+ c when `accumulate`), row-major, through the `gemm` crate.
    #[allow(clippy::too_many_arguments)]
    fn mm(m: usize, n: usize, k: usize, a: &[f32], op_a: Op, b: &[f32], op_b: Op, accumulate: bool, c: &mut [f32]) {
        let lda = if op_a == Op::N { k } else { m };
        let ldb = if op_b == Op::N { n } else { k };
        let beta = if accumulate { 1.0 } else { 0.0 };
        crate::ops::gemm::cpu::gemm_sized(m, n, k, 1.0, a, lda, op_a, b, ldb, op_b, beta, c, n);
    }

    /// `y = conv(x, w)` through im2col (per image, `H_o·W_o x k²·C_in`
    /// floats) and the `gemm` crate: the CPU path's forward (f32).
    pub fn forward_gemm(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (ho, wo) = s.hw();
        let kk = s.kernel * s.kernel * s.c_in;
        let (npix, in_img) = (ho * wo, s.height * s.width * s.c_in);
        let mut y = vec![0f32; s.batch * npix * s.c_out];
        let mut col = vec![0f32; npix * kk];
        for b in 0..s.batch {
            im2col(s, &x[b * in_img..(b + 1) * in_img], &mut col);
            let yb = &mut y[b * npix * s.c_out..(b + 1) * npix * s.c_out];
            mm(npix, s.c_out, kk, &col, Op::N, w, Op::T, false, yb);
        }
        y
    }

    /// The data gradient on the CPU path (f32): per image, the column
    /// gradient `dy_b · W` (`H_o·W_o x k²·C_in`, the `gemm` crate) scattered
    /// back onto the input pixels (col2im).
    pub fn data_grad_gemm(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (ho, wo) = s.hw();
        let (k, kk) = (s.kernel, s.kernel * s.kernel * s.c_in);
        let (npix, in_img) = (ho * wo, s.height * s.width * s.c_in);
        let mut dx = vec![0f32; s.batch * in_img];
        let mut col = vec![0f32; npix * kk];
        for b in 0..s.batch {
            mm(npix, kk, s.c_out, &dy[b * npix * s.c_out..(b + 1) * npix * s.c_out], Op::N, w, Op::N, false, &mut col);
            let dxb = &mut dx[b * in_img..(b + 1) * in_img];
            for pix in 0..npix {
                let (oy, ox) = (pix / wo, pix % wo);
                for r in 0..k {
                    for q in 0..k {
                        if let Some(at) = in_pixel(s, oy, ox, r, q) {
                            let src = &col[pix * kk + (r * k + q) * s.c_in..][..s.c_in];
                            dxb[at * s.c_in..(at + 1) * s.c_in].iter_mut().zip(src).for_each(|(d, v)| *d += v);
                        }
                    }
                }
            }
        }
        dx
    }

    /// The weight gradient on the CPU path (f32): `Σ_b dy_bᵀ · im2col(x_b)`
    /// through the `gemm` crate.
    pub fn weight_grad_gemm(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (ho, wo) = s.hw();
        let kk = s.kernel * s.kernel * s.c_in;
        let (npix, in_img) = (ho * wo, s.height * s.width * s.c_in);
        let mut dw = vec![0f32; s.c_out * kk];
        let mut col = vec![0f32; npix * kk];
        for b in 0..s.batch {
            im2col(s, &x[b * in_img..(b + 1) * in_img], &mut col);
            let dyb = &dy[b * npix * s.c_out..(b + 1) * npix * s.c_out];
            mm(s.c_out, kk, npix, dyb, Op::T, &col, Op::N, b > 0, &mut dw);
        }
        dw
    }

    /// `y = conv(x, w)` (f64 accumulation: the reference).
    pub fn forward(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut y = vec![0f64; s.checked_sizes().map_or(0, |z| z.2)];
        taps(s, |o, i, k| y[o] += x[i] as f64 * w[k] as f64);
        y.into_iter().map(|v| v as f32).collect()
    }

    /// The gradient with respect to the input, given `dy`.
    pub fn data_grad(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f64; s.checked_sizes().map_or(0, |z| z.0)];
        taps(s, |o, i, k| dx[i] += dy[o] as f64 * w[k] as f64);
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// The gradient with respect to the weights, given `dy`.
    pub fn weight_grad(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut dw = vec![0f64; s.checked_sizes().map_or(0, |z| z.1)];
        taps(s, |o, i, k| dw[k] += dy[o] as f64 * x[i] as f64);
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// OIHW (PyTorch) weights to OHWI.
    pub fn oihw_to_ohwi(w: &[f32], c_out: usize, c_in: usize, k: usize) -> Vec<f32> {
        permute_weights(w, c_out, c_in, k, true)
    }

    /// OHWI weights to OIHW (PyTorch).
    pub fn ohwi_to_oihw(w: &[f32], c_out: usize, c_in: usize, k: usize) -> Vec<f32> {
        permute_weights(w, c_out, c_in, k, false)
    }

    fn permute_weights(w: &[f32], c_out: usize, c_in: usize, k: usize, to_ohwi: bool) -> Vec<f32> {
        let mut out = vec![0f32; w.len()];
        for o in 0..c_out {
            for i in 0..c_in {
                for r in 0..k {
                    for q in 0..k {
                        let (oihw, ohwi) = (((o * c_in + i) * k + r) * k + q, ((o * k + r) * k + q) * c_in + i);
                        if to_ohwi {
                            out[ohwi] = w[oihw];
                        } else {
                            out[oihw] = w[ohwi];
                        }
                    }
                }
            }
        }
        out
    }
}
