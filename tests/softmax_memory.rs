//! The fused softmax head never allocates the B × N logits: its peak extra
//! memory during forward_backward is the centre gradient (N × d) plus
//! O(B·d + B·splits + N), measured through the allocation API: a counting
//! global allocator on the CPU, Device::memory_stats on the simulator and a
//! GPU. One test per binary, so that no other test's allocations interfere.

mod common;

use gif_fr::head::{SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::host_memory::{self, CountingAllocator};
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

#[test]
fn no_b_by_n_allocation() {
    // CPU: the counting allocator.
    let (b, d, n) = (64, 32, 1 << 17);
    let cpu_extra = peak_extra(
        &Device::cpu(),
        b,
        d,
        n,
        &|| (host_memory::stats().current, host_memory::stats().peak),
        &host_memory::reset_peak,
    );
    let (logits, grad) = (b * n * 4, n * d * 4);
    println!(
        "cpu: B {b} N {n} d {d}: peak extra {:.1} MB (logits would be {} MB, centre gradient {} MB)",
        cpu_extra as f64 / MB as f64,
        logits / MB,
        grad / MB
    );
    assert!(cpu_extra <= grad + 4 * MB, "cpu: {cpu_extra} bytes");
    assert!(cpu_extra < grad + logits / 4);

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
