//! The training step (src/train/trainer.rs) end to end on a tiny IResNet
//! and a few hundred images of synthetic identities: each head (GIF's code
//! head, the full margin softmax, Partial FC) lowers the loss and raises
//! the training accuracy on the CPU, the simulator follows the CPU's
//! losses; gradient accumulation; bad input.
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::backbone::{IResNet, IResNetConfig};
use std::sync::Arc;

use gif_fr::data::{Batch, Dataset, Images, Loader, Sampler};
use gif_fr::head::{
    CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadMetrics, Margin, PartialFc, PfcGrads, SoftmaxGrads,
    SoftmaxHead, SoftmaxHeadConfig, SoftmaxMetrics,
};
use gif_fr::runtime::pinned::PinnedBuffer;
use gif_fr::train::{OptimizerKind, Schedule, TrainHead, Trainer, TrainerConfig};
use gif_fr::{DType, Device};
use rand::seq::SliceRandom;

/// The network: the tiny IResNet with a 16-dimensional embedding.
fn net_config() -> IResNetConfig {
    IResNetConfig { embedding: 16, ..tiny_iresnet() }
}

/// `ids` identities × `per` images: a random prototype image per identity
/// plus noise (σ ≈ 0.35 of the pixel range), NHWC f32 in [-1.4, 1.4].
fn dataset(ids: usize, per: usize, s: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut r = rng(seed);
    let px = s * s * 3;
    let protos: Vec<Vec<f32>> = (0..ids).map(|_| uniform(&mut r, px, -0.8, 0.8)).collect();
    let mut images = Vec::with_capacity(ids * per * px);
    let mut labels = Vec::new();
    for _ in 0..per {
        for (id, p) in protos.iter().enumerate() {
            let noise = uniform(&mut r, px, -0.6, 0.6);
            images.extend(p.iter().zip(&noise).map(|(a, b)| a + b));
            labels.push(id as u32);
        }
    }
    (images, labels)
}

/// The batches of `epochs` epochs: a seeded shuffle per epoch, `b` images
/// each, the last partial batch dropped (insightface's drop_last).
fn batches(images: &[f32], labels: &[u32], px: usize, b: usize, epochs: usize) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut out = Vec::new();
    for e in 0..epochs {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.shuffle(&mut rng(1000 + e as u64));
        for chunk in order.chunks_exact(b) {
            let imgs = chunk.iter().flat_map(|&i| images[i * px..(i + 1) * px].iter().copied()).collect();
            out.push((imgs, chunk.iter().map(|&i| labels[i]).collect()));
        }
    }
    out
}

/// Distinct codes of length 3 over 4 tokens for n ≤ 64 identities (a
/// seeded permutation of the 64 codes).
fn codes(n: usize) -> Vec<u16> {
    let mut all: Vec<u16> = (0..64).collect();
    all.shuffle(&mut rng(17));
    all[..n].iter().flat_map(|&c| [c % 4, (c / 4) % 4, c / 16]).collect()
}

/// A head of kind `kind` ("gif", "arcface", "partial_fc") for n identities.
fn head(dev: &Device, kind: &str, n: usize) -> TrainHead {
    let d = net_config().embedding;
    // Small margins and scales suit a 16-dimensional embedding trained for
    // seconds (insightface's s = 64, m = 0.5 are for d = 512).
    let sm = SoftmaxHeadConfig { margin: Margin::CosFace(0.1), scale: 16.0, ..SoftmaxHeadConfig::new(d, n) };
    match kind {
        "gif" => {
            let cfg = CodeHeadConfig { margin: Margin::CosFace(0.1), scale: 16.0, ..CodeHeadConfig::new(d, 3, 4) };
            let vectors = unit_rows(&mut rng(23), n, d);
            let table = CodeTable::new(dev, codes(n), 3, 4, Some((&vectors, d, DType::F32))).unwrap();
            TrainHead::Code { head: CodeHead::new(cfg, dev, 5).unwrap(), table }
        }
        "arcface" => TrainHead::Softmax(SoftmaxHead::new(sm, dev, DType::F32, 5).unwrap()),
        _ => TrainHead::PartialFc(PartialFc::new(SoftmaxHead::new(sm, dev, DType::F32, 5).unwrap(), 0.5, 7).unwrap()),
    }
}

fn trainer(dev: &Device, kind: &str, n: usize, cfg: TrainerConfig) -> Trainer {
    Trainer::new(IResNet::new(net_config(), dev, 3).unwrap(), head(dev, kind, n), cfg).unwrap()
}

/// SGD (momentum 0.9, wd 5e-4, clip 5) at 0.1 with insightface's warmup
/// and power-2 decay over `steps`.
fn config(steps: u64) -> TrainerConfig {
    TrainerConfig::insightface(Schedule::insightface(0.1, steps / 10, steps))
}

#[test]
fn each_head_learns_synthetic_identities() {
    let (ids, per, b) = (24, 12, 32);
    let px = net_config().input.pow(2) * 3;
    let (images, labels) = dataset(ids, per, net_config().input, 1);
    let data = batches(&images, &labels, px, b, 5);
    let steps = data.len() as u64; // 9 batches an epoch, 45 steps
                                   // Small batches for the simulator's check (its convolutions run on CPU
                                   // fibers): the first 8 images of the first batches.
    let small: Vec<(Vec<f32>, Vec<u32>)> =
        data[..2].iter().map(|(x, y)| (x[..8 * px].to_vec(), y[..8].to_vec())).collect();
    for kind in ["gif", "arcface", "partial_fc"] {
        // The CPU trains the whole run.
        let mut tr = trainer(&Device::cpu(), kind, ids, config(steps));
        let mut seen = Vec::new();
        for (imgs, labs) in &data {
            assert!(tr.step(imgs, labs).unwrap());
            let m = tr.metrics().unwrap();
            seen.push((m.loss, m.accuracy));
        }
        let m = tr.metrics().unwrap();
        assert_eq!((m.step, m.optimizer_steps, m.skipped), (steps, steps, 0), "{kind}");
        let mean = |s: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
        let (first, last) = (&seen[..5], &seen[seen.len() - 5..]);
        let (l0, l1) = (mean(first, |x| x.0), mean(last, |x| x.0));
        let (a0, a1) = (mean(first, |x| x.1), mean(last, |x| x.1));
        println!("{kind}: loss {l0:.3} -> {l1:.3}, training accuracy {a0:.3} -> {a1:.3}");
        assert!(l1 < 0.5 * l0, "{kind}: the loss went from {l0} to {l1}");
        assert!(a1 > a0 + 0.3 && a1 > 0.5, "{kind}: the accuracy went from {a0} to {a1}");
        // The simulator follows the CPU's first steps (the same arithmetic
        // up to rounding).
        let mut losses = Vec::new();
        for dev in [Device::cpu(), Device::sim()] {
            let mut tr = trainer(&dev, kind, ids, config(steps));
            let seen: Vec<f64> = small
                .iter()
                .map(|(imgs, labs)| {
                    tr.step(imgs, labs).unwrap();
                    tr.metrics().unwrap().loss
                })
                .collect();
            losses.push(seen);
        }
        for (t, (c, s)) in losses[0].iter().zip(&losses[1]).enumerate() {
            assert!((s - c).abs() <= 2e-3 * c.abs().max(1.0), "{kind} step {t}: the simulator's {s}, the CPU's {c}");
        }
    }
}

#[test]
fn accumulating_a_micro_batch_twice_equals_one_step_on_it() {
    // (g + g)·½ = g exactly in floating point, and the norm and clip
    // factor scale by powers of two: two micro-batches of the same images
    // with gradient_acc = 2 must give, bit for bit, the parameters of one
    // step on them (constant rate: the schedule position differs).
    let ids = 10;
    let px = net_config().input.pow(2) * 3;
    let (images, labels) = dataset(ids, 3, net_config().input, 2);
    let data = batches(&images, &labels, px, 7, 2);
    // Both heads on the CPU, the code head on the simulator too (its
    // convolutions run on CPU fibers: slow).
    for (kind, dev) in [("gif", Device::cpu()), ("arcface", Device::cpu()), ("gif", Device::sim())] {
        let cfg = TrainerConfig { max_grad_norm: Some(0.5), ..config(10) };
        let cfg = TrainerConfig { schedule: Schedule::Constant { base: 0.05 }, ..cfg };
        let mut once = trainer(&dev, kind, ids, cfg.clone());
        let mut twice = trainer(&dev, kind, ids, TrainerConfig { gradient_acc: 2, ..cfg });
        for (imgs, labs) in &data[..2] {
            assert!(once.step(imgs, labs).unwrap());
            assert!(!twice.step(imgs, labs).unwrap());
            assert!(twice.step(imgs, labs).unwrap());
        }
        let (a, b) = (once.metrics().unwrap(), twice.metrics().unwrap());
        assert_eq!((a.optimizer_steps, b.optimizer_steps, b.step), (2, 2, 4), "{dev} {kind}");
        // Clipping acted (the norm is above 0.5), on the same norm.
        assert!(a.grad_norm > 0.5 && a.grad_norm == b.grad_norm, "{dev} {kind}: {a:?} {b:?}");
        assert!(params(&once) == params(&twice), "{dev} {kind}: accumulation differs from one step");
        // And the run moved the parameters (the comparison is not vacuous).
        let fresh = trainer(&dev, kind, ids, config(10));
        assert!(params(&once) != params(&fresh), "{dev} {kind}");
    }
}

/// The trained parameters' bits (the backbone without its running
/// statistics, then the head).
fn params(t: &Trainer) -> Vec<Vec<u32>> {
    let bits = |t: &gif_fr::Tensor| t.to_f32_vec().unwrap().iter().map(|x| x.to_bits()).collect();
    let mut v: Vec<Vec<u32>> =
        t.backbone().state().iter().filter(|(n, _)| !n.contains("running")).map(|(_, t)| bits(t)).collect();
    v.extend(t.head().params().iter().map(|(_, t)| bits(t)));
    v
}

#[test]
fn page_locked_batches_train_as_ordinary_ones_without_a_wait() {
    // A pinned loader's batches go to two image buffers in turn, uploaded
    // without a wait (on a GPU, on a second stream beside the step
    // before), from page-locked buffers the loader recycles (writing one
    // again waits for its copy). Against steps from an ordinary loader's
    // batches: on the simulator, which runs each copy when queued, the
    // parameters are equal bit for bit; a step must not wait for the
    // device.
    let ids = 10;
    let s = net_config().input;
    let px = s * s * 3;
    let (images, labels) = dataset(ids, 3, s, 2);
    let dir = tempfile::tempdir().unwrap();
    let (ipath, lpath) = (dir.path().join("images.npy"), dir.path().join("labels.npy"));
    let bytes: Vec<u8> = images.iter().map(|&x| ((x * 0.5 + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    std::fs::write(&ipath, npy_bytes("|u1", &[labels.len(), s, s, 3], &bytes)).unwrap();
    let labels64: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
    gif_fr::io::npy::write_npy_i64(&lpath, &labels64).unwrap();
    let ds = Arc::new(Dataset::arrays(&ipath, &lpath, s).unwrap());
    // 30 images in batches of 4; the first 3 batches of an epoch.
    let sampler = Sampler::new(ds.len(), 4, 9);
    let dev = Device::sim();
    let mut kept = None;
    for dev in [dev.clone()].into_iter().chain(cuda()) {
        let plain_loader = Loader::new(ds.clone(), sampler.clone(), 1, 2, true).unwrap();
        let pinned_loader = Loader::new(ds.clone(), sampler.clone(), 1, 2, true).unwrap().pinned(&dev).unwrap();
        let (mut plain, mut pinned) = (trainer(&dev, "gif", ids, config(10)), trainer(&dev, "gif", ids, config(10)));
        for b in plain_loader.epoch(0, 0).unwrap().take(3) {
            plain.step_batch(&b.unwrap()).unwrap();
        }
        let mut counts = Vec::new();
        for (t, b) in pinned_loader.epoch(0, 0).unwrap().take(3).enumerate() {
            let b = b.unwrap();
            assert!(b.images.pinned().is_some_and(|p| p.device() == &dev), "{dev}: batch {t}");
            dev.reset_stats();
            pinned.step_batch(&b).unwrap();
            let st = dev.stats().unwrap();
            counts.push((t, st.allocations, st.uploads, st.syncs));
        }
        println!("{dev}: page-locked steps (step, allocations, uploads, syncs): {counts:?}");
        println!("{dev}: {:?}", pinned_loader.pool_stats().unwrap());
        assert_eq!(counts.len(), 3);
        // The second step allocates the second image buffer (the first,
        // every buffer of the step); then both are reused. Two uploads
        // (images, labels) and no wait in every step.
        let rest = counts[2].1;
        assert_eq!(counts[1].1, rest + 1, "{dev}: one image buffer more in the second step: {counts:?}");
        assert!(counts[2..].iter().all(|c| c.1 == rest), "{dev}: {counts:?}");
        assert!(counts[1..].iter().all(|c| (c.2, c.3) == (2, 0)), "{dev}: {counts:?}");
        let pool = pinned_loader.pool_stats().unwrap();
        // (The worker decodes ahead of the steps: up to the 6 batches.)
        assert!(pool.allocated + pool.reused >= 3 && pool.allocated <= 5 && pool.pageable == 0, "{dev}: {pool:?}");
        let (a, b) = (params(&plain), params(&pinned));
        if dev.kind() == gif_fr::DeviceKind::Sim {
            assert!(a == b, "{dev}: page-locked batches train differently");
        } else {
            // A GPU's kernels may sum in another order from run to run.
            let worst = a
                .iter()
                .zip(&b)
                .flat_map(|(x, y)| x.iter().zip(y).map(|(&p, &q)| (f32::from_bits(p) - f32::from_bits(q)).abs()))
                .fold(0f32, f32::max);
            println!("{dev}: largest parameter difference {worst:e}");
            assert!(worst <= 1e-4, "{dev}: page-locked batches train differently ({worst:e})");
        }
        assert!(a != params(&trainer(&dev, "gif", ids, config(10))), "{dev}: the steps moved nothing");
        kept = kept.or(Some((plain, pinned)));
    }
    // The simulator's pair goes on with batches of a caller's own: ordinary
    // memory through step_batch (the upload with a wait), a buffer
    // page-locked for another device (the same), one's own page-locked
    // buffer for this device (no wait).
    let (mut plain, mut pinned) = kept.unwrap();
    let data = batches(&images, &labels, px, 4, 1);
    let other = Device::sim();
    for (t, (imgs, labs)) in data[..2].iter().enumerate() {
        dev.reset_stats();
        plain.step_batch(&Batch { images: Images::from_vec(imgs.clone()), labels: labs.clone() }).unwrap();
        assert_eq!(dev.stats().unwrap().syncs, 1);
        let mut buf = PinnedBuffer::new(if t == 0 { &other } else { &dev }, imgs.len()).unwrap();
        buf.as_mut_slice().unwrap().copy_from_slice(imgs);
        dev.reset_stats();
        pinned.step_batch(&Batch { images: Images::from_pinned(buf), labels: labs.clone() }).unwrap();
        assert_eq!(dev.stats().unwrap().syncs, if t == 0 { 1 } else { 0 }, "batch {t}");
        assert!(params(&plain) == params(&pinned), "batch {t}");
    }
    assert_eq!(other.stats().unwrap().uploads, 0);
    let (imgs, labs) = &data[2];
    // Bad input is refused as from ordinary memory, naming the sample.
    let mut bad = PinnedBuffer::new(&dev, imgs.len()).unwrap();
    bad.as_mut_slice().unwrap()[px + 3] = f32::NAN;
    let e = pinned.step_batch(&Batch { images: Images::from_pinned(bad), labels: labs.clone() }).unwrap_err();
    assert!(e.to_string().contains("image 1"), "{e}");
    // Page-locked memory is for devices with uploads.
    assert!(PinnedBuffer::new(&Device::cpu(), 4).is_err());
    assert!(PinnedBuffer::new(&dev, usize::MAX / 2).is_err());
}

#[test]
fn a_step_allocates_only_what_the_backbone_and_the_head_allocate_alone() {
    // The allocations of a training step past the first are the head's own
    // temporaries (measured alone below): the backbone's activations,
    // temporaries and gradients, the embeddings, the head's gradients,
    // Partial FC's dense gradient, the accumulators, the optimizer's state
    // and lists and the images' buffer are all kept.
    // 20 identities: Partial FC's sample (10) holds a batch's positives,
    // its all-device path.
    let ids = 20;
    let px = net_config().input.pow(2) * 3;
    let (images, labels) = dataset(ids, 3, net_config().input, 2);
    const B: usize = 6;
    let data = batches(&images, &labels, px, B, 2);
    let dev = Device::sim();
    let backbone_alone = {
        let mut net = IResNet::new(net_config(), &dev, 3).unwrap();
        let mut grads = std::collections::BTreeMap::new();
        let x = gif_fr::Tensor::from_slice(&dev, &[B, 16, 16, 3], &data[0].0).unwrap();
        let d = gif_fr::Tensor::from_slice(&dev, &[B, 16], &[0.01f32; B * 16]).unwrap();
        let mut emb = gif_fr::Tensor::empty(&dev, &[B, 16], gif_fr::DType::F32).unwrap();
        let mut count = |accumulate: bool| {
            dev.reset_stats();
            net.forward_into(&x, true, &mut emb).unwrap();
            if accumulate {
                net.backward_accumulate(&d, &mut grads).unwrap();
            } else {
                net.backward_into(&d, &mut grads).unwrap();
            }
            dev.stats().unwrap().allocations
        };
        // (The first of each kind fills the pool.)
        count(false);
        count(true);
        [count(false), count(true)]
    };
    // The backbone's step at a batch size it has seen allocates nothing,
    // overwriting or accumulating its gradients.
    assert_eq!(backbone_alone, [0, 0]);
    // A head's own step allocates its temporaries (pinned in
    // tests/step_counts.rs): measured alone, into kept buffers.
    let head_alone = |kind: &str| -> u64 {
        let x = gif_fr::Tensor::from_slice(&dev, &[B, 16], &uniform(&mut rng(4), B * 16, -1.0, 1.0)).unwrap();
        let labs = &data[0].1;
        let mut count = match head(&dev, kind, ids) {
            TrainHead::Code { head, table } => {
                let (mut g, mut m) = (HeadGrads::new(&head, B).unwrap(), HeadMetrics::new());
                Box::new(move || head.forward_backward_into(&x, labs, &table, &mut g, &mut m).unwrap())
                    as Box<dyn FnMut()>
            }
            TrainHead::Softmax(h) => {
                let (mut g, mut m) = (SoftmaxGrads::new(&dev, B, ids, 16).unwrap(), SoftmaxMetrics::new());
                // (the same shapes as the trainer's)
                Box::new(move || h.forward_backward_into(&x, labs, &mut g, &mut m).unwrap())
            }
            TrainHead::PartialFc(p) => {
                let (mut g, mut m) = (PfcGrads::new(&p, B).unwrap(), SoftmaxMetrics::new());
                Box::new(move || p.forward_backward_into(&x, labs, 1, &mut g, &mut m).unwrap())
            }
            TrainHead::ModelParallel(_) => unreachable!("head() builds one-process heads"),
        };
        count();
        dev.reset_stats();
        count();
        dev.stats().unwrap().allocations
    };
    for kind in ["gif", "arcface", "partial_fc"] {
        let own = head_alone(kind);
        // Accumulating (the second set of gradients) for the heads that
        // have one; Partial FC's dense gradient accumulates either way.
        let acc = if kind == "partial_fc" { 1 } else { 2 };
        {
            let mut tr = trainer(&dev, kind, ids, TrainerConfig { gradient_acc: acc, ..config(10) });
            for (imgs, labs) in &data[..acc] {
                tr.step(imgs, labs).unwrap();
            }
            let mut counts = Vec::new();
            for (imgs, labs) in &data[acc..acc + 2] {
                dev.reset_stats();
                tr.step(imgs, labs).unwrap();
                let s = dev.stats().unwrap();
                counts.push((s.allocations, s.uploads, s.downloads, s.syncs));
            }
            println!(
                "{kind} gradient_acc {acc}: per step (allocations, uploads, downloads, syncs) {counts:?}; \
                 the head alone allocates {own}"
            );
            // The images' upload (a wait) and the head's labels' upload;
            // nothing comes down.
            for c in &counts {
                assert_eq!(c.0, own, "{kind} acc {acc}: {counts:?}");
                assert_eq!((c.1, c.2, c.3), (2, 0, 1), "{kind} acc {acc}: {counts:?}");
            }
        }
    }
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let dev = Device::cpu();
    let ids = 6;
    let s = net_config().input;
    let px = s * s * 3;
    let (images, labels) = dataset(ids, 2, s, 3);
    let mut tr = trainer(&dev, "arcface", ids, config(10));
    let b = 4;
    let imgs = &images[..b * px];
    let mut bad_label = labels[..b].to_vec();
    bad_label[2] = ids as u32;
    let mut nan = imgs.to_vec();
    nan[px + 5] = f32::NAN;
    for (what, i, l, needle) in [
        ("label out of range", imgs, &bad_label[..], "labels[2] = 6"),
        ("NaN pixel", &nan[..], &labels[..b], "image 1"),
        ("short images", &imgs[..px * 3], &labels[..b], "values"),
        ("empty batch", &imgs[..0], &labels[..0], "empty"),
    ] {
        let e = tr.step(i, l).unwrap_err().to_string();
        assert!(e.contains(needle), "{what}: {e}");
    }
    assert_eq!(tr.steps(), 0);
    assert!(tr.metrics().is_err(), "metrics before any step");
    // Settings.
    let zero_acc = TrainerConfig { gradient_acc: 0, ..config(10) };
    let net = || IResNet::new(net_config(), &dev, 3).unwrap();
    assert!(Trainer::new(net(), head(&dev, "gif", ids), zero_acc).is_err());
    let bad_lr = TrainerConfig { schedule: Schedule::Constant { base: -0.1 }, ..config(10) };
    assert!(Trainer::new(net(), head(&dev, "gif", ids), bad_lr).is_err());
    let bad_momentum = TrainerConfig { optimizer: OptimizerKind::Sgd { momentum: 1.5 }, ..config(10) };
    assert!(Trainer::new(net(), head(&dev, "gif", ids), bad_momentum).is_err());
    let wide = IResNet::new(IResNetConfig { embedding: 8, ..net_config() }, &dev, 3).unwrap();
    assert!(Trainer::new(wide, head(&dev, "gif", ids), config(10)).is_err(), "embedding size mismatch");
    assert!(Trainer::new(net(), head(&Device::sim(), "gif", ids), config(10)).is_err(), "devices differ");
}
