//! The O(N) baselines' training step (forward + backward): the fused full
//! margin softmax and Partial FC at r = 0.1 and 0.3, d = 512, for N from
//! 2^10 to 2^21 with B = 512 on a GPU, 2^10 to 2^18 with B = 64 on the CPU.
//! Prints the time and the peak extra memory of a step (its gradients
//! included), and on a GPU the time of the three cuBLAS GEMMs the unfused
//! head would run (logits, feature gradient, centre gradient): the target is
//! the fused head within 1.3x of them. benches/torch_heads.py times PyTorch
//! at the same shapes.
//!
//! Run: `cargo bench --bench softmax_head`.

mod common;

use common::heads::{mib, sweep, Kind};
use gif_fr::ops::gemm::{cublas_gemm, Op};
use gif_fr::{DType, Device, DeviceKind, Tensor};

const D: usize = 512;

/// Mean seconds of logits = U·Wᵀ, dU = G·W, dW = Gᵀ·U with cuBLAS.
fn cublas_three(dev: &Device, n: usize, b: usize) -> Option<f64> {
    let t = |shape: &[usize]| Tensor::from_slice(dev, shape, &common::heads::fill(shape.iter().product(), 0.1, 1)).ok();
    let (u, w, mut g) = (t(&[b, D])?, t(&[n, D])?, t(&[b, n])?);
    let (mut du, mut dw) =
        (Tensor::empty(dev, &[b, D], DType::F32).ok()?, Tensor::empty(dev, &[n, D], DType::F32).ok()?);
    let mut run = || -> gif_fr::Result<()> {
        cublas_gemm(1.0, &u, Op::N, &w, Op::T, 0.0, &mut g)?;
        cublas_gemm(1.0, &g, Op::N, &w, Op::N, 0.0, &mut du)?;
        cublas_gemm(1.0, &g, Op::T, &u, Op::N, 0.0, &mut dw)
    };
    run().ok()?;
    let d = dev.time(5, run).ok()?;
    Some(d.as_secs_f64() / 5.0)
}

fn main() {
    let mut c = common::criterion();
    let kinds = [Kind::Full, Kind::Pfc(0.1), Kind::Pfc(0.3)];
    let mut rows = Vec::new();
    let mut reference = Vec::new();
    for dev in common::devices() {
        let gpu = dev.kind() == DeviceKind::Cuda;
        let (b, ns): (usize, Vec<usize>) =
            if gpu { (512, vec![10, 12, 14, 16, 18, 20, 21]) } else { (64, vec![10, 12, 14, 16, 18]) };
        let ns: Vec<usize> = ns.into_iter().map(|p| 1 << p).collect();
        rows.extend(sweep(&mut c, "softmax_head", &dev, &kinds, &ns, b, D));
        if gpu {
            for &n in &ns {
                reference.push((n, cublas_three(&dev, n, b)));
            }
        }
    }
    c.final_summary();
    println!("\n### O(N) heads, forward + backward (d = {D})\n");
    println!("| device | head | N | B | time per step | peak extra memory | fused / 3 cuBLAS GEMMs |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let ratio = match (r.kind, reference.iter().find(|x| x.0 == r.n && r.device != "cpu")) {
            (Kind::Full, Some((_, Some(s)))) => format!("{:.2}x", r.seconds / s),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {:.3} ms | {:.1} MiB | {ratio} |",
            r.device,
            r.kind.name(),
            r.n,
            r.b,
            r.seconds * 1e3,
            mib(r.peak)
        );
    }
    common::print_summary("softmax_head");
}
