//! The O(N) baselines' training step (forward + backward): the fused full
//! margin softmax and Partial FC at r = 0.1 and 0.3, d = 512, for N from
//! 2^10 to 2^21 with B = 512 on a GPU, 2^10 to 2^18 with B = 64 on the CPU.
//! Prints the time and the peak extra memory of a step (its gradients
//! included), and on a GPU the time of the three cuBLAS GEMMs the unfused
//! head would run (logits, feature gradient, centre gradient): the target is
//! the fused head within 1.3x of them. On a GPU also in bf16: the heads on
//! the tensor-core path (chunked), against bf16 cuBLAS GEMMs.
//! benches/torch_heads.py times PyTorch at the same shapes.
//!
//! Run: `cargo bench --bench softmax_head`.

mod common;

use common::heads::{mib, sweep, Kind};
use gif_fr::ops::gemm::{cublas_gemm, Op};
use gif_fr::{DType, Device, DeviceKind, Tensor};

const D: usize = 512;

/// Mean seconds of logits = U·Wᵀ, dU = G·W, dW = Gᵀ·U with cuBLAS, the
/// operands f32 or bf16 (f32 outputs; the logits' gradient G stands in
/// with the operands' dtype).
fn cublas_three(dev: &Device, n: usize, b: usize, bf16: bool) -> Option<f64> {
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let t = |shape: &[usize], dt: DType| {
        Tensor::from_f32(dev, shape, &common::heads::fill(shape.iter().product(), 0.1, 1), dt).ok()
    };
    let (u, w, gin) = (t(&[b, D], dtype)?, t(&[n, D], dtype)?, t(&[b, n], dtype)?);
    let mut g = Tensor::empty(dev, &[b, n], DType::F32).ok()?;
    let (mut du, mut dw) =
        (Tensor::empty(dev, &[b, D], DType::F32).ok()?, Tensor::empty(dev, &[n, D], DType::F32).ok()?);
    let mut run = || -> gif_fr::Result<()> {
        cublas_gemm(1.0, &u, Op::N, &w, Op::T, 0.0, &mut g)?;
        cublas_gemm(1.0, &gin, Op::N, &w, Op::N, 0.0, &mut du)?;
        cublas_gemm(1.0, &gin, Op::T, &u, Op::N, 0.0, &mut dw)
    };
    run().ok()?;
    let d = dev.time(5, run).ok()?;
    Some(d.as_secs_f64() / 5.0)
}

fn main() {
    let mut c = common::criterion();
    let mut rows = Vec::new();
    let mut reference = Vec::new();
    for dev in common::devices() {
        let gpu = dev.kind() == DeviceKind::Cuda;
        // bf16 (the tensor-core path) on a GPU only: the CPU widens bf16.
        let kinds: Vec<Kind> = [false, true]
            .into_iter()
            .filter(|&bf16| gpu || !bf16)
            .flat_map(|bf16| [Kind::Full { bf16 }, Kind::Pfc { rate: 0.1, bf16 }, Kind::Pfc { rate: 0.3, bf16 }])
            .collect();
        let (b, ns): (usize, Vec<usize>) =
            if gpu { (512, vec![10, 12, 14, 16, 18, 20, 21]) } else { (64, vec![10, 12, 14, 16, 18]) };
        let ns: Vec<usize> = ns.into_iter().map(|p| 1 << p).collect();
        rows.extend(sweep(&mut c, "softmax_head", &dev, &kinds, &ns, b, D));
        if gpu {
            for &n in &ns {
                for bf16 in [false, true] {
                    reference.push((n, bf16, cublas_three(&dev, n, b, bf16)));
                }
            }
        }
    }
    c.final_summary();
    println!("\n### O(N) heads, forward + backward (d = {D})\n");
    println!("| device | head | N | B | time per step | peak extra memory | fused / 3 cuBLAS GEMMs |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let ratio = match r.kind {
            Kind::Full { bf16 } => match reference.iter().find(|x| x.0 == r.n && x.1 == bf16 && r.device != "cpu") {
                Some((_, _, Some(s))) => format!("{:.2}x", r.seconds / s),
                _ => "-".into(),
            },
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
