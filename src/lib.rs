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
//! Devices: [`Device::cpu`], [`Device::cuda`], `Device::sim` (cargo feature `sim`). Data:
//! [`Tensor`]. Ops: [`rowwise`], [`gemm`], [`tokenizer`], [`head`],
//! [`decode`] (more families follow: the O(N) baselines, the backbone).
//!
//! ```
//! use gif_fr::{rowwise, DType, Device, Tensor};
//!
//! let dev = Device::best(); // the first GPU, else the CPU
//! let x = Tensor::from_f32(&dev, &[2, 3], &[1.0, 2.0, 2.0, 0.0, 3.0, 4.0], DType::F32)?;
//! let (y, norms) = rowwise::l2_normalize(&x, 1e-12)?;
//! assert_eq!(norms.to_vec::<f32>()?, vec![3.0, 5.0]);
//! assert_eq!(y.to_vec::<f32>()?, vec![1.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 0.0, 0.6, 0.8]);
//!
//! // The same op on the simulated GPU (cargo feature `sim`, on by default)
//! // runs kernels/rowwise.cu on the CPU.
//! #[cfg(feature = "sim")]
//! {
//!     let sim = Device::sim();
//!     let (_, n) = rowwise::l2_normalize(&x.to_device(&sim)?, 1e-12)?;
//!     assert_eq!(n.to_vec::<f32>()?, vec![3.0, 5.0]);
//! }
//! # Ok::<(), gif_fr::Error>(())
//! ```
#![warn(missing_docs)]

pub mod backbone;
pub mod decode;
pub mod device;
pub mod error;
pub mod gemm;
mod hash;
pub mod head;
pub mod host_memory;
pub mod kernels;
pub mod rowwise;
pub mod selftest;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tensor;
pub mod tokenizer;

pub use device::{Device, DeviceKind, GpuInfo, MemoryStats};
pub use error::{Error, Result};
#[cfg(feature = "sim")]
pub use sim::SimOrder;
pub use tensor::{DType, Element, Tensor};
