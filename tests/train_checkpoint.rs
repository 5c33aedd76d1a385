//! Training checkpoints (src/train/checkpoint.rs): N steps straight equal,
//! bit for bit, k steps + save + a fresh trainer resumed + N − k steps, for
//! every head and both optimizers, on the CPU and the simulator; the
//! backbone part loads as an insightface state dict; a checkpoint of
//! another configuration, a truncated or foreign file, a save inside an
//! accumulation are typed errors; writes leave no partial file.
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, Margin, PartialFc, SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::train::checkpoint::{CHECKPOINT_FILE, MODEL_FILE};
use gif_fr::train::{OptimizerKind, Schedule, TrainHead, Trainer, TrainerConfig};
use gif_fr::{DType, Device, Error};

fn net_config() -> IResNetConfig {
    // Dropout on: its draw position is part of the state.
    IResNetConfig { embedding: 8, dropout: 0.2, ..tiny_iresnet() }
}

const IDS: usize = 12;
const B: usize = 6;

fn head(dev: &Device, kind: &str, seed: u64) -> TrainHead {
    let d = net_config().embedding;
    let sm = SoftmaxHeadConfig { margin: Margin::CosFace(0.1), scale: 16.0, ..SoftmaxHeadConfig::new(d, IDS) };
    match kind {
        "gif" => {
            let cfg = CodeHeadConfig { projection: Some(6), scale: 16.0, ..CodeHeadConfig::new(d, 2, 4) };
            let codes: Vec<u16> = (0..IDS as u16).flat_map(|i| [i % 4, i / 4]).collect();
            let vectors = unit_rows(&mut rng(23), IDS, d);
            let table = CodeTable::new(dev, codes, 2, 4, Some((&vectors, d, DType::F32))).unwrap();
            TrainHead::Code { head: CodeHead::new(cfg, dev, seed).unwrap(), table }
        }
        "arcface" => TrainHead::Softmax(SoftmaxHead::new(sm, dev, DType::F32, seed).unwrap()),
        // bf16 centres: the optimizer keeps an f32 master copy, saved too.
        "arcface-bf16" => TrainHead::Softmax(SoftmaxHead::new(sm, dev, DType::BF16, seed).unwrap()),
        // A sample of 9 of 12 holds a batch's positives (the device path).
        _ => {
            TrainHead::PartialFc(PartialFc::new(SoftmaxHead::new(sm, dev, DType::F32, seed).unwrap(), 0.75, 7).unwrap())
        }
    }
}

fn config(kind: OptimizerKind) -> TrainerConfig {
    TrainerConfig { optimizer: kind, ..TrainerConfig::insightface(Schedule::insightface(0.05, 2, 12)) }
}

fn trainer(dev: &Device, kind: &str, cfg: TrainerConfig) -> Trainer {
    let mut net = IResNet::new(net_config(), dev, 3).unwrap();
    net.set_dropout_seed(11);
    Trainer::new(net, head(dev, kind, 5), cfg).unwrap()
}

fn batch(t: usize) -> (Vec<f32>, Vec<u32>) {
    let s = net_config().input;
    let mut r = rng(500 + t as u64);
    let labels: Vec<u32> = (0..B).map(|i| ((t * 5 + i * 7) % IDS) as u32).collect();
    (uniform(&mut r, B * s * s * 3, -1.0, 1.0), labels)
}

/// Every tensor of the state, as bits: the backbone's (running statistics
/// included) and the head's.
fn state_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let bits = |x: &gif_fr::Tensor| x.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut v: Vec<(String, Vec<u32>)> = t.backbone().state().iter().map(|(n, x)| (n.clone(), bits(x))).collect();
    v.extend(t.head().params().iter().map(|(n, x)| (n.to_string(), bits(x))));
    v
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gif-fr-train-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resume_continues_bit_identically() {
    // Every head under both optimizers on the CPU; on the simulator (slow:
    // its convolutions run on CPU fibers) each head under one of them.
    let mut cases = Vec::new();
    for kind in ["gif", "arcface", "partial_fc", "arcface-bf16"] {
        for opt in [OptimizerKind::SGD, OptimizerKind::ADAMW] {
            cases.push((Device::cpu(), kind, opt));
        }
    }
    for (kind, opt) in
        [("gif", OptimizerKind::ADAMW), ("arcface", OptimizerKind::SGD), ("partial_fc", OptimizerKind::SGD)]
    {
        cases.push((Device::sim(), kind, opt));
    }
    for (dev, kind, opt) in cases {
        // 4 steps, saved after 2; the simulator 3, saved after 1.
        let (n, k) = if dev.kind() == gif_fr::DeviceKind::Cpu { (4usize, 2usize) } else { (3, 1) };
        let what = format!("{dev} {kind} {opt:?}");
        let mut straight = trainer(&dev, kind, config(opt));
        let mut losses = Vec::new();
        for t in 0..n {
            let (x, y) = batch(t);
            straight.step(&x, &y).unwrap();
            losses.push(straight.metrics().unwrap().loss);
        }
        let dir = temp_dir(&format!("{kind}-{}", dev.kind() as u8));
        let mut first = trainer(&dev, kind, config(opt));
        for t in 0..k {
            let (x, y) = batch(t);
            first.step(&x, &y).unwrap();
        }
        first.save(&dir).unwrap();
        let first_state = state_bits(&first);
        if kind == "arcface-bf16" {
            // The head's f32 master copy is part of the state.
            let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert!(st.names().contains(&"optim.1.0.master"), "{what}: {:?}", st.names());
        }
        assert!(!dir.join(format!("{CHECKPOINT_FILE}.tmp")).exists(), "{what}: a temporary file is left");
        drop(first);
        // A fresh trainer, built as the first was, then resumed.
        let mut resumed = trainer(&dev, kind, config(opt));
        resumed.resume(&dir).unwrap();
        assert_eq!(resumed.steps(), k as u64, "{what}");
        for (t, want) in losses.iter().enumerate().skip(k) {
            let (x, y) = batch(t);
            resumed.step(&x, &y).unwrap();
            let got = resumed.metrics().unwrap();
            assert_eq!(got.loss.to_bits(), want.to_bits(), "{what}: step {t}'s loss");
        }
        assert!(state_bits(&resumed) == state_bits(&straight), "{what}: the resumed state differs");
        let (a, b) = (resumed.metrics().unwrap(), straight.metrics().unwrap());
        assert_eq!((a.step, a.optimizer_steps, a.lr.to_bits()), (b.step, b.optimizer_steps, b.lr.to_bits()), "{what}");
        // Not vacuous: the run moved the state.
        assert!(state_bits(&straight) != state_bits(&trainer(&dev, kind, config(opt))), "{what}");
        // The backbone part is an insightface state dict of the
        // saved trainer's weights.
        let net = IResNet::load(&dir.join(MODEL_FILE), net_config(), &Device::cpu()).unwrap();
        for (name, t) in net.state() {
            let saved: Vec<u32> = t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect();
            assert!(first_state.iter().any(|(n, b)| n == &name && *b == saved), "{what}: {name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_checkpoint_of_another_configuration_or_a_damaged_file_is_refused() {
    let dev = Device::cpu();
    let dir = temp_dir("refused");
    let mut tr = trainer(&dev, "gif", config(OptimizerKind::SGD));
    let (x, y) = batch(0);
    tr.step(&x, &y).unwrap();
    tr.save(&dir).unwrap();
    let expect_file_error = |t: &mut Trainer, needle: &str, what: &str| match t.resume(&dir) {
        Err(e @ Error::File { .. }) => assert!(e.to_string().contains(needle), "{what}: {e}"),
        other => panic!("{what}: {other:?}"),
    };
    // Another head, optimizer, schedule, backbone, codebook.
    expect_file_error(&mut trainer(&dev, "arcface", config(OptimizerKind::SGD)), "another head", "head");
    expect_file_error(&mut trainer(&dev, "gif", config(OptimizerKind::ADAMW)), "trainer_config", "optimizer");
    let wide = TrainerConfig { gradient_acc: 2, ..config(OptimizerKind::SGD) };
    expect_file_error(&mut trainer(&dev, "gif", wide), "trainer_config", "accumulation");
    let net = IResNet::new(IResNetConfig { dropout: 0.0, ..net_config() }, &dev, 3).unwrap();
    let mut other_net = Trainer::new(net, head(&dev, "gif", 5), config(OptimizerKind::SGD)).unwrap();
    expect_file_error(&mut other_net, "backbone_config", "backbone");
    let d = net_config().embedding;
    let cfg = CodeHeadConfig { projection: Some(6), scale: 16.0, ..CodeHeadConfig::new(d, 2, 4) };
    let codes: Vec<u16> = (0..IDS as u16).flat_map(|i| [i / 3 % 4, i % 3]).collect();
    let table = CodeTable::new(&dev, codes, 2, 4, None).unwrap();
    let gamma0 = TrainHead::Code { head: CodeHead::new(CodeHeadConfig { gamma: 0.0, ..cfg }, &dev, 5).unwrap(), table };
    let mut other_codes =
        Trainer::new(IResNet::new(net_config(), &dev, 3).unwrap(), gamma0, config(OptimizerKind::SGD)).unwrap();
    expect_file_error(&mut other_codes, "another head_config", "head config");

    // Truncated, then not a checkpoint at all.
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    expect_file_error(&mut trainer(&dev, "gif", config(OptimizerKind::SGD)), "not a valid safetensors", "truncated");
    std::fs::copy(dir.join(MODEL_FILE), &path).unwrap();
    expect_file_error(
        &mut trainer(&dev, "gif", config(OptimizerKind::SGD)),
        "not a gif-fr training checkpoint",
        "model file",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    expect_file_error(&mut trainer(&dev, "gif", config(OptimizerKind::SGD)), "cannot open", "missing");

    // Inside an accumulation: no checkpoint, and nothing written.
    let mut acc = trainer(&dev, "gif", TrainerConfig { gradient_acc: 2, ..config(OptimizerKind::SGD) });
    acc.step(&x, &y).unwrap();
    assert!(acc.save(&dir).unwrap_err().to_string().contains("accumulation"));
    assert!(!dir.exists());
    // A directory that cannot be made (a file in the way): an error naming it.
    let blocker = temp_dir("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    assert!(matches!(tr.save(&blocker), Err(Error::File { .. })));
    std::fs::remove_file(&blocker).unwrap();
}
