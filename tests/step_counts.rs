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

fn code_step(
    l: usize,
    proj: Option<usize>,
    device_labels: bool,
    (features, weights): (DType, DType),
) -> (DeviceStats, DeviceStats) {
    let dev = Device::sim();
    let (b, d, v, n) = (37, 16, 8, 300);
    let codes: Vec<u16> = (0..n).flat_map(|i| (0..l).map(move |j| ((i / 8usize.pow(j as u32)) % 8) as u16)).collect();
    let mut r = rng(2);
    let vecs = unit_rows(&mut r, n, d);
    let table = CodeTable::new(&dev, codes, l, v, Some((&vecs, d, DType::F32))).unwrap();
    let cfg = CodeHeadConfig { projection: proj, gamma: 0.5, weight_dtype: weights, ..CodeHeadConfig::new(d, l, v) };
    let head = CodeHead::new(cfg, &dev, 1).unwrap();
    let x = Tensor::from_f32(&dev, &[b, d], &uniform(&mut r, b * d, -1.0, 1.0), features).unwrap();
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
    const F: DType = DType::F32;
    const H: DType = DType::BF16;
    for l in 2..=5 {
        // Whatever l: the label kernel, the centres' normalization (every
        // position at once), the fused step (every position's margin
        // softmax and the regression term), the centre gradient's split
        // sums and their ordered sum through the normalization: 5 launches.
        // A projection adds its GEMM and the two backward GEMMs (8); mixed
        // f32 / bf16 features and weights add the widening of the bf16 one
        // (9). Allocations: the prepared labels, Ŵ and its norms, U, dC,
        // the partial sums (and Z, dZ, a widened operand).
        pin("host labels", code_step(l, None, false, (F, F)).0, 5, 9, 1, 0, 0);
        pin("device labels", code_step(l, None, true, (F, F)).0, 5, 8, 0, 0, 0);
        pin("bf16 features and weights", code_step(l, None, true, (H, H)).0, 5, 8, 0, 0, 0);
        pin("projection", code_step(l, Some(12), true, (F, F)).0, 8, 10, 0, 0, 0);
        pin("projection, bf16", code_step(l, Some(12), true, (H, H)).0, 8, 10, 0, 0, 0);
        pin("projection, bf16 features", code_step(l, Some(12), true, (H, F)).0, 9, 11, 0, 0, 0);
        pin("projection, bf16 weights", code_step(l, Some(12), true, (F, H)).0, 9, 11, 0, 0, 0);
    }
    // Reading the metrics: the label flag and the statistics rows.
    pin("read", code_step(3, None, true, (F, F)).1, 0, 0, 0, 2, 2);
}

#[test]
fn code_head_step_with_a_host_resident_table() {
    let dev = Device::sim();
    let (b, d, l, v, n) = (37, 16, 3, 8, 300);
    let codes: Vec<u16> = (0..n).flat_map(|i| (0..l).map(move |j| ((i / 8usize.pow(j as u32)) % 8) as u16)).collect();
    let mut r = rng(7);
    let vecs = unit_rows(&mut r, n, d);
    let table = CodeTable::with_host_vectors(&dev, codes, l, v, (&vecs, d, DType::BF16)).unwrap();
    let head = CodeHead::new(CodeHeadConfig::new(d, l, v), &dev, 1).unwrap();
    let x = Tensor::from_slice(&dev, &[b, d], &uniform(&mut r, b * d, -1.0, 1.0)).unwrap();
    let y: Vec<u32> = (0..b as u32).map(|i| i * 7 % n as u32).collect();
    let yt = Tensor::from_slice(&dev, &[b], &y).unwrap();
    let mut grads = HeadGrads::new(&head, b).unwrap();
    let mut m = HeadMetrics::new();
    head.forward_backward_into(&x, &y, &table, &mut grads, &mut m).unwrap();
    // The same 5 launches as a table in device memory: the kernel reads
    // the batch's rows from the mapped host memory in place (no upload, no
    // wait), with host or device labels.
    let host = counts(&dev, || head.forward_backward_into(&x, &y, &table, &mut grads, &mut m).unwrap());
    pin("host-resident table, host labels", host, 5, 9, 1, 0, 0);
    let device = counts(&dev, || head.forward_backward_into(&x, &yt, &table, &mut grads, &mut m).unwrap());
    pin("host-resident table, device labels", device, 5, 8, 0, 0, 0);
}

/// A full head's step on the simulator: B = 37, d = 16, N = 500.
struct SoftmaxSetup {
    dev: Device,
    b: usize,
    d: usize,
    n: usize,
    x: Tensor,
    y: Vec<u32>,
    yt: Tensor,
    head: SoftmaxHead,
    g: SoftmaxGrads,
    m: SoftmaxMetrics,
}

fn softmax_setup() -> SoftmaxSetup {
    let dev = Device::sim();
    let (b, d, n) = (37, 16, 500);
    let mut r = rng(3);
    let x = Tensor::from_slice(&dev, &[b, d], &uniform(&mut r, b * d, -1.0, 1.0)).unwrap();
    let y: Vec<u32> = (0..b as u32).map(|i| i * 11 % n as u32).collect();
    let yt = Tensor::from_slice(&dev, &[b], &y).unwrap();
    let head = SoftmaxHead::new(SoftmaxHeadConfig::new(d, n), &dev, DType::F32, 1).unwrap();
    let g = SoftmaxGrads::new(&dev, b, n, d).unwrap();
    let m = SoftmaxMetrics::new();
    SoftmaxSetup { dev, b, d, n, x, y, yt, head, g, m }
}

#[test]
fn softmax_and_partial_fc_steps() {
    let SoftmaxSetup { dev, b, x, y, yt, head, mut g, mut m, .. } = softmax_setup();
    head.forward_backward_into(&x, &y, &mut g, &mut m).unwrap();
    let host = counts(&dev, || head.forward_backward_into(&x, &y, &mut g, &mut m).unwrap());
    let device = counts(&dev, || head.forward_backward_into(&x, &yt, &mut g, &mut m).unwrap());
    // Forward partials, merge, target angles, backward, finish, the
    // normalizations (features, centre norms, gradient): 8 launches; device
    // labels add the label kernel and replace the targets' upload.
    pin("softmax, host labels", host, 8, 8, 1, 0, 0);
    pin("softmax, device labels", device, 9, 9, 0, 0, 0);
    let mut pfc = PartialFc::new(head, 0.3, 9).unwrap();
    let mut pg = gif_fr::head::PfcGrads::new(&pfc, b).unwrap();
    pfc.forward_backward_into(&x, &y, 0, &mut pg, &mut m).unwrap();
    let host = counts(&dev, || pfc.forward_backward_into(&x, &y, 1, &mut pg, &mut m).unwrap());
    let device = counts(&dev, || pfc.forward_backward_into(&x, &yt, 2, &mut pg, &mut m).unwrap());
    let update = counts(&dev, || pfc.sgd_step(&pg, 0.1).unwrap());
    // A sample of ⌈0.3·500⌉ = 150 ≥ B classes, all on the device: mark the
    // positives (counting them), two radix passes of hist and find, count,
    // scan, write the index, remap the labels to it (9 launches), then the
    // step over the sample (8). Uploads: the host labels only; no wait.
    // Device labels add their check kernel and upload nothing.
    pin("partial fc, host labels", host, 17, 14, 1, 0, 0);
    pin("partial fc, device labels", device, 18, 15, 0, 0, 0);
    // The SGD step reads the sample where it lies.
    pin("partial fc sgd", update, 1, 0, 0, 0, 0);
    // A batch larger than the sample (B = 37 > ⌈0.05·500⌉ = 25): the sample
    // grows to the distinct positives, counted on the host; the sample
    // comes down to remap the labels there (1 wait).
    let small = PartialFc::new(pfc.into_head(), 0.05, 9).unwrap();
    let mut sg = gif_fr::head::PfcGrads::new(&small, b).unwrap();
    small.forward_backward_into(&x, &y, 0, &mut sg, &mut m).unwrap();
    let p = counts(&dev, || small.forward_backward_into(&x, &y, 1, &mut sg, &mut m).unwrap());
    pin("partial fc, batch > sample", p, 16, 14, 2, 1, 1);
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
    let mut net = gif_fr::backbone::IResNet::new(cfg.clone(), &dev, 1).unwrap();
    let mut emb = Tensor::empty(&dev, &[b, cfg.embedding], DType::F32).unwrap();
    let mut grads = std::collections::BTreeMap::new();
    // The first step fills the buffer pool and the gradients' buffers;
    // count the second (overwriting) and the third (accumulating).
    net.forward_into(&images, true, &mut emb).unwrap();
    net.backward_into(&d_emb, &mut grads).unwrap();
    let c = counts(&dev, || {
        net.forward_into(&images, true, &mut emb).unwrap();
        net.backward_into(&d_emb, &mut grads).unwrap();
    });
    // The tiny network (stem, 5 blocks, head) at B = 2: nothing allocated,
    // no copy to or from the host, no wait. The device copies: the
    // images, kept for the stem's weight gradient, and the zeroing of the
    // 15 convolutions' weight gradients (their kernels add into them).
    pin("iresnet forward + backward", c, 282, 0, 0, 0, 0);
    assert_eq!(c.device_copies, 1 + 15, "{c:?}");
    // Accumulating (the first call adds the temporaries' shapes to the
    // pool; count the second): the Linear's GEMM adds in place; each of
    // the 50 per-channel gradients (21 BatchNorms' weight and bias, the
    // embedding BatchNorm's bias, 6 PReLUs, fc.bias) and the 15
    // convolutions' weight gradients is added from a pooled temporary, one
    // more launch each (the zeroings stay: the temporaries are zeroed).
    let mut accumulate = || {
        net.forward_into(&images, true, &mut emb).unwrap();
        net.backward_accumulate(&d_emb, &mut grads).unwrap();
    };
    accumulate();
    let c = counts(&dev, accumulate);
    pin("iresnet forward + backward_accumulate", c, 282 + 50 + 15, 0, 0, 0, 0);
    assert_eq!(c.device_copies, 1 + 15, "{c:?}");
}

#[test]
fn code_head_log_probs() {
    for (proj, dtype) in [(None, DType::F32), (None, DType::BF16), (Some(12), DType::F32)] {
        let dev = Device::sim();
        let (b, d, l, v) = (23, 16, 3, 8);
        let cfg = CodeHeadConfig { projection: proj, ..CodeHeadConfig::new(d, l, v) };
        let head = CodeHead::new(cfg, &dev, 1).unwrap();
        let x = Tensor::from_f32(&dev, &[b, d], &uniform(&mut rng(6), b * d, -1.0, 1.0), dtype).unwrap();
        let c = counts(&dev, || drop(head.log_probs(&x).unwrap()));
        // Whatever l: the centres' normalization, (the projections' GEMM,)
        // one kernel for every position; bf16 features are read as they
        // are. Nothing goes up or comes back.
        let launches = if proj.is_some() { 3 } else { 2 };
        assert_eq!((c.launches, c.uploads, c.downloads, c.syncs), (launches, 0, 0, 0), "{proj:?} {dtype:?}: {c:?}");
    }
}

#[test]
fn the_cost_model_counts_the_measured_launches_and_every_buffer() {
    use gif_fr::head::cost::{self, CodeStep, SoftmaxStep};
    const F: DType = DType::F32;
    const H: DType = DType::BF16;
    // The model's launches are the measured ones, and its bytes cover at
    // least every buffer the step allocated (each is written once).
    for l in 2..=4 {
        for (proj, (fd, wd), device_labels) in [
            (None, (F, F), false),
            (None, (F, F), true),
            (None, (H, H), true),
            (Some(12), (F, F), true),
            (Some(12), (H, H), true),
            (Some(12), (H, F), true),
            (Some(12), (F, H), true),
        ] {
            let got = code_step(l, proj, device_labels, (fd, wd)).0;
            let model = cost::code_head(&CodeStep {
                batch: 37,
                dim: 16,
                vocab: 8,
                length: l,
                projection: proj,
                bf16_features: fd == H,
                bf16_weights: wd == H,
                table_bf16: Some(false),
                singular: false,
                device_labels,
            });
            let what = format!("code head l {l} proj {proj:?} {fd:?}/{wd:?} device labels {device_labels}");
            assert_eq!(model.launches, got.launches, "{what}");
            assert!(model.bytes >= got.bytes_allocated as f64, "{what}: {} < {}", model.bytes, got.bytes_allocated);
        }
    }
    let SoftmaxSetup { dev, b, d, n, x, y, yt, head, mut g, mut m } = softmax_setup();
    let shape = |device_labels| SoftmaxStep {
        batch: b,
        classes: n,
        dim: d,
        bf16_features: false,
        bf16_weights: false,
        angular: true,
        tensor_cores: None,
        device_labels,
    };
    for device_labels in [false, true] {
        let got = counts(&dev, || match device_labels {
            true => head.forward_backward_into(&x, &yt, &mut g, &mut m).unwrap(),
            false => head.forward_backward_into(&x, &y, &mut g, &mut m).unwrap(),
        });
        let model = cost::full_softmax(&shape(device_labels));
        assert_eq!(model.launches, got.launches, "softmax, device labels {device_labels}");
        assert!(model.bytes >= got.bytes_allocated as f64, "softmax: {} < {}", model.bytes, got.bytes_allocated);
    }
    let pfc = PartialFc::new(head, 0.3, 9).unwrap();
    let mut pg = gif_fr::head::PfcGrads::new(&pfc, b).unwrap();
    for device_labels in [false, true] {
        let got = counts(&dev, || match device_labels {
            true => pfc.forward_backward_into(&x, &yt, 1, &mut pg, &mut m).unwrap(),
            false => pfc.forward_backward_into(&x, &y, 1, &mut pg, &mut m).unwrap(),
        });
        let model = cost::partial_fc(&shape(device_labels), pfc.sample_size());
        assert_eq!(model.launches, got.launches, "partial fc, device labels {device_labels}");
        assert!(model.bytes >= got.bytes_allocated as f64, "partial fc: {} < {}", model.bytes, got.bytes_allocated);
    }
    // The tensor-core path: 6 launches and 6 per chunk of classes (two
    // GEMMs and a reduction each way, the backward's two GEMMs), plus the
    // target angles; Partial FC adds the gather of its sample.
    for chunk in [None, Some(100), Some(128)] {
        let cfg = SoftmaxHeadConfig { tensor_cores: true, chunk, ..SoftmaxHeadConfig::new(d, n) };
        let tc = SoftmaxHead::new(cfg, &dev, DType::BF16, 1).unwrap();
        tc.forward_backward_into(&x, &y, &mut g, &mut m).unwrap();
        let got = counts(&dev, || tc.forward_backward_into(&x, &yt, &mut g, &mut m).unwrap());
        let step = SoftmaxStep { tensor_cores: Some(chunk), bf16_weights: true, ..shape(true) };
        let model = cost::full_softmax(&step);
        assert_eq!(model.launches, got.launches, "tensor cores, chunk {chunk:?}");
        assert!(model.bytes >= got.bytes_allocated as f64, "tensor cores: {} < {}", model.bytes, got.bytes_allocated);
        let pfc = PartialFc::new(tc, 0.3, 9).unwrap();
        let mut pg = gif_fr::head::PfcGrads::new(&pfc, b).unwrap();
        pfc.forward_backward_into(&x, &yt, 1, &mut pg, &mut m).unwrap();
        let got = counts(&dev, || pfc.forward_backward_into(&x, &yt, 2, &mut pg, &mut m).unwrap());
        let model = cost::partial_fc(&step, pfc.sample_size());
        assert_eq!(model.launches, got.launches, "partial fc, tensor cores, chunk {chunk:?}");
        assert!(
            model.bytes >= got.bytes_allocated as f64,
            "pfc tensor cores: {} < {}",
            model.bytes,
            got.bytes_allocated
        );
    }
    if let Some(path) = std::env::var_os("GIF_FR_HEAD_TABLE") {
        std::fs::write(path, head_table()).unwrap();
    }
}

/// docs/performance.md's head table is the model's (regenerated by
/// scripts/efficiency-table when the model changes), and the cards' bounds
/// are the slower of arithmetic and memory.
#[test]
fn the_head_table_in_the_docs_is_the_models() {
    use gif_fr::head::cost::{StepCost, H100_SXM, H200_SXM};
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/performance.md")).unwrap();
    let (begin, end) = ("<!-- head table: begin -->", "<!-- head table: end -->");
    let at = doc.find(begin).expect("begin marker") + begin.len();
    let inner = &doc[at..doc[at..].find(end).expect("end marker") + at];
    // The generated text follows the "Generated <date> by …" line.
    let stamp = inner.find("Generated ").expect("the stamp");
    let table = inner[stamp..].split_once("\n\n").expect("text after the stamp").1;
    assert_eq!(table.trim_end(), head_table().trim_end(), "docs/performance.md is stale: run scripts/efficiency-table");
    // 1 GFLOP over 1 GB: memory-bound on both cards in SIMT (298.5 µs and
    // 208.3 µs), and the same on tensor cores.
    let c = StepCost { launches: 1, flops: 1e9, bytes: 1e9 };
    for tensor in [false, true] {
        assert!((H100_SXM.bound(&c, tensor) - 1e9 / 3.35e12).abs() < 1e-12);
        assert!((H200_SXM.bound(&c, tensor) - 1e9 / 4.8e12).abs() < 1e-12);
    }
    // 1 TFLOP over 1 GB: arithmetic-bound, the same on both (one chip).
    let c = StepCost { launches: 1, flops: 1e12, bytes: 1e9 };
    assert_eq!(H100_SXM.bound(&c, false), 1e12 / 67e12);
    assert_eq!(H200_SXM.bound(&c, false), H100_SXM.bound(&c, false));
    assert_eq!(H200_SXM.bound(&c, true), 1e12 / 989e12);
    let (fp32, bf16) = H200_SXM.ridges();
    assert!((fp32 - 13.958).abs() < 1e-3 && (bf16 - 206.04).abs() < 1e-2, "{fp32} {bf16}");
}

/// The per-head table of docs/performance.md at the reference shape.
fn head_table() -> String {
    use gif_fr::head::cost::{self, CodeStep, SoftmaxStep, StepCost};
    use std::fmt::Write as _;
    let (b, d, v, n) = (512, 512, 16, 1usize << 21);
    let l = gif_fr::tokenizer::min_length(v, n).unwrap();
    let cards = [cost::H100_SXM, cost::H200_SXM];
    let mut t = String::new();
    let ridges = |c: &cost::Card| {
        let (f, b) = c.ridges();
        format!(
            "{} SXM {f:.0} FLOP/B (fp32 SIMT, {:.0} TFLOP/s over {:.2} TB/s) and {b:.0} FLOP/B (bf16 tensor cores, \
             {:.0} TFLOP/s)",
            c.name,
            c.fp32 / 1e12,
            c.bandwidth / 1e12,
            c.bf16_tensor / 1e12
        )
    };
    let _ = writeln!(
        t,
        "B = {b}, d = {d}, N = 2^21 (l = {l} at v = {v}), device labels, γ = 1 (the code vectors' rows read in the \
         step's precision), ArcFace straight-through; Partial FC samples ⌈r·N⌉. Ridge points (data sheets): {}. \
         The bound is max(FLOPs / peak, bytes / bandwidth) at the peak of the units the products run on.\n",
        cards.iter().map(ridges).collect::<Vec<_>>().join("; ")
    );
    let bounds: String = cards.iter().map(|c| format!(" {} bound |", c.name)).collect();
    let _ = writeln!(t, "| head | precision | launches | GFLOP | MB moved | FLOP/B | bound by |{bounds}");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|{}", "---|".repeat(cards.len()));
    // The peak of the units a step's products run on: the code head's and
    // the tensor-core path's bf16 GEMMs on tensor cores, the fused
    // softmax kernels on the SIMT units in either precision.
    let mut row = |name: &str, bf16: bool, tensor: bool, c: StepCost| {
        let side = |card: &cost::Card| if card.memory_bound(&c, tensor) { "memory" } else { "arithmetic" };
        let by = if cards.iter().all(|card| side(card) == side(&cards[0])) {
            side(&cards[0]).to_string()
        } else {
            cards.iter().map(|card| format!("{} ({})", side(card), card.name)).collect::<Vec<_>>().join(", ")
        };
        let bounds: String = cards.iter().map(|card| format!(" {:.1} µs |", card.bound(&c, tensor) * 1e6)).collect();
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {:.2} | {:.1} | {:.1} | {} |{bounds}",
            match (bf16, tensor) {
                (false, _) => "f32, SIMT",
                (true, true) => "bf16, tensor cores",
                (true, false) => "bf16 operands, SIMT",
            },
            c.launches,
            c.flops / 1e9,
            c.bytes / 1e6,
            c.intensity(),
            by
        );
    };
    for bf16 in [false, true] {
        for proj in [None, Some(d)] {
            let c = cost::code_head(&CodeStep {
                batch: b,
                dim: d,
                vocab: v,
                length: l,
                projection: proj,
                bf16_features: bf16,
                bf16_weights: bf16,
                table_bf16: Some(bf16),
                singular: false,
                device_labels: true,
            });
            // Without projections the code head has no GEMM: SIMT kernels.
            row(if proj.is_some() { "code head + projections" } else { "code head" }, bf16, bf16 && proj.is_some(), c);
        }
        let s = SoftmaxStep {
            batch: b,
            classes: n,
            dim: d,
            bf16_features: bf16,
            bf16_weights: bf16,
            angular: true,
            tensor_cores: None,
            device_labels: true,
        };
        row("full margin softmax, fused", bf16, false, cost::full_softmax(&s));
        for r in [0.1f64, 0.3] {
            let k = (r * n as f64).ceil() as usize;
            row(&format!("Partial FC r = {r}, fused"), bf16, false, cost::partial_fc(&s, k));
        }
        if bf16 {
            let t = SoftmaxStep { tensor_cores: Some(None), ..s };
            row("full margin softmax, chunked", true, true, cost::full_softmax(&t));
            for r in [0.1f64, 0.3] {
                let k = (r * n as f64).ceil() as usize;
                row(&format!("Partial FC r = {r}, chunked"), true, true, cost::partial_fc(&t, k));
            }
        }
    }
    t
}
