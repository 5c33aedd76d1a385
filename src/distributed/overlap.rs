//! Gradients all-reduced while the backward goes on: PyTorch DDP's
//! overlap, for gradients that live on the host (CPU ranks).
//!
//! The backward finishes the gradients last layer first. An
//! [`OverlappedReducer`] takes each one as it is final
//! ([`OverlappedReducer::ready`]), copies it into the bucket being filled,
//! and hands every full bucket (`bucket_bytes`, DDP's `bucket_cap_mb`) to a
//! thread of its own that all-reduces it on the communicator while the
//! backward computes the layers before. [`OverlappedReducer::finish`] sends
//! the last, partial bucket, waits for them all, and writes the sums back
//! into the gradient tensors: only the tail of the communication is left on
//! the step's critical path.
//!
//! A bucket is full when the next gradient would take it past its size,
//! which the first step learns only when that gradient comes (on a GPU,
//! after its kernels). From the second step on, the reducer knows each
//! bucket's members from the step before (DDP, too, fixes its buckets
//! after the first iteration) and sends a bucket as soon as its last member
//! is in: the step's last bucket too, during the backward.
//!
//! Every rank must call `ready` with the same names, sizes and order (the
//! backward's order is fixed by the network, which the trainer's
//! configuration check makes equal on every rank), so that the ranks' k-th
//! buckets match; and no other collective may run on the communicator
//! between the first `ready` and `finish` (the buckets' collectives would
//! interleave with it in a different order on different ranks).
//!
//! Gradients on a GPU (ranks whose communicator is a host one, MPI) are
//! staged without a wait: each one, as it is final, is copied into a
//! page-locked bucket on the device's second stream, after the work queued
//! so far; a full bucket goes to the thread with the mark of its last
//! copy, which the thread waits for before the all-reduce; `finish` copies
//! the sums back on the second stream, and the device's stream waits for
//! them before the optimizer. The host never waits for the backward.
//!
//! With a communicator that reduces on the device
//! ([`Communicator::queues_on_device`]: NCCL) the buckets are device
//! memory: each gradient, as it is final, is copied into one on the second
//! stream, and a full bucket's all-reduce is queued on that stream at once
//! (DDP's flat buckets on NCCL's stream); `finish` queues the copies back
//! there, makes the device's stream wait for them, and waits on the host,
//! within the collectives' deadline, for the all-reduces to end (so that a
//! failed or dead rank is an error here, not a hang in a later
//! synchronization).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::runtime::device::Device;
use crate::runtime::pinned::PinnedBuffer;
use crate::runtime::tensor::{DType, Tensor};

const OP: &str = "OverlappedReducer";

/// What the last step's overlap achieved ([`OverlappedReducer::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OverlapStats {
    /// Buckets all-reduced in the step.
    pub buckets: usize,
    /// Of those, the buckets handed to the communication thread before the
    /// backward ended ([`OverlappedReducer::end_backward`]): every full one
    /// (from the second step, every one).
    pub during_backward: usize,
    /// Seconds the communication thread spent in the step's all-reduces
    /// (device buckets: the host's time queuing them and waiting for them
    /// in `finish`; their time on the device is not measured).
    pub communication: f64,
    /// Seconds [`OverlappedReducer::finish`] waited for them after the
    /// backward: the communication the overlap did not hide.
    pub exposed: f64,
}

/// A bucket's values: host memory (CPU ranks), page-locked memory the
/// device's copies fill (GPU ranks, a host communicator), or device memory
/// (GPU ranks, NCCL): its first `len` values (a page-locked buffer holds
/// the mark of its last copy, which writing it waits for).
enum Bucket {
    Host(Vec<f32>),
    Pinned { buf: PinnedBuffer, len: usize },
    Device { buf: DeviceBucket, len: usize },
}

impl Bucket {
    /// The values, for the host (page-locked: once the device's copies
    /// from or into them are done). Not for device buckets.
    fn values_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            Bucket::Host(v) => Ok(v),
            Bucket::Pinned { buf, len } => Ok(&mut buf.as_mut_slice()?[..*len]),
            Bucket::Device { .. } => Err(Error::invalid(OP, "a device bucket read on the host (internal error)")),
        }
    }

    /// The values filled so far (0 for a host bucket, which grows).
    fn filled(&self) -> usize {
        match self {
            Bucket::Host(_) => 0,
            Bucket::Pinned { len, .. } | Bucket::Device { len, .. } => *len,
        }
    }
}

/// A device bucket's memory. Its copies and all-reduce run on the second
/// stream while its memory is freed on the device's stream: dropping it
/// first makes that stream wait for the second one.
struct DeviceBucket(Tensor);

impl Drop for DeviceBucket {
    fn drop(&mut self) {
        let _ = self.0.device().join_side();
    }
}

/// A bucket sent to the communication thread: its number and its data.
type Job = (usize, Bucket);
/// A bucket back: its number, the sum (or why not), the seconds it took.
type Done = (usize, Result<Bucket>, f64);

/// See the module documentation.
pub struct OverlappedReducer {
    comm: Arc<dyn Communicator>,
    /// The bucket's capacity in f32 (at least 1).
    cap: usize,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The bucket being filled, and the names and lengths in it.
    filling: Vec<f32>,
    members: Vec<(String, usize)>,
    /// On GPU ranks: the device, and the page-locked or device bucket
    /// being filled.
    device: Option<Device>,
    open: Option<Bucket>,
    /// Page-locked and device buckets back from earlier steps, reused.
    spare_pinned: Vec<PinnedBuffer>,
    spare_device: Vec<DeviceBucket>,
    /// The device buckets of this step, their all-reduces queued on the
    /// device (by number).
    queued: Vec<(usize, Bucket)>,
    /// The members of each bucket sent in this step.
    sent: Vec<Vec<(String, usize)>>,
    /// The members of each bucket of the last step that succeeded: a
    /// bucket whose members are those of the plan's bucket of its number
    /// goes at once, without waiting for the gradient that would overflow
    /// it.
    plan: Vec<Vec<(String, usize)>>,
    /// Buckets' buffers back from earlier steps, reused (a step allocates
    /// no bucket after the first).
    spare: Vec<Vec<f32>>,
    /// Every name handed in this step.
    names: std::collections::HashSet<String>,
    /// Whether the backward of this step has ended.
    ended: bool,
    /// The step under way's counts, and the last finished step's.
    current: OverlapStats,
    last: OverlapStats,
}

impl std::fmt::Debug for OverlappedReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OverlappedReducer {{ {:?}, bucket: {} B }}", &*self.comm, 4 * self.cap)
    }
}

impl OverlappedReducer {
    /// A reducer on `comm` with buckets of at most `bucket_bytes` of f32
    /// (a tensor larger than a bucket goes alone), and its communication
    /// thread. Errors: the thread cannot be started.
    pub fn new(comm: Arc<dyn Communicator>, bucket_bytes: usize) -> Result<OverlappedReducer> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel::<Done>();
        let worker = comm.clone();
        let thread = std::thread::Builder::new()
            .name("gif-fr-all-reduce".into())
            .spawn(move || {
                for (id, mut data) in inbox {
                    let began = Instant::now();
                    let r = data.values_mut().and_then(|v| worker.all_reduce_f32(v, ReduceOp::Sum)).map(|()| data);
                    if outbox.send((id, r, began.elapsed().as_secs_f64())).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::invalid(OP, format!("cannot start the communication thread: {e}")))?;
        Ok(OverlappedReducer {
            comm,
            cap: (bucket_bytes / 4).max(1),
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            filling: Vec::new(),
            members: Vec::new(),
            device: None,
            open: None,
            spare_pinned: Vec::new(),
            spare_device: Vec::new(),
            queued: Vec::new(),
            sent: Vec::new(),
            plan: Vec::new(),
            spare: Vec::new(),
            names: Default::default(),
            ended: false,
            current: OverlapStats::default(),
            last: OverlapStats::default(),
        })
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The overlap of the last finished step.
    pub fn stats(&self) -> OverlapStats {
        self.last
    }

    /// The buckets sent so far in the step under way.
    pub fn buckets_sent(&self) -> usize {
        self.sent.len()
    }

    /// Whether a step is under way (a gradient was handed in since the last
    /// [`OverlappedReducer::finish`]).
    pub fn in_progress(&self) -> bool {
        !self.members.is_empty() || !self.sent.is_empty()
    }

    /// Takes gradient `name` (f32), final for this step: copied into the
    /// bucket being filled, which goes to the communication thread when
    /// full. A tensor on a GPU is copied into a page-locked bucket on the
    /// device's second stream, without a wait, or into a device bucket
    /// whose all-reduce is queued on that stream when full (see the module
    /// documentation); every gradient of a step must be on one device.
    pub fn ready(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        if grad.dtype() != DType::F32 {
            return Err(Error::DType { op: OP, expected: DType::F32, got: grad.dtype() });
        }
        let dev = grad.device().runs_kernels().then(|| grad.device().clone());
        if self.in_progress() && self.device != dev {
            return Err(Error::invalid(
                OP,
                format!("gradient {name} is on {}, the step's others on another device", grad.device()),
            ));
        }
        if !self.names.insert(name.to_string()) {
            return Err(Error::invalid(OP, format!("gradient {name} was handed in twice in one step")));
        }
        self.device = dev;
        let n = grad.numel();
        if self.device.is_some() {
            return self.ready_staged(name, grad, n);
        }
        if !self.filling.is_empty() && self.filling.len().saturating_add(n) > self.cap {
            self.send()?;
        }
        self.filling.try_reserve(n).map_err(|_| Error::OutOfMemory {
            op: OP,
            what: format!("the all-reduce bucket of {name}"),
            bytes: n.saturating_mul(4),
            free: None,
        })?;
        self.filling.extend_from_slice(&grad.host_f32()?);
        self.members.push((name.to_string(), n));
        if self.filling.len() >= self.cap || self.complete_per_plan() {
            self.send()?;
        }
        Ok(())
    }

    /// [`OverlappedReducer::ready`] for a gradient on a GPU: into a
    /// page-locked bucket, or a device one when the communicator reduces on
    /// the device.
    fn ready_staged(&mut self, name: &str, grad: &Tensor, n: usize) -> Result<()> {
        // The host path's rule: a bucket closes before a gradient that would
        // take it past the cap (whatever the size of the buffer it reuses).
        if self.open.as_ref().is_some_and(|b| b.filled().saturating_add(n) > self.cap) {
            self.send()?;
        }
        // A spare of the size needed (a tensor larger than a bucket goes
        // alone, in a buffer of its own size), or a new one.
        let want = n.max(self.cap);
        let bucket = match &mut self.open {
            Some(b) => b,
            slot if self.comm.queues_on_device() => {
                let buf = match self.spare_device.iter().position(|b| b.0.numel() >= want) {
                    Some(i) => self.spare_device.swap_remove(i),
                    None => DeviceBucket(Tensor::empty(grad.device(), &[want], DType::F32)?),
                };
                slot.insert(Bucket::Device { buf, len: 0 })
            }
            slot => {
                let buf = match self.spare_pinned.iter().position(|b| b.len() >= want) {
                    Some(i) => self.spare_pinned.swap_remove(i),
                    None => PinnedBuffer::new(grad.device(), want)?,
                };
                slot.insert(Bucket::Pinned { buf, len: 0 })
            }
        };
        match bucket {
            Bucket::Pinned { buf, len } => {
                // No host wait: the copy runs on the second stream after the
                // ones before it from and into this buffer (the last step's
                // sums, this bucket's other gradients).
                // SAFETY: `out` is page-locked memory of the gradient's
                // device, for this copy only; the buffer keeps the copy's
                // mark, which the host's next access (the communication
                // thread's all-reduce) and dropping it wait for.
                let copied = unsafe {
                    let out = &mut buf.for_device_copy()[*len..*len + n];
                    grad.download_pinned(out)?
                };
                buf.copied(copied);
                *len += n;
            }
            // On the second stream, after the backward's work so far; the
            // bucket lives until the device's stream has joined it.
            Bucket::Device { buf, len } => {
                buf.0.copy_on_side(*len, grad, 0, n)?;
                *len += n;
            }
            Bucket::Host(_) => return Err(Error::invalid(OP, "a host bucket for a device gradient (internal error)")),
        }
        self.members.push((name.to_string(), n));
        if bucket.filled() >= self.cap || self.complete_per_plan() {
            self.send()?;
        }
        Ok(())
    }

    /// Whether the open bucket holds what the last step's bucket of its
    /// number held: it is complete (the next gradient would have closed it),
    /// so it goes now rather than after that gradient's kernels (DDP's
    /// buckets, fixed after the first iteration). Every rank runs the same
    /// steps, so every rank closes the same buckets.
    fn complete_per_plan(&self) -> bool {
        self.plan.get(self.sent.len()) == Some(&self.members)
    }

    /// Marks the end of the backward: the buckets sent so far were sent
    /// during it.
    pub fn end_backward(&mut self) {
        if !self.ended {
            self.ended = true;
            self.current.during_backward = self.sent.len();
        }
    }

    fn send(&mut self) -> Result<()> {
        if self.members.is_empty() {
            return Ok(());
        }
        let id = self.sent.len();
        match self.open.take() {
            Some(Bucket::Device { mut buf, len }) => {
                // Queued on the device (NCCL): no thread, no wait. The
                // bucket is kept either way (its memory outlives its work).
                let began = Instant::now();
                let queued = self.comm.all_reduce_queued(&mut buf.0, len);
                self.current.communication += began.elapsed().as_secs_f64();
                self.queued.push((id, Bucket::Device { buf, len }));
                self.sent.push(std::mem::take(&mut self.members));
                queued
            }
            open => {
                let jobs = self.jobs.as_ref().ok_or_else(|| Error::invalid(OP, "the communication thread is gone"))?;
                let data = open.unwrap_or_else(|| {
                    Bucket::Host(std::mem::replace(&mut self.filling, self.spare.pop().unwrap_or_default()))
                });
                jobs.send((id, data))
                    .map_err(|_| Error::invalid(OP, "the communication thread ended (it panicked)"))?;
                self.sent.push(std::mem::take(&mut self.members));
                Ok(())
            }
        }
    }

    /// Sends the last bucket, waits for every bucket of the step and writes
    /// each sum, times `scale`, into the tensor of its name in `grads`.
    /// Errors: a collective failed (the first error), a name handed in is
    /// not in `grads` or has changed size, a tensor of `grads` was not
    /// handed in (its gradient would stay this rank's own). The step is
    /// over either way.
    pub fn finish(&mut self, grads: &mut BTreeMap<&str, &mut Tensor>, scale: f32) -> Result<()> {
        self.end_backward();
        let r = self.finish_inner(grads, scale);
        self.last = std::mem::take(&mut self.current);
        self.filling.clear();
        if let Some(b) = self.open.take() {
            self.recycle(b);
        }
        for (_, b) in std::mem::take(&mut self.queued) {
            self.recycle(b);
        }
        self.members.clear();
        // The buckets of a step that succeeded are the next step's plan.
        self.plan = if r.is_ok() { std::mem::take(&mut self.sent) } else { Vec::new() };
        self.sent.clear();
        self.names.clear();
        self.ended = false;
        r
    }

    fn finish_inner(&mut self, grads: &mut BTreeMap<&str, &mut Tensor>, scale: f32) -> Result<()> {
        let began = Instant::now();
        let sent = self.send();
        let mut sums: Vec<Option<Bucket>> = (0..self.sent.len()).map(|_| None).collect();
        let mut first_err = sent.err();
        if !self.queued.is_empty() {
            // The device buckets' all-reduces, within their deadline.
            let began = Instant::now();
            if let Err(e) = self.comm.settle() {
                first_err.get_or_insert(e);
            }
            self.current.communication += began.elapsed().as_secs_f64();
            for (id, b) in std::mem::take(&mut self.queued) {
                sums[id] = Some(b);
            }
        }
        let threaded = sums.iter().filter(|b| b.is_none()).count();
        for _ in 0..threaded {
            // The collectives carry their own deadline; this one only guards
            // against a thread that died without answering.
            match self.done.recv_timeout(super::timeout() + Duration::from_secs(60)) {
                Ok((id, r, secs)) => {
                    self.current.communication += secs;
                    match r {
                        Ok(v) => sums[id] = Some(v),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                Err(_) => {
                    first_err.get_or_insert(Error::invalid(OP, "the communication thread stopped answering"));
                    break;
                }
            }
        }
        self.current.exposed = began.elapsed().as_secs_f64();
        self.current.buckets = self.sent.len();
        if let Some(e) = first_err {
            sums.into_iter().flatten().for_each(|b| self.recycle(b));
            return Err(e);
        }
        let mut done = 0usize;
        // Device buckets' copies back run on the second stream alone (a
        // page-locked bucket's upload makes the device's stream wait itself).
        let joins = sums.iter().flatten().any(|b| matches!(b, Bucket::Device { .. }));
        let sent = std::mem::take(&mut self.sent);
        let r = self.write_back(&sent, sums, grads, scale, &mut done);
        self.sent = sent;
        if let Some(dev) = self.device.as_ref().filter(|_| joins) {
            // The optimizer (on the device's stream) after the copies back.
            dev.join_side()?;
        }
        r?;
        if done != grads.len() {
            let missing = grads.keys().find(|k| !self.names.contains(**k));
            return Err(Error::invalid(
                OP,
                format!("gradient {} was not handed in: it would stay this rank's own", missing.unwrap_or(&"?")),
            ));
        }
        Ok(())
    }

    /// Writes each bucket's sum, times `scale`, into the gradients of its
    /// members, counting them in `done`; every bucket is recycled.
    fn write_back(
        &mut self,
        sent: &[Vec<(String, usize)>],
        sums: Vec<Option<Bucket>>,
        grads: &mut BTreeMap<&str, &mut Tensor>,
        scale: f32,
        done: &mut usize,
    ) -> Result<()> {
        let mut sums = sums.into_iter();
        for members in sent {
            let mut sum =
                sums.next().flatten().ok_or_else(|| Error::invalid(OP, "a bucket never came back (internal error)"))?;
            let r = Self::write_bucket(members, &mut sum, grads, scale, done);
            self.recycle(sum);
            r?;
        }
        Ok(())
    }

    /// One bucket's part of [`OverlappedReducer::write_back`].
    fn write_bucket(
        members: &[(String, usize)],
        sum: &mut Bucket,
        grads: &mut BTreeMap<&str, &mut Tensor>,
        scale: f32,
        done: &mut usize,
    ) -> Result<()> {
        if scale != 1.0 {
            match sum {
                // No scaling kernel here: through the host (the trainer
                // scales in its optimizer and passes 1).
                Bucket::Device { buf, len } => {
                    buf.0.device().join_side()?;
                    let mut v = buf.0.to_vec::<f32>()?;
                    v[..*len].iter_mut().for_each(|x| *x *= scale);
                    buf.0.copy_from_host(&v)?;
                }
                // Once a bucket (a page-locked one waits for its copies once).
                _ => sum.values_mut()?.iter_mut().for_each(|x| *x *= scale),
            }
        }
        let mut at = 0;
        for (name, n) in members {
            let t = grads
                .get_mut(name.as_str())
                .ok_or_else(|| Error::invalid(OP, format!("gradient {name} was reduced but has no tensor")))?;
            if t.numel() != *n {
                return Err(Error::invalid(OP, format!("gradient {name} changed size during the step")));
            }
            match &mut *sum {
                Bucket::Host(v) => t.copy_from_host(&v[at..at + n])?,
                // On the second stream, without a host wait; the device's
                // stream waits for it before the optimizer.
                Bucket::Pinned { buf, .. } => t.copy_from_pinned(buf, at, None)?,
                // On the second stream after the all-reduce; the device's
                // stream joins it at the end of `finish`.
                Bucket::Device { buf, .. } => t.copy_on_side(0, &buf.0, at, *n)?,
            }
            at += n;
            *done += 1;
        }
        Ok(())
    }

    /// Keeps a bucket's buffer for the next step.
    fn recycle(&mut self, bucket: Bucket) {
        match bucket {
            Bucket::Host(mut v) => {
                v.clear();
                self.spare.push(v);
            }
            Bucket::Pinned { buf, .. } => self.spare_pinned.push(buf),
            Bucket::Device { buf, .. } => self.spare_device.push(buf),
        }
    }
}

impl Drop for OverlappedReducer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current bucket.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
