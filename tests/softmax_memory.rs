//! The fused softmax head never allocates the B × N logits: its peak extra
//! memory during forward_backward is the centre gradient (N × d) plus
//! O(B·d + B·splits + N), measured through the allocation API: a counting
//! global allocator on the CPU, Device::memory_stats on the simulator and a
//! GPU. One test per binary, so that no other test's allocations interfere.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gif_fr::head::{SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::{DType, Device, Tensor};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
        &|| (CURRENT.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed)),
        &|| PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed),
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
