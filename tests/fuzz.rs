//! A fuzz harness over the file parsers, run by `cargo test` for a bounded
//! number of cases: valid files (codebooks, insightface checkpoints, .npy
//! arrays of several dtypes and header versions, labels, RecordIO,
//! insightface's pickled verification sets, the training config) are mutated — bit flips,
//! byte overwrites, truncations, appended garbage, numbers in the header
//! replaced by edge values (0, 2^31, 2^56, 2^64 − 1, 10^20, ...) — and
//! parsed. Every outcome must be a value or a typed error: no panic, no
//! abort, and no allocation beyond the stated bound (docs/reliability.md),
//! measured by a counting allocator.
//!
//! `GIF_FR_FUZZ_CASES` (default 160 per parser) and `GIF_FR_FUZZ_SEED`
//! (default fixed, so CI is reproducible) run a longer or different
//! campaign: `GIF_FR_FUZZ_CASES=20000 GIF_FR_FUZZ_SEED=7 cargo test
//! --release --test fuzz`. One test per binary, so that no other test's
//! allocations interfere with the measurement.

mod common;

use std::path::Path;

use gif_fr::backbone::{images, IResNet};
use gif_fr::io::npy;
use gif_fr::runtime::host_memory::{self, CountingAllocator};
use gif_fr::tokenizer::{tokenize, Codebook, Config, Input};
use gif_fr::{Device, Error};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The stated bound: a parser allocates at most 16 times the file's size
/// plus 1 MiB (for a checkpoint, plus the network it fills).
fn bound(file_len: usize, base: usize) -> usize {
    16 * file_len + (1 << 20) + base
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
    /// Replace the k-th run of digits in the first 512 bytes (the header).
    Number(usize, String),
}

fn edge_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("2147483647".to_string()),
        Just("2147483648".to_string()),
        Just("4294967296".to_string()),
        Just("72057594037927936".to_string()),
        Just("9223372036854775808".to_string()),
        Just("18446744073709551615".to_string()),
        Just("100000000000000000000".to_string()),
        any::<u32>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        Just("-1".to_string()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Mutation::Set(p, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        (0usize..32, edge_number()).prop_map(|(k, n)| Mutation::Number(k, n)),
        (0usize..32, edge_number()).prop_map(|(k, n)| Mutation::Number(k, n)),
    ]
}

fn apply(base: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in muts {
        if b.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(p, bit) => {
                let i = p % b.len();
                b[i] ^= 1 << bit;
            }
            Mutation::Set(p, v) => {
                let i = p % b.len();
                b[i] = *v;
            }
            Mutation::Truncate(p) => b.truncate(p % b.len()),
            Mutation::Append(tail) => b.extend_from_slice(tail),
            Mutation::Number(k, n) => {
                let head = b.len().min(512);
                let mut runs = Vec::new();
                let mut i = 0;
                while i < head {
                    if b[i].is_ascii_digit() {
                        let s = i;
                        while i < head && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        runs.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                if let Some(&(s, e)) = runs.get(k % runs.len().max(1)) {
                    b.splice(s..e, n.bytes());
                }
            }
        }
    }
    b
}

/// Runs `parse` on `cases` mutations of `base`, checking each outcome and
/// its peak allocation.
fn fuzz(
    name: &str,
    base: &[u8],
    base_alloc: usize,
    cases: u32,
    seed: u64,
    parse: &dyn Fn(&Path) -> Result<(), Error>,
) -> (u32, u32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    // The unmutated file parses.
    std::fs::write(&path, base).unwrap();
    parse(&path).unwrap_or_else(|e| panic!("{name}: the valid file does not parse: {e}"));
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..8 + name.len().min(24)].copy_from_slice(&name.as_bytes()[..name.len().min(24)]);
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner =
        TestRunner::new_with_rng(RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() }, rng);
    let ok = std::cell::Cell::new((0u32, 0u32));
    let result = runner.run(&prop::collection::vec(mutation(), 1..4), |muts| {
        let bytes = apply(base, &muts);
        std::fs::write(&path, &bytes).unwrap();
        let before = host_memory::reset_peak();
        let r = parse(&path);
        let extra = host_memory::stats().peak.saturating_sub(before);
        let limit = bound(bytes.len(), base_alloc);
        prop_assert!(extra <= limit, "{name}: {extra} bytes allocated for a {}-byte file (bound {limit})", bytes.len());
        let (mut good, mut bad) = ok.get();
        match r {
            Ok(()) => good += 1,
            Err(Error::File { .. } | Error::InvalidArgument { .. } | Error::Shape { .. }) => bad += 1,
            Err(e) => prop_assert!(false, "{name}: an error of an unexpected kind: {e:?}"),
        }
        ok.set((good, bad));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    ok.get()
}

#[test]
fn parsers_survive_mutated_files_with_bounded_memory() {
    let cases: u32 = std::env::var("GIF_FR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(160);
    let seed: u64 = std::env::var("GIF_FR_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(2026);
    let cpu = Device::cpu();
    let mut report = Vec::new();

    // Codebooks.
    let cfg = Config { vocab: 4, seed: 1, steps: Some(2), subset: 16, kmeans_iters: 2, ..Config::default() };
    let book = tokenize(Input::Random { count: 30, dim: 3 }, &cfg, &cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("book.safetensors");
    book.save(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // Loaded, then the vectors read (they are read lazily).
    let load = |p: &Path| Codebook::load(p).and_then(|b| b.vectors().map(drop));
    report.push(("codebook", fuzz("codebook", &bytes, 0, cases, seed, &load)));

    // insightface checkpoints (safetensors state dicts) of a tiny IResNet.
    let net_cfg = common::tiny_iresnet();
    let net = IResNet::new(net_cfg.clone(), &cpu, 3).unwrap();
    let p = dir.path().join("net.safetensors");
    net.save(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // The network the loader builds before reading (its parameters, twice).
    let base = 2 * bytes.len();
    report.push((
        "checkpoint",
        fuzz("checkpoint", &bytes, base, cases, seed, &|p| IResNet::load(p, net_cfg.clone(), &cpu).map(drop)),
    ));

    // .npy arrays: f32 and f64 matrices (v1 and v2 headers), uint8 images.
    let f32s: Vec<u8> = (0..15).flat_map(|i| (i as f32 * 0.25 - 1.0).to_le_bytes()).collect();
    let f64s: Vec<u8> = (0..8).flat_map(|i| (i as f64 * 0.5 - 2.0).to_le_bytes()).collect();
    let pixels: Vec<u8> = (0..2 * 4 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let matrix = |p: &Path| npy::read_npy_matrix(p).map(drop);
    report.push(("npy f32", fuzz("f32.npy", &common::npy_bytes("<f4", &[3, 5], &f32s), 0, cases, seed, &matrix)));
    report.push((
        "npy f64 v2",
        fuzz("f64.npy", &common::npy_bytes_version(2, "<f8", &[2, 4], &f64s), 0, cases, seed, &matrix),
    ));
    let read = |p: &Path| npy::read_npy(p).map(drop);
    report.push(("npy 3-d", fuzz("3d.npy", &common::npy_bytes("<f4", &[1, 3, 5], &f32s), 0, cases, seed, &read)));
    let imgs = |p: &Path| images::read_images(p, 4).map(drop);
    report.push((
        "npy images",
        fuzz("img.npy", &common::npy_bytes("|u1", &[2, 4, 4, 3], &pixels), 0, cases, seed, &imgs),
    ));

    // .npy labels (int64).
    let labels: Vec<u8> = [3i64, 0, 7, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let labs = |p: &Path| npy::read_npy_labels(p).map(drop);
    report.push(("npy labels", fuzz("labels.npy", &common::npy_bytes("<i8", &[4], &labels), 0, cases, seed, &labs)));

    // RecordIO: image records (one with a magic word inside: a record of
    // several parts), read in order and unpacked.
    use gif_fr::io::recordio::{pack, unpack, ImageHeader, RecordFile, RecordWriter, MAGIC};
    let rec = dir.path().join("base.rec");
    let mut w = RecordWriter::create(&rec, None).unwrap();
    w.write(0, &pack(&ImageHeader { flag: 2, labels: vec![4.0, 6.0], id: 0, id2: 0 }, b"")).unwrap();
    for i in 0..3u64 {
        let img: Vec<u8> = [&b"JPEG"[..], &MAGIC.to_le_bytes(), format!("image {i}").as_bytes()].concat();
        w.write(1 + i, &pack(&ImageHeader::new(i as f32, i), &img)).unwrap();
    }
    w.finish().unwrap();
    let bytes = std::fs::read(&rec).unwrap();
    let recordio = |p: &Path| -> Result<(), Error> {
        let f = RecordFile::open(p)?;
        for r in f.records() {
            let (at, r) = r?;
            unpack(&r).map_err(|m| Error::InvalidArgument { op: "unpack", message: format!("{at}: {m}") })?;
        }
        Ok(())
    };
    report.push(("recordio", fuzz("train.rec", &bytes, 0, cases, seed, &recordio)));

    // insightface verification sets: a pickled (bins, issame_list).
    use gif_fr::io::verification::{read_bin, write_bin, PairSet};
    let set = PairSet {
        images: (0..4).map(|i| format!("\u{ff}\u{d8}image {i}").into_bytes()).collect(),
        issame: vec![true, false],
    };
    let p = dir.path().join("base.bin");
    write_bin(&p, &set).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    report.push(("verification .bin", fuzz("set.bin", &bytes, 0, cases, seed, &|p| read_bin(p).map(drop))));

    // The training config (TOML with insightface's keys): parsed, checked,
    // and turned into the network's shape and the trainer's schedule.
    let toml = "network = \"r50\"\nembedding_size = 512\nbatch_size = 128\nnum_epoch = 20\nwarmup_epoch = 2\n\
                lr = 0.1\nmomentum = 0.9\nweight_decay = 0.0005\nsample_rate = 0.3\nhead = \"partial_fc\"\n\
                margin_list = [1.0, 0.5, 0.0]\ngradient_acc = 2\nnum_workers = 4\nfrequent = 10\n\
                verbose = 2000\ninput_size = 112\nstem_width = 64\nwidths = [64, 128, 256, 512]\n\
                layers = [3, 4, 14, 3]\nseed = 2048\nvocab = 64\nlength = 4\nscale = 64.0\n\
                save_every = 1000\noptimizer = \"sgd\"\nrec = \"/data/train.rec\"\nnum_classes = 93431\n\
                num_image = 5179510\nval_targets = [\"lfw\", \"cfp_fp\"]\n";
    let config = |p: &Path| -> Result<(), Error> {
        let c = gif_fr::train::TrainConfig::load(p, &[])?;
        c.network_config()?;
        c.trainer_config(c.num_image.unwrap_or(1 << 20))?;
        c.val_paths();
        Ok(())
    };
    report.push(("train config", fuzz("train.toml", toml.as_bytes(), 0, cases, seed, &config)));

    for (name, (good, bad)) in &report {
        println!("{name}: {good} parsed, {bad} refused with typed errors");
        // The mutations reach the validation: most cases are refused.
        assert!(*bad > cases / 4, "{name}: only {bad} of {cases} mutated files were refused");
    }
}
