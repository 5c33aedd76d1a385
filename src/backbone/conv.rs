//! 2-D convolution on NHWC activations, the IResNet way: square kernels,
//! zero padding, stride 1 or 2, no bias (every conv is followed by a
//! BatchNorm). Weights are stored OHWI (`[C_out, k, k, C_in]`): each output
//! channel's filter is one contiguous row of the implicit-GEMM B operand
//! (checkpoints' OIHW is converted on load).
//!
//! Only the CPU reference exists so far (f64 accumulation): forward, the
//! data gradient and the weight gradient. The kernels (implicit GEMM on
//! tile_f32.cuh and the bf16 tensor-core tile) are the next step of issue 8.

use crate::error::{Error, Result};

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
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.pad - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }

    /// Checks the shape is usable; `op` names the caller.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let ok = self.batch > 0
            && self.c_in > 0
            && self.c_out > 0
            && self.kernel > 0
            && self.stride > 0
            && self.height + 2 * self.pad >= self.kernel
            && self.width + 2 * self.pad >= self.kernel;
        if !ok {
            return Err(Error::invalid(op, format!("unusable convolution shape {self:?}")));
        }
        Ok(())
    }

    /// Elements of the input `[B, H, W, C_in]`, weights `[C_out, k, k, C_in]`
    /// and output `[B, H_o, W_o, C_out]`.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let (ho, wo) = self.out_hw();
        (
            self.batch * self.height * self.width * self.c_in,
            self.c_out * self.kernel * self.kernel * self.c_in,
            self.batch * ho * wo * self.c_out,
        )
    }
}

/// The CPU reference.
pub mod cpu {
    use super::ConvShape;

    /// Calls `f(out_index, in_index, weight_index)` for every product of the
    /// convolution (out-of-range taps skipped).
    fn taps(s: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo) = s.out_hw();
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

    /// `y = conv(x, w)`.
    pub fn forward(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut y = vec![0f64; s.sizes().2];
        taps(s, |o, i, k| y[o] += x[i] as f64 * w[k] as f64);
        y.into_iter().map(|v| v as f32).collect()
    }

    /// The gradient with respect to the input, given `dy`.
    pub fn data_grad(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f64; s.sizes().0];
        taps(s, |o, i, k| dx[i] += dy[o] as f64 * w[k] as f64);
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// The gradient with respect to the weights, given `dy`.
    pub fn weight_grad(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut dw = vec![0f64; s.sizes().1];
        taps(s, |o, i, k| dw[k] += dy[o] as f64 * x[i] as f64);
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// OIHW (PyTorch) weights to OHWI.
    pub fn oihw_to_ohwi(w: &[f32], c_out: usize, c_in: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; w.len()];
        for o in 0..c_out {
            for i in 0..c_in {
                for r in 0..k {
                    for q in 0..k {
                        out[((o * k + r) * k + q) * c_in + i] = w[((o * c_in + i) * k + r) * k + q];
                    }
                }
            }
        }
        out
    }
}
