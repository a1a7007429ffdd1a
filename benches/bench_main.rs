//! CPU benchmarks of the operations that dominate the study: the evaluation forward pass,
//! one attack step (forward + input gradient), one PGD step (with projection) and one
//! training step and one QAT (PACT W4A4) step, ResNet-20 at batch 128, and the evaluation
//! forward pass at batch 1000, reported as images/s (criterion's element throughput);
//! AutoAttack's stages, in image-iterations/s; and the quantizers, in elements/s.
//!
//! `cargo bench` measures; `cargo bench -- --test` runs each once (the CI smoke run).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};
use quant_robust::attack::pgd::Pgd;
use quant_robust::attack::{cross_entropy, input_gradient, Attack, Norm};
use quant_robust::model::ResNet20;
use quant_robust::quant::uniform::{quantize_activation, quantize_weight};
use quant_robust::quant::GradientMode;
use quant_robust::rng::Rng;
use quant_robust::train::{Sgd, SgdConfig};

const BATCH: usize = 128;

fn inputs(dev: &Device) -> (Tensor, Tensor) {
    inputs_n(dev, BATCH)
}

fn inputs_n(dev: &Device, n: usize) -> (Tensor, Tensor) {
    let mut rng = Rng::new(0, "bench");
    let x =
        Tensor::from_vec(rng.uniform_vec(n * 3072, 0.0, 1.0), (n, 3, 32, 32), dev).expect("input");
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    (x, Tensor::from_vec(y, n, dev).expect("labels"))
}

fn cpu(c: &mut Criterion) {
    let dev = Device::Cpu;
    let model = ResNet20::init(&mut Rng::new(0, "init"), &dev).expect("model");
    let frozen = model.frozen();
    let (x, y) = inputs(&dev);
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("eval_forward_b128", |b| {
        b.iter(|| frozen.forward(&x, false).expect("forward"))
    });
    g.bench_function("attack_step_b128", |b| {
        b.iter(|| input_gradient(&frozen, &x, &y).expect("gradient"))
    });
    let one_step = Pgd {
        steps: 1,
        random_start: false,
        ..Pgd::default()
    };
    g.bench_function("pgd_step_b128", |b| {
        b.iter(|| {
            one_step
                .perturb(
                    &frozen,
                    &x,
                    &y,
                    Norm::Linf,
                    8.0 / 255.0,
                    &mut Rng::new(0, "b"),
                )
                .expect("pgd")
        })
    });
    let mut opt = Sgd::new(model.trainable_vars(), SgdConfig::default()).expect("sgd");
    g.bench_function("train_step_b128", |b| {
        b.iter(|| {
            let loss = cross_entropy(&model.forward(&x, true).expect("fwd"), &y).expect("loss");
            opt.step(&loss.backward().expect("backward"), 0.01)
                .expect("step");
        })
    });
    // QAT (PACT W4A4 activations, DoReFa W4 weights): one training step.
    let qat_model = {
        use quant_robust::quant::qat::{PactSeam, QatConfig};
        use quant_robust::quant::{
            seam::{CalibMethod, Calibration, UniformConfig},
            Bits,
        };
        let cal = std::sync::Arc::new(Calibration::new(CalibMethod::Max));
        model
            .frozen()
            .with_seam(cal.clone())
            .forward(&x, false)
            .expect("calibrate");
        let cfg = QatConfig {
            bits: UniformConfig::from(Bits::of(4, 4)),
            ..QatConfig::default()
        };
        let seam = std::sync::Arc::new(PactSeam::new(cfg, &cal.ranges(), &dev).expect("seam"));
        let m = ResNet20::init(&mut Rng::new(0, "init"), &dev).expect("model");
        m.with_seam(seam)
    };
    let mut qopt = Sgd::new(qat_model.trainable_vars(), SgdConfig::default()).expect("sgd");
    for (name, var, wd) in qat_model.seam().trainable() {
        qopt.add_var(name, var, wd);
    }
    g.bench_function("qat_w4a4_step_b128", |b| {
        b.iter(|| {
            let loss = cross_entropy(&qat_model.forward(&x, true).expect("fwd"), &y).expect("loss");
            qopt.step(&loss.backward().expect("backward"), 0.01)
                .expect("step");
        })
    });
    g.finish();
    let (x1000, _) = inputs_n(&dev, 1000);
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("eval_forward_b1000", |b| {
        b.iter(|| frozen.forward(&x1000, false).expect("forward"))
    });
    g.finish();
}

/// AutoAttack's stages on a batch of 128, in image-iterations/s (image-queries/s for Square):
/// a few iterations of each, with one target for the targeted stages. The labels are the
/// model's own predictions and ε is tiny, so no image stops early and every iteration costs
/// what it costs on a robust image: the cascade's time is then Σ over stages of images
/// attacked × iterations × targets / rate.
fn autoattack(c: &mut Criterion) {
    use quant_robust::attack::apgd::{Apgd, ApgdTargeted};
    use quant_robust::attack::fab::{Fab, FabTargeted};
    use quant_robust::attack::square::Square;
    let dev = Device::Cpu;
    let model = ResNet20::init(&mut Rng::new(0, "init"), &dev).expect("model");
    let frozen = model.frozen();
    let (x, _) = inputs(&dev);
    let y = frozen
        .forward(&x, false)
        .expect("forward")
        .argmax(candle_core::D::Minus1)
        .expect("labels");
    let iters = 4;
    let stages: Vec<(&str, usize, Box<dyn Attack>)> = vec![
        (
            "apgd_ce_iteration_b128",
            iters,
            Box::new(Apgd {
                iterations: iters,
                ..Apgd::default()
            }),
        ),
        (
            "apgd_t_iteration_b128",
            iters,
            Box::new(ApgdTargeted {
                apgd: Apgd {
                    iterations: iters,
                    ..Apgd::dlr()
                },
                targets: 1,
            }),
        ),
        (
            "fab_t_iteration_b128",
            iters,
            Box::new(FabTargeted {
                fab: Fab {
                    iterations: iters,
                    ..Fab::default()
                },
                targets: 1,
            }),
        ),
        (
            "square_query_b128",
            5 * iters,
            Box::new(Square {
                queries: 5 * iters,
                ..Square::default()
            }),
        ),
    ];
    let mut g = c.benchmark_group("autoattack");
    g.sample_size(10);
    for (name, per_image, attack) in &stages {
        g.throughput(Throughput::Elements((BATCH * per_image) as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                attack
                    .perturb(
                        &frozen,
                        &x,
                        &y,
                        Norm::Linf,
                        0.5 / 255.0,
                        &mut Rng::new(0, "aa"),
                    )
                    .expect("attack")
            })
        });
    }
    g.finish();
}

/// Quantizers, elements/s: per-channel 4-bit weights of a 64×64×3×3 conv, and 4-bit
/// activations of a 128×16×32×32 batch.
fn quantizers(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1, "bench-quant");
    let w = Tensor::from_vec(rng.normal_vec(64 * 64 * 9, 0.05), (64, 64, 3, 3), &dev).expect("w");
    let a = Tensor::from_vec(
        rng.uniform_vec(128 * 16 * 1024, 0.0, 4.0),
        (128, 16, 32, 32),
        &dev,
    )
    .expect("a");
    let mut g = c.benchmark_group("quant");
    g.sample_size(20);
    g.throughput(Throughput::Elements(w.elem_count() as u64));
    g.bench_function("uniform_w4_per_channel", |b| {
        b.iter(|| quantize_weight(&w, 4, true, GradientMode::Ste).expect("q"))
    });
    g.throughput(Throughput::Elements(a.elem_count() as u64));
    g.bench_function("uniform_a4", |b| {
        b.iter(|| quantize_activation(&a, 4, 4.0, GradientMode::Ste).expect("q"))
    });
    // PWLQ's breakpoint search for one layer: 64 output channels of 64·3·3 weights.
    let rows: Vec<Vec<f32>> = (0..64).map(|_| rng.normal_vec(576, 0.05)).collect();
    g.throughput(Throughput::Elements(64));
    g.bench_function("pwlq_search_layer_64x576", |b| {
        b.iter(|| {
            quant_robust::quant::pwlq::quantize_rows(
                &rows,
                4,
                quant_robust::quant::pwlq::Breakpoint::Search,
                false,
            )
            .expect("pwlq")
        })
    });
    g.finish();
}

/// The convolution kernels on ResNet-20's stride-1 shapes (the stem and each stage) at batch
/// 128 (forward only),
/// each path this machine runs, in FLOP/s (2 per multiply-add) as criterion's "elements".
fn convolutions(c: &mut Criterion) {
    use quant_robust::kernels::{conv2d_with, ConvPath, Isa};
    let dev = Device::Cpu;
    let mut rng = Rng::new(2, "bench-conv");
    let mut paths = vec![("im2col".to_string(), ConvPath::Im2col)];
    for (name, isa) in [("avx2", Isa::Avx2), ("avx512", Isa::Avx512)] {
        if isa.available() {
            paths.push((format!("direct_{name}"), ConvPath::Direct(isa)));
            paths.push((format!("winograd_{name}"), ConvPath::Winograd(isa)));
        }
    }
    let mut g = c.benchmark_group("conv");
    g.sample_size(10);
    for (stage, cin, ch, hw) in [
        ("stem", 3, 16, 32),
        ("stage1", 16, 16, 32),
        ("stage2", 32, 32, 16),
        ("stage3", 64, 64, 8),
    ] {
        let x = Tensor::from_vec(
            rng.uniform_vec(BATCH * cin * hw * hw, -1.0, 1.0),
            (BATCH, cin, hw, hw),
            &dev,
        )
        .expect("x");
        let w =
            Tensor::from_vec(rng.normal_vec(ch * cin * 9, 0.1), (ch, cin, 3, 3), &dev).expect("w");
        g.throughput(Throughput::Elements(
            (2 * BATCH * ch * cin * 9 * hw * hw) as u64,
        ));
        for (name, path) in &paths {
            g.bench_function(format!("{stage}_{name}_flop"), |b| {
                b.iter(|| conv2d_with(&x, &w, 1, 1, *path).expect("conv"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, cpu, autoattack, quantizers, convolutions);

fn main() {
    // As the CLI does at start (see `device::keep_freed_memory`): the numbers are the CLI's.
    quant_robust::device::keep_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
