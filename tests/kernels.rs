//! CPU kernels equal candle's reference path: forward, input gradient and weight gradient of
//! each convolution path (im2col + GEMM, and the direct 3×3 kernel for every instruction set
//! this machine runs) against candle's `conv2d`, over random shapes.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use quant_robust::kernels::{
    conv2d, conv2d_bias_add_relu_with, conv2d_bias_relu, conv2d_bias_relu_with, conv2d_bias_with,
    conv2d_block_start, conv2d_with, ConvPath, Isa, ResidualLink,
};
use quant_robust::rng::Rng;

use crate::common::{max_abs, max_diff_and_scale};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        Rng::new(seed, "k").uniform_vec(n, -1.0, 1.0),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// The largest difference between `a` and `b`, relative to `b`'s largest magnitude (at least
/// `floor`).
fn max_rel_diff_over(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    let (d, scale) = max_diff_and_scale(a, b);
    d / scale.max(floor)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_rel_diff_over(a, b, 1e-3)
}

/// The convolution paths this machine runs: im2col, the automatic choice, and the direct
/// kernel for each instruction set available.
fn paths() -> Vec<ConvPath> {
    let mut p = vec![ConvPath::Im2col, ConvPath::Auto];
    p.extend(isas().map(ConvPath::Direct));
    p
}

/// The instruction sets this machine runs.
fn isas() -> impl Iterator<Item = Isa> {
    [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.available())
}

/// [`paths`], and Winograd for each instruction set where the shape fits it (stride 1, an
/// even height, a width that is a multiple of 8).
fn paths_for(stride: usize, h: usize, w: usize) -> Vec<ConvPath> {
    let mut p = paths();
    if stride == 1 && h.is_multiple_of(2) && w.is_multiple_of(8) {
        p.extend(isas().map(ConvPath::Winograd));
    }
    p
}

/// Σ over images and pixels of `t` (N×O×H×W) per channel, in f64, rounded to f32.
fn exact_channel_sums(t: &Tensor) -> Tensor {
    let (n, o, h, w) = t.dims4().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let sums: Vec<f32> = (0..o)
        .map(|k| {
            (0..n)
                .flat_map(|i| &v[(i * o + k) * h * w..][..h * w])
                .map(|&g| g as f64)
                .sum::<f64>() as f32
        })
        .collect();
    Tensor::from_vec(sums, o, &Device::Cpu).unwrap()
}

/// Forward, dx and dw of our op and candle's, for one geometry (square images).
#[allow(clippy::too_many_arguments)]
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
    compare_on(ConvPath::Auto, [n, c, hw, hw], o, k, stride, pad, seed);
    compare_on(ConvPath::Im2col, [n, c, hw, hw], o, k, stride, pad, seed);
}

/// Forward, dx and dw of our op on `path` and candle's, for one geometry; and the same with
/// a bias per output channel (and its gradient), with the bias and a ReLU, and with the bias
/// (as data), a residual and a ReLU.
fn compare_on(
    path: ConvPath,
    [n, c, h, wd]: [usize; 4],
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    seed: u64,
) {
    let x = Var::from_tensor(&rand(&[n, c, h, wd], seed)).unwrap();
    let w = Var::from_tensor(&rand(&[o, c, k, k], seed + 1)).unwrap();
    let b = Var::from_tensor(&rand(&[o], seed + 3)).unwrap();
    let reference = x
        .as_tensor()
        .conv2d(w.as_tensor(), pad, stride, 1, 1)
        .unwrap();
    let ref_bias = reference
        .broadcast_add(&b.as_tensor().reshape((1, o, 1, 1)).unwrap())
        .unwrap();
    let ours = conv2d_with(x.as_tensor(), w.as_tensor(), pad, stride, path).unwrap();
    let ours_bias = conv2d_bias_with(
        x.as_tensor(),
        w.as_tensor(),
        b.as_tensor(),
        pad,
        stride,
        path,
    )
    .unwrap();
    let ours_relu = conv2d_bias_relu_with(
        x.as_tensor(),
        w.as_tensor(),
        b.as_tensor(),
        pad,
        stride,
        path,
    )
    .unwrap();
    let ref_relu = ref_bias.relu().unwrap();
    // The residual variant: the bias as data (untracked, as after BatchNorm folding in a
    // frozen model), the residual tracked.
    let res = Var::from_tensor(&rand(reference.dims(), seed + 4)).unwrap();
    let b_data = b.as_tensor().detach();
    let ours_res = conv2d_bias_add_relu_with(
        x.as_tensor(),
        w.as_tensor(),
        &b_data,
        res.as_tensor(),
        None,
        (pad, stride),
        path,
    )
    .unwrap();
    let pre_res = (&ref_bias + res.as_tensor()).unwrap();
    let ref_res = pre_res.relu().unwrap();
    // A loss that weights every output differently, so the gradients are not symmetric.
    let r = rand(reference.dims(), seed + 2);
    // Through a ReLU, the loss weights are zero where its input lies within rounding of zero:
    // there the two paths' ReLUs can disagree (an output of ±1e-7), which flips that output's
    // whole gradient; the other outputs compare as usual.
    let away_from_zero = |pre: &Tensor| {
        let pre = pre.detach();
        let keep = pre.abs().unwrap().gt(1e-5 * max_abs(&pre)).unwrap();
        (&r * keep.to_dtype(r.dtype()).unwrap()).unwrap()
    };
    let (r_relu, r_res) = (away_from_zero(&ref_bias), away_from_zero(&pre_res));
    for (what, ours, reference, leaves, r) in [
        ("plain", ours, reference, vec![&x, &w], &r),
        ("bias", ours_bias, ref_bias, vec![&x, &w, &b], &r),
        ("bias+relu", ours_relu, ref_relu, vec![&x, &w, &b], &r_relu),
        (
            "bias+residual+relu",
            ours_res,
            ref_res,
            vec![&x, &w, &res],
            &r_res,
        ),
    ] {
        assert_eq!(ours.dims(), reference.dims());
        assert!(
            max_rel_diff(&ours, &reference) < 1e-5,
            "{path:?} {what}: forward"
        );
        let g1 = (ours * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // The gradient at the convolution's output: r, through the ReLU's mask where there is
        // one.
        let dy = match what {
            "bias+relu" | "bias+residual+relu" => {
                (r * reference.gt(0f32).unwrap().to_dtype(r.dtype()).unwrap()).unwrap()
            }
            _ => r.clone(),
        };
        // Each element of dx and dw is a sum of products; where those cancel to a small
        // result, f32 rounding is relative to the products' magnitudes, not to the result
        // (2 images of 5×5 through a 1×1 kernel with padding gave a dw of 2e-3 from products
        // of 0.1-1, and two summation orders 6e-8 apart). So the scale is at least 1% of the
        // largest sum of |products|: the same gradients with |x|, |w| and |dy|.
        let magnitudes = {
            let xa = Var::from_tensor(&x.as_tensor().abs().unwrap()).unwrap();
            let wa = Var::from_tensor(&w.as_tensor().abs().unwrap()).unwrap();
            let g = (xa
                .as_tensor()
                .conv2d(wa.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                * dy.abs().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
            [
                max_abs(g.get(xa.as_tensor()).unwrap()),
                max_abs(g.get(wa.as_tensor()).unwrap()),
            ]
        };
        for (i, v) in leaves.iter().enumerate() {
            // The bias gradient, a sum of N·H·W terms per channel, against its exact (f64)
            // value: candle's f32 sum is off by ~1e-5 of its size at a few thousand terms.
            let exact;
            let reference = if v.as_tensor().id() == b.as_tensor().id() {
                exact = exact_channel_sums(&dy);
                &exact
            } else {
                g2.get(v.as_tensor()).unwrap()
            };
            let floor = match i {
                0 | 1 => (1e-2 * magnitudes[i]).max(1e-3),
                _ => 1e-3,
            };
            let d = max_rel_diff_over(g1.get(v.as_tensor()).unwrap(), reference, floor);
            assert!(
                d < 1e-5,
                "{path:?} {what}: gradient {i} (x, w, b) differs by {d}"
            );
        }
    }
}

#[test]
fn every_path_matches_candle_on_resnet20_geometries() {
    for (x, o, stride, seed) in [
        ([2, 3, 32, 32], 16, 1, 11),
        ([2, 16, 32, 32], 16, 1, 12),
        ([2, 32, 16, 16], 32, 1, 13),
        ([3, 64, 8, 8], 64, 1, 14),
        ([2, 16, 32, 32], 32, 2, 15),
        ([2, 32, 16, 16], 64, 2, 16),
    ] {
        for path in paths_for(stride, x[2], x[3]) {
            compare_on(path, x, o, 3, stride, 1, seed);
        }
    }
}

#[test]
fn a_forced_path_that_does_not_fit_is_an_error() {
    let x = rand(&[1, 2, 7, 7], 1);
    let w = rand(&[3, 2, 3, 3], 2);
    for isa in [Isa::Avx2, Isa::Avx512] {
        let e = conv2d_with(&x, &w, 1, 1, ConvPath::Direct(isa)).unwrap_err();
        assert!(e.to_string().contains("conv2d"), "{e}");
    }
    // Stride 2 needs whole output vectors: a width that is a multiple of 16.
    let x = rand(&[1, 2, 8, 8], 3);
    assert!(conv2d_with(&x, &w, 1, 2, ConvPath::Direct(Isa::Avx2)).is_err());
    // Winograd: stride 1 only, an even height.
    for isa in [Isa::Avx2, Isa::Avx512] {
        let path = ConvPath::Winograd(isa);
        assert!(conv2d_with(&x, &w, 1, 2, path).is_err());
        let e = conv2d_with(&rand(&[1, 2, 7, 8], 4), &w, 1, 1, path).unwrap_err();
        assert!(e.to_string().contains("Winograd"), "{e}");
    }
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

    /// The direct kernel on shapes it takes: any channel counts (tiles padded), any height
    /// (even for stride 2), widths that are whole output vectors, non-square images.
    #[test]
    fn direct_kernel_matches_candle_on_random_shapes(
        n in 1usize..3,
        c in 1usize..20,
        o in 1usize..20,
        half_h in 1usize..6,
        stride in 1usize..3,
        vectors in 1usize..4,
        seed in 0u64..1000,
    ) {
        let (h, w) = (2 * half_h - (2 - stride) * (seed as usize % 2), 8 * stride * vectors);
        for path in paths_for(stride, h, w) {
            compare_on(path, [n, c, h, w], o, 3, stride, 1, seed);
        }
    }

    /// Winograd F(4×4, 3×3), the shapes it takes (a height that is a multiple of 8, a width
    /// that is a multiple of 16): groups of eight tiles in one row of tiles or split over two
    /// (widths 16 and 48), any channel counts (output channels in partial register blocks).
    #[test]
    fn winograd_f4_matches_candle_on_random_shapes(
        n in 1usize..3,
        c in 1usize..20,
        o in 1usize..20,
        eighths in 1usize..4,
        sixteenths in 1usize..4,
        seed in 0u64..1000,
    ) {
        for path in isas().map(ConvPath::Winograd) {
            compare_on(path, [n, c, 8 * eighths, 16 * sixteenths], o, 3, 1, 1, seed);
        }
    }
}

/// BatchNorm in training mode written with candle's own ops (the reference).
fn bn_train_reference(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
    let c = g.dim(0).unwrap();
    let mean = x.mean_keepdim((0, 2, 3)).unwrap();
    let centered = x.broadcast_sub(&mean).unwrap();
    let var = centered.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
    let inv = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
    centered
        .broadcast_mul(&inv)
        .unwrap()
        .broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
}

fn grads_match(ours: Tensor, reference: Tensor, leaves: &[(&str, &Var)], seed: u64, tol: f32) {
    assert!(max_rel_diff(&ours, &reference) < tol, "forward");
    let r = rand(reference.dims(), seed);
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in leaves {
        let d = max_rel_diff(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(d < tol, "{name} gradient differs by {d}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn batch_norm_affine_and_relu_match_candle(
        n in 2usize..5,
        c in 1usize..5,
        hw in 1usize..7,
        seed in 0u64..1000,
    ) {
        use quant_robust::kernels::{
            add_relu, batch_norm_relu_train, batch_norm_train, channel_affine, channel_stats, relu,
        };
        let x = Var::from_tensor(&rand(&[n, c, hw, hw], seed)).unwrap();
        let g = Var::from_tensor(&rand(&[c], seed + 1)).unwrap();
        let b = Var::from_tensor(&rand(&[c], seed + 2)).unwrap();
        let leaves = [("x", &x), ("gamma", &g), ("beta", &b)];
        // BatchNorm's input gradient is a difference of near-equal terms: candle's f32
        // reference loses ~1e-4 there, so both are held against the reference in f64.
        let f64var = |v: &Var| Var::from_tensor(&v.to_dtype(candle_core::DType::F64).unwrap()).unwrap();
        let (xd, gd, bd) = (f64var(&x), f64var(&g), f64var(&b));
        let r = rand(&[n, c, hw, hw], seed + 3);
        let (ours, _, _) = batch_norm_train(&x, &g, &b, 1e-5).unwrap();
        let reference = bn_train_reference(&xd, &gd, &bd);
        let to64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        // Relative to the largest entry, with a floor: for two values per channel the true
        // input gradient is ~0 and any rounding would be "relatively" large.
        let rel = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(0.1);
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            d / scale
        };
        prop_assert!(rel(&to64(&ours), &reference) < 1e-5);
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * to64(&r)).unwrap().sum_all().unwrap().backward().unwrap();
        for ((name, v), vd) in leaves.iter().zip([&xd, &gd, &bd]) {
            let d = rel(&to64(g1.get(v.as_tensor()).unwrap()), g2.get(vd.as_tensor()).unwrap());
            prop_assert!(d < 2e-5, "{} gradient differs from f64 by {}", name, d);
        }
        // The affine map's γ and β gradients are sums over N·H·W that may cancel: two f32
        // summation orders can differ by more than 1e-5 of the largest entry, so ours is
        // held against f64 too.
        let reference = xd
            .broadcast_mul(&gd.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&bd.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        let ours = channel_affine(&x, &g, &b).unwrap();
        prop_assert!(rel(&to64(&ours), &reference) < 1e-6);
        let r = rand(&[n, c, hw, hw], seed + 4);
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * to64(&r)).unwrap().sum_all().unwrap().backward().unwrap();
        for ((name, v), vd) in leaves.iter().zip([&xd, &gd, &bd]) {
            let d = rel(&to64(g1.get(v.as_tensor()).unwrap()), g2.get(vd.as_tensor()).unwrap());
            prop_assert!(d < 1e-5, "affine {} gradient differs from f64 by {}", name, d);
        }
        grads_match(relu(&x).unwrap(), x.relu().unwrap(), &leaves[..1], seed + 5, 1e-6);
        let other = Var::from_tensor(&rand(&[n, c, hw, hw], seed + 6)).unwrap();
        let pair = [("x", &x), ("residual", &other)];
        let sum = (x.as_tensor() + other.as_tensor()).unwrap();
        grads_match(add_relu(&x, &other).unwrap(), sum.relu().unwrap(), &pair, seed + 7, 1e-6);
        let (mean, var) = channel_stats(&x).unwrap();
        let m = x.mean_keepdim((0, 2, 3)).unwrap();
        let v = x.broadcast_sub(&m).unwrap().sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        prop_assert!(max_rel_diff(&mean, &m.flatten_all().unwrap()) < 1e-5);
        prop_assert!(max_rel_diff(&var, &v.flatten_all().unwrap()) < 1e-5);
        // The statistics training-mode BatchNorm returns (for the running statistics) are
        // those it normalized with.
        let (_, bn_mean, bn_var) = batch_norm_train(&x, &g, &b, 1e-5).unwrap();
        prop_assert_eq!(bn_mean.to_vec1::<f32>().unwrap(), mean.to_vec1::<f32>().unwrap());
        prop_assert_eq!(bn_var.to_vec1::<f32>().unwrap(), var.to_vec1::<f32>().unwrap());
        // BatchNorm and its ReLU fused: the bits of the two in a row, values and gradients.
        let (fused, f_mean, f_var) = batch_norm_relu_train(&x, &g, &b, 1e-5).unwrap();
        let composed = relu(&batch_norm_train(&x, &g, &b, 1e-5).unwrap().0).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        prop_assert_eq!(flat(&fused), flat(&composed));
        prop_assert_eq!(flat(&f_mean), flat(&mean));
        prop_assert_eq!(flat(&f_var), flat(&var));
        let r = rand(&[n, c, hw, hw], seed + 8);
        let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in leaves {
            prop_assert_eq!(
                flat(g1.get(v.as_tensor()).unwrap()),
                flat(g2.get(v.as_tensor()).unwrap()),
                "fused BatchNorm-ReLU {} gradient", name
            );
        }
        // BatchNorm, a residual and its ReLU fused (a block's end in training): the bits of
        // BatchNorm and add_relu in a row, values, statistics and the four gradients, by
        // either code for the sums.
        use quant_robust::kernels::{batch_norm_add_relu_train_with, batch_norm_train_with, BnPath};
        let res = Var::from_tensor(&rand(&[n, c, hw, hw], seed + 9)).unwrap();
        let r = rand(&[n, c, hw, hw], seed + 10);
        let with_res = [("x", &x), ("gamma", &g), ("beta", &b), ("residual", &res)];
        for path in [BnPath::Auto, BnPath::Portable] {
            let (fused, f_mean, f_var) =
                batch_norm_add_relu_train_with(&x, (&g, &b), &res, None, 1e-5, path).unwrap();
            let bn = batch_norm_train_with(&x, &g, &b, 1e-5, false, path).unwrap().0;
            let composed = add_relu(&bn, &res).unwrap();
            prop_assert_eq!(flat(&fused), flat(&composed));
            prop_assert_eq!(flat(&f_mean), flat(&mean));
            prop_assert_eq!(flat(&f_var), flat(&var));
            let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in with_res {
                prop_assert_eq!(
                    flat(g1.get(v.as_tensor()).unwrap()),
                    flat(g2.get(v.as_tensor()).unwrap()),
                    "fused BatchNorm-residual-ReLU {} gradient ({:?})", name, path
                );
            }
            // An untracked residual: the ReLU's mask inside BatchNorm's backward pass.
            let data = res.as_tensor().detach();
            let fused =
                batch_norm_add_relu_train_with(&x, (&g, &b), &data, None, 1e-5, path).unwrap().0;
            let composed = add_relu(&bn, &data).unwrap();
            let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in &with_res[..3] {
                prop_assert_eq!(
                    flat(g1.get(v.as_tensor()).unwrap()),
                    flat(g2.get(v.as_tensor()).unwrap()),
                    "fused BatchNorm-residual-ReLU {} gradient, residual untracked ({:?})", name, path
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Training-mode BatchNorm (with and without its ReLU) gives the same bits by its
    /// explicit AVX-512 sums and by the portable loops: outputs, statistics, gradients;
    /// planes whose size is not a multiple of 8 included (the tails).
    #[test]
    fn batch_norm_explicit_simd_equals_portable_bits(
        n in 1usize..4,
        c in 1usize..6,
        h in 1usize..12,
        w in 1usize..12,
        relu in proptest::bool::ANY,
        seed in 0u64..1000,
    ) {
        use quant_robust::kernels::{batch_norm_train_with, channel_stats_with, BnPath};
        let x = Var::from_tensor(&rand(&[n, c, h, w], seed)).unwrap();
        let g = Var::from_tensor(&rand(&[c], seed + 1)).unwrap();
        let b = Var::from_tensor(&rand(&[c], seed + 2)).unwrap();
        let r = rand(&[n, c, h, w], seed + 3);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |path| {
            let (y, mean, var) = batch_norm_train_with(&x, &g, &b, 1e-5, relu, path).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut v = vec![flat(&y), flat(&mean), flat(&var)];
            for leaf in [&x, &g, &b] {
                v.push(flat(grads.get(leaf.as_tensor()).unwrap()));
            }
            let (m, s) = channel_stats_with(&x, path).unwrap();
            v.extend([flat(&m), flat(&s)]);
            v
        };
        prop_assert_eq!(run(BnPath::Auto), run(BnPath::Portable));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The fused activation fake quantizer equals the composed candle ops exactly: values,
    /// straight-through gradients and raw (zero) gradients, ties and range ends included.
    #[test]
    fn fused_fake_quant_equals_composed(bits in 2u32..9, range in 0.1f32..8.0, seed in 0u64..1000) {
        use quant_robust::kernels::fake_quant::{fake_quant_scalar, FakeQuant};
        use quant_robust::quant::uniform::{code_range, fake_quant, scale_for, Signedness};
        use quant_robust::quant::GradientMode;
        let (q_min, q_max) = code_range(bits, Signedness::Unsigned).unwrap();
        let s = scale_for(range, q_max);
        let mut v = Rng::new(seed, "fq").uniform_vec(2000, -0.5 * range, 1.5 * range);
        // Exact ties (k + 1/2)·s and the range ends.
        for (k, x) in v.iter_mut().take(20).enumerate() {
            *x = (k as f32 + 0.5) * s;
        }
        v[20] = q_max * s;
        v[21] = 0.0;
        let x = Var::from_tensor(&Tensor::from_vec(v, (4, 500), &Device::Cpu).unwrap()).unwrap();
        let scale = Tensor::new(s, &Device::Cpu).unwrap();
        for mode in [GradientMode::Ste, GradientMode::Raw] {
            let op = FakeQuant { scale: s, q_min, q_max, ste: mode == GradientMode::Ste };
            let fused = fake_quant_scalar(x.as_tensor(), op).unwrap().unwrap();
            let composed = fake_quant(x.as_tensor(), &scale, q_min, q_max, mode).unwrap();
            let a: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = composed.flatten_all().unwrap().to_vec1().unwrap();
            prop_assert_eq!(a, b);
            let w = rand(&[4, 500], seed + 1);
            let ga = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let ga: Vec<f32> = ga.get(&x).map(|g| g.flatten_all().unwrap().to_vec1().unwrap()).unwrap_or_else(|| vec![0.0; 2000]);
            let gb: Vec<f32> = gb.get(&x).map(|g| g.flatten_all().unwrap().to_vec1().unwrap()).unwrap_or_else(|| vec![0.0; 2000]);
            prop_assert_eq!(ga, gb);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The fused PACT equals the composed ops: values exactly, ∂/∂x exactly, ∂/∂α to float
    /// summation order; x = α and x = 0 exactly included.
    #[test]
    fn fused_pact_equals_composed(bits in 2u32..9, alpha in 0.05f32..12.0, seed in 0u64..1000) {
        use quant_robust::kernels::pact::pact_ste;
        use quant_robust::quant::pact::pact_composed;
        use quant_robust::quant::GradientMode;
        let mut v = Rng::new(seed, "pact").uniform_vec(3000, -0.5 * alpha, 1.5 * alpha);
        v[0] = alpha;
        v[1] = 0.0;
        v[2] = -0.0;
        let x = Var::from_tensor(&Tensor::from_vec(v, (3, 1000), &Device::Cpu).unwrap()).unwrap();
        let a1 = Var::new(alpha, &Device::Cpu).unwrap();
        let a2 = Var::new(alpha, &Device::Cpu).unwrap();
        let fused = pact_ste(x.as_tensor(), a1.as_tensor(), bits).unwrap().unwrap();
        let composed = pact_composed(x.as_tensor(), a2.as_tensor(), bits, GradientMode::Ste).unwrap();
        let fa: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
        let ca: Vec<f32> = composed.flatten_all().unwrap().to_vec1().unwrap();
        prop_assert_eq!(fa, ca);
        let w = rand(&[3, 1000], seed + 7);
        let g1 = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let dx1: Vec<f32> = g1.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let dx2: Vec<f32> = g2.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        prop_assert_eq!(dx1, dx2);
        let da1 = g1.get(&a1).unwrap().to_scalar::<f32>().unwrap();
        let da2 = g2.get(&a2).unwrap().to_scalar::<f32>().unwrap();
        prop_assert!((da1 - da2).abs() <= 1e-4 * (1.0 + da2.abs()), "{} vs {}", da1, da2);
    }
}

#[test]
fn pact_gradients_give_the_same_bits_on_any_number_of_threads() {
    // ∂/∂α sums per chunk of the activations and the chunks in order: the same bits with 1,
    // 2 and 3 threads, over several chunks and a ragged end.
    use quant_robust::kernels::pact::pact_ste;
    let n = 3 * (1 << 14) + 123;
    let x = Var::from_tensor(&rand(&[n], 61).affine(2.0, 1.0).unwrap()).unwrap();
    let w = rand(&[n], 62);
    let grads = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let a = Var::new(1.5f32, &Device::Cpu).unwrap();
            let y = pact_ste(x.as_tensor(), a.as_tensor(), 4).unwrap().unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dx: Vec<f32> = g.get(&x).unwrap().to_vec1().unwrap();
            (dx, g.get(&a).unwrap().to_scalar::<f32>().unwrap())
        })
    };
    let one = grads(1);
    assert!(one.1 != 0.0 && one.0.iter().any(|v| *v != 0.0));
    assert_eq!(one, grads(2));
    assert_eq!(one, grads(3));
}

#[test]
fn the_allocator_setting_respects_the_users_malloc_variables() {
    use quant_robust::device::{keep_freed_memory, AllocatorSetting, GLIBC_MALLOC_VARIABLES};
    let user = std::env::var("QR_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0")
        || GLIBC_MALLOC_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some());
    let expected = if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        AllocatorSetting::NotGlibc
    } else if user {
        AllocatorSetting::LeftToUser
    } else {
        AllocatorSetting::Kept
    };
    assert_eq!(keep_freed_memory(), expected);
    // Idempotent.
    assert_eq!(keep_freed_memory(), expected);
}

#[test]
fn the_direct_and_winograd_kernels_give_the_same_bits_with_avx2_and_avx512() {
    // Each output sums the same terms in the same order whatever the tile shape, so a golden
    // set made on an AVX-512 machine holds on an AVX2-only one.
    if !(Isa::Avx2.available() && Isa::Avx512.available()) {
        eprintln!("skipping: this machine does not run both AVX2 and AVX-512VL");
        return;
    }
    // Winograd tiles per image, padded to a multiple of 8, run through the products in
    // vectors of 8 (AVX2) or 16 (AVX-512): F(2×2, 3×3) for 6×8 images, 12 tiles (padded to
    // 16), 6×16 24 (a pair and a single vector), 10×32 80 (runs of four and a pair);
    // F(4×4, 3×3) for 16×16 (16 tiles, two rows of tiles per group of eight) and 8×48 (24
    // tiles, a pair and a single vector; a group split over two rows). The weight
    // gradient's 107 output channels are 7 vectors of 16 (a run of four, a pair, a single
    // vector: three register blocks), its 13 input channels blocks and a remainder, and the
    // small images go through it in groups.
    for (stride, h, wd) in [
        (1, 16, 16),
        (2, 16, 16),
        (1, 6, 8),
        (1, 6, 16),
        (1, 10, 32),
        (1, 8, 48),
    ] {
        let x = Var::from_tensor(&rand(&[3, 13, h, wd], 21)).unwrap();
        let w = Var::from_tensor(&rand(&[107, 13, 3, 3], 22)).unwrap();
        let r = rand(&[3, 107, h / stride, wd / stride], 23);
        let run = |path| {
            let y = conv2d_with(x.as_tensor(), w.as_tensor(), 1, stride, path).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&y),
                flat(g.get(x.as_tensor()).unwrap()),
                flat(g.get(w.as_tensor()).unwrap()),
            )
        };
        let direct = run(ConvPath::Direct(Isa::Avx2));
        assert_eq!(
            direct,
            run(ConvPath::Direct(Isa::Avx512)),
            "stride {stride}"
        );
        if stride == 1 {
            let winograd = run(ConvPath::Winograd(Isa::Avx2));
            assert_eq!(winograd, run(ConvPath::Winograd(Isa::Avx512)), "{h}×{wd}");
            // Another algorithm for the forward pass and both gradients (they differ from
            // the direct kernel's by rounding; all are checked against candle's elsewhere).
            assert_ne!(winograd.0, direct.0, "Winograd is not the direct kernel");
            assert_ne!(winograd.1, direct.1, "Winograd is not the direct kernel");
            assert_ne!(winograd.2, direct.2, "Winograd is not the direct kernel");
        }
    }
}

#[test]
fn the_relu_mask_inside_the_input_gradient_gives_the_same_bits() {
    // With the kernel and bias untracked (an attack), conv2d_bias_relu's input gradient
    // masks the output gradient image by image inside the kernel; with them tracked, by a
    // pass over the whole batch first (Winograd F(4×4, 3×3): inside its input transform).
    // The same selects: the same bits, on every path (Winograd, direct, and im2col for
    // stride 2).
    for (stride, c, o, hw) in [
        (1, 5, 6, 32),
        (1, 16, 16, 16),
        (1, 3, 16, 16),
        (1, 13, 5, 8),
        (2, 16, 32, 16),
    ] {
        let x = Var::from_tensor(&rand(&[3, c, hw, hw], 31)).unwrap();
        let w = rand(&[o, c, 3, 3], 32);
        let b = rand(&[o], 33);
        let r = rand(&[3, o, hw / stride, hw / stride], 34);
        for path in paths_for(stride, hw, hw) {
            let dx = |w: &Tensor, b: &Tensor| {
                let y = conv2d_bias_relu_with(x.as_tensor(), w, b, 1, stride, path).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                dx.to_vec1::<f32>().unwrap()
            };
            let tracked = dx(
                Var::from_tensor(&w).unwrap().as_tensor(),
                Var::from_tensor(&b).unwrap().as_tensor(),
            );
            let masked_inside = dx(&w, &b);
            assert!(tracked.iter().any(|v| *v != 0.0));
            assert_eq!(
                tracked, masked_inside,
                "{path:?} stride {stride} c {c} o {o}"
            );
        }
    }
}

/// How a test block ends (see [`block_gradients`]).
#[derive(Debug, Clone, Copy)]
enum End {
    /// Training mode: BatchNorm, the shortcut and ReLU in one op.
    Train,
    /// Evaluation mode, BatchNorm folded: biases, the shortcut and ReLU in the kernel's store.
    Eval,
    /// The plain sum (before an activation other than ReLU, as QAT's PACT).
    Sum,
}

/// A residual block (conv, ReLU, conv, the block's end with the identity shortcut) ending as
/// `end`, its weights tracked or not; the gradients of a weighted sum of its output for `x`
/// and the tracked weights, with the shortcut's gradient through `link` or through candle's
/// sum.
fn block_gradients(
    x: &Var,
    weights: [&Tensor; 4],
    end: End,
    link: Option<&ResidualLink>,
) -> candle_core::Result<Vec<Vec<f32>>> {
    use quant_robust::kernels::{add, batch_norm_add_relu_train, conv2d_bias_add_relu, relu};
    let [w1, w2, b1, b2] = weights;
    let xt = x.as_tensor();
    let first = |bias: Option<&Tensor>, relu: bool| match (link, bias) {
        (Some(l), _) => conv2d_block_start(xt, w1, bias, relu, (1, 1), l),
        (None, Some(b)) if relu => conv2d_bias_relu(xt, w1, b, 1, 1),
        (None, Some(b)) => conv2d_bias_with(xt, w1, b, 1, 1, ConvPath::Auto),
        (None, None) => conv2d(xt, w1, 1, 1),
    };
    let out = match end {
        End::Train => {
            let h = relu(&first(None, false)?)?;
            let y2 = conv2d(&h, w2, 1, 1)?;
            batch_norm_add_relu_train(&y2, (b1, b2), xt, link, 1e-5)?.0
        }
        End::Eval => {
            let h = first(Some(b1), true)?;
            conv2d_bias_add_relu(&h, w2, b2, xt, link, (1, 1))?
        }
        End::Sum => {
            let h = first(Some(b1), false)?.tanh()?;
            add(&conv2d(&h, w2, 1, 1)?, xt, link)?
        }
    };
    let r = rand(out.dims(), 45).to_dtype(out.dtype())?;
    let g = (&out * &r)?.sum_all()?.backward()?;
    [xt, w1, w2, b1]
        .into_iter()
        .filter_map(|t| g.get(t))
        .map(|t| {
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        })
        .collect()
}

#[test]
fn a_linked_shortcut_gives_candles_gradients() {
    // The identity shortcut's gradient handed to the block's first convolution, which adds
    // it as its kernel stores the input gradient: the bits of candle's sum of the two, for
    // the Winograd F(4×4, 3×3) and F(2×2, 3×3) paths and the direct kernel, for each end,
    // with the weights tracked (training) or not (an attack).
    for (c, hw) in [(16, 32), (16, 8), (4, 8)] {
        let x = Var::from_tensor(&rand(&[2, c, hw, hw], 41)).unwrap();
        let ws = [
            rand(&[c, c, 3, 3], 42),
            rand(&[c, c, 3, 3], 43),
            rand(&[c], 44),
            rand(&[c], 46),
        ];
        let vars: Vec<Var> = ws.iter().map(|w| Var::from_tensor(w).unwrap()).collect();
        let tracked = [0, 1, 2, 3].map(|i| vars[i].as_tensor());
        let runs = [
            (End::Train, tracked),
            (End::Eval, tracked),
            (End::Eval, ws.each_ref()),
            (End::Sum, tracked),
            (End::Sum, ws.each_ref()),
        ];
        for (end, weights) in runs {
            let candle = block_gradients(&x, weights, end, None).unwrap();
            let link = ResidualLink::default();
            let linked = block_gradients(&x, weights, end, Some(&link)).unwrap();
            assert!(candle[0].iter().any(|v| *v != 0.0));
            assert_eq!(candle, linked, "c {c} hw {hw} {end:?}");
            // The same link serves a second forward and backward pass.
            let again = block_gradients(&x, weights, end, Some(&link)).unwrap();
            assert_eq!(candle, again, "c {c} hw {hw} {end:?}, link reused");
        }
    }
}

#[test]
fn a_linked_shortcut_off_our_kernels_takes_candles_way() {
    // f64 runs candle's ops, which bypass the link at both ends: the same gradients as
    // without it (within f64's rounding of the f32 inputs, which is exact here).
    let to64 = |t: Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    let x = Var::from_tensor(&to64(rand(&[2, 16, 8, 8], 41))).unwrap();
    let ws = [
        to64(rand(&[16, 16, 3, 3], 42)),
        to64(rand(&[16, 16, 3, 3], 43)),
        to64(rand(&[16], 44)),
        to64(rand(&[16], 46)),
    ];
    for end in [End::Eval, End::Sum] {
        let candle = block_gradients(&x, ws.each_ref(), end, None).unwrap();
        let link = ResidualLink::default();
        let linked = block_gradients(&x, ws.each_ref(), end, Some(&link)).unwrap();
        assert_eq!(candle, linked, "{end:?}");
    }
}

#[test]
fn a_link_without_its_blocks_end_is_an_error() {
    // The first convolution linked, the block's end not: its backward pass finds no
    // shortcut gradient, and says so instead of dropping it.
    let x = Var::from_tensor(&rand(&[2, 16, 8, 8], 41)).unwrap();
    let w = rand(&[16, 16, 3, 3], 42);
    let link = ResidualLink::default();
    let y = conv2d_block_start(x.as_tensor(), &w, None, false, (1, 1), &link).unwrap();
    let err = (y + x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap_err();
    assert!(err.to_string().contains("residual link"), "{err}");
}
