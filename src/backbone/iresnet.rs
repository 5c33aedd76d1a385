//! IResNet (insightface's iresnet.py) on NHWC activations, assembled from
//! the crate's layers: forward in training or eval mode, and backward to
//! the gradient of every parameter.
//!
//! Stem: conv 3x3 (3 → 64) → BN → PReLU; four stages of IBasicBlocks
//! (64, 128, 256, 512 channels; the first block of each has stride 2 and a
//! 1x1 conv + BN downsample), each block
//! `BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN (+ identity)`; then BN,
//! flatten, dropout (training only; insightface's default p = 0), Linear
//! (512·7·7 → 512) and BatchNorm1d (its γ fixed at 1, as insightface has
//! it).
//!
//! Memory: [`IResNet::forward`] keeps the activations its backward needs
//! inside the network; their buffers, and the backward's temporaries, come
//! from a pool of device buffers by shape that is filled by the first step
//! at a batch size and reused by every later one (a new batch size empties
//! it). [`IResNet::infer`] keeps nothing: each block's buffers go back to
//! the pool as soon as the next block has its input.
//!
//! Layouts: activations are `[pixels, C]` (NHWC flattened), conv weights
//! OHWI, and the Linear's input is the NHWC flattening (h, w, c), so
//! `fc.weight`'s columns are a permutation of PyTorch's (c, h, w); the
//! checkpoint code converts both.

use std::collections::BTreeMap;

use crate::train::ParamRef;

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use std::collections::HashMap;

use super::conv::{conv2d_data_grad_into, conv2d_into, conv2d_weight_grad, ConvShape};
use super::norm::{add_assign, bias_add, column_sums, prelu_backward_into, prelu_into, BatchNorm, BnCache, Dropout};
use crate::error::{Error, Result};
use crate::ops::gemm::{self, Op};
use crate::runtime::device::Device;
use crate::runtime::tensor::{DType, Tensor};

/// BatchNorm eps of every layer (insightface: 1e-5).
const BN_EPS: f32 = 1e-5;
/// PReLU's initial slope (PyTorch's default).
const PRELU_INIT: f32 = 0.25;

/// The network's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct IResNetConfig {
    /// Blocks per stage: r18 [2, 2, 2, 2], r34 [3, 4, 6, 3], r50 [3, 4, 14, 3],
    /// r100 [3, 13, 30, 3].
    pub layers: [usize; 4],
    /// Channels of the stem and of each stage (insightface: 64; 64, 128, 256, 512).
    pub stem: usize,
    /// Channels per stage.
    pub widths: [usize; 4],
    /// Input height and width (112; a multiple of 16).
    pub input: usize,
    /// Embedding size (512).
    pub embedding: usize,
    /// Dropout probability before the Linear layer in training, in [0, 1)
    /// (insightface's default 0; its glint360k configs use 0 too).
    pub dropout: f32,
    /// Operand type of the convolutions: F32, or BF16 (tensor cores): each
    /// conv's input, weights and output gradient rounded to bf16 as
    /// PyTorch's autocast does, accumulation and results f32; BatchNorm,
    /// PReLU, the Linear layer and the parameters stay f32.
    pub conv_dtype: DType,
}

impl IResNetConfig {
    /// An insightface architecture by name: "r18", "r34", "r50", "r100".
    pub fn arch(name: &str) -> Result<IResNetConfig> {
        let layers = match name {
            "r18" => [2, 2, 2, 2],
            "r34" => [3, 4, 6, 3],
            "r50" => [3, 4, 14, 3],
            "r100" => [3, 13, 30, 3],
            _ => {
                return Err(Error::invalid(
                    "IResNetConfig::arch",
                    format!("unknown arch {name:?} (r18, r34, r50, r100)"),
                ))
            }
        };
        Ok(IResNetConfig {
            layers,
            stem: 64,
            widths: [64, 128, 256, 512],
            input: 112,
            embedding: 512,
            dropout: 0.0,
            conv_dtype: DType::F32,
        })
    }

    /// Height and width after the four stride-2 stages.
    pub fn final_hw(&self) -> usize {
        self.input / 16
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.input == 0 || self.input % 16 != 0 || self.stem == 0 || self.embedding == 0 {
            return Err(Error::invalid("IResNet", "input must be a positive multiple of 16; widths positive"));
        }
        if self.layers.contains(&0) || self.widths.contains(&0) {
            return Err(Error::invalid("IResNet", "every stage needs at least one block and one channel"));
        }
        if !matches!(self.conv_dtype, DType::F32 | DType::BF16) {
            return Err(Error::invalid(
                "IResNet",
                format!("conv_dtype must be F32 or BF16, got {:?}", self.conv_dtype),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("IResNet", format!("dropout must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }
}

struct Block {
    prefix: String,
    inplanes: usize,
    planes: usize,
    stride: usize,
    bn1: BatchNorm,
    conv1: Tensor,
    bn2: BatchNorm,
    prelu: Tensor,
    conv2: Tensor,
    bn3: BatchNorm,
    downsample: Option<(Tensor, BatchNorm)>,
}

/// What a block's forward keeps for its backward (`x` is its input). The
/// convolutions' operands (`a1`, `p`, and `x_conv`, the downsample's copy
/// of x) are of the conv dtype; with bf16 convolutions `w` holds the bf16
/// copies of conv1, conv2 and the downsample's weights.
struct BlockCache {
    hw: usize,
    x: Tensor,
    x_conv: Option<Tensor>,
    bn1: BnCache,
    a1: Tensor,
    c1: Tensor,
    bn2: BnCache,
    a2: Tensor,
    p: Tensor,
    c2: Tensor,
    bn3: BnCache,
    ds: Option<(Tensor, BnCache)>,
    w: Option<(Tensor, Tensor, Option<Tensor>)>,
}

impl BlockCache {
    fn tensors(self) -> impl Iterator<Item = Tensor> {
        let w = self.w.map(|(a, b, d)| [Some(a), Some(b), d]).into_iter().flatten().flatten();
        [self.x, self.a1, self.c1, self.a2, self.p, self.c2]
            .into_iter()
            .chain(self.ds.map(|d| d.0))
            .chain(self.x_conv)
            .chain(w)
    }
}

/// The stem's activations (`images`: a copy of the input of the conv
/// dtype, kept for the first conv's weight gradient; None when inferring
/// in f32; `w`: conv1's weights in bf16 with bf16 convolutions).
struct StemCache {
    images: Option<Tensor>,
    c0: Tensor,
    bn1: BnCache,
    y0: Tensor,
    w: Option<Tensor>,
}

/// The layers after the last block: `last` (the blocks' output) → bn2 →
/// flatten (`flat`) → dropout (`dropped`, when p > 0) → Linear (`fc`) →
/// BatchNorm1d.
struct HeadCache {
    last: Tensor,
    bn2: BnCache,
    flat: Tensor,
    dropped: Option<(Tensor, Dropout)>,
    fc: Tensor,
    features: BnCache,
}

/// Everything the last [`IResNet::forward`] kept for the backward.
struct ForwardCache {
    batch: usize,
    stem: StemCache,
    blocks: Vec<BlockCache>,
    head: HeadCache,
}

impl ForwardCache {
    fn tensors(self) -> Vec<Tensor> {
        let st = self.stem;
        let mut v: Vec<Tensor> = st.images.into_iter().chain([st.c0, st.y0]).chain(st.w).collect();
        v.extend(self.blocks.into_iter().flat_map(BlockCache::tensors));
        let h = self.head;
        v.extend([h.last, h.flat, h.fc]);
        v.extend(h.dropped.map(|d| d.0));
        v
    }
}

/// Device buffers by shape and dtype, for reuse: `take` pops one (or
/// allocates), `give` puts one back. A run of the same ops at the same
/// batch size takes the same shapes, so after the first it allocates
/// nothing.
#[derive(Default)]
struct Pool {
    batch: usize,
    free: HashMap<(Vec<usize>, DType), Vec<Tensor>>,
    /// Bytes of every buffer this pool allocated (free or in use).
    allocated: usize,
}

impl Pool {
    fn take(&mut self, dev: &Device, shape: &[usize]) -> Result<Tensor> {
        self.take_typed(dev, shape, DType::F32)
    }

    fn take_typed(&mut self, dev: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.free.get_mut(&(shape.to_vec(), dtype)).and_then(Vec::pop) {
            Some(t) => Ok(t),
            None => {
                let t = Tensor::empty(dev, shape, dtype)?;
                self.allocated += t.numel() * dtype.size();
                Ok(t)
            }
        }
    }

    fn give(&mut self, t: Tensor) {
        self.free.entry((t.shape().to_vec(), t.dtype())).or_default().push(t);
    }

    fn give_all(&mut self, ts: impl IntoIterator<Item = Tensor>) {
        ts.into_iter().for_each(|t| self.give(t));
    }

    /// `t` as a convolution operand of `dtype`: None when it already is,
    /// else a rounded copy in a pool buffer.
    fn operand(&mut self, t: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        if t.dtype() == dtype {
            return Ok(None);
        }
        let mut h = self.take_typed(t.device(), t.shape(), dtype)?;
        t.narrow_into(&mut h)?;
        Ok(Some(h))
    }

    /// A convolution's backward from the gradient of its output `d_out`
    /// (f32): returns the weight gradient, and with `data = (w, d_in)`
    /// writes the input's gradient into `d_in`; `x` and `w` are the
    /// forward's operands (of `dtype`), `d_out` is rounded to it first.
    fn conv_backward(
        &mut self,
        dtype: DType,
        d_out: &Tensor,
        x: &Tensor,
        s: &ConvShape,
        data: Option<(&Tensor, &mut Tensor)>,
    ) -> Result<Tensor> {
        let rounded = self.operand(d_out, dtype)?;
        let d = rounded.as_ref().unwrap_or(d_out);
        let dw = conv2d_weight_grad(x, d, s)?;
        if let Some((w, d_in)) = data {
            conv2d_data_grad_into(d, w, s, d_in)?;
        }
        self.give_all(rounded);
        Ok(dw)
    }

    /// `t` converted to a convolution operand of `dtype`, `t` itself going
    /// back to the pool when a copy was made.
    fn convert_operand(&mut self, t: Tensor, dtype: DType) -> Result<Tensor> {
        match self.operand(&t, dtype)? {
            Some(h) => {
                self.give(t);
                Ok(h)
            }
            None => Ok(t),
        }
    }
}

/// The network: parameters (f32) on one device.
pub struct IResNet {
    cfg: IResNetConfig,
    device: Device,
    conv1: Tensor,
    bn1: BatchNorm,
    prelu: Tensor,
    blocks: Vec<Block>,
    bn2: BatchNorm,
    fc_weight: Tensor,
    fc_bias: Tensor,
    features: BatchNorm,
    /// Dropout's seed (the draw of training step t is keyed by (seed, t)).
    seed: u64,
    /// Training forward passes so far.
    step: u64,
    pool: Pool,
    cache: Option<ForwardCache>,
}

fn conv_shape(batch: usize, hw: usize, c_in: usize, c_out: usize, kernel: usize, stride: usize) -> ConvShape {
    ConvShape { batch, height: hw, width: hw, c_in, c_out, kernel, stride, pad: kernel / 2 }
}

impl IResNet {
    /// A network with seeded random weights (Kaiming-normal convolutions,
    /// BN γ = 1 / β = 0, PReLU 0.25, Linear normal with variance 1/fan-in).
    pub fn new(cfg: IResNetConfig, device: &Device, seed: u64) -> Result<IResNet> {
        IResNet::build(cfg, device, Some(seed))
    }

    /// The network with random weights (`seed`), or with zero weights to be
    /// overwritten (None: checkpoint loading).
    pub(crate) fn build(cfg: IResNetConfig, device: &Device, seed: Option<u64>) -> Result<IResNet> {
        cfg.validate()?;
        let mut rng = seed.map(rand::rngs::StdRng::seed_from_u64);
        let mut normal = |shape: &[usize], sd: f32| -> Result<Tensor> {
            let Some(rng) = rng.as_mut() else { return Tensor::zeros(device, shape, DType::F32) };
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| sd * Distribution::<f32>::sample(&StandardNormal, rng)).collect();
            Tensor::from_slice(device, shape, &v)
        };
        let kaiming = |c_in: usize, k: usize| (2.0 / (c_in * k * k) as f32).sqrt();
        let full = |c: usize, v: f32| Tensor::from_slice(device, &[c], &vec![v; c]);
        let bn = |c: usize| BatchNorm::new(device, c, BN_EPS);
        let conv1 = normal(&[cfg.stem, 3, 3, 3], kaiming(3, 3))?;
        let mut blocks = Vec::new();
        let mut inplanes = cfg.stem;
        for (stage, (&n, &planes)) in cfg.layers.iter().zip(&cfg.widths).enumerate() {
            for i in 0..n {
                let stride = if i == 0 { 2 } else { 1 };
                let downsample = if stride != 1 || inplanes != planes {
                    Some((normal(&[planes, 1, 1, inplanes], kaiming(inplanes, 1))?, bn(planes)?))
                } else {
                    None
                };
                blocks.push(Block {
                    prefix: format!("layer{}.{i}", stage + 1),
                    inplanes,
                    planes,
                    stride,
                    bn1: bn(inplanes)?,
                    conv1: normal(&[planes, 3, 3, inplanes], kaiming(inplanes, 3))?,
                    bn2: bn(planes)?,
                    prelu: full(planes, PRELU_INIT)?,
                    conv2: normal(&[planes, 3, 3, planes], kaiming(planes, 3))?,
                    bn3: bn(planes)?,
                    downsample,
                });
                inplanes = planes;
            }
        }
        let hw = cfg.final_hw();
        let fan_in = hw * hw * inplanes;
        Ok(IResNet {
            device: device.clone(),
            conv1,
            bn1: bn(cfg.stem)?,
            prelu: full(cfg.stem, PRELU_INIT)?,
            blocks,
            bn2: bn(inplanes)?,
            fc_weight: normal(&[cfg.embedding, fan_in], 1.0 / (fan_in as f32).sqrt())?,
            fc_bias: full(cfg.embedding, 0.0)?,
            features: bn(cfg.embedding)?,
            seed: seed.unwrap_or(0),
            step: 0,
            pool: Pool::default(),
            cache: None,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IResNetConfig {
        &self.cfg
    }

    /// The device the network lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every parameter and buffer by insightface's state-dict name, in the
    /// crate's layouts (conv weights OHWI, `fc.weight` over NHWC-flattened
    /// inputs).
    pub fn state(&self) -> BTreeMap<String, &Tensor> {
        let mut m = BTreeMap::new();
        m.insert("conv1.weight".into(), &self.conv1);
        insert_bn_state(&mut m, "bn1", &self.bn1);
        m.insert("prelu.weight".into(), &self.prelu);
        for b in &self.blocks {
            let p = &b.prefix;
            insert_bn_state(&mut m, &format!("{p}.bn1"), &b.bn1);
            m.insert(format!("{p}.conv1.weight"), &b.conv1);
            insert_bn_state(&mut m, &format!("{p}.bn2"), &b.bn2);
            m.insert(format!("{p}.prelu.weight"), &b.prelu);
            m.insert(format!("{p}.conv2.weight"), &b.conv2);
            insert_bn_state(&mut m, &format!("{p}.bn3"), &b.bn3);
            if let Some((w, d)) = &b.downsample {
                m.insert(format!("{p}.downsample.0.weight"), w);
                insert_bn_state(&mut m, &format!("{p}.downsample.1"), d);
            }
        }
        insert_bn_state(&mut m, "bn2", &self.bn2);
        m.insert("fc.weight".into(), &self.fc_weight);
        m.insert("fc.bias".into(), &self.fc_bias);
        insert_bn_state(&mut m, "features", &self.features);
        m
    }

    /// The trainable parameters by insightface's names, in
    /// [`IResNet::state`]'s order: every weight and bias except the
    /// BatchNorms' running statistics and `features.weight` (fixed at 1 and
    /// not trained, as in insightface). Exactly the names
    /// [`IResNet::backward`] returns gradients for.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        fn bn<'a>(v: &mut Vec<(String, &'a mut Tensor)>, prefix: &str, b: &'a mut BatchNorm) {
            v.push((format!("{prefix}.weight"), &mut b.weight));
            v.push((format!("{prefix}.bias"), &mut b.bias));
        }
        let mut v: Vec<(String, &mut Tensor)> = Vec::new();
        v.push(("conv1.weight".into(), &mut self.conv1));
        bn(&mut v, "bn1", &mut self.bn1);
        v.push(("prelu.weight".into(), &mut self.prelu));
        for b in &mut self.blocks {
            let p = b.prefix.clone();
            bn(&mut v, &format!("{p}.bn1"), &mut b.bn1);
            v.push((format!("{p}.conv1.weight"), &mut b.conv1));
            bn(&mut v, &format!("{p}.bn2"), &mut b.bn2);
            v.push((format!("{p}.prelu.weight"), &mut b.prelu));
            v.push((format!("{p}.conv2.weight"), &mut b.conv2));
            bn(&mut v, &format!("{p}.bn3"), &mut b.bn3);
            if let Some((w, d)) = &mut b.downsample {
                v.push((format!("{p}.downsample.0.weight"), w));
                bn(&mut v, &format!("{p}.downsample.1"), d);
            }
        }
        bn(&mut v, "bn2", &mut self.bn2);
        v.push(("fc.weight".into(), &mut self.fc_weight));
        v.push(("fc.bias".into(), &mut self.fc_bias));
        v.push(("features.bias".into(), &mut self.features.bias));
        v
    }

    /// The trainable parameters ([`IResNet::params_mut`]) paired with their
    /// gradients from `grads` (as [`IResNet::backward_into`] fills it), for
    /// [`crate::train::Optimizer::step`]. A missing gradient is an error.
    pub fn param_refs<'a>(&'a mut self, grads: &'a BTreeMap<String, Tensor>) -> Result<Vec<ParamRef<'a>>> {
        self.params_mut()
            .into_iter()
            .map(|(name, value)| match grads.get(&name) {
                Some(grad) => Ok(ParamRef { value, grad }),
                None => Err(Error::invalid("IResNet::param_refs", format!("no gradient for {name}"))),
            })
            .collect()
    }

    /// Embeddings `[B, E]` (eval mode) of NHWC images `[B, H, W, 3]` given
    /// as host values, `chunk` images at a time (bounding the activations'
    /// memory).
    pub fn embed(&mut self, images: &[f32], chunk: usize) -> Result<Vec<f32>> {
        let s = self.cfg.input;
        let per = s * s * 3;
        if images.len() % per != 0 || chunk == 0 {
            return Err(Error::invalid(
                "IResNet::embed",
                format!("{} values are not images of {s}x{s}x3", images.len()),
            ));
        }
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("IResNet::embed", format!("pixel value {i} is {}", images[i])));
        }
        let e = self.cfg.embedding;
        let mut out = Vec::with_capacity((images.len() / per).saturating_mul(e));
        for part in images.chunks(per.saturating_mul(chunk)) {
            let b = part.len() / per;
            let x = Tensor::from_slice(&self.device, &[b, s, s, 3], part)?;
            let first = out.len() / e;
            out.extend(self.infer(&x)?.to_vec::<f32>()?);
            if let Some(i) = out[first * e..].iter().position(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    "IResNet::embed",
                    format!(
                        "image {} embeds to a non-finite value ({}): the weights overflow f32 (weights too large, or \
                         a BatchNorm whose running variance + eps is not positive?)",
                        first + i / e,
                        out[first * e + i]
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Replaces the parameter or buffer `name` (a [`IResNet::state`] name)
    /// with `value`, which must have its shape and be f32 on the network's
    /// device.
    pub fn set(&mut self, name: &str, value: Tensor) -> Result<()> {
        const OP: &str = "IResNet::set";
        let slot = self.slot(name).ok_or_else(|| Error::invalid(OP, format!("no parameter named {name:?}")))?;
        if value.shape() != slot.shape() || value.dtype() != DType::F32 || value.device() != slot.device() {
            return Err(Error::Shape {
                op: OP,
                expected: format!("{name}: f32 {:?} on {}", slot.shape(), slot.device()),
                got: format!("{:?} {:?} on {}", value.shape(), value.dtype(), value.device()),
            });
        }
        if name.ends_with(".running_var") {
            // A variance below 0 makes var + eps ≤ 0 possible and every output NaN.
            let v = value.to_f32_vec()?;
            if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(Error::invalid(
                    OP,
                    format!("{name}: channel {i} has variance {} (must be finite and >= 0)", v[i]),
                ));
            }
        }
        *slot = value;
        Ok(())
    }

    /// The dropout draw's position: (seed, training forward passes so
    /// far), for checkpoints.
    pub(crate) fn dropout_position(&self) -> (u64, u64) {
        (self.seed, self.step)
    }
    pub(crate) fn set_dropout_position(&mut self, seed: u64, step: u64) {
        (self.seed, self.step) = (seed, step);
    }

    /// The parameter or buffer `name` (a [`IResNet::state`] name), mutably.
    pub(crate) fn slot(&mut self, name: &str) -> Option<&mut Tensor> {
        fn bn<'a>(b: &'a mut BatchNorm, field: &str) -> Option<&'a mut Tensor> {
            match field {
                "weight" => Some(&mut b.weight),
                "bias" => Some(&mut b.bias),
                "running_mean" => Some(&mut b.running_mean),
                "running_var" => Some(&mut b.running_var),
                _ => None,
            }
        }
        let (head, field) = name.rsplit_once('.')?;
        match head {
            "conv1" if field == "weight" => return Some(&mut self.conv1),
            "prelu" if field == "weight" => return Some(&mut self.prelu),
            "fc" if field == "weight" => return Some(&mut self.fc_weight),
            "fc" if field == "bias" => return Some(&mut self.fc_bias),
            "bn1" => return bn(&mut self.bn1, field),
            "bn2" => return bn(&mut self.bn2, field),
            "features" => return bn(&mut self.features, field),
            _ => {}
        }
        let blk = self.blocks.iter_mut().find(|b| head.starts_with(&format!("{}.", b.prefix)))?;
        let rest = &head[blk.prefix.len() + 1..];
        match (rest, field) {
            ("conv1", "weight") => Some(&mut blk.conv1),
            ("conv2", "weight") => Some(&mut blk.conv2),
            ("prelu", "weight") => Some(&mut blk.prelu),
            ("bn1", f) => bn(&mut blk.bn1, f),
            ("bn2", f) => bn(&mut blk.bn2, f),
            ("bn3", f) => bn(&mut blk.bn3, f),
            ("downsample.0", "weight") => blk.downsample.as_mut().map(|d| &mut d.0),
            ("downsample.1", f) => blk.downsample.as_mut().and_then(|d| bn(&mut d.1, f)),
            _ => None,
        }
    }

    fn check_images(&self, op: &'static str, images: &Tensor) -> Result<usize> {
        let s = self.cfg.input;
        let b = match images.shape() {
            [b, h, w, 3] if *h == s && *w == s && images.dtype() == DType::F32 => *b,
            other => {
                return Err(Error::Shape {
                    op,
                    expected: format!("f32 images [B, {s}, {s}, 3]"),
                    got: format!("{other:?} {:?}", images.dtype()),
                })
            }
        };
        if b == 0 {
            return Err(Error::invalid(op, "empty batch"));
        }
        if images.device() != &self.device {
            return Err(Error::DeviceMismatch { op, a: self.device.to_string(), b: images.device().to_string() });
        }
        Ok(b)
    }

    /// Returns the last forward's buffers to the pool, or empties the pool
    /// when the batch size changes.
    fn recycle(&mut self, batch: usize) {
        if self.pool.batch != batch {
            self.cache = None;
            self.pool = Pool { batch, ..Pool::default() };
        } else if let Some(c) = self.cache.take() {
            self.pool.give_all(c.tensors());
        }
    }

    /// Embeddings `[B, E]` of `images` (`[B, H, W, 3]` f32, normalized as
    /// insightface does: (x/255 − 0.5)/0.5), in training mode (batch
    /// statistics, running statistics updated, dropout) or eval mode. The
    /// activations are kept (in buffers reused from step to step) for
    /// [`IResNet::backward`]; for inference without a backward use
    /// [`IResNet::infer`], which keeps none.
    pub fn forward(&mut self, images: &Tensor, training: bool) -> Result<Tensor> {
        let b = self.check_images("IResNet::forward", images)?;
        self.recycle(b);
        let dropout = if training && self.cfg.dropout > 0.0 {
            self.step += 1;
            Some(Dropout::new(self.cfg.dropout, self.seed, self.step)?)
        } else {
            None
        };
        let (emb, cache) = self.run(images, b, training, dropout, true).inspect_err(|_| self.release_buffers())?;
        self.cache = cache;
        Ok(emb)
    }

    /// Embeddings `[B, E]` in eval mode, keeping no activations (the
    /// memory of about one block); a later [`IResNet::backward`] is an
    /// error until the next [`IResNet::forward`].
    pub fn infer(&mut self, images: &Tensor) -> Result<Tensor> {
        let b = self.check_images("IResNet::infer", images)?;
        self.recycle(b);
        Ok(self.run(images, b, false, None, false).inspect_err(|_| self.release_buffers())?.0)
    }

    /// Bytes held for activations and temporaries: every buffer of the
    /// pool, in use by the kept activations or free (device memory on a
    /// GPU backend, host memory on the CPU). A failed pass releases them.
    pub fn buffer_bytes(&self) -> usize {
        self.pool.allocated
    }

    /// Seeds dropout's draws (a network made by [`IResNet::new`] uses its
    /// seed; a loaded one 0); the step count restarts.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.step = 0;
    }

    /// Frees the kept activations and the pool (the next step allocates
    /// them again).
    pub fn release_buffers(&mut self) {
        self.cache = None;
        self.pool = Pool::default();
    }

    /// The network on `images`: the embeddings (a new tensor) and, when
    /// `keep`, the cache for the backward (else every buffer goes back to
    /// the pool as soon as it is used).
    fn run(
        &mut self,
        images: &Tensor,
        b: usize,
        training: bool,
        dropout: Option<Dropout>,
        keep: bool,
    ) -> Result<(Tensor, Option<ForwardCache>)> {
        let dev = self.device.clone();
        let (s, stem_c, dt) = (self.cfg.input, self.cfg.stem, self.cfg.conv_dtype);
        let pool = &mut self.pool;
        let rows = b * s * s;
        // The stem conv's input: the images rounded (bf16), or as given (f32;
        // a copy is kept for the backward).
        let conv_images = match pool.operand(images, dt)? {
            Some(h) => Some(h),
            None if keep => {
                let mut t = pool.take(&dev, &[rows, 3])?;
                t.copy_from(images)?;
                Some(t)
            }
            None => None,
        };
        let w0 = pool.operand(&self.conv1, dt)?;
        let mut c0 = pool.take(&dev, &[rows, stem_c])?;
        let stem_shape = conv_shape(b, s, 3, stem_c, 3, 1);
        conv2d_into(conv_images.as_ref().unwrap_or(images), w0.as_ref().unwrap_or(&self.conv1), &stem_shape, &mut c0)?;
        let mut y0 = pool.take(&dev, &[rows, stem_c])?;
        let bn1 = self.bn1.forward_into(&c0, training, &mut y0)?;
        let mut x = pool.take(&dev, &[rows, stem_c])?;
        prelu_into(&y0, &self.prelu, &mut x)?;
        let stem = StemCache { images: conv_images, c0, bn1, y0, w: w0 };
        let stem = if keep {
            Some(stem)
        } else {
            pool.give_all([stem.c0, stem.y0].into_iter().chain(stem.images).chain(stem.w));
            None
        };
        let mut hw = s;
        let mut blocks = Vec::with_capacity(if keep { self.blocks.len() } else { 0 });
        for blk in &mut self.blocks {
            let (y, cache) = block_forward(blk, pool, x, b, hw, training, dt)?;
            hw /= blk.stride;
            if keep {
                blocks.push(cache);
            } else {
                pool.give_all(cache.tensors());
            }
            x = y;
        }
        let c4 = self.cfg.widths[3];
        let mut y2 = pool.take(&dev, x.shape())?;
        let bn2 = self.bn2.forward_into(&x, training, &mut y2)?;
        let flat = y2.reshape(&[b, hw * hw * c4])?;
        let dropped = match dropout {
            Some(d) => {
                let mut t = pool.take(&dev, flat.shape())?;
                d.apply_into(&flat, &mut t)?;
                Some((t, d))
            }
            None => None,
        };
        let mut fc = pool.take(&dev, &[b, self.cfg.embedding])?;
        let fc_in = dropped.as_ref().map_or(&flat, |d| &d.0);
        gemm::gemm(1.0, fc_in, Op::N, &self.fc_weight, Op::T, 0.0, &mut fc)?;
        bias_add(&mut fc, &self.fc_bias)?;
        let (emb, features) = self.features.forward(&fc, training)?;
        let head = HeadCache { last: x, bn2, flat, dropped, fc, features };
        let cache = match (keep, stem) {
            (true, Some(stem)) => Some(ForwardCache { batch: b, stem, blocks, head }),
            _ => {
                let h = head;
                pool.give_all([h.last, h.flat, h.fc].into_iter().chain(h.dropped.map(|d| d.0)));
                None
            }
        };
        Ok((emb, cache))
    }

    /// Gradients of every trainable parameter, by state-dict name (the
    /// parameters' shapes and layouts), given the gradient of the embeddings
    /// `[B, E]` of the last [`IResNet::forward`]. `features.weight` is fixed
    /// at 1 (insightface) and has none. The temporaries come from the pool;
    /// the gradients are new tensors.
    pub fn backward(&mut self, d_emb: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        const OP: &str = "IResNet::backward";
        let Some(cache) = self.cache.as_ref() else {
            return Err(Error::invalid(OP, "no activations to differentiate: call forward (not infer) first"));
        };
        let b = cache.batch;
        if d_emb.shape() != [b, self.cfg.embedding] || d_emb.dtype() != DType::F32 {
            return Err(Error::Shape {
                op: OP,
                expected: format!("f32 [{b}, {}]", self.cfg.embedding),
                got: format!("{:?} {:?}", d_emb.shape(), d_emb.dtype()),
            });
        }
        same_device_as(OP, &self.device, d_emb)?;
        // A failure past the checks (a device error) leaves buffers out of
        // the pool's account: start over.
        self.backward_run(d_emb).inspect_err(|_| self.release_buffers())
    }

    /// [`IResNet::backward`] into given buffers: each gradient overwrites
    /// the tensor of its name in `grads` (f32, the parameter's shape, on the
    /// network's device: a framework's buffers through
    /// [`Tensor::from_device_ptr`]); names `grads` lacks are inserted. No
    /// host synchronization. The gradients are still computed into pooled
    /// temporaries and copied (one device copy per parameter); persistent
    /// gradient buffers come with the training issue's parameters.
    pub fn backward_into(&mut self, d_emb: &Tensor, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        self.backward_merge("IResNet::backward_into", d_emb, grads, false)
    }

    /// [`IResNet::backward_into`] adding each gradient to the tensor of its
    /// name instead of overwriting it (gradient accumulation over
    /// micro-batches); `grads` must hold every trainable parameter's.
    pub fn backward_accumulate(&mut self, d_emb: &Tensor, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        const OP: &str = "IResNet::backward_accumulate";
        if let Some((name, _)) = self.params_mut().iter().find(|(name, _)| !grads.contains_key(name)) {
            return Err(Error::invalid(OP, format!("no gradient buffer for {name} to add to")));
        }
        self.backward_merge(OP, d_emb, grads, true)
    }

    fn backward_merge(
        &mut self,
        op: &'static str,
        d_emb: &Tensor,
        grads: &mut BTreeMap<String, Tensor>,
        accumulate: bool,
    ) -> Result<()> {
        for (name, g) in grads.iter() {
            let shape = self
                .state()
                .get(name.as_str())
                .map(|t| t.shape().to_vec())
                .ok_or_else(|| Error::invalid(op, format!("{name} is not a parameter of this network")))?;
            g.check_output(op, &self.device, &[&shape])?;
        }
        for (name, g) in self.backward(d_emb)? {
            match grads.get_mut(&name) {
                Some(t) if accumulate => add_assign(t, &g)?,
                Some(t) => t.copy_from(&g)?,
                None => {
                    grads.insert(name, g);
                }
            }
        }
        Ok(())
    }

    fn backward_run(&mut self, d_emb: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        const OP: &str = "IResNet::backward";
        let cache = self.cache.as_ref().ok_or_else(|| Error::invalid(OP, "no activations"))?;
        let b = cache.batch;
        let dev = self.device.clone();
        let pool = &mut self.pool;
        let h = &cache.head;
        let mut g = BTreeMap::new();
        let mut d_fc = pool.take(&dev, h.fc.shape())?;
        let (_, d_feat_bias) = self.features.backward_into(&h.fc, &h.features, d_emb, &mut d_fc)?;
        g.insert("features.bias".to_string(), d_feat_bias);
        g.insert("fc.bias".to_string(), column_sums(&d_fc)?);
        let fc_in = h.dropped.as_ref().map_or(&h.flat, |d| &d.0);
        g.insert("fc.weight".to_string(), gemm::matmul(&d_fc, Op::T, fc_in, Op::N)?);
        let mut d_in = pool.take(&dev, h.flat.shape())?;
        gemm::gemm(1.0, &d_fc, Op::N, &self.fc_weight, Op::N, 0.0, &mut d_in)?;
        pool.give(d_fc);
        if let Some((_, drop)) = &h.dropped {
            let mut t = pool.take(&dev, h.flat.shape())?;
            drop.apply_into(&d_in, &mut t)?;
            pool.give(std::mem::replace(&mut d_in, t));
        }
        let d_flat = d_in.reshape(h.last.shape())?;
        let mut d = pool.take(&dev, h.last.shape())?;
        let (dw, db) = self.bn2.backward_into(&h.last, &h.bn2, &d_flat, &mut d)?;
        pool.give(d_flat);
        insert_bn(&mut g, "bn2", dw, db);
        for (blk, bc) in self.blocks.iter().zip(&cache.blocks).rev() {
            let d_in = block_backward(blk, bc, pool, b, &d, &mut g, self.cfg.conv_dtype)?;
            pool.give(std::mem::replace(&mut d, d_in));
        }
        let st = &cache.stem;
        let mut d_y0 = pool.take(&dev, st.y0.shape())?;
        g.insert("prelu.weight".to_string(), prelu_backward_into(&st.y0, &self.prelu, &d, &mut d_y0)?);
        pool.give(d);
        let mut d_c0 = pool.take(&dev, st.c0.shape())?;
        let (dw, db) = self.bn1.backward_into(&st.c0, &st.bn1, &d_y0, &mut d_c0)?;
        pool.give(d_y0);
        insert_bn(&mut g, "bn1", dw, db);
        let s = self.cfg.input;
        let shape = conv_shape(b, s, 3, self.cfg.stem, 3, 1);
        let images = st.images.as_ref().ok_or_else(|| Error::invalid(OP, "the forward kept no images"))?;
        g.insert("conv1.weight".to_string(), pool.conv_backward(self.cfg.conv_dtype, &d_c0, images, &shape, None)?);
        pool.give(d_c0);
        Ok(g)
    }
}

fn same_device_as(op: &'static str, dev: &Device, t: &Tensor) -> Result<()> {
    if t.device() != dev {
        return Err(Error::DeviceMismatch { op, a: dev.to_string(), b: t.device().to_string() });
    }
    Ok(())
}

fn insert_bn(g: &mut BTreeMap<String, Tensor>, prefix: &str, weight: Tensor, bias: Tensor) {
    g.insert(format!("{prefix}.weight"), weight);
    g.insert(format!("{prefix}.bias"), bias);
}

fn insert_bn_state<'a>(m: &mut BTreeMap<String, &'a Tensor>, prefix: &str, b: &'a BatchNorm) {
    m.insert(format!("{prefix}.weight"), &b.weight);
    m.insert(format!("{prefix}.bias"), &b.bias);
    m.insert(format!("{prefix}.running_mean"), &b.running_mean);
    m.insert(format!("{prefix}.running_var"), &b.running_var);
}

/// One IBasicBlock on `x` (`[b·hw·hw, inplanes]`, kept in the cache);
/// buffers from the pool; convolutions with `dt` operands.
fn block_forward(
    blk: &mut Block,
    pool: &mut Pool,
    x: Tensor,
    b: usize,
    hw: usize,
    training: bool,
    dt: DType,
) -> Result<(Tensor, BlockCache)> {
    let dev = x.device().clone();
    let (rows, out_rows) = (b * hw * hw, b * (hw / blk.stride) * (hw / blk.stride));
    let w1 = pool.operand(&blk.conv1, dt)?;
    let w2 = pool.operand(&blk.conv2, dt)?;
    let mut a1 = pool.take(&dev, x.shape())?;
    let bn1 = blk.bn1.forward_into(&x, training, &mut a1)?;
    let a1 = pool.convert_operand(a1, dt)?;
    let mut c1 = pool.take(&dev, &[rows, blk.planes])?;
    let s1 = conv_shape(b, hw, blk.inplanes, blk.planes, 3, 1);
    conv2d_into(&a1, w1.as_ref().unwrap_or(&blk.conv1), &s1, &mut c1)?;
    let mut a2 = pool.take(&dev, c1.shape())?;
    let bn2 = blk.bn2.forward_into(&c1, training, &mut a2)?;
    let mut p = pool.take(&dev, c1.shape())?;
    prelu_into(&a2, &blk.prelu, &mut p)?;
    let p = pool.convert_operand(p, dt)?;
    let mut c2 = pool.take(&dev, &[out_rows, blk.planes])?;
    let s2 = conv_shape(b, hw, blk.planes, blk.planes, 3, blk.stride);
    conv2d_into(&p, w2.as_ref().unwrap_or(&blk.conv2), &s2, &mut c2)?;
    let mut out = pool.take(&dev, c2.shape())?;
    let bn3 = blk.bn3.forward_into(&c2, training, &mut out)?;
    let (ds, x_conv, wd) = match &mut blk.downsample {
        Some((w, bn)) => {
            let x_conv = pool.operand(&x, dt)?;
            let wd = pool.operand(w, dt)?;
            let mut dc = pool.take(&dev, c2.shape())?;
            let sd = conv_shape(b, hw, blk.inplanes, blk.planes, 1, blk.stride);
            conv2d_into(x_conv.as_ref().unwrap_or(&x), wd.as_ref().unwrap_or(w), &sd, &mut dc)?;
            let mut dy = pool.take(&dev, c2.shape())?;
            let dcache = bn.forward_into(&dc, training, &mut dy)?;
            add_assign(&mut out, &dy)?;
            pool.give(dy);
            (Some((dc, dcache)), x_conv, wd)
        }
        None => {
            add_assign(&mut out, &x)?;
            (None, None, None)
        }
    };
    let w = match (w1, w2) {
        (Some(w1), Some(w2)) => Some((w1, w2, wd)),
        _ => None,
    };
    Ok((out, BlockCache { hw, x, x_conv, bn1, a1, c1, bn2, a2, p, c2, bn3, ds, w }))
}

/// The block's backward: its parameters' gradients into `g`; returns the
/// gradient of its input (temporaries from and back to the pool).
fn block_backward(
    blk: &Block,
    c: &BlockCache,
    pool: &mut Pool,
    b: usize,
    d_out: &Tensor,
    g: &mut BTreeMap<String, Tensor>,
    dt: DType,
) -> Result<Tensor> {
    let p = &blk.prefix;
    let dev = d_out.device().clone();
    let s1 = conv_shape(b, c.hw, blk.inplanes, blk.planes, 3, 1);
    let s2 = conv_shape(b, c.hw, blk.planes, blk.planes, 3, blk.stride);
    let (w1, w2) = c.w.as_ref().map_or((&blk.conv1, &blk.conv2), |w| (&w.0, &w.1));
    let mut d_c2 = pool.take(&dev, c.c2.shape())?;
    let (dw, db) = blk.bn3.backward_into(&c.c2, &c.bn3, d_out, &mut d_c2)?;
    insert_bn(g, &format!("{p}.bn3"), dw, db);
    let mut d_p = pool.take(&dev, c.p.shape())?;
    g.insert(format!("{p}.conv2.weight"), pool.conv_backward(dt, &d_c2, &c.p, &s2, Some((w2, &mut d_p)))?);
    pool.give(d_c2);
    let mut d_a2 = pool.take(&dev, c.a2.shape())?;
    g.insert(format!("{p}.prelu.weight"), prelu_backward_into(&c.a2, &blk.prelu, &d_p, &mut d_a2)?);
    pool.give(d_p);
    let mut d_c1 = pool.take(&dev, c.c1.shape())?;
    let (dw, db) = blk.bn2.backward_into(&c.c1, &c.bn2, &d_a2, &mut d_c1)?;
    pool.give(d_a2);
    insert_bn(g, &format!("{p}.bn2"), dw, db);
    let mut d_a1 = pool.take(&dev, c.a1.shape())?;
    g.insert(format!("{p}.conv1.weight"), pool.conv_backward(dt, &d_c1, &c.a1, &s1, Some((w1, &mut d_a1)))?);
    pool.give(d_c1);
    let mut d_x = pool.take(&dev, c.x.shape())?;
    let (dw, db) = blk.bn1.backward_into(&c.x, &c.bn1, &d_a1, &mut d_x)?;
    pool.give(d_a1);
    insert_bn(g, &format!("{p}.bn1"), dw, db);
    match (&blk.downsample, &c.ds) {
        (Some((w, bn)), Some((dc, dcache))) => {
            let sd = conv_shape(b, c.hw, blk.inplanes, blk.planes, 1, blk.stride);
            let wd = c.w.as_ref().and_then(|w| w.2.as_ref()).unwrap_or(w);
            let x_conv = c.x_conv.as_ref().unwrap_or(&c.x);
            let mut d_dc = pool.take(&dev, dc.shape())?;
            let (dw, db) = bn.backward_into(dc, dcache, d_out, &mut d_dc)?;
            insert_bn(g, &format!("{p}.downsample.1"), dw, db);
            let mut d_id = pool.take(&dev, c.x.shape())?;
            let dw = pool.conv_backward(dt, &d_dc, x_conv, &sd, Some((wd, &mut d_id)))?;
            g.insert(format!("{p}.downsample.0.weight"), dw);
            pool.give(d_dc);
            add_assign(&mut d_x, &d_id)?;
            pool.give(d_id);
        }
        _ => add_assign(&mut d_x, d_out)?,
    }
    Ok(d_x)
}
