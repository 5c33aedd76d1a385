//! Classification heads: the GIF code head (O(log N)) and the O(N)
//! baselines (the fused full margin softmax, Partial FC). Margins live in [`margin`], shared by all heads.

pub mod code_head;
pub mod cost;
pub mod margin;
pub mod partial_fc;
pub mod softmax_head;
mod stats;

pub use code_head::{CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadLoss, HeadMetrics};
pub use margin::{Margin, MarginGrad};
pub use partial_fc::{PartialFc, PfcGrads};
pub use softmax_head::{SoftmaxGrads, SoftmaxHead, SoftmaxHeadConfig, SoftmaxLoss, SoftmaxMetrics};
