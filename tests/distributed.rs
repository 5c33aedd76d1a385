//! The collective layer and data-parallel training.
//!
//! Without the `mpi` feature: the world of one, the buckets, the launch
//! variables. With it (`cargo test --features mpi`, Open MPI or MPICH
//! installed): each `*_on_ranks` test starts `mpirun -np W` (W = 2 and 3,
//! on this machine) of this very test binary running one `rank_*` test
//! (ignored in a plain run: it only means something as one of W ranks),
//! and checks what every rank printed. Without mpirun on PATH the MPI tests
//! print a skip notice, or fail with CI=true.

mod common;

use gif_fr::distributed::{self, buckets, check_same, CollectiveStats, Communicator, ReduceOp, SingleProcess};
use gif_fr::{DType, Device, Tensor};

/// Another communicator that says it reduces on the device, as NCCL does:
/// the trait's own `all_reduce_queued` stages each bucket through the host,
/// so the overlapped reducer's device buckets (NCCL's path but for the
/// NCCL call) run on the simulator.
struct OnDevice(std::sync::Arc<dyn Communicator>);

impl Communicator for OnDevice {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn stats(&self) -> CollectiveStats {
        self.0.stats()
    }
    fn all_reduce_f32(&self, data: &mut [f32], op: ReduceOp) -> gif_fr::Result<()> {
        self.0.all_reduce_f32(data, op)
    }
    fn all_reduce_f64(&self, data: &mut [f64], op: ReduceOp) -> gif_fr::Result<()> {
        self.0.all_reduce_f64(data, op)
    }
    fn all_gather_f32(&self, mine: &[f32], all: &mut [f32]) -> gif_fr::Result<()> {
        self.0.all_gather_f32(mine, all)
    }
    fn all_gather_u32(&self, mine: &[u32], all: &mut [u32]) -> gif_fr::Result<()> {
        self.0.all_gather_u32(mine, all)
    }
    fn all_gather_u64(&self, mine: &[u64], all: &mut [u64]) -> gif_fr::Result<()> {
        self.0.all_gather_u64(mine, all)
    }
    fn broadcast_u8(&self, data: &mut [u8], root: usize) -> gif_fr::Result<()> {
        self.0.broadcast_u8(data, root)
    }
    fn reduce_scatter_f32(&self, data: &[f32], mine: &mut [f32]) -> gif_fr::Result<()> {
        self.0.reduce_scatter_f32(data, mine)
    }
    fn queues_on_device(&self) -> bool {
        true
    }
}

#[test]
fn the_world_of_one_copies_and_counts() {
    let c = SingleProcess::new();
    assert_eq!((c.rank(), c.world(), c.backend()), (0, 1, "single"));
    let mut x = [1.5f32, -2.0];
    c.all_reduce_f32(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(x, [1.5, -2.0]);
    let mut all = [0u32; 3];
    c.all_gather_u32(&[4, 5, 6], &mut all).unwrap();
    assert_eq!(all, [4, 5, 6]);
    assert!(c.all_gather_u32(&[4, 5, 6], &mut [0u32; 2]).is_err(), "sizes that do not match are an error");
    assert!(c.broadcast_u8(&mut [1, 2], 1).is_err(), "a root outside the world is an error");
    let mut t = Tensor::from_slice(&Device::cpu(), &[3], &[1f32, 2.0, 4.0]).unwrap();
    c.all_reduce_tensors(&mut [&mut t], 0.5, 4).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), [0.5, 1.0, 2.0], "the scale applies in the world of one too");
    check_same(&c, "a value", 7).unwrap();
    let s = c.stats();
    assert_eq!(
        s,
        CollectiveStats {
            all_reduces: 2,
            all_reduce_bytes: 8 + 12,
            all_gathers: 2,
            all_gather_bytes: 12 + 8,
            ..Default::default()
        }
    );
}

#[test]
fn buckets_hold_consecutive_tensors_up_to_the_cap() {
    // 4-byte elements; a 40-byte bucket holds 10.
    assert_eq!(buckets(&[3, 4, 3, 1, 12, 2], 40), vec![0..3, 3..4, 4..5, 5..6]);
    assert_eq!(buckets(&[], 40), Vec::<std::ops::Range<usize>>::new());
    assert_eq!(buckets(&[5, 5], 0), vec![0..1, 1..2], "a cap below one element still moves every tensor");
    assert_eq!(buckets(&[usize::MAX, 1], 40), vec![0..1, 1..2]);
}

#[test]
fn the_launch_is_read_from_the_launcher_variables() {
    // Set only in child processes: this process's environment stays clean.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["launch_probe", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("GIF_FR_LAUNCH_PROBE", "1")
        .env("OMPI_COMM_WORLD_SIZE", "4")
        .env("OMPI_COMM_WORLD_RANK", "2")
        .env("OMPI_COMM_WORLD_LOCAL_RANK", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("launch Some(Launch { rank: 2, world: 4, local_rank: 1 })"), "{text}");
    #[cfg(not(feature = "mpi"))]
    assert!(text.contains("without the `mpi` feature"), "a build without MPI refuses to run as one of 4: {text}");
}

#[test]
#[ignore = "run by the_launch_is_read_from_the_launcher_variables in a child process"]
fn launch_probe() {
    if std::env::var_os("GIF_FR_LAUNCH_PROBE").is_none() {
        return;
    }
    println!("launch {:?}", distributed::launch_from_env());
    #[cfg(not(feature = "mpi"))]
    println!("{}", distributed::from_env().unwrap_err());
}

#[test]
fn fingerprints_are_fixed() {
    // FNV-1a's published values: the same in every process and build.
    assert_eq!(distributed::fingerprint(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(distributed::fingerprint(b"a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn tensors_of_another_dtype_are_refused() {
    let c = SingleProcess::new();
    let mut t = Tensor::zeros(&Device::cpu(), &[2], DType::BF16).unwrap();
    assert!(matches!(c.all_reduce_tensors(&mut [&mut t], 1.0, 64), Err(gif_fr::Error::DType { .. })));
}

#[test]
fn the_overlapped_reducer_sends_full_buckets_at_once_and_writes_the_sums_back() {
    use gif_fr::distributed::OverlappedReducer;
    use std::collections::BTreeMap;
    // 4 KiB buckets (1,024 f32): [300 + 700] goes when 50 would overflow
    // it, [50] when 2,000 would, [2,000] at once (over a bucket alone),
    // [10] at the end of the step; in the second step each goes as soon as
    // its last member is in (the first step's buckets are the plan), [10]
    // too, during the backward. On the CPU, and with the gradients on a
    // (simulated) GPU, and a real one when present (the GPU kit), staged
    // through page-locked buckets on the device's second stream.
    let sizes = [("a", 300), ("b", 700), ("c", 50), ("d", 2000), ("e", 10)];
    let total: usize = sizes.iter().map(|s| s.1).sum();
    let mut kept = None;
    let mut devices: Vec<Device> = common::cuda().into_iter().collect();
    #[cfg(feature = "sim")]
    devices.push(Device::sim());
    devices.push(Device::cpu());
    // On a device, also with a communicator that reduces there (NCCL's
    // path): device buckets, filled and emptied on the second stream.
    let runs = devices.into_iter().flat_map(|d| {
        let queued = d.runs_kernels().then(|| (d.clone(), true));
        queued.into_iter().chain([(d, false)])
    });
    for (dev, queued) in runs {
        let single: std::sync::Arc<dyn Communicator> = std::sync::Arc::new(SingleProcess::new());
        let comm = if queued { std::sync::Arc::new(OnDevice(single)) } else { single };
        let grads: Vec<(&str, Tensor)> = sizes
            .iter()
            .enumerate()
            .map(|(k, &(n, len))| {
                let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37 + k as f32).sin()).collect();
                (n, Tensor::from_slice(&dev, &[len], &v).unwrap())
            })
            .collect();
        let mut red = OverlappedReducer::new(comm.clone(), 4096).unwrap();
        dev.reset_stats();
        for (step, scale) in [0.5f32, 1.0].into_iter().enumerate() {
            for (name, g) in &grads {
                red.ready(name, g).unwrap();
                if *name == "b" {
                    assert_eq!(red.buckets_sent(), step, "{dev}, queued {queued}, step {step}: [a, b] sent");
                }
            }
            red.end_backward();
            if let Some(st) = dev.stats().filter(|_| !queued) {
                // The gradients left without a wait for the device.
                assert_eq!(st.syncs, 0, "{dev}, step {step}: {st:?}");
            }
            // The sums land in the tensors given to finish (fresh zeros
            // here), times the scale.
            let mut out: Vec<(&str, Tensor)> =
                sizes.iter().map(|&(n, len)| (n, Tensor::zeros(&dev, &[len], DType::F32).unwrap())).collect();
            let mut map: BTreeMap<&str, &mut Tensor> = out.iter_mut().map(|(n, t)| (*n, t)).collect();
            red.finish(&mut map, scale).unwrap();
            for ((name, g), (_, o)) in grads.iter().zip(&out) {
                let want: Vec<f32> = g.to_f32_vec().unwrap().iter().map(|x| x * scale).collect();
                assert_eq!(o.to_f32_vec().unwrap(), want, "{dev}, queued {queued}: {name}, step {step}");
            }
            let st = red.stats();
            assert_eq!((st.buckets, st.during_backward), (4, 3 + step), "{dev}, step {step}: {st:?}");
            if let Some(st) = dev.stats() {
                // Four buckets, page-locked or on the device, reused by the
                // second step (beside the 5 output tensors).
                let fresh = if step == 0 { 4 } else { 0 };
                let want = if queued { (0, fresh + 5) } else { (fresh, 5) };
                assert_eq!(
                    (st.pinned_allocations, st.allocations),
                    want,
                    "{dev}, queued {queued}, step {step}: {st:?}"
                );
            }
            dev.reset_stats();
        }
        assert_eq!(comm.stats().all_reduces, 8);
        assert_eq!(comm.stats().all_reduce_bytes, 2 * 4 * total as u64);
        kept = Some((dev, comm, grads, red));
    }
    let (dev, _comm, grads, mut red) = kept.unwrap();
    // Gradients of one step on two devices: an error.
    #[cfg(feature = "sim")]
    {
        red.ready("a", &grads[0].1).unwrap();
        let on_sim = Tensor::zeros(&Device::sim(), &[700], DType::F32).unwrap();
        let mixed = red.ready("b", &on_sim).unwrap_err().to_string();
        assert!(mixed.contains("another device"), "{mixed}");
        let mut a = Tensor::zeros(&dev, &[300], DType::F32).unwrap();
        red.finish(&mut BTreeMap::from([("a", &mut a)]), 1.0).unwrap();
    }
    // A gradient handed in twice, one never handed in, one handed in
    // without a tensor, another dtype: typed errors, and the next step
    // starts clean.
    red.ready("a", &grads[0].1).unwrap();
    let twice = red.ready("a", &grads[0].1).unwrap_err().to_string();
    assert!(twice.contains("handed in twice"), "{twice}");
    let mut extra = Tensor::zeros(&dev, &[700], DType::F32).unwrap();
    let mut a = Tensor::zeros(&dev, &[300], DType::F32).unwrap();
    let mut map: BTreeMap<&str, &mut Tensor> = BTreeMap::from([("a", &mut a), ("b", &mut extra)]);
    let missing = red.finish(&mut map, 1.0).unwrap_err().to_string();
    assert!(missing.contains("gradient b was not handed in"), "{missing}");
    red.ready("b", &grads[1].1).unwrap();
    let mut map: BTreeMap<&str, &mut Tensor> = BTreeMap::from([("a", &mut a)]);
    let orphan = red.finish(&mut map, 1.0).unwrap_err().to_string();
    assert!(orphan.contains("gradient b was reduced but has no tensor"), "{orphan}");
    let half = Tensor::zeros(&dev, &[4], DType::BF16).unwrap();
    assert!(matches!(red.ready("h", &half), Err(gif_fr::Error::DType { .. })));
    assert!(!red.in_progress());
}

const SETUP: gif_fr::distributed::cost::Setup = gif_fr::distributed::cost::Setup {
    world: 8,
    batch: 128,
    dim: 512,
    classes: 1 << 27,
    backbone_params: 1000,
    optimizer_states: 1,
    head: gif_fr::distributed::cost::Head::Code { length: 0, vocab: 16, projection: None },
};

#[test]
fn the_cost_model_follows_its_formulas() {
    use gif_fr::distributed::cost::{largest_classes, step_cost, with_classes, Head, Setup};
    // The code length follows N: the tokenizer's least l with v^l ≥ N.
    let length = |n: u64, v: usize| match with_classes(
        &Setup { head: Head::Code { length: 0, vocab: v, projection: None }, ..SETUP },
        n,
    )
    .head
    {
        Head::Code { length, .. } => length,
        _ => unreachable!(),
    };
    assert_eq!([length(1, 16), length(16, 16), length(17, 16), length(1 << 27, 16)], [1, 1, 2, 7]);
    assert_eq!(length(u64::MAX, 2), 64, "no overflow at the top");
    let gif = SETUP;
    let g = step_cost(&with_classes(&gif, 1 << 27));
    // 4 bytes per gradient: the backbone's and l·v·d = 7·16·512.
    assert_eq!(g.all_reduce_bytes, 4 * (1000 + 7 * 16 * 512));
    assert_eq!((g.all_gather_bytes, g.reduce_scatter_bytes), (0, 0));
    assert!((g.wire_bytes - 2.0 * 7.0 / 8.0 * g.all_reduce_bytes as f64).abs() < 1e-6);
    assert_eq!(g.head_memory, 12 * 7 * 16 * 512 + 2 * 7 * (1 << 27), "weights, gradient, momentum; the codes");
    let full = Setup { head: Head::Softmax { materialized_logits: false }, ..gif };
    let f = step_cost(&full);
    assert_eq!(f.all_gather_bytes, 8 + 128 * (4 * 512 + 4), "the batch size, features f32 and labels u32");
    assert_eq!(f.reduce_scatter_bytes, 4 * 8 * 128 * 512);
    assert_eq!(f.all_reduce_bytes, 4 * 1000 + 4 * 4 * 8 * 128, "max; Σ exp, target logit, hit");
    assert_eq!(f.head_memory, 12 * 512 * (1 << 24), "N/W centres, three copies");
    // The model-parallel heads fit W times more identities with W; the
    // code head's limit (its codes) does not move with W.
    let budget = 80_000_000_000;
    let at = |s: &Setup, w: usize| largest_classes(&Setup { world: w, ..*s }, budget);
    assert!(at(&full, 64) > 7 * at(&full, 8) && at(&full, 64) <= 8 * at(&full, 8) + 8);
    assert_eq!(at(&gif, 8), at(&gif, 64));
    // The limit is exact: one more identity does not fit.
    let n = at(&full, 8);
    let mem = |n: u64| {
        let c = step_cost(&with_classes(&full, n));
        c.head_memory + c.backbone_memory
    };
    assert!(mem(n) <= budget && mem(n + 8) > budget, "{n}");
    assert_eq!(largest_classes(&Setup { backbone_params: 1 << 40, ..full }, budget), 0, "nothing fits");
    // Sizes past u64 saturate instead of wrapping (a wrapped size could
    // "fit").
    let huge = step_cost(&Setup { backbone_params: u64::MAX / 2, batch: usize::MAX, ..full });
    assert_eq!((huge.backbone_memory, huge.reduce_scatter_bytes), (u64::MAX, u64::MAX));
    assert_eq!(largest_classes(&Setup { backbone_params: u64::MAX / 3, ..full }, u64::MAX - 1), 0);
}

/// NCCL's library where it loads, with or without a GPU: unique ids are
/// drawn (the first NCCL call, before any device), and a communicator on a
/// device that is not CUDA is refused. Without libnccl: the reason names the
/// link to make (docs/distributed.md).
#[test]
fn nccl_loads_and_draws_unique_ids_where_present() {
    use gif_fr::distributed::Nccl;
    if !Nccl::available() {
        let why = Nccl::single(&Device::cpu()).unwrap_err().to_string();
        assert!(why.contains("libnccl.so.2") && why.contains("LD_LIBRARY_PATH"), "{why}");
        return eprintln!("note: skipping the NCCL library test: {why}");
    }
    let (a, b) = (Nccl::unique_id().unwrap(), Nccl::unique_id().unwrap());
    assert!(a != b && a.iter().any(|&x| x != 0), "two draws: {a:?} {b:?}");
    let e = Nccl::new(&Device::cpu(), 0, 1, &a).unwrap_err().to_string();
    assert!(e.contains("NCCL runs on CUDA devices"), "{e}");
    println!("NCCL loads; unique ids drawn");
}

/// NCCL's world of one on the first GPU: the GPU kit's check of the NCCL
/// back end (skipped, with a notice, without a GPU or libnccl).
#[test]
fn nccl_world_of_one_on_a_gpu() {
    use gif_fr::distributed::Nccl;
    let dev = match Device::cuda(0) {
        Ok(d) if Nccl::available() => d,
        Ok(_) => return eprintln!("note: skipping the NCCL test: libnccl cannot be loaded"),
        Err(e) => return eprintln!("note: skipping the NCCL test: {e}"),
    };
    let c = std::sync::Arc::new(Nccl::single(&dev).unwrap());
    assert_eq!((c.rank(), c.world(), c.backend()), (0, 1, "nccl"));
    let mut x = [1.5f32, -2.0, 3.0];
    c.all_reduce_f32(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(x, [1.5, -2.0, 3.0]);
    let mut y = [0.25f64; 5];
    c.all_reduce_f64(&mut y, ReduceOp::Sum).unwrap();
    assert_eq!(y, [0.25; 5]);
    let mut all = [0u64; 2];
    c.all_gather_u64(&[7, 9], &mut all).unwrap();
    assert_eq!(all, [7, 9]);
    let mut bytes = *b"hello";
    c.broadcast_u8(&mut bytes, 0).unwrap();
    assert_eq!(&bytes, b"hello");
    let mut mine = [0f32; 3];
    c.reduce_scatter_f32(&[1.0, 2.0, 3.0], &mut mine).unwrap();
    assert_eq!(mine, [1.0, 2.0, 3.0]);
    // Device tensors in place, in buckets of 5 elements.
    let mut ts: Vec<Tensor> =
        [3usize, 7, 1].iter().map(|&n| Tensor::from_slice(&dev, &[n], &vec![n as f32; n]).unwrap()).collect();
    c.all_reduce_tensors(&mut ts.iter_mut().collect::<Vec<_>>(), 1.0, 20).unwrap();
    for (t, n) in ts.iter().zip([3usize, 7, 1]) {
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![n as f32; n]);
    }
    let s = c.stats();
    assert_eq!((s.all_reduces, s.all_reduce_bytes), (2 + 3, 12 + 40 + 44));
    assert_eq!((s.all_gathers, s.broadcasts, s.reduce_scatters), (1, 1, 1));
    // The overlapped reducer's device buckets (20 bytes: [3], [7], [1]),
    // their all-reduces queued on the second stream; the sums written back
    // there, read on the device's stream after the join.
    let mut red = gif_fr::distributed::OverlappedReducer::new(c.clone(), 20).unwrap();
    for (name, t) in ["a", "b", "c"].iter().zip(&ts) {
        red.ready(name, t).unwrap();
    }
    let mut out: Vec<Tensor> = [3usize, 7, 1].iter().map(|&n| Tensor::zeros(&dev, &[n], DType::F32).unwrap()).collect();
    let mut map: std::collections::BTreeMap<&str, &mut Tensor> =
        ["a", "b", "c"].into_iter().zip(out.iter_mut()).collect();
    red.finish(&mut map, 1.0).unwrap();
    for (t, n) in out.iter().zip([3usize, 7, 1]) {
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![n as f32; n]);
    }
    assert_eq!(red.stats().buckets, 3);
    let s = c.stats();
    assert_eq!((s.all_reduces, s.all_reduce_bytes), (5 + 3, 96 + 44));
    // Device tensors gathered and reduce-scattered on the device.
    let mine = Tensor::from_slice(&dev, &[2, 2], &[1f32, 2., 3., 4.]).unwrap();
    let mut all = Tensor::zeros(&dev, &[4], DType::F32).unwrap();
    c.all_gather_tensor(&mine, &mut all).unwrap();
    assert_eq!(all.to_vec::<f32>().unwrap(), [1., 2., 3., 4.]);
    let mut part = Tensor::zeros(&dev, &[2, 2], DType::F32).unwrap();
    c.reduce_scatter_tensor(&mine, &mut part).unwrap();
    assert_eq!(part.to_vec::<f32>().unwrap(), [1., 2., 3., 4.]);
    let s = c.stats();
    assert_eq!(
        (s.all_gathers, s.reduce_scatters, s.all_gather_bytes, s.reduce_scatter_bytes),
        (2, 2, 16 + 16, 12 + 16)
    );
    // The model-parallel heads over NCCL, shards on the GPU, against one
    // process on the CPU.
    println!("NCCL, one rank: {}", check_model_parallel(&*c, &dev, 389));
}

#[cfg(feature = "mpi")]
mod mpi_ranks {
    use std::process::{Command, Output};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::common::*;
    use gif_fr::backbone::{IResNet, IResNetConfig};
    use gif_fr::distributed::{self, check_same, cost, Communicator, Mpi, ReduceOp};
    use gif_fr::head::{CodeHead, CodeHeadConfig, CodeTable, Margin, SoftmaxHead, SoftmaxHeadConfig};
    use gif_fr::train::{Schedule, TrainHead, Trainer, TrainerConfig};
    use gif_fr::{DType, Device, Tensor};

    /// MPI's world (the communicator, this rank, the world's size) when this
    /// process is one of the ranks a parent test started; None otherwise
    /// (the ignored `rank_*` test has nothing to do outside mpirun).
    fn as_rank() -> Option<(Arc<dyn Communicator>, usize, usize)> {
        std::env::var_os("GIF_FR_MPI_CHILD").is_some().then(|| {
            let c: Arc<dyn Communicator> = Arc::new(Mpi::init().unwrap());
            let (r, w) = (c.rank(), c.world());
            (c, r, w)
        })
    }

    /// `mpirun -np w` of this binary running the ignored test `name`; None
    /// (after a skip notice) when mpirun is not on PATH.
    fn mpirun(w: usize, name: &str, env: &[(&str, &str)]) -> Option<(Output, Duration)> {
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", &w.to_string(), "--oversubscribe"])
            .arg(std::env::current_exe().unwrap())
            .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("GIF_FR_MPI_CHILD", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        launch(cmd)
    }

    /// Runs an `mpirun` command line with the settings every launch here
    /// needs; None (after a skip notice) when mpirun is not on PATH.
    fn launch(mut cmd: Command) -> Option<(Output, Duration)> {
        let found =
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("mpirun").is_file()));
        if !found {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
                "CI=true and mpirun is not on PATH (install Open MPI: apt install openmpi-bin libopenmpi-dev)"
            );
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "note: skipping the MPI tests: mpirun is not on PATH");
            return None;
        }
        // A rank that fails an assertion leaves the others waiting: 30 s,
        // not 10 minutes (unless the caller set its own).
        if !cmd.get_envs().any(|(k, _)| k == "GIF_FR_COLLECTIVE_TIMEOUT") {
            cmd.env("GIF_FR_COLLECTIVE_TIMEOUT", "30");
        }
        cmd.env("RAYON_NUM_THREADS", "1")
            // Open MPI refuses root without these (containers, CI), and
            // its single-copy transport needs ptrace rights containers
            // often lack.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
        let began = Instant::now();
        let out = cmd.output().unwrap();
        Some((out, began.elapsed()))
    }

    fn text(out: &Output) -> String {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Runs `name` on 2 and 3 ranks; each rank must print "rank r ok".
    fn on_ranks(name: &str) {
        for w in [2, 3] {
            let Some((out, _)) = mpirun(w, name, &[]) else { return };
            let t = text(&out);
            assert!(out.status.success(), "{w} ranks:\n{t}");
            for r in 0..w {
                assert!(t.contains(&format!("rank {r} of {w} ok")), "rank {r} of {w} did not finish:\n{t}");
            }
        }
    }

    #[test]
    fn collectives_on_ranks() {
        on_ranks("mpi_ranks::rank_collectives");
    }

    #[test]
    #[ignore = "one rank of collectives_on_ranks"]
    fn rank_collectives() {
        let Some((c, r, w)) = as_rank() else { return };
        let rf = r as f32;
        // Sums and maxima of values that differ per rank.
        let mut x: Vec<f32> = (0..5).map(|i| rf * 10.0 + i as f32).collect();
        c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap();
        let ranks_sum: f32 = (0..w).map(|q| q as f32 * 10.0).sum();
        assert_eq!(x, (0..5).map(|i| ranks_sum + (w * i) as f32).collect::<Vec<_>>());
        let mut m = [-(r as f64), r as f64 * 0.5];
        c.all_reduce_f64(&mut m, ReduceOp::Max).unwrap();
        assert_eq!(m, [0.0, (w - 1) as f64 * 0.5]);
        let mut labels = vec![0u32; 2 * w];
        c.all_gather_u32(&[r as u32, 100 + r as u32], &mut labels).unwrap();
        assert_eq!(labels, (0..w as u32).flat_map(|q| [q, 100 + q]).collect::<Vec<_>>());
        let mut feats = vec![0f32; 3 * w];
        c.all_gather_f32(&[rf, -rf, 0.25], &mut feats).unwrap();
        assert_eq!(feats[3 * (w - 1)..], [(w - 1) as f32, -((w - 1) as f32), 0.25]);
        let mut bytes = if r == w - 1 { b"from the last".to_vec() } else { vec![0u8; 13] };
        c.broadcast_u8(&mut bytes, w - 1).unwrap();
        assert_eq!(bytes, b"from the last");
        // Reduce-scatter: block q of the sum lands on rank q.
        let data: Vec<f32> = (0..2 * w).map(|i| (i + r) as f32).collect();
        let mut mine = [0f32; 2];
        c.reduce_scatter_f32(&data, &mut mine).unwrap();
        let sum_at = |i: usize| (0..w).map(|q| (i + q) as f32).sum::<f32>();
        assert_eq!(mine, [sum_at(2 * r), sum_at(2 * r + 1)]);
        // Tensors in buckets of 5 elements: sizes 3, 4, 7, 1 cross them.
        let dev = Device::cpu();
        let sizes = [3usize, 4, 7, 1];
        let mut ts: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let v: Vec<f32> = (0..n).map(|i| (r * 100 + k * 10 + i) as f32).collect();
                Tensor::from_slice(&dev, &[n], &v).unwrap()
            })
            .collect();
        let before = c.stats();
        c.all_reduce_tensors(&mut ts.iter_mut().collect::<Vec<_>>(), 0.5, 20).unwrap();
        for (k, t) in ts.iter().enumerate() {
            let want: Vec<f32> =
                (0..sizes[k]).map(|i| 0.5 * (0..w).map(|q| (q * 100 + k * 10 + i) as f32).sum::<f32>()).collect();
            assert_eq!(t.to_vec::<f32>().unwrap(), want, "tensor {k}");
        }
        let after = c.stats();
        assert_eq!(after.all_reduces - before.all_reduces, 4, "buckets [3] [4] [7] [1] of a 5-element cap");
        assert_eq!(after.all_reduce_bytes - before.all_reduce_bytes, 4 * 15);
        // Counted bytes: what this rank contributed to each kind.
        let s = c.stats();
        assert_eq!((s.all_reduces, s.all_reduce_bytes), (2 + 4, 4 * 5 + 8 * 2 + 4 * 15));
        assert_eq!((s.all_gathers, s.all_gather_bytes), (2, 4 * 2 + 4 * 3));
        assert_eq!((s.broadcasts, s.broadcast_bytes), (1, 13));
        assert_eq!((s.reduce_scatters, s.reduce_scatter_bytes), (1, 4 * 2 * w as u64));
        // Tensors gathered and reduce-scattered (the model-parallel heads'
        // device path; a host communicator stages them), on the CPU and the
        // simulator; a 16-bit block is gathered as f32.
        let mut devices = vec![Device::cpu()];
        #[cfg(feature = "sim")]
        devices.push(Device::sim());
        for dev in devices {
            let before = c.stats();
            let block: Vec<f32> = (0..6).map(|i| (r * 10 + i) as f32).collect();
            let block: Vec<half::bf16> = block.into_iter().map(half::bf16::from_f32).collect();
            let mine = Tensor::from_slice(&dev, &[2, 3], &block).unwrap();
            let mut all = Tensor::empty(&dev, &[w * 2, 3], DType::F32).unwrap();
            c.all_gather_tensor(&mine, &mut all).unwrap();
            let want: Vec<f32> = (0..w).flat_map(|q| (0..6).map(move |i| (q * 10 + i) as f32)).collect();
            assert_eq!(all.to_vec::<f32>().unwrap(), want, "{dev}");
            let data: Vec<f32> = (0..3 * w).map(|i| (i + r) as f32).collect();
            let data = Tensor::from_slice(&dev, &[w, 3], &data).unwrap();
            let mut part = Tensor::empty(&dev, &[3], DType::F32).unwrap();
            c.reduce_scatter_tensor(&data, &mut part).unwrap();
            assert_eq!(part.to_vec::<f32>().unwrap(), (0..3).map(|i| sum_at(3 * r + i)).collect::<Vec<_>>(), "{dev}");
            let after = c.stats();
            assert_eq!(after.all_gather_bytes - before.all_gather_bytes, 4 * 6, "{dev}");
            assert_eq!(after.reduce_scatter_bytes - before.reduce_scatter_bytes, 4 * 3 * w as u64, "{dev}");
            // Sizes that do not match W blocks, a 16-bit output: typed
            // errors on every rank alike, before any message.
            let mut short = Tensor::empty(&dev, &[w * 6 - 1], DType::F32).unwrap();
            let e = c.all_gather_tensor(&mine, &mut short).unwrap_err().to_string();
            assert!(e.contains("blocks of 6"), "{e}");
            let mut half = Tensor::empty(&dev, &[3], DType::BF16).unwrap();
            assert!(matches!(c.reduce_scatter_tensor(&data, &mut half), Err(gif_fr::Error::DType { .. })));
            assert_eq!(c.stats(), after, "{dev}: the refused calls sent nothing");
        }
        // Partial FC's one-process form on several ranks: refused (no
        // collective), naming the model-parallel form.
        if w > 1 {
            use gif_fr::head::PartialFc;
            let sm = SoftmaxHead::new(SoftmaxHeadConfig::new(net().embedding, 10), &dev, DType::F32, 1).unwrap();
            let head = TrainHead::PartialFc(PartialFc::new(sm, 0.5, 7).unwrap());
            let cfg = TrainerConfig::insightface(Schedule::Constant { base: 0.1 });
            let mut t = Trainer::new(IResNet::new(net(), &dev, 1).unwrap(), head, cfg).unwrap();
            let e = t.set_communicator(c.clone()).unwrap_err().to_string();
            assert!(e.contains("TrainHead::ModelParallel"), "{e}");
        }
        // Agreement checks: the same value passes; a value that differs on
        // the last rank fails on every rank, naming it.
        check_same(c.as_ref(), "a setting", 42).unwrap();
        let e = check_same(c.as_ref(), "a setting", if r == w - 1 { 7 } else { 42 }).unwrap_err().to_string();
        assert!(e.contains(&format!("rank(s) [{}]", w - 1)) && e.contains(&format!("rank {r} of {w}")), "{e}");
        println!("rank {r} of {w} ok");
    }

    fn net() -> IResNetConfig {
        IResNetConfig { embedding: 16, ..tiny_iresnet() }
    }

    /// A trainer whose weights come from `seed` (ranks start different:
    /// set_communicator must make them rank 0's).
    fn trainer(kind: &str, seed: u64, acc: usize, lr: f64) -> Trainer {
        trainer_on(&Device::cpu(), kind, seed, acc, lr)
    }

    /// [`trainer`] on `dev`.
    fn trainer_on(dev: &Device, kind: &str, seed: u64, acc: usize, lr: f64) -> Trainer {
        let dev = dev.clone();
        let d = net().embedding;
        let n = 10;
        let backbone = IResNet::new(net(), &dev, seed).unwrap();
        let head = match kind {
            "gif" => {
                let cfg = CodeHeadConfig { margin: Margin::CosFace(0.1), scale: 16.0, ..CodeHeadConfig::new(d, 3, 4) };
                let codes: Vec<u16> = (0..n as u16).flat_map(|c| [c % 4, (c / 4) % 4, (c * 7) % 4]).collect();
                let vectors = unit_rows(&mut rng(23), n, d);
                let table = CodeTable::new(&dev, codes, 3, 4, Some((&vectors, d, DType::F32))).unwrap();
                TrainHead::Code { head: CodeHead::new(cfg, &dev, seed + 1).unwrap(), table }
            }
            _ => {
                let sm =
                    SoftmaxHeadConfig { margin: Margin::CosFace(0.1), scale: 16.0, ..SoftmaxHeadConfig::new(d, n) };
                TrainHead::Softmax(SoftmaxHead::new(sm, &dev, DType::F32, seed + 1).unwrap())
            }
        };
        let cfg = TrainerConfig { gradient_acc: acc, ..TrainerConfig::insightface(Schedule::Constant { base: lr }) };
        Trainer::new(backbone, head, cfg).unwrap()
    }

    /// Micro-batch `k` of step `step`: 3 images and labels, the same in
    /// every process.
    fn batch(step: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        let s = net().input;
        let mut r = rng(1000 + 17 * step as u64 + k as u64);
        let images = uniform(&mut r, 3 * s * s * 3, -1.0, 1.0);
        let labels = (0..3).map(|i| ((step * 7 + k * 3 + i) % 10) as u32).collect();
        (images, labels)
    }

    fn params(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        let mut v: Vec<(String, Vec<f32>)> =
            t.backbone().state().into_iter().map(|(n, t)| (n, t.to_f32_vec().unwrap())).collect();
        v.extend(t.head().params().into_iter().map(|(n, t)| (n.to_string(), t.to_f32_vec().unwrap())));
        v
    }

    /// The bytes of the trained parameters (not the running statistics,
    /// which are per rank).
    fn trained_bits(params: &[(String, Vec<f32>)]) -> Vec<u8> {
        params
            .iter()
            .filter(|(n, _)| !n.contains("running_"))
            .flat_map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()))
            .collect()
    }

    #[test]
    fn data_parallel_steps_on_ranks() {
        on_ranks("mpi_ranks::rank_data_parallel_steps");
    }

    #[test]
    #[ignore = "one rank of data_parallel_steps_on_ranks"]
    fn rank_data_parallel_steps() {
        let Some((comm, r, w)) = as_rank() else { return };
        // The gradients' all-reduce overlapping the backward in 4 KiB
        // buckets (several per step), or after the backward; `acc`
        // micro-batches a rank and step (the overlap on the last).
        let mut runs: Vec<(&str, usize, u64)> = Vec::new();
        let configs = [("gif", true, 1), ("arcface", true, 1), ("gif", false, 1), ("gif", false, 2), ("gif", true, 2)];
        for (kind, overlap, acc) in configs {
            // Each rank starts from its own seed; rank 0's weights win.
            let mut dp = trainer(kind, 5 + r as u64, acc, 0.05);
            dp.set_communicator(comm.clone()).unwrap();
            dp.set_overlap(overlap, 4096).unwrap();
            let reference = (r == 0).then(|| trainer(kind, 5, w * acc, 0.05));
            let mut reference = reference;
            let before = comm.stats();
            for step in 0..2 {
                for j in 0..acc {
                    let (images, labels) = batch(step, r * acc + j);
                    let stepped = dp.step(&images, &labels).unwrap();
                    assert_eq!(stepped, j + 1 == acc, "a step ends with the rank's last micro-batch");
                }
                if let Some(t) = reference.as_mut() {
                    // One process, the W ranks' micro-batches accumulated.
                    for k in 0..w * acc {
                        let (images, labels) = batch(step, k);
                        t.step(&images, &labels).unwrap();
                    }
                }
            }
            match dp.overlap_stats() {
                Some(o) => {
                    assert!(overlap, "{kind}: overlapped while told not to");
                    // The second step's: every bucket left during the
                    // backward, the last one too (the first step's buckets
                    // are the plan).
                    assert!(o.buckets > 2 && o.during_backward == o.buckets, "{kind}: {o:?}");
                    assert!(o.exposed >= 0.0 && o.communication > 0.0, "{kind}: {o:?}");
                    println!("{kind}: {} buckets, {} sent during the backward", o.buckets, o.during_backward);
                }
                None => assert!(!overlap, "{kind}: no overlap on CPU ranks"),
            }
            // Each step all-reduced every trainable parameter's gradient
            // once, f32 (docs/distributed.md's 4 · P bytes a step).
            let trainable: usize = dp.backbone_mut().params_mut().iter().map(|(_, t)| t.numel()).sum::<usize>()
                + dp.head().params().iter().map(|(_, t)| t.numel()).sum::<usize>();
            let moved = comm.stats().all_reduce_bytes - before.all_reduce_bytes;
            assert_eq!(moved, 2 * 4 * trainable as u64, "{kind}: bytes all-reduced in two steps");
            if kind == "gif" {
                // docs/distributed.md's model of it.
                let backbone_params = dp.backbone_mut().params_mut().iter().map(|(_, t)| t.numel() as u64).sum();
                let model = cost::step_cost(&cost::Setup {
                    world: w,
                    batch: 3,
                    dim: net().embedding,
                    classes: 10,
                    backbone_params,
                    optimizer_states: 1,
                    head: cost::Head::Code { length: 3, vocab: 4, projection: None },
                });
                assert_eq!(moved, 2 * model.all_reduce_bytes, "the cost model's all-reduced bytes");
                let c = comm.stats();
                assert_eq!(
                    (c.all_gather_bytes - before.all_gather_bytes, c.reduce_scatter_bytes),
                    (0, 0),
                    "the steps gathered and scattered nothing"
                );
            }
            // Every rank holds the same parameters, bit for bit …
            let mine = params(&dp);
            let bits = trained_bits(&mine);
            check_same(comm.as_ref(), "the parameters after two steps", distributed::fingerprint(&bits)).unwrap();
            // … and, on two ranks (where every reduction order gives a + b),
            // the same with the all-reduce overlapped or not.
            let fp = distributed::fingerprint(&bits);
            match runs.iter().find(|(k, a, _)| *k == kind && *a == acc) {
                Some(&(_, _, other)) if w == 2 => {
                    assert_eq!(fp, other, "{kind}, acc {acc}: overlap changed the result")
                }
                Some(_) => {}
                None => runs.push((kind, acc, fp)),
            }
            // … equal to the single process's up to summation order (the
            // ranks' gradients are summed by MPI, the accumulation adds
            // them one by one). Running statistics are per rank (each saw
            // its own batches), so they are not compared.
            if let Some(t) = &reference {
                let (mut worst, mut moved) = (0f32, 0f32);
                let start = params(&trainer(kind, 5, 1, 0.05));
                for (((name, a), (_, b)), (_, s)) in mine.iter().zip(params(t)).zip(&start) {
                    if name.contains("running_") || name.contains("num_batches") {
                        continue;
                    }
                    let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                    for ((x, y), z) in a.iter().zip(&b).zip(s) {
                        worst = worst.max((x - y).abs() / scale);
                        moved = moved.max((y - z).abs() / scale);
                    }
                }
                assert!(moved > 1e-3, "{kind}: the steps moved the weights ({moved})");
                // One micro-batch a rank: MPI's sum of W gradients against
                // W adds one by one, measured bit-equal. Two: the ranks add
                // pairs, then MPI sums the pairs; measured 3.9e-5 on 3 ranks
                // (BatchNorm biases a few 1e-3 large).
                let bound = if acc == 1 { 2e-5 } else { 1e-4 };
                assert!(worst < bound, "{kind}: {w} ranks vs one process accumulating: max |Δ| / max |w| = {worst}");
                println!(
                    "{kind}: {w} ranks vs one process: max |Δ| / max |w| = {worst:.1e} (the steps moved {moved:.2})"
                );
            }
        }
        // GPU ranks (the simulator standing for each rank's GPU) on the
        // host communicator: the gradients staged through page-locked
        // buckets beside the backward, or all-reduced after it. (On 2 ranks
        // only: the simulated steps are the test's longest part.)
        #[cfg(feature = "sim")]
        if w == 2 {
            sim_data_parallel_steps(&comm, r, w);
        }
        println!("rank {r} of {w} ok");
    }

    /// The data-parallel steps on simulated-GPU ranks (see
    /// `rank_data_parallel_steps`).
    #[cfg(feature = "sim")]
    fn sim_data_parallel_steps(comm: &Arc<dyn Communicator>, r: usize, w: usize) {
        let mut fps = Vec::new();
        let reference = (r == 0).then(|| {
            let mut t = trainer_on(&Device::sim(), "gif", 5, w, 0.05);
            for step in 0..2 {
                for k in 0..w {
                    let (images, labels) = batch(step, k);
                    t.step(&images, &labels).unwrap();
                }
            }
            params(&t)
        });
        // The overlap through page-locked buckets (MPI's), none, and
        // through device buckets (NCCL's path, staged here).
        for (overlap, on_device) in [(true, false), (false, false), (true, true)] {
            let dev = Device::sim();
            let mut dp = trainer_on(&dev, "gif", 5 + r as u64, 1, 0.05);
            let comm: Arc<dyn Communicator> =
                if on_device { Arc::new(super::OnDevice(comm.clone())) } else { comm.clone() };
            dp.set_communicator(comm.clone()).unwrap();
            dp.set_overlap(overlap, 4096).unwrap();
            let mut syncs = Vec::new();
            for step in 0..2 {
                let (images, labels) = batch(step, r);
                dev.reset_stats();
                assert!(dp.step(&images, &labels).unwrap());
                syncs.push(dev.stats().unwrap().syncs);
            }
            match dp.overlap_stats() {
                Some(o) if on_device => {
                    assert!(overlap && o.buckets > 2 && o.during_backward == o.buckets, "sim: {o:?}");
                    println!(
                        "sim, device buckets: {} buckets, {} sent during the backward",
                        o.buckets, o.during_backward
                    );
                }
                Some(o) => {
                    assert!(overlap && o.buckets > 2 && o.during_backward == o.buckets, "sim: {o:?}");
                    // The images' upload is the step's only wait: the
                    // gradients went to the host without one.
                    assert_eq!(syncs[1], 1, "sim, overlapped: host waits a step {syncs:?}");
                    println!(
                        "sim: {} buckets, {} sent during the backward; waits {syncs:?}",
                        o.buckets, o.during_backward
                    );
                }
                None => {
                    assert!(!overlap, "sim: not overlapped");
                    assert!(syncs[1] > 1, "sim, after the backward: the downloads wait ({syncs:?})");
                }
            }
            let mine = params(&dp);
            let bits = trained_bits(&mine);
            check_same(comm.as_ref(), "the simulated-GPU ranks' parameters", distributed::fingerprint(&bits)).unwrap();
            fps.push(distributed::fingerprint(&bits));
            if let Some(want) = &reference {
                // One simulated-GPU process accumulating the W micro-batches:
                // equal up to summation order.
                let mut worst = 0f32;
                for ((name, a), (_, b)) in mine.iter().zip(want) {
                    if name.contains("running_") || name.contains("num_batches") {
                        continue;
                    }
                    let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                    worst = a.iter().zip(b).fold(worst, |m, (x, y)| m.max((x - y).abs() / scale));
                }
                let how = format!("overlap {overlap}, device buckets {on_device}");
                assert!(worst < 1e-4, "sim, {how}: {w} ranks vs one process: {worst:e}");
                println!("sim, {how}: {w} ranks vs one process: max |Δ| / max |w| = {worst:.1e}");
            }
        }
        // (Two ranks: every reduction order gives a + b.)
        assert_eq!(fps[0], fps[1], "sim: the overlap changed the result");
        assert_eq!(fps[0], fps[2], "sim: the device buckets changed the result");
    }

    #[test]
    fn model_parallel_training_on_ranks() {
        on_ranks("mpi_ranks::rank_model_parallel_steps");
    }

    #[test]
    #[ignore = "one rank of model_parallel_training_on_ranks"]
    fn rank_model_parallel_steps() {
        use gif_fr::distributed::{shard_range, ModelParallelHead};
        let Some((comm, r, w)) = as_rank() else { return };
        let (dev, d, n) = (Device::cpu(), net().embedding, 10);
        let shard = shard_range(n, r, w).unwrap();
        let sharded_on = |dev: &Device, all: &[f32], cfg: &SoftmaxHeadConfig, rate: Option<f32>| {
            let centres = Tensor::from_slice(dev, &[shard.len(), d], &all[shard.start * d..shard.end * d]).unwrap();
            let head = ModelParallelHead::from_shard(cfg.clone(), centres, comm.as_ref(), rate, 3).unwrap();
            // Each rank's own backbone seed: rank 0's is broadcast.
            let backbone = IResNet::new(net(), dev, 5 + r as u64).unwrap();
            let tc = TrainerConfig::insightface(Schedule::Constant { base: 0.05 });
            let mut t = Trainer::new(backbone, TrainHead::ModelParallel(head), tc).unwrap();
            t.set_communicator(comm.clone()).unwrap();
            t
        };
        // Two steps on this rank's shard against one process accumulating
        // the W ranks' micro-batches on the same device: on CPU ranks, and
        // on GPU ranks (the simulated GPU stands for one on each rank).
        // Returns the trainer and the reference's centres and settings.
        let against_one_process = |dev: &Device| {
            let mut reference = trainer_on(dev, "arcface", 5, w, 0.05);
            let TrainHead::Softmax(full) = reference.head() else { unreachable!() };
            let (cfg, all) = (full.config().clone(), full.centres().to_vec::<f32>().unwrap());
            let mut mp = sharded_on(dev, &all, &cfg, None);
            let mut losses = Vec::new();
            for step in 0..2 {
                let (images, labels) = batch(step, r);
                assert!(mp.step(&images, &labels).unwrap());
                for k in 0..w {
                    let (images, labels) = batch(step, k);
                    reference.step(&images, &labels).unwrap();
                    losses.push(reference.metrics().unwrap().loss);
                }
            }
            // The loss is the mean over every rank's rows: the reference's W
            // micro-batches of the last step.
            let want = losses[w..].iter().sum::<f64>() / w as f64;
            let got = mp.metrics().unwrap().loss;
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{dev}: loss {got} vs {want}");
            // The backbone equals the reference's on every rank, the shard the
            // reference's rows (running statistics are per rank: not compared).
            let (mine, theirs) = (params(&mp), params(&reference));
            let (mut worst, mut moved) = (0f32, 0f32);
            let start = params(&trainer_on(dev, "arcface", 5, 1, 0.05));
            for (((name, a), (_, b)), (_, s0)) in mine.iter().zip(&theirs).zip(&start) {
                if name.contains("running_") || name.contains("num_batches") {
                    continue;
                }
                let (b, s0) = match name.as_str() {
                    "weight" => (&b[shard.start * d..shard.end * d], &s0[shard.start * d..shard.end * d]),
                    _ => (&b[..], &s0[..]),
                };
                let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                for ((x, y), z) in a.iter().zip(b).zip(s0) {
                    worst = worst.max((x - y).abs() / scale);
                    moved = moved.max((y - z).abs() / scale);
                }
            }
            assert!(moved > 1e-3, "{dev}: the steps moved the weights ({moved})");
            // The bound: the heads' f32 partial sums differ in order (1e-6 of
            // the gradients at most, tests above), which the backbone's backward
            // and two steps carry into BatchNorm biases that moved from 0 to a
            // few 1e-3 (measured on the CPU: 1e-7 absolute, 4e-5 of such a
            // tensor; on the simulated GPU, whose backbone kernels also sum
            // in tile order, 3e-7 absolute, 1.1e-4 of the tensor).
            let bound = if dev.kind() == gif_fr::DeviceKind::Cpu { 1e-4 } else { 3e-4 };
            assert!(worst < bound, "{dev}: model-parallel on {w} ranks vs one process: max |Δ| / max |w| = {worst}");
            println!("{dev}: model-parallel on {w} ranks vs one process: max |Δ| / max |w| = {worst:.1e}");
            (mp, all, cfg)
        };
        let (_, all, cfg) = against_one_process(&dev);
        let sharded = |rate: Option<f32>| sharded_on(&dev, &all, &cfg, rate);
        // Partial FC trains too (on GPU ranks its sample drawn on the
        // device), the backbones equal on every rank.
        let partial_fc_on = |dev: &Device| {
            let mut pfc = sharded_on(dev, &all, &cfg, Some(0.5));
            for step in 0..2 {
                let (images, labels) = batch(step, r);
                assert!(pfc.step(&images, &labels).unwrap());
            }
            assert!(pfc.metrics().unwrap().loss.is_finite(), "{dev}");
            let bits: Vec<u8> = params(&pfc)
                .iter()
                .filter(|(n, _)| !n.contains("running_") && n != "weight")
                .flat_map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()))
                .collect();
            let what = format!("Partial FC's backbone on {dev}");
            check_same(comm.as_ref(), &what, distributed::fingerprint(&bits)).unwrap();
            pfc
        };
        // (On 2 ranks only: the simulated steps are the test's longest part,
        // and the heads' own test covers 3 simulated-GPU ranks.)
        #[cfg(feature = "sim")]
        if w == 2 {
            let _ = against_one_process(&Device::sim());
            let _ = partial_fc_on(&Device::sim());
        }
        let pfc = partial_fc_on(&dev);
        // Each rank checkpoints its shard; a fresh trainer resumes it.
        // One directory for every rank: rank 0's, its path broadcast.
        let dir = tempfile::tempdir().unwrap();
        let mut path = [0u8; 512];
        let mine = dir.path().to_str().unwrap().as_bytes();
        path[..mine.len()].copy_from_slice(mine);
        comm.broadcast_u8(&mut path, 0).unwrap();
        let shared = std::path::PathBuf::from(std::str::from_utf8(&path).unwrap().trim_end_matches('\0'));
        pfc.save(&shared).unwrap();
        check_same(comm.as_ref(), "saved", 1).unwrap(); // every rank's file is written
        assert!(shared.join(format!("checkpoint.rank{r}-of-{w}.safetensors")).is_file());
        assert!(shared.join("model.safetensors").is_file() && !shared.join("checkpoint.safetensors").exists());
        let mut again = sharded(Some(0.5));
        again.resume(&shared).unwrap();
        assert_eq!(params(&again), params(&pfc));
        // Another rank's shard under this rank's name is refused.
        let swapped = tempfile::tempdir().unwrap();
        let next = shared.join(format!("checkpoint.rank{}-of-{w}.safetensors", (r + 1) % w));
        std::fs::copy(next, pfc.checkpoint_path(swapped.path())).unwrap();
        let e = sharded(Some(0.5)).resume(swapped.path()).unwrap_err().to_string();
        assert!(e.contains("a checkpoint of shard"), "{e}");
        // Rank 0's directory outlives the others' reads.
        check_same(comm.as_ref(), "read", 1).unwrap();
        println!("rank {r} of {w} ok");
    }

    #[test]
    fn model_parallel_heads_on_ranks() {
        on_ranks("mpi_ranks::rank_model_parallel");
    }

    #[test]
    #[ignore = "one rank of model_parallel_heads_on_ranks"]
    fn rank_model_parallel() {
        use gif_fr::distributed::ModelParallelHead;
        let Some((c, r, w)) = as_rank() else { return };
        let summary = super::check_model_parallel(c.as_ref(), &Device::cpu(), 23);
        println!("rank {r} of {w}: {summary}");
        // GPU ranks: the simulated GPU stands for one on each rank.
        #[cfg(feature = "sim")]
        for n in [23, 389] {
            let summary = super::check_model_parallel(c.as_ref(), &Device::sim(), n);
            println!("rank {r} of {w}, simulated GPU, N = {n}: {summary}");
        }
        // Ranks with different batch sizes: an error on every rank.
        let head = ModelParallelHead::new(SoftmaxHeadConfig::new(4, 7), &Device::cpu(), c.as_ref(), None, 1).unwrap();
        let b = if r == 0 { 3 } else { 2 };
        let x = Tensor::from_slice(&Device::cpu(), &[b, 4], &vec![0.5f32; 4 * b]).unwrap();
        let e = head.forward_backward(c.as_ref(), &x, &vec![1; b], 0).unwrap_err().to_string();
        assert!(e.contains("equal batches"), "{e}");
        // Shards that own none of the batch's labels (all of them rank 0's):
        // Partial FC samples them with no positives, on the GPU as by the
        // host rule.
        #[cfg(feature = "sim")]
        {
            let sim = Device::sim();
            let head = ModelParallelHead::new(SoftmaxHeadConfig::new(4, 7), &sim, c.as_ref(), Some(0.5), 2).unwrap();
            let x = Tensor::from_slice(&sim, &[2, 4], &[0.5f32, -0.25, 1.0, 0.125, -1.0, 0.5, 0.25, 0.75]).unwrap();
            let labels = [0u32, 1];
            let step = head.forward_backward(c.as_ref(), &x, &labels, 5).unwrap();
            let gathered: Vec<u32> = (0..w).flat_map(|_| labels).collect();
            assert_eq!(step.sampled, head.sample(&gathered, 5).unwrap(), "rank {r}");
            assert!(step.loss.loss.is_finite(), "rank {r}");
        }
        println!("rank {r} of {w} ok");
    }

    #[test]
    fn gif_fr_train_runs_data_parallel_under_mpirun() {
        let dir = tempfile::tempdir().unwrap();
        let (data, out) = (dir.path().join("data"), dir.path().join("run"));
        let synth = Command::new(gif_fr_bin())
            .args(["synth", "--identities", "12", "--size", "16", "--min-images", "4", "--max-images", "6", "--out"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(synth.status.success(), "{}", text(&synth));
        let images = gif_fr::data::Dataset::records(&data, 16).unwrap().len();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "network = \"r18\"\nembedding_size = 16\ninput_size = 16\nstem_width = 4\nwidths = [4, 8, 8, 12]\n\
                 layers = [1, 1, 1, 1]\nmargin_list = [1.0, 0.0, 0.1]\nscale = 16.0\nbatch_size = 4\nlr = 0.05\n\
                 num_epoch = 2\nwarmup_epoch = 0\nfrequent = 1\nvocab = 4\nrec = \"{}\"\noutput = \"{}\"\n\
                 device = \"cpu\"\nhead = \"gif\"\nnum_workers = 1\n",
                data.display(),
                out.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", "2", "--oversubscribe"]).arg(gif_fr_bin()).args(["train", "--quiet", "--config"]).arg(&config);
        let Some((o, _)) = launch(cmd) else { return };
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        // Rank 0 alone speaks and writes.
        assert_eq!(t.matches("trained ").count(), 1, "one summary line:\n{t}");
        let log = std::fs::read_to_string(out.join("training.log")).unwrap();
        assert_eq!(log.matches("data-parallel on 2 ranks (mpi): 4 images per rank, 8 per step").count(), 1, "{log}");
        // ⌈images / 2⌉ / 4 steps an epoch on each rank, two epochs.
        let steps = images.div_ceil(2) / 4 * 2;
        let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + steps, "one metrics row a step, written once:\n{csv}");
        assert!(log.contains(&format!("Global Step: {steps}")), "{log}");
        for f in ["checkpoint.safetensors", "model.safetensors", "codebook.safetensors"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        // Partial FC model-parallel: each rank trains and checkpoints its
        // shard; a run stopped after one step resumes from the shards.
        let pfc = dir.path().join("pfc.toml");
        let text_of = |c: &str| c.replace("head = \"gif\"", "head = \"partial_fc\"\nsample_rate = 0.5");
        let pfc_out = dir.path().join("pfc");
        let cfg_text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(&out.display().to_string(), &pfc_out.display().to_string());
        std::fs::write(&pfc, text_of(&cfg_text)).unwrap();
        for extra in [&["--stop-after", "1"][..], &["--resume"][..]] {
            let mut cmd = Command::new("mpirun");
            cmd.args(["-np", "2", "--oversubscribe"])
                .arg(gif_fr_bin())
                .args(["train", "--quiet", "--config"])
                .arg(&pfc);
            cmd.args(extra);
            let Some((o, _)) = launch(cmd) else { return };
            assert!(o.status.success(), "{extra:?}: {}", text(&o));
        }
        let log = std::fs::read_to_string(pfc_out.join("training.log")).unwrap();
        assert!(
            log.contains(
                "the partial_fc head model-parallel: each rank holds its shard of the 12 centres (6 on rank 0)"
            ),
            "{log}"
        );
        assert!(log.contains("resumed from") && log.contains(&format!("Global Step: {steps}")), "{log}");
        for f in ["checkpoint.rank0-of-2.safetensors", "checkpoint.rank1-of-2.safetensors", "model.safetensors"] {
            assert!(pfc_out.join(f).is_file(), "{f} missing");
        }
        assert!(!pfc_out.join("checkpoint.safetensors").exists());
        // The same on GPU ranks (the simulated GPU stands for one): the
        // shards on the device.
        #[cfg(feature = "sim")]
        {
            let sim_out = dir.path().join("pfc-sim");
            let sim = dir.path().join("pfc-sim.toml");
            let sim_text = text_of(&cfg_text)
                .replace(&pfc_out.display().to_string(), &sim_out.display().to_string())
                .replace("device = \"cpu\"", "device = \"sim\"");
            std::fs::write(&sim, sim_text).unwrap();
            let mut cmd = Command::new("mpirun");
            cmd.args(["-np", "2", "--oversubscribe"])
                .arg(gif_fr_bin())
                .args(["train", "--quiet", "--config"])
                .arg(&sim);
            let Some((o, _)) = launch(cmd) else { return };
            assert!(o.status.success(), "{}", text(&o));
            let log = std::fs::read_to_string(sim_out.join("training.log")).unwrap();
            assert!(log.contains("training r18 on sim") && log.contains("head model-parallel"), "{log}");
            assert!(log.contains(&format!("Global Step: {steps}")), "{log}");
            assert!(sim_out.join("checkpoint.rank1-of-2.safetensors").is_file());
        }
    }

    #[test]
    fn mismatched_ranks_fail_on_every_rank() {
        on_ranks("mpi_ranks::rank_mismatch");
    }

    #[test]
    #[ignore = "one rank of mismatched_ranks_fail_on_every_rank"]
    fn rank_mismatch() {
        let Some((comm, r, w)) = as_rank() else { return };
        // The last rank was given another learning rate.
        let mut t = trainer("gif", 5, 1, if r == w - 1 { 0.1 } else { 0.05 });
        let e = t.set_communicator(comm.clone()).unwrap_err();
        assert!(matches!(e, gif_fr::Error::Collective { .. }), "{e}");
        assert!(e.to_string().contains(&format!("rank(s) [{}]", w - 1)), "{e}");
        // The all-reduce's overlap or bucket size chosen differently on the
        // last rank (their buckets would not match), before or after
        // joining: refused on every rank, naming it.
        let mut t = trainer("gif", 5, 1, 0.05);
        t.set_overlap(r != w - 1, 4096).unwrap();
        let e = t.set_communicator(comm.clone()).unwrap_err().to_string();
        assert!(e.contains(&format!("rank(s) [{}]", w - 1)), "{e}");
        let mut t = trainer("gif", 5, 1, 0.05);
        t.set_communicator(comm.clone()).unwrap();
        let e = t.set_overlap(true, if r == w - 1 { 8192 } else { 4096 }).unwrap_err().to_string();
        assert!(e.contains("overlap and bucket size") && e.contains(&format!("rank(s) [{}]", w - 1)), "{e}");
        t.set_overlap(true, 4096).unwrap();
        // The collectives still work: nothing was left half done.
        let mut x = [1f32];
        comm.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [w as f32]);
        println!("rank {r} of {w} ok");
    }

    #[test]
    fn a_rank_that_hangs_or_dies_ends_the_job() {
        // A rank that never joins: the others time out (2 s), print the
        // error and abort the job; mpirun returns long before the hung
        // rank's 60 s sleep would end.
        let Some((out, took)) = mpirun(3, "mpi_ranks::rank_hangs", &[("GIF_FR_COLLECTIVE_TIMEOUT", "2")]) else {
            return;
        };
        let t = text(&out);
        assert!(!out.status.success(), "the job must fail:\n{t}");
        assert!(took < Duration::from_secs(40), "mpirun took {took:?}:\n{t}");
        for r in [0, 1] {
            assert!(t.contains(&format!("all_reduce on rank {r} of 3: timed out")), "rank {r} saw no timeout:\n{t}");
        }
        // A rank that exits in the middle of the run.
        let Some((out, took)) = mpirun(2, "mpi_ranks::rank_dies", &[("GIF_FR_COLLECTIVE_TIMEOUT", "5")]) else {
            return;
        };
        let t = text(&out);
        assert!(!out.status.success(), "the job must fail:\n{t}");
        assert!(took < Duration::from_secs(40), "mpirun took {took:?}:\n{t}");
        assert!(!t.contains("rank 0 of 2 ok"), "rank 0 cannot finish a collective rank 1 never joined:\n{t}");
    }

    #[test]
    #[ignore = "one rank of a_rank_that_hangs_or_dies_ends_the_job"]
    fn rank_hangs() {
        let Some((c, r, w)) = as_rank() else { return };
        if r == w - 1 {
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        let mut x = [1f32; 4];
        let e = c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap_err();
        println!("rank {r} of {w}: {e}");
        let e2 = c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap_err();
        assert!(e2.to_string().contains("spent"), "{e2}");
        // Dropping the spent communicator aborts the job: a moment first,
        // so the other waiting rank prints its own timeout before the
        // abort kills it.
        std::thread::sleep(Duration::from_secs(1));
    }

    #[test]
    #[ignore = "one rank of a_rank_that_hangs_or_dies_ends_the_job"]
    fn rank_dies() {
        let Some((c, r, w)) = as_rank() else { return };
        if r == w - 1 {
            std::process::exit(3);
        }
        let mut x = [1f32; 4];
        match c.all_reduce_f32(&mut x, ReduceOp::Sum) {
            Ok(()) => println!("rank {r} of {w} ok"),
            Err(e) => println!("rank {r} of {w}: {e}"),
        }
    }
}

/// The model-parallel heads on `comm`'s ranks against one process on the
/// concatenated batch (every rank draws the same data and computes the
/// reference itself): the full softmax under three margins, and Partial FC
/// (each shard's sample is [`PartialFc::sample`] on the shard; the loss and
/// gradients those of one process over the union of the samples). Returns
/// the worst relative differences, for the log.
/// The model-parallel heads on `comm`'s ranks, their shards on `on` (the
/// CPU or the simulated GPU) over `n` classes, against one process on the
/// CPU.
fn check_model_parallel(comm: &dyn Communicator, on: &Device, n: usize) -> String {
    use gif_fr::distributed::{cost, shard_range, shard_seed, ModelParallelHead};
    use gif_fr::head::softmax_head::cpu;
    use gif_fr::head::{Margin, MarginGrad, PartialFc, SoftmaxHead, SoftmaxHeadConfig};
    let (r, w) = (comm.rank(), comm.world());
    // N, d and B are not multiples of anything here; N = 23 splits 12 + 11
    // on 2 ranks, 8 + 8 + 7 on 3; N = 389 gives each shard two class tiles
    // of 128, which the GPU's forward walks as two splits to merge.
    let (d, b) = (19usize, 5usize);
    let dev = Device::cpu();
    let mut g = common::rng(41);
    let centres = common::uniform(&mut g, n * d, -1.0, 1.0);
    let mut x = common::uniform(&mut g, w * b * d, -1.0, 1.0);
    // Every shard owns some rows' labels, some classes repeat.
    let labels: Vec<u32> = (0..w * b).map(|i| ((i * 7 + (i % 3) * 5) % n) as u32).collect();
    // Every other row near its class's centre, so that accuracy is neither
    // 0 nor 1.
    for (i, &y) in labels.iter().enumerate().step_by(2) {
        for c in 0..d {
            x[i * d + c] = centres[y as usize * d + c] + 0.3 * x[i * d + c];
        }
    }
    let mine = r * b..(r + 1) * b;
    let shard = shard_range(n, r, w).unwrap();
    let features = Tensor::from_slice(on, &[b, d], &x[mine.start * d..mine.end * d]).unwrap();
    let local = || Tensor::from_slice(on, &[shard.len(), d], &centres[shard.start * d..shard.end * d]).unwrap();
    let rel = |got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f32, |m, (a, c)| m.max((a - c).abs() / scale))
    };
    let mut worst = 0f32;
    let exact = SoftmaxHeadConfig { margin_grad: MarginGrad::Exact, ..SoftmaxHeadConfig::new(d, n) };
    let cosface = SoftmaxHeadConfig { margin: Margin::INSIGHTFACE_COSFACE, ..SoftmaxHeadConfig::new(d, n) };
    for cfg in [SoftmaxHeadConfig::new(d, n), exact, cosface] {
        let what = format!("{:?} {:?}", cfg.margin, cfg.margin_grad);
        let head = ModelParallelHead::from_shard(cfg.clone(), local(), comm, None, 0).unwrap();
        assert_eq!(head.shard(), shard);
        let before = comm.stats();
        let step = head.forward_backward(comm, &features, &labels[mine.clone()], 0).unwrap();
        let after = comm.stats();
        // The reference: one head over every centre and the W·B rows.
        let full =
            SoftmaxHead::from_weights(cfg.clone(), Tensor::from_slice(&dev, &[n, d], &centres).unwrap()).unwrap();
        let all = Tensor::from_slice(&dev, &[w * b, d], &x).unwrap();
        let (loss, grads) = full.forward_backward(&all, &labels[..]).unwrap();
        assert!((step.loss.loss - loss.loss).abs() <= 1e-5 * loss.loss.abs().max(1.0), "{what}: {step:?} vs {loss:?}");
        assert_eq!(step.loss.accuracy, loss.accuracy, "{what}");
        assert!(loss.accuracy > 0.0 && loss.accuracy < 1.0, "{what}: accuracy {}", loss.accuracy);
        let (gx, gw) = (grads.features.to_vec::<f32>().unwrap(), grads.centres.to_vec::<f32>().unwrap());
        let ex = rel(&step.features.to_vec::<f32>().unwrap(), &gx[mine.start * d..mine.end * d]);
        let ew = rel(&step.centres.to_vec::<f32>().unwrap(), &gw[shard.start * d..shard.end * d]);
        assert!(ex < 2e-5 && ew < 2e-5, "{what}: rank {r} of {w}: features {ex:e}, centres {ew:e}");
        worst = worst.max(ex).max(ew);
        // The bytes are the cost model's (docs/distributed.md).
        let model = cost::step_cost(&cost::Setup {
            world: w,
            batch: b,
            dim: d,
            classes: n as u64,
            backbone_params: 0,
            optimizer_states: 0,
            head: cost::Head::Softmax { materialized_logits: false },
        });
        let moved = (
            after.all_gather_bytes - before.all_gather_bytes,
            after.all_reduce_bytes - before.all_reduce_bytes,
            after.reduce_scatter_bytes - before.reduce_scatter_bytes,
        );
        assert_eq!(moved, (model.all_gather_bytes, model.all_reduce_bytes, model.reduce_scatter_bytes), "{what}");
    }
    // Partial FC at rate 0.4: each shard samples by the one-process rule.
    let (rate, seed, at) = (0.4f32, 9u64, 3u64);
    let cfg = SoftmaxHeadConfig::new(d, n);
    let head = ModelParallelHead::from_shard(cfg.clone(), local(), comm, Some(rate), seed).unwrap();
    let step = head.forward_backward(comm, &features, &labels[mine.clone()], at).unwrap();
    let mut union = Vec::new();
    for q in 0..w {
        let s = shard_range(n, q, w).unwrap();
        let own: Vec<u32> =
            labels.iter().filter(|&&y| s.contains(&(y as usize))).map(|&y| y - s.start as u32).collect();
        let shard_head = SoftmaxHead::new(SoftmaxHeadConfig::new(d, s.len()), &dev, DType::F32, 0).unwrap();
        let sample = PartialFc::new(shard_head, rate, shard_seed(seed, s.start)).unwrap().sample(&own, at).unwrap();
        assert!(own.iter().all(|y| sample.binary_search(y).is_ok()), "shard {q}: every positive sampled");
        let size = ((rate as f64 * s.len() as f64).ceil() as usize)
            .max(own.iter().collect::<std::collections::BTreeSet<_>>().len());
        assert_eq!(sample.len(), size, "shard {q}");
        if q == r {
            assert_eq!(step.sampled.as_deref(), Some(&sample[..]), "rank {r}'s sample");
        }
        union.extend(sample.iter().map(|&c| c + s.start as u32));
    }
    assert!(union.len() < n, "the samples leave classes out");
    let targets: Vec<i32> = labels.iter().map(|y| union.binary_search(y).unwrap() as i32).collect();
    let (loss, gx, gw) = cpu::fused(&cfg, &x, &centres, Some(&union[..]), union.len(), &targets);
    assert!((step.loss.loss - loss.loss).abs() <= 1e-5 * loss.loss.abs().max(1.0), "Partial FC: {step:?} vs {loss:?}");
    assert_eq!(step.loss.accuracy, loss.accuracy, "Partial FC");
    let first = union.iter().position(|&c| c as usize >= shard.start).unwrap();
    let k = step.sampled.as_ref().unwrap().len();
    let ex = rel(&step.features.to_vec::<f32>().unwrap(), &gx[mine.start * d..mine.end * d]);
    let ew = rel(&step.centres.to_vec::<f32>().unwrap(), &gw[first * d..(first + k) * d]);
    assert!(ex < 2e-5 && ew < 2e-5, "Partial FC: rank {r} of {w}: features {ex:e}, centres {ew:e}");
    worst = worst.max(ex).max(ew);
    // A label out of range on any rank is an error on every rank.
    let mut bad = labels[mine.clone()].to_vec();
    if r == w - 1 {
        bad[b - 1] = n as u32;
    }
    let e = head.forward_backward(comm, &features, &bad, at).unwrap_err().to_string();
    assert!(e.contains(&format!("rank {}'s labels[{}] = {n}", w - 1, b - 1)), "{e}");
    // A NaN feature on the last rank: the loss is NaN on every rank (the
    // trainer's optimizer skips such a step), not an error on one.
    let mut nan = x[mine.start * d..mine.end * d].to_vec();
    if r == w - 1 {
        nan[3] = f32::NAN;
    }
    let nan = Tensor::from_slice(on, &[b, d], &nan).unwrap();
    assert!(head.forward_backward(comm, &nan, &labels[mine.clone()], at).unwrap().loss.loss.is_nan());
    format!("max |Δ| / max |g| = {worst:.1e}")
}

#[test]
fn model_parallel_heads_in_a_world_of_one() {
    use gif_fr::distributed::shard_range;
    let summary = check_model_parallel(&SingleProcess::new(), &Device::cpu(), 23);
    println!("one rank: {summary}");
    // The same shards on a GPU (the simulator in three orders, and a GPU
    // when there is one).
    #[cfg(feature = "sim")]
    for dev in common::gpu_devices() {
        for n in [23, 389] {
            println!("one rank, {dev}, N = {n}: {}", check_model_parallel(&SingleProcess::new(), &dev, n));
        }
    }
    // insightface's split: ⌊N/W⌋ each, one more on the first N mod W.
    let split = |n, w| (0..w).map(|r| shard_range(n, r, w).unwrap()).collect::<Vec<_>>();
    assert_eq!(split(23, 3), vec![0..8, 8..16, 16..23]);
    assert_eq!(split(24, 3), vec![0..8, 8..16, 16..24]);
    assert_eq!(split(5, 5), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
    assert!(shard_range(2, 0, 3).unwrap_err().to_string().contains("2 classes cannot be sharded over 3 ranks"));
    assert!(shard_range(5, 3, 3).is_err() && shard_range(5, 0, 0).is_err());
    // Features on another device than the shard: a typed error.
    #[cfg(feature = "sim")]
    {
        use gif_fr::distributed::ModelParallelHead;
        use gif_fr::head::SoftmaxHeadConfig;
        let comm = SingleProcess::new();
        let head = ModelParallelHead::new(SoftmaxHeadConfig::new(2, 3), &Device::sim(), &comm, None, 0).unwrap();
        let x = Tensor::from_slice(&Device::cpu(), &[1, 2], &[1f32, 0.]).unwrap();
        let e = head.forward_backward(&comm, &x, &[0], 0).unwrap_err().to_string();
        assert!(e.contains("device"), "{e}");
    }
}
