//! The kernel modules: one per `kernels/*.cu`, with its PTX (when build.rs
//! found nvcc), its source for NVRTC and the simulator, and its kernel names.

/// One kernel module as build.rs embedded it.
#[derive(Debug)]
pub struct ModuleSource {
    /// Its identifier.
    pub id: ModuleId,
    /// The file stem: kernels/NAME.cu.
    pub name: &'static str,
    /// PTX for compute_80 from nvcc, or `None` when the crate was built
    /// without nvcc (the CUDA backend then compiles `source` with NVRTC).
    pub ptx: Option<&'static str>,
    /// The module's source with its local headers inlined.
    pub source: &'static str,
    /// Every `extern "C" __global__` kernel, in source order.
    pub kernels: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The byte fresh allocations are filled with when poisoned (0xFF: NaN in
/// every float type), on the simulator always and on a GPU on request.
pub const POISON: u8 = 0xFF;

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Bytes of dynamic shared memory per block.
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A one-dimensional launch.
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> Self {
        LaunchConfig { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_bytes }
    }
}

/// One kernel argument, passed by value as the kernel's parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device address (a `T*` parameter).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl Arg {
    #[cfg(feature = "sim")]
    pub(crate) fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) | Arg::I64(_) | Arg::U64(_) => 8,
            Arg::I32(_) | Arg::U32(_) | Arg::F32(_) => 4,
        }
    }
    /// Little-endian bytes, zero-padded to 8.
    pub(crate) fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match *self {
            Arg::Ptr(v) | Arg::U64(v) => b.copy_from_slice(&v.to_le_bytes()),
            Arg::I64(v) => b.copy_from_slice(&v.to_le_bytes()),
            Arg::I32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
            Arg::U32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
            Arg::F32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
        }
        b
    }
    /// The simulator's argument kinds (kernels/sim/gif_sim.h ArgKind).
    #[cfg(feature = "sim")]
    pub(crate) fn sim_kind(&self) -> u8 {
        match self {
            Arg::Ptr(_) => 1,
            Arg::I32(_) | Arg::U32(_) | Arg::I64(_) | Arg::U64(_) => 2,
            Arg::F32(_) => 3,
        }
    }
}

/// One kernel: its module and its index there (source order), and its name
/// for messages. The launchers look kernels up by index, never by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelRef {
    /// The module, kernels/NAME.cu.
    pub module: ModuleId,
    /// Its position in [`ModuleSource::kernels`].
    pub index: u16,
    /// Its name.
    pub name: &'static str,
}

/// A device address of `T` elements a kernel reads (`const T*`). Typed, so
/// that a launcher given the wrong element type does not compile; it says
/// nothing about how many elements are there (the launcher's safety
/// contract).
pub struct Ptr<T> {
    addr: u64,
    _t: std::marker::PhantomData<fn() -> T>,
}
/// A device address of `T` elements a kernel writes (`T*`).
pub struct PtrMut<T> {
    addr: u64,
    _t: std::marker::PhantomData<fn() -> T>,
}

macro_rules! pointer {
    ($p:ident) => {
        impl<T> Clone for $p<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $p<T> {}
        impl<T> std::fmt::Debug for $p<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}<{}>({:#x})", stringify!($p), std::any::type_name::<T>(), self.addr)
            }
        }
        impl<T> $p<T> {
            /// The address `addr`, as `T` elements.
            pub const fn from_addr(addr: u64) -> Self {
                $p { addr, _t: std::marker::PhantomData }
            }
            /// The null pointer (for the kernels' optional arguments).
            pub const fn null() -> Self {
                Self::from_addr(0)
            }
            /// The address.
            pub const fn addr(self) -> u64 {
                self.addr
            }
            /// `elems` elements further on (wrapping, like pointer
            /// arithmetic; what is there is the launcher's contract).
            pub fn offset(self, elems: usize) -> Self {
                Self::from_addr(self.addr.wrapping_add((elems as u64).wrapping_mul(std::mem::size_of::<T>() as u64)))
            }
        }
    };
}
pointer!(Ptr);
pointer!(PtrMut);

impl<T> PtrMut<T> {
    /// The same address, read only.
    pub const fn as_const(self) -> Ptr<T> {
        Ptr::from_addr(self.addr)
    }
}

impl ModuleId {
    /// The embedded module.
    pub fn source(self) -> &'static ModuleSource {
        &MODULES[self as usize]
    }
    /// The file stem, kernels/NAME.cu.
    pub fn name(self) -> &'static str {
        self.source().name
    }
}

/// How the crate's kernels reach a GPU, in words (for `gif-fr info`).
pub fn build_mode() -> String {
    if BUILT_WITH_NVCC {
        format!("PTX (compute_80) from nvcc at build time ({NVCC_VERSION})")
    } else {
        "no nvcc at build time: NVRTC compiles the embedded sources at first use on a GPU".to_string()
    }
}

/// The PTX for `module`: nvcc's from build time, or else NVRTC's, compiled
/// once per process on first use.
pub fn ptx(module: ModuleId) -> crate::Result<std::borrow::Cow<'static, str>> {
    if let Some(p) = module.source().ptx {
        return Ok(std::borrow::Cow::Borrowed(p));
    }
    use std::sync::{Mutex, OnceLock};
    /// One slot per module: NVRTC's PTX, or its log.
    type Cache = Mutex<Vec<Option<std::result::Result<std::sync::Arc<str>, String>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(vec![None; MODULES.len()]));
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    let slot = &mut c[module as usize];
    if slot.is_none() {
        *slot = Some(compile_with_nvrtc(module).map(std::sync::Arc::from).map_err(|e| match e {
            crate::Error::Nvrtc { message, .. } => message,
            other => other.to_string(),
        }));
    }
    match slot.as_ref().expect("filled above") {
        Ok(p) => Ok(std::borrow::Cow::Owned(p.to_string())),
        Err(message) => Err(crate::Error::Nvrtc { module: module.name(), message: message.clone() }),
    }
}

/// Compiles `module`'s embedded source with NVRTC (libnvrtc, loaded at run
/// time) for compute_80, with the options build.rs gives nvcc. This needs no
/// GPU; it fails with [`crate::Error::Nvrtc`] when libnvrtc cannot be loaded.
pub fn compile_with_nvrtc(module: ModuleId) -> crate::Result<String> {
    use cudarc::nvrtc;
    let name = module.name();
    // SAFETY: only tries to dlopen the library; cudarc panics on a missing
    // library at the first real call, so probe first.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(crate::Error::Nvrtc {
            module: name,
            message: "libnvrtc could not be loaded (put the CUDA toolkit's lib folder on LD_LIBRARY_PATH)".into(),
        });
    }
    let opts = nvrtc::CompileOptions {
        arch: Some("compute_80"),
        options: vec!["-std=c++17".into(), "-lineinfo".into()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    match nvrtc::compile_ptx_with_opts(module.source().source, opts) {
        Ok(p) => Ok(p.to_src()),
        Err(nvrtc::CompileError::CompileError { log, .. }) => {
            Err(crate::Error::Nvrtc { module: name, message: log.to_string_lossy().into_owned() })
        }
        Err(e) => Err(crate::Error::Nvrtc { module: name, message: format!("{e:?}") }),
    }
}

/// The kernel `name` of `module` (a linear search: for tests and for
/// choosing a kernel by a computed name, never per launch of a fixed one).
pub fn kernel_ref(module: ModuleId, name: &str) -> crate::Result<KernelRef> {
    let k = module.source().kernels.iter().position(|k| *k == name).ok_or_else(|| crate::Error::Kernel {
        module: module.name(),
        kernel: "?",
        message: format!("no kernel named {name:?} in kernels/{}.cu", module.name()),
    })?;
    Ok(KernelRef { module, index: k as u16, name: module.source().kernels[k] })
}

/// Kernels allowed to spill registers to local memory under
/// `ptxas -arch=sm_90`, each with the reason. tests/ptx.rs fails on a spill
/// in any other kernel.
pub const SPILLS_ALLOWED: &[(&str, &str)] = &[(
    "gemm_f32_nn",
    "NVRTC's PTX only (the no-nvcc fallback): the scalar, unaligned-shape path spills 12 bytes at the \
     128-register cap of two blocks per SM; nvcc's PTX does not spill (2026-11-28, CUDA 13.0)",
)];
