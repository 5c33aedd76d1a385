//! Element types: [`DType`] (what a tensor stores) and [`Element`] (the
//! Rust types that hold one), shared by tensors, errors and kernel
//! pointers.

use half::{bf16, f16};

/// Element type. The floating-point types hold features and weights; the
/// integer types hold labels (u32, or i64 as PyTorch stores them), which
/// only the ops that take labels accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE binary16.
    F16,
    /// Unsigned 32-bit integers (labels).
    U32,
    /// Signed 64-bit integers (labels, as PyTorch stores them).
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
        }
    }
    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
    /// The suffix of kernel names: f32, bf16, f16.
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
            DType::I64 => "i64",
        }
    }
}

/// A Rust element type a tensor can hold.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + 'static {
    /// Its [`DType`].
    const DTYPE: DType;
}

/// A floating-point [`Element`].
pub trait Float: Element {
    /// Converts to f32 (exactly).
    fn to_f32(self) -> f32;
    /// Converts from f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Float for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Float for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Float for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
