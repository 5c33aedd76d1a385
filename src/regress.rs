//! Kernel regression verdicts: a run's machine-readable result against a
//! stored baseline of the same kind of machine (`gif-fr regress`; GPU
//! runners and CPU runs alike).
//!
//! A [`Run`] records, per test binary, pass or fail; per benchmark case
//! (name and device), the median of its timed samples and their relative
//! spread; per kernel, ptxas's registers and spills; and the machine
//! (card or CPU, driver, clocks) and commit. [`verdict`] compares a run
//! with a baseline:
//!
//! - a failed test fails the verdict;
//! - a case fails when its median is slower than the baseline's by more
//!   than `max(min_slowdown, spread_factor × pooled spread)`, the pooled
//!   spread being `sqrt((s_run² + s_base²) / 2)` of the two relative
//!   spreads (`min_slowdown` 5 % and `spread_factor` 3 by default): a
//!   slowdown within the noise both runs measured passes, a planted one
//!   beyond it fails; faster cases beyond the same threshold are reported;
//! - a kernel that spills more than in the baseline fails (a register
//!   regression that ptxas reports without any GPU);
//! - a case or kernel new in the run is reported, not failed; one missing
//!   from the run is reported.
//!
//! The relative spread of a case is its samples' (max − min) / (2 · median)
//! (half the range, relative). Criterion's own baselines are not used:
//! they live in `target/` per machine and compare means; the runner's
//! baseline is a JSON in the repository per card kind
//! (docs/gpu-runs/baselines/), updated on purpose (`--update`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The machine and commit of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// The card (or CPU) as `Device::info` names it.
    #[serde(default)]
    pub device: String,
    /// Driver version, if any.
    #[serde(default)]
    pub driver: Option<String>,
    /// Clocks as reported (e.g. "1980 MHz, memory 2619 MHz").
    #[serde(default)]
    pub clocks: Option<String>,
    /// The commit measured.
    #[serde(default)]
    pub commit: Option<String>,
}

/// A test binary's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// The test binary (e.g. "code_head").
    pub binary: String,
    /// Whether every test in it passed.
    pub passed: bool,
    /// What failed, if anything.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A benchmark case's timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchCase {
    /// The case (e.g. "code head N=2^21 B=512").
    pub name: String,
    /// The device label (e.g. "cuda:0", "cpu").
    pub device: String,
    /// Median seconds per call.
    pub median: f64,
    /// Relative spread of the samples: (max − min) / (2 · median).
    pub spread: f64,
    /// Number of samples.
    #[serde(default)]
    pub samples: usize,
}

impl BenchCase {
    /// A case from its samples (seconds; at least one).
    pub fn from_samples(name: &str, device: &str, samples: &[f64]) -> Result<BenchCase> {
        let mut s: Vec<f64> = samples.to_vec();
        if s.is_empty() || s.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(Error::invalid(
                "BenchCase",
                format!("{name}: samples must be finite, non-negative, not empty"),
            ));
        }
        s.sort_by(f64::total_cmp);
        let median = if s.len() % 2 == 1 { s[s.len() / 2] } else { 0.5 * (s[s.len() / 2 - 1] + s[s.len() / 2]) };
        let spread = if median > 0.0 { (s[s.len() - 1] - s[0]) / (2.0 * median) } else { 0.0 };
        Ok(BenchCase { name: name.into(), device: device.into(), median, spread, samples: s.len() })
    }
}

/// A kernel's resources from ptxas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelUsage {
    /// "module::kernel@arch", e.g. "code_head::code_head_step@sm_90".
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Spill stores plus loads, bytes.
    pub spill_bytes: u32,
}

/// A run's machine-readable result (one JSON file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Where and what.
    #[serde(default)]
    pub machine: Machine,
    /// Per test binary.
    #[serde(default)]
    pub tests: Vec<TestResult>,
    /// Per benchmark case.
    #[serde(default)]
    pub benches: Vec<BenchCase>,
    /// Per kernel.
    #[serde(default)]
    pub kernels: Vec<KernelUsage>,
}

impl Run {
    /// Reads a run (or baseline) JSON; a malformed file is a typed error.
    pub fn from_json(text: &str) -> Result<Run> {
        serde_json::from_str(text).map_err(|e| Error::invalid("Run::from_json", format!("not a run JSON: {e}")))
    }
    /// Several partial results of one run (the test binaries', each
    /// bench's, ptxas's) as one: lists concatenated in order, the machine
    /// fields taken from the first part that has them.
    pub fn merge(parts: Vec<Run>) -> Run {
        let mut out = Run::default();
        for p in parts {
            let m = &mut out.machine;
            if m.device.is_empty() {
                m.device = p.machine.device;
            }
            m.driver = m.driver.take().or(p.machine.driver);
            m.clocks = m.clocks.take().or(p.machine.clocks);
            m.commit = m.commit.take().or(p.machine.commit);
            out.tests.extend(p.tests);
            out.benches.extend(p.benches);
            out.kernels.extend(p.kernels);
        }
        out
    }

    /// The JSON text (pretty-printed).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::invalid("Run::to_json", e.to_string()))
    }
}

/// The thresholds of [`verdict`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// The smallest relative slowdown that can fail (0.05: 5 %).
    pub min_slowdown: f64,
    /// Multiplies the pooled relative spread.
    pub spread_factor: f64,
}

impl Default for Rule {
    fn default() -> Rule {
        Rule { min_slowdown: 0.05, spread_factor: 3.0 }
    }
}

/// One finding of a verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    /// A test binary failed.
    TestFailed(String),
    /// A case slower beyond the threshold: (case, ratio run/baseline, threshold).
    Slower(String, f64, f64),
    /// A case faster beyond the threshold.
    Faster(String, f64, f64),
    /// A kernel spills more: (kernel, baseline bytes, run bytes).
    MoreSpills(String, u32, u32),
    /// A kernel's registers changed (reported): (kernel, baseline, run).
    Registers(String, u32, u32),
    /// In the run, not in the baseline.
    New(String),
    /// In the baseline, not in the run.
    Missing(String),
}

impl Finding {
    /// Whether this finding fails the verdict.
    pub fn fails(&self) -> bool {
        matches!(self, Finding::TestFailed(_) | Finding::Slower(..) | Finding::MoreSpills(..))
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::TestFailed(b) => write!(f, "FAIL test binary {b}"),
            Finding::Slower(c, r, t) => {
                write!(f, "FAIL {c}: {:.1} % slower (threshold {:.1} %)", (r - 1.0) * 100.0, t * 100.0)
            }
            Finding::Faster(c, r, t) => {
                write!(f, "faster {c}: {:.1} % faster (threshold {:.1} %)", (1.0 - r) * 100.0, t * 100.0)
            }
            Finding::MoreSpills(k, a, b) => write!(f, "FAIL {k}: spills {a} -> {b} bytes"),
            Finding::Registers(k, a, b) => write!(f, "registers {k}: {a} -> {b}"),
            Finding::New(c) => write!(f, "new {c} (no baseline)"),
            Finding::Missing(c) => write!(f, "missing {c} (in the baseline, not in this run)"),
        }
    }
}

/// The verdict of `run` against `baseline` under `rule`: every finding, in
/// the order tests, cases, kernels. Passes when no finding fails.
pub fn verdict(run: &Run, baseline: &Run, rule: Rule) -> Vec<Finding> {
    let mut out = Vec::new();
    for t in run.tests.iter().filter(|t| !t.passed) {
        let detail = t.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
        out.push(Finding::TestFailed(format!("{}{detail}", t.binary)));
    }
    let key = |c: &BenchCase| format!("{} [{}]", c.name, c.device);
    for c in &run.benches {
        match baseline.benches.iter().find(|b| b.name == c.name && b.device == c.device) {
            None => out.push(Finding::New(key(c))),
            Some(b) if b.median > 0.0 => {
                let pooled = ((c.spread * c.spread + b.spread * b.spread) / 2.0).sqrt();
                let threshold = rule.min_slowdown.max(rule.spread_factor * pooled);
                let ratio = c.median / b.median;
                if ratio > 1.0 + threshold {
                    out.push(Finding::Slower(key(c), ratio, threshold));
                } else if ratio < 1.0 - threshold {
                    out.push(Finding::Faster(key(c), ratio, threshold));
                }
            }
            Some(_) => {}
        }
    }
    for b in &baseline.benches {
        if !run.benches.iter().any(|c| c.name == b.name && c.device == b.device) {
            out.push(Finding::Missing(key(b)));
        }
    }
    for k in &run.kernels {
        match baseline.kernels.iter().find(|b| b.name == k.name) {
            None => out.push(Finding::New(format!("kernel {}", k.name))),
            Some(b) => {
                if k.spill_bytes > b.spill_bytes {
                    out.push(Finding::MoreSpills(k.name.clone(), b.spill_bytes, k.spill_bytes));
                } else if k.registers != b.registers {
                    out.push(Finding::Registers(k.name.clone(), b.registers, k.registers));
                }
            }
        }
    }
    out
}
