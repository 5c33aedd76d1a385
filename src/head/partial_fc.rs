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
//! extra memory is the fused head's plus `O(N)` for the sampling. On a GPU
//! backend the labels are remapped to positions in the sample on the
//! device too (`pfc_remap`), and the sample stays there ([`PfcGrads::sampled`]),
//! so a step does not wait for the device; except when a batch holds more
//! distinct classes than `⌈r·N⌉`, where the sample's size is counted on
//! the host (one synchronization).

use super::softmax_head::{
    check_batch, check_centres, fused_step, Rows, SoftmaxGrads, SoftmaxHead, SoftmaxHeadConfig, SoftmaxLoss,
    SoftmaxMetrics, Targets,
};
use crate::error::{Error, Result};
use crate::ops::labels::{self, DeviceLabels, Labels};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind, LaunchConfig};
use crate::runtime::kernels::{Ptr, PtrMut};
use crate::runtime::launch;
use crate::runtime::tensor::{DType, Tensor};

/// Partial FC over a [`SoftmaxHead`]'s centres.
pub struct PartialFc {
    head: SoftmaxHead,
    rate: f32,
    seed: u64,
}

/// One step's gradients.
#[derive(Debug)]
pub struct PfcGrads {
    /// The sampled classes, ascending, u32 `[k]` on the head's device.
    sampled: Tensor,
    /// Features `[B, d]` and sampled centres `[k, d]`, f32: row i of
    /// `grads.centres` is class `sampled[i]`'s gradient.
    pub grads: SoftmaxGrads,
}

impl PfcGrads {
    /// Buffers for a step of `pfc` at batch size `batch`: the features'
    /// gradient `[B, d]`; the sampled rows' are sized by each step (the
    /// sample's size varies with the positives).
    pub fn new(pfc: &PartialFc, batch: usize) -> Result<PfcGrads> {
        let cfg = pfc.head.config();
        let dev = pfc.head.device();
        Ok(PfcGrads {
            sampled: Tensor::empty(dev, &[0], DType::U32)?,
            grads: SoftmaxGrads::new(dev, batch, 0, cfg.dim)?,
        })
    }

    /// The step's sampled classes, ascending (u32 `[k]` on the head's
    /// device: the sample never leaves it during a step).
    pub fn sampled(&self) -> &Tensor {
        &self.sampled
    }

    /// The sampled classes on the host (a download on a GPU backend).
    pub fn sampled_host(&self) -> Result<Vec<u32>> {
        self.sampled.to_vec::<u32>()
    }
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
    /// The sampling seed (step t samples with the key (seed, t)).
    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub(crate) fn centres_mut(&mut self) -> &mut Tensor {
        self.head.centres_mut()
    }

    /// `⌈r·N⌉` (the sample size when the positives fit in it).
    pub fn sample_size(&self) -> usize {
        let n = self.head.config().classes;
        ((self.rate as f64 * n as f64).ceil() as usize).clamp(1, n)
    }

    fn seeds(&self, step: u64) -> (u32, u32) {
        crate::runtime::hash::step_key(self.seed, step)
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
                .map(|n| (crate::runtime::hash::keyed_hash32(n, a, b), n))
                .collect();
            keys.select_nth_unstable_by(negatives - 1, |x, y| y.0.cmp(&x.0));
            keys[..negatives].iter().for_each(|&(_, n)| keep[n as usize] = true);
        }
        Ok((0..keep.len() as u32).filter(|&n| keep[n as usize]).collect())
    }

    /// [`PartialFc::sample`] drawn on the head's device (a GPU): the sorted
    /// sample, u32 `[k]` there, k = max(⌈r·N⌉, the distinct labels).
    /// Errors: a label not below N.
    pub(crate) fn sample_on_device(&self, labels: &[u32], step: u64) -> Result<Tensor> {
        self.check_labels("PartialFc::sample", labels)?;
        let (dev, n) = (self.head.device(), self.head.config().classes);
        let k = self.sample_size().max(distinct(labels, n));
        // The labels are below N, which fits an i32 (the head's check).
        let buf = dev.upload(bytemuck::cast_slice(labels))?;
        self.sample_device(dev, &buf, labels.len(), k, step)
    }

    /// The sample drawn on the device from device labels (`B` i32 < N,
    /// checked): the sorted index of `k` classes, `k` at least the
    /// distinct labels' count (the caller's guarantee: k ≥ B, or k counted
    /// on the host). Nothing comes back to the host.
    fn sample_device(&self, dev: &Device, labels: &DeviceBuffer, bsz: usize, k: usize, step: u64) -> Result<Tensor> {
        let n = self.head.config().classes;
        let (a, b) = self.seeds(step);
        let mut positive = dev.alloc_zeroed(n * 4)?;
        let (ni, spread) = (n as i32, n.div_ceil(256).min(4096) as u32);
        // sel = {hi, −rem, lo, −rem}: the radix select's two passes, taking
        // k − (distinct positives, counted by pfc_mark) negatives.
        let mut sel = dev.alloc(16)?;
        // One zeroed allocation for both passes' histograms and the count
        // of distinct positives (k minus it: the negatives to draw).
        let mut hists = dev.alloc_zeroed((2 * 65536 + 1) * 4)?;
        let count = dev.ptr_mut_of::<i32>(&mut hists).offset(2 * 65536);
        // (No labels, as on a model-parallel shard that owns none of the
        // batch's classes: no positives, k negatives.)
        if bsz > 0 {
            // SAFETY (this launch and those below): labels holds B class ids < N (checked),
            // positive N i32 flags; the selection buffers are sized here: sel 4
            // i32, each histogram 65536 u32 and the count 1 i32, counts one i32
            // per 1024 classes, index k i32 (k = the positives plus the selected
            // negatives, which the radix select makes exact).
            unsafe {
                launch::pfc_mark(
                    dev,
                    LaunchConfig::linear(bsz.div_ceil(256) as u32, 256, 0),
                    dev.ptr_of(labels),
                    bsz as i32,
                    dev.ptr_mut_of(&mut positive),
                    count,
                )?;
            }
        }
        for pass in 0..2 {
            let hist = dev.ptr_mut_of::<u32>(&mut hists).offset(pass * 65536);
            let sel_p = dev.ptr_mut_of::<i32>(&mut sel);
            let match_hi = if pass == 0 { Ptr::null() } else { sel_p.as_const() };
            // Pass 1 takes k − (distinct positives); pass 2 what is left
            // inside pass 1's bin (stored negated in sel[1]).
            let (total, taken) = if pass == 0 { (k as i32, count.as_const()) } else { (0, sel_p.as_const().offset(1)) };
            // SAFETY: as above.
            unsafe {
                launch::pfc_hist(
                    dev,
                    LaunchConfig::linear(spread, 256, 0),
                    dev.ptr_of(&positive),
                    ni,
                    a,
                    b,
                    match_hi,
                    hist,
                )?;
                launch::pfc_find(
                    dev,
                    LaunchConfig::linear(1, 256, 0),
                    hist.as_const(),
                    total,
                    taken,
                    sel_p.offset(2 * pass),
                )?;
            }
        }
        let sel_p = dev.ptr_of(&sel);
        let blocks = n.div_ceil(1024);
        let mut counts = dev.alloc(blocks * 4)?;
        let mut index = Tensor::empty(dev, &[k], DType::U32)?;
        let cfg = LaunchConfig::linear(blocks as u32, 256, 0);
        // SAFETY: as above.
        unsafe {
            launch::pfc_count(dev, cfg, dev.ptr_of(&positive), ni, a, b, sel_p, dev.ptr_mut_of(&mut counts))?;
            launch::pfc_scan_blocks(dev, LaunchConfig::linear(1, 256, 0), dev.ptr_mut_of(&mut counts), blocks as i32)?;
            let (pos_p, counts_p) = (dev.ptr_of(&positive), dev.ptr_of(&counts));
            let index_p = PtrMut::<i32>::from_addr(index.ptr_mut::<u32>()?.addr());
            launch::pfc_write(dev, cfg, pos_p, ni, a, b, sel_p, counts_p, index_p)?;
        }
        Ok(index)
    }

    /// One training step: samples the classes of `step`, then the fused
    /// margin softmax over them. Errors as [`SoftmaxHead::forward_backward`].
    pub fn forward_backward<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
        step: u64,
    ) -> Result<(SoftmaxLoss, PfcGrads)> {
        let b = features.shape().first().copied().unwrap_or(0);
        let mut grads = PfcGrads::new(self, b)?;
        let mut metrics = SoftmaxMetrics::new();
        self.forward_backward_into(features, labels, step, &mut grads, &mut metrics)?;
        Ok((metrics.read()?, grads))
    }

    /// [`PartialFc::forward_backward`] into given buffers: the features'
    /// gradient overwrites `grads.grads.features` (`[B, d]` f32 on the
    /// head's device), the sample and the sampled rows' gradient
    /// (reallocated when the sample's size changes) are this step's, the
    /// loss stays in `metrics`.
    ///
    /// On a GPU backend, when the sample size `⌈r·N⌉` is at least B (so it
    /// holds every positive and its size is known), the sample is drawn,
    /// the labels checked and remapped to it on the device: no host wait,
    /// device labels never come down, a bad one is reported by the metrics'
    /// `read`. A batch larger than the sample (the sample then grows to the
    /// distinct positives, a count the host needs) brings the labels and
    /// the sample to the host once (one synchronization).
    pub fn forward_backward_into<'l>(
        &self,
        features: &Tensor,
        labels: impl Into<Labels<'l>>,
        step: u64,
        grads: &mut PfcGrads,
        metrics: &mut SoftmaxMetrics,
    ) -> Result<()> {
        const OP: &str = "PartialFc::forward_backward";
        let labels = labels.into();
        let cfg: &SoftmaxHeadConfig = self.head.config();
        let dev = self.head.device();
        let b = check_batch(OP, cfg, dev, features, labels.len())?;
        let (sampled, targets) = if dev.kind() == DeviceKind::Cpu {
            let labels = labels.host_checked(OP, dev, cfg.classes)?;
            let sampled = self.sample(&labels, step)?;
            let targets = remap(OP, &sampled, &labels)?;
            (Tensor::from_slice(dev, &[sampled.len()], &sampled)?, Targets::Host(targets))
        } else if self.sample_size() >= b {
            // Every step samples exactly ⌈r·N⌉ classes (the distinct
            // positives, at most B, fit): all on the device.
            let k = self.sample_size();
            let prepared = labels::prepare(OP, dev, labels, cfg.classes, None)?;
            let index = self.sample_device(dev, &prepared.labels, b, k, step)?;
            let mut remapped = dev.alloc(b * 4)?;
            // SAFETY: the prepared labels are B i32 < N, all in the sorted
            // index of k classes (their positives were marked); remapped
            // holds B i32.
            unsafe {
                launch::pfc_remap(
                    dev,
                    LaunchConfig::linear(b.div_ceil(256) as u32, 256, 0),
                    dev.ptr_of(&prepared.labels),
                    b as i32,
                    Ptr::from_addr(index.ptr::<u32>()?.addr()),
                    k as i32,
                    dev.ptr_mut_of(&mut remapped),
                )?;
            }
            let targets = DeviceLabels { labels: remapped, targets: None, bad: prepared.bad };
            (index, Targets::Device(targets))
        } else {
            let labels = labels.host_checked(OP, dev, cfg.classes)?;
            let k = self.sample_size().max(distinct(&labels, cfg.classes));
            let prepared = labels::prepare(OP, dev, Labels::Host(&labels), cfg.classes, None)?;
            let index = self.sample_device(dev, &prepared.labels, b, k, step)?;
            let sampled = index.to_vec::<u32>()?;
            (index, Targets::Host(remap(OP, &sampled, &labels)?))
        };
        let k = sampled.numel();
        if grads.grads.centres.shape() != [k, cfg.dim] || grads.grads.centres.device() != dev {
            grads.grads.centres = Tensor::empty(dev, &[k, cfg.dim], DType::F32)?;
        }
        grads.grads.check(OP, dev, b, k, cfg.dim)?;
        let rows = match sampled.host_slice::<u32>() {
            Some(r) => Rows::Host(r),
            None => Rows::Device(&sampled),
        };
        fused_step(OP, cfg, self.head.centres(), Some(rows), k, features, targets, &mut grads.grads, metrics)?;
        grads.sampled = sampled;
        Ok(())
    }

    /// Plain SGD on the sampled rows: `W[sampled[i]] ← W[sampled[i]] − lr·g_i`
    /// (the sample read where it is, on the device).
    pub fn sgd_step(&mut self, grads: &PfcGrads, lr: f32) -> Result<()> {
        const OP: &str = "PartialFc::sgd_step";
        let cfg = self.head.config().clone();
        check_centres(OP, self.head.centres(), cfg.classes, cfg.dim)?;
        crate::ops::rows::axpy_sampled_rows(self.head.centres_mut(), &grads.sampled, &grads.grads.centres, -lr)
    }

    /// Consumes the Partial FC, returning its head.
    pub fn into_head(self) -> SoftmaxHead {
        self.head
    }
}

/// The number of distinct labels (all < n).
fn distinct(labels: &[u32], n: usize) -> usize {
    let mut seen = vec![false; n];
    labels.iter().filter(|&&y| !std::mem::replace(&mut seen[y as usize], true)).count()
}

/// Each label's position in the sorted sample.
fn remap(op: &'static str, sampled: &[u32], labels: &[u32]) -> Result<Vec<i32>> {
    labels
        .iter()
        .map(|y| sampled.binary_search(y).map(|p| p as i32))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::invalid(op, "a label is missing from the sample (internal error)"))
}
