//! Launchers and CPU references for kernels/selftest.cu: planted bugs the
//! simulator must report, and known-answer kernels that pin the simulator's
//! emulation of shuffles, votes, ldmatrix, cp.async, mma.sync and fmaf to
//! what a GPU does. Used by tests/sim.rs; not part of the face-recognition API.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::runtime::device::{Device, DeviceBuffer, LaunchConfig};
use crate::runtime::launch::{self, launch_one_of};
use crate::runtime::tensor::DType;

fn need_kernels(op: &'static str, dev: &Device) -> Result<()> {
    if dev.runs_kernels() {
        Ok(())
    } else {
        Err(Error::invalid(op, "needs a GPU or the simulator"))
    }
}

/// The planted bugs run only on the simulator: on a GPU they are real
/// out-of-bounds writes, hangs or races.
fn need_sim(op: &'static str, dev: &Device) -> Result<()> {
    if dev.kind() == crate::runtime::device::DeviceKind::Sim {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("a planted bug runs only on the simulator, not on {dev}")))
    }
}

fn up<T: bytemuck::Pod>(dev: &Device, v: &[T]) -> Result<DeviceBuffer> {
    dev.upload(bytemuck::cast_slice(v))
}

fn down<T: bytemuck::Pod>(dev: &Device, b: &DeviceBuffer, n: usize) -> Result<Vec<T>> {
    Ok(bytemuck::pod_collect_to_vec(&dev.download(b, n * std::mem::size_of::<T>())?))
}

// SAFETY (every launch below): each kernel reads and writes exactly the
// buffers allocated for it here, of the sizes its comment in
// kernels/selftest.cu states for the launch configuration given — except
// the planted bugs, which run only on the simulator (need_sim), whose guard
// bands catch their out-of-bounds write.

fn check_threads(op: &'static str, threads: usize) -> Result<()> {
    if threads == 0 || threads > 1024 {
        return Err(Error::invalid(op, format!("threads must be in 1..=1024, got {threads}")));
    }
    Ok(())
}

/// Sums of `blocks` rows of `threads` values, one block per row, thread 0
/// adding the partials all threads put in shared memory. Without the
/// barrier the result depends on the order threads run in (a race: the
/// simulator only).
pub fn block_sum(dev: &Device, x: &[f32], threads: usize, with_barrier: bool) -> Result<Vec<f32>> {
    const OP: &str = "selftest::block_sum";
    need_kernels(OP, dev)?;
    if !with_barrier {
        need_sim(OP, dev)?;
    }
    check_threads(OP, threads)?;
    if x.is_empty() || !x.len().is_multiple_of(threads) {
        return Err(Error::invalid(OP, format!("{} values are not whole rows of {threads}", x.len())));
    }
    let blocks = x.len() / threads;
    let (xb, mut out) = (up(dev, x)?, dev.alloc(blocks * 4)?);
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32, 0);
    let (xp, op) = (dev.ptr_of(&xb), dev.ptr_mut_of(&mut out));
    // SAFETY: see above (blocks rows of threads values in, blocks sums out).
    unsafe {
        if with_barrier {
            launch::selftest_block_sum(dev, cfg, xp, op)
        } else {
            launch::selftest_block_sum_nosync(dev, cfg, xp, op)
        }
    }?;
    down(dev, &out, blocks)
}

/// Writes ones to `y[0..=n]` of an `n`-float buffer: one past its end
/// (the simulator only; `n` < 2^31).
pub fn oob_write(dev: &Device, n: usize) -> Result<Vec<f32>> {
    const OP: &str = "selftest::oob_write";
    need_sim(OP, dev)?;
    if n >= i32::MAX as usize {
        return Err(Error::invalid(OP, format!("n must be below 2^31 - 1, got {n}")));
    }
    let mut y = dev.alloc(n * 4)?;
    let blocks = (n + 1).div_ceil(128) as u32;
    // SAFETY: see above (the simulator only: the write past the end lands in a guard band).
    unsafe { launch::selftest_oob_write(dev, LaunchConfig::linear(blocks, 128, 0), dev.ptr_mut_of(&mut y), n as i32) }?;
    down(dev, &y, n)
}

/// Threads `n..threads` return before a barrier the others wait at (the
/// simulator only).
pub fn exit_before_barrier(dev: &Device, threads: usize, n: usize) -> Result<Vec<f32>> {
    const OP: &str = "selftest::exit_before_barrier";
    need_sim(OP, dev)?;
    check_threads(OP, threads)?;
    let mut y = dev.alloc(threads * 4)?;
    let cfg = LaunchConfig::linear(1, threads as u32, 0);
    // SAFETY: see above (the simulator only).
    unsafe { launch::selftest_exit_before_barrier(dev, cfg, dev.ptr_mut_of(&mut y), n as i32) }?;
    down(dev, &y, threads)
}

/// Each of `blocks` blocks of `threads` (at most 256) reads a static
/// shared array that a helper kept out of line declares, before writing it
/// (the simulator only): every value read must be poison.
pub fn unwritten_shared_in_helper(dev: &Device, blocks: usize, threads: usize) -> Result<Vec<f32>> {
    const OP: &str = "selftest::unwritten_shared_in_helper";
    need_sim(OP, dev)?;
    if threads == 0 || threads > 256 || blocks == 0 || blocks > 1024 {
        return Err(Error::invalid(OP, "1 to 256 threads, 1 to 1,024 blocks"));
    }
    let mut y = dev.alloc(blocks * threads * 4)?;
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32, 0);
    // SAFETY: see above (the simulator only; one value per thread).
    unsafe { launch::selftest_unwritten_shared_in_helper(dev, cfg, dev.ptr_mut_of(&mut y)) }?;
    down(dev, &y, blocks * threads)
}

/// Odd and even threads wait at different barriers (the simulator only).
pub fn divergent_barrier(dev: &Device, threads: usize) -> Result<Vec<f32>> {
    const OP: &str = "selftest::divergent_barrier";
    need_sim(OP, dev)?;
    check_threads(OP, threads)?;
    let mut y = dev.alloc(threads * 4)?;
    let cfg = LaunchConfig::linear(1, threads as u32, 0);
    // SAFETY: see above (the simulator only).
    unsafe { launch::selftest_divergent_barrier(dev, cfg, dev.ptr_mut_of(&mut y)) }?;
    down(dev, &y, threads)
}

/// Half a warp shuffles with a full mask after the other half left (the
/// simulator only).
pub fn shfl_exited_lane(dev: &Device) -> Result<Vec<f32>> {
    need_sim("selftest::shfl_exited_lane", dev)?;
    let mut y = dev.alloc(32 * 4)?;
    // SAFETY: see above (the simulator only).
    unsafe { launch::selftest_shfl_exited_lane(dev, LaunchConfig::linear(1, 32, 0), dev.ptr_mut_of(&mut y)) }?;
    down(dev, &y, 16)
}

/// Copies `x` (4 floats per thread) through shared memory with cp.async but
/// never waits for the copies (a race: the simulator only).
pub fn cp_async_without_wait(dev: &Device, x: &[f32]) -> Result<Vec<f32>> {
    const OP: &str = "selftest::cp_async_without_wait";
    need_sim(OP, dev)?;
    if x.is_empty() || !x.len().is_multiple_of(4) || x.len() > 4096 {
        return Err(Error::invalid(OP, format!("needs 4 to 4096 floats in fours, got {}", x.len())));
    }
    let (xb, mut y) = (up(dev, x)?, dev.alloc(x.len() * 4)?);
    let cfg = LaunchConfig::linear(1, (x.len() / 4) as u32, 0);
    // SAFETY: see above (the simulator only).
    unsafe { launch::selftest_cp_async_nowait(dev, cfg, dev.ptr_of(&xb), dev.ptr_mut_of(&mut y)) }?;
    down(dev, &y, x.len())
}

/// Runs selftest_warp_ops: one block of `input.len()` threads (whole warps),
/// 8 results per thread (see kernels/selftest.cu).
pub fn warp_ops(dev: &Device, input: &[i32], width: i32) -> Result<Vec<i32>> {
    const OP: &str = "selftest::warp_ops";
    need_kernels(OP, dev)?;
    check_threads(OP, input.len())?;
    if !input.len().is_multiple_of(32) || !matches!(width, 1 | 2 | 4 | 8 | 16 | 32) {
        return Err(Error::invalid(OP, "needs whole warps and a width that is a power of two up to 32"));
    }
    let (ib, mut out) = (up(dev, input)?, dev.alloc(input.len() * 8 * 4)?);
    let cfg = LaunchConfig::linear(1, input.len() as u32, 0);
    // SAFETY: see above (one value in, 8 out per thread).
    unsafe { launch::selftest_warp_ops(dev, cfg, dev.ptr_of(&ib), dev.ptr_mut_of(&mut out), width) }?;
    down(dev, &out, input.len() * 8)
}

/// What selftest_warp_ops computes, by the PTX ISA's definition of
/// shfl.sync (segments of `width` lanes; up may not cross below its
/// segment; down and xor may not pass its end, xor may read an earlier one).
pub fn warp_ops_reference(input: &[i32], width: i32) -> Vec<i32> {
    let w = width as usize;
    let mut out = vec![0; input.len() * 8];
    for warp in input.chunks(32).enumerate() {
        let (wi, v) = warp;
        let ballot = v.iter().enumerate().fold(0u32, |b, (l, &x)| b | (((x & 1) as u32) << l));
        let any = v.iter().any(|&x| x > 1000) as i32;
        let all = v.iter().all(|&x| x >= 0) as i32;
        for lane in 0..32 {
            let seg = lane & !(w - 1);
            let o = &mut out[(wi * 32 + lane) * 8..(wi * 32 + lane + 1) * 8];
            o[0] = v[seg + ((3 * lane + 1) % w)];
            o[1] = if lane >= seg + 3 { v[lane - 3] } else { v[lane] };
            o[2] = if lane + 5 < seg + w { v[lane + 5] } else { v[lane] };
            o[3] = if (lane ^ 9) < seg + w { v[lane ^ 9] } else { v[lane] };
            o[4] = if (lane ^ 17) < seg + w { v[lane ^ 17] } else { v[lane] };
            o[5] = ballot as i32;
            o[6] = any;
            o[7] = all;
        }
    }
    out
}

/// Runs selftest_ldmatrix on four 8x8 matrices of 16-bit values (row-major,
/// matrix i at `m[64 i..]`): 14 words per lane.
pub fn ldmatrix(dev: &Device, m: &[u16; 256]) -> Result<Vec<u32>> {
    need_kernels("selftest::ldmatrix", dev)?;
    let (mb, mut out) = (up(dev, &m[..])?, dev.alloc(32 * 14 * 4)?);
    // SAFETY: see above (256 16-bit values in, 14 words per lane out).
    unsafe {
        launch::selftest_ldmatrix(dev, LaunchConfig::linear(1, 32, 0), dev.ptr_of(&mb), dev.ptr_mut_of(&mut out))
    }?;
    down(dev, &out, 32 * 14)
}

/// What selftest_ldmatrix computes, by the PTX ISA's fragment layout.
pub fn ldmatrix_reference(m: &[u16; 256]) -> Vec<u32> {
    let at = |i: usize, r: usize, c: usize| m[64 * i + 8 * r + c] as u32;
    let mut out = vec![0u32; 32 * 14];
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        let plain = |i| at(i, g, 2 * t) | (at(i, g, 2 * t + 1) << 16);
        let trans = |i| at(i, 2 * t, g) | (at(i, 2 * t + 1, g) << 16);
        let o = &mut out[14 * lane..14 * (lane + 1)];
        o[0] = plain(0);
        o[1] = plain(0);
        o[2] = plain(1);
        for i in 0..4 {
            o[3 + i] = plain(i);
        }
        o[7] = trans(0);
        o[8] = trans(0);
        o[9] = trans(1);
        for i in 0..4 {
            o[10 + i] = trans(i);
        }
    }
    out
}

/// D = A·B + C on one 16x8x16 tile through cp.async, ldmatrix and mma.sync:
/// `a` 16x16, `b` 16x8 (k x n), `c` 16x8, row-major, f32 values rounded to
/// `dtype` (bf16 or f16) for A and B.
pub fn mma_tile(dev: &Device, a: &[f32], b: &[f32], c: &[f32], dtype: DType) -> Result<Vec<f32>> {
    const OP: &str = "selftest::mma_tile";
    need_kernels(OP, dev)?;
    if a.len() != 256 || b.len() != 128 || c.len() != 128 {
        return Err(Error::Shape {
            op: OP,
            expected: "a: 256, b: 128, c: 128 values".into(),
            got: format!("a: {}, b: {}, c: {}", a.len(), b.len(), c.len()),
        });
    }
    let (cb, mut d) = (up(dev, c)?, dev.alloc(128 * 4)?);
    let cfg = LaunchConfig::linear(1, 32, 0);
    // A and B rounded to the MMA's input type.
    let narrow = |v: &[f32]| match dtype {
        DType::BF16 => up(dev, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        _ => up(dev, &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
    };
    if dtype == DType::F32 {
        return Err(Error::invalid(OP, "mma.sync m16n8k16 takes bf16 or f16 inputs"));
    }
    let (ab, bb) = (narrow(a)?, narrow(b)?);
    // SAFETY: see above (a 16x16, b 16x8, c and d 16x8).
    unsafe {
        launch_one_of!(dtype, { DType::BF16 => selftest_mma_bf16, _ => selftest_mma_f16 },
            (dev, cfg, dev.ptr_of(&ab), dev.ptr_of(&bb), dev.ptr_of(&cb), dev.ptr_mut_of(&mut d)))
    }?;
    down(dev, &d, 128)
}

/// D = A·B + C in f64 from the inputs rounded to `dtype`.
pub fn mma_tile_reference(a: &[f32], b: &[f32], c: &[f32], dtype: DType) -> Vec<f32> {
    let round = |x: f32| match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    } as f64;
    let mut d = vec![0f32; 128];
    for i in 0..16 {
        for j in 0..8 {
            let s: f64 = (0..16).map(|k| round(a[i * 16 + k]) * round(b[k * 8 + j])).sum();
            d[i * 8 + j] = (s + c[i * 8 + j] as f64) as f32;
        }
    }
    d
}

/// The results of selftest_convert for `x`: (bf16 bits, f16 bits, bf16 back
/// to f32, f16 back to f32).
pub type Conversions = (Vec<u16>, Vec<u16>, Vec<f32>, Vec<f32>);

/// Converts `x` to bf16 and f16 and back with the kernels' conversions
/// (kernels/common.cuh).
pub fn convert(dev: &Device, x: &[f32]) -> Result<Conversions> {
    const OP: &str = "selftest::convert";
    need_kernels(OP, dev)?;
    if x.is_empty() || x.len() > i32::MAX as usize {
        return Err(Error::invalid(OP, format!("needs 1 to {} values, got {}", i32::MAX, x.len())));
    }
    let n = x.len();
    let xb = up(dev, x)?;
    let (mut b, mut h, mut bb, mut hb) = (dev.alloc(2 * n)?, dev.alloc(2 * n)?, dev.alloc(4 * n)?, dev.alloc(4 * n)?);
    // SAFETY: see above (n values through each buffer).
    unsafe {
        launch::selftest_convert(
            dev,
            LaunchConfig::linear(n.div_ceil(128) as u32, 128, 0),
            dev.ptr_of(&xb),
            dev.ptr_mut_of(&mut b),
            dev.ptr_mut_of(&mut h),
            dev.ptr_mut_of(&mut bb),
            dev.ptr_mut_of(&mut hb),
            n as i32,
        )
    }?;
    Ok((down(dev, &b, n)?, down(dev, &h, n)?, down(dev, &bb, n)?, down(dev, &hb, n)?))
}

/// Runs selftest_block_votes: one block of `input.len()` threads; per
/// thread (count, and, or) of `input[t] > 0` over the block.
pub fn block_votes(dev: &Device, input: &[i32]) -> Result<Vec<i32>> {
    const OP: &str = "selftest::block_votes";
    need_kernels(OP, dev)?;
    check_threads(OP, input.len())?;
    let (ib, mut out) = (up(dev, input)?, dev.alloc(input.len() * 3 * 4)?);
    let cfg = LaunchConfig::linear(1, input.len() as u32, 0);
    // SAFETY: see above (one value in, 3 out per thread).
    unsafe { launch::selftest_block_votes(dev, cfg, dev.ptr_of(&ib), dev.ptr_mut_of(&mut out)) }?;
    down(dev, &out, input.len() * 3)
}

/// Runs selftest_fma: `fmaf(a, b, c)` and `__fmaf_rn(a, b, c)` per element
/// (three slices of one length).
pub fn fma(dev: &Device, a: &[f32], b: &[f32], c: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "selftest::fma";
    need_kernels(OP, dev)?;
    let n = a.len();
    if n == 0 || n > i32::MAX as usize || b.len() != n || c.len() != n {
        return Err(Error::invalid(OP, format!("needs three slices of one length, 1 to {}", i32::MAX)));
    }
    let (ab, bb, cb) = (up(dev, a)?, up(dev, b)?, up(dev, c)?);
    let (mut fused, mut fused_rn) = (dev.alloc(4 * n)?, dev.alloc(4 * n)?);
    // SAFETY: see above (n values through each buffer).
    unsafe {
        launch::selftest_fma(
            dev,
            LaunchConfig::linear(n.div_ceil(128) as u32, 128, 0),
            dev.ptr_of(&ab),
            dev.ptr_of(&bb),
            dev.ptr_of(&cb),
            dev.ptr_mut_of(&mut fused),
            dev.ptr_mut_of(&mut fused_rn),
            n as i32,
        )
    }?;
    Ok((down(dev, &fused, n)?, down(dev, &fused_rn, n)?))
}
