//! The device layer without a GPU: typed errors, never a panic; the CPU
//! fallback; and, with a GPU, what the probe reports.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use gif_fr::{Device, DeviceKind, Error, Tensor};

#[test]
fn cuda_without_a_usable_gpu_is_a_typed_error_not_a_panic() {
    // Cross-checked against an independent probe of the driver library
    // (cudarc's loader), so each outcome must be the right one for this
    // machine, not merely a typed one.
    // SAFETY: only attempts to dlopen the driver library.
    let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
    match Device::cuda(0) {
        Ok(d) => {
            assert!(driver_present, "a GPU without a loadable driver library");
            let g = d.gpu_info().expect("a CUDA device describes itself");
            assert!(g.compute_capability.0 >= 8, "{g:?}");
            assert!(g.total_memory > 0);
            assert_eq!(Device::probe_cuda().unwrap(), g, "the probe and the device agree");
        }
        Err(Error::NoDriver(why)) => {
            assert!(!driver_present, "the driver library loads, yet NoDriver: {why}");
            assert!(why.contains("libcuda"), "{why}");
        }
        Err(Error::NoGpu(why)) => {
            assert!(driver_present, "NoGpu without a driver library: {why}");
            assert!(why.contains("GPU") || why.contains("device") || why.contains("driver"), "{why}");
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    // A GPU the run requires must be there (the kit sets this on GPU machines).
    let required = std::env::var(gif_fr::runtime::device::REQUIRE_GPU_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required || Device::cuda(0).is_ok(),
        "{} is set but no GPU opens",
        gif_fr::runtime::device::REQUIRE_GPU_ENV
    );
    // An ordinal no machine has: NoDriver without a driver, else NoGpu naming it.
    match Device::cuda(4096) {
        Err(Error::NoDriver(_)) => assert!(!driver_present),
        Err(Error::NoGpu(why)) => assert!(why.contains("4096"), "{why}"),
        other => panic!("GPU 4096 should not exist: {other:?}"),
    }
}

#[test]
fn best_is_the_gpu_when_present_else_the_cpu_and_says_why() {
    let best = Device::best();
    match Device::cuda(0) {
        Ok(_) => {
            assert_eq!(best.kind(), DeviceKind::Cuda);
            assert_eq!(Device::best_reason(), None);
        }
        Err(e) => {
            assert_eq!(best.kind(), DeviceKind::Cpu);
            assert_eq!(Device::best_reason(), Some(e.to_string()));
            let (d, why) = Device::best_with_reason();
            assert_eq!(d.kind(), DeviceKind::Cpu);
            assert!(matches!(why, Some(Error::NoDriver(_) | Error::NoGpu(_))), "{why:?}");
        }
    }
}

#[test]
fn errors_keep_their_source_and_out_of_memory_says_how_much() {
    use std::error::Error as _;
    // An allocation the simulator's host allocator refuses (1 EiB, past any
    // machine's 48- or 57-bit address space): OutOfMemory with the bytes.
    let sim = Device::sim();
    match gif_fr::Tensor::empty(&sim, &[1 << 58], gif_fr::DType::F32) {
        Err(Error::OutOfMemory { bytes, free, .. }) => assert_eq!((bytes, free), (1 << 60, None)),
        other => panic!("{other:?}"),
    }
    // A driver error keeps the driver's error as its source.
    let e = Error::Driver { context: "test".into(), source: "the driver said no".into() };
    assert_eq!(e.to_string(), "CUDA error in test: the driver said no");
    assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("the driver said no"));
}

#[test]
fn cuda_devices_are_shared_per_ordinal_and_sim_devices_are_distinct() {
    if let (Ok(a), Ok(b)) = (Device::cuda(0), Device::cuda(0)) {
        assert_eq!(a, b);
    }
    assert_ne!(Device::sim(), Device::sim());
    assert_eq!(Device::cpu(), Device::cpu());
}

#[test]
fn tensors_round_trip_through_every_device() {
    let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 5.0).collect();
    let mut devs = vec![Device::cpu(), Device::sim()];
    devs.extend(common::cuda());
    for dev in &devs {
        let t = Tensor::from_slice(dev, &[37], &x).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), x, "{dev}");
        let back = t.to_device(&Device::cpu()).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), x, "{dev} -> cpu");
        let bf = Tensor::from_f32(dev, &[37], &x, gif_fr::DType::BF16).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(bf.to_f32_vec().unwrap(), want, "{dev} bf16");
        assert!(matches!(bf.to_vec::<f32>(), Err(Error::DType { .. })));
    }
}

#[test]
fn empty_tensors_show_unwritten_elements_as_nan() {
    let mut devs = vec![Device::cpu(), Device::sim()];
    devs.extend(common::cuda());
    for dev in &devs {
        let t = Tensor::empty(dev, &[3, 5], gif_fr::DType::F32).unwrap();
        assert!(t.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()), "{dev}");
        let t = Tensor::empty(dev, &[4], gif_fr::DType::BF16).unwrap();
        assert!(t.to_f32_vec().unwrap().iter().all(|v| v.is_nan()), "{dev}");
    }
}

#[test]
fn device_timer_measures_host_work_on_the_cpu() {
    let d = Device::cpu();
    let mut n = 0u64;
    let t = d
        .time(3, || {
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 3);
    assert!(t >= std::time::Duration::from_millis(6), "{t:?}");
}

#[test]
fn time_each_times_every_call_after_one_warm_up() {
    for dev in [Device::cpu(), Device::sim()] {
        let mut calls = 0;
        let pause = std::time::Duration::from_millis(2);
        let t = dev
            .time_each(11, true, || {
                calls += 1;
                std::thread::sleep(pause);
                Ok(())
            })
            .unwrap();
        assert_eq!((t.len(), calls), (11, 12), "{dev}: 11 timed calls after one warm-up");
        assert!(t.iter().all(|&d| d >= pause), "{dev}: {t:?}");
        // A failing call stops the timing with its error.
        let err = dev.time_each(3, false, || Err(Error::NoGpu("stop".into()))).unwrap_err();
        assert!(err.to_string().contains("stop"), "{dev}");
    }
    let info = Device::cpu().info();
    assert!(!info.name.is_empty());
    assert!(info.compute_units.is_some_and(|n| n >= 1));
    assert!(info.to_string().starts_with(&info.name));
}
