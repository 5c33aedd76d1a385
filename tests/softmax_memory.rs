//! The fused softmax head never allocates the B × N logits: its peak extra
//! memory during forward_backward is the centre gradient (N × d) plus
//! O(B·d + B·splits + N), measured through the allocation API: a counting
//! global allocator on the CPU, Device::memory_stats on the simulator and a
//! GPU. One test per binary, so that no other test's allocations interfere.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use gif_fr::head::{SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::runtime::host_memory::{self, CountingAllocator};
use gif_fr::{DType, Device, Tensor};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const MB: usize = 1 << 20;

/// Runs one step and returns the peak extra bytes, as `measure` sees them.
fn peak_extra(
    dev: &Device,
    b: usize,
    d: usize,
    n: usize,
    measure: &dyn Fn() -> (usize, usize),
    reset: &dyn Fn(),
) -> usize {
    let head = SoftmaxHead::new(SoftmaxHeadConfig::new(d, n), dev, DType::F32, 1).unwrap();
    let x: Vec<f32> = (0..b * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let labels: Vec<u32> = (0..b as u32).map(|i| i.wrapping_mul(2654435761) % n as u32).collect();
    let xt = Tensor::from_slice(dev, &[b, d], &x).unwrap();
    reset();
    let before = measure().0;
    let (loss, grads) = head.forward_backward(&xt, &labels).unwrap();
    assert!(loss.loss.is_finite());
    let peak = measure().1;
    drop(grads);
    peak - before
}

/// The `gemm` crate's own temporary memory for the CPU path's GEMM shapes
/// (chunks of `CPU_CHUNK` classes): its packing buffers are sized from the
/// cache sizes it detects, so they differ from machine to machine. First
/// every rayon thread runs each shape (the crate keeps a thread-local slab
/// per thread from its first use on, which the head's step would otherwise
/// be charged with on a fresh thread); then each shape runs once measured.
/// Returns the largest peak extra of one call.
fn gemm_workspace(b: usize, d: usize, n: usize) -> usize {
    use gif_fr::ops::gemm::{cpu::gemm, Op};
    let c = gif_fr::head::softmax_head::CPU_CHUNK.min(n);
    let run = |shape: usize, measure: bool| {
        let (u, w, g) = (vec![0.5f32; b * d], vec![0.25f32; c * d], vec![0.125f32; b * c]);
        let (mut lg, mut dw, mut du) = (vec![0f32; b * c], vec![0f32; c * d], vec![0f32; b * d]);
        // The peak is process-wide: only the serial pass below resets and
        // reads it (threads of the warm-up pass would reset it under each
        // other, so that a thread's peak could read below its own start).
        let before = measure.then(host_memory::reset_peak);
        match shape {
            0 => gemm(b, c, d, 1.0, &u, d, Op::N, &w, d, Op::T, 0.0, &mut lg, c),
            1 => gemm(c, d, b, 1.0, &g, c, Op::T, &u, d, Op::N, 0.0, &mut dw, d),
            _ => gemm(b, d, c, 1.0, &g, c, Op::N, &w, d, Op::N, 1.0, &mut du, d),
        }
        .unwrap();
        before.map_or(0, |before| host_memory::stats().peak - before)
    };
    rayon::broadcast(|_| (0..3).for_each(|s| _ = run(s, false)));
    (0..3).map(|s| run(s, true)).max().unwrap_or(0)
}

#[test]
fn no_b_by_n_allocation() {
    // CPU: the counting allocator. The bound is the centre gradient, 4 MB of
    // the head's own O(B·C + C·d + N) buffers, and the GEMM workspace this
    // machine's `gemm` crate uses at these shapes (measured here, so the
    // bound holds on any cache size).
    let (b, d, n) = (64, 32, 1 << 17);
    let workspace = gemm_workspace(b, d, n);
    let cpu_extra =
        peak_extra(&Device::cpu(), b, d, n, &|| (host_memory::stats().current, host_memory::stats().peak), &|| {
            _ = host_memory::reset_peak()
        });
    let (logits, grad) = (b * n * 4, n * d * 4);
    println!(
        "cpu: B {b} N {n} d {d}: peak extra {:.1} MB (logits would be {} MB, centre gradient {} MB, GEMM workspace {:.1} MB)",
        cpu_extra as f64 / MB as f64,
        logits / MB,
        grad / MB,
        workspace as f64 / MB as f64
    );
    assert!(cpu_extra <= grad + 4 * MB + workspace, "cpu: {cpu_extra} bytes");
    assert!(cpu_extra < grad + logits / 4 + workspace);

    // Simulator (and a GPU): the device's allocation meter.
    let mut devs = vec![(Device::sim(), 128usize, 32usize, 1usize << 15)];
    if let Some(g) = common::cuda() {
        devs.push((g, 512, 128, 1 << 20));
    }
    for (dev, b, d, n) in devs {
        let stats = || dev.memory_stats().unwrap();
        let extra = peak_extra(&dev, b, d, n, &|| (stats().current, stats().peak), &|| dev.reset_peak_memory());
        let (logits, grad) = (b * n * 4, n * d * 4);
        println!(
            "{dev}: B {b} N {n} d {d}: peak extra {:.1} MB (logits would be {} MB, centre gradient {} MB)",
            extra as f64 / MB as f64,
            logits / MB,
            grad / MB
        );
        // O(B·d + B·splits + N) beyond the gradient: a few MB at these sizes.
        let bound = grad + 4 * (4 * b * d + b * 1024 * 4 + 2 * n) + MB;
        assert!(extra <= bound, "{dev}: {extra} bytes > {bound}");
        assert!(extra < grad + logits / 4, "{dev}");
    }
}
