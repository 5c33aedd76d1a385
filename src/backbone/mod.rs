//! The IResNet backbone (insightface's iresnet.py) on NHWC activations:
//! per-channel layers ([`norm`]: BatchNorm, PReLU, the residual add) so far;
//! convolutions, the network and checkpoints are the next steps (issue 8).

pub mod norm;

pub use norm::{add, prelu, prelu_backward, BatchNorm, BnCache, BnGrads};
