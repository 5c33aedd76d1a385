//! The simulator catches what it promises to (planted bugs in
//! kernels/selftest.cu), and its emulations of shuffles, votes, ldmatrix,
//! cp.async, mma.sync and fmaf give the answers the PTX ISA defines. The
//! known-answer tests run on a GPU too when one is present.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::runtime::selftest;
use gif_fr::{DType, Device, Error, SimOrder};
use rand::Rng;

fn kernel_error(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Kernel { kernel, message, .. }) => format!("{kernel}: {message}"),
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

#[test]
fn planted_missing_syncthreads_is_wrong_in_forward_order_and_right_in_reverse() {
    let mut rng = rng(11);
    let threads = 96;
    let x = uniform(&mut rng, 5 * threads, -1.0, 1.0);
    let want: Vec<f32> = x.chunks(threads).map(|r| r.iter().sum()).collect();

    // Forward order: thread 0 adds the partials before threads 1.. wrote
    // them, and reads the poison (NaN) the block's shared memory starts with.
    let fwd = selftest::block_sum(&Device::sim_with(SimOrder::Forward), &x, threads, false).unwrap();
    assert!(fwd.iter().all(|v| v.is_nan()), "the race went unseen in forward order: {fwd:?}");
    // Reverse order: thread 0 runs last, so the race happens to give the
    // right answer; one order alone cannot be trusted.
    let rev = selftest::block_sum(&Device::sim_with(SimOrder::Reverse), &x, threads, false).unwrap();
    assert_close("reverse order", &rev, &want, 1e-5, 1e-5);
    // With the barrier every order agrees.
    for dev in gpu_devices() {
        let got = selftest::block_sum(&dev, &x, threads, true).unwrap();
        assert_close(&format!("with barrier on {dev}"), &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn shuffled_order_catches_the_planted_race_too() {
    let mut rng = rng(12);
    let x = uniform(&mut rng, 4 * 64, -1.0, 1.0);
    let got = selftest::block_sum(&Device::sim_with(SimOrder::Shuffle(1)), &x, 64, false).unwrap();
    assert!(got.iter().any(|v| v.is_nan()), "a shuffled order ran thread 0 last in every block: {got:?}");
}

#[test]
fn out_of_bounds_write_is_reported_with_the_kernel_and_offset() {
    for n in [1usize, 100, 1000] {
        let e = kernel_error(selftest::oob_write(&Device::sim(), n));
        assert!(e.contains("selftest_oob_write"), "{e}");
        assert!(e.contains(&format!("out-of-bounds write: byte offset {} of a {}-byte buffer", 4 * n, 4 * n)), "{e}");
    }
}

#[test]
fn planted_bugs_run_only_on_the_simulator() {
    // On a GPU they would be a real out-of-bounds write, a hang or a race.
    let mut others = vec![Device::cpu()];
    others.extend(common::cuda());
    for dev in &others {
        let refused = |r: gif_fr::Result<Vec<f32>>| matches!(r, Err(gif_fr::Error::InvalidArgument { .. }));
        assert!(refused(selftest::oob_write(dev, 10)), "{dev}");
        assert!(refused(selftest::exit_before_barrier(dev, 64, 40)), "{dev}");
        assert!(refused(selftest::divergent_barrier(dev, 64)), "{dev}");
        assert!(refused(selftest::shfl_exited_lane(dev)), "{dev}");
        assert!(refused(selftest::cp_async_without_wait(dev, &[1.0; 16])), "{dev}");
        assert!(refused(selftest::block_sum(dev, &[1.0; 64], 64, false)), "{dev}");
        assert!(refused(selftest::unwritten_shared_in_helper(dev, 1, 32)), "{dev}");
    }
    assert!(selftest::oob_write(&Device::sim(), usize::MAX).is_err());
}

#[test]
fn guard_bands_are_restored_after_a_report() {
    let dev = Device::sim();
    let _ = selftest::oob_write(&dev, 10);
    // A correct launch on the same device afterwards reports nothing.
    let x = vec![1.0f32; 64];
    assert_eq!(selftest::block_sum(&dev, &x, 64, true).unwrap(), vec![64.0]);
}

#[test]
fn thread_exiting_before_a_barrier_is_reported() {
    let e = kernel_error(selftest::exit_before_barrier(&Device::sim(), 64, 40));
    assert!(e.contains("exited while other threads wait at __syncthreads"), "{e}");
    assert!(e.contains("kernels/selftest.cu:"), "{e}");
    // Every thread reaching the barrier is fine.
    let y = selftest::exit_before_barrier(&Device::sim(), 64, 64).unwrap();
    assert_eq!(y[0], 63.0);
}

#[test]
fn shared_memory_of_a_helper_is_poisoned_before_every_block() {
    // Each block reads before it writes: poison (NaN) in every block, also
    // in the second launch (the first left 1.0, 2.0, 3.0 there).
    for dev in [Device::sim_with(SimOrder::Forward), Device::sim_with(SimOrder::Shuffle(5))] {
        for launch in 0..2 {
            let y = selftest::unwritten_shared_in_helper(&dev, 3, 100).unwrap();
            assert!(y.iter().all(|v| v.is_nan()), "{dev}, launch {launch}: {:?}", &y[..8]);
        }
    }
    assert!(selftest::unwritten_shared_in_helper(&Device::sim(), 1, 257).is_err());
}

#[test]
fn divergent_barrier_is_reported() {
    for order in [SimOrder::Forward, SimOrder::Reverse] {
        let e = kernel_error(selftest::divergent_barrier(&Device::sim_with(order), 64));
        assert!(e.contains("divergent __syncthreads"), "{e}");
    }
}

#[test]
fn shuffle_naming_an_exited_lane_is_reported() {
    let e = kernel_error(selftest::shfl_exited_lane(&Device::sim()));
    assert!(e.contains("__shfl_sync") && e.contains("which has exited"), "{e}");
}

#[test]
fn cp_async_read_without_wait_sees_poison() {
    let x: Vec<f32> = (0..256).map(|i| i as f32 + 0.5).collect();
    let y = selftest::cp_async_without_wait(&Device::sim(), &x).unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "copies landed without cp.async.wait_group: {:?}", &y[..8]);
}

#[test]
fn warp_shuffles_and_votes_match_the_ptx_definition() {
    let mut rng = rng(13);
    let input: Vec<i32> = (0..128).map(|_| rand::Rng::random_range(&mut rng, -50..2000)).collect();
    for dev in gpu_devices() {
        for width in [1, 2, 4, 8, 16, 32] {
            let got = selftest::warp_ops(&dev, &input, width).unwrap();
            let want = selftest::warp_ops_reference(&input, width);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{dev} width {width}: thread {} op {}", i / 8, i % 8);
            }
        }
    }
}

#[test]
fn ldmatrix_matches_the_ptx_fragment_layout() {
    let mut m = [0u16; 256];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (i as u16).wrapping_mul(257) ^ 0x1234;
    }
    for dev in gpu_devices() {
        let got = selftest::ldmatrix(&dev, &m).unwrap();
        let want = selftest::ldmatrix_reference(&m);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{dev}: lane {} word {}: got {g:#010x}, want {w:#010x}", i / 14, i % 14);
        }
    }
}

#[test]
fn mma_tile_matches_f64_reference_for_bf16_and_f16() {
    let mut rng = rng(14);
    for dev in gpu_devices() {
        for dtype in [DType::BF16, DType::F16] {
            let a = uniform(&mut rng, 256, -2.0, 2.0);
            let b = uniform(&mut rng, 128, -2.0, 2.0);
            let c = uniform(&mut rng, 128, -1.0, 1.0);
            let got = selftest::mma_tile(&dev, &a, &b, &c, dtype).unwrap();
            let want = selftest::mma_tile_reference(&a, &b, &c, dtype);
            assert_close(&format!("mma {dtype:?} on {dev}"), &got, &want, 1e-4, 1e-5);
        }
    }
}

#[test]
fn build_script_registered_every_kernel_with_the_simulator() {
    for m in gif_fr::runtime::kernels::MODULES {
        assert!(!m.kernels.is_empty(), "{} has no kernels", m.name);
        assert_eq!(gif_fr::runtime::sim::registered_kernels(m.id), m.kernels, "{}", m.name);
    }
}

#[test]
fn every_generated_launcher_matches_the_signature_the_compiler_saw() {
    // build.rs generates the typed launchers from the source text; the
    // simulator registers each kernel's parameters as the C++ compiler
    // deduced them from its type. They agree for all kernels, in order.
    use gif_fr::runtime::kernels::{KernelRef, MODULES};
    use gif_fr::runtime::launch::SIGNATURES;
    let mut checked = 0;
    for (mi, m) in MODULES.iter().enumerate() {
        assert_eq!(SIGNATURES[mi].len(), m.kernels.len(), "{}", m.name);
        for (ki, &name) in m.kernels.iter().enumerate() {
            let k = KernelRef { module: m.id, index: ki as u16, name };
            let compiled = gif_fr::runtime::sim::kernel_signature(k).expect("a registered kernel");
            assert_eq!(compiled, SIGNATURES[mi][ki], "kernels/{}.cu {name}: (kind, bytes) per parameter", m.name);
            checked += 1;
        }
        let past = KernelRef { module: m.id, index: m.kernels.len() as u16, name: "past the end" };
        assert_eq!(gif_fr::runtime::sim::kernel_signature(past), None);
    }
    assert!(checked > 100, "{checked} kernels");
}

#[test]
fn block_votes_count_and_or_over_the_block() {
    let mut rng = rng(15);
    for dev in gpu_devices() {
        for (n, lo) in [(96usize, -5), (33, 1), (256, -1000)] {
            let input: Vec<i32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, lo..10)).collect();
            let count = input.iter().filter(|&&v| v > 0).count() as i32;
            let got = selftest::block_votes(&dev, &input).unwrap();
            for t in 0..n {
                assert_eq!(
                    &got[3 * t..3 * t + 3],
                    &[count, (count == n as i32) as i32, (count > 0) as i32],
                    "{dev} n {n}"
                );
            }
        }
    }
}

/// The kernels' f32 -> bf16 / f16 conversions round to nearest even exactly
/// as the `half` crate does, on any bit pattern (NaN stays NaN).
fn check_conversions(dev: &Device, x: &[f32]) {
    let (b, h, bb, hb) = selftest::convert(dev, x).unwrap();
    for (i, &v) in x.iter().enumerate() {
        let (wb, wh) = (half::bf16::from_f32(v), half::f16::from_f32(v));
        if v.is_nan() {
            assert!(
                half::bf16::from_bits(b[i]).is_nan() && half::f16::from_bits(h[i]).is_nan(),
                "{dev}: NaN {:#x}",
                v.to_bits()
            );
            assert!(bb[i].is_nan() && hb[i].is_nan());
            continue;
        }
        assert_eq!(b[i], wb.to_bits(), "{dev}: bf16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(h[i], wh.to_bits(), "{dev}: f16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(bb[i].to_bits(), wb.to_f32().to_bits(), "{dev}: bf16 -> f32 of {v:e}");
        assert_eq!(hb[i].to_bits(), wh.to_f32().to_bits(), "{dev}: f16 -> f32 of {v:e}");
    }
}

#[test]
fn conversions_round_to_nearest_even_at_the_edges() {
    let mut x = vec![0.0f32, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE];
    // f16: largest finite, the overflow threshold and just below it, the
    // smallest normal and subnormal, halfway cases.
    x.extend([
        65504.0,
        65519.99,
        65520.0,
        6.1035156e-5,
        5.9604645e-8,
        2.9802322e-8,
        2.9802326e-8,
        1.0009766,
        1.0004883,
    ]);
    // bf16: halfway cases with even and odd lower neighbours.
    x.extend([
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x7f7f_ffff),
        f32::from_bits(0x0000_8000),
    ]);
    for dev in gpu_devices() {
        check_conversions(&dev, &x);
    }
}

#[test]
fn fmaf_is_the_exactly_rounded_fused_multiply_add() {
    // Cases where a multiply and an add rounded apart give another answer
    // (and the test checks that they do), edges, then random triples over
    // many exponents.
    let e = f32::EPSILON;
    let mut abc: Vec<[f32; 3]> = vec![
        [1.0 + 2.0 * e, 1.0 - 2.0 * e, -1.0],
        [1.0 + e, 1.0 + e, -(1.0 + 2.0 * e)],
        [f32::MAX, 2.0, f32::NEG_INFINITY],
        [3.0e-39, 0.5, 1.0e-45],
        [0.0, -1.0, 0.0],
        [f32::INFINITY, 0.0, 1.0],
        [f32::NAN, 1.0, 1.0],
        [1.5, f32::INFINITY, f32::NEG_INFINITY],
        [1.0e-30, 1.0e-30, 0.0],
    ];
    for [a, b, c] in &abc[..3] {
        assert_ne!((a * b + c).to_bits(), a.mul_add(*b, *c).to_bits(), "not a case where fusing matters: {a} {b} {c}");
    }
    let mut r = rng(0xf3a);
    while abc.len() < 3001 {
        let mut v = || {
            let m: f32 = r.random_range(-2.0..2.0);
            m * 2f32.powi(r.random_range(-140..120))
        };
        abc.push([v(), v(), v()]);
    }
    let (a, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (abc.iter().map(|t| t[0]).collect(), abc.iter().map(|t| t[1]).collect(), abc.iter().map(|t| t[2]).collect());
    for dev in gpu_devices() {
        let (fused, fused_rn) = selftest::fma(&dev, &a, &b, &c).unwrap();
        for (i, [x, y, z]) in abc.iter().enumerate() {
            let want = x.mul_add(*y, *z);
            for (what, got) in [("fmaf", fused[i]), ("__fmaf_rn", fused_rn[i])] {
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{dev}: {what}({x:e}, {y:e}, {z:e}) = {got:e}, want {want:e}"
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]
    #[test]
    fn conversions_match_the_half_crate_on_any_bits(bits in proptest::collection::vec(proptest::prelude::any::<u32>(), 1..300)) {
        let x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
        check_conversions(&Device::sim(), &x);
    }
}
