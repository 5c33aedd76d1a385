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

/// The `&'static` name of kernel `name` in `module`, or an error when the
/// module has no such kernel (a build that lost an instance).
pub(crate) fn find(module: ModuleId, name: &str) -> crate::Result<&'static str> {
    module.source().kernels.iter().copied().find(|k| *k == name).ok_or_else(|| crate::Error::Kernel {
        module: module.name(),
        kernel: "?",
        message: format!("no kernel named {name} in kernels/{}.cu", module.name()),
    })
}

/// Kernels allowed to spill registers to local memory under
/// `ptxas -arch=sm_90`, each with the reason. tests/ptx.rs fails on a spill
/// in any other kernel.
pub const SPILLS_ALLOWED: &[(&str, &str)] = &[(
    "gemm_f32_nn",
    "NVRTC's PTX only (the no-nvcc fallback): the scalar, unaligned-shape path spills 12 bytes at the \
     128-register cap of two blocks per SM; nvcc's PTX does not spill (2026-11-28, CUDA 13.0)",
)];
