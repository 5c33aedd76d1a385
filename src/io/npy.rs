//! `.npy` files (NumPy's format): reading with the header checked against
//! the data before anything is allocated, and writing f32 matrices.

use std::path::Path;

use crate::error::{Error, Result};

/// An opened `.npy` file: the reader, its shape and its plain dtype
/// ("<f4", "|u1", ...).
pub type NpyParts<'a> = (npyz::NpyFile<&'a [u8]>, Vec<usize>, String);

/// Opens the C-order `.npy` file in `bytes` (read from `path`, named in
/// errors). The header must describe exactly the data that follows it: the
/// element count is the product of the shape (checked, never wrapped) and
/// the data holds exactly that many elements of the dtype's size, so a
/// reader allocates at most the file's size.
pub fn open_npy<'a>(path: &Path, bytes: &'a [u8]) -> Result<NpyParts<'a>> {
    let bad = |m: String| Error::file(path, m);
    // npyz allocates the header length it reads, and multiplies the shape
    // unchecked (a panic or a wrapped count): both are checked here first.
    let header = npy_header(bytes).map_err(bad)?;
    if let Some(shape) = npy_header_shape(header) {
        // Every partial product npyz forms (strides, in either order) is at
        // most the product of the nonzero dimensions.
        if shape.iter().filter(|&&d| d != 0).try_fold(1u64, |a, &d| a.checked_mul(d)).is_none() {
            return Err(bad(format!("shape {shape:?} has more elements than fit in memory")));
        }
    }
    let mut data: &'a [u8] = bytes;
    let header = npyz::NpyHeader::from_reader(&mut data).map_err(|e| bad(format!("not a .npy file: {e}")))?;
    if header.order() != npyz::Order::C {
        return Err(bad("expected C (row-major) order, got Fortran order".into()));
    }
    let type_str = match header.dtype() {
        npyz::DType::Plain(t) => t,
        other => return Err(bad(format!("expected a plain numeric dtype, got {other:?}"))),
    };
    let item =
        type_str.num_bytes().filter(|&b| b > 0).ok_or_else(|| bad(format!("dtype {type_str} has no fixed size")))?;
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad(format!("shape {:?} does not fit this machine's sizes", header.shape())))?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match count.and_then(|c| c.checked_mul(item)) {
        Some(need) if need == data.len() => {}
        Some(need) => {
            return Err(bad(format!(
                "its header says shape {shape:?} of {type_str} ({need} bytes of data), the file holds {} bytes after the header",
                data.len()
            )))
        }
        None => return Err(bad(format!("shape {shape:?} of {type_str} has more bytes than fit in memory"))),
    }
    Ok((npyz::NpyFile::with_header(header, data), shape, type_str.to_string()))
}

/// The header text of a `.npy` file: the magic string, a version of 1, 2 or
/// 3 and a header length that fits in the file (npyz allocates the length
/// it reads before reading, so a corrupt length would be an allocation of
/// up to 4 GiB).
fn npy_header(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file: no NUMPY magic string, or shorter than a header".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        2 | 3 => return Err("not a .npy file: truncated header".into()),
        v => return Err(format!("not a .npy file: format version {v}.{} (1, 2 or 3 are)", bytes[7])),
    };
    match start.checked_add(len) {
        Some(end) if end <= bytes.len() => Ok(&bytes[start..end]),
        _ => Err(format!(
            "not a .npy file: a header of {len} bytes, the file holds {} after the prefix",
            bytes.len() - start
        )),
    }
}

/// The shape of a `.npy` header as npyz will read it (the same Python
/// literal parser, py_literal; the last "shape" key), if it is a tuple or
/// list of integers that fit in u64; otherwise npyz reports the problem.
fn npy_header_shape(header: &[u8]) -> Option<Vec<u64>> {
    let text = std::str::from_utf8(header.strip_suffix(b"\n").unwrap_or(header)).ok()?;
    let value: py_literal::Value = text.parse().ok()?;
    let (_, shape) = value.as_dict()?.iter().rev().find(|(k, _)| k.as_string().is_some_and(|k| k == "shape"))?;
    let dims = shape.as_tuple().or(shape.as_list())?;
    dims.iter().map(|d| d.as_integer().and_then(|i| i.to_string().parse::<u64>().ok())).collect()
}

/// Reads a `.npy` array of f32 or f64 (C order) as `(values, shape)`, f64
/// narrowed to f32. Any other dtype or layout, or an unreadable file, is an
/// [`Error::File`].
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad = |m: String| Error::file(path, m);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (npy, shape, dtype) = open_npy(path, &bytes)?;
    let data: Vec<f32> = match dtype.as_str() {
        "<f4" => npy.into_vec::<f32>().map_err(|e| bad(format!("cannot read the values: {e}")))?,
        "<f8" => npy
            .into_vec::<f64>()
            .map_err(|e| bad(format!("cannot read the values: {e}")))?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        other => return Err(bad(format!("expected little-endian f32 (<f4) or f64 (<f8), got {other}"))),
    };
    Ok((data, shape))
}

/// Reads a 2-D `.npy` array of f32 or f64 (C order) with at least one
/// column as `(values, rows, cols)`; see [`read_npy`].
pub fn read_npy_matrix(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let (data, shape) = read_npy(path)?;
    match shape[..] {
        [_, 0] => Err(Error::file(path, format!("expected at least one column, got shape {shape:?}"))),
        [r, c] => Ok((data, r, c)),
        _ => Err(Error::file(path, format!("expected a 2-D array [N, d], got shape {shape:?}"))),
    }
}

/// Reads a 1-D `.npy` array of class labels: any little-endian integer
/// dtype (NumPy's int64 default, int32, uint8, …) whose values are in
/// `0..=u32::MAX`. A negative or too large label is an [`Error::File`]
/// naming its index.
pub fn read_npy_labels(path: &Path) -> Result<Vec<u32>> {
    let bad = |m: String| Error::file(path, m);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (npy, shape, dtype) = open_npy(path, &bytes)?;
    if shape.len() != 1 {
        return Err(bad(format!("expected a 1-D array of labels, got shape {shape:?}")));
    }
    let read = |e: std::io::Error| bad(format!("cannot read the values: {e}"));
    let wide: Vec<i128> = match dtype.as_str() {
        "|u1" => npy.into_vec::<u8>().map_err(read)?.into_iter().map(i128::from).collect(),
        "|i1" => npy.into_vec::<i8>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<u2" => npy.into_vec::<u16>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<i2" => npy.into_vec::<i16>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<u4" => npy.into_vec::<u32>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<i4" => npy.into_vec::<i32>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<u8" => npy.into_vec::<u64>().map_err(read)?.into_iter().map(i128::from).collect(),
        "<i8" => npy.into_vec::<i64>().map_err(read)?.into_iter().map(i128::from).collect(),
        other => return Err(bad(format!("expected little-endian integer labels, got dtype {other}"))),
    };
    wide.iter()
        .enumerate()
        .map(|(i, &y)| u32::try_from(y).map_err(|_| bad(format!("label {i} is {y}, not in 0..=4294967295"))))
        .collect()
}

/// Writes `values` as an f32 `[rows, cols]` array (NPY 1.0, C order),
/// atomically (a temporary file renamed into place).
pub fn write_npy(path: &Path, values: &[f32], rows: usize, cols: usize) -> Result<()> {
    let mut w = NpyWriter::create(path, rows, cols)?;
    w.write_rows(values)?;
    w.finish()
}

/// An NPY 1.0 header for a C-order array of `descr` and `shape` (a
/// Python tuple): the magic (6 bytes), the version (2), the header's
/// length (2), the dict and its newline, padded to a multiple of 64.
fn header(descr: &str, shape: &str) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes
}

/// Writes 1-D int64 `values` (labels) as a `.npy`, atomically.
pub fn write_npy_i64(path: &Path, values: &[i64]) -> Result<()> {
    let mut bytes = header("<i8", &format!("({},)", values.len()));
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    crate::io::write_atomic(path, &bytes)
}

/// An f32 `[rows, cols]` `.npy` written row block by row block (the
/// header first: the shape is known in advance), atomically: nothing is at
/// `path` until [`NpyWriter::finish`] has written every row.
pub struct NpyWriter {
    file: crate::io::AtomicFile,
    path: std::path::PathBuf,
    rows: usize,
    cols: usize,
    written: usize,
}

impl NpyWriter {
    /// Starts `path` for `rows` × `cols` f32 values.
    pub fn create(path: &Path, rows: usize, cols: usize) -> Result<NpyWriter> {
        rows.checked_mul(cols)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| Error::file(path, format!("[{rows}, {cols}] f32 overflows")))?;
        let mut file = crate::io::AtomicFile::create(path)?;
        file.write_all(&header("<f4", &format!("({rows}, {cols})")))?;
        Ok(NpyWriter { file, path: path.to_path_buf(), rows, cols, written: 0 })
    }

    /// Appends whole rows (`values.len()` a multiple of `cols`).
    pub fn write_rows(&mut self, values: &[f32]) -> Result<()> {
        let n = values.len().checked_div(self.cols).unwrap_or(0);
        if values.len() != n * self.cols || self.written + n > self.rows {
            return Err(Error::file(
                &self.path,
                format!(
                    "{} values are not whole rows of {} within the {} rows ({} written)",
                    values.len(),
                    self.cols,
                    self.rows,
                    self.written
                ),
            ));
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_all(&bytes)?;
        self.written += n;
        Ok(())
    }

    /// Checks every row was written, then puts the file in place.
    pub fn finish(self) -> Result<()> {
        if self.written != self.rows {
            return Err(Error::file(&self.path, format!("{} of {} rows written", self.written, self.rows)));
        }
        self.file.commit()
    }
}
