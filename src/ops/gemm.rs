//! General matrix multiplication (kernels/gemm.cu):
//! `C = alpha·op(A)·op(B) + beta·C`, row-major, f32 output.
//!
//! - f32 inputs: the fp32 SIMT kernel (no tensor cores, no TF32).
//! - bf16 inputs: the tensor-core kernel (mma.sync m16n8k16, f32
//!   accumulators).
//! - CPU: the `gemm` crate (f32, multithreaded with rayon); bf16 inputs are
//!   widened to f32 exactly first.
//!
//! Shapes: `op(A)` is `M x K` — `A` is `[M, K]` for [`Op::N`], `[K, M]` for
//! [`Op::T`]; `op(B)` is `K x N` — `B` is `[K, N]` for `N`, `[N, K]` for
//! `T`; `C` is f32 `[M, N]`. The linear layer `Y = X·Wᵀ` is `(N, T)`; its
//! input gradient `dX = dY·W` is `(N, N)`, its weight gradient
//! `dW = dYᵀ·X` is `(T, N)`. With `beta == 0`, `C` is not read (NaN there
//! is overwritten, as in BLAS). NaN in A or B propagates.

use crate::error::{Error, Result};
use crate::runtime::device::{DeviceKind, LaunchConfig};
use crate::runtime::launch::launch_one_of;
use crate::runtime::tensor::{same_device, DType, Tensor};

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

const THREADS: u32 = 256;
/// Block tile (M and N) of both kernels.
pub const TILE: usize = 128;
const BF16_K_TILE: usize = 32;
const BF16_STAGES: usize = 3;
const BF16_PAD: usize = 8;

/// Dynamic shared memory of the bf16 kernel, bytes: 3 stages of an A and a
/// B tile, each stored along its contiguous dimension plus 8 elements of
/// padding (kernels/gemm.cu, TcTile).
pub fn bf16_shared_bytes(op_a: Op, op_b: Op) -> usize {
    let tile = |k_contiguous: bool| {
        if k_contiguous {
            TILE * (BF16_K_TILE + BF16_PAD)
        } else {
            BF16_K_TILE * (TILE + BF16_PAD)
        }
    };
    BF16_STAGES * (tile(op_a == Op::N) + tile(op_b == Op::T)) * 2
}

/// The problem after validation.
#[derive(Clone, Copy, Debug)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    /// Row lengths of A's and B's storage (their leading dimensions).
    lda: usize,
    ldb: usize,
}

#[allow(clippy::too_many_arguments)] // the BLAS argument list, plus the op name
fn check(
    op: &'static str,
    a: &Tensor,
    op_a: Op,
    b: &Tensor,
    op_b: Op,
    alpha: f32,
    beta: f32,
    c: &Tensor,
) -> Result<Dims> {
    same_device(op, &[a, b, c])?;
    let (ar, ac) = a.dims2(op)?;
    let (br, bc) = b.dims2(op)?;
    let (m, ka) = if op_a == Op::N { (ar, ac) } else { (ac, ar) };
    let (kb, n) = if op_b == Op::N { (br, bc) } else { (bc, br) };
    if ka != kb {
        return Err(Error::Shape {
            op,
            expected: format!("op(A) columns = op(B) rows (A {:?} {op_a:?}, B {:?} {op_b:?})", a.shape(), b.shape()),
            got: format!("{ka} and {kb}"),
        });
    }
    if c.shape() != [m, n] {
        return Err(Error::Shape { op, expected: format!("C of shape [{m}, {n}]"), got: format!("{:?}", c.shape()) });
    }
    if c.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: DType::F32, got: c.dtype() });
    }
    if a.dtype() != b.dtype() || !matches!(a.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::invalid(
            op,
            format!("A and B must both be f32 or both bf16, got {:?} and {:?}", a.dtype(), b.dtype()),
        ));
    }
    if !alpha.is_finite() || !beta.is_finite() {
        return Err(Error::invalid(op, format!("alpha and beta must be finite, got {alpha} and {beta}")));
    }
    let limit = i32::MAX as usize;
    if [ar, ac, br, bc].iter().any(|&d| d > limit) {
        return Err(Error::invalid(op, format!("every dimension must be at most {limit}")));
    }
    if m.div_ceil(TILE) > 65535 {
        return Err(Error::invalid(op, format!("M = {m} needs more than 65535 row tiles of {TILE}")));
    }
    Ok(Dims { m, n, k: ka, lda: ac, ldb: bc })
}

/// `C = alpha·op(A)·op(B) + beta·C` on the tensors' device (see the module
/// documentation for shapes). A and B: both f32 or both bf16; C: f32.
pub fn gemm(alpha: f32, a: &Tensor, op_a: Op, b: &Tensor, op_b: Op, beta: f32, c: &mut Tensor) -> Result<()> {
    const OP: &str = "gemm";
    let d = check(OP, a, op_a, b, op_b, alpha, beta, c)?;
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    let dev = a.device().clone();
    if dev.kind() == DeviceKind::Cpu {
        let (av, bv) = (a.host_f32()?, b.host_f32()?);
        let Some(cv) = c.host_slice_mut::<f32>() else {
            return Err(Error::invalid(OP, "C must hold f32 host data on the CPU"));
        };
        return cpu::gemm(d.m, d.n, d.k, alpha, &av, d.lda, op_a, &bv, d.ldb, op_b, beta, cv, d.n);
    }
    let grid = (d.n.div_ceil(TILE) as u32, d.m.div_ceil(TILE) as u32, 1);
    // Contiguous lengths of A and B's rows are their leading dimensions;
    // device buffers start 256-byte aligned, so only the lengths matter.
    let vec = d.lda % 4 == 0 && d.ldb % 4 == 0 && d.n % 4 == 0;
    let async_copy = d.lda % 8 == 0 && d.ldb % 8 == 0;
    let bf16 = a.dtype() != DType::F32;
    let shared = if bf16 { bf16_shared_bytes(op_a, op_b) as u32 } else { 0 };
    let cfg = LaunchConfig { grid, block: (THREADS, 1, 1), shared_bytes: shared };
    let (m, n, k, lda, ldb) = (d.m as i32, d.n as i32, d.k as i32, d.lda as i32, d.ldb as i32);
    use Op::{N, T};
    // SAFETY: check() validated A, B and C against (m, n, k) and the
    // leading dimensions, all on this device.
    unsafe {
        launch_one_of!((bf16, op_a, op_b, if bf16 { async_copy } else { vec }), {
            (false, N, N, false) => gemm_f32_nn, (false, N, T, false) => gemm_f32_nt,
            (false, T, N, false) => gemm_f32_tn, (false, T, T, false) => gemm_f32_tt,
            (false, N, N, true) => gemm_f32_nn_v, (false, N, T, true) => gemm_f32_nt_v,
            (false, T, N, true) => gemm_f32_tn_v, (false, T, T, true) => gemm_f32_tt_v,
            (true, N, N, false) => gemm_bf16_nn, (true, N, T, false) => gemm_bf16_nt,
            (true, T, N, false) => gemm_bf16_tn, (true, T, T, false) => gemm_bf16_tt,
            (true, N, N, true) => gemm_bf16_nn_a, (true, N, T, true) => gemm_bf16_nt_a,
            (true, T, N, true) => gemm_bf16_tn_a, (true, T, T, true) => gemm_bf16_tt_a,
        }, (&dev, cfg, m, n, k, alpha, a.ptr()?, lda, b.ptr()?, ldb, beta, c.ptr_mut()?, n))
    }
}

/// `op(A)·op(B)` into a new f32 tensor (`gemm` with alpha 1, beta 0).
pub fn matmul(a: &Tensor, op_a: Op, b: &Tensor, op_b: Op) -> Result<Tensor> {
    let (ar, ac) = a.dims2("matmul")?;
    let (br, bc) = b.dims2("matmul")?;
    let m = if op_a == Op::N { ar } else { ac };
    let n = if op_b == Op::N { bc } else { br };
    let mut c = Tensor::empty(a.device(), &[m, n], DType::F32)?;
    gemm(1.0, a, op_a, b, op_b, 0.0, &mut c)?;
    Ok(c)
}

/// The same product through cuBLAS (cublasSgemm for f32 with the default
/// math mode, i.e. without TF32; cublasGemmEx with bf16 inputs, f32 output
/// and f32 compute for bf16): the baseline the benchmarks compare against.
/// Needs a CUDA device.
pub fn cublas_gemm(alpha: f32, a: &Tensor, op_a: Op, b: &Tensor, op_b: Op, beta: f32, c: &mut Tensor) -> Result<()> {
    use cudarc::cublas::sys as cb;
    const OP: &str = "cublas_gemm";
    let d = check(OP, a, op_a, b, op_b, alpha, beta, c)?;
    let blas = a.device().cublas()?;
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B's buffer
    // comes first with B's op, A's second with A's op.
    let tr = |o: Op| if o == Op::N { cb::cublasOperation_t::CUBLAS_OP_N } else { cb::cublasOperation_t::CUBLAS_OP_T };
    let (pa, pb, pc) = (a.device_ptr().unwrap_or(0), b.device_ptr().unwrap_or(0), c.device_ptr().unwrap_or(0));
    let (m, n, k) = (d.n as i32, d.m as i32, d.k as i32);
    let status = match a.dtype() {
        // SAFETY: the pointers address live device buffers of the validated
        // shapes on the handle's stream; alpha and beta are host scalars.
        DType::F32 => unsafe {
            cudarc::cublas::result::sgemm(
                *blas.handle(),
                tr(op_b),
                tr(op_a),
                m,
                n,
                k,
                &alpha,
                pb as *const f32,
                d.ldb as i32,
                pa as *const f32,
                d.lda as i32,
                &beta,
                pc as *mut f32,
                d.n as i32,
            )
        },
        // SAFETY: as above; types are given explicitly to cublasGemmEx.
        _ => unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                tr(op_b),
                tr(op_a),
                m,
                n,
                k,
                &alpha as *const f32 as *const _,
                pb as *const _,
                cb::cudaDataType::CUDA_R_16BF,
                d.ldb as i32,
                pa as *const _,
                cb::cudaDataType::CUDA_R_16BF,
                d.lda as i32,
                &beta as *const f32 as *const _,
                pc as *mut _,
                cb::cudaDataType::CUDA_R_32F,
                d.n as i32,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        },
    };
    status.map_err(|e| Error::driver(format!("{OP} ({}x{}x{} {:?})", d.m, d.n, d.k, a.dtype()), e))
}

/// The CPU path and the f64 reference.
pub mod cpu {
    use super::Op;
    use crate::error::{Error, Result};

    /// `c = alpha·op(a)·op(b) + beta·c` with the `gemm` crate, all cores.
    /// `a` has row length `lda`, `b` row length `ldb`, `c` row length `ldc`
    /// (row-major). `beta == 0` does not read `c`. Errors (nothing is
    /// written): a leading dimension shorter than its row, or a slice
    /// shorter than the rows and strides reach (sizes computed with checked
    /// arithmetic).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        lda: usize,
        op_a: Op,
        b: &[f32],
        ldb: usize,
        op_b: Op,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) -> Result<()> {
        gemm_on(::gemm::Parallelism::Rayon(0), m, n, k, alpha, a, lda, op_a, b, ldb, op_b, beta, c, ldc)
    }

    /// [`gemm`] on the given threads (`Parallelism::None`: the calling
    /// thread only, for callers that run several GEMMs side by side).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_on(
        par: ::gemm::Parallelism,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        lda: usize,
        op_a: Op,
        b: &[f32],
        ldb: usize,
        op_b: Op,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) -> Result<()> {
        const OP: &str = "gemm::cpu::gemm";
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Elements a row-major matrix of `rows` rows of `cols`, `ld` apart, spans.
        let span = |what: &str, rows: usize, cols: usize, ld: usize, len: usize| -> Result<()> {
            if ld < cols {
                return Err(Error::invalid(OP, format!("{what}: leading dimension {ld} < {cols} columns")));
            }
            let need = (rows - 1).checked_mul(ld).and_then(|x| x.checked_add(cols));
            match need {
                Some(need) if need <= len => Ok(()),
                _ => Err(Error::Shape {
                    op: OP,
                    expected: format!("{what} of {rows} x {cols} with leading dimension {ld}"),
                    got: format!("{len} elements"),
                }),
            }
        };
        span("c", m, n, ldc, c.len())?;
        if k == 0 {
            // Nothing to multiply: C = beta·C.
            for r in 0..m {
                for v in &mut c[r * ldc..r * ldc + n] {
                    *v = if beta == 0.0 { 0.0 } else { beta * *v };
                }
            }
            return Ok(());
        }
        let (a_rows, a_cols) = if op_a == Op::N { (m, k) } else { (k, m) };
        let (b_rows, b_cols) = if op_b == Op::N { (k, n) } else { (n, k) };
        span("a", a_rows, a_cols, lda, a.len())?;
        span("b", b_rows, b_cols, ldb, b.len())?;
        if [lda, ldb, ldc].iter().any(|&ld| ld > isize::MAX as usize) {
            return Err(Error::invalid(OP, "a leading dimension exceeds isize::MAX"));
        }
        // Strides of op(A) (m x k) and op(B) (k x n), in elements: (row, column).
        let (a_rs, a_cs) = if op_a == Op::N { (lda as isize, 1) } else { (1, lda as isize) };
        let (b_rs, b_cs) = if op_b == Op::N { (ldb as isize, 1) } else { (1, ldb as isize) };
        // SAFETY: the checks above show every element the strides reach is
        // inside the slices; `c` is exclusively borrowed. gemm computes
        // dst = alpha_g·dst + beta_g·lhs·rhs, so our beta is its alpha and our
        // alpha its beta; read_dst = false ignores dst entirely.
        unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                ldc as isize,
                beta != 0.0,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                beta,
                alpha,
                false,
                false,
                false,
                par,
            )
        }
        Ok(())
    }

    /// [`gemm`] for the crate's own CPU paths, whose operand sizes follow
    /// from shapes their public functions validated: a size error here is a
    /// bug in the crate, reported as a panic naming it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_sized(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        lda: usize,
        op_a: Op,
        b: &[f32],
        ldb: usize,
        op_b: Op,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        if let Err(e) = gemm(m, n, k, alpha, a, lda, op_a, b, ldb, op_b, beta, c, ldc) {
            panic!("gif-fr bug: a CPU path passed inconsistent GEMM sizes: {e}");
        }
    }

    /// The f64 reference: `alpha·op(a)·op(b) + beta·c` computed naively in
    /// f64 from contiguous row-major operands (`c` may be empty when beta is 0).
    #[allow(clippy::too_many_arguments)]
    pub fn reference_f64(
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &[f32],
        op_a: Op,
        b: &[f32],
        op_b: Op,
        beta: f64,
        c: &[f32],
    ) -> Vec<f64> {
        // op(A) as m x k rows and op(B) as n x k rows, so the inner loop is contiguous.
        let at: Vec<f64> = (0..m * k)
            .map(|i| {
                let (r, q) = (i / k, i % k);
                (if op_a == Op::N { a[r * k + q] } else { a[q * m + r] }) as f64
            })
            .collect();
        let bt: Vec<f64> = (0..n * k)
            .map(|i| {
                let (col, q) = (i / k, i % k);
                (if op_b == Op::N { b[q * n + col] } else { b[col * k + q] }) as f64
            })
            .collect();
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for col in 0..n {
                let s: f64 = at[r * k..(r + 1) * k].iter().zip(&bt[col * k..(col + 1) * k]).map(|(x, y)| x * y).sum();
                out[r * n + col] = alpha * s + if beta != 0.0 { beta * c[r * n + col] as f64 } else { 0.0 };
            }
        }
        out
    }
}
