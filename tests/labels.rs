//! kernels/labels.cu through the heads' doors: labels held on the device
//! (u32, and i64 as PyTorch stores them) give the same step as host labels
//! on the simulator (three orders) and a GPU when present, at a batch that
//! is not a multiple of the kernel's 256-thread block; labels out of range
//! are found on the device and reported when the metrics are read, naming
//! the first bad sample, with no kernel indexing out of range.
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::head::{
    CodeHead, CodeHeadConfig, CodeTable, HeadGrads, HeadMetrics, Margin, MarginGrad, PartialFc, SoftmaxGrads,
    SoftmaxHead, SoftmaxHeadConfig, SoftmaxMetrics,
};
use gif_fr::{DType, Device, Error, Tensor};
use rand::Rng;

const B: usize = 300;

fn code_setup(dev: &Device, n: usize) -> (CodeHead, CodeTable, Vec<f32>) {
    let (d, l, v) = (12usize, 3usize, 7usize);
    let mut r = rng(3);
    let codes: Vec<u16> =
        (0..n).flat_map(|i| (0..l).map(move |j| ((i * 5 + 2) / v.pow(j as u32) % v) as u16)).collect();
    let vecs = unit_rows(&mut r, n, d);
    let table = CodeTable::new(dev, codes, l, v, Some((&vecs, d, DType::F32))).unwrap();
    let cfg = CodeHeadConfig { gamma: 0.5, ..CodeHeadConfig::new(d, l, v) };
    (CodeHead::new(cfg, dev, 11).unwrap(), table, uniform(&mut r, B * d, -1.0, 1.0))
}

fn labels(n: usize, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..B).map(|_| r.random_range(0..n as u32)).collect()
}

#[test]
fn device_labels_give_the_host_labels_step() {
    let n = 97;
    let y = labels(n, 5);
    let y64: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    for dev in gpu_devices() {
        let (head, table, x) = code_setup(&dev, n);
        let xt = Tensor::from_slice(&dev, &[B, 12], &x).unwrap();
        let (want, wg) = head.forward_backward(&xt, &y, &table).unwrap();
        for yt in [Tensor::from_slice(&dev, &[B], &y).unwrap(), Tensor::from_slice(&dev, &[B], &y64).unwrap()] {
            let (got, g) = head.forward_backward(&xt, &yt, &table).unwrap();
            assert_eq!(got, want, "{dev} {:?}", yt.dtype());
            assert_eq!(g.features.to_vec::<f32>().unwrap(), wg.features.to_vec::<f32>().unwrap());
            assert_eq!(g.centres.to_vec::<f32>().unwrap(), wg.centres.to_vec::<f32>().unwrap());
        }
        // The softmax head too, under the exact ArcFace gradient (whose
        // singular part groups targets on the host).
        for grad in [MarginGrad::StraightThrough, MarginGrad::Exact] {
            let cfg =
                SoftmaxHeadConfig { margin: Margin::ArcFace(0.5), margin_grad: grad, ..SoftmaxHeadConfig::new(12, n) };
            let head = SoftmaxHead::new(cfg, &dev, DType::F32, 2).unwrap();
            let (want, wg) = head.forward_backward(&xt, &y).unwrap();
            let (got, g) = head.forward_backward(&xt, &Tensor::from_slice(&dev, &[B], &y64).unwrap()).unwrap();
            assert_eq!(got, want, "{dev} softmax {grad:?}");
            assert_eq!(g.centres.to_vec::<f32>().unwrap(), wg.centres.to_vec::<f32>().unwrap());
        }
    }
}

#[test]
fn bad_device_labels_are_reported_when_the_metrics_are_read() {
    let n = 50;
    for dev in gpu_devices() {
        let (head, table, x) = code_setup(&dev, n);
        let xt = Tensor::from_slice(&dev, &[B, 12], &x).unwrap();
        let mut y64: Vec<i64> = labels(n, 9).into_iter().map(i64::from).collect();
        y64[271] = -3;
        y64[280] = n as i64;
        let mut yu: Vec<u32> = labels(n, 9);
        yu[299] = u32::MAX;
        let mut grads = HeadGrads::new(&head, B).unwrap();
        let mut m = HeadMetrics::new();
        for (yt, first) in
            [(Tensor::from_slice(&dev, &[B], &y64).unwrap(), 271), (Tensor::from_slice(&dev, &[B], &yu).unwrap(), 299)]
        {
            // The step itself runs (no host synchronization to find out) ...
            head.forward_backward_into(&xt, &yt, &table, &mut grads, &mut m).unwrap();
            // ... and reading says which sample was bad.
            match m.read() {
                Err(Error::InvalidArgument { message, .. }) => {
                    assert!(message.contains(&format!("labels[{first}]")), "{dev}: {message}")
                }
                other => panic!("{dev}: {other:?}"),
            }
            let err = head.forward_backward(&xt, &yt, &table).unwrap_err().to_string();
            assert!(err.contains(&format!("labels[{first}]")), "{dev}: {err}");
        }
        let sm = SoftmaxHead::new(SoftmaxHeadConfig::new(12, n), &dev, DType::F32, 2).unwrap();
        let mut sg = SoftmaxGrads::new(&dev, B, n, 12).unwrap();
        let mut smm = SoftmaxMetrics::new();
        sm.forward_backward_into(&xt, &Tensor::from_slice(&dev, &[B], &y64).unwrap(), &mut sg, &mut smm).unwrap();
        assert!(smm.read().unwrap_err().to_string().contains("labels[271]"), "{dev}");
        // Partial FC whose sample holds the batch: checked on the device too.
        let big = 4000;
        let mut y_pfc: Vec<i64> = labels(big, 9).into_iter().map(i64::from).collect();
        y_pfc[17] = big as i64;
        let head = SoftmaxHead::new(SoftmaxHeadConfig::new(12, big), &dev, DType::F32, 2).unwrap();
        let pfc = PartialFc::new(head, 0.5, 3).unwrap();
        assert!(pfc.sample_size() >= B);
        let mut pg = gif_fr::head::PfcGrads::new(&pfc, B).unwrap();
        pfc.forward_backward_into(&xt, &Tensor::from_slice(&dev, &[B], &y_pfc).unwrap(), 0, &mut pg, &mut smm).unwrap();
        assert!(smm.read().unwrap_err().to_string().contains("labels[17]"), "{dev}");
    }
}

#[test]
fn labels_of_the_wrong_form_are_typed_errors() {
    for dev in [Device::cpu(), Device::sim()] {
        let (head, table, x) = code_setup(&dev, 40);
        let xt = Tensor::from_slice(&dev, &[B, 12], &x).unwrap();
        let floats = Tensor::zeros(&dev, &[B], DType::F32).unwrap();
        let two_d = Tensor::zeros(&dev, &[B, 1], DType::U32).unwrap();
        let short = Tensor::zeros(&dev, &[B - 1], DType::I64).unwrap();
        let elsewhere = Tensor::zeros(&Device::sim(), &[B], DType::U32).unwrap();
        for (what, yt) in [("f32", &floats), ("2-D", &two_d), ("short", &short), ("another device", &elsewhere)] {
            let e = head.forward_backward(&xt, yt, &table).unwrap_err();
            assert!(matches!(e, Error::Shape { .. } | Error::DeviceMismatch { .. }), "{dev} {what}: {e:?}");
        }
        // CPU: i64 labels are checked on the host, with the value.
        if dev == Device::cpu() {
            let mut y: Vec<i64> = vec![1; B];
            y[7] = -1;
            let e = head.forward_backward(&xt, &Tensor::from_slice(&dev, &[B], &y).unwrap(), &table).unwrap_err();
            assert!(e.to_string().contains("labels[7] = -1"), "{e}");
        }
    }
}
