//! The data pipeline's speed (src/data/mod.rs): decoding, normalizing and
//! flipping one 112 × 112 JPEG (quality 95, insightface's im2rec default)
//! on one core, and the loader's batches of 128 from a RecordIO set with
//! 1 and 2 worker threads. Images/s per core says how many cores keep a
//! GPU's training step fed (docs/data.md).
//!
//! Run: `cargo bench --bench data`.

mod common;

use std::sync::Arc;

use gif_fr::data::{decode_into, Dataset, Loader, Sampler};
use gif_fr::io::recordio::{pack, ImageHeader, RecordWriter};
use rand::{Rng, SeedableRng};

const S: usize = 112;

/// A face-like JPEG: smooth gradients and blobs, not noise (noise would
/// make JPEG slower than real faces).
fn jpeg(seed: u64) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let (cx, cy, rad): (f32, f32, f32) =
        (r.random_range(40.0..72.0), r.random_range(40.0..72.0), r.random_range(20.0..40.0));
    let base: [f32; 3] = [r.random_range(60.0..200.0), r.random_range(60.0..200.0), r.random_range(60.0..200.0)];
    let mut px = Vec::with_capacity(S * S * 3);
    for y in 0..S {
        for x in 0..S {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() / rad;
            for c in base {
                px.push((c * (1.2 - 0.5 * d.min(2.0)) + (x + y) as f32 * 0.2).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
    image::ImageEncoder::write_image(enc, &px, S as u32, S as u32, image::ExtendedColorType::Rgb8).expect("encode");
    out
}

fn main() {
    let mut c = common::criterion();
    let cpu = gif_fr::Device::cpu();
    let images: Vec<Vec<u8>> = (0..64).map(jpeg).collect();
    let mean_bytes = images.iter().map(Vec::len).sum::<usize>() / images.len();
    println!("64 JPEGs of {S} x {S}, quality 95: {mean_bytes} bytes on average");
    let mut g = c.benchmark_group("data/cpu");
    g.sampling_mode(criterion::SamplingMode::Flat);
    let mut out = vec![0f32; S * S * 3];
    let mut k = 0usize;
    let case = "decode + normalize one 112x112 JPEG (1 core)".to_string();
    let mut one = || -> gif_fr::Result<()> {
        k = (k + 1) % images.len();
        decode_into(&images[k], S, &mut out).map_err(|m| gif_fr::Error::InvalidArgument { op: "decode", message: m })
    };
    g.bench_function("decode", |b| b.iter_custom(|iters| common::timed(&cpu, &case, 0.0, 0.0, iters, &mut one)));

    // A RecordIO set of 1,024 of them, and the loader's batches of 128.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut w = RecordWriter::create(&dir.path().join("train.rec"), Some(&dir.path().join("train.idx"))).expect("rec");
    for i in 0..1024u64 {
        w.write(i, &pack(&ImageHeader::new((i % 100) as f32, i), &images[i as usize % 64])).expect("write");
    }
    w.finish().expect("finish");
    let ds = Arc::new(Dataset::records(dir.path(), S).expect("dataset"));
    let mut cases = vec![case];
    for workers in [1usize, 2] {
        let loader = Loader::new(ds.clone(), Sampler::new(ds.len(), 128, 1), workers, 4, true).expect("loader");
        let case = format!("loader: a batch of 128 from RecordIO, {workers} worker(s)");
        let mut epoch = 0u64;
        let mut it = loader.epoch(epoch, 0).expect("epoch");
        let mut next = || -> gif_fr::Result<()> {
            loop {
                if let Some(b) = it.next() {
                    return b.map(drop);
                }
                epoch += 1;
                it = loader.epoch(epoch, 0)?;
            }
        };
        g.bench_function(format!("loader {workers}"), |b| {
            b.iter_custom(|iters| common::timed(&cpu, &case, 0.0, 0.0, iters, &mut next))
        });
        cases.push(case);
    }
    g.finish();
    c.final_summary();
    println!("\n### data pipeline, images/s\n");
    println!("| case | mean per call | images/s |");
    println!("|---|---|---|");
    for (i, case) in cases.iter().enumerate() {
        if let Some(s) = common::mean_seconds(case, "cpu") {
            let n = if i == 0 { 1.0 } else { 128.0 };
            println!("| {case} | {:.3} ms | {:.0} |", s * 1e3, n / s);
        }
    }
    common::print_summary("data");
}
