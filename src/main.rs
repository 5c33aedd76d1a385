//! The `gif-fr` command line (clap): `gif-fr --help`, `gif-fr <command>
//! --help`. Usage errors exit with 2, failures of the work with 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use gif_fr::runtime::kernels::{self, MODULES};
use gif_fr::tokenizer::{self, Codebook, Config, Input};
use gif_fr::{Device, Error};

/// Face recognition at scale with identity codes (GIF): identity
/// tokenizer, prefix-tree decoder and IResNet embeddings, on the CPU, a
/// CUDA GPU or the simulated GPU.
#[derive(Parser)]
#[command(name = "gif-fr", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Crate version, how the kernels were built, the kernel modules, and
    /// the GPU found (or exactly why none was).
    Info,
    /// Assign identity codes and write a codebook.
    ///
    /// Either FILE.npy holds one f32/f64 row per identity ([N, d]), or N
    /// random unit vectors of D dimensions are drawn from the seed.
    /// `--device cpu` is the deterministic path.
    Tokenize(TokenizeArgs),
    /// Size, vocab, length and per-level trie statistics of a codebook.
    CodebookInfo {
        /// The codebook (.safetensors, from `gif-fr tokenize`).
        file: PathBuf,
    },
    /// The k best identities of each query, by the prefix trie of a
    /// codebook.
    ///
    /// Writes ids (i64 [B, K]; -1: none, or every id of a query whose best
    /// score is below the threshold) and scores (f32 [B, K]).
    Decode(DecodeArgs),
    /// Face embeddings with an insightface IResNet.
    ///
    /// --images: uint8 [B, S, S, 3] RGB, or f32 [B, 3, S, S] normalized as
    /// insightface does (S: the network's input side, 112 in insightface's
    /// models). --data: a RecordIO set, identity folders or a verification
    /// .bin, streamed. Writes f32 [B, E] (E: the embedding size, 512 in
    /// insightface's models).
    /// scripts/pth_to_safetensors.py converts a .pth checkpoint.
    Embed(EmbedArgs),
    /// Per-identity vectors for the tokenizer: the mean of each identity's
    /// normalized embeddings over a dataset (one streaming pass); then
    /// `gif-fr tokenize --vectors FILE.npy --out codebook.safetensors` makes the codebook.
    IdentityVectors(IdentityVectorsArgs),
    /// Verification on insightface .bin pair sets (lfw.bin, cfp_fp.bin,
    /// agedb_30.bin, or gif-fr synth's synth.bin): flip-fused embeddings,
    /// insightface's `[lfw]Accuracy-Flip: …` lines (10 folds), VAL@FAR,
    /// the exact ROC's TAR@FAR, EER and AUC.
    Verify(VerifyArgs),
    /// IJB-B / IJB-C 1:1 verification from image features, as insightface's
    /// ijb_11.py: features weighted by the faceness score, averaged per
    /// media, summed per template, normalized; template pairs scored by
    /// cosine; TAR@FAR (insightface's reading and the exact one), AUC.
    Ijb(IjbArgs),
    /// Train a backbone with a head (GIF's code head, ArcFace or Partial
    /// FC) from a TOML config with insightface arcface_torch's keys.
    ///
    /// Writes to the config's `output`: checkpoint.safetensors (the whole
    /// state, for --resume), model.safetensors (the backbone, for `gif-fr
    /// embed`), metrics.csv, training.log. docs/training.md lists the keys.
    Train(TrainArgs),
    /// Compare a run's result JSON with a stored baseline: failed tests,
    /// slowdowns beyond max(5 %, 3 × the pooled spread) and new spills
    /// fail (exit status 1); faster, new and missing cases are reported.
    /// Several `--run` parts (tests, each bench, ptxas) are merged first;
    /// `--update` writes the run as the baseline (after an intended change).
    Regress(RegressArgs),
    /// Generate a synthetic face-identity training set (insightface
    /// RecordIO: train.rec, train.idx, property) and a verification .bin
    /// of other identities, deterministic per seed.
    ///
    /// Each identity is a procedural face; each image a new rendering under
    /// pose, lighting, blur, noise and occlusion (docs/data.md describes
    /// the knobs). Image counts per identity follow a power law.
    Synth(SynthArgs),
    /// The paper's claim, tested: the same backbone, data order, steps,
    /// schedule and seed under each head (ArcFace, Partial FC 0.1 and 0.3,
    /// GIF with random codes, GIF with codes from a warm-up model's mean
    /// features), judged on held-out identities (10-fold accuracy,
    /// TAR@FAR over all pairs), closed-set top-1 (all and the rarest
    /// identities), head time and memory.
    ///
    /// Without --data, generates the synthetic sets of --mode (quick: about
    /// 5 minutes on 2 CPU cores; full: under an hour). Writes
    /// experiment.json, report.md and SVG plots to --out; each head's run
    /// directory is a `gif-fr train` output. docs/experiments.md.
    Experiment(ExperimentArgs),
}

#[derive(Args)]
struct ExperimentArgs {
    /// The output directory: report.md, experiment.json, roc-N<n>.svg,
    /// tar-vs-n.svg, head-time-vs-n.svg, the synthetic sets (data-N<n>/)
    /// and one `gif-fr train` output per head and N (N<n>/<head>/).
    #[arg(long)]
    out: PathBuf,
    /// smoke (seconds), quick (~5 min on 2 cores) or full (< 1 hour): the
    /// synthetic sizes and the training settings.
    #[arg(long, default_value = "quick")]
    mode: String,
    /// Datasets (RecordIO directories, e.g. from `gif-fr synth`, or
    /// insightface's) instead of the mode's synthetic sets; the training
    /// settings still come from the mode, --config and --set.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// A `gif-fr train` TOML whose keys replace the mode's training
    /// settings (its data and head keys are ignored).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a training key: --set key=value (repeatable).
    #[arg(long = "set")]
    set: Vec<String>,
    /// Synthetic training-identity counts instead of the mode's (e.g.
    /// --identities 500,2000).
    #[arg(long, value_delimiter = ',')]
    identities: Vec<usize>,
    /// The heads, in order (default all): arcface, partial_fc_R,
    /// gif_random, gif_means.
    #[arg(long, value_delimiter = ',')]
    heads: Vec<String>,
    /// Identities held out for verification (default: the mode's).
    #[arg(long)]
    held_out: Option<usize>,
    /// The gif_means warm-up model's share of the steps.
    #[arg(long, default_value_t = 0.25)]
    warmup_fraction: f64,
    /// Only redraw report.md and the plots against N from
    /// --out/experiment.json (nothing is trained).
    #[arg(long)]
    replot: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// The output directory (created): train.rec, train.idx, property,
    /// synth.bin, synth.json.
    #[arg(long)]
    out: PathBuf,
    /// Training identities.
    #[arg(long, default_value_t = 1000)]
    identities: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 112)]
    size: usize,
    /// Fewest images of an identity.
    #[arg(long, default_value_t = 2)]
    min_images: usize,
    /// Most images of an identity.
    #[arg(long, default_value_t = 100)]
    max_images: usize,
    /// Power-law exponent of the images per identity (smaller: longer tail).
    #[arg(long, default_value_t = 1.2)]
    tail: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest in-plane rotation, degrees (0..=45); shifts scale with it.
    #[arg(long, default_value_t = 12.0)]
    pose: f64,
    /// Lighting strength (0..=1).
    #[arg(long, default_value_t = 0.5)]
    lighting: f64,
    /// Probability of a blurred image.
    #[arg(long, default_value_t = 0.2)]
    blur: f64,
    /// Largest noise standard deviation (0..=64, pixel units).
    #[arg(long, default_value_t = 6.0)]
    noise: f64,
    /// Probability of an occluder.
    #[arg(long, default_value_t = 0.1)]
    occlusion: f64,
    /// How different identities are (0.1..=1).
    #[arg(long, default_value_t = 1.0)]
    diversity: f64,
    /// JPEG quality.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Identities of the verification set (not in the training set).
    #[arg(long, default_value_t = 300)]
    verify_identities: usize,
    /// Pairs of the verification set (a multiple of 20; 0: none).
    #[arg(long, default_value_t = 6000)]
    pairs: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The configuration (TOML).
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Override a key (a TOML value; repeatable): --set lr=0.05 --set head=gif.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the checkpoint in the output directory.
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after this many micro-batches in total.
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// No progress bar (the log lines go to stderr instead).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct RegressArgs {
    /// The run's result, or parts of it (JSON, see docs/gpu.md; repeat).
    #[arg(long, required = true, num_args = 1..)]
    run: Vec<PathBuf>,
    /// The baseline of this machine kind (JSON). Without: the merged run is
    /// only written (--write-run) and summarized.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Write the merged run here.
    #[arg(long)]
    write_run: Option<PathBuf>,
    /// Write the run as the new baseline (the verdict is still printed).
    #[arg(long)]
    update: bool,
    /// The smallest relative slowdown that fails.
    #[arg(long, default_value_t = 0.05)]
    min_slowdown: f64,
    /// Multiplies the pooled relative spread of the two runs.
    #[arg(long, default_value_t = 3.0)]
    spread_factor: f64,
}

/// Where the work runs.
#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The first GPU if there is one, else the CPU.
    Best,
    /// The CPU implementations.
    Cpu,
    /// The first CUDA GPU (an error if there is none).
    Cuda,
    /// The simulated GPU (the kernels, run on the CPU).
    #[cfg(feature = "sim")]
    Sim,
}

impl DeviceArg {
    fn device(self) -> Result<Device, Error> {
        match self {
            DeviceArg::Best => Ok(Device::best()),
            DeviceArg::Cpu => Ok(Device::cpu()),
            #[cfg(feature = "sim")]
            DeviceArg::Sim => Ok(Device::sim()),
            DeviceArg::Cuda => Device::cuda(0),
        }
    }
}

#[derive(Args)]
struct TokenizeArgs {
    /// Per-identity vectors, f32 or f64 [N, d] (.npy, C order).
    #[arg(long, value_name = "FILE.npy", conflicts_with_all = ["count", "dim"], required_unless_present = "count")]
    vectors: Option<PathBuf>,
    /// Number of identities N (random unit vectors).
    #[arg(long, value_name = "N", requires = "dim")]
    count: Option<usize>,
    /// Dimension d of the random vectors.
    #[arg(long, value_name = "D", requires = "count")]
    dim: Option<usize>,
    /// Where to write the codebook.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Vocabulary v: tokens are in [0, v), 2..=65535.
    #[arg(long, value_name = "V", default_value_t = 16)]
    vocab: usize,
    /// Code length l (default: the smallest with v^l >= N; at most 1024).
    #[arg(long, value_name = "L")]
    length: Option<usize>,
    /// Seed of every random choice.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Homogenization steps (default: one epoch, ceil(N / 2048); 0 skips it).
    #[arg(long, value_name = "K")]
    steps: Option<usize>,
    /// Lloyd iterations per k-means node.
    #[arg(long, value_name = "I", default_value_t = 10)]
    iters: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Best)]
    device: DeviceArg,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct DecodeArgs {
    /// The codebook (.safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    codebook: PathBuf,
    /// Per-position log-probabilities, f32 [B, l, v] (.npy).
    #[arg(long, value_name = "FILE.npy")]
    scores: PathBuf,
    /// Results per query (1..=N).
    #[arg(long, value_name = "K")]
    top_k: usize,
    /// Where to write ids and scores.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Beam search keeping W prefixes per level (default: exact top-k).
    #[arg(long, value_name = "W")]
    beam: Option<usize>,
    /// Open-set threshold on each query's best score.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    threshold: Option<f32>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

/// The network to run: its architecture and weights, where, how (every
/// command that runs one needs --arch or --config, and --weights; checked
/// when the network is loaded).
#[derive(Args)]
struct NetArgs {
    /// Architecture: r18, r34, r50 or r100.
    #[arg(long, value_parser = ["r18", "r34", "r50", "r100"], conflicts_with = "config")]
    arch: Option<String>,
    /// Or the network of a `gif-fr train` config (its network, size and
    /// shape keys).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// The network's weights: an insightface state dict as safetensors.
    #[arg(long, value_name = "FILE.safetensors")]
    weights: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Best)]
    device: DeviceArg,
    /// Convolutions on bf16 tensor cores, as autocast (default f32).
    #[arg(long)]
    bf16: bool,
}

impl NetArgs {
    /// The network with its weights, on its device.
    fn load(&self) -> Result<gif_fr::backbone::IResNet, Error> {
        use gif_fr::backbone::{IResNet, IResNetConfig};
        let mut cfg = match (&self.arch, &self.config) {
            (Some(arch), _) => IResNetConfig::arch(arch)?,
            (None, Some(path)) => gif_fr::train::TrainConfig::load(path, &[])?.network_config()?,
            (None, None) => {
                return Err(Error::InvalidArgument { op: "network", message: "give --arch or --config".into() })
            }
        };
        let weights = self
            .weights
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument { op: "network", message: "give --weights".into() })?;
        if self.bf16 {
            cfg.conv_dtype = gif_fr::DType::BF16;
        }
        let dev = self.device.device()?;
        IResNet::load(weights, cfg, &dev)
    }
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    net: NetArgs,
    /// The images (.npy).
    #[arg(long, value_name = "FILE.npy", required_unless_present = "data", conflicts_with = "data")]
    images: Option<PathBuf>,
    /// Or a dataset: a RecordIO directory (train.rec, train.idx), a
    /// directory of identity folders, or a verification .bin; streamed in
    /// its order.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// With --data: also write the images' labels (int64 [B]).
    #[arg(long, value_name = "FILE.npy", requires = "data")]
    labels_out: Option<PathBuf>,
    /// Where to write the embeddings (.npy).
    #[arg(long, value_name = "FILE.npy")]
    out: PathBuf,
    /// Resize square images of another size to the network's input
    /// (bilinear) instead of refusing them.
    #[arg(long)]
    resize: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct IdentityVectorsArgs {
    #[command(flatten)]
    net: NetArgs,
    /// The training set: a RecordIO directory or identity folders.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Where to write the vectors (f32 [identities, E] .npy).
    #[arg(long, value_name = "FILE.npy")]
    out: PathBuf,
    /// Resize square images of another size to the network's input
    /// (bilinear) instead of refusing them.
    #[arg(long)]
    resize: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    net: NetArgs,
    /// A verification set (insightface .bin; repeat for several).
    #[arg(long = "bin", value_name = "FILE.bin", required = true)]
    bins: Vec<PathBuf>,
    /// Write every number of every set here (JSON).
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
    /// Draw the ROC curves (TAR against log FAR) here (SVG).
    #[arg(long, value_name = "FILE.svg")]
    roc: Option<PathBuf>,
}

#[derive(Args)]
struct IjbArgs {
    /// The meta directory (holding <target>_face_tid_mid.txt,
    /// <target>_template_pair_label.txt and <target>_name_5pts_score.txt).
    #[arg(long, value_name = "DIR")]
    meta: PathBuf,
    /// IJBC or IJBB (the meta files' prefix, lower-cased).
    #[arg(long, default_value = "IJBC", value_parser = ["IJBC", "IJBB"])]
    target: String,
    /// Image features, f32 [images, d] in the order of the face_tid_mid
    /// file: each the embedding plus its mirror image's (not normalized).
    #[arg(long, value_name = "FILE.npy", required_unless_present = "images", conflicts_with = "images")]
    features: Option<PathBuf>,
    /// Or the images (IJB's loose crops, named as in the meta files):
    /// each aligned to the ArcFace template from its five landmarks and
    /// embedded with its mirror image by the network given.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// The network, with --images.
    #[command(flatten)]
    net: NetArgs,
    /// The features are [images, 2d]: the embedding, then the mirror
    /// image's (insightface's layout); their halves are added.
    #[arg(long)]
    halves: bool,
    /// Do not weight images by the faceness score (insightface's D0).
    #[arg(long)]
    no_detector_score: bool,
    /// Normalize each image's feature first (insightface's N0).
    #[arg(long)]
    normalize_images: bool,
    /// Write every number here (JSON).
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
    /// Draw the ROC here (SVG).
    #[arg(long, value_name = "FILE.svg")]
    roc: Option<PathBuf>,
}

use gif_fr::progress::follow;

/// A progress bar of `what` (hidden when `quiet`).
fn progress_bar(quiet: bool, what: &str) -> indicatif::ProgressBar {
    gif_fr::progress::bar(!quiet, what)
}

fn info() {
    println!("gif-fr {}", env!("CARGO_PKG_VERSION"));
    println!("kernels: {}", kernels::build_mode());
    println!("modules:");
    let width = MODULES.iter().map(|m| m.name.len()).max().unwrap_or(0);
    for m in MODULES {
        let n = m.kernels.len();
        let noun = if n == 1 { "kernel " } else { "kernels" };
        println!("  {:<width$} {n:>3} {noun}  (kernels/{}.cu)", m.name, m.name);
    }
    match Device::probe_cuda() {
        Ok(g) => println!(
            "gpu: cuda:{} {} (compute capability {}.{}, {:.1} GiB)",
            g.ordinal,
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.total_memory as f64 / (1u64 << 30) as f64
        ),
        Err(e) => println!("gpu: none: {e}"),
    }
    if cfg!(feature = "sim") {
        println!("simulator: available (Device::sim), runs the same kernels on the CPU");
    } else {
        println!("simulator: not built (cargo feature `sim` off)");
    }
    if cfg!(feature = "mpi") {
        println!("mpi: built (mpirun -np W gif-fr train …)");
    } else {
        println!("mpi: not built (cargo feature `mpi` off)");
    }
    if gif_fr::distributed::Nccl::available() {
        println!("nccl: available (GPU ranks reduce on the device)");
    } else {
        println!("nccl: none: {}", gif_fr::distributed::Nccl::missing_reason());
    }
}

fn tokenize_cmd(a: TokenizeArgs) -> Result<(), Error> {
    let cfg = Config {
        vocab: a.vocab,
        length: a.length,
        seed: a.seed,
        steps: a.steps,
        kmeans_iters: a.iters,
        progress: !a.quiet,
        ..Config::default()
    };
    let dev = a.device.device()?;
    let t0 = std::time::Instant::now();
    let input = match (a.vectors, a.count, a.dim) {
        (Some(p), _, _) => {
            let (data, _, d) = gif_fr::io::npy::read_npy_matrix(&p)?;
            Input::Vectors { data, dim: d }
        }
        (None, Some(count), Some(dim)) => Input::Random { count, dim },
        // clap requires --vectors, or --count with --dim.
        _ => {
            return Err(Error::InvalidArgument {
                op: "tokenize",
                message: "give --vectors, or --count and --dim".into(),
            })
        }
    };
    let (book, report) = tokenizer::tokenize_with_report(input, &cfg, &dev)?;
    let t_save = std::time::Instant::now();
    book.save(&a.out)?;
    eprintln!(
        "tokenized {} identities on {dev}: input {:.1} s, homogenize {:.1} s ({} step{}, loss {} -> {}), k-means {:.1} s, save {:.1} s; total {:.1} s",
        book.len(),
        report.input_seconds,
        report.homogenize_seconds,
        report.losses.len(),
        if report.losses.len() == 1 { "" } else { "s" },
        report.losses.first().map_or("-".into(), |l| format!("{l:.4}")),
        report.losses.last().map_or("-".into(), |l| format!("{l:.4}")),
        report.kmeans_seconds,
        t_save.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    print!("{}", book.describe());
    Ok(())
}

fn train_cmd(a: TrainArgs) -> Result<(), Error> {
    // Under mpirun (built with `--features mpi`): one rank of a
    // data-parallel run.
    let comm: std::sync::Arc<dyn gif_fr::distributed::Communicator> = gif_fr::distributed::from_env()?.into();
    let world = comm.world();
    let run = || -> Result<gif_fr::train::RunSummary, Error> {
        let cfg = gif_fr::train::TrainConfig::load(&a.config, &a.set)?;
        let opts = gif_fr::train::RunOptions {
            progress: !a.quiet,
            resume: a.resume,
            stop_after: a.stop_after,
            comm: (world > 1).then(|| comm.clone()),
            ..Default::default()
        };
        gif_fr::train::run(&cfg, &opts)
    };
    let s = match run() {
        Ok(s) => s,
        Err(e) if world > 1 => {
            // The other ranks would wait for this one until their
            // collectives time out: end the job now.
            eprintln!("error: rank {} of {world}: {e}", comm.rank());
            comm.abort(1)
        }
        Err(e) => return Err(e),
    };
    if comm.rank() > 0 {
        return Ok(());
    }
    println!(
        "trained {} steps ({} in this run, {:.1} s); last loss {:.4}, accuracy {:.3}; output {}",
        s.steps,
        s.trained,
        s.seconds,
        s.loss,
        s.accuracy,
        s.output.display()
    );
    Ok(())
}

fn file_error(path: &std::path::Path, message: String) -> Error {
    Error::File { path: path.display().to_string(), message }
}

fn experiment_cmd(a: ExperimentArgs) -> Result<(), Error> {
    use gif_fr::experiment::{self, HeadSpec, Preset};
    if a.replot {
        let report = experiment::replot(&a.out)?;
        print!("{}", experiment::markdown(&report));
        return Ok(());
    }
    let preset = Preset::parse(&a.mode)?;
    let mut overrides = Vec::new();
    if let Some(path) = &a.config {
        // The file's keys, as overrides of the mode's settings.
        let text = std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
        let table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| file_error(path, format!("not TOML: {e}")))?;
        for (k, v) in table {
            if !matches!(k.as_str(), "rec" | "images" | "labels" | "head" | "sample_rate" | "codebook" | "output") {
                overrides.push(format!("{k}={v}"));
            }
        }
    }
    overrides.extend(a.set.iter().cloned());
    let mut cfg = preset.config(&a.out, &overrides)?;
    cfg.progress = !a.quiet;
    cfg.warmup_fraction = a.warmup_fraction;
    if let Some(h) = a.held_out {
        cfg.held_out = h;
    }
    if !a.heads.is_empty() {
        cfg.heads = a.heads.iter().map(|h| HeadSpec::parse(h)).collect::<Result<_, _>>()?;
    }
    cfg.validate()?;
    std::fs::create_dir_all(&a.out).map_err(|e| file_error(&a.out, format!("cannot create: {e}")))?;
    let log_path = a.out.join("experiment.log");
    let mut log = |line: &str| {
        eprintln!("{line}");
        let _ = gif_fr::io::append_line(&log_path, line);
    };
    let data = if a.data.is_empty() {
        let sizes = if a.identities.is_empty() { preset.identities() } else { a.identities.clone() };
        let mut dirs = Vec::new();
        for n in sizes {
            let dir = a.out.join(format!("data-N{n}"));
            let t0 = std::time::Instant::now();
            experiment::write_synthetic(preset, n, &dir)?;
            log(&format!(
                "synthetic set of {n} training identities in {} ({:.1} s)",
                dir.display(),
                t0.elapsed().as_secs_f64()
            ));
            dirs.push(dir);
        }
        dirs
    } else {
        a.data.clone()
    };
    let t0 = std::time::Instant::now();
    let report = experiment::run(&cfg, &data, &mut log)?;
    print!("{}", experiment::markdown(&report));
    log(&format!("done in {:.1} s; report in {}", t0.elapsed().as_secs_f64(), a.out.join("report.md").display()));
    Ok(())
}

fn synth_cmd(a: SynthArgs) -> Result<(), Error> {
    use gif_fr::data::synth::{check_pairs, verification_pairs, write_training_set, SynthConfig};
    let cfg = SynthConfig {
        identities: a.identities,
        size: a.size,
        min_images: a.min_images,
        max_images: a.max_images,
        tail: a.tail,
        seed: a.seed,
        pose: a.pose,
        lighting: a.lighting,
        blur: a.blur,
        noise: a.noise,
        occlusion: a.occlusion,
        diversity: a.diversity,
        quality: a.quality,
    };
    cfg.validate()?;
    if a.pairs > 0 {
        check_pairs(a.verify_identities, a.pairs)?;
    }
    let t0 = std::time::Instant::now();
    let bar = progress_bar(a.quiet, "images");
    let summary = write_training_set(&cfg, &a.out, follow(&bar))?;
    bar.finish_and_clear();
    let bin = a.out.join("synth.bin");
    if a.pairs > 0 {
        let set = verification_pairs(&cfg, a.verify_identities, a.pairs)?;
        gif_fr::io::verification::write_bin(&bin, &set)?;
    }
    let json = serde_json::json!({
        "config": cfg,
        "summary": summary,
        "verification": { "file": "synth.bin", "identities": a.verify_identities, "pairs": a.pairs },
    });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::InvalidArgument { op: "synth", message: e.to_string() })?;
    gif_fr::io::write_atomic(&a.out.join("synth.json"), text.as_bytes())?;
    println!(
        "wrote {} images of {} identities ({}..={} each, {:.1} MB) to {}{} in {:.1} s",
        summary.images,
        summary.identities,
        summary.min_images,
        summary.max_images,
        summary.rec_bytes as f64 / 1e6,
        a.out.display(),
        if a.pairs > 0 {
            format!(" and {} pairs of {} other identities to {}", a.pairs, a.verify_identities, bin.display())
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn decode_cmd(a: DecodeArgs) -> Result<(), Error> {
    use gif_fr::decode::{Mode, PrefixDecoder};
    let dev = a.device.device()?;
    let book = Codebook::load(&a.codebook)?;
    let (lp, shape) = gif_fr::io::npy::read_npy(&a.scores)?;
    let t = gif_fr::Tensor::from_slice(&dev, &shape, &lp)?;
    let dec = PrefixDecoder::from_codebook(book, &dev)?;
    let mode = a.beam.map_or(Mode::Exact, Mode::Beam);
    dec.top_k(&t, a.top_k, mode, a.threshold)?.save(&a.out)
}

fn embed_cmd(a: EmbedArgs) -> Result<(), Error> {
    // The weights first: a wrong file fails before the images are read.
    let mut net = a.net.load()?;
    let (e, input, batch) = (net.config().embedding, net.config().input, a.net.batch as usize);
    let dev = net.device().clone();
    let t0 = std::time::Instant::now();
    let mut steady = String::new();
    let b = match (&a.images, &a.data) {
        (Some(images), _) => {
            let (pixels, b) = gif_fr::backbone::images::read_images(images, input)?;
            // Batch by batch, timed: the first batch carries the one-time
            // costs (on the CPU, folding the network; first-touch memory).
            let per = input * input * 3;
            let mut emb = Vec::with_capacity(b.saturating_mul(e));
            let mut times = Vec::new();
            for part in pixels.chunks(per.saturating_mul(batch)) {
                let t = std::time::Instant::now();
                emb.extend(net.embed(part, batch)?);
                times.push((part.len() / per, t.elapsed().as_secs_f64()));
            }
            gif_fr::io::npy::write_npy(&a.out, &emb, b, e)?;
            // The steady state: the median full batch after the first.
            let mut later: Vec<f64> = times.iter().skip(1).filter(|(n, _)| *n == batch).map(|(_, s)| *s).collect();
            if !later.is_empty() {
                later.sort_by(f64::total_cmp);
                steady = format!(
                    " (first batch {:.3} s; later batches of {batch}: median {:.4} s per batch)",
                    times[0].1,
                    later[later.len() / 2]
                );
            }
            b
        }
        (None, Some(data)) => {
            let scan = gif_fr::progress::scan_bar(!a.quiet);
            let ds = gif_fr::data::Dataset::open_with(data, input, follow(&scan))?.resizing(a.resize);
            scan.finish_and_clear();
            let n = ds.len();
            let mut out = gif_fr::io::npy::NpyWriter::create(&a.out, n, e)?;
            let mut labels = Vec::with_capacity(if a.labels_out.is_some() { n } else { 0 });
            let bar = progress_bar(a.quiet, "images");
            gif_fr::data::embed_dataset(
                &mut net,
                &ds,
                batch,
                false,
                |_, l, emb| {
                    if a.labels_out.is_some() {
                        labels.extend(l.iter().map(|&y| y as i64));
                    }
                    out.write_rows(emb)
                },
                follow(&bar),
            )?;
            bar.finish_and_clear();
            out.finish()?;
            if let Some(p) = &a.labels_out {
                gif_fr::io::npy::write_npy_i64(p, &labels)?;
            }
            n
        }
        (None, None) => return Err(Error::InvalidArgument { op: "embed", message: "give --images or --data".into() }),
    };
    eprintln!("embedded {b} images on {dev} in {:.2} s{steady}", t0.elapsed().as_secs_f64());
    Ok(())
}

fn verify_cmd(a: VerifyArgs) -> Result<(), Error> {
    let mut net = a.net.load()?;
    let batch = a.net.batch as usize;
    let mut results = Vec::new();
    for path in &a.bins {
        let set = gif_fr::io::verification::read_bin(path)?;
        let t0 = std::time::Instant::now();
        let (v, roc) = gif_fr::eval::verify_pairs(&mut net, &set, path, batch)?;
        for line in v.lines() {
            println!("{line}");
        }
        eprintln!("[{}] {} pairs in {:.1} s", v.name, v.pairs, t0.elapsed().as_secs_f64());
        results.push((v, roc));
    }
    if let Some(p) = &a.json {
        let all: Vec<&gif_fr::eval::Verification> = results.iter().map(|r| &r.0).collect();
        let text = serde_json::to_string_pretty(&all)
            .map_err(|e| Error::InvalidArgument { op: "verify", message: e.to_string() })?;
        gif_fr::io::write_atomic(p, text.as_bytes())?;
    }
    if let Some(p) = &a.roc {
        let curves: Vec<(&str, &gif_fr::eval::metrics::Roc)> =
            results.iter().map(|r| (r.0.name.as_str(), &r.1)).collect();
        gif_fr::io::write_atomic(p, gif_fr::eval::roc_svg(&curves).as_bytes())?;
    }
    Ok(())
}

fn ijb_cmd(a: IjbArgs) -> Result<(), Error> {
    use gif_fr::eval::{ijb, metrics::Roc, FARS};
    let t = a.target.to_lowercase();
    let faces = ijb::read_face_tid_mid(&a.meta.join(format!("{t}_face_tid_mid.txt")))?;
    let pairs = ijb::read_template_pairs(&a.meta.join(format!("{t}_template_pair_label.txt")))?;
    let landmarks = || -> Result<Vec<(String, [f32; 10], f32)>, Error> {
        let l = ijb::read_name_5pts_score(&a.meta.join(format!("{t}_name_5pts_score.txt")))?;
        if l.len() != faces.len() || l.iter().zip(&faces).any(|(x, f)| x.0 != f.0) {
            return Err(Error::InvalidArgument {
                op: "ijb",
                message: "the name_5pts_score file does not list the media list's images in its order".into(),
            });
        }
        Ok(l)
    };
    let (mut feats, rows, mut d, source) = match (&a.features, &a.images) {
        (Some(f), _) => {
            let (v, r, c) = gif_fr::io::npy::read_npy_matrix(f)?;
            (v, r, c, f.clone())
        }
        (None, Some(dir)) => {
            let net = &a.net;
            let mut model = net.load()?;
            let e = model.config().embedding;
            let bar = progress_bar(false, "images");
            let v = ijb::image_features(&mut model, dir, &landmarks()?, net.batch as usize, follow(&bar))?;
            bar.finish_and_clear();
            (v, faces.len(), e, dir.clone())
        }
        _ => {
            return Err(Error::InvalidArgument {
                op: "ijb",
                message: "give --features, or --images with the network (--arch or --config, --weights)".into(),
            })
        }
    };
    if rows != faces.len() {
        return Err(Error::File {
            path: source.display().to_string(),
            message: format!("{rows} feature rows for the {} images of the media list", faces.len()),
        });
    }
    if a.halves {
        if d % 2 != 0 {
            return Err(Error::File {
                path: source.display().to_string(),
                message: format!("--halves: {d} columns are not two halves"),
            });
        }
        let h = d / 2;
        feats = feats.chunks_exact(d).flat_map(|r| (0..h).map(move |k| r[k] + r[h + k])).collect();
        d = h;
    }
    if a.normalize_images {
        for r in feats.chunks_exact_mut(d) {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.iter_mut().for_each(|v| *v /= n);
        }
    }
    let scores = if a.no_detector_score { None } else { Some(landmarks()?.iter().map(|x| x.2).collect::<Vec<f32>>()) };
    let tid_mid: Vec<(u64, u64)> = faces.iter().map(|f| (f.1, f.2)).collect();
    let (ids, tf) = ijb::template_features(&feats, d, &tid_mid, scores.as_deref())?;
    let sims = ijb::score_pairs(&ids, &tf, d, &pairs)?;
    let labels: Vec<bool> = pairs.iter().map(|p| p.2).collect();
    let roc = Roc::new(&sims, &labels)?;
    let nearest: Vec<String> = FARS.iter().map(|&f| format!("{:.2}", 100.0 * roc.tar_at_far_nearest(f).tar)).collect();
    let exact: Vec<String> = FARS.iter().map(|&f| format!("{:.2}", 100.0 * roc.tar_at_far(f).tar)).collect();
    println!("{} templates, {} pairs ({} positive)", ids.len(), pairs.len(), roc.positives);
    println!("| TAR (%) at FAR | {} |", FARS.map(|f| format!("{f:.0e}")).join(" | "));
    println!("| {} (insightface's reading) | {} |", a.target, nearest.join(" | "));
    println!("| {} (FAR <= target) | {} |", a.target, exact.join(" | "));
    println!("AUC: {:.4} %", 100.0 * roc.auc());
    if let Some(p) = &a.json {
        let far_rows = |f: &dyn Fn(f64) -> gif_fr::eval::metrics::RocPoint| -> Vec<serde_json::Value> {
            FARS.iter().map(|&x| serde_json::json!({ "far": x, "tar": f(x).tar, "far_reached": f(x).far })).collect()
        };
        let json = serde_json::json!({
            "target": a.target,
            "templates": ids.len(),
            "pairs": pairs.len(),
            "positives": roc.positives,
            "tar_at_far": far_rows(&|x| roc.tar_at_far(x)),
            "tar_at_far_nearest": far_rows(&|x| roc.tar_at_far_nearest(x)),
            "auc": roc.auc(),
            "eer": roc.eer().0,
        });
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::InvalidArgument { op: "ijb", message: e.to_string() })?;
        gif_fr::io::write_atomic(p, text.as_bytes())?;
    }
    if let Some(p) = &a.roc {
        gif_fr::io::write_atomic(p, gif_fr::eval::roc_svg(&[(a.target.as_str(), &roc)]).as_bytes())?;
    }
    Ok(())
}

fn identity_vectors_cmd(a: IdentityVectorsArgs) -> Result<(), Error> {
    let mut net = a.net.load()?;
    let scan = gif_fr::progress::scan_bar(!a.quiet);
    let ds = gif_fr::data::Dataset::open_with(&a.data, net.config().input, follow(&scan))?.resizing(a.resize);
    scan.finish_and_clear();
    let t0 = std::time::Instant::now();
    let bar = progress_bar(a.quiet, "images");
    let (v, classes, e) = gif_fr::data::identity_vectors(&mut net, &ds, a.net.batch as usize, follow(&bar))?;
    bar.finish_and_clear();
    gif_fr::io::npy::write_npy(&a.out, &v, classes, e)?;
    println!(
        "wrote the mean embedding of each of {classes} identities ({} images, {e} dimensions) to {} in {:.1} s",
        ds.len(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `gif-fr regress`: exit 0 (pass, or baseline written), 1 (fail), 2 (error).
fn regress_cmd(a: RegressArgs) -> ExitCode {
    use gif_fr::regress::{verdict, Rule, Run};
    let read = |p: &PathBuf| -> Result<Run, Error> {
        let file = |message: String| Error::File { path: p.display().to_string(), message };
        let text = std::fs::read_to_string(p).map_err(|e| file(e.to_string()))?;
        Run::from_json(&text).map_err(|e| file(e.to_string()))
    };
    // Written whole to a temporary file, then renamed: never a partial file.
    let write =
        |path: &PathBuf, run: &Run| -> Result<(), Error> { gif_fr::io::write_atomic(path, run.to_json()?.as_bytes()) };
    let outcome = (|| -> Result<bool, Error> {
        let run = Run::merge(a.run.iter().map(read).collect::<Result<Vec<_>, _>>()?);
        if let Some(p) = &a.write_run {
            write(p, &run)?;
        }
        let Some(baseline) = &a.baseline else {
            let failed = run.tests.iter().filter(|t| !t.passed).count();
            println!(
                "run: {} ({} tests, {failed} failing; {} cases; {} kernels); no baseline given",
                run.machine.device,
                run.tests.len(),
                run.benches.len(),
                run.kernels.len()
            );
            return Ok(failed == 0);
        };
        if !(a.min_slowdown.is_finite()
            && a.min_slowdown >= 0.0
            && a.spread_factor.is_finite()
            && a.spread_factor >= 0.0)
        {
            return Err(Error::InvalidArgument {
                op: "regress",
                message: "--min-slowdown and --spread-factor must be finite, non-negative".into(),
            });
        }
        let pass = if baseline.exists() {
            let base = read(baseline)?;
            println!("run: {} (commit {})", run.machine.device, run.machine.commit.as_deref().unwrap_or("?"));
            println!("baseline: {} (commit {})", base.machine.device, base.machine.commit.as_deref().unwrap_or("?"));
            let findings = verdict(&run, &base, Rule { min_slowdown: a.min_slowdown, spread_factor: a.spread_factor });
            for f in &findings {
                println!("{f}");
            }
            let failed = findings.iter().filter(|f| f.fails()).count();
            println!(
                "verdict: {} ({} tests, {} cases, {} kernels; {failed} failing, {} other findings)",
                if failed == 0 { "PASS" } else { "FAIL" },
                run.tests.len(),
                run.benches.len(),
                run.kernels.len(),
                findings.len() - failed
            );
            failed == 0
        } else if a.update {
            println!("no baseline at {}: writing this run as the first", baseline.display());
            true
        } else {
            return Err(Error::InvalidArgument {
                op: "regress",
                message: format!("no baseline at {} (--update writes one)", baseline.display()),
            });
        };
        if a.update {
            write(baseline, &run)?;
            println!("baseline updated: {}", baseline.display());
            return Ok(true);
        }
        Ok(pass)
    })();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Tokenize(a) => tokenize_cmd(a),
        Command::CodebookInfo { file } => Codebook::load(&file).map(|b| print!("{}", b.describe())),
        Command::Decode(a) => decode_cmd(a),
        Command::Embed(a) => embed_cmd(a),
        Command::IdentityVectors(a) => identity_vectors_cmd(a),
        Command::Verify(a) => verify_cmd(a),
        Command::Ijb(a) => ijb_cmd(a),
        Command::Train(a) => train_cmd(a),
        Command::Regress(a) => return regress_cmd(a),
        Command::Synth(a) => synth_cmd(a),
        Command::Experiment(a) => experiment_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
