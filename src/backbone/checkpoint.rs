//! insightface checkpoints: PyTorch state dicts of iresnet.py stored as
//! safetensors, with the same names (conv1.weight, bn1.running_mean,
//! layer1.0.conv1.weight, fc.weight, features.weight, …).
//!
//! On load, conv weights go from OIHW to OHWI and `fc.weight`'s columns from
//! PyTorch's (c, h, w) flattening to the crate's NHWC (h, w, c); save does
//! the inverse, so a file round-trips. `num_batches_tracked` entries are
//! accepted (and written as 0). A missing, unexpected or mis-shaped key, a
//! non-float dtype, a non-finite value or a negative BatchNorm running
//! variance is an error naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use super::conv::cpu::{ohwi_to_oihw, oihw_to_ohwi};
use super::iresnet::{IResNet, IResNetConfig};
use crate::error::{Error, Result};
use crate::runtime::device::Device;
use crate::runtime::tensor::Tensor;

const TRACKED: &str = ".num_batches_tracked";

/// How a state entry is stored in the PyTorch file.
enum Layout {
    /// Same as the crate's.
    Same,
    /// A conv weight: PyTorch OIHW, the crate OHWI.
    Conv,
    /// `fc.weight`: columns (c, h, w) in PyTorch, (h, w, c) here.
    Fc { c: usize, hw: usize },
}

fn layout(name: &str, shape: &[usize], cfg: &IResNetConfig) -> Layout {
    if shape.len() == 4 {
        Layout::Conv
    } else if name == "fc.weight" {
        let hw = cfg.final_hw();
        Layout::Fc { c: cfg.widths[3], hw: hw * hw }
    } else {
        Layout::Same
    }
}

/// The PyTorch shape of an entry whose crate shape is `shape`.
fn torch_shape(shape: &[usize]) -> Vec<usize> {
    match shape {
        [o, k1, k2, i] => vec![*o, *i, *k1, *k2],
        s => s.to_vec(),
    }
}

/// Columns (c, hw) → (hw, c) of an `[e, c·hw]` matrix, or back (`to_torch`).
fn permute_fc(w: &[f32], c: usize, hw: usize, to_torch: bool) -> Vec<f32> {
    let e = w.len() / (c * hw);
    let mut out = vec![0f32; w.len()];
    for r in 0..e {
        for ch in 0..c {
            for p in 0..hw {
                let (torch, ours) = (r * c * hw + ch * hw + p, r * c * hw + p * c + ch);
                if to_torch {
                    out[torch] = w[ours];
                } else {
                    out[ours] = w[torch];
                }
            }
        }
    }
    out
}

impl IResNet {
    /// A network of `cfg` with the weights of the safetensors state dict at
    /// `path`, on `device`.
    pub fn load(path: &Path, cfg: IResNetConfig, device: &Device) -> Result<IResNet> {
        let bad = |m: String| Error::file(path, m);
        let f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        // SAFETY: read-only private map; a concurrent writer could only make
        // the validation below fail or pass on the data it sees.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let mut net = IResNet::build(cfg.clone(), device, None)?;
        let expected: BTreeMap<String, Vec<usize>> =
            net.state().into_iter().map(|(k, t)| (k, t.shape().to_vec())).collect();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut seen = 0usize;
        for name in &names {
            let view = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if let Some(prefix) = name.strip_suffix(TRACKED) {
                if !expected.contains_key(&format!("{prefix}.running_mean")) {
                    return Err(bad(format!("unexpected key {name:?} (this is not a state dict of {cfg}?)")));
                }
                continue;
            }
            let Some(shape) = expected.get(name) else {
                return Err(bad(format!("unexpected key {name:?} (a different architecture?)")));
            };
            let want = torch_shape(shape);
            if view.shape() != want {
                return Err(bad(format!("{name}: shape {:?}, expected {want:?} for {cfg}", view.shape())));
            }
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                }
                safetensors::Dtype::F16 => {
                    view.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                }
                safetensors::Dtype::BF16 => {
                    view.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                }
                other => return Err(bad(format!("{name}: dtype {other:?}, expected F32, F16 or BF16"))),
            };
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("{name}: element {i} is {} (non-finite weights)", values[i])));
            }
            let ours = match layout(name, shape, &cfg) {
                Layout::Same => values,
                Layout::Conv => oihw_to_ohwi(&values, shape[0], shape[3], shape[1]),
                Layout::Fc { c, hw } => permute_fc(&values, c, hw, false),
            };
            net.set(name, Tensor::from_slice(device, shape, &ours)?).map_err(|e| match e {
                Error::InvalidArgument { message, .. } => bad(message),
                other => other,
            })?;
            seen += 1;
        }
        if seen != expected.len() {
            let missing = expected.keys().find(|k| !names.contains(k)).cloned().unwrap_or_default();
            return Err(bad(format!("missing key {missing:?} ({} of {} parameters found)", seen, expected.len())));
        }
        Ok(net)
    }

    /// Writes the network as a PyTorch-layout safetensors state dict (F32;
    /// `num_batches_tracked` as I64 0 for every BatchNorm).
    pub fn save(&self, path: &Path) -> Result<()> {
        use crate::io::safetensors::{le_bytes, write, Entry};
        let cfg = self.config().clone();
        let mut entries: Vec<Entry<'_>> = Vec::new();
        for (name, t) in self.state() {
            let shape = t.shape().to_vec();
            let v = t.to_f32_vec()?;
            let torch = match layout(&name, &shape, &cfg) {
                Layout::Same => v,
                Layout::Conv => ohwi_to_oihw(&v, shape[0], shape[3], shape[1]),
                Layout::Fc { c, hw } => permute_fc(&v, c, hw, true),
            };
            if let Some(prefix) = name.strip_suffix(".running_mean") {
                let zero = 0i64.to_le_bytes().to_vec().into();
                entries.push(Entry { name: format!("{prefix}{TRACKED}"), dtype: "I64", shape: vec![], bytes: zero });
            }
            let bytes = le_bytes(&torch).into_owned().into();
            entries.push(Entry { name, dtype: "F32", shape: torch_shape(&shape), bytes });
        }
        write(path, &entries, &BTreeMap::new())
    }
}
