//! A backbone over a whole dataset, streaming: [`embed_dataset`] hands
//! each batch's embeddings to a sink (`gif-fr embed --data`), and
//! [`identity_vectors`] averages them per identity (`gif-fr
//! identity-vectors`: the paper's "mean feature of each identity's
//! images", the tokenizer's input). A decoding thread (itself decoding on
//! all cores) prepares the next batch while the network embeds this one;
//! nothing of size N × images is held.

use std::sync::mpsc;

use rayon::prelude::*;

use super::Dataset;
use crate::backbone::IResNet;
use crate::error::{Error, Result};

/// Embeds every image of `ds`, in order, with `net` in eval mode, `batch`
/// images per forward pass (mirrored left to right when `flip`): `sink(i,
/// labels, embeddings)` receives the batch starting at image i (its
/// labels, and its embeddings `[n, E]` row-major); `progress(done, total)`
/// follows each batch. The first error (a corrupt image, a non-finite
/// embedding, the sink's) stops the pass.
pub fn embed_dataset(
    net: &mut IResNet,
    ds: &Dataset,
    batch: usize,
    flip: bool,
    mut sink: impl FnMut(usize, &[u32], &[f32]) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    const OP: &str = "embed_dataset";
    let s = net.config().input;
    if ds.size() != s {
        return Err(Error::invalid(
            OP,
            format!("the dataset's images are {0} x {0}; the network takes {s} x {s}", ds.size()),
        ));
    }
    if batch == 0 {
        return Err(Error::invalid(OP, "a batch of 0 images"));
    }
    let (n, per) = (ds.len(), ds.pixels_per_image());
    batch.checked_mul(per).ok_or_else(|| Error::invalid(OP, format!("a batch of {batch} images overflows")))?;
    std::thread::scope(|scope| {
        type Batch = Result<(usize, Vec<f32>, Vec<u32>)>;
        let (tx, rx) = mpsc::sync_channel::<Batch>(1);
        scope.spawn(move || {
            for start in (0..n).step_by(batch) {
                let end = (start + batch).min(n);
                let mut px = vec![0f32; (end - start) * per];
                let labels: Result<Vec<u32>> =
                    px.par_chunks_mut(per).enumerate().map(|(k, out)| ds.read(start + k, flip, out)).collect();
                let failed = labels.is_err();
                // A closed channel: the consumer stopped; so does this.
                if tx.send(labels.map(|l| (start, px, l))).is_err() || failed {
                    break;
                }
            }
        });
        for msg in rx {
            let (start, px, labels) = msg?;
            let emb = net.embed(&px, labels.len())?;
            sink(start, &labels, &emb)?;
            progress(start + labels.len(), n);
        }
        Ok(())
    })
}

/// Per-identity vectors: the mean of each identity's L2-normalized
/// embeddings (`[classes, E]` row-major, f32), in one streaming pass of
/// [`embed_dataset`] (sums in f64, `classes × E` of them). An identity
/// without images is an error naming it (the tokenizer needs a vector for
/// every identity); so is a zero embedding.
pub fn identity_vectors(
    net: &mut IResNet,
    ds: &Dataset,
    batch: usize,
    progress: impl FnMut(usize, usize),
) -> Result<(Vec<f32>, usize, usize)> {
    const OP: &str = "identity_vectors";
    let (classes, e) = (ds.classes(), net.config().embedding);
    let len = classes.checked_mul(e).ok_or_else(|| Error::invalid(OP, format!("{classes} x {e} overflows")))?;
    let mut sums = crate::runtime::host_memory::try_filled(OP, "the per-identity sums", len, 0f64)?;
    let mut counts = crate::runtime::host_memory::try_filled(OP, "the per-identity counts", classes, 0u64)?;
    embed_dataset(
        net,
        ds,
        batch,
        false,
        |start, labels, emb| {
            for (k, (&y, row)) in labels.iter().zip(emb.chunks_exact(e)).enumerate() {
                let c = y as usize;
                if c >= classes {
                    return Err(Error::invalid(OP, format!("image {}: label {y} is not below {classes}", start + k)));
                }
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                if !(norm > 0.0 && norm.is_finite()) {
                    return Err(Error::invalid(OP, format!("image {} embeds to a vector of norm {norm}", start + k)));
                }
                sums[c * e..(c + 1) * e].iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64 / norm);
                counts[c] += 1;
            }
            Ok(())
        },
        progress,
    )?;
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        let empty = counts.iter().filter(|&&n| n == 0).count();
        return Err(Error::invalid(
            OP,
            format!("identity {c} has no images ({empty} of {classes} identities have none): no vector to give it"),
        ));
    }
    let means = sums.chunks_exact(e).zip(&counts).flat_map(|(row, &n)| row.iter().map(move |&s| (s / n as f64) as f32));
    Ok((means.collect(), classes, e))
}
