//! A batch's pixels ([`Images`]) and the recycled page-locked buffers they
//! are decoded into when the loader feeds a GPU ([`PoolStats`]).

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::runtime::device::Device;
use crate::runtime::pinned::PinnedBuffer;

/// A batch's `[B, size, size, 3]` normalized pixels: in ordinary memory,
/// or in a page-locked buffer of the loader's pool (returned to the pool
/// when dropped), which `Trainer::step_batch` uploads without waiting.
/// Reads as a `&[f32]` either way.
pub struct Images {
    mem: Mem,
}

enum Mem {
    Vec(Vec<f32>),
    /// A page-locked buffer (always Some until dropped), returned to its
    /// pool, if any, when dropped.
    Pinned(Option<PinnedBuffer>, Option<Arc<Pool>>),
}

impl Images {
    /// Pixels in ordinary memory.
    pub fn from_vec(v: Vec<f32>) -> Images {
        Images { mem: Mem::Vec(v) }
    }

    /// Pixels in a page-locked buffer of a caller's own (a loader of one's
    /// own that feeds `Trainer::step_batch`).
    pub fn from_pinned(buffer: PinnedBuffer) -> Images {
        Images { mem: Mem::Pinned(Some(buffer), None) }
    }

    /// The page-locked buffer holding them, if they are in one.
    pub fn pinned(&self) -> Option<&PinnedBuffer> {
        match &self.mem {
            Mem::Pinned(b, _) => b.as_ref(),
            Mem::Vec(_) => None,
        }
    }

    /// The pixels, writable (a pooled buffer first waits for the device's
    /// last copy from it).
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.mem {
            Mem::Vec(v) => Ok(v),
            Mem::Pinned(Some(b), _) => b.as_mut_slice(),
            Mem::Pinned(None, _) => Ok(&mut []),
        }
    }

    /// The pixels in an ordinary vector (a copy when pooled).
    pub fn into_vec(mut self) -> Vec<f32> {
        match &mut self.mem {
            Mem::Vec(v) => std::mem::take(v),
            Mem::Pinned(..) => self.to_vec(),
        }
    }
}

impl std::ops::Deref for Images {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.mem {
            Mem::Vec(v) => v,
            Mem::Pinned(b, _) => b.as_ref().map_or(&[], PinnedBuffer::as_slice),
        }
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        if let Mem::Pinned(b, Some(pool)) = &mut self.mem {
            if let Some(b) = b.take() {
                pool.free.lock().unwrap_or_else(|p| p.into_inner()).push(b);
            }
        }
    }
}

impl Clone for Images {
    /// A copy in ordinary memory.
    fn clone(&self) -> Images {
        Images::from_vec(self.to_vec())
    }
}

impl PartialEq for Images {
    fn eq(&self, other: &Images) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.pinned().is_some() { "page-locked" } else { "pageable" };
        write!(f, "Images({} values, {kind})", self.len())
    }
}

/// What a loader's pool of page-locked buffers did ([`crate::data::Loader::pool_stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Page-locked buffers allocated (each once, then recycled).
    pub allocated: usize,
    /// Batches decoded into a recycled buffer.
    pub reused: usize,
    /// Batches decoded into ordinary memory because every buffer was in use
    /// (the consumer holding more batches than the pool was sized for) or
    /// page-locking failed.
    pub pageable: usize,
    /// Why page-locking failed, the first time it did (then no further
    /// buffer is attempted).
    pub error: Option<String>,
}

/// Page-locked buffers of one batch's size for one device: allocated on
/// demand up to `max`, recycled when their [`Images`] drop.
pub(crate) struct Pool {
    device: Device,
    len: usize,
    max: usize,
    free: Mutex<Vec<PinnedBuffer>>,
    stats: Mutex<PoolStats>,
}

impl Pool {
    pub(crate) fn new(device: &Device, len: usize, max: usize) -> Pool {
        Pool {
            device: device.clone(),
            len,
            max: max.max(1),
            free: Mutex::new(Vec::new()),
            stats: Mutex::new(PoolStats::default()),
        }
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Storage for `len` values: a free buffer, a new one while fewer than
    /// `max` exist, else ordinary memory (never a wait: the loader's queue
    /// bounds the batches, and a consumer that keeps batches must not stall
    /// the workers). Buffers of another size (a last, shorter batch) are
    /// ordinary memory too.
    pub(crate) fn take(self: &Arc<Pool>, len: usize) -> Result<Images> {
        if len == self.len {
            if let Some(b) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).reused += 1;
                return Ok(Images { mem: Mem::Pinned(Some(b), Some(self.clone())) });
            }
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            if s.allocated < self.max && s.error.is_none() {
                match PinnedBuffer::new(&self.device, len) {
                    Ok(b) => {
                        s.allocated += 1;
                        return Ok(Images { mem: Mem::Pinned(Some(b), Some(self.clone())) });
                    }
                    Err(e) => s.error = Some(e.to_string()),
                }
            }
            s.pageable += 1;
        }
        Ok(Images::from_vec(crate::runtime::host_memory::try_filled("Loader", "a batch", len, 0f32)?))
    }
}
