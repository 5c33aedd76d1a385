//! The structural cost of the hot steps, pinned exactly on the simulator
//! (the same launch path as a GPU): kernel launches, allocations, copies and
//! host waits per step, from `Device::stats`. A change that adds a launch,
//! a copy or a synchronization to a step fails here and must update the
//! numbers (and docs/performance.md) on purpose.
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::decode::{Mode, PrefixDecoder};
use gif_fr::head::{
    CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadMetrics, PartialFc, SoftmaxGrads, SoftmaxHead,
    SoftmaxHeadConfig, SoftmaxMetrics,
};
use gif_fr::tokenizer::{tokenize, Config, Input};
use gif_fr::{DType, Device, DeviceStats, Tensor};

/// The counts of `f` on `dev`.
fn counts(dev: &Device, f: impl FnOnce()) -> DeviceStats {
    dev.reset_stats();
    f();
    dev.stats().unwrap()
}

fn code_step(l: usize, proj: Option<usize>, device_labels: bool) -> (DeviceStats, DeviceStats) {
    let dev = Device::sim();
    let (b, d, v, n) = (37, 16, 8, 300);
    let codes: Vec<u16> = (0..n).flat_map(|i| (0..l).map(move |j| ((i / 8usize.pow(j as u32)) % 8) as u16)).collect();
    let mut r = rng(2);
    let vecs = unit_rows(&mut r, n, d);
    let table = CodeTable::new(&dev, codes, l, v, Some((&vecs, d, DType::F32))).unwrap();
    let cfg = CodeHeadConfig { projection: proj, gamma: 0.5, ..CodeHeadConfig::new(d, l, v) };
    let head = CodeHead::new(cfg, &dev, 1).unwrap();
    let x = Tensor::from_slice(&dev, &[b, d], &uniform(&mut r, b * d, -1.0, 1.0)).unwrap();
    let y: Vec<u32> = (0..b as u32).map(|i| i * 7 % n as u32).collect();
    let yt = Tensor::from_slice(&dev, &[b], &y).unwrap();
    let mut grads = HeadGrads::new(&head, b).unwrap();
    let mut m = HeadMetrics::new();
    // The first step allocates the metrics' buffer; count a later one.
    head.forward_backward_into(&x, &y, &table, &mut grads, &mut m).unwrap();
    let step = counts(&dev, || {
        if device_labels {
            head.forward_backward_into(&x, &yt, &table, &mut grads, &mut m).unwrap()
        } else {
            head.forward_backward_into(&x, &y, &table, &mut grads, &mut m).unwrap()
        }
    });
    let read = counts(&dev, || drop(m.read().unwrap()));
    (step, read)
}

/// Asserts the fields that fix a step's structure.
fn pin(what: &str, got: DeviceStats, launches: u64, allocations: u64, uploads: u64, downloads: u64, syncs: u64) {
    let want = (launches, allocations, uploads, downloads, syncs);
    let have = (got.launches, got.allocations, got.uploads, got.downloads, got.syncs);
    assert_eq!(have, want, "{what}: (launches, allocations, uploads, downloads, syncs); all: {got:?}");
}

#[test]
fn code_head_step() {
    for l in 2..=4u64 {
        let lu = l as usize;
        // Per step: the label kernel, the regression term, then per
        // position the centres' normalization, the fused margin softmax, the
        // centre-gradient GEMM and its normalization backward (4 launches);
        // a projection adds its GEMM, dz's GEMMs (3 more).
        pin("host labels", code_step(lu, None, false).0, 2 + 4 * l, 4 + 5 * l, 1, 0, 0);
        pin("device labels", code_step(lu, None, true).0, 2 + 4 * l, 3 + 5 * l, 0, 0, 0);
        pin("projection", code_step(lu, Some(12), true).0, 2 + 7 * l, 3 + 7 * l, 0, 0, 0);
    }
    // Reading the metrics: the label flag and the statistics rows.
    pin("read", code_step(3, None, true).1, 0, 0, 0, 2, 2);
}

#[test]
fn softmax_and_partial_fc_steps() {
    let dev = Device::sim();
    let (b, d, n) = (37, 16, 500);
    let mut r = rng(3);
    let x = Tensor::from_slice(&dev, &[b, d], &uniform(&mut r, b * d, -1.0, 1.0)).unwrap();
    let y: Vec<u32> = (0..b as u32).map(|i| i * 11 % n as u32).collect();
    let yt = Tensor::from_slice(&dev, &[b], &y).unwrap();
    let head = SoftmaxHead::new(SoftmaxHeadConfig::new(d, n), &dev, DType::F32, 1).unwrap();
    let mut g = SoftmaxGrads::new(&dev, b, n, d).unwrap();
    let mut m = SoftmaxMetrics::new();
    head.forward_backward_into(&x, &y, &mut g, &mut m).unwrap();
    let host = counts(&dev, || head.forward_backward_into(&x, &y, &mut g, &mut m).unwrap());
    let device = counts(&dev, || head.forward_backward_into(&x, &yt, &mut g, &mut m).unwrap());
    // Forward partials, merge, target angles, backward, finish, the
    // normalizations (features, centre norms, gradient): 8 launches; device
    // labels add the label kernel and replace the targets' upload.
    pin("softmax, host labels", host, 8, 8, 1, 0, 0);
    pin("softmax, device labels", device, 9, 9, 0, 0, 0);
    let pfc = PartialFc::new(head, 0.3, 9).unwrap();
    let mut pg = gif_fr::head::PfcGrads::new(&pfc, b).unwrap();
    pfc.forward_backward_into(&x, &y, 0, &mut pg, &mut m).unwrap();
    let p = counts(&dev, || pfc.forward_backward_into(&x, &y, 1, &mut pg, &mut m).unwrap());
    // The sample is drawn on the device (mark, two radix passes of hist and
    // find, count, scan, write: 8 launches), then the step over it; the
    // sample comes down once to remap the labels on the host (1 sync; the
    // GPU efficiency issue moves the remapping to the device).
    pin("partial fc", p, 16, 15, 3, 1, 1);
}

#[test]
fn decode_step() {
    let dev = Device::sim();
    let book = tokenize(
        Input::Random { count: 200, dim: 4 },
        &Config { vocab: 8, seed: 1, steps: Some(0), kmeans_iters: 2, ..Config::default() },
        &Device::cpu(),
    )
    .unwrap();
    let dec = PrefixDecoder::new(&book, &dev).unwrap();
    let (b, l, v) = (29, book.length(), book.vocab());
    let mut r = rng(4);
    let lp = Tensor::from_slice(&dev, &[b, l * v], &uniform(&mut r, b * l * v, -5.0, 0.0)).unwrap();
    for mode in [Mode::Exact, Mode::Beam(16)] {
        let c = counts(&dev, || drop(dec.top_k(&lp, 5, mode, None).unwrap()));
        // One launch; the ids and the scores come down.
        pin(&format!("decode {mode:?} (l = {l})"), c, 1, 2, 0, 2, 2);
    }
}

#[test]
fn iresnet_training_step() {
    let dev = Device::sim();
    let cfg = tiny_iresnet();
    let b = 2;
    let (images, d_emb) = iresnet_batch(&dev, &cfg, b, 5);
    let mut net = gif_fr::backbone::IResNet::new(cfg, &dev, 1).unwrap();
    // The first step fills the buffer pool; count the second.
    net.forward(&images, true).unwrap();
    net.backward(&d_emb).unwrap();
    let c = counts(&dev, || {
        net.forward(&images, true).unwrap();
        drop(net.backward(&d_emb).unwrap());
    });
    // The tiny network (stem, 5 blocks, head) at B = 2: no copy to or from
    // the host, no wait. Allocations are the gradients (new tensors each
    // backward) and the layers' temporaries outside the pool; the training
    // issue's persistent gradients lower them.
    pin("iresnet forward + backward", c, 282, 207, 0, 0, 0);
}

#[test]
fn code_head_log_probs() {
    for (proj, dtype) in [(None, DType::F32), (None, DType::BF16), (Some(12), DType::F32)] {
        let dev = Device::sim();
        let (b, d, l, v) = (23, 16, 3u64, 8);
        let cfg = CodeHeadConfig { projection: proj, ..CodeHeadConfig::new(d, l as usize, v) };
        let head = CodeHead::new(cfg, &dev, 1).unwrap();
        let x = Tensor::from_f32(&dev, &[b, d], &uniform(&mut rng(6), b * d, -1.0, 1.0), dtype).unwrap();
        let c = counts(&dev, || drop(head.log_probs(&x).unwrap()));
        // bf16 features are widened by a kernel; without a projection the
        // features are normalized once; per position: (projection GEMM and
        // its normalization), the centres' normalization, the cosine GEMM,
        // the log-softmax and the scatter into place, whose row ids are the
        // one upload per position. Nothing comes back to the host.
        let widen = u64::from(dtype != DType::F32);
        let launches = widen + if proj.is_some() { 6 * l } else { 1 + 4 * l };
        assert_eq!((c.launches, c.uploads, c.downloads, c.syncs), (launches, l, 0, 0), "{proj:?} {dtype:?}: {c:?}");
    }
}
