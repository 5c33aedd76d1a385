//! Devices: the CPU, a CUDA GPU, or the simulated GPU.
//!
//! - [`Device::cpu`]: the CPU implementations (the references, and the
//!   fallback), multithreaded with rayon.
//! - [`Device::cuda`]: a GPU through the CUDA driver (cudarc, loaded at run
//!   time). One context, one stream per GPU; modules are loaded once per
//!   context and function handles cached. [`Device::from_stream`] runs on a
//!   caller's cudarc stream instead (a framework's), so that the crate's work
//!   is ordered with the caller's without a synchronization.
//! - `Device::sim` (cargo feature `sim`, default): the same kernels/*.cu run on the CPU by the simulator,
//!   with barrier checks, scheduling orders and guard bands (docs/simulator.md).
//!
//! Both GPU backends share one launch path: a kernel reference, a
//! [`LaunchConfig`] and a list of [`Arg`]s, reached through the typed
//! launchers of [`crate::runtime::launch`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{self as cu, sys as cusys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use crate::error::{Error, Result};
use crate::runtime::kernels::{self, KernelRef, ModuleId, Ptr, PtrMut, MODULES};
pub use crate::runtime::kernels::{Arg, LaunchConfig, POISON};
#[cfg(feature = "sim")]
use crate::runtime::sim::{SimBackend, SimBuffer, SimOrder};

/// A simulated GPU: the simulator and the meter of its memory.
#[cfg(feature = "sim")]
struct SimDevice {
    sim: SimBackend,
    meter: Arc<Meter>,
}

/// Which backend a [`Device`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Host code (the reference implementations).
    Cpu,
    /// A CUDA GPU.
    Cuda,
    /// The simulated GPU.
    Sim,
}

/// A device that tensors live on and ops run on. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Inner,
    poison: bool,
}

#[derive(Clone)]
enum Inner {
    Cpu,
    Cuda(Arc<CudaBackend>),
    #[cfg(feature = "sim")]
    Sim(Arc<SimDevice>),
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (&self.inner, &other.inner) {
            (Inner::Cpu, Inner::Cpu) => true,
            (Inner::Cuda(a), Inner::Cuda(b)) => Arc::ptr_eq(&a.stream, &b.stream),
            #[cfg(feature = "sim")]
            (Inner::Sim(a), Inner::Sim(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Cpu => write!(f, "cpu"),
            Inner::Cuda(c) if c.external => write!(f, "cuda:{} ({}, a caller's stream)", c.ordinal, c.name),
            Inner::Cuda(c) => write!(f, "cuda:{} ({})", c.ordinal, c.name),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => write!(f, "sim ({:?} order)", s.sim.order),
        }
    }
}

/// Host memory that a device's kernels read in place: page-locked and
/// mapped into the device's address space on CUDA (reads cross the bus,
/// zero-copy; no upload, no host wait), the host memory itself on the
/// simulator. Unmapped when dropped.
pub(crate) struct HostMapping {
    device: Device,
    host: usize,
    addr: u64,
}

impl HostMapping {
    /// The address kernels of its device read.
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }
    /// The device it is mapped for.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if let Inner::Cuda(c) = &self.device.inner {
            if c.ctx.bind_to_thread().is_ok() {
                // SAFETY: unregisters the range this mapping registered.
                let _ = unsafe { cusys::cuMemHostUnregister(self.host as *mut c_void) };
            }
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, freed when dropped.
pub(crate) struct LockedHost {
    ctx: Arc<CudaContext>,
    ptr: usize,
}

impl LockedHost {
    /// The first byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }
}

impl Drop for LockedHost {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from malloc_host and is freed once, here; its
            // owner waited for the copies that read it.
            let _ = unsafe { cu::result::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// A point in a device's queue of work ([`Device::mark`]): a CUDA event, or
/// nothing where every operation runs when queued.
pub(crate) struct Mark(Option<cu::CudaEvent>);

impl Mark {
    /// Waits on the host until the work before the mark is done.
    pub(crate) fn wait(&self) -> Result<()> {
        match &self.0 {
            Some(e) => e.synchronize().map_err(|e| Error::driver("event synchronize", e)),
            None => Ok(()),
        }
    }
}

/// The machine behind a [`Device`], as benchmarks print it
/// ([`Device::info`]). Fields the device does not report are None.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// The GPU's name, or the CPU model.
    pub name: String,
    /// Streaming multiprocessors, or CPU worker threads.
    pub compute_units: Option<u64>,
    /// The SM clock (its maximum, as the driver reports it), MHz.
    pub clock_mhz: Option<u64>,
    /// The memory clock, MHz.
    pub memory_clock_mhz: Option<u64>,
    /// The L2 cache, bytes.
    pub l2_bytes: Option<u64>,
    /// The driver's CUDA version, e.g. "13.0".
    pub driver: Option<String>,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        let unit = if self.driver.is_some() { "SMs" } else { "threads" };
        if let Some(n) = self.compute_units {
            write!(f, ", {n} {unit}")?;
        }
        if let Some(c) = self.clock_mhz {
            write!(f, ", {c} MHz")?;
        }
        if let Some(m) = self.memory_clock_mhz {
            write!(f, ", memory {m} MHz")?;
        }
        if let Some(l2) = self.l2_bytes {
            write!(f, ", L2 {} MiB", l2 >> 20)?;
        }
        if let Some(d) = &self.driver {
            write!(f, ", driver CUDA {d}")?;
        }
        Ok(())
    }
}

/// The CPU's model name (Linux), or "cpu".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "cpu".into())
}

/// Memory on a GPU backend, counted by its device's [`MemoryStats`] while it
/// lives.
pub(crate) struct DeviceBuffer {
    mem: Mem,
    meter: Arc<Meter>,
    bytes: usize,
}

enum Mem {
    Cuda(CudaSlice<u8>),
    #[cfg(feature = "sim")]
    Sim(SimBuffer),
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({} bytes)", self.bytes)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.meter.current.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Bytes of device memory that the crate's buffers hold on one device (the
/// allocation API's view: cuBLAS workspaces and the driver's own memory are
/// not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held now.
    pub current: usize,
    /// The most held at once since the device was opened or
    /// [`Device::reset_peak_memory`].
    pub peak: usize,
}

/// What the crate asked of a GPU backend since the device was opened or
/// [`Device::reset_stats`]: structural counts that fix a step's cost
/// independently of the card (docs/performance.md), and that tests pin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Kernel launches.
    pub launches: u64,
    /// Device allocations (uploads included), and their bytes.
    pub allocations: u64,
    /// Bytes of those allocations.
    pub bytes_allocated: u64,
    /// Host → device copies.
    pub uploads: u64,
    /// Device → host copies (those into ordinary memory wait for the
    /// device: [`DeviceStats::syncs`]).
    pub downloads: u64,
    /// Device → device copies and memsets.
    pub device_copies: u64,
    /// Times the host waited for the device: every download, and
    /// [`Device::synchronize`].
    pub syncs: u64,
    /// Page-locked host buffers allocated for uploads
    /// ([`crate::runtime::pinned::PinnedBuffer`]; on the simulator, the
    /// host buffers standing for them).
    pub pinned_allocations: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Meter {
    current: AtomicUsize,
    peak: AtomicUsize,
    launches: AtomicU64,
    allocations: AtomicU64,
    bytes_allocated: AtomicU64,
    uploads: AtomicU64,
    downloads: AtomicU64,
    device_copies: AtomicU64,
    syncs: AtomicU64,
    pinned_allocations: AtomicU64,
}

/// Adds one to a counter.
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Meter {
    fn track(self: &Arc<Self>, mem: Mem, bytes: usize) -> DeviceBuffer {
        bump(&self.allocations);
        self.bytes_allocated.fetch_add(bytes as u64, Ordering::Relaxed);
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        DeviceBuffer { mem, meter: self.clone(), bytes }
    }
}

/// What a CUDA probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_memory: usize,
}

/// Environment variable: when set (to anything but "0"), tests that would
/// skip without a GPU fail instead. The GPU run kit sets it.
pub const REQUIRE_GPU_ENV: &str = "GIF_FR_REQUIRE_GPU";

impl Device {
    /// The CPU.
    pub fn cpu() -> Device {
        Device { inner: Inner::Cpu, poison: false }
    }

    /// The simulated GPU, running blocks and threads in forward order
    /// (cargo feature `sim`, on by default).
    #[cfg(feature = "sim")]
    pub fn sim() -> Device {
        Device::sim_with(SimOrder::Forward)
    }

    /// The simulated GPU with a scheduling order. Each call makes a new
    /// device: tensors of one are not usable with ops on another.
    #[cfg(feature = "sim")]
    pub fn sim_with(order: SimOrder) -> Device {
        let sim = SimDevice { sim: SimBackend::new(order), meter: Default::default() };
        Device { inner: Inner::Sim(Arc::new(sim)), poison: true }
    }

    /// GPU `ordinal` through the CUDA driver. Never panics: a missing driver
    /// library, no device, or a bad ordinal is an [`Error::NoDriver`] or
    /// [`Error::NoGpu`] saying why. Repeated calls share one context and
    /// stream. Allocations are poisoned (0xFF bytes, NaN) when the
    /// environment variable GIF_FR_POISON is set, or after
    /// [`Device::with_poison`].
    pub fn cuda(ordinal: usize) -> Result<Device> {
        let backend = CudaBackend::get(ordinal)?;
        let poison = std::env::var("GIF_FR_POISON").is_ok_and(|v| !v.is_empty() && v != "0");
        Ok(Device { inner: Inner::Cuda(backend), poison })
    }

    /// The GPU of a caller's cudarc stream, with every kernel, copy and
    /// allocation of the crate queued on that stream: work is ordered with
    /// the caller's own (a framework's) without a host synchronization.
    /// Tensors of this device are not usable with another `Device` (not even
    /// [`Device::cuda`] of the same GPU: their streams differ), which the ops
    /// check. Errors like [`Device::cuda`] for a GPU below compute
    /// capability 8.0.
    pub fn from_stream(stream: std::sync::Arc<CudaStream>) -> Result<Device> {
        let backend = CudaBackend::on_stream(stream)?;
        let poison = std::env::var("GIF_FR_POISON").is_ok_and(|v| !v.is_empty() && v != "0");
        Ok(Device { inner: Inner::Cuda(Arc::new(backend)), poison })
    }

    /// The cudarc stream a CUDA device queues its work on (the caller's for
    /// [`Device::from_stream`]); `None` on the CPU and the simulator.
    pub fn cuda_stream(&self) -> Option<Arc<CudaStream>> {
        match &self.inner {
            Inner::Cuda(c) => Some(c.stream.clone()),
            _ => None,
        }
    }

    /// The first GPU if there is one, else the CPU ([`Device::best_reason`]
    /// says why not a GPU).
    pub fn best() -> Device {
        Device::best_with_reason().0
    }

    /// [`Device::best`], and the error that made it the CPU (`None` when it
    /// is a GPU): a caller can log why the GPU was not used.
    pub fn best_with_reason() -> (Device, Option<Error>) {
        match Device::cuda(0) {
            Ok(d) => (d, None),
            Err(e) => (Device::cpu(), Some(e)),
        }
    }

    /// Why [`Device::best`] is the CPU (no driver, no GPU, a GPU below
    /// compute capability 8.0), or `None` when it is a GPU.
    pub fn best_reason() -> Option<String> {
        Device::best_with_reason().1.map(|e| e.to_string())
    }

    /// Why no GPU can be used, or what the first one is.
    pub fn probe_cuda() -> Result<GpuInfo> {
        Device::cuda(0).and_then(|d| d.gpu_info().ok_or_else(|| Error::NoGpu("not a GPU".into())))
    }

    /// The same device, with allocations for outputs filled with 0xFF bytes
    /// (NaN in every float type) so that elements a kernel fails to write
    /// show. Always on for the simulator; costs one memset per allocation on
    /// a GPU.
    pub fn with_poison(mut self, poison: bool) -> Device {
        if self.kind() != DeviceKind::Sim {
            self.poison = poison;
        }
        self
    }

    /// Which backend this is.
    pub fn kind(&self) -> DeviceKind {
        match self.inner {
            Inner::Cpu => DeviceKind::Cpu,
            Inner::Cuda(_) => DeviceKind::Cuda,
            #[cfg(feature = "sim")]
            Inner::Sim(_) => DeviceKind::Sim,
        }
    }

    /// True for the CUDA and simulated backends (which run kernels/*.cu).
    pub fn runs_kernels(&self) -> bool {
        !matches!(self.inner, Inner::Cpu)
    }

    /// Name, compute capability and memory of a CUDA device.
    pub fn gpu_info(&self) -> Option<GpuInfo> {
        match &self.inner {
            Inner::Cuda(c) => Some(GpuInfo {
                ordinal: c.ordinal,
                name: c.name.clone(),
                compute_capability: c.cc,
                total_memory: c.total_memory,
            }),
            _ => None,
        }
    }

    /// Waits for all work queued on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.count(|m| &m.syncs);
        match &self.inner {
            Inner::Cuda(c) => c.stream.synchronize().map_err(|e| Error::driver("stream synchronize", e)),
            _ => Ok(()),
        }
    }

    /// Wall time of `iters` calls of `f` on this device: CUDA events on the
    /// device's stream around the calls for a GPU (after a synchronize), a
    /// host clock otherwise. Meant for criterion's `iter_custom`; warm up
    /// (module loading, first-use compilation) before timing.
    pub fn time<F: FnMut() -> Result<()>>(&self, iters: u64, mut f: F) -> Result<Duration> {
        match &self.inner {
            Inner::Cuda(c) => {
                let ev = |what| {
                    c.ctx.new_event(Some(cusys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::driver(what, e))
                };
                let (start, end) = (ev("event create")?, ev("event create")?);
                c.stream.synchronize().map_err(|e| Error::driver("stream synchronize", e))?;
                start.record(&c.stream).map_err(|e| Error::driver("event record", e))?;
                for _ in 0..iters {
                    f()?;
                }
                end.record(&c.stream).map_err(|e| Error::driver("event record", e))?;
                end.synchronize().map_err(|e| Error::driver("event synchronize", e))?;
                let ms = start.elapsed_ms(&end).map_err(|e| Error::driver("event elapsed", e))?;
                Ok(Duration::from_secs_f64(ms as f64 / 1e3))
            }
            _ => {
                let t = Instant::now();
                for _ in 0..iters {
                    f()?;
                }
                Ok(t.elapsed())
            }
        }
    }

    /// The duration of each of `samples` calls of `f`, every call timed on
    /// its own after one untimed warm-up call, as the kernel benchmarks time
    /// (a median over them is robust to a stray slow call). On a GPU: CUDA
    /// events around each call on the device's stream, and with `flush_l2`
    /// a write of a buffer twice the L2 cache before each call (not timed),
    /// so no call finds the previous one's data in L2. Elsewhere a host
    /// clock, and no flush (`flush_l2` is ignored: the CPU paths are timed
    /// warm).
    pub fn time_each<F: FnMut() -> Result<()>>(
        &self,
        samples: usize,
        flush_l2: bool,
        mut f: F,
    ) -> Result<Vec<Duration>> {
        f()?;
        match &self.inner {
            Inner::Cuda(c) => {
                let ev = || {
                    c.ctx
                        .new_event(Some(cusys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| Error::driver("event create", e))
                };
                // Held for the whole timing: f never times itself.
                let mut flush = c.flush.lock().unwrap_or_else(|p| p.into_inner());
                if flush_l2 {
                    c.ensure_flush(&mut flush)?;
                }
                let mut events = Vec::with_capacity(samples);
                for _ in 0..samples {
                    if let (true, Some(buf)) = (flush_l2, flush.as_mut()) {
                        c.stream.memset_zeros(buf).map_err(|e| Error::driver("L2 flush", e))?;
                    }
                    let (start, end) = (ev()?, ev()?);
                    start.record(&c.stream).map_err(|e| Error::driver("event record", e))?;
                    f()?;
                    end.record(&c.stream).map_err(|e| Error::driver("event record", e))?;
                    events.push((start, end));
                }
                c.stream.synchronize().map_err(|e| Error::driver("stream synchronize", e))?;
                events
                    .iter()
                    .map(|(a, b)| {
                        let ms = a.elapsed_ms(b).map_err(|e| Error::driver("event elapsed", e))?;
                        Ok(Duration::from_secs_f64(ms as f64 / 1e3))
                    })
                    .collect()
            }
            _ => (0..samples)
                .map(|_| {
                    let t = Instant::now();
                    f()?;
                    Ok(t.elapsed())
                })
                .collect(),
        }
    }

    /// What a benchmark reports about the machine: the GPU's name, SMs,
    /// clocks, L2 and driver, or the CPU's model and threads.
    pub fn info(&self) -> DeviceInfo {
        match &self.inner {
            Inner::Cuda(c) => {
                use cusys::CUdevice_attribute as A;
                let attr = |a: A| c.ctx.attribute(a).ok().and_then(|v| u64::try_from(v).ok());
                let mut driver = 0i32;
                // SAFETY: writes one int; the driver is loaded (a context exists).
                let ok = unsafe { cusys::cuDriverGetVersion(&mut driver) } == cusys::CUresult::CUDA_SUCCESS;
                DeviceInfo {
                    name: c.name.clone(),
                    compute_units: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
                    clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE).map(|k| k / 1000),
                    memory_clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).map(|k| k / 1000),
                    l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
                    driver: ok.then(|| format!("{}.{}", driver / 1000, (driver % 1000) / 10)),
                }
            }
            _ => DeviceInfo {
                name: match &self.inner {
                    Inner::Cpu => cpu_model(),
                    _ => self.to_string(),
                },
                compute_units: Some(rayon::current_num_threads() as u64),
                clock_mhz: None,
                memory_clock_mhz: None,
                l2_bytes: None,
                driver: None,
            },
        }
    }

    /// Maps `bytes` for this device's kernels ([`HostMapping`]).
    ///
    /// # Safety
    ///
    /// The memory must outlive the mapping and not move; while mapped,
    /// kernels may read it at any time.
    pub(crate) unsafe fn map_host(&self, bytes: &[u8]) -> Result<HostMapping> {
        const OP: &str = "map host memory";
        let host = bytes.as_ptr() as usize;
        match &self.inner {
            Inner::Cpu => Err(Error::invalid(OP, "the CPU reads host memory directly")),
            #[cfg(feature = "sim")]
            Inner::Sim(_) => Ok(HostMapping { device: self.clone(), host, addr: host as u64 }),
            Inner::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(|e| Error::driver("map host memory (bind context)", e))?;
                let p = host as *mut c_void;
                let flags = cusys::CU_MEMHOSTREGISTER_DEVICEMAP | cusys::CU_MEMHOSTREGISTER_PORTABLE;
                // SAFETY: p addresses bytes.len() bytes the caller keeps alive and in place.
                unsafe { cusys::cuMemHostRegister_v2(p, bytes.len(), flags) }.result().map_err(|e| {
                    Error::invalid(
                        OP,
                        format!(
                            "cannot page-lock {} bytes ({e}): raise the locked-memory limit (ulimit -l) or keep the \
                             data in device memory",
                            bytes.len()
                        ),
                    )
                })?;
                let mut addr: cusys::CUdeviceptr = 0;
                // SAFETY: p was registered above; addr is a local of the right type.
                if let Err(e) = unsafe { cusys::cuMemHostGetDevicePointer_v2(&mut addr, p, 0) }.result() {
                    // SAFETY: undoes the registration above.
                    let _ = unsafe { cusys::cuMemHostUnregister(p) };
                    return Err(Error::invalid(OP, format!("no device address for mapped host memory: {e}")));
                }
                Ok(HostMapping { device: self.clone(), host, addr })
            }
        }
    }

    /// `bytes` of page-locked host memory for this device's uploads: CUDA's
    /// `cuMemHostAlloc` (portable, not write-combined: the host reads it
    /// too); None on the simulator and the CPU, whose uploads are host
    /// copies. Counted in [`DeviceStats::pinned_allocations`] either way.
    pub(crate) fn page_locked(&self, bytes: usize) -> Result<Option<LockedHost>> {
        let Inner::Cuda(c) = &self.inner else {
            self.count(|m| &m.pinned_allocations);
            return Ok(None);
        };
        c.ctx.bind_to_thread().map_err(|e| Error::driver("page-lock host memory (bind context)", e))?;
        // SAFETY: allocates bytes.max(1) bytes; freed by LockedHost's drop.
        let ptr = unsafe { cu::result::malloc_host(bytes.max(1), cusys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(|e| {
            Error::OutOfMemory {
                op: "page-locked host memory",
                what: format!("{bytes} bytes of page-locked host memory ({e})"),
                bytes,
                free: None,
            }
        })?;
        self.count(|m| &m.pinned_allocations);
        Ok(Some(LockedHost { ctx: c.ctx.clone(), ptr: ptr as usize }))
    }

    /// A point in this device's queue of work: an event recorded on its
    /// stream (CUDA); nothing on the simulator and the CPU, which run each
    /// operation when it is queued.
    pub(crate) fn mark(&self) -> Result<Mark> {
        match &self.inner {
            Inner::Cuda(c) => {
                c.stream.record_event(None).map(|e| Mark(Some(e))).map_err(|e| Error::driver("event record", e))
            }
            _ => Ok(Mark(None)),
        }
    }

    /// Copies `data` (page-locked host memory of this device) to device
    /// address `addr` without waiting: on CUDA the copy runs on a second
    /// stream, after `after` (the last work that reads the destination) and
    /// beside the kernels queued before it; the device's stream waits for
    /// the copy before the work queued after this call. Returns the copy's
    /// mark: `data` must stay in place and unwritten until it is done
    /// (`PinnedBuffer` keeps it). The range was checked by the tensor that
    /// holds it.
    ///
    /// # Safety
    ///
    /// `data` must be page-locked memory of this device (or any host memory
    /// on the simulator) that outlives the copy: kept in place and
    /// unwritten until the returned mark is done.
    pub(crate) unsafe fn upload_pinned(&self, data: &[u8], addr: u64, after: Option<&Mark>) -> Result<Mark> {
        const OP: &str = "upload (page-locked)";
        if data.is_empty() {
            return Ok(Mark(None));
        }
        self.count(|m| &m.uploads);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid(OP, "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.write(addr, data).map(|()| Mark(None)),
            Inner::Cuda(c) => {
                let drv = |what: &'static str| move |e| Error::driver(what, e);
                c.ctx.bind_to_thread().map_err(drv("upload (bind context)"))?;
                let copies = c.copy_stream()?;
                if let Some(Mark(Some(e))) = after {
                    copies.wait(e).map_err(drv("copy stream wait"))?;
                }
                // SAFETY: `data` stays valid until the mark below is done (the
                // caller's contract); `addr` as in copy_addr.
                unsafe { cu::result::memcpy_htod_async(addr, data, copies.cu_stream()) }
                    .map_err(drv("upload (page-locked)"))?;
                let done = copies.record_event(None).map_err(drv("event record"))?;
                c.stream.wait(&done).map_err(drv("stream wait"))?;
                Ok(Mark(Some(done)))
            }
        }
    }

    /// Copies `out.len()` bytes at device address `addr` into `out`
    /// (page-locked host memory of this device) without waiting: on CUDA
    /// on the second stream, after the work queued on the device's stream
    /// so far (the values are final there), beside the work queued after.
    /// Returns the copy's mark. The range was checked by the tensor that
    /// holds it.
    ///
    /// # Safety
    ///
    /// `out` must be page-locked memory of this device (or any host memory
    /// on the simulator), kept in place and neither read nor written until
    /// the returned mark is done.
    pub(crate) unsafe fn download_pinned(&self, addr: u64, out: &mut [u8]) -> Result<Mark> {
        const OP: &str = "download (page-locked)";
        if out.is_empty() {
            return Ok(Mark(None));
        }
        self.count(|m| &m.downloads);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid(OP, "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.read(addr, out).map(|()| Mark(None)),
            Inner::Cuda(c) => {
                let drv = |what: &'static str| move |e| Error::driver(what, e);
                let copies = c.side_after_main()?;
                // SAFETY: `out` stays valid and untouched until the mark
                // below is done (the caller's contract); `addr` as in
                // copy_addr.
                unsafe { cu::result::memcpy_dtoh_async(out, addr, copies.cu_stream()) }.map_err(drv(OP))?;
                copies.record_event(None).map(|e| Mark(Some(e))).map_err(drv("event record"))
            }
        }
    }

    /// Copies `bytes` bytes from device address `src` to `dst` on the
    /// second stream, after the work queued on the device's stream so far
    /// (the source is final there), beside the work queued after; nothing
    /// on the device's stream waits for it until [`Device::join_side`]. The
    /// tensors that hold both ranges checked them; the caller keeps both
    /// alive and the destination unread until the join.
    pub(crate) fn copy_on_side(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.count(|m| &m.device_copies);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("copy (second stream)", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.copy(src, dst, bytes),
            Inner::Cuda(c) => {
                let side = c.side_after_main()?;
                // SAFETY: both ranges lie in memory of this context (the
                // caller's tensors), ordered on the second stream after the
                // work that wrote the source.
                unsafe { cu::result::memcpy_dtod_async(dst, src, bytes, side.cu_stream()) }
                    .map_err(|e| Error::driver("copy (second stream)", e))
            }
        }
    }

    /// The second stream, made to wait for the work queued on the device's
    /// stream so far: for a library (NCCL) that queues work there. None on
    /// the simulator and the CPU.
    pub(crate) fn side_stream(&self) -> Result<Option<Arc<CudaStream>>> {
        match &self.inner {
            Inner::Cuda(c) => c.side_after_main().map(|s| Some(s.clone())),
            _ => Ok(None),
        }
    }

    /// Makes the device's stream wait for the work queued on the second
    /// stream so far (no host wait).
    pub(crate) fn join_side(&self) -> Result<()> {
        match &self.inner {
            Inner::Cuda(c) => {
                let drv = |what: &'static str| move |e| Error::driver(what, e);
                c.ctx.bind_to_thread().map_err(drv("join (bind context)"))?;
                let side = c.copy_stream()?;
                let done = side.record_event(None).map_err(drv("event record"))?;
                c.stream.wait(&done).map_err(drv("stream wait"))
            }
            _ => Ok(()),
        }
    }

    /// An uninitialized buffer of `bytes` (poisoned when the device poisons).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("alloc", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => Ok(s.meter.track(Mem::Sim(s.sim.alloc(bytes)?), bytes)),
            Inner::Cuda(c) => {
                let n = bytes.max(1);
                // SAFETY: the memory is uninitialized until poisoned or written
                // by a kernel / upload; it is only read after one of those.
                let buf = unsafe { c.stream.alloc::<u8>(n) }.map_err(|e| c.alloc_error("alloc", n, e))?;
                if self.poison {
                    let (ptr, _sync) = cu::DevicePtr::device_ptr(&buf, &c.stream);
                    // SAFETY: ptr addresses n bytes allocated above on this stream.
                    unsafe { cu::result::memset_d8_async(ptr, POISON, n, c.stream.cu_stream()) }
                        .map_err(|e| Error::driver("memset (poison)", e))?;
                }
                Ok(c.meter.track(Mem::Cuda(buf), bytes))
            }
        }
    }

    /// A buffer of `bytes` zero bytes.
    pub(crate) fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuffer> {
        let mut buf = self.alloc(bytes)?;
        self.count(|m| &m.device_copies);
        match (&self.inner, &mut buf.mem) {
            #[cfg(feature = "sim")]
            (Inner::Sim(_), Mem::Sim(b)) => b.as_bytes_mut().fill(0),
            (Inner::Cuda(c), Mem::Cuda(b)) => {
                let n = bytes.max(1);
                let (ptr, _sync) = cu::DevicePtr::device_ptr(&*b, &c.stream);
                // SAFETY: ptr addresses the n bytes allocated above on this stream.
                unsafe { cu::result::memset_d8_async(ptr, 0, n, c.stream.cu_stream()) }
                    .map_err(|e| Error::driver("memset", e))?;
            }
            _ => return Err(Error::invalid("alloc_zeroed", "buffer and device differ")),
        }
        Ok(buf)
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn upload(&self, data: &[u8]) -> Result<DeviceBuffer> {
        self.count(|m| &m.uploads);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("upload", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => {
                let mut b = s.sim.alloc(data.len())?;
                b.as_bytes_mut().copy_from_slice(data);
                Ok(s.meter.track(Mem::Sim(b), data.len()))
            }
            Inner::Cuda(c) => {
                if data.is_empty() {
                    return self.alloc(0);
                }
                let buf = c.stream.clone_htod(data).map_err(|e| c.alloc_error("upload", data.len(), e))?;
                Ok(c.meter.track(Mem::Cuda(buf), data.len()))
            }
        }
    }

    /// The first `len` bytes of `buf`, copied to the host (waits for the
    /// stream).
    pub(crate) fn download(&self, buf: &DeviceBuffer, len: usize) -> Result<Vec<u8>> {
        if len > buf.bytes {
            return Err(Error::invalid("download", format!("{len} bytes exceed a buffer of {}", buf.bytes)));
        }
        self.download_addr(self.ptr(buf), len)
    }

    /// Copies `bytes` bytes from device address `src` to `dst` (queued on
    /// the stream). The tensors that hold both ranges checked them.
    pub(crate) fn copy_addr(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.count(|m| &m.device_copies);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("copy", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.copy(src, dst, bytes),
            Inner::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(|e| Error::driver("copy (bind context)", e))?;
                // SAFETY: both ranges lie in memory of this context (tensors
                // of this device; caller memory by the contract of the
                // unsafe constructors), ordered on this stream.
                unsafe { cu::result::memcpy_dtod_async(dst, src, bytes, c.stream.cu_stream()) }
                    .map_err(|e| Error::driver("copy", e))
            }
        }
    }

    /// Copies `data` to device address `addr` (the range checked by the
    /// tensor that holds it). Waits for the copy: `data` may be dropped on
    /// return.
    pub(crate) fn upload_addr(&self, data: &[u8], addr: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.count(|m| &m.uploads);
        self.count(|m| &m.syncs);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("upload", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.write(addr, data),
            Inner::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(|e| Error::driver("upload (bind context)", e))?;
                // SAFETY: as in copy_addr; `data` outlives the synchronize below.
                unsafe { cu::result::memcpy_htod_async(addr, data, c.stream.cu_stream()) }
                    .map_err(|e| Error::driver("upload", e))?;
                c.stream.synchronize().map_err(|e| Error::driver("upload (synchronize)", e))
            }
        }
    }

    /// Sets `bytes` bytes at device address `addr` to zero (queued).
    pub(crate) fn zero_addr(&self, addr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.count(|m| &m.device_copies);
        match &self.inner {
            Inner::Cpu => Err(Error::invalid("zero", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.fill(addr, bytes, 0),
            Inner::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(|e| Error::driver("memset (bind context)", e))?;
                // SAFETY: as in copy_addr.
                unsafe { cu::result::memset_d8_async(addr, 0, bytes, c.stream.cu_stream()) }
                    .map_err(|e| Error::driver("memset", e))
            }
        }
    }

    /// `len` bytes at device address `addr`, copied to the host (waits for
    /// the stream).
    pub(crate) fn download_addr(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        self.count(|m| &m.downloads);
        self.count(|m| &m.syncs);
        match &self.inner {
            Inner::Cpu => return Err(Error::invalid("download", "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.read(addr, &mut out)?,
            Inner::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(|e| Error::driver("download (bind context)", e))?;
                // SAFETY: as in copy_addr; `out` holds len bytes and outlives
                // the synchronize below.
                unsafe { cu::result::memcpy_dtoh_async(&mut out[..], addr, c.stream.cu_stream()) }
                    .map_err(|e| Error::driver("download", e))?;
                c.stream.synchronize().map_err(|e| Error::driver("download (synchronize)", e))?;
            }
        }
        Ok(out)
    }

    /// Checks that `len` bytes at `addr` are device memory this device can
    /// address: on the simulator, inside one live allocation; on a GPU the
    /// driver's attributes of the pointer (its context); the CPU has none.
    pub(crate) fn check_range(&self, op: &'static str, addr: u64, len: usize) -> Result<()> {
        match &self.inner {
            Inner::Cpu => Err(Error::invalid(op, "the CPU device has no device memory")),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.check_range(addr, len).map_err(|m| Error::invalid(op, m)),
            Inner::Cuda(c) => {
                if len == 0 {
                    return Ok(());
                }
                c.ctx.bind_to_thread().map_err(|e| Error::driver("pointer check (bind context)", e))?;
                let ctx_of = |a: u64| -> Result<cusys::CUcontext> {
                    let mut ctx: cusys::CUcontext = std::ptr::null_mut();
                    // SAFETY: queries an attribute into a local of the right type.
                    unsafe {
                        cusys::cuPointerGetAttribute(
                            (&mut ctx as *mut cusys::CUcontext).cast(),
                            cusys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
                            a,
                        )
                    }
                    .result()
                    .map_err(|e| Error::invalid(op, format!("{a:#x} is not device memory the driver knows: {e}")))?;
                    Ok(ctx)
                };
                let last = addr
                    .checked_add(len as u64 - 1)
                    .ok_or_else(|| Error::invalid(op, "the range wraps around the address space"))?;
                for a in [addr, last] {
                    if ctx_of(a)? != c.ctx.cu_ctx() {
                        return Err(Error::invalid(op, format!("{a:#x} belongs to another CUDA context")));
                    }
                }
                Ok(())
            }
        }
    }

    /// The device address of `buf`, for a kernel argument.
    pub(crate) fn ptr(&self, buf: &DeviceBuffer) -> u64 {
        match (&self.inner, &buf.mem) {
            (Inner::Cuda(c), Mem::Cuda(b)) => cu::DevicePtr::device_ptr(b, &c.stream).0,
            #[cfg(feature = "sim")]
            (_, Mem::Sim(b)) => b.addr(),
            (_, Mem::Cuda(b)) => {
                // Not reachable through the public API (tensors keep their
                // device); the address is still the right one.
                cu::DevicePtr::device_ptr(b, b.stream()).0
            }
        }
    }

    /// `buf` as read-only `T` elements for a kernel.
    pub(crate) fn ptr_of<T>(&self, buf: &DeviceBuffer) -> Ptr<T> {
        Ptr::from_addr(self.ptr(buf))
    }

    /// `buf` as `T` elements a kernel writes.
    pub(crate) fn ptr_mut_of<T>(&self, buf: &mut DeviceBuffer) -> PtrMut<T> {
        PtrMut::from_addr(self.ptr(buf))
    }

    /// The counts of launches, allocations, copies and host waits on this
    /// GPU backend (None on the CPU).
    pub fn stats(&self) -> Option<DeviceStats> {
        let m = self.meter()?;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Some(DeviceStats {
            launches: g(&m.launches),
            allocations: g(&m.allocations),
            bytes_allocated: g(&m.bytes_allocated),
            uploads: g(&m.uploads),
            downloads: g(&m.downloads),
            device_copies: g(&m.device_copies),
            syncs: g(&m.syncs),
            pinned_allocations: g(&m.pinned_allocations),
        })
    }

    /// Restarts every count of [`Device::stats`] from zero.
    pub fn reset_stats(&self) {
        if let Some(m) = self.meter() {
            for c in [
                &m.launches,
                &m.allocations,
                &m.bytes_allocated,
                &m.uploads,
                &m.downloads,
                &m.device_copies,
                &m.syncs,
                &m.pinned_allocations,
            ] {
                c.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Adds one to the counter `which` picks (GPU backends).
    fn count(&self, which: impl Fn(&Meter) -> &AtomicU64) {
        if let Some(m) = self.meter() {
            bump(which(m));
        }
    }

    /// Device memory held by the crate's buffers on this GPU backend (None on
    /// the CPU, whose tensors are ordinary host memory).
    pub fn memory_stats(&self) -> Option<MemoryStats> {
        let m = self.meter()?;
        Some(MemoryStats { current: m.current.load(Ordering::Relaxed), peak: m.peak.load(Ordering::Relaxed) })
    }

    /// Restarts [`MemoryStats::peak`] from the memory held now.
    pub fn reset_peak_memory(&self) {
        if let Some(m) = self.meter() {
            m.peak.store(m.current.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn meter(&self) -> Option<&Arc<Meter>> {
        match &self.inner {
            Inner::Cpu => None,
            Inner::Cuda(c) => Some(&c.meter),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => Some(&s.meter),
        }
    }

    /// The cuBLAS handle of a CUDA device (created once, bound to the
    /// device's stream, default math mode: no TF32 for f32 GEMMs).
    pub(crate) fn cublas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        let Inner::Cuda(c) = &self.inner else {
            return Err(Error::invalid("cublas", format!("cuBLAS needs a CUDA device, not {self}")));
        };
        let mut b = c.blas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = b.as_ref() {
            return Ok(h.clone());
        }
        // SAFETY: only probes whether the library can be loaded.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::driver("cublas", "libcublas could not be loaded"));
        }
        let h = cudarc::cublas::CudaBlas::new(c.stream.clone()).map_err(|e| Error::driver("cublas create", e))?;
        // SAFETY: a valid handle; CUBLAS_DEFAULT_MATH disables TF32 for f32.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(*h.handle(), cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        }
        .result()
        .map_err(|e| Error::driver("cublas math mode", e))?;
        let h = Arc::new(h);
        *b = Some(h.clone());
        Ok(h)
    }

    /// Runs kernel `k` with `args`: the one launch path of both GPU
    /// backends, reached through the typed launchers of
    /// [`crate::runtime::launch`] (the CPU has no kernels).
    ///
    /// The caller (an op's public function) has validated every size, so
    /// the pointers cover what the kernel touches.
    pub(crate) fn launch_kernel(&self, k: KernelRef, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.count(|m| &m.launches);
        match &self.inner {
            Inner::Cpu => Err(Error::Kernel {
                module: k.module.name(),
                kernel: k.name,
                message: "the CPU device runs no kernels".into(),
            }),
            #[cfg(feature = "sim")]
            Inner::Sim(s) => s.sim.launch(k, &cfg, args),
            Inner::Cuda(c) => c.launch(k, &cfg, args),
        }
    }
}

// ---------------------------------------------------------------------------
// CUDA.

pub(crate) struct CudaBackend {
    ordinal: usize,
    /// Runs on a caller's stream ([`Device::from_stream`]).
    external: bool,
    meter: Arc<Meter>,
    name: String,
    cc: (i32, i32),
    total_memory: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<Vec<Option<Arc<CudaModule>>>>,
    /// cuBLAS on this device's stream, created at first use (benchmarks'
    /// baseline).
    blas: Mutex<Option<Arc<cudarc::cublas::CudaBlas>>>,
    /// Loaded functions, with the dynamic shared memory each was allowed.
    functions: Mutex<FunctionCache>,
    /// The buffer [`Device::time_each`] writes to flush L2 (twice its size),
    /// allocated at first use.
    flush: Mutex<Option<CudaSlice<u8>>>,
    /// The second stream that uploads from page-locked memory run on
    /// ([`Device::upload_pinned`]), created at first use.
    copies: OnceLock<Arc<CudaStream>>,
}

/// Per module and kernel index: the loaded function and the dynamic shared
/// memory (bytes) it may use.
type FunctionCache = Vec<Vec<Option<(CudaFunction, u32)>>>;

impl CudaBackend {
    /// The second stream, for copies beside the kernels, created at first
    /// use (the caller bound the context).
    fn copy_stream(&self) -> Result<&Arc<CudaStream>> {
        if let Some(s) = self.copies.get() {
            return Ok(s);
        }
        let s = self.ctx.new_stream().map_err(|e| Error::driver("copy stream create", e))?;
        Ok(self.copies.get_or_init(|| s))
    }

    /// The second stream, after the work queued on the device's stream so
    /// far (binds the context).
    fn side_after_main(&self) -> Result<&Arc<CudaStream>> {
        let drv = |what: &'static str| move |e| Error::driver(what, e);
        self.ctx.bind_to_thread().map_err(drv("second stream (bind context)"))?;
        let side = self.copy_stream()?;
        let now = self.stream.record_event(None).map_err(drv("event record"))?;
        side.wait(&now).map_err(drv("second stream wait"))?;
        Ok(side)
    }

    /// The backend for `ordinal`, created once per process.
    fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut d = devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = d.get(&ordinal) {
            return Ok(b.clone());
        }
        let b = Arc::new(CudaBackend::open(ordinal)?);
        d.insert(ordinal, b.clone());
        Ok(b)
    }

    fn open(ordinal: usize) -> Result<CudaBackend> {
        // cudarc panics when libcuda is missing; probe first (anchors.md).
        // SAFETY: only attempts to dlopen the driver library.
        if !unsafe { cusys::is_culib_present() } {
            return Err(Error::NoDriver(
                "libcuda.so could not be loaded (no NVIDIA driver installed, or not on the library path)".into(),
            ));
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) => {
                let msg = e.to_string();
                return Err(Error::NoGpu(if msg.contains("NO_DEVICE") {
                    "the driver reports no CUDA-capable device".to_string()
                } else {
                    format!("the driver failed to initialize: {msg}")
                }));
            }
        };
        if ordinal >= count {
            return Err(Error::NoGpu(format!("GPU {ordinal} requested, the driver reports {count} device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoGpu(format!("could not open GPU {ordinal}: {e}")))?;
        // One stream per device: every op is ordered on it, so cudarc's
        // per-buffer event tracking is unnecessary.
        // SAFETY: no buffers exist yet on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| Error::driver("stream create", e))?;
        CudaBackend::with_stream(ctx, stream, false)
    }

    /// A backend on the caller's `stream` (its context stays as the caller
    /// set it up, event tracking included).
    fn on_stream(stream: Arc<CudaStream>) -> Result<CudaBackend> {
        // A stream exists only if the driver loaded, so cudarc cannot panic
        // on a missing library here.
        let ctx = stream.context().clone();
        CudaBackend::with_stream(ctx, stream, true)
    }

    fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, external: bool) -> Result<CudaBackend> {
        let ordinal = ctx.ordinal();
        let name = ctx.name().map_err(|e| Error::driver("device name", e))?;
        let cc = ctx.compute_capability().map_err(|e| Error::driver("compute capability", e))?;
        let total_memory = ctx.total_mem().map_err(|e| Error::driver("device memory", e))?;
        if cc.0 < 8 {
            return Err(Error::NoGpu(format!(
                "{name} has compute capability {}.{}; the kernels need 8.0 or later",
                cc.0, cc.1
            )));
        }
        Ok(CudaBackend {
            ordinal,
            external,
            meter: Default::default(),
            name,
            cc,
            total_memory,
            ctx,
            stream,
            modules: Mutex::new(vec![None; MODULES.len()]),
            blas: Mutex::new(None),
            functions: Mutex::new(MODULES.iter().map(|m| vec![None; m.kernels.len()]).collect()),
            flush: Mutex::new(None),
            copies: OnceLock::new(),
        })
    }

    /// Allocates the L2 flush buffer into `slot` if empty: twice the L2
    /// cache, at least 64 MiB.
    fn ensure_flush(&self, slot: &mut Option<CudaSlice<u8>>) -> Result<()> {
        if slot.is_none() {
            let l2 = self
                .ctx
                .attribute(cusys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                .map_err(|e| Error::driver("L2 size", e))?;
            let bytes = (2 * l2.max(0) as usize).max(64 << 20);
            *slot = Some(self.stream.alloc_zeros::<u8>(bytes).map_err(|e| self.alloc_error("L2 flush", bytes, e))?);
        }
        Ok(())
    }

    /// `e` from allocating `bytes`: out of memory (with the free memory the
    /// driver reports) when it is, a driver error otherwise.
    fn alloc_error(&self, op: &'static str, bytes: usize, e: cu::DriverError) -> Error {
        if e.0 != cusys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Error::driver(op, e);
        }
        let free = self.ctx.bind_to_thread().ok().and_then(|_| cu::result::mem_get_info().ok()).map(|(f, _)| f);
        Error::OutOfMemory { op, what: format!("device memory on {}", self.name), bytes, free }
    }

    /// The module, loaded on first use (nvcc's PTX, or NVRTC's).
    fn module(&self, id: ModuleId) -> Result<Arc<CudaModule>> {
        let mut m = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &m[id as usize] {
            return Ok(module.clone());
        }
        let ptx = kernels::ptx(id)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.into_owned()))
            .map_err(|e| Error::ModuleLoad { module: id.name(), message: e.to_string() })?;
        m[id as usize] = Some(module.clone());
        Ok(module)
    }

    /// The function handle, loaded once; raises its dynamic shared memory
    /// limit the first time a launch needs more than the default 48 KiB.
    fn function(&self, k: KernelRef, shared_bytes: u32) -> Result<CudaFunction> {
        let kerr = |message: String| Error::Kernel { module: k.module.name(), kernel: k.name, message };
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let slot = fns
            .get_mut(k.module as usize)
            .and_then(|m| m.get_mut(k.index as usize))
            .ok_or_else(|| kerr(format!("no kernel {} in the module", k.index)))?;
        if slot.is_none() {
            let module = self.module(k.module)?;
            let f = module.load_function(k.name).map_err(|e| kerr(format!("not found in the module: {e}")))?;
            *slot = Some((f, 48 * 1024));
        }
        let Some((f, allowed)) = slot.as_mut() else { return Err(kerr("the function cache lost an entry".into())) };
        if shared_bytes > *allowed {
            f.set_attribute(
                cusys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .map_err(|e| kerr(format!("cannot raise dynamic shared memory to {shared_bytes} bytes: {e}")))?;
            *allowed = shared_bytes;
        }
        Ok(f.clone())
    }

    fn launch(&self, k: KernelRef, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let kerr = |message: String| Error::Kernel { module: k.module.name(), kernel: k.name, message };
        let f = self.function(k, cfg.shared_bytes)?;
        let mut values: Vec<[u8; 8]> = args.iter().map(Arg::bytes).collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        self.ctx.bind_to_thread().map_err(|e| kerr(format!("bind context: {e}")))?;
        // SAFETY: `params` points at one value per kernel parameter, each
        // holding the parameter's bytes (little-endian, as the device reads
        // them); the op that built `args` validated every size against the
        // buffers it passes. The values outlive the call, which copies them.
        unsafe {
            cu::result::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| kerr(format!("launch failed (grid {:?}, block {:?}): {e}", cfg.grid, cfg.block)))
    }
}
