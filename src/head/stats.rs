//! What a head's step leaves for its metrics: the losses computed on the
//! host (CPU path), or per-sample statistics rows on the device with the
//! flag of the device label check, read on request. Shared by
//! [`super::HeadMetrics`] and [`super::SoftmaxMetrics`].

use crate::error::{Error, Result};
use crate::ops::labels;
use crate::runtime::device::{Device, DeviceBuffer};
use crate::runtime::tensor::{DType, Tensor};

/// A device step's statistics as read: each row's sum, B, the rows.
pub(crate) struct DeviceRows {
    pub sums: Vec<f64>,
    pub b: usize,
    pub rows: Vec<f32>,
}

// One per metrics object, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Default)]
pub(crate) enum StepStats<L> {
    #[default]
    Empty,
    /// The CPU path's result.
    Host(L),
    /// `stats`: `[rows, B]` f32, one row per statistic; `bad`: the first bad
    /// device label (device labels only); `n`: the classes, for the error.
    Device { stats: Tensor, bad: Option<DeviceBuffer>, n: usize },
}

impl<L: Clone> StepStats<L> {
    /// The host result, or the sum of each statistics row (f64), B and the
    /// rows themselves (`[rows, B]`): one download of the rows after the
    /// label check (4 bytes). `op` names the step in errors; `what` the
    /// metrics type.
    pub(crate) fn read(&self, op: &'static str, what: &'static str) -> Result<std::result::Result<L, DeviceRows>> {
        match self {
            StepStats::Empty => Err(Error::invalid(what, "no step has written these metrics")),
            StepStats::Host(l) => Ok(Ok(l.clone())),
            StepStats::Device { stats, bad, n } => {
                if let Some(p) = bad.as_ref().map(|f| labels::first_bad(stats.device(), f)).transpose()?.flatten() {
                    return Err(labels::bad_label_error(op, p, *n));
                }
                let (_, b) = stats.dims2(op)?;
                let rows = stats.to_vec::<f32>()?;
                let sums = rows.chunks(b.max(1)).map(|r| r.iter().map(|&x| x as f64).sum()).collect();
                Ok(Err(DeviceRows { sums, b, rows }))
            }
        }
    }

    /// The statistics buffer `[rows, b]` on `dev` for the next step: the
    /// previous one when its shape matches (no allocation while B stays),
    /// else a new one. Leaves `self` empty until the step stores it back.
    pub(crate) fn take_buffer(&mut self, dev: &Device, rows: usize, b: usize) -> Result<Tensor> {
        match std::mem::take(self) {
            StepStats::Device { stats, .. } if stats.shape() == [rows, b] && stats.device() == dev => Ok(stats),
            _ => Tensor::empty(dev, &[rows, b], DType::F32),
        }
    }
}
