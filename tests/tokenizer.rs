//! The identity tokenizer: unique fixed-length codes, the trie, the file
//! format (round trip, corruption, determinism), homogenization lowering the
//! uniformity loss, prefix sharing of similar identities, bad input, and the
//! GPU building blocks against their CPU references (simulator everywhere,
//! CUDA when present).
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use std::path::PathBuf;

use common::*;
use gif_fr::tokenizer::{self, homogenize, ops, tokenize, tokenize_with_report, Codebook, Config, Input};
use gif_fr::{Device, Error, Tensor};
use proptest::prelude::*;
use rand::Rng;

fn quick(vocab: usize, seed: u64) -> Config {
    Config { vocab, seed, steps: Some(3), subset: 64, kmeans_iters: 4, ..Config::default() }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gif-fr-test-{}-{name}", std::process::id()))
}

/// Clusters of points around `centers` random directions: returns the
/// vectors and each point's cluster.
fn clustered(
    rng: &mut rand::rngs::StdRng,
    centers: usize,
    per: usize,
    dim: usize,
    noise: f32,
) -> (Vec<f32>, Vec<usize>) {
    let cs: Vec<Vec<f32>> = (0..centers).map(|_| uniform(rng, dim, -1.0, 1.0)).collect();
    let mut data = Vec::new();
    let mut label = Vec::new();
    for p in 0..centers * per {
        let c = p % centers;
        data.extend(cs[c].iter().map(|&x| x + rng.random_range(-noise..noise)));
        label.push(c);
    }
    (data, label)
}

fn check_codes(book: &Codebook, n: usize, v: usize, l: usize) {
    assert_eq!((book.len(), book.vocab(), book.length()), (n, v, l));
    let mut seen = std::collections::HashSet::new();
    for id in 0..n {
        let code = book.code_of(id).unwrap();
        assert_eq!(code.len(), l);
        assert!(code.iter().all(|&t| (t as usize) < v), "id {id}: {code:?}");
        assert!(seen.insert(code.to_vec()), "id {id} repeats code {code:?}");
        assert_eq!(book.identity_of(code), Some(id));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn codes_are_unique_and_of_fixed_length(n in 1usize..400, v in 2usize..20, extra in 0usize..2, seed in 0u64..1000) {
        let l = tokenizer::min_length(v, n).unwrap() + extra;
        let cfg = Config { length: Some(l), ..quick(v, seed) };
        let book = tokenize(Input::Random { count: n, dim: 6 }, &cfg, &Device::cpu()).unwrap();
        check_codes(&book, n, v, l);
    }
}

#[test]
fn tight_capacity_still_gives_unique_codes() {
    // N = v^l exactly: every code is used; all identities nearly identical.
    let mut rng = rng(21);
    let (data, _) = clustered(&mut rng, 1, 81, 5, 1e-3);
    let book = tokenize(Input::Vectors { data, dim: 5 }, &quick(3, 1), &Device::cpu()).unwrap();
    check_codes(&book, 81, 3, 4);
    assert!(book.stats().iter().all(|s| s.fill == 1.0));
}

#[test]
fn trie_round_trips_and_rejects_non_codes() {
    let book = tokenize(Input::Random { count: 300, dim: 8 }, &quick(5, 2), &Device::cpu()).unwrap();
    let trie = book.trie();
    let l = book.length();
    // Per level: nodes sorted by token, children point into the next level.
    let nodes = trie.nodes_per_level();
    assert_eq!(nodes[0], 1);
    for j in 0..l {
        for w in trie.node_ptr[j].windows(2) {
            let toks = &trie.token[j][w[0] as usize..w[1] as usize];
            assert!(toks.windows(2).all(|p| p[0] < p[1]), "level {j}: tokens not sorted");
            assert!(!toks.is_empty(), "level {j}: a node without children");
        }
        let bound = if j + 1 == l { book.len() } else { nodes[j + 1] };
        assert!(trie.child[j].iter().all(|&c| (c as usize) < bound));
    }
    assert_eq!(trie.token[l - 1].len(), book.len());
    let mut rng = rng(22);
    let mut misses = 0;
    for _ in 0..500 {
        let code: Vec<u16> = (0..l).map(|_| rng.random_range(0..5)).collect();
        match book.identity_of(&code) {
            Some(id) => assert_eq!(book.code_of(id).unwrap(), &code[..]),
            None => misses += 1,
        }
    }
    assert!(misses > 0, "5^4 = 625 codes for 300 identities: some random codes must miss");
    assert_eq!(book.identity_of(&[0, 0]), None, "wrong length");
    assert_eq!(book.identity_of(&[99, 0, 0, 0]), None, "token out of range");
}

#[test]
fn save_load_round_trip_and_byte_identical_files() {
    let cfg = quick(7, 3);
    let a = tokenize(Input::Random { count: 500, dim: 12 }, &cfg, &Device::cpu()).unwrap();
    let (pa, pb) = (tmp("a.safetensors"), tmp("b.safetensors"));
    a.save(&pa).unwrap();
    let back = Codebook::load(&pa).unwrap();
    assert_eq!(back, a);
    // The same input, config and seed: the same bytes, also with one thread.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let b = pool.install(|| tokenize(Input::Random { count: 500, dim: 12 }, &cfg, &Device::cpu()).unwrap());
    b.save(&pb).unwrap();
    assert_eq!(std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    // The file is standard safetensors with the promised tensors and metadata.
    let bytes = std::fs::read(&pa).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("codes").unwrap().shape(), &[500, a.length()]);
    assert_eq!(st.tensor("vectors").unwrap().shape(), &[500, 12]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    for (k, v) in [("vocab", "7"), ("length", &a.length().to_string()[..]), ("seed", "3"), ("format_version", "1")] {
        assert_eq!(md.get(k).map(String::as_str), Some(v), "{k}");
    }
    let _ = std::fs::remove_file(pa);
    let _ = std::fs::remove_file(pb);
}

/// Writes `bytes` and loads them: the error message.
fn load_error(name: &str, bytes: &[u8]) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    let r = Codebook::load(&p);
    let _ = std::fs::remove_file(&p);
    match r {
        Err(Error::File { message, .. }) => message,
        other => panic!("{name}: expected a file error, got {other:?}"),
    }
}

/// A file with our header and arbitrary tensors, written by the safetensors crate.
fn write_st(tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>, meta: &[(&str, &str)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dt, sh, data)| (n.to_string(), safetensors::tensor::TensorView::new(*dt, sh.clone(), data).unwrap()))
        .collect();
    let md = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize(views, Some(md)).unwrap()
}

#[test]
fn corrupt_or_inconsistent_files_are_errors_not_panics() {
    let book = tokenize(Input::Random { count: 40, dim: 4 }, &quick(4, 4), &Device::cpu()).unwrap();
    let p = tmp("good.safetensors");
    book.save(&p).unwrap();
    let good = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);

    // Truncations anywhere, and garbage.
    for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
        let m = load_error(&format!("cut{cut}"), &good[..cut]);
        assert!(m.contains("not a valid safetensors file"), "cut at {cut}: {m}");
    }
    assert!(load_error("garbage", b"definitely not a codebook").contains("not a valid safetensors"));
    let missing = Codebook::load(&tmp("does-not-exist"));
    assert!(matches!(missing, Err(Error::File { ref message, .. }) if message.contains("cannot open")), "{missing:?}");

    let l = book.length();
    let codes: Vec<u8> = book.codes().iter().flat_map(|t| t.to_le_bytes()).collect();
    let vecs: Vec<u8> = book.vectors().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
    let meta = [("vocab", "4"), ("length", "3"), ("seed", "4"), ("format_version", "1")];
    assert_eq!(l, 3);
    use safetensors::Dtype::{F32, I32, U16};
    let ok =
        write_st(vec![("codes", U16, vec![40, 3], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())], &meta);
    assert_eq!(
        Codebook::load(&{
            let p = tmp("rewritten");
            std::fs::write(&p, &ok).unwrap();
            p
        })
        .unwrap(),
        book
    );

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "version",
            write_st(
                vec![("codes", U16, vec![40, 3], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())],
                &[("vocab", "4"), ("length", "3"), ("seed", "4"), ("format_version", "2")],
            ),
            "format_version 2",
        ),
        (
            "no-vocab",
            write_st(
                vec![("codes", U16, vec![40, 3], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())],
                &[("length", "3"), ("seed", "4"), ("format_version", "1")],
            ),
            "no \"vocab\"",
        ),
        (
            "bad-vocab",
            write_st(
                vec![("codes", U16, vec![40, 3], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())],
                &[("vocab", "four"), ("length", "3"), ("seed", "4"), ("format_version", "1")],
            ),
            "not a whole number",
        ),
        ("no-codes", write_st(vec![("vectors", F32, vec![40, 4], vecs.clone())], &meta), "no tensor \"codes\""),
        (
            "i32-codes",
            write_st(
                vec![("codes", I32, vec![20, 3], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())],
                &meta,
            ),
            "expected U16",
        ),
        (
            "shape",
            write_st(
                vec![("codes", U16, vec![30, 4], codes.clone()), ("vectors", F32, vec![40, 4], vecs.clone())],
                &meta,
            ),
            "must be [N, 3]",
        ),
        (
            "token-range",
            write_st(
                vec![
                    ("codes", U16, vec![40, 3], {
                        let mut c = codes.clone();
                        c[0] = 9;
                        c[1] = 0;
                        c
                    }),
                    ("vectors", F32, vec![40, 4], vecs.clone()),
                ],
                &meta,
            ),
            "not below vocab 4",
        ),
        (
            "duplicate",
            write_st(
                vec![
                    ("codes", U16, vec![40, 3], {
                        let mut c = codes.clone();
                        let (a, b) = c.split_at_mut(6);
                        b[..6].copy_from_slice(&a[..6]);
                        c
                    }),
                    ("vectors", F32, vec![40, 4], vecs.clone()),
                ],
                &meta,
            ),
            "share a code",
        ),
    ];
    for (name, bytes, want) in cases {
        let m = load_error(name, &bytes);
        assert!(m.contains(want), "{name}: {m:?} should mention {want:?}");
    }
    // A bad code vector: the codes load (decoding never reads the vectors),
    // and the vectors are refused, naming the file, when they are read.
    let bad_norm = write_st(
        vec![
            ("codes", U16, vec![40, 3], codes.clone()),
            ("vectors", F32, vec![40, 4], {
                let mut v = vecs.clone();
                v[..4].copy_from_slice(&3.0f32.to_le_bytes());
                v
            }),
        ],
        &meta,
    );
    let p = tmp("bad-norm");
    std::fs::write(&p, &bad_norm).unwrap();
    let lazy = Codebook::load(&p).unwrap();
    assert_eq!(lazy.codes(), book.codes());
    assert_eq!(lazy.identity_of(book.code_of(7).unwrap()), Some(7));
    match lazy.vectors() {
        Err(Error::File { path, message }) => {
            assert!(path.contains("bad-norm") && message.contains("code vector 0 has norm"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(lazy.vector_of(3).is_err() && lazy.save(&tmp("bad-norm-copy")).is_err());
}

#[test]
fn homogenization_lowers_the_uniformity_loss() {
    let mut rng = rng(23);
    let (data, _) = clustered(&mut rng, 3, 100, 16, 0.2);
    let mut before = data.clone();
    for row in before.chunks_mut(16) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    let cfg = Config { steps: Some(150), subset: 100, ..quick(4, 5) };
    let (book, report) = tokenize_with_report(Input::Vectors { data, dim: 16 }, &cfg, &Device::cpu()).unwrap();
    assert_eq!(report.losses.len(), 150);
    let first: f64 = report.losses[..15].iter().sum::<f64>() / 15.0;
    let last: f64 = report.losses[135..].iter().sum::<f64>() / 15.0;
    assert!(last < first - 0.05, "subset loss {first} -> {last}");
    let (l0, l1) = (
        homogenize::uniformity_loss(&before, 16, 2.0).unwrap(),
        homogenize::uniformity_loss(book.vectors().unwrap(), 16, 2.0).unwrap(),
    );
    assert!(l1 < l0 - 0.05, "full loss {l0} -> {l1}");
}

#[test]
fn similar_identities_share_prefixes_more_than_random_pairs() {
    let mut rng = rng(24);
    let (data, label) = clustered(&mut rng, 8, 40, 24, 0.15);
    let cfg = Config { steps: Some(0), ..quick(4, 6) };
    let book = tokenize(Input::Vectors { data, dim: 24 }, &cfg, &Device::cpu()).unwrap();
    let prefix = |a: usize, b: usize| {
        book.code_of(a).unwrap().iter().zip(book.code_of(b).unwrap()).take_while(|(x, y)| x == y).count() as f64
    };
    let (mut same, mut ns, mut any, mut na) = (0.0, 0, 0.0, 0);
    for a in 0..book.len() {
        for b in a + 1..book.len() {
            if label[a] == label[b] {
                same += prefix(a, b);
                ns += 1;
            } else {
                any += prefix(a, b);
                na += 1;
            }
        }
    }
    let (same, other) = (same / ns as f64, any / na as f64);
    assert!(same > other + 1.0, "mean shared prefix: same cluster {same:.2}, different clusters {other:.2}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let cpu = Device::cpu();
    let cfg = quick(4, 0);
    let err = |input: Input, cfg: &Config| match tokenize(input, cfg, &cpu) {
        Err(Error::InvalidArgument { message, .. } | Error::Shape { got: message, .. }) => message,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(err(Input::Random { count: 0, dim: 4 }, &cfg).contains("N = 0"));
    assert!(err(Input::Vectors { data: vec![], dim: 4 }, &cfg).contains("N = 0"));
    assert!(err(Input::Random { count: 5, dim: 0 }, &cfg).contains("dim"));
    assert!(err(Input::Random { count: 5, dim: 3 }, &Config { vocab: 1, ..cfg.clone() }).contains("vocab"));
    assert!(err(Input::Random { count: 5, dim: 3 }, &Config { vocab: 70000, ..cfg.clone() }).contains("vocab"));
    assert!(
        err(Input::Random { count: 17, dim: 3 }, &Config { length: Some(2), ..cfg.clone() }).contains("4^2 < N = 17")
    );
    assert!(err(Input::Vectors { data: vec![1.0; 7], dim: 3 }, &cfg).contains("7 values"));
    let mut nan = vec![1.0f32; 12];
    nan[7] = f32::NAN;
    assert!(err(Input::Vectors { data: nan, dim: 3 }, &cfg).contains("vector 2 has a non-finite value"));
    let mut zero = vec![1.0f32; 12];
    zero[3..6].fill(0.0);
    assert!(err(Input::Vectors { data: zero, dim: 3 }, &cfg).contains("vector 1 is all zeros"));
    let p = tmp("bad.npy");
    std::fs::write(&p, b"\x93NUMPY nope").unwrap();
    assert!(matches!(gif_fr::io::npy::read_npy_matrix(&p), Err(Error::File { .. })));
    let _ = std::fs::remove_file(p);
}

#[test]
fn sizes_from_input_are_checked_against_documented_maxima() {
    use tokenizer::{MAX_LENGTH, MAX_STEPS, MAX_SUBSET, MAX_VALUES};
    let cpu = Device::cpu();
    let cfg = quick(4, 0);
    let err = |input: Input, cfg: &Config| match tokenize(input, cfg, &cpu) {
        Err(Error::InvalidArgument { message, .. }) => message,
        other => panic!("expected an error, got {other:?}"),
    };
    // N·d wraps, or passes the documented maximum: refused before allocating.
    assert!(err(Input::Random { count: 2, dim: usize::MAX / 2 + 1 }, &cfg).contains("at most"));
    assert!(err(Input::Random { count: 1 << 30, dim: 128 }, &cfg).contains("2^36"));
    assert!(err(Input::Random { count: i32::MAX as usize + 1, dim: 1 }, &cfg).contains("at most"));
    let small = Input::Random { count: 10, dim: 3 };
    assert!(err(small.clone(), &Config { length: Some(MAX_LENGTH + 1), ..cfg.clone() }).contains("at most 1024"));
    assert!(err(small.clone(), &Config { steps: Some(MAX_STEPS + 1), ..cfg.clone() }).contains("steps"));
    assert!(err(small.clone(), &Config { subset: MAX_SUBSET + 1, ..cfg.clone() }).contains("subset"));
    assert!(err(small.clone(), &Config { subset: 1, ..cfg.clone() }).contains("subset"));
    assert!(err(small.clone(), &Config { temperature: f32::NAN, ..cfg.clone() }).contains("temperature"));
    const { assert!(MAX_VALUES >= 2_059_906 * 512, "WebFace42M's identities at d = 512 fit") };
    // A long code is allowed and costs O(l) per level, not O(l²).
    let book = tokenize(small, &Config { length: Some(MAX_LENGTH), ..cfg.clone() }, &cpu).unwrap();
    assert_eq!(book.length(), MAX_LENGTH);
    // min_length has no answer below v = 2; uniformity_loss needs two rows.
    assert_eq!(tokenizer::min_length(1, 5), None);
    assert_eq!(tokenizer::min_length(0, 1), Some(1));
    assert_eq!(tokenizer::min_length(16, 2_059_906), Some(6));
    assert_eq!(tokenizer::min_length(2, usize::MAX), Some(64));
    assert!(homogenize::uniformity_loss(&[1.0, 0.0], 0, 2.0).is_err());
    assert!(homogenize::uniformity_loss(&[1.0, 0.0], 2, 2.0).is_err());
    assert!(homogenize::uniformity_loss(&[1.0, 0.0, 0.0], 2, 2.0).is_err());
}

#[test]
fn a_large_vocabulary_keeps_the_assignment_buffers_bounded() {
    // v = 65535: the CPU assignment held an 8192 x k score buffer (2.1 GB
    // at N = 100,000) and per-chunk k x d partial sums. Its peak is measured
    // in tests/tokenizer_memory.rs; this checks the chunked path (k = 5000
    // centroids at the root, 3355-row chunks) gives valid codes on the CPU
    // and the simulator.
    let cfg = Config { vocab: 65535, length: Some(2), steps: Some(0), kmeans_iters: 2, ..quick(65535, 3) };
    let book = tokenize(Input::Random { count: 5000, dim: 4 }, &cfg, &Device::cpu()).unwrap();
    check_codes(&book, 5000, 65535, 2);
    assert!(book.stats()[1].nodes > 100, "the root really split: {:?}", book.stats()[1]);
    let sim = Config { gpu_min_rows: 4096, kmeans_iters: 1, ..cfg };
    let book = tokenize(Input::Random { count: 5000, dim: 4 }, &sim, &Device::sim()).unwrap();
    check_codes(&book, 5000, 65535, 2);
}

// ---- The GPU building blocks against their CPU references.

#[test]
fn uniformity_step_matches_the_cpu() {
    let mut rng = rng(26);
    for (b, d) in [(2usize, 3usize), (37, 19), (130, 64)] {
        let h0 = unit_rows(&mut rng, b, d);
        let mut cpu = Tensor::from_slice(&Device::cpu(), &[b, d], &h0).unwrap();
        let s_cpu = ops::uniformity_step(&mut cpu, 2.0, 0.5).unwrap();
        let want = cpu.to_vec::<f32>().unwrap();
        // The loss before the step, against the f64 definition.
        let loss = (s_cpu / (b * (b - 1)) as f64).ln();
        assert!((loss - homogenize::uniformity_loss(&h0, d, 2.0).unwrap()).abs() < 1e-5, "b {b}: {loss}");
        for dev in gpu_devices() {
            let mut h = Tensor::from_slice(&dev, &[b, d], &h0).unwrap();
            let s = ops::uniformity_step(&mut h, 2.0, 0.5).unwrap();
            assert!((s - s_cpu).abs() <= 1e-5 * s_cpu, "{dev} b {b}: S {s} vs {s_cpu}");
            assert_close(&format!("{dev} b {b}"), &h.to_vec::<f32>().unwrap(), &want, 1e-5, 1e-4);
        }
    }
}

#[test]
fn best_centroids_match_the_cpu() {
    let mut rng = rng(27);
    for (n, k, d) in [(1usize, 1usize, 3usize), (200, 16, 33), (513, 5, 8), (70, 40, 17)] {
        let x = unit_rows(&mut rng, n, d);
        let c = unit_rows(&mut rng, k, d);
        let cpu = Device::cpu();
        let (wi, ws) = ops::best_centroids(
            &Tensor::from_slice(&cpu, &[n, d], &x).unwrap(),
            &Tensor::from_slice(&cpu, &[k, d], &c).unwrap(),
        )
        .unwrap();
        for dev in gpu_devices() {
            let (gi, gs) = ops::best_centroids(
                &Tensor::from_slice(&dev, &[n, d], &x).unwrap(),
                &Tensor::from_slice(&dev, &[k, d], &c).unwrap(),
            )
            .unwrap();
            for i in 0..n {
                // A different summation order may flip a near tie; then the scores agree.
                let dot = |j: u32| (0..d).map(|q| x[i * d + q] * c[j as usize * d + q]).sum::<f32>();
                assert!(
                    gi[i] == wi[i] || (dot(gi[i]) - dot(wi[i])).abs() < 1e-5,
                    "{dev} {n}x{k}x{d}: row {i}: {} vs {}",
                    gi[i],
                    wi[i]
                );
                assert!((gs[i] - ws[i]).abs() < 1e-5, "{dev}: row {i} score {} vs {}", gs[i], ws[i]);
            }
        }
    }
}

#[test]
fn tokenizer_on_the_simulated_gpu_gives_valid_codes_and_lowers_the_loss() {
    let mut rng = rng(28);
    let (data, _) = clustered(&mut rng, 4, 60, 16, 0.2);
    // gpu_min_rows 1: every k-means node with at least one identity takes the GPU path.
    let cfg = Config { steps: Some(40), subset: 96, learning_rate: 1.0, gpu_min_rows: 1, ..quick(4, 7) };
    let (sim, sim_report) =
        tokenize_with_report(Input::Vectors { data: data.clone(), dim: 16 }, &cfg, &Device::sim()).unwrap();
    check_codes(&sim, 240, 4, 4);
    let (cpu, cpu_report) =
        tokenize_with_report(Input::Vectors { data: data.clone(), dim: 16 }, &cfg, &Device::cpu()).unwrap();
    // The same homogenization: the code vectors agree to f32 rounding, and
    // so do the codes (a near-tie flipped by rounding may move a few
    // identities; none did when this was written).
    assert_close("code vectors", sim.vectors().unwrap(), cpu.vectors().unwrap(), 1e-4, 1e-4);
    let same = (0..240).filter(|&i| sim.code_of(i) == cpu.code_of(i)).count();
    assert!(same >= 216, "only {same} of 240 codes agree between the simulator and the CPU");
    // Without homogenization both k-means runs see identical vectors: the
    // GPU assignment (GEMM + argmax kernels) gives the CPU's codes exactly,
    // in every scheduling order.
    let c0 = Config { steps: Some(0), ..cfg.clone() };
    let want = tokenize_with_report(Input::Vectors { data: data.clone(), dim: 16 }, &c0, &Device::cpu()).unwrap().0;
    for dev in gpu_devices() {
        let got = tokenize_with_report(Input::Vectors { data: data.clone(), dim: 16 }, &c0, &dev).unwrap().0;
        assert_eq!(got.codes(), want.codes(), "{dev}");
    }
    // The same batches: the per-step losses agree to f32 rounding.
    assert_close(
        "losses",
        &sim_report.losses.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &cpu_report.losses.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        1e-4,
        1e-4,
    );
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&sim_report.losses[..8]), mean(&sim_report.losses[32..]));
    assert!(last < first, "subset loss {first} -> {last}");
}
