//! Row gathers, scatters and updates (src/ops/rows.rs, kernels/rows.cu)
//! against their CPU paths, on the simulator in three orders and a GPU when
//! present; indices out of range are errors.
// The simulated GPU is this file's second device: it needs the `sim` feature (default).
#![cfg(feature = "sim")]

mod common;

use common::*;
use gif_fr::ops::rows;
use gif_fr::{DType, Device, Error, Tensor};
use rand::Rng;

#[test]
fn gather_and_scatter_rows_match_the_cpu() {
    let mut rng = rng(25);
    let (n, d) = (37, 19);
    let src = uniform(&mut rng, n * d, -1.0, 1.0);
    let ids: Vec<u32> = (0..23).map(|_| rng.random_range(0..n as u32)).collect();
    let uniq: Vec<u32> = {
        let mut u = ids.clone();
        u.sort_unstable();
        u.dedup();
        u
    };
    let cpu_g = rows::gather_rows(&Tensor::from_slice(&Device::cpu(), &[n, d], &src).unwrap(), &ids)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    for dev in gpu_devices() {
        let t = Tensor::from_slice(&dev, &[n, d], &src).unwrap();
        assert_eq!(rows::gather_rows(&t, &ids).unwrap().to_vec::<f32>().unwrap(), cpu_g, "{dev}");
        let new = Tensor::from_slice(&dev, &[uniq.len(), d], &uniform(&mut rng, uniq.len() * d, 5.0, 6.0)).unwrap();
        let mut dst = Tensor::from_slice(&dev, &[n, d], &src).unwrap();
        rows::scatter_rows(&new, &uniq, &mut dst).unwrap();
        let (got, rv) = (dst.to_vec::<f32>().unwrap(), new.to_vec::<f32>().unwrap());
        for i in 0..n {
            let want = match uniq.iter().position(|&u| u as usize == i) {
                Some(p) => &rv[p * d..(p + 1) * d],
                None => &src[i * d..(i + 1) * d],
            };
            assert_eq!(&got[i * d..(i + 1) * d], want, "{dev} row {i}");
        }
        assert!(matches!(rows::gather_rows(&t, &[n as u32]), Err(Error::InvalidArgument { .. })));
    }
}

#[test]
fn axpy_rows_updates_the_named_rows_in_f32_and_bf16() {
    let mut rng = rng(26);
    let (m, d) = (41, 13);
    let w0 = uniform(&mut rng, m * d, -1.0, 1.0);
    let sel: Vec<u32> = vec![3, 40, 0, 17, 9];
    let g = uniform(&mut rng, sel.len() * d, -1.0, 1.0);
    let gall = uniform(&mut rng, m * d, -1.0, 1.0);
    for dtype in [DType::F32, DType::BF16] {
        let run = |dev: &Device, sel: Option<&[u32]>, g: &[f32]| {
            let mut w = Tensor::from_f32(dev, &[m, d], &w0, dtype).unwrap();
            let gt = Tensor::from_slice(dev, &[g.len() / d, d], g).unwrap();
            rows::axpy_rows(&mut w, sel, &gt, -0.25).unwrap();
            w.to_f32_vec().unwrap()
        };
        let want = run(&Device::cpu(), Some(&sel), &g);
        // The CPU path against its definition: the named rows move, no other.
        let stored: Vec<f32> = Tensor::from_f32(&Device::cpu(), &[m, d], &w0, dtype).unwrap().to_f32_vec().unwrap();
        for r in 0..m {
            let moved = sel.iter().position(|&s| s as usize == r);
            for c in 0..d {
                let v = stored[r * d + c] + moved.map_or(0.0, |p| -0.25 * g[p * d + c]);
                let v = if dtype == DType::BF16 { half::bf16::from_f32(v).to_f32() } else { v };
                assert_eq!(want[r * d + c], v, "{dtype:?} row {r}");
            }
        }
        let want_all = run(&Device::cpu(), None, &gall);
        for dev in gpu_devices() {
            assert_eq!(run(&dev, Some(&sel), &g), want, "{dev} {dtype:?}");
            assert_eq!(run(&dev, None, &gall), want_all, "{dev} {dtype:?} dense");
        }
    }
    // A row out of range, or a gradient of the wrong shape, is an error.
    for dev in [Device::cpu(), Device::sim()] {
        let mut w = Tensor::from_slice(&dev, &[m, d], &w0).unwrap();
        let gt = Tensor::from_slice(&dev, &[1, d], &g[..d]).unwrap();
        assert!(matches!(rows::axpy_rows(&mut w, Some(&[m as u32]), &gt, 1.0), Err(Error::InvalidArgument { .. })));
        assert!(matches!(rows::axpy_rows(&mut w, None, &gt, 1.0), Err(Error::Shape { .. })));
    }
}
