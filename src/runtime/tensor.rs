//! A small tensor: a shape, an element type and storage on one device. Only
//! what the ops need: upload, download, conversion. Row-major, contiguous.

use half::{bf16, f16};

pub use crate::runtime::dtype::{DType, Element};

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind};

/// Host storage, typed so that it is aligned for its element.
#[derive(Clone, Debug)]
pub(crate) enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostData {
    fn bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
        }
    }
    fn from_bytes(dtype: DType, b: &[u8]) -> HostData {
        // pod_collect_to_vec copies into a vector of the element type, so the
        // byte buffer needs no particular alignment.
        match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(b)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(b)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(b)),
        }
    }
    /// `v` stored as `dtype` (rounded to nearest even for 16-bit types).
    pub(crate) fn from_f32(v: Vec<f32>, dtype: DType) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(v),
            DType::BF16 => HostData::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
        }
    }
    fn nan(dtype: DType, n: usize) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(vec![f32::NAN; n]),
            DType::BF16 => HostData::BF16(vec![bf16::NAN; n]),
            DType::F16 => HostData::F16(vec![f16::NAN; n]),
        }
    }
}

pub(crate) enum Storage {
    Host(HostData),
    Device(DeviceBuffer),
}

/// A contiguous row-major tensor on one device.
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.shape, self.dtype, self.device)
    }
}

fn numel_of(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("shape {shape:?} has more elements than fit in usize")))
}

impl Tensor {
    /// A tensor holding a copy of `data`, which must have as many elements
    /// as `shape`.
    pub fn from_slice<T: Element>(device: &Device, shape: &[usize], data: &[T]) -> Result<Tensor> {
        let n = numel_of("Tensor::from_slice", shape)?;
        if n != data.len() {
            return Err(Error::Shape {
                op: "Tensor::from_slice",
                expected: format!("{n} elements for shape {shape:?}"),
                got: format!("{} elements", data.len()),
            });
        }
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(data))),
            _ => Storage::Device(device.upload(bytemuck::cast_slice(data))?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype: T::DTYPE, device: device.clone(), storage })
    }

    /// f32 values stored as `dtype` (rounded to nearest even).
    pub fn from_f32(device: &Device, shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_slice(device, shape, data),
            DType::BF16 => {
                Tensor::from_slice(device, shape, &data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
            }
            DType::F16 => {
                Tensor::from_slice(device, shape, &data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
            }
        }
    }

    /// A tensor whose contents are unspecified until written: NaN on the CPU
    /// and on devices that poison (the simulator, and GPUs with poisoning
    /// on), garbage otherwise.
    pub fn empty(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = numel_of("Tensor::empty", shape)?;
        let bytes = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid("Tensor::empty", format!("shape {shape:?} is too large")))?;
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::nan(dtype, n)),
            _ => Storage::Device(device.alloc(bytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    /// A tensor of zeros (filled on the device; no host copy).
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = numel_of("Tensor::zeros", shape)?;
        let bytes = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid("Tensor::zeros", format!("shape {shape:?} is too large")))?;
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::from_f32(vec![0.0; n], dtype)),
            _ => Storage::Device(device.alloc_zeroed(bytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    pub(crate) fn from_host(device: &Device, shape: Vec<usize>, data: HostData) -> Tensor {
        let dtype = match &data {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
        };
        Tensor { shape, dtype, device: device.clone(), storage: Storage::Host(data) }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// (rows, cols) of a 2-D tensor, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => {
                Err(Error::Shape { op, expected: "a 2-D tensor [rows, cols]".into(), got: format!("{:?}", self.shape) })
            }
        }
    }

    /// The elements as `T`, which must be the tensor's dtype. Waits for the
    /// device.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { op: "Tensor::to_vec", expected: self.dtype, got: T::DTYPE });
        }
        Ok(match &self.storage {
            Storage::Host(h) => bytemuck::pod_collect_to_vec(h.bytes()),
            Storage::Device(b) => {
                bytemuck::pod_collect_to_vec(&self.device.download(b, self.numel() * self.dtype.size())?)
            }
        })
    }

    /// The elements converted to f32. Waits for the device.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => self.to_vec::<f32>()?,
            DType::BF16 => self.to_vec::<bf16>()?.into_iter().map(bf16::to_f32).collect(),
            DType::F16 => self.to_vec::<f16>()?.into_iter().map(f16::to_f32).collect(),
        })
    }

    /// The elements as f32 for a CPU computation: borrowed when the tensor
    /// already holds f32 host data, converted (or downloaded) otherwise.
    pub(crate) fn host_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        use std::borrow::Cow;
        Ok(match &self.storage {
            Storage::Host(HostData::F32(v)) => Cow::Borrowed(&v[..]),
            Storage::Host(HostData::BF16(v)) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Storage::Host(HostData::F16(v)) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Storage::Device(_) => Cow::Owned(self.to_f32_vec()?),
        })
    }

    /// This tensor's values as f32, on its device (a copy; converted by a
    /// kernel on a GPU backend, without a trip through the host).
    pub fn to_f32(&self) -> Result<Tensor> {
        if self.device.kind() == DeviceKind::Cpu {
            let v = self.host_f32()?.into_owned();
            return Ok(Tensor::from_host(&self.device, self.shape.clone(), HostData::F32(v)));
        }
        let mut out = Tensor::empty(&self.device, &self.shape, DType::F32)?;
        self.convert(&mut out)?;
        Ok(out)
    }

    /// This tensor widened to f32 on its device when it holds 16-bit values;
    /// `None` when it is f32 already (use it as is):
    /// `t.widened()?.as_ref().unwrap_or(&t)`.
    pub(crate) fn widened(&self) -> Result<Option<Tensor>> {
        Ok(if self.dtype == DType::F32 { None } else { Some(self.to_f32()?) })
    }

    /// Writes this f32 tensor's values, rounded to nearest even, into the
    /// bf16 tensor `out` (as many elements, same device; shapes may
    /// differ): on a GPU backend a kernel, without a trip through the host.
    pub fn narrow_into(&self, out: &mut Tensor) -> Result<()> {
        const OP: &str = "Tensor::narrow_into";
        if self.dtype != DType::F32 || out.dtype != DType::BF16 || self.numel() != out.numel() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("f32 in, bf16 out, {} elements each", self.numel()),
                got: format!("{:?} in, {:?} out of {} elements", self.dtype, out.dtype, out.numel()),
            });
        }
        if self.device != out.device {
            return Err(Error::DeviceMismatch { op: OP, a: self.device.to_string(), b: out.device.to_string() });
        }
        if self.device.kind() == DeviceKind::Cpu {
            let v = self.host_f32()?;
            if let Some(HostData::BF16(d)) = out.host_mut() {
                d.iter_mut().zip(v.iter()).for_each(|(o, &x)| *o = bf16::from_f32(x));
            }
            return Ok(());
        }
        self.convert(out)
    }

    /// `out[i] = convert(self[i])` by the element kernels of rowwise.cu,
    /// on a GPU backend: `widen_*` into f32, or `narrow_bf16` from f32.
    fn convert(&self, out: &mut Tensor) -> Result<()> {
        use crate::runtime::launch::launch_one_of;
        let n = self.numel();
        if n == 0 {
            return Ok(());
        }
        let (dev, cfg) =
            (&self.device, crate::runtime::device::LaunchConfig::linear(n.div_ceil(256).min(65535) as u32, 256, 0));
        // SAFETY: the callers checked both tensors hold n elements on this device.
        unsafe {
            launch_one_of!((self.dtype, out.dtype), {
                (DType::BF16, DType::F32) => widen_bf16,
                (DType::F16, DType::F32) => widen_f16,
                (DType::F32, DType::F32) => widen_f32,
                (_, _) => narrow_bf16,
            }, (dev, cfg, self.ptr()?, out.ptr_mut()?, n as i64))
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let host = self.host_data()?;
        match device.kind() {
            DeviceKind::Cpu => Ok(Tensor::from_host(device, self.shape.clone(), host)),
            _ => Ok(Tensor {
                shape: self.shape.clone(),
                dtype: self.dtype,
                device: device.clone(),
                storage: Storage::Device(device.upload(host.bytes())?),
            }),
        }
    }

    pub(crate) fn host_data(&self) -> Result<HostData> {
        Ok(match &self.storage {
            Storage::Host(h) => h.clone(),
            Storage::Device(b) => {
                HostData::from_bytes(self.dtype, &self.device.download(b, self.numel() * self.dtype.size())?)
            }
        })
    }

    /// Host data of a CPU tensor, without a copy.
    pub(crate) fn host(&self) -> Option<&HostData> {
        match &self.storage {
            Storage::Host(h) => Some(h),
            Storage::Device(_) => None,
        }
    }

    /// The same data with another shape of as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n = numel_of("Tensor::reshape", shape)?;
        if n != self.numel() {
            return Err(Error::Shape {
                op: "Tensor::reshape",
                expected: format!("{} elements", self.numel()),
                got: format!("shape {shape:?} ({n} elements)"),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Host data of a CPU tensor, mutable.
    pub(crate) fn host_mut(&mut self) -> Option<&mut HostData> {
        match &mut self.storage {
            Storage::Host(h) => Some(h),
            Storage::Device(_) => None,
        }
    }

    /// Overwrites this tensor's elements with `src`'s (same dtype, device and
    /// number of elements; shapes may differ), on the device.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        const OP: &str = "Tensor::copy_from";
        if src.dtype != self.dtype || src.numel() != self.numel() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{} {:?} elements", self.numel(), self.dtype),
                got: format!("{} {:?} elements", src.numel(), src.dtype),
            });
        }
        if src.device != self.device {
            return Err(Error::DeviceMismatch { op: OP, a: self.device.to_string(), b: src.device.to_string() });
        }
        let bytes = self.numel() * self.dtype.size();
        match (&src.storage, &mut self.storage) {
            (Storage::Host(a), Storage::Host(b)) => *b = a.clone(),
            (Storage::Device(a), Storage::Device(b)) => self.device.copy(a, b, bytes)?,
            _ => return Err(Error::invalid(OP, "host and device storage mixed")),
        }
        Ok(())
    }

    /// Overwrites a CPU tensor's elements with `v` (f32, as many elements).
    /// The CPU paths of the `_into` ops write their results through it.
    pub(crate) fn write_host_f32(&mut self, v: &[f32]) -> Result<()> {
        match self.host_mut() {
            Some(HostData::F32(d)) if d.len() == v.len() => {
                d.copy_from_slice(v);
                Ok(())
            }
            _ => Err(Error::invalid("write_host_f32", "not an f32 CPU tensor of that many elements")),
        }
    }

    /// Checks that `self`, an op's output buffer, is f32 with one of
    /// `shapes` and on `device`.
    pub(crate) fn check_output(&self, op: &'static str, device: &Device, shapes: &[&[usize]]) -> Result<()> {
        if self.dtype != DType::F32 || !shapes.iter().any(|s| self.shape == *s) {
            return Err(Error::Shape {
                op,
                expected: format!(
                    "an f32 output of shape {}",
                    shapes.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" or ")
                ),
                got: format!("{:?} {:?}", self.shape, self.dtype),
            });
        }
        if &self.device != device {
            return Err(Error::DeviceMismatch { op, a: device.to_string(), b: self.device.to_string() });
        }
        Ok(())
    }

    /// The device address, for a kernel argument. `None` on the CPU.
    pub(crate) fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device(b) => Some(self.device.ptr(b)),
            Storage::Host(_) => None,
        }
    }

    /// The device address of a GPU-backend tensor of dtype `T`, or why not.
    fn typed_addr<T: Element>(&self) -> Result<u64> {
        const OP: &str = "kernel argument";
        if self.dtype != T::DTYPE {
            return Err(Error::DType { op: OP, expected: T::DTYPE, got: self.dtype });
        }
        self.device_ptr()
            .ok_or_else(|| Error::invalid(OP, format!("a tensor on {} has no device address", self.device)))
    }

    /// This tensor as `T` elements a kernel reads: an error for another
    /// dtype or a CPU tensor. The ops call it after validating sizes.
    pub(crate) fn ptr<T: Element>(&self) -> Result<crate::runtime::kernels::Ptr<T>> {
        self.typed_addr::<T>().map(crate::runtime::kernels::Ptr::from_addr)
    }

    /// This tensor as `T` elements a kernel writes (see [`Tensor::ptr`]).
    pub(crate) fn ptr_mut<T: Element>(&mut self) -> Result<crate::runtime::kernels::PtrMut<T>> {
        self.typed_addr::<T>().map(crate::runtime::kernels::PtrMut::from_addr)
    }

    /// [`Tensor::ptr`] of an optional tensor: the null pointer for `None`
    /// (the kernels' optional arguments).
    pub(crate) fn ptr_or_null<T: Element>(t: Option<&Tensor>) -> Result<crate::runtime::kernels::Ptr<T>> {
        t.map_or(Ok(crate::runtime::kernels::Ptr::null()), Tensor::ptr)
    }

    /// True when every element is finite (no NaN, no infinity). Waits for
    /// the device.
    pub fn all_finite(&self) -> Result<bool> {
        Ok(self.to_f32_vec()?.iter().all(|x| x.is_finite()))
    }
}

/// Checks that all tensors are on one device; returns it.
pub(crate) fn same_device<'a>(op: &'static str, ts: &[&'a Tensor]) -> Result<&'a Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::DeviceMismatch { op, a: d.to_string(), b: t.device().to_string() });
        }
    }
    Ok(d)
}
