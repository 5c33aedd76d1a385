//! The runtime every op stands on: devices and their backends ([`device`]:
//! the CPU, CUDA through the driver, and the simulated GPU, [`sim`], with
//! its [`selftest`]s), [`tensor`]s and element types, the kernel modules
//! and their typed [`launch`]ers ([`kernels`]), page-locked host memory
//! for asynchronous uploads ([`pinned`]), and memory accounting
//! ([`host_memory`] for the CPU; `Device::memory_stats` for GPUs).
//!
//! (The issue that created this layer called it `core/`; a module named
//! `core` would shadow the `core` crate in every path, so it is `runtime`.)

pub mod device;
pub(crate) mod dtype;
pub(crate) mod hash;
pub mod host_memory;
pub mod kernels;
pub mod launch;
pub mod pinned;
pub mod selftest;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tensor;
