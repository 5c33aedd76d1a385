//! The tokenizer's settings, input and report, and its documented limits.

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
