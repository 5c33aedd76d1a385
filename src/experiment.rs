//! The paper's claim, tested: the same backbone trained with the same data
//! order, steps, schedule and seed under each head — the full margin
//! softmax (ArcFace), Partial FC, and GIF's code head with codes from
//! random vectors or from a warm-up model's per-identity mean features —
//! then judged on what training never saw.
//!
//! A dataset (insightface's RecordIO, e.g. one `gif-fr synth` wrote) is
//! [`split`]: `held_out` identities (of two or more images, drawn with
//! the seed) are set aside whole for verification; of every other identity
//! with two or more images the last is kept back as a probe for closed-set
//! identification; the rest trains. For each head ([`HeadSpec`]) the
//! training runs as `gif-fr train` would ([`crate::train::run_on`]; its
//! output directory holds the usual `metrics.csv`, `training.log`,
//! checkpoint and model), timed part by part
//! ([`crate::train::StepProfile`]), and is then evaluated:
//!
//! - verification on the held-out identities over **all** their pairs
//!   (flip-fused embeddings, cosine scores): insightface's 10-fold accuracy
//!   (on the pairs in index order) and TAR at FAR = 1e-4 and 1e-3 from the
//!   exact ROC;
//! - closed-set identification top-1 of the probes: GIF through the prefix
//!   decoder (exact top-1 over the valid codes), the others by the nearest
//!   class centre; and the same on the rarest `rare_fraction` of the
//!   training identities (fewest training images);
//! - the head's time per step (its forward and backward, median over the
//!   run, plus its optimizer update timed alone on buffers of its size),
//!   the whole step's median, and the head's memory (weights, gradients,
//!   optimizer state, code table: [`crate::train::HeadMemory`]).
//!
//! [`run`] writes `experiment.json` (every number), `report.md` (the
//! tables), `roc-N<n>.svg` per dataset and, with two or more datasets,
//! `tar-vs-n.svg` and `head-time-vs-n.svg`. docs/experiments.md holds a
//! measured run and what it says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::decode::{Mode, PrefixDecoder};
use crate::error::{Error, Result};
use crate::eval::metrics::{kfold_accuracy, Roc};
use crate::runtime::tensor::{DType, Tensor};
use crate::tokenizer::{self, Codebook, Input};
use crate::train::{median, HeadMemory, Optimizer, ParamRef, RunOptions, TrainConfig, TrainHead, Trainer};

const OP: &str = "experiment";

/// One head of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum HeadSpec {
    /// The full margin softmax.
    ArcFace,
    /// Partial FC at this sample rate.
    PartialFc(f32),
    /// GIF, codes from seeded random identity vectors.
    GifRandom,
    /// GIF, codes from the per-identity mean features of a warm-up model
    /// (an ArcFace run of `warmup_fraction` of the steps).
    GifMeans,
}

impl HeadSpec {
    /// The issue's five: ArcFace, Partial FC 0.1 and 0.3, GIF (random),
    /// GIF (means).
    pub fn all() -> Vec<HeadSpec> {
        vec![
            HeadSpec::ArcFace,
            HeadSpec::PartialFc(0.1),
            HeadSpec::PartialFc(0.3),
            HeadSpec::GifRandom,
            HeadSpec::GifMeans,
        ]
    }

    /// `arcface`, `partial_fc_0.1`, `gif_random`, `gif_means`: the name in
    /// reports and of the run's directory.
    pub fn name(&self) -> String {
        match self {
            HeadSpec::ArcFace => "arcface".into(),
            HeadSpec::PartialFc(r) => format!("partial_fc_{r}"),
            HeadSpec::GifRandom => "gif_random".into(),
            HeadSpec::GifMeans => "gif_means".into(),
        }
    }

    /// Parses a [`HeadSpec::name`] (`partial_fc_R` or `partial_fc:R`, R in
    /// (0, 1)).
    pub fn parse(s: &str) -> Result<HeadSpec> {
        match s {
            "arcface" => Ok(HeadSpec::ArcFace),
            "gif_random" => Ok(HeadSpec::GifRandom),
            "gif_means" => Ok(HeadSpec::GifMeans),
            _ => {
                let rate = s.strip_prefix("partial_fc_").or_else(|| s.strip_prefix("partial_fc:"));
                match rate.and_then(|r| r.parse::<f32>().ok()) {
                    Some(r) if r > 0.0 && r < 1.0 => Ok(HeadSpec::PartialFc(r)),
                    _ => Err(Error::invalid(
                        OP,
                        format!("head {s:?}: arcface, partial_fc_R (0 < R < 1), gif_random or gif_means"),
                    )),
                }
            }
        }
    }
}

/// What an experiment runs (see the module documentation).
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// The training of every head: network, batch, epochs, schedule,
    /// margin, scale, seed, device; GIF's `vocab` (`length` default: the
    /// shortest) and `gamma`. Its `head`, `sample_rate`, `codebook`,
    /// `output` and data keys are set per run; `val_targets` are
    /// evaluated during training as `gif-fr train` does.
    pub train: TrainConfig,
    /// The heads, run in this order.
    pub heads: Vec<HeadSpec>,
    /// Identities held out whole for verification.
    pub held_out: usize,
    /// At most this many held-out images (identities beyond it are
    /// dropped from the held-out set, and do not train either): all pairs
    /// of them are scored.
    pub max_held_out_images: usize,
    /// The rarest fraction of training identities reported apart (0.1).
    pub rare_fraction: f64,
    /// The warm-up model of `gif_means`: this fraction of the steps of an
    /// ArcFace run (0.25).
    pub warmup_fraction: f64,
    /// Where the runs and the report go.
    pub output: PathBuf,
    /// Progress bars and log lines on stderr.
    pub progress: bool,
}

impl ExperimentConfig {
    /// Checks the settings (the training config was checked when parsed).
    pub fn validate(&self) -> Result<()> {
        if self.heads.is_empty() {
            return Err(Error::invalid(OP, "no head to compare"));
        }
        if self.held_out < 2 {
            return Err(Error::invalid(OP, format!("held_out: {} identities; at least 2", self.held_out)));
        }
        if self.max_held_out_images < 4 || self.max_held_out_images > 1 << 16 {
            return Err(Error::invalid(
                OP,
                format!("max_held_out_images: {} is outside 4..=65536", self.max_held_out_images),
            ));
        }
        if !(self.rare_fraction > 0.0 && self.rare_fraction <= 1.0) {
            return Err(Error::invalid(OP, format!("rare_fraction: {} is not in (0, 1]", self.rare_fraction)));
        }
        if !(self.warmup_fraction > 0.0 && self.warmup_fraction <= 1.0) {
            return Err(Error::invalid(OP, format!("warmup_fraction: {} is not in (0, 1]", self.warmup_fraction)));
        }
        Ok(())
    }
}

/// A dataset split for an experiment (see [`split`]).
pub struct Split {
    /// The training images, labels 0 … N − 1.
    pub train: Arc<Dataset>,
    /// Training images per training identity.
    pub train_counts: Vec<usize>,
    /// One held-back image of each training identity with two or more
    /// images, labelled as in `train`.
    pub probes: Dataset,
    /// Whether each training identity is among the rarest.
    pub rare: Vec<bool>,
    /// The held-out identities' images, labels 0 … H − 1.
    pub held_out: Dataset,
    /// The dataset's labels of the training identities (training label i
    /// is `train_ids[i]`).
    pub train_ids: Vec<u32>,
    /// The dataset's labels of the held-out identities.
    pub held_out_ids: Vec<u32>,
    /// The dataset's image indices of `train`, `probes` and `held_out`.
    pub train_images: Vec<usize>,
    /// See `train_images`.
    pub probe_images: Vec<usize>,
    /// See `train_images`.
    pub held_out_images: Vec<usize>,
}

/// Splits `base` (see the module documentation): `held_out` identities of
/// two or more images drawn with `seed` (fewer when their images exceed
/// `max_held_out_images`), the rest training, each with its last image
/// kept back as a probe when it has two or more. Errors: too few
/// identities to hold out and still train, a label of the dataset at or
/// above its classes.
pub fn split(
    base: Arc<Dataset>,
    held_out: usize,
    max_held_out_images: usize,
    rare_fraction: f64,
    seed: u64,
) -> Result<Split> {
    let classes = base.classes();
    let mut images: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for i in 0..base.len() {
        let y = base.label(i)? as usize;
        let slot = images.get_mut(y).ok_or_else(|| {
            Error::file(base.origin(), format!("image {i}: label {y} is not below the {classes} identities"))
        })?;
        slot.push(i);
    }
    let mut eligible: Vec<u32> = (0..classes).filter(|&c| images[c].len() >= 2).map(|c| c as u32).collect();
    let present = images.iter().filter(|v| !v.is_empty()).count();
    if eligible.len() < held_out || present < held_out + 2 {
        return Err(Error::invalid(
            OP,
            format!(
                "{} holds {present} identities ({} with two or more images): too few to hold out {held_out} \
                 and train on at least 2",
                base.origin().display(),
                eligible.len()
            ),
        ));
    }
    eligible.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x6865_6c64_5f6f_7574));
    let mut chosen = Vec::new();
    let mut count = 0usize;
    for &c in eligible.iter().take(held_out) {
        let k = images[c as usize].len();
        if chosen.len() >= 2 && count + k > max_held_out_images {
            break;
        }
        count += k;
        chosen.push(c);
    }
    chosen.sort_unstable();
    let mut is_held = vec![false; classes];
    chosen.iter().for_each(|&c| is_held[c as usize] = true);
    let (mut h_index, mut h_labels) = (Vec::new(), Vec::new());
    for (k, &c) in chosen.iter().enumerate() {
        h_index.extend(&images[c as usize]);
        h_labels.extend(std::iter::repeat_n(k as u32, images[c as usize].len()));
    }
    let (mut t_index, mut t_labels, mut p_index, mut p_labels) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut train_ids = Vec::new();
    let mut train_counts = Vec::new();
    for c in (0..classes).filter(|&c| !is_held[c] && !images[c].is_empty()) {
        let y = train_ids.len() as u32;
        let imgs = &images[c];
        let (train, probe) = if imgs.len() >= 2 { imgs.split_at(imgs.len() - 1) } else { (&imgs[..], &[][..]) };
        t_index.extend(train);
        t_labels.extend(std::iter::repeat_n(y, train.len()));
        p_index.extend(probe);
        p_labels.extend(probe.iter().map(|_| y));
        train_counts.push(train.len());
        train_ids.push(c as u32);
    }
    let n = train_ids.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (train_counts[i], i));
    let rare_n = ((n as f64 * rare_fraction).ceil() as usize).clamp(1, n);
    let mut rare = vec![false; n];
    order.iter().take(rare_n).for_each(|&i| rare[i] = true);
    if p_index.is_empty() {
        return Err(Error::invalid(OP, "no training identity has two images: nothing to identify"));
    }
    Ok(Split {
        train: Arc::new(Dataset::subset(base.clone(), t_index.clone(), t_labels)?),
        train_counts,
        probes: Dataset::subset(base.clone(), p_index.clone(), p_labels)?,
        rare,
        held_out: Dataset::subset(base, h_index.clone(), h_labels)?,
        train_ids,
        held_out_ids: chosen,
        train_images: t_index,
        probe_images: p_index,
        held_out_images: h_index,
    })
}

/// Verification on the held-out identities, over all pairs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldOut {
    /// Identities and images held out.
    pub identities: usize,
    /// See `identities`.
    pub images: usize,
    /// Pairs scored (every pair), of which positive and negative.
    pub pairs: usize,
    /// See `pairs`.
    pub positives: usize,
    /// See `pairs`.
    pub negatives: usize,
    /// insightface's 10-fold accuracy over all pairs (in index order) and
    /// its standard deviation. Most pairs are negative, so a model that
    /// accepts nothing already scores `negatives / pairs`: read
    /// `accuracy_balanced`.
    pub accuracy: f64,
    /// See `accuracy`.
    pub accuracy_std: f64,
    /// The same on a balanced set as LFW's: every positive pair and as
    /// many negatives (evenly spaced in index order), alternating.
    pub accuracy_balanced: f64,
    /// See `accuracy_balanced`.
    pub accuracy_balanced_std: f64,
    /// TAR at FAR = 1e-4 (exact ROC).
    pub tar_at_far_1e4: f64,
    /// TAR at FAR = 1e-3.
    pub tar_at_far_1e3: f64,
    /// The equal error rate.
    pub eer: f64,
    /// The area under the ROC.
    pub auc: f64,
}

/// Time per step, in milliseconds (medians over the run's steps).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    /// The head's forward and backward.
    pub head_forward_backward_ms: f64,
    /// The head's optimizer update, timed alone on buffers of its size
    /// (median of 5).
    pub head_optimizer_ms: f64,
    /// Their sum: the head's time per step.
    pub head_ms: f64,
    /// The backbone's forward.
    pub forward_ms: f64,
    /// The backbone's backward.
    pub backward_ms: f64,
    /// The optimizer step (backbone and head).
    pub optimizer_ms: f64,
    /// The whole micro-batch.
    pub step_ms: f64,
}

/// One head's result on one dataset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadResult {
    /// [`HeadSpec::name`].
    pub head: String,
    /// GIF's code length and vocabulary.
    pub code: Option<(usize, usize)>,
    /// Micro-batches trained.
    pub steps: u64,
    /// The loss logged first and last (metrics.csv).
    pub loss_first: f64,
    /// See `loss_first`.
    pub loss_last: f64,
    /// The training accuracy logged last.
    pub train_accuracy: f64,
    /// Wall seconds of the training run; `gif_means` also its codes'
    /// (warm-up run, mean features, tokenizer) in `codes_seconds`.
    pub train_seconds: f64,
    /// See `train_seconds`.
    pub codes_seconds: f64,
    /// Verification on the held-out identities.
    pub verification: HeldOut,
    /// Closed-set identification: top-1 of the probes.
    pub top1: f64,
    /// Top-1 of the rarest identities' probes.
    pub rare_top1: f64,
    /// Identities the identification returned that are not valid (GIF:
    /// a code the decoder should never return; must be 0).
    pub invalid_ids: usize,
    /// The step's time.
    pub timing: Timing,
    /// The head's memory (bytes).
    pub memory: HeadMemory,
}

/// One dataset's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetResult {
    /// Where the data is.
    pub data: PathBuf,
    /// Training identities N and images.
    pub identities: usize,
    /// See `identities`.
    pub train_images: usize,
    /// The fewest and most training images of an identity.
    pub min_images: usize,
    /// See `min_images`.
    pub max_images: usize,
    /// Probes, and those of the rarest identities.
    pub probes: usize,
    /// See `probes`.
    pub rare_probes: usize,
    /// The rarest identities' most training images.
    pub rare_max_images: usize,
    /// The heads, in order.
    pub heads: Vec<HeadResult>,
}

/// What [`run`] measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The machine (device, CPU, threads).
    pub machine: String,
    /// The training settings every head shared (the config's TOML keys).
    pub settings: Vec<(String, String)>,
    /// Per dataset.
    pub datasets: Vec<DatasetResult>,
}

/// Runs the experiment on each dataset of `data` (RecordIO directories;
/// see the module documentation) and writes the report into
/// `cfg.output`. `log` receives progress lines.
pub fn run(cfg: &ExperimentConfig, data: &[PathBuf], log: &mut dyn FnMut(&str)) -> Result<Report> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(Error::invalid(OP, "no dataset"));
    }
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create the directory: {e}")))?;
    let dev = crate::train::device(&cfg.train.device)?;
    let size = cfg.train.network_config()?.input;
    let mut report = Report { machine: machine(&dev), settings: settings(&cfg.train), datasets: Vec::new() };
    for path in data {
        let bar = crate::progress::scan_bar(cfg.progress);
        let base = Arc::new(Dataset::open_with(path, size, crate::progress::follow(&bar))?.resizing(cfg.train.resize));
        bar.finish_and_clear();
        let sp = split(base, cfg.held_out, cfg.max_held_out_images, cfg.rare_fraction, cfg.train.seed)?;
        let n = sp.train_counts.len();
        log(&format!(
            "{}: {n} training identities ({} images), {} held out ({} images), {} probes",
            path.display(),
            sp.train.len(),
            sp.held_out_ids.len(),
            sp.held_out.len(),
            sp.probes.len()
        ));
        let dir = out.join(format!("N{n}"));
        let rare_probes =
            (0..sp.probes.len()).filter(|&i| sp.probes.label(i).is_ok_and(|y| sp.rare[y as usize])).count();
        let rare_max_images =
            sp.train_counts.iter().zip(&sp.rare).filter(|(_, &r)| r).map(|(&c, _)| c).max().unwrap_or(0);
        let mut result = DatasetResult {
            data: path.clone(),
            identities: n,
            train_images: sp.train.len(),
            min_images: sp.train_counts.iter().copied().min().unwrap_or(0),
            max_images: sp.train_counts.iter().copied().max().unwrap_or(0),
            probes: sp.probes.len(),
            rare_probes,
            rare_max_images,
            heads: Vec::new(),
        };
        let mut rocs = Vec::new();
        for spec in &cfg.heads {
            let (r, roc) = run_head(cfg, *spec, &sp, &dir, log)?;
            log(&format!(
                "N = {n} {}: held-out accuracy (balanced) {:.4}, TAR@FAR=1e-4 {:.4}, top-1 {:.4} (rarest {:.4}), head {:.3} ms of a {:.1} ms step",
                r.head, r.verification.accuracy_balanced, r.verification.tar_at_far_1e4, r.top1, r.rare_top1, r.timing.head_ms, r.timing.step_ms
            ));
            result.heads.push(r);
            rocs.push(roc);
        }
        let names: Vec<String> = result.heads.iter().map(|h| h.head.clone()).collect();
        let curves: Vec<(&str, &Roc)> = names.iter().map(String::as_str).zip(rocs.iter()).collect();
        crate::io::write_atomic(&out.join(format!("roc-N{n}.svg")), crate::eval::roc_svg(&curves).as_bytes())?;
        report.datasets.push(result);
        // The report so far, so that a long run shows its progress.
        write_report(out, &report)?;
    }
    Ok(report)
}

/// Trains and evaluates one head on a split.
fn run_head(
    cfg: &ExperimentConfig,
    spec: HeadSpec,
    sp: &Split,
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(HeadResult, Roc)> {
    let name = spec.name();
    let mut tc = cfg.train.clone();
    tc.output = dir.join(&name);
    tc.resume = false;
    tc.codebook = None;
    // A fresh run directory: an old checkpoint or log must not mix in.
    if tc.output.exists() {
        std::fs::remove_dir_all(&tc.output)
            .map_err(|e| Error::file(&tc.output, format!("cannot clear the run directory: {e}")))?;
    }
    let opts = RunOptions { progress: cfg.progress, profile: true, ..RunOptions::default() };
    let mut codes_seconds = 0.0;
    match spec {
        HeadSpec::ArcFace => {
            tc.head = Some("arcface".into());
            tc.sample_rate = 1.0;
        }
        HeadSpec::PartialFc(r) => {
            tc.head = Some("partial_fc".into());
            tc.sample_rate = r;
        }
        HeadSpec::GifRandom => {
            tc.head = Some("gif".into());
            tc.sample_rate = 1.0;
        }
        HeadSpec::GifMeans => {
            let started = std::time::Instant::now();
            let mut wc = cfg.train.clone();
            wc.head = Some("arcface".into());
            wc.sample_rate = 1.0;
            wc.output = dir.join("warmup");
            wc.codebook = None;
            wc.resume = false;
            wc.val_targets.clear();
            if wc.output.exists() {
                std::fs::remove_dir_all(&wc.output)
                    .map_err(|e| Error::file(&wc.output, format!("cannot clear the run directory: {e}")))?;
            }
            let total = (sp.train.len() / wc.batch_size) as u64 * wc.num_epoch as u64;
            let warm = ((total as f64 * cfg.warmup_fraction).ceil() as u64).clamp(1, total.max(1));
            log(&format!("gif_means: a warm-up ArcFace run of {warm} of {total} steps"));
            let wopts = RunOptions { progress: cfg.progress, stop_after: Some(warm), ..RunOptions::default() };
            let (_, mut warm_trainer) = crate::train::run_on(&wc, sp.train.clone(), &wopts)?;
            let (vectors, classes, dim) =
                crate::data::identity_vectors(warm_trainer.backbone_mut(), &sp.train, wc.batch_size, |_, _| {})?;
            let tcfg = tokenizer::Config {
                vocab: cfg.train.vocab,
                length: cfg.train.length,
                seed: cfg.train.seed,
                ..tokenizer::Config::default()
            };
            let dev = warm_trainer.backbone().device().clone();
            let book = tokenizer::tokenize(Input::Vectors { data: vectors, dim }, &tcfg, &dev)?;
            debug_assert_eq!(book.len(), classes);
            let path = wc.output.join("codebook.safetensors");
            book.save(&path)?;
            codes_seconds = started.elapsed().as_secs_f64();
            tc.head = Some("gif".into());
            tc.sample_rate = 1.0;
            tc.codebook = Some(path);
        }
    }
    let (summary, mut trainer) = crate::train::run_on(&tc, sp.train.clone(), &opts)?;
    let (loss_first, loss_last) = logged_losses(&tc.output.join("metrics.csv"))?;
    let profile = trainer.profile().cloned().unwrap_or_default();
    let head_optimizer_ms = time_head_optimizer(&trainer)? * 1e3;
    let fb = median(&profile.head) * 1e3;
    let timing = Timing {
        head_forward_backward_ms: fb,
        head_optimizer_ms,
        head_ms: fb + head_optimizer_ms,
        forward_ms: median(&profile.forward) * 1e3,
        backward_ms: median(&profile.backward) * 1e3,
        optimizer_ms: median(&profile.optimizer) * 1e3,
        step_ms: median(&profile.step) * 1e3,
    };
    let memory = trainer.head_memory();
    let batch = cfg.train.batch_size;
    let (verification, roc) = verify_held_out(&mut trainer, &sp.held_out, batch)?;
    let (top1, rare_top1, invalid_ids) = identify(&mut trainer, sp, &tc, batch)?;
    let code = match trainer.head() {
        TrainHead::Code { head, .. } => Some((head.config().length, head.config().vocab)),
        _ => None,
    };
    Ok((
        HeadResult {
            head: name,
            code,
            steps: summary.steps,
            loss_first,
            loss_last,
            train_accuracy: summary.accuracy,
            train_seconds: summary.seconds,
            codes_seconds,
            verification,
            top1,
            rare_top1,
            invalid_ids,
            timing,
            memory,
        },
        roc,
    ))
}

/// The first and last loss of a run's metrics.csv.
fn logged_losses(path: &Path) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let losses: Vec<f64> =
        text.lines().skip(1).filter_map(|l| l.split(',').nth(2).and_then(|v| v.parse().ok())).collect();
    match (losses.first(), losses.last()) {
        (Some(&a), Some(&b)) => Ok((a, b)),
        _ => Err(Error::file(path, "no loss logged")),
    }
}

/// The head's optimizer update alone: a one-group optimizer (the head's
/// settings) over zero buffers of the head's parameters and gradients,
/// median seconds of 5 steps after one that allocates its state.
fn time_head_optimizer(trainer: &Trainer) -> Result<f64> {
    let dev = trainer.backbone().device().clone();
    let group = trainer.config().groups()[1];
    let mut opt = Optimizer::new(&dev, trainer.config().optimizer, vec![group], None)?;
    let mut bufs = Vec::new();
    for (_, t) in trainer.head().params() {
        bufs.push((Tensor::zeros(&dev, t.shape(), t.dtype())?, Tensor::zeros(&dev, t.shape(), DType::F32)?));
    }
    let mut times = Vec::new();
    for rep in 0..6 {
        dev.synchronize()?;
        let t0 = std::time::Instant::now();
        let refs: Vec<ParamRef<'_>> = bufs.iter_mut().map(|(v, g)| ParamRef { value: v, grad: g }).collect();
        opt.step(&mut [refs], 1e-3)?;
        dev.synchronize()?;
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&times))
}

/// All pairs of `ds` (labels: identities): flip-fused embeddings, cosine
/// scores, the ROC and insightface's 10-fold accuracy.
fn verify_held_out(trainer: &mut Trainer, ds: &Dataset, batch: usize) -> Result<(HeldOut, Roc)> {
    let (fused, _) = crate::eval::fused_embeddings(trainer.backbone_mut(), ds, batch)?;
    let e = trainer.backbone().config().embedding;
    let labels: Vec<u32> = (0..ds.len()).map(|i| ds.label(i)).collect::<Result<_>>()?;
    let n = labels.len();
    // The scores by the GEMM on the trainer's device, a tile at a time.
    let rows = Tensor::from_slice(trainer.backbone().device(), &[n, e], &fused)?;
    let (scores, issame) = crate::eval::pairs::all_pair_scores(&rows, &labels, crate::eval::pairs::DEFAULT_TILE)?;
    let roc = Roc::new(&scores, &issame)?;
    let dist: Vec<f64> = scores.iter().map(|s| 2.0 - 2.0 * s).collect();
    let (accuracy, accuracy_std, _) = kfold_accuracy(&dist, &issame, 10)?;
    let (pos, neg): (Vec<usize>, Vec<usize>) = (0..dist.len()).partition(|&i| issame[i]);
    let k = pos.len().min(neg.len());
    let (mut bd, mut bs) = (Vec::with_capacity(2 * k), Vec::with_capacity(2 * k));
    for j in 0..k {
        let (p, q) = (pos[j * pos.len() / k], neg[j * neg.len() / k]);
        bd.extend([dist[p], dist[q]]);
        bs.extend([true, false]);
    }
    let (accuracy_balanced, accuracy_balanced_std) =
        if bd.len() >= 10 { kfold_accuracy(&bd, &bs, 10).map(|(m, s, _)| (m, s))? } else { (f64::NAN, f64::NAN) };
    let (eer, _) = roc.eer();
    let v = HeldOut {
        identities: ds.classes(),
        images: n,
        pairs: scores.len(),
        positives: roc.positives,
        negatives: roc.negatives,
        accuracy,
        accuracy_std,
        accuracy_balanced,
        accuracy_balanced_std,
        tar_at_far_1e4: roc.tar_at_far(1e-4).tar,
        tar_at_far_1e3: roc.tar_at_far(1e-3).tar,
        eer,
        auc: roc.auc(),
    };
    Ok((v, roc))
}

/// Top-1 of the probes (all, the rarest identities'), and how many ids
/// returned are not valid training identities.
fn identify(trainer: &mut Trainer, sp: &Split, tc: &TrainConfig, batch: usize) -> Result<(f64, f64, usize)> {
    let (fused, _) = crate::eval::fused_embeddings(trainer.backbone_mut(), &sp.probes, batch)?;
    let e = trainer.backbone().config().embedding;
    let p = sp.probes.len();
    let dev = trainer.backbone().device().clone();
    let features = Tensor::from_slice(&dev, &[p, e], &fused)?;
    let n = sp.train_counts.len();
    let top = match trainer.head() {
        TrainHead::Code { head, .. } => {
            let path = tc.codebook.clone().unwrap_or_else(|| tc.output.join("codebook.safetensors"));
            let decoder = PrefixDecoder::from_codebook(Codebook::load(&path)?, &dev)?;
            crate::decode::identify(head, &decoder, &features, 1, Mode::Exact, None)?
        }
        TrainHead::Softmax(h) => h.top_k(&features, 1)?,
        TrainHead::PartialFc(pfc) => pfc.head().top_k(&features, 1)?,
        TrainHead::ModelParallel(_) => {
            return Err(Error::invalid("experiment", "identification with a model-parallel head is not written yet"))
        }
    };
    let (mut right, mut rare_right, mut rare_all, mut invalid) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..p {
        let y = sp.probes.label(i)? as usize;
        let got = top.ids[i];
        if got < 0 || got as usize >= n {
            invalid += 1;
        }
        let ok = got == y as i64;
        right += usize::from(ok);
        if sp.rare[y] {
            rare_all += 1;
            rare_right += usize::from(ok);
        }
    }
    let rate = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    Ok((rate(right, p), rate(rare_right, rare_all), invalid))
}

/// The machine, in words: the device, the CPU model, the threads.
fn machine(dev: &crate::runtime::device::Device) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = rayon::current_num_threads();
    format!("{dev}; {cpu}; {threads} threads")
}

/// The shared training settings, as TOML keys and values.
fn settings(t: &TrainConfig) -> Vec<(String, String)> {
    let net = t.network_config().ok();
    let mut v = vec![
        ("network".into(), t.network.clone()),
        ("embedding_size".into(), t.embedding_size.to_string()),
        ("margin_list".into(), format!("{:?}", t.margin_list)),
        ("scale".into(), t.scale.to_string()),
        ("batch_size".into(), t.batch_size.to_string()),
        ("optimizer".into(), t.optimizer.clone()),
        ("lr".into(), t.lr.to_string()),
        ("weight_decay".into(), t.weight_decay.to_string()),
        ("num_epoch".into(), t.num_epoch.to_string()),
        ("warmup_epoch".into(), t.warmup_epoch.to_string()),
        ("seed".into(), t.seed.to_string()),
        ("vocab".into(), t.vocab.to_string()),
        ("gamma".into(), t.gamma.to_string()),
        ("device".into(), t.device.clone()),
        ("flip".into(), t.flip.to_string()),
    ];
    if let Some(n) = net {
        v.push(("input_size".into(), n.input.to_string()));
        v.push(("stem_width".into(), n.stem.to_string()));
        v.push(("widths".into(), format!("{:?}", n.widths)));
        v.push(("layers".into(), format!("{:?}", n.layers)));
    }
    v
}

fn mb(bytes: usize) -> String {
    let m = bytes as f64 / (1 << 20) as f64;
    if m >= 10.0 {
        format!("{m:.0}")
    } else {
        format!("{m:.2}")
    }
}

/// The report's Markdown: the settings, then a table per dataset.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    s += &format!("Machine: {}\n\n", report.machine);
    s += "Settings (every head): ";
    s += &report.settings.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
    s += "\n";
    for d in &report.datasets {
        let h = d.heads.first().map(|h| &h.verification);
        s += &format!(
            "\n### N = {} training identities ({} images, {}–{} per identity; {})\n\n",
            d.identities,
            d.train_images,
            d.min_images,
            d.max_images,
            d.data.display()
        );
        if let Some(h) = h {
            s += &format!(
                "Held out: {} identities, {} images, {} pairs ({} positive). Probes: {} ({} of the rarest 10 %, \
                 ≤ {} training images each).\n\n",
                h.identities, h.images, h.pairs, h.positives, d.probes, d.rare_probes, d.rare_max_images
            );
        }
        s += "| head | code (l, v) | steps | loss first → last | held-out acc. (10-fold, balanced) | TAR@FAR=1e-4 | TAR@FAR=1e-3 | top-1 | top-1 rarest | head ms/step (fwd+bwd + opt) | step ms | head memory MB (w + g + opt + table) | train s |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &d.heads {
            let v = &r.verification;
            let m = &r.memory;
            s += &format!(
                "| {} | {} | {} | {:.3} → {:.3} | {:.4} ± {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} ({:.3} + {:.3}) | {:.1} | {} ({} + {} + {} + {}) | {:.0}{} |\n",
                r.head,
                r.code.map_or("–".into(), |(l, v)| format!("({l}, {v})")),
                r.steps,
                r.loss_first,
                r.loss_last,
                v.accuracy_balanced,
                v.accuracy_balanced_std,
                v.tar_at_far_1e4,
                v.tar_at_far_1e3,
                r.top1,
                r.rare_top1,
                r.timing.head_ms,
                r.timing.head_forward_backward_ms,
                r.timing.head_optimizer_ms,
                r.timing.step_ms,
                mb(m.total()),
                mb(m.weights),
                mb(m.gradients),
                mb(m.optimizer),
                mb(m.table),
                r.train_seconds,
                if r.codes_seconds > 0.0 { format!(" + {:.0} codes", r.codes_seconds) } else { String::new() }
            );
        }
    }
    s
}

/// Writes experiment.json, report.md and, with two or more datasets, the
/// plots against N into `out`.
pub fn write_report(out: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::invalid(OP, e.to_string()))?;
    crate::io::write_atomic(&out.join("experiment.json"), json.as_bytes())?;
    crate::io::write_atomic(&out.join("report.md"), markdown(report).as_bytes())?;
    if report.datasets.len() >= 2 {
        // The heads in the order they first appear.
        let mut names: Vec<&str> = Vec::new();
        for h in report.datasets.iter().flat_map(|d| &d.heads) {
            if !names.contains(&h.head.as_str()) {
                names.push(&h.head);
            }
        }
        let series = |f: &dyn Fn(&HeadResult) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
            names
                .iter()
                .map(|&name| {
                    let pts = report
                        .datasets
                        .iter()
                        .filter_map(|d| d.heads.iter().find(|h| h.head == name).map(|h| (d.identities as f64, f(h))))
                        .collect();
                    (name.to_string(), pts)
                })
                .collect()
        };
        let tar = series(&|h| h.verification.tar_at_far_1e4);
        let time = series(&|h| h.timing.head_ms);
        crate::io::write_atomic(
            &out.join("tar-vs-n.svg"),
            crate::eval::line_svg("training identities N", "held-out TAR at FAR = 1e-4", false, &tar).as_bytes(),
        )?;
        crate::io::write_atomic(
            &out.join("head-time-vs-n.svg"),
            crate::eval::line_svg("training identities N", "head time per step (ms)", true, &time).as_bytes(),
        )?;
    }
    Ok(())
}

/// Reads `dir/experiment.json` and writes report.md and the plots against
/// N again (after a change of their format, or to look at a run).
pub fn replot(dir: &Path) -> Result<Report> {
    let path = dir.join("experiment.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let report: Report =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not an experiment report: {e}")))?;
    write_report(dir, &report)?;
    Ok(report)
}

/// The built-in sizes of `gif-fr experiment` on synthetic data (`gif-fr
/// synth`'s generator at 32 × 32, a small IResNet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The smallest: seconds, for `cargo test` (checks that everything
    /// runs, not accuracy).
    Smoke,
    /// Two sizes in about 5 minutes on 2 CPU cores.
    Quick,
    /// Three sizes in under an hour on 2 CPU cores.
    Full,
}

impl Preset {
    /// By name: smoke, quick or full.
    pub fn parse(s: &str) -> Result<Preset> {
        match s {
            "smoke" => Ok(Preset::Smoke),
            "quick" => Ok(Preset::Quick),
            "full" => Ok(Preset::Full),
            _ => Err(Error::invalid(OP, format!("mode {s:?}: smoke, quick or full"))),
        }
    }

    /// The training identities N of each synthetic set.
    pub fn identities(self) -> Vec<usize> {
        match self {
            Preset::Smoke => vec![24],
            Preset::Quick => vec![100, 400],
            Preset::Full => vec![1000, 2000, 4000],
        }
    }

    /// Identities held out for verification.
    pub fn held_out(self) -> usize {
        match self {
            Preset::Smoke => 6,
            Preset::Quick => 60,
            Preset::Full => 300,
        }
    }

    /// The synthetic set of `n` training identities (and the held-out
    /// ones): 32 × 32, 2–20 images an identity on a power law (exponent
    /// 1.2), the generator's default nuisances.
    pub fn synth(self, n: usize) -> crate::data::synth::SynthConfig {
        let mut s = crate::data::synth::SynthConfig::new(n + self.held_out());
        s.size = 32;
        s.min_images = 2;
        s.max_images = if self == Preset::Smoke { 6 } else { 20 };
        s.tail = 1.2;
        s.seed = 7;
        s
    }

    /// The shared training configuration (TOML with arcface_torch's keys):
    /// a small IResNet (stages of one block, widths 8–32, embedding 64) at
    /// 32 × 32; ArcFace's margin (1, 0.5, 0) at s = 64 for every head;
    /// SGD 0.1 with insightface's polynomial schedule, one warm-up epoch;
    /// GIF v = 16, γ = 1; the best device (the first GPU, else the CPU).
    pub fn train_toml(self) -> String {
        let (epochs, batch, frequent) = match self {
            Preset::Smoke => (2, 16, 1),
            Preset::Quick => (6, 64, 10),
            Preset::Full => (3, 128, 20),
        };
        format!(
            r#"network = "r18"
embedding_size = 64
input_size = 32
stem_width = 8
widths = [8, 16, 24, 32]
layers = [1, 1, 1, 1]
margin_list = [1.0, 0.5, 0.0]
scale = 64.0
batch_size = {batch}
lr = 0.1
num_epoch = {epochs}
warmup_epoch = 1
frequent = {frequent}
vocab = 16
gamma = 1.0
val_targets = []
rec = "."
device = "best"
"#
        )
    }

    /// The experiment of this preset, writing to `output`, with
    /// `overrides` (`key=value`, as `gif-fr train --set`) applied to the
    /// training configuration.
    pub fn config(self, output: &Path, overrides: &[String]) -> Result<ExperimentConfig> {
        let train = TrainConfig::parse(&self.train_toml(), overrides, "the experiment's training settings")?;
        Ok(ExperimentConfig {
            train,
            heads: HeadSpec::all(),
            held_out: self.held_out(),
            max_held_out_images: 4096,
            rare_fraction: 0.1,
            warmup_fraction: 0.25,
            output: output.to_path_buf(),
            progress: false,
        })
    }
}

/// Writes the synthetic set of `n` training identities of `preset` into
/// `dir` (skipped when `dir/synth-config.json` says it holds that set
/// already); returns `dir`.
pub fn write_synthetic(preset: Preset, n: usize, dir: &Path) -> Result<PathBuf> {
    let cfg = preset.synth(n);
    let stamp = serde_json::to_string(&cfg).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let mark = dir.join("synth-config.json");
    if std::fs::read_to_string(&mark).is_ok_and(|s| s == stamp) && dir.join("train.rec").exists() {
        return Ok(dir.to_path_buf());
    }
    crate::data::synth::write_training_set(&cfg, dir, |_, _| {})?;
    crate::io::write_atomic(&mark, stamp.as_bytes())?;
    Ok(dir.to_path_buf())
}
