//! Builds the kernels three ways:
//!
//! 1. PTX: every `kernels/*.cu` through `nvcc --ptx -arch=compute_80` into
//!    OUT_DIR, when nvcc is found (env NVCC, then PATH, then
//!    CUDA_HOME/CUDA_PATH). A .cu error fails the build with nvcc's message.
//!    Without nvcc: a cargo warning, and the CUDA backend compiles the
//!    embedded sources with NVRTC at first use instead.
//! 2. Sources for NVRTC: each module with its local `#include "..."` headers
//!    inlined, so NVRTC needs no include path.
//! 3. The simulator: the same .cu files compiled as C++20 for the host with
//!    kernels/sim/gif_sim.h, plus a registry of every `extern "C" __global__`
//!    kernel and its signature.
//!
//! It writes OUT_DIR/kernels.rs (the module table) and OUT_DIR/launch.rs
//! (a typed launcher per kernel, generated from its signature), included by
//! src/runtime/kernels.rs and src/runtime/launch.rs.
//! Set GIF_FR_NO_NVCC=1 to build as if no nvcc were installed, and
//! GIF_SIM_UCONTEXT=1 to give the simulator the portable ucontext fiber
//! switch (what non-x86-64 hosts get) instead of the x86-64 one.

use std::collections::HashSet;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Module {
    name: String,
    path: PathBuf,
    kernels: Vec<Kernel>,
    flat: PathBuf,
    ptx: Option<PathBuf>,
}

/// One `extern "C" __global__` kernel and its parameters, as read from the
/// source: the typed launchers of src/runtime/launch.rs are generated from
/// them.
struct Kernel {
    name: String,
    params: Vec<Param>,
}

/// One kernel parameter: its name and C type.
struct Param {
    name: String,
    ty: CType,
}

/// The C types kernel parameters may have.
#[derive(Clone, Copy, PartialEq)]
enum CType {
    /// A pointer to `elem` (a Rust element type), const or not.
    Ptr { elem: &'static str, mutable: bool },
    /// A scalar passed by value: its Rust type.
    Scalar(&'static str),
}

impl CType {
    /// The Rust parameter type of the launcher.
    fn rust(self) -> String {
        match self {
            CType::Ptr { elem, mutable: false } => format!("Ptr<{elem}>"),
            CType::Ptr { elem, mutable: true } => format!("PtrMut<{elem}>"),
            CType::Scalar(t) => t.to_string(),
        }
    }
    /// The `Arg` the launcher passes.
    fn arg(self, name: &str) -> String {
        match self {
            CType::Ptr { .. } => format!("Arg::Ptr({name}.addr())"),
            CType::Scalar("i32") => format!("Arg::I32({name})"),
            CType::Scalar("u32") => format!("Arg::U32({name})"),
            CType::Scalar("i64") => format!("Arg::I64({name})"),
            CType::Scalar("u64") => format!("Arg::U64({name})"),
            CType::Scalar("f32") => format!("Arg::F32({name})"),
            CType::Scalar(t) => panic!("no Arg for {t}"),
        }
    }
    /// (kind, bytes) as the simulator's signature registry holds them.
    fn sim_kind(self) -> (u8, u8) {
        match self {
            CType::Ptr { .. } => (1, 8),
            CType::Scalar("f32") => (3, 4),
            CType::Scalar("i64" | "u64") => (2, 8),
            CType::Scalar(_) => (2, 4),
        }
    }
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = root.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "PATH", "CUDA_HOME", "CUDA_PATH", "GIF_FR_NO_NVCC", "GIF_SIM_UCONTEXT"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut modules = Vec::new();
    let mut cu_files: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu_files.sort();
    for f in walk(&kdir) {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    for path in cu_files {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut seen = HashSet::new();
        let flat_src = flatten(&path, &mut seen);
        let kernels = kernel_names(&flat_src, &name);
        let flat = out.join(format!("{name}.flat.cu"));
        fs::write(&flat, &flat_src).expect("write flattened source");
        modules.push(Module { name, path, kernels, flat, ptx: None });
    }

    // 1. PTX with nvcc.
    let nvcc = find_nvcc();
    let mut nvcc_version = String::new();
    match &nvcc {
        Some(nvcc) => {
            nvcc_version = Command::new(nvcc)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().find(|l| l.contains("release")).map(|l| l.trim().to_string()))
                .unwrap_or_default();
            let results: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = modules
                    .iter()
                    .map(|m| {
                        let out = &out;
                        let kdir = &kdir;
                        s.spawn(move || compile_ptx(nvcc, kdir, &m.path, &out.join(format!("{}.ptx", m.name))))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("nvcc thread")).collect()
            });
            for (m, r) in modules.iter_mut().zip(results) {
                match r {
                    Ok(p) => m.ptx = Some(p),
                    Err(e) => panic!("\nnvcc failed on kernels/{}.cu:\n{e}", m.name),
                }
            }
        }
        None => {
            println!(
                "cargo:warning=gif-fr: nvcc not found (NVCC, PATH, CUDA_HOME, CUDA_PATH); kernels will be compiled \
                 with NVRTC at first use on a GPU. scripts/install-cuda-toolchain installs nvcc."
            );
        }
    }

    // 3. The simulator (cargo feature `sim`, default).
    if env::var_os("CARGO_FEATURE_SIM").is_some() {
        build_simulator(&root, &out, &modules);
    }

    // The table src/runtime/kernels.rs includes.
    let mut t = String::new();
    writeln!(t, "// Generated by build.rs.").unwrap();
    writeln!(t, "/// True when build.rs compiled the kernels to PTX with nvcc.").unwrap();
    writeln!(t, "pub const BUILT_WITH_NVCC: bool = {};", nvcc.is_some()).unwrap();
    writeln!(t, "/// nvcc's release line, empty without nvcc.").unwrap();
    writeln!(t, "pub const NVCC_VERSION: &str = {:?};", nvcc_version).unwrap();
    writeln!(t, "/// One variant per kernels/*.cu module.").unwrap();
    writeln!(t, "#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]").unwrap();
    writeln!(t, "pub enum ModuleId {{").unwrap();
    for (i, m) in modules.iter().enumerate() {
        writeln!(t, "    /// kernels/{}.cu", m.name).unwrap();
        writeln!(t, "    {} = {i},", camel(&m.name)).unwrap();
    }
    writeln!(t, "}}").unwrap();
    writeln!(t, "/// Every module, indexed by `ModuleId as usize`.").unwrap();
    writeln!(t, "pub static MODULES: &[ModuleSource] = &[").unwrap();
    for m in &modules {
        let ptx = match &m.ptx {
            Some(p) => format!("Some(include_str!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        writeln!(
            t,
            "    ModuleSource {{ id: ModuleId::{}, name: {:?}, ptx: {ptx}, source: include_str!({:?}), kernels: &{:?} }},",
            camel(&m.name),
            m.name,
            m.flat.display().to_string(),
            m.kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>()
        )
        .unwrap();
    }
    writeln!(t, "];").unwrap();
    fs::write(out.join("kernels.rs"), t).expect("write kernels.rs");
    fs::write(out.join("launch.rs"), launchers(&modules)).expect("write launch.rs");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

fn camel(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
        })
        .collect()
}

/// Inlines `#include "..."` (paths relative to the including file), each
/// header once (they all use #pragma once). System includes stay, and are
/// only allowed inside `#if defined(GIF_SIM)` blocks by convention.
fn flatten(path: &Path, seen: &mut HashSet<PathBuf>) -> String {
    let canon = fs::canonicalize(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if !seen.insert(canon.clone()) {
        return String::new();
    }
    let text = fs::read_to_string(&canon).unwrap_or_else(|e| panic!("{}: {e}", canon.display()));
    let dir = canon.parent().unwrap().to_path_buf();
    let mut out = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        if l.starts_with("#pragma once") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("#include \"") {
            let inc = rest.split('"').next().unwrap();
            let _ = writeln!(out, "// ---- begin {inc}");
            out.push_str(&flatten(&dir.join(inc), seen));
            let _ = writeln!(out, "// ---- end {inc}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Removes // and /* */ comments and string contents other than "C".
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The `extern "C" __global__` kernels, in source order:
/// `extern "C" __global__ void [__launch_bounds__(...)] NAME(PARAMS)`.
fn kernel_names(src: &str, module: &str) -> Vec<Kernel> {
    let s = strip_comments(src);
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut rest = s.as_str();
    while let Some(p) = rest.find("__global__") {
        let before = rest[..p].trim_end();
        let after = &rest[p + "__global__".len()..];
        rest = after;
        if before.ends_with("#define") || !before.ends_with("extern \"C\"") {
            continue;
        }
        let mut a = after.trim_start();
        a = a
            .strip_prefix("void")
            .unwrap_or_else(|| panic!("kernels/{module}.cu: a kernel must return void"))
            .trim_start();
        if let Some(lb) = a.strip_prefix("__launch_bounds__") {
            let close = lb.find(')').expect("__launch_bounds__(...) closes");
            a = lb[close + 1..].trim_start();
        }
        let name: String = a.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "kernels/{module}.cu: could not read a kernel name near: {}", &a[..a.len().min(60)]);
        assert!(kernels.iter().all(|k| k.name != name), "kernels/{module}.cu: kernel {name} is defined twice");
        let open = a.find('(').unwrap_or_else(|| panic!("kernels/{module}.cu: {name}: no parameter list"));
        let close = a[open..].find(')').unwrap_or_else(|| panic!("kernels/{module}.cu: {name}: unclosed parameters"));
        let params = a[open + 1..open + close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(|p| parse_param(p).unwrap_or_else(|e| panic!("kernels/{module}.cu: {name}: parameter `{p}`: {e}")))
            .collect();
        kernels.push(Kernel { name, params });
    }
    kernels
}

/// `const float* __restrict__ x` → (x, Ptr<f32>), `int n` → (n, i32).
fn parse_param(p: &str) -> Result<Param, String> {
    let spaced = p.replace('*', " * ");
    let tokens: Vec<&str> = spaced.split_whitespace().filter(|t| *t != "__restrict__").collect();
    let (name, ty) = tokens.split_last().ok_or("empty")?;
    let pointer = ty.contains(&"*");
    if ty.iter().filter(|t| **t == "*").count() > 1 {
        return Err("pointers to pointers are not supported".into());
    }
    let mutable = pointer && !ty.contains(&"const");
    let base: Vec<&str> = ty.iter().copied().filter(|t| *t != "*" && *t != "const").collect();
    let rust = match base.join(" ").as_str() {
        "float" => "f32",
        "double" => "f64",
        "bf16" => "half::bf16",
        "f16" => "half::f16",
        "int" => "i32",
        "unsigned" | "unsigned int" => "u32",
        "unsigned short" => "u16",
        "unsigned char" => "u8",
        "long long" => "i64",
        "unsigned long long" => "u64",
        other => return Err(format!("unsupported type `{other}`")),
    };
    if !pointer && !matches!(rust, "f32" | "i32" | "u32" | "i64" | "u64") {
        return Err(format!("a {rust} passed by value is not supported"));
    }
    let ty = if pointer { CType::Ptr { elem: rust, mutable } } else { CType::Scalar(rust) };
    const KEYWORDS: &[&str] = &["in", "ref", "type", "fn", "loop", "match", "move", "mod", "use", "impl", "self"];
    let name = if KEYWORDS.contains(name) { format!("r#{name}") } else { name.to_string() };
    Ok(Param { name, ty })
}

/// The typed launchers: one `unsafe fn` per kernel, with the kernel's
/// parameters as typed Rust parameters, launching it by index.
fn launchers(modules: &[Module]) -> String {
    let mut t = String::new();
    writeln!(t, "// Generated by build.rs from the kernels' signatures.").unwrap();
    for m in modules {
        for (i, k) in m.kernels.iter().enumerate() {
            let sig: Vec<String> = k.params.iter().map(|p| format!("{}: {}", p.name, p.ty.rust())).collect();
            let args: Vec<String> = k.params.iter().map(|p| p.ty.arg(&p.name)).collect();
            writeln!(t, "/// `{}` of kernels/{}.cu: `{}({})`.", k.name, m.name, k.name, sig.join(", ")).unwrap();
            writeln!(t, "///").unwrap();
            writeln!(t, "/// # Safety").unwrap();
            writeln!(t, "///").unwrap();
            writeln!(
                t,
                "/// Every pointer must address device memory of `dev` covering every element the kernel \
                 touches for these sizes and this launch configuration (each op states why at its call)."
            )
            .unwrap();
            writeln!(t, "#[allow(non_snake_case, clippy::too_many_arguments, clippy::missing_safety_doc)]").unwrap();
            writeln!(
                t,
                "pub unsafe fn {}(dev: &Device, cfg: LaunchConfig{}) -> crate::Result<()> {{",
                k.name,
                sig.iter().map(|s| format!(", {s}")).collect::<String>()
            )
            .unwrap();
            writeln!(
                t,
                "    dev.launch_kernel(KernelRef {{ module: ModuleId::{}, index: {i}, name: {:?} }}, cfg, &[{}])",
                camel(&m.name),
                k.name,
                args.join(", ")
            )
            .unwrap();
            writeln!(t, "}}").unwrap();
        }
    }
    // The signature table the simulator's registry is checked against.
    writeln!(t, "/// Per module and kernel (source order): each parameter's (kind, bytes) as the simulator").unwrap();
    writeln!(t, "/// registers it (1 pointer, 2 integer, 3 float).").unwrap();
    writeln!(t, "pub static SIGNATURES: &[&[&[(u8, u8)]]] = &[").unwrap();
    for m in modules {
        let ks: Vec<String> = m
            .kernels
            .iter()
            .map(|k| {
                format!(
                    "&[{}]",
                    k.params.iter().map(|p| format!("{:?}", p.ty.sim_kind())).collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        writeln!(t, "    &[{}],", ks.join(", ")).unwrap();
    }
    writeln!(t, "];").unwrap();
    t
}

fn find_nvcc() -> Option<PathBuf> {
    if env::var("GIF_FR_NO_NVCC").is_ok_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let works = |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if works(&p) {
            return Some(p);
        }
        println!("cargo:warning=gif-fr: NVCC={} does not run; looking on PATH", p.display());
    }
    if let Some(path) = env::var_os("PATH") {
        for d in env::split_paths(&path) {
            let p = d.join("nvcc");
            if p.is_file() && works(&p) {
                return Some(p);
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = env::var(var) {
            let p = PathBuf::from(h).join("bin").join("nvcc");
            if p.is_file() && works(&p) {
                return Some(p);
            }
        }
    }
    None
}

fn compile_ptx(nvcc: &Path, kdir: &Path, src: &Path, out: &Path) -> Result<PathBuf, String> {
    let o = Command::new(nvcc)
        .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-lineinfo"])
        .arg("-I")
        .arg(kdir)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !o.status.success() {
        return Err(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
    }
    Ok(out.to_path_buf())
}

fn build_simulator(root: &Path, out: &Path, modules: &[Module]) {
    let sim_dir = root.join("kernels").join("sim");
    let mut files = vec![sim_dir.join("sim.cpp")];
    let mut registry = String::from("#include \"gif_sim.h\"\n");
    for m in modules {
        let mut tu = String::new();
        writeln!(tu, "// Generated by build.rs: kernels/{}.cu for the simulator.", m.name).unwrap();
        writeln!(tu, "#include \"gif_sim.h\"").unwrap();
        writeln!(tu, "#include {:?}", m.path.display().to_string()).unwrap();
        // Each kernel's static shared variables: a table build.rs appends to
        // this unit's assembly (shared_tables below).
        for k in &m.kernels {
            writeln!(tu, "extern \"C\" const gif_sim::SharedVar {}[];", shared_table_name(&k.name)).unwrap();
        }
        writeln!(tu, "static const gif_sim::Kernel gif_sim_kernels_{}[] = {{", m.name).unwrap();
        for k in &m.kernels {
            writeln!(tu, "  gif_sim::make_kernel({:?}, &{}, {}),", k.name, k.name, shared_table_name(&k.name)).unwrap();
        }
        if m.kernels.is_empty() {
            writeln!(tu, "  {{nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr}},").unwrap();
        }
        writeln!(tu, "}};").unwrap();
        writeln!(
            tu,
            "extern \"C\" const gif_sim::Module gif_sim_module_{0} = {{{0:?}, gif_sim_kernels_{0}, {1}}};",
            m.name,
            m.kernels.len()
        )
        .unwrap();
        let p = out.join(format!("sim_{}.cpp", m.name));
        fs::write(&p, tu).expect("write simulator TU");
        files.push(p);
        writeln!(registry, "extern \"C\" const gif_sim::Module gif_sim_module_{};", m.name).unwrap();
    }
    registry.push_str("extern \"C\" const gif_sim::Module* const gif_sim_modules[] = {\n");
    for m in modules {
        writeln!(registry, "  &gif_sim_module_{},", m.name).unwrap();
    }
    if modules.is_empty() {
        registry.push_str("  nullptr,\n");
    }
    registry.push_str("};\n");
    writeln!(registry, "extern \"C\" const unsigned gif_sim_module_count = {};", modules.len()).unwrap();
    let p = out.join("sim_registry.cpp");
    fs::write(&p, registry).expect("write registry");
    files.push(p);

    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .opt_level(2) // simulated kernels run at -O2 even in debug builds
        .define("GIF_SIM", "1")
        .include(&sim_dir)
        .include(root.join("kernels"))
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(true);
    // GIF_SIM_UCONTEXT=1 selects the portable (slower) ucontext fiber switch
    // that non-x86-64 hosts use, to test it on x86-64.
    if env::var("GIF_SIM_UCONTEXT").is_ok_and(|v| !v.is_empty() && v != "0") {
        b.define("GIF_SIM_UCONTEXT", "1");
    }
    // Static __shared__ variables carry section("gif_sim_shared") so the
    // scheduler can poison them before each block, but GCC drops section
    // attributes on static locals of template instances (they go to
    // .bss._ZZ... COMDAT sections). So the kernel TUs are compiled to
    // assembly, their zero-initialized function-local statics moved into
    // gif_sim_shared (CUDA forbids initializers on __shared__, so those are
    // exactly the shared variables), and the assembly is what is archived.
    // Each kernel then gets the table of the shared variables its code can
    // reach (shared_tables), which the scheduler poisons before each of its
    // blocks (the whole section is about 1 MB). tests/sim.rs (the planted
    // race) fails if this ever stops working.
    let compiler = b.get_compiler();
    for f in &files {
        let Some(m) = modules.iter().find(|m| f.file_name().is_some_and(|n| *n == *format!("sim_{}.cpp", m.name)))
        else {
            b.file(f);
            continue;
        };
        let asm = f.with_extension("s");
        let o = compiler.to_command().arg("-S").arg("-o").arg(&asm).arg(f).output().expect("run the C++ compiler");
        if !o.status.success() {
            panic!(
                "\nthe simulator build of {} failed:\n{}{}",
                f.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for line in String::from_utf8_lossy(&o.stderr).lines() {
            println!("cargo:warning={line}");
        }
        let text = move_template_statics_to_shared(&fs::read_to_string(&asm).expect("read assembly"));
        let names: Vec<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
        let tables = shared_tables(&text, &names);
        fs::write(&asm, text + &tables).expect("write assembly");
        b.file(&asm);
    }
    b.compile("gif_sim");
}

/// The symbol of the table of `kernel`'s static shared variables.
fn shared_table_name(kernel: &str) -> String {
    format!("gif_sim_smem_{kernel}")
}

/// Assembly to append to a kernel unit's (after
/// move_template_statics_to_shared): for each kernel, the table
/// `gif_sim_smem_<kernel>` of (address, bytes) pairs, ended by (0, 0), of
/// the variables in gif_sim_shared its code can reach: the symbols its
/// instructions name, followed through the functions of this unit they name
/// (the kernels' helpers, inlined or not). A shared variable no kernel
/// reaches that way (through a function pointer, say) is in every kernel's
/// table: poisoning more than a kernel uses is only slower.
fn shared_tables(asm: &str, kernels: &[&str]) -> String {
    use std::collections::HashMap;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$';
    let (mut section, mut previous) = (String::new(), String::new());
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    let mut shared: Vec<&str> = Vec::new();
    let mut functions: HashSet<&str> = HashSet::new();
    let mut refs: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut current: Option<&str> = None;
    for line in asm.lines() {
        let t = line.trim();
        let (directive, rest) = t.split_once(|c: char| c.is_whitespace()).unwrap_or((t, ""));
        let rest = rest.trim();
        match directive {
            ".section" | ".pushsection" => {
                previous = std::mem::replace(&mut section, rest.split(',').next().unwrap_or("").trim().to_string())
            }
            ".text" | ".data" | ".bss" => previous = std::mem::replace(&mut section, directive.to_string()),
            ".previous" | ".popsection" => std::mem::swap(&mut section, &mut previous),
            ".type" => {
                // `@function` (x86-64), `%function` (Arm).
                if let Some((name, "@function" | "%function")) = rest.split_once(',').map(|(a, b)| (a.trim(), b.trim()))
                {
                    functions.insert(name);
                }
            }
            ".size" => {
                if let Some((name, size)) = rest.split_once(',').map(|(a, b)| (a.trim(), b.trim())) {
                    match size.parse::<u64>() {
                        Ok(n) => {
                            sizes.insert(name, n);
                        }
                        // `.size f, .-f` ends a function's body.
                        Err(_) if Some(name) == current => current = None,
                        Err(_) => {}
                    }
                }
            }
            _ if !line.starts_with(char::is_whitespace) && t.ends_with(':') => {
                let name = &t[..t.len() - 1];
                if section == "gif_sim_shared" {
                    shared.push(name);
                }
                if functions.contains(name) {
                    current = Some(name);
                }
            }
            _ if !t.starts_with('.') => {
                if let Some(f) = current {
                    let names = t.split(|c: char| !ident(c)).filter(|w| !w.is_empty() && !w.starts_with(".L"));
                    refs.entry(f).or_default().extend(names);
                }
            }
            _ => {}
        }
    }
    let shared: Vec<(&str, u64)> =
        shared.into_iter().map(|v| (v, *sizes.get(v).unwrap_or_else(|| panic!("no .size for {v}")))).collect();
    let reach = |k: &str| {
        let (mut seen, mut todo) = (HashSet::from([k]), vec![k]);
        while let Some(f) = todo.pop() {
            for &r in refs.get(f).into_iter().flatten() {
                if functions.contains(r) && seen.insert(r) {
                    todo.push(r);
                }
            }
        }
        seen.iter().flat_map(|f| refs.get(f).into_iter().flatten().copied()).collect::<HashSet<&str>>()
    };
    let reached: Vec<HashSet<&str>> = kernels.iter().map(|k| reach(k)).collect();
    let mut out = String::from("\t.section\t.data.rel.ro.gif_sim_smem,\"aw\"\n");
    for (k, r) in kernels.iter().zip(&reached) {
        let table = shared_table_name(k);
        writeln!(out, "\t.align 8\n\t.globl\t{table}\n\t.hidden\t{table}\n{table}:").unwrap();
        for &(v, size) in &shared {
            if r.contains(v) || !reached.iter().any(|r| r.contains(v)) {
                writeln!(out, "\t.quad\t{v}\n\t.quad\t{size}").unwrap();
            }
        }
        out.push_str("\t.quad\t0\n\t.quad\t0\n");
    }
    out
}

/// Rewrites `.section .bss._ZZ<name>,"awG",@nobits,<group>,comdat` (a
/// zero-initialized function-local static of a template or inline function)
/// into the gif_sim_shared section, keeping its COMDAT group.
fn move_template_statics_to_shared(asm: &str) -> String {
    let mut out = String::with_capacity(asm.len());
    for line in asm.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(".section") {
            let rest = rest.trim_start();
            if rest.starts_with(".bss._ZZ") {
                let parts: Vec<&str> = rest.split(',').collect();
                // name, flags, type, group, comdat
                let tail = if parts.len() >= 5 { format!(",{},{}", parts[3], parts[4]) } else { String::new() };
                let flags = if parts.len() >= 5 { "\"awG\"" } else { "\"aw\"" };
                out.push_str(&format!("\t.section\tgif_sim_shared,{flags},@progbits{tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
