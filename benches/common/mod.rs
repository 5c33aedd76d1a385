//! Shared benchmark plumbing: the devices to time (the CPU, and the first
//! GPU when present; never the simulator, which proves logic, not speed),
//! timing through `Device::time` inside criterion's `iter_custom` (CUDA
//! events on the device's stream), and a summary table printed last.
#![allow(dead_code)]

pub mod codes;
pub mod heads;

use std::sync::Mutex;
use std::time::Duration;

use criterion::Criterion;
use gif_fr::{Device, Result};

/// The CPU, and the first GPU when there is one. With GIF_FR_BENCH_GPU_ONLY
/// set (the GPU kit sets it), the GPU alone.
pub fn devices() -> Vec<Device> {
    let gpu_only = std::env::var("GIF_FR_BENCH_GPU_ONLY").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut v = if gpu_only { Vec::new() } else { vec![Device::cpu()] };
    match Device::cuda(0) {
        Ok(d) => v.push(d),
        Err(e) => eprintln!("benchmarking the CPU only: {e}"),
    }
    v
}

/// Short label of a device for benchmark ids.
pub fn label(d: &Device) -> String {
    match d.gpu_info() {
        Some(g) => format!("cuda:{}", g.ordinal),
        None => d.kind().to_string_lower(),
    }
}

trait Lower {
    fn to_string_lower(&self) -> String;
}
impl Lower for gif_fr::DeviceKind {
    fn to_string_lower(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

struct Row {
    case: String,
    device: String,
    total: Duration,
    iters: u64,
    bytes: f64,
    flops: f64,
    /// On a GPU: COLD_SAMPLES calls each timed alone after an L2 flush.
    cold: Vec<Duration>,
    /// Seconds per call of each criterion batch (its samples).
    batches: Vec<f64>,
}

/// Calls timed one by one, L2 flushed before each, per GPU case (3 when a
/// call takes over 100 ms).
pub const COLD_SAMPLES: usize = 11;

/// The machines of the recorded rows, as printed above the summary.
static MACHINES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// Times `iters` calls of `f` on `dev` and records them for the summary
/// under (`case`, device), with the bytes moved and FLOPs done per call.
pub fn timed<F: FnMut() -> Result<()>>(dev: &Device, case: &str, bytes: f64, flops: f64, iters: u64, f: F) -> Duration {
    let mut f = f;
    let device = label(dev);
    let seen = ROWS.lock().unwrap().iter().any(|r| r.case == case && r.device == device);
    // The first time a GPU case is timed: the kernel benchmarks' protocol
    // too (each call alone, L2 flushed, a median), beside criterion's
    // warm-L2 batches.
    let cold = match (seen, dev.kind() == gif_fr::DeviceKind::Cuda) {
        (false, true) => {
            let fail = |e: gif_fr::Error| -> Vec<Duration> { panic!("{case} on {dev}: {e}") };
            // Calls over 100 ms dwarf L2 anyway: 3 samples keep the kit's budget.
            let mut v = dev.time_each(1, true, &mut f).unwrap_or_else(fail);
            let more = if v[0] > Duration::from_millis(100) { 2 } else { COLD_SAMPLES - 1 };
            v.extend(dev.time_each(more, true, &mut f).unwrap_or_else(fail));
            v
        }
        _ => Vec::new(),
    };
    {
        let mut machines = MACHINES.lock().unwrap();
        if !machines.iter().any(|(l, _)| *l == device) {
            machines.push((device.clone(), dev.info().to_string()));
        }
    }
    let t = dev.time(iters, &mut f).unwrap_or_else(|e| panic!("{case} on {dev}: {e}"));
    let mut rows = ROWS.lock().unwrap();
    match rows.iter_mut().find(|r| r.case == case && r.device == device) {
        Some(r) => {
            r.total += t;
            r.iters += iters;
            r.batches.push(t.as_secs_f64() / iters.max(1) as f64);
        }
        None => rows.push(Row {
            case: case.to_string(),
            device,
            total: t,
            iters,
            bytes,
            flops,
            cold,
            batches: vec![t.as_secs_f64() / iters.max(1) as f64],
        }),
    }
    t
}

/// Criterion settings for these benches: short, since the CPU cases are slow
/// and the GPU kit must finish in minutes. Command-line flags override.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

/// Prints the mean time per call of every recorded case, with GB/s and
/// GFLOP/s, as a Markdown table (the GPU kit's summary collects it).
pub fn print_summary(title: &str) {
    let rows = ROWS.lock().unwrap();
    if rows.is_empty() {
        return;
    }
    println!("\n### {title}\n");
    for (label, info) in MACHINES.lock().unwrap().iter() {
        println!("- {label}: {info}");
    }
    println!(
        "\nMean: criterion's batches (warm caches). On a GPU also the median of {COLD_SAMPLES} calls \
         timed one by one with L2 flushed before each (min – max beside it); GB/s and GFLOP/s from the \
         median there, from the mean elsewhere.\n"
    );
    if let Some(dir) = std::env::var_os("GIF_FR_RESULTS_DIR") {
        write_results(std::path::Path::new(&dir), title, &rows);
    }
    println!("| case | device | mean per call | median, L2 flushed | min – max | GB/s | GFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows.iter() {
        let mean = r.total.as_secs_f64() / r.iters.max(1) as f64;
        let mut cold: Vec<f64> = r.cold.iter().map(Duration::as_secs_f64).collect();
        cold.sort_by(f64::total_cmp);
        let median = cold.get(cold.len() / 2).copied();
        let s = median.unwrap_or(mean);
        let gbs = if r.bytes > 0.0 { format!("{:.1}", r.bytes / s / 1e9) } else { "-".into() };
        let gf = if r.flops > 0.0 { format!("{:.1}", r.flops / s / 1e9) } else { "-".into() };
        let (med, spread) = match (median, cold.first(), cold.last()) {
            (Some(m), Some(lo), Some(hi)) => {
                (format!("{:.2} µs", m * 1e6), format!("{:.2} – {:.2} µs", lo * 1e6, hi * 1e6))
            }
            _ => ("-".into(), "-".into()),
        };
        println!("| {} | {} | {:.2} µs | {med} | {spread} | {gbs} | {gf} |", r.case, r.device, mean * 1e6);
    }
}

/// Mean seconds per call recorded for (`case`, device label), if any.
pub fn mean_seconds(case: &str, device: &str) -> Option<f64> {
    let rows = ROWS.lock().unwrap();
    rows.iter().find(|r| r.case == case && r.device == device).map(|r| r.total.as_secs_f64() / r.iters.max(1) as f64)
}

/// The cases as a part of a run's result (gif_fr::regress, `gif-fr
/// regress`): `DIR/bench-TITLE.json`. A GPU case's samples are its cold
/// calls; a CPU case's, criterion's batches after the first (its warm-up).
fn write_results(dir: &std::path::Path, title: &str, rows: &[Row]) {
    use gif_fr::regress::{BenchCase, Machine, Run};
    let machines = MACHINES.lock().unwrap();
    let device = machines.iter().map(|(_, info)| info.as_str()).collect::<Vec<_>>().join("; ");
    let mut benches = Vec::new();
    for r in rows {
        let samples: Vec<f64> = match r.cold.is_empty() {
            false => r.cold.iter().map(Duration::as_secs_f64).collect(),
            true if r.batches.len() > 1 => r.batches[1..].to_vec(),
            true => r.batches.clone(),
        };
        match BenchCase::from_samples(&r.case, &r.device, &samples) {
            Ok(c) => benches.push(c),
            Err(e) => eprintln!("results: {e}"),
        }
    }
    let commit = std::env::var("GIF_FR_COMMIT").ok();
    let run = Run { machine: Machine { device, commit, ..Machine::default() }, benches, ..Run::default() };
    let path = dir.join(format!("bench-{title}.json"));
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|_| run.to_json().map_err(|e| e.to_string()))
        .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("results: cannot write {}: {e}", path.display());
    }
}
