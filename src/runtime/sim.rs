//! The simulated GPU: the crate's own kernels/*.cu, compiled for the host by
//! build.rs (kernels/sim/), run on CPU fibers. See docs/simulator.md.
//!
//! This module owns the Rust side: memory with guard bands, the launch call
//! into kernels/sim/sim.cpp, and the guard check after every launch.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::runtime::kernels::{Arg, LaunchConfig};
use crate::runtime::kernels::{KernelRef, ModuleId};

/// Bytes of guard band before and after every simulated allocation. They
/// hold the poison byte; an out-of-bounds write changes them and the next
/// guard check (after every launch) reports it.
pub const GUARD_BYTES: usize = 4096;
/// The byte that fills fresh allocations, guard bands and shared memory:
/// 0xFF is NaN in f32, bf16 and f16, and -1 in integers.
pub use crate::runtime::kernels::POISON;
const ALIGN: usize = 256; // as cudaMalloc
/// A guard band as it must read.
static POISON_BAND: [u8; GUARD_BYTES] = [POISON; GUARD_BYTES];

/// The order in which the simulator runs blocks, and runnable threads within
/// a block. Running the same kernel under two orders makes a missing
/// barrier show as a result that depends on the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOrder {
    /// Blocks and threads in increasing linear index.
    Forward,
    /// In decreasing linear index.
    Reverse,
    /// A permutation drawn from the seed, new for every scheduling round.
    Shuffle(u64),
}

#[repr(C)]
struct GifSimLaunch {
    module: u32,
    kernel: u32,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u64,
    args: *mut *mut c_void,
    arg_sizes: *const u64,
    arg_kinds: *const u8,
    nargs: u64,
    order: u32,
    seed: u64,
}

extern "C" {
    fn gif_sim_launch(l: *const GifSimLaunch, err: *mut c_char, err_len: usize) -> i32;
    fn gif_sim_kernel_names(module: *const c_char, out: *mut c_char, out_len: u64) -> u64;
    fn gif_sim_kernel_signature(module: u32, kernel: u32, kinds: *mut u8, sizes: *mut u32, cap: u32) -> i64;
}

/// The simulator's registered signature of a kernel (from the C++ compiler's
/// view of its parameters): (kind, bytes) per parameter, kinds 1 pointer, 2
/// integer, 3 float, 4 other; `None` for an index out of range.
pub fn kernel_signature(kernel: KernelRef) -> Option<Vec<(u8, u8)>> {
    let (mut kinds, mut sizes) = ([0u8; 64], [0u32; 64]);
    // SAFETY: the buffers hold 64 entries, the cap passed.
    let n = unsafe {
        gif_sim_kernel_signature(kernel.module as u32, kernel.index as u32, kinds.as_mut_ptr(), sizes.as_mut_ptr(), 64)
    };
    let n = usize::try_from(n).ok()?.min(64);
    Some((0..n).map(|i| (kinds[i], sizes[i] as u8)).collect())
}

/// Live allocations of one simulated device: start address -> length.
type Registry = Arc<Mutex<BTreeMap<usize, usize>>>;

fn lock(r: &Registry) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
    // A panic while the registry is held cannot leave it inconsistent (each
    // critical section is one insert or remove), so a poisoned lock is usable.
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// One simulated device.
#[derive(Debug)]
pub(crate) struct SimBackend {
    pub(crate) order: SimOrder,
    allocs: Registry,
}

/// Memory of the simulated device: a host allocation between two guard bands.
#[derive(Debug)]
pub(crate) struct SimBuffer {
    base: NonNull<u8>,
    layout: Layout,
    len: usize,
    allocs: Registry,
}

// SAFETY: the buffer owns its allocation; access goes through &self / &mut self.
unsafe impl Send for SimBuffer {}
unsafe impl Sync for SimBuffer {}

impl SimBuffer {
    /// The device address kernels receive.
    pub(crate) fn addr(&self) -> u64 {
        // SAFETY: base + GUARD_BYTES is inside the allocation (len + 2 guards).
        unsafe { self.base.as_ptr().add(GUARD_BYTES) as u64 }
    }
    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the user region [GUARD, GUARD + len) is allocated and
        // initialized (poisoned); &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(GUARD_BYTES), self.len) }
    }
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        lock(&self.allocs).remove(&(self.addr() as usize));
        // SAFETY: allocated in SimBackend::alloc with this layout.
        unsafe { dealloc(self.base.as_ptr(), self.layout) }
    }
}

impl SimBackend {
    pub(crate) fn new(order: SimOrder) -> Self {
        SimBackend { order, allocs: Arc::new(Mutex::new(BTreeMap::new())) }
    }

    /// A poisoned allocation of `len` bytes (at least one byte is reserved so
    /// that every buffer has a distinct address).
    pub(crate) fn alloc(&self, len: usize) -> Result<SimBuffer> {
        let total = len
            .checked_add(2 * GUARD_BYTES)
            .ok_or_else(|| Error::invalid("sim alloc", format!("{len} bytes is too large")))?;
        let layout = Layout::from_size_align(total, ALIGN)
            .map_err(|e| Error::invalid("sim alloc", format!("{len} bytes: {e}")))?;
        // SAFETY: layout has a non-zero size (2 guards).
        let p = unsafe { alloc(layout) };
        let base = NonNull::new(p).ok_or_else(|| Error::OutOfMemory {
            op: "sim alloc",
            what: "a simulated device buffer (host memory)".into(),
            bytes: len,
            free: None,
        })?;
        // SAFETY: p points to `total` writable bytes.
        unsafe { std::ptr::write_bytes(p, POISON, total) };
        let b = SimBuffer { base, layout, len, allocs: self.allocs.clone() };
        lock(&self.allocs).insert(b.addr() as usize, len);
        Ok(b)
    }

    /// Checks that `[addr, addr + len)` lies inside one live allocation.
    pub(crate) fn check_range(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        within(&lock(&self.allocs), addr, len)
    }

    /// Copies `out.len()` bytes at `addr` into `out`.
    pub(crate) fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        // Holding the registry excludes launches and frees meanwhile.
        let allocs = lock(&self.allocs);
        within(&allocs, addr, out.len()).map_err(|m| Error::invalid("sim read", m))?;
        // SAFETY: the range lies inside a live allocation (checked above),
        // which nothing else touches while the registry is held.
        unsafe { std::ptr::copy_nonoverlapping(addr as usize as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` to `addr`.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let allocs = lock(&self.allocs);
        within(&allocs, addr, data.len()).map_err(|m| Error::invalid("sim write", m))?;
        // SAFETY: as in read.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as usize as *mut u8, data.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `addr` to `byte`.
    pub(crate) fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<()> {
        let allocs = lock(&self.allocs);
        within(&allocs, addr, len).map_err(|m| Error::invalid("sim fill", m))?;
        // SAFETY: as in read.
        unsafe { std::ptr::write_bytes(addr as usize as *mut u8, byte, len) };
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` (ranges may overlap).
    pub(crate) fn copy(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        let allocs = lock(&self.allocs);
        within(&allocs, src, len).map_err(|m| Error::invalid("sim copy", m))?;
        within(&allocs, dst, len).map_err(|m| Error::invalid("sim copy", m))?;
        // SAFETY: as in read.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, len) };
        Ok(())
    }

    pub(crate) fn launch(&self, k: KernelRef, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let kerr = |message: String| Error::Kernel { module: k.module.name(), kernel: k.name, message };
        let mut values: Vec<[u8; 8]> = args.iter().map(Arg::bytes).collect();
        let mut ptrs: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        let sizes: Vec<u64> = args.iter().map(|a| a.size() as u64).collect();
        let kinds: Vec<u8> = args.iter().map(Arg::sim_kind).collect();
        let (order, seed) = match self.order {
            SimOrder::Forward => (0, 0),
            SimOrder::Reverse => (1, 0),
            SimOrder::Shuffle(s) => (2, s),
        };
        let l = GifSimLaunch {
            module: k.module as u32,
            kernel: k.index as u32,
            grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
            block: [cfg.block.0, cfg.block.1, cfg.block.2],
            shared_bytes: cfg.shared_bytes as u64,
            args: ptrs.as_mut_ptr(),
            arg_sizes: sizes.as_ptr(),
            arg_kinds: kinds.as_ptr(),
            nargs: args.len() as u64,
            order,
            seed,
        };
        let mut err = vec![0 as c_char; 2048];
        // Hold the registry for the whole launch: no buffer of this device
        // can be freed while a kernel may touch it.
        let allocs = lock(&self.allocs);
        // SAFETY: every pointer in `l` outlives the call; the argument list is
        // checked against the kernel's signature (count, sizes, kinds) by the
        // simulator before the kernel runs; pointer arguments are device
        // addresses of live SimBuffers (the ops validate sizes first).
        let rc = unsafe { gif_sim_launch(&l, err.as_mut_ptr(), err.len()) };
        let guard = check_guards(&allocs);
        drop(allocs);
        if rc != 0 {
            // SAFETY: the simulator wrote a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(kerr(msg));
        }
        guard.map_err(kerr)
    }
}

/// `Ok` when `[addr, addr + len)` lies inside one live allocation.
fn within(allocs: &BTreeMap<usize, usize>, addr: u64, len: usize) -> std::result::Result<(), String> {
    let a = addr as usize;
    match allocs.range(..=a).next_back() {
        Some((&base, &size)) if a - base <= size && len <= size - (a - base) => Ok(()),
        _ => Err(format!("{len} bytes at {addr:#x} are not inside one allocation of this simulated device")),
    }
}

/// Checks, and then restores, every guard band of the live allocations.
fn check_guards(allocs: &BTreeMap<usize, usize>) -> std::result::Result<(), String> {
    let mut first: Option<String> = None;
    for (&addr, &len) in allocs {
        // SAFETY: a registered allocation is live (removed under the same lock
        // before it is freed) and spans [addr - GUARD, addr + len + GUARD).
        let (front, back) = unsafe {
            (
                std::slice::from_raw_parts_mut((addr - GUARD_BYTES) as *mut u8, GUARD_BYTES),
                std::slice::from_raw_parts_mut((addr + len) as *mut u8, GUARD_BYTES),
            )
        };
        // Whole bands compared first (a memcmp: this runs over every live
        // allocation after every launch); the byte only when one differs.
        let bad = |band: &[u8]| if band == POISON_BAND { None } else { band.iter().position(|&b| b != POISON) };
        let (bad_front, bad_back) = (bad(front), bad(back));
        if first.is_none() {
            if let Some(i) = bad_front {
                first = Some(format!(
                    "out-of-bounds write: byte offset -{} before the start of a {len}-byte buffer",
                    GUARD_BYTES - i
                ));
            } else if let Some(i) = bad_back {
                first = Some(format!(
                    "out-of-bounds write: byte offset {} of a {len}-byte buffer ({} bytes past its end)",
                    len + i,
                    i + 1
                ));
            }
        }
        if bad_front.is_some() {
            front.fill(POISON);
        }
        if bad_back.is_some() {
            back.fill(POISON);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The kernels the simulator registered for `module` (what build.rs found).
pub fn registered_kernels(module: ModuleId) -> Vec<String> {
    let Ok(name) = CString::new(module.name()) else { return Vec::new() };
    // SAFETY: a null buffer asks for the length only.
    let n = unsafe { gif_sim_kernel_names(name.as_ptr(), std::ptr::null_mut(), 0) } as usize;
    let mut buf = vec![0 as c_char; n + 1];
    // SAFETY: buf holds n + 1 bytes.
    unsafe { gif_sim_kernel_names(name.as_ptr(), buf.as_mut_ptr(), buf.len() as u64) };
    // SAFETY: NUL-terminated by gif_sim_kernel_names.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    s.lines().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<()>) -> String {
        match r {
            Err(Error::Kernel { message, .. }) => message,
            other => panic!("expected a kernel error, got {other:?}"),
        }
    }

    fn oob_write() -> KernelRef {
        crate::runtime::kernels::kernel_ref(ModuleId::Selftest, "selftest_oob_write").unwrap()
    }

    #[test]
    fn launch_checks_arguments_against_the_kernel_signature() {
        let sim = SimBackend::new(SimOrder::Forward);
        let buf = sim.alloc(64).unwrap();
        let cfg = LaunchConfig::linear(1, 16, 0);
        let e = err(sim.launch(oob_write(), &cfg, &[Arg::I32(3)]));
        assert!(e.contains("takes 2 arguments, the launch passed 1"), "{e}");
        let e = err(sim.launch(oob_write(), &cfg, &[Arg::F32(1.0), Arg::I32(3)]));
        assert!(e.contains("argument 0 is a pointer of 8 bytes, the launch passed a float of 4 bytes"), "{e}");
        let e = err(sim.launch(oob_write(), &cfg, &[Arg::Ptr(buf.addr()), Arg::I64(3)]));
        assert!(e.contains("argument 1 is an integer of 4 bytes"), "{e}");
        let e = err(sim.launch(KernelRef { index: 999, ..oob_write() }, &cfg, &[]));
        assert!(e.contains("has no kernel 999"), "{e}");
    }

    #[test]
    fn launch_checks_cuda_limits() {
        let sim = SimBackend::new(SimOrder::Forward);
        let buf = sim.alloc(64).unwrap();
        let args = [Arg::Ptr(buf.addr()), Arg::I32(0)];
        let big = LaunchConfig::linear(1, 1025, 0);
        assert!(err(sim.launch(oob_write(), &big, &args)).contains("at most 1024 threads"));
        let empty = LaunchConfig::linear(0, 32, 0);
        assert!(err(sim.launch(oob_write(), &empty, &args)).contains("at least 1"));
        let smem = LaunchConfig::linear(1, 32, 228 * 1024);
        assert!(err(sim.launch(oob_write(), &smem, &args)).contains("227 KiB"));
    }

    #[test]
    fn fresh_allocations_and_guards_are_poison() {
        let sim = SimBackend::new(SimOrder::Reverse);
        let mut b = sim.alloc(40).unwrap();
        assert!(b.as_bytes_mut().iter().all(|&x| x == POISON));
        assert!(check_guards(&lock(&sim.allocs)).is_ok());
    }
}
