//! Page-locked host memory for uploads ([`PinnedBuffer`]).
//!
//! A copy from ordinary (pageable) host memory to a GPU goes through a
//! staging buffer of the driver and, to be safe to reuse the source, waits
//! for the device. From page-locked memory the copy engine reads the host
//! memory itself (DMA at the bus's speed) and the host need not wait: the
//! copy can run on a second stream beside the kernels of the step before,
//! which is what a training loop wants for its next batch (PyTorch's
//! `pin_memory` with `non_blocking` copies; insightface's data loader
//! uploads the next batch on a side stream). Page-locking is slow and
//! takes memory from the system's pageable pool, so the buffers are
//! allocated once and recycled (`gif_fr::data::Loader::pinned`).

use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::runtime::device::{Device, LockedHost, Mark};

/// `len` f32 values of host memory for uploads to one device: page-locked
/// on CUDA, so that [`crate::Tensor`] uploads from it are asynchronous
/// (`Tensor::copy_from_pinned`); ordinary memory on the simulator (the same
/// code path, which runs each copy at once) and refused on the CPU, which
/// has no uploads.
///
/// Writing ([`PinnedBuffer::as_mut_slice`]) first waits for the device's
/// last copy from or into it; reading ([`PinnedBuffer::as_slice`]) does
/// not wait (the crate reads it only while copies from it may run, or
/// after waiting).
pub struct PinnedBuffer {
    device: Device,
    mem: Mem,
    len: usize,
    /// The last asynchronous copy that reads or writes this memory.
    pending: Mutex<Option<Mark>>,
}

enum Mem {
    /// The simulator's stand-in.
    Host(Vec<f32>),
    /// CUDA's page-locked memory.
    Locked(LockedHost),
}

// SAFETY: the locked memory is owned by the buffer alone (like a Vec's),
// and the pending event is behind a mutex.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared references only read the memory.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` zeros in page-locked memory for `device` (a GPU or the
    /// simulator). Errors: the CPU device, a size that overflows, memory
    /// the driver cannot lock.
    pub fn new(device: &Device, len: usize) -> Result<PinnedBuffer> {
        const OP: &str = "PinnedBuffer::new";
        if !device.runs_kernels() {
            return Err(Error::invalid(OP, "the CPU device has no uploads to page-lock memory for"));
        }
        let bytes = len
            .checked_mul(4)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid(OP, format!("{len} f32 values overflow a buffer")))?;
        let mem = match device.page_locked(bytes)? {
            Some(locked) => {
                // SAFETY: bytes writable bytes at the start of the allocation,
                // aligned to a page.
                unsafe { std::ptr::write_bytes(locked.ptr(), 0, bytes) };
                Mem::Locked(locked)
            }
            None => Mem::Host(crate::runtime::host_memory::try_filled(OP, "the page-locked buffer", len, 0f32)?),
        };
        Ok(PinnedBuffer { device: device.clone(), mem, len, pending: Mutex::new(None) })
    }

    /// The device its uploads go to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the memory is page-locked by a GPU driver (false on the
    /// simulator).
    pub fn is_page_locked(&self) -> bool {
        matches!(self.mem, Mem::Locked(_))
    }

    /// The values (the device may be copying them meanwhile: both read).
    pub fn as_slice(&self) -> &[f32] {
        match &self.mem {
            Mem::Host(v) => v,
            // SAFETY: len f32 values, page-aligned, owned by this buffer;
            // only &mut self writes them.
            Mem::Locked(l) => unsafe { std::slice::from_raw_parts(l.ptr() as *const f32, self.len) },
        }
    }

    /// The values to write (or to read after a copy into them), once the
    /// device's last copy from or into them is done (a wait on the host if
    /// it is not).
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        self.settle()?;
        Ok(match &mut self.mem {
            Mem::Host(v) => v,
            // SAFETY: as in as_slice; no copy reads them any more.
            Mem::Locked(l) => unsafe { std::slice::from_raw_parts_mut(l.ptr() as *mut f32, self.len) },
        })
    }

    /// The values, for a copy into them on the device's second stream
    /// (which runs after the copies queued there before, from or into this
    /// memory): no host wait.
    ///
    /// # Safety
    ///
    /// Only for such a copy: the host must not read or write them before
    /// the copy's mark, recorded with [`PinnedBuffer::copied`], is done.
    pub(crate) unsafe fn for_device_copy(&mut self) -> &mut [f32] {
        match &mut self.mem {
            Mem::Host(v) => v,
            // SAFETY: as in as_slice; the caller's contract orders the access.
            Mem::Locked(l) => unsafe { std::slice::from_raw_parts_mut(l.ptr() as *mut f32, self.len) },
        }
    }

    /// Records the device's copy that reads or writes the memory now (the
    /// last one queued: the copies run in order on one stream).
    pub(crate) fn copied(&self, mark: Mark) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(mark);
    }

    /// Waits for the last copy that reads or writes the memory.
    fn settle(&mut self) -> Result<()> {
        let pending = self.pending.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = pending.take() {
            if let Err(e) = m.wait() {
                *pending = Some(m);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // The memory must outlive the copies that read it: if the wait
        // fails (a broken context), it is leaked rather than freed.
        if self.settle().is_err() {
            std::mem::forget(std::mem::replace(&mut self.mem, Mem::Host(Vec::new())));
        }
    }
}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedBuffer({} f32 for {}, page-locked: {})", self.len, self.device, self.is_page_locked())
    }
}
