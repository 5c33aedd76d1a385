//! GIF on the CPU, end to end in seconds: tokenize N identities into codes,
//! train the code head on fixed features (noisy copies of each identity's
//! prototype), then identify held-out features by decoding their codes.
//!
//! `cargo run --release --example cpu_pipeline`

use gif_fr::decode::{Mode, PrefixDecoder};
use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, Margin};
use gif_fr::tokenizer::{tokenize, Config, Input};
use gif_fr::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};

/// Identities, feature width, samples per identity.
const N: usize = 500;
const D: usize = 64;
const PER_ID: usize = 4;

fn main() -> Result<()> {
    let dev = Device::cpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // 1. Identity prototypes (what a trained backbone's class centres would
    //    be), tokenized into unique codes: v = 16 tokens, l = ceil(log16 N).
    let protos: Vec<f32> = (0..N * D).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let input = Input::Vectors { data: protos.clone(), dim: D };
    let book = tokenize(input, &Config { vocab: 16, steps: Some(50), seed: 3, ..Config::default() }, &dev)?;
    println!("tokenized {N} identities into codes of length {} over {} tokens", book.length(), book.vocab());

    // 2. Fixed features: noisy copies of the prototypes.
    let sample = |rng: &mut rand::rngs::StdRng, id: usize| -> Vec<f32> {
        protos[id * D..(id + 1) * D].iter().map(|&p| p + rng.random_range(-0.3f32..0.3)).collect()
    };
    let train: Vec<(Vec<f32>, u32)> = (0..N * PER_ID).map(|i| (sample(&mut rng, i % N), (i % N) as u32)).collect();

    // 3. The code head, trained with SGD on batches of the fixed features.
    let table = CodeTable::from_codebook(&dev, &book, DType::F32)?;
    let cfg = CodeHeadConfig {
        gamma: 0.5,
        scale: 16.0,
        margin: Margin::CosFace(0.2),
        ..CodeHeadConfig::new(D, book.length(), book.vocab())
    };
    let mut head = CodeHead::new(cfg, &dev, 5)?;
    let batch = 250;
    for epoch in 0..30 {
        let mut total = 0.0;
        for chunk in train.chunks(batch) {
            let x: Vec<f32> = chunk.iter().flat_map(|(f, _)| f.iter().copied()).collect();
            let y: Vec<u32> = chunk.iter().map(|&(_, id)| id).collect();
            let (loss, grads) = head.forward_backward(&Tensor::from_slice(&dev, &[y.len(), D], &x)?, &y, &table)?;
            head.sgd_step(&grads, 1.0)?;
            head.renormalize_centres()?;
            total += loss.total;
        }
        if epoch % 5 == 4 {
            println!("epoch {}: mean loss {:.3}", epoch + 1, total / (train.len() / batch) as f64);
        }
    }

    // 4. Identification of fresh samples: log-probabilities, then the
    //    exact top-5 codes through the prefix tree.
    let queries = 1000;
    let ids: Vec<usize> = (0..queries).map(|i| (i * 7) % N).collect();
    let q: Vec<f32> = ids.iter().flat_map(|&id| sample(&mut rng, id)).collect();
    let lp = head.log_probs(&Tensor::from_slice(&dev, &[queries, D], &q)?)?;
    let top = PrefixDecoder::new(&book, &dev)?.top_k(&lp, 5, Mode::Exact, None)?;
    let hit = |k: usize| {
        ids.iter().enumerate().filter(|&(i, &id)| top.ids[i * 5..i * 5 + k].contains(&(id as i64))).count() as f64
            / queries as f64
    };
    println!("identification of {queries} fresh samples among {N}: top-1 {:.3}, top-5 {:.3}", hit(1), hit(5));
    Ok(())
}
