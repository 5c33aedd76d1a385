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
pub mod homogenize;
mod kmeans;
pub mod ops;

pub use codebook::{Codebook, LevelStats, Trie};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};

/// Tokenizer settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Vocabulary v: tokens are in `[0, v)`; 2..=65535. Default 16.
    pub vocab: usize,
    /// Code length l; default (None) the smallest with `v^l >= N`. A larger
    /// l is allowed.
    pub length: Option<usize>,
    /// Uniformity temperature t (2 in the paper).
    pub temperature: f32,
    /// SGD learning rate of the homogenization (0.1 in the paper).
    pub learning_rate: f32,
    /// Identities per homogenization step (2048 in the paper).
    pub subset: usize,
    /// Homogenization steps; default (None) one epoch, `ceil(N / subset)`,
    /// so every identity is updated once. 0 skips homogenization.
    pub steps: Option<usize>,
    /// Lloyd iterations per k-means node (stops early when nothing moves).
    pub kmeans_iters: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Show progress bars (indicatif) on stderr.
    pub progress: bool,
    /// On a GPU (or the simulator), k-means nodes with at least this many
    /// identities compute their assignment there (GEMM + argmax).
    pub gpu_min_rows: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vocab: 16,
            length: None,
            temperature: 2.0,
            learning_rate: 0.1,
            subset: 2048,
            steps: None,
            kmeans_iters: 10,
            seed: 0,
            progress: false,
            gpu_min_rows: 16384,
        }
    }
}

/// The per-identity vectors to tokenize.
#[derive(Clone, Debug)]
pub enum Input {
    /// `N x dim` values, row-major, any scale (rows are normalized); rows
    /// must be finite and not all zero.
    Vectors {
        /// The values.
        data: Vec<f32>,
        /// d.
        dim: usize,
    },
    /// `count` random unit vectors of `dim` dimensions, drawn from the seed.
    Random {
        /// N.
        count: usize,
        /// d.
        dim: usize,
    },
}

/// What a tokenizer run measured, besides the codebook.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The uniformity loss of each homogenization step's subset, before the
    /// step.
    pub losses: Vec<f64>,
    /// Seconds spent drawing or normalizing the input.
    pub input_seconds: f64,
    /// Seconds spent homogenizing.
    pub homogenize_seconds: f64,
    /// Seconds spent in the hierarchical k-means.
    pub kmeans_seconds: f64,
}

/// The smallest l with `v^l >= n`.
pub fn min_length(v: usize, n: usize) -> usize {
    let mut l = 0;
    let mut cap = 1usize;
    while cap < n {
        cap = cap.saturating_mul(v);
        l += 1;
    }
    l.max(1)
}

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

/// Unit rows of `data` (`dim` columns): errors on empty input, non-finite
/// values or all-zero rows.
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
/// stream, so the result does not depend on the number of threads.
fn random_unit_vectors(count: usize, dim: usize, seed: u64) -> Vec<f32> {
    const ROWS: usize = 1024;
    let mut data = vec![0f32; count * dim];
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
    data
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
    if n > i32::MAX as usize {
        return Err(Error::invalid(OP, format!("at most {} identities, got {n}", i32::MAX)));
    }
    if !(2..=65535).contains(&cfg.vocab) {
        return Err(Error::invalid(OP, format!("vocab must be in 2..=65535, got {}", cfg.vocab)));
    }
    let l = match cfg.length {
        Some(0) => return Err(Error::invalid(OP, "length must be at least 1")),
        Some(l) => {
            let cap = (0..l).try_fold(1usize, |a, _| a.checked_mul(cfg.vocab));
            if cap.is_some_and(|c| c < n) {
                return Err(Error::invalid(
                    OP,
                    format!("vocab^length = {}^{l} < N = {n}: codes cannot be unique", cfg.vocab),
                ));
            }
            l
        }
        None => min_length(cfg.vocab, n),
    };
    if cfg.subset < 2 || !(cfg.temperature.is_finite() && cfg.temperature > 0.0) || !cfg.learning_rate.is_finite() {
        return Err(Error::invalid(OP, "subset must be at least 2, temperature positive, learning rate finite"));
    }
    let mut report = Report::default();

    let t0 = std::time::Instant::now();
    let mut vectors = match input {
        Input::Vectors { mut data, dim } => {
            normalize_rows(&mut data, dim)?;
            data
        }
        Input::Random { count, dim } => random_unit_vectors(count, dim, cfg.seed),
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

/// An opened `.npy` file: the reader, its shape and its plain dtype
/// ("<f4", "|u1", ...).
pub type NpyParts<'a> = (npyz::NpyFile<&'a [u8]>, Vec<usize>, String);

/// Opens the C-order `.npy` file in `bytes` (read from `path`, named in
/// errors).
pub fn open_npy<'a>(path: &std::path::Path, bytes: &'a [u8]) -> Result<NpyParts<'a>> {
    let bad = |m: String| Error::file(path, m);
    let npy = npyz::NpyFile::new(bytes).map_err(|e| bad(format!("not a .npy file: {e}")))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() != npyz::Order::C {
        return Err(bad("expected C (row-major) order, got Fortran order".into()));
    }
    let dtype = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => return Err(bad(format!("expected a plain numeric dtype, got {other:?}"))),
    };
    Ok((npy, shape, dtype))
}

/// Reads a `.npy` array of f32 or f64 (C order) as `(values, shape)`, f64
/// narrowed to f32. Any other dtype or layout, or an unreadable file, is an
/// [`Error::File`].
pub fn read_npy(path: &std::path::Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad = |m: String| Error::file(path, m);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (npy, shape, dtype) = open_npy(path, &bytes)?;
    let data: Vec<f32> = match dtype.as_str() {
        "<f4" => npy.into_vec::<f32>().map_err(|e| bad(format!("cannot read the values: {e}")))?,
        "<f8" => npy
            .into_vec::<f64>()
            .map_err(|e| bad(format!("cannot read the values: {e}")))?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        other => return Err(bad(format!("expected little-endian f32 (<f4) or f64 (<f8), got {other}"))),
    };
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad(format!(
            "holds {} values, its shape {shape:?} says {}",
            data.len(),
            shape.iter().product::<usize>()
        )));
    }
    Ok((data, shape))
}

/// Reads a 2-D `.npy` array of f32 or f64 (C order) as `(values, rows,
/// cols)`; see [`read_npy`].
pub fn read_npy_matrix(path: &std::path::Path) -> Result<(Vec<f32>, usize, usize)> {
    let (data, shape) = read_npy(path)?;
    match shape[..] {
        [r, c] => Ok((data, r, c)),
        _ => Err(Error::file(path, format!("expected a 2-D array [N, d], got shape {shape:?}"))),
    }
}
