//! The `gif-fr` binary: commands, help, and bad arguments and files, each of
//! which gets a clear error and exit code 2 (usage) or 1 (the work failed),
//! never a panic (exit 101) or an abort.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

fn gif_fr<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(common::gif_fr_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code `code`, and stderr containing `needle` (case-insensitive).
fn expect_exit(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.to_lowercase().contains(&needle.to_lowercase()), "expected {needle:?} in: {err}");
}

#[test]
fn info_reports_version_build_modules_and_gpu() {
    let o = gif_fr(["info"]);
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains(concat!("gif-fr ", env!("CARGO_PKG_VERSION"))), "{s}");
    let mode = if gif_fr::runtime::kernels::BUILT_WITH_NVCC { "PTX (compute_80) from nvcc" } else { "NVRTC" };
    assert!(s.contains(mode), "{s}");
    for m in gif_fr::runtime::kernels::MODULES {
        assert!(s.contains(&format!("kernels/{}.cu", m.name)), "{s}");
    }
    let gpu = s.lines().find(|l| l.starts_with("gpu: ")).expect("a gpu line");
    match gif_fr::Device::probe_cuda() {
        Ok(g) => assert!(gpu.contains(&g.name), "{gpu}"),
        Err(_) => assert!(gpu.starts_with("gpu: none: "), "{gpu}"),
    }
    // Whether the collective back ends are there (the binary's build
    // features are this test's: cargo builds them alike).
    let mpi = if cfg!(feature = "mpi") { "mpi: built" } else { "mpi: not built" };
    assert!(s.lines().any(|l| l.starts_with(mpi)), "{s}");
    let nccl = s.lines().find(|l| l.starts_with("nccl: ")).expect("an nccl line");
    match gif_fr::distributed::Nccl::available() {
        true => assert!(nccl.starts_with("nccl: available"), "{nccl}"),
        false => assert!(nccl.contains("link libnccl.so"), "{nccl}"),
    }
}

#[test]
fn help_version_and_usage_errors() {
    let o = gif_fr(["--version"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), concat!("gif-fr ", env!("CARGO_PKG_VERSION")));
    for cmd in ["tokenize", "decode", "embed", "codebook-info", "info"] {
        let o = gif_fr([cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.contains(&format!("Usage: gif-fr {cmd}")), "{out}");
    }
    expect_exit(&gif_fr(["frobnicate"]), 2, "Usage: gif-fr");
    expect_exit(&gif_fr::<[&str; 0], &str>([]), 2, "Usage: gif-fr");
    // Errors name the flag.
    expect_exit(&gif_fr(["tokenize", "--count", "10", "--out", "x.safetensors"]), 2, "--dim");
    expect_exit(&gif_fr(["tokenize", "--count", "ten", "--dim", "3", "--out", "x"]), 2, "--count");
    expect_exit(&gif_fr(["tokenize", "--count=1", "--dim=1", "--out=x", "--device=tpu"]), 2, "--device");
    expect_exit(&gif_fr(["tokenize", "--vectors", "v.npy", "--count", "3", "--dim", "2", "--out", "x"]), 2, "--count");
    expect_exit(&gif_fr(["embed", "--arch", "r7", "--weights", "w", "--images", "i", "--out", "o"]), 2, "--arch");
    // A batch that cannot be (it used to overflow a product and panic).
    let big = ["embed", "--arch", "r18", "--weights", "w", "--images", "i", "--out", "o", "--batch"];
    expect_exit(&gif_fr(big.iter().chain(&["72057594037927936"])), 2, "--batch");
    expect_exit(&gif_fr(big.iter().chain(&["0"])), 2, "--batch");
}

#[test]
fn tokenize_writes_a_codebook_that_codebook_info_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("codes.safetensors");
    // --flag=value works as well as --flag value.
    let o = Command::new(common::gif_fr_bin())
        .args(["tokenize", "--count=300", "--dim", "8", "--vocab", "5", "--seed", "3", "--steps", "2"])
        .args(["--device", "cpu", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let book = gif_fr::tokenizer::Codebook::load(&out).unwrap();
    assert_eq!((book.len(), book.vocab(), book.length(), book.dim(), book.seed()), (300, 5, 4, 8, 3));
    let o = Command::new(common::gif_fr_bin()).arg("codebook-info").arg(&out).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("identities 300  vocab 5  length 4  dim 8  seed 3"), "{s}");
}

#[test]
fn tokenize_refuses_sizes_it_cannot_hold_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let out = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["tokenize", "--device", "cpu", "--quiet", "--out", out];
        a.extend_from_slice(extra);
        gif_fr(a)
    };
    expect_exit(&run(&["--count", "0", "--dim", "3"]), 1, "N = 0");
    // count·dim wrapped to 0 (a panic), or indexed past a slice.
    expect_exit(&run(&["--count", "2", "--dim", "9223372036854775808"]), 1, "2147483647");
    expect_exit(&run(&["--count", "4", "--dim", "4611686018427387905"]), 1, "2147483647");
    // 4.4 TB of vectors: refused before any allocation (it aborted).
    expect_exit(&run(&["--count", "2147483647", "--dim", "512"]), 1, "2^36");
    // Vec::with_capacity(steps): a capacity overflow panic, or an 8 TB abort.
    expect_exit(&run(&["--count", "10", "--dim", "4", "--steps", "18446744073709551615"]), 1, "steps must be at most");
    expect_exit(&run(&["--count", "10", "--dim", "4", "--steps", "1000000000000"]), 1, "steps must be at most");
    // O(L²) for minutes: a documented maximum.
    expect_exit(&run(&["--count", "10", "--dim", "4", "--length", "1000000"]), 1, "at most 1024");
    expect_exit(&run(&["--count", "10", "--dim", "4", "--vocab", "1"]), 1, "vocab");
    expect_exit(&run(&["--count", "70000", "--dim", "4", "--vocab", "2", "--length", "16"]), 1, "unique");
    assert!(!Path::new(out).exists(), "no codebook is written on an error");
}

#[test]
fn tokenize_reads_vectors_and_rejects_a_lying_npy_header() {
    let dir = tempfile::tempdir().unwrap();
    let (npy, out) = (dir.path().join("v.npy"), dir.path().join("codes.safetensors"));
    let values: Vec<u8> = (0..40).flat_map(|i| (i as f32 * 0.37 - 3.0).to_le_bytes()).collect();
    std::fs::write(&npy, common::npy_bytes("<f4", &[10, 4], &values)).unwrap();
    let run = || {
        Command::new(common::gif_fr_bin())
            .args(["tokenize", "--device", "cpu", "--quiet", "--vocab", "4", "--vectors"])
            .arg(&npy)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(gif_fr::tokenizer::Codebook::load(&out).unwrap().len(), 10);
    // A shape whose product wraps to 40 values (2^62·2^2 + 40): it ran with
    // N = 1 before.
    let wrapped = [(1usize << 62) + 10, 4];
    std::fs::write(&npy, common::npy_bytes("<f4", &wrapped, &values)).unwrap();
    expect_exit(&run(), 1, "shape");
    // Fewer bytes than the header says, and more.
    std::fs::write(&npy, common::npy_bytes("<f4", &[10, 4], &values[..156])).unwrap();
    expect_exit(&run(), 1, "160 bytes of data");
    std::fs::write(&npy, common::npy_bytes("<f4", &[9, 4], &values)).unwrap();
    expect_exit(&run(), 1, "144 bytes of data");
    std::fs::write(&npy, common::npy_bytes("<f4", &[10, 0], &[])).unwrap();
    expect_exit(&run(), 1, "at least one column");
    std::fs::write(&npy, b"\x93NUMPY\x01\x00garbage").unwrap();
    expect_exit(&run(), 1, "not a .npy file");
}

#[test]
fn non_utf8_paths_are_accepted() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join(OsStr::from_bytes(b"codes-\xff.safetensors"));
    // A missing file with a non-UTF-8 name: an error about the file (args() used to panic).
    let o = Command::new(common::gif_fr_bin()).arg("codebook-info").arg(&odd).output().unwrap();
    expect_exit(&o, 1, "cannot open");
    // And a real one round-trips.
    let o = Command::new(common::gif_fr_bin())
        .args(["tokenize", "--count", "20", "--dim", "3", "--device", "cpu", "--quiet", "--out"])
        .arg(&odd)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new(common::gif_fr_bin()).arg("codebook-info").arg(&odd).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn decode_writes_ids_and_scores_and_refuses_a_nan_threshold() {
    use gif_fr::decode::PrefixDecoder;
    let dir = tempfile::tempdir().unwrap();
    let (cb, npy, out) =
        (dir.path().join("book.safetensors"), dir.path().join("lp.npy"), dir.path().join("out.safetensors"));
    let o = Command::new(common::gif_fr_bin())
        .args(["tokenize", "--count", "60", "--dim", "4", "--vocab", "4", "--device", "cpu", "--quiet", "--out"])
        .arg(&cb)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let book = gif_fr::tokenizer::Codebook::load(&cb).unwrap();
    let (l, v, b) = (book.length(), 4, 3);
    let lp: Vec<f32> = (0..b * l * v).map(|i| -((i * 7919 % 97) as f32) * 0.05).collect();
    std::fs::write(&npy, common::npy_bytes("<f4", &[b, l, v], bytemuck::cast_slice(&lp))).unwrap();
    let decode = |extra: &[&str]| {
        Command::new(common::gif_fr_bin())
            .args(["decode", "--top-k", "4", "--codebook"])
            .arg(&cb)
            .arg("--scores")
            .arg(&npy)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = decode(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The file holds what the library's brute force finds.
    let want = PrefixDecoder::new(&book, &gif_fr::Device::cpu()).unwrap().brute_force(&lp, 4).unwrap();
    let file = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let ids: Vec<i64> =
        st.tensor("ids").unwrap().data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let sc: Vec<f32> =
        st.tensor("scores").unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(st.tensor("ids").unwrap().shape(), &[b, 4]);
    assert_eq!((ids, sc), (want.ids, want.scores));
    // Thresholds: NaN is refused, a negative one is a number.
    expect_exit(&decode(&["--threshold", "nan"]), 1, "threshold is NaN");
    let o = decode(&["--threshold", "-2.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn embed_reads_images_and_writes_embeddings() {
    use gif_fr::backbone::{IResNet, IResNetConfig};
    let dir = tempfile::tempdir().unwrap();
    let (weights, images, out) =
        (dir.path().join("r18.safetensors"), dir.path().join("img.npy"), dir.path().join("emb.npy"));
    let cfg = IResNetConfig::arch("r18").unwrap();
    let mut net = IResNet::new(cfg.clone(), &gif_fr::Device::cpu(), 4).unwrap();
    net.save(&weights).unwrap();
    // One uint8 RGB image.
    let pixels: Vec<u8> = (0..112 * 112 * 3).map(|i| (i * 37 % 251) as u8).collect();
    std::fs::write(&images, common::npy_bytes("|u1", &[1, 112, 112, 3], &pixels)).unwrap();
    let embed_with = |arch: &str, weights: &Path, extra: &[&str]| {
        Command::new(common::gif_fr_bin())
            .args(["embed", "--arch", arch, "--device", "cpu", "--weights"])
            .arg(weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let embed = |arch: &str| embed_with(arch, &weights, &[]);
    // --bf16: the network with bf16 convolutions (on the CPU, rounded operands).
    let o = embed_with("r18", &weights, &["--bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (emb_bf16, _) = gif_fr::io::npy::read_npy(&out).unwrap();
    let o = embed("r18");
    assert!(o.status.success(), "{}", stderr(&o));
    let (emb, shape) = gif_fr::io::npy::read_npy(&out).unwrap();
    assert_eq!(shape, vec![1, 512]);
    // The same as the library's eval forward on the normalized image.
    let norm: Vec<f32> = pixels.iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect();
    assert_eq!(emb, net.embed(&norm, 1).unwrap());
    let bf16_cfg = IResNetConfig { conv_dtype: gif_fr::DType::BF16, ..cfg.clone() };
    let mut bf16_net = IResNet::load(&weights, bf16_cfg, &gif_fr::Device::cpu()).unwrap();
    assert_eq!(emb_bf16, bf16_net.embed(&norm, 1).unwrap());
    assert_ne!(emb_bf16, emb);
    // A wrong arch for the weights, and images of the wrong shape, are errors.
    expect_exit(&embed("r34"), 1, "layer");
    std::fs::write(&images, common::npy_bytes("|u1", &[1, 64, 64, 3], &pixels[..64 * 64 * 3])).unwrap();
    expect_exit(&embed("r18"), 1, "112");
    // A header claiming 2^56 images: the element count wrapped to 0 and the
    // command "embedded" them into an empty file, or indexed an empty vector.
    std::fs::write(&images, common::npy_bytes("|u1", &[1 << 56, 3, 112, 112], &pixels)).unwrap();
    expect_exit(&embed("r18"), 1, "shape");
    std::fs::write(&images, common::npy_bytes("|u1", &[(1 << 62) / 3136 * 4, 112, 112, 3], &pixels)).unwrap();
    expect_exit(&embed("r18"), 1, "shape");
    // The weights are checked before the images are read.
    let missing = dir.path().join("missing.safetensors");
    expect_exit(&embed_with("r18", &missing, &[]), 1, "missing.safetensors");
}

#[test]
fn embed_refuses_checkpoints_that_would_embed_to_nan() {
    use gif_fr::backbone::{IResNet, IResNetConfig};
    let dir = tempfile::tempdir().unwrap();
    let (weights, images, out) =
        (dir.path().join("w.safetensors"), dir.path().join("img.npy"), dir.path().join("emb.npy"));
    let pixels: Vec<u8> = (0..112 * 112 * 3).map(|i| (i * 29 % 253) as u8).collect();
    std::fs::write(&images, common::npy_bytes("|u1", &[1, 112, 112, 3], &pixels)).unwrap();
    let cfg = IResNetConfig::arch("r18").unwrap();
    let embed = || {
        Command::new(common::gif_fr_bin())
            .args(["embed", "--arch", "r18", "--device", "cpu", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    // A state dict saved once, then edited entry by entry in its
    // safetensors bytes (as a user's converter might write it).
    IResNet::new(cfg.clone(), &gif_fr::Device::cpu(), 5).unwrap().save(&weights).unwrap();
    let saved = std::fs::read(&weights).unwrap();
    let write_with = |name: &str, value: f32, all: bool| {
        let st = safetensors::SafeTensors::deserialize(&saved).unwrap();
        let data = st.tensor(name).unwrap().data();
        let at = data.as_ptr() as usize - saved.as_ptr() as usize;
        let n = if all { data.len() } else { 4 };
        let mut bytes = saved.clone();
        bytes[at..at + n].chunks_mut(4).for_each(|c| c.copy_from_slice(&value.to_le_bytes()));
        std::fs::write(&weights, bytes).unwrap();
        let _ = std::fs::remove_file(&out);
    };
    write_with("bn1.running_var", -1.0, false);
    expect_exit(&embed(), 1, "running_var");
    write_with("layer1.0.bn2.running_var", -1e-5, false);
    expect_exit(&embed(), 1, "variance");
    // Finite weights whose products overflow f32: an error, not a NaN file.
    write_with("fc.weight", 3e38, true);
    expect_exit(&embed(), 1, "non-finite");
    assert!(!out.exists(), "no embeddings are written on an error");
}

#[test]
fn images_in_both_layouts_read_the_same() {
    use gif_fr::backbone::images::read_images;
    let dir = tempfile::tempdir().unwrap();
    let (s, b) = (16usize, 2usize);
    let pixels: Vec<u8> = (0..b * s * s * 3).map(|i| (i * 13 % 256) as u8).collect();
    let u8_path = dir.path().join("u8.npy");
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
    let f32_path = dir.path().join("f32.npy");
    std::fs::write(&f32_path, common::npy_bytes("<f4", &[b, 3, s, s], bytemuck::cast_slice(&nchw))).unwrap();
    assert_eq!(read_images(&f32_path, s).unwrap().0, from_u8);
    // Wrong layouts are errors.
    assert!(read_images(&u8_path, 32).is_err());
    std::fs::write(&f32_path, common::npy_bytes("<f4", &[b, s, s, 3], bytemuck::cast_slice(&nchw))).unwrap();
    assert!(read_images(&f32_path, s).is_err());
}

#[test]
fn synth_writes_a_training_set_and_a_verification_bin() {
    let dir = std::env::temp_dir().join(format!("gif-fr-cli-synth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = gif_fr([
        OsStr::new("synth"),
        OsStr::new("--out"),
        dir.as_os_str(),
        OsStr::new("--identities"),
        OsStr::new("5"),
        OsStr::new("--size"),
        OsStr::new("24"),
        OsStr::new("--verify-identities"),
        OsStr::new("4"),
        OsStr::new("--pairs"),
        OsStr::new("20"),
        OsStr::new("--quiet"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ds = gif_fr::data::Dataset::records(&dir, 24).unwrap();
    assert_eq!(ds.classes(), 5);
    let bin = gif_fr::io::verification::read_bin(&dir.join("synth.bin")).unwrap();
    assert_eq!(bin.pairs(), 20);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("synth.json")).unwrap()).unwrap();
    assert_eq!(json["summary"]["images"].as_u64(), Some(ds.len() as u64));
    assert_eq!(json["config"]["pose"].as_f64(), Some(12.0));
    // A knob out of range: the work fails (1) naming it; a bad pair count too.
    let o = gif_fr([OsStr::new("synth"), OsStr::new("--out"), dir.as_os_str(), OsStr::new("--pose"), OsStr::new("90")]);
    expect_exit(&o, 1, "pose");
    let o =
        gif_fr([OsStr::new("synth"), OsStr::new("--out"), dir.as_os_str(), OsStr::new("--pairs"), OsStr::new("30")]);
    expect_exit(&o, 1, "pairs");
}

#[test]
fn embed_data_identity_vectors_and_verify_stream_a_dataset() {
    use gif_fr::backbone::IResNet;
    let dir = std::env::temp_dir().join(format!("gif-fr-cli-vectors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("set");
    let cfg = gif_fr::data::synth::SynthConfig { size: 16, max_images: 5, ..gif_fr::data::synth::SynthConfig::new(6) };
    gif_fr::data::synth::write_training_set(&cfg, &data, |_, _| {}).unwrap();
    // A small network described by a train config, with random weights.
    let toml = dir.join("net.toml");
    let text = format!(
        "network = \"r18\"\nembedding_size = 8\ninput_size = 16\nstem_width = 4\nwidths = [4, 8, 8, 12]\n\
         layers = [1, 1, 1, 1]\nrec = {:?}\n",
        data.to_str().unwrap()
    );
    std::fs::write(&toml, text).unwrap();
    let net_cfg = gif_fr::train::TrainConfig::load(&toml, &[]).unwrap().network_config().unwrap();
    let weights = dir.join("net.safetensors");
    IResNet::new(net_cfg.clone(), &gif_fr::Device::cpu(), 4).unwrap().save(&weights).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let net = ["--config", &s(&toml), "--weights", &s(&weights), "--device", "cpu", "--batch", "3"];
    // embed --data: every image in order, with labels.
    let (emb, labels) = (dir.join("emb.npy"), dir.join("labels.npy"));
    let (data_s, emb_s, labels_s) = (s(&data), s(&emb), s(&labels));
    let args = ["embed", "--data", &data_s, "--out", &emb_s, "--labels-out", &labels_s, "--quiet"];
    let o = gif_fr(args.iter().copied().chain(net));
    assert!(o.status.success(), "{}", stderr(&o));
    let (e, shape) = gif_fr::io::npy::read_npy(&emb).unwrap();
    let n: usize = cfg.image_counts().iter().sum();
    assert_eq!(shape, vec![n, 8]);
    let ys = gif_fr::io::npy::read_npy_labels(&labels).unwrap();
    let want_ys: Vec<u32> = cfg.image_counts().iter().enumerate().flat_map(|(i, &c)| vec![i as u32; c]).collect();
    assert_eq!(ys, want_ys);
    // identity-vectors: the mean normalized embedding per identity, which
    // tokenize then reads.
    let vectors = dir.join("vectors.npy");
    let args = ["identity-vectors", "--data", &s(&data), "--out", &s(&vectors), "--quiet"];
    let o = gif_fr(args.iter().copied().chain(net));
    assert!(o.status.success(), "{}", stderr(&o));
    let (v, shape) = gif_fr::io::npy::read_npy(&vectors).unwrap();
    assert_eq!(shape, vec![6, 8]);
    for c in 0..6 {
        let rows: Vec<&[f32]> = e.chunks(8).zip(&ys).filter(|(_, &y)| y as usize == c).map(|(r, _)| r).collect();
        for k in 0..8 {
            let mean: f32 = rows.iter().map(|r| r[k] / r.iter().map(|x| x * x).sum::<f32>().sqrt()).sum::<f32>()
                / rows.len() as f32;
            assert!((v[c * 8 + k] - mean).abs() < 1e-4, "identity {c}: {} vs {mean}", v[c * 8 + k]);
        }
    }
    let book = dir.join("book.safetensors");
    let o = gif_fr(["tokenize", "--vectors", &s(&vectors), "--vocab", "4", "--out", &s(&book), "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // verify: insightface's lines on stdout, every number in the JSON, an SVG.
    let pairs = gif_fr::data::synth::verification_pairs(&cfg, 4, 20).unwrap();
    let bin = dir.join("synth.bin");
    gif_fr::io::verification::write_bin(&bin, &pairs).unwrap();
    let (json, svg) = (dir.join("ver.json"), dir.join("roc.svg"));
    let args = ["verify", "--bin", &s(&bin), "--json", &s(&json), "--roc", &s(&svg)];
    let o = gif_fr(args.iter().copied().chain(net));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("[synth]XNorm: ") && out.contains("[synth]Accuracy-Flip: "), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v[0]["pairs"].as_u64(), Some(20));
    assert_eq!(v[0]["tar_at_far"].as_array().map(Vec::len), Some(6));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    // Both at once, or neither: usage errors.
    let o = gif_fr(["embed", "--images", "x.npy", "--data", "d", "--out", "o.npy", "--arch", "r18", "--weights", "w"]);
    assert_eq!(o.status.code(), Some(2));
    // A path that is no dataset: the work fails naming it.
    let o = gif_fr(["embed", "--data", &s(&toml), "--out", &s(&emb)].into_iter().chain(net));
    expect_exit(&o, 1, "not a dataset");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ijb_scores_templates_from_features() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path();
    // 40 identities, 2 templates each of 3 images (2 media); features are
    // the identity's direction plus noise; insightface's [n, 2d] halves.
    let (ids, d) = (40usize, 16usize);
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let dirs: Vec<Vec<f32>> = (0..ids).map(|_| (0..d).map(|_| r.random_range(-1.0..1.0)).collect()).collect();
    let (mut tid, mut feats, mut scores) = (String::new(), Vec::new(), String::new());
    let mut img = 0;
    for (i, v) in dirs.iter().enumerate() {
        for t in 0..2 {
            for k in 0..3 {
                let name = format!("{img}.jpg");
                tid.push_str(&format!("{name} {} {}\n", 2 * i + t, 100 * (2 * i + t) + k / 2));
                scores.push_str(&format!("{name} 1 2 3 4 5 6 7 8 9 10 {}\n", 0.5 + r.random::<f32>()));
                for _ in 0..2 {
                    feats.extend(v.iter().map(|&x| x + r.random_range(-0.6..0.6)));
                }
                img += 1;
            }
        }
    }
    let mut pairs = String::new();
    for i in 0..ids {
        pairs.push_str(&format!("{} {} 1\n", 2 * i, 2 * i + 1));
        for j in 1..4 {
            pairs.push_str(&format!("{} {} 0\n", 2 * i, 2 * ((i + j) % ids) + 1));
        }
    }
    std::fs::write(meta.join("ijbb_face_tid_mid.txt"), tid).unwrap();
    std::fs::write(meta.join("ijbb_template_pair_label.txt"), pairs).unwrap();
    std::fs::write(meta.join("ijbb_name_5pts_score.txt"), scores).unwrap();
    let fp = meta.join("feats.npy");
    gif_fr::io::npy::write_npy(&fp, &feats, img, 2 * d).unwrap();
    let json = meta.join("ijb.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o =
        gif_fr(["ijb", "--meta", &s(meta), "--target", "IJBB", "--features", &s(&fp), "--halves", "--json", &s(&json)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("80 templates, 160 pairs (40 positive)"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let auc = v["auc"].as_f64().unwrap();
    assert!(auc > 0.95 && auc <= 1.0, "{auc}");
    // A feature file of another number of rows is refused, naming it.
    gif_fr::io::npy::write_npy(&fp, &feats[..2 * d * 10], 10, 2 * d).unwrap();
    let o = gif_fr(["ijb", "--meta", &s(meta), "--target", "IJBB", "--features", &s(&fp)]);
    expect_exit(&o, 1, "10 feature rows");
}

#[test]
fn experiment_runs_on_a_synth_set_and_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("out");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = gif_fr([
        "synth",
        "--out",
        &s(&data),
        "--identities",
        "20",
        "--size",
        "32",
        "--min-images",
        "2",
        "--max-images",
        "5",
        "--pairs",
        "0",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = gif_fr([
        "experiment",
        "--mode",
        "smoke",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--heads",
        "arcface,gif_random",
        "--held-out",
        "4",
        "--set",
        "lr=0.05",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("lr = 0.05"), "{table}");
    assert!(table.contains("| arcface |") && table.contains("| gif_random |"), "{table}");
    assert!(table.contains("N = 16 training identities"), "{table}");
    assert!(out.join("report.md").exists() && out.join("experiment.json").exists());
    assert!(std::fs::read_to_string(out.join("experiment.log")).unwrap().contains("4 held out"));
    let o = gif_fr(["experiment", "--mode", "medium", "--out", &s(&out)]);
    expect_exit(&o, 1, "smoke, quick or full");
    let o = gif_fr(["experiment", "--mode", "smoke", "--out", &s(&out), "--heads", "softmax"]);
    expect_exit(&o, 1, "gif_random");
    let o = gif_fr(["experiment", "--data", &s(&data), "--out", &s(&out), "--held-out", "19", "--quiet"]);
    expect_exit(&o, 1, "too few");
}
