//! The synthetic identity generator (src/data/synth.rs, `gif-fr synth`):
//! deterministic per seed; its identities separable but not trivially (a
//! nearest-class-mean classifier on raw pixels is far above chance and far
//! from perfect); the training set reads back as insightface's RecordIO
//! (header record, identity records, property) and the verification set
//! as an insightface `.bin` of other identities; bad knobs are errors.

use gif_fr::data::synth::{image, verification_pairs, write_training_set, SynthConfig};
use gif_fr::data::Dataset;
use gif_fr::io::recordio::{unpack, IndexedRecords};
use gif_fr::io::verification::{read_bin, write_bin};
use gif_fr::Error;

fn small(identities: usize) -> SynthConfig {
    SynthConfig { size: 32, min_images: 2, max_images: 12, seed: 5, ..SynthConfig::new(identities) }
}

/// Pixels standardized per image (mean 0, norm 1).
fn standardized(px: &[u8]) -> Vec<f32> {
    let n = px.len() as f32;
    let mean = px.iter().map(|&v| v as f32).sum::<f32>() / n;
    let v: Vec<f32> = px.iter().map(|&x| x as f32 - mean).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.into_iter().map(|x| x / norm).collect()
}

/// Accuracy of a nearest-class-mean classifier: class means from images
/// 0..train of each identity, tested on images train..train + test.
fn ncm_accuracy(cfg: &SynthConfig, ids: usize, train: u64, test: u64) -> f64 {
    let means: Vec<Vec<f32>> = (0..ids as u64)
        .map(|i| {
            let mut m = vec![0f32; cfg.size * cfg.size * 3];
            for j in 0..train {
                m.iter_mut().zip(standardized(&image(cfg, i, j))).for_each(|(a, b)| *a += b);
            }
            m
        })
        .collect();
    let mut right = 0;
    for i in 0..ids as u64 {
        for j in train..train + test {
            let x = standardized(&image(cfg, i, j));
            let dist = |m: &Vec<f32>| m.iter().zip(&x).map(|(a, b)| (a / train as f32 - b).powi(2)).sum::<f32>();
            let best = (0..ids).min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b]))).unwrap();
            right += usize::from(best == i as usize);
        }
    }
    right as f64 / (ids as u64 * test) as f64
}

#[test]
fn identities_are_separable_but_not_trivially() {
    let ids = 20;
    let cfg = small(ids);
    let acc = ncm_accuracy(&cfg, ids, 6, 4);
    let chance = 1.0 / ids as f64;
    println!(
        "nearest class mean on raw pixels, {ids} identities, 6 train / 4 test images each: {acc:.3} (chance {chance})"
    );
    assert!(acc > 3.0 * chance, "identities barely separable: {acc}");
    assert!(acc < 0.9, "identities trivially separable on raw pixels: {acc}");
    // Without nuisances the task is easy: the knobs are what makes it hard.
    let easy = SynthConfig { pose: 0.0, lighting: 0.0, blur: 0.0, noise: 0.0, occlusion: 0.0, ..cfg.clone() };
    let easy_acc = ncm_accuracy(&easy, ids, 6, 4);
    println!("the same without pose, lighting, blur, noise, occlusion: {easy_acc:.3}");
    assert!(easy_acc > acc, "{easy_acc} vs {acc}");
}

#[test]
fn a_seed_gives_the_same_set_and_another_seed_another() {
    let cfg = small(6);
    assert_eq!(image(&cfg, 3, 4), image(&cfg, 3, 4));
    assert_ne!(image(&cfg, 3, 4), image(&cfg, 3, 5), "two images of one identity");
    assert_ne!(image(&cfg, 3, 4), image(&SynthConfig { seed: 6, ..cfg.clone() }, 3, 4));
    let dirs = [tempdir("a"), tempdir("b")];
    for d in &dirs {
        write_training_set(&cfg, d, |_, _| {}).unwrap();
    }
    for f in ["train.rec", "train.idx", "property"] {
        assert_eq!(std::fs::read(dirs[0].join(f)).unwrap(), std::fs::read(dirs[1].join(f)).unwrap(), "{f}");
    }
    // The counts follow the seed too, and stay within the bounds.
    let counts = cfg.image_counts();
    assert_eq!(counts, cfg.image_counts());
    assert!(counts.iter().all(|&c| (2..=12).contains(&c)), "{counts:?}");
}

#[test]
fn counts_are_long_tailed() {
    let cfg = SynthConfig { min_images: 2, max_images: 200, tail: 1.2, ..SynthConfig::new(4000) };
    let mut c = cfg.image_counts();
    c.sort_unstable();
    let (median, p99, max) = (c[c.len() / 2], c[c.len() * 99 / 100], c[c.len() - 1]);
    println!("images per identity: min {} median {median} p99 {p99} max {max}", c[0]);
    // Pareto(α = 1.2, x_min = 2): median 2·2^(1/1.2) ≈ 3.6, P(X ≥ 100) ≈ 0.9 %.
    assert!((3..=4).contains(&median), "median {median}");
    assert!(p99 >= 40 && max == 200, "p99 {p99}, max {max}");
}

#[test]
fn the_training_set_is_insightface_recordio() {
    let cfg = small(7);
    let dir = tempdir("rec");
    let mut calls = 0;
    let summary = write_training_set(&cfg, &dir, |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert!(calls >= 1);
    let counts = cfg.image_counts();
    assert_eq!(summary.images, counts.iter().sum::<usize>());
    assert_eq!(std::fs::read_to_string(dir.join("property")).unwrap(), "7,32,32");
    // Record 0: images 1..a, identity records a..b with each one's range.
    let rec = IndexedRecords::open(&dir.join("train.rec"), &dir.join("train.idx")).unwrap();
    let (h0, _) = unpack(&rec.get(0).unwrap()).map(|(h, b)| (h, b.to_vec())).unwrap();
    let a = summary.images as f32 + 1.0;
    assert_eq!((h0.flag, h0.labels.clone()), (2, vec![a, a + 7.0]));
    let mut start = 1.0;
    for (i, &c) in counts.iter().enumerate() {
        let r = rec.get(a as u64 + i as u64).unwrap();
        let (h, _) = unpack(&r).unwrap();
        assert_eq!(h.labels, vec![start, start + c as f32], "identity record {i}");
        start += c as f32;
    }
    // The dataset reader: every image decodes at 32 x 32, labels in
    // identity order, pixels those generated (up to JPEG).
    let ds = Dataset::records(&dir, 32).unwrap();
    assert_eq!((ds.len(), ds.classes()), (summary.images, 7));
    let mut out = vec![0f32; 32 * 32 * 3];
    let mut k = 0;
    for (i, &c) in counts.iter().enumerate() {
        for j in 0..c {
            assert_eq!(ds.read(k, false, &mut out).unwrap(), i as u32);
            let want = image(&cfg, i as u64, j as u64);
            let err = out.iter().zip(&want).map(|(x, &w)| ((x * 0.5 + 0.5) * 255.0 - w as f32).abs()).sum::<f32>()
                / out.len() as f32;
            assert!(err < 6.0, "image {k}: mean JPEG error {err}");
            k += 1;
        }
    }
}

#[test]
fn verification_pairs_are_of_other_identities_in_ten_balanced_folds() {
    let cfg = small(5);
    let set = verification_pairs(&cfg, 9, 40).unwrap();
    assert_eq!((set.pairs(), set.images.len()), (40, 80));
    for fold in set.issame.chunks(4) {
        assert_eq!(fold, [true, true, false, false]);
    }
    // No image is repeated, and none is a training identity's image.
    let mut seen = std::collections::HashSet::new();
    for b in &set.images {
        assert!(seen.insert(b.clone()), "an image appears twice");
        let px = image::load_from_memory(b).unwrap().to_rgb8();
        assert_eq!(px.dimensions(), (32, 32));
    }
    // The same pairs again for the same seed; written and read as a .bin.
    assert_eq!(verification_pairs(&cfg, 9, 40).unwrap(), set);
    let path = tempdir("bin").join("synth.bin");
    write_bin(&path, &set).unwrap();
    assert_eq!(read_bin(&path).unwrap(), set);
}

#[test]
fn bad_knobs_are_typed_errors_naming_the_knob() {
    let bad = [
        (SynthConfig { size: 8, ..small(3) }, "size"),
        (SynthConfig { min_images: 0, ..small(3) }, "min_images"),
        (SynthConfig { max_images: 1, ..small(3) }, "min_images"),
        (SynthConfig { tail: f64::NAN, ..small(3) }, "tail"),
        (SynthConfig { pose: -1.0, ..small(3) }, "pose"),
        (SynthConfig { noise: f64::INFINITY, ..small(3) }, "noise"),
        (SynthConfig { diversity: 0.0, ..small(3) }, "diversity"),
        (SynthConfig { quality: 0, ..small(3) }, "quality"),
        (small(0), "identities"),
        (SynthConfig { min_images: 60000, max_images: 60000, ..small(1000) }, "identities"),
    ];
    for (cfg, field) in bad {
        match cfg.validate() {
            Err(Error::InvalidArgument { message, .. }) => assert!(message.contains(field), "{field}: {message}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(verification_pairs(&small(3), 9, 30).is_err(), "pairs not a multiple of 20");
    assert!(verification_pairs(&small(3), 1, 20).is_err(), "one identity");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gif-fr-synth-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
