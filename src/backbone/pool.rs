//! Where the backbone's layers get their temporaries: [`Scratch`] is "give
//! me an f32 buffer of this shape" / "I am done with it". The layers' public
//! functions use [`Fresh`] (a new buffer each time, dropped after); the
//! network passes its [`Pool`], which keeps the buffers by shape, so that a
//! training step at a batch size it has seen allocates nothing.

use std::collections::HashMap;

use super::conv::{conv2d_data_grad_into, conv2d_weight_grad_into, ConvShape};
use crate::error::Result;
use crate::runtime::device::Device;
use crate::runtime::tensor::{DType, Tensor};

/// A source of f32 temporaries.
pub(crate) trait Scratch {
    /// An f32 buffer of `shape` on `dev`, contents unspecified.
    fn take(&mut self, dev: &Device, shape: &[usize]) -> Result<Tensor>;
    /// Hands a buffer back.
    fn give(&mut self, t: Tensor);
}

/// Allocates every buffer it is asked for and drops what it is given.
pub(crate) struct Fresh;

impl Scratch for Fresh {
    fn take(&mut self, dev: &Device, shape: &[usize]) -> Result<Tensor> {
        Tensor::empty(dev, shape, DType::F32)
    }

    fn give(&mut self, _: Tensor) {}
}

/// Device buffers by shape and dtype, for reuse: `take` pops one (or
/// allocates), `give` puts one back. A run of the same ops at the same
/// batch size takes the same shapes, so after the first it allocates
/// nothing.
#[derive(Default)]
pub(crate) struct Pool {
    /// The batch size the buffers were shaped for.
    pub(crate) batch: usize,
    free: HashMap<(Vec<usize>, DType), Vec<Tensor>>,
    /// Bytes of every buffer this pool allocated (free or in use).
    pub(crate) allocated: usize,
}

impl Scratch for Pool {
    fn take(&mut self, dev: &Device, shape: &[usize]) -> Result<Tensor> {
        self.take_typed(dev, shape, DType::F32)
    }

    fn give(&mut self, t: Tensor) {
        self.free.entry((t.shape().to_vec(), t.dtype())).or_default().push(t);
    }
}

impl Pool {
    /// An empty pool for steps of `batch` images.
    pub(crate) fn new(batch: usize) -> Pool {
        Pool { batch, ..Pool::default() }
    }

    pub(crate) fn take_typed(&mut self, dev: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.free.get_mut(&(shape.to_vec(), dtype)).and_then(Vec::pop) {
            Some(t) => Ok(t),
            None => {
                let t = Tensor::empty(dev, shape, dtype)?;
                self.allocated += t.numel() * dtype.size();
                Ok(t)
            }
        }
    }

    pub(crate) fn give_all(&mut self, ts: impl IntoIterator<Item = Tensor>) {
        ts.into_iter().for_each(|t| self.give(t));
    }

    /// `t` as a convolution operand of `dtype`: None when it already is,
    /// else a rounded copy in a pool buffer.
    pub(crate) fn operand(&mut self, t: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        if t.dtype() == dtype {
            return Ok(None);
        }
        let mut h = self.take_typed(t.device(), t.shape(), dtype)?;
        t.narrow_into(&mut h)?;
        Ok(Some(h))
    }

    /// A convolution's backward from the gradient of its output `d_out`
    /// (f32): the weight gradient written into `dw` (added to it with
    /// `accumulate`), and with `data = (w, d_in)` the input's gradient
    /// into `d_in`; `x` and `w` are the forward's operands (of `dtype`),
    /// `d_out` is rounded to it first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_backward(
        &mut self,
        dtype: DType,
        d_out: &Tensor,
        x: &Tensor,
        s: &ConvShape,
        dw: &mut Tensor,
        accumulate: bool,
        data: Option<(&Tensor, &mut Tensor)>,
    ) -> Result<()> {
        let rounded = self.operand(d_out, dtype)?;
        let d = rounded.as_ref().unwrap_or(d_out);
        conv2d_weight_grad_into(x, d, s, dw, accumulate)?;
        if let Some((w, d_in)) = data {
            conv2d_data_grad_into(d, w, s, d_in)?;
        }
        self.give_all(rounded);
        Ok(())
    }

    /// `t` converted to a convolution operand of `dtype`, `t` itself going
    /// back to the pool when a copy was made.
    pub(crate) fn convert_operand(&mut self, t: Tensor, dtype: DType) -> Result<Tensor> {
        match self.operand(&t, dtype)? {
            Some(h) => {
                self.give(t);
                Ok(h)
            }
            None => Ok(t),
        }
    }
}
