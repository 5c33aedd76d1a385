//! The folded network's GEMM with its weights packed once: `C = A·B` for
//! row-major activations A (`[rows][k]`) and a constant B (`[k][n]`)
//! packed at fold time into panels of 32 columns (`[n/32][k][32]`, the last
//! zero-padded), read by an AVX-512 kernel that keeps a 12-row x 32-column
//! block of C in registers (4- and 1-row blocks for the rest; masked stores
//! for a last panel narrower than 32), 256 deep at a time so that the
//! panel's block stays in L1 while the rows go by.
//!
//! The gemm crate packs its right-hand operand again at every call: with
//! one image the folded network's GEMMs have few rows (49 tiles on r50's
//! 14 x 14 and 28 x 28 maps) and that packing cost as much as the
//! multiplications. Here the weights are packed once.
//!
//! Used only where the CPU has AVX-512F ([`available`]); elsewhere the
//! folded network keeps plain layouts and the gemm crate.

use rayon::prelude::*;

/// Columns per panel (two 16-lane vectors).
const PANEL: usize = 32;
/// Rows of C per task when the work is split over threads.
const ROWS_PER_TASK: usize = 96;
/// Depth of one pass over a panel: its KC x 32 block of B (32 KiB) stays
/// in L1 while the task's rows go by; C is accumulated over the passes.
const KC: usize = 256;

/// Whether this CPU runs the packed kernel (AVX-512F, detected at run time).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[k][n]` matrix in panels of 32 columns.
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl PackedB {
    /// Packs the `k x n` matrix whose element (row kk, column j) is
    /// `at(kk, j)`.
    pub(crate) fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let mut panels = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        if k > 0 {
            panels.par_chunks_mut(k * PANEL).enumerate().for_each(|(p, panel)| {
                let width = PANEL.min(n - p * PANEL);
                for (kk, row) in panel.chunks_mut(PANEL).enumerate() {
                    for (j, v) in row.iter_mut().take(width).enumerate() {
                        *v = at(kk, p * PANEL + j);
                    }
                }
            });
        }
        PackedB { k, n, panels }
    }

    /// `c[r][..n] = Σ_kk a[r][kk]·B[kk][..n]` for `rows` rows (a: `rows x k`,
    /// c: `rows x n`, both row-major and contiguous), on all cores when
    /// `parallel`. Panics (a bug in the caller) on slices too short or on a
    /// CPU without AVX-512F.
    pub(crate) fn gemm(&self, a: &[f32], rows: usize, c: &mut [f32], parallel: bool) {
        let (k, n) = (self.k, self.n);
        assert!(
            available()
                && rows.checked_mul(k).is_some_and(|x| x <= a.len())
                && rows.checked_mul(n).is_some_and(|x| x <= c.len()),
            "gif-fr bug: packed GEMM of {rows} x {k} x {n} on slices of {} and {} (or no AVX-512F)",
            a.len(),
            c.len()
        );
        let panels = n.div_ceil(PANEL);
        let tasks = rows.div_ceil(ROWS_PER_TASK) * panels;
        let cp = SyncPtr(c.as_mut_ptr());
        let run = |t: usize| {
            let (chunk, p) = (t / panels, t % panels);
            let r0 = chunk * ROWS_PER_TASK;
            let nr = ROWS_PER_TASK.min(rows - r0);
            let width = PANEL.min(n - p * PANEL);
            // SAFETY: rows r0..r0+nr of a (k each) and of c (n each) are in
            // the slices (checked above); panel p holds k·32 floats; each
            // task writes only its own rows x columns [32p, 32p + width) of
            // c, disjoint from every other task's; AVX-512F is present.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                block(
                    a.as_ptr().add(r0 * k),
                    k,
                    self.panels.as_ptr().add(p * k * PANEL),
                    cp.get().add(r0 * n + p * PANEL),
                    n,
                    nr,
                    width,
                )
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (r0, nr, width, &cp);
        };
        if parallel {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.panels.len() * 4
    }
}

/// A raw pointer shared by the tasks that write disjoint parts of one
/// buffer (here and in the folded network's transforms).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only where each task writes a disjoint range (stated at each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows `0..rows` of one panel, KC deep at a time (the first pass writes
/// C, the others add to it): blocks of 12 rows, then 4, then 1.
///
/// SAFETY: AVX-512F; `a` has `rows` rows of `k` (row stride k), `bp` k·32
/// floats, `c` `rows` rows of stride `ldc` with `width` ≤ 32 writable
/// columns each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block(a: *const f32, k: usize, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, width: usize) {
    let mask = |w: usize| ((1u32 << w) - 1) as u16;
    let m = (mask(width.min(16)), mask(width.saturating_sub(16)));
    let mut k0 = 0;
    loop {
        let kc = KC.min(k - k0);
        let (a, bp, add) = (a.add(k0), bp.add(k0 * PANEL), k0 > 0);
        let mut r = 0;
        while r + 12 <= rows {
            rows_x32::<12>(a.add(r * k), k, kc, bp, c.add(r * ldc), ldc, m, add);
            r += 12;
        }
        while r + 4 <= rows {
            rows_x32::<4>(a.add(r * k), k, kc, bp, c.add(r * ldc), ldc, m, add);
            r += 4;
        }
        while r < rows {
            rows_x32::<1>(a.add(r * k), k, kc, bp, c.add(r * ldc), ldc, m, add);
            r += 1;
        }
        k0 += kc;
        if k0 >= k {
            break;
        }
    }
}

/// R rows x 32 columns of C over `kc` of the depth (`a`'s rows `lda`
/// apart), in 2R registers; written to C, or added to it when `add`.
///
/// SAFETY: as [`block`], for R rows; columns past the masks `m` are not
/// touched (masked-off lanes of a load or store access no memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_x32<const R: usize>(
    a: *const f32,
    lda: usize,
    kc: usize,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    m: (u16, u16),
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    if add {
        for r in 0..R {
            lo[r] = _mm512_maskz_loadu_ps(m.0, c.wrapping_add(r * ldc));
            hi[r] = _mm512_maskz_loadu_ps(m.1, c.wrapping_add(r * ldc + 16));
        }
    }
    for kk in 0..kc {
        let b0 = _mm512_loadu_ps(bp.add(kk * PANEL));
        let b1 = _mm512_loadu_ps(bp.add(kk * PANEL + 16));
        for r in 0..R {
            let v = _mm512_set1_ps(*a.add(r * lda + kk));
            lo[r] = _mm512_fmadd_ps(v, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(v, b1, hi[r]);
        }
    }
    for r in 0..R {
        _mm512_mask_storeu_ps(c.wrapping_add(r * ldc), m.0, lo[r]);
        _mm512_mask_storeu_ps(c.wrapping_add(r * ldc + 16), m.1, hi[r]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Values in [-1, 1) from a xorshift generator seeded by `seed` (the
    /// unit tests' inputs, without a dependency).
    pub(crate) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// The packed kernel against an f64 product on sizes that are not
    /// multiples of its blocks: rows in 12s, 4s and 1s, full panels and a
    /// narrow last one, k of 0 and 1 and over several 256-deep passes
    /// (300, 777); serial and split over threads; C
    /// poisoned first, and its bytes past the rows untouched. (Skipped on
    /// a CPU without AVX-512F, where the folded network does not use it.)
    #[test]
    fn packed_gemm_equals_an_f64_product() {
        if !available() {
            eprintln!("no AVX-512F: the packed kernel is not used on this CPU; skipped");
            return;
        }
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        for (rows, k, n) in
            [(1, 1, 1), (29, 37, 70), (12, 0, 33), (100, 64, 32), (17, 5, 96), (197, 300, 64), (30, 777, 40)]
        {
            let a: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let packed = PackedB::pack(k, n, |i, j| b[i * n + j]);
            for parallel in [false, true] {
                let mut c = vec![f32::NAN; rows * n + 40];
                packed.gemm(&a, rows, &mut c, parallel);
                for r in 0..rows {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|i| a[r * k + i] as f64 * b[i * n + j] as f64).sum();
                        let got = c[r * n + j];
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + k as f64),
                            "{rows}x{k}x{n} parallel={parallel}: c[{r}][{j}] = {got}, want {want}"
                        );
                    }
                }
                assert!(c[rows * n..].iter().all(|v| v.is_nan()), "{rows}x{k}x{n}: wrote past the rows");
            }
        }
    }
}
