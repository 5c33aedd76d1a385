//! Verification, as face recognition is judged: insightface's `.bin` pair
//! sets embedded with flip fusion ([`verify_pairs`]), their 10-fold
//! accuracy and VAL@FAR as arcface_torch reports them, and the exact ROC
//! (TAR at each FAR, EER, AUC) in [`metrics`]; the IJB-B/C template
//! protocol ([`ijb`]); an SVG of the ROC ([`roc_svg`]).

pub mod ijb;
pub mod metrics;
pub mod pairs;

use std::path::Path;

use crate::backbone::IResNet;
use crate::data::{embed_dataset, Dataset};
use crate::error::{Error, Result};
use crate::io::verification::PairSet;
use metrics::{kfold_accuracy, kfold_val, Roc, RocPoint};

/// The FARs a report lists: 1e-6 … 1e-1.
pub const FARS: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

/// Embeddings of a pair set as insightface's `test()` makes them: each
/// image and its mirror image embedded (eval mode), the two added, the sum
/// L2-normalized. `ds` holds the set's 2·P images in order
/// ([`Dataset::encoded`], made once and reused for every evaluation).
/// Returns the fused unit rows (`[2P, E]`) and XNorm, the mean norm of
/// every raw embedding (both views).
pub fn fused_embeddings(net: &mut IResNet, ds: &Dataset, batch: usize) -> Result<(Vec<f32>, f64)> {
    let e = net.config().embedding;
    let n = ds.len();
    let len = n.checked_mul(e).ok_or_else(|| Error::invalid("fused_embeddings", format!("{n} x {e} overflows")))?;
    let mut views = [Vec::with_capacity(len), Vec::with_capacity(len)];
    for (flip, out) in [false, true].into_iter().zip(views.iter_mut()) {
        embed_dataset(
            net,
            ds,
            batch,
            flip,
            |_, _, emb| {
                out.extend_from_slice(emb);
                Ok(())
            },
            |_, _| {},
        )?;
    }
    let norm = |r: &[f32]| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let xnorm = views.iter().flat_map(|v| v.chunks_exact(e)).map(norm).sum::<f64>() / (2 * n) as f64;
    let mut fused = Vec::with_capacity(len);
    for (i, (a, b)) in views[0].chunks_exact(e).zip(views[1].chunks_exact(e)).enumerate() {
        let sum: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| x as f64 + y as f64).collect();
        let len = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        if !(len > 0.0 && len.is_finite()) {
            return Err(Error::file(ds.origin(), format!("image {i}: its fused embedding has norm {len}")));
        }
        fused.extend(sum.iter().map(|v| (v / len) as f32));
    }
    Ok((fused, xnorm))
}

/// One verification set's numbers (see [`metrics`] for each).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    /// The set's name (its file stem: `lfw`, `cfp_fp`, …).
    pub name: String,
    /// Pairs, of which positive (same identity) and negative.
    pub pairs: usize,
    /// Positive pairs.
    pub positives: usize,
    /// Negative pairs.
    pub negatives: usize,
    /// Mean norm of the raw embeddings (insightface's XNorm).
    pub xnorm: f64,
    /// insightface's 10-fold accuracy (flip fusion): mean.
    pub accuracy: f64,
    /// Its standard deviation over the folds.
    pub accuracy_std: f64,
    /// VAL at FAR = 1e-3 (insightface's calculate_val): mean over folds.
    pub val: f64,
    /// Its standard deviation.
    pub val_std: f64,
    /// The mean test-fold FAR at the VAL thresholds.
    pub val_far: f64,
    /// Exact ROC: TAR at FAR ≤ each of [`FARS`] (cosine similarity
    /// threshold).
    pub tar_at_far: Vec<FarPoint>,
    /// The same read as insightface's IJB script does (the nearest ROC
    /// point, possibly above the FAR).
    pub tar_at_far_nearest: Vec<FarPoint>,
    /// Equal error rate.
    pub eer: f64,
    /// Cosine threshold at the EER.
    pub eer_threshold: f64,
    /// Area under the ROC.
    pub auc: f64,
}

/// TAR at a FAR.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FarPoint {
    /// The FAR asked for.
    pub far: f64,
    /// The TAR there.
    pub tar: f64,
    /// The FAR actually reached.
    pub far_reached: f64,
    /// The cosine-similarity threshold (null when it accepts nothing).
    pub threshold: Option<f64>,
}

fn far_point(far: f64, p: RocPoint) -> FarPoint {
    FarPoint { far, tar: p.tar, far_reached: p.far, threshold: p.threshold.is_finite().then_some(p.threshold) }
}

/// Every number of a set from its fused unit embeddings (pairs are rows 2i
/// and 2i + 1); also returns the ROC (for [`roc_svg`]).
pub fn evaluate(name: &str, fused: &[f32], dim: usize, issame: &[bool], xnorm: f64) -> Result<(Verification, Roc)> {
    let p = issame.len();
    if dim == 0 || p.checked_mul(2 * dim) != Some(fused.len()) {
        return Err(Error::Shape {
            op: "evaluate",
            expected: format!("{} rows of {dim} for {p} pairs", 2 * p),
            got: format!("{} values", fused.len()),
        });
    }
    let dist: Vec<f64> = fused
        .chunks_exact(2 * dim)
        .map(|r| r[..dim].iter().zip(&r[dim..]).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum())
        .collect();
    let (accuracy, accuracy_std, _) = kfold_accuracy(&dist, issame, 10)?;
    let (val, val_std, val_far) = kfold_val(&dist, issame, 1e-3, 10)?;
    // Unit rows: cosine = 1 − d/2.
    let cos: Vec<f64> = dist.iter().map(|d| 1.0 - d / 2.0).collect();
    let roc = Roc::new(&cos, issame)?;
    let (eer, eer_threshold) = roc.eer();
    let v = Verification {
        name: name.to_string(),
        pairs: p,
        positives: roc.positives,
        negatives: roc.negatives,
        xnorm,
        accuracy,
        accuracy_std,
        val,
        val_std,
        val_far,
        tar_at_far: FARS.iter().map(|&f| far_point(f, roc.tar_at_far(f))).collect(),
        tar_at_far_nearest: FARS.iter().map(|&f| far_point(f, roc.tar_at_far_nearest(f))).collect(),
        eer,
        eer_threshold,
        auc: roc.auc(),
    };
    Ok((v, roc))
}

/// A pair set through `net` and [`evaluate`]: the set's name is its file
/// stem.
pub fn verify_pairs(net: &mut IResNet, set: &PairSet, path: &Path, batch: usize) -> Result<(Verification, Roc)> {
    set.validate(path)?;
    // insightface's load_bin resizes images of another size.
    let ds = Dataset::encoded(set.images.clone(), net.config().input, path).resizing(true);
    verify_dataset(net, &ds, &set.issame, batch)
}

/// [`verify_pairs`] on a set's images already in a [`Dataset`] (its name:
/// the dataset's file stem).
pub fn verify_dataset(net: &mut IResNet, ds: &Dataset, issame: &[bool], batch: usize) -> Result<(Verification, Roc)> {
    let name = ds.origin().file_stem().and_then(|s| s.to_str()).unwrap_or("pairs").to_string();
    let (fused, xnorm) = fused_embeddings(net, ds, batch)?;
    evaluate(&name, &fused, net.config().embedding, issame, xnorm)
}

impl Verification {
    /// insightface's lines (`[lfw]XNorm: …`, `[lfw]Accuracy-Flip:
    /// 0.99500+-0.00300`), then VAL@FAR and the exact TAR@FAR row.
    pub fn lines(&self) -> Vec<String> {
        let n = &self.name;
        let tars: Vec<String> = self.tar_at_far.iter().map(|p| format!("{:.0e}: {:.4}", p.far, p.tar)).collect();
        vec![
            format!("[{n}]XNorm: {:.6}", self.xnorm),
            format!("[{n}]Accuracy-Flip: {:.5}+-{:.5}", self.accuracy, self.accuracy_std),
            format!("[{n}]VAL@FAR=1e-3: {:.5}+-{:.5} (FAR {:.5})", self.val, self.val_std, self.val_far),
            format!("[{n}]TAR@FAR {}", tars.join("  ")),
            format!(
                "[{n}]EER: {:.5} (cosine {:.4})   AUC: {:.5}   pairs: {}",
                self.eer, self.eer_threshold, self.auc, self.pairs
            ),
        ]
    }
}

/// An SVG of ROC curves as papers draw them: TAR against FAR on a log
/// axis (1e-6 … 1), one polyline per curve.
pub fn roc_svg(curves: &[(&str, &Roc)]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 420.0, 60.0, 50.0, 20.0, 20.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x = |far: f64| left + (far.max(1e-6).log10() + 6.0) / 6.0 * pw;
    let y = |tar: f64| top + (1.0 - tar) * ph;
    let mut s = svg_open(w, h);
    for k in 0..=6 {
        let xv = left + k as f64 / 6.0 * pw;
        s += &format!(
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">1e-{}</text>\n",
            top + ph,
            top + ph + 16.0,
            6 - k
        );
    }
    for k in 0..=5 {
        let t = k as f64 / 5.0;
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{t:.1}</text>\n",
            y(t),
            left + pw,
            left - 6.0,
            y(t) + 4.0
        );
    }
    s += &axis_titles((left, top, pw, ph, h), "FAR", "TAR");
    for (i, (name, roc)) in curves.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        // A step curve: each point's TAR holds until the next FAR.
        let mut xy = Vec::new();
        for wdw in roc.points.windows(2) {
            xy.push((x(wdw[0].far), y(wdw[0].tar)));
            xy.push((x(wdw[1].far), y(wdw[0].tar)));
        }
        if let Some(l) = roc.points.last() {
            xy.push((x(l.far), y(l.tar)));
        }
        let pts: Vec<String> = thin(&xy).iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n", pts.join(" "));
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>\n",
            left + 10.0,
            top + ph - 10.0 - 16.0 * i as f64,
            xml_escape(name)
        );
    }
    s += "</svg>\n";
    s
}

/// The points of a polyline worth drawing: the first, each at least half
/// a pixel (in x or y) from the last one kept, and the last (a ROC of
/// millions of pairs becomes a few thousand points).
fn thin(xy: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (i, &(a, b)) in xy.iter().enumerate() {
        let keep = match out.last() {
            None => true,
            Some(&(pa, pb)) => (a - pa).abs() >= 0.5 || (b - pb).abs() >= 0.5 || i + 1 == xy.len(),
        };
        if keep {
            out.push((a, b));
        }
    }
    out
}

/// An SVG line chart: one polyline with markers per series of `(x, y)`
/// points, x on a log axis (N, sizes), y linear or (`log_y`) logarithmic;
/// non-finite or (log axes) non-positive values are left out.
pub fn line_svg(x_label: &str, y_label: &str, log_y: bool, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 420.0, 70.0, 50.0, 20.0, 20.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ok = |(x, y): &(f64, f64)| x.is_finite() && *x > 0.0 && y.is_finite() && (!log_y || *y > 0.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied().filter(ok)).collect();
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0.log10()), b.max(p.0.log10())));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(ty(p.1)), b.max(ty(p.1))));
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if !log_y {
        // From 0, with a tenth of headroom.
        y0 = y0.min(0.0);
        y1 += (y1 - y0) * 0.1;
    }
    if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (x1 - x0) * 0.05;
    let (x0, x1) = (x0 - pad, x1 + pad);
    let px = |x: f64| left + (x.log10() - x0) / (x1 - x0) * pw;
    let py = |y: f64| top + (1.0 - (ty(y) - y0) / (y1 - y0)) * ph;
    let mut s = svg_open(w, h);
    // Grid: x at the data's distinct x values; y at 5 even steps.
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for &xv in &xs {
        let p = px(xv);
        s += &format!(
            "<line x1=\"{p:.1}\" y1=\"{top}\" x2=\"{p:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{p:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xv}</text>\n",
            top + ph,
            top + ph + 16.0
        );
    }
    for k in 0..=5 {
        let t = y0 + (y1 - y0) * k as f64 / 5.0;
        let v = if log_y { 10f64.powf(t) } else { t };
        let yp = top + (1.0 - k as f64 / 5.0) * ph;
        s += &format!(
            "<line x1=\"{left}\" y1=\"{yp:.1}\" x2=\"{:.1}\" y2=\"{yp:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + pw,
            left - 6.0,
            yp + 4.0,
            if v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.3}") }
        );
    }
    s += &axis_titles((left, top, pw, ph, h), x_label, y_label);
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let p: Vec<(f64, f64)> = p.iter().copied().filter(ok).collect();
        let line: Vec<String> = p.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n", line.join(" "));
        for &(x, y) in &p {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n", px(x), py(y));
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>\n",
            left + 10.0,
            top + 16.0 + 16.0 * i as f64,
            xml_escape(name)
        );
    }
    s += "</svg>\n";
    s
}

/// An SVG document's opening: the element and a white background.
fn svg_open(w: f64, h: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    )
}

/// The axes' titles of a plot area at (`left`, `top`) of `pw` × `ph` in a
/// figure `h` high: x centred below, y rotated at the left.
fn axis_titles((left, top, pw, ph, h): (f64, f64, f64, f64, f64), x_label: &str, y_label: &str) -> String {
    let mid = top + ph / 2.0;
    format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text x=\"14\" y=\"{mid:.1}\" transform=\"rotate(-90 14 {mid:.1})\" text-anchor=\"middle\">{}</text>\n",
        left + pw / 2.0,
        h - 8.0,
        xml_escape(x_label),
        xml_escape(y_label)
    )
}

const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
