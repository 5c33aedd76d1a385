//! `gif-fr train` end to end on the CPU (src/train/run.rs, config.rs): a
//! small IResNet trained with each head from a TOML config on synthetic
//! identities written as .npy; the loss falls and the accuracy rises in
//! metrics.csv; a run stopped and resumed ends with the same model, bit for
//! bit, as a straight one; the model embeds with `gif-fr embed --config`;
//! the same images as .npy arrays, an identity-folder tree of PNGs and an
//! insightface RecordIO set train identically; bad configs are errors
//! naming the key.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn gif_fr(args: &[&str]) -> Output {
    Command::new(gif_fr_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// 24 identities × 10 images of 16 × 16 (uint8 RGB around a per-identity
/// prototype), labels int64.
fn write_data(dir: &Path) {
    let (ids, per, s) = (24usize, 10usize, 16usize);
    let mut r = rng(1);
    let px = s * s * 3;
    let protos: Vec<Vec<f32>> = (0..ids).map(|_| uniform(&mut r, px, 40.0, 215.0)).collect();
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..per {
        for (id, p) in protos.iter().enumerate() {
            let noise = uniform(&mut r, px, -75.0, 75.0);
            images.extend(p.iter().zip(&noise).map(|(a, b)| (a + b).clamp(0.0, 255.0) as u8));
            labels.push(id as i64);
        }
    }
    std::fs::write(dir.join("x.npy"), npy_bytes("|u1", &[ids * per, s, s, 3], &images)).unwrap();
    let lb: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    std::fs::write(dir.join("y.npy"), npy_bytes("<i8", &[ids * per], &lb)).unwrap();
}

/// A config for the small network on the CPU, writing to `out`.
fn write_config(dir: &Path, out: &Path, head: &str) -> PathBuf {
    // Partial FC samples half the classes; the others train on every one.
    let text = format!(
        r#"
network = "r18"
embedding_size = 16
input_size = 16
stem_width = 4
widths = [4, 8, 8, 12]
layers = [1, 1, 1, 1]
margin_list = [1.0, 0.0, 0.1]
scale = 16.0
sample_rate = {rate}
batch_size = 24
lr = 0.1
num_epoch = 4
warmup_epoch = 1
frequent = 2
seed = 7
vocab = 4
images = "{x}"
labels = "{y}"
output = "{out}"
device = "cpu"
head = "{head}"
num_workers = 2
dali = false
"#,
        x = dir.join("x.npy").display(),
        y = dir.join("y.npy").display(),
        out = out.display(),
        rate = if head == "partial_fc" { 0.5 } else { 1.0 }
    );
    let path = dir.join(format!("{}.toml", out.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&path, text).unwrap();
    path
}

/// metrics.csv's (loss, accuracy) rows.
fn metrics(out: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,epoch,loss,accuracy,lr,images_per_s,grad_norm,skipped"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gif-fr-train-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn train_each_head_resume_and_embed() {
    let dir = temp_dir("heads");
    write_data(&dir);
    for head in ["gif", "arcface", "partial_fc"] {
        let straight = dir.join(format!("{head}-straight"));
        let cfg = write_config(&dir, &straight, head);
        let cfg_s = cfg.to_str().unwrap();
        let o = gif_fr(&["train", "--config", cfg_s, "--quiet"]);
        assert!(o.status.success(), "{head}: {}", stderr(&o));
        let log = stderr(&o);
        assert!(log.contains("dali ignored"), "{log}");
        assert!(log.contains("Speed") && log.contains("Global Step: 40"), "{log}");
        let m = metrics(&straight);
        let (first, last) = (m[0], m[m.len() - 1]);
        println!("{head}: loss {:.3} -> {:.3}, accuracy {:.3} -> {:.3}", first.0, last.0, first.1, last.1);
        assert!(last.0 < 0.5 * first.0, "{head}: {m:?}");
        assert!(last.1 > first.1 + 0.3, "{head}: {m:?}");

        // Stopped after 13 steps (mid-epoch), resumed to the end: the same
        // model, bit for bit.
        let cut = dir.join(format!("{head}-cut"));
        let cfg_cut = write_config(&dir, &cut, head);
        let c = cfg_cut.to_str().unwrap();
        assert!(gif_fr(&["train", "--config", c, "--quiet", "--stop-after", "13"]).status.success());
        let o = gif_fr(&["train", "--config", c, "--quiet", "--resume"]);
        assert!(o.status.success(), "{head}: {}", stderr(&o));
        assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert!(read(&straight) == read(&cut), "{head}: the resumed run's model differs from the straight run's");
        assert!(
            std::fs::read(straight.join("checkpoint.safetensors")).unwrap()
                == std::fs::read(cut.join("checkpoint.safetensors")).unwrap(),
            "{head}: checkpoints differ"
        );

        // The model embeds with `gif-fr embed`.
        let emb = dir.join(format!("{head}-emb.npy"));
        let o = gif_fr(&[
            "embed",
            "--config",
            cfg_s,
            "--weights",
            straight.join("model.safetensors").to_str().unwrap(),
            "--images",
            dir.join("x.npy").to_str().unwrap(),
            "--out",
            emb.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{head}: {}", stderr(&o));
        let (e, shape) = gif_fr::io::npy::read_npy(&emb).unwrap();
        assert_eq!(shape, vec![240, 16]);
        assert!(e.iter().all(|x| x.is_finite()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_name_the_key() {
    let dir = temp_dir("bad");
    write_data(&dir);
    let out = dir.join("out");
    let cfg = write_config(&dir, &out, "gif");
    let c = cfg.to_str().unwrap();
    for (set, needle) in [
        ("foo=1", "unknown field `foo`"),
        ("lr=0", "lr: 0 must be finite and > 0"),
        ("lr=-1", "lr"),
        ("lr=\"fast\"", "invalid type"),
        ("optimizer=\"adam\"", "optimizer"),
        ("head=\"softmax\"", "head"),
        ("rec=\"/nonexistent/faces\"", "/nonexistent/faces/train.rec"),
        ("warmup_epoch=9", "warmup_epoch"),
        ("input_size=20", "network shape"),
        ("batch_size=1000", "batch_size"),
        ("num_classes=3", "num_classes"),
        ("vocab=1", "vocab"),
        ("margin_list=[1.0, 4.0, 0.0]", "margin_list"),
    ] {
        let o = gif_fr(&["train", "--config", c, "--quiet", "--set", set]);
        assert_eq!(o.status.code(), Some(1), "{set}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{set}: expected {needle:?} in {}", stderr(&o));
    }
    // Steps past the counter (an epoch's steps times num_epoch): a typed
    // error naming the key, not an overflow.
    let t = gif_fr::train::TrainConfig::load(&cfg, &["num_epoch=1048576".into()]).unwrap();
    let e = t.trainer_config(usize::MAX).unwrap_err().to_string();
    assert!(e.contains("num_epoch") && e.contains("overflow the step counter"), "{e}");
    assert!(t.trainer_config(1 << 20).is_ok());
    // --resume without a checkpoint; a missing config file.
    let o = gif_fr(&["train", "--config", c, "--quiet", "--resume"]);
    assert!(stderr(&o).contains("no checkpoint"), "{}", stderr(&o));
    let o = gif_fr(&["train", "--config", dir.join("none.toml").to_str().unwrap()]);
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The set of [`write_data`] (in its order: identity-major within each
/// round) as PNG files under `dir/folder/idNN/KKK.png` and as a RecordIO set
/// under `dir/rec` with record 0's header and `property`, both in the
/// arrays' order.
fn write_other_sources(dir: &Path) {
    use gif_fr::io::recordio::{pack, ImageHeader, RecordWriter};
    let (images, shape) = {
        let bytes = std::fs::read(dir.join("x.npy")).unwrap();
        let (npy, shape, _) = gif_fr::io::npy::open_npy(&dir.join("x.npy"), &bytes).unwrap();
        (npy.into_vec::<u8>().unwrap(), shape)
    };
    let labels = gif_fr::io::npy::read_npy_labels(&dir.join("y.npy")).unwrap();
    let (n, s) = (shape[0], shape[1]);
    let px = s * s * 3;
    // The folder order is (label, file name): name the files by their
    // index in the arrays, and sort the arrays' order the same way.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (labels[i], i));
    let png = |i: usize| {
        let mut out = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut out);
        image::ImageEncoder::write_image(
            enc,
            &images[i * px..(i + 1) * px],
            s as u32,
            s as u32,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        out
    };
    std::fs::create_dir_all(dir.join("rec")).unwrap();
    let mut w = RecordWriter::create(&dir.join("rec/train.rec"), Some(&dir.join("rec/train.idx"))).unwrap();
    let head = ImageHeader { flag: 2, labels: vec![(n + 1) as f32, (n + 25) as f32], id: 0, id2: 0 };
    w.write(0, &pack(&head, b"")).unwrap();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (k, &i) in order.iter().enumerate() {
        let d = dir.join(format!("folder/id{:02}", labels[i]));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{i:03}.png")), png(i)).unwrap();
        w.write(1 + k as u64, &pack(&ImageHeader::new(labels[i] as f32, k as u64), &png(i))).unwrap();
        xs.extend_from_slice(&images[i * px..(i + 1) * px]);
        ys.extend((labels[i] as i64).to_le_bytes());
    }
    w.finish().unwrap();
    std::fs::write(dir.join("rec/property"), format!("24,{s},{s}")).unwrap();
    // The arrays in the folder's order.
    std::fs::write(dir.join("xs.npy"), npy_bytes("|u1", &[n, s, s, 3], &xs)).unwrap();
    std::fs::write(dir.join("ys.npy"), npy_bytes("<i8", &[n], &ys)).unwrap();
}

#[test]
fn arrays_folders_and_recordio_train_identically() {
    let dir = temp_dir("sources");
    write_data(&dir);
    write_other_sources(&dir);
    let mut runs = Vec::new();
    for (name, set) in [
        (
            "arrays",
            vec![
                format!("images=\"{}\"", dir.join("xs.npy").display()),
                format!("labels=\"{}\"", dir.join("ys.npy").display()),
            ],
        ),
        ("folder", vec![format!("images=\"{}\"", dir.join("folder").display())]),
        ("rec", vec![format!("rec=\"{}\"", dir.join("rec").display())]),
    ] {
        let out = dir.join(format!("out-{name}"));
        let cfg = write_config(&dir, &out, "arcface");
        let mut args = vec!["train".to_string(), "--config".into(), cfg.to_str().unwrap().into(), "--quiet".into()];
        args.extend(["--set".into(), "num_epoch=2".into(), "--set".into(), "warmup_epoch=0".into()]);
        for kv in &set {
            args.extend(["--set".to_string(), kv.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = gif_fr(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        runs.push((name, std::fs::read(out.join("model.safetensors")).unwrap(), metrics(&out)));
    }
    for (name, model, m) in &runs[1..] {
        assert!(m == &runs[0].2, "{name}: metrics differ from the arrays' run: {m:?} vs {:?}", runs[0].2);
        assert!(model == &runs[0].1, "{name}: the model differs from the arrays' run");
    }
    // A corrupt image in the folder: training stops naming it, unless
    // skip_corrupt, which trains on and logs the count.
    let bad = std::fs::read_dir(dir.join("folder/id03")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&bad, b"not a png").unwrap();
    let name = bad.file_name().unwrap().to_str().unwrap().to_string();
    for skip in [false, true] {
        let out = dir.join(format!("out-corrupt-{skip}"));
        let cfg = write_config(&dir, &out, "arcface");
        let images = format!("images=\"{}\"", dir.join("folder").display());
        let skip_kv = format!("skip_corrupt={skip}");
        let cfg = cfg.to_str().unwrap();
        let o = gif_fr(&[
            "train",
            "--config",
            cfg,
            "--quiet",
            "--set",
            &images,
            "--set",
            &skip_kv,
            "--set",
            "num_epoch=1",
            "--set",
            "warmup_epoch=0",
        ]);
        let log = std::fs::read_to_string(out.join("training.log")).unwrap_or_default();
        if skip {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(log.contains("skipped 1 unreadable images") && log.contains(&name), "{log}");
        } else {
            assert!(!o.status.success());
            assert!(stderr(&o).contains(&name), "{}", stderr(&o));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verification_during_training_logs_insightface_lines_and_a_csv() {
    let dir = temp_dir("verify");
    write_data(&dir);
    // A verification set of synthetic identities at the network's size.
    let cfg = gif_fr::data::synth::SynthConfig { size: 16, ..gif_fr::data::synth::SynthConfig::new(1) };
    let set = gif_fr::data::synth::verification_pairs(&cfg, 6, 40).unwrap();
    let bin = dir.join("synth.bin");
    gif_fr::io::verification::write_bin(&bin, &set).unwrap();
    let out = dir.join("run");
    let c = write_config(&dir, &out, "arcface");
    let c = c.to_str().unwrap();
    let targets = format!("val_targets=[{:?}, \"lfw\"]", bin.to_str().unwrap());
    let o = gif_fr(&["train", "--config", c, "--quiet", "--set", &targets, "--set", "verbose=15"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(out.join("training.log")).unwrap();
    // Steps 15 and 30, and the last (40); lfw.bin is not there: skipped.
    for step in [15, 30, 40] {
        assert!(log.contains(&format!("[synth][{step}]Accuracy-Flip: ")), "{log}");
        assert!(log.contains(&format!("[synth][{step}]XNorm: ")), "{log}");
    }
    assert!(log.contains("[synth][40]Accuracy-Highest: "), "{log}");
    assert!(log.contains("val_targets: lfw skipped"), "{log}");
    let csv = std::fs::read_to_string(out.join("verification.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "step,target,xnorm,accuracy,accuracy_std,accuracy_highest,val,auc,eer");
    assert_eq!(rows.len(), 4, "{csv}");
    for r in &rows[1..] {
        let acc: f64 = r.split(',').nth(3).unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
    }
    // A bad verbose is refused naming the key.
    let o = gif_fr(&["train", "--config", c, "--quiet", "--set", "verbose=0"]);
    assert!(stderr(&o).contains("verbose"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}
