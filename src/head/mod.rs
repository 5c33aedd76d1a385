//! Classification heads: the GIF code head (O(log N)) and, later, the O(N)
//! baselines. Margins live in [`margin`], shared by all heads.

pub mod code_head;
pub mod margin;

pub use code_head::{CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadLoss};
pub use margin::{Margin, MarginGrad};
