//! The crate's error type. Every fallible public function returns
//! [`Result`]; nothing in the library panics on bad input, a missing driver
//! or a missing GPU.

/// The error a driver, NVRTC or cuBLAS call returned, kept as the
/// [`std::error::Error::source`] of [`Error::Driver`].
pub type DriverSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, with enough context to act on it. New variants may be
/// added: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No CUDA driver library (libcuda) could be loaded.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    /// The driver loaded, but there is no usable GPU (none present, the
    /// ordinal is out of range, or initialization failed).
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// A CUDA driver (or cuBLAS) call failed.
    #[error("CUDA error in {context}: {source}")]
    Driver {
        /// What was being done: the operation, kernel or module.
        context: String,
        /// The driver's error (cudarc's `DriverError` for driver calls).
        #[source]
        source: DriverSource,
    },
    /// NVRTC could not compile a module's embedded source.
    #[error("NVRTC could not compile module {module}: {message}")]
    Nvrtc {
        /// The module (kernels/NAME.cu).
        module: &'static str,
        /// NVRTC's log, or why NVRTC is unavailable.
        message: String,
    },
    /// The driver could not load a module's PTX.
    #[error("could not load module {module}: {message}")]
    ModuleLoad {
        /// The module (kernels/NAME.cu).
        module: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A kernel launch was refused, or the simulator found a fault in a
    /// kernel (a missing barrier, a divergent barrier, an out-of-bounds
    /// write, ...).
    #[error("kernel {module}::{kernel}: {message}")]
    Kernel {
        /// The module (kernels/NAME.cu).
        module: &'static str,
        /// The kernel's name.
        kernel: &'static str,
        /// What happened.
        message: String,
    },
    /// Tensor shapes do not fit the operation.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What it needs.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// A tensor has the wrong element type.
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType {
        /// The operation.
        op: &'static str,
        /// What it needs.
        expected: crate::runtime::dtype::DType,
        /// What it was given.
        got: crate::runtime::dtype::DType,
    },
    /// Inputs live on different devices.
    #[error("{op}: inputs are on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// One device.
        a: String,
        /// The other.
        b: String,
    },
    /// A file could not be read or written, or its contents are invalid
    /// (truncated, corrupt, inconsistent).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Memory an operation needs could not be allocated: the allocator
    /// refused it (host), or the device is full.
    #[error("{op}: cannot allocate {bytes} bytes for {what}{}", free.map_or(String::new(), |f| format!(" ({f} bytes free on the device)")))]
    OutOfMemory {
        /// The operation.
        op: &'static str,
        /// What the memory was for.
        what: String,
        /// Bytes requested.
        bytes: usize,
        /// Device memory free when it failed, when known (GPUs).
        free: Option<usize>,
    },
    /// A collective across ranks failed: it timed out (a rank died, hung
    /// or called another collective), the ranks disagree (configurations,
    /// sizes), or the transport (MPI, NCCL) reported an error. Returned on
    /// every rank that sees it.
    #[error("{op} on rank {rank} of {world}: {message}")]
    Collective {
        /// The collective or the check.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// Ranks in all.
        world: usize,
        /// What happened.
        message: String,
    },
    /// Any other invalid argument: an empty set, a value out of range, a
    /// non-finite value where one is not allowed.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong, what was expected and what came.
        message: String,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { op, message: message.into() }
    }
    pub(crate) fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        Error::File { path: path.display().to_string(), message: message.into() }
    }
    pub(crate) fn driver(context: impl Into<String>, e: impl Into<DriverSource>) -> Self {
        Error::Driver { context: context.into(), source: e.into() }
    }
}
