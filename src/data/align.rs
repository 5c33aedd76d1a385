//! Face alignment as insightface does it before embedding (its
//! `face_align.norm_crop`, and the IJB scripts): the similarity transform
//! (rotation, uniform scale, translation) that best maps five detected
//! landmarks — eyes, nose tip, mouth corners — onto the ArcFace template
//! in the least-squares sense (Umeyama's method, as scikit-image's
//! `SimilarityTransform.estimate`), then the image warped through it to
//! 112 × 112 with bilinear interpolation and black outside the image (as
//! OpenCV's `warpAffine` with `borderValue=0`; OpenCV interpolates with
//! 5-bit fixed-point weights, so a pixel may differ by one level).

/// The ArcFace template: where the five landmarks go in a 112 × 112 crop.
pub const ARCFACE_112: [[f64; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// The 2 × 3 similarity transform `M` (dst = M · [x, y, 1]) that maps the
/// points `src` onto `dst` best in the least-squares sense (Umeyama 1991,
/// with scale; a reflection is never chosen). None when the source points
/// all coincide.
pub fn similarity(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<[[f64; 3]; 2]> {
    let n = src.len().min(dst.len());
    if n < 2 {
        return None;
    }
    let mean = |p: &[[f64; 2]]| {
        let (x, y) = p[..n].iter().fold((0.0, 0.0), |a, q| (a.0 + q[0], a.1 + q[1]));
        [x / n as f64, y / n as f64]
    };
    let (ms, md) = (mean(src), mean(dst));
    // Covariance of the centred points (dst^T · src / n) and the source
    // variance.
    let mut cov = [[0f64; 2]; 2];
    let mut var = 0.0;
    for (s, d) in src[..n].iter().zip(&dst[..n]) {
        let (sx, sy, dx, dy) = (s[0] - ms[0], s[1] - ms[1], d[0] - md[0], d[1] - md[1]);
        cov[0][0] += dx * sx;
        cov[0][1] += dx * sy;
        cov[1][0] += dy * sx;
        cov[1][1] += dy * sy;
        var += sx * sx + sy * sy;
    }
    let nf = n as f64;
    cov.iter_mut().flatten().for_each(|c| *c /= nf);
    var /= nf;
    if var <= 0.0 {
        return None;
    }
    // For 2-D, the best rotation of a similarity transform has
    // cos ∝ (c00 + c11), sin ∝ (c10 − c01), and the scale is the norm of
    // that vector over the source variance (the SVD solution without
    // reflection).
    let (a, b) = (cov[0][0] + cov[1][1], cov[1][0] - cov[0][1]);
    let r = a.hypot(b);
    if r == 0.0 {
        return None;
    }
    let (c, s) = (a / r, b / r);
    let scale = r / var;
    let (m00, m01, m10, m11) = (scale * c, -scale * s, scale * s, scale * c);
    let tx = md[0] - (m00 * ms[0] + m01 * ms[1]);
    let ty = md[1] - (m10 * ms[0] + m11 * ms[1]);
    Some([[m00, m01, tx], [m10, m11, ty]])
}

/// `img` (RGB u8, `w` × `h`) warped by `m` (source → destination) into a
/// `size` × `size` RGB crop: each destination pixel samples the source at
/// `m⁻¹ · (x, y)` bilinearly; outside the source, black. None when `m` is
/// not invertible.
pub fn warp_affine(img: &[u8], w: usize, h: usize, m: &[[f64; 3]; 2], size: usize) -> Option<Vec<u8>> {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if det == 0.0 || !det.is_finite() || img.len() != w * h * 3 {
        return None;
    }
    // The inverse map.
    let (i00, i01, i10, i11) = (m[1][1] / det, -m[0][1] / det, -m[1][0] / det, m[0][0] / det);
    let (itx, ity) = (-(i00 * m[0][2] + i01 * m[1][2]), -(i10 * m[0][2] + i11 * m[1][2]));
    let px = |x: isize, y: isize, c: usize| -> f64 {
        if x < 0 || y < 0 || x as usize >= w || y as usize >= h {
            0.0
        } else {
            img[(y as usize * w + x as usize) * 3 + c] as f64
        }
    };
    let mut out = vec![0u8; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            let sx = i00 * x as f64 + i01 * y as f64 + itx;
            let sy = i10 * x as f64 + i11 * y as f64 + ity;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for c in 0..3 {
                let v = px(x0, y0, c) * (1.0 - fx) * (1.0 - fy)
                    + px(x0 + 1, y0, c) * fx * (1.0 - fy)
                    + px(x0, y0 + 1, c) * (1.0 - fx) * fy
                    + px(x0 + 1, y0 + 1, c) * fx * fy;
                out[(y * size + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Some(out)
}

/// A face crop aligned to the ArcFace template (scaled to `size`: 112 is
/// insightface's) from five landmarks `(x, y)` in the image.
pub fn norm_crop(img: &[u8], w: usize, h: usize, landmarks: &[[f64; 2]; 5], size: usize) -> Option<Vec<u8>> {
    let k = size as f64 / 112.0;
    let dst: Vec<[f64; 2]> = ARCFACE_112.iter().map(|p| [p[0] * k, p[1] * k]).collect();
    let m = similarity(landmarks, &dst)?;
    warp_affine(img, w, h, &m, size)
}
