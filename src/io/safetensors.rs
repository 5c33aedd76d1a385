//! Writing safetensors files the crate's way: a deterministic header (keys
//! sorted, metadata included: the safetensors crate serializes metadata
//! from a HashMap in a per-process random order, so the same content would
//! not give the same bytes), the data streamed, and the file written
//! atomically ([`crate::io::AtomicFile`]). Reading stays with the
//! safetensors crate.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// One tensor to write: its name, safetensors dtype name ("F32", "BF16",
/// "U16", "I64", …), shape, and little-endian bytes (as many as the shape
/// and dtype say: checked).
pub struct Entry<'a> {
    /// The tensor's name.
    pub name: String,
    /// The dtype as safetensors spells it.
    pub dtype: &'static str,
    /// The shape.
    pub shape: Vec<usize>,
    /// The data, little-endian.
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" => 1,
        "F16" | "BF16" | "U16" | "I16" => 2,
        "F32" | "U32" | "I32" => 4,
        "F64" | "U64" | "I64" => 8,
        _ => return None,
    })
}

/// Writes `entries` (in their order in the data; the header lists them
/// sorted by name) and `metadata` to `path` atomically (see the module
/// documentation). Names must be unique and not `__metadata__`.
pub fn write(path: &Path, entries: &[Entry<'_>], metadata: &BTreeMap<String, String>) -> Result<()> {
    let bad = |m: String| Error::file(path, m);
    // A BTreeMap: the keys come out sorted whatever serde_json's features.
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(|e| bad(e.to_string()))?);
    }
    let mut offset = 0usize;
    for e in entries {
        let size = dtype_size(e.dtype).ok_or_else(|| bad(format!("{}: unknown dtype {}", e.name, e.dtype)))?;
        let want = e.shape.iter().try_fold(size, |a, &d| a.checked_mul(d));
        if want != Some(e.bytes.len()) {
            return Err(bad(format!("{}: {} bytes for shape {:?} of {}", e.name, e.bytes.len(), e.shape, e.dtype)));
        }
        let end = offset.checked_add(e.bytes.len()).ok_or_else(|| bad("sizes overflow".into()))?;
        let value = serde_json::json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end] });
        if e.name == "__metadata__" || header.insert(e.name.clone(), value).is_some() {
            return Err(bad(format!("tensor name {:?} used twice or reserved", e.name)));
        }
        offset = end;
    }
    let mut text = serde_json::to_string(&header).map_err(|e| bad(e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(' '); // the data starts 8-byte aligned, as the safetensors crate writes it
    }
    let mut f = crate::io::AtomicFile::create(path)?;
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    for e in entries {
        f.write_all(&e.bytes)?;
    }
    f.commit()
}

/// Little-endian bytes of a slice of plain values.
pub fn le_bytes<T: bytemuck::Pod>(v: &[T]) -> std::borrow::Cow<'_, [u8]> {
    // The target is little-endian (checked at compile time below): the
    // values' memory is their file bytes.
    std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
}

#[cfg(not(target_endian = "little"))]
compile_error!("gif-fr writes tensors' memory as little-endian file data: big-endian targets are not supported");
