//! Synthetic codebooks and decoder queries for the benches.

use gif_fr::tokenizer::{min_length, Codebook};
use rand::{Rng, SeedableRng};

/// Vocabulary of the synthetic codes.
pub const V: usize = 16;

/// N distinct codes of length ceil(log_16 N), spread over the code space.
pub fn codebook(n: usize) -> Codebook {
    let l = min_length(V, n).expect("V >= 2");
    let space = 1u64 << (4 * l);
    let codes: Vec<u16> = (0..n as u64)
        .flat_map(|i| {
            let c = i.wrapping_mul(2_654_435_761) % space; // odd multiplier: a bijection mod 16^l
            (0..l).map(move |j| ((c >> (4 * j)) & 15) as u16)
        })
        .collect();
    Codebook::from_parts(V, l, 1, 0, codes, vec![1.0; n]).expect("synthetic codebook")
}

/// Peaked per-position log-probabilities (the target token 4 above the
/// rest) of b random identities: what a trained head emits.
pub fn queries(book: &Codebook, b: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let l = book.length();
    let mut out = Vec::with_capacity(b * l * V);
    for _ in 0..b {
        let target = book.code_of(rng.random_range(0..book.len())).unwrap().to_vec();
        for &t in &target {
            let logits: Vec<f32> =
                (0..V).map(|k| rng.random_range(-1.0f32..1.0) + if k == t as usize { 4.0 } else { 0.0 }).collect();
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            out.extend(logits.iter().map(|x| x - lse));
        }
    }
    out
}
