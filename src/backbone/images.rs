//! Face images for the backbone, from .npy files: uint8 `[B, H, W, 3]` RGB
//! (normalized as insightface does, (x/255 − 0.5)/0.5) or f32 `[B, 3, H, W]`
//! already normalized (transposed to NHWC). Embeddings are written with
//! `io::npy::write_npy`.

use std::path::Path;

use crate::error::{Error, Result};

/// insightface's normalization of an 8-bit channel value: (x/255 − 0.5)/0.5.
pub fn normalize(p: u8) -> f32 {
    (p as f32 / 255.0 - 0.5) / 0.5
}

/// NHWC f32 pixels `[B, size, size, 3]` and B, from `path`.
pub fn read_images(path: &Path, size: usize) -> Result<(Vec<f32>, usize)> {
    let bad = |m: String| Error::file(path, m);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (npy, shape, dtype) = crate::io::npy::open_npy(path, &bytes)?;
    match (dtype.as_str(), &shape[..]) {
        ("|u1", &[b, h, w, 3]) if h == size && w == size => {
            let v = npy.into_vec::<u8>().map_err(|e| bad(format!("cannot read the values: {e}")))?;
            Ok((v.iter().map(|&p| normalize(p)).collect(), b))
        }
        ("<f4", &[b, 3, h, w]) if h == size && w == size => {
            let v = npy.into_vec::<f32>().map_err(|e| bad(format!("cannot read the values: {e}")))?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!("element {i} is not finite")));
            }
            let hw = h * w;
            let mut out = vec![0f32; v.len()];
            for n in 0..b {
                for c in 0..3 {
                    for p in 0..hw {
                        out[(n * hw + p) * 3 + c] = v[(n * 3 + c) * hw + p];
                    }
                }
            }
            Ok((out, b))
        }
        (d, s) => Err(bad(format!(
            "expected uint8 [B, {size}, {size}, 3] (RGB) or f32 [B, 3, {size}, {size}] (normalized), got {d} {s:?}"
        ))),
    }
}
