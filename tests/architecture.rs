//! The crate's layering: no dependency cycle between its source files.
//!
//! Every `src/**/*.rs` file is a node; a file depends on another when it
//! names it, `crate::a::b` or `super::b`, in code (comments and doc
//! comments are skipped); an item a facade (mod.rs, lib.rs) re-exports
//! counts as the child file that defines it. A facade declaring or
//! re-exporting its children (`mod x;`, `pub use x::...`) does not use them;
//! any other code in it does. A cycle fails the test, naming the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → ["a", "b"]; `src/a/mod.rs` → ["a"]; `src/lib.rs` → [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments, string contents or `#[cfg(test)]`
/// test modules at the end (tests may use anything).
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        if l.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    match out.find("#[cfg(test)]\nmod tests") {
        Some(i) => out[..i].to_string(),
        None => out,
    }
}

/// Items a facade (mod.rs, lib.rs) re-exports from its children:
/// `pub use child::{A, B}` / `pub use child::A;` → A → child.
fn reexports(code: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in code.split(';') {
        let st = stmt.trim();
        let Some(rest) = st.strip_prefix("pub use ") else { continue };
        let Some((child, items)) = rest.split_once("::") else { continue };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.trim().rsplit("::").next().unwrap_or("").trim().to_string();
            if !name.is_empty() {
                out.insert(name, child.trim().to_string());
            }
        }
    }
    out
}

/// The paths a file names: `crate::x::y` and `super::x`, with one level of
/// `{a, b::c}` groups expanded. `self_mod`: the file's module path.
fn references(code: &str, self_mod: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    let bytes = code.as_bytes();
    for (start, root) in [("crate::", 0usize), ("super::", 1)] {
        let mut from = 0;
        while let Some(p) = code[from..].find(start) {
            let at = from + p;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            // The base: crate root, or the parent of this file's module (a
            // mod.rs file's `super` is its own parent too).
            let base: Vec<String> = if root == 0 {
                Vec::new()
            } else {
                let mut b = self_mod.to_vec();
                let _ = is_mod_rs;
                b.pop();
                b
            };
            let rest = &code[from..];
            let mut head: Vec<String> = Vec::new();
            let mut i = 0;
            let rb = rest.as_bytes();
            if rest.starts_with('{') {
                let close = rest.find('}').unwrap_or(rest.len());
                for item in rest[1..close].split(',') {
                    let mut p = base.clone();
                    p.extend(item.trim().split("::").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                    refs.push(p);
                }
                continue;
            }
            loop {
                let s = i;
                while i < rb.len() && (rb[i].is_ascii_alphanumeric() || rb[i] == b'_') {
                    i += 1;
                }
                if i > s {
                    head.push(rest[s..i].to_string());
                }
                if rest[i..].starts_with("::{") {
                    let close = rest[i..].find('}').map_or(rest.len(), |c| i + c);
                    for item in rest[i + 3..close].split(',') {
                        let mut p = base.clone();
                        p.extend(head.iter().cloned());
                        p.extend(item.trim().split("::").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                        refs.push(p);
                    }
                    break;
                }
                if rest[i..].starts_with("::") {
                    i += 2;
                    continue;
                }
                let mut p = base.clone();
                p.extend(head);
                refs.push(p);
                break;
            }
        }
    }
    refs
}

#[test]
fn no_dependency_cycle_between_source_files() {
    // The sources: where cargo built this test, or (the GPU kit runs
    // prebuilt binaries from a copy of the repository) the working folder.
    let src = [Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), PathBuf::from("src")]
        .into_iter()
        .find(|p| p.join("lib.rs").is_file())
        .expect("the crate's src/ folder (run from the repository root)");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs"));
    let modules: BTreeMap<Vec<String>, PathBuf> = files.iter().map(|f| (module_path(&src, f), f.clone())).collect();
    let facades: BTreeMap<Vec<String>, BTreeMap<String, String>> = modules
        .iter()
        .filter(|(_, f)| f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs"))
        .map(|(m, f)| (m.clone(), reexports(&code(&std::fs::read_to_string(f).unwrap()))))
        .collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, f) in &modules {
        let text = std::fs::read_to_string(f).unwrap();
        let is_mod_rs = f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let mut out = BTreeSet::new();
        // Declarations and re-exports of children (`mod x;`, `pub use
        // x::...;` in a facade) are not uses; the facade's own code is.
        let body: String = code(&text)
            .split_inclusive(';')
            .filter(|st| {
                let t = st.trim_start();
                let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
                !(is_mod_rs
                    && (t.starts_with("mod ")
                        || (t.starts_with("use ") && !t.starts_with("use crate") && !t.starts_with("use super"))))
            })
            .collect();
        let mut refs = references(&body, m, is_mod_rs);
        // A facade's code naming its children by relative paths (`kmeans::x`).
        if is_mod_rs {
            for child in modules.keys().filter(|c| c.len() == m.len() + 1 && c.starts_with(m)) {
                let pat = format!("{}::", child[m.len()]);
                let b = body.as_bytes();
                let mut from = 0;
                while let Some(p) = body[from..].find(&pat) {
                    let at = from + p;
                    from = at + pat.len();
                    let prev = if at == 0 { b' ' } else { b[at - 1] };
                    if !(prev.is_ascii_alphanumeric() || prev == b'_' || prev == b':') {
                        refs.push(child.clone());
                    }
                }
            }
        }
        for r in refs {
            // The deepest file module the path names.
            let target = (0..=r.len()).rev().map(|n| r[..n].to_vec()).find(|p| modules.contains_key(p));
            let Some(mut t) = target else { continue };
            // An item a facade re-exports belongs to the child it comes from.
            if let Some(child) = r.get(t.len()).and_then(|item| facades.get(&t).and_then(|f| f.get(item))) {
                let mut c = t.clone();
                c.push(child.clone());
                if modules.contains_key(&c) {
                    t = c;
                }
            }
            if &t != m {
                out.insert(t);
            }
        }
        edges.insert(m.clone(), out);
    }
    // Strongly connected components (Tarjan): each one with more than one
    // file is a cycle.
    let name = |m: &Vec<String>| modules[m].strip_prefix(&src).unwrap().display().to_string();
    struct Tarjan<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        on_stack: BTreeSet<Vec<String>>,
        sccs: Vec<Vec<Vec<String>>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: &Vec<String>) {
            let i = self.index.len();
            self.index.insert(v.clone(), i);
            self.low.insert(v.clone(), i);
            self.stack.push(v.clone());
            self.on_stack.insert(v.clone());
            for w in self.edges.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(&w) {
                    self.visit(&w);
                    let lw = self.low[&w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(&w) {
                    let iw = self.index[&w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(&w);
                    let done = &w == v;
                    scc.push(w);
                    if done {
                        break;
                    }
                }
                self.sccs.push(scc);
            }
        }
    }
    let mut t = Tarjan {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        sccs: Vec::new(),
    };
    for m in modules.keys() {
        if !t.index.contains_key(m) {
            t.visit(m);
        }
    }
    let cycles: Vec<String> = t
        .sccs
        .iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let members: BTreeSet<&Vec<String>> = c.iter().collect();
            c.iter()
                .map(|m| {
                    let uses: Vec<String> = edges[m].iter().filter(|n| members.contains(n)).map(name).collect();
                    format!("{} uses {}", name(m), uses.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(cycles.is_empty(), "dependency cycles between source files:\n{}", cycles.join("\n"));
}
