//! `gif-fr train`'s configuration: a TOML file whose keys are insightface
//! arcface_torch's (configs/base.py, with its defaults), plus GIF's and
//! the crate's own, each documented on [`TrainConfig`]'s fields.
//!
//! Keys of arcface_torch that change nothing here (logging, DALI, wandb,
//! workers) are accepted and reported as ignored; an unknown key, a value
//! of the wrong type, or a value out of range is an [`Error`] naming the
//! key. `--set key=value` overrides (a TOML value: `--set lr=0.05`,
//! `--set 'head="gif"'`) are applied before the checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backbone::IResNetConfig;
use crate::error::{Error, Result};
use crate::head::Margin;
use crate::runtime::tensor::DType;
use crate::train::{OptimizerKind, Schedule, TrainerConfig};

fn d_network() -> String {
    "r50".into()
}
fn d_embedding() -> usize {
    512
}
fn d_margin() -> [f32; 3] {
    [1.0, 0.5, 0.0]
}
fn d_one_f32() -> f32 {
    1.0
}
fn d_batch() -> usize {
    128
}
fn d_optimizer() -> String {
    "sgd".into()
}
fn d_lr() -> f64 {
    0.1
}
fn d_momentum() -> f32 {
    0.9
}
fn d_weight_decay() -> f32 {
    5e-4
}
fn d_frequent() -> u64 {
    10
}
fn d_one() -> usize {
    1
}
fn d_seed() -> u64 {
    2048
}
fn d_epochs() -> usize {
    20
}
fn d_output() -> PathBuf {
    "work_dirs/gif_fr".into()
}
fn d_vocab() -> usize {
    16
}
fn d_scale() -> f32 {
    64.0
}
fn d_device() -> String {
    "best".into()
}
fn d_clip() -> f32 {
    5.0
}
fn d_workers() -> usize {
    2
}
fn d_verbose() -> u64 {
    2000
}
fn d_val_targets() -> Vec<String> {
    ["lfw", "cfp_fp", "agedb_30"].map(String::from).to_vec()
}
fn d_true() -> bool {
    true
}

/// The training configuration (see the module documentation). Field names
/// are the TOML keys.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    // ---- arcface_torch's keys (configs/base.py defaults) ----
    /// "r18", "r34", "r50" (default) or "r100".
    #[serde(default = "d_network")]
    pub network: String,
    /// The embedding size (512).
    #[serde(default = "d_embedding")]
    pub embedding_size: usize,
    /// CombinedMarginLoss's (m1, m2, m3): (1.0, 0.5, 0.0) ArcFace (default),
    /// (1.0, 0.0, 0.4) CosFace. The code head uses it too.
    #[serde(default = "d_margin")]
    pub margin_list: [f32; 3],
    /// Partial FC's sample rate (1.0: every class).
    #[serde(default = "d_one_f32")]
    pub sample_rate: f32,
    /// Mixed precision: here, the convolutions on bf16 operands (as
    /// autocast; insightface uses fp16 with a loss scaler).
    #[serde(default)]
    pub fp16: bool,
    /// Images per micro-batch (128).
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// "sgd" (default) or "adamw".
    #[serde(default = "d_optimizer")]
    pub optimizer: String,
    /// The base learning rate (0.1).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// SGD's momentum (0.9).
    #[serde(default = "d_momentum")]
    pub momentum: f32,
    /// Weight decay (5e-4).
    #[serde(default = "d_weight_decay")]
    pub weight_decay: f32,
    /// Log (progress, CSV, log line) every this many micro-batches (10).
    #[serde(default = "d_frequent")]
    pub frequent: u64,
    /// Micro-batches per optimizer step (1).
    #[serde(default = "d_one")]
    pub gradient_acc: usize,
    /// The seed of the weights, the data order and the sampling (2048).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Epochs (20).
    #[serde(default = "d_epochs")]
    pub num_epoch: usize,
    /// Warmup epochs of the polynomial schedule (0).
    #[serde(default)]
    pub warmup_epoch: usize,
    /// The output directory: checkpoint, model, metrics.csv, training.log.
    #[serde(default = "d_output")]
    pub output: PathBuf,
    /// Continue from the checkpoint in `output`.
    #[serde(default)]
    pub resume: bool,
    /// The identities (checked against the labels when given; default: the
    /// largest label + 1).
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// The images (checked against the data when given).
    #[serde(default)]
    pub num_image: Option<usize>,
    /// insightface's training set: the directory of train.rec, train.idx
    /// and property.
    #[serde(default)]
    pub rec: Option<PathBuf>,
    /// insightface's inter-class filtering: not supported (0 only).
    #[serde(default)]
    pub interclass_filtering_threshold: f64,
    /// Accepted, ignored (checkpoints are always whole here).
    #[serde(default)]
    pub save_all_states: Option<toml::Value>,
    /// Evaluate the `val_targets` every this many steps (2000).
    #[serde(default = "d_verbose")]
    pub verbose: u64,
    /// Accepted, ignored.
    #[serde(default)]
    pub dali: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub dali_aug: Option<toml::Value>,
    /// Decoding threads (2).
    #[serde(default = "d_workers")]
    pub num_workers: usize,
    /// Verification sets evaluated during training: a name is
    /// `<rec>/<name>.bin` (insightface's convention; a missing one is
    /// skipped, as insightface does), a value ending in `.bin` a path
    /// (["lfw", "cfp_fp", "agedb_30"]).
    #[serde(default = "d_val_targets")]
    pub val_targets: Vec<String>,
    /// Accepted, ignored.
    #[serde(default)]
    pub using_wandb: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub wandb_key: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub wandb_entity: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub wandb_project: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub wandb_log_all: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub save_artifacts: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub wandb_resume: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub suffix_run_name: Option<toml::Value>,
    /// Accepted, ignored.
    #[serde(default)]
    pub notes: Option<toml::Value>,

    // ---- GIF's keys ----
    /// "gif", "arcface" or "partial_fc" (default: "partial_fc" when
    /// sample_rate < 1, else "arcface", as arcface_torch's one head).
    #[serde(default)]
    pub head: Option<String>,
    /// The code head's vocabulary v (16).
    #[serde(default = "d_vocab")]
    pub vocab: usize,
    /// The code length l (default: the smallest with v^l >= N).
    #[serde(default)]
    pub length: Option<usize>,
    /// Weight γ of the dot-regression loss (1).
    #[serde(default = "d_one_f32")]
    pub gamma: f32,
    /// Per-position loss weights λ (default all 1).
    #[serde(default)]
    pub lambdas: Option<Vec<f32>>,
    /// Per-position projection size d_p (default none).
    #[serde(default)]
    pub projection: Option<usize>,
    /// A codebook (`gif-fr tokenize`) of the N identities; without one, the
    /// codes are made by the tokenizer from seeded random identity vectors
    /// and written to `output/codebook.safetensors`.
    #[serde(default)]
    pub codebook: Option<PathBuf>,

    // ---- the crate's keys ----
    /// The logit scale s (64, insightface's fixed value).
    #[serde(default = "d_scale")]
    pub scale: f32,
    /// The backbone's gradient-norm clip (5, insightface's fixed value).
    #[serde(default = "d_clip")]
    pub clip_grad_norm: f32,
    /// The training images without `rec`: a folder of identity folders
    /// (JPEG / PNG), or a .npy array (uint8 `[N, H, W, 3]` RGB, or f32
    /// `[N, 3, H, W]` normalized) with `labels`.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// The labels of a .npy `images` (1-D integers).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Random horizontal flips (insightface's RandomHorizontalFlip; true).
    #[serde(default = "d_true")]
    pub flip: bool,
    /// An image that fails to read (corrupt, truncated, another size)
    /// mid-epoch: false (default) stops training with the error naming it;
    /// true replaces it by the next image that reads, counts it and logs
    /// the count at the end (`Loader::skip_corrupt`).
    #[serde(default)]
    pub skip_corrupt: bool,
    /// Resize square training images of another size to the network's
    /// input (bilinear) instead of refusing them (false: aligned faces come
    /// at the network's size; `Dataset::resizing`).
    #[serde(default)]
    pub resize: bool,
    /// "best" (default), "cpu", "cuda" or "sim".
    #[serde(default = "d_device")]
    pub device: String,
    /// Also checkpoint every this many micro-batches (besides every epoch).
    #[serde(default)]
    pub save_every: Option<u64>,
    /// Overrides of the network's shape, for small models: input size (a
    /// multiple of 16; 112).
    #[serde(default)]
    pub input_size: Option<usize>,
    /// The stem's channels (64).
    #[serde(default)]
    pub stem_width: Option<usize>,
    /// The four stages' channels (64, 128, 256, 512).
    #[serde(default)]
    pub widths: Option<[usize; 4]>,
    /// The four stages' blocks (the network's).
    #[serde(default)]
    pub layers: Option<[usize; 4]>,
    /// Dropout before the Linear layer (0).
    #[serde(default)]
    pub dropout: f32,
}

/// The keys accepted only for compatibility, with why they change nothing.
const IGNORED: [(&str, &str); 12] = [
    ("save_all_states", "checkpoints always hold the whole state"),
    ("dali", "no DALI pipeline"),
    ("dali_aug", "no DALI pipeline"),
    ("using_wandb", "no wandb logging (metrics.csv instead)"),
    ("wandb_key", "no wandb logging"),
    ("wandb_entity", "no wandb logging"),
    ("wandb_project", "no wandb logging"),
    ("wandb_log_all", "no wandb logging"),
    ("save_artifacts", "no wandb logging"),
    ("wandb_resume", "no wandb logging"),
    ("suffix_run_name", "no wandb logging"),
    ("notes", "no wandb logging"),
];

const OP: &str = "train config";

fn bad(key: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid(OP, format!("{key}: {message}"))
}

impl TrainConfig {
    /// Parses a TOML text with `overrides` (`key=value`, a TOML value)
    /// applied on top, then checks every value. `source` names the text in
    /// errors.
    pub fn parse(text: &str, overrides: &[String], source: &str) -> Result<TrainConfig> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| Error::invalid(OP, format!("{source}: {e}")))?;
        for o in overrides {
            let (k, v) =
                o.split_once('=').ok_or_else(|| Error::invalid(OP, format!("--set {o:?}: expected key=value")))?;
            let k = k.trim();
            let one: toml::Table = format!("{k} = {}", v.trim())
                .parse()
                .or_else(|_| {
                    // A bare word: a string (`--set head=gif`).
                    format!("{k} = {:?}", v.trim()).parse()
                })
                .map_err(|e: toml::de::Error| Error::invalid(OP, format!("--set {o:?}: {e}")))?;
            table.extend(one);
        }
        let cfg: TrainConfig = TrainConfig::deserialize(table)
            .map_err(|e: toml::de::Error| Error::invalid(OP, format!("{source}: {}", e.message())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses `path` (see [`TrainConfig::parse`]).
    pub fn load(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        TrainConfig::parse(&text, overrides, &path.display().to_string())
    }

    /// The verification sets to evaluate during training: `(name, path)`
    /// of each `val_targets` entry (see the key), found or not.
    pub fn val_paths(&self) -> Vec<(String, PathBuf)> {
        // The data's directory: `rec`, or the images folder, or the
        // folder holding the images' .npy.
        let data = self.rec.clone().or_else(|| self.images.clone()).unwrap_or_default();
        let dir = if data.is_file() { data.parent().map(Path::to_path_buf).unwrap_or_default() } else { data };
        self.val_targets
            .iter()
            .map(|t| {
                if t.ends_with(".bin") {
                    let p = PathBuf::from(t);
                    let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or(t).to_string();
                    (name, p)
                } else {
                    (t.clone(), dir.join(format!("{t}.bin")))
                }
            })
            .collect()
    }

    /// The compatibility keys present, with why each is ignored.
    pub fn ignored_keys(&self) -> Vec<(&'static str, &'static str)> {
        let present = [
            self.save_all_states.is_some(),
            self.dali.is_some(),
            self.dali_aug.is_some(),
            self.using_wandb.is_some(),
            self.wandb_key.is_some(),
            self.wandb_entity.is_some(),
            self.wandb_project.is_some(),
            self.wandb_log_all.is_some(),
            self.save_artifacts.is_some(),
            self.wandb_resume.is_some(),
            self.suffix_run_name.is_some(),
            self.notes.is_some(),
        ];
        IGNORED.iter().zip(present).filter(|(_, p)| *p).map(|(k, _)| *k).collect()
    }

    /// The head: "gif", "arcface" or "partial_fc".
    pub fn head_kind(&self) -> &str {
        match &self.head {
            Some(h) => h,
            None if self.sample_rate < 1.0 => "partial_fc",
            None => "arcface",
        }
    }

    /// The margin of `margin_list`.
    pub fn margin(&self) -> Margin {
        let [m1, m2, m3] = self.margin_list;
        Margin::Combined { m1, m2, m3 }
    }

    /// The network's shape: the named architecture with the overrides.
    pub fn network_config(&self) -> Result<IResNetConfig> {
        let mut n = IResNetConfig::arch(&self.network).map_err(|e| bad("network", e))?;
        n.embedding = self.embedding_size;
        n.input = self.input_size.unwrap_or(n.input);
        n.stem = self.stem_width.unwrap_or(n.stem);
        n.widths = self.widths.unwrap_or(n.widths);
        n.layers = self.layers.unwrap_or(n.layers);
        n.dropout = self.dropout;
        n.conv_dtype = if self.fp16 { DType::BF16 } else { DType::F32 };
        Ok(n)
    }

    /// The trainer's settings for `num_image` images (a rank's share, on
    /// several ranks): insightface's schedule (polynomial, power 2, warmup)
    /// over `num_image / batch_size` micro-batches an epoch.
    pub fn trainer_config(&self, num_image: usize) -> Result<TrainerConfig> {
        let per_epoch = (num_image / self.batch_size) as u64;
        if per_epoch == 0 {
            return Err(bad("batch_size", format!("{} is more than the {num_image} images", self.batch_size)));
        }
        let steps = |epochs: usize, key: &str| {
            per_epoch
                .checked_mul(epochs as u64)
                .ok_or_else(|| bad(key, format!("{epochs} epochs of {per_epoch} steps overflow the step counter")))
        };
        let total = steps(self.num_epoch, "num_epoch")?;
        let warmup = steps(self.warmup_epoch, "warmup_epoch")?;
        let optimizer = match self.optimizer.as_str() {
            "sgd" => OptimizerKind::Sgd { momentum: self.momentum },
            _ => OptimizerKind::ADAMW,
        };
        Ok(TrainerConfig {
            optimizer,
            weight_decay: self.weight_decay,
            head_lr_scale: 1.0,
            max_grad_norm: Some(self.clip_grad_norm),
            gradient_acc: self.gradient_acc,
            schedule: Schedule::insightface(self.lr, warmup, total),
        })
    }

    fn validate(&self) -> Result<()> {
        let pos = |k: &str, ok: bool, v: &dyn std::fmt::Debug| {
            if ok {
                Ok(())
            } else {
                Err(bad(k, format!("{v:?} is out of range")))
            }
        };
        if !matches!(self.network.as_str(), "r18" | "r34" | "r50" | "r100") {
            return Err(bad("network", format!("{:?}: r18, r34, r50 or r100", self.network)));
        }
        pos("embedding_size", (1..=65536).contains(&self.embedding_size), &self.embedding_size)?;
        pos("sample_rate", self.sample_rate > 0.0 && self.sample_rate <= 1.0, &self.sample_rate)?;
        pos("batch_size", (1..=1 << 20).contains(&self.batch_size), &self.batch_size)?;
        if !matches!(self.optimizer.as_str(), "sgd" | "adamw") {
            return Err(bad("optimizer", format!("{:?}: sgd or adamw", self.optimizer)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("lr", format!("{} must be finite and > 0", self.lr)));
        }
        pos("momentum", (0.0..1.0).contains(&self.momentum), &self.momentum)?;
        pos("weight_decay", self.weight_decay.is_finite() && self.weight_decay >= 0.0, &self.weight_decay)?;
        pos("frequent", self.frequent >= 1, &self.frequent)?;
        pos("verbose", self.verbose >= 1, &self.verbose)?;
        if let Some(t) = self.val_targets.iter().find(|t| t.is_empty()) {
            return Err(bad("val_targets", format!("{t:?} names no set")));
        }
        pos("gradient_acc", (1..=1 << 20).contains(&self.gradient_acc), &self.gradient_acc)?;
        pos("num_epoch", (1..=1 << 20).contains(&self.num_epoch), &self.num_epoch)?;
        if self.warmup_epoch >= self.num_epoch {
            return Err(bad(
                "warmup_epoch",
                format!("{} must be below num_epoch {}", self.warmup_epoch, self.num_epoch),
            ));
        }
        pos("num_workers", self.num_workers <= 256, &self.num_workers)?;
        if self.interclass_filtering_threshold != 0.0 {
            return Err(bad("interclass_filtering_threshold", "inter-class filtering is not supported (0 only)"));
        }
        if !matches!(self.head_kind(), "gif" | "arcface" | "partial_fc") {
            return Err(bad("head", format!("{:?}: gif, arcface or partial_fc", self.head_kind())));
        }
        if self.head_kind() == "arcface" && self.sample_rate < 1.0 {
            return Err(bad(
                "sample_rate",
                "the full softmax (head = \"arcface\") trains every class: 1.0, or head = \"partial_fc\"",
            ));
        }
        pos("vocab", (2..=4096).contains(&self.vocab), &self.vocab)?;
        pos("gamma", self.gamma.is_finite() && self.gamma >= 0.0, &self.gamma)?;
        pos("scale", self.scale.is_finite() && self.scale > 0.0, &self.scale)?;
        pos("clip_grad_norm", self.clip_grad_norm.is_finite() && self.clip_grad_norm > 0.0, &self.clip_grad_norm)?;
        pos("dropout", (0.0..1.0).contains(&self.dropout), &self.dropout)?;
        if !matches!(self.device.as_str(), "best" | "cpu" | "cuda" | "sim") {
            return Err(bad("device", format!("{:?}: best, cpu, cuda or sim", self.device)));
        }
        if self.save_every == Some(0) {
            return Err(bad("save_every", "0 is out of range"));
        }
        self.margin().validate(OP).map_err(|e| bad("margin_list", e))?;
        self.network_config()?.validate().map_err(|e| bad("network shape", e))?;
        let folder = self.images.as_ref().is_some_and(|p| p.is_dir());
        if self.rec.is_none() && !folder && (self.images.is_none() || self.labels.is_none()) {
            return Err(bad(
                "images",
                "the training data: give `rec`, an `images` folder, or `images` and `labels` (.npy)",
            ));
        }
        Ok(())
    }
}
