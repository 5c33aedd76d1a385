//! Host memory accounting for benchmarks and tests: [`CountingAllocator`]
//! wraps the system allocator and counts the bytes held now and at the peak.
//! It counts only in a binary that registers it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: gif_fr::runtime::host_memory::CountingAllocator = gif_fr::runtime::host_memory::CountingAllocator;
//! ```
//!
//! The CPU device's tensors are host memory, so this is how the CPU side of
//! a peak-memory measurement works (GPU backends: `Device::memory_stats`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::runtime::device::MemoryStats;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting.
pub struct CountingAllocator;

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator with the caller's
// arguments; the counters are only statistics.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Bytes held now and at the peak (zeros unless a [`CountingAllocator`] is
/// the global allocator).
pub fn stats() -> MemoryStats {
    MemoryStats { current: CURRENT.load(Ordering::Relaxed), peak: PEAK.load(Ordering::Relaxed) }
}

/// Restarts the peak from the bytes held now, and returns that number: the
/// baseline of a measurement, `stats().peak - reset_peak()` never below zero
/// as long as no other thread resets the peak meanwhile (the peak is
/// process-wide: measure from one thread at a time).
pub fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// A vector of `n` copies of `value`, allocated fallibly: a size that
/// overflows, or an allocation the system refuses, is an error naming `op`
/// and `what` instead of an abort. For buffers whose size comes from user
/// input.
pub(crate) fn try_filled<T: Clone>(op: &'static str, what: &str, n: usize, value: T) -> Result<Vec<T>> {
    let bytes = n.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
        Error::invalid(op, format!("{what}: {n} elements of {} bytes overflow", std::mem::size_of::<T>()))
    })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory { op, what: what.to_string(), bytes, free: None })?;
    v.resize(n, value);
    Ok(v)
}
