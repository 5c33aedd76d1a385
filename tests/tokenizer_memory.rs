//! The tokenizer's peak host memory with a large vocabulary stays within
//! its stated budgets (kmeans.rs: 64 MiB of scores, 64 MiB of partial
//! sums), measured by a counting allocator. One test per binary, so that no
//! other test's allocations interfere.

use gif_fr::runtime::host_memory::{self, CountingAllocator};
use gif_fr::tokenizer::{tokenize, Config, Input, PARTIAL_BUDGET, SCORE_BUDGET};
use gif_fr::Device;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const MB: usize = 1 << 20;

/// The `gemm` crate's temporary memory for one chunk of the assignment
/// (`rows x k` scores of d-dimensional points), which depends on the cache
/// sizes it detects: measured here, after a warm-up on every thread.
fn gemm_workspace(rows: usize, k: usize, d: usize) -> usize {
    use gif_fr::ops::gemm::{cpu::gemm, Op};
    let run = |measure: bool| {
        let (x, c, mut s) = (vec![0.5f32; rows * d], vec![0.25f32; k * d], vec![0f32; rows * k]);
        // The peak is process-wide: only the serial run resets and reads it.
        let before = measure.then(host_memory::reset_peak);
        gemm(rows, k, d, 1.0, &x, d, Op::N, &c, d, Op::T, 0.0, &mut s, k).unwrap();
        before.map_or(0, |before| host_memory::stats().peak - before)
    };
    rayon::broadcast(|_| run(false));
    run(true)
}

#[test]
fn a_large_vocabulary_stays_within_the_assignment_budgets() {
    // v = 65535 at N = 20000, length 2: the root splits into k = 20000
    // clusters. The old CPU path held 8192 x k scores (625 MB here; 2.1 GB
    // at N = 100,000) plus k x d partial sums per 8192 points.
    let (n, d, k) = (20_000usize, 16usize, 20_000usize);
    let workspace = gemm_workspace(SCORE_BUDGET / k, k, d);
    let cfg = Config { vocab: 65535, length: Some(2), steps: Some(0), kmeans_iters: 2, seed: 5, ..Config::default() };
    let before = host_memory::reset_peak();
    let book = tokenize(Input::Random { count: n, dim: d }, &cfg, &Device::cpu()).unwrap();
    let peak = host_memory::stats().peak - before;
    assert_eq!(book.len(), n);
    // The budgets, the centroids (k x d f32), the vectors and codes (and a
    // few copies of them: members, orders, the trie), and the GEMM's own.
    let own = 16 * n * (d * 4 + 8) + 2 * k * d * 4;
    let bound = SCORE_BUDGET * 4 + PARTIAL_BUDGET + own + workspace;
    println!(
        "peak {:.1} MB, bound {:.1} MB (scores {} MB, partials {} MB, own {:.1} MB, GEMM workspace {:.1} MB)",
        peak as f64 / MB as f64,
        bound as f64 / MB as f64,
        SCORE_BUDGET * 4 / MB,
        PARTIAL_BUDGET / MB,
        own as f64 / MB as f64,
        workspace as f64 / MB as f64
    );
    assert!(peak <= bound, "peak {peak} bytes > {bound}");
    assert!(peak < 8192 * k * 4, "as much as the old score buffer alone: {peak}");
}
