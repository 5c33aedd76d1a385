//! The identity tokenizer (GIF §1): one unit vector per identity,
//! homogenized on the sphere, then hierarchical capacity-constrained
//! k-means into unique codes of exactly `l` tokens in `[0, v)`, with the
//! prefix trie of the codes. kernels/tokenizer.cu holds its GPU steps.
//!
//! ```
//! use gif_fr::tokenizer::{tokenize, Config, Input};
//! use gif_fr::Device;
//!
//! let cfg = Config { vocab: 4, seed: 7, ..Config::default() };
//! let book = tokenize(Input::Random { count: 50, dim: 8 }, &cfg, &Device::cpu())?;
//! assert_eq!((book.len(), book.length()), (50, 3)); // 4^3 = 64 >= 50
//! let code = book.code_of(17).unwrap().to_vec();
//! assert_eq!(book.identity_of(&code), Some(17));
//! # Ok::<(), gif_fr::Error>(())
//! ```

pub mod codebook;
mod config;
pub mod homogenize;
mod kmeans;
pub mod ops;

pub use codebook::{Codebook, LevelStats, Trie};
pub use config::{min_length, Config, Input, Report, MAX_LENGTH, MAX_STEPS, MAX_SUBSET, MAX_VALUES};
pub use kmeans::PARTIAL_BUDGET;
pub use ops::SCORE_BUDGET;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::device::Device;

fn bar(cfg: &Config, what: &'static str) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what);
    b
}

/// Unit rows of `data` (`dim` ≥ 1 columns): errors on non-finite values or
/// all-zero rows.
fn normalize_rows(data: &mut [f32], dim: usize) -> Result<()> {
    const OP: &str = "tokenize";
    let bad = data.par_chunks_mut(dim).enumerate().find_map_any(|(i, row)| {
        if let Some(c) = row.iter().position(|x| !x.is_finite()) {
            return Some(format!("vector {i} has a non-finite value at column {c}"));
        }
        let ss: f64 = row.iter().map(|&x| x as f64 * x as f64).sum();
        if ss == 0.0 {
            return Some(format!("vector {i} is all zeros"));
        }
        let inv = 1.0 / ss.sqrt();
        row.iter_mut().for_each(|x| *x = (*x as f64 * inv) as f32);
        None
    });
    match bad {
        Some(m) => Err(Error::invalid(OP, m)),
        None => Ok(()),
    }
}

/// `count` seeded random unit vectors: each block of rows has its own
/// stream, so the result does not depend on the number of threads. Errors
/// when `count·dim` floats cannot be allocated.
fn random_unit_vectors(count: usize, dim: usize, seed: u64) -> Result<Vec<f32>> {
    const ROWS: usize = 1024;
    let n =
        count.checked_mul(dim).ok_or_else(|| Error::invalid("tokenize", format!("N·d = {count}·{dim} overflows")))?;
    let mut data = crate::runtime::host_memory::try_filled("tokenize", "the identity vectors", n, 0f32)?;
    data.par_chunks_mut(ROWS * dim).enumerate().for_each(|(blk, chunk)| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ blk as u64);
        for row in chunk.chunks_mut(dim) {
            loop {
                let mut ss = 0f64;
                for x in row.iter_mut() {
                    *x = StandardNormal.sample(&mut rng);
                    ss += *x as f64 * *x as f64;
                }
                if ss > 0.0 {
                    let inv = 1.0 / ss.sqrt();
                    row.iter_mut().for_each(|x| *x = (*x as f64 * inv) as f32);
                    break;
                }
            }
        }
    });
    Ok(data)
}

/// Tokenizes `input` on `device`: homogenizes the vectors (GPU steps on a
/// GPU or the simulator), then assigns unique codes. The CPU path is
/// deterministic: the same input, config and seed give the same codebook.
pub fn tokenize(input: Input, cfg: &Config, device: &Device) -> Result<Codebook> {
    tokenize_with_report(input, cfg, device).map(|(book, _)| book)
}

/// [`tokenize`], also returning the loss log and phase timings.
pub fn tokenize_with_report(input: Input, cfg: &Config, device: &Device) -> Result<(Codebook, Report)> {
    const OP: &str = "tokenize";
    let (n, d) = match &input {
        Input::Vectors { data, dim } => {
            if *dim == 0 {
                return Err(Error::invalid(OP, "dim must be positive"));
            }
            if data.len() % dim != 0 {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("a multiple of dim = {dim} values"),
                    got: format!("{} values", data.len()),
                });
            }
            (data.len() / dim, *dim)
        }
        Input::Random { count, dim } => (*count, *dim),
    };
    if n == 0 {
        return Err(Error::invalid(OP, "there are no identities (N = 0)"));
    }
    if d == 0 {
        return Err(Error::invalid(OP, "dim must be positive"));
    }
    if n > i32::MAX as usize || d > i32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!("at most {} identities and dimensions, got N = {n}, d = {d}", i32::MAX),
        ));
    }
    if n.checked_mul(d).is_none_or(|v| v > MAX_VALUES) {
        return Err(Error::invalid(OP, format!("N·d = {n}·{d} values; at most {MAX_VALUES} (2^36) are supported")));
    }
    if !(2..=65535).contains(&cfg.vocab) {
        return Err(Error::invalid(OP, format!("vocab must be in 2..=65535, got {}", cfg.vocab)));
    }
    let l = match cfg.length {
        Some(0) => return Err(Error::invalid(OP, "length must be at least 1")),
        Some(l) if l > MAX_LENGTH => {
            return Err(Error::invalid(OP, format!("length must be at most {MAX_LENGTH}, got {l}")))
        }
        Some(l) => {
            if cfg.vocab.checked_pow(l as u32).is_some_and(|c| c < n) {
                return Err(Error::invalid(
                    OP,
                    format!("vocab^length = {}^{l} < N = {n}: codes cannot be unique", cfg.vocab),
                ));
            }
            l
        }
        // vocab ≥ 2 here, so a length exists.
        None => min_length(cfg.vocab, n).unwrap_or(MAX_LENGTH),
    };
    if n.checked_mul(l).and_then(|x| x.checked_mul(2)).is_none() {
        return Err(Error::invalid(OP, format!("N·l = {n}·{l} tokens do not fit in memory")));
    }
    if cfg.steps.is_some_and(|s| s > MAX_STEPS) {
        return Err(Error::invalid(OP, format!("steps must be at most {MAX_STEPS}, got {}", cfg.steps.unwrap_or(0))));
    }
    if !(2..=MAX_SUBSET).contains(&cfg.subset) {
        return Err(Error::invalid(OP, format!("subset must be in 2..={MAX_SUBSET}, got {}", cfg.subset)));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0 && cfg.learning_rate.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!(
                "temperature must be finite and positive, learning rate finite; got {} and {}",
                cfg.temperature, cfg.learning_rate
            ),
        ));
    }
    let mut report = Report::default();

    let t0 = std::time::Instant::now();
    let mut vectors = match input {
        Input::Vectors { mut data, dim } => {
            normalize_rows(&mut data, dim)?;
            data
        }
        Input::Random { count, dim } => random_unit_vectors(count, dim, cfg.seed)?,
    };
    report.input_seconds = t0.elapsed().as_secs_f64();

    let t0 = std::time::Instant::now();
    let hb = bar(cfg, "homogenize");
    report.losses = homogenize::run(&mut vectors, n, d, cfg, device, &hb)?;
    hb.finish_and_clear();
    report.homogenize_seconds = t0.elapsed().as_secs_f64();

    let t0 = std::time::Instant::now();
    let kb = bar(cfg, "k-means");
    let gpu = if device.runs_kernels() { Some(kmeans::DeviceData::new(device, &vectors, n, d)?) } else { None };
    let codes = kmeans::assign_codes(&vectors, n, d, l, cfg, gpu.as_ref(), &kb)?;
    drop(gpu);
    kb.finish_and_clear();
    report.kmeans_seconds = t0.elapsed().as_secs_f64();

    let book = Codebook::from_parts(cfg.vocab, l, d, cfg.seed, codes, vectors)?;
    Ok((book, report))
}
