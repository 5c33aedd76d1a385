//! Partial FC (An et al., insightface): each step trains the margin softmax
//! over a sample of the classes: every class in the batch (the positives),
//! plus uniformly chosen negatives up to `⌈r·N⌉` classes in all (all the
//! positives when there are more of them). Labels are remapped to positions
//! in the sample, which is sorted by class; gradients reach the sampled rows
//! only.
//!
//! The sample is seeded by (seed, step) and drawn on the device: each class
//! gets a key from a keyed bijective hash of its index (so keys are distinct),
//! and the negatives with the largest keys are taken: a two-pass 16-bit
//! radix select, then an ordered compaction (kernels/softmax_head.cu
//! `pfc_*`). insightface draws torch.rand keys and takes a top-k; the rule
//! is the same, the random source differs. [`PartialFc::sample`] computes the
//! same sample on the host.
//!
//! The centres are read in place through the sample (no gathered copy):
//! extra memory is the fused head's plus `O(N)` for the sampling.

use super::softmax_head::{
    check_batch, check_centres, fused_step, rows_axpy, Rows, SoftmaxGrads, SoftmaxHead, SoftmaxHeadConfig, SoftmaxLoss,
};
use crate::device::{Arg, Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::error::{Error, Result};
use crate::kernels::{self, ModuleId};
use crate::tensor::Tensor;

/// Partial FC over a [`SoftmaxHead`]'s centres.
pub struct PartialFc {
    head: SoftmaxHead,
    rate: f32,
    seed: u64,
}

/// One step's gradients.
#[derive(Debug)]
pub struct PfcGrads {
    /// The sampled classes, ascending; row i of `grads.centres` is class
    /// `sampled[i]`'s gradient.
    pub sampled: Vec<u32>,
    /// Features `[B, d]` and sampled centres `[k, d]`, f32.
    pub grads: SoftmaxGrads,
}

impl PartialFc {
    /// Partial FC with sample rate `rate` in (0, 1] over `head`'s centres,
    /// sampling seeded by `seed` (and the step).
    pub fn new(head: SoftmaxHead, rate: f32, seed: u64) -> Result<PartialFc> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(Error::invalid("PartialFc", format!("the sample rate must be in (0, 1], got {rate}")));
        }
        Ok(PartialFc { head, rate, seed })
    }

    /// The head (its centres and configuration).
    pub fn head(&self) -> &SoftmaxHead {
        &self.head
    }
    /// The sample rate r.
    pub fn rate(&self) -> f32 {
        self.rate
    }

    /// `⌈r·N⌉` (the sample size when the positives fit in it).
    pub fn sample_size(&self) -> usize {
        let n = self.head.config().classes;
        ((self.rate as f64 * n as f64).ceil() as usize).clamp(1, n)
    }

    fn seeds(&self, step: u64) -> (u32, u32) {
        crate::hash::step_key(self.seed, step)
    }

    fn check_labels(&self, op: &'static str, labels: &[u32]) -> Result<Vec<bool>> {
        let n = self.head.config().classes;
        let mut positive = vec![false; n];
        for (p, &y) in labels.iter().enumerate() {
            if y as usize >= n {
                return Err(Error::invalid(op, format!("labels[{p}] = {y} is not below N = {n}")));
            }
            positive[y as usize] = true;
        }
        Ok(positive)
    }

    /// The classes step `step` trains on, ascending, computed on the host
    /// (the reference of the device's sampling, and the CPU path).
    pub fn sample(&self, labels: &[u32], step: u64) -> Result<Vec<u32>> {
        let positive = self.check_labels("PartialFc::sample", labels)?;
        let p = positive.iter().filter(|&&x| x).count();
        let negatives = self.sample_size().saturating_sub(p);
        let (a, b) = self.seeds(step);
        let mut keep = positive;
        if negatives > 0 {
            let mut keys: Vec<(u32, u32)> = (0..keep.len() as u32)
                .filter(|&n| !keep[n as usize])
                .map(|n| (crate::hash::keyed_hash32(n, a, b), n))
                .collect();
            keys.select_nth_unstable_by(negatives - 1, |x, y| y.0.cmp(&x.0));
            keys[..negatives].iter().for_each(|&(_, n)| keep[n as usize] = true);
        }
        Ok((0..keep.len() as u32).filter(|&n| keep[n as usize]).collect())
    }

    /// The sample drawn on the device: the sorted index, as a buffer of i32.
    fn sample_device(&self, dev: &Device, labels: &[u32], step: u64) -> Result<(DeviceBuffer, usize)> {
        let n = self.head.config().classes;
        let positive_host = self.check_labels("PartialFc::forward_backward", labels)?;
        let p = positive_host.iter().filter(|&&x| x).count();
        let k = self.sample_size().max(p);
        let (a, b) = self.seeds(step);
        let launch = |name: &str, cfg: LaunchConfig, args: &[Arg]| {
            dev.launch(ModuleId::SoftmaxHead, kernels::find(ModuleId::SoftmaxHead, name)?, cfg, args)
        };
        let labels_buf = dev.upload(bytemuck::cast_slice(labels))?;
        let positive = dev.alloc_zeroed(n * 4)?;
        let bsz = labels.len();
        launch(
            "pfc_mark",
            LaunchConfig::linear(bsz.div_ceil(256) as u32, 256, 0),
            &[Arg::Ptr(dev.ptr(&labels_buf)), Arg::I32(bsz as i32), Arg::Ptr(dev.ptr(&positive))],
        )?;
        let spread = n.div_ceil(256).min(4096) as u32;
        let sel = if k > p {
            // Radix select of the k − p largest negative keys: sel = {hi, rem, lo, rem}.
            let need = dev.upload(bytemuck::cast_slice(&[(k - p) as i32]))?;
            let sel = dev.alloc(16)?;
            // One zeroed allocation for both passes' histograms.
            let hists = dev.alloc_zeroed(2 * 65536 * 4)?;
            for pass in 0..2 {
                let hist = dev.ptr(&hists) + (pass * 65536 * 4) as u64;
                let match_hi = if pass == 0 { 0 } else { dev.ptr(&sel) };
                launch(
                    "pfc_hist",
                    LaunchConfig::linear(spread, 256, 0),
                    &[
                        Arg::Ptr(dev.ptr(&positive)),
                        Arg::I32(n as i32),
                        Arg::U32(a),
                        Arg::U32(b),
                        Arg::Ptr(match_hi),
                        Arg::Ptr(hist),
                    ],
                )?;
                let need_ptr = if pass == 0 { dev.ptr(&need) } else { dev.ptr(&sel) + 4 };
                launch(
                    "pfc_find",
                    LaunchConfig::linear(1, 256, 0),
                    &[Arg::Ptr(hist), Arg::Ptr(need_ptr), Arg::Ptr(dev.ptr(&sel) + 8 * pass as u64)],
                )?;
            }
            Some(sel)
        } else {
            None
        };
        let sel_arg = Arg::Ptr(sel.as_ref().map_or(0, |s| dev.ptr(s)));
        let blocks = n.div_ceil(1024);
        let counts = dev.alloc(blocks * 4)?;
        let common = [Arg::Ptr(dev.ptr(&positive)), Arg::I32(n as i32), Arg::U32(a), Arg::U32(b), sel_arg];
        let mut args = common.to_vec();
        args.push(Arg::Ptr(dev.ptr(&counts)));
        launch("pfc_count", LaunchConfig::linear(blocks as u32, 256, 0), &args)?;
        launch(
            "pfc_scan_blocks",
            LaunchConfig::linear(1, 256, 0),
            &[Arg::Ptr(dev.ptr(&counts)), Arg::I32(blocks as i32)],
        )?;
        let index = dev.alloc(k * 4)?;
        let mut args = common.to_vec();
        args.extend([Arg::Ptr(dev.ptr(&counts)), Arg::Ptr(dev.ptr(&index))]);
        launch("pfc_write", LaunchConfig::linear(blocks as u32, 256, 0), &args)?;
        Ok((index, k))
    }

    /// One training step: samples the classes of `step`, then the fused
    /// margin softmax over them. Errors as [`SoftmaxHead::forward_backward`].
    pub fn forward_backward(&self, features: &Tensor, labels: &[u32], step: u64) -> Result<(SoftmaxLoss, PfcGrads)> {
        const OP: &str = "PartialFc::forward_backward";
        let cfg: &SoftmaxHeadConfig = self.head.config();
        let dev = self.head.device();
        check_batch(OP, cfg, dev, features, labels)?;
        let (sampled, index) = if dev.kind() == DeviceKind::Cpu {
            (self.sample(labels, step)?, None)
        } else {
            let (index, k) = self.sample_device(dev, labels, step)?;
            let ids: Vec<i32> = bytemuck::pod_collect_to_vec(&dev.download(&index, k * 4)?);
            (ids.into_iter().map(|i| i as u32).collect(), Some(index))
        };
        let targets: Vec<i32> = labels
            .iter()
            .map(|y| sampled.binary_search(y).map(|p| p as i32))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::invalid(OP, "a label is missing from the sample (internal error)"))?;
        let rows = match &index {
            Some(b) => Rows::Device(b),
            None => Rows::Host(&sampled),
        };
        let (loss, grads) = fused_step(OP, cfg, self.head.centres(), Some(rows), sampled.len(), features, &targets)?;
        Ok((loss, PfcGrads { sampled, grads }))
    }

    /// Plain SGD on the sampled rows: `W[sampled[i]] ← W[sampled[i]] − lr·g_i`.
    pub fn sgd_step(&mut self, grads: &PfcGrads, lr: f32) -> Result<()> {
        const OP: &str = "PartialFc::sgd_step";
        let cfg = self.head.config().clone();
        check_centres(OP, self.head.centres(), cfg.classes, cfg.dim)?;
        if grads.sampled.iter().any(|&i| i as usize >= cfg.classes) {
            return Err(Error::invalid(OP, "a sampled class is out of range"));
        }
        let k = grads.sampled.len();
        rows_axpy(OP, self.head.centres_mut(), Some(&grads.sampled), k, &grads.grads.centres, -lr)
    }

    /// Consumes the Partial FC, returning its head.
    pub fn into_head(self) -> SoftmaxHead {
        self.head
    }
}
