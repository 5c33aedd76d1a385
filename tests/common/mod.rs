//! Helpers shared by the integration tests.
#![allow(dead_code)]

use gif_fr::Device;
#[cfg(feature = "sim")]
use gif_fr::SimOrder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The devices every kernel test runs on: the simulator in forward, reverse
/// and a shuffled order, and the first GPU when there is one (with poisoned
/// allocations). Without a GPU a skip notice is printed, or, when
/// GIF_FR_REQUIRE_GPU is set, the test fails.
#[cfg(feature = "sim")]
pub fn gpu_devices() -> Vec<Device> {
    let mut v = vec![
        Device::sim_with(SimOrder::Forward),
        Device::sim_with(SimOrder::Reverse),
        Device::sim_with(SimOrder::Shuffle(0x5eed)),
    ];
    if let Some(d) = cuda() {
        v.push(d);
    }
    v
}

/// The CPU (the CPU path of an op) and then [`gpu_devices`].
#[cfg(feature = "sim")]
pub fn all_devices() -> Vec<Device> {
    let mut v = vec![Device::cpu()];
    v.extend(gpu_devices());
    v
}

/// The first GPU with poisoned allocations, or `None` with a printed skip
/// notice (a failure when GIF_FR_REQUIRE_GPU is set).
pub fn cuda() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d.with_poison(true)),
        Err(e) => {
            let required =
                std::env::var(gif_fr::runtime::device::REQUIRE_GPU_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(!required, "{} is set but no GPU is usable: {e}", gif_fr::runtime::device::REQUIRE_GPU_ENV);
            skip_notice(&format!("skipping the CUDA part of the kernel tests: {e}"));
            None
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [lo, hi).
pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `n` random rows of `d` values, each scaled to unit norm.
pub fn unit_rows(rng: &mut StdRng, n: usize, d: usize) -> Vec<f32> {
    let mut v = uniform(rng, n * d, -1.0, 1.0);
    for row in v.chunks_mut(d) {
        let s = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= s);
    }
    v
}

/// Asserts |got - want| <= atol + rtol·|want| elementwise (NaN never
/// passes unless both are NaN and `nan_ok`), naming the first bad index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {rtol})");
    }
}

/// Prints a skip notice once per test binary, straight to stderr so that
/// libtest's output capture does not swallow it.
pub fn skip_notice(msg: &str) {
    use std::io::Write;
    static SHOWN: std::sync::Once = std::sync::Once::new();
    SHOWN.call_once(|| {
        let _ = writeln!(std::io::stderr(), "note: {msg}");
    });
}

/// The bytes of a .npy v1.0 file: `descr` ("<f4" or "<f8"), C order,
/// `shape`, and the little-endian values.
pub fn npy_bytes(descr: &str, shape: &[usize], values: &[u8]) -> Vec<u8> {
    npy_bytes_version(1, descr, shape, values)
}

/// [`npy_bytes`] with a version 1 (u16 header length) or 2 (u32) header.
pub fn npy_bytes_version(version: u8, descr: &str, shape: &[usize], values: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let prefix = if version == 1 { 10 } else { 12 };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    while (prefix + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
    if version == 1 {
        bytes.extend((h.len() as u16).to_le_bytes());
    } else {
        bytes.extend((h.len() as u32).to_le_bytes());
    }
    bytes.extend(h.as_bytes());
    bytes.extend(values);
    bytes
}

/// The margins every head test runs: none, the old fallback ArcFace,
/// CosFace, and insightface's combined margins (arc and cos).
pub const MARGINS: [gif_fr::head::Margin; 5] = [
    gif_fr::head::Margin::None,
    gif_fr::head::Margin::ArcFace(0.5),
    gif_fr::head::Margin::CosFace(0.35),
    gif_fr::head::Margin::INSIGHTFACE_ARCFACE,
    gif_fr::head::Margin::Combined { m1: 1.0, m2: 0.3, m3: 0.25 },
];

/// A small IResNet of the full structure (stem, four stages with
/// downsample and plain blocks, BN, flatten, Linear, BN1d): 16x16 input,
/// widths 4-12, embedding 6.
pub fn tiny_iresnet() -> gif_fr::backbone::IResNetConfig {
    gif_fr::backbone::IResNetConfig {
        layers: [2, 1, 1, 1],
        stem: 4,
        widths: [4, 8, 8, 12],
        input: 16,
        embedding: 6,
        dropout: 0.0,
        conv_dtype: gif_fr::DType::F32,
    }
}

/// Random images `[b, input, input, 3]` and embedding gradients
/// `[b, embedding]` for a network of `cfg`, on `dev`.
pub fn iresnet_batch(
    dev: &Device,
    cfg: &gif_fr::backbone::IResNetConfig,
    b: usize,
    seed: u64,
) -> (gif_fr::Tensor, gif_fr::Tensor) {
    let mut r = rng(seed);
    let s = cfg.input;
    let images = gif_fr::Tensor::from_slice(dev, &[b, s, s, 3], &uniform(&mut r, b * s * s * 3, -1.0, 1.0)).unwrap();
    let e = cfg.embedding;
    let d_emb = gif_fr::Tensor::from_slice(dev, &[b, e], &uniform(&mut r, b * e, -1.0, 1.0)).unwrap();
    (images, d_emb)
}

/// The `gif-fr` binary: `GIF_FR_BIN` when set (the GPU kit runs prebuilt
/// test binaries on a machine where the build's target folder is absent),
/// else the one cargo built for this test run.
pub fn gif_fr_bin() -> std::path::PathBuf {
    std::env::var_os("GIF_FR_BIN").map_or_else(|| env!("CARGO_BIN_EXE_gif-fr").into(), Into::into)
}
