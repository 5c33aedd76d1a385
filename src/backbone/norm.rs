//! Per-channel layers of the backbone on `[rows, C]` f32 activations (NHWC
//! flattened: rows = B·H·W; BatchNorm1d is the same with rows = B):
//! BatchNorm (training with batch statistics and the running-statistics
//! update, eval with the running statistics folded in, backward), PReLU
//! (forward, backward with the slope's gradient) and the residual add.
//! kernels/norm.cu; the CPU path (f64 accumulation) is the reference.
//!
//! Per-channel sums are computed in splits and combined in a fixed order,
//! so every result is reproducible run to run.

use super::pool::{Fresh, Scratch};
use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceKind, LaunchConfig};
use crate::runtime::kernels::PtrMut;
use crate::runtime::launch::{self, launch_one_of};
use crate::runtime::tensor::{same_device, DType, Tensor};

/// A BatchNorm layer (PyTorch's BatchNorm1d/2d semantics and defaults:
/// eps 1e-5, momentum 0.1, weight 1, bias 0, running mean 0 and variance 1;
/// the running variance is updated with the unbiased batch variance).
pub struct BatchNorm {
    /// Channels C.
    pub channels: usize,
    /// Added to the variance.
    pub eps: f32,
    /// Weight of the new batch statistics in the running ones.
    pub momentum: f32,
    /// γ, f32 `[C]`.
    pub weight: Tensor,
    /// β, f32 `[C]`.
    pub bias: Tensor,
    /// f32 `[C]`.
    pub running_mean: Tensor,
    /// f32 `[C]`.
    pub running_var: Tensor,
}

/// What a forward pass keeps for its backward: the statistics it used.
pub struct BnCache {
    mean: Tensor,
    invstd: Tensor,
    training: bool,
}

impl BnCache {
    /// Its buffers (the mean and invstd, f32 `[C]`), for reuse.
    pub(crate) fn into_tensors(self) -> [Tensor; 2] {
        [self.mean, self.invstd]
    }
}

/// Gradients of a BatchNorm.
pub struct BnGrads {
    /// With respect to the input, `[rows, C]`.
    pub input: Tensor,
    /// With respect to γ, `[C]`.
    pub weight: Tensor,
    /// With respect to β, `[C]`.
    pub bias: Tensor,
}

fn check_rows(op: &'static str, x: &Tensor, c: usize) -> Result<usize> {
    let (rows, cols) = x.dims2(op)?;
    if cols != c || x.dtype() != DType::F32 {
        return Err(Error::Shape {
            op,
            expected: format!("f32 [rows, {c}]"),
            got: format!("{:?} {:?}", x.shape(), x.dtype()),
        });
    }
    if rows == 0 {
        return Err(Error::invalid(op, "no rows"));
    }
    Ok(rows)
}

/// The elements of an op's CPU output (f32, checked by `check_output`),
/// written in place: no temporary of the output's size.
fn host_out<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut [f32]> {
    t.host_slice_mut::<f32>().ok_or_else(|| Error::invalid(op, "the output is not an f32 CPU tensor"))
}

/// Grid of the per-channel sums: channel groups of 32 x row splits.
fn sums_grid(rows: usize, c: usize) -> (u32, u32) {
    let groups = c.div_ceil(32);
    let splits = 528usize.div_ceil(groups).clamp(1, rows.div_ceil(8)).min(1024);
    (groups as u32, splits as u32)
}

/// Which per-channel sums (kernels/norm.cu chan_sums_<mode>).
#[derive(Clone, Copy)]
enum Sums {
    Mean,
    Var,
    BnBwd,
    PreluBwd,
}

/// Per-channel sums on a GPU backend into `out_a` and, when `scale_b` is
/// given (the BatchNorm backward), `out_b` (both f32 `[C]`), as finalized
/// by chan_finalize with the given scales; the splits' partial sums live in
/// a buffer from `scratch`.
#[allow(clippy::too_many_arguments)]
fn chan_sums(
    mode: Sums,
    x: &Tensor,
    dy: Option<&Tensor>,
    mean: Option<&Tensor>,
    scale_a: f32,
    scale_b: Option<&Tensor>,
    scratch: &mut dyn Scratch,
    out_a: &mut Tensor,
    out_b: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "chan_sums";
    let dev = x.device();
    let (rows, c) = (x.shape()[0], x.shape()[1]);
    out_a.check_output(OP, dev, &[&[c]])?;
    let out_b = match out_b {
        Some(t) => {
            t.check_output(OP, dev, &[&[c]])?;
            t.ptr_mut()?
        }
        None => PtrMut::null(),
    };
    if scale_b.is_some() != (out_b.addr() != 0) {
        return Err(Error::invalid(OP, "a second sum needs both its scale and its output"));
    }
    let (groups, splits) = sums_grid(rows, c);
    let mut partial = scratch.take(dev, &[splits as usize, c, 2])?;
    let cfg = LaunchConfig { grid: (groups, splits, 1), block: (32, 8, 1), shared_bytes: 0 };
    let (dy_p, mean_p) = (Tensor::ptr_or_null(dy)?, Tensor::ptr_or_null(mean)?);
    // SAFETY: x (and dy) are [rows, C], mean [C] (the callers checked the
    // shapes); partial holds splits·C·2 floats for this grid.
    unsafe {
        launch_one_of!(mode, {
            Sums::Mean => chan_sums_mean, Sums::Var => chan_sums_var,
            Sums::BnBwd => chan_sums_bn_bwd, Sums::PreluBwd => chan_sums_prelu_bwd,
        }, (dev, cfg, x.ptr()?, dy_p, mean_p, rows as i64, c as i32, partial.ptr_mut()?))
    }?;
    // SAFETY: partial as above; scale_b, out_a and out_b hold C floats
    // (scale_b: the callers; the outputs: checked above).
    unsafe {
        launch::chan_finalize(
            dev,
            LaunchConfig::linear(c.div_ceil(256) as u32, 256, 0),
            partial.ptr()?,
            splits as i32,
            c as i32,
            scale_a,
            Tensor::ptr_or_null(scale_b)?,
            out_a.ptr_mut()?,
            out_b,
        )
    }?;
    scratch.give(partial);
    Ok(())
}

/// An element-wise launch over n = rows·C values.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(256).clamp(1, 8192) as u32, 256, 0)
}

impl BatchNorm {
    /// A layer of `channels` with PyTorch's initial values, on `device`.
    pub fn new(device: &Device, channels: usize, eps: f32) -> Result<BatchNorm> {
        if channels == 0 || !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid("BatchNorm", "channels must be positive and eps finite and positive"));
        }
        let full = |v: f32| Tensor::from_slice(device, &[channels], &vec![v; channels]);
        Ok(BatchNorm {
            channels,
            eps,
            momentum: 0.1,
            weight: full(1.0)?,
            bias: full(0.0)?,
            running_mean: full(0.0)?,
            running_var: full(1.0)?,
        })
    }

    fn params(&self) -> [&Tensor; 4] {
        [&self.weight, &self.bias, &self.running_mean, &self.running_var]
    }

    /// The layer's public fields, as the kernels read them: every parameter
    /// f32 `[C]`, eps finite and positive, momentum in [0, 1].
    fn check_params(&self, op: &'static str) -> Result<()> {
        let c = self.channels;
        let names = ["weight", "bias", "running_mean", "running_var"];
        for (t, name) in self.params().into_iter().zip(names) {
            if t.shape() != [c] || t.dtype() != DType::F32 {
                return Err(Error::Shape {
                    op,
                    expected: format!("{name}: f32 [{c}] (channels = {c})"),
                    got: format!("{:?} {:?}", t.shape(), t.dtype()),
                });
            }
        }
        if c == 0 || !(self.eps.is_finite() && self.eps > 0.0) || !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                op,
                format!(
                    "channels must be positive, eps finite and positive, momentum in [0, 1]; got {c}, {}, {}",
                    self.eps, self.momentum
                ),
            ));
        }
        Ok(())
    }

    /// `y = (x − μ)/sqrt(σ² + eps)·γ + β` over `[rows, C]`. Training: μ, σ²
    /// are the batch's (biased variance) and the running statistics move by
    /// `momentum`; eval: the running statistics.
    pub fn forward(&mut self, x: &Tensor, training: bool) -> Result<(Tensor, BnCache)> {
        let mut y = Tensor::empty(x.device(), x.shape(), DType::F32)?;
        let cache = self.forward_into(x, training, &mut y)?;
        Ok((y, cache))
    }

    /// [`BatchNorm::forward`] into `y` (x's shape, f32, same device), which
    /// is overwritten.
    pub fn forward_into(&mut self, x: &Tensor, training: bool, y: &mut Tensor) -> Result<BnCache> {
        self.forward_with(x, training, y, &mut Fresh)
    }

    /// [`BatchNorm::forward_into`] with the statistics' buffers (the
    /// cache's, and the sums' temporaries) from `scratch`.
    pub(crate) fn forward_with(
        &mut self,
        x: &Tensor,
        training: bool,
        y: &mut Tensor,
        scratch: &mut dyn Scratch,
    ) -> Result<BnCache> {
        const OP: &str = "BatchNorm::forward";
        self.check_params(OP)?;
        let c = self.channels;
        let rows = check_rows(OP, x, c)?;
        let mut all = vec![x];
        all.extend(self.params());
        let dev = same_device(OP, &all)?.clone();
        y.check_output(OP, &dev, &[x.shape()])?;
        if training && rows < 2 {
            return Err(Error::invalid(OP, "training needs at least 2 rows per channel"));
        }
        if dev.kind() == DeviceKind::Cpu {
            let (mean, invstd, rm, rv) = cpu::forward(
                &x.host_f32()?,
                c,
                &self.weight.host_f32()?,
                &self.bias.host_f32()?,
                &self.running_mean.host_f32()?,
                &self.running_var.host_f32()?,
                self.eps,
                self.momentum,
                training,
                host_out(OP, y)?,
            );
            if training {
                self.running_mean = Tensor::from_slice(&dev, &[c], &rm)?;
                self.running_var = Tensor::from_slice(&dev, &[c], &rv)?;
            }
            let mut t = |v: &[f32]| -> Result<Tensor> {
                let mut t = scratch.take(&dev, &[c])?;
                t.write_host_f32(v)?;
                Ok(t)
            };
            return Ok(BnCache { mean: t(&mean)?, invstd: t(&invstd)?, training });
        }
        let mut invstd = scratch.take(&dev, &[c])?;
        let mut mean = scratch.take(&dev, &[c])?;
        let grid = LaunchConfig::linear(c.div_ceil(256) as u32, 256, 0);
        let (ri, ci) = (rows as i64, c as i32);
        // SAFETY (the launches of this pass): x and y are [rows, C] (checked
        // above), every per-channel buffer (the parameters: check_params;
        // mean, var, invstd: allocated for C) holds C floats.
        if training {
            let scale = 1.0 / rows as f32;
            chan_sums(Sums::Mean, x, None, None, scale, None, scratch, &mut mean, None)?;
            let mut var = scratch.take(&dev, &[c])?;
            chan_sums(Sums::Var, x, None, Some(&mean), scale, None, scratch, &mut var, None)?;
            let (rm, rv) = (self.running_mean.ptr_mut()?, self.running_var.ptr_mut()?);
            // SAFETY: see above.
            unsafe {
                launch::bn_stats_finalize(
                    &dev,
                    grid,
                    var.ptr()?,
                    ri,
                    ci,
                    self.eps,
                    self.momentum,
                    mean.ptr()?,
                    invstd.ptr_mut()?,
                    rm,
                    rv,
                )
            }?;
            scratch.give(var);
        } else {
            // SAFETY: see above.
            unsafe { launch::bn_eval_stats(&dev, grid, self.running_var.ptr()?, ci, self.eps, invstd.ptr_mut()?) }?;
            mean.copy_from(&self.running_mean)?;
        }
        // SAFETY: see above.
        unsafe {
            launch::bn_apply(
                &dev,
                elementwise(rows * c),
                x.ptr()?,
                mean.ptr()?,
                invstd.ptr()?,
                self.weight.ptr()?,
                self.bias.ptr()?,
                ri,
                ci,
                y.ptr_mut()?,
            )
        }?;
        Ok(BnCache { mean, invstd, training })
    }

    /// Gradients for the forward pass that returned `cache` on input `x`.
    pub fn backward(&self, x: &Tensor, cache: &BnCache, dy: &Tensor) -> Result<BnGrads> {
        let mut input = Tensor::empty(x.device(), x.shape(), DType::F32)?;
        let (weight, bias) = self.backward_into(x, cache, dy, &mut input)?;
        Ok(BnGrads { input, weight, bias })
    }

    /// [`BatchNorm::backward`] with the input's gradient written into `dx`
    /// (x's shape, f32, same device); returns `(dγ, dβ)`.
    pub fn backward_into(&self, x: &Tensor, cache: &BnCache, dy: &Tensor, dx: &mut Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.channels;
        let mut dgamma = Tensor::empty(x.device(), &[c], DType::F32)?;
        let mut dbeta = Tensor::empty(x.device(), &[c], DType::F32)?;
        self.backward_with(x, cache, dy, dx, &mut dgamma, &mut dbeta, &mut Fresh)?;
        Ok((dgamma, dbeta))
    }

    /// [`BatchNorm::backward_into`] with dγ and dβ written into `dgamma`
    /// and `dbeta` (f32 `[C]`) and the temporaries from `scratch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_with(
        &self,
        x: &Tensor,
        cache: &BnCache,
        dy: &Tensor,
        dx: &mut Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
        scratch: &mut dyn Scratch,
    ) -> Result<()> {
        const OP: &str = "BatchNorm::backward";
        self.check_params(OP)?;
        let c = self.channels;
        let rows = check_rows(OP, x, c)?;
        if cache.mean.shape() != [c] || cache.invstd.shape() != [c] {
            return Err(Error::Shape {
                op: OP,
                expected: format!("the cache of a forward pass over {c} channels"),
                got: format!("a cache of {:?} channels", cache.mean.shape()),
            });
        }
        if dy.shape() != x.shape() || dy.dtype() != DType::F32 {
            return Err(Error::Shape {
                op: OP,
                expected: format!("dy {:?} f32", x.shape()),
                got: format!("{:?}", dy.shape()),
            });
        }
        let mut all = vec![x, dy, &cache.mean, &cache.invstd];
        all.extend(self.params());
        let dev = same_device(OP, &all)?.clone();
        dx.check_output(OP, &dev, &[x.shape()])?;
        dgamma.check_output(OP, &dev, &[&[c]])?;
        dbeta.check_output(OP, &dev, &[&[c]])?;
        if dev.kind() == DeviceKind::Cpu {
            let (dg, db) = cpu::backward(
                &x.host_f32()?,
                &dy.host_f32()?,
                c,
                &cache.mean.host_f32()?,
                &cache.invstd.host_f32()?,
                &self.weight.host_f32()?,
                cache.training,
                host_out(OP, dx)?,
            );
            dgamma.write_host_f32(&dg)?;
            return dbeta.write_host_f32(&db);
        }
        let (m, s) = (Some(&cache.mean), Some(&cache.invstd));
        chan_sums(Sums::BnBwd, x, Some(dy), m, 1.0, s, scratch, dbeta, Some(dgamma))?;
        // SAFETY: x, dy and dx are [rows, C] (checked above); the cache, the
        // weight and both sums hold C floats (check_params, the cache check).
        unsafe {
            launch::bn_backward(
                &dev,
                elementwise(rows * c),
                x.ptr()?,
                dy.ptr()?,
                cache.mean.ptr()?,
                cache.invstd.ptr()?,
                self.weight.ptr()?,
                dbeta.ptr()?,
                dgamma.ptr()?,
                rows as i64,
                c as i32,
                i32::from(cache.training),
                dx.ptr_mut()?,
            )
        }
    }
}

fn check_alpha(op: &'static str, x: &Tensor, alpha: &Tensor) -> Result<(usize, usize)> {
    let c = alpha.numel();
    let rows = check_rows(op, x, c)?;
    if alpha.shape() != [c] || alpha.dtype() != DType::F32 {
        return Err(Error::Shape { op, expected: format!("f32 slopes [{c}]"), got: format!("{:?}", alpha.shape()) });
    }
    same_device(op, &[x, alpha])?;
    Ok((rows, c))
}

/// PReLU: `y = x` where x > 0, else `α_c·x` (per channel; `alpha`: `[C]`).
pub fn prelu(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::empty(x.device(), x.shape(), DType::F32)?;
    prelu_into(x, alpha, &mut y)?;
    Ok(y)
}

/// [`prelu`] into `y` (x's shape, f32, same device).
pub fn prelu_into(x: &Tensor, alpha: &Tensor, y: &mut Tensor) -> Result<()> {
    const OP: &str = "prelu";
    let (rows, c) = check_alpha(OP, x, alpha)?;
    let dev = x.device();
    y.check_output(OP, dev, &[x.shape()])?;
    if dev.kind() == DeviceKind::Cpu {
        let (xs, a) = (x.host_f32()?, alpha.host_f32()?);
        cpu::each(host_out(OP, y)?, |i| {
            let v = xs[i];
            if v > 0.0 {
                v
            } else {
                a[i % c] * v
            }
        });
        return Ok(());
    }
    // SAFETY: x and y are [rows, C], alpha [C] (checked above).
    unsafe {
        launch::prelu_fwd(dev, elementwise(rows * c), x.ptr()?, alpha.ptr()?, rows as i64, c as i32, y.ptr_mut()?)
    }
}

/// PReLU's gradients: `(dx, dα)`, `dα_c = Σ dy·x` over the rows where x ≤ 0.
pub fn prelu_backward(x: &Tensor, alpha: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let mut dx = Tensor::empty(x.device(), x.shape(), DType::F32)?;
    let da = prelu_backward_into(x, alpha, dy, &mut dx)?;
    Ok((dx, da))
}

/// [`prelu_backward`] with dx written into `dx`; returns dα.
pub fn prelu_backward_into(x: &Tensor, alpha: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<Tensor> {
    let mut da = Tensor::empty(x.device(), alpha.shape(), DType::F32)?;
    prelu_backward_with(x, alpha, dy, dx, &mut da, &mut Fresh)?;
    Ok(da)
}

/// [`prelu_backward_into`] with dα written into `dalpha` (f32 `[C]`) and
/// the sums' temporaries from `scratch`.
pub(crate) fn prelu_backward_with(
    x: &Tensor,
    alpha: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
    dalpha: &mut Tensor,
    scratch: &mut dyn Scratch,
) -> Result<()> {
    const OP: &str = "prelu_backward";
    let (rows, c) = check_alpha(OP, x, alpha)?;
    if dy.shape() != x.shape() || dy.dtype() != DType::F32 {
        return Err(Error::Shape {
            op: OP,
            expected: format!("dy {:?} f32", x.shape()),
            got: format!("{:?}", dy.shape()),
        });
    }
    let dev = same_device(OP, &[x, dy])?;
    dx.check_output(OP, dev, &[x.shape()])?;
    dalpha.check_output(OP, dev, &[&[c]])?;
    if dev.kind() == DeviceKind::Cpu {
        let (xs, a, g) = (x.host_f32()?, alpha.host_f32()?, dy.host_f32()?);
        cpu::each(host_out(OP, dx)?, |i| if xs[i] > 0.0 { g[i] } else { a[i % c] * g[i] });
        let mut da = vec![0f64; c];
        for (i, (&v, &d)) in xs.iter().zip(g.iter()).enumerate() {
            if v <= 0.0 {
                da[i % c] += d as f64 * v as f64;
            }
        }
        return dalpha.write_host_f32(&da.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
    // SAFETY: x, dy and dx are [rows, C], alpha [C] (checked above).
    unsafe {
        launch::prelu_bwd(
            dev,
            elementwise(rows * c),
            x.ptr()?,
            alpha.ptr()?,
            dy.ptr()?,
            rows as i64,
            c as i32,
            dx.ptr_mut()?,
        )
    }?;
    chan_sums(Sums::PreluBwd, x, Some(dy), None, 1.0, None, scratch, dalpha, None)
}

/// `y[r, c] += b[c]` in place (`y`: f32 `[rows, C]`, `b`: f32 `[C]`).
pub fn bias_add(y: &mut Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "bias_add";
    let c = b.numel();
    let rows = check_rows(OP, y, c)?;
    same_device(OP, &[y, b])?;
    let dev = y.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let bv = b.host_f32()?;
        cpu::update(host_out(OP, y)?, |i, a| a + bv[i % c]);
        return Ok(());
    }
    // SAFETY: y is [rows, C], b [C] (checked above).
    unsafe { launch::bias_add_f32(&dev, elementwise(rows * c), y.ptr_mut()?, b.ptr()?, rows as i64, c as i32) }
}

/// Per-channel sums `Σ_r x[r, c]` (a bias's gradient), f32 `[C]`.
pub fn column_sums(x: &Tensor) -> Result<Tensor> {
    let c = x.dims2("column_sums")?.1;
    let mut out = Tensor::empty(x.device(), &[c], DType::F32)?;
    column_sums_with(x, &mut out, &mut Fresh)?;
    Ok(out)
}

/// [`column_sums`] into `out` (f32 `[C]`), temporaries from `scratch`.
pub(crate) fn column_sums_with(x: &Tensor, out: &mut Tensor, scratch: &mut dyn Scratch) -> Result<()> {
    const OP: &str = "column_sums";
    let c = x.dims2(OP)?.1;
    check_rows(OP, x, c)?;
    let dev = x.device();
    out.check_output(OP, dev, &[&[c]])?;
    if dev.kind() == DeviceKind::Cpu {
        let mut s = vec![0f64; c];
        x.host_f32()?.iter().enumerate().for_each(|(i, &v)| s[i % c] += v as f64);
        return out.write_host_f32(&s.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
    chan_sums(Sums::Mean, x, None, None, 1.0, None, scratch, out, None)
}

/// The residual add `a + b` (same shape, f32): a copy of `a`, then
/// [`add_assign`]. Its backward passes the gradient to both inputs
/// unchanged.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut y = Tensor::empty(a.device(), a.shape(), a.dtype())?;
    y.copy_from(a)?;
    add_assign(&mut y, b)?;
    Ok(y)
}

/// `y += b` in place (same shape, f32): the residual add without a new
/// buffer.
pub fn add_assign(y: &mut Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add_assign";
    if y.shape() != b.shape() || y.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Err(Error::Shape {
            op: OP,
            expected: format!("f32 {:?}", y.shape()),
            got: format!("{:?} {:?}", b.shape(), b.dtype()),
        });
    }
    let dev = same_device(OP, &[y, b])?.clone();
    let n = y.numel();
    if dev.kind() == DeviceKind::Cpu {
        let bv = b.host_f32()?;
        cpu::update(host_out(OP, y)?, |i, a| a + bv[i]);
        return Ok(());
    }
    if n > 0 {
        // SAFETY: y and b hold n floats each (same shape, checked above).
        unsafe { launch::add_assign_f32(&dev, elementwise(n), y.ptr_mut()?, b.ptr()?, n as i64) }?;
    }
    Ok(())
}

/// Inverted dropout's mask: element i of a draw keyed by `key` is kept when
/// its 32-bit hash is at least `threshold` = round(p·2³²), and kept values
/// are scaled by 1/(1 − p). The same (p, key) gives the same mask on every
/// backend (kernels/norm.cu `dropout_f32`), so the backward is the same
/// operation on the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element, in [0, 1).
    pub p: f32,
    /// The draw's key (from the seed and the step).
    pub key: (u32, u32),
}

impl Dropout {
    /// Dropout with probability `p` for step `step` of a run seeded `seed`.
    pub fn new(p: f32, seed: u64, step: u64) -> Result<Dropout> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("Dropout", format!("p must be in [0, 1), got {p}")));
        }
        Ok(Dropout { p, key: crate::runtime::hash::step_key(seed, step) })
    }

    fn threshold(&self) -> u32 {
        (self.p as f64 * 4294967296.0).round().min(u32::MAX as f64) as u32
    }

    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether element `i` is kept.
    pub fn keeps(&self, i: u32) -> bool {
        crate::runtime::hash::keyed_hash32(i, self.key.0, self.key.1) >= self.threshold()
    }

    /// `y = x·mask/(1 − p)` into `y` (x's shape, f32, same device); also the
    /// backward (on the gradient). At most 2³² elements.
    pub fn apply_into(&self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        const OP: &str = "dropout";
        if !(0.0..1.0).contains(&self.p) {
            return Err(Error::invalid(OP, format!("p must be in [0, 1), got {}", self.p)));
        }
        if x.dtype() != DType::F32 || x.numel() > u32::MAX as usize {
            return Err(Error::Shape { op: OP, expected: "f32, at most 2^32 elements".into(), got: format!("{x:?}") });
        }
        let dev = x.device();
        y.check_output(OP, dev, &[x.shape()])?;
        let scale = self.scale();
        if dev.kind() == DeviceKind::Cpu {
            let xs = x.host_f32()?;
            cpu::each(host_out(OP, y)?, |i| if self.keeps(i as u32) { xs[i] * scale } else { 0.0 });
            return Ok(());
        }
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let (threshold, (ka, kb)) = (self.threshold(), self.key);
        // SAFETY: x and y hold n floats each (y checked against x's shape).
        unsafe { launch::dropout_f32(dev, elementwise(n), x.ptr()?, n as i64, threshold, scale, ka, kb, y.ptr_mut()?) }
    }
}

/// The CPU reference (f64 sums). The elementwise passes run on rayon's
/// workers in fixed chunks; each element's arithmetic is the same wherever
/// it runs, and the sums stay sequential, so the results do not depend on
/// the thread count.
pub mod cpu {
    use rayon::prelude::*;

    /// Elements per parallel chunk (a chunk is one task).
    const CHUNK: usize = 1 << 14;

    /// `out[i] = f(i)` for every i, in parallel chunks.
    pub(crate) fn each(out: &mut [f32], f: impl Fn(usize) -> f32 + Sync) {
        update(out, |i, _| f(i));
    }

    /// `out[i] = f(i, out[i])` for every i, in parallel chunks.
    pub(crate) fn update(out: &mut [f32], f: impl Fn(usize, f32) -> f32 + Sync) {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, ch)| {
            let base = k * CHUNK;
            ch.iter_mut().enumerate().for_each(|(j, o)| *o = f(base + j, *o));
        });
    }

    /// Forward: y written into `y` (x's length); returns `(mean, invstd,
    /// new running mean, new running var)`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn forward(
        x: &[f32],
        c: usize,
        gamma: &[f32],
        beta: &[f32],
        rm: &[f32],
        rv: &[f32],
        eps: f32,
        momentum: f32,
        training: bool,
        y: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = x.len() / c;
        let (mut mean, mut var) = (vec![0f64; c], vec![0f64; c]);
        if training {
            for (i, &v) in x.iter().enumerate() {
                mean[i % c] += v as f64;
            }
            mean.iter_mut().for_each(|m| *m /= rows as f64);
            for (i, &v) in x.iter().enumerate() {
                var[i % c] += (v as f64 - mean[i % c]).powi(2);
            }
            var.iter_mut().for_each(|s| *s /= rows as f64);
        } else {
            mean = rm.iter().map(|&v| v as f64).collect();
            var = rv.iter().map(|&v| v as f64).collect();
        }
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps as f64).sqrt()).collect();
        each(y, |i| {
            let k = i % c;
            ((x[i] as f64 - mean[k]) * invstd[k] * gamma[k] as f64 + beta[k] as f64) as f32
        });
        let (mut nrm, mut nrv) = (rm.to_vec(), rv.to_vec());
        if training {
            let m = momentum as f64;
            for k in 0..c {
                let unbiased = var[k] * rows as f64 / (rows as f64 - 1.0);
                nrm[k] = ((1.0 - m) * rm[k] as f64 + m * mean[k]) as f32;
                nrv[k] = ((1.0 - m) * rv[k] as f64 + m * unbiased) as f32;
            }
        }
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        (f(&mean), f(&invstd), nrm, nrv)
    }

    /// Backward: dx written into `dx` (x's length); returns `(dγ, dβ)`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        x: &[f32],
        dy: &[f32],
        c: usize,
        mean: &[f32],
        invstd: &[f32],
        gamma: &[f32],
        training: bool,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let rows = x.len() / c;
        let (mut db, mut dg) = (vec![0f64; c], vec![0f64; c]);
        for (i, (&v, &g)) in x.iter().zip(dy).enumerate() {
            let k = i % c;
            db[k] += g as f64;
            dg[k] += g as f64 * (v as f64 - mean[k] as f64) * invstd[k] as f64;
        }
        let m = rows as f64;
        each(dx, |i| {
            let (v, g) = (x[i], dy[i]);
            let k = i % c;
            let is = invstd[k] as f64;
            let base = gamma[k] as f64 * is;
            if training {
                let xh = (v as f64 - mean[k] as f64) * is;
                (base * (g as f64 - db[k] / m - xh * dg[k] / m)) as f32
            } else {
                (base * g as f64) as f32
            }
        });
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        (f(&dg), f(&db))
    }
}
