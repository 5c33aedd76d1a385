//! The `gif-fr` binary.

use std::process::Command;

#[test]
fn info_reports_version_build_modules_and_gpu() {
    let o = Command::new(env!("CARGO_BIN_EXE_gif-fr")).arg("info").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains(concat!("gif-fr ", env!("CARGO_PKG_VERSION"))), "{s}");
    let mode = if gif_fr::kernels::BUILT_WITH_NVCC { "PTX (compute_80) from nvcc" } else { "NVRTC" };
    assert!(s.contains(mode), "{s}");
    for m in gif_fr::kernels::MODULES {
        assert!(s.contains(&format!("kernels/{}.cu", m.name)), "{s}");
    }
    let gpu = s.lines().find(|l| l.starts_with("gpu: ")).expect("a gpu line");
    match gif_fr::Device::probe_cuda() {
        Ok(g) => assert!(gpu.contains(&g.name), "{gpu}"),
        Err(_) => assert!(gpu.starts_with("gpu: none: "), "{gpu}"),
    }
}

#[test]
fn unknown_command_prints_usage_and_fails() {
    let o = Command::new(env!("CARGO_BIN_EXE_gif-fr")).arg("frobnicate").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage: gif-fr"));
}
