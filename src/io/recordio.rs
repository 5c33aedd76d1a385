//! MXNet's RecordIO, as insightface distributes face-recognition training
//! sets (MS1MV2/V3, Glint360K, WebFace*): `train.rec` (the records),
//! `train.idx` (their offsets) and `property` ("classes,height,width").
//!
//! **Framing** (dmlc-core's recordio): each record is written as one or
//! more parts, each a little-endian u32 magic 0xced7230a, a u32 length
//! word `cflag << 29 | length` (length < 2^29), the part's bytes, and zero
//! padding to a multiple of 4 after the record's last part. cflag 0 is a
//! whole record; a record whose data holds the magic at a 4-byte aligned
//! offset is split there — the magic itself is not written — into a first
//! part (1), middle parts (2) and a last part (3); reading puts the magic
//! back between the parts.
//!
//! **Image records** (mxnet.recordio.pack): a 24-byte header — u32 flag,
//! f32 label, u64 id, u64 id2 — then, when flag > 0, `flag` f32 labels
//! (the header's label is then 0), then the encoded image.
//!
//! **insightface's convention** (arcface_torch's MXFaceDataset): when record
//! 0's header has flag > 0, its labels are (a, b) and the images are the
//! records 1 … a − 1 (the records from a to b describe the identities);
//! otherwise every key of the index is an image. An image's class is its
//! label (the first of its labels when it has several).
//!
//! The `.rec` file is memory-mapped: a 100 GB set costs no memory until its
//! pages are read. A corrupt file (a bad magic, a truncated record, parts
//! out of order, an index pointing outside the file or into the middle of a
//! record) is an [`Error::File`] naming the offset, never a panic.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The magic word that starts every part.
pub const MAGIC: u32 = 0xced7_230a;
/// The largest part length (29 bits).
pub const MAX_PART: usize = (1 << 29) - 1;
/// The largest record dmlc-core writes (2^30 bytes, excluded).
pub const MAX_RECORD: usize = 1 << 30;
/// Bytes of an image record's header.
pub const HEADER_BYTES: usize = 24;

/// An image record's header (mxnet.recordio.IRHeader).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageHeader {
    /// 0: one label in `label`; n > 0: n labels in `labels`.
    pub flag: u32,
    /// The labels: one (flag 0) or `flag` of them.
    pub labels: Vec<f32>,
    /// The record's id.
    pub id: u64,
    /// Its high-order id bits (usually 0).
    pub id2: u64,
}

impl ImageHeader {
    /// A header with one label.
    pub fn new(label: f32, id: u64) -> ImageHeader {
        ImageHeader { flag: 0, labels: vec![label], id, id2: 0 }
    }
}

/// Splits an image record into its header and the encoded image.
pub fn unpack(record: &[u8]) -> std::result::Result<(ImageHeader, &[u8]), String> {
    if record.len() < HEADER_BYTES {
        return Err(format!("an image record of {} bytes is shorter than its 24-byte header", record.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(record[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().expect("8 bytes"));
    let flag = u32_at(0);
    let label = f32::from_bits(u32_at(4));
    let (id, id2) = (u64_at(8), u64_at(16));
    let rest = &record[HEADER_BYTES..];
    if flag == 0 {
        return Ok((ImageHeader { flag, labels: vec![label], id, id2 }, rest));
    }
    let n = flag as usize;
    let bytes = n.checked_mul(4).filter(|&b| b <= rest.len()).ok_or_else(|| {
        format!(
            "the header announces {flag} labels ({} bytes); the record has {} bytes after its header",
            n as u64 * 4,
            rest.len()
        )
    })?;
    let labels = rest[..bytes].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok((ImageHeader { flag, labels, id, id2 }, &rest[bytes..]))
}

/// An image record: the header (flag set from the label count: 0 for one
/// label, else the count) and the encoded image.
pub fn pack(header: &ImageHeader, image: &[u8]) -> Vec<u8> {
    let many = header.labels.len() != 1 || header.flag > 0;
    let (flag, label) = if many { (header.labels.len() as u32, 0.0f32) } else { (0, header.labels[0]) };
    let mut out = Vec::with_capacity(HEADER_BYTES + if many { 4 * header.labels.len() } else { 0 } + image.len());
    out.extend(flag.to_le_bytes());
    out.extend(label.to_le_bytes());
    out.extend(header.id.to_le_bytes());
    out.extend(header.id2.to_le_bytes());
    if many {
        header.labels.iter().for_each(|l| out.extend(l.to_le_bytes()));
    }
    out.extend(image);
    out
}

/// A `.rec` file, memory-mapped: records by offset, or in order.
pub struct RecordFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl RecordFile {
    /// Maps `path`.
    pub fn open(path: &Path) -> Result<RecordFile> {
        let f = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        // SAFETY: a read-only private map; the file is not expected to
        // change while it is read (as for every mapped file: a concurrent
        // truncation would fault, as it would for mxnet).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
        Ok(RecordFile { path: path.to_path_buf(), map })
    }

    /// The file's size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The record starting at byte `offset`, and the offset after it.
    /// Borrowed from the map when it is one part; assembled otherwise.
    pub fn read_at(&self, offset: usize) -> Result<(Cow<'_, [u8]>, usize)> {
        let bad = |at: usize, m: String| Error::file(&self.path, format!("record at byte {offset}: {m} (byte {at})"));
        if !offset.is_multiple_of(4) {
            return Err(bad(offset, "records start at multiples of 4".into()));
        }
        let data = &self.map[..];
        let mut at = offset;
        let mut out: Option<Vec<u8>> = None;
        let mut first = true;
        loop {
            let head = data
                .get(at..at.saturating_add(8))
                .ok_or_else(|| bad(at, format!("a part header needs 8 bytes, the file ends at {}", data.len())))?;
            let magic = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
            if magic != MAGIC {
                return Err(bad(at, format!("magic {magic:#010x}, expected {MAGIC:#010x} (not a RecordIO file, or an index pointing inside a record)")));
            }
            let word = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
            let (cflag, len) = (word >> 29, (word & ((1 << 29) - 1)) as usize);
            let start = at + 8;
            let padded = len.div_ceil(4) * 4;
            let body = data.get(start..start + len).ok_or_else(|| {
                bad(at, format!("a part of {len} bytes runs past the end of the file ({} bytes)", data.len()))
            })?;
            let next = (start + padded).min(data.len());
            match (first, cflag) {
                (true, 0) => return Ok((Cow::Borrowed(body), next)),
                (true, 1) | (false, 2) => {
                    let v = out.get_or_insert_with(Vec::new);
                    if v.len() + len + 4 > MAX_RECORD {
                        return Err(bad(at, format!("a record of more than {MAX_RECORD} bytes")));
                    }
                    v.extend_from_slice(body);
                    v.extend_from_slice(&MAGIC.to_le_bytes());
                }
                (false, 3) => {
                    let mut v = out.take().unwrap_or_default();
                    v.extend_from_slice(body);
                    return Ok((Cow::Owned(v), next));
                }
                (true, f) => return Err(bad(at, format!("a record starts with a part of flag {f} (0 or 1 expected)"))),
                (false, f) => {
                    return Err(bad(at, format!("a continued record has a part of flag {f} (2 or 3 expected)")))
                }
            }
            first = false;
            at = next;
        }
    }

    /// Every record in file order with its offset (sequential reading).
    pub fn records(&self) -> Records<'_> {
        Records { file: self, at: 0 }
    }
}

/// [`RecordFile::records`]'s iterator: `(offset, record)`, stopping after
/// the first error.
pub struct Records<'a> {
    file: &'a RecordFile,
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(usize, Cow<'a, [u8]>)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.file.len() {
            return None;
        }
        let at = self.at;
        match self.file.read_at(at) {
            Ok((r, next)) => {
                self.at = next;
                Some(Ok((at, r)))
            }
            Err(e) => {
                self.at = usize::MAX;
                Some(Err(e))
            }
        }
    }
}

/// Writes records (dmlc-core's framing, bit for bit) and, optionally, the
/// `.idx` lines `key\toffset`. Files are written under temporary names and
/// renamed by [`RecordWriter::finish`]: an interrupted write leaves no
/// partial set.
pub struct RecordWriter {
    rec: crate::io::AtomicFile,
    idx: Option<crate::io::AtomicFile>,
    offset: u64,
}

impl RecordWriter {
    /// A writer of `rec` (and of `idx`, when given).
    pub fn create(rec: &Path, idx: Option<&Path>) -> Result<RecordWriter> {
        let idx = idx.map(crate::io::AtomicFile::create).transpose()?;
        Ok(RecordWriter { rec: crate::io::AtomicFile::create(rec)?, idx, offset: 0 })
    }

    /// Appends a record; with an index, under `key`. Returns its offset.
    pub fn write(&mut self, key: u64, record: &[u8]) -> Result<u64> {
        if record.len() >= MAX_RECORD {
            return Err(Error::invalid(
                "RecordWriter::write",
                format!("a record of {} bytes (RecordIO takes less than 2^30)", record.len()),
            ));
        }
        let start = self.offset;
        let magic = MAGIC.to_le_bytes();
        let w = &mut self.rec;
        // One part: its 8 bytes of framing and its data; returns the bytes.
        let put = |w: &mut crate::io::AtomicFile, cflag: u32, part: &[u8]| -> Result<u64> {
            w.write_all(&magic)?;
            w.write_all(&((cflag << 29) | part.len() as u32).to_le_bytes())?;
            w.write_all(part)?;
            Ok(8 + part.len() as u64)
        };
        let mut written = 0u64;
        let mut from = 0usize;
        for i in (0..record.len() / 4 * 4).step_by(4) {
            if record[i..i + 4] == magic {
                written += put(w, if from == 0 { 1 } else { 2 }, &record[from..i])?;
                from = i + 4;
            }
        }
        written += put(w, if from == 0 { 0 } else { 3 }, &record[from..])?;
        let pad = (4 - record.len() % 4) % 4;
        w.write_all(&[0u8; 3][..pad])?;
        self.offset += written + pad as u64;
        if let Some(f) = self.idx.as_mut() {
            f.write_all(format!("{key}\t{start}\n").as_bytes())?;
        }
        Ok(start)
    }

    /// Flushes, syncs and renames the files into place.
    pub fn finish(self) -> Result<()> {
        self.rec.commit()?;
        self.idx.map_or(Ok(()), crate::io::AtomicFile::commit)
    }
}

/// A `.rec` with its `.idx`: records by key (mxnet's MXIndexedRecordIO).
pub struct IndexedRecords {
    file: RecordFile,
    /// (key, offset) in the index's order.
    keys: Vec<(u64, usize)>,
    by_key: std::collections::HashMap<u64, usize>,
}

impl IndexedRecords {
    /// Opens `rec` and reads `idx` (lines `key<TAB>offset`; a key may not
    /// repeat, an offset must lie in the file).
    pub fn open(rec: &Path, idx: &Path) -> Result<IndexedRecords> {
        let file = RecordFile::open(rec)?;
        let text = std::fs::read_to_string(idx).map_err(|e| Error::file(idx, format!("cannot read: {e}")))?;
        let mut keys = Vec::new();
        let mut by_key = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = || Error::file(idx, format!("line {}: {line:?} is not `key<TAB>offset`", n + 1));
            let (k, o) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let (k, o): (u64, usize) = (k.trim().parse().map_err(|_| bad())?, o.trim().parse().map_err(|_| bad())?);
            if o >= file.len() {
                return Err(Error::file(
                    idx,
                    format!("line {}: offset {o} is past the end of {} ({} bytes)", n + 1, rec.display(), file.len()),
                ));
            }
            if by_key.insert(k, o).is_some() {
                return Err(Error::file(idx, format!("line {}: key {k} appears twice", n + 1)));
            }
            keys.push((k, o));
        }
        Ok(IndexedRecords { file, keys, by_key })
    }

    /// The keys in the index's order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.iter().map(|k| k.0)
    }

    /// The number of indexed records.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The record of `key`.
    pub fn get(&self, key: u64) -> Result<Cow<'_, [u8]>> {
        let &o = self
            .by_key
            .get(&key)
            .ok_or_else(|| Error::file(&self.file.path, format!("no record with key {key} in the index")))?;
        Ok(self.file.read_at(o)?.0)
    }

    /// The underlying file.
    pub fn file(&self) -> &RecordFile {
        &self.file
    }
}

/// An insightface training set (`train.rec`, `train.idx`, `property`) as
/// arcface_torch's MXFaceDataset reads it (see the module documentation).
pub struct FaceRecords {
    records: IndexedRecords,
    /// The image records' keys, in dataset order.
    images: Vec<u64>,
    /// `property`'s (classes, height, width), when the file exists.
    property: Option<(usize, usize, usize)>,
    dir: PathBuf,
}

impl FaceRecords {
    /// Opens the set in `dir`.
    pub fn open(dir: &Path) -> Result<FaceRecords> {
        let records = IndexedRecords::open(&dir.join("train.rec"), &dir.join("train.idx"))?;
        let prop_path = dir.join("property");
        let property = match std::fs::read_to_string(&prop_path) {
            Ok(text) => {
                let v: Vec<usize> =
                    text.trim().split(',').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().map_err(
                        |_| Error::file(&prop_path, format!("{:?} is not `classes,height,width`", text.trim())),
                    )?;
                match v[..] {
                    [c, h, w] => Some((c, h, w)),
                    _ => {
                        return Err(Error::file(&prop_path, format!("{:?} is not `classes,height,width`", text.trim())))
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::file(&prop_path, format!("cannot read: {e}"))),
        };
        let rec_path = dir.join("train.rec");
        let first = records.get(0).ok();
        let header =
            first.as_deref().map(unpack).transpose().map_err(|m| Error::file(&rec_path, format!("record 0: {m}")))?;
        let images: Vec<u64> = match header {
            Some((h, _)) if h.flag > 0 => {
                let a = h.labels[0];
                if !(a.is_finite() && a >= 1.0 && a <= u32::MAX as f32) {
                    return Err(Error::file(
                        &rec_path,
                        format!("record 0's header gives {a} as the end of the images"),
                    ));
                }
                let images: Vec<u64> = (1..a as u64).collect();
                if let Some(k) = images.iter().find(|k| !records.by_key.contains_key(k)) {
                    return Err(Error::file(
                        &dir.join("train.idx"),
                        format!("image record {k} (of 1..{}) is not in the index", a as u64),
                    ));
                }
                images
            }
            _ => records.keys().collect(),
        };
        Ok(FaceRecords { records, images, property, dir: dir.to_path_buf() })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// `property`'s (classes, height, width), if the file was there.
    pub fn property(&self) -> Option<(usize, usize, usize)> {
        self.property
    }

    /// Image `i` (in dataset order): its class and encoded bytes.
    pub fn get(&self, i: usize) -> Result<(u32, Cow<'_, [u8]>)> {
        let path = self.dir.join("train.rec");
        let &key =
            self.images.get(i).ok_or_else(|| Error::file(&path, format!("image {i} of {}", self.images.len())))?;
        let rec = self.records.get(key)?;
        let (h, _) = unpack(&rec).map_err(|m| Error::file(&path, format!("record {key}: {m}")))?;
        let label = h.labels[0];
        if !(label.is_finite() && label >= 0.0 && label.fract() == 0.0 && label <= u32::MAX as f32) {
            return Err(Error::file(&path, format!("record {key}: label {label} is not a class index")));
        }
        let start = HEADER_BYTES + if h.flag > 0 { 4 * h.flag as usize } else { 0 };
        let image = match rec {
            Cow::Borrowed(b) => Cow::Borrowed(&b[start..]),
            Cow::Owned(mut v) => {
                v.drain(..start);
                Cow::Owned(v)
            }
        };
        Ok((label as u32, image))
    }
}
