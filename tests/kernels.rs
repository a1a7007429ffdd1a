//! CPU kernels equal candle's reference path: forward, input gradient and weight gradient of
//! the im2col + GEMM convolution against candle's `conv2d`, over random shapes.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use quant_robust::kernels::conv2d;
use quant_robust::rng::Rng;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        Rng::new(seed, "k").uniform_vec(n, -1.0, 1.0),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-3);
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / scale
}

/// Forward, dx and dw of our op and candle's, for one geometry.
fn compare(
    n: usize,
    c: usize,
    o: usize,
    hw: usize,
    k: usize,
    stride: usize,
    pad: usize,
    seed: u64,
) {
    let x = Var::from_tensor(&rand(&[n, c, hw, hw], seed)).unwrap();
    let w = Var::from_tensor(&rand(&[o, c, k, k], seed + 1)).unwrap();
    let ours = conv2d(x.as_tensor(), w.as_tensor(), pad, stride).unwrap();
    let reference = x
        .as_tensor()
        .conv2d(w.as_tensor(), pad, stride, 1, 1)
        .unwrap();
    assert_eq!(ours.dims(), reference.dims());
    assert!(max_rel_diff(&ours, &reference) < 1e-5, "forward");
    // A loss that weights every output differently, so the gradients are not symmetric.
    let r = rand(reference.dims(), seed + 2);
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = max_rel_diff(
        g1.get(x.as_tensor()).unwrap(),
        g2.get(x.as_tensor()).unwrap(),
    );
    let dw = max_rel_diff(
        g1.get(w.as_tensor()).unwrap(),
        g2.get(w.as_tensor()).unwrap(),
    );
    assert!(dx < 1e-5, "input gradient differs by {dx}");
    assert!(dw < 1e-5, "weight gradient differs by {dw}");
}

#[test]
fn resnet20_geometries_match_candle() {
    // Stem, stage 1, the stride-2 entries of stages 2 and 3, and stage 3.
    compare(3, 3, 16, 32, 3, 1, 1, 1);
    compare(2, 16, 16, 32, 3, 1, 1, 2);
    compare(2, 16, 32, 32, 3, 2, 1, 3);
    compare(2, 32, 64, 16, 3, 2, 1, 4);
    compare(5, 64, 64, 8, 3, 1, 1, 5);
}

#[test]
fn no_weight_gradient_is_computed_for_a_constant_kernel() {
    let x = Var::from_tensor(&rand(&[2, 3, 8, 8], 9)).unwrap();
    let w = rand(&[4, 3, 3, 3], 10);
    let g = conv2d(x.as_tensor(), &w, 1, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    assert!(g.get(&w).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_geometries_match_candle(
        n in 1usize..4,
        c in 1usize..6,
        o in 1usize..6,
        hw in 3usize..12,
        k in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3,
        pad in 0usize..2,
        seed in 0u64..1000,
    ) {
        compare(n, c, o, hw, k, stride, pad, seed);
    }
}
