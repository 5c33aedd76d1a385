//! The IResNet backbone (insightface's iresnet.py) on NHWC activations:
//! per-channel layers ([`norm`]: BatchNorm, PReLU, the residual add) and the
//! convolution ([`conv`]: forward, data and weight gradients as implicit
//! GEMM), with kernels; the network ([`iresnet`]), insightface checkpoints
//! ([`checkpoint`]) and image files ([`images`]).

pub mod checkpoint;
pub mod conv;
pub mod images;
pub mod inference;
pub mod iresnet;
pub mod norm;
pub(crate) mod packed;
pub(crate) mod pool;

pub use conv::{
    conv2d, conv2d_data_grad, conv2d_data_grad_into, conv2d_into, conv2d_weight_grad, conv2d_weight_grad_into,
    ConvShape,
};
pub use inference::{FoldedIResNet, Kernels, Winograd};
pub use iresnet::{GradReady, IResNet, IResNetConfig};
pub use norm::{
    add, add_assign, bias_add, column_sums, prelu, prelu_backward, prelu_backward_into, prelu_into, BatchNorm, BnCache,
    BnGrads, Dropout,
};
