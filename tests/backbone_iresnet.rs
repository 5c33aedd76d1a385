//! The assembled IResNet: a small network of the same structure (stem, four
//! stages, downsample and plain blocks, BN, flatten, Linear, BN1d) — the
//! kernels' forward and backward equal the CPU path's on the simulator (and
//! a GPU), and the CPU path's gradients match finite differences for
//! parameters of every kind; the state names are insightface's.

mod common;

use common::*;
use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::{Device, Error, Tensor};

fn tiny() -> IResNetConfig {
    IResNetConfig { layers: [2, 1, 1, 1], stem: 4, widths: [4, 8, 8, 12], input: 16, embedding: 6 }
}

fn images(dev: &Device, b: usize, seed: u64) -> (Vec<f32>, Tensor) {
    let mut r = rng(seed);
    let v = uniform(&mut r, b * 16 * 16 * 3, -1.0, 1.0);
    let t = Tensor::from_slice(dev, &[b, 16, 16, 3], &v).unwrap();
    (v, t)
}

fn loss_of(emb: &[f32], w: &[f32]) -> f64 {
    emb.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn state_names_follow_insightface() {
    let net = IResNet::new(IResNetConfig::arch("r18").unwrap(), &Device::cpu(), 1).unwrap();
    let st = net.state();
    for k in [
        "conv1.weight",
        "bn1.running_var",
        "prelu.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer1.1.conv2.weight",
        "layer4.1.bn3.bias",
        "bn2.weight",
        "fc.weight",
        "fc.bias",
        "features.weight",
    ] {
        assert!(st.contains_key(k), "{k}");
    }
    assert!(!st.contains_key("layer1.1.downsample.0.weight"));
    assert_eq!(st["fc.weight"].shape(), &[512, 7 * 7 * 512]);
    assert_eq!(st["layer2.0.conv2.weight"].shape(), &[128, 3, 3, 128]);
}

#[test]
fn kernels_match_the_cpu_path_forward_and_backward() {
    let b = 3;
    let cpu = Device::cpu();
    let mut want_net = IResNet::new(tiny(), &cpu, 5).unwrap();
    let (img, xt) = images(&cpu, b, 6);
    let mut r = rng(7);
    let d_emb = uniform(&mut r, b * 6, -1.0, 1.0);
    for training in [true, false] {
        let (want_emb, cache) = want_net.forward(&xt, training).unwrap();
        let want_g = want_net.backward(&cache, &Tensor::from_slice(&cpu, &[b, 6], &d_emb).unwrap()).unwrap();
        for dev in gpu_devices() {
            let mut net = IResNet::new(tiny(), &dev, 5).unwrap();
            if !training {
                // Same running statistics as the CPU network after its training pass.
                for (k, v) in want_net.state() {
                    net.set(&k, Tensor::from_slice(&dev, v.shape(), &v.to_vec::<f32>().unwrap()).unwrap()).unwrap();
                }
            }
            let x = Tensor::from_slice(&dev, &[b, 16, 16, 3], &img).unwrap();
            let (emb, c) = net.forward(&x, training).unwrap();
            let what = format!("{dev} training {training}");
            assert_close(
                &format!("{what} emb"),
                &emb.to_vec::<f32>().unwrap(),
                &want_emb.to_vec::<f32>().unwrap(),
                2e-4,
                2e-3,
            );
            let g = net.backward(&c, &Tensor::from_slice(&dev, &[b, 6], &d_emb).unwrap()).unwrap();
            assert_eq!(g.keys().collect::<Vec<_>>(), want_g.keys().collect::<Vec<_>>());
            for (k, want) in &want_g {
                let w = want.to_vec::<f32>().unwrap();
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                assert_close(&format!("{what} {k}"), &g[k].to_vec::<f32>().unwrap(), &w, 2e-3 * scale, 2e-3);
            }
        }
    }
}

#[test]
fn cpu_gradients_match_finite_differences() {
    let b = 2;
    let cpu = Device::cpu();
    let mut net = IResNet::new(tiny(), &cpu, 9).unwrap();
    let (_, xt) = images(&cpu, b, 10);
    let mut r = rng(11);
    let w = uniform(&mut r, b * 6, -1.0, 1.0);
    let (_, cache) = net.forward(&xt, true).unwrap();
    let g = net.backward(&cache, &Tensor::from_slice(&cpu, &[b, 6], &w).unwrap()).unwrap();
    let h = 1e-2f32;
    for (name, idx) in [
        ("conv1.weight", 5usize),
        ("bn1.weight", 1),
        ("prelu.weight", 2),
        ("layer1.0.conv2.weight", 17),
        ("layer1.0.downsample.0.weight", 3),
        ("layer1.1.bn3.bias", 0),
        ("layer4.0.prelu.weight", 4),
        ("bn2.weight", 7),
        ("fc.weight", 11),
        ("fc.bias", 2),
        ("features.bias", 1),
    ] {
        let base = net.state()[name].to_vec::<f32>().unwrap();
        let shape = net.state()[name].shape().to_vec();
        let mut eval = |v: Vec<f32>| {
            net.set(name, Tensor::from_slice(&cpu, &shape, &v).unwrap()).unwrap();
            let (emb, _) = net.forward(&xt, true).unwrap();
            loss_of(&emb.to_vec::<f32>().unwrap(), &w)
        };
        let (mut p, mut m) = (base.clone(), base.clone());
        p[idx] += h;
        m[idx] -= h;
        let fd = (eval(p) - eval(m)) / (2.0 * h as f64);
        eval(base);
        let analytic = g[name].to_vec::<f32>().unwrap()[idx] as f64;
        assert!((fd - analytic).abs() <= 5e-3 + 2e-2 * fd.abs(), "{name}[{idx}]: fd {fd}, analytic {analytic}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dev = Device::cpu();
    let mut net = IResNet::new(tiny(), &dev, 1).unwrap();
    let wrong = Tensor::from_slice(&dev, &[1, 16, 16, 4], &[0.5f32; 1024]).unwrap();
    assert!(matches!(net.forward(&wrong, true), Err(Error::Shape { .. })));
    assert!(IResNetConfig::arch("r42").is_err());
    let bad = Tensor::from_slice(&dev, &[3], &[1.0f32; 3]).unwrap();
    assert!(matches!(net.set("bn1.weight", bad), Err(Error::Shape { .. })));
    assert!(matches!(
        net.set("nope.weight", Tensor::from_slice(&dev, &[1], &[1.0f32]).unwrap()),
        Err(Error::InvalidArgument { .. })
    ));
}
