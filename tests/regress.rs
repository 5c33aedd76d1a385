//! The regression verdict (src/regress.rs, `gif-fr regress`) on synthetic
//! runs, as a CPU or GPU runner would feed it: a planted 20 % slowdown
//! fails, a slowdown within the measured spread passes, a failing test
//! fails, new and missing cases and faster ones are reported, not failed,
//! more spills fail; the JSON and the command's exit statuses.

use std::process::Command;

use gif_fr::regress::{verdict, BenchCase, Finding, KernelUsage, Machine, Rule, Run, TestResult};

fn case(name: &str, median: f64, spread: f64) -> BenchCase {
    BenchCase { name: name.into(), device: "cpu".into(), median, spread, samples: 11 }
}

fn baseline() -> Run {
    Run {
        machine: Machine { device: "test cpu".into(), commit: Some("base".into()), ..Machine::default() },
        tests: vec![TestResult { binary: "code_head".into(), passed: true, detail: None }],
        benches: vec![
            case("code head N=2^20", 1e-3, 0.01),
            case("full softmax N=2^20", 0.5, 0.01),
            case("gone", 1.0, 0.0),
        ],
        kernels: vec![KernelUsage { name: "code_head::code_head_step@sm_90".into(), registers: 64, spill_bytes: 0 }],
    }
}

fn fails(f: &[Finding]) -> Vec<&Finding> {
    f.iter().filter(|x| x.fails()).collect()
}

#[test]
fn a_planted_slowdown_fails_and_noise_within_the_spread_passes() {
    let base = baseline();
    // 20 % slower at 1 % spread: the threshold is max(5 %, 3 × 1 %) = 5 %.
    let mut run = base.clone();
    run.benches[0].median *= 1.2;
    let f = verdict(&run, &base, Rule::default());
    assert!(
        matches!(fails(&f)[..], [Finding::Slower(c, r, t)] if c.contains("code head") && (*r - 1.2).abs() < 1e-12 && (*t - 0.05).abs() < 1e-12),
        "{f:?}"
    );
    // 12 % slower, but both runs measured a 6 % spread: the threshold is
    // 3 × 6 % = 18 %, so this is noise.
    let mut noisy_base = base.clone();
    noisy_base.benches[0].spread = 0.06;
    let mut run = noisy_base.clone();
    run.benches[0].median *= 1.12;
    assert!(fails(&verdict(&run, &noisy_base, Rule::default())).is_empty());
    // The same 12 % with a spread of 2 % fails.
    let mut run = base.clone();
    run.benches[0].median *= 1.12;
    assert_eq!(fails(&verdict(&run, &base, Rule::default())).len(), 1);
    // A 4 % slowdown never fails under the 5 % floor.
    let mut run = base.clone();
    run.benches[1].median *= 1.04;
    assert!(fails(&verdict(&run, &base, Rule::default())).is_empty());
}

#[test]
fn failures_and_reports() {
    let base = baseline();
    let mut run = base.clone();
    run.tests.push(TestResult { binary: "softmax_head".into(), passed: false, detail: Some("dw[3]: got NaN".into()) });
    run.benches[1].median *= 0.5;
    run.benches.retain(|c| c.name != "gone");
    run.benches.push(case("new case", 1.0, 0.0));
    run.kernels[0].spill_bytes = 8;
    run.kernels.push(KernelUsage { name: "optim::sgd_step_f32@sm_90".into(), registers: 20, spill_bytes: 0 });
    let f = verdict(&run, &base, Rule::default());
    let text: Vec<String> = f.iter().map(|x| x.to_string()).collect();
    assert!(matches!(&f[0], Finding::TestFailed(b) if b.contains("softmax_head") && b.contains("NaN")), "{text:?}");
    assert!(f.iter().any(|x| matches!(x, Finding::Faster(c, ..) if c.contains("full softmax"))), "{text:?}");
    assert!(f.iter().any(|x| matches!(x, Finding::New(c) if c.contains("new case"))), "{text:?}");
    assert!(f.iter().any(|x| matches!(x, Finding::Missing(c) if c.contains("gone"))), "{text:?}");
    assert!(f.iter().any(|x| matches!(x, Finding::MoreSpills(k, 0, 8) if k.contains("code_head_step"))), "{text:?}");
    assert!(f.iter().any(|x| matches!(x, Finding::New(k) if k.contains("sgd_step"))), "{text:?}");
    // What fails: the test and the spills; faster, new and missing do not.
    assert_eq!(fails(&f).len(), 2, "{text:?}");
    // Registers that change without spilling are reported, not failed.
    let mut run = base.clone();
    run.kernels[0].registers = 72;
    let f = verdict(&run, &base, Rule::default());
    assert_eq!(f, vec![Finding::Registers("code_head::code_head_step@sm_90".into(), 64, 72)]);
    assert!(fails(&f).is_empty());
}

#[test]
fn cases_from_samples_and_json() {
    let c = BenchCase::from_samples("x", "cuda:0", &[1.0, 1.2, 0.9, 1.1, 1.0]).unwrap();
    assert_eq!((c.median, c.samples), (1.0, 5));
    assert!((c.spread - 0.15).abs() < 1e-12);
    let even = BenchCase::from_samples("x", "cpu", &[2.0, 4.0]).unwrap();
    assert_eq!(even.median, 3.0);
    assert!(BenchCase::from_samples("x", "cpu", &[]).is_err());
    assert!(BenchCase::from_samples("x", "cpu", &[1.0, f64::NAN]).is_err());
    let run = baseline();
    assert_eq!(Run::from_json(&run.to_json().unwrap()).unwrap(), run);
    assert!(Run::from_json("{\"machine\": 3}").is_err());
    assert!(Run::from_json("not json").is_err());
}

#[test]
fn the_command_exits_0_1_or_2_and_updates_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let (base_path, run_path) = (dir.path().join("base.json"), dir.path().join("run.json"));
    let gif = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_gif-fr")).arg("regress").args(args).output().unwrap();
    let paths = ["--run", run_path.to_str().unwrap(), "--baseline", base_path.to_str().unwrap()];
    std::fs::write(&run_path, baseline().to_json().unwrap()).unwrap();
    // No baseline: an error (2) unless --update writes the first.
    assert_eq!(gif(&paths).status.code(), Some(2));
    let out = gif(&[&paths[..], &["--update"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(Run::from_json(&std::fs::read_to_string(&base_path).unwrap()).unwrap(), baseline());
    // Same run: PASS.
    let out = gif(&paths);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: PASS"));
    // A planted slowdown: FAIL, named.
    let mut slow = baseline();
    slow.benches[1].median *= 1.3;
    std::fs::write(&run_path, slow.to_json().unwrap()).unwrap();
    let out = gif(&paths);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL full softmax N=2^20 [cpu]: 30.0 % slower") && text.contains("verdict: FAIL"), "{text}");
    // A run in parts (the tests', a bench's), merged; --write-run keeps it.
    let (tests_part, bench_part, merged) =
        (dir.path().join("tests.json"), dir.path().join("bench.json"), dir.path().join("merged.json"));
    let full = baseline();
    let tests_only = Run { tests: full.tests.clone(), ..Run::default() };
    let benches_only = Run { tests: vec![], ..full.clone() };
    std::fs::write(&tests_part, tests_only.to_json().unwrap()).unwrap();
    std::fs::write(&bench_part, benches_only.to_json().unwrap()).unwrap();
    let parts = [
        "--run",
        tests_part.to_str().unwrap(),
        bench_part.to_str().unwrap(),
        "--baseline",
        base_path.to_str().unwrap(),
        "--write-run",
        merged.to_str().unwrap(),
    ];
    let out = gif(&parts);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let m = Run::from_json(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!((m.tests, m.benches, m.machine.device), (full.tests, full.benches, full.machine.device));
    // A corrupt run: a typed error naming the file (2).
    std::fs::write(&run_path, "{").unwrap();
    let out = gif(&paths);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run.json"));
}
