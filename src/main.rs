//! The `gif-fr` command line.

use std::process::ExitCode;

use gif_fr::kernels::{self, MODULES};
use gif_fr::{Device, Error};

const USAGE: &str = "usage: gif-fr <command>

commands:
  info    crate version, how the kernels were built, the kernel modules,
          and the GPU found (or exactly why none was)";

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
        Err(e @ (Error::NoDriver(_) | Error::NoGpu(_))) => println!("gpu: none: {e}"),
        Err(e) => println!("gpu: none: {e}"),
    }
    println!("simulator: available (Device::sim), runs the same kernels on the CPU");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("info") => {
            info();
            ExitCode::SUCCESS
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
