//! ResNet-20: parameter count, PyTorch names and layouts, modes, checkpoints.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use quant_robust::manifest::Manifest;
use quant_robust::model::resnet20::{check_tensors, option_a_shortcut, NUM_PARAMETERS};
use quant_robust::model::{checkpoint, Classifier, ResNet20};
use quant_robust::rng::Rng;
use quant_robust::Error;

use crate::common::tempdir;

fn model(seed: u64) -> ResNet20 {
    ResNet20::init(&mut Rng::new(seed, "init"), &Device::Cpu).unwrap()
}

fn batch(n: usize, seed: u64) -> Tensor {
    let v = Rng::new(seed, "x").uniform_vec(n * 3072, 0.0, 1.0);
    Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
}

/// The state-dict keys of the de-facto PyTorch ResNet-20 (akamaster's resnet.py), written
/// out by hand rather than derived from our own code.
fn pytorch_keys() -> Vec<String> {
    let bn = |p: &str| {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .iter()
        .map(|s| format!("{p}.{s}"))
        .collect::<Vec<_>>()
    };
    let mut k = vec!["conv1.weight".to_string()];
    k.extend(bn("bn1"));
    for l in 1..=3 {
        for b in 0..3 {
            k.push(format!("layer{l}.{b}.conv1.weight"));
            k.extend(bn(&format!("layer{l}.{b}.bn1")));
            k.push(format!("layer{l}.{b}.conv2.weight"));
            k.extend(bn(&format!("layer{l}.{b}.bn2")));
        }
    }
    k.push("linear.weight".into());
    k.push("linear.bias".into());
    k.sort();
    k
}

#[test]
fn parameter_count_names_and_layouts_are_pytorchs() {
    let m = model(0);
    assert_eq!(m.num_parameters(), 269_722);
    assert_eq!(NUM_PARAMETERS, 269_722);
    let trainable: usize = m.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(trainable, 269_722);
    let sd = checkpoint::state_dict(&m).unwrap();
    let keys: Vec<String> = sd.keys().cloned().collect();
    assert_eq!(keys, pytorch_keys());
    assert_eq!(keys.len(), 116);
    let shape = |k: &str| sd[k].dims().to_vec();
    assert_eq!(shape("conv1.weight"), vec![16, 3, 3, 3]);
    assert_eq!(shape("layer2.0.conv1.weight"), vec![32, 16, 3, 3]);
    assert_eq!(shape("layer3.2.conv2.weight"), vec![64, 64, 3, 3]);
    assert_eq!(shape("linear.weight"), vec![10, 64]);
    assert_eq!(sd["bn1.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(sd["bn1.num_batches_tracked"].rank(), 0);
}

#[test]
fn init_is_seeded_and_kaiming_scaled() {
    let a = model(7);
    let b = model(7);
    let c = model(8);
    let w = |m: &ResNet20| {
        m.tensor("layer3.1.conv1.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(w(&a), w(&b));
    assert_ne!(w(&a), w(&c));
    // Kaiming normal, fan-in 64·9: std = sqrt(2/576) ≈ 0.0589.
    let v = w(&a);
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - 0.0589).abs() < 0.002, "std {std}");
}

#[test]
fn forward_modes_and_batchnorm_statistics() {
    let m = model(1);
    let x = batch(4, 1);
    let e1 = m.forward(&x, false).unwrap();
    let e2 = m.forward(&x, false).unwrap();
    assert_eq!(e1.dims(), &[4, 10]);
    assert_eq!(
        e1.to_vec2::<f32>().unwrap(),
        e2.to_vec2::<f32>().unwrap(),
        "eval mode is deterministic"
    );
    let rm0 = m
        .tensor("bn1.running_mean")
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(rm0.iter().all(|&v| v == 0.0));
    m.forward(&x, true).unwrap();
    let rm1 = m
        .tensor("bn1.running_mean")
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        rm1.iter().any(|&v| v != 0.0),
        "training mode updates running stats"
    );
    assert_eq!(m.num_batches_tracked(), 1);
    // Eval mode does not.
    m.forward(&x, false).unwrap();
    assert_eq!(m.num_batches_tracked(), 1);
    assert_eq!(
        m.tensor("bn1.running_mean")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        rm1
    );
    // A wrong input shape is a clear error.
    let bad = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let msg = m.forward(&bad, false).unwrap_err().to_string();
    assert!(msg.contains("3×32×32"), "{msg}");
}

#[test]
fn frozen_view_gives_input_gradients_only_and_sees_updates() {
    let m = model(2);
    let f = m.frozen();
    let x = Var::from_tensor(&batch(2, 2)).unwrap();
    let loss = f
        .forward_t(x.as_tensor(), false)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    for (name, v) in m.trainable_vars() {
        assert!(g.get(v.as_tensor()).is_none(), "{name} got a gradient");
    }
    // An in-place update of the trainable model shows through the frozen view.
    let (_, v) = m
        .trainable_vars()
        .into_iter()
        .find(|(n, _)| n == "linear.bias")
        .unwrap();
    v.set(&Tensor::ones(10, DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let fb = f.tensor("linear.bias").unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(fb, vec![1.0; 10]);
}

#[test]
fn option_a_shortcut_subsamples_and_zero_pads() {
    let x = Tensor::arange(0f32, 2.0 * 16.0 * 4.0 * 4.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 16, 4, 4))
        .unwrap();
    let y = option_a_shortcut(&x, 32).unwrap();
    assert_eq!(y.dims(), &[2, 32, 2, 2]);
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let at = |b: usize, c: usize, i: usize, j: usize| yv[((b * 32 + c) * 2 + i) * 2 + j];
    // Channels 0..8 and 24..32 are zero; channel 8+c is input channel c at (2i, 2j).
    for b in 0..2 {
        for c in 0..32 {
            for i in 0..2 {
                for j in 0..2 {
                    let expect = if (8..24).contains(&c) {
                        (((b * 16 + (c - 8)) * 4 + 2 * i) * 4 + 2 * j) as f32
                    } else {
                        0.0
                    };
                    assert_eq!(at(b, c, i, j), expect);
                }
            }
        }
    }
}

#[test]
fn option_a_shortcut_gradient_goes_back_to_the_sampled_pixels() {
    // 6 input channels to 11: 2 zero channels before, 3 after (an odd split).
    let (n, c, planes, h, w) = (2, 6, 11, 6, 8);
    let x = Tensor::from_vec(
        Rng::new(5, "x").uniform_vec(n * c * h * w, -1.0, 1.0),
        (n, c, h, w),
        &Device::Cpu,
    )
    .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let y = option_a_shortcut(x.as_tensor(), planes).unwrap();
    assert_eq!(y.dims(), &[n, planes, h / 2, w / 2]);
    let r = Tensor::from_vec(
        Rng::new(6, "r").uniform_vec(y.elem_count(), -1.0, 1.0),
        y.dims(),
        &Device::Cpu,
    )
    .unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    let dx = dx.to_vec1::<f32>().unwrap();
    let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for b in 0..n {
        for ci in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let expect = if i % 2 == 0 && j % 2 == 0 {
                        rv[((b * planes + 2 + ci) * (h / 2) + i / 2) * (w / 2) + j / 2]
                    } else {
                        0.0
                    };
                    assert_eq!(dx[((b * c + ci) * h + i) * w + j], expect);
                }
            }
        }
    }
    // Fewer output channels than input channels, or an odd size: an error, not a panic.
    assert!(option_a_shortcut(x.as_tensor(), c - 1).is_err());
    let odd = x.as_tensor().narrow(2, 0, h - 1).unwrap();
    assert!(option_a_shortcut(&odd, planes).is_err());
}

#[test]
fn checkpoint_round_trip_is_exact_and_atomic() {
    let m = model(3);
    m.forward(&batch(8, 3), true).unwrap();
    let dir = tempdir();
    let p = dir.path().join("sub/model.safetensors");
    let mut man = Manifest::new("checkpoint", &Device::Cpu);
    man.seed = Some(3);
    checkpoint::save(&m, &p, &man).unwrap();
    let names: Vec<String> = std::fs::read_dir(p.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    let back = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false).unwrap();
    for (k, t) in m.tensors() {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = back
            .tensor(k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{k}");
    }
    assert_eq!(back.num_batches_tracked(), 1);
    let x = batch(3, 4);
    assert_eq!(
        m.forward(&x, false).unwrap().to_vec2::<f32>().unwrap(),
        back.forward(&x, false).unwrap().to_vec2::<f32>().unwrap()
    );
    let mb = checkpoint::load_manifest(&p).unwrap().unwrap();
    assert_eq!(mb.seed, Some(3));
    assert_eq!(mb.code.name, "quant-robust");
}

/// The same tensors and metadata give the same checkpoint bytes every time (the metadata
/// is written sorted, not in a hash map's order), and they read back.
#[test]
fn a_checkpoint_is_the_same_bytes_every_time() {
    let m = model(4);
    let sd = checkpoint::state_dict(&m).unwrap();
    let bytes = || {
        let meta: std::collections::HashMap<String, String> =
            ["seam", "format", "quant", "a", "zz"]
                .iter()
                .map(|k| (k.to_string(), format!("value of {k}")))
                .collect();
        checkpoint::to_safetensors_bytes(&sd, &meta).unwrap()
    };
    let first = bytes();
    for _ in 0..8 {
        assert!(bytes() == first, "two serializations differ");
    }
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
    assert!(
        header.starts_with(r#"{"__metadata__":{"a":"value of a","format":"value of format","quant":"value of quant","seam":"value of seam","zz":"value of zz"},"#),
        "{header}"
    );
    let back = safetensors::SafeTensors::deserialize(&first).unwrap();
    assert_eq!(back.len(), sd.len());
}

#[test]
fn wrong_checkpoints_are_named_errors() {
    let m = model(4);
    let dir = tempdir();
    let mut sd: BTreeMap<String, Tensor> = checkpoint::state_dict(&m).unwrap();
    sd.insert(
        "layer2.1.conv2.weight".into(),
        Tensor::zeros((32, 16, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.path().join("bad.safetensors");
    let bytes = checkpoint::to_safetensors_bytes(&sd, &Default::default()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    let e = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false)
        .err()
        .unwrap();
    assert!(matches!(e, Error::Checkpoint { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("layer2.1.conv2.weight") && msg.contains("[32, 16, 3, 3]"),
        "{msg}"
    );
    let mut f = checkpoint::state_dict(&m).unwrap();
    f.remove("linear.bias");
    f.retain(|k, _| !k.ends_with("num_batches_tracked"));
    let msg = check_tensors(&f).unwrap_err().to_string();
    assert!(
        msg.contains("linear.bias") && msg.contains("missing"),
        "{msg}"
    );
    std::fs::write(&p, b"not safetensors").unwrap();
    let msg = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
}

/// Checkpoints whose numbers cannot be weights are refused, naming the tensor: one NaN, one
/// Inf, integer storage (a loader that converts I64 to f32 would give a model of rounded
/// numbers), a negative BatchNorm variance. Each of these used to evaluate to an accuracy.
#[test]
fn checkpoints_with_impossible_numbers_are_refused() {
    let m = model(4);
    let dir = tempdir();
    let p = dir.path().join("bad.safetensors");
    let with = |name: &str, t: Tensor| {
        let mut sd: BTreeMap<String, Tensor> = checkpoint::state_dict(&m).unwrap();
        sd.insert(name.into(), t);
        std::fs::write(
            &p,
            checkpoint::to_safetensors_bytes(&sd, &Default::default()).unwrap(),
        )
        .unwrap();
        quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let sd = checkpoint::state_dict(&m).unwrap();
    let poke = |name: &str, v: f32| -> Tensor {
        let t = &sd[name];
        let mut x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mid = x.len() / 2;
        x[mid] = v;
        Tensor::from_vec(x, t.shape(), &Device::Cpu).unwrap()
    };
    for (name, t, says) in [
        (
            "layer1.0.conv1.weight",
            poke("layer1.0.conv1.weight", f32::NAN),
            "NaN",
        ),
        ("linear.weight", poke("linear.weight", f32::INFINITY), "inf"),
        (
            "layer3.2.bn2.running_var",
            poke("layer3.2.bn2.running_var", -1.0),
            "negative",
        ),
        (
            "conv1.weight",
            sd["conv1.weight"].to_dtype(DType::I64).unwrap(),
            "I64",
        ),
    ] {
        let msg = with(name, t);
        assert!(msg.contains(name) && msg.contains(says), "{name}: {msg:?}");
    }
    // The unmodified state loads.
    std::fs::write(
        &p,
        checkpoint::to_safetensors_bytes(&sd, &Default::default()).unwrap(),
    )
    .unwrap();
    assert!(quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false).is_ok());
}

/// A quantized checkpoint's quantizer metadata: the first format (no version) loads, an
/// unknown version, an unknown field or a non-finite range is refused with the file's name.
#[test]
fn quantizer_metadata_is_versioned_and_checked() {
    let m = model(4);
    let dir = tempdir();
    let p = dir.path().join("q.safetensors");
    let sd = checkpoint::state_dict(&m).unwrap();
    let with_quant = |q: &str| {
        let mut meta = std::collections::HashMap::new();
        meta.insert("quant".to_string(), q.to_string());
        std::fs::write(&p, checkpoint::to_safetensors_bytes(&sd, &meta).unwrap()).unwrap();
        quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let cfg = r#""config":{"weight_bits":4,"activation_bits":4,"first_last_bits":8}"#;
    let first = format!(r#"{{{cfg},"ranges":{{"layer1.0.conv1":2.5}}}}"#);
    with_quant(&first).expect("the first format (no version) loads");
    for (q, says) in [
        (format!(r#"{{"version":2,{cfg},"ranges":{{}}}}"#), "version"),
        (
            format!(r#"{{"version":1,"extra":0,{cfg},"ranges":{{}}}}"#),
            "extra",
        ),
        (
            format!(r#"{{"version":1,{cfg},"ranges":{{"layer1.0.conv1":-1.0}}}}"#),
            "range",
        ),
    ] {
        let e = with_quant(&q).expect_err(&q);
        assert!(e.contains("q.safetensors") && e.contains(says), "{q}: {e}");
    }
}

#[test]
fn batchnorm_folding_equals_conv_then_batchnorm() {
    use quant_robust::model::bn_fold::fold;
    let m = model(5);
    // Non-trivial running statistics and affine parameters.
    for s in 0..3 {
        m.forward(&batch(16, 10 + s), true).unwrap();
    }
    let x = batch(4, 20);
    let r = |shape: &[usize], seed: u64, lo: f32, hi: f32| {
        Tensor::from_vec(
            Rng::new(seed, "bn").uniform_vec(shape.iter().product(), lo, hi),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    let w = m.tensor("conv1.weight").unwrap();
    let (gamma, beta) = (r(&[16], 1, 0.5, 1.5), r(&[16], 2, -0.5, 0.5));
    let (mean, var) = (r(&[16], 3, -0.2, 0.2), r(&[16], 4, 0.05, 2.0));
    let y = x.conv2d(w, 1, 1, 1, 1).unwrap();
    let k = (&var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
    let reference = y
        .broadcast_sub(&mean.reshape((1, 16, 1, 1)).unwrap())
        .unwrap()
        .broadcast_mul(&k.mul(&gamma).unwrap().reshape((1, 16, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape((1, 16, 1, 1)).unwrap())
        .unwrap();
    let (wf, bf) = fold(w, &gamma, &beta, &mean, &var, 1e-5).unwrap();
    let folded = x
        .conv2d(&wf, 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&bf.reshape((1, 16, 1, 1)).unwrap())
        .unwrap();
    let (d, scale) = crate::common::max_diff_and_scale(&folded, &reference);
    assert!(d <= 1e-5 * scale.max(1.0));
}

#[test]
fn batch_norm_reestimation_averages_batch_statistics_and_forgets_the_old_ones() {
    use quant_robust::data::batch::DeviceData;
    let d = DeviceData::new(&crate::common::sample().train.take(96), &Device::Cpu).unwrap();
    let (a, _) = d.range(0, 48).unwrap();
    let (b, _) = d.range(48, 48).unwrap();
    let stats = |m: &ResNet20| -> Vec<f32> {
        [
            "bn1.running_mean",
            "layer2.0.bn2.running_var",
            "layer3.2.bn1.running_mean",
        ]
        .iter()
        .flat_map(|n| m.tensor(n).unwrap().to_vec1::<f32>().unwrap())
        .collect()
    };
    let fresh = || ResNet20::init(&mut Rng::new(5, "init"), &Device::Cpu).unwrap();
    // Old statistics do not matter: a model trained one step first ends equal.
    let m1 = fresh();
    let m2 = fresh();
    m2.forward(&b, true).unwrap();
    m1.reestimate_batch_norm(&[a.clone(), b.clone()]).unwrap();
    m2.reestimate_batch_norm(&[a.clone(), b.clone()]).unwrap();
    let (s1, s2) = (stats(&m1), stats(&m2));
    for (x, y) in s1.iter().zip(&s2) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
    }
    // Two batches: the average of each batch's statistics.
    let ma = fresh();
    ma.reestimate_batch_norm(std::slice::from_ref(&a)).unwrap();
    let mb = fresh();
    mb.reestimate_batch_norm(std::slice::from_ref(&b)).unwrap();
    for ((x, ya), yb) in s1.iter().zip(stats(&ma)).zip(stats(&mb)) {
        let avg = 0.5 * (ya + yb);
        assert!((x - avg).abs() <= 1e-4 * (1.0 + avg.abs()), "{x} vs {avg}");
    }
    // A frozen (non-trainable) model is refused with a clear error.
    let e = fresh()
        .frozen()
        .reestimate_batch_norm(&[a])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not trainable"), "{e}");
}

/// ResNet-20's evaluation forward pass written with candle's own ops only (conv2d, BatchNorm
/// as running-statistics arithmetic, ReLU, option-A shortcut, pooling, linear): the reference
/// for the folded, fused CPU path.
fn reference_eval_forward(m: &ResNet20, x: &Tensor) -> Tensor {
    use quant_robust::model::resnet20::{blocks, BN_EPS, CIFAR10_MEAN, CIFAR10_STD};
    let t = |n: &str| m.tensor(n).unwrap().clone();
    let conv = |x: &Tensor, layer: &str, stride: usize| {
        x.conv2d(&t(&format!("{layer}.weight")), 1, stride, 1, 1)
            .unwrap()
    };
    let bn = |x: &Tensor, name: &str| {
        let c = x.dim(1).unwrap();
        let p = |s: &str| t(&format!("{name}.{s}")).reshape((1, c, 1, 1)).unwrap();
        let sd = (p("running_var") + BN_EPS).unwrap().sqrt().unwrap();
        x.broadcast_sub(&p("running_mean"))
            .unwrap()
            .broadcast_div(&sd)
            .unwrap()
            .broadcast_mul(&p("weight"))
            .unwrap()
            .broadcast_add(&p("bias"))
            .unwrap()
    };
    let dev = x.device();
    let mean = Tensor::from_slice(&CIFAR10_MEAN, (1, 3, 1, 1), dev).unwrap();
    let std = Tensor::from_slice(&CIFAR10_STD, (1, 3, 1, 1), dev).unwrap();
    let x = x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
    let mut x = bn(&conv(&x, "conv1", 1), "bn1").relu().unwrap();
    for (name, i, o, s) in blocks() {
        let out = bn(
            &conv(&x, &format!("{name}.conv1"), s),
            &format!("{name}.bn1"),
        )
        .relu()
        .unwrap();
        let out = bn(
            &conv(&out, &format!("{name}.conv2"), 1),
            &format!("{name}.bn2"),
        );
        let short = if s != 1 || i != o {
            quant_robust::model::resnet20::option_a_shortcut(&x, o).unwrap()
        } else {
            x.clone()
        };
        x = (out + short).unwrap().relu().unwrap();
    }
    let pooled = x.mean((2, 3)).unwrap();
    pooled
        .matmul(&t("linear.weight").t().unwrap())
        .unwrap()
        .broadcast_add(&t("linear.bias"))
        .unwrap()
}

#[test]
fn evaluation_forward_equals_candles_reference_ops() {
    // Running statistics and affine parameters away from their initial 0/1, so that the
    // BatchNorm folded into the convolutions has something to fold.
    let m = model(3);
    for s in 0..3 {
        m.forward(&batch(16, 10 + s), true).unwrap();
    }
    let mut state = m.tensors().clone();
    let mut rng = quant_robust::rng::Rng::new(5, "bn-params");
    for (k, v) in state.iter_mut() {
        if k.contains("bn") && (k.ends_with(".weight") || k.ends_with(".bias")) {
            let n = v.elem_count();
            let r = Tensor::from_vec(rng.uniform_vec(n, 0.5, 1.5), n, &Device::Cpu).unwrap();
            *v = (&*v * &r).unwrap().broadcast_add(&r).unwrap();
        }
    }
    let m = ResNet20::from_tensors(state, m.num_batches_tracked(), &Device::Cpu, false).unwrap();
    let x = batch(5, 4);
    let ours = m.forward(&x, false).unwrap();
    let reference = reference_eval_forward(&m, &x);
    let (d, scale) = crate::common::max_diff_and_scale(&ours, &reference);
    assert!(
        d <= 1e-4 * scale.max(1.0),
        "logits differ by {d} (scale {scale})"
    );
}

/// A valid checkpoint's bytes, without metadata (so every header byte is structure).
fn valid_checkpoint_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let sd = checkpoint::state_dict(&model(5)).unwrap();
        checkpoint::to_safetensors_bytes(&sd, &Default::default()).unwrap()
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// A valid checkpoint truncated anywhere, with one byte of its header changed (but for
    /// one JSON whitespace character into another), or with one weight set to NaN or
    /// infinity: refused with an error naming the file. Any byte of its tensor data changed:
    /// never a panic (a weight that is still a finite float is a different, valid model).
    #[test]
    fn mutated_checkpoint_bytes_never_panic_and_damage_is_refused(
        kind in 0u8..4,
        pos in 0.0f64..1.0,
        flip in 1u8..=255,
    ) {
        let good = valid_checkpoint_bytes();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let at = |lo: usize, hi: usize| (lo + (pos * (hi - lo) as f64) as usize).min(hi - 1);
        let mut b = good.to_vec();
        let must_fail = match kind {
            0 => {
                b.truncate(at(0, good.len()));
                true
            }
            1 => {
                let i = at(0, header_end);
                let ws = |c: u8| b" \t\n\r".contains(&c);
                let (old, new) = (b[i], b[i] ^ flip);
                b[i] = new;
                !(i >= 8 && ws(old) && ws(new))
            }
            2 => {
                let k = header_end + 4 * at(0, (good.len() - header_end) / 4);
                let v = if flip % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
                b[k..k + 4].copy_from_slice(&v.to_le_bytes());
                true
            }
            _ => {
                let i = at(header_end, good.len());
                b[i] ^= flip;
                false
            }
        };
        let dir = tempdir();
        let p = dir.path().join("mutated.safetensors");
        std::fs::write(&p, &b).unwrap();
        let r = quant_robust::quant::load_checkpoint(&p, &Device::Cpu, false);
        if must_fail {
            proptest::prop_assert!(r.is_err(), "accepted (kind {}, pos {}, flip {})", kind, pos, flip);
        }
        if let Err(e) = r {
            proptest::prop_assert!(e.to_string().contains("mutated.safetensors"), "{}", e);
        }
    }
}
