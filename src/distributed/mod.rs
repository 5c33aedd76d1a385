//! Collectives across ranks: the layer data-parallel training stands on.
//!
//! A [`Communicator`] is one rank's handle on a group of `world` ranks. Its
//! collectives are those training needs — all-reduce (sum, max),
//! all-gather, broadcast, reduce-scatter — over host slices, and over
//! [`Tensor`]s through [`Communicator::all_reduce_tensors`] (gradients in
//! buckets). The back ends are existing engines, not a transport of our
//! own:
//! - [`SingleProcess`]: the world of one (every collective is the
//!   identity; the trainer without a launcher);
//! - `Mpi` (cargo feature `mpi`, the `mpi` crate over the system's MPI,
//!   Open MPI or MPICH): CPU ranks, and the launcher (`mpirun -np W
//!   gif-fr train …`); device tensors are staged through the host;
//! - [`Nccl`] (cudarc's NCCL bindings, libnccl loaded at run time like the
//!   driver): GPU ranks, the gradients reduced on the device (in place
//!   after the backward, or in device buckets on a second stream while it
//!   runs); its unique id travels over MPI ([`Nccl::over`]). Compiled
//!   everywhere, not yet run on a GPU.
//!
//! Every collective has a deadline ([`timeout`]: `GIF_FR_COLLECTIVE_TIMEOUT`
//! seconds, 600 by default, as PyTorch's NCCL process groups wait 10
//! minutes): a rank that died, hangs or called a different collective
//! makes the others return [`Error::Collective`] instead of waiting
//! forever. After a timeout the communicator is spent (every later call
//! fails at once): the transport may still hold the buffers of the
//! collective that never finished.
//!
//! [`Communicator::stats`] counts the bytes each kind of collective moved
//! from this rank: docs/distributed.md's cost model is checked against
//! them.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::runtime::tensor::{DType, Tensor};

pub mod cost;
pub mod model_parallel;
#[cfg(feature = "mpi")]
mod mpi;
mod nccl;
pub mod overlap;
pub use self::model_parallel::{shard_range, shard_seed, ModelParallelHead, ModelParallelStep};
#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
pub use self::nccl::Nccl;
pub use self::overlap::{OverlapStats, OverlappedReducer};

/// The reduction of an all-reduce or reduce-scatter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise maximum.
    Max,
}

/// Collectives this rank took part in, and the bytes it contributed to
/// each kind (its send buffer's size: an all-reduce of n f32 counts 4n,
/// an all-gather 4n of its own n, a broadcast the buffer on every rank).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectiveStats {
    /// All-reduce calls.
    pub all_reduces: u64,
    /// Bytes all-reduced.
    pub all_reduce_bytes: u64,
    /// All-gather calls.
    pub all_gathers: u64,
    /// Bytes this rank contributed to all-gathers.
    pub all_gather_bytes: u64,
    /// Broadcast calls.
    pub broadcasts: u64,
    /// Bytes broadcast.
    pub broadcast_bytes: u64,
    /// Reduce-scatter calls.
    pub reduce_scatters: u64,
    /// Bytes this rank sent into reduce-scatters (the whole input).
    pub reduce_scatter_bytes: u64,
}

/// A kind of collective, for [`CollectiveStats::add`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// All-reduce.
    AllReduce,
    /// All-gather.
    AllGather,
    /// Broadcast.
    Broadcast,
    /// Reduce-scatter.
    ReduceScatter,
}

impl CollectiveStats {
    /// Counts one collective of `kind` that took `bytes` from this rank.
    pub fn add(&mut self, kind: Kind, bytes: usize) {
        let b = bytes as u64;
        let (calls, total) = match kind {
            Kind::AllReduce => (&mut self.all_reduces, &mut self.all_reduce_bytes),
            Kind::AllGather => (&mut self.all_gathers, &mut self.all_gather_bytes),
            Kind::Broadcast => (&mut self.broadcasts, &mut self.broadcast_bytes),
            Kind::ReduceScatter => (&mut self.reduce_scatters, &mut self.reduce_scatter_bytes),
        };
        *calls += 1;
        *total += b;
    }
}

/// The sizes of an all-gather (`mine` from each of `world` ranks into
/// `all`) or a reduce-scatter (`all` summed, `mine` kept), or why not.
pub(crate) fn check_blocks(op: &'static str, mine: usize, all: usize, rank: usize, world: usize) -> Result<()> {
    if mine.checked_mul(world) != Some(all) {
        return Err(Error::Collective {
            op,
            rank,
            world,
            message: format!("{all} elements are not {world} ranks' blocks of {mine}"),
        });
    }
    Ok(())
}

/// Polls `done` until it says true or `timeout` passes: spinning (the
/// transport progresses inside the poll) for 100 ms, then napping 1 ms
/// between polls so a rank far behind costs no core. Ok(None) when done,
/// Ok(Some(message)) on a timeout.
pub(crate) fn await_deadline(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Option<String>> {
    let began = std::time::Instant::now();
    loop {
        if done()? {
            return Ok(None);
        }
        let waited = began.elapsed();
        if waited > timeout {
            return Ok(Some(format!(
                "timed out after {:.1} s (GIF_FR_COLLECTIVE_TIMEOUT): a rank died, hangs or called another collective",
                waited.as_secs_f64()
            )));
        }
        if waited < Duration::from_millis(100) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The default bucket of [`Communicator::all_reduce_tensors`]: 16 MiB, the
/// `bucket_cap_mb` insightface's arcface_torch gives PyTorch's DDP.
pub const BUCKET_BYTES: usize = 16 << 20;

/// The deadline of one collective: `GIF_FR_COLLECTIVE_TIMEOUT` (seconds,
/// a positive number) when set, else 600 s.
pub fn timeout() -> Duration {
    std::env::var("GIF_FR_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(600), Duration::from_secs_f64)
}

/// One rank's handle on a group of ranks (see the module documentation).
/// Every method is a collective: all ranks call it, in the same order,
/// with matching sizes.
pub trait Communicator: Send + Sync {
    /// This rank, in `0..world`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// "single", "mpi" or "nccl".
    fn backend(&self) -> &'static str;
    /// The counts so far.
    fn stats(&self) -> CollectiveStats;

    /// `data` ← the elementwise reduction of every rank's `data`.
    fn all_reduce_f32(&self, data: &mut [f32], op: ReduceOp) -> Result<()>;
    /// [`Communicator::all_reduce_f32`] in f64.
    fn all_reduce_f64(&self, data: &mut [f64], op: ReduceOp) -> Result<()>;
    /// `all[r·n .. (r+1)·n]` ← rank r's `mine` (n = `mine.len()`, equal on
    /// every rank; `all.len()` = world · n).
    fn all_gather_f32(&self, mine: &[f32], all: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_gather_f32`] of u32 (labels).
    fn all_gather_u32(&self, mine: &[u32], all: &mut [u32]) -> Result<()>;
    /// [`Communicator::all_gather_f32`] of u64 (fingerprints, counts).
    fn all_gather_u64(&self, mine: &[u64], all: &mut [u64]) -> Result<()>;
    /// `data` ← rank `root`'s `data`.
    fn broadcast_u8(&self, data: &mut [u8], root: usize) -> Result<()>;
    /// `mine` ← block `rank` of the elementwise sum of every rank's `data`
    /// (`data.len()` = world · `mine.len()`).
    fn reduce_scatter_f32(&self, data: &[f32], mine: &mut [f32]) -> Result<()>;

    /// Ends every rank's process with `code`: MPI_Abort, or this process's
    /// exit in the world of one. For an error one rank cannot recover from
    /// while the others would wait for it in their next collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    /// All-reduces f32 tensors (sum, or sum then times `scale`), packed
    /// into buckets of at most `bucket_bytes` (a tensor larger than a
    /// bucket goes alone), staged through the host unless they live there.
    /// Fewer, larger messages: what DDP's buckets are for.
    fn all_reduce_tensors(&self, tensors: &mut [&mut Tensor], scale: f32, bucket_bytes: usize) -> Result<()> {
        bucketed_all_reduce(self, tensors, scale, bucket_bytes)
    }

    /// [`Communicator::all_gather_f32`] of tensors: `all` (f32, `[W · n]`
    /// elements in any shape) ← every rank's `mine` (n elements, f32 or
    /// 16-bit, taken as f32), rank r's at `r · n`. NCCL gathers f32 device
    /// tensors on the device's stream; the default stages through the host.
    fn all_gather_tensor(&self, mine: &Tensor, all: &mut Tensor) -> Result<()> {
        staged_all_gather(self, mine, all)
    }

    /// [`Communicator::reduce_scatter_f32`] of tensors: `mine` (f32, n
    /// elements) ← block `rank` of the sum of every rank's `data` (f32,
    /// W · n elements). NCCL reduces device tensors on the device's stream;
    /// the default stages through the host.
    fn reduce_scatter_tensor(&self, data: &Tensor, mine: &mut Tensor) -> Result<()> {
        staged_reduce_scatter(self, data, mine)
    }

    /// Whether [`Communicator::all_reduce_queued`] runs on the device
    /// without a host wait (NCCL): the [`OverlappedReducer`] then keeps its
    /// buckets in device memory instead of page-locked host memory.
    fn queues_on_device(&self) -> bool {
        false
    }

    /// Sums the first `len` values of `data` (f32, on a GPU or the
    /// simulator) over the ranks, in place, on the device's second stream
    /// after the work queued so far on either stream. NCCL queues it there
    /// and returns; [`Communicator::settle`] waits for it. The default
    /// stages it through the host and waits: the device's stream joins the
    /// second one, the values come down, are all-reduced and go back up.
    fn all_reduce_queued(&self, data: &mut Tensor, len: usize) -> Result<()> {
        const OP: &str = "all_reduce_queued";
        if data.dtype() != DType::F32 || len > data.numel() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("at least {len} F32 elements"),
                got: format!("{} {:?} elements", data.numel(), data.dtype()),
            });
        }
        if len == 0 {
            return Ok(());
        }
        data.device().join_side()?;
        let mut v = data.to_vec::<f32>()?;
        self.all_reduce_f32(&mut v[..len], ReduceOp::Sum)?;
        data.copy_from_host(&v)
    }

    /// Waits, within the collectives' deadline, for the all-reduces that
    /// [`Communicator::all_reduce_queued`] left running; a timeout or a
    /// failure of any of them is its error (and spends the communicator).
    fn settle(&self) -> Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for dyn Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rank {} of {}", self.backend(), self.rank(), self.world())
    }
}

/// The world of one rank: every collective copies its input to its output.
#[derive(Debug, Default)]
pub struct SingleProcess {
    stats: std::sync::Mutex<CollectiveStats>,
}

impl SingleProcess {
    /// The world of one.
    pub fn new() -> SingleProcess {
        SingleProcess::default()
    }
    fn count(&self, kind: Kind, bytes: usize) {
        if let Ok(mut s) = self.stats.lock() {
            s.add(kind, bytes)
        }
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn stats(&self) -> CollectiveStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
    fn all_reduce_f32(&self, data: &mut [f32], _: ReduceOp) -> Result<()> {
        self.count(Kind::AllReduce, std::mem::size_of_val(data));
        Ok(())
    }
    fn all_reduce_f64(&self, data: &mut [f64], _: ReduceOp) -> Result<()> {
        self.count(Kind::AllReduce, std::mem::size_of_val(data));
        Ok(())
    }
    fn all_gather_f32(&self, mine: &[f32], all: &mut [f32]) -> Result<()> {
        self.gather(mine, all)
    }
    fn all_gather_u32(&self, mine: &[u32], all: &mut [u32]) -> Result<()> {
        self.gather(mine, all)
    }
    fn all_gather_u64(&self, mine: &[u64], all: &mut [u64]) -> Result<()> {
        self.gather(mine, all)
    }
    fn broadcast_u8(&self, data: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Collective {
                op: "broadcast",
                rank: 0,
                world: 1,
                message: format!("root {root} is not a rank"),
            });
        }
        self.count(Kind::Broadcast, data.len());
        Ok(())
    }
    fn reduce_scatter_f32(&self, data: &[f32], mine: &mut [f32]) -> Result<()> {
        check_blocks("reduce_scatter", mine.len(), data.len(), 0, 1)?;
        mine.copy_from_slice(data);
        self.count(Kind::ReduceScatter, std::mem::size_of_val(data));
        Ok(())
    }
}

impl SingleProcess {
    fn gather<T: Copy>(&self, mine: &[T], all: &mut [T]) -> Result<()> {
        check_blocks("all_gather", mine.len(), all.len(), 0, 1)?;
        all.copy_from_slice(mine);
        self.count(Kind::AllGather, std::mem::size_of_val(mine));
        Ok(())
    }
}

/// The buckets of [`Communicator::all_reduce_tensors`]: consecutive
/// tensors, at most `bucket_bytes` of f32 each (one tensor at least).
pub fn buckets(sizes: &[usize], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let cap = (bucket_bytes / 4).max(1);
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0usize);
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled.saturating_add(n) > cap {
            out.push(start..i);
            (start, filled) = (i, 0);
        }
        filled = filled.saturating_add(n);
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

fn bucketed_all_reduce<C: Communicator + ?Sized>(
    comm: &C,
    tensors: &mut [&mut Tensor],
    scale: f32,
    bucket_bytes: usize,
) -> Result<()> {
    const OP: &str = "all_reduce_tensors";
    if let Some(t) = tensors.iter().find(|t| t.dtype() != DType::F32) {
        return Err(Error::DType { op: OP, expected: DType::F32, got: t.dtype() });
    }
    let sizes: Vec<usize> = tensors.iter().map(|t| t.numel()).collect();
    let mut staging: Vec<f32> = Vec::new();
    for range in buckets(&sizes, bucket_bytes) {
        let total = sizes[range.clone()].iter().try_fold(0usize, |a, &n| a.checked_add(n));
        let total = total.ok_or_else(|| Error::invalid(OP, "bucket size overflows"))?;
        staging.clear();
        staging.try_reserve(total).map_err(|_| Error::OutOfMemory {
            op: OP,
            what: "the all-reduce's staging bucket".into(),
            bytes: total.saturating_mul(4),
            free: None,
        })?;
        for t in &tensors[range.clone()] {
            staging.extend_from_slice(&t.host_f32()?);
        }
        comm.all_reduce_f32(&mut staging, ReduceOp::Sum)?;
        if scale != 1.0 {
            staging.iter_mut().for_each(|x| *x *= scale);
        }
        let mut at = 0;
        for t in &mut tensors[range] {
            let n = t.numel();
            t.copy_from_host(&staging[at..at + n])?;
            at += n;
        }
    }
    Ok(())
}

/// The default [`Communicator::all_gather_tensor`]: through the host.
pub(crate) fn staged_all_gather<C: Communicator + ?Sized>(comm: &C, mine: &Tensor, all: &mut Tensor) -> Result<()> {
    if all.dtype() != DType::F32 {
        return Err(Error::DType { op: "all_gather_tensor", expected: DType::F32, got: all.dtype() });
    }
    check_blocks("all_gather_tensor", mine.numel(), all.numel(), comm.rank(), comm.world())?;
    let mut v = vec![0f32; all.numel()];
    comm.all_gather_f32(&mine.host_f32()?, &mut v)?;
    all.copy_from_host(&v)
}

/// The default [`Communicator::reduce_scatter_tensor`]: through the host.
pub(crate) fn staged_reduce_scatter<C: Communicator + ?Sized>(
    comm: &C,
    data: &Tensor,
    mine: &mut Tensor,
) -> Result<()> {
    if let Some(t) = [data.dtype(), mine.dtype()].into_iter().find(|&t| t != DType::F32) {
        return Err(Error::DType { op: "reduce_scatter_tensor", expected: DType::F32, got: t });
    }
    check_blocks("reduce_scatter_tensor", mine.numel(), data.numel(), comm.rank(), comm.world())?;
    let mut v = vec![0f32; mine.numel()];
    comm.reduce_scatter_f32(&data.host_f32()?, &mut v)?;
    mine.copy_from_host(&v)
}

/// FNV-1a of `bytes`: a fingerprint that is the same in every process.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// Checks every rank holds the same `what` (its fingerprint): one
/// all-gather, so every rank sees every value and all of them return the
/// same verdict. Errors on every rank: the ranks whose value differs from
/// rank 0's.
pub fn check_same(comm: &dyn Communicator, what: &str, value: u64) -> Result<()> {
    let w = comm.world();
    let mut all = vec![0u64; w];
    comm.all_gather_u64(&[value], &mut all)?;
    let differ: Vec<usize> = (1..w).filter(|&r| all[r] != all[0]).collect();
    if !differ.is_empty() {
        return Err(Error::Collective {
            op: "check_same",
            rank: comm.rank(),
            world: w,
            message: format!("{what} differs between rank 0 and rank(s) {differ:?}: every rank must run the same"),
        });
    }
    Ok(())
}

/// Every tensor ← rank `root`'s (f32 or bf16; staged through the host),
/// packed into one broadcast: the parameters DDP broadcasts from rank 0
/// when it wraps a model.
pub fn broadcast_tensors(comm: &dyn Communicator, tensors: &mut [&mut Tensor], root: usize) -> Result<()> {
    const OP: &str = "broadcast_tensors";
    let mut bytes = Vec::new();
    for t in tensors.iter() {
        match t.dtype() {
            DType::F32 => bytes.extend_from_slice(bytemuck::cast_slice(&t.to_vec::<f32>()?)),
            DType::BF16 => bytes.extend_from_slice(bytemuck::cast_slice(&t.to_vec::<half::bf16>()?)),
            other => return Err(Error::invalid(OP, format!("dtype {other:?} is not broadcast"))),
        }
    }
    comm.broadcast_u8(&mut bytes, root)?;
    let mut at = 0;
    for t in tensors.iter_mut() {
        let n = t.numel() * t.dtype().size();
        let part = &bytes[at..at + n];
        match t.dtype() {
            DType::F32 => t.copy_from_host(&bytemuck::pod_collect_to_vec::<u8, f32>(part))?,
            _ => t.copy_from_host(&bytemuck::pod_collect_to_vec::<u8, half::bf16>(part))?,
        }
        at += n;
    }
    Ok(())
}

/// How this process was launched: a rank of an MPI job (`mpirun`, `srun`
/// with PMI) when the launcher's variables say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// This rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// This rank's index among the ranks on its machine (its GPU).
    pub local_rank: usize,
}

/// The launcher's view of this process from its environment (Open MPI's
/// `OMPI_COMM_WORLD_*`, PMI's `PMI_RANK`/`PMI_SIZE`, Slurm's
/// `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`); None when none is set.
pub fn launch_from_env() -> Option<Launch> {
    let get = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    let pick = |keys: &[&str]| keys.iter().find_map(|k| get(k));
    let world = pick(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"])?;
    let rank = pick(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"]).unwrap_or(0);
    let local_rank = pick(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]).unwrap_or(0);
    (world > 0 && rank < world).then_some(Launch { rank, world, local_rank })
}

/// The communicator this process should use: MPI's world when launched by
/// an MPI launcher with more than one rank (built with the `mpi` feature),
/// else the world of one. Errors: launched as one of W > 1 ranks by a
/// build without the `mpi` feature (each rank would train alone on its
/// shard, silently), or MPI failing to start.
pub fn from_env() -> Result<Box<dyn Communicator>> {
    match launch_from_env() {
        Some(l) if l.world > 1 => {
            #[cfg(feature = "mpi")]
            {
                Ok(Box::new(Mpi::init()?))
            }
            #[cfg(not(feature = "mpi"))]
            {
                Err(Error::Collective {
                    op: "launch",
                    rank: l.rank,
                    world: l.world,
                    message: "launched as one of several MPI ranks, but this gif-fr was built without the `mpi` \
                              feature (cargo build --features mpi, with Open MPI or MPICH installed)"
                        .into(),
                })
            }
        }
        _ => Ok(Box::new(SingleProcess::new())),
    }
}
