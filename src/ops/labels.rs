//! A batch's class labels, on the host or on the device (kernels/labels.cu),
//! checked and converted once for the kernels that index by them.
//!
//! Host labels are checked on the host: a label out of range is an error
//! before anything runs. Device labels (a u32 or i64 tensor, as a framework
//! holds them) are checked by a kernel, without a host synchronization: a
//! bad label becomes class 0 (so no kernel indexes out of range) and the
//! first bad sample is recorded in a flag that the step's metrics carry;
//! reading the metrics reports it as [`Error::InvalidArgument`].

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::kernels::Ptr;
use crate::runtime::launch::launch_one_of;
use crate::runtime::tensor::{DType, Tensor};

/// Class labels of a batch: host `u32`s, or a 1-D tensor of u32 or i64 on
/// the op's device. `&[u32]`, `&Vec<u32>`, `&[u32; B]` and `&Tensor`
/// convert into it, so the ops take `impl Into<Labels>`.
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a> {
    /// On the host, checked there.
    Host(&'a [u32]),
    /// A `[B]` tensor of u32 or i64, checked on its device.
    Tensor(&'a Tensor),
}

impl<'a> From<&'a [u32]> for Labels<'a> {
    fn from(v: &'a [u32]) -> Self {
        Labels::Host(v)
    }
}
impl<'a> From<&'a Vec<u32>> for Labels<'a> {
    fn from(v: &'a Vec<u32>) -> Self {
        Labels::Host(v)
    }
}
impl<'a, const B: usize> From<&'a [u32; B]> for Labels<'a> {
    fn from(v: &'a [u32; B]) -> Self {
        Labels::Host(v)
    }
}
impl<'a> From<&'a Tensor> for Labels<'a> {
    fn from(t: &'a Tensor) -> Self {
        Labels::Tensor(t)
    }
}

impl Labels<'_> {
    /// The batch size B (a tensor's first dimension; 0 for a 0-D tensor).
    pub fn len(&self) -> usize {
        match self {
            Labels::Host(v) => v.len(),
            Labels::Tensor(t) => t.shape().first().copied().unwrap_or(0),
        }
    }
    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the form (not the values) of device labels: a 1-D u32 or i64
    /// tensor on `device`.
    fn check_form(&self, op: &'static str, device: &Device) -> Result<()> {
        let Labels::Tensor(t) = self else { return Ok(()) };
        if t.shape().len() != 1 || !matches!(t.dtype(), DType::U32 | DType::I64) {
            return Err(Error::Shape {
                op,
                expected: "labels as a 1-D u32 or i64 tensor".into(),
                got: format!("{:?} {:?}", t.shape(), t.dtype()),
            });
        }
        if t.device() != device {
            return Err(Error::DeviceMismatch { op, a: device.to_string(), b: t.device().to_string() });
        }
        Ok(())
    }

    /// The labels on the host, each checked to be below `n`: host labels
    /// as given; a tensor's downloaded (a host synchronization on a GPU:
    /// the CPU paths, and the ops that still sample on the host).
    pub(crate) fn host_checked(
        &self,
        op: &'static str,
        device: &Device,
        n: usize,
    ) -> Result<std::borrow::Cow<'_, [u32]>> {
        use std::borrow::Cow;
        self.check_form(op, device)?;
        let bad = |p: usize, y: String| Error::invalid(op, format!("labels[{p}] = {y} is not below N = {n}"));
        let v: Cow<'_, [u32]> = match self {
            Labels::Host(v) => Cow::Borrowed(v),
            Labels::Tensor(t) if t.dtype() == DType::U32 => Cow::Owned(t.to_vec::<u32>()?),
            Labels::Tensor(t) => {
                let w = t.to_vec::<i64>()?;
                if let Some(p) = w.iter().position(|&y| !(0..n as i64).contains(&y)) {
                    return Err(bad(p, w[p].to_string()));
                }
                Cow::Owned(w.into_iter().map(|y| y as u32).collect())
            }
        };
        if let Some(p) = v.iter().position(|&y| y as usize >= n) {
            return Err(bad(p, v[p].to_string()));
        }
        Ok(v)
    }
}

/// Checked labels on a GPU backend, for the kernels: `labels` B i32 below
/// N, `targets` (with codes) `[l, B]` i32 tokens, position-major, and the
/// flag of the first bad sample (device labels only: u32, 0 when none, else
/// `u32::MAX - sample`).
pub(crate) struct DeviceLabels {
    pub labels: DeviceBuffer,
    pub targets: Option<DeviceBuffer>,
    pub bad: Option<DeviceBuffer>,
}

/// The identity codes an op maps labels through: `[n, length]` u16 on the
/// device.
pub(crate) struct Codes<'a> {
    pub device: &'a DeviceBuffer,
    pub length: usize,
}

/// `labels` (B of them, below `n`) ready for the kernels on `device`, with
/// the targets of `codes` when given. Host labels are checked here (an
/// error names the first bad one) and uploaded; device labels are checked
/// by the kernel, their errors deferred to the flag. The kernel converts
/// both and maps them to targets (host labels without codes need no
/// kernel: they are uploaded as i32).
pub(crate) fn prepare(
    op: &'static str,
    device: &Device,
    labels: Labels<'_>,
    n: usize,
    codes: Option<&Codes<'_>>,
) -> Result<DeviceLabels> {
    labels.check_form(op, device)?;
    if device.kind() == DeviceKind::Cpu {
        return Err(Error::invalid(op, "device labels are for GPU backends"));
    }
    let b = labels.len();
    if b > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::invalid(op, format!("{b} labels of {n} classes do not fit the kernels' int sizes")));
    }
    let up = |v: &[i32]| device.upload(bytemuck::cast_slice(v));
    let uploaded;
    let (t, checked) = match labels {
        Labels::Host(v) => {
            labels.host_checked(op, device, n)?;
            if codes.is_none() {
                let labels = up(&v.iter().map(|&y| y as i32).collect::<Vec<_>>())?;
                return Ok(DeviceLabels { labels, targets: None, bad: None });
            }
            uploaded = Tensor::from_slice(device, &[b], v)?;
            (&uploaded, true)
        }
        Labels::Tensor(t) => (t, false),
    };
    let mut out = device.alloc(b * 4)?;
    let length = codes.map_or(0, |c| c.length);
    let mut targets = match codes {
        Some(_) => Some(
            device.alloc(
                b.checked_mul(length)
                    .and_then(|x| x.checked_mul(4))
                    .ok_or_else(|| Error::invalid(op, "B·l targets overflow"))?,
            )?,
        ),
        None => None,
    };
    let codes_p = codes.map_or(Ptr::null(), |c| device.ptr_of::<u16>(c.device));
    // Host labels were checked: the kernel never writes their flag.
    let mut bad = if checked { device.alloc(4)? } else { device.alloc_zeroed(4)? };
    if b > 0 {
        let targets_p = match targets.as_mut() {
            Some(t) => device.ptr_mut_of(t),
            None => crate::runtime::kernels::PtrMut::null(),
        };
        let (out_p, bad_p) = (device.ptr_mut_of(&mut out), device.ptr_mut_of(&mut bad));
        let cfg = LaunchConfig::linear(b.div_ceil(256) as u32, 256, 0);
        // SAFETY: labels holds B elements of its dtype (checked above); the
        // codes (when given) [n, length] u16 uploaded by the caller's table;
        // out B i32, targets length·B i32, bad one i32, allocated here. Every
        // label is clamped into [0, n) before it indexes the codes.
        unsafe {
            launch_one_of!(t.dtype(), { DType::U32 => labels_check_u32, _ => labels_check_i64 },
                (device, cfg, t.ptr()?, b as i32, n as i64, codes_p, length as i32, out_p, targets_p, bad_p))
        }?;
    }
    // Host labels were checked: their flag is not kept.
    Ok(DeviceLabels { labels: out, targets, bad: if checked { None } else { Some(bad) } })
}

/// The first bad sample a device check flagged (`None`: every label was in
/// range), read from the flag of [`prepare`] (a 4-byte download).
pub(crate) fn first_bad(device: &Device, bad: &DeviceBuffer) -> Result<Option<usize>> {
    let v: Vec<u32> = bytemuck::pod_collect_to_vec(&device.download(bad, 4)?);
    Ok(v.first().copied().filter(|&f| f != 0).map(|f| (u32::MAX - f) as usize))
}

/// The error of a flagged sample.
pub(crate) fn bad_label_error(op: &'static str, sample: usize, n: usize) -> Error {
    Error::invalid(op, format!("labels[{sample}] is negative or not below N = {n} (checked on the device)"))
}
