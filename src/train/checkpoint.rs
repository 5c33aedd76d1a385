//! Training checkpoints: a [`Trainer`]'s whole state in one directory, as
//! insightface's `checkpoint_gpu_{rank}.pt` and `model.pt`:
//!
//! - `checkpoint.safetensors`: every tensor of the state in the crate's
//!   layouts, bit for bit — `backbone.{name}` (insightface's state-dict
//!   names, running statistics included), `head.{name}` (`centres`,
//!   `projections`; `weight` for the softmax heads, in their stored dtype),
//!   `optim.{group}.{index}.{momentum_buffer | exp_avg | exp_avg_sq |
//!   master}` (PyTorch's names; group 0 the backbone, 1 the head) — and
//!   metadata (strings): `format` = "gif-fr-train", `format_version`, the
//!   micro-batch count `step`, `optimizer_steps`, `skipped`, `last_lr`, the
//!   dropout position, and fingerprints of everything the state depends
//!   on: the backbone's and the head's configurations, the trainer's
//!   (optimizer, schedule, accumulation), Partial FC's rate and seed, and
//!   for GIF a hash of the codes;
//! - `model.safetensors`: the backbone alone as a PyTorch-layout state dict
//!   ([`crate::backbone::IResNet::save`]), what `gif-fr embed --weights` and PyTorch load.
//!
//! A model-parallel head ([`TrainHead::ModelParallel`]) is one shard per
//! rank, so every rank saves and resumes its own
//! `checkpoint.rank{r}-of-{W}.safetensors` (the whole state with that
//! rank's shard and its optimizer state; metadata `shard` = "start..end of
//! N"), as insightface writes a `checkpoint_gpu_{rank}.pt` per rank; rank 0
//! alone writes `model.safetensors`.
//!
//! [`Trainer::resume`] is for a trainer built as the saved one was (the
//! same configuration, codebook and seeds): it checks the fingerprints
//! (another configuration is an error naming it), then overwrites the
//! state in place; the next step continues bit-identically. Files are
//! written under a temporary name and renamed, so a crash never leaves a
//! partial checkpoint; a truncated or corrupt file is an [`Error::File`].
//! Checkpoints are taken between optimizer steps (a partly accumulated
//! gradient is not saved: saving in the middle of an accumulation is an
//! error).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::safetensors::{le_bytes, write, Entry};
use crate::runtime::tensor::{DType, Tensor};
use crate::train::trainer::{TrainHead, Trainer};

/// The full state's file name in a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The backbone's state dict in a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
const FORMAT: &str = "gif-fr-train";
const FORMAT_VERSION: &str = "1";

use crate::distributed::fingerprint as fnv1a;

/// What the state depends on, as strings compared at resume (and across
/// ranks, [`Trainer::set_communicator`]).
fn fingerprints(tr: &Trainer) -> BTreeMap<String, String> {
    let head = match &tr.head {
        TrainHead::Code { head, .. } => format!("{:?}", head.config()),
        TrainHead::Softmax(h) => format!("{:?}", h.config()),
        TrainHead::PartialFc(p) => format!("{:?}, rate {:?}, seed {}", p.head().config(), p.rate(), p.seed()),
        // The same on every rank: the shard is not part of it.
        TrainHead::ModelParallel(h) => format!(
            "{:?}, rate {:?}, seed {:?}, model-parallel over {}",
            h.config(),
            h.sample_rate(),
            h.seed(),
            h.world()
        ),
    };
    let codes = match &tr.head {
        TrainHead::Code { table, .. } => {
            format!("{} identities, fnv1a {:016x}", table.len(), fnv1a(bytemuck::cast_slice(table.codes())))
        }
        _ => "none".into(),
    };
    let dtypes: Vec<String> = tr.head.params().iter().map(|(n, t)| format!("{n} {:?}", t.dtype())).collect();
    [
        ("backbone_config", format!("{:?}", tr.backbone.config())),
        ("head", tr.head.name().to_string()),
        ("head_config", head),
        ("head_dtypes", dtypes.join(", ")),
        ("codes", codes),
        ("trainer_config", format!("{:?}", tr.cfg)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A model-parallel head's shard, as the checkpoint's metadata states it.
fn shard_meta(tr: &Trainer) -> Option<String> {
    match &tr.head {
        TrainHead::ModelParallel(h) => {
            let s = h.shard();
            Some(format!("{}..{} of {}", s.start, s.end, h.config().classes))
        }
        _ => None,
    }
}

fn f32_entry(name: String, t: &Tensor) -> Result<Entry<'static>> {
    let bytes = le_bytes(&t.to_vec::<f32>()?).into_owned().into();
    Ok(Entry { name, dtype: "F32", shape: t.shape().to_vec(), bytes })
}

impl Trainer {
    /// The file [`Trainer::save`] writes the state to in `dir`:
    /// `checkpoint.safetensors`, or this rank's
    /// `checkpoint.rank{r}-of-{W}.safetensors` for a model-parallel head.
    pub fn checkpoint_path(&self, dir: &Path) -> std::path::PathBuf {
        match &self.head {
            TrainHead::ModelParallel(h) => {
                dir.join(format!("checkpoint.rank{}-of-{}.safetensors", h.rank(), h.world()))
            }
            _ => dir.join(CHECKPOINT_FILE),
        }
    }

    /// What must be equal on every rank ([`Trainer::set_communicator`]):
    /// what a checkpoint must match to resume (the settings, the backbone's
    /// and head's configurations, the head's dtypes, the code table), and
    /// the steps taken.
    pub(crate) fn rank_fingerprint(&self) -> u64 {
        fnv1a(format!("{:?}|steps {}|{}", fingerprints(self), self.micro, self.reduction_setting()).as_bytes())
    }

    /// Writes the training state into directory `dir` (created when
    /// missing): `checkpoint.safetensors` and `model.safetensors` (see the
    /// module documentation), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        const OP: &str = "Trainer::save";
        if !self.micro.is_multiple_of(self.cfg.gradient_acc as u64) {
            return Err(Error::invalid(
                OP,
                format!(
                    "step {} is inside an accumulation of {} micro-batches: save after an optimizer step",
                    self.micro, self.cfg.gradient_acc
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create the directory: {e}")))?;
        let mut entries = Vec::new();
        for (name, t) in self.backbone.state() {
            entries.push(f32_entry(format!("backbone.{name}"), t)?);
        }
        for (name, t) in self.head.params() {
            let entry = match t.dtype() {
                DType::F32 => f32_entry(format!("head.{name}"), t)?,
                DType::BF16 => Entry {
                    name: format!("head.{name}"),
                    dtype: "BF16",
                    shape: t.shape().to_vec(),
                    bytes: le_bytes(&t.to_vec::<half::bf16>()?).into_owned().into(),
                },
                other => return Err(Error::invalid(OP, format!("head {name}: dtype {other:?}"))),
            };
            entries.push(entry);
        }
        let (state, t, skipped) = self.optimizer.export()?;
        for (name, tensor) in state {
            entries.push(f32_entry(format!("optim.{name}"), tensor)?);
        }
        let mut meta = fingerprints(self);
        if let Some(shard) = shard_meta(self) {
            meta.insert("shard".into(), shard);
        }
        let (seed, dropout_step) = self.backbone.dropout_position();
        for (k, v) in [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("step", self.micro.to_string()),
            ("optimizer_steps", t.to_string()),
            ("skipped", skipped.to_string()),
            ("last_lr", format!("{:?}", self.last_lr)),
            ("dropout_seed", seed.to_string()),
            ("dropout_step", dropout_step.to_string()),
        ] {
            meta.insert(k.to_string(), v);
        }
        let rank = match &self.head {
            TrainHead::ModelParallel(h) => h.rank(),
            _ => 0,
        };
        if rank == 0 {
            self.backbone.save(&dir.join(MODEL_FILE))?;
        }
        write(&self.checkpoint_path(dir), &entries, &meta)
    }

    /// Restores the state [`Trainer::save`] wrote into `dir` (see the
    /// module documentation). On error the trainer may hold part of the
    /// checkpoint's tensors: build it again before training on.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let path = self.checkpoint_path(dir);
        let bad = |m: String| Error::file(&path, m);
        let f = std::fs::File::open(&path).map_err(|e| bad(format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only and private; the checkpoint is not
        // expected to change while it is read (as for every mapped file).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("not a valid safetensors file (truncated?): {e}")))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let get = |k: &str| {
            meta.get(k).cloned().ok_or_else(|| bad(format!("no metadata {k:?} (not a gif-fr training checkpoint?)")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", meta["format"])));
        }
        if get("format_version")? != FORMAT_VERSION {
            return Err(bad(format!("format version {:?}, this build reads {FORMAT_VERSION}", meta["format_version"])));
        }
        let mut current = fingerprints(self);
        for k in ["head", "backbone_config", "head_config", "head_dtypes", "codes", "trainer_config"] {
            let want = current.remove(k).unwrap_or_default();
            let have = get(k)?;
            if have != want {
                return Err(bad(format!("a checkpoint of another {k}: it has {have}; this trainer has {want}")));
            }
        }
        if let Some(want) = shard_meta(self) {
            let have = get("shard")?;
            if have != want {
                return Err(bad(format!("a checkpoint of shard {have}; this rank holds {want}")));
            }
        }
        let num = |k: &str| -> Result<u64> { get(k)?.parse().map_err(|e| bad(format!("metadata {k}: {e}"))) };
        let (step, t, skipped) = (num("step")?, num("optimizer_steps")?, num("skipped")?);
        let (seed, dropout_step) = (num("dropout_seed")?, num("dropout_step")?);
        let last_lr: f64 = get("last_lr")?.parse().map_err(|e| bad(format!("metadata last_lr: {e}")))?;
        if step % self.cfg.gradient_acc as u64 != 0 {
            return Err(bad(format!("step {step} is not a multiple of gradient_acc {}", self.cfg.gradient_acc)));
        }

        let mut used = std::collections::BTreeSet::new();
        let mut fill = |name: &str, t: &mut Tensor| -> Result<()> {
            let view = st.tensor(name).map_err(|_| bad(format!("no tensor {name:?}")))?;
            if view.shape() != t.shape() {
                return Err(bad(format!("{name}: shape {:?}, expected {:?}", view.shape(), t.shape())));
            }
            match (view.dtype(), t.dtype()) {
                (safetensors::Dtype::F32, DType::F32) => {
                    t.copy_from_host(&bytemuck::pod_collect_to_vec::<u8, f32>(view.data()))?
                }
                (safetensors::Dtype::BF16, DType::BF16) => {
                    t.copy_from_host(&bytemuck::pod_collect_to_vec::<u8, half::bf16>(view.data()))?
                }
                (have, _) => return Err(bad(format!("{name}: dtype {have:?}, expected {:?}", t.dtype()))),
            }
            used.insert(name.to_string());
            Ok(())
        };
        let names: Vec<String> = self.backbone.state().into_keys().collect();
        for name in &names {
            let slot =
                self.backbone.slot(name).ok_or_else(|| Error::invalid("Trainer::resume", format!("no slot {name}")))?;
            fill(&format!("backbone.{name}"), slot)?;
        }
        for (name, t) in self.head.params_mut() {
            fill(&format!("head.{name}"), t)?;
        }
        let layout = |ts: Vec<&Tensor>| ts.into_iter().map(|t| (t.numel(), t.dtype())).collect::<Vec<_>>();
        let backbone_params = layout(self.backbone.params_mut().into_iter().map(|(_, t)| &*t).collect());
        let head_params = layout(self.head.params().into_iter().map(|(_, t)| t).collect());
        let dev = self.backbone.device().clone();
        let mut take = |key: &str, numel: usize| -> Result<Option<Tensor>> {
            let name = format!("optim.{key}");
            let Ok(view) = st.tensor(&name) else { return Ok(None) };
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != [numel] {
                return Err(bad(format!(
                    "{name}: {:?} {:?}, expected F32 of {numel} elements",
                    view.dtype(),
                    view.shape()
                )));
            }
            used.insert(name);
            let v = bytemuck::pod_collect_to_vec::<u8, f32>(view.data());
            Ok(Some(Tensor::from_slice(&dev, &[numel], &v)?))
        };
        self.optimizer.import(&[backbone_params, head_params], t, skipped, &mut take)?;
        if let Some(extra) = st.names().into_iter().find(|n| !used.contains(*n)) {
            return Err(bad(format!("unexpected tensor {extra:?}")));
        }
        self.backbone.set_dropout_position(seed, dropout_step);
        self.micro = step;
        self.last_lr = last_lr;
        Ok(())
    }
}
