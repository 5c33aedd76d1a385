//! Drives the GIF code head from a downstream crate's own buffers, on its
//! own stream: what a training framework built on cudarc (candle, burn, ...)
//! does with gif-fr. Nothing is copied in or out, and nothing waits for the
//! GPU inside a step: features, labels (i64, as PyTorch stores them) and the
//! features' gradient are the framework's memory, viewed in place; the
//! losses stay on the device until the framework asks for them.
//!
//! `cargo run --release --example interop` runs it on the first GPU
//! (through cudarc, on a stream the example creates), or on the simulated
//! GPU when there is none. tests/interop.rs runs the same code on the
//! simulator in `cargo test`, and on a GPU in the GPU kit.

use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadLoss, HeadMetrics};
use gif_fr::{DType, Device, Result, Tensor};

/// Batch, feature width, code length, vocabulary, identities.
pub const B: usize = 48;
pub const D: usize = 32;
pub const L: usize = 3;
pub const V: usize = 8;
pub const N: usize = 200;

/// The "framework's" data: features `[B, D]` and i64 labels, seeded.
pub fn batch(step: u64) -> (Vec<f32>, Vec<i64>) {
    let mut s = 0x9e3779b97f4a7c15u64 ^ step.wrapping_mul(0xbf58476d1ce4e5b9);
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let labels: Vec<i64> = (0..B).map(|_| (next() % N as u64) as i64).collect();
    // Each identity's features cluster around a direction of its own.
    let x = labels
        .iter()
        .flat_map(|&y| (0..D).map(move |c| ((y as usize * 7 + c * 13) % 17) as f32 / 17.0 - 0.5))
        .zip(std::iter::repeat_with(&mut next))
        .map(|(m, r)| m + ((r % 1000) as f32 / 1000.0 - 0.5) * 0.1)
        .collect();
    (x, labels)
}

/// The head and the identities' codes (distinct base-V digits).
pub fn head_and_table(dev: &Device) -> Result<(CodeHead, CodeTable)> {
    let codes: Vec<u16> = (0..N).flat_map(|i| (0..L).map(move |j| ((i / V.pow(j as u32)) % V) as u16)).collect();
    let table = CodeTable::new(dev, codes, L, V, None)?;
    let cfg = CodeHeadConfig { gamma: 0.0, ..CodeHeadConfig::new(D, L, V) };
    Ok((CodeHead::new(cfg, dev, 7)?, table))
}

/// `steps` SGD steps of the head on views of the caller's memory: `x` the
/// features `[B, D]` f32, `y` the labels `[B]` i64, `dx` the features'
/// gradient `[B, D]` f32 (each a tensor over memory gif-fr does not own).
/// `refill(step)` lets the caller write the next batch into its buffers.
/// Returns every step's losses; reading them is the only host
/// synchronization (a framework would read every k steps).
pub fn train(
    head: &mut CodeHead,
    table: &CodeTable,
    x: &Tensor,
    y: &Tensor,
    dx: Tensor,
    steps: u64,
    mut refill: impl FnMut(u64) -> Result<()>,
) -> Result<Vec<HeadLoss>> {
    let mut grads = HeadGrads::new(head, B)?;
    grads.features = dx;
    let mut metrics = HeadMetrics::new();
    let mut losses = Vec::new();
    for step in 0..steps {
        refill(step)?;
        head.forward_backward_into(x, y, table, &mut grads, &mut metrics)?;
        head.sgd_step(&grads, 0.5)?;
        losses.push(metrics.read()?);
    }
    Ok(losses)
}

/// Writes the batch of `step` into the caller's buffers at `x_addr`
/// (`[B, D]` f32) and `y_addr` (`[B]` i64) on `dev`.
fn refill(dev: &Device, x_addr: u64, y_addr: u64, step: u64) -> Result<()> {
    let (xs, ys) = batch(step);
    // SAFETY: the callers pass the addresses of their live buffers of these
    // sizes, used in order on the device's stream.
    unsafe {
        Tensor::from_device_ptr(dev, x_addr, &[B, D], DType::F32)?.copy_from(&Tensor::from_slice(
            dev,
            &[B, D],
            &xs,
        )?)?;
        Tensor::from_device_ptr(dev, y_addr, &[B], DType::I64)?.copy_from(&Tensor::from_slice(dev, &[B], &ys)?)
    }
}

/// The example on the simulated GPU: the "framework's memory" is one arena
/// allocated on the simulator, and the tensors view parts of it by address.
#[cfg(feature = "sim")]
pub fn run_sim(steps: u64) -> Result<Vec<HeadLoss>> {
    let dev = Device::sim();
    let (mut head, table) = head_and_table(&dev)?;
    // The caller's allocation: features, gradient and labels, 16-byte aligned.
    let (xb, yb) = (B * D * 4, B * 8);
    let arena = Tensor::zeros(&dev, &[(2 * xb + yb) / 4], DType::F32)?;
    let base = arena.device_addr().expect("a simulated device address");
    let (x_addr, dx_addr, y_addr) = (base, base + xb as u64, base + 2 * xb as u64);
    // SAFETY: the three ranges lie in `arena`, which outlives the views.
    let (x, dx, y) = unsafe {
        (
            Tensor::from_device_ptr(&dev, x_addr, &[B, D], DType::F32)?,
            Tensor::from_device_ptr(&dev, dx_addr, &[B, D], DType::F32)?,
            Tensor::from_device_ptr(&dev, y_addr, &[B], DType::I64)?,
        )
    };
    let losses = train(&mut head, &table, &x, &y, dx, steps, |step| refill(&dev, x_addr, y_addr, step))?;
    drop((x, y));
    drop(arena);
    Ok(losses)
}

/// The example on GPU 0 through cudarc: the caller's context, stream and
/// buffers; gif-fr queues its work on that stream.
pub fn run_cuda(steps: u64) -> Result<Vec<HeadLoss>> {
    use gif_fr::cudarc::driver::CudaContext;
    // Probe first: cudarc panics where the driver library is missing.
    Device::probe_cuda()?;
    let drv = |e: gif_fr::cudarc::driver::DriverError| gif_fr::Error::NoGpu(e.to_string());
    let ctx = CudaContext::new(0).map_err(drv)?;
    let stream = ctx.new_stream().map_err(drv)?;
    let dev = Device::from_stream(stream.clone())?;
    let (mut head, table) = head_and_table(&dev)?;
    let (xs, ys) = batch(0);
    let mut x_buf = stream.clone_htod(&xs).map_err(drv)?;
    let mut y_buf = stream.clone_htod(&ys).map_err(drv)?;
    let mut dx_buf = stream.alloc_zeros::<f32>(B * D).map_err(drv)?;
    // SAFETY: the buffers outlive the tensors (dropped at the end of this
    // function, after them), and the caller uses them only on `stream`.
    let (x, y, dx) = unsafe {
        (
            Tensor::from_cuda(&dev, &mut x_buf, &[B, D])?,
            Tensor::from_cuda(&dev, &mut y_buf, &[B])?,
            Tensor::from_cuda(&dev, &mut dx_buf, &[B, D])?,
        )
    };
    let (Some(x_addr), Some(y_addr)) = (x.device_addr(), y.device_addr()) else {
        return Err(gif_fr::Error::NoGpu("no device address".into()));
    };
    let losses = train(&mut head, &table, &x, &y, dx, steps, |step| refill(&dev, x_addr, y_addr, step))?;
    // The views go before the buffers they view.
    drop((x, y));
    drop((x_buf, y_buf, dx_buf));
    Ok(losses)
}

fn main() -> Result<()> {
    let steps = 30;
    let (where_, losses) = match run_cuda(steps) {
        Ok(l) => ("GPU 0 (a cudarc stream of the example's)", l),
        #[cfg(feature = "sim")]
        Err(e) => {
            println!("no GPU ({e}); running on the simulated GPU");
            ("the simulated GPU", run_sim(steps)?)
        }
        #[cfg(not(feature = "sim"))]
        Err(e) => return Err(e),
    };
    println!("code head on {where_}: {steps} steps on the caller's buffers");
    for (i, l) in losses.iter().enumerate().filter(|(i, _)| i % 10 == 0 || *i + 1 == losses.len()) {
        println!("step {:>3}  loss {:.4}  accuracy {:?}", i + 1, l.total, l.accuracy);
    }
    Ok(())
}
