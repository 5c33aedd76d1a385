//! The MPI back end (cargo feature `mpi`): the `mpi` crate over the
//! system's MPI library.
//!
//! Every collective is MPI's non-blocking one (MPI_Iallreduce, …) on
//! buffers the communicator owns, completed by polling MPI_Test until done
//! or past the deadline ([`super::timeout`]): a blocking MPI call would
//! wait forever for a rank that died. On a timeout the pending buffers are
//! left to MPI (leaked, never freed while MPI may write them), the
//! communicator is spent, and dropping it aborts the MPI job (MPI_Abort)
//! after printing why, since MPI_Finalize would wait for the missing rank.

use std::sync::Mutex;
use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use mpi::Threading;

use super::{CollectiveStats, Communicator, Kind, ReduceOp};
use crate::error::{Error, Result};

/// MPI's world communicator (see the module documentation).
pub struct Mpi {
    inner: Mutex<Inner>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

struct Inner {
    comm: SimpleCommunicator,
    /// Finalizes MPI when dropped (after `comm`).
    universe: Option<Universe>,
    stats: CollectiveStats,
    /// Why the communicator is spent (a collective timed out).
    spent: Option<String>,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED (any thread, one at
// a time) and every MPI call goes through the Mutex around `Inner`.
unsafe impl Send for Inner {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi {{ rank: {}, world: {} }}", self.rank, self.world)
    }
}

impl Mpi {
    /// Initializes MPI (once per process) and returns its world. Errors:
    /// MPI already initialized in this process, or without the
    /// thread-support level the communicator needs (serialized).
    pub fn init() -> Result<Mpi> {
        let fail = |m: String| Error::Collective { op: "Mpi::init", rank: 0, world: 0, message: m };
        if mpi::environment::is_initialized() {
            return Err(fail("MPI is already initialized in this process (one Mpi per process)".into()));
        }
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| fail("MPI_Init_thread failed".into()))?;
        if level < Threading::Serialized {
            return Err(fail(format!("the MPI library offers thread support {level:?}; serialized is needed")));
        }
        let comm = universe.world();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        Ok(Mpi {
            inner: Mutex::new(Inner { comm, universe: Some(universe), stats: CollectiveStats::default(), spent: None }),
            rank,
            world,
            timeout: super::timeout(),
        })
    }

    /// Changes the deadline of each later collective.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn err(&self, op: &'static str, message: String) -> Error {
        Error::Collective { op, rank: self.rank, world: self.world, message }
    }

    /// Runs one non-blocking collective on owned copies: `send` is copied
    /// into a buffer MPI reads, the result comes back in a buffer of
    /// `recv_len` elements.
    fn run<T>(&self, op: &'static str, kind: Kind, send: &[T], recv_len: usize, start: StartFn<T>) -> Result<Vec<T>>
    where
        T: Equivalence + Copy + Default + 'static,
    {
        let mut inner = self.inner.lock().map_err(|_| self.err(op, "the communicator's lock is poisoned".into()))?;
        if let Some(why) = &inner.spent {
            return Err(self.err(op, format!("the communicator is spent: {why}")));
        }
        let send_ptr: *mut [T] = Box::into_raw(send.to_vec().into_boxed_slice());
        let recv_ptr: *mut [T] = Box::into_raw(vec![T::default(); recv_len].into_boxed_slice());
        // SAFETY: both boxes stay allocated until the request completes
        // (then freed below) or forever (leaked on a timeout); nothing else
        // touches them meanwhile.
        let request = start(&inner.comm, unsafe { &*send_ptr }, unsafe { &mut *recv_ptr });
        self.wait(&mut inner, op, request)?;
        // SAFETY: the request completed; the buffers are ours again.
        let (send_box, recv_box) = unsafe { (Box::from_raw(send_ptr), Box::from_raw(recv_ptr)) };
        drop(send_box);
        inner.stats.add(kind, std::mem::size_of_val(send));
        Ok(recv_box.into_vec())
    }

    /// Polls `request` to completion or the deadline. On a timeout the
    /// request is forgotten (its buffers stay MPI's) and the communicator
    /// is spent.
    fn wait<D: ?Sized>(
        &self,
        inner: &mut Inner,
        op: &'static str,
        request: Request<'static, D, StaticScope>,
    ) -> Result<()> {
        let mut request = Some(request);
        let timed_out = super::await_deadline(self.timeout, || {
            Ok(match request.take().map(|r| r.test()) {
                Some(Ok(_)) | None => true,
                Some(Err(r)) => {
                    request = Some(r);
                    false
                }
            })
        })?;
        match timed_out {
            None => Ok(()),
            Some(why) => {
                // MPI may still write the buffers: leave them to it.
                std::mem::forget(request);
                inner.spent = Some(format!("{op} {why}"));
                Err(self.err(op, why))
            }
        }
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.err("broadcast", format!("root {root} is not a rank of {}", self.world)));
        }
        Ok(())
    }
}

type StartFn<T> = fn(&SimpleCommunicator, &'static [T], &'static mut [T]) -> Request<'static, [T], StaticScope>;

fn all_reduce_start<T: Equivalence + 'static, const MAX: bool>(
    c: &SimpleCommunicator,
    s: &'static [T],
    r: &'static mut [T],
) -> Request<'static, [T], StaticScope> {
    let op = if MAX { SystemOperation::max() } else { SystemOperation::sum() };
    c.immediate_all_reduce_into(StaticScope, s, r, op)
}

fn all_gather_start<T: Equivalence + 'static>(
    c: &SimpleCommunicator,
    s: &'static [T],
    r: &'static mut [T],
) -> Request<'static, [T], StaticScope> {
    c.immediate_all_gather_into(StaticScope, s, r)
}

fn reduce_scatter_start(
    c: &SimpleCommunicator,
    s: &'static [f32],
    r: &'static mut [f32],
) -> Request<'static, [f32], StaticScope> {
    c.immediate_reduce_scatter_block_into(StaticScope, s, r, SystemOperation::sum())
}

impl Drop for Mpi {
    fn drop(&mut self) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if let Some(why) = inner.spent.take() {
            // MPI_Finalize would wait for the rank that never came.
            eprintln!("gif-fr: rank {} of {}: aborting the MPI job: {why}", self.rank, self.world);
            inner.comm.abort(1);
        }
        inner.universe.take();
    }
}

impl Mpi {
    fn all_reduce<T: Equivalence + Copy + Default + 'static>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        let start: StartFn<T> = match op {
            ReduceOp::Sum => all_reduce_start::<T, false>,
            ReduceOp::Max => all_reduce_start::<T, true>,
        };
        let out = self.run("all_reduce", Kind::AllReduce, data, data.len(), start)?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather<T: Equivalence + Copy + Default + 'static>(&self, mine: &[T], all: &mut [T]) -> Result<()> {
        super::check_blocks("all_gather", mine.len(), all.len(), self.rank, self.world)?;
        let out = self.run("all_gather", Kind::AllGather, mine, all.len(), all_gather_start::<T>)?;
        all.copy_from_slice(&out);
        Ok(())
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn stats(&self) -> CollectiveStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }
    fn abort(&self, code: i32) -> ! {
        match self.inner.lock() {
            Ok(inner) => inner.comm.abort(code),
            Err(p) => p.into_inner().comm.abort(code),
        }
    }
    fn all_reduce_f32(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce(data, op)
    }
    fn all_reduce_f64(&self, data: &mut [f64], op: ReduceOp) -> Result<()> {
        self.all_reduce(data, op)
    }
    fn all_gather_f32(&self, mine: &[f32], all: &mut [f32]) -> Result<()> {
        self.all_gather(mine, all)
    }
    fn all_gather_u32(&self, mine: &[u32], all: &mut [u32]) -> Result<()> {
        self.all_gather(mine, all)
    }
    fn all_gather_u64(&self, mine: &[u64], all: &mut [u64]) -> Result<()> {
        self.all_gather(mine, all)
    }
    fn broadcast_u8(&self, data: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let mut inner = self.inner.lock().map_err(|_| self.err("broadcast", "the lock is poisoned".into()))?;
        if let Some(why) = &inner.spent {
            return Err(self.err("broadcast", format!("the communicator is spent: {why}")));
        }
        let buf_ptr: *mut [u8] = Box::into_raw(data.to_vec().into_boxed_slice());
        // SAFETY: as in `run`: the box outlives the request or is leaked.
        let request =
            inner.comm.process_at_rank(root as i32).immediate_broadcast_into(StaticScope, unsafe { &mut *buf_ptr });
        self.wait(&mut inner, "broadcast", request)?;
        // SAFETY: completed.
        let buf = unsafe { Box::from_raw(buf_ptr) };
        data.copy_from_slice(&buf);
        inner.stats.add(Kind::Broadcast, data.len());
        Ok(())
    }
    fn reduce_scatter_f32(&self, data: &[f32], mine: &mut [f32]) -> Result<()> {
        super::check_blocks("reduce_scatter", mine.len(), data.len(), self.rank, self.world)?;
        let out = self.run("reduce_scatter", Kind::ReduceScatter, data, mine.len(), reduce_scatter_start)?;
        mine.copy_from_slice(&out);
        Ok(())
    }
}
