//! Verification (src/eval): insightface's 10-fold accuracy and VAL@FAR and
//! the exact ROC against slow, independent implementations written here
//! (f64, brute force over every threshold), known answers worked by hand
//! (ties, a fold of one class, a FAR below 1 / negatives), `.bin` files in
//! both pickle protocols, and a set from the synthetic generator through a
//! network to every number.

mod common;

use gif_fr::eval::metrics::{folds, kfold_accuracy, kfold_val, Roc};
use gif_fr::eval::{evaluate, verify_pairs};
use gif_fr::io::verification::{parse_bin, read_bin, PairSet};
use gif_fr::Error;
use rand::{Rng, SeedableRng};

fn random_pairs(seed: u64, n: usize) -> (Vec<f64>, Vec<bool>) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let issame: Vec<bool> = (0..n).map(|_| r.random::<bool>()).collect();
    // Distances in [0, 4): positives lower on average; some exact ties.
    let dist = issame
        .iter()
        .map(|&s| {
            let d: f64 = if s { r.random_range(0.0..2.6) } else { r.random_range(1.0..4.0) };
            if r.random::<f64>() < 0.1 {
                (d * 10.0).round() / 10.0
            } else {
                d
            }
        })
        .collect();
    (dist, issame)
}

/// The 10-fold accuracy the slow way: every threshold, every pair.
fn slow_kfold_accuracy(dist: &[f64], issame: &[bool]) -> Vec<f64> {
    let thresholds: Vec<f64> = (0..400).map(|i| i as f64 * 0.01).collect();
    let n = dist.len();
    let acc_of =
        |t: f64, idx: &[usize]| idx.iter().filter(|&&i| (dist[i] < t) == issame[i]).count() as f64 / idx.len() as f64;
    let mut out = Vec::new();
    let fold_len = |f: usize| n / 10 + usize::from(f < n % 10);
    let mut start = 0;
    for f in 0..10 {
        let test: Vec<usize> = (start..start + fold_len(f)).collect();
        start += fold_len(f);
        let train: Vec<usize> = (0..n).filter(|i| !test.contains(i)).collect();
        let mut best = 0;
        for (k, &t) in thresholds.iter().enumerate() {
            if acc_of(t, &train) > acc_of(thresholds[best], &train) {
                best = k;
            }
        }
        out.push(acc_of(thresholds[best], &test));
    }
    out
}

#[test]
fn kfold_accuracy_equals_the_brute_force() {
    for (seed, n) in [(1, 600), (2, 137), (3, 1003)] {
        let (dist, issame) = random_pairs(seed, n);
        let (mean, std, per_fold) = kfold_accuracy(&dist, &issame, 10).unwrap();
        let want = slow_kfold_accuracy(&dist, &issame);
        assert_eq!(per_fold, want, "n = {n}");
        let m = want.iter().sum::<f64>() / 10.0;
        let s = (want.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 10.0).sqrt();
        assert!((mean - m).abs() < 1e-12 && (std - s).abs() < 1e-12);
        assert!(mean > 0.6 && mean < 1.0, "{mean}");
    }
    // KFold's sizes: 137 pairs are 7 folds of 14 and 3 of 13.
    let sizes: Vec<usize> = folds(137, 10).iter().map(|r| r.len()).collect();
    assert_eq!(sizes, [14, 14, 14, 14, 14, 14, 14, 13, 13, 13]);
}

#[test]
fn known_answers_for_the_kfold_metrics() {
    // Perfectly separated at 1.0: every fold is right at any threshold in
    // (0.5, 1.5], so accuracy 1 ± 0.
    let dist: Vec<f64> = (0..40).map(|i| if i % 2 == 0 { 0.5 } else { 1.5 }).collect();
    let issame: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
    assert_eq!(kfold_accuracy(&dist, &issame, 10).unwrap().0, 1.0);
    // Folds of one class (the first 20 pairs positive, the rest negative):
    // defined numbers, never NaN.
    let issame: Vec<bool> = (0..40).map(|i| i < 20).collect();
    let dist: Vec<f64> = (0..40).map(|i| if i < 20 { 0.2 } else { 3.0 }).collect();
    let (acc, std, _) = kfold_accuracy(&dist, &issame, 10).unwrap();
    assert_eq!((acc, std), (1.0, 0.0));
    // VAL there: folds 0-4 hold only positives (their FAR counts 0, not
    // NaN), folds 5-9 only negatives (their VAL counts 0). The training
    // FAR is 0 up to the threshold 3.000 and 1 from 3.001 on: the
    // threshold interpolates to 3.0 + 0.001 · 1e-3, which accepts every
    // positive (0.2) and every negative (3.0): VAL 1 on the positive
    // folds, FAR 1 on the negative ones; means 0.5 and 0.5, VAL std 0.5.
    let (val, val_std, far) = kfold_val(&dist, &issame, 1e-3, 10).unwrap();
    assert!((val - 0.5).abs() < 1e-12 && (far - 0.5).abs() < 1e-12, "{val} {far}");
    assert!((val_std - 0.5).abs() < 1e-12, "{val_std}");
    // NaN is refused with the pair's index; sizes must agree.
    let mut bad = dist.clone();
    bad[7] = f64::NAN;
    assert!(kfold_accuracy(&bad, &issame, 10).unwrap_err().to_string().contains("pair 7"));
    assert!(matches!(kfold_accuracy(&dist[1..], &issame, 10), Err(Error::Shape { .. })));
}

/// VAL the slow way (the same interpolation, written as a scan).
fn slow_val(dist: &[f64], issame: &[bool], target: f64) -> (f64, f64) {
    let thresholds: Vec<f64> = (0..4000).map(|i| i as f64 * 0.001).collect();
    let n = dist.len();
    let mut vals = Vec::new();
    let mut fars = Vec::new();
    for test in folds(n, 10) {
        let train: Vec<usize> = (0..n).filter(|i| !test.contains(i)).collect();
        let negs = train.iter().filter(|&&i| !issame[i]).count().max(1) as f64;
        let far: Vec<f64> = thresholds
            .iter()
            .map(|&t| train.iter().filter(|&&i| !issame[i] && dist[i] < t).count() as f64 / negs)
            .collect();
        let mut th = 0.0;
        if *far.last().unwrap() >= target {
            // The segment [k, k+1] holding the target, k the last index
            // whose FAR is not above it.
            let mut k = 0;
            for (i, &f) in far.iter().enumerate() {
                if f <= target {
                    k = i;
                }
            }
            th = if k + 1 < far.len() && far[k + 1] > far[k] {
                thresholds[k] + (target - far[k]) * (thresholds[k + 1] - thresholds[k]) / (far[k + 1] - far[k])
            } else {
                thresholds[k]
            };
        }
        let pos: Vec<usize> = test.clone().filter(|&i| issame[i]).collect();
        let neg: Vec<usize> = test.clone().filter(|&i| !issame[i]).collect();
        let rate = |v: &[usize]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().filter(|&&i| dist[i] < th).count() as f64 / v.len() as f64
            }
        };
        vals.push(rate(&pos));
        fars.push(rate(&neg));
    }
    (vals.iter().sum::<f64>() / 10.0, fars.iter().sum::<f64>() / 10.0)
}

#[test]
fn kfold_val_equals_the_slow_scan() {
    for (seed, n, target) in [(4, 3000, 1e-3), (5, 800, 1e-2), (6, 500, 0.3)] {
        let (dist, issame) = random_pairs(seed, n);
        let (val, _, far) = kfold_val(&dist, &issame, target, 10).unwrap();
        let (v2, f2) = slow_val(&dist, &issame, target);
        assert!((val - v2).abs() < 1e-12 && (far - f2).abs() < 1e-12, "{val} {v2} {far} {f2}");
    }
}

/// TAR at FAR ≤ f and the AUC the slow way: every candidate threshold;
/// the AUC as the Mann-Whitney statistic (ties count half).
fn slow_roc(scores: &[f64], issame: &[bool], f: f64) -> (f64, f64) {
    let p = issame.iter().filter(|&&s| s).count() as f64;
    let n = issame.len() as f64 - p;
    let mut cands: Vec<f64> = scores.to_vec();
    cands.push(f64::INFINITY);
    let mut best = 0.0f64;
    for &t in &cands {
        let far = scores.iter().zip(issame).filter(|(&s, &y)| !y && s >= t).count() as f64 / n;
        let tar = scores.iter().zip(issame).filter(|(&s, &y)| y && s >= t).count() as f64 / p;
        if far <= f {
            best = best.max(tar);
        }
    }
    let mut u = 0.0;
    for (&a, &ya) in scores.iter().zip(issame) {
        for (&b, &yb) in scores.iter().zip(issame) {
            if ya && !yb {
                u += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    (best, u / (p * n))
}

#[test]
fn the_exact_roc_equals_the_brute_force() {
    for (seed, n) in [(7, 400), (8, 1001)] {
        let (dist, issame) = random_pairs(seed, n);
        let scores: Vec<f64> = dist.iter().map(|d| 1.0 - d / 2.0).collect();
        let roc = Roc::new(&scores, &issame).unwrap();
        for f in [1e-6, 1e-3, 1e-2, 0.05, 0.1, 0.5] {
            let (tar, auc) = slow_roc(&scores, &issame, f);
            assert_eq!(roc.tar_at_far(f).tar, tar, "FAR {f}");
            assert!(roc.tar_at_far(f).far <= f);
            assert!((roc.auc() - auc).abs() < 1e-12, "{} vs {auc}", roc.auc());
        }
        // The EER point: FAR equals 1 − TAR there.
        let (eer, _) = roc.eer();
        assert!(eer > 0.0 && eer < 0.5, "{eer}");
    }
}

#[test]
fn known_answers_for_the_roc() {
    // Scores: positives 0.9, 0.8, 0.5; negatives 0.7, 0.5, 0.1 (a tie at
    // 0.5 across the classes).
    let scores = [0.9, 0.8, 0.5, 0.7, 0.5, 0.1];
    let issame = [true, true, true, false, false, false];
    let roc = Roc::new(&scores, &issame).unwrap();
    let pts: Vec<(f64, f64)> = roc.points.iter().map(|p| (p.far, p.tar)).collect();
    let third = 1.0 / 3.0;
    assert_eq!(
        pts,
        [(0.0, 0.0), (0.0, third), (0.0, 2.0 * third), (third, 2.0 * third), (2.0 * third, 1.0), (1.0, 1.0)]
    );
    // FAR below 1/3 (the least a negative can add): TAR 2/3 at the
    // threshold 0.8, not NaN.
    let p = roc.tar_at_far(1e-6);
    assert_eq!((p.tar, p.threshold), (2.0 * third, 0.8));
    // AUC: of the 9 (positive, negative) pairs the positive scores higher
    // in 7, ties in 1 (counted half): 7.5 / 9.
    assert!((roc.auc() - 7.5 / 9.0).abs() < 1e-15);
    // EER: FAR = 1 − TAR between (1/3, 2/3) and (2/3, 1): at FAR 1/3.
    assert!((roc.eer().0 - third).abs() < 1e-12);
    // insightface's IJB reading: scikit-learn drops the collinear point
    // (0, 1/3); the nearest FAR to 1e-6 is 0, held by (0, 0) and (0, 2/3),
    // and the later one (the larger TAR) is taken; near 0.3, (1/3, 2/3).
    assert_eq!(roc.tar_at_far_nearest(1e-6).tar, 2.0 * third);
    assert_eq!((roc.tar_at_far_nearest(0.3).far, roc.tar_at_far_nearest(0.3).tar), (third, 2.0 * third));
    assert_eq!(roc.tar_at_far_nearest(0.95).tar, 1.0);
    // Nothing but positives: a typed error.
    assert!(Roc::new(&[0.5, 0.6], &[true, true]).is_err());
}

/// A protocol-2 pickle as Python 2 wrote insightface's files: a tuple of
/// a list of `str` (SHORT_BINSTRING / BINSTRING) and a list of bools.
fn python2_pickle(images: &[Vec<u8>], issame: &[bool]) -> Vec<u8> {
    let mut b = vec![0x80, 2]; // PROTO 2
    b.push(b']'); // EMPTY_LIST
    b.push(b'('); // MARK
    for img in images {
        if img.len() < 256 {
            b.push(b'U'); // SHORT_BINSTRING
            b.push(img.len() as u8);
        } else {
            b.push(b'T'); // BINSTRING
            b.extend((img.len() as u32).to_le_bytes());
        }
        b.extend(img);
    }
    b.push(b'e'); // APPENDS
    b.push(b']');
    b.push(b'(');
    for &s in issame {
        b.push(if s { 0x88 } else { 0x89 }); // NEWTRUE / NEWFALSE
    }
    b.push(b'e');
    b.push(0x86); // TUPLE2
    b.push(b'.'); // STOP
    b
}

#[test]
fn bin_files_of_both_pickle_protocols_read() {
    let images: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; if i == 3 { 300 } else { 10 + i }]).collect();
    let issame = vec![true, false];
    let path = std::path::Path::new("lfw.bin");
    let py2 = parse_bin(path, &python2_pickle(&images, &issame)).unwrap();
    assert_eq!(py2, PairSet { images: images.clone(), issame: issame.clone() });
    // A count mismatch, another shape: errors naming the file.
    let e = parse_bin(path, &python2_pickle(&images[..3], &issame)).unwrap_err().to_string();
    assert!(e.contains("lfw.bin") && e.contains("3 images for 2 pairs"), "{e}");
    assert!(parse_bin(path, &[0x80, 2, b'N', b'.']).unwrap_err().to_string().contains("None"));
    assert!(parse_bin(path, b"garbage").is_err());
    // Protocol 3 (what this crate writes) reads back.
    let dir = tempfile::tempdir().unwrap();
    let p3 = dir.path().join("x.bin");
    gif_fr::io::verification::write_bin(&p3, &py2).unwrap();
    assert_eq!(read_bin(&p3).unwrap(), py2);
}

#[test]
fn perfect_embeddings_score_perfectly() {
    // Unit rows: identity k → basis vector k; pairs alternate same / other.
    let (p, dim) = (60, 8);
    let issame: Vec<bool> = (0..p).map(|i| i % 3 != 0).collect();
    let mut fused = Vec::new();
    for (i, &s) in issame.iter().enumerate() {
        let a = i % dim;
        let b = if s { a } else { (a + 1) % dim };
        for k in [a, b] {
            fused.extend((0..dim).map(|j| if j == k { 1.0f32 } else { 0.0 }));
        }
    }
    let (v, _) = evaluate("perfect", &fused, dim, &issame, 1.0).unwrap();
    assert_eq!((v.accuracy, v.accuracy_std, v.auc, v.eer), (1.0, 0.0, 1.0, 0.0));
    assert!(v.tar_at_far.iter().all(|t| t.tar == 1.0 && t.far_reached == 0.0));
    assert_eq!((v.positives, v.negatives), (40, 20));
}

#[test]
fn a_synthetic_set_through_a_network_gives_every_number() {
    use gif_fr::data::synth::{verification_pairs, SynthConfig};
    let cfg = SynthConfig { size: 16, seed: 2, ..SynthConfig::new(10) };
    let set = verification_pairs(&cfg, 8, 40).unwrap();
    let net_cfg = common::tiny_iresnet();
    let mut net = gif_fr::backbone::IResNet::new(net_cfg, &gif_fr::Device::cpu(), 1).unwrap();
    let (v, roc) = verify_pairs(&mut net, &set, std::path::Path::new("synth.bin"), 7).unwrap();
    assert_eq!((v.name.as_str(), v.pairs, v.positives, v.negatives), ("synth", 40, 20, 20));
    for x in [v.accuracy, v.accuracy_std, v.val, v.val_std, v.val_far, v.eer, v.auc] {
        assert!(x.is_finite() && (0.0..=1.0).contains(&x), "{v:?}");
    }
    assert!(v.xnorm > 0.0);
    let lines = v.lines();
    assert!(lines[1].starts_with("[synth]Accuracy-Flip: ") && lines[1].contains("+-"), "{lines:?}");
    let svg = gif_fr::eval::roc_svg(&[("synth", &roc)]);
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    serde_json::to_string(&v).unwrap();
    // A corrupt image: an error naming the set and the image.
    let mut bad = set.clone();
    bad.images[9] = b"not an image".to_vec();
    let e = verify_pairs(&mut net, &bad, std::path::Path::new("synth.bin"), 7).unwrap_err().to_string();
    assert!(e.contains("synth.bin") && e.contains("image 9"), "{e}");
}

#[test]
fn ijb_template_features_average_media_then_sum_then_normalize() {
    use gif_fr::eval::ijb::{score_pairs, template_features};
    // Template 7: media 1 holds images 0 and 1 (averaged), media 2 image 2;
    // template 3: image 3 alone. Faceness scores weight each image.
    let d = 2;
    let feats = [1.0f32, 0.0, 3.0, 0.0, 0.0, 2.0, 5.0, 5.0];
    let tid_mid = [(7, 1), (7, 1), (7, 2), (3, 9)];
    let scores = [1.0f32, 0.5, 2.0, 1.0];
    let (ids, tf) = template_features(&feats, d, &tid_mid, Some(&scores)).unwrap();
    assert_eq!(ids, [3, 7]);
    // Template 7: media 1 = mean((1,0)·1, (3,0)·0.5) = (1.25, 0); media 2 =
    // (0, 4); sum (1.25, 4), normalized.
    let n = (1.25f64 * 1.25 + 16.0).sqrt();
    let want7 = [(1.25 / n) as f32, (4.0 / n) as f32];
    assert!((tf[2] - want7[0]).abs() < 1e-7 && (tf[3] - want7[1]).abs() < 1e-7, "{tf:?}");
    let h = std::f32::consts::FRAC_1_SQRT_2;
    assert!((tf[0] - h).abs() < 1e-7 && (tf[1] - h).abs() < 1e-7);
    // Cosine of the pair; an unknown template is an error naming the pair.
    let s = score_pairs(&ids, &tf, d, &[(7, 3, false)]).unwrap();
    assert!((s[0] - (want7[0] as f64 + want7[1] as f64) * h as f64).abs() < 1e-6);
    let e = score_pairs(&ids, &tf, d, &[(7, 3, true), (7, 4, false)]).unwrap_err().to_string();
    assert!(e.contains("pair 1") && e.contains("template 4"), "{e}");
    // NaN features and count mismatches are refused.
    let mut bad = feats;
    bad[5] = f32::NAN;
    assert!(template_features(&bad, d, &tid_mid, None).unwrap_err().to_string().contains("image 2"));
    assert!(template_features(&feats, d, &tid_mid[..3], None).is_err());
}

#[test]
fn ijb_meta_files_read_and_bad_lines_name_the_line() {
    use gif_fr::eval::ijb::{read_face_tid_mid, read_name_5pts_score, read_template_pairs};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ijbc_face_tid_mid.txt");
    std::fs::write(&p, "1.jpg 1 10\n2.jpg 1 11\n\n3.jpg 2 12\n").unwrap();
    assert_eq!(read_face_tid_mid(&p).unwrap()[2], ("3.jpg".to_string(), 2, 12));
    std::fs::write(&p, "1.jpg 1 10\n2.jpg one 11\n").unwrap();
    let e = read_face_tid_mid(&p).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("one"), "{e}");
    let q = dir.path().join("pairs.txt");
    std::fs::write(&q, "1 2 1\n1 3 0\n2 3 2\n").unwrap();
    assert!(read_template_pairs(&q).unwrap_err().to_string().contains("line 3"));
    let r = dir.path().join("scores.txt");
    std::fs::write(&r, "1.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n2.jpg 1 2 3\n").unwrap();
    assert!(read_name_5pts_score(&r).unwrap_err().to_string().contains("line 2"));
}

/// Gallery embeddings: `ids` identities of `per` noisy unit rows around a
/// centre each (so positives score high), labels in order.
#[cfg(feature = "sim")]
fn gallery(seed: u64, ids: usize, per: usize, d: usize) -> (Vec<f32>, Vec<u32>) {
    let mut r = common::rng(seed);
    let centres = common::unit_rows(&mut r, ids, d);
    let (mut emb, mut labels) = (Vec::new(), Vec::new());
    for k in 0..ids * per {
        let c = &centres[(k % ids) * d..(k % ids + 1) * d];
        let mut v: Vec<f32> = c.iter().map(|&x| x + r.random_range(-0.12f32..0.12)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        emb.extend(v);
        labels.push((k % ids) as u32);
    }
    (emb, labels)
}

#[cfg(feature = "sim")]
#[test]
fn all_pairs_histograms_count_every_pair_once_on_every_device() {
    use gif_fr::eval::pairs::{all_pair_scores, all_pairs_histogram, cpu, PairHistogram};
    use gif_fr::{DType, Device, Tensor};
    // 301 rows: tiles of 64 leave a partial last tile; d = 40.
    let (n, d, bins, tile) = (301usize, 40usize, 256usize, 64usize);
    let (emb, labels) = gallery(31, 43, 7, d);
    // The reference: every pair's f64 cosine, binned in f64.
    let mut want = PairHistogram { bins, positives: vec![0; bins], negatives: vec![0; bins] };
    let mut near_edge = vec![0u64; bins + 1];
    let (mut scores, mut issame) = (Vec::new(), Vec::new());
    for i in 0..n {
        for j in i + 1..n {
            let s: f64 = (0..d).map(|k| emb[i * d + k] as f64 * emb[j * d + k] as f64).sum();
            let k = cpu::bin(s as f32, bins);
            if labels[i] == labels[j] {
                want.positives[k] += 1;
            } else {
                want.negatives[k] += 1;
            }
            // Pairs this close to an edge may fall either side in f32.
            let x = (s + 1.0) * 0.5 * bins as f64;
            if (x - x.round()).abs() < 1e-4 {
                near_edge[x.round() as usize] += 1;
            }
            scores.push(s);
            issame.push(labels[i] == labels[j]);
        }
    }
    let total = (n * (n - 1) / 2) as u64;
    let cum = |h: &PairHistogram| -> Vec<i64> {
        let mut c = vec![0i64; bins + 1];
        for k in 0..bins {
            c[k + 1] = c[k] + (h.positives[k] + h.negatives[k]) as i64;
        }
        c
    };
    let want_cum = cum(&want);
    let mut devices = common::gpu_devices();
    devices.insert(0, Device::cpu());
    for dev in devices {
        let t = Tensor::from_f32(&dev, &[n, d], &emb, DType::F32).unwrap();
        let got = all_pairs_histogram(&t, &labels, bins, tile).unwrap();
        let (p, q) = got.counts();
        assert_eq!(p + q, total, "{dev}: every pair once");
        assert_eq!((p, q), want.counts(), "{dev}: positives are the label's");
        let got_cum = cum(&got);
        for k in 0..=bins {
            assert!(
                (got_cum[k] - want_cum[k]).unsigned_abs() <= near_edge[k],
                "{dev}: {} pairs below edge {k}, {} in f64 ({} within 1e-4 of it)",
                got_cum[k],
                want_cum[k],
                near_edge[k]
            );
        }
        // The exact scores by the same tiles: in pair order, each the f64
        // cosine to f32 rounding, the labels' equality beside it.
        let (got_scores, got_same) = all_pair_scores(&t, &labels, tile).unwrap();
        assert_eq!(got_same, issame, "{dev}");
        assert_eq!(got_scores.len(), scores.len());
        for (k, (g, w)) in got_scores.iter().zip(&scores).enumerate() {
            assert!((g - w).abs() < 1e-5, "{dev}: pair {k}: {g} against {w}");
        }
        assert!(all_pair_scores(&t, &labels, 100).is_err() && all_pair_scores(&t, &labels[1..], tile).is_err());
        // One tile of all 301 rows: the same counts on this device.
        let one = all_pairs_histogram(&t, &labels, bins, 384).unwrap();
        assert_eq!(one.counts(), got.counts(), "{dev}");
        // The histogram's ROC agrees with the exact one at its thresholds.
        let roc = got.roc().unwrap();
        let exact = Roc::new(&scores, &issame).unwrap();
        for far in [1e-3, 1e-2, 1e-1] {
            let h = roc.tar_at_far(far);
            assert!(h.far <= far, "{dev}: FAR {} above {far}", h.far);
            // The exact curve at the same threshold, within the pairs near it.
            let above = |same: bool| {
                scores.iter().zip(&issame).filter(|(s, &y)| y == same && **s >= h.threshold).count() as f64
            };
            let slack = near_edge.iter().sum::<u64>() as f64;
            assert!((above(true) - h.tar * exact.positives as f64).abs() <= slack, "{dev}: TAR at FAR {far}");
            assert!(exact.tar_at_far(far).tar + 1e-12 >= h.tar - slack / exact.positives as f64);
        }
        assert!(roc.auc() > 0.9, "{dev}: the gallery separates its identities ({})", roc.auc());
    }
}

#[cfg(feature = "sim")]
#[test]
fn all_pairs_histograms_refuse_bad_input() {
    use gif_fr::eval::pairs::all_pairs_histogram;
    use gif_fr::{DType, Device, Tensor};
    let (emb, labels) = gallery(5, 4, 3, 8);
    for dev in [Device::cpu(), Device::sim()] {
        let t = Tensor::from_f32(&dev, &[12, 8], &emb, DType::F32).unwrap();
        let msg = |r: Result<_, Error>| r.expect_err("an error").to_string();
        assert!(msg(all_pairs_histogram(&t, &labels[..11], 64, 64)).contains("11 labels"));
        assert!(msg(all_pairs_histogram(&t, &labels, 1, 64)).contains("bins"));
        assert!(msg(all_pairs_histogram(&t, &labels, 5000, 64)).contains("bins"));
        assert!(msg(all_pairs_histogram(&t, &labels, 64, 100)).contains("tile"));
        let one = Tensor::from_f32(&dev, &[1, 8], &emb[..8], DType::F32).unwrap();
        assert!(msg(all_pairs_histogram(&one, &labels[..1], 64, 64)).contains("at least 2"));
        // A NaN row, or rows that are not unit: an error, not a histogram.
        let mut bad = emb.clone();
        bad[9] = f32::NAN;
        let t = Tensor::from_f32(&dev, &[12, 8], &bad, DType::F32).unwrap();
        assert!(msg(all_pairs_histogram(&t, &labels, 64, 64)).contains("unit rows"), "{dev}");
        let big: Vec<f32> = emb.iter().map(|x| x * 3.0).collect();
        let t = Tensor::from_f32(&dev, &[12, 8], &big, DType::F32).unwrap();
        assert!(msg(all_pairs_histogram(&t, &labels, 64, 64)).contains("unit rows"), "{dev}");
    }
}
