//! File formats: [`npy`] (NumPy arrays), MXNet's [`recordio`] (insightface's
//! training sets), insightface's pickled [`verification`] pairs (`.bin`)
//! and the crate's [`safetensors`] writer (deterministic
//! headers, atomic writes). The codebook, network
//! and training-checkpoint formats live with their types
//! (tokenizer::codebook, backbone::checkpoint, train::checkpoint). Every
//! file the crate writes goes through [`AtomicFile`].

pub mod npy;
pub mod recordio;
pub mod safetensors;
pub mod verification;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A file written under a temporary name beside its target (`<name>.tmp`),
/// flushed to disk and renamed over the target by [`AtomicFile::commit`]:
/// a reader never sees a partial file, and a failed or interrupted write
/// leaves the previous file in place (dropping without `commit` removes
/// the temporary file).
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        Ok(AtomicFile { path: path.to_path_buf(), tmp, writer: Some(std::io::BufWriter::with_capacity(1 << 20, f)) })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| Error::file(&self.path, "already committed"))?;
        w.write_all(bytes).map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let io = |e: std::io::Error| Error::file(&self.path, format!("cannot write: {e}"));
        let w = self.writer.take().ok_or_else(|| Error::file(&self.path, "already committed"))?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Appends `line` and a newline to `path` (created if missing): logs and
/// CSV files that grow as a run goes.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::file(path, format!("cannot write: {e}"));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    writeln!(f, "{line}").map_err(io)
}

/// Writes `bytes` to `path` atomically ([`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}
