//! `gif-fr experiment` at its smallest size (the smoke preset: seconds):
//! what must hold at any scale — every head trains (its loss falls),
//! every verification number is computed on identities training never
//! saw, GIF's decoder returns valid identities, the head's memory is what
//! its buffers hold, the report files are written. Accuracy belongs in
//! the report (docs/experiments.md), not here.

use std::collections::HashSet;
use std::sync::Arc;

use gif_fr::data::Dataset;
use gif_fr::experiment::{self, split, HeadSpec, Preset};

const N: usize = 24;

#[test]
fn every_head_trains_on_its_split_and_the_report_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = experiment::write_synthetic(Preset::Smoke, N, &dir.path().join("data")).unwrap();
    let out = dir.path().join("out");
    let cfg = Preset::Smoke.config(&out, &[]).unwrap();
    let mut lines = Vec::new();
    let report = experiment::run(&cfg, std::slice::from_ref(&data), &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(report.datasets.len(), 1);
    let d = &report.datasets[0];
    assert_eq!(d.identities, N, "the held-out identities are not among the N trained");
    let names: Vec<&str> = d.heads.iter().map(|h| h.head.as_str()).collect();
    assert_eq!(names, ["arcface", "partial_fc_0.1", "partial_fc_0.3", "gif_random", "gif_means"]);
    let e = cfg.train.embedding_size;
    for h in &d.heads {
        let what = &h.head;
        assert!(h.steps > 1, "{what}: {} steps", h.steps);
        assert!(h.loss_last < h.loss_first, "{what}: the loss went {} -> {}", h.loss_first, h.loss_last);
        let v = &h.verification;
        assert_eq!(v.pairs, v.images * (v.images - 1) / 2, "{what}: every pair of the held-out images");
        assert_eq!(v.positives + v.negatives, v.pairs);
        assert!(v.positives > 0 && v.negatives > 0);
        for (name, x) in [
            ("accuracy", v.accuracy),
            ("balanced accuracy", v.accuracy_balanced),
            ("TAR@1e-4", v.tar_at_far_1e4),
            ("TAR@1e-3", v.tar_at_far_1e3),
            ("AUC", v.auc),
            ("top-1", h.top1),
        ] {
            assert!((0.0..=1.0).contains(&x), "{what}: {name} = {x}");
        }
        assert!(v.tar_at_far_1e4 <= v.tar_at_far_1e3);
        assert_eq!(h.invalid_ids, 0, "{what}: identification returned ids outside the N identities");
        let t = &h.timing;
        assert!(t.head_ms > 0.0 && t.step_ms >= t.head_forward_backward_ms, "{what}: {t:?}");
        // The head's memory is what its buffers hold (f32, SGD: one
        // momentum buffer per parameter).
        let m = &h.memory;
        match h.code {
            None => {
                assert_eq!(m.weights, N * e * 4, "{what}");
                assert_eq!(m.optimizer, m.weights, "{what}: SGD's momentum");
                assert_eq!(m.table, 0);
                if what == "arcface" {
                    assert_eq!(m.gradients, N * e * 4);
                } else {
                    // The dense gradient and the sampled rows'.
                    assert!(m.gradients > N * e * 4 && m.gradients <= 2 * N * e * 4, "{what}: {m:?}");
                }
            }
            Some((l, v)) => {
                assert!(v.pow(l as u32) >= N && v.pow(l as u32 - 1) < N, "{what}: l = {l}");
                assert_eq!(m.weights, l * v * e * 4, "{what}");
                assert_eq!(m.gradients, m.weights);
                assert_eq!(m.optimizer, m.weights);
                assert_eq!(m.table, N * l * 2 + N * e * 4, "{what}: codes (u16) and f32 code vectors");
            }
        }
        assert!(out.join(format!("N{N}/{what}/metrics.csv")).exists(), "{what}: its run's metrics");
        assert!(out.join(format!("N{N}/{what}/model.safetensors")).exists(), "{what}: its model");
    }
    // gif_means's codes come from the warm-up model's mean features.
    assert!(d.heads[4].codes_seconds > 0.0);
    assert!(out.join(format!("N{N}/warmup/codebook.safetensors")).exists());
    for f in ["report.md", "experiment.json", &format!("roc-N{N}.svg")] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(text.len() > 100, "{f}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for name in names {
        assert!(md.contains(&format!("| {name} |")), "report.md lists {name}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("experiment.json")).unwrap()).unwrap();
    assert_eq!(json["datasets"][0]["heads"].as_array().unwrap().len(), 5);
    assert!(lines.iter().any(|l| l.contains("held out")), "{lines:?}");
    // --replot redraws the same report from experiment.json.
    let again = experiment::replot(&out).unwrap();
    assert_eq!(experiment::markdown(&again), md);
    // Two sizes: the plots against N, one line per head.
    let mut two = again.clone();
    let mut bigger = two.datasets[0].clone();
    bigger.identities *= 2;
    two.datasets.push(bigger);
    let plots = dir.path().join("plots");
    std::fs::create_dir_all(&plots).unwrap();
    experiment::write_report(&plots, &two).unwrap();
    for f in ["tar-vs-n.svg", "head-time-vs-n.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 5, "{f}");
        assert!(svg.contains("gif_means") && svg.ends_with("</svg>\n"), "{f}");
    }
    // The same data again: the set is not rewritten.
    let stamp = std::fs::metadata(data.join("train.rec")).unwrap().modified().unwrap();
    experiment::write_synthetic(Preset::Smoke, N, &data).unwrap();
    assert_eq!(std::fs::metadata(data.join("train.rec")).unwrap().modified().unwrap(), stamp);
}

#[test]
fn the_split_holds_identities_out_whole_and_keeps_probes_out_of_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = experiment::write_synthetic(Preset::Smoke, N, dir.path()).unwrap();
    let base = Arc::new(Dataset::open(&data, 32).unwrap());
    let label = |i: usize| base.label(i).unwrap();
    let sp = split(base.clone(), 6, 4096, 0.1, 5).unwrap();
    assert_eq!(sp.held_out_ids.len(), 6);
    assert_eq!(sp.train_ids.len(), N);
    let held: HashSet<u32> = sp.held_out_ids.iter().copied().collect();
    let trained: HashSet<u32> = sp.train_ids.iter().copied().collect();
    assert!(held.is_disjoint(&trained));
    assert!(sp.held_out_images.iter().all(|&i| held.contains(&label(i))));
    assert!(sp.train_images.iter().all(|&i| !held.contains(&label(i))), "a held-out identity trains");
    let train_set: HashSet<usize> = sp.train_images.iter().copied().collect();
    assert!(sp.probe_images.iter().all(|&i| !train_set.contains(&i)), "a probe image trains");
    // Every image is in exactly one part.
    assert_eq!(sp.train_images.len() + sp.probe_images.len() + sp.held_out_images.len(), base.len());
    // Labels: training label y is dataset label train_ids[y]; each probe's
    // identity trains on at least one other image.
    for (k, &i) in sp.train_images.iter().enumerate() {
        assert_eq!(sp.train_ids[sp.train.label(k).unwrap() as usize], label(i));
    }
    for (k, &i) in sp.probe_images.iter().enumerate() {
        let y = sp.probes.label(k).unwrap() as usize;
        assert_eq!(sp.train_ids[y], label(i));
        assert!(sp.train_counts[y] >= 1);
    }
    // The rarest tenth: ⌈0.1 N⌉ identities, none with more training images
    // than any identity outside it.
    let rare: Vec<usize> = (0..N).filter(|&y| sp.rare[y]).collect();
    assert_eq!(rare.len(), N.div_ceil(10));
    let most_rare = rare.iter().map(|&y| sp.train_counts[y]).max().unwrap();
    assert!((0..N).filter(|&y| !sp.rare[y]).all(|y| sp.train_counts[y] >= most_rare));
    // Seeded: the same seed, the same split; another, another.
    let again = split(base.clone(), 6, 4096, 0.1, 5).unwrap();
    assert_eq!(again.held_out_ids, sp.held_out_ids);
    let other = split(base.clone(), 6, 4096, 0.1, 6).unwrap();
    assert_ne!(other.held_out_ids, sp.held_out_ids);
    // A cap on the held-out images keeps fewer identities (at least 2).
    let capped = split(base.clone(), 6, 8, 0.1, 5).unwrap();
    assert!(capped.held_out_ids.len() >= 2 && capped.held_out_ids.len() < 6);
    assert!(capped.held_out_images.len() <= 8 || capped.held_out_ids.len() == 2);
    // Holding out too many is a typed error.
    let err = split(base, N + 5, 4096, 0.1, 5).err().expect("too many held out");
    assert!(err.to_string().contains("too few"), "{err}");
}

#[test]
fn head_names_round_trip_and_bad_settings_are_errors() {
    for h in HeadSpec::all() {
        assert_eq!(HeadSpec::parse(&h.name()).unwrap(), h);
    }
    assert_eq!(HeadSpec::parse("partial_fc:0.2").unwrap(), HeadSpec::PartialFc(0.2));
    for bad in ["softmax", "partial_fc_0", "partial_fc_1.5", "partial_fc_x", ""] {
        assert!(HeadSpec::parse(bad).is_err(), "{bad:?}");
    }
    assert!(Preset::parse("medium").is_err());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Preset::Smoke.config(dir.path(), &[]).unwrap();
    cfg.heads.clear();
    assert!(cfg.validate().is_err());
    let mut cfg = Preset::Smoke.config(dir.path(), &[]).unwrap();
    cfg.warmup_fraction = 0.0;
    assert!(cfg.validate().is_err());
    let mut cfg = Preset::Smoke.config(dir.path(), &[]).unwrap();
    cfg.held_out = 1;
    assert!(cfg.validate().is_err());
    assert!(experiment::run(&Preset::Smoke.config(dir.path(), &[]).unwrap(), &[], &mut |_| {}).is_err());
    // A training key out of range is the training config's error.
    assert!(Preset::Smoke.config(dir.path(), &["lr=-1".into()]).is_err());
}
