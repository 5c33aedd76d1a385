//! gif-fr: hand-written CUDA kernels for face recognition at scale with
//! identity codes (GIF, CVPR 2025).
//!
//! An N-way margin softmax costs O(N) per sample. GIF gives each identity a
//! fixed code of `l` tokens in `[0, v)` (`v^l >= N`) and trains `l` parallel
//! `v`-way margin softmaxes: O(log N). This crate holds the kernels for both
//! sides of that comparison, their CPU references, and a simulator that runs
//! the same CUDA source on the CPU so every kernel is tested on every
//! machine.
//!
//! Devices: [`Device::cpu`], [`Device::cuda`], [`Device::sim`]. Data:
//! [`Tensor`]. Ops: [`rowwise`] (more families follow: GEMM, tokenizer,
//! heads, decoder, backbone).
#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod kernels;
pub mod rowwise;
pub mod selftest;
pub mod sim;
pub mod tensor;

pub use device::{Device, DeviceKind, GpuInfo};
pub use error::{Error, Result};
pub use sim::SimOrder;
pub use tensor::{DType, Element, Tensor};
