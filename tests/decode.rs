//! The prefix decoder: exact top-k equals brute force (ties, peaked and flat
//! distributions), the GPU kernel equals the CPU on the simulator (and a GPU
//! when present), beam search, the open-set threshold, and bad input.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::decode::{Mode, PrefixDecoder};
use gif_fr::tokenizer::{tokenize, Codebook, Config, Input};
use gif_fr::{Device, Error, Tensor};
use proptest::prelude::*;
use rand::Rng;

fn book(n: usize, v: usize, seed: u64) -> Codebook {
    tokenize(
        Input::Random { count: n, dim: 4 },
        &Config { vocab: v, seed, steps: Some(0), kmeans_iters: 2, ..Config::default() },
        &Device::cpu(),
    )
    .unwrap()
}

/// Log-probabilities of `b` queries: `kind` 0 random, 1 peaked (one token
/// per position dominates), 2 flat (all equal: every code ties), 3
/// quantized to halves (many ties), 4 random with −inf (masked tokens,
/// some whole positions), 5 random with −1e9 (huge magnitudes).
fn scores(rng: &mut rand::rngs::StdRng, b: usize, l: usize, v: usize, kind: u8) -> Vec<f32> {
    (0..b * l * v)
        .map(|i| match kind {
            0 => rng.random_range(-6.0f32..0.0),
            1 => {
                if i % v == (i / v) % v {
                    -0.01
                } else {
                    rng.random_range(-12.0f32..-6.0)
                }
            }
            2 => -1.5,
            3 => (rng.random_range(-8.0f32..0.0) * 2.0).round() / 2.0,
            4 if i % (3 * v) < v && rng.random_range(0..4) == 0 => f32::NEG_INFINITY,
            4 if rng.random_range(0..5) == 0 => f32::NEG_INFINITY,
            5 if rng.random_range(0..4) == 0 => -1e9,
            _ => rng.random_range(-6.0f32..0.0),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn exact_top_k_matches_brute_force(n in 1usize..300, v in 2usize..9, k in 1usize..8, kind in 0u8..6, seed in 0u64..1000) {
        let book = book(n, v, seed);
        let k = k.min(n);
        let mut rng = rng(seed);
        let lp = scores(&mut rng, 5, book.length(), v, kind);
        let dec = PrefixDecoder::new(&book, &Device::cpu()).unwrap();
        let want = dec.brute_force(&lp, k).unwrap();
        let got = dec.top_k(&Tensor::from_slice(&Device::cpu(), &[5, book.length() * v], &lp).unwrap(), k, Mode::Exact, None).unwrap();
        prop_assert_eq!(&got, &want);
        // The simulated kernel too.
        let sim = Device::sim_with(gif_fr::SimOrder::Shuffle(seed));
        let dec = PrefixDecoder::new(&book, &sim).unwrap();
        let got = dec.top_k(&Tensor::from_slice(&sim, &[5, book.length() * v], &lp).unwrap(), k, Mode::Exact, None).unwrap();
        prop_assert_eq!(&got, &want);
    }
}

#[test]
fn gpu_exact_search_matches_the_cpu_on_many_queries() {
    let book = book(700, 6, 3);
    let l = book.length();
    let mut rng = rng(4);
    for kind in 0..6u8 {
        let lp = scores(&mut rng, 150, l, 6, kind);
        let cpu = PrefixDecoder::new(&book, &Device::cpu())
            .unwrap()
            .top_k(&Tensor::from_slice(&Device::cpu(), &[150, l, 6], &lp).unwrap(), 7, Mode::Exact, None)
            .unwrap();
        assert_eq!(cpu, PrefixDecoder::new(&book, &Device::cpu()).unwrap().brute_force(&lp, 7).unwrap());
        for dev in gpu_devices() {
            let got = PrefixDecoder::new(&book, &dev)
                .unwrap()
                .top_k(&Tensor::from_slice(&dev, &[150, l, 6], &lp).unwrap(), 7, Mode::Exact, None)
                .unwrap();
            assert_eq!(got, cpu, "{dev} kind {kind}");
        }
    }
}

#[test]
fn beam_search_is_exact_when_wide_and_close_when_narrow() {
    let book = book(2000, 16, 5);
    let l = book.length();
    let mut rng = rng(6);
    let lp = scores(&mut rng, 200, l, 16, 0);
    let dec = PrefixDecoder::new(&book, &Device::cpu()).unwrap();
    let t = Tensor::from_slice(&Device::cpu(), &[200, l * 16], &lp).unwrap();
    let exact = dec.top_k(&t, 5, Mode::Exact, None).unwrap();
    assert_eq!(dec.top_k(&t, 5, Mode::Beam(4096), None).unwrap(), exact, "a beam wider than any level is exhaustive");
    let narrow = dec.top_k(&t, 5, Mode::Beam(16), None).unwrap();
    let hits = narrow.ids.iter().zip(&exact.ids).filter(|(a, b)| a == b).count();
    let recall = hits as f64 / exact.ids.len() as f64;
    assert!(recall > 0.5, "beam-16 recall {recall}");
    // A narrow beam prunes for real here (not exhaustive), yet every result
    // is a valid identity scored like brute force, and no rank beats the
    // exact search's (which is optimal).
    assert!(recall < 1.0, "beam-16 found every exact result: the test does not exercise pruning");
    for (i, (&id, &score)) in narrow.ids.iter().zip(&narrow.scores).enumerate() {
        let q = &lp[(i / 5) * l * 16..(i / 5 + 1) * l * 16];
        let code = book.code_of(id as usize).unwrap();
        let own = code.iter().enumerate().fold(0f32, |s, (j, &tok)| s + q[j * 16 + tok as usize]);
        assert_eq!(score, own, "result {i}: identity {id}");
        assert!(
            score <= exact.scores[i],
            "rank {} of query {}: beam {score} > exact {}",
            i % 5,
            i / 5,
            exact.scores[i]
        );
    }
}

#[test]
fn gpu_beam_search_matches_the_cpu_beam() {
    let book = book(900, 8, 13);
    let l = book.length();
    let mut rng = rng(14);
    for kind in 0..6u8 {
        let lp = scores(&mut rng, 40, l, 8, kind);
        let cpu_dec = PrefixDecoder::new(&book, &Device::cpu()).unwrap();
        for (k, w) in [(1usize, 1usize), (5, 8), (3, 40)] {
            let want = cpu_dec
                .top_k(&Tensor::from_slice(&Device::cpu(), &[40, l * 8], &lp).unwrap(), k, Mode::Beam(w), None)
                .unwrap();
            for dev in gpu_devices() {
                let got = PrefixDecoder::new(&book, &dev)
                    .unwrap()
                    .top_k(&Tensor::from_slice(&dev, &[40, l * 8], &lp).unwrap(), k, Mode::Beam(w), None)
                    .unwrap();
                assert_eq!(got, want, "{dev} kind {kind} k {k} W {w}");
            }
        }
    }
}

#[test]
fn threshold_marks_unknown_queries() {
    let book = book(50, 4, 7);
    let l = book.length();
    let dec = PrefixDecoder::new(&book, &Device::cpu()).unwrap();
    let mut lp = vec![-0.1f32; 2 * l * 4];
    lp[l * 4..].fill(-9.0); // query 1: best score -9 l
    let t = Tensor::from_slice(&Device::cpu(), &[2, l * 4], &lp).unwrap();
    let r = dec.top_k(&t, 2, Mode::Exact, Some(-1.0)).unwrap();
    assert!(r.ids[..2].iter().all(|&i| i >= 0));
    assert_eq!(&r.ids[2..], &[-1, -1]);
}

#[test]
fn bad_input_gets_clear_errors() {
    let book = book(30, 4, 8);
    let l = book.length();
    for dev in [Device::cpu(), Device::sim()] {
        let dec = PrefixDecoder::new(&book, &dev).unwrap();
        let lp = Tensor::from_slice(&dev, &[2, l * 4], &vec![-1.0f32; 2 * l * 4]).unwrap();
        let inv = |r: gif_fr::Result<_>| matches!(r, Err(Error::InvalidArgument { .. }));
        assert!(inv(dec.top_k(&lp, 0, Mode::Exact, None)));
        assert!(inv(dec.top_k(&lp, 31, Mode::Exact, None)));
        assert!(inv(dec.top_k(&lp, 3, Mode::Beam(0), None)));
        assert!(inv(dec.top_k(&lp, 3, Mode::Beam(2), None)));
        let wrong = Tensor::from_slice(&dev, &[2, l * 4 + 1], &vec![-1.0f32; 2 * (l * 4 + 1)]).unwrap();
        assert!(matches!(dec.top_k(&wrong, 1, Mode::Exact, None), Err(Error::Shape { .. })));
        let mut v = vec![-1.0f32; 2 * l * 4];
        v[l * 4 + 2] = f32::NAN;
        let nan = Tensor::from_slice(&dev, &[2, l * 4], &v).unwrap();
        match dec.top_k(&nan, 1, Mode::Exact, None) {
            Err(Error::InvalidArgument { message, .. }) => {
                assert!(message.contains("query 1") && message.contains("NaN"), "{message}")
            }
            other => panic!("{dev}: {other:?}"),
        }
        v[l * 4 + 2] = f32::INFINITY;
        let inf = Tensor::from_slice(&dev, &[2, l * 4], &v).unwrap();
        match dec.top_k(&inf, 1, Mode::Exact, None) {
            Err(Error::InvalidArgument { message, .. }) => assert!(message.contains("query 1"), "{message}"),
            other => panic!("{dev}: +inf: {other:?}"),
        }
        assert!(inv(dec.top_k(&lp, 1, Mode::Exact, Some(f32::NAN))), "a NaN threshold is refused");
        let elsewhere = Tensor::from_slice(&Device::sim(), &[2, l * 4], &vec![-1.0f32; 2 * l * 4]).unwrap();
        assert!(matches!(dec.top_k(&elsewhere, 1, Mode::Exact, None), Err(Error::DeviceMismatch { .. })));
        // The reference kernel's door checks the same (it used to read a
        // bf16 tensor as f32 past its end, a CPU tensor through a null
        // pointer, and to panic on a 0-d tensor).
        let bf16 = Tensor::from_f32(&dev, &[2, l * 4], &vec![-1.0f32; 2 * l * 4], gif_fr::DType::BF16).unwrap();
        assert!(matches!(dec.top_k_thread_per_query(&bf16, 1), Err(Error::DType { .. })));
        let scalar = Tensor::from_slice(&dev, &[], &[-1.0f32]).unwrap();
        assert!(matches!(dec.top_k_thread_per_query(&scalar, 1), Err(Error::Shape { .. })));
        assert!(inv(dec.top_k_thread_per_query(&lp, 0)));
        if dev.kind() == gif_fr::DeviceKind::Cpu {
            assert!(inv(dec.top_k_thread_per_query(&lp, 1)), "no kernel on the CPU");
        } else {
            let cpu_t = Tensor::from_slice(&Device::cpu(), &[2, l * 4], &vec![-1.0f32; 2 * l * 4]).unwrap();
            assert!(matches!(dec.top_k_thread_per_query(&cpu_t, 1), Err(Error::DeviceMismatch { .. })));
            assert!(dec.top_k_thread_per_query(&lp, 2).is_ok());
        }
        // Brute force checks k and the length.
        let host = vec![-1.0f32; 2 * l * 4];
        assert!(inv(dec.brute_force(&host, 0)));
        assert!(inv(dec.brute_force(&host, 31)));
        assert!(matches!(dec.brute_force(&host[1..], 1), Err(Error::Shape { .. })));
    }
}

#[test]
fn identify_runs_head_then_decoder_and_checks_they_match() {
    use gif_fr::head::{CodeHead, CodeHeadConfig};
    let book = book(40, 4, 9);
    let l = book.length();
    let mut rng = rng(10);
    for dev in [Device::cpu(), Device::sim()] {
        let head = CodeHead::new(CodeHeadConfig::new(6, l, 4), &dev, 3).unwrap();
        let dec = PrefixDecoder::new(&book, &dev).unwrap();
        let x = Tensor::from_slice(&dev, &[5, 6], &uniform(&mut rng, 30, -1.0, 1.0)).unwrap();
        let got = gif_fr::decode::identify(&head, &dec, &x, 3, Mode::Exact, None).unwrap();
        let lp = head.log_probs(&x).unwrap();
        assert_eq!(got, dec.top_k(&lp, 3, Mode::Exact, None).unwrap());
        let other = CodeHead::new(CodeHeadConfig::new(6, l + 1, 4), &dev, 3).unwrap();
        assert!(matches!(
            gif_fr::decode::identify(&other, &dec, &x, 3, Mode::Exact, None),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
