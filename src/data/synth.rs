//! A synthetic face-identity generator: learnable data without a download.
//!
//! Each identity is a procedural "face" drawn from (seed, identity): head
//! shape, skin tone and texture, hair colour and line, eyes (spacing, size,
//! iris colour), eyebrows, nose, mouth and a few marks. Each image is a new
//! rendering of it under a pose (in-plane rotation, a yaw-like shift of the
//! features, scale, translation), an expression (mouth curve, eye
//! opening), a background, lighting (gain, a directional gradient, a colour
//! cast), blur, sensor noise and, sometimes, an occluder (a band over the
//! eyes or a block). Image counts per identity follow a power law (a few
//! identities have many images, most have few, as WebFace's do).
//!
//! Everything is keyed: identity i's parameters by (seed, i), image j's
//! nuisances by (seed, i, j), so a set is the same bytes whatever the
//! thread count. [`write_training_set`] writes insightface's RecordIO
//! (`train.rec`, `train.idx`, `property`; JPEG records), and
//! [`verification_pairs`] renders a verification set of *other* identities
//! (ids from `identities` on: open set, as insightface's benchmarks are),
//! written as an insightface `.bin`.
//!
//! The knobs ([`SynthConfig`]) scale the nuisances; the defaults make a
//! nearest-class-mean classifier on raw pixels far better than chance and
//! far from perfect (tests/synth.rs measures it), so a network has to
//! learn invariance.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::recordio::{pack, ImageHeader, RecordWriter};
use crate::io::verification::PairSet;
use crate::runtime::hash::splitmix64;

/// What to generate; see the module documentation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SynthConfig {
    /// Training identities N.
    pub identities: usize,
    /// Image side in pixels (insightface: 112).
    pub size: usize,
    /// Fewest images of an identity (≥ 1).
    pub min_images: usize,
    /// Most images of an identity (≥ min_images).
    pub max_images: usize,
    /// The power law's exponent α: an identity has ⌊min · u^(−1/α)⌋
    /// images (u uniform in (0, 1]), capped at max; smaller α, longer tail.
    pub tail: f64,
    /// Seed of everything.
    pub seed: u64,
    /// Pose: the largest in-plane rotation in degrees; the yaw-like shift,
    /// the scale and translation ranges scale with it (0: frontal,
    /// centred).
    pub pose: f64,
    /// Lighting strength in [0, 1]: gain, gradient and colour cast.
    pub lighting: f64,
    /// Probability that an image is blurred (a box blur of radius 1, or 2
    /// at 64 px and above).
    pub blur: f64,
    /// The largest sensor-noise standard deviation, in 0–255 units.
    pub noise: f64,
    /// Probability that an image has an occluder.
    pub occlusion: f64,
    /// How far apart identities are in [0.1, 1]: the fraction of each
    /// parameter's range an identity draws from (smaller: more alike).
    pub diversity: f64,
    /// JPEG quality of the records (insightface's im2rec: 95).
    pub quality: u8,
}

impl SynthConfig {
    /// `identities` at 112 × 112 with the default knobs: 2 to 100 images
    /// (α = 1.2), pose 12°, lighting 0.5, blur 0.2, noise 6, occlusion
    /// 0.1, diversity 1, quality 95, seed 0.
    pub fn new(identities: usize) -> SynthConfig {
        SynthConfig {
            identities,
            size: 112,
            min_images: 2,
            max_images: 100,
            tail: 1.2,
            seed: 0,
            pose: 12.0,
            lighting: 0.5,
            blur: 0.2,
            noise: 6.0,
            occlusion: 0.1,
            diversity: 1.0,
            quality: 95,
        }
    }

    /// Checks every knob (errors name the field).
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "synth";
        let bad = |field: &str, why: String| Err(Error::invalid(OP, format!("{field}: {why}")));
        if self.identities == 0 || self.identities > MAX_IDENTITIES {
            return bad("identities", format!("{} is outside 1..={MAX_IDENTITIES}", self.identities));
        }
        if !(16..=1024).contains(&self.size) {
            return bad("size", format!("{} is outside 16..=1024", self.size));
        }
        if self.min_images == 0 || self.max_images < self.min_images || self.max_images > MAX_IMAGES_PER_IDENTITY {
            return bad(
                "min_images / max_images",
                format!(
                    "need 1 <= min <= max <= {MAX_IMAGES_PER_IDENTITY}; got {} and {}",
                    self.min_images, self.max_images
                ),
            );
        }
        if !(self.tail.is_finite() && self.tail > 0.0) {
            return bad("tail", format!("{} is not a positive exponent", self.tail));
        }
        for (name, v, hi) in [
            ("pose", self.pose, 45.0),
            ("lighting", self.lighting, 1.0),
            ("blur", self.blur, 1.0),
            ("noise", self.noise, 64.0),
            ("occlusion", self.occlusion, 1.0),
        ] {
            if !(v.is_finite() && (0.0..=hi).contains(&v)) {
                return bad(name, format!("{v} is outside [0, {hi}]"));
            }
        }
        if !(self.diversity.is_finite() && (0.1..=1.0).contains(&self.diversity)) {
            return bad("diversity", format!("{} is outside [0.1, 1]", self.diversity));
        }
        if !(1..=100).contains(&self.quality) {
            return bad("quality", format!("{} is outside 1..=100", self.quality));
        }
        // Counted in u64: each count is at most 2^16 and there are at most
        // 2^24 identities.
        let total: u64 = (0..self.identities as u64).map(|i| self.count_of(i) as u64).sum();
        if total + self.identities as u64 + 1 > MAX_RECORDS as u64 {
            return bad(
                "identities",
                format!(
                    "{total} images and {} identity records exceed the {MAX_RECORDS} records whose keys \
                     insightface's f32 header range holds exactly",
                    self.identities
                ),
            );
        }
        Ok(())
    }

    /// The number of images of each training identity.
    pub fn image_counts(&self) -> Vec<usize> {
        (0..self.identities).map(|i| self.count_of(i as u64)).collect()
    }

    fn count_of(&self, id: u64) -> usize {
        let mut r = rng(self.seed, STREAM_COUNT, id, 0);
        let u: f64 = 1.0 - r.random::<f64>(); // (0, 1]
        let n = (self.min_images as f64 * u.powf(-1.0 / self.tail)).floor();
        (n.min(self.max_images as f64) as usize).max(self.min_images)
    }
}

/// The most identities a set may have.
pub const MAX_IDENTITIES: usize = 1 << 24;
/// The most images of one identity.
pub const MAX_IMAGES_PER_IDENTITY: usize = 1 << 16;
/// The most records of a set (the header, the images, the identity
/// records): record 0's f32 labels give the key ranges, exact up to 2^24.
pub const MAX_RECORDS: usize = 1 << 24;

const STREAM_IDENTITY: u64 = 1;
const STREAM_IMAGE: u64 = 2;
const STREAM_COUNT: u64 = 3;
const STREAM_PAIRS: u64 = 4;

/// A generator keyed by (seed, stream, a, b).
fn rng(seed: u64, stream: u64, a: u64, b: u64) -> StdRng {
    let k = splitmix64(splitmix64(splitmix64(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ a) ^ b);
    StdRng::seed_from_u64(k)
}

type Rgb = [f32; 3];

/// An identity's fixed appearance (face space: x right, y down, the face
/// roughly in [−1, 1]²).
#[derive(Clone, Debug)]
pub struct Identity {
    face: (f32, f32),
    skin: Rgb,
    texture: [(f32, f32, f32, f32); 2],
    hair: Rgb,
    hairline: f32,
    hair_volume: f32,
    eye_y: f32,
    eye_x: f32,
    eye_r: (f32, f32),
    iris: Rgb,
    brow: (f32, f32, f32, f32),
    nose: (f32, f32),
    mouth: (f32, f32, f32, f32),
    lips: Rgb,
    marks: Vec<(f32, f32, f32)>,
    glasses: Option<Rgb>,
}

impl Identity {
    /// Identity `id` of the generator seeded `seed`, its parameters drawn
    /// from the middle `diversity` of each range.
    pub fn new(seed: u64, id: u64, diversity: f32) -> Identity {
        let mut r = rng(seed, STREAM_IDENTITY, id, 0);
        let mut u = |lo: f32, hi: f32| {
            let m = (lo + hi) / 2.0;
            let h = (hi - lo) / 2.0 * diversity;
            r.random_range(m - h..=m + h)
        };
        let tone = u(0.0, 1.0);
        let lerp = |a: Rgb, b: Rgb, t: f32| [0, 1, 2].map(|k| a[k] + (b[k] - a[k]) * t);
        let skin = lerp([236.0, 204.0, 178.0], [96.0, 62.0, 44.0], tone);
        let skin = [skin[0] + u(-14.0, 14.0), skin[1] + u(-12.0, 12.0), skin[2] + u(-12.0, 12.0)];
        const HAIR: [Rgb; 6] = [
            [28.0, 24.0, 22.0],
            [86.0, 56.0, 34.0],
            [150.0, 110.0, 60.0],
            [222.0, 190.0, 120.0],
            [160.0, 70.0, 36.0],
            [170.0, 170.0, 172.0],
        ];
        let h = (u(0.0, 5.999) as usize).min(5);
        let hair = [0, 1, 2].map(|k| (HAIR[h][k] + u(-18.0, 18.0)).clamp(0.0, 255.0));
        const IRIS: [Rgb; 4] = [[70.0, 45.0, 25.0], [60.0, 110.0, 170.0], [70.0, 120.0, 70.0], [110.0, 115.0, 120.0]];
        let iris = IRIS[(u(0.0, 3.999) as usize).min(3)];
        let lips = lerp(skin, [180.0, 70.0, 80.0], u(0.3, 0.8));
        let n_marks = u(0.0, 3.999) as usize;
        let marks = (0..n_marks).map(|_| (u(-0.45, 0.45), u(-0.3, 0.55), u(0.018, 0.04))).collect();
        let glasses = (u(0.0, 1.0) < 0.15).then(|| [u(10.0, 200.0), u(10.0, 200.0), u(10.0, 200.0)]);
        let eye_y = u(-0.16, 0.0);
        Identity {
            face: (u(0.50, 0.70), u(0.68, 0.88)),
            skin,
            texture: [
                (u(0.0, 0.07), u(2.0, 9.0), u(2.0, 9.0), u(0.0, std::f32::consts::TAU)),
                (u(0.0, 0.05), u(5.0, 14.0), u(1.0, 6.0), u(0.0, std::f32::consts::TAU)),
            ],
            hair,
            hairline: u(-0.62, -0.38),
            hair_volume: u(0.05, 0.22),
            eye_y,
            eye_x: u(0.19, 0.33),
            eye_r: (u(0.08, 0.13), u(0.035, 0.065)),
            iris,
            brow: (eye_y - u(0.10, 0.17), u(0.13, 0.22), u(0.018, 0.045), u(-0.3, 0.3)),
            nose: (u(0.18, 0.32), u(0.04, 0.09)),
            mouth: (u(0.38, 0.54), u(0.13, 0.27), u(0.022, 0.055), u(-0.06, 0.12)),
            lips,
            marks,
            glasses,
        }
    }
}

/// One image's nuisances.
struct View {
    angle: f32,
    scale: f32,
    shift: (f32, f32),
    yaw: f32,
    smile: f32,
    eye_open: f32,
    background: (Rgb, Rgb),
    gain: f32,
    light: (f32, f32, f32),
    cast: Rgb,
    blur: usize,
    noise: f32,
    occluder: Option<(Occluder, Rgb)>,
}

enum Occluder {
    /// A horizontal band over the eyes, in face space: centre y, half height.
    Band(f32, f32),
    /// An image-space box: x0, y0, x1, y1 in [−1, 1].
    Block(f32, f32, f32, f32),
}

impl View {
    fn draw(cfg: &SynthConfig, r: &mut StdRng, eye_y: f32) -> View {
        let (pose, l) = (cfg.pose as f32, cfg.lighting as f32);
        let p = pose / 12.0;
        let mut s = |a: f32| if a > 0.0 { r.random_range(-a..=a) } else { 0.0 };
        let angle = s(pose).to_radians();
        let scale = 1.0 + s(0.08 * p);
        let shift = (s(0.07 * p), s(0.07 * p));
        let yaw = s(0.5 * p).clamp(-0.9, 0.9);
        let smile = s(0.06);
        let eye_open = 1.0 + s(0.3);
        let bg = |r: &mut StdRng| [0, 1, 2].map(|_| r.random_range(20.0..235.0f32));
        let background = (bg(r), bg(r));
        let gain = 1.0 + r.random_range(-0.35..=0.35f32) * l;
        let dir = r.random_range(0.0..std::f32::consts::TAU);
        let light = (dir.cos(), dir.sin(), r.random_range(0.0..=0.5f32) * l);
        let cast = [0, 1, 2].map(|_| 1.0 + r.random_range(-0.12..=0.12f32) * l);
        let blur = if r.random::<f64>() < cfg.blur {
            if cfg.size >= 64 {
                r.random_range(1..=2)
            } else {
                1
            }
        } else {
            0
        };
        let noise = r.random::<f32>() * cfg.noise as f32;
        let occluder = (r.random::<f64>() < cfg.occlusion).then(|| {
            let colour = [0, 1, 2].map(|_| r.random_range(0.0..255.0f32));
            let o = if r.random::<bool>() {
                Occluder::Band(eye_y + r.random_range(-0.03..0.03f32), r.random_range(0.06..0.12f32))
            } else {
                let (w, h) = (r.random_range(0.3..0.8f32), r.random_range(0.3..0.8f32));
                let (x, y) = (r.random_range(-1.0..1.0 - w), r.random_range(-1.0..1.0 - h));
                Occluder::Block(x, y, x + w, y + h)
            };
            (o, colour)
        });
        View { angle, scale, shift, yaw, smile, eye_open, background, gain, light, cast, blur, noise, occluder }
    }
}

/// Coverage of a shape from its signed distance `d` (negative inside) with
/// an edge `w` wide.
fn cover(d: f32, w: f32) -> f32 {
    (0.5 - d / w).clamp(0.0, 1.0)
}

/// Approximate signed distance to an axis-aligned ellipse.
fn ellipse(x: f32, y: f32, rx: f32, ry: f32) -> f32 {
    ((x / rx).hypot(y / ry) - 1.0) * rx.min(ry)
}

/// Distance to the segment a–b, minus a radius.
fn capsule(p: (f32, f32), a: (f32, f32), b: (f32, f32), radius: f32) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / (dx * dx + dy * dy).max(1e-12)).clamp(0.0, 1.0);
    (p.0 - a.0 - t * dx).hypot(p.1 - a.1 - t * dy) - radius
}

fn mix(c: &mut Rgb, over: Rgb, a: f32) {
    for k in 0..3 {
        c[k] += (over[k] - c[k]) * a;
    }
}

/// The colour of face-space point (x, y) before lighting; `w`: the edge
/// width in face units.
fn shade(id: &Identity, v: &View, x: f32, y: f32, w: f32, image_xy: (f32, f32)) -> Rgb {
    let t = (image_xy.1 + 1.0) / 2.0;
    let mut c = [0, 1, 2].map(|k| v.background.0[k] + (v.background.1[k] - v.background.0[k]) * t);
    let (fx, fy) = id.face;
    // The yaw turns the face: it narrows, and the features slide sideways.
    let narrow = 1.0 - 0.25 * v.yaw.abs();
    let slide = 0.18 * v.yaw;
    // Hair behind the head.
    let back = ellipse(x, y + 0.08 + id.hair_volume * 0.5, fx * narrow + id.hair_volume, fy + id.hair_volume);
    let hair_cover = cover(back, w) * cover(y - 0.25, w);
    mix(&mut c, id.hair, hair_cover);
    // The face and its texture.
    let face = cover(ellipse(x, y, fx * narrow, fy), w);
    if face <= 0.0 {
        return c;
    }
    let fxl = x - slide;
    let tex = 1.0
        + id.texture.iter().map(|&(a, f1, f2, ph)| a * (f1 * fxl + ph).sin() * (f2 * y + ph * 0.7).sin()).sum::<f32>();
    let mut skin = id.skin.map(|s| s * tex);
    // The hairline: hair over the top of the face.
    mix(&mut skin, id.hair, cover(y - id.hairline, w));
    for &(mx, my, mr) in &id.marks {
        mix(&mut skin, [70.0, 45.0, 35.0], 0.8 * cover((fxl * 1.0 - mx * narrow).hypot(y - my) - mr, w));
    }
    // Eyebrows, eyes (sclera, iris, pupil), glasses.
    let (by, blen, bth, btilt) = id.brow;
    for side in [-1.0f32, 1.0] {
        let ex = slide + side * id.eye_x * narrow;
        let a = (ex - side * blen * 0.5, by + btilt * 0.05 * side);
        let b = (ex + side * blen * 0.5, by - btilt * 0.05 * side);
        mix(&mut skin, id.hair, cover(capsule((x, y), a, b, bth), w));
        let (rx, ry) = (id.eye_r.0 * narrow, id.eye_r.1 * v.eye_open);
        let eye = cover(ellipse(x - ex, y - id.eye_y, rx, ry), w);
        if eye > 0.0 {
            let mut e = [240.0, 238.0, 232.0];
            let ir = id.eye_r.1 * 0.95;
            mix(&mut e, id.iris, cover((x - ex).hypot(y - id.eye_y) - ir, w));
            mix(&mut e, [15.0, 12.0, 12.0], cover((x - ex).hypot(y - id.eye_y) - ir * 0.45, w));
            mix(&mut skin, e, eye);
        }
        if let Some(g) = id.glasses {
            let ring = ellipse(x - ex, y - id.eye_y, id.eye_r.0 * narrow + 0.06, id.eye_r.1 + 0.07).abs() - 0.012;
            mix(&mut skin, g, cover(ring, w));
        }
    }
    // The nose: a shaded ridge down to its tip.
    let (ny, nw) = id.nose;
    let nose = capsule((x, y), (slide * 1.2, id.eye_y + 0.06), (slide * 1.3, ny), nw * 0.35);
    let dark = id.skin.map(|s| s * 0.78);
    mix(&mut skin, dark, 0.6 * cover(nose, w * 2.0));
    // The mouth: a band along a parabola.
    let (my, mw, mth, mcurve) = id.mouth;
    let mx = (x - slide * 1.1) / (mw * narrow);
    if mx.abs() < 1.2 {
        let curve = my + (mcurve + v.smile) * (1.0 - mx * mx);
        let d = ((y - curve).abs() - mth).max((mx.abs() - 1.0) * mw * narrow);
        mix(&mut skin, id.lips, cover(d, w));
    }
    mix(&mut c, skin, face);
    c
}

/// Renders identity `id` under view `v` into `out` (RGB u8, size² · 3).
fn render(cfg: &SynthConfig, id: &Identity, v: &View, r: &mut StdRng, out: &mut [u8]) {
    let s = cfg.size;
    let mut img = vec![[0f32; 3]; s * s];
    let (sin, cos) = v.angle.sin_cos();
    let w = 2.0 / s as f32 / v.scale * 1.2;
    for py in 0..s {
        for px in 0..s {
            let ix = (px as f32 + 0.5) / s as f32 * 2.0 - 1.0;
            let iy = (py as f32 + 0.5) / s as f32 * 2.0 - 1.0;
            // Image → face space: undo the shift, the scale, the rotation.
            let (dx, dy) = ((ix - v.shift.0) / v.scale, (iy - v.shift.1) / v.scale);
            let (x, y) = (cos * dx + sin * dy, -sin * dx + cos * dy);
            let mut c = shade(id, v, x * 1.05, y * 1.05 + 0.04, w, (ix, iy));
            let lit = v.gain * (1.0 + v.light.2 * (v.light.0 * ix + v.light.1 * iy));
            for (ck, cast) in c.iter_mut().zip(v.cast) {
                *ck *= lit * cast;
            }
            if let Some((o, colour)) = &v.occluder {
                let inside = match *o {
                    Occluder::Band(cy, hh) => (y - cy).abs() < hh && x.abs() < 0.8,
                    Occluder::Block(x0, y0, x1, y1) => ix >= x0 && ix <= x1 && iy >= y0 && iy <= y1,
                };
                if inside {
                    c = *colour;
                }
            }
            img[py * s + px] = c;
        }
    }
    if v.blur > 0 {
        img = box_blur(&img, s, v.blur);
    }
    for (o, c) in out.chunks_exact_mut(3).zip(&img) {
        for k in 0..3 {
            let n = if v.noise > 0.0 { gaussian(r) * v.noise } else { 0.0 };
            o[k] = (c[k] + n).round().clamp(0.0, 255.0) as u8;
        }
    }
}

fn gaussian(r: &mut StdRng) -> f32 {
    let (u1, u2): (f32, f32) = (1.0 - r.random::<f32>(), r.random());
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A (2r + 1)² box blur, edges clamped.
fn box_blur(img: &[Rgb], s: usize, r: usize) -> Vec<Rgb> {
    let pass = |src: &[Rgb], horizontal: bool| -> Vec<Rgb> {
        let mut out = vec![[0f32; 3]; s * s];
        for y in 0..s {
            for x in 0..s {
                let mut acc = [0f32; 3];
                for d in -(r as isize)..=r as isize {
                    let (sx, sy) = if horizontal {
                        ((x as isize + d).clamp(0, s as isize - 1) as usize, y)
                    } else {
                        (x, (y as isize + d).clamp(0, s as isize - 1) as usize)
                    };
                    let p = src[sy * s + sx];
                    for k in 0..3 {
                        acc[k] += p[k];
                    }
                }
                out[y * s + x] = acc.map(|a| a / (2 * r + 1) as f32);
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

/// Image `j` of identity `id` (training ids 0..N; verification ids from N
/// on), as RGB u8 pixels `[size, size, 3]`.
pub fn image(cfg: &SynthConfig, id: u64, j: u64) -> Vec<u8> {
    let identity = Identity::new(cfg.seed, id, cfg.diversity as f32);
    image_of(cfg, &identity, id, j)
}

fn image_of(cfg: &SynthConfig, identity: &Identity, id: u64, j: u64) -> Vec<u8> {
    let mut r = rng(cfg.seed, STREAM_IMAGE, id, j);
    let v = View::draw(cfg, &mut r, identity.eye_y);
    let mut out = vec![0u8; cfg.size * cfg.size * 3];
    render(cfg, identity, &v, &mut r, &mut out);
    out
}

/// JPEG bytes of RGB pixels.
pub fn encode_jpeg(pixels: &[u8], size: usize, quality: u8) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality);
    image::ImageEncoder::write_image(enc, pixels, size as u32, size as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::invalid("synth", format!("JPEG encoding: {e}")))?;
    Ok(buf)
}

/// What [`write_training_set`] wrote.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SynthSummary {
    /// Identities.
    pub identities: usize,
    /// Images.
    pub images: usize,
    /// Fewest and most images of an identity.
    pub min_images: usize,
    /// Most images of an identity.
    pub max_images: usize,
    /// Bytes of train.rec.
    pub rec_bytes: u64,
}

/// Writes the training set into `dir` (created if needed): `train.rec`,
/// `train.idx`, `property`, in insightface's layout — record 0 a header
/// whose labels (a, b) say images are records 1 … a − 1 and identity
/// records a … b − 1 (each with its images' key range, as im2rec writes),
/// images in identity order, label = identity. Rendering and encoding run
/// on all cores, in chunks; `progress(done, total)` is called after each.
pub fn write_training_set(
    cfg: &SynthConfig,
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<SynthSummary> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let counts = cfg.image_counts();
    let total: usize = counts.iter().sum();
    // (identity, image index within it) in dataset order.
    let starts: Vec<usize> = counts
        .iter()
        .scan(0usize, |acc, &c| {
            let s = *acc;
            *acc += c;
            Some(s)
        })
        .collect();
    let mut w = RecordWriter::create(&dir.join("train.rec"), Some(&dir.join("train.idx")))?;
    let n = cfg.identities as u64;
    let first_id_record = total as u64 + 1;
    let header =
        ImageHeader { flag: 2, labels: vec![first_id_record as f32, (first_id_record + n) as f32], id: 0, id2: 0 };
    w.write(0, &pack(&header, b""))?;
    const CHUNK: usize = 1024;
    let mut id = 0usize;
    let mut done = 0usize;
    while done < total {
        let end = (done + CHUNK).min(total);
        // The (identity, j) of positions done..end.
        let mut items = Vec::with_capacity(end - done);
        let mut pos = done;
        while pos < end {
            while pos >= starts[id] + counts[id] {
                id += 1;
            }
            items.push((id, pos - starts[id]));
            pos += 1;
        }
        let encoded: Vec<Result<Vec<u8>>> = items
            .par_iter()
            .map(|&(i, j)| {
                let px = image(cfg, i as u64, j as u64);
                encode_jpeg(&px, cfg.size, cfg.quality)
            })
            .collect();
        for (k, (bytes, &(i, _))) in encoded.into_iter().zip(&items).enumerate() {
            let key = (done + k) as u64 + 1;
            w.write(key, &pack(&ImageHeader::new(i as f32, key), &bytes?))?;
        }
        done = end;
        progress(done, total);
    }
    for (i, (&s, &c)) in starts.iter().zip(&counts).enumerate() {
        let key = first_id_record + i as u64;
        let h = ImageHeader { flag: 2, labels: vec![(s + 1) as f32, (s + c + 1) as f32], id: key, id2: 0 };
        w.write(key, &pack(&h, b""))?;
    }
    w.finish()?;
    let property = format!("{},{},{}", cfg.identities, cfg.size, cfg.size);
    crate::io::write_atomic(&dir.join("property"), property.as_bytes())?;
    let rec_bytes = std::fs::metadata(dir.join("train.rec")).map(|m| m.len()).unwrap_or(0);
    Ok(SynthSummary {
        identities: cfg.identities,
        images: total,
        min_images: counts.iter().copied().min().unwrap_or(0),
        max_images: counts.iter().copied().max().unwrap_or(0),
        rec_bytes,
    })
}

/// Checks the verification set's sizes (as [`verification_pairs`] does),
/// so that a command can refuse them before writing anything.
pub fn check_pairs(identities: usize, pairs: usize) -> Result<()> {
    if !(2..=MAX_IDENTITIES).contains(&identities) {
        return Err(Error::invalid(
            "synth",
            format!("verification identities: {identities} is outside 2..={MAX_IDENTITIES}"),
        ));
    }
    if pairs == 0 || !pairs.is_multiple_of(20) || pairs > 1 << 24 {
        return Err(Error::invalid("synth", format!("pairs: {pairs} is not a positive multiple of 20 up to 2^24")));
    }
    Ok(())
}

/// A verification set of `pairs` pairs (a multiple of 20: ten folds, each
/// half same-identity pairs, then half different, as LFW's files are laid
/// out) among `identities` identities that are not in the training set
/// (ids N … N + identities − 1), JPEG-encoded.
pub fn verification_pairs(cfg: &SynthConfig, identities: usize, pairs: usize) -> Result<PairSet> {
    cfg.validate()?;
    check_pairs(identities, pairs)?;
    let base = cfg.identities as u64;
    let per_fold = pairs / 10;
    let mut r = rng(cfg.seed, STREAM_PAIRS, 0, 0);
    // (identity, image) of both sides of each pair; every image index is
    // fresh for its identity, so no image appears twice.
    let mut used = vec![0u64; identities];
    let mut next = |i: usize| {
        used[i] += 1;
        used[i] - 1
    };
    let mut plan = Vec::with_capacity(pairs);
    for _ in 0..10 {
        for k in 0..per_fold {
            let a = r.random_range(0..identities);
            let b = if k < per_fold / 2 {
                a
            } else {
                let o = r.random_range(1..identities);
                (a + o) % identities
            };
            plan.push(((a, next(a)), (b, next(b)), a == b));
        }
    }
    let images: Vec<Result<[Vec<u8>; 2]>> = plan
        .par_iter()
        .map(|&((a, ja), (b, jb), _)| {
            let pa = image(cfg, base + a as u64, ja);
            let pb = image(cfg, base + b as u64, jb);
            Ok([encode_jpeg(&pa, cfg.size, cfg.quality)?, encode_jpeg(&pb, cfg.size, cfg.quality)?])
        })
        .collect();
    let mut set = PairSet { images: Vec::with_capacity(2 * pairs), issame: plan.iter().map(|p| p.2).collect() };
    for pair in images {
        set.images.extend(pair?);
    }
    Ok(set)
}
