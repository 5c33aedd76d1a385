//! IResNet checkpoints: save → load round-trips every parameter and buffer
//! (and the embeddings); the file is in PyTorch's layouts (OIHW convs, fc
//! columns in (c, h, w) order) with insightface's names; a missing,
//! unexpected, mis-shaped or non-finite entry and a corrupt file are errors
//! naming the problem.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use gif_fr::backbone::{IResNet, IResNetConfig};
use gif_fr::{Device, Error, Tensor};

fn tiny() -> IResNetConfig {
    tiny_iresnet()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gif-fr-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Every entry of a safetensors file: (shape, f32 values or the raw I64).
fn read(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = if v.dtype() == safetensors::Dtype::F32 {
                v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            } else {
                vec![]
            };
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// Writes entries (all F32 except names ending in num_batches_tracked).
fn write(path: &Path, entries: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>, bool)> = entries
        .iter()
        .map(|(n, (s, v))| {
            if n.ends_with("num_batches_tracked") {
                (n.clone(), vec![], 0i64.to_le_bytes().to_vec(), true)
            } else {
                (n.clone(), s.clone(), bytemuck::cast_slice(v).to_vec(), false)
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, s, b, i)| {
            let d = if *i { safetensors::Dtype::I64 } else { safetensors::Dtype::F32 };
            (n.clone(), safetensors::tensor::TensorView::new(d, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn save_then_load_round_trips() {
    for dev in [Device::cpu(), Device::sim()] {
        let mut net = IResNet::new(tiny(), &dev, 3).unwrap();
        let mut r = rng(4);
        let img = Tensor::from_slice(&dev, &[2, 16, 16, 3], &uniform(&mut r, 2 * 768, -1.0, 1.0)).unwrap();
        net.forward(&img, true).unwrap(); // moves the running statistics off their initial values
        let path = temp(&format!("round-{}.safetensors", dev.kind() as u8));
        net.save(&path).unwrap();
        let mut back = IResNet::load(&path, tiny(), &dev).unwrap();
        for (k, t) in net.state() {
            assert_eq!(back.state()[&k].to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap(), "{dev}: {k}");
        }
        let a = net.infer(&img).unwrap();
        let b = back.infer(&img).unwrap();
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "{dev}: embeddings");
    }
}

#[test]
fn the_file_is_in_pytorch_layouts() {
    let net = IResNet::new(tiny(), &Device::cpu(), 5).unwrap();
    let path = temp("layout.safetensors");
    net.save(&path).unwrap();
    let file = read(&path);
    // conv1.weight: OIHW in the file, OHWI in the network.
    let ours = net.state()["conv1.weight"].to_vec::<f32>().unwrap();
    let (shape, torch) = &file["conv1.weight"];
    assert_eq!(shape, &vec![4, 3, 3, 3]);
    let (o, i, k) = (4, 3, 3);
    for oo in 0..o {
        for ii in 0..i {
            for r in 0..k {
                for q in 0..k {
                    assert_eq!(torch[((oo * i + ii) * k + r) * k + q], ours[((oo * k + r) * k + q) * i + ii]);
                }
            }
        }
    }
    // fc.weight: columns (c, h, w) in the file, (h, w, c) in the network; final map 1x1 here.
    let (shape, _) = &file["fc.weight"];
    assert_eq!(shape, &vec![6, 12]);
    assert!(file.contains_key("bn1.num_batches_tracked"));
    assert!(file.contains_key("layer1.0.downsample.0.weight"));
    // The fc permutation on a 7x7 map (112x112 input), narrow channels:
    // element (e, c, p) of the file is (e, p, c) of the network.
    let cfg = IResNetConfig { layers: [1, 1, 1, 1], widths: [4, 4, 4, 8], input: 112, ..tiny() };
    let big = IResNet::new(cfg.clone(), &Device::cpu(), 1).unwrap();
    let bpath = temp("seven.safetensors");
    big.save(&bpath).unwrap();
    let (shape, torch) = read(&bpath).remove("fc.weight").unwrap();
    assert_eq!(shape, vec![6, 8 * 49]);
    let ours = big.state()["fc.weight"].to_vec::<f32>().unwrap();
    for e in 0..6 {
        for c in 0..8 {
            for p in 0..49 {
                assert_eq!(torch[e * 8 * 49 + c * 49 + p], ours[e * 8 * 49 + p * 8 + c]);
            }
        }
    }
    let back = IResNet::load(&bpath, cfg, &Device::cpu()).unwrap();
    assert_eq!(back.state()["fc.weight"].to_vec::<f32>().unwrap(), ours);
}

#[test]
fn bad_files_are_errors_naming_the_problem() {
    let net = IResNet::new(tiny(), &Device::cpu(), 6).unwrap();
    let path = temp("good.safetensors");
    net.save(&path).unwrap();
    let good = read(&path);
    let expect_err = |entries: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, needle: &str| {
        let p = temp("bad.safetensors");
        write(&p, entries);
        match IResNet::load(&p, tiny(), &Device::cpu()) {
            Err(Error::File { message, .. }) => assert!(message.contains(needle), "{message:?} lacks {needle:?}"),
            Err(e) => panic!("{needle}: another error: {e}"),
            Ok(_) => panic!("{needle}: loaded"),
        }
    };
    let mut missing = good.clone();
    missing.remove("layer2.0.bn3.running_var");
    expect_err(&missing, "layer2.0.bn3.running_var");
    let mut extra = good.clone();
    extra.insert("layer9.0.conv1.weight".into(), (vec![1], vec![0.0]));
    expect_err(&extra, "layer9.0.conv1.weight");
    let mut shaped = good.clone();
    shaped.insert("prelu.weight".into(), (vec![5], vec![0.25; 5]));
    expect_err(&shaped, "prelu.weight");
    // The network is named in words, not as a struct dump.
    expect_err(&shaped, "for an IResNet of blocks [2, 1, 1, 1], stem 4, widths [4, 8, 8, 12] (input 16, embedding 6)");
    let mut nan = good.clone();
    let (s, mut v) = nan["fc.bias"].clone();
    v[1] = f32::NAN;
    nan.insert("fc.bias".into(), (s, v));
    expect_err(&nan, "fc.bias");
    // Another architecture's file.
    match IResNet::load(&path, IResNetConfig::arch("r18").unwrap(), &Device::cpu()) {
        Err(Error::File { message, .. }) => {
            assert!(message.contains("for r18 (input 112, embedding 512)"), "{message}")
        }
        other => panic!("r18 from a tiny file: {:?}", other.map(|_| ())),
    }
    assert_eq!(IResNetConfig::arch("r100").unwrap().arch_name(), Some("r100"));
    assert_eq!(tiny().arch_name(), None);
    // Not a safetensors file.
    let junk = temp("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    assert!(matches!(IResNet::load(&junk, tiny(), &Device::cpu()), Err(Error::File { .. })));
    assert!(matches!(IResNet::load(&temp("absent.safetensors"), tiny(), &Device::cpu()), Err(Error::File { .. })));
}
