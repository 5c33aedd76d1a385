//! The `gif-fr` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use gif_fr::kernels::{self, MODULES};
use gif_fr::tokenizer::{self, Codebook, Config, Input};
use gif_fr::{Device, Error};

const USAGE: &str = "usage: gif-fr <command> [options]

commands:
  info            crate version, how the kernels were built, the kernel
                  modules, and the GPU found (or exactly why none was)
  tokenize        assign identity codes and write a codebook:
                    (--vectors FILE.npy | --count N --dim D) --out FILE.safetensors
                    [--vocab V (16)] [--length L] [--seed S (0)] [--steps K]
                    [--iters I (10)] [--device best|cpu|cuda|sim (best)] [--quiet]
                  FILE.npy holds one f32/f64 row per identity ([N, d]);
                  without it, N random unit vectors of D dimensions are used.
                  --device cpu is the deterministic path.
  codebook-info FILE
                  size, vocab, length and per-level trie statistics
  decode          the k best identities of each query:
                    --codebook FILE.safetensors --scores FILE.npy (f32 [B, l, v]
                    log-probabilities) --top-k K --out FILE.safetensors
                    [--beam W] [--threshold T] [--device best|cpu|cuda|sim (cpu)]
                  writes ids (i64 [B, K], -1: none or below the threshold)
                  and scores (f32 [B, K])
  embed           face embeddings with an insightface IResNet:
                    --arch r18|r34|r50|r100 --weights FILE.safetensors
                    --images FILE.npy --out FILE.npy [--batch N (32)]
                    [--device best|cpu|cuda|sim (best)] [--bf16 (convolutions
                    on bf16 tensor cores, as autocast; default f32)]
                  images: uint8 [B, 112, 112, 3] RGB, or f32 [B, 3, 112, 112]
                  normalized as insightface does; writes f32 [B, 512]
                  (scripts/pth_to_safetensors.py converts a .pth)";

fn info() {
    println!("gif-fr {}", env!("CARGO_PKG_VERSION"));
    println!("kernels: {}", kernels::build_mode());
    println!("modules:");
    for m in MODULES {
        println!("  {:<10} {:>3} kernels  (kernels/{}.cu)", m.name, m.kernels.len(), m.name);
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
    println!("simulator: available (Device::sim), runs the same kernels on the CPU");
}

/// A command-line mistake: printed with the usage, exit code 2.
struct Usage(String);

/// The device named by `--device`: a usage error for an unknown name, the
/// device (or why it cannot be had) otherwise.
fn device_arg(name: &str) -> Result<Result<Device, Error>, Usage> {
    Ok(match name {
        "best" => Ok(Device::best()),
        "cpu" => Ok(Device::cpu()),
        "sim" => Ok(Device::sim()),
        "cuda" => Device::cuda(0),
        other => return Err(Usage(format!("--device takes best, cpu, cuda or sim, not {other}"))),
    })
}

fn parse<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, Usage> {
    let v = v.ok_or_else(|| Usage(format!("{flag} needs a value")))?;
    v.parse().map_err(|_| Usage(format!("{flag}: cannot read {v:?}")))
}

fn tokenize_cmd(args: &[String]) -> Result<Result<(), Error>, Usage> {
    let mut cfg = Config { progress: true, ..Config::default() };
    let (mut vectors, mut count, mut dim, mut out, mut device) =
        (None::<PathBuf>, None::<usize>, None::<usize>, None::<PathBuf>, "best".to_string());
    let mut it = args.iter().cloned();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vectors" => vectors = Some(parse(&a, it.next())?),
            "--count" => count = Some(parse(&a, it.next())?),
            "--dim" => dim = Some(parse(&a, it.next())?),
            "--out" => out = Some(parse(&a, it.next())?),
            "--vocab" => cfg.vocab = parse(&a, it.next())?,
            "--length" => cfg.length = Some(parse(&a, it.next())?),
            "--seed" => cfg.seed = parse(&a, it.next())?,
            "--steps" => cfg.steps = Some(parse(&a, it.next())?),
            "--iters" => cfg.kmeans_iters = parse(&a, it.next())?,
            "--device" => device = parse(&a, it.next())?,
            "--quiet" => cfg.progress = false,
            other => return Err(Usage(format!("unknown option {other}"))),
        }
    }
    let out = out.ok_or_else(|| Usage("--out FILE.safetensors is required".into()))?;
    let dev = device_arg(&device)?;
    let dev = match dev {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let input = match (vectors, count, dim) {
        (Some(p), None, None) => match tokenizer::read_npy_matrix(&p) {
            Ok((data, _, d)) => Input::Vectors { data, dim: d },
            Err(e) => return Ok(Err(e)),
        },
        (None, Some(count), Some(dim)) => Input::Random { count, dim },
        _ => return Err(Usage("give either --vectors FILE.npy, or --count N and --dim D".into())),
    };
    let t0 = std::time::Instant::now();
    Ok((|| {
        let (book, report) = tokenizer::tokenize_with_report(input, &cfg, &dev)?;
        let t_save = std::time::Instant::now();
        book.save(&out)?;
        eprintln!(
            "tokenized {} identities on {dev}: input {:.1} s, homogenize {:.1} s ({} steps, loss {} -> {}), k-means {:.1} s, save {:.1} s; total {:.1} s",
            book.len(),
            report.input_seconds,
            report.homogenize_seconds,
            report.losses.len(),
            report.losses.first().map_or("-".into(), |l| format!("{l:.4}")),
            report.losses.last().map_or("-".into(), |l| format!("{l:.4}")),
            report.kmeans_seconds,
            t_save.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        print!("{}", book.describe());
        Ok(())
    })())
}

fn decode_cmd(args: &[String]) -> Result<Result<(), Error>, Usage> {
    use gif_fr::decode::{Mode, PrefixDecoder};
    let (mut book, mut scores, mut k, mut out, mut beam, mut threshold, mut device) = (
        None::<PathBuf>,
        None::<PathBuf>,
        None::<usize>,
        None::<PathBuf>,
        None::<usize>,
        None::<f32>,
        "cpu".to_string(),
    );
    let mut it = args.iter().cloned();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--codebook" => book = Some(parse(&a, it.next())?),
            "--scores" => scores = Some(parse(&a, it.next())?),
            "--top-k" => k = Some(parse(&a, it.next())?),
            "--out" => out = Some(parse(&a, it.next())?),
            "--beam" => beam = Some(parse(&a, it.next())?),
            "--threshold" => threshold = Some(parse(&a, it.next())?),
            "--device" => device = parse(&a, it.next())?,
            other => return Err(Usage(format!("unknown option {other}"))),
        }
    }
    let (Some(book), Some(scores), Some(k), Some(out)) = (book, scores, k, out) else {
        return Err(Usage("decode needs --codebook, --scores, --top-k and --out".into()));
    };
    let dev = device_arg(&device)?;
    Ok((|| {
        let dev = dev?;
        let book = Codebook::load(&book)?;
        let (lp, shape) = tokenizer::read_npy(&scores)?;
        let t = gif_fr::Tensor::from_slice(&dev, &shape, &lp)?;
        let dec = PrefixDecoder::new(&book, &dev)?;
        let mode = beam.map_or(Mode::Exact, Mode::Beam);
        dec.top_k(&t, k, mode, threshold)?.save(&out)
    })())
}

fn embed_cmd(args: &[String]) -> Result<Result<(), Error>, Usage> {
    use gif_fr::backbone::{images, IResNet, IResNetConfig};
    let (mut arch, mut weights, mut imgs, mut out, mut batch, mut device) =
        (None::<String>, None::<PathBuf>, None::<PathBuf>, None::<PathBuf>, 32usize, "best".to_string());
    let mut bf16 = false;
    let mut it = args.iter().cloned();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--arch" => arch = Some(parse(&a, it.next())?),
            "--weights" => weights = Some(parse(&a, it.next())?),
            "--images" => imgs = Some(parse(&a, it.next())?),
            "--out" => out = Some(parse(&a, it.next())?),
            "--batch" => batch = parse(&a, it.next())?,
            "--device" => device = parse(&a, it.next())?,
            "--bf16" => bf16 = true,
            other => return Err(Usage(format!("unknown option {other}"))),
        }
    }
    let (Some(arch), Some(weights), Some(imgs), Some(out)) = (arch, weights, imgs, out) else {
        return Err(Usage("embed needs --arch, --weights, --images and --out".into()));
    };
    let mut cfg = IResNetConfig::arch(&arch).map_err(|e| Usage(e.to_string()))?;
    if bf16 {
        cfg.conv_dtype = gif_fr::DType::BF16;
    }
    if batch == 0 {
        return Err(Usage("--batch must be positive".into()));
    }
    let dev = device_arg(&device)?;
    Ok((|| {
        let dev = dev?;
        let (pixels, b) = images::read_images(&imgs, cfg.input)?;
        let e = cfg.embedding;
        let mut net = IResNet::load(&weights, cfg, &dev)?;
        let t0 = std::time::Instant::now();
        let emb = net.embed(&pixels, batch)?;
        images::write_npy(&out, &emb, b, e)?;
        eprintln!("embedded {b} images on {dev} in {:.2} s", t0.elapsed().as_secs_f64());
        Ok(())
    })())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => {
            info();
            Ok(Ok(()))
        }
        Some("tokenize") => tokenize_cmd(&args[1..]),
        Some("decode") => decode_cmd(&args[1..]),
        Some("embed") => embed_cmd(&args[1..]),
        Some("codebook-info") => match args.get(1) {
            Some(f) if args.len() == 2 => {
                Ok(Codebook::load(std::path::Path::new(f)).map(|b| print!("{}", b.describe())))
            }
            _ => Err(Usage("codebook-info takes one FILE".into())),
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(Ok(()))
        }
        Some(other) => Err(Usage(format!("unknown command {other}"))),
        None => Err(Usage("no command".into())),
    };
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(Usage(m)) => {
            eprintln!("error: {m}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
