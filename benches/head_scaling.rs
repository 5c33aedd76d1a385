//! The scaling study, the crate's main job: O(N) heads against the O(log N)
//! code head as the number of identities N grows.
//!
//! On the best device (the GPU if there is one, else the CPU) it times one
//! training step (forward + backward) and measures its peak extra memory
//! for the fused full margin softmax, Partial FC (r = 0.1, 0.3) and the GIF
//! code head (v = 16, l = ceil(log_16 N), with and without projections),
//! d = 512: N = 2^10 ... 2^24 with B = 512 on a GPU, 2^10 ... 2^20 with
//! B = 64 on the CPU, plus N = 2,059,906 (WebFace42M). Then identification:
//! queries/s of the code head + prefix-tree decoder (exact top-5) against
//! the full head's top-5 by cosine.
//!
//! The code head always trains with γ = 1 and reads its N x d code-vector
//! table (bf16; on a GPU in device memory up to 16 GiB, else resident in
//! page-locked host memory the step kernel reads in place): GIF's one O(N) state. Its
//! bytes are a column of their own (fixed data: no gradient, no optimizer
//! state), apart from the step's peak extra memory.
//!
//! Writes target/head_scaling/{results.csv, time_vs_n.svg, identify.csv}
//! (GIF_FR_SCALING_OUT overrides the folder) and prints the tables.
//! GIF_FR_SCALING_QUICK=1 runs a shorter sweep (the GPU kit's mode).
//!
//! Run: `cargo bench --bench head_scaling`.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;

use common::heads::{bench_or_time, fill, mib, sweep, Kind, Measured, V};
use gif_fr::decode::{Mode, PrefixDecoder};
use gif_fr::head::{CodeHead, CodeHeadConfig, SoftmaxHead, SoftmaxHeadConfig};
use gif_fr::{Device, DeviceKind, Tensor};
use plotters::prelude::*;

const D: usize = 512;
const WEBFACE42M: usize = 2_059_906;

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn best_device() -> Device {
    let gpu_only = env_on("GIF_FR_BENCH_GPU_ONLY");
    match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            assert!(!gpu_only, "GIF_FR_BENCH_GPU_ONLY is set but no GPU is usable: {e}");
            eprintln!("no GPU ({e}): the study runs on the CPU");
            Device::cpu()
        }
    }
}

fn out_dir() -> PathBuf {
    let dir = std::env::var_os("GIF_FR_SCALING_OUT").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into())).join("head_scaling")
    });
    std::fs::create_dir_all(&dir).expect("output folder");
    dir
}

fn plot(path: &PathBuf, rows: &[Measured], kinds: &[Kind], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let ok: Vec<&Measured> = rows.iter().filter(|r| r.seconds.is_finite() && r.seconds > 0.0).collect();
    let (x0, x1) = (ok.iter().map(|r| r.n).min().unwrap_or(1) as f64, ok.iter().map(|r| r.n).max().unwrap_or(2) as f64);
    let y0 = ok.iter().map(|r| r.seconds * 1e3).fold(f64::INFINITY, f64::min);
    let y1 = ok.iter().map(|r| r.seconds * 1e3).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), (y0 * 0.5..y1 * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("identities N").y_desc("forward + backward, ms").draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for (i, &kind) in kinds.iter().enumerate() {
        let pts: Vec<(f64, f64)> =
            ok.iter().filter(|r| r.kind == kind).map(|r| (r.n as f64, r.seconds * 1e3)).collect();
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(kind.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    let quick = env_on("GIF_FR_SCALING_QUICK");
    // 10 flat samples over about a second per case: the study has 49 cases.
    let mut c = common::criterion()
        .warm_up_time(std::time::Duration::from_millis(if quick { 200 } else { 300 }))
        .measurement_time(std::time::Duration::from_secs(1));
    let dev = best_device();
    let gpu = dev.kind() == DeviceKind::Cuda;
    let label = common::label(&dev);
    let (b, mut ns): (usize, Vec<usize>) = match (gpu, quick) {
        (true, false) => (512, (10..=24).step_by(2).map(|p| 1 << p).collect()),
        (true, true) => (512, vec![1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22]),
        (false, false) => (64, (10..=20).step_by(2).map(|p| 1 << p).collect()),
        (false, true) => (64, vec![1 << 10, 1 << 14, 1 << 18]),
    };
    if gpu || !quick {
        ns.push(WEBFACE42M);
    }
    ns.sort_unstable();
    // Both precisions on a GPU, each head against the others in its own
    // (bf16: the O(N) heads on the tensor cores); f32 only on the CPU, which
    // has no tensor cores (its bf16 paths widen to f32).
    let mut kinds: Vec<Kind> = common::heads::kinds(false).to_vec();
    if gpu {
        kinds.extend(common::heads::kinds(true));
    }
    println!("scaling study on {dev}: B = {b}, d = {D}, N = {ns:?}{}", if quick { " (quick)" } else { "" });
    // The code heads run first at each N: right after an O(N) head frees
    // gigabytes the kernel may be busy reclaiming them, which on a 2-core
    // machine shows up in the next few milliseconds-long steps.
    let run_order: Vec<Kind> = kinds.iter().rev().copied().collect();
    let rows = sweep(&mut c, "head_scaling", &dev, &run_order, &ns, b, D);

    // Identification: GIF (log-probs of the code head + exact top-5 decoding)
    // against the full head's top-5 by cosine.
    let qb = if gpu { 4096 } else { 64 };
    let mut ident = Vec::new();
    {
        let mut g = c.benchmark_group(format!("identify/{label}"));
        g.sampling_mode(criterion::SamplingMode::Flat);
        for &n in &ns {
            let book = common::codes::codebook(n);
            let l = book.length();
            let x = Tensor::from_slice(&dev, &[qb, D], &fill(qb * D, 1.0, 9)).expect("queries");
            let lp = Tensor::from_slice(&dev, &[qb, l * V], &common::codes::queries(&book, qb, 3)).expect("lp");
            let dec = PrefixDecoder::new(&book, &dev).expect("decoder");
            let head = CodeHead::new(CodeHeadConfig::new(D, l, V), &dev, 1).expect("code head");
            let mut gif = || -> gif_fr::Result<()> {
                // The head's log-probs are computed and timed; the decoder runs on
                // peaked synthetic log-probs (an untrained head's are flat).
                drop(head.log_probs(&x)?);
                dec.top_k(&lp, 5, Mode::Exact, None).map(drop)
            };
            let case = format!("gif identify N={n} B={qb}");
            bench_or_time(&mut g, &dev, "gif", n, &case, 0.0, None, &mut gif);
            let gif_s = common::mean_seconds(&case, &label).unwrap_or(f64::NAN);
            drop((dec, head));
            let w = match Tensor::from_slice(&dev, &[n, D], &fill(n * D, 0.05, 4)) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("top-k at N = {n}: skipped ({e})");
                    ident.push((n, l, gif_s, f64::NAN));
                    continue;
                }
            };
            let full = SoftmaxHead::from_weights(SoftmaxHeadConfig::new(D, n), w).expect("full head");
            let mut topk = || full.top_k(&x, 5).map(drop);
            let case = format!("full top-5 N={n} B={qb}");
            bench_or_time(&mut g, &dev, "full-topk", n, &case, 2.0 * (qb * n * D) as f64, None, &mut topk);
            ident.push((n, l, gif_s, common::mean_seconds(&case, &label).unwrap_or(f64::NAN)));
        }
        g.finish();
    }
    c.final_summary();

    let dir = out_dir();
    let get = |kind: Kind, n: usize| rows.iter().find(|r| r.kind == kind && r.n == n);
    let mut table = String::new();
    let mut csv = String::from("device,head,n,l,b,d,seconds,peak_bytes,table_bytes,macs,weights\n");
    let _ = writeln!(table, "\n### Training step vs N on {label} (B = {b}, d = {D}, v = {V})\n");
    let _ = write!(table, "| N | l |");
    for k in &kinds {
        let _ = write!(table, " {} ms | {} MiB |", k.name(), k.name());
    }
    let _ = writeln!(table, " code-vector table MiB (bf16) | full / code, f32 | full / code, bf16 |");
    let _ = writeln!(table, "|{}", "---|".repeat(5 + 2 * kinds.len()));
    for &n in &ns {
        let l = gif_fr::tokenizer::min_length(V, n).expect("V >= 2");
        let _ = write!(table, "| {n} | {l} |");
        for &k in &kinds {
            match get(k, n) {
                Some(r) => {
                    let _ = write!(table, " {:.3} | {:.1} |", r.seconds * 1e3, mib(r.peak));
                    let _ = writeln!(
                        csv,
                        "{label},{},{n},{l},{b},{D},{:.6e},{},{},{:.4e},{}",
                        k.name(),
                        r.seconds,
                        r.peak,
                        r.table,
                        k.macs(n, b, D),
                        k.weights(n, D)
                    );
                }
                None => {
                    let _ = write!(table, " - | - |");
                }
            }
        }
        let ratio = |bf16: bool| match (get(Kind::Full { bf16 }, n), get(Kind::Code { projection: false, bf16 }, n)) {
            (Some(f), Some(c)) => format!("{:.1}x", f.seconds / c.seconds),
            _ => "-".into(),
        };
        let code_table = get(Kind::Code { projection: false, bf16: false }, n)
            .map_or("-".into(), |r| format!("{:.0}", mib(r.table)));
        let _ = writeln!(table, " {code_table} | {} | {} |", ratio(false), ratio(true));
    }
    let _ = writeln!(table, "\n### Analytical cost per step (multiply-adds, weights)\n");
    let _ = write!(table, "| N |");
    for k in &kinds {
        let _ = write!(table, " {} MACs | weights |", k.name());
    }
    let _ = writeln!(table, "\n|{}", "---|".repeat(1 + 2 * kinds.len()));
    for &n in &ns {
        let _ = write!(table, "| {n} |");
        for &k in &kinds {
            let _ = write!(table, " {:.3e} | {:.3e} |", k.macs(n, b, D), k.weights(n, D) as f64);
        }
        let _ = writeln!(table);
    }
    let _ = writeln!(table, "\n### Identification, top-5 (B = {qb} queries)\n");
    let _ = writeln!(table, "| N | l | GIF (log-probs + exact decode) q/s | full top-5 q/s | speed-up |");
    let _ = writeln!(table, "|---|---|---|---|---|");
    let mut icsv = String::from("device,n,l,queries,gif_seconds,full_topk_seconds\n");
    for &(n, l, g, f) in &ident {
        let _ = writeln!(table, "| {n} | {l} | {:.0} | {:.0} | {:.1}x |", qb as f64 / g, qb as f64 / f, f / g);
        let _ = writeln!(icsv, "{label},{n},{l},{qb},{g:.6e},{f:.6e}");
    }
    println!("{table}");
    std::fs::write(dir.join("results.csv"), csv).expect("results.csv");
    std::fs::write(dir.join("identify.csv"), icsv).expect("identify.csv");
    std::fs::write(dir.join("table.md"), &table).expect("table.md");
    let svg = dir.join("time_vs_n.svg");
    if let Err(e) = plot(&svg, &rows, &kinds, &format!("forward + backward vs N ({label}, B = {b}, d = {D})")) {
        eprintln!("plot: {e}");
    }
    println!("wrote {}", dir.display());
    common::print_summary("head_scaling");
}
