//! A whole training run from a [`TrainConfig`], as `gif-fr train` runs it
//! (arcface_torch's train_v2.py loop): the data, the backbone and the head
//! built from the configuration, epochs of seeded shuffled batches
//! (drop_last), the [`Trainer`]'s steps, a line of metrics every
//! `frequent` micro-batches (an indicatif bar, `training.log` and
//! `metrics.csv` in the output directory), checkpoints at every epoch's end
//! (and every `save_every` micro-batches), resumable.
//!
//! Data ([`crate::data`]): insightface's RecordIO set (`rec`, the
//! directory of train.rec / train.idx / property), a folder of identity
//! folders (`images` a directory), or `.npy` arrays (`images` and
//! `labels` files); decoded by `num_workers` threads ahead of the step,
//! flipped at random (keyed) when `flip`.
//!
//! On several ranks ([`RunOptions::comm`]; `mpirun -np W gif-fr train`,
//! built with the `mpi` feature) the run is data-parallel as
//! insightface's: `batch_size` images per rank per micro-batch, the
//! sampler's shard of each epoch per rank (a padded, rank-strided slice of
//! the seeded permutation, as PyTorch's DistributedSampler), the
//! gradients averaged across ranks before each step
//! ([`Trainer::set_communicator`]); rank 0 alone writes the log, the
//! metrics, the verification results, the codebook and the checkpoints;
//! `cuda` is the GPU of the rank's index on its machine. On several ranks
//! the full softmax and Partial FC are model-parallel
//! ([`TrainHead::ModelParallel`]: each rank its shard of the centres, and
//! its own checkpoint file). The schedule
//! counts the steps a rank takes: ⌈images / W⌉ / `batch_size` an epoch
//! (insightface's train_v2.py counts `num_image // (batch_size · W)`,
//! which differs by the sampler's padding).

use std::path::PathBuf;

use std::sync::Arc;

use crate::backbone::IResNet;
use crate::data::{Dataset, Loader, Sampler};
use crate::distributed::{Communicator, ModelParallelHead};
use crate::error::{Error, Result};
use crate::head::{CodeHead, CodeHeadConfig, CodeTable, MarginGrad, PartialFc, SoftmaxHead, SoftmaxHeadConfig};
use crate::runtime::device::Device;
use crate::runtime::tensor::DType;
use crate::tokenizer::{self, Codebook, Input};
use crate::train::config::TrainConfig;
use crate::train::trainer::{TrainHead, Trainer};

/// How to run, besides the configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Continue from the output directory's checkpoint (also the config's
    /// `resume`).
    pub resume: bool,
    /// Stop (with a checkpoint) once this many micro-batches are done in
    /// total: a run cut short and resumed later ends as a straight one.
    pub stop_after: Option<u64>,
    /// Time each part of every step ([`Trainer::set_profiling`]).
    pub profile: bool,
    /// The ranks to train on, data-parallel (None: this process alone).
    pub comm: Option<Arc<dyn Communicator>>,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    /// Micro-batches trained in total (resumed ones included).
    pub steps: u64,
    /// Micro-batches this run trained.
    pub trained: u64,
    /// The last logged loss and accuracy.
    pub loss: f64,
    /// See `loss`.
    pub accuracy: f64,
    /// Wall seconds of this run's steps.
    pub seconds: f64,
    /// The output directory.
    pub output: PathBuf,
}

const OP: &str = "train";

pub(crate) fn device(name: &str) -> Result<Device> {
    device_of_rank(name, 0)
}

/// `name` for the rank whose index on its machine is `local` (its GPU).
fn device_of_rank(name: &str, local: usize) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::cpu()),
        "cuda" => Device::cuda(local),
        #[cfg(feature = "sim")]
        "sim" => Ok(Device::sim()),
        "best" => Ok(Device::best()),
        other => Err(Error::invalid(OP, format!("device {other:?} is not available in this build"))),
    }
}

/// The head of `cfg` for `n` identities on `dev` (a codebook made and
/// written to the output directory when GIF has none given). On several
/// ranks (`comm`; CPU or GPU), the full softmax and Partial FC are model-parallel:
/// this rank's shard of the centres.
fn build_head(
    cfg: &TrainConfig,
    n: usize,
    dev: &Device,
    write: bool,
    comm: Option<&dyn Communicator>,
    log: &mut dyn FnMut(&str),
) -> Result<TrainHead> {
    let d = cfg.embedding_size;
    let sm = SoftmaxHeadConfig {
        margin: cfg.margin(),
        scale: cfg.scale,
        margin_grad: MarginGrad::StraightThrough,
        ..SoftmaxHeadConfig::new(d, n)
    };
    let kind = cfg.head_kind();
    if let Some(comm) = comm.filter(|c| c.world() > 1) {
        if kind == "arcface" || kind == "partial_fc" {
            let rate = (kind == "partial_fc").then_some(cfg.sample_rate);
            return Ok(TrainHead::ModelParallel(ModelParallelHead::new(sm, dev, comm, rate, cfg.seed ^ 1)?));
        }
    }
    Ok(match kind {
        "arcface" => TrainHead::Softmax(SoftmaxHead::new(sm, dev, DType::F32, cfg.seed ^ 1)?),
        "partial_fc" => TrainHead::PartialFc(PartialFc::new(
            SoftmaxHead::new(sm, dev, DType::F32, cfg.seed ^ 1)?,
            cfg.sample_rate,
            cfg.seed ^ 2,
        )?),
        _ => {
            let book = match &cfg.codebook {
                Some(p) => {
                    let book = Codebook::load(p)?;
                    if book.len() != n || book.vocab() != cfg.vocab || cfg.length.is_some_and(|l| l != book.length()) {
                        return Err(Error::file(
                            p,
                            format!(
                                "a codebook of {} identities, v = {}, l = {}; the config wants {n} identities, v = {}, l = {}",
                                book.len(),
                                book.vocab(),
                                book.length(),
                                cfg.vocab,
                                cfg.length.map_or("any".into(), |l| l.to_string())
                            ),
                        ));
                    }
                    book
                }
                None => {
                    let tcfg = tokenizer::Config {
                        vocab: cfg.vocab,
                        length: cfg.length,
                        seed: cfg.seed,
                        progress: false,
                        ..tokenizer::Config::default()
                    };
                    let book = tokenizer::tokenize(Input::Random { count: n, dim: d }, &tcfg, dev)?;
                    let path = cfg.output.join("codebook.safetensors");
                    if write {
                        book.save(&path)?;
                    }
                    log(&format!(
                        "codes: {n} identities from seeded random identity vectors, v = {}, l = {} (written to {})",
                        book.vocab(),
                        book.length(),
                        path.display()
                    ));
                    book
                }
            };
            let hcfg = CodeHeadConfig {
                projection: cfg.projection,
                margin: cfg.margin(),
                scale: cfg.scale,
                lambdas: cfg.lambdas.clone(),
                gamma: cfg.gamma,
                margin_grad: MarginGrad::StraightThrough,
                ..CodeHeadConfig::new(d, book.length(), book.vocab())
            };
            let table = if cfg.gamma > 0.0 {
                CodeTable::from_codebook(dev, &book, DType::F32)?
            } else {
                CodeTable::new(dev, book.codes().to_vec(), book.length(), book.vocab(), None)?
            };
            TrainHead::Code { head: CodeHead::new(hcfg, dev, cfg.seed ^ 1)?, table }
        }
    })
}

use crate::io::append_line as append;

/// The training data `cfg` names (`rec`, an `images` folder, or `images`
/// and `labels` arrays), at the network's input size; `progress(done,
/// total)` follows the header scan of a RecordIO set without `property`.
pub fn open_dataset(cfg: &TrainConfig, progress: impl FnMut(usize, usize)) -> Result<Dataset> {
    let size = cfg.network_config()?.input;
    let ds = match (&cfg.rec, &cfg.images, &cfg.labels) {
        (Some(rec), _, _) => Dataset::records_with(rec, size, progress),
        (None, Some(images), _) if images.is_dir() => Dataset::folder(images, size),
        (None, Some(images), Some(labels)) => Dataset::arrays(images, labels, size),
        _ => Err(Error::invalid(OP, "no data: give rec, an images folder, or images and labels (.npy)")),
    };
    Ok(ds?.resizing(cfg.resize))
}

/// Runs the training `cfg` describes (see the module documentation).
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let bar = crate::progress::scan_bar(opts.progress);
    let dataset = open_dataset(cfg, crate::progress::follow(&bar))?;
    bar.finish_and_clear();
    Ok(run_on(cfg, Arc::new(dataset), opts)?.0)
}

/// [`run`] on `dataset` instead of the data `cfg` names (a split of a
/// dataset: `gif-fr experiment`); returns the trainer too, its backbone
/// and head as the run left them.
pub fn run_on(cfg: &TrainConfig, dataset: Arc<Dataset>, opts: &RunOptions) -> Result<(RunSummary, Trainer)> {
    let out = &cfg.output;
    let (rank, world) = opts.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    // Rank 0 speaks and writes for the run (insightface's rank-0 logging).
    let lead = rank == 0;
    if lead {
        std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create the directory: {e}")))?;
    }
    let log_path = out.join("training.log");
    let show = opts.progress && lead;
    let bar = if show { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    let mut log = |line: &str| {
        if !lead {
            return;
        }
        if show {
            bar.println(line);
        } else {
            eprintln!("{line}");
        }
        let _ = append(&log_path, line);
    };
    for (k, why) in cfg.ignored_keys() {
        log(&format!("config: {k} ignored ({why})"));
    }
    let local = crate::distributed::launch_from_env().map_or(0, |l| l.local_rank);
    let dev = device_of_rank(&cfg.device, if world > 1 { local } else { 0 })?;
    let net_cfg = cfg.network_config()?;
    let size = net_cfg.input;
    if dataset.size() != size {
        return Err(Error::invalid(
            OP,
            format!("the data's images are {0} x {0}; the network takes {size} x {size}", dataset.size()),
        ));
    }
    let count = dataset.len();
    if cfg.num_image.is_some_and(|n| n != count) {
        return Err(Error::invalid(OP, format!("num_image: {:?}, the data has {count} images", cfg.num_image)));
    }
    let n = cfg.num_classes.unwrap_or(dataset.classes());
    if dataset.classes() > n {
        return Err(Error::invalid(
            OP,
            format!(
                "num_classes: {n}, the data has {} identities (labels up to {})",
                dataset.classes(),
                dataset.classes() - 1
            ),
        ));
    }
    let head = build_head(cfg, n, &dev, lead, opts.comm.as_deref(), &mut log)?;
    let b = cfg.batch_size;
    let sampler = Sampler { rank, world, ..Sampler::new(count, b, cfg.seed) };
    let tcfg = cfg.trainer_config(sampler.per_rank())?;
    let per_epoch = sampler.batches_per_epoch() as u64;
    let total = per_epoch * cfg.num_epoch as u64;
    let backbone = IResNet::new(net_cfg, &dev, cfg.seed)?;
    let mut trainer = Trainer::new(backbone, head, tcfg)?;
    trainer.set_profiling(opts.profile);
    if cfg.resume || opts.resume {
        let path = trainer.checkpoint_path(out);
        if !path.exists() {
            return Err(Error::file(&path, "no checkpoint to resume from"));
        }
        trainer.resume(out)?;
        log(&format!("resumed from {} at step {}", out.display(), trainer.steps()));
    }
    if let Some(comm) = opts.comm.as_ref().filter(|c| c.world() > 1) {
        // GPU ranks reduce on the device through NCCL (its id sent over the
        // launcher's communicator) when libnccl loads; otherwise the
        // launcher's collectives, staged through the host. Every rank must
        // choose alike (NCCL's setup is a collective): checked first.
        use crate::distributed::Nccl;
        let gpu = dev.cuda_stream().is_some();
        let nccl = gpu && Nccl::available();
        crate::distributed::check_same(
            comm.as_ref(),
            "whether the rank is a GPU and libnccl loads",
            u64::from(gpu) * 2 + u64::from(nccl),
        )?;
        if gpu && !nccl {
            log(&format!(
                "warning: GPU ranks without NCCL: the collectives go through the host over {} ({})",
                comm.backend(),
                Nccl::missing_reason()
            ));
        }
        let comm =
            if nccl { Arc::new(Nccl::over(&dev, comm.as_ref())?) as Arc<dyn Communicator> } else { comm.clone() };
        trainer.set_communicator(comm.clone())?;
        log(&format!(
            "data-parallel on {world} ranks ({}): {b} images per rank, {} per step",
            comm.backend(),
            b * world
        ));
        if let TrainHead::ModelParallel(h) = trainer.head() {
            log(&format!(
                "the {} head model-parallel: each rank holds its shard of the {n} centres ({} on rank 0)",
                cfg.head_kind(),
                h.shard().len()
            ));
        }
    }
    log(&format!(
        "training {} on {dev}: {} head, {n} identities, {count} images, {per_epoch} steps an epoch, {total} steps",
        cfg.network,
        cfg.head_kind()
    ));
    let csv = out.join("metrics.csv");
    if lead && !csv.exists() {
        append(&csv, "step,epoch,loss,accuracy,lr,images_per_s,grad_norm,skipped")?;
    }
    // insightface's CallBackVerification: the sets found, read once.
    let mut val_sets = Vec::new();
    for (name, path) in cfg.val_paths() {
        if path.exists() {
            let set = crate::io::verification::read_bin(&path)?;
            log(&format!("val_targets: {name} ({} pairs, {})", set.pairs(), path.display()));
            // The images stay encoded in memory, in a dataset made once.
            let ds = Dataset::encoded(set.images, size, &path);
            val_sets.push((name, ds, set.issame, 0f64));
        } else {
            log(&format!("val_targets: {name} skipped ({} not found)", path.display()));
        }
    }
    if !lead {
        // insightface verifies on rank 0 only.
        val_sets.clear();
    }
    let val_csv = out.join("verification.csv");
    if !val_sets.is_empty() && !val_csv.exists() {
        append(&val_csv, "step,target,xnorm,accuracy,accuracy_std,accuracy_highest,val,auc,eer")?;
    }
    let mut verify = |trainer: &mut Trainer, done: u64, log: &mut dyn FnMut(&str)| -> Result<()> {
        for (name, ds, issame, highest) in val_sets.iter_mut() {
            let (v, _) = crate::eval::verify_dataset(trainer.backbone_mut(), ds, issame, cfg.batch_size)?;
            *highest = highest.max(v.accuracy);
            log(&format!("[{name}][{done}]XNorm: {:.6}", v.xnorm));
            log(&format!("[{name}][{done}]Accuracy-Flip: {:.5}+-{:.5}", v.accuracy, v.accuracy_std));
            log(&format!("[{name}][{done}]Accuracy-Highest: {:.5}", highest));
            append(
                &val_csv,
                &format!(
                    "{done},{name},{},{},{},{},{},{},{}",
                    v.xnorm, v.accuracy, v.accuracy_std, highest, v.val, v.auc, v.eer
                ),
            )?;
        }
        Ok(())
    };
    bar.set_length(total);
    bar.set_position(trainer.steps());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
            .map_err(|e| Error::invalid(OP, e.to_string()))?,
    );
    let mut loader = Loader::new(dataset, sampler, cfg.num_workers, 2 * cfg.num_workers.max(1), cfg.flip)?
        .skip_corrupt(cfg.skip_corrupt);
    // A GPU's batches in recycled page-locked buffers (insightface's
    // pin_memory), uploaded beside the step before.
    let device = trainer.backbone().device().clone();
    if device.runs_kernels() {
        loader = loader.pinned(&device)?;
    }
    let start_step = trainer.steps();
    let stop = opts.stop_after.unwrap_or(total).min(total);
    let started = std::time::Instant::now();
    let mut since = (std::time::Instant::now(), trainer.steps());
    let (mut loss, mut accuracy) = (f64::NAN, f64::NAN);
    while trainer.steps() < stop {
        let step = trainer.steps();
        let epoch = step / per_epoch;
        for batch in loader.epoch(epoch, (step % per_epoch) as usize)? {
            let batch = batch?;
            trainer.step_batch(&batch)?;
            let done = trainer.steps();
            bar.set_position(done);
            if done % cfg.frequent == 0 || done == stop || done % per_epoch == 0 {
                let m = trainer.metrics()?;
                // Images per second over every rank (insightface's
                // `batch_size * frequent * world_size / elapsed`).
                let speed = (done - since.1) as f64 * (b * world) as f64 / since.0.elapsed().as_secs_f64().max(1e-9);
                since = (std::time::Instant::now(), done);
                (loss, accuracy) = (m.loss, m.accuracy);
                bar.set_message(format!("loss {:.4} acc {:.3} lr {:.6} {:.1} img/s", m.loss, m.accuracy, m.lr, speed));
                if lead {
                    append(
                        &csv,
                        &format!(
                            "{done},{epoch},{},{},{},{speed:.3},{},{}",
                            m.loss, m.accuracy, m.lr, m.grad_norm, m.skipped
                        ),
                    )?;
                    // insightface's CallBackLogging line.
                    let hours = (total - done) as f64 * (b * world) as f64 / speed.max(1e-9) / 3600.0;
                    let line = format!(
                        "Speed {speed:.2} samples/sec   Loss {:.4}   LearningRate {:.6}   Epoch: {epoch}   Global Step: {done}   Required: {hours:.1} hours",
                        m.loss, m.lr
                    );
                    if show {
                        let _ = append(&log_path, &line);
                    } else {
                        log(&line);
                    }
                }
            }
            // Verification every `verbose` steps, and at the end of training.
            if done % cfg.verbose == 0 || done == total {
                verify(&mut trainer, done, &mut log)?;
            }
            let boundary = done % cfg.gradient_acc as u64 == 0;
            let periodic = cfg.save_every.is_some_and(|k| done % k == 0);
            // A model-parallel head's shards: every rank saves its own.
            let saves = lead || matches!(trainer.head(), TrainHead::ModelParallel(_));
            if saves && boundary && (done % per_epoch == 0 || periodic || done == stop) {
                trainer.save(out)?;
            }
            if done >= stop {
                break;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(p) = loader.pool_stats().filter(|p| p.pageable > 0) {
        log(&format!(
            "warning: {} batches were decoded into pageable memory (uploaded with a wait): {}",
            p.pageable,
            p.error.as_deref().unwrap_or("every page-locked buffer was in use")
        ));
    }
    if let Some(sk) = loader.skipped().filter(|s| s.count > 0) {
        log(&format!(
            "skipped {} unreadable images (each replaced by the next that reads){}{}",
            sk.count,
            if sk.errors.is_empty() { "" } else { "; the first: " },
            sk.errors.join("; ")
        ));
    }
    let trained = trainer.steps() - start_step;
    let seconds = started.elapsed().as_secs_f64();
    log(&format!(
        "done: step {} of {total}, {trained} this run in {seconds:.1} s; checkpoint and model in {}",
        trainer.steps(),
        out.display()
    ));
    Ok((RunSummary { steps: trainer.steps(), trained, loss, accuracy, seconds, output: out.clone() }, trainer))
}
