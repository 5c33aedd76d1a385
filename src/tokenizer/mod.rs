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
pub use kmeans::{PARTIAL_BUDGET, SCORE_BUDGET};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::device::Device;
use crate::error::{Error, Result};

/// Longest code the tokenizer makes ([`Config::length`]). The smallest
/// length that fits 2^31 identities over 2 tokens is 31; a longer code only
/// repeats token 0 once every identity has its own prefix.
pub const MAX_LENGTH: usize = 1024;
/// Largest homogenization subset ([`Config::subset`]): its Gram matrix is
/// `subset²` floats (4 GiB at the limit).
pub const MAX_SUBSET: usize = 32768;
/// Most values `N·d` of the identity vectors: 2^36 (256 GiB of f32; 2M
/// identities of 512 dimensions are 2^30).
pub const MAX_VALUES: usize = 1 << 36;
/// Most homogenization steps ([`Config::steps`]): 2^28, about 130,000
/// epochs of 2M identities in subsets of 2048 (the paper ran 1000); the
/// loss log holds one f64 per step.
pub const MAX_STEPS: usize = 1 << 28;

/// Tokenizer settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Vocabulary v: tokens are in `[0, v)`; 2..=65535. Default 16.
    pub vocab: usize,
    /// Code length l; default (None) the smallest with `v^l >= N`. A larger
    /// l is allowed, up to [`MAX_LENGTH`].
    pub length: Option<usize>,
    /// Uniformity temperature t (2 in the paper).
    pub temperature: f32,
    /// SGD learning rate of the homogenization (0.1 in the paper).
    pub learning_rate: f32,
    /// Identities per homogenization step (2048 in the paper); 2..=
    /// [`MAX_SUBSET`].
    pub subset: usize,
    /// Homogenization steps; default (None) one epoch, `ceil(N / subset)`,
    /// so every identity is updated once. 0 skips homogenization; at most
    /// [`MAX_STEPS`].
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

/// The smallest l ≥ 1 with `v^l >= n`; `None` when there is none (v < 2
/// and n > 1).
pub fn min_length(v: usize, n: usize) -> Option<usize> {
    if n <= 1 {
        return Some(1);
    }
    if v < 2 {
        return None;
    }
    let (mut l, mut cap) = (0usize, 1usize);
    while cap < n {
        cap = cap.saturating_mul(v); // at most 64 rounds: v ≥ 2
        l += 1;
    }
    Some(l)
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
    let mut data = crate::host_memory::try_filled("tokenize", "the identity vectors", n, 0f32)?;
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
    if !n.checked_mul(d).is_some_and(|v| v <= MAX_VALUES) {
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

/// An opened `.npy` file: the reader, its shape and its plain dtype
/// ("<f4", "|u1", ...).
pub type NpyParts<'a> = (npyz::NpyFile<&'a [u8]>, Vec<usize>, String);

/// Opens the C-order `.npy` file in `bytes` (read from `path`, named in
/// errors). The header must describe exactly the data that follows it: the
/// element count is the product of the shape (checked, never wrapped) and
/// the data holds exactly that many elements of the dtype's size, so a
/// reader allocates at most the file's size.
pub fn open_npy<'a>(path: &std::path::Path, bytes: &'a [u8]) -> Result<NpyParts<'a>> {
    let bad = |m: String| Error::file(path, m);
    // npyz allocates the header length it reads, and multiplies the shape
    // unchecked (a panic or a wrapped count): both are checked here first.
    let header = npy_header(bytes).map_err(bad)?;
    if let Some(shape) = npy_header_shape(header) {
        // Every partial product npyz forms (strides, in either order) is at
        // most the product of the nonzero dimensions.
        if shape.iter().filter(|&&d| d != 0).try_fold(1u64, |a, &d| a.checked_mul(d)).is_none() {
            return Err(bad(format!("shape {shape:?} has more elements than fit in memory")));
        }
    }
    let mut data: &'a [u8] = bytes;
    let header = npyz::NpyHeader::from_reader(&mut data).map_err(|e| bad(format!("not a .npy file: {e}")))?;
    if header.order() != npyz::Order::C {
        return Err(bad("expected C (row-major) order, got Fortran order".into()));
    }
    let type_str = match header.dtype() {
        npyz::DType::Plain(t) => t,
        other => return Err(bad(format!("expected a plain numeric dtype, got {other:?}"))),
    };
    let item =
        type_str.num_bytes().filter(|&b| b > 0).ok_or_else(|| bad(format!("dtype {type_str} has no fixed size")))?;
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad(format!("shape {:?} does not fit this machine's sizes", header.shape())))?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match count.and_then(|c| c.checked_mul(item)) {
        Some(need) if need == data.len() => {}
        Some(need) => {
            return Err(bad(format!(
                "its header says shape {shape:?} of {type_str} ({need} bytes of data), the file holds {} bytes after the header",
                data.len()
            )))
        }
        None => return Err(bad(format!("shape {shape:?} of {type_str} has more bytes than fit in memory"))),
    }
    Ok((npyz::NpyFile::with_header(header, data), shape, type_str.to_string()))
}

/// The header text of a `.npy` file: the magic string, a version of 1, 2 or
/// 3 and a header length that fits in the file (npyz allocates the length
/// it reads before reading, so a corrupt length would be an allocation of
/// up to 4 GiB).
fn npy_header(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file: no NUMPY magic string, or shorter than a header".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        2 | 3 => return Err("not a .npy file: truncated header".into()),
        v => return Err(format!("not a .npy file: format version {v}.{} (1, 2 or 3 are)", bytes[7])),
    };
    match start.checked_add(len) {
        Some(end) if end <= bytes.len() => Ok(&bytes[start..end]),
        _ => Err(format!(
            "not a .npy file: a header of {len} bytes, the file holds {} after the prefix",
            bytes.len() - start
        )),
    }
}

/// The shape of a `.npy` header as npyz will read it (the same Python
/// literal parser, py_literal; the last "shape" key), if it is a tuple or
/// list of integers that fit in u64; otherwise npyz reports the problem.
fn npy_header_shape(header: &[u8]) -> Option<Vec<u64>> {
    let text = std::str::from_utf8(header.strip_suffix(b"\n").unwrap_or(header)).ok()?;
    let value: py_literal::Value = text.parse().ok()?;
    let (_, shape) = value.as_dict()?.iter().rev().find(|(k, _)| k.as_string().is_some_and(|k| k == "shape"))?;
    let dims = shape.as_tuple().or(shape.as_list())?;
    dims.iter().map(|d| d.as_integer().and_then(|i| i.to_string().parse::<u64>().ok())).collect()
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
    Ok((data, shape))
}

/// Reads a 2-D `.npy` array of f32 or f64 (C order) with at least one
/// column as `(values, rows, cols)`; see [`read_npy`].
pub fn read_npy_matrix(path: &std::path::Path) -> Result<(Vec<f32>, usize, usize)> {
    let (data, shape) = read_npy(path)?;
    match shape[..] {
        [_, 0] => Err(Error::file(path, format!("expected at least one column, got shape {shape:?}"))),
        [r, c] => Ok((data, r, c)),
        _ => Err(Error::file(path, format!("expected a 2-D array [N, d], got shape {shape:?}"))),
    }
}
