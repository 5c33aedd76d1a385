//! Zero-copy interop: the cudarc example (examples/interop.rs) on the
//! simulator and on a GPU when present; tensor views (`narrow`,
//! `narrow_mut`) and views of caller memory (`from_device_ptr`), checked;
//! the `_into` steps writing into a caller's buffers equal the allocating
//! steps; metrics reused without allocation; the backbone's backward_into.
#![cfg(feature = "sim")]

mod common;

#[allow(dead_code)]
#[path = "../examples/interop.rs"]
mod example;

use common::*;
use gif_fr::backbone::IResNet;
use gif_fr::head::{HeadGrads, HeadMetrics};
use gif_fr::{DType, Device, Error, Tensor};

#[test]
fn the_interop_example_trains_on_the_callers_buffers() {
    let losses = example::run_sim(12).unwrap();
    assert_eq!(losses.len(), 12);
    // The same steps with gif-fr's own tensors and host labels.
    let dev = Device::sim();
    let (mut head, table) = example::head_and_table(&dev).unwrap();
    for (step, got) in losses.iter().enumerate() {
        let (x, y) = example::batch(step as u64);
        let y: Vec<u32> = y.into_iter().map(|v| v as u32).collect();
        let (want, g) = head
            .forward_backward(&Tensor::from_slice(&dev, &[example::B, example::D], &x).unwrap(), &y, &table)
            .unwrap();
        assert_eq!(*got, want, "step {step}");
        head.sgd_step(&g, 0.5).unwrap();
    }
    assert!(losses[11].total < losses[0].total, "the head learns: {} -> {}", losses[0].total, losses[11].total);
    match example::run_cuda(12) {
        Ok(l) => {
            assert_eq!(l.len(), 12);
            for (a, b) in l.iter().zip(&losses) {
                assert!((a.total - b.total).abs() <= 1e-3 * b.total.abs(), "GPU {} vs simulator {}", a.total, b.total);
            }
        }
        Err(e) => {
            // No GPU here: the same skip rule as every GPU test.
            assert!(cuda().is_none(), "a GPU is present but the example failed: {e}");
        }
    }
}

#[test]
fn views_are_checked_and_read_and_write_in_place() {
    for dev in [Device::cpu(), Device::sim()] {
        let v: Vec<f32> = (0..6 * 8).map(|i| i as f32).collect();
        let mut t = Tensor::from_slice(&dev, &[6, 8], &v).unwrap();
        let rows = t.narrow(0, 2, 3).unwrap();
        assert_eq!(rows.shape(), [3, 8]);
        assert!(rows.is_view());
        assert_eq!(rows.to_vec::<f32>().unwrap(), v[16..40]);
        // An op reads a view like any tensor.
        assert_eq!(rows.to_device(&Device::cpu()).unwrap().to_vec::<f32>().unwrap(), v[16..40]);
        drop(rows);
        // Writing rows 4..6 through a scoped view.
        t.narrow_mut(0, 4, 2, |w| w.copy_from(&Tensor::zeros(&dev, &[2, 8], DType::F32)?)).unwrap();
        let got = t.to_vec::<f32>().unwrap();
        assert_eq!(got[..32], v[..32]);
        assert!(got[32..].iter().all(|&x| x == 0.0), "{dev}");
        // Columns of a single row are contiguous; of several rows not.
        let one = Tensor::from_slice(&dev, &[1, 8], &v[..8]).unwrap();
        assert_eq!(one.narrow(1, 4, 4).unwrap().to_vec::<f32>().unwrap(), v[4..8]);
        let err = |r: gif_fr::Result<gif_fr::TensorView<'_>>| r.map(|_| ()).unwrap_err();
        assert!(matches!(err(t.narrow(1, 0, 4)), Error::InvalidArgument { .. }), "columns of several rows");
        assert!(matches!(err(t.narrow(0, 5, 2)), Error::Shape { .. }), "past the end");
        assert!(matches!(err(t.narrow(0, usize::MAX, 2)), Error::Shape { .. }), "overflow");
        assert!(matches!(err(t.narrow(2, 0, 1)), Error::Shape { .. }), "no such dimension");
        // Rows of 3 floats (12 bytes) start unaligned: refused, not misread
        // by a 16-byte vector load on a GPU.
        let odd = Tensor::from_slice(&dev, &[4, 3], &v[..12]).unwrap();
        assert!(err(odd.narrow(0, 1, 2)).to_string().contains("16-byte"), "{dev}");
        assert_eq!(odd.narrow(0, 0, 2).unwrap().numel(), 6);
    }
}

#[test]
fn reshaped_views_read_and_write_the_whole_tensor() {
    for dev in [Device::cpu(), Device::sim()] {
        let v: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32 - 7.0).collect();
        let mut t = Tensor::from_slice(&dev, &[2, 3, 4], &v).unwrap();
        let flat = t.view(&[6, 4]).unwrap();
        assert_eq!(flat.shape(), [6, 4]);
        assert!(flat.is_view());
        assert_eq!(flat.to_vec::<f32>().unwrap(), v);
        drop(flat);
        // Row 5 of the [6, 4] view is the last row of block 1.
        t.view_mut(&[6, 4], |w| w.narrow_mut(0, 5, 1, |r| r.fill_zeros())).unwrap();
        let got = t.to_vec::<f32>().unwrap();
        assert_eq!(got[..20], v[..20], "{dev}");
        assert!(got[20..].iter().all(|&x| x == 0.0), "{dev}");
        assert!(matches!(t.view(&[5, 4]).map(|_| ()).unwrap_err(), Error::Shape { .. }), "element count");
        assert!(t.view(&[usize::MAX, 2]).is_err(), "overflow");
        assert!(t.view_mut(&[4, 5], |_| Ok(())).is_err(), "element count");
    }
}

#[test]
fn views_of_caller_memory_are_checked() {
    let dev = Device::sim();
    let owner = Tensor::zeros(&dev, &[64], DType::F32).unwrap();
    let base = owner.device_addr().unwrap();
    // SAFETY (every call): the ranges either lie in `owner`, which outlives
    // the views, or are refused before any access.
    unsafe {
        let t = Tensor::from_device_ptr(&dev, base + 64, &[4, 8], DType::F32).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![0.0; 32]);
        let e = |r: gif_fr::Result<Tensor>| r.unwrap_err().to_string();
        assert!(e(Tensor::from_device_ptr(&dev, base + 4, &[2], DType::F32)).contains("aligned"));
        assert!(e(Tensor::from_device_ptr(&dev, 0, &[2], DType::F32)).contains("null"));
        assert!(e(Tensor::from_device_ptr(&dev, base + 64, &[7, 8], DType::F32)).contains("not inside one allocation"));
        assert!(e(Tensor::from_device_ptr(&dev, base, &[usize::MAX, 2], DType::F32)).contains("usize"));
        assert!(e(Tensor::from_device_ptr(&Device::cpu(), base, &[2], DType::F32)).contains("CUDA or simulated"));
        // Another simulated device's memory is not this one's.
        assert!(e(Tensor::from_device_ptr(&Device::sim(), base, &[2], DType::F32)).contains("not inside"));
    }
    // No cudarc buffer without a CUDA device (and no GPU needed to say so).
    assert!(Device::sim().cuda_stream().is_none());
}

#[test]
fn steps_into_caller_buffers_equal_the_allocating_steps_and_reuse_metrics() {
    let (b, d) = (example::B, example::D);
    for dev in [Device::cpu(), Device::sim()] {
        let (head, table) = example::head_and_table(&dev).unwrap();
        let (x, y) = example::batch(3);
        let xt = Tensor::from_slice(&dev, &[b, d], &x).unwrap();
        let y64 = Tensor::from_slice(&dev, &[b], &y).unwrap();
        let (want, wg) = head.forward_backward(&xt, &y64, &table).unwrap();
        // The features' gradient lands in rows 1.. of a bigger caller buffer.
        let mut big = Tensor::zeros(&dev, &[b + 1, d], DType::F32).unwrap();
        let mut grads = HeadGrads::new(&head, b).unwrap();
        let mut m = HeadMetrics::new();
        big.narrow_mut(0, 1, b, |dx| {
            // The view stands in for the gradient buffer for one step, and
            // goes back before the scope ends.
            std::mem::swap(&mut grads.features, dx);
            let r = head.forward_backward_into(&xt, &y64, &table, &mut grads, &mut m);
            std::mem::swap(&mut grads.features, dx);
            r
        })
        .unwrap();
        assert_eq!(m.read().unwrap(), want);
        let got = big.to_vec::<f32>().unwrap();
        assert!(got[..d].iter().all(|&v| v == 0.0));
        assert_eq!(got[d..], wg.features.to_vec::<f32>().unwrap()[..]);
        // A second step reuses the metrics' and the gradients' buffers: no
        // device memory is allocated beyond the step's temporaries.
        if let Some(before) = dev.memory_stats() {
            head.forward_backward_into(&xt, &y64, &table, &mut grads, &mut m).unwrap();
            let after = dev.memory_stats().unwrap();
            assert_eq!(after.current, before.current, "{dev}: buffers held after the step");
        }
        assert_eq!(m.read().unwrap(), want);
        // Gradients of the wrong shape are refused before anything runs.
        let mut bad = HeadGrads::new(&head, b + 1).unwrap();
        assert!(matches!(head.forward_backward_into(&xt, &y64, &table, &mut bad, &mut m), Err(Error::Shape { .. })));
        assert!(HeadMetrics::new().read().is_err(), "no step yet");
    }
}

#[test]
fn backbone_backward_into_writes_the_named_buffers() {
    let dev = Device::cpu();
    let cfg = tiny_iresnet();
    let b = 3;
    let (images, d_emb) = iresnet_batch(&dev, &cfg, b, 4);
    let mut net = IResNet::new(cfg.clone(), &dev, 1).unwrap();
    net.forward(&images, true).unwrap();
    let want = net.backward(&d_emb).unwrap();
    net.forward(&images, true).unwrap();
    let fc_shape = want["fc.weight"].shape().to_vec();
    let mut grads = std::collections::BTreeMap::new();
    grads.insert("fc.weight".to_string(), Tensor::zeros(&dev, &fc_shape, DType::F32).unwrap());
    net.backward_into(&d_emb, &mut grads).unwrap();
    assert_eq!(grads.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (k, g) in &want {
        assert_eq!(grads[k].to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap(), "{k}");
    }
    let mut wrong = std::collections::BTreeMap::new();
    wrong.insert("fc.weight".to_string(), Tensor::zeros(&dev, &[1, 1], DType::F32).unwrap());
    assert!(matches!(net.backward_into(&d_emb, &mut wrong), Err(Error::Shape { .. })));
    wrong.clear();
    wrong.insert("no.such".to_string(), Tensor::zeros(&dev, &[1], DType::F32).unwrap());
    assert!(net.backward_into(&d_emb, &mut wrong).is_err());
}
