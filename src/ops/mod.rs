//! The building blocks every domain module uses, each one op with one door
//! (validation, then the CPU path or a typed launch): row operations
//! ([`rowwise`]), matrix products ([`gemm`]), row gathers, scatters and
//! updates ([`rows`]), class labels on the host or the device ([`labels`]),
//! and the k-best result type ([`topk`]).

pub mod gemm;
pub mod labels;
pub mod rows;
pub mod rowwise;
pub mod topk;
