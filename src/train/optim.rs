//! Optimizers on the device, with PyTorch's update rules, over parameter
//! groups, with global gradient-norm clipping and a skipped step when the
//! gradients are not finite (kernels/optim.cu).
//!
//! For a parameter p with gradient g (f32), learning rate lr (the
//! schedule's value times the group's `lr_scale`) and weight decay wd:
//!
//! - clipping (groups with `clip`): with N the L2 norm of every clipped
//!   group's gradients together, g ← g·min(1, max_norm / (N + 1e-6))
//!   (torch.nn.utils.clip_grad_norm_; insightface clips the backbone at 5);
//! - SGD (torch.optim.SGD, dampening 0, no Nesterov): g ← g + wd·p; with
//!   momentum μ > 0, b ← g on the first step, else b ← μ·b + g, and g ← b;
//!   p ← p − lr·g;
//! - AdamW (torch.optim.AdamW): p ← p·(1 − lr·wd); m ← β1·m + (1 − β1)·g;
//!   v ← β2·v + (1 − β2)·g²; p ← p − (lr / (1 − β1^t))·m /
//!   (sqrt(v) / sqrt(1 − β2^t) + eps), t the number of applied steps.
//!
//! [`Optimizer::step_scaled`] multiplies every gradient by a factor s first
//! (g ← s·g before the norm, the clipping and the update): s = 1/k for k
//! accumulated micro-batches (insightface's `loss / gradient_acc`), or the
//! inverse of a loss scale (a GradScaler's `unscale_`), without a pass over
//! the gradients of its own.
//!
//! When the norm of all the gradients (every group) is not finite, the step
//! is skipped on the device: no parameter or state changes, t does not
//! advance, and [`Optimizer::skipped`] counts it (what a GradScaler does).
//! Nothing waits for the device: the step count and the norm stay there
//! until read.
//!
//! One launch per group and parameter dtype updates every tensor of it
//! (their addresses in a small device array, re-uploaded only when they
//! change), plus two for the norm and one to advance t: PyTorch's
//! multi-tensor apply. bf16 parameters update in f32 and round to nearest
//! even; with `master_weights` the group keeps an f32 copy that the updates
//! accumulate in (rounded into the bf16 parameter each step).
//!
//! On the CPU device the same arithmetic runs on the host.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::kernels::Ptr;
use crate::runtime::launch;
use crate::runtime::tensor::{DType, Tensor};

/// The update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// SGD with momentum μ (0: none); insightface: μ = 0.9.
    Sgd {
        /// Momentum μ in [0, 1).
        momentum: f32,
    },
    /// AdamW; insightface's configs for ViTs: β = (0.9, 0.999), eps 1e-8.
    AdamW {
        /// β1 in [0, 1).
        beta1: f32,
        /// β2 in [0, 1).
        beta2: f32,
        /// eps > 0.
        eps: f32,
    },
}

impl OptimizerKind {
    /// SGD with momentum 0.9 (insightface's `optimizer = "sgd"`).
    pub const SGD: OptimizerKind = OptimizerKind::Sgd { momentum: 0.9 };
    /// AdamW with PyTorch's defaults.
    pub const ADAMW: OptimizerKind = OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
}

/// One parameter group's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupConfig {
    /// Multiplies the learning rate of [`Optimizer::step`] (insightface
    /// gives the head its own group).
    pub lr_scale: f32,
    /// Weight decay (insightface: 5e-4 with SGD, 0.1 with AdamW).
    pub weight_decay: f32,
    /// Whether the group's gradients enter the clipped norm and are scaled.
    pub clip: bool,
    /// Keep an f32 master copy of bf16 parameters.
    pub master_weights: bool,
}

impl GroupConfig {
    /// lr scale 1, the given weight decay, clipped, no master copy.
    pub fn new(weight_decay: f32) -> GroupConfig {
        GroupConfig { lr_scale: 1.0, weight_decay, clip: true, master_weights: false }
    }
}

/// A parameter and its gradient, as [`Optimizer::step`] takes them.
pub struct ParamRef<'a> {
    /// The value, f32 or bf16, updated in place.
    pub value: &'a mut Tensor,
    /// Its gradient, f32, as many elements.
    pub grad: &'a Tensor,
}

/// [`Optimizer::export`]'s result: the named state tensors, the applied
/// and the skipped steps.
pub(crate) type Exported<'a> = (Vec<(String, &'a Tensor)>, u64, u64);

/// Per parameter: the optimizer's f32 state.
struct State {
    numel: usize,
    dtype: DType,
    /// Momentum buffer (SGD) or first moment (AdamW).
    a: Option<Tensor>,
    /// Second moment (AdamW).
    b: Option<Tensor>,
    /// The f32 master copy of a bf16 parameter.
    master: Option<Tensor>,
}

/// Device arrays of one group's tensor list (one per dtype), kept while
/// the addresses stay the same.
struct Lists {
    key: Vec<u64>,
    params: DeviceBuffer,
    grads: DeviceBuffer,
    a: DeviceBuffer,
    b: DeviceBuffer,
    masters: Option<DeviceBuffer>,
    offsets: DeviceBuffer,
    tensors: usize,
    total: usize,
}

/// Most blocks of the norm's first pass.
const NORM_BLOCKS: usize = 1024;

/// An optimizer's state on a GPU backend besides the parameters' own.
struct Counters {
    /// Applied steps t (i32).
    t: DeviceBuffer,
    /// Skipped steps (u32).
    skipped: DeviceBuffer,
    /// The last norms: the clipped groups', all groups' (f32).
    norm: Tensor,
    /// The gradients' factors: the clipped groups', the others' (f32).
    clip: Tensor,
    /// The norm's per-block partial sums (2 f64 per block), reused.
    partial: DeviceBuffer,
}

impl Counters {
    /// Counters at t applied and `skipped` skipped steps.
    fn new(dev: &Device, t: i32, skipped: u32) -> Result<Counters> {
        let counter = |v: [u8; 4]| if v == [0; 4] { dev.alloc_zeroed(4) } else { dev.upload(&v) };
        Ok(Counters {
            t: counter(t.to_le_bytes())?,
            skipped: counter(skipped.to_le_bytes())?,
            norm: Tensor::zeros(dev, &[2], DType::F32)?,
            clip: Tensor::zeros(dev, &[2], DType::F32)?,
            partial: dev.alloc(2 * 8 * NORM_BLOCKS)?,
        })
    }
}

/// The norm pass's list: every gradient and whether its group is clipped.
struct NormList {
    key: Vec<u64>,
    grads: DeviceBuffer,
    flags: DeviceBuffer,
    offsets: DeviceBuffer,
    tensors: usize,
    total: usize,
}

/// An optimizer over parameter groups (see the module documentation).
pub struct Optimizer {
    device: Device,
    kind: OptimizerKind,
    max_grad_norm: Option<f32>,
    groups: Vec<GroupConfig>,
    state: Vec<Vec<State>>,
    /// Per group and dtype (f32, bf16): the uploaded lists.
    lists: Vec<[Option<Lists>; 2]>,
    norm_lists: Option<NormList>,
    /// GPU backends: the step's device state, allocated at the first step.
    counters: Option<Counters>,
    /// The CPU's t, skipped steps and last norms.
    host: (u64, u64, [f32; 2]),
}

const OP: &str = "Optimizer::step";

impl Optimizer {
    /// An optimizer on `device` with these groups; `max_grad_norm`: clip
    /// the groups with `clip` to this norm (None: no clipping; the norm is
    /// still computed, to skip non-finite steps).
    pub fn new(
        device: &Device,
        kind: OptimizerKind,
        groups: Vec<GroupConfig>,
        max_grad_norm: Option<f32>,
    ) -> Result<Optimizer> {
        let unit = |x: f32| (0.0..1.0).contains(&x);
        let ok = match kind {
            OptimizerKind::Sgd { momentum } => unit(momentum),
            OptimizerKind::AdamW { beta1, beta2, eps } => unit(beta1) && unit(beta2) && eps.is_finite() && eps > 0.0,
        };
        if !ok {
            return Err(Error::invalid("Optimizer", format!("{kind:?}: momentum and betas in [0, 1), eps > 0")));
        }
        if let Some(g) = groups.iter().find(|g| {
            !(g.lr_scale.is_finite() && g.lr_scale > 0.0 && g.weight_decay.is_finite() && g.weight_decay >= 0.0)
        }) {
            return Err(Error::invalid("Optimizer", format!("group {g:?}: lr_scale > 0 and weight_decay >= 0")));
        }
        if max_grad_norm.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
            return Err(Error::invalid("Optimizer", "max_grad_norm must be finite and positive"));
        }
        if groups.is_empty() {
            return Err(Error::invalid("Optimizer", "no parameter group"));
        }
        let n = groups.len();
        Ok(Optimizer {
            device: device.clone(),
            kind,
            max_grad_norm,
            groups,
            state: (0..n).map(|_| Vec::new()).collect(),
            lists: (0..n).map(|_| [None, None]).collect(),
            norm_lists: None,
            counters: None,
            host: (0, 0, [0.0; 2]),
        })
    }

    /// Bytes of the optimizer's state for group `g` (momentum / moments,
    /// f32 master copies), as allocated so far (0 before the first step).
    pub fn state_bytes(&self, g: usize) -> usize {
        let bytes = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.numel() * t.dtype().size());
        self.state.get(g).map_or(0, |v| v.iter().map(|s| bytes(&s.a) + bytes(&s.b) + bytes(&s.master)).sum())
    }

    /// The groups' settings.
    pub fn groups(&self) -> &[GroupConfig] {
        &self.groups
    }

    /// Applied steps t (a download on a GPU backend).
    pub fn steps(&self) -> Result<u64> {
        match &self.counters {
            Some(c) => Ok(self.device.download(&c.t, 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))? as u64),
            None => Ok(self.host.0),
        }
    }

    /// Steps skipped for a non-finite gradient norm (a download on a GPU
    /// backend).
    pub fn skipped(&self) -> Result<u64> {
        match &self.counters {
            Some(c) => {
                Ok(self.device.download(&c.skipped, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))? as u64)
            }
            None => Ok(self.host.1),
        }
    }

    /// The last step's gradient norms: (the clipped groups', all groups'),
    /// of the scaled gradients before clipping (a download on a GPU
    /// backend); zeros before any step.
    pub fn last_norms(&self) -> Result<(f32, f32)> {
        match &self.counters {
            Some(c) => {
                let v = c.norm.to_vec::<f32>()?;
                Ok((v[0], v[1]))
            }
            None => Ok((self.host.2[0], self.host.2[1])),
        }
    }

    /// The state for a checkpoint: per group g and parameter i, its f32
    /// state tensors named `{g}.{i}.momentum_buffer` (SGD) or
    /// `{g}.{i}.exp_avg` and `{g}.{i}.exp_avg_sq` (AdamW: PyTorch's names),
    /// and `{g}.{i}.master` (an f32 master copy); empty before the first
    /// step. With the step and skipped counts (a download on a GPU backend).
    pub(crate) fn export(&self) -> Result<Exported<'_>> {
        let mut out = Vec::new();
        let a_name = match self.kind {
            OptimizerKind::Sgd { .. } => "momentum_buffer",
            OptimizerKind::AdamW { .. } => "exp_avg",
        };
        for (g, list) in self.state.iter().enumerate() {
            for (i, st) in list.iter().enumerate() {
                for (name, t) in [(a_name, &st.a), ("exp_avg_sq", &st.b), ("master", &st.master)] {
                    if let Some(t) = t {
                        out.push((format!("{g}.{i}.{name}"), t));
                    }
                }
            }
        }
        Ok((out, self.steps()?, self.skipped()?))
    }

    /// Restores [`Optimizer::export`]'s state for parameters `params[g]`
    /// (element count and dtype per parameter, in step order): `take(name,
    /// numel)` gives the f32 tensor of that name (an error when absent or
    /// of another size). With `t` = 0 and no state the optimizer starts
    /// fresh. Replaces any state this optimizer had.
    pub(crate) fn import(
        &mut self,
        params: &[Vec<(usize, DType)>],
        t: u64,
        skipped: u64,
        take: &mut dyn FnMut(&str, usize) -> Result<Option<Tensor>>,
    ) -> Result<()> {
        const OP: &str = "Optimizer::import";
        if params.len() != self.groups.len() {
            return Err(Error::invalid(OP, format!("{} groups for {}", params.len(), self.groups.len())));
        }
        let (a_name, b_needed) = match self.kind {
            OptimizerKind::Sgd { .. } => ("momentum_buffer", false),
            OptimizerKind::AdamW { .. } => ("exp_avg", true),
        };
        let a_needed = !matches!(self.kind, OptimizerKind::Sgd { momentum: 0.0 });
        let mut state: Vec<Vec<State>> = Vec::new();
        for (g, list) in params.iter().enumerate() {
            let mut group = Vec::new();
            for (i, &(numel, dtype)) in list.iter().enumerate() {
                let mut get = |name: &str, needed: bool| -> Result<Option<Tensor>> {
                    let key = format!("{g}.{i}.{name}");
                    match take(&key, numel)? {
                        Some(t) => Ok(Some(t)),
                        None if needed && t > 0 => Err(Error::invalid(OP, format!("no optimizer state {key}"))),
                        None => Ok(None),
                    }
                };
                let a = get(a_name, a_needed)?;
                let b = get("exp_avg_sq", b_needed)?;
                let master_needed = self.groups[g].master_weights && dtype == DType::BF16;
                let master = get("master", master_needed)?;
                if a.is_none() && b.is_none() && master.is_none() {
                    continue;
                }
                group.push(State { numel, dtype, a, b, master });
            }
            if !group.is_empty() && group.len() != list.len() {
                return Err(Error::invalid(OP, format!("group {g}: state for some parameters only")));
            }
            state.push(group);
        }
        if t == 0 && state.iter().any(|g| !g.is_empty()) {
            return Err(Error::invalid(OP, "optimizer state without any step"));
        }
        if t > 0 && (a_needed || b_needed) && state.iter().zip(params).any(|(s, p)| s.is_empty() && !p.is_empty()) {
            return Err(Error::invalid(OP, format!("{t} steps but no optimizer state")));
        }
        self.state = state;
        self.lists = (0..self.groups.len()).map(|_| [None, None]).collect();
        self.norm_lists = None;
        let (t32, s32) = (
            i32::try_from(t).map_err(|_| Error::invalid(OP, format!("{t} steps overflow the device counter")))?,
            u32::try_from(skipped).map_err(|_| Error::invalid(OP, format!("{skipped} skips overflow the counter")))?,
        );
        if self.device.kind() == DeviceKind::Cpu {
            self.host = (t, skipped, [0.0; 2]);
        } else {
            self.counters = Some(Counters::new(&self.device, t32, s32)?);
        }
        Ok(())
    }

    /// One step at learning rate `lr` over `params[g]`, the parameters of
    /// group g (the same tensors, in the same order, every step: the state
    /// is matched by position and checked by shape and dtype).
    pub fn step(&mut self, params: &mut [Vec<ParamRef<'_>>], lr: f32) -> Result<()> {
        self.step_scaled(params, lr, 1.0)
    }

    /// [`Optimizer::step`] on the gradients times `grad_scale` (finite,
    /// positive): the norms, the clipping and the update see `grad_scale·g`
    /// (see the module documentation).
    pub fn step_scaled(&mut self, params: &mut [Vec<ParamRef<'_>>], lr: f32, grad_scale: f32) -> Result<()> {
        // 0 is a rate (a schedule's last steps; torch.optim accepts it: the
        // state still moves).
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(OP, format!("the learning rate must be finite and not negative, got {lr}")));
        }
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("the gradient scale must be finite and positive, got {grad_scale}"),
            ));
        }
        if params.len() != self.groups.len() {
            return Err(Error::invalid(
                OP,
                format!("{} groups of parameters for {} groups", params.len(), self.groups.len()),
            ));
        }
        for (g, list) in params.iter().enumerate() {
            self.check_group(g, list)?;
        }
        if self.device.kind() == DeviceKind::Cpu {
            return self.step_host(params, lr, grad_scale);
        }
        self.step_device(params, lr, grad_scale)
    }

    fn check_group(&mut self, g: usize, list: &[ParamRef<'_>]) -> Result<()> {
        for (i, p) in list.iter().enumerate() {
            let what = format!("group {g}, parameter {i}");
            if !matches!(p.value.dtype(), DType::F32 | DType::BF16) || p.grad.dtype() != DType::F32 {
                return Err(Error::invalid(OP, format!("{what}: values f32 or bf16, gradients f32")));
            }
            if p.value.numel() != p.grad.numel() {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("{what}: a gradient of {} elements", p.value.numel()),
                    got: format!("{}", p.grad.numel()),
                });
            }
            if p.value.device() != &self.device || p.grad.device() != &self.device {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    a: self.device.to_string(),
                    b: p.value.device().to_string(),
                });
            }
        }
        let state = &mut self.state[g];
        if state.is_empty() && !list.is_empty() {
            let cfg = self.groups[g];
            for p in list {
                let zeros = |n| Tensor::zeros(&self.device, &[n], DType::F32);
                let n = p.value.numel();
                let (a, b) = match self.kind {
                    OptimizerKind::Sgd { momentum: 0.0 } => (None, None),
                    OptimizerKind::Sgd { .. } => (Some(zeros(n)?), None),
                    OptimizerKind::AdamW { .. } => (Some(zeros(n)?), Some(zeros(n)?)),
                };
                let master = match (cfg.master_weights, p.value.dtype()) {
                    (true, DType::BF16) => {
                        Some(Tensor::from_f32(&self.device, &[n], &p.value.to_f32_vec()?, DType::F32)?)
                    }
                    _ => None,
                };
                state.push(State { numel: n, dtype: p.value.dtype(), a, b, master });
            }
        }
        if state.len() != list.len()
            || state.iter().zip(list).any(|(s, p)| s.numel != p.value.numel() || s.dtype != p.value.dtype())
        {
            return Err(Error::invalid(
                OP,
                format!("group {g}: the parameters differ from the first step's ({} tensors then)", state.len()),
            ));
        }
        Ok(())
    }

    /// The host arithmetic (the CPU device), the kernels' rules in f32.
    fn step_host(&mut self, params: &mut [Vec<ParamRef<'_>>], lr: f32, scale: f32) -> Result<()> {
        let (mut clipped, mut all) = (0f64, 0f64);
        for (g, list) in params.iter().enumerate() {
            for p in list.iter() {
                let v = p.grad.host_f32()?;
                // Per-chunk sums in parallel, added in chunk order: the same
                // result on every run.
                let parts: Vec<f64> =
                    v.par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x * x) as f64).sum::<f64>()).collect();
                let s: f64 = parts.iter().sum();
                all += s;
                if self.groups[g].clip {
                    clipped += s;
                }
            }
        }
        let norms = [scale * clipped.sqrt() as f32, scale * all.sqrt() as f32];
        self.host.2 = norms;
        if !norms[1].is_finite() {
            self.host.1 += 1;
            return Ok(());
        }
        let clip = scale
            * match self.max_grad_norm {
                Some(m) => (m / (norms[0] + 1e-6)).min(1.0),
                None => 1.0,
            };
        let t = self.host.0 + 1;
        let kind = self.kind;
        for (g, list) in params.iter_mut().enumerate() {
            let cfg = self.groups[g];
            let h = Hyper { lr: lr * cfg.lr_scale, wd: cfg.weight_decay, c: if cfg.clip { clip } else { scale }, t };
            for (p, st) in list.iter_mut().zip(self.state[g].iter_mut()) {
                let grad = p.grad.host_f32()?;
                // The values updated in place: the master copy, an f32
                // parameter itself, or an f32 copy of a bf16 one.
                let State { a, b, master, .. } = st;
                let (a, b) = (
                    a.as_mut().and_then(|t| t.host_slice_mut::<f32>()),
                    b.as_mut().and_then(|t| t.host_slice_mut::<f32>()),
                );
                if let Some(m) = master.as_mut() {
                    let w = m
                        .host_slice_mut::<f32>()
                        .ok_or_else(|| Error::invalid(OP, "no host master (internal error)"))?;
                    host_update(kind, w, &grad, a, b, h)?;
                    let w = m.host_f32()?;
                    p.value.write_host_f32(&w)?;
                } else if let Some(w) = p.value.host_slice_mut::<f32>() {
                    host_update(kind, w, &grad, a, b, h)?;
                } else {
                    let mut w = p.value.host_f32()?.into_owned();
                    host_update(kind, &mut w, &grad, a, b, h)?;
                    p.value.write_host_f32(&w)?;
                }
            }
        }
        self.host.0 = t;
        Ok(())
    }

    fn step_device(&mut self, params: &mut [Vec<ParamRef<'_>>], lr: f32, scale: f32) -> Result<()> {
        let dev = self.device.clone();
        if self.counters.is_none() {
            self.counters = Some(Counters::new(&dev, 0, 0)?);
        }
        // The norms over every gradient (flags: the clipped groups).
        let mut all: Vec<(u64, usize, bool)> = Vec::new();
        for (g, list) in params.iter().enumerate() {
            for p in list.iter() {
                all.push((addr(p.grad)?, p.grad.numel(), self.groups[g].clip));
            }
        }
        let lists = refresh_norm(&dev, &mut self.norm_lists, &all)?;
        let Some(Counters { t: t_buf, skipped, norm, clip, partial }) = self.counters.as_mut() else {
            return Err(Error::invalid(OP, "no counters (internal error)"));
        };
        // No gradient at all: no block, and the finish sums nothing.
        let blocks = lists.map_or(0, |l| l.total.div_ceil(256).clamp(1, NORM_BLOCKS));
        if let Some(l) = lists {
            // SAFETY: grads holds `tensors` addresses of f32 gradients with
            // the element counts of offsets ([tensors + 1] i64); flags
            // `tensors` i32; partial 2·blocks f64.
            unsafe {
                launch::grad_sq_partial(
                    &dev,
                    LaunchConfig::linear(blocks as u32, 256, 0),
                    dev.ptr_of(&l.grads),
                    dev.ptr_of(&l.flags),
                    dev.ptr_of(&l.offsets),
                    l.tensors as i32,
                    dev.ptr_mut_of(partial),
                )
            }?;
        }
        // SAFETY: partial holds 2·NORM_BLOCKS f64 (the first 2·blocks
        // written above), norm 2 f32, clip 2 f32.
        unsafe {
            launch::grad_norm_finish(
                &dev,
                LaunchConfig::linear(1, 32, 0),
                dev.ptr_of(partial),
                blocks as i32,
                self.max_grad_norm.unwrap_or(0.0),
                scale,
                norm.ptr_mut()?,
                clip.ptr_mut()?,
            )
        }?;
        let (norm_p, clip_p, t_p): (Ptr<f32>, Ptr<f32>, Ptr<i32>) = (norm.ptr()?, clip.ptr()?, dev.ptr_of(t_buf));
        // The unclipped groups' factor, clip[1].
        let unclipped_p = Ptr::<f32>::from_addr(clip_p.addr() + 4);
        for (g, list) in params.iter_mut().enumerate() {
            let cfg = self.groups[g];
            for (slot, dtype) in [(0usize, DType::F32), (1, DType::BF16)] {
                let mut entries = Vec::new();
                for (p, st) in list.iter_mut().zip(self.state[g].iter_mut()).filter(|(p, _)| p.value.dtype() == dtype) {
                    let state_addr = |t: &mut Option<Tensor>| t.as_ref().map_or(Ok(0), addr);
                    entries.push((
                        addr(p.value)?,
                        addr(p.grad)?,
                        state_addr(&mut st.a)?,
                        state_addr(&mut st.b)?,
                        state_addr(&mut st.master)?,
                        p.value.numel(),
                    ));
                }
                let Some(l) = refresh_params(&dev, &mut self.lists[g][slot], &entries)? else { continue };
                let blocks = l.total.div_ceil(256).clamp(1, 65535) as u32;
                let c = if cfg.clip { clip_p } else { unclipped_p };
                let masters = l.masters.as_ref().map_or(Ptr::null(), |m| dev.ptr_of(m));
                let (lr, wd) = (lr * cfg.lr_scale, cfg.weight_decay);
                let lc = LaunchConfig::linear(blocks, 256, 0);
                let (pp, gp, ap, bp, op) = (
                    dev.ptr_of(&l.params),
                    dev.ptr_of(&l.grads),
                    dev.ptr_of(&l.a),
                    dev.ptr_of(&l.b),
                    dev.ptr_of(&l.offsets),
                );
                let n = l.tensors as i32;
                // SAFETY: every list holds `tensors` addresses of tensors of
                // offsets' element counts: parameters of `dtype`, f32
                // gradients, f32 state (null addresses only where the rule
                // reads none: no momentum, no master), offsets [tensors + 1];
                // t, norm and clip as allocated above.
                unsafe {
                    match (self.kind, dtype) {
                        (OptimizerKind::Sgd { momentum }, DType::F32) => {
                            launch::sgd_step_f32(&dev, lc, pp, gp, ap, masters, op, n, lr, momentum, wd, t_p, norm_p, c)
                        }
                        (OptimizerKind::Sgd { momentum }, _) => launch::sgd_step_bf16(
                            &dev, lc, pp, gp, ap, masters, op, n, lr, momentum, wd, t_p, norm_p, c,
                        ),
                        (OptimizerKind::AdamW { beta1, beta2, eps }, DType::F32) => launch::adamw_step_f32(
                            &dev, lc, pp, gp, ap, bp, masters, op, n, lr, beta1, beta2, eps, wd, t_p, norm_p, c,
                        ),
                        (OptimizerKind::AdamW { beta1, beta2, eps }, _) => launch::adamw_step_bf16(
                            &dev, lc, pp, gp, ap, bp, masters, op, n, lr, beta1, beta2, eps, wd, t_p, norm_p, c,
                        ),
                    }
                }?;
            }
        }
        // SAFETY: norm 2 f32, t one i32, skipped one u32.
        unsafe {
            launch::optim_advance(
                &dev,
                LaunchConfig::linear(1, 32, 0),
                norm_p,
                dev.ptr_mut_of::<i32>(t_buf),
                dev.ptr_mut_of::<u32>(skipped),
            )
        }
    }
}

/// The norm pass's list, re-uploaded when the gradients' addresses change.
fn refresh_norm<'a>(
    dev: &Device,
    slot: &'a mut Option<NormList>,
    entries: &[(u64, usize, bool)],
) -> Result<Option<&'a NormList>> {
    if entries.is_empty() {
        return Ok(None);
    }
    let key: Vec<u64> = entries.iter().flat_map(|e| [e.0, e.1 as u64, u64::from(e.2)]).collect();
    if slot.as_ref().is_none_or(|l| l.key != key) {
        let grads: Vec<u64> = entries.iter().map(|e| e.0).collect();
        let flags: Vec<i32> = entries.iter().map(|e| i32::from(e.2)).collect();
        let (offsets, total) = prefix(entries.iter().map(|e| e.1))?;
        *slot = Some(NormList {
            key,
            grads: dev.upload(bytemuck::cast_slice(&grads))?,
            flags: dev.upload(bytemuck::cast_slice(&flags))?,
            offsets: dev.upload(bytemuck::cast_slice(&offsets))?,
            tensors: entries.len(),
            total,
        });
    }
    Ok(slot.as_ref())
}

/// A tensor's entry in a group's list: the addresses of its parameter,
/// gradient, state a and b, master copy (0: none), and its element count.
type Entry = (u64, u64, u64, u64, u64, usize);

/// One group's list for one dtype.
fn refresh_params<'a>(dev: &Device, slot: &'a mut Option<Lists>, entries: &[Entry]) -> Result<Option<&'a Lists>> {
    if entries.is_empty() {
        return Ok(None);
    }
    let key: Vec<u64> = entries.iter().flat_map(|e| [e.0, e.1, e.2, e.3, e.4, e.5 as u64]).collect();
    if slot.as_ref().is_none_or(|l| l.key != key) {
        let col = |f: fn(&Entry) -> u64| -> Vec<u64> { entries.iter().map(f).collect() };
        let (offsets, total) = prefix(entries.iter().map(|e| e.5))?;
        let masters = col(|e| e.4);
        *slot = Some(Lists {
            key,
            params: dev.upload(bytemuck::cast_slice(&col(|e| e.0)))?,
            grads: dev.upload(bytemuck::cast_slice(&col(|e| e.1)))?,
            a: dev.upload(bytemuck::cast_slice(&col(|e| e.2)))?,
            b: dev.upload(bytemuck::cast_slice(&col(|e| e.3)))?,
            masters: match masters.iter().all(|&m| m != 0) {
                true => Some(dev.upload(bytemuck::cast_slice(&masters))?),
                false => None,
            },
            offsets: dev.upload(bytemuck::cast_slice(&offsets))?,
            tensors: entries.len(),
            total,
        });
    }
    Ok(slot.as_ref())
}

/// A tensor's device address (a typed error for host data).
fn addr(t: &Tensor) -> Result<u64> {
    t.device_addr().ok_or_else(|| Error::invalid(OP, "a tensor is not in device memory"))
}

/// Prefix sums of element counts (i64, T + 1 entries) and the total.
fn prefix(counts: impl Iterator<Item = usize>) -> Result<(Vec<i64>, usize)> {
    let mut offsets = vec![0i64];
    let mut total = 0usize;
    for n in counts {
        total = total.checked_add(n).ok_or_else(|| Error::invalid(OP, "element counts overflow"))?;
        offsets.push(i64::try_from(total).map_err(|_| Error::invalid(OP, "element counts overflow"))?);
    }
    Ok((offsets, total))
}

/// Elements per parallel chunk of the host path.
const CHUNK: usize = 1 << 16;

/// One group's step settings on the host.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    wd: f32,
    c: f32,
    t: u64,
}

/// The host update of one tensor (the kernels' arithmetic, f32), in
/// parallel chunks; `a`, `b`: the rule's state.
fn host_update(
    kind: OptimizerKind,
    w: &mut [f32],
    grad: &[f32],
    a: Option<&mut [f32]>,
    b: Option<&mut [f32]>,
    h: Hyper,
) -> Result<()> {
    match kind {
        OptimizerKind::Sgd { momentum } => match a {
            Some(buf) if momentum != 0.0 => {
                w.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).zip(buf.par_chunks_mut(CHUNK)).for_each(
                    |((w, g), buf)| {
                        for ((wi, &gi), bi) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                            let g = h.c * gi + h.wd * *wi;
                            let g = if h.t == 1 { g } else { momentum * *bi + g };
                            *bi = g;
                            *wi -= h.lr * g;
                        }
                    },
                );
            }
            _ => {
                w.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).for_each(|(w, g)| {
                    for (wi, &gi) in w.iter_mut().zip(g) {
                        *wi -= h.lr * (h.c * gi + h.wd * *wi);
                    }
                });
            }
        },
        OptimizerKind::AdamW { beta1, beta2, eps } => {
            let (Some(m), Some(v)) = (a, b) else {
                return Err(Error::invalid(OP, "no AdamW state (internal error)"));
            };
            let bias1 = (1.0 - (beta1 as f64).powf(h.t as f64)) as f32;
            let bias2_sqrt = ((1.0 - (beta2 as f64).powf(h.t as f64)).sqrt()) as f32;
            let step_size = h.lr / bias1;
            w.par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((w, g), m), v)| {
                    for i in 0..w.len() {
                        let gi = h.c * g[i];
                        let mut wi = w[i] * (1.0 - h.lr * h.wd);
                        m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
                        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
                        let denom = v[i].sqrt() / bias2_sqrt + eps;
                        wi -= step_size * (m[i] / denom);
                        w[i] = wi;
                    }
                });
        }
    }
    Ok(())
}
