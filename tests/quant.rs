//! Quantizer invariants (proptest): rounding, codes, idempotence, error bound, monotonicity,
//! oddness, zero, level count, no NaN, STE and raw gradients, per-channel = per-tensor loop;
//! and the uniform PTQ seam on ResNet-20.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use quant_robust::quant::round::{round_half_even, round_half_even_tensor};
use quant_robust::quant::seam::UniformConfig;
use quant_robust::quant::uniform::{
    code_range, codes, fake_quant, quantize_slice, quantize_weight, scale_for, Signedness,
};
use quant_robust::quant::{Bits, GradientMode};

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

#[test]
fn rounding_is_half_to_even_like_pytorch() {
    let xs = [
        0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, 0.49, 0.51, -3.7, 4.0,
    ];
    let expect = [
        0.0f32, 2.0, 2.0, -0.0, -2.0, -2.0, 128.0, 0.0, 1.0, -4.0, 4.0,
    ];
    for (x, e) in xs.iter().zip(expect) {
        assert_eq!(round_half_even(*x), e, "{x}");
    }
    let r = round_half_even_tensor(&t(&xs))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(r, expect.to_vec());
}

/// The vectorizable rounding gives the standard library's bits for every f32 tested: a
/// stride through all 2^32 bit patterns, every value near 2^22 and 2^23 (where the trick's
/// branch switches and f32 loses its fraction bits), every tie up to 2^12, and the specials.
#[test]
fn fast_rounding_has_the_bits_of_round_ties_even() {
    let check = |x: f32| {
        let (a, b) = (round_half_even(x), x.round_ties_even());
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "{x:e} ({:#010x}): {a:e} vs {b:e}",
            x.to_bits()
        );
    };
    for u in (0..=u32::MAX).step_by(257) {
        check(f32::from_bits(u));
    }
    for base in [4_194_304.0f32, 8_388_608.0] {
        let u = base.to_bits();
        for v in u - 50_000..u + 50_000 {
            check(f32::from_bits(v));
            check(-f32::from_bits(v));
        }
    }
    for k in -4096..4096 {
        check(k as f32 + 0.5);
    }
    for x in [
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN,
    ] {
        check(x);
    }
}

fn bits_and_sign() -> impl Strategy<Value = (u32, Signedness)> {
    (2u32..=8, prop::bool::ANY).prop_map(|(b, s)| {
        (
            b,
            if s {
                Signedness::Symmetric
            } else {
                Signedness::Unsigned
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tensor_rounding_equals_scalar(xs in prop::collection::vec(-300.0f32..300.0, 1..64),
                                     ties in prop::collection::vec(-100i32..100, 0..16)) {
        let mut v = xs.clone();
        v.extend(ties.iter().map(|&k| k as f32 + 0.5));
        let r = round_half_even_tensor(&t(&v)).unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in v.iter().zip(r) {
            prop_assert_eq!(y, round_half_even(*x), "x = {}", x);
        }
    }

    #[test]
    fn uniform_quantizer_invariants(
        (bits, sign) in bits_and_sign(),
        range in 0.01f32..10.0,
        xs in prop::collection::vec(-20.0f32..20.0, 1..128),
    ) {
        let (q_min, q_max) = code_range(bits, sign).unwrap();
        let s = scale_for(range, q_max);
        let q = quantize_slice(&xs, s, q_min, q_max);
        let c = codes(&xs, s, q_min, q_max);
        // Codes within [q_min, q_max]; at most 2^b levels (2^b − 1 for narrow symmetric).
        prop_assert!(c.iter().all(|&k| k as f32 >= q_min && k as f32 <= q_max));
        prop_assert!(q_max - q_min + 1.0 <= (1u32 << bits) as f32);
        // Idempotence.
        prop_assert_eq!(quantize_slice(&q, s, q_min, q_max), q.clone());
        for (i, &x) in xs.iter().enumerate() {
            // |Q(x) − x| ≤ s/2 inside the clipping range (plus float rounding).
            if x >= q_min * s && x <= q_max * s {
                prop_assert!((q[i] - x).abs() <= s / 2.0 * (1.0 + 1e-5) + 1e-6,
                    "x {} q {} s {}", x, q[i], s);
            }
        }
        // Monotonicity.
        let mut pairs: Vec<(f32, f32)> = xs.iter().cloned().zip(q.iter().cloned()).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        prop_assert!(pairs.windows(2).all(|w| w[0].1 <= w[1].1));
        // Zero is exactly representable; symmetric narrow range is odd.
        prop_assert_eq!(quantize_slice(&[0.0], s, q_min, q_max)[0], 0.0);
        if sign == Signedness::Symmetric {
            let neg: Vec<f32> = xs.iter().map(|x| -x).collect();
            let qn = quantize_slice(&neg, s, q_min, q_max);
            for (a, b) in q.iter().zip(qn) {
                prop_assert_eq!(*a, -b);
            }
        }
        // The tensor path equals the host reference.
        let qt = fake_quant(&t(&xs), &Tensor::new(s, &Device::Cpu).unwrap(), q_min, q_max,
            GradientMode::Ste).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in qt.iter().zip(&q) {
            prop_assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{} vs {}", a, b);
        }
    }

    #[test]
    fn ste_gradient_is_the_in_range_mask_and_raw_is_zero(
        (bits, sign) in bits_and_sign(),
        xs in prop::collection::vec(-3.0f32..3.0, 1..64),
    ) {
        let (q_min, q_max) = code_range(bits, sign).unwrap();
        let s = scale_for(1.0, q_max);
        let scale = Tensor::new(s, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&t(&xs)).unwrap();
        let y = fake_quant(&x, &scale, q_min, q_max, GradientMode::Ste).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (xi, gi) in xs.iter().zip(g) {
            let inside = *xi >= q_min * s && *xi <= q_max * s;
            prop_assert_eq!(gi, if inside { 1.0 } else { 0.0 }, "x = {}", xi);
        }
        let y = fake_quant(&x, &scale, q_min, q_max, GradientMode::Raw).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let raw_total = g
            .get(x.as_tensor())
            .map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .unwrap_or(0.0);
        prop_assert_eq!(raw_total, 0.0);
    }

    #[test]
    fn per_channel_equals_a_loop_of_per_tensor(
        bits in 2u32..=8,
        rows in 1usize..6,
        cols in 1usize..20,
        seed in 0u64..1000,
    ) {
        let v = quant_robust::rng::Rng::new(seed, "w").normal_vec(rows * cols, 1.0);
        let w = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let pc = quantize_weight(&w, bits, true, GradientMode::Ste).unwrap().to_vec2::<f32>().unwrap();
        for r in 0..rows {
            let row = Tensor::from_slice(&v[r * cols..(r + 1) * cols], cols, &Device::Cpu).unwrap();
            let pt = quantize_weight(&row, bits, false, GradientMode::Ste).unwrap().to_vec1::<f32>().unwrap();
            prop_assert_eq!(&pc[r], &pt);
        }
    }
}

#[test]
fn no_nan_on_zero_or_constant_tensors() {
    for v in [vec![0.0f32; 10], vec![3.0f32; 10]] {
        let w = Tensor::from_vec(v.clone(), (2, 5), &Device::Cpu).unwrap();
        for pc in [true, false] {
            let q = quantize_weight(&w, 4, pc, GradientMode::Ste).unwrap();
            let q = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(q.iter().all(|x| x.is_finite()), "{q:?}");
            // max |w| maps to the top code: s·q_max = w up to float rounding of s.
            for (a, b) in q.iter().zip(&v) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}

#[test]
fn bit_settings_parse_once_and_reject_clearly() {
    let b: Bits = "W4A8".parse().unwrap();
    assert_eq!((b.weights(), b.activations()), (Some(4), Some(8)));
    let b: Bits = "w32a4".parse().unwrap();
    assert_eq!((b.weights(), b.activations()), (None, Some(4)));
    assert_eq!(b.to_string(), "w32a4");
    assert_eq!(UniformConfig::from(b).name(), "w32a4");
    assert!("w32a32".parse::<Bits>().unwrap().is_full_precision());
    for bad in ["w0a8", "w17a8", "w1a8", "w4", "4a4", "wxa8", "w4a", ""] {
        let msg = bad.parse::<Bits>().unwrap_err().to_string();
        assert!(
            msg.contains(&format!("\"{bad}\"")) || msg.contains(bad),
            "{msg}"
        );
        assert!(msg.contains("bits"), "{msg}");
    }
    let msg = "w1a8".parse::<Bits>().unwrap_err().to_string();
    assert!(msg.contains("between 2 and 16"), "{msg}");
    assert!(Bits::new(4, 1).is_err() && Bits::new(33, 4).is_err());
    // One spelling on the wire: any case in, lower case out.
    let b: Bits = serde_json::from_str("\"W2A8\"").unwrap();
    assert_eq!(serde_json::to_string(&b).unwrap(), "\"w2a8\"");
    assert!(serde_json::from_str::<Bits>("\"w0a4\"").is_err());
}

/// The fraction of rows on which two batches of logits predict the same class.
fn agreement(a: &Tensor, b: &Tensor) -> f32 {
    a.argmax(1)
        .unwrap()
        .eq(&b.argmax(1).unwrap())
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A random ResNet-20 with running statistics from a few training-mode passes (so that
/// activations are not degenerate), 64 sample images and their labels, and the activation
/// ranges calibrated on them.
struct Calibrated {
    model: quant_robust::model::ResNet20,
    x: Tensor,
    y: Tensor,
    ranges: std::collections::BTreeMap<String, f32>,
}

fn calibrated(seed: u64) -> Calibrated {
    use quant_robust::data::batch::DeviceData;
    use quant_robust::model::ResNet20;
    use quant_robust::quant::seam::calibrate;
    use quant_robust::rng::Rng;
    let s = crate::common::sample();
    let model = ResNet20::init(&mut Rng::new(seed, "init"), &Device::Cpu).unwrap();
    let train = DeviceData::new(&s.train.take(64), &Device::Cpu).unwrap();
    let (x, y) = train.range(0, 64).unwrap();
    for _ in 0..3 {
        model.forward(&x, true).unwrap();
    }
    let all: Vec<u32> = (0..64).collect();
    let ranges = calibrate(&model.frozen(), &train, &all, 32).unwrap();
    Calibrated {
        model,
        x,
        y,
        ranges,
    }
}

#[test]
fn uniform_ptq_at_8_bits_keeps_the_model_and_raw_gradients_vanish() {
    use quant_robust::quant::seam::uniform_ptq;
    let Calibrated {
        model,
        x,
        y,
        ranges,
    } = calibrated(0);
    assert_eq!(ranges.len(), 19, "stem + 2 per block × 9 blocks");
    assert!(ranges.values().all(|&r| r > 0.0 && r.is_finite()));
    let fp = model.frozen().forward(&x, false).unwrap();
    let q8 = uniform_ptq(
        &model.frozen(),
        UniformConfig::from(Bits::of(8, 8)),
        ranges.clone(),
        GradientMode::Ste,
    )
    .forward(&x, false)
    .unwrap();
    let agree = agreement(&fp, &q8);
    assert!(
        agree >= 0.9,
        "W8A8 changed {:.0}% of predictions",
        100.0 * (1.0 - agree)
    );
    // Gradients: STE gives a non-zero input gradient, raw gives none.
    let q4 = |mode| {
        uniform_ptq(
            &model.frozen(),
            UniformConfig::from(Bits::of(32, 4)),
            ranges.clone(),
            mode,
        )
    };
    let (_, g) = quant_robust::attack::input_gradient(&q4(GradientMode::Ste), &x, &y).unwrap();
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let (_, g) = quant_robust::attack::input_gradient(&q4(GradientMode::Raw), &x, &y).unwrap();
    assert_eq!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

fn laplace(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = quant_robust::rng::Rng::new(seed, "laplace");
    (0..n)
        .map(|_| {
            let u = rng.uniform_f32() - 0.5;
            let v = -(1.0 - 2.0 * u.abs()).max(1e-7).ln() * 0.05;
            v.copysign(u)
        })
        .collect()
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    quant_robust::rng::Rng::new(seed, "gauss").normal_vec(n, 0.05)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn pwlq_breakpoints_and_errors(seed in 0u64..10_000, bits in 2u32..=4, lap in prop::bool::ANY) {
        use quant_robust::quant::pwlq::{breakpoint, quantize_channel, sse, Breakpoint};
        // 576 weights: one output channel of a 64-channel 3×3 conv.
        let w = if lap { laplace(576, seed) } else { gaussian(576, seed) };
        let m = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let uniform = sse(&w, &quantize_channel(&w, m, bits));
        let fit = if lap { Breakpoint::Laplace } else { Breakpoint::Gaussian };
        let mut errs = Vec::new();
        for kind in [Breakpoint::Gaussian, Breakpoint::Laplace, Breakpoint::Search] {
            let p = breakpoint(&w, bits, kind).unwrap();
            prop_assert!(p > 0.0 && p <= m, "{:?}: p = {}, m = {}", kind, p, m);
            errs.push((kind, sse(&w, &quantize_channel(&w, p, bits))));
        }
        let err = |k| errs.iter().find(|(kk, _)| *kk == k).unwrap().1;
        // The search is never worse than the closed forms or uniform (p = m).
        prop_assert!(err(Breakpoint::Search) <= err(Breakpoint::Gaussian));
        prop_assert!(err(Breakpoint::Search) <= err(Breakpoint::Laplace));
        prop_assert!(err(Breakpoint::Search) <= uniform);
        // The closed form fitted to the data's own shape beats uniform at 2-4 bits.
        prop_assert!(err(fit) <= uniform, "{:?} {} > uniform {}", fit, err(fit), uniform);
    }

    #[test]
    fn pwlq_with_p_equal_m_is_uniform_and_levels_are_bounded(
        seed in 0u64..10_000, bits in 2u32..=8,
    ) {
        use quant_robust::quant::pwlq::{breakpoint, quantize_channel, Breakpoint};
        let w = gaussian(300, seed);
        let m = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (q_min, q_max) = code_range(bits, Signedness::Symmetric).unwrap();
        let uni = quantize_slice(&w, m / q_max, q_min, q_max);
        let pw = quantize_channel(&w, m, bits);
        for (a, b) in pw.iter().zip(&uni) {
            prop_assert!((a - b).abs() <= 1e-7, "{} vs {}", a, b);
        }
        let p = breakpoint(&w, bits, Breakpoint::Search).unwrap();
        let q = quantize_channel(&w, p, bits);
        let mut levels: Vec<u32> = q.iter().map(|v| v.to_bits()).collect();
        levels.sort();
        levels.dedup();
        prop_assert!(levels.len() <= (1usize << (bits + 1)), "{} levels", levels.len());
        // Idempotent for the same breakpoint and range.
        let again: Vec<f32> = q
            .iter()
            .map(|&v| quant_robust::quant::pwlq::quantize_value(v, p, m, bits))
            .collect();
        for (a, b) in again.iter().zip(&q) {
            prop_assert!((a - b).abs() <= 1e-7 * m, "{} vs {}", a, b);
        }
    }
}

/// The evaluation forward fuses a uniformly quantized model's ReLU into the convolution's
/// store and the residual sum, then quantizes: the same logits and input gradients, bit for
/// bit, as the seam's activation after an unfused convolution (ReLU, then the quantizer).
#[test]
fn fused_relu_then_quantizer_has_the_bits_of_the_unfused_activation() {
    use std::sync::Arc;

    use quant_robust::model::QuantSeam;
    use quant_robust::quant::seam::UniformSeam;

    /// The same seam, but the model may not fuse its ReLU.
    struct Unfused(UniformSeam);
    impl QuantSeam for Unfused {
        fn weight(&self, layer: &str, w: &Tensor) -> quant_robust::Result<Tensor> {
            self.0.weight(layer, w)
        }
        fn activation(&self, site: &str, x: &Tensor) -> quant_robust::Result<Tensor> {
            self.0.activation(site, x)
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }

    let Calibrated {
        model,
        x,
        y,
        ranges,
    } = calibrated(4);
    for bits in [Bits::of(4, 4), Bits::of(32, 3), Bits::of(4, 32)] {
        let seam = UniformSeam {
            config: UniformConfig::from(bits),
            ranges: ranges.clone(),
            mode: GradientMode::Ste,
        };
        assert!(seam.relu_first("layer1.0.relu2"));
        let fused = model.frozen().with_seam(Arc::new(seam.clone()));
        let unfused = model.frozen().with_seam(Arc::new(Unfused(seam)));
        let bits_of = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let (a, b) = (
            fused.forward(&x, false).unwrap(),
            unfused.forward(&x, false).unwrap(),
        );
        assert_eq!(bits_of(&a), bits_of(&b), "{bits:?}: logits");
        let (la, ga) = quant_robust::attack::input_gradient(&fused, &x, &y).unwrap();
        let (lb, gb) = quant_robust::attack::input_gradient(&unfused, &x, &y).unwrap();
        assert_eq!(bits_of(&la), bits_of(&lb), "{bits:?}: losses");
        assert_eq!(bits_of(&ga), bits_of(&gb), "{bits:?}: input gradients");
        assert!(
            ga.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{bits:?}: a gradient to compare"
        );
    }
}

#[test]
fn pwlq_bias_correction_restores_mean_and_std() {
    use quant_robust::quant::pwlq::{bias_correct, breakpoint, quantize_channel, Breakpoint};
    let w = laplace(576, 3);
    let p = breakpoint(&w, 3, Breakpoint::Laplace).unwrap();
    let q = bias_correct(&w, &quantize_channel(&w, p, 3));
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let s = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
        (m, s)
    };
    let ((mw, sw), (mq, sq)) = (stats(&w), stats(&q));
    assert!(
        (mw - mq).abs() < 1e-6 && (sw - sq).abs() / sw < 1e-5,
        "{mw} {mq} {sw} {sq}"
    );
    assert!(breakpoint(&w, 1, Breakpoint::Search).is_err());
    assert_eq!(breakpoint(&[0.0; 8], 4, Breakpoint::Search).unwrap(), 0.0);
}

#[test]
fn ptq_folding_keeps_the_function_and_quantized_checkpoints_reload_exactly() {
    use quant_robust::data::batch::DeviceData;
    use quant_robust::manifest::Manifest;
    use quant_robust::model::{checkpoint, ResNet20};
    use quant_robust::quant::ptq::{quantize_weights, PtqConfig, PtqMethod};
    use quant_robust::quant::seam::{calibrate, uniform_ptq};
    use quant_robust::rng::Rng;
    let s = crate::common::sample();
    let model = ResNet20::init(&mut Rng::new(1, "init"), &Device::Cpu).unwrap();
    let train = DeviceData::new(&s.train.take(64), &Device::Cpu).unwrap();
    let (x, _) = train.range(0, 64).unwrap();
    for _ in 0..3 {
        model.forward(&x, true).unwrap();
    }
    let fp = model.frozen();
    // Folding alone (no bits) computes the same function.
    let (state, _) = quantize_weights(&fp, &PtqConfig::default()).unwrap();
    let folded = ResNet20::from_tensors(state, 0, &Device::Cpu, false).unwrap();
    let (a, b) = (
        fp.forward(&x, false).unwrap(),
        folded.forward(&x, false).unwrap(),
    );
    let (d, scale) = crate::common::max_diff_and_scale(&b, &a);
    assert!(d <= 1e-4 * scale.max(1.0), "folding changed logits by {d}");
    // W4A4 PWLQ: a checkpoint that reloads to the same logits, quantizers included.
    let cfg = PtqConfig {
        method: PtqMethod::Pwlq,
        bits: UniformConfig::from(Bits::of(4, 4)),
        ..PtqConfig::default()
    };
    let (state, ratios) = quantize_weights(&fp, &cfg).unwrap();
    assert_eq!(ratios.len(), 20, "19 convs and the linear layer");
    assert!(ratios.values().all(|&r| r > 0.0 && r <= 1.0));
    let wq = ResNet20::from_tensors(state, 0, &Device::Cpu, false).unwrap();
    let all: Vec<u32> = (0..64).collect();
    let ranges = calibrate(&wq, &train, &all, 32).unwrap();
    let act = UniformConfig {
        weight_bits: None,
        ..cfg.bits.clone()
    };
    let q = uniform_ptq(&wq, act, ranges, GradientMode::Ste);
    let dir = crate::common::tempdir();
    let p = dir.path().join("q.safetensors");
    checkpoint::save(&q, &p, &Manifest::new("checkpoint", &Device::Cpu)).unwrap();
    let back = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false).unwrap();
    assert_eq!(back.seam().describe(), q.seam().describe());
    assert_eq!(
        q.forward(&x, false).unwrap().to_vec2::<f32>().unwrap(),
        back.forward(&x, false).unwrap().to_vec2::<f32>().unwrap()
    );
    // 4-bit per-channel weights: at most 2^(b+1) distinct values per output channel.
    let w = back
        .tensor("layer2.1.conv1.weight")
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for row in w {
        let mut v: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
        v.sort();
        v.dedup();
        assert!(v.len() <= 32, "{} levels", v.len());
    }
}

#[test]
fn pact_gradients_are_exact_at_and_around_alpha() {
    use quant_robust::quant::pact::pact;
    let xs = [-1.0f32, 0.0, 0.3, 1.999, 2.0, 2.5, 7.0];
    let x = Var::from_tensor(&t(&xs)).unwrap();
    let alpha = Var::new(2.0f32, &Device::Cpu).unwrap();
    let y = pact(&x, &alpha, 4, GradientMode::Ste).unwrap();
    // Values: clip to [0, 2], then 15 levels of 2/15.
    let v = y.to_vec1::<f32>().unwrap();
    assert_eq!(v[0], 0.0);
    assert_eq!(v[4], 2.0);
    assert_eq!(v[6], 2.0);
    assert!((v[2] - 2.0 / 15.0 * 2.0).abs() < 1e-6, "{}", v[2]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let ga = g
        .get(alpha.as_tensor())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // ∂/∂x = 1 on 0 ≤ x < α; ∂/∂α = 1 for each x ≥ α (x = α counts fully, not half).
    assert_eq!(gx, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(ga, 3.0);
    // Raw mode: no gradient reaches x or α.
    let y = pact(&x, &alpha, 4, GradientMode::Raw).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_none() && g.get(alpha.as_tensor()).is_none());
}

#[test]
fn dorefa_values_and_straight_through_gradient() {
    use quant_robust::quant::pact::dorefa;
    let ws = [-2.0f32, -0.3, 0.0, 0.1, 0.7, 2.0];
    let w = Var::from_tensor(&t(&ws)).unwrap();
    let q = dorefa(&w, 2, GradientMode::Ste).unwrap();
    let v = q.to_vec1::<f32>().unwrap();
    // 2 bits: values in {−1, −1/3, 1/3, 1}; extremes map to ±1.
    for x in &v {
        assert!(
            [-1.0f32, -1.0 / 3.0, 1.0 / 3.0, 1.0]
                .iter()
                .any(|l| (l - x).abs() < 1e-6),
            "{x}"
        );
    }
    assert_eq!((v[0], v[5]), (-1.0, 1.0));
    // The gradient is that of the un-rounded transform 2·(tanh(w)/(2·max|tanh|) + 0.5) − 1.
    let g = q.sum_all().unwrap().backward().unwrap();
    let gq = g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let u = w.tanh().unwrap();
    let m = u.abs().unwrap().max_all().unwrap();
    let smooth = u.broadcast_div(&m).unwrap();
    let gs = smooth.sum_all().unwrap().backward().unwrap();
    let gr = gs.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    for (a, b) in gq.iter().zip(&gr) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn qat_trains_alpha_stays_bounded_and_exports_the_same_model() {
    use quant_robust::data::batch::DeviceData;
    use quant_robust::model::ResNet20;
    use quant_robust::quant::qat::{export, PactSeam, QatConfig};
    use quant_robust::quant::seam::calibrate;
    use quant_robust::rng::Rng;
    use quant_robust::train::{LrSchedule, Silent, TrainConfig, Trainer};
    let s = crate::common::sample();
    let train = DeviceData::new(&s.train.take(64), &Device::Cpu).unwrap();
    let test = DeviceData::new(&s.test.take(40), &Device::Cpu).unwrap();
    let model = ResNet20::init(&mut Rng::new(2, "init"), &Device::Cpu).unwrap();
    let (x, _) = train.range(0, 64).unwrap();
    model.forward(&x, true).unwrap();
    let all: Vec<u32> = (0..64).collect();
    let ranges = calibrate(&model.frozen(), &train, &all, 32).unwrap();
    let cfg = QatConfig {
        bits: UniformConfig::from(Bits::of(4, 4)),
        alpha_bounds: (0.01, 3.0),
        ..QatConfig::default()
    };
    let seam = std::sync::Arc::new(PactSeam::new(cfg, &ranges, &Device::Cpu).unwrap());
    let before = seam.alpha_values().unwrap();
    assert!(
        before.values().all(|&a| (0.01..=3.0).contains(&a)),
        "initial α clamped"
    );
    let tcfg = TrainConfig {
        epochs: 3,
        batch_size: 32,
        lr: 0.05,
        schedule: LrSchedule::Constant,
        eval_images: Some(40),
        eval_batch_size: 40,
        log_every: 1,
        ..TrainConfig::default()
    };
    let mut t = Trainer::from_model(
        model.with_seam(seam.clone()),
        tcfg,
        s.identity.clone(),
        64,
        &Device::Cpu,
    )
    .unwrap();
    t.fit(&train, &test, None, &|| false, &mut Silent).unwrap();
    let h = &t.state.history;
    assert!(
        h[2].train_loss < h[0].train_loss,
        "{:?}",
        h.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    let after = seam.alpha_values().unwrap();
    assert!(
        after
            .values()
            .all(|&a| a.is_finite() && (0.01..=3.0).contains(&a)),
        "{after:?}"
    );
    assert!(
        before.iter().any(|(k, v)| (after[k] - v).abs() > 1e-6),
        "α did not move"
    );
    // The exported model computes what the trained model computes.
    let e = export(&t.model, &seam).unwrap();
    let (xt, _) = test.range(0, 40).unwrap();
    let a = t.model.frozen().forward(&xt, false).unwrap();
    let b = e.forward(&xt, false).unwrap();
    let same = agreement(&a, &b);
    assert!(
        same >= 0.95,
        "export changed {:.0}% of predictions",
        100.0 * (1.0 - same)
    );
}

/// A quantized checkpoint keeps its quantizers as typed metadata fields (`quant.version`,
/// `quant.kind`, bit widths, `quant.range.<site>` / `quant.alpha.<site>`): a uniform (PTQ)
/// model and a PACT model (QAT's latent weights) reload to the same logits, bit for bit;
/// a full-precision one stores none; an unknown version, kind or field, a bad width or a
/// non-positive α is refused naming the file.
#[test]
fn stored_quantizers_are_typed_fields_that_reload_exactly() {
    use quant_robust::model::checkpoint;
    use quant_robust::quant::qat::{PactSeam, QatConfig};
    use quant_robust::quant::seam::uniform_ptq;
    use quant_robust::quant::{GradientMode, StoredSeam};
    let c = calibrated(11);
    let dir = tempfile::tempdir().unwrap();
    let man = quant_robust::manifest::Manifest::new("checkpoint", &Device::Cpu);
    let pact = c.model.with_seam(std::sync::Arc::new(
        PactSeam::new(
            QatConfig {
                bits: UniformConfig::from(Bits::of(4, 4)),
                ..QatConfig::default()
            },
            &c.ranges,
            &Device::Cpu,
        )
        .unwrap(),
    ));
    let uniform = uniform_ptq(
        &c.model,
        UniformConfig::from(Bits::of(4, 8)),
        c.ranges.clone(),
        GradientMode::Ste,
    );
    for (name, m, kind) in [
        ("uniform", &uniform, Some("uniform")),
        ("pact", &pact, Some("pact")),
        ("fp", &c.model, None),
    ] {
        let p = dir.path().join(format!("{name}.safetensors"));
        checkpoint::save(m, &p, &man).unwrap();
        let stored = checkpoint::load_stored(&p, &Device::Cpu, false).unwrap();
        assert_eq!(stored.metadata.get("quant.kind").map(String::as_str), kind);
        let back = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false).unwrap();
        assert_eq!(back.seam().quantizes(), kind.is_some(), "{name}");
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(m.frozen().forward(&c.x, false).unwrap()),
            flat(back.forward(&c.x, false).unwrap()),
            "{name}"
        );
        if let Some(k) = kind {
            let fields = StoredSeam::from_metadata(&stored.metadata).unwrap();
            assert!(matches!(
                (k, fields),
                ("uniform", StoredSeam::Uniform { .. }) | ("pact", StoredSeam::Pact { .. })
            ));
        }
    }
    // Damaged fields.
    let p = dir.path().join("pact.safetensors");
    let good = checkpoint::load_stored(&p, &Device::Cpu, false)
        .unwrap()
        .metadata;
    let site = good
        .keys()
        .find(|k| k.starts_with("quant.alpha.layer"))
        .unwrap()
        .clone();
    let sd = checkpoint::state_dict(&pact).unwrap();
    for (key, value, says) in [
        ("quant.version", Some("3"), "version"),
        ("quant.kind", Some("log"), "kind"),
        ("quant.extra", Some("1"), "quant.extra"),
        ("quant.weight_bits", Some("0"), "bits"),
        ("quant.activation_bits", None, "quant.activation_bits"),
        (site.as_str(), Some("-1"), "α"),
        (site.as_str(), Some("two"), "not a number"),
    ] {
        let mut meta: std::collections::HashMap<String, String> =
            good.clone().into_iter().collect();
        match value {
            Some(v) => meta.insert(key.to_string(), v.to_string()),
            None => meta.remove(key),
        };
        let q = dir.path().join("damaged.safetensors");
        std::fs::write(&q, checkpoint::to_safetensors_bytes(&sd, &meta).unwrap()).unwrap();
        let e = quant_robust::quant::load_checkpoint(&q, &Device::Cpu, false)
            .map(|_| ())
            .expect_err(key)
            .to_string();
        assert!(
            e.contains("damaged.safetensors") && e.contains(says),
            "{key} = {value:?}: {e}"
        );
    }
}

#[test]
fn percentile_calibration_is_below_max_and_validated() {
    use quant_robust::data::batch::DeviceData;
    use quant_robust::model::ResNet20;
    use quant_robust::quant::seam::{calibrate_with, percentile, CalibMethod};
    use quant_robust::rng::Rng;
    assert_eq!(percentile(vec![3.0, 1.0, 2.0, 4.0, 5.0], 50.0), 3.0);
    assert_eq!(percentile(vec![3.0, 1.0, 2.0], 100.0), 3.0);
    let s = crate::common::sample();
    let model = ResNet20::init(&mut Rng::new(5, "init"), &Device::Cpu).unwrap();
    let data = DeviceData::new(&s.train.take(32), &Device::Cpu).unwrap();
    let all: Vec<u32> = (0..32).collect();
    let max = calibrate_with(&model, &data, &all, 16, CalibMethod::Max).unwrap();
    let p = calibrate_with(&model, &data, &all, 16, CalibMethod::Percentile(99.0)).unwrap();
    for (k, v) in &p {
        assert!(*v <= max[k] && *v > 0.0, "{k}: {v} vs {}", max[k]);
    }
    assert!(calibrate_with(&model, &data, &all, 16, CalibMethod::Percentile(0.0)).is_err());
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device: run with --ignored on a GPU machine"]
fn cpu_and_cuda_quantizers_agree_exactly() {
    let gpu = Device::new_cuda(0).expect("this test needs CUDA device 0");
    let v = quant_robust::rng::Rng::new(0, "cuda-q").normal_vec(64 * 64 * 9, 0.05);
    let w = Tensor::from_vec(v, (64, 64, 3, 3), &Device::Cpu).unwrap();
    for bits in [2, 4, 8] {
        let a = quantize_weight(&w, bits, true, GradientMode::Ste).unwrap();
        let b = quantize_weight(&w.to_device(&gpu).unwrap(), bits, true, GradientMode::Ste)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{bits} bits"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Bit specs: any text is a `Bits` that prints back to itself or an error naming it,
    /// never a panic; `wXaY` is accepted exactly when each width is in 2..=16 or 32.
    #[test]
    fn bit_specs_parse_or_are_refused(s in "\\PC{0,8}", w in 0u32..40, a in 0u32..40, upper in proptest::bool::ANY) {
        match s.parse::<Bits>() {
            Ok(b) => prop_assert_eq!(b.to_string().parse::<Bits>().unwrap(), b),
            Err(e) => prop_assert!(e.to_string().contains(s.as_str()), "{}", e),
        }
        let ok = |x: u32| x == 32 || (2..=16).contains(&x);
        let spec = if upper { format!("W{w}A{a}") } else { format!("w{w}a{a}") };
        match spec.parse::<Bits>() {
            Ok(b) => {
                prop_assert!(ok(w) && ok(a), "{} accepted", spec);
                prop_assert_eq!(b.to_string(), format!("w{w}a{a}"));
            }
            Err(e) => {
                prop_assert!(!(ok(w) && ok(a)), "{} refused: {}", spec, e);
            }
        }
    }
}
