//! A small tensor: a shape, an element type and storage on one device. Only
//! what the ops need: upload, download, conversion. Row-major, contiguous.

use half::{bf16, f16};

pub use crate::runtime::dtype::{DType, Element, Float};

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, DeviceKind};

/// Host storage, typed so that it is aligned for its element.
#[derive(Clone, Debug)]
pub(crate) enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U32(Vec<u32>),
    I64(Vec<i64>),
}

impl HostData {
    fn bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::U32(v) => bytemuck::cast_slice(v),
            HostData::I64(v) => bytemuck::cast_slice(v),
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice_mut(v),
            HostData::BF16(v) => bytemuck::cast_slice_mut(v),
            HostData::F16(v) => bytemuck::cast_slice_mut(v),
            HostData::U32(v) => bytemuck::cast_slice_mut(v),
            HostData::I64(v) => bytemuck::cast_slice_mut(v),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::U32(_) => DType::U32,
            HostData::I64(_) => DType::I64,
        }
    }
    fn from_bytes(dtype: DType, b: &[u8]) -> HostData {
        // pod_collect_to_vec copies into a vector of the element type, so the
        // byte buffer needs no particular alignment.
        match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(b)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(b)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(b)),
            DType::U32 => HostData::U32(bytemuck::pod_collect_to_vec(b)),
            DType::I64 => HostData::I64(bytemuck::pod_collect_to_vec(b)),
        }
    }
    /// `v` stored as `dtype` (rounded to nearest even for 16-bit types;
    /// integer types take the values truncated, saturating).
    pub(crate) fn from_f32(v: Vec<f32>, dtype: DType) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(v),
            DType::BF16 => HostData::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
            DType::U32 => HostData::U32(v.into_iter().map(|x| x as u32).collect()),
            DType::I64 => HostData::I64(v.into_iter().map(|x| x as i64).collect()),
        }
    }
    /// `n` elements of `dtype` whose every byte is `byte`: 0 for zeros,
    /// 0xFF (NaN in the float types) for what a poisoned device buffer holds.
    fn splat(dtype: DType, n: usize, byte: u8) -> HostData {
        fn v<T: bytemuck::Pod>(n: usize, byte: u8) -> Vec<T> {
            let mut v = vec![T::zeroed(); n];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).fill(byte);
            v
        }
        match dtype {
            DType::F32 => HostData::F32(v(n, byte)),
            DType::BF16 => HostData::BF16(v(n, byte)),
            DType::F16 => HostData::F16(v(n, byte)),
            DType::U32 => HostData::U32(v(n, byte)),
            DType::I64 => HostData::I64(v(n, byte)),
        }
    }
}

pub(crate) enum Storage {
    Host(HostData),
    Device(DeviceBuffer),
    /// Memory the tensor does not own: a view of another tensor's
    /// ([`Tensor::narrow`]) or a caller's ([`Tensor::from_device_ptr`]).
    /// `addr` is a host address on the CPU, a device address otherwise;
    /// `token` identifies the scoped view of [`Tensor::narrow_mut`] (0 for
    /// the others).
    Borrowed {
        addr: u64,
        bytes: usize,
        token: u64,
    },
}

/// A contiguous row-major tensor on one device: memory it owns, or a view
/// of memory it does not (another tensor's, or a caller's).
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

/// Byte alignment of every tensor's memory, views included: the kernels
/// load 16-byte vectors, and `cp.async` copies 16 bytes.
pub const ALIGN: usize = 16;

/// A read-only view of part of a tensor ([`Tensor::narrow`]), usable
/// wherever a `&Tensor` is: it borrows the tensor it views.
pub struct TensorView<'a> {
    tensor: Tensor,
    _parent: std::marker::PhantomData<&'a Tensor>,
}

impl std::ops::Deref for TensorView<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

impl std::fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View of {:?}", self.tensor)
    }
}

fn numel_of(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("shape {shape:?} has more elements than fit in usize")))
}

static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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

    /// f32 values stored as `dtype` (rounded to nearest even; a float type).
    pub fn from_f32(device: &Device, shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_slice(device, shape, data),
            DType::BF16 => {
                Tensor::from_slice(device, shape, &data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
            }
            DType::F16 => {
                Tensor::from_slice(device, shape, &data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
            }
            d => Err(Error::invalid("Tensor::from_f32", format!("{d:?} is not a floating-point type"))),
        }
    }

    /// A tensor whose contents are unspecified until written: 0xFF bytes
    /// (NaN) on the CPU and on devices that poison (the simulator, and GPUs
    /// with poisoning on), garbage otherwise.
    pub fn empty(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (n, bytes) = sizes_of("Tensor::empty", shape, dtype)?;
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::splat(dtype, n, crate::runtime::kernels::POISON)),
            _ => Storage::Device(device.alloc(bytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    /// A tensor of zeros (filled on the device; no host copy).
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (n, bytes) = sizes_of("Tensor::zeros", shape, dtype)?;
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::splat(dtype, n, 0)),
            _ => Storage::Device(device.alloc_zeroed(bytes)?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage })
    }

    pub(crate) fn from_host(device: &Device, shape: Vec<usize>, data: HostData) -> Tensor {
        Tensor { shape, dtype: data.dtype(), device: device.clone(), storage: Storage::Host(data) }
    }

    /// A tensor over `shape` elements of `dtype` at device address `addr`,
    /// memory the caller owns (a framework's buffer): the ops read and
    /// write it in place, and dropping the tensor frees nothing.
    ///
    /// Checked: the device runs kernels (CUDA or the simulator), the size
    /// does not overflow, `addr` is non-null and [`ALIGN`]-aligned, and the
    /// range is device memory of this device (on the simulator: inside one
    /// of its allocations; on a GPU: memory the driver attributes to this
    /// device's context).
    ///
    /// # Safety
    /// For as long as the tensor (or anything made from it) is used, the
    /// range must stay allocated, hold initialized elements of `dtype`, and
    /// not be written by anything but this crate's ops, nor read while they
    /// write it, except in order on the device's stream (use
    /// [`Device::from_stream`] with the stream the caller's work is on).
    pub unsafe fn from_device_ptr(device: &Device, addr: u64, shape: &[usize], dtype: DType) -> Result<Tensor> {
        const OP: &str = "Tensor::from_device_ptr";
        if !device.runs_kernels() {
            return Err(Error::invalid(OP, "views over device memory need a CUDA or simulated device"));
        }
        let (_, bytes) = sizes_of(OP, shape, dtype)?;
        if addr == 0 || !addr.is_multiple_of(ALIGN as u64) {
            return Err(Error::invalid(OP, format!("the address {addr:#x} is null or not {ALIGN}-byte aligned")));
        }
        device.check_range(OP, addr, bytes)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            device: device.clone(),
            storage: Storage::Borrowed { addr, bytes, token: 0 },
        })
    }

    /// [`Tensor::from_device_ptr`] over a cudarc buffer (a `CudaSlice`, or
    /// a `CudaViewMut` of one) of `T` elements, which must number exactly as
    /// many as `shape`. `device` must be a CUDA device.
    ///
    /// # Safety
    /// As [`Tensor::from_device_ptr`]: the buffer outlives the tensor and is
    /// used by nothing else meanwhile, except in order on the device's
    /// stream. cudarc's event tracking (when the caller's context has it)
    /// orders the device's stream after the buffer's earlier work, and the
    /// buffer's later users after this call, not after the ops that follow.
    pub unsafe fn from_cuda<T, S>(device: &Device, buffer: &mut S, shape: &[usize]) -> Result<Tensor>
    where
        T: Element,
        S: cudarc::driver::DevicePtrMut<T>,
    {
        const OP: &str = "Tensor::from_cuda";
        let stream = device
            .cuda_stream()
            .ok_or_else(|| Error::invalid(OP, format!("a cudarc buffer needs a CUDA device, not {device}")))?;
        let n = numel_of(OP, shape)?;
        if buffer.len() != n {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{n} elements for shape {shape:?}"),
                got: format!("a buffer of {}", buffer.len()),
            });
        }
        let (addr, _record) = buffer.device_ptr_mut(&stream);
        // SAFETY: the caller's contract, as documented.
        unsafe { Tensor::from_device_ptr(device, addr, shape, T::DTYPE) }
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
    /// Bytes of its elements.
    pub(crate) fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// True when the tensor views memory it does not own.
    pub fn is_view(&self) -> bool {
        matches!(self.storage, Storage::Borrowed { .. })
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

    /// The host bytes of a CPU tensor (owned or viewed).
    pub(crate) fn host_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Host(h) => Some(h.bytes()),
            Storage::Borrowed { addr, bytes, .. } if self.device.kind() == DeviceKind::Cpu => {
                // SAFETY: a CPU view addresses `bytes` bytes of the host data
                // of the tensor it borrows (TensorView's lifetime, or the
                // scope of narrow_mut), which outlives it.
                Some(unsafe { std::slice::from_raw_parts(*addr as usize as *const u8, *bytes) })
            }
            _ => None,
        }
    }

    fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        let cpu = self.device.kind() == DeviceKind::Cpu;
        match &mut self.storage {
            Storage::Host(h) => Some(h.bytes_mut()),
            Storage::Borrowed { addr, bytes, .. } if cpu => {
                // SAFETY: as in host_bytes; a mutable CPU view exists only
                // inside narrow_mut, which holds the parent's &mut.
                Some(unsafe { std::slice::from_raw_parts_mut(*addr as usize as *mut u8, *bytes) })
            }
            _ => None,
        }
    }

    /// The elements of a CPU tensor of dtype `T`, without a copy.
    pub(crate) fn host_slice<T: Element>(&self) -> Option<&[T]> {
        if T::DTYPE != self.dtype {
            return None;
        }
        self.host_bytes().and_then(|b| bytemuck::try_cast_slice(b).ok())
    }

    /// The elements of a CPU tensor of dtype `T`, mutable.
    pub(crate) fn host_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype {
            return None;
        }
        self.host_bytes_mut().and_then(|b| bytemuck::try_cast_slice_mut(b).ok())
    }

    /// The elements as `T`, which must be the tensor's dtype. Waits for the
    /// device.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { op: "Tensor::to_vec", expected: self.dtype, got: T::DTYPE });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.bytes()?))
    }

    /// The elements' bytes (a copy; waits for the device).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        if let Some(b) = self.host_bytes() {
            return Ok(Cow::Borrowed(b));
        }
        let addr = self.device_ptr().ok_or_else(|| Error::invalid("Tensor::to_vec", "no storage"))?;
        Ok(Cow::Owned(self.device.download_addr(addr, self.nbytes())?))
    }

    /// The elements converted to f32 (a float tensor). Waits for the device.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => self.to_vec::<f32>()?,
            DType::BF16 => self.to_vec::<bf16>()?.into_iter().map(bf16::to_f32).collect(),
            DType::F16 => self.to_vec::<f16>()?.into_iter().map(f16::to_f32).collect(),
            d => return Err(Error::invalid("Tensor::to_f32_vec", format!("{d:?} is not a floating-point type"))),
        })
    }

    /// The elements as f32 for a CPU computation: borrowed when the tensor
    /// already holds f32 host data, converted (or downloaded) otherwise.
    pub(crate) fn host_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        use std::borrow::Cow;
        if let Some(v) = self.host_slice::<f32>() {
            return Ok(Cow::Borrowed(v));
        }
        Ok(Cow::Owned(self.to_f32_vec()?))
    }

    /// This tensor's values as f32, on its device (a copy; converted by a
    /// kernel on a GPU backend, without a trip through the host).
    pub fn to_f32(&self) -> Result<Tensor> {
        if !self.dtype.is_float() {
            return Err(Error::invalid("Tensor::to_f32", format!("{:?} is not a floating-point type", self.dtype)));
        }
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
            if let Some(d) = out.host_slice_mut::<bf16>() {
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
        // SAFETY: the callers checked both tensors hold n elements on this
        // device, of float types.
        unsafe {
            launch_one_of!((self.dtype, out.dtype), {
                (DType::BF16, DType::F32) => widen_bf16,
                (DType::F16, DType::F32) => widen_f16,
                (DType::F32, DType::F32) => widen_f32,
                (_, _) => narrow_bf16,
            }, (dev, cfg, self.ptr()?, out.ptr_mut()?, n as i64))
        }
    }

    /// A copy on `device` (owning its memory).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let bytes = self.bytes()?;
        let storage = match device.kind() {
            DeviceKind::Cpu => Storage::Host(HostData::from_bytes(self.dtype, &bytes)),
            _ => Storage::Device(device.upload(&bytes)?),
        };
        Ok(Tensor { shape: self.shape.clone(), dtype: self.dtype, device: device.clone(), storage })
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

    /// The contiguous part `start..start + len` of dimension `dim`: the
    /// offset and shape of a sub-tensor, checked (a view, no copy). Offset
    /// and shape describe contiguous memory only, so every dimension before
    /// `dim` must have size 1 (rows of a matrix: `dim` 0; columns of a
    /// single row: `dim` 1); the view must start [`ALIGN`]-aligned (rows of
    /// a multiple of 16 bytes always do).
    fn view_parts(&self, op: &'static str, dim: usize, start: usize, len: usize) -> Result<(u64, Vec<usize>, usize)> {
        let nd = self.shape.len();
        let end = start.checked_add(len);
        if dim >= nd || end.is_none_or(|e| e > self.shape[dim]) {
            return Err(Error::Shape {
                op,
                expected: format!("a range within a dimension of {:?}", self.shape),
                got: format!("dimension {dim}, {start}..{start}+{len}"),
            });
        }
        if self.shape[..dim].iter().any(|&s| s != 1) {
            return Err(Error::invalid(
                op,
                format!(
                    "part of dimension {dim} of {:?} is not contiguous (the dimensions before it exceed 1)",
                    self.shape
                ),
            ));
        }
        let inner: usize = self.shape[dim + 1..].iter().product();
        let offset = start * inner * self.dtype.size();
        if !offset.is_multiple_of(ALIGN) {
            return Err(Error::invalid(
                op,
                format!(
                    "a view at byte offset {offset} is not {ALIGN}-byte aligned (the kernels load 16-byte vectors)"
                ),
            ));
        }
        let base = match self.host_bytes() {
            Some(b) => b.as_ptr() as u64,
            None => self.device_ptr().ok_or_else(|| Error::invalid(op, "no storage"))?,
        };
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Ok((base + offset as u64, shape, len * inner * self.dtype.size()))
    }

    /// A read-only view of `start..start + len` along `dim` (see the
    /// conditions of [`Tensor::narrow_mut`]); usable as a `&Tensor`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView<'_>> {
        let (addr, shape, bytes) = self.view_parts("Tensor::narrow", dim, start, len)?;
        let tensor = Tensor {
            shape,
            dtype: self.dtype,
            device: self.device.clone(),
            storage: Storage::Borrowed { addr, bytes, token: 0 },
        };
        Ok(TensorView { tensor, _parent: std::marker::PhantomData })
    }

    /// Runs `f` on a view of `start..start + len` along `dim` that the ops
    /// can write: rows `start..start + len` of a matrix (`dim` 0), or part of
    /// a tensor whose dimensions before `dim` are 1. The view must start
    /// [`ALIGN`]-aligned. The view lives only inside `f`; replacing it with
    /// another tensor (`std::mem::swap`) aborts the process, since the view
    /// would outlive the memory it borrows.
    pub fn narrow_mut<R>(
        &mut self,
        dim: usize,
        start: usize,
        len: usize,
        f: impl FnOnce(&mut Tensor) -> Result<R>,
    ) -> Result<R> {
        let (addr, shape, bytes) = self.view_parts("Tensor::narrow_mut", dim, start, len)?;
        self.scoped_view(addr, shape, bytes, f)
    }

    /// A read-only view of the whole tensor with another shape of as many
    /// elements (no copy): e.g. `[l, v, d]` seen as the matrix `[l·v, d]`.
    pub fn view(&self, shape: &[usize]) -> Result<TensorView<'_>> {
        let (addr, bytes) = self.view_whole("Tensor::view", shape)?;
        let storage = Storage::Borrowed { addr, bytes, token: 0 };
        let tensor = Tensor { shape: shape.to_vec(), dtype: self.dtype, device: self.device.clone(), storage };
        Ok(TensorView { tensor, _parent: std::marker::PhantomData })
    }

    /// Runs `f` on a writable view of the whole tensor with another shape of
    /// as many elements (as [`Tensor::view`]; scoped as
    /// [`Tensor::narrow_mut`]).
    pub fn view_mut<R>(&mut self, shape: &[usize], f: impl FnOnce(&mut Tensor) -> Result<R>) -> Result<R> {
        let (addr, bytes) = self.view_whole("Tensor::view_mut", shape)?;
        self.scoped_view(addr, shape.to_vec(), bytes, f)
    }

    fn view_whole(&self, op: &'static str, shape: &[usize]) -> Result<(u64, usize)> {
        let n = numel_of(op, shape)?;
        if n != self.numel() {
            return Err(Error::Shape {
                op,
                expected: format!("a shape of {} elements", self.numel()),
                got: format!("{shape:?} ({n} elements)"),
            });
        }
        let addr = match self.host_bytes() {
            Some(b) => b.as_ptr() as u64,
            None => self.device_ptr().ok_or_else(|| Error::invalid(op, "no storage"))?,
        };
        Ok((addr, self.nbytes()))
    }

    /// Runs `f` on a writable tensor over `bytes` at `addr` (inside this
    /// tensor's memory), aborting if `f` moves it out.
    fn scoped_view<R>(
        &mut self,
        addr: u64,
        shape: Vec<usize>,
        bytes: usize,
        f: impl FnOnce(&mut Tensor) -> Result<R>,
    ) -> Result<R> {
        let token = NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        struct Scope(Tensor, u64);
        impl Drop for Scope {
            fn drop(&mut self) {
                if !matches!(self.0.storage, Storage::Borrowed { token, .. } if token == self.1) {
                    eprintln!("gif-fr: a scoped tensor view was moved out of its scope; aborting");
                    std::process::abort();
                }
            }
        }
        let storage = Storage::Borrowed { addr, bytes, token };
        let mut scope = Scope(Tensor { shape, dtype: self.dtype, device: self.device.clone(), storage }, token);
        f(&mut scope.0)
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
        if self.device.kind() == DeviceKind::Cpu {
            // `src` cannot be (a view of) `self`: self is borrowed mutably.
            return match (src.host_bytes(), self.host_bytes_mut()) {
                (Some(v), Some(d)) => {
                    d.copy_from_slice(v);
                    Ok(())
                }
                _ => Err(Error::invalid(OP, "no host storage")),
            };
        }
        let (Some(a), Some(b)) = (src.device_ptr(), self.device_ptr()) else {
            return Err(Error::invalid(OP, "no device storage"));
        };
        self.device.copy_addr(a, b, self.nbytes())
    }

    /// Overwrites this tensor's elements with host values (as many, of its
    /// dtype): into its existing memory, no allocation (on a GPU, an upload
    /// that waits for the copy).
    pub fn copy_from_host<T: Element>(&mut self, data: &[T]) -> Result<()> {
        const OP: &str = "Tensor::copy_from_host";
        if T::DTYPE != self.dtype || data.len() != self.numel() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{} {:?} elements", self.numel(), self.dtype),
                got: format!("{} {:?} elements", data.len(), T::DTYPE),
            });
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if let Some(d) = self.host_bytes_mut() {
            d.copy_from_slice(bytes);
            return Ok(());
        }
        let addr = self.device_ptr().ok_or_else(|| Error::invalid(OP, "no storage"))?;
        self.device.upload_addr(bytes, addr)
    }

    /// Overwrites an f32 tensor on a GPU (or the simulator) with
    /// `src[at..at + numel]`, without waiting: the copy runs beside the
    /// work queued before it and after `after` (the last work that reads
    /// this tensor; None: no ordering with earlier work), and the work
    /// queued after this call sees the new values ([`PinnedBuffer`]).
    ///
    /// [`PinnedBuffer`]: crate::runtime::pinned::PinnedBuffer
    pub(crate) fn copy_from_pinned(
        &mut self,
        src: &crate::runtime::pinned::PinnedBuffer,
        at: usize,
        after: Option<&crate::runtime::device::Mark>,
    ) -> Result<()> {
        const OP: &str = "Tensor::copy_from_pinned";
        let part = at.checked_add(self.numel()).and_then(|end| src.as_slice().get(at..end));
        let (Some(part), DType::F32) = (part, self.dtype) else {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{} {:?} elements from element {at}", self.numel(), self.dtype),
                got: format!("{} F32 elements", src.len()),
            });
        };
        if src.device() != &self.device {
            return Err(Error::invalid(
                OP,
                format!("host memory page-locked for {}, not {}", src.device(), self.device),
            ));
        }
        let addr = self.device_ptr().ok_or_else(|| Error::invalid(OP, "a CPU tensor (no device memory)"))?;
        // SAFETY: src's memory is page-locked for this device (its
        // constructor), and src keeps it in place and unwritten until the
        // copy's mark is done (`copied`, then `as_mut_slice` and drop wait).
        let done = unsafe { self.device.upload_pinned(bytemuck::cast_slice(part), addr, after)? };
        src.copied(done);
        Ok(())
    }

    /// Overwrites `self[at..at + n]` with `src[src_at..src_at + n]` (f32
    /// tensors of one GPU, or the simulator) on the device's second stream,
    /// after the work queued so far: the device's stream sees the values
    /// after [`Device::join_side`], and both tensors must live until then.
    ///
    /// [`Device::join_side`]: crate::runtime::device::Device::join_side
    pub(crate) fn copy_on_side(&mut self, at: usize, src: &Tensor, src_at: usize, n: usize) -> Result<()> {
        const OP: &str = "Tensor::copy_on_side";
        let fits = |t: &Tensor, from: usize| from.checked_add(n).is_some_and(|end| end <= t.numel());
        if self.dtype != DType::F32 || src.dtype != DType::F32 || !fits(self, at) || !fits(src, src_at) {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{n} F32 elements from element {src_at} into element {at}"),
                got: format!("{} {:?} elements from {} {:?}", self.numel(), self.dtype, src.numel(), src.dtype),
            });
        }
        if src.device != self.device {
            return Err(Error::DeviceMismatch { op: OP, a: src.device.to_string(), b: self.device.to_string() });
        }
        let (Some(a), Some(b)) = (src.device_ptr(), self.device_ptr()) else {
            return Err(Error::invalid(OP, "a CPU tensor (no device memory)"));
        };
        // In bounds (checked above): addresses of n values in each tensor.
        self.device.copy_on_side(a + 4 * src_at as u64, b + 4 * at as u64, 4 * n)
    }

    /// Copies an f32 GPU (or simulator) tensor into `out` (page-locked host
    /// memory of its device, `numel` values) without waiting, once the work
    /// queued so far is done; returns the copy's mark.
    ///
    /// # Safety
    ///
    /// `out` must be memory of a [`PinnedBuffer`] of this tensor's device,
    /// kept alive and neither read nor written until the mark is done.
    ///
    /// [`PinnedBuffer`]: crate::runtime::pinned::PinnedBuffer
    pub(crate) unsafe fn download_pinned(&self, out: &mut [f32]) -> Result<crate::runtime::device::Mark> {
        const OP: &str = "Tensor::download_pinned";
        if self.dtype != DType::F32 || out.len() != self.numel() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{} {:?} elements", self.numel(), self.dtype),
                got: format!("{} F32 elements", out.len()),
            });
        }
        let addr = self.device_ptr().ok_or_else(|| Error::invalid(OP, "a CPU tensor (no device memory)"))?;
        // SAFETY: the caller's contract.
        unsafe { self.device.download_pinned(addr, bytemuck::cast_slice_mut(out)) }
    }

    /// Sets every element to zero, in place (on the device: a memset).
    pub fn fill_zeros(&mut self) -> Result<()> {
        if let Some(b) = self.host_bytes_mut() {
            b.fill(0);
            return Ok(());
        }
        let addr = self.device_ptr().ok_or_else(|| Error::invalid("Tensor::fill_zeros", "no storage"))?;
        self.device.zero_addr(addr, self.nbytes())
    }

    /// Overwrites a CPU tensor's elements with `v` (as many), rounded to
    /// nearest even into a 16-bit type. The CPU paths of the `_into` ops
    /// write their results through it.
    pub(crate) fn write_host_f32(&mut self, v: &[f32]) -> Result<()> {
        fn put<T: Element>(t: &mut Tensor, v: &[f32], f: impl Fn(f32) -> T) -> Option<()> {
            let d = t.host_slice_mut::<T>().filter(|d| d.len() == v.len())?;
            d.iter_mut().zip(v).for_each(|(o, &x)| *o = f(x));
            Some(())
        }
        match self.dtype {
            DType::F32 => put(self, v, |x| x),
            DType::BF16 => put(self, v, bf16::from_f32),
            DType::F16 => put(self, v, f16::from_f32),
            _ => None,
        }
        .ok_or_else(|| Error::invalid("write_host_f32", "not a float CPU tensor of that many elements"))
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

    /// The device address of the elements, to hand to another library (a
    /// framework's kernels reading this tensor, ordered on the device's
    /// stream); `None` on the CPU. Valid while the tensor (or the memory it
    /// views) lives.
    pub fn device_addr(&self) -> Option<u64> {
        self.device_ptr()
    }

    /// The device address, for a kernel argument. `None` on the CPU.
    pub(crate) fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device(b) => Some(self.device.ptr(b)),
            Storage::Borrowed { addr, .. } if self.device.runs_kernels() => Some(*addr),
            _ => None,
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

    /// Rows `start..start + n` of this tensor (rows along dimension 0) as
    /// `T` elements a kernel writes: the bounds-checked sub-buffer of an
    /// op's own output.
    pub(crate) fn rows_ptr_mut<T: Element>(
        &mut self,
        start: usize,
        n: usize,
    ) -> Result<crate::runtime::kernels::PtrMut<T>> {
        let rows = self.shape.first().copied().unwrap_or(1);
        if start.checked_add(n).is_none_or(|e| e > rows) {
            return Err(Error::invalid("rows_ptr_mut", format!("rows {start}..{start}+{n} of {:?}", self.shape)));
        }
        let inner = self.numel() / rows.max(1);
        Ok(self.ptr_mut::<T>()?.offset(start * inner))
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

/// Elements and bytes of `shape` in `dtype`, checked.
fn sizes_of(op: &'static str, shape: &[usize], dtype: DType) -> Result<(usize, usize)> {
    let n = numel_of(op, shape)?;
    let bytes =
        n.checked_mul(dtype.size()).ok_or_else(|| Error::invalid(op, format!("shape {shape:?} is too large")))?;
    Ok((n, bytes))
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
