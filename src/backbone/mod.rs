//! The IResNet backbone (insightface's iresnet.py) on NHWC activations:
//! per-channel layers ([`norm`]: BatchNorm, PReLU, the residual add) with
//! kernels, and the convolution's CPU reference ([`conv`]); the convolution
//! kernels, the network and checkpoints are the next steps (issue 8).

pub mod conv;
pub mod norm;

pub use conv::ConvShape;
pub use norm::{add, prelu, prelu_backward, BatchNorm, BnCache, BnGrads};
