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

#[test]
fn tokenize_writes_a_codebook_that_codebook_info_reads() {
    let out = std::env::temp_dir().join(format!("gif-fr-cli-{}.safetensors", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_gif-fr"))
        .args([
            "tokenize", "--count", "300", "--dim", "8", "--vocab", "5", "--seed", "3", "--steps", "2", "--device",
            "cpu", "--quiet", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let book = gif_fr::tokenizer::Codebook::load(&out).unwrap();
    assert_eq!((book.len(), book.vocab(), book.length(), book.dim(), book.seed()), (300, 5, 4, 8, 3));
    let o = Command::new(env!("CARGO_BIN_EXE_gif-fr")).arg("codebook-info").arg(&out).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("identities 300  vocab 5  length 4  dim 8  seed 3"), "{s}");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn tokenize_reports_bad_arguments_and_bad_input() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gif-fr")).args(args).output().unwrap();
    let o = run(&["tokenize", "--count", "10", "--out", "/tmp/x.safetensors"]);
    assert_eq!(o.status.code(), Some(2), "missing --dim is a usage error");
    let o = run(&["tokenize", "--count", "ten", "--dim", "3", "--out", "/tmp/x.safetensors"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["tokenize", "--count", "0", "--dim", "3", "--device", "cpu", "--out", "/tmp/x.safetensors"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("N = 0"));
    let o = run(&["codebook-info", "/nonexistent/file.safetensors"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot open"));
}
