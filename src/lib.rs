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
//! [`Tensor`]. Building blocks: [`ops`] (row operations, GEMM, row
//! gathers, top-k), [`io`] (file formats). The method: [`tokenizer`],
//! [`head`] (the code head and the O(N) baselines), [`decode`],
//! [`backbone`].
//!
//! ```
//! use gif_fr::ops::rowwise;
//! use gif_fr::{DType, Device, Tensor};
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
pub mod data;
pub mod decode;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod head;
pub mod io;
pub mod ops;
pub mod progress;
pub mod regress;
pub mod runtime;
pub mod tokenizer;
pub mod train;

/// The cudarc this crate is built on, for [`Device::from_stream`] and
/// [`Tensor::from_cuda`]: a dependent crate uses the same version through it.
pub use cudarc;
pub use error::{Error, Result};
pub use ops::labels::Labels;
pub use runtime::device::{Device, DeviceInfo, DeviceKind, DeviceStats, GpuInfo, MemoryStats};
#[cfg(feature = "sim")]
pub use runtime::sim::SimOrder;
pub use runtime::tensor::{DType, Element, Float, Tensor, TensorView};
