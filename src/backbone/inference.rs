//! Inference-mode IResNet on the CPU: the eval network with every
//! BatchNorm folded away and the element-wise layers fused into the
//! convolutions, on f32 NHWC activations.
//!
//! Folding (exact algebra; only the rounding differs from the layer by
//! layer network):
//! - a BatchNorm *after* a convolution (each block's bn2 and bn3, the
//!   stem's bn1, the downsample's) scales that convolution's output
//!   channels and becomes its bias;
//! - a block's first BatchNorm comes *before* a zero-padded convolution,
//!   where folding into the weights would be wrong at the borders (the
//!   padding is zero after the BatchNorm, not before): it is applied while
//!   the convolution reads its input (the im2col copy or the Winograd
//!   input transform), padding staying zero;
//! - the last BatchNorm2d, the Linear layer and BatchNorm1d are one affine
//!   map: one GEMM with folded weights and bias.
//!
//! Fused epilogue: each convolution's output gets its bias, the residual
//! (the block's input, or the downsample's output) and PReLU while it is
//! still in cache; no separate pass over the activations.
//!
//! Convolutions: the 3x3 stride-1 ones (all but five of an IResNet's, and
//! nearly all of its arithmetic) by Winograd F(4x4, 3x3) (36 GEMMs of the
//! transformed tiles, 4x fewer multiplications than direct convolution)
//! or F(2x2, 3x3) (16 GEMMs, 2.25x fewer; [`Winograd`]); the stem and the
//! strided convolutions by im2col into a bounded buffer. Rows of all the
//! batch's images go through the GEMMs together (bounded chunks), so a
//! small feature map still makes a tall GEMM. The GEMMs read weights
//! packed once at fold time, by the crate's AVX-512 kernel
//! (`backbone::packed`), or the `gemm` crate ([`Kernels`]).
//!
//! [`IResNet::infer`](super::IResNet::infer) uses this on the CPU (f32
//! convolutions); training and `forward(…, false)` keep the unfused layers.

use rayon::prelude::*;

use super::conv::ConvShape;
use super::norm::BatchNorm;
use super::packed::{self, PackedB, SyncPtr};
use crate::error::{Error, Result};
use crate::ops::gemm::{cpu::gemm_on, Op};
use crate::runtime::tensor::Tensor;

/// Floats of transformed tiles (or im2col rows) one chunk of a convolution
/// may hold: 4 Mi floats, 16 MiB.
const CHUNK_FLOATS: usize = 1 << 22;

/// The Winograd variant for the 3x3 stride-1 convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winograd {
    /// F(2x2, 3x3): 4x4 tiles, 16 GEMMs, 2.25x fewer multiplications.
    F2,
    /// F(4x4, 3x3): 6x6 tiles, 36 GEMMs, 4x fewer multiplications (the
    /// default; its transforms' larger coefficients cost about one decimal
    /// digit of f32 precision, see docs/backbone.md).
    F4,
    /// No Winograd: im2col + GEMM for every convolution.
    Off,
    /// Per feature map size (the default): F4 on maps of 28 and more, F2 on
    /// maps of 14 to 27, im2col below. The transformed weights take a·a/9
    /// times the weights' memory and every GEMM reads them whole: on small
    /// maps (few tiles per image) that read, not the arithmetic, is the
    /// cost, and the deep layers' maps are small while their weights are
    /// the network's largest.
    Auto,
}

/// A Winograd variant's transforms: `m` outputs per tile side from
/// `a = m + 2` inputs; `bt` (a x a), `g` (a x 3), `at` (m x a), row-major.
struct Transforms {
    m: usize,
    a: usize,
    /// (The tile transforms are written out term by term in [`side`]; a
    /// test checks them against these matrices.)
    #[cfg_attr(not(test), allow(dead_code))]
    bt: &'static [f32],
    g: &'static [f64],
    #[cfg_attr(not(test), allow(dead_code))]
    at: &'static [f32],
}

#[rustfmt::skip]
const F2: Transforms = Transforms {
    m: 2,
    a: 4,
    bt: &[1., 0., -1., 0., 0., 1., 1., 0., 0., -1., 1., 0., 0., 1., 0., -1.],
    g: &[1., 0., 0., 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0., 0., 1.],
    at: &[1., 1., 1., 0., 0., 1., -1., -1.],
};

// Lavin & Gray's F(4, 3) with the points 0, ±1, ±2 and ∞.
#[rustfmt::skip]
const F4: Transforms = Transforms {
    m: 4,
    a: 6,
    bt: &[
        4., 0., -5., 0., 1., 0.,
        0., -4., -4., 1., 1., 0.,
        0., 4., -4., -1., 1., 0.,
        0., -2., -1., 2., 1., 0.,
        0., 2., -1., -2., 1., 0.,
        0., 4., 0., -5., 0., 1.,
    ],
    g: &[
        1. / 4., 0., 0.,
        -1. / 6., -1. / 6., -1. / 6.,
        -1. / 6., 1. / 6., -1. / 6.,
        1. / 24., 1. / 12., 1. / 6.,
        1. / 24., -1. / 12., 1. / 6.,
        0., 0., 1.,
    ],
    at: &[
        1., 1., 1., 1., 1., 0.,
        0., 1., -1., 2., -2., 0.,
        0., 1., 1., 4., 4., 0.,
        0., 1., -1., 8., -8., 1.,
    ],
};

/// A per-channel affine map `x·scale + shift` (an eval BatchNorm).
#[derive(Clone, Debug)]
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Affine {
    /// The eval BatchNorm as `scale`, `shift` (f64 arithmetic, rounded once).
    fn of(bn: &BatchNorm) -> Result<Affine> {
        let (g, b) = (bn.weight.host_f32()?, bn.bias.host_f32()?);
        let (mean, var) = (bn.running_mean.host_f32()?, bn.running_var.host_f32()?);
        let mut scale = Vec::with_capacity(bn.channels);
        let mut shift = Vec::with_capacity(bn.channels);
        for c in 0..bn.channels {
            let s = g[c] as f64 / (var[c] as f64 + bn.eps as f64).sqrt();
            scale.push(s as f32);
            shift.push((b[c] as f64 - mean[c] as f64 * s) as f32);
        }
        Ok(Affine { scale, shift })
    }
}

/// What a convolution does besides multiplying.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    /// Added to every output row (the folded BatchNorm's shift).
    bias: &'a [f32],
    /// Added row by row: the block's identity or downsample output.
    residual: Option<&'a [f32]>,
    /// PReLU slopes per channel, applied last.
    prelu: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    /// Finishes output row `row` (`c_out` values, holding the products):
    /// one pass, with AVX-512 where the CPU has it.
    #[inline]
    fn apply(&self, row: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(e: &Epilogue<'_>, row: usize, y: &mut [f32]) {
            e.finish(row, y)
        }
        #[cfg(target_arch = "x86_64")]
        if packed::available() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(self, row, y) };
        }
        self.finish(row, y)
    }

    #[inline(always)]
    fn finish(&self, row: usize, y: &mut [f32]) {
        let n = y.len();
        let res = self.residual.map(|r| &r[row * n..(row + 1) * n]);
        // The sums in the unfused order: products + bias, + residual.
        let prelu = |v: f32, a: f32| if v < 0.0 { v * a } else { v };
        match (res, self.prelu) {
            (None, None) => y.iter_mut().zip(self.bias).for_each(|(v, b)| *v += b),
            (Some(r), None) => y.iter_mut().zip(self.bias).zip(r).for_each(|((v, b), r)| *v = *v + b + r),
            (None, Some(al)) => y.iter_mut().zip(self.bias).zip(al).for_each(|((v, b), a)| *v = prelu(*v + b, *a)),
            (Some(r), Some(al)) => {
                y.iter_mut().zip(self.bias).zip(r).zip(al).for_each(|(((v, b), r), a)| *v = prelu(*v + b + r, *a))
            }
        }
    }
}

/// Which GEMM the folded network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The default: the weights packed once, at fold time, for the crate's
    /// AVX-512 kernel when the CPU has AVX-512F; else the gemm crate.
    Auto,
    /// The gemm crate everywhere (weights in plain layouts, packed by the
    /// gemm crate at every call).
    GemmCrate,
}

/// A convolution's weights as its GEMMs read them.
enum Weights {
    /// For the gemm crate: im2col's `[C_out, k·k·C_in]` (read transposed),
    /// or Winograd's `[a·a][C_in][C_out]`.
    Plain(Vec<f32>),
    /// Packed once: im2col's `[k·k·C_in][C_out]`, or Winograd's a·a
    /// `[C_in][C_out]`.
    Packed(Vec<PackedB>),
}

impl Weights {
    /// A `[n][k]` matrix (a row of k inputs per output: im2col weights, a
    /// Linear layer), plain or packed as `[k][n]`.
    fn rows_of_inputs(w: Vec<f32>, n: usize, k: usize, packed: bool) -> Weights {
        if packed {
            Weights::Packed(vec![PackedB::pack(k, n, |i, j| w[j * k + i])])
        } else {
            Weights::Plain(w)
        }
    }

    /// `c = a·Wᵀ` (`a`: rows x k, c: rows x n) for a [`Weights::rows_of_inputs`]
    /// matrix, on all cores.
    fn times(&self, a: &[f32], rows: usize, k: usize, n: usize, c: &mut [f32]) {
        match self {
            Weights::Plain(w) => {
                gemm_on(::gemm::Parallelism::Rayon(0), rows, n, k, 1.0, a, k, Op::N, w, k, Op::T, 0.0, c, n)
                    .unwrap_or_else(|e| panic!("gif-fr bug: inconsistent GEMM sizes in the folded network: {e}"))
            }
            Weights::Packed(p) => p[0].gemm(a, rows, c, true),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Weights::Plain(w) => 4 * w.len(),
            Weights::Packed(p) => p.iter().map(PackedB::bytes).sum(),
        }
    }
}

/// A convolution with its BatchNorm folded in.
struct FoldedConv {
    shape: ConvShape,
    bias: Vec<f32>,
    /// The Winograd variant, for 3x3 stride 1 (else im2col).
    wino: Option<&'static Transforms>,
    w: Weights,
}

impl FoldedConv {
    fn new(w: &Tensor, shape: ConvShape, bn: &BatchNorm, wino: Winograd, packed: bool) -> Result<FoldedConv> {
        let post = Affine::of(bn)?;
        let w = w.host_f32()?;
        let kk = shape.kernel * shape.kernel * shape.c_in;
        let mut folded = Vec::with_capacity(w.len());
        for (co, row) in w.chunks(kk).enumerate() {
            folded.extend(row.iter().map(|v| v * post.scale[co]));
        }
        let t = match wino {
            _ if shape.kernel != 3 || shape.stride != 1 || shape.pad != 1 => None,
            Winograd::F2 => Some(&F2),
            Winograd::F4 => Some(&F4),
            Winograd::Off => None,
            Winograd::Auto if shape.height.min(shape.width) >= 28 => Some(&F4),
            Winograd::Auto if shape.height.min(shape.width) >= 14 => Some(&F2),
            Winograd::Auto => None,
        };
        let (ci, co) = (shape.c_in, shape.c_out);
        let w = match (t, packed) {
            (Some(t), false) => Weights::Plain(transform_weights(t, &folded, ci, co)),
            (Some(t), true) => {
                let u = transform_weights(t, &folded, ci, co);
                Weights::Packed(u.chunks(ci * co).map(|s| PackedB::pack(ci, co, |i, j| s[i * co + j])).collect())
            }
            (None, _) => Weights::rows_of_inputs(folded, co, kk, packed),
        };
        Ok(FoldedConv { shape, bias: post.shift, wino: t, w })
    }

    /// Bytes of weights held.
    fn bytes(&self) -> usize {
        4 * self.bias.len() + self.w.bytes()
    }

    /// `y = conv(pre(x))` finished by `epi`, for `batch` images; `tmp`
    /// holds the transformed tiles or im2col rows (grown as needed).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: &[f32],
        batch: usize,
        pre: Option<&Affine>,
        epi: Epilogue<'_>,
        y: &mut [f32],
        tmp: &mut Vec<f32>,
        prods: &mut Vec<f32>,
    ) {
        let shape = ConvShape { batch, ..self.shape };
        match self.wino {
            Some(t) => winograd(t, &self.w, &shape, x, pre, epi, y, tmp, prods),
            None => im2col_gemm(&shape, &self.w, x, pre, epi, y, tmp),
        }
    }
}

/// `U_ξ = (G g Gᵀ)_ξ` for every (c_in, c_out): `[a·a][C_in][C_out]` from
/// OHWI 3x3 weights. `U_ij = Σ_rq G_ir·G_jq·g_rq`: each output channel's
/// row of slab ξ is a sum of its nine taps' `C_in` rows (coefficients in
/// f64, rounded once); the slabs side by side on all cores.
fn transform_weights(t: &Transforms, w: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    let a = t.a;
    let coef: Vec<f32> = (0..a * a * 9)
        .map(|x| {
            let (xi, rq) = (x / 9, x % 9);
            (t.g[(xi / a) * 3 + rq / 3] * t.g[(xi % a) * 3 + rq % 3]) as f32
        })
        .collect();
    // Slab ξ, 16 output channels at a time: their rows of C_in summed from
    // the taps, then written transposed (16 consecutive floats per input
    // channel).
    const BLOCK: usize = 16;
    let mut u = vec![0f32; a * a * c_out * c_in];
    u.par_chunks_mut(c_out * c_in).enumerate().for_each(|(xi, slab)| {
        let mut blk = vec![0f32; BLOCK * c_in];
        for co0 in (0..c_out).step_by(BLOCK) {
            let nb = BLOCK.min(c_out - co0);
            blk.fill(0.0);
            for (j, row) in blk.chunks_mut(c_in).take(nb).enumerate() {
                let taps = &w[(co0 + j) * 9 * c_in..(co0 + j + 1) * 9 * c_in];
                for (rq, tap) in taps.chunks(c_in).enumerate() {
                    let k = coef[xi * 9 + rq];
                    if k != 0.0 {
                        row.iter_mut().zip(tap).for_each(|(d, v)| *d += k * v);
                    }
                }
            }
            for ci in 0..c_in {
                for j in 0..nb {
                    slab[ci * c_out + co0 + j] = blk[j * c_in + ci];
                }
            }
        }
    });
    u
}

/// `v[..n]`, grown (zero-filled) to at least n floats: the workspace's
/// buffers are allocated once per size, not per call.
fn grown(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// A 3x3 stride-1 pad-1 convolution by Winograd: tiles of m x m outputs
/// (the batch's tiles in chunks), each chunk's input transform, a·a GEMMs
/// side by side, and the output transform with the epilogue. `v` and `mm`
/// hold a chunk's transformed tiles and products.
#[allow(clippy::too_many_arguments)]
fn winograd(
    t: &Transforms,
    u: &Weights,
    s: &ConvShape,
    x: &[f32],
    pre: Option<&Affine>,
    epi: Epilogue<'_>,
    y: &mut [f32],
    v: &mut Vec<f32>,
    mm: &mut Vec<f32>,
) {
    let (m, a) = (t.m, t.a);
    let (h, w, ci, co) = (s.height, s.width, s.c_in, s.c_out);
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let per_image = th * tw;
    let tiles = s.batch * per_image;
    let chunk = (CHUNK_FLOATS / (a * a * ci.max(co))).max(1);
    let v = grown(v, a * a * chunk.min(tiles) * ci);
    let mm = grown(mm, a * a * chunk.min(tiles) * co);
    let wide = packed::available();
    // Tile index → its first output pixel (image, row, column).
    let place = |tile: usize| Corner { b: tile / per_image, y: (tile % per_image) / tw * m, x: tile % tw * m };
    let mut t0 = 0;
    while t0 < tiles {
        let n = chunk.min(tiles - t0);
        // Input transform: V_ξ[tile][c] = (Bᵀ d B)_ξ over each tile's a x a patch.
        let vp = SyncPtr(v.as_mut_ptr());
        (0..n).into_par_iter().for_each(|i| {
            let io = TileIo { t, h, w, c: ci, n, i, at: place(t0 + i) };
            // SAFETY: tile i writes only its own rows [ξ][i][..] of v
            // (a·a·n rows of C_in), disjoint across tiles.
            unsafe { transform_tile(wide, true, &io, x, pre, vp) }
        });
        // The a·a GEMMs: M_ξ [n, C_out] = V_ξ [n, C_in] · U_ξ [C_in, C_out].
        mm[..a * a * n * co].par_chunks_mut(n * co).enumerate().for_each(|(xi, out)| {
            let vx = &v[xi * n * ci..(xi + 1) * n * ci];
            match u {
                Weights::Plain(u) => gemm_serial(n, co, ci, vx, &u[xi * ci * co..(xi + 1) * ci * co], out),
                Weights::Packed(p) => p[xi].gemm(vx, n, out, false),
            }
        });
        // Output transform + epilogue: Y = Aᵀ M A, the valid pixels of each tile.
        let yp = SyncPtr(y.as_mut_ptr());
        let mm = &*mm;
        (0..n).into_par_iter().for_each(|i| {
            let io = TileIo { t, h, w, c: co, n, i, at: place(t0 + i) };
            // SAFETY: tile i writes only its own output pixels (each pixel
            // belongs to exactly one tile) of y (`[batch·h·w][C_out]`).
            unsafe { transform_tile(wide, false, &io, mm, None, yp) };
            for r in 0..m.min(h - io.at.y) {
                for q in 0..m.min(w - io.at.x) {
                    let row = (io.at.b * h + io.at.y + r) * w + io.at.x + q;
                    // SAFETY: as above.
                    epi.apply(row, unsafe { std::slice::from_raw_parts_mut(yp.get().add(row * co), co) });
                }
            }
        });
        t0 += n;
    }
}

/// A tile's first output pixel: image, row, column.
#[derive(Clone, Copy)]
struct Corner {
    b: usize,
    y: usize,
    x: usize,
}

/// One tile's place in a Winograd convolution: the transforms, the map's
/// height and width, the channels transformed (C_in for the input
/// transform, C_out for the output's), the chunk's tile count `n` and
/// this tile's index `i` in it, its corner.
struct TileIo<'a> {
    t: &'a Transforms,
    h: usize,
    w: usize,
    c: usize,
    n: usize,
    i: usize,
    at: Corner,
}

/// Channels per step of the tile transforms (one AVX-512 vector).
const LANES: usize = 16;
type Lane = [f32; LANES];

/// One tile's input transform (`input`: from the map `src` through `pre`
/// into the tile's rows of `dst`, `[a·a][n][c]`) or output transform
/// (from the products `src`, `[a·a][n][c]`, into the map's pixels `dst`),
/// 16 channels at a time in registers; with AVX-512 when `wide`.
///
/// SAFETY: `dst` covers what the transform writes (the caller's claim of
/// disjointness per tile); `wide` only where the CPU has AVX-512F.
unsafe fn transform_tile(wide: bool, input: bool, io: &TileIo<'_>, src: &[f32], pre: Option<&Affine>, dst: SyncPtr) {
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const A: usize>(input: bool, io: &TileIo<'_>, src: &[f32], pre: Option<&Affine>, dst: SyncPtr) {
        tile::<A>(input, io, src, pre, dst)
    }
    match (io.t.a, wide) {
        (4, true) => avx512::<4>(input, io, src, pre, dst),
        (4, false) => tile::<4>(input, io, src, pre, dst),
        (_, true) => avx512::<6>(input, io, src, pre, dst),
        (_, false) => tile::<6>(input, io, src, pre, dst),
    }
}

/// [`transform_tile`] for a tiles (a = 4 or 6, `io.t.a`).
///
/// SAFETY: as [`transform_tile`].
#[inline(always)]
unsafe fn tile<const A: usize>(input: bool, io: &TileIo<'_>, src: &[f32], pre: Option<&Affine>, dst: SyncPtr) {
    let &TileIo { t, h, w, c, n, i, at } = io;
    for c0 in (0..c).step_by(LANES) {
        let width = LANES.min(c - c0);
        // The tile's a x a vectors of these channels (zeros past the
        // channels and in the padding).
        let mut d = [[[0f32; LANES]; A]; A];
        for (r, row) in d.iter_mut().enumerate() {
            for (q, lane) in row.iter_mut().enumerate() {
                let from = if input {
                    let (iy, ix) = ((at.y + r).wrapping_sub(1), (at.x + q).wrapping_sub(1));
                    (iy < h && ix < w).then(|| ((at.b * h + iy) * w + ix) * c + c0)
                } else {
                    Some(((r * A + q) * n + i) * c + c0)
                };
                let Some(from) = from else { continue };
                load_lane(
                    lane,
                    &src[from..from + width],
                    pre.map(|p| (&p.scale[c0..c0 + width], &p.shift[c0..c0 + width])),
                );
            }
        }
        // T·d·Tᵀ with T = Bᵀ (a x a) or Aᵀ (m x a): T on each column into
        // `e`, then on each row of `e` back into `d` (its first k x k
        // vectors).
        let k = if input { A } else { t.m };
        let mut e = [[[0f32; LANES]; A]; A];
        for j in 0..A {
            let col: [Lane; A] = std::array::from_fn(|r| d[r][j]);
            let mut o = [[0f32; LANES]; A];
            side(A, input, &col, &mut o);
            for (row, v) in e.iter_mut().zip(o).take(k) {
                row[j] = v;
            }
        }
        for (row, ei) in d.iter_mut().zip(&e).take(k) {
            side(A, input, ei, row);
        }
        for (r, row) in d.iter().enumerate().take(k) {
            for (q, lane) in row.iter().enumerate().take(k) {
                let to = if input {
                    ((r * A + q) * n + i) * c + c0
                } else {
                    let (oy, ox) = (at.y + r, at.x + q);
                    if oy >= h || ox >= w {
                        continue;
                    }
                    ((at.b * h + oy) * w + ox) * c + c0
                };
                // SAFETY: the caller's (this tile's own rows or pixels).
                let out = std::slice::from_raw_parts_mut(dst.get().add(to), width);
                match <&mut Lane>::try_from(&mut *out) {
                    Ok(full) => *full = *lane,
                    Err(_) => out.copy_from_slice(&lane[..width]),
                }
            }
        }
    }
}

/// `lane[..v.len()] = v`, through the affine map `pre` (the scales and
/// shifts of those channels) when given; a whole vector at once when it is
/// one.
#[inline(always)]
fn load_lane(lane: &mut Lane, v: &[f32], pre: Option<(&[f32], &[f32])>) {
    match (<&Lane>::try_from(v), pre) {
        (Ok(v), None) => *lane = *v,
        (Err(_), None) => lane[..v.len()].copy_from_slice(v),
        (_, Some((sc, sh))) => {
            for ((o, x), (a, b)) in lane.iter_mut().zip(v).zip(sc.iter().zip(sh)) {
                *o = x * a + b;
            }
        }
    }
}

/// `out = T·v` over a column (or row) of a tile's vectors: T = Bᵀ (the
/// input transform, a outputs) or Aᵀ (the output transform, m = a − 2
/// outputs) of F(2x2, 3x3) (a = 4) or F(4x4, 3x3) (a = 6), term by term
/// (the matrices' zeros cost nothing, their units no multiplication; each
/// sum in the order of the matrix's columns, as the matrix product adds
/// them: [`F2`] and [`F4`] hold the matrices, a test checks one against
/// the other).
#[inline(always)]
fn side(a: usize, input: bool, v: &[Lane], out: &mut [Lane]) {
    // `out[o] = e` lane by lane, `x(k)` being lane l of `v[k]` in `e`.
    macro_rules! lanes {
        ($x:ident => $($o:literal = $e:expr;)+) => {
            for l in 0..LANES {
                let $x = |k: usize| v[k][l];
                $(out[$o][l] = $e;)+
            }
        };
    }
    match (a, input) {
        (4, true) => lanes! {
            x =>
            0 = x(0) - x(2);
            1 = x(1) + x(2);
            2 = -x(1) + x(2);
            3 = x(1) - x(3);
        },
        (4, false) => lanes! {
            x =>
            0 = x(0) + x(1) + x(2);
            1 = x(1) - x(2) - x(3);
        },
        (_, true) => lanes! {
            x =>
            0 = 4.0 * x(0) - 5.0 * x(2) + x(4);
            1 = -4.0 * x(1) - 4.0 * x(2) + x(3) + x(4);
            2 = 4.0 * x(1) - 4.0 * x(2) - x(3) + x(4);
            3 = -2.0 * x(1) - x(2) + 2.0 * x(3) + x(4);
            4 = 2.0 * x(1) - x(2) - 2.0 * x(3) + x(4);
            5 = 4.0 * x(1) - 5.0 * x(3) + x(5);
        },
        (_, false) => lanes! {
            x =>
            0 = x(0) + x(1) + x(2) + x(3) + x(4);
            1 = x(1) - x(2) + 2.0 * x(3) - 2.0 * x(4);
            2 = x(1) + x(2) + 4.0 * x(3) + 4.0 * x(4);
            3 = x(1) - x(2) + 8.0 * x(3) - 8.0 * x(4) + x(5);
        },
    }
}

/// One input pixel's channels into `dst` as a convolution reads them: the
/// pixel `at` of `x` (NHWC rows of `dst.len()` channels) through `pre`, or
/// zeros in the padding (`at` None).
#[inline]
fn load_pixel(dst: &mut [f32], x: &[f32], at: Option<usize>, pre: Option<&Affine>) {
    let c = dst.len();
    match (at, pre) {
        (Some(i), Some(p)) => {
            let src = &x[i * c..(i + 1) * c];
            for (((o, v), sc), sh) in dst.iter_mut().zip(src).zip(&p.scale).zip(&p.shift) {
                *o = v * sc + sh;
            }
        }
        (Some(i), None) => dst.copy_from_slice(&x[i * c..(i + 1) * c]),
        (None, _) => dst.fill(0.0),
    }
}

/// A convolution by im2col (output rows of the whole batch in chunks) and
/// one GEMM per chunk on all cores (`Weights::times`), finished by `epi`.
fn im2col_gemm(
    s: &ConvShape,
    w: &Weights,
    x: &[f32],
    pre: Option<&Affine>,
    epi: Epilogue<'_>,
    y: &mut [f32],
    col: &mut Vec<f32>,
) {
    let ho = (s.height + 2 * s.pad - s.kernel) / s.stride + 1;
    let wo = (s.width + 2 * s.pad - s.kernel) / s.stride + 1;
    let (k, ci, co) = (s.kernel, s.c_in, s.c_out);
    let kk = k * k * ci;
    let rows = s.batch * ho * wo;
    let chunk = (CHUNK_FLOATS / kk).clamp(1, rows);
    let col = grown(col, chunk * kk);
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk.min(rows - r0);
        col[..n * kk].par_chunks_mut(kk).enumerate().for_each(|(i, dst)| {
            let row = r0 + i;
            let (b, pix) = (row / (ho * wo), row % (ho * wo));
            let (oy, ox) = (pix / wo, pix % wo);
            for r in 0..k {
                for q in 0..k {
                    let iy = (oy * s.stride + r).wrapping_sub(s.pad);
                    let ix = (ox * s.stride + q).wrapping_sub(s.pad);
                    let at = (iy < s.height && ix < s.width).then(|| (b * s.height + iy) * s.width + ix);
                    load_pixel(&mut dst[(r * k + q) * ci..][..ci], x, at, pre);
                }
            }
        });
        let out = &mut y[r0 * co..(r0 + n) * co];
        w.times(&col[..n * kk], n, kk, co, out);
        out.par_chunks_mut(co).enumerate().for_each(|(i, yr)| epi.apply(r0 + i, yr));
        r0 += n;
    }
}

/// `c = a·b` (row-major, `m x k` times `k x n`) on the calling thread, by
/// the gemm crate.
fn gemm_serial(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm_on(::gemm::Parallelism::None, m, n, k, 1.0, a, k, Op::N, b, n, Op::N, 0.0, c, n)
        .unwrap_or_else(|e| panic!("gif-fr bug: inconsistent GEMM sizes in the folded network: {e}"));
}

/// One IBasicBlock, folded.
struct FoldedBlock {
    /// bn1, applied as conv1 reads its input.
    pre: Affine,
    /// conv1 with bn2 folded, then PReLU.
    conv1: FoldedConv,
    prelu: Vec<f32>,
    /// conv2 (the block's stride) with bn3 folded.
    conv2: FoldedConv,
    /// The 1x1 downsample with its BatchNorm folded.
    downsample: Option<FoldedConv>,
}

/// The eval IResNet, folded (see the module's documentation).
pub struct FoldedIResNet {
    input: usize,
    embedding: usize,
    stem: FoldedConv,
    stem_prelu: Vec<f32>,
    blocks: Vec<FoldedBlock>,
    /// bn2 → flatten → Linear → BatchNorm1d as one map: `[E, H·W·C]`, `[E]`.
    fc_w: Weights,
    fc_b: Vec<f32>,
    /// Activations and temporaries, kept between calls (grown to the
    /// largest batch seen): no allocation per call at a batch size seen.
    work: std::sync::Mutex<Workspace>,
}

/// [`FoldedIResNet`]'s buffers: four activations, the convolutions' tiles
/// (or im2col rows) and products.
#[derive(Default)]
struct Workspace {
    act: [Vec<f32>; 4],
    tiles: Vec<f32>,
    prods: Vec<f32>,
}

/// The parts of an IResNet the folding reads (borrowed from the network).
pub(crate) struct Parts<'a> {
    pub input: usize,
    pub embedding: usize,
    pub conv1: &'a Tensor,
    pub bn1: &'a BatchNorm,
    pub prelu: &'a Tensor,
    pub blocks: Vec<BlockParts<'a>>,
    pub bn2: &'a BatchNorm,
    pub fc_weight: &'a Tensor,
    pub fc_bias: &'a Tensor,
    pub features: &'a BatchNorm,
}

/// One block's parameters.
pub(crate) struct BlockParts<'a> {
    pub inplanes: usize,
    pub planes: usize,
    pub stride: usize,
    pub bn1: &'a BatchNorm,
    pub conv1: &'a Tensor,
    pub bn2: &'a BatchNorm,
    pub prelu: &'a Tensor,
    pub conv2: &'a Tensor,
    pub bn3: &'a BatchNorm,
    pub downsample: Option<(&'a Tensor, &'a BatchNorm)>,
}

fn shape(hw: usize, c_in: usize, c_out: usize, kernel: usize, stride: usize) -> ConvShape {
    ConvShape { batch: 1, height: hw, width: hw, c_in, c_out, kernel, stride, pad: kernel / 2 }
}

impl FoldedIResNet {
    pub(crate) fn new(p: &Parts<'_>, wino: Winograd, kernels: Kernels) -> Result<FoldedIResNet> {
        let packed = kernels == Kernels::Auto && packed::available();
        let stem_c = p.bn1.channels;
        let mut hw = p.input;
        let stem = FoldedConv::new(p.conv1, shape(hw, 3, stem_c, 3, 1), p.bn1, Winograd::Off, packed)?;
        let mut blocks = Vec::with_capacity(p.blocks.len());
        for b in &p.blocks {
            let conv1 = FoldedConv::new(b.conv1, shape(hw, b.inplanes, b.planes, 3, 1), b.bn2, wino, packed)?;
            let conv2 = FoldedConv::new(b.conv2, shape(hw, b.planes, b.planes, 3, b.stride), b.bn3, wino, packed)?;
            let downsample = match b.downsample {
                Some((w, bn)) => {
                    Some(FoldedConv::new(w, shape(hw, b.inplanes, b.planes, 1, b.stride), bn, wino, packed)?)
                }
                None => None,
            };
            blocks.push(FoldedBlock {
                pre: Affine::of(b.bn1)?,
                conv1,
                prelu: b.prelu.host_f32()?.into_owned(),
                conv2,
                downsample,
            });
            hw /= b.stride;
        }
        // bn2 (per channel of the NHWC flattening) → fc → features, in f64.
        let (bn2, feat) = (Affine::of(p.bn2)?, Affine::of(p.features)?);
        let (w, b0) = (p.fc_weight.host_f32()?, p.fc_bias.host_f32()?);
        let c = p.bn2.channels;
        let j = w.len() / p.embedding;
        let mut fc_w = Vec::with_capacity(w.len());
        let mut fc_b = Vec::with_capacity(p.embedding);
        for (e, row) in w.chunks(j).enumerate() {
            let mut bias = b0[e] as f64;
            for (i, &v) in row.iter().enumerate() {
                bias += v as f64 * bn2.shift[i % c] as f64;
                fc_w.push(v * bn2.scale[i % c] * feat.scale[e]);
            }
            fc_b.push((bias * feat.scale[e] as f64 + feat.shift[e] as f64) as f32);
        }
        Ok(FoldedIResNet {
            input: p.input,
            embedding: p.embedding,
            stem,
            stem_prelu: p.prelu.host_f32()?.into_owned(),
            blocks,
            fc_w: Weights::rows_of_inputs(fc_w, p.embedding, j, packed),
            fc_b,
            work: Default::default(),
        })
    }

    /// Bytes of folded weights held (convolutions, transformed or packed;
    /// the folded Linear layer; biases and slopes), not counting the
    /// activations' buffers.
    pub fn weight_bytes(&self) -> usize {
        let convs = self.blocks.iter().flat_map(|b| [Some(&b.conv1), Some(&b.conv2), b.downsample.as_ref()]).flatten();
        let small = self.blocks.iter().map(|b| b.prelu.len() + 2 * b.pre.scale.len()).sum::<usize>();
        convs.chain([&self.stem]).map(FoldedConv::bytes).sum::<usize>()
            + self.fc_w.bytes()
            + 4 * (self.fc_b.len() + self.stem_prelu.len() + small)
    }

    /// Embeddings `[B, E]` of `batch` NHWC f32 images (`[B, H, W, 3]`,
    /// normalized as the network expects).
    pub fn embed(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        // On one of rayon's workers: the layers' parallel loops (three a
        // convolution, ~150 an image on r50) then split among the workers
        // instead of each being sent from this thread, which would sleep
        // and be woken once per loop.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.embed(images, batch));
        }
        const OP: &str = "FoldedIResNet::embed";
        let s = self.input;
        let need = batch.checked_mul(s * s * 3);
        if batch == 0 || need != Some(images.len()) {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{batch} (> 0) images of {s}x{s}x3"),
                got: format!("{} values", images.len()),
            });
        }
        // The largest activation (values per image: the stem's output, each
        // block's conv1 output and its output): every buffer is sized for it.
        let rows = batch * s * s;
        let per_image = self
            .blocks
            .iter()
            .flat_map(|b| {
                let (c1, c2) = (&b.conv1.shape, &b.conv2.shape);
                let out = c2.height / c2.stride;
                [c1.height * c1.width * c1.c_out, out * out * c2.c_out]
            })
            .chain([s * s * self.stem.shape.c_out])
            .max();
        let cap = per_image
            .and_then(|n| batch.checked_mul(n))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .ok_or_else(|| Error::invalid(OP, format!("a batch of {batch} images overflows the activations' size")))?;
        let mut guard = self.work.lock().map_err(|_| Error::invalid(OP, "a previous call panicked"))?;
        let Workspace { act, tiles, prods } = &mut *guard;
        for a in act.iter_mut() {
            grown(a, cap);
        }
        let [x, p, y, r] = act;
        let stem_out = rows * self.stem.shape.c_out;
        let epi = Epilogue { bias: &self.stem.bias, residual: None, prelu: Some(&self.stem_prelu) };
        self.stem.run(images, batch, None, epi, &mut x[..stem_out], tiles, prods);
        let mut hw = s;
        let mut len = stem_out;
        for b in &self.blocks {
            let (c1, c2) = (&b.conv1, &b.conv2);
            let p_len = batch * hw * hw * c1.shape.c_out;
            let epi = Epilogue { bias: &c1.bias, residual: None, prelu: Some(&b.prelu) };
            c1.run(&x[..len], batch, Some(&b.pre), epi, &mut p[..p_len], tiles, prods);
            let ho = hw / c2.shape.stride;
            let y_len = batch * ho * ho * c2.shape.c_out;
            let residual: &[f32] = match &b.downsample {
                Some(ds) => {
                    let epi = Epilogue { bias: &ds.bias, residual: None, prelu: None };
                    ds.run(&x[..len], batch, None, epi, &mut r[..y_len], tiles, prods);
                    &r[..y_len]
                }
                None => &x[..len],
            };
            let epi = Epilogue { bias: &c2.bias, residual: Some(residual), prelu: None };
            c2.run(&p[..p_len], batch, None, epi, &mut y[..y_len], tiles, prods);
            std::mem::swap(x, y);
            (hw, len) = (ho, y_len);
        }
        let j = len / batch;
        let e = self.embedding;
        let mut out = vec![0f32; batch * e];
        self.fc_w.times(&x[..len], batch, j, e, &mut out);
        out.par_chunks_mut(e).for_each(|row| row.iter_mut().zip(&self.fc_b).for_each(|(v, b)| *v += b));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The term-by-term tile transforms equal the products with F2's and
    /// F4's matrices, in f64, on lanes of random values.
    #[test]
    fn written_out_transforms_equal_the_matrices() {
        let mut next = super::packed::tests::uniform(0x2545_f491_4f6c_dd1d);
        for t in [&F2, &F4] {
            let a = t.a;
            let v: Vec<Lane> = (0..a).map(|_| std::array::from_fn(|_| next())).collect();
            for (input, tm, rows) in [(true, t.bt, a), (false, t.at, t.m)] {
                let mut out = vec![[f32::NAN; LANES]; a];
                side(a, input, &v, &mut out);
                for (i, o) in out.iter().enumerate().take(rows) {
                    for l in 0..LANES {
                        let want: f64 = (0..a).map(|k| tm[i * a + k] as f64 * v[k][l] as f64).sum();
                        assert!((o[l] as f64 - want).abs() <= 1e-5, "a = {a}, input {input}: row {i}, lane {l}");
                    }
                }
            }
        }
    }
}
