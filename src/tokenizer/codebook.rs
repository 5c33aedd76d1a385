//! The codebook: every identity's code (l tokens in [0, v)), its unit code
//! vector, the prefix trie of the codes, and the file format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

/// Checks that every row of `vectors` (`[n, dim]`) is finite and of unit
/// norm (within 1e-3).
fn check_norms(vectors: &[f32], dim: usize) -> std::result::Result<(), String> {
    for (i, row) in vectors.chunks(dim).enumerate() {
        let ss: f64 = row.iter().map(|&x| x as f64 * x as f64).sum();
        if !ss.is_finite() || (ss.sqrt() - 1.0).abs() > 1e-3 {
            return Err(format!("code vector {i} has norm {} (must be finite and 1)", ss.sqrt()));
        }
    }
    Ok(())
}

/// Version of the file layout written by [`Codebook::save`].
pub const FORMAT_VERSION: u32 = 1;

/// The prefix trie of all codes, flat and GPU-friendly: per level, a CSR of
/// the nodes' children.
///
/// Level `j` (0..l) holds the nodes reached by `j` tokens; level 0 is the
/// root alone. Node `i` of level `j` has children (edges)
/// `node_ptr[j][i]..node_ptr[j][i + 1]`, sorted by token; edge `e` carries
/// `token[j][e]` and leads to node `child[j][e]` of level `j + 1`, or, at the
/// last level, to the identity `child[l - 1][e]` (a leaf is an identity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trie {
    /// Per level: CSR row pointers, one more than the level's nodes.
    pub node_ptr: Vec<Vec<u32>>,
    /// Per level: the token of each edge.
    pub token: Vec<Vec<u16>>,
    /// Per level: the node of the next level (or the identity, at the last
    /// level) each edge leads to.
    pub child: Vec<Vec<u32>>,
}

impl Trie {
    /// Builds the trie of `n` codes of `l` tokens (row-major); two equal
    /// codes are an error with the two identities (smaller first).
    fn build(codes: &[u16], n: usize, l: usize) -> std::result::Result<Trie, (usize, usize)> {
        let code = |i: usize| &codes[i * l..(i + 1) * l];
        let mut ord: Vec<u32> = (0..n as u32).collect();
        {
            use rayon::slice::ParallelSliceMut;
            ord.par_sort_unstable_by(|&a, &b| code(a as usize).cmp(code(b as usize)));
        }
        // new_prefix[i]: the prefix of length j of ord[i] differs from ord[i - 1]'s.
        let mut new_prefix: Vec<bool> = (0..n).map(|i| i == 0).collect();
        let (mut node_ptr, mut token, mut child) =
            (Vec::with_capacity(l), Vec::with_capacity(l), Vec::with_capacity(l));
        for j in 0..l {
            let new_next: Vec<bool> =
                (0..n).map(|i| new_prefix[i] || code(ord[i] as usize)[j] != code(ord[i - 1] as usize)[j]).collect();
            let (mut ptr, mut tok, mut ch) = (Vec::new(), Vec::new(), Vec::new());
            let mut next_node = 0u32;
            for i in 0..n {
                if new_prefix[i] {
                    ptr.push(tok.len() as u32);
                }
                if new_next[i] {
                    tok.push(code(ord[i] as usize)[j]);
                    ch.push(if j + 1 == l { ord[i] } else { next_node });
                    next_node += 1;
                }
            }
            // At the last level every sorted code after the first must
            // differ from the one before it.
            if j + 1 == l {
                if let Some(i) = (1..n).find(|&i| !new_next[i]) {
                    let (a, b) = (ord[i - 1] as usize, ord[i] as usize);
                    return Err((a.min(b), a.max(b)));
                }
            }
            ptr.push(tok.len() as u32);
            node_ptr.push(ptr);
            token.push(tok);
            child.push(ch);
            new_prefix = new_next;
        }
        Ok(Trie { node_ptr, token, child })
    }

    /// The identity whose code is `code`, if any.
    pub fn lookup(&self, code: &[u16]) -> Option<usize> {
        if code.len() != self.token.len() {
            return None;
        }
        let mut node = 0usize;
        for (j, &t) in code.iter().enumerate() {
            let (lo, hi) = (*self.node_ptr[j].get(node)? as usize, *self.node_ptr[j].get(node + 1)? as usize);
            let e = lo + self.token[j][lo..hi].binary_search(&t).ok()?;
            node = self.child[j][e] as usize;
        }
        Some(node)
    }

    /// Number of nodes at each level (level 0 is the root).
    pub fn nodes_per_level(&self) -> Vec<usize> {
        self.node_ptr.iter().map(|p| p.len() - 1).collect()
    }
}

/// Per-level statistics of a codebook's trie.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelStats {
    /// Depth: number of tokens fixed (0 = root).
    pub level: usize,
    /// Nodes at this level.
    pub nodes: usize,
    /// `nodes / v^level`: how much of the possible prefixes are used.
    pub fill: f64,
    /// Fewest identities under one node of this level.
    pub min_subtree: usize,
    /// Most identities under one node of this level.
    pub max_subtree: usize,
}

/// Identity codes and code vectors of N identities.
#[derive(Clone, Debug)]
pub struct Codebook {
    vocab: usize,
    length: usize,
    dim: usize,
    seed: u64,
    codes: Vec<u16>,
    vectors: Vectors,
    trie: Trie,
}

impl PartialEq for Codebook {
    fn eq(&self, other: &Codebook) -> bool {
        (self.vocab, self.length, self.dim, self.seed) == (other.vocab, other.length, other.dim, other.seed)
            && self.codes == other.codes
            && self.vectors().ok() == other.vectors().ok()
    }
}

/// The code vectors: in memory (made by the tokenizer), or still in the
/// mapped file they were loaded from, read and checked the first time they
/// are asked for (decoding and `codebook-info` never ask, so a large
/// codebook loads in the time and memory of its codes).
#[derive(Clone, Debug)]
enum Vectors {
    Owned(Vec<f32>),
    Mapped {
        file: Arc<memmap2::Mmap>,
        /// The tensor's bytes in the file.
        range: std::ops::Range<usize>,
        path: PathBuf,
        /// The values (a copy unless the mapping can be read in place) or
        /// why they are invalid; filled on first use.
        values: Arc<OnceLock<std::result::Result<Option<Vec<f32>>, String>>>,
    },
}

impl Codebook {
    /// A codebook from its parts, validated: `codes` is `[n, length]` with
    /// tokens `< vocab`, all codes distinct; `vectors` is `[n, dim]`, finite,
    /// each row of unit norm (within 1e-3).
    pub fn from_parts(
        vocab: usize,
        length: usize,
        dim: usize,
        seed: u64,
        codes: Vec<u16>,
        vectors: Vec<f32>,
    ) -> Result<Codebook> {
        const OP: &str = "Codebook";
        if length == 0 || dim == 0 {
            return Err(Error::invalid(OP, format!("length and dim must be positive, got {length} and {dim}")));
        }
        let trie = Codebook::check_codes(vocab, length, &codes)?;
        let n = codes.len() / length;
        if vectors.len() != n * dim {
            return Err(Error::Shape {
                op: OP,
                expected: format!("vectors [{n}, {dim}] ({} values)", n * dim),
                got: format!("{} values", vectors.len()),
            });
        }
        check_norms(&vectors, dim).map_err(|m| Error::invalid(OP, m))?;
        Ok(Codebook { vocab, length, dim, seed, codes, vectors: Vectors::Owned(vectors), trie })
    }

    /// Checks the codes (`[n, length]`, tokens below `vocab`, all distinct)
    /// and builds their trie.
    fn check_codes(vocab: usize, length: usize, codes: &[u16]) -> Result<Trie> {
        const OP: &str = "Codebook";
        if !(2..=65535).contains(&vocab) {
            return Err(Error::invalid(OP, format!("vocab must be in 2..=65535, got {vocab}")));
        }
        if length == 0 {
            return Err(Error::invalid(OP, "the code length must be positive"));
        }
        if !codes.len().is_multiple_of(length) || codes.is_empty() {
            return Err(Error::invalid(OP, format!("{} tokens do not form codes of length {length}", codes.len())));
        }
        let n = codes.len() / length;
        if n > u32::MAX as usize {
            return Err(Error::invalid(OP, format!("at most {} identities, got {n}", u32::MAX)));
        }
        if let Some(i) = codes.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::invalid(
                OP,
                format!(
                    "identity {} has token {} at position {}, not below vocab {vocab}",
                    i / length,
                    codes[i],
                    i % length
                ),
            ));
        }
        Trie::build(codes, n, length)
            .map_err(|(a, b)| Error::invalid(OP, format!("identities {a} and {b} share a code")))
    }

    /// Number of identities N.
    pub fn len(&self) -> usize {
        self.codes.len() / self.length
    }
    /// Always false: a codebook has at least one identity.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
    /// Vocabulary v: tokens are in `[0, v)`.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Code length l.
    pub fn length(&self) -> usize {
        self.length
    }
    /// Dimension d of the code vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The seed the codebook was made with.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// All codes, row-major `[N, l]`.
    pub fn codes(&self) -> &[u16] {
        &self.codes
    }
    /// All unit code vectors, row-major `[N, d]`. A loaded codebook reads
    /// them from its file the first time (and checks every norm then): an
    /// invalid vector is an error naming the file.
    pub fn vectors(&self) -> Result<&[f32]> {
        match &self.vectors {
            Vectors::Owned(v) => Ok(v),
            Vectors::Mapped { file, range, path, values } => {
                let bytes = &file[range.clone()];
                let dim = self.dim;
                let got = values.get_or_init(|| {
                    // In place when the bytes are aligned f32 of this
                    // machine's (little-endian) order; else a copy.
                    let in_place = cfg!(target_endian = "little")
                        .then(|| bytemuck::try_cast_slice::<u8, f32>(bytes).ok())
                        .flatten();
                    match in_place {
                        Some(v) => check_norms(v, dim).map(|()| None),
                        None => {
                            let v: Vec<f32> =
                                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                            check_norms(&v, dim).map(|()| Some(v))
                        }
                    }
                });
                match got {
                    Ok(Some(v)) => Ok(v),
                    Ok(None) => bytemuck::try_cast_slice(bytes)
                        .map_err(|e| Error::file(path, format!("the vectors' bytes: {e}"))),
                    Err(m) => Err(Error::file(path, m.clone())),
                }
            }
        }
    }
    /// The prefix trie.
    pub fn trie(&self) -> &Trie {
        &self.trie
    }
    /// The codes and the trie, taken out (the decoder keeps them without
    /// a copy).
    pub(crate) fn into_codes_and_trie(self) -> (Vec<u16>, Trie) {
        (self.codes, self.trie)
    }
    /// The code of identity `id`.
    pub fn code_of(&self, id: usize) -> Option<&[u16]> {
        self.codes.get(id * self.length..(id + 1) * self.length)
    }
    /// The unit code vector of identity `id` (None past the last; an
    /// error as [`Codebook::vectors`]).
    pub fn vector_of(&self, id: usize) -> Result<Option<&[f32]>> {
        Ok(self.vectors()?.get(id * self.dim..(id + 1) * self.dim))
    }
    /// The identity whose code is `code`, if any.
    pub fn identity_of(&self, code: &[u16]) -> Option<usize> {
        self.trie.lookup(code)
    }

    /// Per-level statistics: nodes, fill, and the smallest and largest
    /// number of identities under one node.
    pub fn stats(&self) -> Vec<LevelStats> {
        let l = self.length;
        // Identities under each node, from the bottom level up: at the last
        // level every edge is one identity.
        let mut next: Vec<usize> = Vec::new();
        let mut out = Vec::with_capacity(l);
        for j in (0..l).rev() {
            let ptr = &self.trie.node_ptr[j];
            let ch = &self.trie.child[j];
            let sizes: Vec<usize> = ptr
                .windows(2)
                .map(|w| {
                    if j + 1 == l {
                        (w[1] - w[0]) as usize
                    } else {
                        (w[0]..w[1]).map(|e| next[ch[e as usize] as usize]).sum()
                    }
                })
                .collect();
            out.push(LevelStats {
                level: j,
                nodes: sizes.len(),
                fill: sizes.len() as f64 / (self.vocab as f64).powi(j as i32),
                min_subtree: sizes.iter().copied().min().unwrap_or(0),
                max_subtree: sizes.iter().copied().max().unwrap_or(0),
            });
            next = sizes;
        }
        out.reverse();
        out
    }

    /// A human-readable summary (`gif-fr codebook-info`).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "identities {}  vocab {}  length {}  dim {}  seed {}",
            self.len(),
            self.vocab,
            self.length,
            self.dim,
            self.seed
        );
        let _ = writeln!(s, "level  nodes        fill        smallest subtree  largest subtree");
        for st in self.stats() {
            let _ = writeln!(
                s,
                "{:>5}  {:>11}  {:>10.3e}  {:>16}  {:>15}",
                st.level, st.nodes, st.fill, st.min_subtree, st.max_subtree
            );
        }
        s
    }

    /// Writes the codebook as a safetensors file: tensors "vectors" (F32
    /// `[N, d]`) and "codes" (U16 `[N, l]`), metadata "format_version",
    /// "length", "seed", "vocab"; the same codebook gives a byte-identical
    /// file, written atomically (crate::io::safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        use crate::io::safetensors::{le_bytes, write, Entry};
        let (n, l, d) = (self.len(), self.length, self.dim);
        let metadata: BTreeMap<String, String> = [
            ("format_version", FORMAT_VERSION.to_string()),
            ("length", l.to_string()),
            ("seed", self.seed.to_string()),
            ("vocab", self.vocab.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let entries = [
            Entry { name: "vectors".into(), dtype: "F32", shape: vec![n, d], bytes: le_bytes(self.vectors()?) },
            Entry { name: "codes".into(), dtype: "U16", shape: vec![n, l], bytes: le_bytes(&self.codes) },
        ];
        write(path, &entries, &metadata)
    }

    /// Reads and validates a codebook file: the safetensors structure, the
    /// metadata, the tensors' dtypes and shapes, the token range and the
    /// uniqueness of codes. Any problem is an [`Error::File`] naming it. The
    /// code vectors stay in the (memory-mapped) file until
    /// [`Codebook::vectors`] reads them and checks every norm.
    pub fn load(path: &Path) -> Result<Codebook> {
        let bad = |m: String| Error::file(path, m);
        let f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only and private; the file is not expected
        // to change while it is read (a concurrent writer could only make the
        // validation below fail or pass on the data it sees).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(format!("invalid header: {e}")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let field = |k: &str| -> Result<u64> {
            let v = md.get(k).ok_or_else(|| bad(format!("metadata has no \"{k}\"")))?;
            v.parse::<u64>().map_err(|_| bad(format!("metadata \"{k}\" = {v:?} is not a whole number")))
        };
        let version = field("format_version")?;
        if version != FORMAT_VERSION as u64 {
            return Err(bad(format!("format_version {version}; this build reads {FORMAT_VERSION}")));
        }
        let (vocab, length, seed) = (field("vocab")? as usize, field("length")? as usize, field("seed")?);
        let codes_t = st.tensor("codes").map_err(|e| bad(format!("no tensor \"codes\": {e}")))?;
        let vecs_t = st.tensor("vectors").map_err(|e| bad(format!("no tensor \"vectors\": {e}")))?;
        if codes_t.dtype() != safetensors::Dtype::U16 {
            return Err(bad(format!("\"codes\" has dtype {:?}, expected U16", codes_t.dtype())));
        }
        if vecs_t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("\"vectors\" has dtype {:?}, expected F32", vecs_t.dtype())));
        }
        let (cs, vs) = (codes_t.shape(), vecs_t.shape());
        if cs.len() != 2 || vs.len() != 2 || cs[0] != vs[0] || cs[1] != length {
            return Err(bad(format!("\"codes\" {cs:?} and \"vectors\" {vs:?} must be [N, {length}] and [N, d]")));
        }
        let codes: Vec<u16> = codes_t.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        let (n, dim) = (cs[0], vs[1]);
        if dim == 0 {
            return Err(bad("the code vectors have 0 dimensions".into()));
        }
        let trie = Codebook::check_codes(vocab, length, &codes).map_err(|e| match e {
            Error::InvalidArgument { message, .. } => bad(message),
            other => other,
        })?;
        // Where the vectors' bytes are in the file (safetensors checked
        // that they lie inside it and match the shape).
        let start = vecs_t.data().as_ptr() as usize - map.as_ptr() as usize;
        let range = start..start + n * dim * 4;
        let vectors =
            Vectors::Mapped { file: Arc::new(map), range, path: path.to_path_buf(), values: Arc::new(OnceLock::new()) };
        Ok(Codebook { vocab, length, dim, seed, codes, vectors, trie })
    }
}
