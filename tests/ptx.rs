//! PTX checks: ptxas accepts every embedded module for sm_80 and sm_90
//! without register spills (except kernels allowed in
//! `kernels::SPILLS_ALLOWED`), the PTX entries are exactly the kernels
//! build.rs registered, and NVRTC (the no-nvcc path) compiles every module.
//!
//! Without ptxas or libnvrtc these print a skip notice; with CI=true a
//! missing tool is a failure.

use std::path::PathBuf;
use std::process::Command;

use gif_fr::runtime::kernels::{self, ModuleSource, MODULES, SPILLS_ALLOWED};

/// NVRTC's PTX of every module (or why not), compiled once per test
/// process, the modules in parallel: both tests below use it.
fn nvrtc_ptx() -> &'static [Result<String, String>] {
    use rayon::prelude::*;
    static PTX: std::sync::OnceLock<Vec<Result<String, String>>> = std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        MODULES.par_iter().map(|m| kernels::compile_with_nvrtc(m.id).map_err(|e| e.to_string())).collect()
    })
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn skip_or_fail(what: &str) {
    use std::io::Write;
    assert!(!ci(), "CI=true and {what}");
    // Straight to stderr: libtest's capture would hide a passing test's print.
    let _ = writeln!(std::io::stderr(), "note: skipping a PTX check: {what}");
}

fn ptxas() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// A PTX file in the temp folder, unique per call (tests run in parallel).
fn write_temp(name: &str, text: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("gif-fr-{}-{k}-{name}.ptx", std::process::id()));
    std::fs::write(&p, text).expect("write PTX to the temp folder");
    p
}

/// One kernel's line of `ptxas -v` output.
#[derive(Debug, Default)]
struct Usage {
    kernel: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    /// Static shared memory, bytes.
    smem: u32,
}

fn parse_ptxas_v(out: &str) -> Vec<Usage> {
    let num_before = |s: &str, key: &str| -> u32 {
        s.find(key).and_then(|i| s[..i].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let mut v: Vec<Usage> = Vec::new();
    for line in out.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            v.push(Usage { kernel: rest.split('\'').next().unwrap_or("").to_string(), ..Default::default() });
        } else if let Some(u) = v.last_mut() {
            if line.contains("spill stores") {
                u.stack = num_before(line, "bytes stack frame");
                u.spill_stores = num_before(line, "bytes spill stores");
                u.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers");
                u.smem = num_before(line, "bytes smem");
            }
        }
    }
    v
}

/// Runs ptxas for sm_80 and sm_90 on `ptx`; returns the usage on each.
fn check_with_ptxas(ptxas: &PathBuf, m: &ModuleSource, origin: &str, ptx: &str) -> [Vec<Usage>; 2] {
    let file = write_temp(&format!("{}-{origin}", m.name), ptx);
    let run = |arch: &str| {
        let o = Command::new(ptxas).args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"]).arg(&file).output();
        let o = o.expect("run ptxas");
        let text = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "ptxas -arch={arch} rejected {} ({origin}):\n{text}", m.name);
        let usage = parse_ptxas_v(&text);
        assert_eq!(
            usage.len(),
            m.kernels.len(),
            "ptxas reported {} kernels for {}, the table has {}",
            usage.len(),
            m.name,
            m.kernels.len()
        );
        usage
    };
    let both = [run("sm_80"), run("sm_90")];
    let _ = std::fs::remove_file(&file);
    both
}

/// Each entry's `.maxntid` (its `__launch_bounds__`: the block size the
/// kernel is built for), from the PTX text.
fn max_threads(ptx: &str) -> std::collections::HashMap<String, u32> {
    let mut out = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in ptx.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".visible .entry ").or_else(|| t.strip_prefix(".entry ")) {
            current = Some(rest.split('(').next().unwrap_or("").trim().to_string());
        } else if let (Some(k), Some(rest)) = (&current, t.strip_prefix(".maxntid ")) {
            let dims: Vec<u32> = rest.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            out.insert(k.clone(), dims.iter().product());
            current = None;
        }
    }
    out
}

/// Resident warps per SM over the 64 an SM holds (sm_80 and sm_90 alike)
/// for `threads` per block, `regs` per thread and `smem` bytes of static
/// shared memory per block: the occupancy calculator's limits (registers
/// allocated per warp in units of 256 from 64 Ki, shared memory in units
/// of 128 bytes plus 1 KiB reserved per block from `smem_per_sm`, at most
/// 32 blocks).
fn occupancy(threads: u32, regs: u32, smem: u32, smem_per_sm: u32) -> f64 {
    let warps = threads.div_ceil(32).max(1);
    let regs_per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    let by_regs = (65536 / regs_per_warp) / warps;
    let smem_block = (smem + 1024).div_ceil(128) * 128;
    let by_smem = smem_per_sm / smem_block;
    let blocks = by_regs.min(by_smem).min(64 / warps).min(32);
    (blocks * warps) as f64 / 64.0
}

#[test]
fn ptxas_accepts_every_module_without_spills() {
    let Some(ptxas) = ptxas() else { return skip_or_fail("ptxas is not on PATH") };
    let mut report = String::from("kernel                           regs  stack  spill st/ld  (sm_90)\n");
    let mut table = String::from(
        "| module | kernel | block (launch bounds) | registers sm_80 / sm_90 | static smem (B) | occupancy sm_80 | occupancy sm_90 |\n|---|---|---|---|---|---|---|\n",
    );
    let mut bad = Vec::new();
    let mut checked = 0;
    let mut kernels_used = Vec::new();
    for (i, m) in MODULES.iter().enumerate() {
        let (origin, ptx) = match m.ptx {
            Some(p) => ("nvcc", p.to_string()),
            None => match &nvrtc_ptx()[i] {
                Ok(p) => ("nvrtc", p.clone()),
                Err(e) => {
                    skip_or_fail(&format!("no PTX for {} (built without nvcc, and {e})", m.name));
                    continue;
                }
            },
        };
        let [u80, u90] = check_with_ptxas(&ptxas, m, origin, &ptx);
        let bounds = max_threads(&ptx);
        for (arch, usage) in [("sm_80", &u80), ("sm_90", &u90)] {
            kernels_used.extend(usage.iter().map(|u| gif_fr::regress::KernelUsage {
                name: format!("{}::{}@{arch}", m.name, u.kernel),
                registers: u.registers,
                spill_bytes: u.spill_stores + u.spill_loads,
            }));
        }
        for (a, u) in u80.iter().zip(&u90) {
            let t = bounds.get(&u.kernel).copied();
            let occ = |u: &Usage, smem_per_sm| {
                t.map_or("–".to_string(), |t| {
                    format!("{:.0} %", 100.0 * occupancy(t, u.registers, u.smem, smem_per_sm))
                })
            };
            table += &format!(
                "| {} | {} | {} | {} / {} | {} | {} | {} |\n",
                m.name,
                u.kernel,
                t.map_or("–".to_string(), |t| t.to_string()),
                a.registers,
                u.registers,
                u.smem,
                occ(a, 167_936),
                occ(u, 233_472)
            );
        }
        for u in u90 {
            report += &format!(
                "{:<32} {:>4} {:>6} {:>6}/{:<6}\n",
                u.kernel, u.registers, u.stack, u.spill_stores, u.spill_loads
            );
            let spills = u.spill_stores + u.spill_loads > 0;
            if spills && !SPILLS_ALLOWED.iter().any(|(k, _)| *k == u.kernel) {
                bad.push(format!("{} spills {} bytes stored / {} loaded", u.kernel, u.spill_stores, u.spill_loads));
            }
            checked += 1;
        }
    }
    // Straight to stderr, so the register table shows in every test run.
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{report}");
    }
    // A GPU run's result gets the kernels' resources (gif_fr::regress).
    if let Some(dir) = std::env::var_os("GIF_FR_RESULTS_DIR") {
        let run = gif_fr::regress::Run { kernels: kernels_used, ..Default::default() };
        std::fs::create_dir_all(&dir).expect("results folder");
        std::fs::write(std::path::Path::new(&dir).join("kernels.json"), run.to_json().unwrap()).expect("kernels.json");
    }
    // scripts/efficiency-table asks for the table in a file.
    if let Some(path) = std::env::var_os("GIF_FR_EFFICIENCY_TABLE") {
        std::fs::write(&path, table).expect("write the efficiency table");
    }
    assert!(bad.is_empty(), "register spills not allowed in kernels::SPILLS_ALLOWED:\n{}", bad.join("\n"));
    if checked > 0 {
        println!("ptxas checked {checked} kernels");
    }
}

#[test]
fn ptx_entries_are_exactly_the_registered_kernels() {
    // The PTX the CUDA backend would load: nvcc's, or NVRTC's without nvcc.
    for m in MODULES {
        let ptx = match kernels::ptx(m.id) {
            Ok(p) => p,
            Err(e) => return skip_or_fail(&format!("no PTX for {}: {e}", m.name)),
        };
        let mut entries: Vec<&str> = ptx
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or("").trim())
            .collect();
        let mut table = m.kernels.to_vec();
        entries.sort_unstable();
        table.sort_unstable();
        assert_eq!(entries, table, "PTX entries of {} differ from what build.rs found", m.name);
    }
}

#[test]
fn nvrtc_compiles_every_module() {
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return skip_or_fail("libnvrtc cannot be loaded (add the toolchain's lib folder to LD_LIBRARY_PATH)");
    }
    for (m, ptx) in MODULES.iter().zip(nvrtc_ptx()) {
        let ptx = ptx.as_ref().unwrap_or_else(|e| panic!("{e}"));
        for k in m.kernels {
            assert!(ptx.contains(&format!(".entry {k}(")), "NVRTC's PTX for {} lacks {k}", m.name);
        }
        // Built without nvcc, the test above already runs ptxas on this
        // very PTX.
        if let (Some(p), Some(_)) = (ptxas(), m.ptx) {
            check_with_ptxas(&p, m, "nvrtc", ptx);
        }
    }
}
