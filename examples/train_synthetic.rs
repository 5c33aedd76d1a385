//! Writes a small synthetic face-recognition set and `gif-fr train`
//! configs for it, to try training in a minute on a CPU:
//!
//!     cargo run --release --example train_synthetic -- DIR [IDS] [PER]
//!     cargo run --release -- train --config DIR/gif.toml
//!
//! IDS identities (default 64) × PER images (default 16) of 32 × 32 RGB:
//! a random prototype per identity plus uniform noise, as uint8 `x.npy`
//! and int64 `y.npy`; configs `gif.toml`, `arcface.toml`, `partial_fc.toml`
//! for a small IResNet (stages of one block, widths 8–32, embedding 32),
//! writing to `DIR/out-<head>`. (The data issue brings a real generator
//! and real datasets.)

use std::path::Path;

use rand::{Rng, SeedableRng};

fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = vec![0x93, b'N', b'U', b'M', b'P', b'Y', 1, 0];
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(data);
    out
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: train_synthetic DIR [IDS] [PER]");
        std::process::exit(2);
    };
    let ids: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let per: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let s = 32;
    let px = s * s * 3;
    let mut r = rand::rngs::StdRng::seed_from_u64(1);
    let protos: Vec<Vec<f32>> = (0..ids).map(|_| (0..px).map(|_| r.random_range(40.0..215.0)).collect()).collect();
    let (mut images, mut labels) = (Vec::with_capacity(ids * per * px), Vec::new());
    for _ in 0..per {
        for (id, p) in protos.iter().enumerate() {
            images.extend(p.iter().map(|&a| (a + r.random_range(-75.0f32..75.0)).clamp(0.0, 255.0) as u8));
            labels.extend((id as i64).to_le_bytes());
        }
    }
    let n = ids * per;
    std::fs::write(dir.join("x.npy"), npy("|u1", &[n, s, s, 3], &images))?;
    std::fs::write(dir.join("y.npy"), npy("<i8", &[n], &labels))?;
    let abs = std::fs::canonicalize(dir)?;
    for head in ["gif", "arcface", "partial_fc"] {
        let rate = if head == "partial_fc" { 0.3 } else { 1.0 };
        let text = format!(
            r#"# A small IResNet on synthetic identities (examples/train_synthetic.rs).
network = "r18"
embedding_size = 32
input_size = {s}
stem_width = 8
widths = [8, 16, 24, 32]
layers = [1, 1, 1, 1]
margin_list = [1.0, 0.0, 0.2]
scale = 16.0
sample_rate = {rate}
batch_size = 64
lr = 0.1
num_epoch = 8
warmup_epoch = 1
frequent = 4
head = "{head}"
vocab = 8
images = "{x}"
labels = "{y}"
output = "{out}"
device = "cpu"
"#,
            x = abs.join("x.npy").display(),
            y = abs.join("y.npy").display(),
            out = abs.join(format!("out-{head}")).display(),
        );
        std::fs::write(dir.join(format!("{head}.toml")), text)?;
    }
    println!("wrote {n} images of {ids} identities and gif.toml, arcface.toml, partial_fc.toml to {}", dir.display());
    println!("train: cargo run --release -- train --config {}", dir.join("gif.toml").display());
    Ok(())
}
