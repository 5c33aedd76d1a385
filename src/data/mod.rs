//! Face datasets for training: where the images come from ([`Dataset`]:
//! insightface's RecordIO sets, one folder per identity, `.npy` arrays),
//! how they are decoded (JPEG and PNG with the `image` crate: zune-jpeg and
//! png, both pure Rust), normalized as insightface does (`(x/255 − 0.5) /
//! 0.5`, RGB) and flipped (a random horizontal flip keyed by (seed, epoch,
//! sample), so a run reproduces whatever the thread timing), in which order
//! ([`Sampler`]: a seeded shuffle per epoch, PyTorch's DistributedSampler
//! sharding, drop_last), and ahead of the step ([`Loader`]: worker threads
//! filling a bounded queue of batches, delivered in order; for a GPU,
//! decoded into recycled page-locked buffers that the trainer uploads
//! without waiting, [`Loader::pinned`]). [`synth`] generates learnable face
//! identities.

pub mod align;
mod embed;
mod pool;
pub mod synth;

pub use embed::{embed_dataset, identity_vectors};
pub use pool::{Images, PoolStats};

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::io::recordio::FaceRecords;
use crate::runtime::device::Device;
use crate::runtime::hash::splitmix64;

/// Where the images are.
enum Source {
    /// insightface's train.rec / train.idx / property.
    Records(FaceRecords),
    /// One sub-folder per identity (sorted names → labels 0, 1, …), image
    /// files sorted by name.
    Folder { files: Vec<(PathBuf, u32)> },
    /// Normalized f32 NHWC pixels in memory, with their labels.
    Array { pixels: Vec<f32>, labels: Vec<u32> },
    /// Encoded images in memory (a verification set's), every label 0.
    Encoded { images: Vec<Vec<u8>> },
    /// Some images of another dataset, relabeled.
    Subset { base: Arc<Dataset>, index: Vec<usize>, labels: Vec<u32> },
}

/// A face dataset of square RGB images of one size (see the module
/// documentation).
pub struct Dataset {
    source: Source,
    size: usize,
    classes: usize,
    origin: PathBuf,
    /// Square images of another size are resized ([`Dataset::resizing`]).
    resize: bool,
}

/// File name extensions read as images (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

impl Dataset {
    /// insightface's RecordIO set in `dir` (train.rec, train.idx, and
    /// property when present: its class count is used, else the largest
    /// label + 1, found by reading every header once). Images must be
    /// `size` × `size`.
    pub fn records(dir: &Path, size: usize) -> Result<Dataset> {
        Dataset::records_with(dir, size, |_, _| {})
    }

    /// [`Dataset::records`], calling `progress(done, total)` while it
    /// reads every header of a set without `property` (every 65,536
    /// images, and at the end); a set with `property` calls it never.
    pub fn records_with(dir: &Path, size: usize, mut progress: impl FnMut(usize, usize)) -> Result<Dataset> {
        let recs = FaceRecords::open(dir)?;
        if recs.is_empty() {
            return Err(Error::file(&dir.join("train.rec"), "no images"));
        }
        let classes = match recs.property() {
            Some((c, h, w)) => {
                if (h, w) != (size, size) {
                    return Err(Error::file(
                        &dir.join("property"),
                        format!("images of {h} x {w}; the network takes {size} x {size}"),
                    ));
                }
                c
            }
            None => {
                let mut max = 0u32;
                let n = recs.len();
                for i in 0..n {
                    max = max.max(recs.get(i)?.0);
                    if (i + 1) % (1 << 16) == 0 || i + 1 == n {
                        progress(i + 1, n);
                    }
                }
                max as usize + 1
            }
        };
        Ok(Dataset { source: Source::Records(recs), size, classes, origin: dir.to_path_buf(), resize: false })
    }

    /// One sub-folder per identity under `dir` (torchvision's ImageFolder:
    /// sub-folders sorted by name get labels 0, 1, …; their .jpg, .jpeg
    /// and .png files, sorted by name, are the images).
    pub fn folder(dir: &Path, size: usize) -> Result<Dataset> {
        let io = |p: &Path, e: std::io::Error| Error::file(p, format!("cannot read the directory: {e}"));
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::file(dir, "no identity sub-folders"));
        }
        let mut files = Vec::new();
        for (label, c) in classes.iter().enumerate() {
            let label = u32::try_from(label).map_err(|_| Error::file(dir, "more than 2^32 identities"))?;
            let mut imgs: Vec<PathBuf> = std::fs::read_dir(c)
                .map_err(|e| io(c, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|x| x.to_str())
                            .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
                })
                .collect();
            imgs.sort();
            files.extend(imgs.into_iter().map(|p| (p, label)));
        }
        if files.is_empty() {
            return Err(Error::file(dir, "no .jpg, .jpeg or .png images in the identity folders"));
        }
        let (source, classes) = (Source::Folder { files }, classes.len());
        Ok(Dataset { source, size, classes, origin: dir.to_path_buf(), resize: false })
    }

    /// Images from a `.npy` array (see [`crate::backbone::images::read_images`])
    /// with labels from another (1-D integers).
    pub fn arrays(images: &Path, labels: &Path, size: usize) -> Result<Dataset> {
        let (pixels, count) = crate::backbone::images::read_images(images, size)?;
        let labels_v = crate::io::npy::read_npy_labels(labels)?;
        if labels_v.len() != count {
            return Err(Error::file(labels, format!("{} labels for {count} images", labels_v.len())));
        }
        if count == 0 {
            return Err(Error::file(images, "no images"));
        }
        let classes = labels_v.iter().copied().max().unwrap_or(0) as usize + 1;
        let source = Source::Array { pixels, labels: labels_v };
        Ok(Dataset { source, size, classes, origin: images.to_path_buf(), resize: false })
    }

    /// The 2·P images of an insightface verification set (`.bin`, see
    /// [`crate::io::verification`]), in the file's order: pair i is images
    /// 2i and 2i + 1. Every label is 0 (one class); whether a pair is of
    /// one identity is the set's `issame`. Square images of another size
    /// are resized, as insightface's `load_bin` does ([`Dataset::resizing`]).
    pub fn verification(path: &Path, size: usize) -> Result<Dataset> {
        let set = crate::io::verification::read_bin(path)?;
        Ok(Dataset::encoded(set.images, size, path).resizing(true))
    }

    /// Encoded (JPEG / PNG) images in memory, every label 0; `origin`
    /// names them in errors.
    pub fn encoded(images: Vec<Vec<u8>>, size: usize, origin: &Path) -> Dataset {
        Dataset { source: Source::Encoded { images }, size, classes: 1, origin: origin.to_path_buf(), resize: false }
    }

    /// Opens `path` by what it is: a directory with `train.rec` (RecordIO),
    /// another directory (identity folders), a `.bin` (a verification
    /// set), or a `.npy` of images (labels 0: an embedding pass needs
    /// none).
    pub fn open(path: &Path, size: usize) -> Result<Dataset> {
        Dataset::open_with(path, size, |_, _| {})
    }

    /// [`Dataset::open`], with the progress of a RecordIO header scan (see
    /// [`Dataset::records_with`]).
    pub fn open_with(path: &Path, size: usize, progress: impl FnMut(usize, usize)) -> Result<Dataset> {
        if path.is_dir() {
            return if path.join("train.rec").exists() {
                Dataset::records_with(path, size, progress)
            } else {
                Dataset::folder(path, size)
            };
        }
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("bin") => Dataset::verification(path, size),
            Some("npy") => {
                let (pixels, count) = crate::backbone::images::read_images(path, size)?;
                if count == 0 {
                    return Err(Error::file(path, "no images"));
                }
                let source = Source::Array { pixels, labels: vec![0; count] };
                Ok(Dataset { source, size, classes: 1, origin: path.to_path_buf(), resize: false })
            }
            _ => Err(Error::file(
                path,
                "not a dataset: give a RecordIO directory (train.rec, train.idx), a directory of identity folders, \
                 a verification .bin or a .npy of images",
            )),
        }
    }

    /// Images `index` of `base` (in that order) with new `labels`: a
    /// split of a dataset (identities held out, probe images) without a
    /// copy of its images. The classes are the largest label + 1. Errors:
    /// no image, lengths that differ, an index out of range.
    pub fn subset(base: Arc<Dataset>, index: Vec<usize>, labels: Vec<u32>) -> Result<Dataset> {
        const OP: &str = "Dataset::subset";
        if index.is_empty() {
            return Err(Error::invalid(OP, "no image"));
        }
        if index.len() != labels.len() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("a label per image ({} images)", index.len()),
                got: format!("{} labels", labels.len()),
            });
        }
        if let Some(&i) = index.iter().find(|&&i| i >= base.len()) {
            return Err(base.out_of_range(i));
        }
        let classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
        let (size, origin, resize) = (base.size, base.origin.clone(), base.resize);
        Ok(Dataset { source: Source::Subset { base, index, labels }, size, classes, origin, resize })
    }

    /// Resizes square images of another size to the network's (bilinear:
    /// the image crate's triangle filter, as insightface's evaluation
    /// resizes a verification set's images that are not 112 × 112) instead
    /// of refusing them (the default: aligned faces come at the network's
    /// size, and another size usually means unaligned data). Images that are
    /// not square are still an error (an aligned face is square; cropping
    /// would be a guess). `.npy` arrays must match the size either way.
    pub fn resizing(mut self, on: bool) -> Dataset {
        self.resize = on;
        self
    }

    /// The images.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Subset { index, .. } => index.len(),
            Source::Records(r) => r.len(),
            Source::Folder { files } => files.len(),
            Source::Array { labels, .. } => labels.len(),
            Source::Encoded { images } => images.len(),
        }
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the images come from (a directory or file), as errors name it.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The identities N (labels are below it).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The images' height and width.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Values per image: size · size · 3.
    pub fn pixels_per_image(&self) -> usize {
        self.size * self.size * 3
    }

    /// The label of image `i` (a RecordIO set reads its header).
    pub fn label(&self, i: usize) -> Result<u32> {
        match &self.source {
            Source::Records(r) => Ok(r.get(i)?.0),
            Source::Folder { files } => files.get(i).map(|f| f.1).ok_or_else(|| self.out_of_range(i)),
            Source::Array { labels, .. } => labels.get(i).copied().ok_or_else(|| self.out_of_range(i)),
            Source::Encoded { images } => images.get(i).map(|_| 0).ok_or_else(|| self.out_of_range(i)),
            Source::Subset { labels, .. } => labels.get(i).copied().ok_or_else(|| self.out_of_range(i)),
        }
    }

    fn out_of_range(&self, i: usize) -> Error {
        Error::invalid("Dataset", format!("image {i} of {} in {}", self.len(), self.origin.display()))
    }

    /// Decodes one encoded image at this dataset's size (resizing when
    /// asked).
    fn decode(&self, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
        decode_sized(bytes, self.size, self.resize, out)
    }

    /// Image `i`, decoded, normalized and (when `flip`) mirrored left to
    /// right, into `out` (NHWC f32, [`Dataset::pixels_per_image`] values);
    /// returns its label. A file that does not decode, or of another size,
    /// is an [`Error::File`] naming it.
    pub fn read(&self, i: usize, flip: bool, out: &mut [f32]) -> Result<u32> {
        let (s, per) = (self.size, self.pixels_per_image());
        if out.len() != per {
            return Err(Error::invalid("Dataset::read", format!("{} values for a {s} x {s} x 3 image", out.len())));
        }
        let label = match &self.source {
            Source::Subset { base, index, labels } => {
                let j = *index.get(i).ok_or_else(|| self.out_of_range(i))?;
                base.read(j, false, out)?;
                labels[i]
            }
            Source::Array { pixels, labels } => {
                let src = pixels.get(i * per..(i + 1) * per).ok_or_else(|| self.out_of_range(i))?;
                out.copy_from_slice(src);
                labels[i]
            }
            Source::Records(r) => {
                let (label, bytes) = r.get(i)?;
                let what = || self.origin.join(format!("train.rec (image {i})"));
                self.decode(&bytes, out).map_err(|m| Error::file(&what(), m))?;
                label
            }
            Source::Folder { files } => {
                let (path, label) = files.get(i).ok_or_else(|| self.out_of_range(i))?;
                let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
                self.decode(&bytes, out).map_err(|m| Error::file(path, m))?;
                *label
            }
            Source::Encoded { images } => {
                let bytes = images.get(i).ok_or_else(|| self.out_of_range(i))?;
                let what = || self.origin.join(format!("image {i}"));
                self.decode(bytes, out).map_err(|m| Error::file(&what(), m))?;
                0
            }
        };
        if flip {
            flip_in_place(out, s);
        }
        Ok(label)
    }
}

/// Decodes a JPEG or PNG of `size` × `size` into normalized RGB f32 NHWC.
pub fn decode_into(bytes: &[u8], size: usize, out: &mut [f32]) -> std::result::Result<(), String> {
    decode_sized(bytes, size, false, out)
}

/// [`decode_into`], resizing a square image of another size to `size` ×
/// `size` first when `resize` ([`Dataset::resizing`]).
pub fn decode_sized(bytes: &[u8], size: usize, resize: bool, out: &mut [f32]) -> std::result::Result<(), String> {
    let (w, h, rgb) = decode_rgb(bytes)?;
    let rgb = match (w, h) {
        _ if (w, h) == (size, size) => rgb,
        _ if resize && w == h => {
            let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
                .ok_or_else(|| format!("a {w} x {h} image with {} bytes (internal error)", 3 * w * h))?;
            image::imageops::resize(&img, size as u32, size as u32, image::imageops::FilterType::Triangle).into_raw()
        }
        _ if resize => return Err(format!("a {w} x {h} image: only square images are resized to {size} x {size}")),
        _ => {
            return Err(format!(
                "a {w} x {h} image; the network takes {size} x {size} (aligned faces; `resize` resizes square ones)"
            ))
        }
    };
    if rgb.len() != out.len() {
        return Err(format!("{} values for {} (internal error)", rgb.len(), out.len()));
    }
    for (o, &p) in out.iter_mut().zip(&rgb) {
        *o = crate::backbone::images::normalize(p);
    }
    Ok(())
}

/// Decodes a JPEG or PNG of any size (up to 4096 × 4096) to RGB u8:
/// `(width, height, pixels)`. Grayscale and RGBA are converted.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    let format = image::guess_format(bytes).map_err(|e| format!("not an image this crate decodes: {e}"))?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(format!("a {format:?} image; JPEG and PNG are read"));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // A hostile header cannot make the decoder allocate more than this.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(4096);
    limits.max_image_height = Some(4096);
    limits.max_alloc = Some(256 << 20);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode the {format:?} image: {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((w, h, img.into_rgb8().into_raw()))
}

/// Mirrors an NHWC image of `size` × `size` × 3 left to right.
pub(crate) fn flip_in_place(img: &mut [f32], size: usize) {
    for row in img.chunks_exact_mut(size * 3) {
        for x in 0..size / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
            }
        }
    }
}

/// Whether sample `i` of `epoch` is flipped (probability ½, keyed by
/// (seed, epoch, i): the same in every run and on every thread).
pub fn flipped(seed: u64, epoch: u64, i: usize) -> bool {
    splitmix64(splitmix64(seed ^ 0x9e37_79b9_7f4a_7c15) ^ splitmix64(epoch) ^ (i as u64).rotate_left(32)) & 1 == 1
}

/// The order of an epoch for one rank: PyTorch's DistributedSampler (a
/// permutation of every index seeded by (seed, epoch), padded by repeating
/// its start to a multiple of the world size, rank r taking positions r,
/// r + W, …), cut into batches with the last partial one dropped
/// (insightface's `drop_last=True`).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    /// Images in the dataset.
    pub len: usize,
    /// Images per batch.
    pub batch: usize,
    /// The shuffle's seed.
    pub seed: u64,
    /// This rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// Whether to shuffle (training) or keep the dataset's order.
    pub shuffle: bool,
}

impl Sampler {
    /// One rank of one, shuffled.
    pub fn new(len: usize, batch: usize, seed: u64) -> Sampler {
        Sampler { len, batch, seed, rank: 0, world: 1, shuffle: true }
    }

    fn check(&self) -> Result<()> {
        if self.batch == 0 || self.world == 0 || self.rank >= self.world || self.len == 0 {
            return Err(Error::invalid("Sampler", format!("{self:?}: batch and world positive, rank < world, images")));
        }
        Ok(())
    }

    /// Images this rank sees in an epoch: ⌈len / world⌉.
    pub fn per_rank(&self) -> usize {
        self.len.div_ceil(self.world.max(1))
    }

    /// Batches per epoch (drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        self.per_rank() / self.batch.max(1)
    }

    /// The batches of `epoch` for this rank: dataset indices.
    pub fn epoch(&self, epoch: u64) -> Result<Vec<Vec<usize>>> {
        self.check()?;
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let key = splitmix64(self.seed ^ splitmix64(epoch.wrapping_add(0x5eed)));
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(key));
        }
        let total = self.per_rank() * self.world;
        let mut k = 0;
        while order.len() < total {
            order.push(order[k]);
            k += 1;
        }
        let mine: Vec<usize> = order.into_iter().skip(self.rank).step_by(self.world).collect();
        Ok(mine.chunks_exact(self.batch).map(<[usize]>::to_vec).collect())
    }
}

/// A batch: NHWC f32 images (normalized, flipped as keyed) and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, size, size, 3]` values (page-locked when the loader is
    /// [`Loader::pinned`]).
    pub images: Images,
    /// B labels.
    pub labels: Vec<u32>,
}

/// Decodes batches ahead of the training step on worker threads (see the
/// module documentation).
pub struct Loader {
    dataset: Arc<Dataset>,
    sampler: Sampler,
    /// Worker threads (0: decode on the calling thread).
    workers: usize,
    /// Batches decoded ahead, at most.
    prefetch: usize,
    /// Random horizontal flips (insightface's RandomHorizontalFlip).
    flip: bool,
    /// Page-locked batch buffers for a GPU ([`Loader::pinned`]).
    pool: Option<Arc<pool::Pool>>,
    /// Images that failed to read, when they are skipped
    /// ([`Loader::skip_corrupt`]).
    skips: Option<Arc<std::sync::Mutex<Skipped>>>,
}

/// The images a [`Loader::skip_corrupt`] loader skipped so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Reads that failed (an image skipped twice counts twice).
    pub count: usize,
    /// The first errors (at most [`Skipped::KEPT`]), naming file, record
    /// or image.
    pub errors: Vec<String>,
}

impl Skipped {
    /// How many errors [`Skipped::errors`] keeps.
    pub const KEPT: usize = 10;
}

impl Loader {
    /// A loader of `dataset` in `sampler`'s order, with `workers` threads
    /// and up to `prefetch` batches ready ahead; `flip`: mirror each image
    /// with probability ½ (keyed).
    pub fn new(dataset: Arc<Dataset>, sampler: Sampler, workers: usize, prefetch: usize, flip: bool) -> Result<Loader> {
        sampler.check()?;
        if sampler.len != dataset.len() {
            return Err(Error::invalid("Loader", format!("a sampler of {} images for {}", sampler.len, dataset.len())));
        }
        Ok(Loader { dataset, sampler, workers, prefetch: prefetch.max(1), flip, pool: None, skips: None })
    }

    /// Skips images that fail to read (a corrupt or truncated file or
    /// record, another size, not RGB) instead of ending the epoch with the
    /// error (the default): the sample is replaced by the next image of the
    /// dataset that reads (image i + 1, i + 2, … cyclically: the batch keeps
    /// its size, which data-parallel ranks need, and the choice does not
    /// depend on thread timing), and the failure is counted
    /// ([`Loader::skipped`]). Only failures of the image itself are
    /// skipped; an index outside the dataset is still an error, and so is a
    /// dataset where no image reads.
    pub fn skip_corrupt(mut self, on: bool) -> Loader {
        self.skips = on.then(Default::default);
        self
    }

    /// The images skipped so far (None unless [`Loader::skip_corrupt`]).
    pub fn skipped(&self) -> Option<Skipped> {
        self.skips.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Decodes the batches into page-locked buffers for `device` (a GPU, or
    /// the simulator standing for one), recycled from batch to batch and
    /// epoch to epoch: as many as can be in use at once (the queue, one a
    /// worker, the batch being trained on and the one whose upload may
    /// still run), allocated as first needed. `Trainer::step_batch` uploads
    /// such a batch without waiting, beside the step before. A batch kept
    /// longer falls back to ordinary memory ([`Loader::pool_stats`]); so
    /// does every batch if the driver cannot page-lock memory. Errors: the
    /// CPU device, a batch size that overflows.
    pub fn pinned(mut self, device: &Device) -> Result<Loader> {
        const OP: &str = "Loader::pinned";
        if !device.runs_kernels() {
            return Err(Error::invalid(OP, "the CPU device reads batches where they are: nothing to page-lock"));
        }
        let len = self
            .sampler
            .batch
            .checked_mul(self.dataset.pixels_per_image())
            .ok_or_else(|| Error::invalid(OP, "a batch's size overflows"))?;
        let max = self.prefetch.saturating_add(self.workers).saturating_add(2);
        self.pool = Some(Arc::new(pool::Pool::new(device, len, max)));
        Ok(self)
    }

    /// What the page-locked pool did so far (None without [`Loader::pinned`]).
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.pool.as_ref().map(|p| p.stats())
    }

    /// The device the batches are page-locked for.
    pub fn pinned_for(&self) -> Option<&Device> {
        self.pool.as_ref().map(|p| p.device())
    }

    /// The sampler.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The batches of `epoch` from batch `start` on, in order: decoded by
    /// the workers into a queue of at most `prefetch` batches (the iterator
    /// stops the workers when dropped). A decoding error ends the epoch
    /// with that error.
    pub fn epoch(&self, epoch: u64, start: usize) -> Result<EpochIter> {
        let batches: Vec<Vec<usize>> = self.sampler.epoch(epoch)?.into_iter().skip(start).collect();
        let maker = Maker {
            dataset: self.dataset.clone(),
            pool: self.pool.clone(),
            skips: self.skips.clone(),
            seed: self.sampler.seed,
            flip: self.flip,
            epoch,
        };
        if self.workers == 0 {
            return Ok(EpochIter(Epoch::Inline { maker, batches, next: 0 }));
        }
        let maker = Arc::new(maker);
        let batches = Arc::new(batches);
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<Batch>)>(self.prefetch);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // At most `window` batches are made ahead of the consumer (queued,
        // waiting in the reorder buffer, or being decoded): a worker that
        // claimed a batch further ahead waits, so that a slow image on one
        // worker cannot let the others run through the epoch.
        let window = self.prefetch.saturating_add(self.workers);
        let gate = Arc::new(Gate::default());
        let mut handles = Vec::new();
        for _ in 0..self.workers {
            let (maker, batches, tx, next, gate) =
                (maker.clone(), batches.clone(), tx.clone(), next.clone(), gate.clone());
            handles.push(std::thread::spawn(move || loop {
                // Batches are claimed in order, so the queue holds the next
                // ones the consumer needs.
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(indices) = batches.get(b) else { return };
                if !gate.wait_for(b, window) {
                    return;
                }
                let r = maker.make(indices);
                if tx.send((b, r)).is_err() {
                    return;
                }
            }));
        }
        Ok(EpochIter(Epoch::Threads { rx, pending: Default::default(), next: 0, total: batches.len(), gate, handles }))
    }
}

/// What a batch of an epoch is made with: the dataset, the page-locked
/// pool and the skip log, and the keys of the flips.
struct Maker {
    dataset: Arc<Dataset>,
    pool: Option<Arc<pool::Pool>>,
    skips: Option<Arc<std::sync::Mutex<Skipped>>>,
    seed: u64,
    flip: bool,
    epoch: u64,
}

impl Maker {
    /// The batch of `indices` (decoded here), into a buffer of the pool if
    /// there is one.
    fn make(&self, indices: &[usize]) -> Result<Batch> {
        let per = self.dataset.pixels_per_image();
        let len = indices.len().checked_mul(per).ok_or_else(|| Error::invalid("Loader", "a batch's size overflows"))?;
        let mut images = match &self.pool {
            Some(p) => p.take(len)?,
            None => Images::from_vec(crate::runtime::host_memory::try_filled("Loader", "a batch", len, 0f32)?),
        };
        let out = images.as_mut_slice()?;
        let mut labels = Vec::with_capacity(indices.len());
        for (k, &i) in indices.iter().enumerate() {
            let out = &mut out[k * per..(k + 1) * per];
            let read =
                |j: usize, out: &mut [f32]| self.dataset.read(j, self.flip && flipped(self.seed, self.epoch, j), out);
            let label = match (read(i, out), self.skips.as_deref()) {
                (Ok(y), _) => y,
                (Err(e @ Error::File { .. }), Some(skips)) => {
                    let note = |e: &Error| {
                        let mut s = skips.lock().unwrap_or_else(|p| p.into_inner());
                        s.count += 1;
                        if s.errors.len() < Skipped::KEPT {
                            s.errors.push(e.to_string());
                        }
                    };
                    note(&e);
                    let n = self.dataset.len();
                    let mut found = None;
                    for j in (1..n).map(|d| (i + d) % n) {
                        match read(j, out) {
                            Ok(y) => {
                                found = Some(y);
                                break;
                            }
                            Err(e @ Error::File { .. }) => note(&e),
                            Err(e) => return Err(e),
                        }
                    }
                    found.ok_or_else(|| {
                        Error::invalid(
                            "Loader",
                            format!("no image of {} reads (the last error: {e})", self.dataset.origin.display()),
                        )
                    })?
                }
                (Err(e), _) => return Err(e),
            };
            labels.push(label);
        }
        Ok(Batch { images, labels })
    }
}

/// How far the workers may run ahead of the consumer: the batches handed
/// to it so far, and whether the epoch was dropped.
#[derive(Default)]
struct Gate {
    state: std::sync::Mutex<(usize, bool)>,
    moved: std::sync::Condvar,
}

impl Gate {
    /// Waits until batch `b` is fewer than `window` batches ahead of the
    /// consumer; false when the epoch was dropped meanwhile.
    fn wait_for(&self, b: usize, window: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.1 && b >= st.0.saturating_add(window) {
            st = self.moved.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.1
    }

    /// The consumer has taken `n` batches.
    fn handed(&self, n: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = n;
        self.moved.notify_all();
    }

    /// The epoch was dropped: every waiting worker returns.
    fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.moved.notify_all();
    }
}

/// [`Loader::epoch`]'s batches, in order.
pub struct EpochIter(Epoch);

enum Epoch {
    /// Decoded on the calling thread.
    Inline { maker: Maker, batches: Vec<Vec<usize>>, next: usize },
    /// Decoded by worker threads.
    Threads {
        rx: mpsc::Receiver<(usize, Result<Batch>)>,
        pending: std::collections::BTreeMap<usize, Result<Batch>>,
        next: usize,
        total: usize,
        gate: Arc<Gate>,
        handles: Vec<std::thread::JoinHandle<()>>,
    },
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        match &mut self.0 {
            Epoch::Inline { maker, batches, next } => {
                let indices = batches.get(*next)?;
                *next += 1;
                Some(maker.make(indices))
            }
            Epoch::Threads { rx, pending, next, total, gate, .. } => {
                if *next >= *total {
                    return None;
                }
                loop {
                    if let Some(r) = pending.remove(next) {
                        *next += 1;
                        gate.handed(*next);
                        if r.is_err() {
                            *total = *next; // an error ends the epoch
                        }
                        return Some(r);
                    }
                    match rx.recv() {
                        Ok((b, r)) => {
                            pending.insert(b, r);
                        }
                        Err(_) => {
                            *total = *next;
                            return Some(Err(Error::invalid("Loader", "a worker thread stopped (panicked?)")));
                        }
                    }
                }
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        if let Epoch::Threads { rx, gate, handles, .. } = &mut self.0 {
            gate.stop();
            // Dropping the receiver fails the workers' sends, also those
            // blocked on a full queue: every worker returns.
            drop(std::mem::replace(rx, mpsc::sync_channel(1).1));
            for h in handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}
