//! The k best of a set of scored ids, as every identification path returns
//! them ([`TopK`]: the prefix decoder, brute force, the nearest centres of
//! the softmax head), with its file format.

use std::cmp::Ordering;

use crate::error::{Error, Result};

/// The k best identities of each query: `ids[b·k + i]` (−1 where there is
/// none, or for every entry of a query whose best score is below the
/// open-set threshold), with `scores[b·k + i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    /// Results per query.
    pub k: usize,
    /// Identity ids, `[B, k]`.
    pub ids: Vec<i64>,
    /// Scores, `[B, k]`.
    pub scores: Vec<f32>,
}

/// Best first: score descending, then id ascending.
pub(crate) fn score_cmp(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// `rows[q]` (best first, at most k) as a [`TopK`], −1 / −inf where a query
/// has fewer than k.
pub(crate) fn pack(rows: &[Vec<(f32, u32)>], k: usize) -> TopK {
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut scores = Vec::with_capacity(rows.len() * k);
    for r in rows {
        for i in 0..k {
            match r.get(i) {
                Some(&(s, id)) => {
                    ids.push(id as i64);
                    scores.push(s);
                }
                None => {
                    ids.push(-1);
                    scores.push(f32::NEG_INFINITY);
                }
            }
        }
    }
    TopK { k, ids, scores }
}

impl TopK {
    /// Writes the result as safetensors: "ids" (I64 `[B, k]`) and "scores"
    /// (F32 `[B, k]`).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let b = self.ids.len() / self.k.max(1);
        let ids: Vec<u8> = self.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let scores: Vec<u8> = self.scores.iter().flat_map(|x| x.to_le_bytes()).collect();
        fn view<'a>(
            dt: safetensors::Dtype,
            shape: Vec<usize>,
            data: &'a [u8],
            path: &std::path::Path,
        ) -> Result<safetensors::tensor::TensorView<'a>> {
            safetensors::tensor::TensorView::new(dt, shape, data).map_err(|e| Error::file(path, e.to_string()))
        }
        let tensors = vec![
            ("ids", view(safetensors::Dtype::I64, vec![b, self.k], &ids, path)?),
            ("scores", view(safetensors::Dtype::F32, vec![b, self.k], &scores, path)?),
        ];
        safetensors::serialize_to_file(tensors, None, path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
    }
}
