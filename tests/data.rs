//! Face datasets (src/data/mod.rs): PNG and JPEG decoding to insightface's
//! normalization, image folders (ImageFolder's labels), insightface RecordIO
//! sets of encoded images, keyed flips, the sampler (seeded epochs,
//! DistributedSampler sharding, drop_last), and the loader (worker threads
//! give the batches of the calling thread, in order; an undecodable image
//! ends the epoch with an error naming it).

mod common;

use std::path::Path;
use std::sync::Arc;

use gif_fr::data::{decode_into, flipped, Dataset, Loader, Sampler};
use gif_fr::io::recordio::{pack, ImageHeader, RecordWriter};
use rand::{Rng, SeedableRng};

const S: usize = 8;

/// A random S × S RGB image.
fn rgb(seed: u64) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..S * S * 3).map(|_| r.random()).collect()
}

fn png(pixels: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut out);
    image::ImageEncoder::write_image(enc, pixels, size as u32, size as u32, image::ExtendedColorType::Rgb8).unwrap();
    out
}

/// `ids` identity folders (id0, id1, …) of `per` random PNGs each (0.png,
/// 1.png, …; image k of identity i drawn from seed `step`·i + k).
fn identity_folders(dir: &Path, ids: u64, per: u64, step: u64) {
    for id in 0..ids {
        let d = dir.join(format!("id{id}"));
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..per {
            std::fs::write(d.join(format!("{k}.png")), png(&rgb(step * id + k), S)).unwrap();
        }
    }
}

fn jpeg(pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100);
    image::ImageEncoder::write_image(enc, pixels, S as u32, S as u32, image::ExtendedColorType::Rgb8).unwrap();
    out
}

fn normalized(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect()
}

fn mirrored(img: &[f32]) -> Vec<f32> {
    let mut out = img.to_vec();
    for y in 0..S {
        for x in 0..S {
            for c in 0..3 {
                out[(y * S + x) * 3 + c] = img[(y * S + (S - 1 - x)) * 3 + c];
            }
        }
    }
    out
}

#[test]
fn png_and_jpeg_decode_to_insightface_normalization() {
    let px = rgb(1);
    let mut out = vec![f32::NAN; S * S * 3];
    decode_into(&png(&px, S), S, &mut out).unwrap();
    assert_eq!(out, normalized(&px), "PNG is lossless");
    // A smooth image survives JPEG at quality 100 within a few levels.
    let smooth: Vec<u8> = (0..S * S * 3).map(|i| (i / 3 % S * 20 + i % 3 * 30) as u8).collect();
    decode_into(&jpeg(&smooth), S, &mut out).unwrap();
    let err = out.iter().zip(normalized(&smooth)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 12.0 / 127.5, "JPEG error {err}");
    // Another size, garbage, a format not read.
    let e = decode_into(&png(&rgb(2)[..], S), S + 1, &mut out).unwrap_err();
    assert!(e.contains("8 x 8") && e.contains("9 x 9"), "{e}");
    assert!(decode_into(b"not an image at all", S, &mut out).is_err());
    assert!(decode_into(b"GIF89a\x01\x00\x01\x00", S, &mut out).unwrap_err().contains("Gif"));
    let mut cut = png(&px, S);
    cut.truncate(cut.len() / 2);
    assert!(decode_into(&cut, S, &mut out).unwrap_err().contains("cannot decode"));
}

/// Identity folders "b", "a", "c" (labels by sorted name: a 0, b 1, c 2),
/// two PNGs each, and a stray text file.
fn folder(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut want = Vec::new();
    for (name, label) in [("b", 1u32), ("a", 0), ("c", 2)] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for k in 0..2 {
            let px = rgb(10 * label as u64 + k);
            let file = format!("{k}.png");
            std::fs::write(dir.join(name).join(&file), png(&px, S)).unwrap();
            want.push((format!("{name}/{file}"), label, px));
        }
        std::fs::write(dir.join(name).join("notes.txt"), "not an image").unwrap();
    }
    want.sort();
    want
}

#[test]
fn image_folders_label_sorted_identities() {
    let dir = tempfile::tempdir().unwrap();
    let want = folder(dir.path());
    let ds = Dataset::folder(dir.path(), S).unwrap();
    assert_eq!((ds.len(), ds.classes()), (6, 3));
    let mut out = vec![0f32; S * S * 3];
    for (i, (_, label, px)) in want.iter().enumerate() {
        assert_eq!(ds.read(i, false, &mut out).unwrap(), *label);
        assert_eq!(out, normalized(px));
        assert_eq!(ds.read(i, true, &mut out).unwrap(), *label);
        assert_eq!(out, mirrored(&normalized(px)));
    }
    // A corrupt file is an error naming it; an empty folder is refused.
    std::fs::write(dir.path().join("a").join("0.png"), b"\x89PNG broken").unwrap();
    let e = ds.read(0, false, &mut out).unwrap_err().to_string();
    assert!(e.contains("0.png"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert!(Dataset::folder(empty.path(), S).is_err());
}

#[test]
fn recordio_sets_of_encoded_images() {
    let dir = tempfile::tempdir().unwrap();
    let labels = [2u32, 0, 1, 2, 1];
    let mut w = RecordWriter::create(&dir.path().join("train.rec"), Some(&dir.path().join("train.idx"))).unwrap();
    let n = labels.len() as f32;
    w.write(0, &pack(&ImageHeader { flag: 2, labels: vec![n + 1.0, n + 4.0], id: 0, id2: 0 }, b"")).unwrap();
    for (i, &y) in labels.iter().enumerate() {
        w.write(1 + i as u64, &pack(&ImageHeader::new(y as f32, i as u64), &png(&rgb(i as u64), S))).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.path().join("property"), format!("3,{S},{S}")).unwrap();
    let ds = Dataset::records(dir.path(), S).unwrap();
    assert_eq!((ds.len(), ds.classes()), (5, 3));
    let mut out = vec![0f32; S * S * 3];
    for (i, &y) in labels.iter().enumerate() {
        assert_eq!(ds.read(i, false, &mut out).unwrap(), y);
        assert_eq!(out, normalized(&rgb(i as u64)));
    }
    // The property's size must be the network's.
    assert!(Dataset::records(dir.path(), 112).err().expect("an error").to_string().contains("112"));
    // Without property, the classes come from the labels.
    std::fs::remove_file(dir.path().join("property")).unwrap();
    assert_eq!(Dataset::records(dir.path(), S).unwrap().classes(), 3);
}

#[test]
fn flips_are_keyed_and_fair() {
    let n = 10_000;
    let a: Vec<bool> = (0..n).map(|i| flipped(7, 3, i)).collect();
    assert_eq!(a, (0..n).map(|i| flipped(7, 3, i)).collect::<Vec<_>>());
    let ones = a.iter().filter(|&&f| f).count();
    assert!((4700..5300).contains(&ones), "{ones} of {n}");
    let other_epoch = (0..n).filter(|&i| flipped(7, 4, i) != a[i]).count();
    assert!((4700..5300).contains(&other_epoch), "epochs are independent: {other_epoch}");
}

#[test]
fn the_sampler_shuffles_by_epoch_shards_like_distributed_sampler_and_drops_the_last_batch() {
    let (len, batch) = (103, 10);
    let s = Sampler::new(len, batch, 5);
    let e0 = s.epoch(0).unwrap();
    assert_eq!(e0.len(), 10, "drop_last: 10 full batches of 103");
    let mut seen: Vec<usize> = e0.iter().flatten().copied().collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 100, "no image twice in an epoch");
    assert_eq!(s.epoch(0).unwrap(), e0, "seeded");
    assert_ne!(s.epoch(1).unwrap(), e0, "a new order each epoch");
    assert_ne!(Sampler::new(len, batch, 6).epoch(0).unwrap(), e0);
    // Three ranks: ⌈103/3⌉ = 35 each (2 padded from the permutation's
    // start), together every image, each rank's positions disjoint.
    let world = 3;
    let ranks: Vec<Vec<usize>> = (0..world)
        .map(|rank| {
            let r = Sampler { rank, world, batch: 1, ..s.clone() };
            assert_eq!((r.per_rank(), r.batches_per_epoch()), (35, 35));
            r.epoch(2).unwrap().concat()
        })
        .collect();
    let mut all: Vec<usize> = ranks.concat();
    assert_eq!(all.len(), 105);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 103, "every image on some rank");
    // Rank r holds positions r, r + 3, … of one permutation: interleaving
    // the ranks gives a sequence whose first 103 entries are distinct.
    let inter: Vec<usize> = (0..35).flat_map(|k| ranks.iter().map(move |r| r[k])).collect();
    let mut head = inter[..103].to_vec();
    head.sort();
    head.dedup();
    assert_eq!(head.len(), 103);
    assert_eq!(&inter[103..], &inter[..2], "padding repeats the start");
    // Unshuffled: the dataset's order.
    let plain = Sampler { shuffle: false, ..s.clone() };
    assert_eq!(plain.epoch(0).unwrap()[0], (0..10).collect::<Vec<_>>());
    assert!(Sampler { rank: 3, world: 3, ..s.clone() }.epoch(0).is_err());
    assert!(Sampler { batch: 0, ..s }.epoch(0).is_err());
}

#[test]
fn worker_threads_give_the_calling_threads_batches_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // 4 identities × 6 images.
    identity_folders(dir.path(), 4, 6, 100);
    let ds = Arc::new(Dataset::folder(dir.path(), S).unwrap());
    let sampler = Sampler::new(ds.len(), 5, 9);
    let inline = Loader::new(ds.clone(), sampler.clone(), 0, 1, true).unwrap();
    let threads = Loader::new(ds.clone(), sampler.clone(), 3, 2, true).unwrap();
    for epoch in 0..2 {
        let a: Vec<_> = inline.epoch(epoch, 0).unwrap().map(Result::unwrap).collect();
        let b: Vec<_> = threads.epoch(epoch, 0).unwrap().map(Result::unwrap).collect();
        assert_eq!(a.len(), 4);
        assert!(a == b, "epoch {epoch}: the threads' batches differ");
        // Resuming mid-epoch gives the rest of the same epoch.
        let rest: Vec<_> = threads.epoch(epoch, 2).unwrap().map(Result::unwrap).collect();
        assert!(rest[..] == a[2..]);
        // Some images are flipped, some not.
        let labels: Vec<u32> = a.iter().flat_map(|b| b.labels.clone()).collect();
        assert!(labels.iter().all(|&y| y < 4));
    }
    // Dropping an epoch early stops its workers (no hang).
    let mut it = threads.epoch(0, 0).unwrap();
    assert!(it.next().unwrap().is_ok());
    drop(it);
    // An undecodable image ends the epoch with an error naming it.
    std::fs::write(dir.path().join("id2").join("3.png"), b"garbage").unwrap();
    let results: Vec<_> = threads.epoch(1, 0).unwrap().collect();
    let err = results.iter().find_map(|r| r.as_ref().err()).expect("an error").to_string();
    assert!(err.contains("3.png"), "{err}");
    assert!(results.last().unwrap().is_err(), "the epoch stops at the error");
}

#[test]
fn images_of_another_size_are_refused_or_resized_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("id0");
    std::fs::create_dir_all(&d).unwrap();
    // A random 2S x 2S image, a constant one, and a 2S x S one.
    let mut r = rand::rngs::StdRng::seed_from_u64(4);
    let big: Vec<u8> = (0..4 * S * S * 3).map(|_| r.random()).collect();
    std::fs::write(d.join("0.png"), png(&big, 2 * S)).unwrap();
    std::fs::write(d.join("1.png"), png(&[40u8, 120, 200].repeat(4 * S * S), 2 * S)).unwrap();
    let mut wide = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut wide);
    image::ImageEncoder::write_image(
        enc,
        &big[..2 * S * S * 3],
        2 * S as u32,
        S as u32,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    std::fs::write(d.join("2.png"), wide).unwrap();
    let mut out = vec![0f32; S * S * 3];
    // The default: a typed error naming the file and both sizes.
    let ds = Dataset::folder(dir.path(), S).unwrap();
    let e = ds.read(0, false, &mut out).unwrap_err().to_string();
    assert!(e.contains("0.png") && e.contains("16 x 16 image") && e.contains("8 x 8"), "{e}");
    // Resizing: the image crate's bilinear resize, normalized.
    let ds = ds.resizing(true);
    ds.read(0, false, &mut out).unwrap();
    let img = image::RgbImage::from_raw(2 * S as u32, 2 * S as u32, big).unwrap();
    let small = image::imageops::resize(&img, S as u32, S as u32, image::imageops::FilterType::Triangle);
    let want: Vec<f32> = small.into_raw().iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect();
    assert!(out == want);
    // A constant image stays that constant.
    ds.read(1, false, &mut out).unwrap();
    let c = [40u8, 120, 200].map(|p| (p as f32 / 255.0 - 0.5) / 0.5);
    assert!(out.chunks_exact(3).all(|p| p == c), "{:?}", &out[..6]);
    // Not square: an error even when resizing.
    let e = ds.read(2, false, &mut out).unwrap_err().to_string();
    assert!(e.contains("2.png") && e.contains("only square images"), "{e}");
}

#[test]
fn a_skipping_loader_replaces_unreadable_images_by_the_next_that_reads() {
    let dir = tempfile::tempdir().unwrap();
    // 3 identities × 4 images: images 0-3, 4-7, 8-11 (sorted names);
    // batches of 4 use all 12 each epoch.
    identity_folders(dir.path(), 3, 4, 10);
    // Images 6 and 7 unreadable: 6 is replaced by 8 (7 is skipped too).
    std::fs::write(dir.path().join("id1").join("2.png"), b"garbage").unwrap();
    std::fs::write(dir.path().join("id1").join("3.png"), png(&vec![99; 4 * S * S * 3], 2 * S)).unwrap(); // another size
    let ds = Arc::new(Dataset::folder(dir.path(), S).unwrap());
    let sampler = Sampler::new(ds.len(), 4, 11);
    // The default: the epoch ends with the error.
    let strict = Loader::new(ds.clone(), sampler.clone(), 2, 2, true).unwrap();
    assert!(strict.skipped().is_none());
    assert!(strict.epoch(0, 0).unwrap().any(|r| r.is_err()));
    let inline = Loader::new(ds.clone(), sampler.clone(), 0, 1, true).unwrap().skip_corrupt(true);
    let threads = Loader::new(ds.clone(), sampler.clone(), 3, 2, true).unwrap().skip_corrupt(true);
    let per = S * S * 3;
    for epoch in 0..2 {
        let a: Vec<_> = inline.epoch(epoch, 0).unwrap().map(Result::unwrap).collect();
        let b: Vec<_> = threads.epoch(epoch, 0).unwrap().map(Result::unwrap).collect();
        assert_eq!(a.len(), 3);
        assert!(a == b, "epoch {epoch}: the threads' batches differ");
        // Where the sampler put images 6 and 7: image 8 (label 2, flipped
        // by its own key) in both places; every other sample as it is.
        for (batch, indices) in a.iter().zip(sampler.epoch(epoch).unwrap()) {
            assert_eq!(batch.labels.len(), 4);
            for (k, &i) in indices.iter().enumerate() {
                let j = if i == 6 || i == 7 { 8 } else { i };
                let mut want = vec![0f32; per];
                let y = ds.read(j, flipped(11, epoch, j), &mut want).unwrap();
                assert_eq!(batch.labels[k], y, "epoch {epoch}: image {i}");
                assert!(batch.images[k * per..(k + 1) * per] == want[..], "epoch {epoch}: image {i}");
            }
        }
    }
    // Image 6 fails twice a pass (itself, then 7 on the way to 8), image 7
    // once: 3 a pass, 2 passes an epoch (inline and threads) for 2 epochs.
    for l in [&inline, &threads] {
        let sk = l.skipped().unwrap();
        assert_eq!(sk.count, 6, "{sk:?}");
        assert!(
            sk.errors.iter().any(|e| e.contains("2.png")) && sk.errors.iter().any(|e| e.contains("3.png")),
            "{sk:?}"
        );
    }
    // No image reads: an error, not a hang.
    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(bad.path().join("a")).unwrap();
    for k in 0..3 {
        std::fs::write(bad.path().join("a").join(format!("{k}.png")), b"garbage").unwrap();
    }
    let ds = Arc::new(Dataset::folder(bad.path(), S).unwrap());
    let l = Loader::new(ds.clone(), Sampler::new(3, 2, 1), 0, 1, false).unwrap().skip_corrupt(true);
    let e = l.epoch(0, 0).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(e.contains("no image of") && e.contains(".png"), "{e}");
}

/// The workers run at most `prefetch + workers` batches ahead of the
/// consumer, also when one of them stalls on an image (a named pipe that
/// nobody writes yet): the others do not run through the epoch.
#[cfg(all(unix, feature = "sim"))]
#[test]
fn workers_stay_within_their_window_while_one_image_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("id0");
    std::fs::create_dir_all(&d).unwrap();
    let n = 40;
    for k in 0..n {
        std::fs::write(d.join(format!("{k:02}.png")), png(&rgb(k as u64), S)).unwrap();
    }
    let ds = Arc::new(Dataset::folder(dir.path(), S).unwrap());
    // (After listing the folder, which takes regular files only.)
    let pipe = d.join("05.png");
    std::fs::remove_file(&pipe).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&pipe).status().unwrap().success());
    // Batches of 2 (20 an epoch); a seed that puts image 5 in one of the
    // first batches, so that the epoch extends far past the window.
    let (workers, prefetch) = (3, 2);
    let window = workers + prefetch;
    let (sampler, stalled) = (0..)
        .find_map(|seed| {
            let s = Sampler::new(n, 2, seed);
            let b = s.epoch(0).unwrap().iter().position(|b| b.contains(&5)).unwrap();
            (b <= 3).then_some((s, b))
        })
        .unwrap();
    let dev = gif_fr::Device::sim();
    let loader = Arc::new(Loader::new(ds, sampler, workers, prefetch, false).unwrap().pinned(&dev).unwrap());
    let started = |l: &Loader| {
        let p = l.pool_stats().unwrap();
        p.allocated + p.reused + p.pageable
    };
    // Another thread writes the pipe after a while, noting how many
    // batches the workers had started by then.
    let writer = {
        let (loader, pipe) = (loader.clone(), pipe.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(400));
            let seen = started(&loader);
            std::fs::write(&pipe, png(&rgb(5), S)).unwrap();
            seen
        })
    };
    let got = loader.epoch(0, 0).unwrap().map(Result::unwrap).count();
    let seen = writer.join().unwrap();
    assert_eq!(got, 20);
    // The consumer took the batches before the stalled one; the workers
    // may have started that one and the window's others after it.
    println!("batch {stalled} stalled; {seen} batches started meanwhile (window {window})");
    assert!(seen <= stalled + window, "{seen} batches started while batch {stalled} stalled (window {window})");
}

#[cfg(feature = "sim")]
#[test]
fn a_pinned_loader_recycles_page_locked_buffers_and_never_stalls() {
    let dir = tempfile::tempdir().unwrap();
    // 3 identities × 7 images, batches of 4: 5 a epoch.
    identity_folders(dir.path(), 3, 7, 50);
    let ds = Arc::new(Dataset::folder(dir.path(), S).unwrap());
    let sampler = Sampler::new(ds.len(), 4, 5);
    let plain = Loader::new(ds.clone(), sampler.clone(), 2, 2, true).unwrap();
    let dev = gif_fr::Device::sim();
    assert!(plain.pool_stats().is_none());
    for (workers, prefetch) in [(0, 1), (2, 2)] {
        let loader = Loader::new(ds.clone(), sampler.clone(), workers, prefetch, true).unwrap().pinned(&dev).unwrap();
        assert_eq!(loader.pinned_for(), Some(&dev));
        let max = prefetch + workers + 2;
        dev.reset_stats();
        // Three epochs consumed one batch at a time, as training does: the
        // same batches as ordinary memory, every one page-locked.
        for epoch in 0..3 {
            let want: Vec<_> = plain.epoch(epoch, 0).unwrap().map(Result::unwrap).collect();
            let mut n = 0;
            for (k, b) in loader.epoch(epoch, 0).unwrap().enumerate() {
                let b = b.unwrap();
                assert!(b.images.pinned().is_some(), "workers {workers}: batch {k} of epoch {epoch} not page-locked");
                assert!(b == want[k], "workers {workers}: batch {k} of epoch {epoch} differs");
                n += 1;
            }
            assert_eq!(n, want.len());
        }
        let st = loader.pool_stats().unwrap();
        println!("workers {workers}, prefetch {prefetch}: {st:?}");
        // Buffers are allocated once (at most what can be in use at once)
        // and recycled: 15 batches.
        assert!(st.allocated >= 1 && st.allocated <= max, "{st:?}");
        assert_eq!((st.allocated + st.reused, st.pageable, st.error.as_ref()), (15, 0, None), "{st:?}");
        assert_eq!(dev.stats().unwrap().pinned_allocations, st.allocated as u64);
        // A consumer that keeps every batch: the pool runs out, the rest
        // come in ordinary memory (counted), nothing stalls.
        let kept: Vec<_> = (0..3).flat_map(|e| loader.epoch(e, 0).unwrap().map(Result::unwrap)).collect();
        let st2 = loader.pool_stats().unwrap();
        assert_eq!(st2.allocated, max, "{st2:?}");
        assert_eq!(kept.iter().filter(|b| b.images.pinned().is_some()).count(), max);
        assert_eq!(st2.pageable, 15 - max, "{st2:?}");
        drop(kept);
        // Back in the pool: the next epoch allocates nothing.
        let _: Vec<_> = loader.epoch(0, 0).unwrap().map(Result::unwrap).map(|b| b.images.into_vec()).collect();
        assert_eq!(loader.pool_stats().unwrap().allocated, max);
    }
    // The CPU device has nothing to page-lock.
    assert!(Loader::new(ds, sampler, 0, 1, false).unwrap().pinned(&gif_fr::Device::cpu()).is_err());
}

/// A small network of 16 x 16 inputs and 6-dimensional embeddings.
fn tiny_net(seed: u64) -> gif_fr::backbone::IResNet {
    let cfg = common::tiny_iresnet();
    gif_fr::backbone::IResNet::new(cfg, &gif_fr::Device::cpu(), seed).unwrap()
}

#[test]
fn a_dataset_embeds_in_order_in_batches_and_averages_per_identity() {
    use gif_fr::data::synth::{write_training_set, SynthConfig};
    use gif_fr::data::{embed_dataset, identity_vectors};
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { size: 16, min_images: 2, max_images: 6, seed: 3, ..SynthConfig::new(5) };
    write_training_set(&cfg, dir.path(), |_, _| {}).unwrap();
    let ds = Dataset::open(dir.path(), 16).unwrap();
    let n = ds.len();
    let per = ds.pixels_per_image();
    // What the network gives image by image.
    let mut net = tiny_net(9);
    let mut all = vec![0f32; n * per];
    let labels: Vec<u32> = all.chunks_mut(per).enumerate().map(|(i, out)| ds.read(i, false, out).unwrap()).collect();
    let want = net.embed(&all, n).unwrap();
    // Streamed in batches of 4 (n is not a multiple): the same rows, in order.
    let (mut got, mut got_labels, mut starts, mut last) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
    embed_dataset(
        &mut net,
        &ds,
        4,
        false,
        |start, l, e| {
            starts.push(start);
            got_labels.extend_from_slice(l);
            got.extend_from_slice(e);
            Ok(())
        },
        |done, total| last = (done, total),
    )
    .unwrap();
    assert_ne!(n % 4, 0, "the set should not fill whole batches");
    assert_eq!(starts, (0..n).step_by(4).collect::<Vec<_>>());
    assert_eq!((got_labels, last), (labels.clone(), (n, n)));
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // The mean of each identity's normalized embeddings.
    let (v, classes, e) = identity_vectors(&mut net, &ds, 3, |_, _| {}).unwrap();
    assert_eq!((classes, e, v.len()), (5, 6, 30));
    for c in 0..classes {
        let rows: Vec<&[f32]> = want.chunks(e).zip(&labels).filter(|(_, &y)| y as usize == c).map(|(r, _)| r).collect();
        assert_eq!(rows.len(), cfg.image_counts()[c]);
        for k in 0..e {
            let mean = rows
                .iter()
                .map(|r| r[k] as f64 / r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
                .sum::<f64>()
                / rows.len() as f64;
            assert!((v[c * e + k] as f64 - mean).abs() < 1e-5, "identity {c} dim {k}: {} vs {mean}", v[c * e + k]);
        }
    }
    // An identity with no images (property claims a sixth) is an error
    // naming it; a network of another input size too.
    std::fs::write(dir.path().join("property"), "6,16,16").unwrap();
    let ds6 = Dataset::open(dir.path(), 16).unwrap();
    let e = identity_vectors(&mut net, &ds6, 4, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("identity 5 has no images"), "{e}");
    let ds8 = Dataset::encoded(vec![png(&rgb(1), S)], S, Path::new("mem"));
    assert!(embed_dataset(&mut net, &ds8, 4, false, |_, _, _| Ok(()), |_, _| {}).is_err());
}

#[test]
fn a_corrupt_image_stops_the_pass_naming_it() {
    use gif_fr::data::embed_dataset;
    // Random 16 x 16 images (the network's size).
    let mut images: Vec<Vec<u8>> = (0..7u64)
        .map(|i| {
            let mut r = rand::rngs::StdRng::seed_from_u64(i);
            png(&(0..16 * 16 * 3).map(|_| r.random()).collect::<Vec<u8>>(), 16)
        })
        .collect();
    images[5] = b"\x89PNG broken".to_vec();
    let ds = Dataset::encoded(images, 16, Path::new("pairs.bin"));
    let mut net = tiny_net(1);
    let mut seen = 0;
    let e = embed_dataset(
        &mut net,
        &ds,
        2,
        false,
        |_, l, _| {
            seen += l.len();
            Ok(())
        },
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("image 5"), "{e}");
    assert_eq!(seen, 4, "the batches before the bad one, and none after");
}

#[test]
fn datasets_open_by_what_the_path_is() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path());
    assert_eq!(Dataset::open(dir.path(), S).unwrap().classes(), 3);
    let set = gif_fr::io::verification::PairSet {
        images: (0..4).map(|i| png(&rgb(i), S)).collect(),
        issame: vec![true, false],
    };
    let bin = dir.path().join("pairs.bin");
    gif_fr::io::verification::write_bin(&bin, &set).unwrap();
    let ds = Dataset::open(&bin, S).unwrap();
    let mut out = vec![0f32; S * S * 3];
    assert_eq!((ds.len(), ds.read(3, false, &mut out).unwrap()), (4, 0));
    assert_eq!(out, normalized(&rgb(3)));
    let other = dir.path().join("x.txt");
    std::fs::write(&other, "x").unwrap();
    assert!(Dataset::open(&other, S).err().expect("an error").to_string().contains("not a dataset"));
}

#[test]
fn a_header_scan_reports_progress_and_subsets_relabel_without_a_copy() {
    use gif_fr::data::synth::{write_training_set, SynthConfig};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { size: 16, min_images: 2, max_images: 4, seed: 4, ..SynthConfig::new(6) };
    write_training_set(&cfg, dir.path(), |_, _| {}).unwrap();
    // With `property` the classes are read from it: no scan.
    let mut calls = Vec::new();
    let ds = Dataset::open_with(dir.path(), 16, |d, t| calls.push((d, t))).unwrap();
    assert!(calls.is_empty());
    let n = ds.len();
    // Without it every header is read once, and the scan says so at its end.
    std::fs::remove_file(dir.path().join("property")).unwrap();
    let scanned = Dataset::open_with(dir.path(), 16, |d, t| calls.push((d, t))).unwrap();
    assert_eq!(scanned.classes(), 6);
    assert_eq!(calls.last(), Some(&(n, n)));
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
    // A subset: images 3, 0 of the set with new labels, the same pixels.
    let base = Arc::new(scanned);
    let sub = Dataset::subset(base.clone(), vec![3, 0], vec![1, 7]).unwrap();
    assert_eq!((sub.len(), sub.classes()), (2, 8));
    let per = base.pixels_per_image();
    let (mut a, mut b) = (vec![0f32; per], vec![0f32; per]);
    assert_eq!(sub.read(0, true, &mut a).unwrap(), 1);
    base.read(3, true, &mut b).unwrap();
    assert_eq!(a, b, "a subset's image (flipped) is its base image (flipped)");
    assert_eq!(sub.label(1).unwrap(), 7);
    assert!(sub.read(2, false, &mut a).is_err() && sub.label(2).is_err());
    // Bad subsets are typed errors.
    assert!(Dataset::subset(base.clone(), vec![], vec![]).is_err());
    assert!(Dataset::subset(base.clone(), vec![0, 1], vec![0]).is_err());
    assert!(Dataset::subset(base, vec![n], vec![0]).is_err());
}
