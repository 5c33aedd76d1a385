//! Face alignment (src/data/align.rs): the least-squares similarity
//! transform recovers known transforms exactly, the warp samples where it
//! should, and a face moved, turned and scaled in a larger image comes
//! back to the template crop from its moved landmarks; IJB image features
//! (src/eval/ijb.rs) are the embedding of the aligned crop plus its mirror
//! image's.

mod common;

use gif_fr::data::align::{norm_crop, similarity, warp_affine, ARCFACE_112};

fn apply(m: &[[f64; 3]; 2], p: [f64; 2]) -> [f64; 2] {
    [m[0][0] * p[0] + m[0][1] * p[1] + m[0][2], m[1][0] * p[0] + m[1][1] * p[1] + m[1][2]]
}

/// A similarity transform: rotation `a` (radians), scale `s`, shift.
fn sim(a: f64, s: f64, tx: f64, ty: f64) -> [[f64; 3]; 2] {
    [[s * a.cos(), -s * a.sin(), tx], [s * a.sin(), s * a.cos(), ty]]
}

#[test]
fn the_similarity_of_exact_correspondences_is_the_transform() {
    for (a, s, tx, ty) in [(0.3, 1.7, 12.0, -4.0), (-1.2, 0.6, 0.0, 30.0), (0.0, 1.0, 0.0, 0.0), (3.0, 2.5, -7.0, 9.0)]
    {
        let m = sim(a, s, tx, ty);
        let dst: Vec<[f64; 2]> = ARCFACE_112.iter().map(|&p| apply(&m, p)).collect();
        let got = similarity(&ARCFACE_112, &dst).unwrap();
        for r in 0..2 {
            for c in 0..3 {
                assert!((got[r][c] - m[r][c]).abs() < 1e-9, "{got:?} vs {m:?}");
            }
        }
    }
    // Noisy points: the least-squares fit beats nearby transforms.
    let m = sim(0.2, 1.3, 5.0, 6.0);
    let noise = [[0.5, -0.3], [-0.2, 0.4], [0.1, 0.1], [-0.6, 0.2], [0.3, -0.5]];
    let dst: Vec<[f64; 2]> = ARCFACE_112
        .iter()
        .zip(noise)
        .map(|(&p, n)| {
            let q = apply(&m, p);
            [q[0] + n[0], q[1] + n[1]]
        })
        .collect();
    let fit = similarity(&ARCFACE_112, &dst).unwrap();
    let err = |m: &[[f64; 3]; 2]| -> f64 {
        ARCFACE_112
            .iter()
            .zip(&dst)
            .map(|(&p, d)| {
                let q = apply(m, p);
                (q[0] - d[0]).powi(2) + (q[1] - d[1]).powi(2)
            })
            .sum()
    };
    for (da, ds) in [(0.01, 0.0), (-0.01, 0.0), (0.0, 0.01), (0.0, -0.01)] {
        let mut other = sim(0.2 + da, 1.3 + ds, 0.0, 0.0);
        // Best translation for that rotation and scale.
        let (mut sx, mut sy) = (0.0, 0.0);
        for (&p, d) in ARCFACE_112.iter().zip(&dst) {
            let q = apply(&other, p);
            sx += d[0] - q[0];
            sy += d[1] - q[1];
        }
        other[0][2] = sx / 5.0;
        other[1][2] = sy / 5.0;
        assert!(err(&fit) < err(&other), "{} vs {}", err(&fit), err(&other));
    }
    // Coinciding points define nothing.
    assert!(similarity(&[[1.0, 1.0]; 5], &ARCFACE_112).is_none());
}

fn face(size: usize) -> Vec<u8> {
    let cfg = gif_fr::data::synth::SynthConfig {
        size,
        pose: 0.0,
        lighting: 0.0,
        blur: 0.0,
        noise: 0.0,
        occlusion: 0.0,
        ..gif_fr::data::synth::SynthConfig::new(1)
    };
    gif_fr::data::synth::image(&cfg, 0, 0)
}

#[test]
fn a_moved_face_comes_back_to_the_template() {
    let img = face(112);
    // The identity warp reproduces the image.
    let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
    assert_eq!(warp_affine(&img, 112, 112, &id, 112).unwrap(), img);
    // Landmarks at the template: norm_crop is the identity too.
    assert_eq!(norm_crop(&img, 112, 112, &ARCFACE_112, 112).unwrap(), img);
    // Moved into a 200 x 160 image: rotated 25°, scaled 1.4, shifted.
    let m = sim(25f64.to_radians(), 1.4, 70.0, 10.0);
    let big = warp_affine(&img, 112, 112, &m, 200).unwrap();
    let (w, h) = (200, 200);
    let moved: Vec<[f64; 2]> = ARCFACE_112.iter().map(|&p| apply(&m, p)).collect();
    let lm: [[f64; 2]; 5] = [moved[0], moved[1], moved[2], moved[3], moved[4]];
    let back = norm_crop(&big, w, h, &lm, 112).unwrap();
    // Two bilinear resamplings: small differences, away from the border.
    let mut total = 0.0;
    let mut n = 0;
    for y in 8..104 {
        for x in 8..104 {
            for c in 0..3 {
                let i = (y * 112 + x) * 3 + c;
                total += (back[i] as f64 - img[i] as f64).abs();
                n += 1;
            }
        }
    }
    let mean = total / n as f64;
    assert!(mean < 4.0, "mean difference {mean}");
    // And it is not trivially so: the moved image itself differs a lot.
    let raw: f64 =
        (0..112 * 112 * 3).map(|i| (big[(i / 336) * 600 + i % 336] as f64 - img[i] as f64).abs()).sum::<f64>()
            / (112.0 * 112.0 * 3.0);
    assert!(raw > 4.0 * mean, "{raw} vs {mean}");
    // Outside the source: black.
    let far = [[1.0, 0.0, 500.0], [0.0, 1.0, 500.0]];
    assert!(warp_affine(&img, 112, 112, &far, 16).unwrap().iter().all(|&v| v == 0));
    assert!(warp_affine(&img, 112, 112, &[[0.0; 3]; 2], 16).is_none(), "a singular transform");
}

#[test]
fn ijb_image_features_are_the_aligned_crop_and_its_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let s = 16;
    let img = face(s);
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &img,
        s as u32,
        s as u32,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    std::fs::write(dir.path().join("a.png"), &png).unwrap();
    // Landmarks at the template scaled to 16 px: the crop is the image.
    let k = s as f32 / 112.0;
    let mut lm = [0f32; 10];
    for (i, p) in ARCFACE_112.iter().enumerate() {
        lm[2 * i] = p[0] as f32 * k;
        lm[2 * i + 1] = p[1] as f32 * k;
    }
    let cfg = gif_fr::backbone::IResNetConfig { input: s, ..common::tiny_iresnet() };
    let mut net = gif_fr::backbone::IResNet::new(cfg, &gif_fr::Device::cpu(), 2).unwrap();
    let entries = vec![("a.png".to_string(), lm, 1.0f32), ("a.png".to_string(), lm, 0.5)];
    let f = gif_fr::eval::ijb::image_features(&mut net, dir.path(), &entries, 1, |_, _| {}).unwrap();
    let px: Vec<f32> = img.iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect();
    let mut mirror = px.clone();
    for y in 0..s {
        for x in 0..s {
            let (a, b) = ((y * s + x) * 3, (y * s + s - 1 - x) * 3);
            mirror[a..a + 3].copy_from_slice(&px[b..b + 3]);
        }
    }
    let e = net.embed(&[px, mirror].concat(), 2).unwrap();
    for k in 0..6 {
        let want = e[k] + e[6 + k];
        assert!((f[k] - want).abs() < 1e-5 && (f[6 + k] - want).abs() < 1e-5, "{f:?} vs {e:?}");
    }
    // A missing image is an error naming it.
    let missing = vec![("b.png".to_string(), lm, 1.0f32)];
    let err = gif_fr::eval::ijb::image_features(&mut net, dir.path(), &missing, 4, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("b.png"), "{err}");
}
