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

mod common;

#[test]
fn embed_reads_images_and_writes_embeddings() {
    use gif_fr::backbone::{IResNet, IResNetConfig};
    let dir = std::env::temp_dir().join(format!("gif-fr-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (weights, images, out) = (dir.join("r18.safetensors"), dir.join("img.npy"), dir.join("emb.npy"));
    let cfg = IResNetConfig::arch("r18").unwrap();
    let mut net = IResNet::new(cfg.clone(), &gif_fr::Device::cpu(), 4).unwrap();
    net.save(&weights).unwrap();
    // One uint8 RGB image.
    let pixels: Vec<u8> = (0..112 * 112 * 3).map(|i| (i * 37 % 251) as u8).collect();
    std::fs::write(&images, common::npy_bytes("|u1", &[1, 112, 112, 3], &pixels)).unwrap();
    let embed_with = |arch: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gif-fr"))
            .args(["embed", "--arch", arch, "--device", "cpu", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let embed = |arch: &str| embed_with(arch, &[]);
    // --bf16: the network with bf16 convolutions (on the CPU, rounded operands).
    let o = embed_with("r18", &["--bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (emb_bf16, _) = gif_fr::tokenizer::read_npy(&out).unwrap();
    let o = embed("r18");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (emb, shape) = gif_fr::tokenizer::read_npy(&out).unwrap();
    assert_eq!(shape, vec![1, 512]);
    // The same as the library's eval forward on the normalized image.
    let norm: Vec<f32> = pixels.iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect();
    assert_eq!(emb, net.embed(&norm, 1).unwrap());
    let bf16_cfg = IResNetConfig { conv_dtype: gif_fr::DType::BF16, ..cfg.clone() };
    let mut bf16_net = IResNet::load(&weights, bf16_cfg, &gif_fr::Device::cpu()).unwrap();
    assert_eq!(emb_bf16, bf16_net.embed(&norm, 1).unwrap());
    assert_ne!(emb_bf16, emb);
    // A wrong arch for the weights, and images of the wrong shape, are errors.
    let o = embed("r34");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("layer"), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&images, common::npy_bytes("|u1", &[1, 64, 64, 3], &pixels[..64 * 64 * 3])).unwrap();
    let o = embed("r18");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("112"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn images_in_both_layouts_read_the_same() {
    use gif_fr::backbone::images::read_images;
    let dir = std::env::temp_dir().join(format!("gif-fr-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (s, b) = (16usize, 2usize);
    let pixels: Vec<u8> = (0..b * s * s * 3).map(|i| (i * 13 % 256) as u8).collect();
    let u8_path = dir.join("u8.npy");
    std::fs::write(&u8_path, common::npy_bytes("|u1", &[b, s, s, 3], &pixels)).unwrap();
    let (from_u8, n) = read_images(&u8_path, s).unwrap();
    assert_eq!(n, b);
    assert_eq!(from_u8[5], (pixels[5] as f32 / 255.0 - 0.5) / 0.5);
    // The same images as normalized f32 NCHW.
    let mut nchw = vec![0f32; from_u8.len()];
    for i in 0..b {
        for c in 0..3 {
            for p in 0..s * s {
                nchw[(i * 3 + c) * s * s + p] = from_u8[(i * s * s + p) * 3 + c];
            }
        }
    }
    let f32_path = dir.join("f32.npy");
    std::fs::write(&f32_path, common::npy_bytes("<f4", &[b, 3, s, s], bytemuck::cast_slice(&nchw))).unwrap();
    assert_eq!(read_images(&f32_path, s).unwrap().0, from_u8);
    // Wrong layouts are errors.
    assert!(read_images(&u8_path, 32).is_err());
    std::fs::write(&f32_path, common::npy_bytes("<f4", &[b, s, s, 3], bytemuck::cast_slice(&nchw))).unwrap();
    assert!(read_images(&f32_path, s).is_err());
}
