//! insightface's verification sets (`lfw.bin`, `cfp_fp.bin`,
//! `agedb_30.bin`, …): a Python pickle of the tuple `(bins, issame_list)`,
//! where `bins` lists 2·P encoded images (JPEG or PNG bytes; pair i is
//! images 2i and 2i + 1) and `issame_list` lists P booleans (the pair shows
//! one identity). insightface's verification.py loads them with
//! `pickle.load(f, encoding='bytes')` and splits the pairs into 10
//! consecutive folds.
//!
//! The pickle is parsed by the `serde-pickle` crate, which builds values
//! and never imports or calls anything: a file that names a Python global
//! (a NumPy array, say) is refused, not executed. Written with pickle
//! protocol 3 (Python 3 reads it with or without `encoding='bytes'`);
//! insightface's own files (protocol 2, Python 2 `str` images) read too.

use std::path::Path;

use serde_pickle::{DeOptions, SerOptions, Value};

use crate::error::{Error, Result};

/// A verification set: the images of P pairs and whether each pair is of
/// one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct PairSet {
    /// 2·P encoded images; pair i is `images[2i]`, `images[2i + 1]`.
    pub images: Vec<Vec<u8>>,
    /// P flags: pair i shows the same identity.
    pub issame: Vec<bool>,
}

impl PairSet {
    /// The number of pairs.
    pub fn pairs(&self) -> usize {
        self.issame.len()
    }

    /// Checks the counts: 2·P images for P flags, at least one pair.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.issame.is_empty() {
            return Err(Error::file(path, "no pairs"));
        }
        if self.images.len() != 2 * self.issame.len() {
            return Err(Error::file(
                path,
                format!("{} images for {} pairs (two per pair)", self.images.len(), self.issame.len()),
            ));
        }
        Ok(())
    }
}

/// Reads an insightface `.bin` verification set.
pub fn read_bin(path: &Path) -> Result<PairSet> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    parse_bin(path, &bytes)
}

/// Parses the bytes of a `.bin` (`path` names it in errors).
pub fn parse_bin(path: &Path, bytes: &[u8]) -> Result<PairSet> {
    let value = serde_pickle::value_from_slice(bytes, DeOptions::new())
        .map_err(|e| Error::file(path, format!("not a readable pickle: {e}")))?;
    let shape = "a pickled (bins, issame_list) tuple";
    let (bins, issame) = match value {
        Value::Tuple(mut v) | Value::List(mut v) if v.len() == 2 => {
            let issame = v.pop().unwrap_or(Value::None);
            (v.pop().unwrap_or(Value::None), issame)
        }
        other => return Err(Error::file(path, format!("expected {shape}, found {}", kind(&other)))),
    };
    let images = list(path, "bins", bins, |i, v| match v {
        Value::Bytes(b) => Ok(b),
        other => Err(Error::file(path, format!("bins[{i}] is {}, not encoded image bytes", kind(&other)))),
    })?;
    let issame = list(path, "issame_list", issame, |i, v| match v {
        Value::Bool(b) => Ok(b),
        Value::I64(x @ (0 | 1)) => Ok(x == 1),
        other => Err(Error::file(path, format!("issame_list[{i}] is {}, not a boolean", kind(&other)))),
    })?;
    let set = PairSet { images, issame };
    set.validate(path)?;
    Ok(set)
}

/// Writes `set` as an insightface `.bin` (atomically).
pub fn write_bin(path: &Path, set: &PairSet) -> Result<()> {
    set.validate(path)?;
    let value = Value::Tuple(vec![
        Value::List(set.images.iter().map(|b| Value::Bytes(b.clone())).collect()),
        Value::List(set.issame.iter().map(|&b| Value::Bool(b)).collect()),
    ]);
    let bytes = serde_pickle::value_to_vec(&value, SerOptions::new())
        .map_err(|e| Error::file(path, format!("cannot pickle: {e}")))?;
    crate::io::write_atomic(path, &bytes)
}

/// The items of a pickled list (or tuple) `name`, each through `item`.
fn list<T>(path: &Path, name: &str, v: Value, item: impl Fn(usize, Value) -> Result<T>) -> Result<Vec<T>> {
    match v {
        Value::List(v) | Value::Tuple(v) => v.into_iter().enumerate().map(|(i, x)| item(i, x)).collect(),
        other => Err(Error::file(path, format!("{name} is {}, not a list", kind(&other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a boolean",
        Value::I64(_) | Value::Int(_) => "an integer",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a string",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
}
