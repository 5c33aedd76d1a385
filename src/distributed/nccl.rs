//! The NCCL back end: GPU ranks, collectives on the device's stream.
//!
//! libnccl is loaded at run time, as the driver is: the crate builds and
//! runs without it, and [`Nccl::available`] says whether it can be loaded.
//! A communicator is made from a unique id that rank 0 draws and every
//! rank receives: [`Nccl::over`] sends it over another communicator (MPI's,
//! which also launched the ranks); [`Nccl::single`] is the world of one.
//!
//! Each collective is enqueued on the device's stream and awaited with the
//! deadline of [`super::timeout`], polling the stream's progress and
//! NCCL's asynchronous error; on a timeout or an NCCL error the
//! communicator is aborted (ncclCommAbort) and spent. Host slices are
//! staged through device buffers; [`Communicator::all_reduce_tensors`] on
//! the device's own tensors reduces them in place, a bucket of tensors per
//! NCCL group. [`Communicator::all_reduce_queued`] (the overlapped
//! reducer's device buckets) queues an all-reduce on the device's second
//! stream without a wait; [`Communicator::settle`] and the next blocking
//! collective wait for it, with the same deadline.
//!
//! Status: compiled everywhere; not yet run (no GPU with NCCL has been lent
//! to this project). The W = 1 test in tests/distributed.rs runs it on a
//! GPU machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::result as nr;
use cudarc::nccl::sys as ns;

use super::{CollectiveStats, Communicator, Kind, ReduceOp};
use crate::error::{Error, Result};
use crate::runtime::device::Device;
use crate::runtime::tensor::{DType, Tensor};

/// An NCCL communicator on one GPU (see the module documentation).
pub struct Nccl {
    inner: Mutex<Inner>,
    device: Device,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

struct Inner {
    comm: ns::ncclComm_t,
    stats: CollectiveStats,
    spent: Option<String>,
    /// The end of the last all-reduce queued on the second stream and not
    /// yet waited for ([`Communicator::settle`]).
    queued: Option<CudaEvent>,
}

// SAFETY: the NCCL communicator handle is used by one thread at a time,
// under the Mutex.
unsafe impl Send for Inner {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl {{ rank: {}, world: {}, device: {} }}", self.rank, self.world, self.device)
    }
}

fn nccl_err(op: &'static str, rank: usize, world: usize, e: impl std::fmt::Debug) -> Error {
    Error::Collective { op, rank, world, message: format!("NCCL: {e:?}") }
}

impl Nccl {
    /// Whether libnccl can be loaded.
    pub fn available() -> bool {
        // SAFETY: only probes whether the library loads.
        unsafe { ns::is_culib_present() }
    }

    /// Why NCCL cannot be loaded, and what to do (for messages).
    pub fn missing_reason() -> &'static str {
        "libnccl cannot be loaded: the library is opened as libnccl.so (or libnccl.so.13), which NCCL's \
         development package and tarball provide; PyTorch's wheel (nvidia-nccl-cu13) and the runtime package \
         (libnccl2) ship libnccl.so.2 alone: link libnccl.so to it in a folder on LD_LIBRARY_PATH \
         (docs/distributed.md)"
    }

    fn require(op: &'static str, rank: usize, world: usize) -> Result<()> {
        if !Nccl::available() {
            return Err(Error::Collective { op, rank, world, message: Nccl::missing_reason().into() });
        }
        Ok(())
    }

    /// A fresh unique id (rank 0 draws it; every rank needs the same).
    pub fn unique_id() -> Result<[u8; 128]> {
        Nccl::require("Nccl::unique_id", 0, 0)?;
        let id = nr::get_uniqueid().map_err(|e| nccl_err("Nccl::unique_id", 0, 0, e))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Rank `rank` of `world` on `device` (a CUDA device), joining the
    /// communicator of `id`. Every rank calls it; it returns when all have.
    pub fn new(device: &Device, rank: usize, world: usize, id: &[u8; 128]) -> Result<Nccl> {
        const OP: &str = "Nccl::new";
        Nccl::require(OP, rank, world)?;
        let stream = device.cuda_stream().ok_or_else(|| Error::Collective {
            op: OP,
            rank,
            world,
            message: format!("NCCL runs on CUDA devices, not on {device}"),
        })?;
        if rank >= world || world > i32::MAX as usize {
            return Err(Error::Collective { op: OP, rank, world, message: "rank must be below world".into() });
        }
        stream.context().bind_to_thread().map_err(|e| Error::driver("Nccl::new", e))?;
        let uid = ns::ncclUniqueId { internal: id.map(|b| b as core::ffi::c_char) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read.
        let comm = unsafe {
            nr::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32)
                .map_err(|e| nccl_err(OP, rank, world, e))?;
            comm.assume_init()
        };
        Ok(Nccl {
            inner: Mutex::new(Inner { comm, stats: CollectiveStats::default(), spent: None, queued: None }),
            device: device.clone(),
            stream,
            rank,
            world,
            timeout: super::timeout(),
        })
    }

    /// The world of one on `device`.
    pub fn single(device: &Device) -> Result<Nccl> {
        Nccl::require("Nccl::single", 0, 1)?;
        Nccl::new(device, 0, 1, &Nccl::unique_id()?)
    }

    /// The ranks of `bootstrap` (MPI's, say), each on its `device`: rank 0's
    /// unique id is broadcast over `bootstrap`.
    pub fn over(device: &Device, bootstrap: &dyn Communicator) -> Result<Nccl> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        Nccl::require("Nccl::over", rank, world)?;
        let mut id = if rank == 0 { Nccl::unique_id()? } else { [0u8; 128] };
        bootstrap.broadcast_u8(&mut id, 0)?;
        Nccl::new(device, rank, world, &id)
    }

    /// Changes the deadline of each later collective.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn err(&self, op: &'static str, message: String) -> Error {
        Error::Collective { op, rank: self.rank, world: self.world, message }
    }

    /// Enqueues `f` on the stream and waits for it (see the module
    /// documentation), counting `count` on success.
    fn enqueue(
        &self,
        op: &'static str,
        kind: Kind,
        bytes: usize,
        f: impl FnOnce(ns::ncclComm_t, ns::cudaStream_t) -> std::result::Result<nr::NcclStatus, nr::NcclError>,
    ) -> Result<()> {
        let mut inner = self.inner.lock().map_err(|_| self.err(op, "the communicator's lock is poisoned".into()))?;
        if let Some(why) = &inner.spent {
            return Err(self.err(op, format!("the communicator is spent: {why}")));
        }
        // The all-reduces queued on the second stream first: one order of
        // the communicator's work on every rank, whatever NCCL does across
        // streams.
        if let Some(queued) = inner.queued.take() {
            self.await_done(&mut inner, op, &queued)?;
        }
        self.stream.context().bind_to_thread().map_err(|e| Error::driver(op, e))?;
        if let Err(e) = f(inner.comm, self.stream.cu_stream() as ns::cudaStream_t) {
            return Err(self.fail(&mut inner, op, format!("NCCL: {e:?}")));
        }
        let done = self.stream.record_event(None).map_err(|e| Error::driver(op, e))?;
        self.await_done(&mut inner, op, &done)?;
        inner.stats.add(kind, bytes);
        Ok(())
    }

    /// Waits for `done` within the deadline, polling NCCL's asynchronous
    /// error; a timeout or an error spends the communicator.
    fn await_done(&self, inner: &mut Inner, op: &'static str, done: &CudaEvent) -> Result<()> {
        // (The event queries want the context current on this thread.)
        self.stream.context().bind_to_thread().map_err(|e| Error::driver(op, e))?;
        let comm = inner.comm;
        let mut failed = None;
        let timed_out = super::await_deadline(self.timeout, || {
            if done.try_is_complete().map_err(|e| Error::driver(op, e))? {
                return Ok(true);
            }
            let mut state = ns::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `state` is written by NCCL.
            let _ = unsafe { ns::ncclCommGetAsyncError(comm, &mut state) };
            if !matches!(state, ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress) {
                failed = Some(format!("NCCL reported {state:?}"));
                return Ok(true);
            }
            Ok(false)
        })?;
        match failed.or(timed_out) {
            Some(why) => Err(self.fail(inner, op, why)),
            None => Ok(()),
        }
    }

    /// Aborts the communicator (its pending work with it) and marks it spent.
    fn fail(&self, inner: &mut Inner, op: &'static str, why: String) -> Error {
        if inner.spent.is_none() {
            // SAFETY: a live communicator, aborted once.
            let _ = unsafe { nr::comm_abort(inner.comm) };
            inner.spent = Some(format!("{op} {why}"));
        }
        self.err(op, why)
    }

    /// Stages `bytes` into a device buffer of at least `capacity` bytes
    /// (whole u32 words; zeros after the data).
    fn stage(&self, bytes: &[u8], capacity: usize) -> Result<Tensor> {
        let words = capacity.max(bytes.len()).div_ceil(4).max(1);
        let mut host = vec![0u32; words];
        bytemuck::cast_slice_mut::<u32, u8>(&mut host)[..bytes.len()].copy_from_slice(bytes);
        Tensor::from_slice(&self.device, &[words], &host)
    }

    /// The first `out.len()` bytes of a staging buffer, into `out`.
    fn unstage(buf: &Tensor, out: &mut [u8]) -> Result<()> {
        let words = buf.to_vec::<u32>()?;
        out.copy_from_slice(&bytemuck::cast_slice::<u32, u8>(&words)[..out.len()]);
        Ok(())
    }

    fn addr(&self, t: &Tensor, op: &'static str) -> Result<*mut core::ffi::c_void> {
        t.device_addr()
            .map(|a| a as usize as *mut core::ffi::c_void)
            .ok_or_else(|| self.err(op, "a buffer off the device".into()))
    }

    /// Whether every tensor is f32 on this communicator's device (else a
    /// collective of tensors goes through the host).
    fn on_device_f32(&self, tensors: &[&Tensor]) -> bool {
        tensors.iter().all(|t| t.device() == &self.device && t.dtype() == DType::F32)
    }

    /// The addresses of `send` and `recv` for a collective whose larger
    /// side (`total` elements) is the world's blocks of `n`; None when
    /// there is nothing to move.
    fn block_pair(
        &self,
        op: &'static str,
        send: &Tensor,
        recv: &Tensor,
        n: usize,
        total: usize,
    ) -> Result<Option<(*mut core::ffi::c_void, *mut core::ffi::c_void)>> {
        super::check_blocks(op, n, total, self.rank, self.world)?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some((self.addr(send, op)?, self.addr(recv, op)?)))
    }

    fn all_reduce_slice<T: bytemuck::Pod>(&self, data: &mut [T], op: ReduceOp, dt: ns::ncclDataType_t) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(data);
        let buf = self.stage(bytes, bytes.len())?;
        let p = self.addr(&buf, "all_reduce")?;
        let (n, size) = (bytes.len() / std::mem::size_of::<T>(), bytes.len());
        let red = reduce_op(op);
        // SAFETY: `p` addresses n elements of `dt` on this device.
        self.enqueue("all_reduce", Kind::AllReduce, size, |c, s| unsafe { nr::all_reduce(p, p, n, dt, red, c, s) })?;
        Nccl::unstage(&buf, bytes)
    }

    fn all_gather_slice<T: bytemuck::Pod>(&self, mine: &[T], all: &mut [T], dt: ns::ncclDataType_t) -> Result<()> {
        super::check_blocks("all_gather", mine.len(), all.len(), self.rank, self.world)?;
        if mine.is_empty() {
            return Ok(());
        }
        let out: &mut [u8] = bytemuck::cast_slice_mut(all);
        let send = self.stage(bytemuck::cast_slice(mine), 0)?;
        let recv = self.stage(&[], out.len())?;
        let (s_ptr, r_ptr) = (self.addr(&send, "all_gather")?, self.addr(&recv, "all_gather")?);
        let (n, size) = (mine.len(), std::mem::size_of_val(mine));
        // SAFETY: n elements sent, world · n received, on this device.
        self.enqueue("all_gather", Kind::AllGather, size, |c, s| unsafe { nr::all_gather(s_ptr, r_ptr, n, dt, c, s) })?;
        Nccl::unstage(&recv, out)
    }
}

fn reduce_op(op: ReduceOp) -> ns::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ns::ncclRedOp_t::ncclSum,
        ReduceOp::Max => ns::ncclRedOp_t::ncclMax,
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.get_mut() {
            if inner.spent.is_none() {
                // SAFETY: a live communicator, destroyed once (an aborted
                // one is already gone).
                let _ = unsafe { nr::comm_destroy(inner.comm) };
            }
        }
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn stats(&self) -> CollectiveStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }
    fn all_reduce_f32(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce_slice(data, op, ns::ncclDataType_t::ncclFloat32)
    }
    fn all_reduce_f64(&self, data: &mut [f64], op: ReduceOp) -> Result<()> {
        self.all_reduce_slice(data, op, ns::ncclDataType_t::ncclFloat64)
    }
    fn all_gather_f32(&self, mine: &[f32], all: &mut [f32]) -> Result<()> {
        self.all_gather_slice(mine, all, ns::ncclDataType_t::ncclFloat32)
    }
    fn all_gather_u32(&self, mine: &[u32], all: &mut [u32]) -> Result<()> {
        self.all_gather_slice(mine, all, ns::ncclDataType_t::ncclUint32)
    }
    fn all_gather_u64(&self, mine: &[u64], all: &mut [u64]) -> Result<()> {
        self.all_gather_slice(mine, all, ns::ncclDataType_t::ncclUint64)
    }
    fn broadcast_u8(&self, data: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.err("broadcast", format!("root {root} is not a rank of {}", self.world)));
        }
        if data.is_empty() {
            return Ok(());
        }
        let buf = self.stage(data, data.len())?;
        let p = self.addr(&buf, "broadcast")?;
        let (n, size) = (data.len(), data.len());
        // SAFETY: n bytes on this device, in place.
        self.enqueue("broadcast", Kind::Broadcast, size, |c, s| unsafe {
            nr::broadcast(p, p, n, ns::ncclDataType_t::ncclUint8, root as i32, c, s)
        })?;
        Nccl::unstage(&buf, data)
    }
    fn reduce_scatter_f32(&self, data: &[f32], mine: &mut [f32]) -> Result<()> {
        super::check_blocks("reduce_scatter", mine.len(), data.len(), self.rank, self.world)?;
        if mine.is_empty() {
            return Ok(());
        }
        let send = self.stage(bytemuck::cast_slice(data), 0)?;
        let recv = self.stage(&[], 4 * mine.len())?;
        let (s_ptr, r_ptr) = (self.addr(&send, "reduce_scatter")?, self.addr(&recv, "reduce_scatter")?);
        let (n, size) = (mine.len(), 4 * data.len());
        // SAFETY: world · n elements sent, n received, on this device.
        self.enqueue("reduce_scatter", Kind::ReduceScatter, size, |c, s| unsafe {
            nr::reduce_scatter(s_ptr, r_ptr, n, ns::ncclDataType_t::ncclFloat32, ns::ncclRedOp_t::ncclSum, c, s)
        })?;
        Nccl::unstage(&recv, bytemuck::cast_slice_mut(mine))
    }
    fn abort(&self, code: i32) -> ! {
        if let Ok(mut inner) = self.inner.lock() {
            let _ = self.fail(&mut inner, "abort", "aborted".into());
        }
        std::process::exit(code)
    }
    fn all_gather_tensor(&self, mine: &Tensor, all: &mut Tensor) -> Result<()> {
        const OP: &str = "all_gather_tensor";
        if !self.on_device_f32(&[mine, all]) {
            return super::staged_all_gather(self, mine, all);
        }
        let n = mine.numel();
        let Some((s_ptr, r_ptr)) = self.block_pair(OP, mine, all, n, all.numel())? else { return Ok(()) };
        // SAFETY: n f32 sent, world · n received (checked above), both
        // tensors of this device, on its stream.
        self.enqueue(OP, Kind::AllGather, 4 * n, |c, s| unsafe {
            nr::all_gather(s_ptr, r_ptr, n, ns::ncclDataType_t::ncclFloat32, c, s)
        })
    }
    fn reduce_scatter_tensor(&self, data: &Tensor, mine: &mut Tensor) -> Result<()> {
        const OP: &str = "reduce_scatter_tensor";
        if !self.on_device_f32(&[data, mine]) {
            return super::staged_reduce_scatter(self, data, mine);
        }
        let n = mine.numel();
        let Some((s_ptr, r_ptr)) = self.block_pair(OP, data, mine, n, data.numel())? else { return Ok(()) };
        // SAFETY: world · n f32 sent, n received (checked above), both
        // tensors of this device, on its stream.
        self.enqueue(OP, Kind::ReduceScatter, 4 * data.numel(), |c, s| unsafe {
            nr::reduce_scatter(s_ptr, r_ptr, n, ns::ncclDataType_t::ncclFloat32, ns::ncclRedOp_t::ncclSum, c, s)
        })
    }
    fn queues_on_device(&self) -> bool {
        true
    }
    fn all_reduce_queued(&self, data: &mut Tensor, len: usize) -> Result<()> {
        const OP: &str = "all_reduce_queued";
        if !self.on_device_f32(&[data]) || len > data.numel() {
            return Err(self.err(
                OP,
                format!(
                    "{len} f32 values on {} wanted; got {} {:?} values on {}",
                    self.device,
                    data.numel(),
                    data.dtype(),
                    data.device()
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let p = self.addr(data, OP)?;
        let mut inner = self.inner.lock().map_err(|_| self.err(OP, "the communicator's lock is poisoned".into()))?;
        if let Some(why) = &inner.spent {
            return Err(self.err(OP, format!("the communicator is spent: {why}")));
        }
        let side = self.device.side_stream()?.ok_or_else(|| self.err(OP, "no second stream".into()))?;
        let s = side.cu_stream() as ns::cudaStream_t;
        // SAFETY: `p` addresses at least `len` f32 values on this device
        // (checked above), reduced in place; the caller keeps the tensor
        // alive until the device's stream has joined the second one.
        if let Err(e) = unsafe {
            nr::all_reduce(p, p, len, ns::ncclDataType_t::ncclFloat32, ns::ncclRedOp_t::ncclSum, inner.comm, s)
        } {
            return Err(self.fail(&mut inner, OP, format!("NCCL: {e:?}")));
        }
        inner.queued = Some(side.record_event(None).map_err(|e| Error::driver(OP, e))?);
        inner.stats.add(Kind::AllReduce, 4 * len);
        Ok(())
    }
    fn settle(&self) -> Result<()> {
        const OP: &str = "settle";
        let mut inner = self.inner.lock().map_err(|_| self.err(OP, "the communicator's lock is poisoned".into()))?;
        match inner.queued.take() {
            Some(done) => self.await_done(&mut inner, OP, &done),
            None => Ok(()),
        }
    }
    fn all_reduce_tensors(&self, tensors: &mut [&mut Tensor], scale: f32, bucket_bytes: usize) -> Result<()> {
        const OP: &str = "all_reduce_tensors";
        let on_device = tensors.iter().all(|t| self.on_device_f32(&[&**t]));
        if scale != 1.0 || !on_device {
            // No device scaling kernel here: staged through the host.
            return super::bucketed_all_reduce(self, tensors, scale, bucket_bytes);
        }
        let sizes: Vec<usize> = tensors.iter().map(|t| t.numel()).collect();
        for range in super::buckets(&sizes, bucket_bytes) {
            let mut ptrs = Vec::with_capacity(range.len());
            for t in &tensors[range.clone()] {
                ptrs.push((self.addr(t, OP)?, t.numel()));
            }
            let bytes: usize = ptrs.iter().map(|&(_, n)| 4 * n).sum();
            // SAFETY: each pointer addresses its tensor's f32 elements on
            // this device, reduced in place; the group runs them as one.
            self.enqueue(OP, Kind::AllReduce, bytes, |c, s| unsafe {
                nr::group_start()?;
                for &(p, n) in &ptrs {
                    nr::all_reduce(p, p, n, ns::ncclDataType_t::ncclFloat32, ns::ncclRedOp_t::ncclSum, c, s)?;
                }
                nr::group_end()
            })?;
        }
        Ok(())
    }
}
