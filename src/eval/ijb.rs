//! The IJB-B / IJB-C 1:1 template protocol, as insightface's
//! recognition/_evaluation_/ijb/ijb_11.py evaluates it.
//!
//! Meta files (in `<target>/meta/`, names lower-case): `<t>_face_tid_mid.txt`
//! (`image_name template_id media_id` per line), `<t>_template_pair_label.txt`
//! (`template_1 template_2 label`, label 1 for one identity) and
//! `<t>_name_5pts_score.txt` (`image_name x1 y1 … x5 y5 faceness_score`).
//!
//! Template features ([`template_features`]), insightface's default test
//! mode: each image's feature is its embedding plus its mirror image's (not
//! normalized: the norm is kept, "N1"), times the detector's faceness score
//! ("D1"); within a template, the features of one media (video) are
//! averaged; the template is the sum of its media's features,
//! L2-normalized. A pair's score is the cosine of its templates.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// A meta file's lines, split on whitespace; empty lines skipped. Errors
/// name the file and line.
fn lines(path: &Path, fields: usize, exact: bool) -> Result<Vec<(usize, Vec<String>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        if f.is_empty() {
            continue;
        }
        if f.len() < fields || (exact && f.len() != fields) {
            return Err(Error::file(path, format!("line {}: {} fields, expected {fields}: {line:?}", i + 1, f.len())));
        }
        out.push((i + 1, f));
    }
    if out.is_empty() {
        return Err(Error::file(path, "no lines"));
    }
    Ok(out)
}

fn int(path: &Path, line: usize, what: &str, v: &str) -> Result<u64> {
    v.parse().map_err(|_| Error::file(path, format!("line {line}: {what} {v:?} is not a non-negative integer")))
}

/// `<t>_face_tid_mid.txt`: each image's name, template and media.
pub fn read_face_tid_mid(path: &Path) -> Result<Vec<(String, u64, u64)>> {
    lines(path, 3, true)?
        .into_iter()
        .map(|(n, f)| Ok((f[0].clone(), int(path, n, "template", &f[1])?, int(path, n, "media", &f[2])?)))
        .collect()
}

/// `<t>_template_pair_label.txt`: the template pairs and whether each is
/// of one identity.
pub fn read_template_pairs(path: &Path) -> Result<Vec<(u64, u64, bool)>> {
    lines(path, 3, true)?
        .into_iter()
        .map(|(n, f)| {
            let label = match f[2].as_str() {
                "1" => true,
                "0" => false,
                other => return Err(Error::file(path, format!("line {n}: label {other:?} is not 0 or 1"))),
            };
            Ok((int(path, n, "template", &f[0])?, int(path, n, "template", &f[1])?, label))
        })
        .collect()
}

/// `<t>_name_5pts_score.txt`: each image's name, five landmarks (x, y)
/// and faceness score.
pub fn read_name_5pts_score(path: &Path) -> Result<Vec<(String, [f32; 10], f32)>> {
    lines(path, 12, true)?
        .into_iter()
        .map(|(n, f)| {
            let num = |v: &str| -> Result<f32> {
                v.parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| Error::file(path, format!("line {n}: {v:?} is not a finite number")))
            };
            let mut lm = [0f32; 10];
            for (k, v) in f[1..11].iter().enumerate() {
                lm[k] = num(v)?;
            }
            Ok((f[0].clone(), lm, num(&f[11])?))
        })
        .collect()
}

/// Template features from image features `feats` (`[n, d]` row-major; the
/// flip-fused sum, not normalized) with each image's template and media
/// and, when given, its faceness score: returns the template ids
/// (ascending) and their unit features (`[templates, d]`).
pub fn template_features(
    feats: &[f32],
    d: usize,
    tid_mid: &[(u64, u64)],
    scores: Option<&[f32]>,
) -> Result<(Vec<u64>, Vec<f32>)> {
    const OP: &str = "ijb::template_features";
    let n = tid_mid.len();
    if d == 0 || feats.len() != n.checked_mul(d).ok_or_else(|| Error::invalid(OP, "sizes overflow"))? {
        return Err(Error::Shape {
            op: OP,
            expected: format!("{n} image features of {d}"),
            got: format!("{} values", feats.len()),
        });
    }
    if let Some(s) = scores {
        if s.len() != n {
            return Err(Error::Shape { op: OP, expected: format!("{n} faceness scores"), got: s.len().to_string() });
        }
    }
    if let Some(i) = feats.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(OP, format!("image {}: its feature holds {}", i / d, feats[i])));
    }
    // template → media → (sum, count), in f64.
    let mut acc: BTreeMap<u64, BTreeMap<u64, (Vec<f64>, usize)>> = BTreeMap::new();
    for (i, &(t, m)) in tid_mid.iter().enumerate() {
        let w = scores.map_or(1.0, |s| s[i] as f64);
        let e = acc.entry(t).or_default().entry(m).or_insert_with(|| (vec![0.0; d], 0));
        e.0.iter_mut().zip(&feats[i * d..(i + 1) * d]).for_each(|(a, &v)| *a += v as f64 * w);
        e.1 += 1;
    }
    let mut ids = Vec::with_capacity(acc.len());
    let mut out = Vec::with_capacity(acc.len() * d);
    for (t, medias) in acc {
        let mut sum = vec![0f64; d];
        for (s, c) in medias.values() {
            sum.iter_mut().zip(s).for_each(|(a, v)| *a += v / *c as f64);
        }
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm <= 0.0 || !norm.is_finite() {
            return Err(Error::invalid(OP, format!("template {t}: its feature is zero (faceness scores of 0?)")));
        }
        ids.push(t);
        out.extend(sum.iter().map(|v| (v / norm) as f32));
    }
    Ok((ids, out))
}

/// Cosine scores of template pairs (`ids` ascending, `feats` unit rows as
/// [`template_features`] returns them); a template without images is an
/// error naming the pair.
pub fn score_pairs(ids: &[u64], feats: &[f32], d: usize, pairs: &[(u64, u64, bool)]) -> Result<Vec<f64>> {
    let row = |t: u64, k: usize| -> Result<&[f32]> {
        let i = ids.binary_search(&t).map_err(|_| {
            Error::invalid("ijb::score_pairs", format!("pair {k}: template {t} has no image in the media list"))
        })?;
        Ok(&feats[i * d..(i + 1) * d])
    };
    pairs
        .iter()
        .enumerate()
        .map(|(k, &(a, b, _))| {
            let (x, y) = (row(a, k)?, row(b, k)?);
            Ok(x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum())
        })
        .collect()
}

/// IJB image features from the images themselves, as insightface's IJB
/// script makes them: each image of `entries` (a name under `dir`, its five
/// landmarks, its faceness score: `<t>_name_5pts_score.txt`) aligned to the
/// ArcFace template at the network's input size
/// ([`crate::data::align::norm_crop`]), embedded, and its mirror image
/// embedded; the feature is the sum (`[images, E]`, not normalized).
/// Decoding and alignment run on all cores, `batch` images at a time;
/// `progress(done, total)` after each batch.
pub fn image_features(
    net: &mut crate::backbone::IResNet,
    dir: &Path,
    entries: &[(String, [f32; 10], f32)],
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    const OP: &str = "ijb::image_features";
    if batch == 0 {
        return Err(Error::invalid(OP, "a batch of 0 images"));
    }
    let (s, e) = (net.config().input, net.config().embedding);
    let per = s * s * 3;
    let mut out = Vec::with_capacity(entries.len().saturating_mul(e));
    for (k, chunk) in entries.chunks(batch).enumerate() {
        // Each image and its mirror image, normalized, one after the other.
        let crops: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|(name, lm, _)| {
                let path = dir.join(name);
                let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
                let (w, h, rgb) = crate::data::decode_rgb(&bytes).map_err(|m| Error::file(&path, m))?;
                let points = [0, 1, 2, 3, 4].map(|i| [lm[2 * i] as f64, lm[2 * i + 1] as f64]);
                let crop = crate::data::align::norm_crop(&rgb, w, h, &points, s)
                    .ok_or_else(|| Error::file(&path, "its landmarks do not define an alignment (they coincide)"))?;
                let mut v: Vec<f32> = crop.iter().map(|&p| crate::backbone::images::normalize(p)).collect();
                let mut flipped = v.clone();
                crate::data::flip_in_place(&mut flipped, s);
                v.extend(flipped);
                Ok(v)
            })
            .collect();
        let mut pixels = Vec::with_capacity(chunk.len() * 2 * per);
        for c in crops {
            pixels.extend(c?);
        }
        let emb = net.embed(&pixels, 2 * chunk.len())?;
        for pair in emb.chunks_exact(2 * e) {
            out.extend(pair[..e].iter().zip(&pair[e..]).map(|(a, b)| a + b));
        }
        progress(k * batch + chunk.len(), entries.len());
    }
    Ok(out)
}
