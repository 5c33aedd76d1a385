//! The IResNet backbone: every kind of convolution at its place in the
//! network (forward, data gradient, weight gradient), and whole networks
//! (r50 and r100 inference images/s; r50's training step, forward and
//! backward), with f32 convolutions and, on a GPU, bf16 ones
//! (`IResNetConfig::conv_dtype`).
//!
//! - GPU: B = 128 (the shapes); convolutions with f32 operands (fp32
//!   SIMT kernels) and bf16 operands (tensor cores, f32 accumulation); the
//!   conv table gives TFLOP/s.
//! - CPU: B = 2, f32 (the CPU path is a fallback; B = 128 would take hours).
//!
//! Each conv layer is named by its first place in insightface's iresnet
//! (`layer2.0.conv2` = stage 2's stride-2 3x3 conv, `layer2.1.conv1` = the
//! stage's plain 3x3 conv, `.downsample` = the 1x1 stride-2 conv), input
//! 112x112. With GIF_FR_BACKBONE_QUICK set (the GPU kit) a subset of 8
//! layers and r50 alone run. With GIF_FR_BACKBONE_OUT=DIR the measurements
//! are written to DIR/backbone.csv, which benches/torch_backbone.py reads to
//! time cuDNN at the same shapes and print the ratios.
//!
//! Run: `cargo bench --bench backbone`.

mod common;

use std::io::Write;

use common::heads::{bench_or_time, fill};
use gif_fr::backbone::{conv2d_data_grad_into, conv2d_into, conv2d_weight_grad, ConvShape, IResNet, IResNetConfig};
use gif_fr::{DType, Device, DeviceKind, Result, Tensor};

/// (name, input height = width, c_in, c_out, kernel, stride) of IResNet's
/// distinct convolutions at input 112.
fn layers(quick: bool) -> Vec<(String, usize, usize, usize, usize, usize)> {
    let mut v = vec![("conv1".to_string(), 112, 3, 64, 3, 1)];
    for (i, (hw, c_in, c)) in [(112, 64, 64), (56, 64, 128), (28, 128, 256), (14, 256, 512)].into_iter().enumerate() {
        let s = i + 1;
        v.push((format!("layer{s}.0.conv1"), hw, c_in, c, 3, 1));
        v.push((format!("layer{s}.0.conv2"), hw, c, c, 3, 2));
        v.push((format!("layer{s}.0.downsample"), hw, c_in, c, 1, 2));
        v.push((format!("layer{s}.1.conv1"), hw / 2, c, c, 3, 1));
    }
    if quick {
        let keep = [
            "conv1",
            "layer1.1.conv1",
            "layer2.0.conv2",
            "layer2.1.conv1",
            "layer3.0.conv2",
            "layer3.0.downsample",
            "layer3.1.conv1",
            "layer4.1.conv1",
        ];
        v.retain(|l| keep.contains(&l.0.as_str()));
    }
    v
}

/// Multiply-adds of the convolution (each of its three ops has as many).
fn macs(s: &ConvShape) -> f64 {
    let (ho, wo) = s.out_hw().unwrap();
    (s.batch * ho * wo * s.c_out * s.kernel * s.kernel * s.c_in) as f64
}

struct ConvRow {
    device: String,
    dtype: DType,
    layer: String,
    shape: ConvShape,
    op: &'static str,
    seconds: f64,
}

struct NetRow {
    device: String,
    arch: String,
    dtype: DType,
    what: &'static str,
    b: usize,
    seconds: f64,
}

fn t(dev: &Device, shape: &[usize], seed: u64) -> Result<Tensor> {
    Tensor::from_slice(dev, shape, &fill(shape.iter().product(), 1.0, seed))
}

fn typed(dev: &Device, shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    Tensor::from_f32(dev, shape, &fill(shape.iter().product(), 1.0, seed), dtype)
}

/// Times the three ops of convolution `s` (layer `name`) with `dtype`
/// operands.
fn bench_conv(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    name: &str,
    s: &ConvShape,
    dtype: DType,
    rows: &mut Vec<ConvRow>,
) -> Result<()> {
    let label = common::label(dev);
    let (nx, _, ny) = s.sizes().unwrap();
    let (x, w, dy) = (
        typed(dev, &[nx / s.c_in, s.c_in], 1, dtype)?,
        typed(dev, &[s.c_out, s.kernel, s.kernel, s.c_in], 2, dtype)?,
        typed(dev, &[ny / s.c_out, s.c_out], 3, dtype)?,
    );
    let mut y = Tensor::empty(dev, &[ny / s.c_out, s.c_out], DType::F32)?;
    let mut dx = Tensor::empty(dev, &[nx / s.c_in, s.c_in], DType::F32)?;
    let flops = 2.0 * macs(s);
    for op in ["forward", "data grad", "weight grad"] {
        let case = format!("{name} {op} {dtype:?} B={}", s.batch);
        let mut f = || -> Result<()> {
            match op {
                "forward" => conv2d_into(&x, &w, s, &mut y),
                "data grad" => conv2d_data_grad_into(&dy, &w, s, &mut dx),
                _ => conv2d_weight_grad(&x, &dy, s).map(drop),
            }
        };
        bench_or_time(g, dev, &format!("{name} {op} {dtype:?}"), s.batch, &case, flops, None, &mut f);
        let seconds = common::mean_seconds(&case, &label).unwrap_or(f64::NAN);
        rows.push(ConvRow { device: label.clone(), dtype, layer: name.to_string(), shape: *s, op, seconds });
    }
    Ok(())
}

fn main() {
    let quick = std::env::var("GIF_FR_BACKBONE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut c = common::criterion();
    let (mut conv_rows, mut net_rows) = (Vec::new(), Vec::new());
    for dev in common::devices() {
        let gpu = dev.kind() == DeviceKind::Cuda;
        let label = common::label(&dev);
        let b = if gpu { 128 } else { 2 };
        let mut g = c.benchmark_group(format!("backbone_conv/{label}"));
        for (name, hw, c_in, c_out, k, stride) in layers(quick) {
            let s = ConvShape { batch: b, height: hw, width: hw, c_in, c_out, kernel: k, stride, pad: k / 2 };
            let dtypes: &[DType] = if gpu { &[DType::F32, DType::BF16] } else { &[DType::F32] };
            for &dtype in dtypes {
                bench_conv(&mut g, &dev, &name, &s, dtype, &mut conv_rows)
                    .unwrap_or_else(|e| panic!("{name} {dtype:?} on {label}: {e}"));
            }
        }
        g.finish();
        let mut g = c.benchmark_group(format!("backbone_net/{label}"));
        let archs: &[&str] = if quick { &["r50"] } else { &["r50", "r100"] };
        let dtypes: &[DType] = if gpu { &[DType::F32, DType::BF16] } else { &[DType::F32] };
        for &arch in archs {
            for &dtype in dtypes {
                let cfg = IResNetConfig { conv_dtype: dtype, ..IResNetConfig::arch(arch).expect("arch") };
                let mut net = IResNet::new(cfg, &dev, 1).expect("network");
                let x = t(&dev, &[b, 112, 112, 3], 4).expect("images");
                let d = t(&dev, &[b, 512], 5).expect("gradient");
                let mut row = |what: &'static str, f: &mut dyn FnMut() -> Result<()>| {
                    let case = format!("{arch} {what} {dtype:?} B={b}");
                    bench_or_time(&mut g, &dev, &format!("{arch} {what} {dtype:?}"), b, &case, 0.0, None, f);
                    let seconds = common::mean_seconds(&case, &label).unwrap_or(f64::NAN);
                    net_rows.push(NetRow { device: label.clone(), arch: arch.into(), dtype, what, b, seconds });
                };
                row("inference", &mut || net.infer(&x).map(drop));
                if !gpu && dtype == DType::F32 {
                    // The CPU's `infer` is the folded network; this is the
                    // layer-by-layer eval forward it replaces.
                    row("eval forward, layer by layer", &mut || net.forward(&x, false).map(drop));
                }
                if arch == "r50" {
                    row("training step", &mut || {
                        net.forward(&x, true)?;
                        net.backward(&d).map(drop)
                    });
                }
            }
        }
        g.finish();
    }
    c.final_summary();
    println!("\n### IResNet convolutions (NHWC, implicit GEMM; f32 results)\n");
    println!("| device | layer | B | HxW | C_in -> C_out | k / stride | op | operands | time | TFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &conv_rows {
        let s = &r.shape;
        println!(
            "| {} | {} | {} | {}x{} | {} -> {} | {} / {} | {} | {:?} | {:.3} ms | {:.2} |",
            r.device,
            r.layer,
            s.batch,
            s.height,
            s.width,
            s.c_in,
            s.c_out,
            s.kernel,
            s.stride,
            r.op,
            r.dtype,
            r.seconds * 1e3,
            2.0 * macs(s) / r.seconds / 1e12
        );
    }
    println!("\n### IResNet networks (convolution operands f32 or bf16; the rest f32)\n");
    println!("| device | arch | B | pass | convolutions | time per batch | images/s |");
    println!("|---|---|---|---|---|---|---|");
    for r in &net_rows {
        println!(
            "| {} | {} | {} | {} | {:?} | {:.1} ms | {:.1} |",
            r.device,
            r.arch,
            r.b,
            r.what,
            r.dtype,
            r.seconds * 1e3,
            r.b as f64 / r.seconds
        );
    }
    if let Ok(dir) = std::env::var("GIF_FR_BACKBONE_OUT") {
        write_csv(&dir, &conv_rows, &net_rows).unwrap_or_else(|e| eprintln!("backbone.csv: {e}"));
    }
    common::print_summary("backbone");
}

/// DIR/backbone.csv: one row per measurement (kind conv or net).
fn write_csv(dir: &str, conv: &[ConvRow], net: &[NetRow]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = std::path::Path::new(dir).join("backbone.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(f, "kind,device,name,op,dtype,b,hw,c_in,c_out,k,stride,seconds")?;
    let name = |d: DType| if d == DType::BF16 { "bf16" } else { "f32" };
    for r in conv {
        let s = &r.shape;
        let dtype = name(r.dtype);
        writeln!(
            f,
            "conv,{},{},{},{dtype},{},{},{},{},{},{},{:.6e}",
            r.device, r.layer, r.op, s.batch, s.height, s.c_in, s.c_out, s.kernel, s.stride, r.seconds
        )?;
    }
    for r in net {
        let dtype = name(r.dtype);
        writeln!(f, "net,{},{},{},{dtype},{},112,3,512,0,0,{:.6e}", r.device, r.arch, r.what, r.b, r.seconds)?;
    }
    println!("wrote {}", path.display());
    Ok(())
}
