//! IResNet (insightface's iresnet.py) on NHWC activations, assembled from
//! the crate's layers: forward in training or eval mode, and backward to
//! the gradient of every parameter.
//!
//! Stem: conv 3x3 (3 → 64) → BN → PReLU; four stages of IBasicBlocks
//! (64, 128, 256, 512 channels; the first block of each has stride 2 and a
//! 1x1 conv + BN downsample), each block
//! `BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN (+ identity)`; then BN,
//! flatten, Linear (512·7·7 → 512) and BatchNorm1d (its γ fixed at 1, as
//! insightface has it). Dropout has insightface's default p = 0.
//!
//! Layouts: activations are `[pixels, C]` (NHWC flattened), conv weights
//! OHWI, and the Linear's input is the NHWC flattening (h, w, c), so
//! `fc.weight`'s columns are a permutation of PyTorch's (c, h, w); the
//! checkpoint code converts both.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::conv::{conv2d, conv2d_data_grad, conv2d_weight_grad, ConvShape};
use super::norm::{add, bias_add, column_sums, prelu, prelu_backward, BatchNorm, BnCache};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gemm::{self, Op};
use crate::tensor::{DType, Tensor};

/// BatchNorm eps of every layer (insightface: 1e-5).
const BN_EPS: f32 = 1e-5;
/// PReLU's initial slope (PyTorch's default).
const PRELU_INIT: f32 = 0.25;

/// The network's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        Ok(IResNetConfig { layers, stem: 64, widths: [64, 128, 256, 512], input: 112, embedding: 512 })
    }

    /// Height and width after the four stride-2 stages.
    pub fn final_hw(&self) -> usize {
        self.input / 16
    }

    fn validate(&self) -> Result<()> {
        if self.input == 0 || self.input % 16 != 0 || self.stem == 0 || self.embedding == 0 {
            return Err(Error::invalid("IResNet", "input must be a positive multiple of 16; widths positive"));
        }
        if self.layers.contains(&0) || self.widths.contains(&0) {
            return Err(Error::invalid("IResNet", "every stage needs at least one block and one channel"));
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

struct BlockCache {
    hw: usize,
    x: Tensor,
    bn1: BnCache,
    a1: Tensor,
    c1: Tensor,
    bn2: BnCache,
    a2: Tensor,
    p: Tensor,
    c2: Tensor,
    bn3: BnCache,
    ds: Option<(Tensor, BnCache)>,
}

/// What [`IResNet::forward`] keeps for [`IResNet::backward`].
pub struct ForwardCache {
    batch: usize,
    images: Tensor,
    c0: Tensor,
    bn1: BnCache,
    y0: Tensor,
    blocks: Vec<BlockCache>,
    last: Tensor,
    bn2: BnCache,
    flat: Tensor,
    fc: Tensor,
    features: BnCache,
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
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IResNetConfig {
        &self.cfg
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
        let mut out = Vec::with_capacity(images.len() / per * self.cfg.embedding);
        for part in images.chunks(per * chunk) {
            let b = part.len() / per;
            let x = Tensor::from_slice(&self.device, &[b, s, s, 3], part)?;
            out.extend(self.forward(&x, false)?.0.to_vec::<f32>()?);
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
        *slot = value;
        Ok(())
    }

    fn slot(&mut self, name: &str) -> Option<&mut Tensor> {
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

    /// Embeddings `[B, E]` of `images` (`[B, H, W, 3]` f32, normalized as
    /// insightface does: (x/255 − 0.5)/0.5), in training mode (batch
    /// statistics; running statistics updated) or eval mode.
    pub fn forward(&mut self, images: &Tensor, training: bool) -> Result<(Tensor, ForwardCache)> {
        const OP: &str = "IResNet::forward";
        let s = self.cfg.input;
        let b = match images.shape() {
            [b, h, w, 3] if *h == s && *w == s && images.dtype() == DType::F32 => *b,
            other => {
                return Err(Error::Shape {
                    op: OP,
                    expected: format!("f32 images [B, {s}, {s}, 3]"),
                    got: format!("{other:?} {:?}", images.dtype()),
                })
            }
        };
        if b == 0 {
            return Err(Error::invalid(OP, "empty batch"));
        }
        if images.device() != &self.device {
            return Err(Error::DeviceMismatch { op: OP, a: self.device.to_string(), b: images.device().to_string() });
        }
        let images = images.to_f32()?.reshape(&[b * s * s, 3])?;
        let c0 = conv2d(&images, &self.conv1, &conv_shape(b, s, 3, self.cfg.stem, 3, 1))?;
        let (y0, bn1) = self.bn1.forward(&c0, training)?;
        let mut x = prelu(&y0, &self.prelu)?;
        let mut hw = s;
        let mut caches = Vec::with_capacity(self.blocks.len());
        for blk in &mut self.blocks {
            let (y, cache) = block_forward(blk, x, b, hw, training)?;
            hw /= blk.stride;
            caches.push(cache);
            x = y;
        }
        let (y2, bn2) = self.bn2.forward(&x, training)?;
        let flat = y2.reshape(&[b, hw * hw * self.cfg.widths[3]])?;
        let mut fc = gemm::matmul(&flat, Op::N, &self.fc_weight, Op::T)?;
        bias_add(&mut fc, &self.fc_bias)?;
        let (emb, features) = self.features.forward(&fc, training)?;
        Ok((emb, ForwardCache { batch: b, images, c0, bn1, y0, blocks: caches, last: x, bn2, flat, fc, features }))
    }

    /// Gradients of every trainable parameter, by state-dict name (the
    /// parameters' shapes and layouts), given the gradient of the embeddings
    /// `[B, E]` for the forward pass that returned `cache`. `features.weight`
    /// is fixed at 1 (insightface) and has none.
    pub fn backward(&self, cache: &ForwardCache, d_emb: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        const OP: &str = "IResNet::backward";
        let b = cache.batch;
        if d_emb.shape() != [b, self.cfg.embedding] || d_emb.dtype() != DType::F32 {
            return Err(Error::Shape {
                op: OP,
                expected: format!("f32 [{b}, {}]", self.cfg.embedding),
                got: format!("{:?}", d_emb.shape()),
            });
        }
        let mut g = BTreeMap::new();
        let fg = self.features.backward(&cache.fc, &cache.features, d_emb)?;
        g.insert("features.bias".to_string(), fg.bias);
        let d_fc = fg.input;
        g.insert("fc.bias".to_string(), column_sums(&d_fc)?);
        g.insert("fc.weight".to_string(), gemm::matmul(&d_fc, Op::T, &cache.flat, Op::N)?);
        let hw = self.cfg.final_hw();
        let c4 = self.cfg.widths[3];
        let d_flat = gemm::matmul(&d_fc, Op::N, &self.fc_weight, Op::N)?.reshape(&[b * hw * hw, c4])?;
        let g2 = self.bn2.backward(&cache.last, &cache.bn2, &d_flat)?;
        insert_bn(&mut g, "bn2", g2.weight, g2.bias);
        let mut d = g2.input;
        for (blk, bc) in self.blocks.iter().zip(&cache.blocks).rev() {
            d = block_backward(blk, bc, b, &d, &mut g)?;
        }
        let (d_y0, d_prelu) = prelu_backward(&cache.y0, &self.prelu, &d)?;
        g.insert("prelu.weight".to_string(), d_prelu);
        let g1 = self.bn1.backward(&cache.c0, &cache.bn1, &d_y0)?;
        insert_bn(&mut g, "bn1", g1.weight, g1.bias);
        let s = self.cfg.input;
        let shape = conv_shape(b, s, 3, self.cfg.stem, 3, 1);
        g.insert("conv1.weight".to_string(), conv2d_weight_grad(&cache.images, &g1.input, &shape)?);
        Ok(g)
    }
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

/// One IBasicBlock on `x` (`[b·hw·hw, inplanes]`, kept in the cache).
fn block_forward(blk: &mut Block, x: Tensor, b: usize, hw: usize, training: bool) -> Result<(Tensor, BlockCache)> {
    let (a1, bn1) = blk.bn1.forward(&x, training)?;
    let c1 = conv2d(&a1, &blk.conv1, &conv_shape(b, hw, blk.inplanes, blk.planes, 3, 1))?;
    let (a2, bn2) = blk.bn2.forward(&c1, training)?;
    let p = prelu(&a2, &blk.prelu)?;
    let c2 = conv2d(&p, &blk.conv2, &conv_shape(b, hw, blk.planes, blk.planes, 3, blk.stride))?;
    let (y3, bn3) = blk.bn3.forward(&c2, training)?;
    let (out, ds) = match &mut blk.downsample {
        Some((w, bn)) => {
            let dc = conv2d(&x, w, &conv_shape(b, hw, blk.inplanes, blk.planes, 1, blk.stride))?;
            let (dy, dcache) = bn.forward(&dc, training)?;
            (add(&y3, &dy)?, Some((dc, dcache)))
        }
        None => (add(&y3, &x)?, None),
    };
    Ok((out, BlockCache { hw, x, bn1, a1, c1, bn2, a2, p, c2, bn3, ds }))
}

/// The block's backward: its parameters' gradients into `g`; returns the
/// gradient of its input.
fn block_backward(
    blk: &Block,
    c: &BlockCache,
    b: usize,
    d_out: &Tensor,
    g: &mut BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    let p = &blk.prefix;
    let s1 = conv_shape(b, c.hw, blk.inplanes, blk.planes, 3, 1);
    let s2 = conv_shape(b, c.hw, blk.planes, blk.planes, 3, blk.stride);
    let g3 = blk.bn3.backward(&c.c2, &c.bn3, d_out)?;
    insert_bn(g, &format!("{p}.bn3"), g3.weight, g3.bias);
    g.insert(format!("{p}.conv2.weight"), conv2d_weight_grad(&c.p, &g3.input, &s2)?);
    let d_p = conv2d_data_grad(&g3.input, &blk.conv2, &s2)?;
    let (d_a2, d_alpha) = prelu_backward(&c.a2, &blk.prelu, &d_p)?;
    g.insert(format!("{p}.prelu.weight"), d_alpha);
    let g2 = blk.bn2.backward(&c.c1, &c.bn2, &d_a2)?;
    insert_bn(g, &format!("{p}.bn2"), g2.weight, g2.bias);
    g.insert(format!("{p}.conv1.weight"), conv2d_weight_grad(&c.a1, &g2.input, &s1)?);
    let d_a1 = conv2d_data_grad(&g2.input, &blk.conv1, &s1)?;
    let g1 = blk.bn1.backward(&c.x, &c.bn1, &d_a1)?;
    insert_bn(g, &format!("{p}.bn1"), g1.weight, g1.bias);
    let d_identity = match (&blk.downsample, &c.ds) {
        (Some((w, bn)), Some((dc, dcache))) => {
            let sd = conv_shape(b, c.hw, blk.inplanes, blk.planes, 1, blk.stride);
            let gd = bn.backward(dc, dcache, d_out)?;
            insert_bn(g, &format!("{p}.downsample.1"), gd.weight, gd.bias);
            g.insert(format!("{p}.downsample.0.weight"), conv2d_weight_grad(&c.x, &gd.input, &sd)?);
            conv2d_data_grad(&gd.input, w, &sd)?
        }
        _ => return add(&g1.input, d_out),
    };
    add(&g1.input, &d_identity)
}
