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

use super::conv::{conv2d_into, ConvShape};
use super::inference::{BlockParts, FoldedIResNet, Kernels, Parts, Winograd};
use super::norm::{
    add_assign, bias_add, column_sums_with, prelu_backward_with, prelu_into, BatchNorm, BnCache, Dropout,
};
use super::pool::{Pool, Scratch};
use crate::error::{Error, Result};
use crate::ops::gemm::{self, Op};
use crate::runtime::device::{Device, DeviceKind};
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

    /// The insightface name ("r50") when the blocks and widths are one of
    /// its architectures'.
    pub fn arch_name(&self) -> Option<&'static str> {
        ["r18", "r34", "r50", "r100"].into_iter().find(|n| {
            IResNetConfig::arch(n).is_ok_and(|a| (a.layers, a.stem, a.widths) == (self.layers, self.stem, self.widths))
        })
    }

    /// Height and width after the four stride-2 stages.
    pub fn final_hw(&self) -> usize {
        self.input / 16
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.input == 0 || !self.input.is_multiple_of(16) || self.stem == 0 || self.embedding == 0 {
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

/// For messages: "r50 (input 112, embedding 512)", or the blocks and
/// widths of another network.
impl std::fmt::Display for IResNetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.arch_name() {
            Some(name) => write!(f, "{name}")?,
            None => write!(f, "an IResNet of blocks {:?}, stem {}, widths {:?}", self.layers, self.stem, self.widths)?,
        }
        write!(f, " (input {}, embedding {})", self.input, self.embedding)
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
        let (dc, ds_bn) = self.ds.map(|(t, bn)| (t, bn.into_tensors())).unzip();
        let stats = [self.bn1, self.bn2, self.bn3].into_iter().flat_map(BnCache::into_tensors);
        [self.x, self.a1, self.c1, self.a2, self.p, self.c2]
            .into_iter()
            .chain(dc)
            .chain(ds_bn.into_iter().flatten())
            .chain(stats)
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
        v.extend(st.bn1.into_tensors());
        v.extend(self.blocks.into_iter().flat_map(BlockCache::tensors));
        let h = self.head;
        v.extend([h.last, h.flat, h.fc]);
        v.extend(h.dropped.map(|d| d.0));
        v.extend([h.bn2, h.features].into_iter().flat_map(BnCache::into_tensors));
        v
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
    /// The folded network [`IResNet::infer`] runs on the CPU, built on first
    /// use; dropped by everything that can change a parameter or a running
    /// statistic (`params_mut`, `set`, loading, a forward pass).
    folded: Option<FoldedIResNet>,
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
            folded: None,
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
        self.folded = None;
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
        if !images.len().is_multiple_of(per) || chunk == 0 {
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
        self.folded = None;
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
            self.pool = Pool::new(batch);
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
        let mut emb = Tensor::empty(&self.device, &[b, self.cfg.embedding], DType::F32)?;
        self.forward_into(images, training, &mut emb)?;
        Ok(emb)
    }

    /// [`IResNet::forward`] into `emb` (f32 `[B, E]` on the network's
    /// device, overwritten): a training step at a batch size the network
    /// has seen allocates nothing.
    pub fn forward_into(&mut self, images: &Tensor, training: bool, emb: &mut Tensor) -> Result<()> {
        const OP: &str = "IResNet::forward";
        let b = self.check_images(OP, images)?;
        emb.check_output(OP, &self.device, &[&[b, self.cfg.embedding]])?;
        self.folded = None;
        self.recycle(b);
        let dropout = if training && self.cfg.dropout > 0.0 {
            self.step += 1;
            Some(Dropout::new(self.cfg.dropout, self.seed, self.step)?)
        } else {
            None
        };
        self.cache = self.run(images, b, training, dropout, true, emb).inspect_err(|_| self.release_buffers())?;
        Ok(())
    }

    /// Embeddings `[B, E]` in eval mode, keeping no activations (the
    /// memory of about one block); a later [`IResNet::backward`] is an
    /// error until the next [`IResNet::forward`].
    ///
    /// On the CPU with f32 convolutions this is the folded network
    /// ([`IResNet::folded`] with the default choices, built on first use
    /// and kept until a parameter changes): the same function, rounded
    /// differently (docs/backbone.md states by how much). Elsewhere, and
    /// with bf16 convolutions, the layer-by-layer eval forward.
    pub fn infer(&mut self, images: &Tensor) -> Result<Tensor> {
        let b = self.check_images("IResNet::infer", images)?;
        if self.device.kind() == DeviceKind::Cpu && self.cfg.conv_dtype == DType::F32 {
            if self.folded.is_none() {
                self.folded = Some(self.folded(Winograd::Auto, Kernels::Auto)?);
            }
            let folded = self.folded.as_ref().ok_or_else(|| Error::invalid("IResNet::infer", "no folded network"))?;
            let emb = folded.embed(&images.host_f32()?, b)?;
            return Tensor::from_slice(&self.device, &[b, self.cfg.embedding], &emb);
        }
        let mut emb = Tensor::empty(&self.device, &[b, self.cfg.embedding], DType::F32)?;
        self.recycle(b);
        self.run(images, b, false, None, false, &mut emb).inspect_err(|_| self.release_buffers())?;
        Ok(emb)
    }

    /// The eval network folded for CPU inference (BatchNorms folded into
    /// the convolutions and the Linear layer, element-wise layers fused into
    /// the convolutions' epilogues, the 3x3 stride-1 convolutions by
    /// `wino`, the GEMMs by `kernels`): a snapshot of the current
    /// parameters, on the host, whatever this network's device.
    pub fn folded(&self, wino: Winograd, kernels: Kernels) -> Result<FoldedIResNet> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| BlockParts {
                inplanes: b.inplanes,
                planes: b.planes,
                stride: b.stride,
                bn1: &b.bn1,
                conv1: &b.conv1,
                bn2: &b.bn2,
                prelu: &b.prelu,
                conv2: &b.conv2,
                bn3: &b.bn3,
                downsample: b.downsample.as_ref().map(|(w, bn)| (w, bn)),
            })
            .collect();
        let parts = Parts {
            input: self.cfg.input,
            embedding: self.cfg.embedding,
            conv1: &self.conv1,
            bn1: &self.bn1,
            prelu: &self.prelu,
            blocks,
            bn2: &self.bn2,
            fc_weight: &self.fc_weight,
            fc_bias: &self.fc_bias,
            features: &self.features,
        };
        FoldedIResNet::new(&parts, wino, kernels)
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

    /// The network on `images`: the embeddings into `emb` and, when
    /// `keep`, the cache for the backward (else every buffer goes back to
    /// the pool as soon as it is used).
    fn run(
        &mut self,
        images: &Tensor,
        b: usize,
        training: bool,
        dropout: Option<Dropout>,
        keep: bool,
        emb: &mut Tensor,
    ) -> Result<Option<ForwardCache>> {
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
        let bn1 = self.bn1.forward_with(&c0, training, &mut y0, pool)?;
        let mut x = pool.take(&dev, &[rows, stem_c])?;
        prelu_into(&y0, &self.prelu, &mut x)?;
        let stem = StemCache { images: conv_images, c0, bn1, y0, w: w0 };
        let stem = if keep {
            Some(stem)
        } else {
            pool.give_all(
                [stem.c0, stem.y0].into_iter().chain(stem.images).chain(stem.w).chain(stem.bn1.into_tensors()),
            );
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
        let bn2 = self.bn2.forward_with(&x, training, &mut y2, pool)?;
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
        let features = self.features.forward_with(&fc, training, emb, pool)?;
        let head = HeadCache { last: x, bn2, flat, dropped, fc, features };
        Ok(match (keep, stem) {
            (true, Some(stem)) => Some(ForwardCache { batch: b, stem, blocks, head }),
            _ => {
                let h = head;
                let stats = [h.bn2, h.features].into_iter().flat_map(BnCache::into_tensors);
                pool.give_all([h.last, h.flat, h.fc].into_iter().chain(h.dropped.map(|d| d.0)).chain(stats));
                None
            }
        })
    }

    /// Gradients of every trainable parameter, by state-dict name (the
    /// parameters' shapes and layouts), given the gradient of the embeddings
    /// `[B, E]` of the last [`IResNet::forward`]. `features.weight` is fixed
    /// at 1 (insightface) and has none. The temporaries come from the pool;
    /// the gradients are new tensors (a training loop keeps its buffers
    /// with [`IResNet::backward_into`]).
    pub fn backward(&mut self, d_emb: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let mut grads = BTreeMap::new();
        self.backward_merge("IResNet::backward", d_emb, &mut grads, false, None)?;
        Ok(grads)
    }

    /// [`IResNet::backward`] into given buffers: each gradient is written
    /// straight into the tensor of its name in `grads` (f32, the
    /// parameter's shape, on the network's device; a framework's buffers
    /// through [`Tensor::from_device_ptr`]), which is overwritten; names
    /// `grads` lacks are inserted (allocated once: the next call writes into
    /// them). No host synchronization; after the first step at a batch size,
    /// no allocation.
    pub fn backward_into(&mut self, d_emb: &Tensor, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        self.backward_merge("IResNet::backward_into", d_emb, grads, false, None)
    }

    /// [`IResNet::backward_into`] adding each gradient to the tensor of its
    /// name instead of overwriting it (gradient accumulation over
    /// micro-batches); `grads` must hold every trainable parameter's. Each
    /// gradient is computed whole (into a pooled temporary, or by the
    /// Linear's GEMM with β = 1) and then added, as PyTorch accumulates
    /// `.grad`: accumulating the same micro-batch twice gives exactly twice
    /// its gradient, however a kernel splits its sums.
    pub fn backward_accumulate(&mut self, d_emb: &Tensor, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        self.backward_merge("IResNet::backward_accumulate", d_emb, grads, true, None)
    }

    /// [`IResNet::backward_into`] (`accumulate` false) or
    /// [`IResNet::backward_accumulate`] (true) that calls `ready(name,
    /// gradient)` as soon as each gradient is final, last layer first (the
    /// same order on every call): what data-parallel training overlaps its
    /// all-reduce with ([`crate::distributed::OverlappedReducer`]). An
    /// error from `ready` stops the backward and is returned.
    pub fn backward_notify(
        &mut self,
        d_emb: &Tensor,
        grads: &mut BTreeMap<String, Tensor>,
        accumulate: bool,
        ready: &mut GradReady<'_>,
    ) -> Result<()> {
        self.backward_merge("IResNet::backward_notify", d_emb, grads, accumulate, Some(ready))
    }

    fn backward_merge(
        &mut self,
        op: &'static str,
        d_emb: &Tensor,
        grads: &mut BTreeMap<String, Tensor>,
        accumulate: bool,
        ready: Option<&mut GradReady<'_>>,
    ) -> Result<()> {
        if accumulate {
            if let Some((name, _)) = self.params_mut().iter().find(|(name, _)| !grads.contains_key(name)) {
                return Err(Error::invalid(op, format!("no gradient buffer for {name} to add to")));
            }
        }
        let Some(cache) = self.cache.as_ref() else {
            return Err(Error::invalid(op, "no activations to differentiate: call forward (not infer) first"));
        };
        let b = cache.batch;
        if d_emb.shape() != [b, self.cfg.embedding] || d_emb.dtype() != DType::F32 {
            return Err(Error::Shape {
                op,
                expected: format!("f32 [{b}, {}]", self.cfg.embedding),
                got: format!("{:?} {:?}", d_emb.shape(), d_emb.dtype()),
            });
        }
        same_device_as(op, &self.device, d_emb)?;
        // The state's names and shapes, built once (not per gradient).
        let state = self.state();
        for (name, g) in grads.iter() {
            let param = state
                .get(name.as_str())
                .ok_or_else(|| Error::invalid(op, format!("{name} is not a parameter of this network")))?;
            g.check_output(op, &self.device, &[param.shape()])?;
        }
        // A failure past the checks (a device error) leaves buffers out of
        // the pool's account: start over.
        let mut sink = Sink { grads, accumulate, dev: self.device.clone(), ready };
        self.backward_run(d_emb, &mut sink).inspect_err(|_| self.release_buffers())
    }

    fn backward_run(&mut self, d_emb: &Tensor, g: &mut Sink<'_, '_>) -> Result<()> {
        const OP: &str = "IResNet::backward";
        let cache = self.cache.as_ref().ok_or_else(|| Error::invalid(OP, "no activations"))?;
        let b = cache.batch;
        let dev = self.device.clone();
        let pool = &mut self.pool;
        let h = &cache.head;
        let (e, c4) = (self.cfg.embedding, self.cfg.widths[3]);
        let mut d_fc = pool.take(&dev, h.fc.shape())?;
        let features = &self.features;
        g.put(pool, ["features.bias".into()], [&[e]], false, |t, pool, _| {
            let mut dw = pool.take(&dev, &[e])?;
            let r = features.backward_with(&h.fc, &h.features, d_emb, &mut d_fc, &mut dw, &mut t[0], pool);
            pool.give(dw);
            r
        })?;
        g.put(pool, ["fc.bias".into()], [&[e]], false, |t, pool, _| column_sums_with(&d_fc, &mut t[0], pool))?;
        let fc_in = h.dropped.as_ref().map_or(&h.flat, |d| &d.0);
        g.put(pool, ["fc.weight".into()], [self.fc_weight.shape()], true, |t, _, acc| {
            gemm::gemm(1.0, &d_fc, Op::T, fc_in, Op::N, if acc { 1.0 } else { 0.0 }, &mut t[0])
        })?;
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
        g.bn(pool, "bn2", c4, |dw, db, pool| self.bn2.backward_with(&h.last, &h.bn2, &d_flat, &mut d, dw, db, pool))?;
        pool.give(d_flat);
        for (blk, bc) in self.blocks.iter().zip(&cache.blocks).rev() {
            let d_in = block_backward(blk, bc, pool, b, &d, g, self.cfg.conv_dtype)?;
            pool.give(std::mem::replace(&mut d, d_in));
        }
        let st = &cache.stem;
        let stem_c = self.cfg.stem;
        let mut d_y0 = pool.take(&dev, st.y0.shape())?;
        let prelu = &self.prelu;
        g.put(pool, ["prelu.weight".into()], [&[stem_c]], false, |t, pool, _| {
            prelu_backward_with(&st.y0, prelu, &d, &mut d_y0, &mut t[0], pool)
        })?;
        pool.give(d);
        let mut d_c0 = pool.take(&dev, st.c0.shape())?;
        g.bn(pool, "bn1", stem_c, |dw, db, pool| {
            self.bn1.backward_with(&st.c0, &st.bn1, &d_y0, &mut d_c0, dw, db, pool)
        })?;
        pool.give(d_y0);
        let shape = conv_shape(b, self.cfg.input, 3, stem_c, 3, 1);
        let images = st.images.as_ref().ok_or_else(|| Error::invalid(OP, "the forward kept no images"))?;
        let dt = self.cfg.conv_dtype;
        g.put(pool, ["conv1.weight".into()], [self.conv1.shape()], false, |t, pool, acc| {
            pool.conv_backward(dt, &d_c0, images, &shape, &mut t[0], acc, None)
        })?;
        pool.give(d_c0);
        Ok(())
    }
}

/// Where the backward writes each gradient: straight into the tensor of
/// its name in `grads` (overwritten; allocated and inserted when missing),
/// or, when accumulating, into a pool temporary that is then added to it;
/// the Linear's GEMM (C = A·B + 1·C adds its finished sum, the same
/// rounding as a separate add) writes straight in either way. The
/// convolutions could add in place too, but their kernels add split
/// partial sums, which rounds differently from adding the whole gradient.
struct Sink<'a, 'r> {
    grads: &'a mut BTreeMap<String, Tensor>,
    accumulate: bool,
    dev: Device,
    /// Told each gradient's name and value once final.
    ready: Option<&'a mut GradReady<'r>>,
}

/// The hook of [`IResNet::backward_notify`]: a gradient's name and value,
/// final for this backward.
pub type GradReady<'r> = dyn FnMut(&str, &Tensor) -> Result<()> + 'r;

impl Sink<'_, '_> {
    /// Runs `f` on the buffers of the gradients `names` (of `shapes`);
    /// `in_place`: `f` can add onto them, which it is told to do by its
    /// bool.
    fn put<const N: usize>(
        &mut self,
        pool: &mut Pool,
        names: [String; N],
        shapes: [&[usize]; N],
        in_place: bool,
        f: impl FnOnce(&mut [Tensor], &mut Pool, bool) -> Result<()>,
    ) -> Result<()> {
        let temp = self.accumulate && !in_place;
        let mut bufs = Vec::with_capacity(N);
        if temp {
            for shape in shapes {
                bufs.push(pool.take(&self.dev, shape)?);
            }
        } else {
            for (name, shape) in names.iter().zip(shapes) {
                if !self.grads.contains_key(name) {
                    self.grads.insert(name.clone(), Tensor::empty(&self.dev, shape, DType::F32)?);
                }
            }
            for name in &names {
                bufs.push(self.grads.remove(name).ok_or_else(|| Error::invalid("IResNet::backward", "lost buffer"))?);
            }
        }
        let mut r = f(&mut bufs, pool, self.accumulate && in_place);
        for (name, t) in names.into_iter().zip(bufs) {
            if temp {
                if r.is_ok() {
                    r = match self.grads.get_mut(&name) {
                        Some(acc) => add_assign(acc, &t),
                        None => Err(Error::invalid("IResNet::backward", format!("no gradient buffer for {name}"))),
                    };
                }
                if let (true, Some(ready), Some(g)) = (r.is_ok(), self.ready.as_mut(), self.grads.get(&name)) {
                    r = ready(&name, g);
                }
                pool.give(t);
            } else {
                if let (true, Some(ready)) = (r.is_ok(), self.ready.as_mut()) {
                    r = ready(&name, &t);
                }
                self.grads.insert(name, t);
            }
        }
        r
    }

    /// A BatchNorm's `prefix.weight` and `prefix.bias` (`c` channels).
    fn bn(
        &mut self,
        pool: &mut Pool,
        prefix: &str,
        c: usize,
        f: impl FnOnce(&mut Tensor, &mut Tensor, &mut Pool) -> Result<()>,
    ) -> Result<()> {
        let names = [format!("{prefix}.weight"), format!("{prefix}.bias")];
        self.put(pool, names, [&[c], &[c]], false, |t, pool, _| match t {
            [w, b] => f(w, b, pool),
            _ => Err(Error::invalid("IResNet::backward", "BatchNorm gradients come in pairs")),
        })
    }
}

fn same_device_as(op: &'static str, dev: &Device, t: &Tensor) -> Result<()> {
    if t.device() != dev {
        return Err(Error::DeviceMismatch { op, a: dev.to_string(), b: t.device().to_string() });
    }
    Ok(())
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
    let bn1 = blk.bn1.forward_with(&x, training, &mut a1, pool)?;
    let a1 = pool.convert_operand(a1, dt)?;
    let mut c1 = pool.take(&dev, &[rows, blk.planes])?;
    let s1 = conv_shape(b, hw, blk.inplanes, blk.planes, 3, 1);
    conv2d_into(&a1, w1.as_ref().unwrap_or(&blk.conv1), &s1, &mut c1)?;
    let mut a2 = pool.take(&dev, c1.shape())?;
    let bn2 = blk.bn2.forward_with(&c1, training, &mut a2, pool)?;
    let mut p = pool.take(&dev, c1.shape())?;
    prelu_into(&a2, &blk.prelu, &mut p)?;
    let p = pool.convert_operand(p, dt)?;
    let mut c2 = pool.take(&dev, &[out_rows, blk.planes])?;
    let s2 = conv_shape(b, hw, blk.planes, blk.planes, 3, blk.stride);
    conv2d_into(&p, w2.as_ref().unwrap_or(&blk.conv2), &s2, &mut c2)?;
    let mut out = pool.take(&dev, c2.shape())?;
    let bn3 = blk.bn3.forward_with(&c2, training, &mut out, pool)?;
    let (ds, x_conv, wd) = match &mut blk.downsample {
        Some((w, bn)) => {
            let x_conv = pool.operand(&x, dt)?;
            let wd = pool.operand(w, dt)?;
            let mut dc = pool.take(&dev, c2.shape())?;
            let sd = conv_shape(b, hw, blk.inplanes, blk.planes, 1, blk.stride);
            conv2d_into(x_conv.as_ref().unwrap_or(&x), wd.as_ref().unwrap_or(w), &sd, &mut dc)?;
            let mut dy = pool.take(&dev, c2.shape())?;
            let dcache = bn.forward_with(&dc, training, &mut dy, pool)?;
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
    g: &mut Sink<'_, '_>,
    dt: DType,
) -> Result<Tensor> {
    let p = &blk.prefix;
    let dev = d_out.device().clone();
    let s1 = conv_shape(b, c.hw, blk.inplanes, blk.planes, 3, 1);
    let s2 = conv_shape(b, c.hw, blk.planes, blk.planes, 3, blk.stride);
    let (w1, w2) = c.w.as_ref().map_or((&blk.conv1, &blk.conv2), |w| (&w.0, &w.1));
    let (cin, cp) = (blk.inplanes, blk.planes);
    let mut d_c2 = pool.take(&dev, c.c2.shape())?;
    g.bn(pool, &format!("{p}.bn3"), cp, |dw, db, pool| {
        blk.bn3.backward_with(&c.c2, &c.bn3, d_out, &mut d_c2, dw, db, pool)
    })?;
    let mut d_p = pool.take(&dev, c.p.shape())?;
    g.put(pool, [format!("{p}.conv2.weight")], [blk.conv2.shape()], false, |t, pool, acc| {
        pool.conv_backward(dt, &d_c2, &c.p, &s2, &mut t[0], acc, Some((w2, &mut d_p)))
    })?;
    pool.give(d_c2);
    let mut d_a2 = pool.take(&dev, c.a2.shape())?;
    g.put(pool, [format!("{p}.prelu.weight")], [&[cp]], false, |t, pool, _| {
        prelu_backward_with(&c.a2, &blk.prelu, &d_p, &mut d_a2, &mut t[0], pool)
    })?;
    pool.give(d_p);
    let mut d_c1 = pool.take(&dev, c.c1.shape())?;
    g.bn(pool, &format!("{p}.bn2"), cp, |dw, db, pool| {
        blk.bn2.backward_with(&c.c1, &c.bn2, &d_a2, &mut d_c1, dw, db, pool)
    })?;
    pool.give(d_a2);
    let mut d_a1 = pool.take(&dev, c.a1.shape())?;
    g.put(pool, [format!("{p}.conv1.weight")], [blk.conv1.shape()], false, |t, pool, acc| {
        pool.conv_backward(dt, &d_c1, &c.a1, &s1, &mut t[0], acc, Some((w1, &mut d_a1)))
    })?;
    pool.give(d_c1);
    let mut d_x = pool.take(&dev, c.x.shape())?;
    g.bn(pool, &format!("{p}.bn1"), cin, |dw, db, pool| {
        blk.bn1.backward_with(&c.x, &c.bn1, &d_a1, &mut d_x, dw, db, pool)
    })?;
    pool.give(d_a1);
    match (&blk.downsample, &c.ds) {
        (Some((w, bn)), Some((dc, dcache))) => {
            let sd = conv_shape(b, c.hw, blk.inplanes, blk.planes, 1, blk.stride);
            let wd = c.w.as_ref().and_then(|w| w.2.as_ref()).unwrap_or(w);
            let x_conv = c.x_conv.as_ref().unwrap_or(&c.x);
            let mut d_dc = pool.take(&dev, dc.shape())?;
            g.bn(pool, &format!("{p}.downsample.1"), cp, |dw, db, pool| {
                bn.backward_with(dc, dcache, d_out, &mut d_dc, dw, db, pool)
            })?;
            let mut d_id = pool.take(&dev, c.x.shape())?;
            g.put(pool, [format!("{p}.downsample.0.weight")], [w.shape()], false, |t, pool, acc| {
                pool.conv_backward(dt, &d_dc, x_conv, &sd, &mut t[0], acc, Some((wd, &mut d_id)))
            })?;
            pool.give(d_dc);
            add_assign(&mut d_x, &d_id)?;
            pool.give(d_id);
        }
        _ => add_assign(&mut d_x, d_out)?,
    }
    Ok(d_x)
}
