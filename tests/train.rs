//! Training: the SGD update against hand-computed values, schedules, a short run whose loss
//! falls, resume equivalence (1 + 1 epochs = 2 epochs), PGD-AT, divergence.

use candle_core::{Device, Tensor, Var};
use quant_robust::attack::{pgd_linf, PgdConfig};
use quant_robust::data::batch::DeviceData;
use quant_robust::data::subset::{stratified, SubsetSize};
use quant_robust::rng::Rng;
use quant_robust::train::{Adversarial, LrSchedule, Sgd, SgdConfig, Silent, TrainConfig, Trainer};
use quant_robust::Error;

use crate::common::{sample, tempdir};

/// Two SGD steps on p = 1 with the gradient of L = 0.5·p (always 0.5), lr 0.1.
fn two_steps(cfg: SgdConfig) -> Vec<f32> {
    let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(vec![("p".into(), p.clone())], cfg).unwrap();
    let mut out = Vec::new();
    for _ in 0..2 {
        let loss = (p.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        out.push(p.as_tensor().to_vec1::<f32>().unwrap()[0]);
    }
    out
}

fn close(a: &[f32], b: &[f32]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn sgd_matches_hand_computed_updates() {
    // Nesterov, momentum 0.9, weight decay 0.1:
    //   d1 = 0.5 + 0.1·1 = 0.6, buf = 0.6, d = 0.6 + 0.9·0.6 = 1.14, p = 1 - 0.114 = 0.886
    //   d2 = 0.5 + 0.0886 = 0.5886, buf = 0.54 + 0.5886 = 1.1286,
    //   d = 0.5886 + 0.9·1.1286 = 1.60434, p = 0.886 - 0.160434 = 0.725566
    let nesterov = SgdConfig {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
        weight_decay: 0.1,
    };
    close(&two_steps(nesterov.clone()), &[0.886, 0.725566]);
    // The momentum buffers hold values, not the graph that produced them (a graph kept
    // alive per step grew memory without bound).
    let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(vec![("p".into(), p.clone())], nesterov.clone()).unwrap();
    let loss = (p.as_tensor() * 0.5).unwrap().sum_all().unwrap();
    opt.step(&loss.backward().unwrap(), 0.1).unwrap();
    assert!(opt.state().values().all(|b| !b.track_op()));
    // Plain momentum: p1 = 1 - 0.06 = 0.94; d2 = 0.594, buf = 1.134, p2 = 0.8266.
    let heavy_ball = SgdConfig {
        nesterov: false,
        ..nesterov.clone()
    };
    close(&two_steps(heavy_ball), &[0.94, 0.8266]);
    // Dampening 0.5 (plain momentum): buf2 = 0.54 + 0.5·0.594 = 0.837, p2 = 0.94 - 0.0837.
    let damp = SgdConfig {
        nesterov: false,
        dampening: 0.5,
        ..nesterov.clone()
    };
    close(&two_steps(damp), &[0.94, 0.8563]);
    // No momentum, no decay: p = 1 - 0.05 - 0.05.
    let plain = SgdConfig {
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    };
    close(&two_steps(plain), &[0.95, 0.9]);
    // Invalid settings are named.
    let bad = SgdConfig {
        momentum: 1.5,
        ..SgdConfig::default()
    };
    let msg = bad.validate().unwrap_err().to_string();
    assert!(msg.contains("sgd.momentum") && msg.contains("1.5"), "{msg}");
}

#[test]
fn schedules_hit_their_defining_points() {
    let oc = LrSchedule::one_cycle();
    assert!((oc.lr(0.1, 0, 100) - 0.004).abs() < 1e-12);
    assert!((oc.lr(0.1, 25, 100) - 0.1).abs() < 1e-12);
    assert!((oc.lr(0.1, 100, 100) - 0.004 / 1e4).abs() < 1e-12);
    let mid_up = oc.lr(0.1, 12, 100);
    assert!(mid_up > 0.004 && mid_up < 0.1);
    let c = LrSchedule::Cosine;
    assert_eq!(c.lr(0.2, 0, 10), 0.2);
    assert!((c.lr(0.2, 5, 10) - 0.1).abs() < 1e-12);
    assert!(c.lr(0.2, 10, 10).abs() < 1e-12);
    let ms = LrSchedule::multistep();
    assert_eq!(ms.lr(0.1, 49, 100), 0.1);
    assert!((ms.lr(0.1, 50, 100) - 0.01).abs() < 1e-12);
    assert!((ms.lr(0.1, 80, 100) - 0.001).abs() < 1e-12);
    assert_eq!(LrSchedule::Constant.lr(0.3, 7, 10), 0.3);
    let bad = LrSchedule::MultiStep {
        milestones: vec![1.5],
        gamma: 0.1,
    };
    assert!(bad.validate().is_err());
}

fn tiny_config(epochs: usize, batch: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: batch,
        lr: 0.05,
        schedule: LrSchedule::Constant,
        eval_images: Some(50),
        eval_batch_size: 50,
        log_every: 2,
        seed: 11,
        ..TrainConfig::default()
    }
}

fn tiny_data(n: usize) -> (DeviceData, DeviceData) {
    let s = sample();
    let train = stratified(&s.train, SubsetSize::Count(n), &mut Rng::new(5, "sub")).unwrap();
    (
        DeviceData::new(&train, &Device::Cpu).unwrap(),
        DeviceData::new(&s.test, &Device::Cpu).unwrap(),
    )
}

#[test]
fn short_training_run_lowers_the_loss() {
    let (train, test) = tiny_data(128);
    let s = sample();
    let mut t = Trainer::new(tiny_config(3, 32), s.identity.clone(), 128, &Device::Cpu).unwrap();
    t.fit(&train, &test, None, &|| false, &mut Silent).unwrap();
    let h = &t.state.history;
    assert_eq!(h.len(), 3);
    assert!(
        h[2].train_loss < h[0].train_loss - 0.1,
        "loss did not fall: {:?}",
        h.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    assert!(h
        .iter()
        .all(|r| r.train_loss.is_finite() && r.test.total == 50));
    assert_eq!(t.state.step, 12);
}

#[test]
fn resume_gives_the_same_weights_as_an_uninterrupted_run() {
    let (train, test) = tiny_data(64);
    let s = sample();
    let mut whole = Trainer::new(tiny_config(2, 32), s.identity.clone(), 64, &Device::Cpu).unwrap();
    whole
        .fit(&train, &test, None, &|| false, &mut Silent)
        .unwrap();

    let dir = tempdir();
    let ck = dir.path().join("run.safetensors");
    let mut first = Trainer::new(tiny_config(1, 32), s.identity.clone(), 64, &Device::Cpu).unwrap();
    first
        .fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap();
    drop(first);
    let mut second = Trainer::resume(&ck, Some(2), &Device::Cpu).unwrap();
    assert_eq!(second.state.epoch, 1);
    second
        .fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap();
    assert_eq!(second.state.step, whole.state.step);
    for (k, a) in whole.model.tensors() {
        let b = second.model.tensor(k).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            d.to_scalar::<f32>().unwrap(),
            0.0,
            "{k} differs after resume"
        );
    }
    assert_eq!(
        whole.state.history[1].train_loss,
        second.state.history[1].train_loss
    );
    // The checkpoint on disk is the final one, with its manifest.
    let m = quant_robust::model::checkpoint::load_manifest(&ck)
        .unwrap()
        .unwrap();
    assert_eq!(m.metrics["epochs_done"], 2.0);
    assert_eq!(m.data.unwrap().name, "cifar10-jpeg-sample");
}

/// A process killed after its last resume point was written but before its weights were
/// (or while they were: the write is atomic, so the old file stays) leaves the weights of
/// the epoch before; resuming that finished run writes the final weights.
#[test]
fn resuming_a_finished_run_rewrites_weights_older_than_its_resume_point() {
    let (train, test) = tiny_data(64);
    let s = sample();
    let dir = tempdir();
    let ck = dir.path().join("run.safetensors");
    let mut t = Trainer::new(tiny_config(1, 32), s.identity.clone(), 64, &Device::Cpu).unwrap();
    t.fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap();
    let older = std::fs::read(&ck).unwrap();
    let mut t = Trainer::resume(&ck, Some(2), &Device::Cpu).unwrap();
    t.fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap();
    let last = std::fs::read(&ck).unwrap();
    assert_ne!(older, last, "the second epoch moved no weight");
    // The kill's window: the resume point says 2 of 2 epochs, the weights are epoch 1's.
    std::fs::write(&ck, &older).unwrap();
    let mut t = Trainer::resume(&ck, None, &Device::Cpu).unwrap();
    assert_eq!(t.state.epoch, 2);
    assert!(t
        .fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap());
    let a = quant_robust::model::checkpoint::read_safetensors(&ck).unwrap();
    let b = {
        std::fs::write(dir.path().join("last.safetensors"), &last).unwrap();
        quant_robust::model::checkpoint::read_safetensors(&dir.path().join("last.safetensors"))
            .unwrap()
    };
    assert_eq!(a.len(), b.len());
    for (k, x) in &a {
        let f = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let d = (f(x) - f(&b[k])).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            d.to_scalar::<f64>().unwrap(),
            0.0,
            "{k}: not the final weights"
        );
    }
}

/// QAT stopped after one epoch and resumed gives the bits of an uninterrupted run: latent
/// weights, momentum (α's included), α and its history all travel in the resume point.
#[test]
fn qat_resume_gives_the_same_model_as_an_uninterrupted_run() {
    use quant_robust::quant::qat::QatConfig;
    use quant_robust::quant::{seam::UniformConfig, Bits};
    use quant_robust::train::qat::{can_resume, fine_tune, QatStart};
    let (train, test) = tiny_data(64);
    let s = sample();
    let calib = s.train.take(32);
    // QAT trains its initial model's variables in place: each run gets its own.
    let new_init =
        || quant_robust::model::ResNet20::init(&mut Rng::new(3, "init"), &Device::Cpu).unwrap();
    let (init_a, init_b) = (new_init(), new_init());
    let qcfg = QatConfig {
        bits: UniformConfig::from(Bits::of(4, 4)),
        bn_reestimate_batches: 1,
        ..QatConfig::default()
    };
    let tcfg = tiny_config(2, 32);
    let run = |start: QatStart<'_>, latent: Option<&std::path::Path>, stop: &dyn Fn() -> bool| {
        fine_tune(
            start,
            &qcfg,
            tcfg.clone(),
            || DeviceData::new(&calib, &Device::Cpu),
            &train,
            &test,
            s.identity.clone(),
            latent,
            stop,
            &mut Silent,
            &Device::Cpu,
        )
        .unwrap()
    };
    let fresh = |model| QatStart::Fresh {
        model,
        init: "random".into(),
    };
    let whole = run(fresh(&init_a), None, &|| false).unwrap();

    let dir = tempdir();
    let latent = dir.path().join("q.latent.safetensors");
    let epochs_done = std::cell::Cell::new(0);
    let stop_after_one = || {
        let done = epochs_done.get();
        epochs_done.set(done + 1);
        done >= 1
    };
    assert!(run(fresh(&init_b), Some(&latent), &stop_after_one).is_none());
    assert!(can_resume(&latent));
    let resumed = run(QatStart::Resume, Some(&latent), &|| false).unwrap();
    for (k, a) in whole.model.tensors() {
        let b = resumed.model.tensor(k).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            d.to_scalar::<f32>().unwrap(),
            0.0,
            "{k} differs after resume"
        );
    }
    assert_eq!(whole.alpha_per_epoch, resumed.alpha_per_epoch);
    assert_eq!(whole.alpha_per_epoch.len(), 3);
    let losses = |h: &[quant_robust::train::EpochRecord]| {
        h.iter().map(|r| (r.train_loss, r.test)).collect::<Vec<_>>()
    };
    assert_eq!(losses(&whole.history), losses(&resumed.history));
    assert_eq!(whole.test, resumed.test);

    // A resume point made with other settings is refused, naming the file.
    let other = TrainConfig {
        lr: 0.5,
        ..tcfg.clone()
    };
    let e = fine_tune(
        QatStart::Resume,
        &qcfg,
        other,
        || panic!("a resumed run draws no calibration images"),
        &train,
        &test,
        s.identity.clone(),
        Some(&latent),
        &|| false,
        &mut Silent,
        &Device::Cpu,
    )
    .err()
    .expect("other settings must be refused");
    assert!(e.to_string().contains("other QAT settings"), "{e}");
    // A plain training run does not take a QAT resume point.
    let e = Trainer::resume(&latent, None, &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("resume it with `qat`"), "{e}");
}

#[test]
fn divergence_stops_training_and_keeps_the_last_good_checkpoint() {
    let (train, test) = tiny_data(64);
    let s = sample();
    let dir = tempdir();
    let ck = dir.path().join("run.safetensors");
    let mut t = Trainer::new(tiny_config(3, 32), s.identity.clone(), 64, &Device::Cpu).unwrap();
    t.run_epoch(&train, &test, &mut Silent).unwrap();
    t.save(&ck).unwrap();
    let before = std::fs::read(&ck).unwrap();
    t.state.config.lr = 1e30;
    let e = t
        .fit(&train, &test, Some(&ck), &|| false, &mut Silent)
        .unwrap_err();
    assert!(matches!(e, Error::Diverged { epoch: 2, .. }), "{e}");
    assert!(e.to_string().contains("last good checkpoint"));
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        before,
        "checkpoint was overwritten"
    );
    let r = Trainer::resume(&ck, None, &Device::Cpu).unwrap();
    assert_eq!(r.state.epoch, 1);
}

#[test]
fn pgd_adversarial_training_runs_and_pgd_stays_in_the_ball() {
    let (train, test) = tiny_data(32);
    let s = sample();
    let cfg = TrainConfig {
        adversarial: Adversarial::Pgd(PgdConfig {
            steps: 2,
            ..PgdConfig::default()
        }),
        eval_adv_images: 20,
        eval_images: Some(20),
        eval_batch_size: 20,
        ..tiny_config(1, 16)
    };
    let mut t = Trainer::new(cfg, s.identity.clone(), 32, &Device::Cpu).unwrap();
    let r = t.run_epoch(&train, &test, &mut Silent).unwrap();
    let pgd = r.test_pgd.expect("AT reports PGD accuracy");
    // Both evaluations run on the same 20 seeded images (same count, same seed), and an
    // image misclassified clean counts as broken: robust accuracy cannot exceed clean.
    assert_eq!((pgd.total, r.test.total), (20, 20));
    assert!(pgd.correct <= r.test.correct, "{pgd:?} vs {:?}", r.test);

    let (x, y) = test.batch(&[0, 150, 300, 450]).unwrap();
    let cfg = PgdConfig::default();
    let adv = pgd_linf(&t.model.frozen(), &x, &y, &cfg, &mut Rng::new(0, "pgd")).unwrap();
    let d = (&adv - &x).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() <= (8.0 / 255.0) as f32 + 1e-6);
    assert!(adv.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0);
    assert!(adv.max_all().unwrap().to_scalar::<f32>().unwrap() <= 1.0);
    let zero = PgdConfig { eps: 0.0, ..cfg };
    let same = pgd_linf(&t.model.frozen(), &x, &y, &zero, &mut Rng::new(0, "pgd")).unwrap();
    let d0 = (&same - &x).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d0.to_scalar::<f32>().unwrap(), 0.0);
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}

#[test]
fn invalid_training_settings_are_named() {
    let s = sample();
    for (cfg, name) in [
        (
            TrainConfig {
                epochs: 0,
                ..TrainConfig::default()
            },
            "epochs",
        ),
        (
            TrainConfig {
                batch_size: 1,
                ..TrainConfig::default()
            },
            "batch_size",
        ),
        (
            TrainConfig {
                lr: -1.0,
                ..TrainConfig::default()
            },
            "lr",
        ),
        (
            TrainConfig {
                adversarial: Adversarial::Pgd(PgdConfig {
                    eps: 8.0,
                    ..PgdConfig::default()
                }),
                ..TrainConfig::default()
            },
            "pgd.eps",
        ),
    ] {
        let msg = Trainer::new(cfg, s.identity.clone(), 10, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains(name), "{msg}");
    }
}

/// A training step's bits do not depend on the number of threads: the same weights after
/// two SGD steps (forward, backward through every convolution, update) with 1, 2 and 3
/// threads, at a batch that does not split evenly.
#[test]
fn training_steps_give_the_same_bits_on_any_number_of_threads() {
    use quant_robust::attack::cross_entropy;
    use quant_robust::model::ResNet20;
    let dev = Device::Cpu;
    let s = sample();
    let data = DeviceData::new(&s.train.take(37), &dev).unwrap();
    let idx: Vec<u32> = (0..37).collect();
    let (x, y) = data.batch(&idx).unwrap();
    let weights = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let model = ResNet20::init(&mut Rng::new(5, "init"), &dev).unwrap();
            let mut opt = Sgd::new(model.trainable_vars(), SgdConfig::default()).unwrap();
            for _ in 0..2 {
                let loss = cross_entropy(&model.forward(&x, true).unwrap(), &y).unwrap();
                opt.step(&loss.backward().unwrap(), 0.05).unwrap();
            }
            model
                .trainable_vars()
                .into_iter()
                .map(|(n, v)| {
                    (
                        n,
                        v.as_tensor()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let one = weights(1);
    let moved = one.iter().zip(
        ResNet20::init(&mut Rng::new(5, "init"), &dev)
            .unwrap()
            .trainable_vars(),
    );
    assert!(
        moved
            .filter(|((_, a), (_, v))| *a
                != v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap())
            .count()
            > 40,
        "the steps moved the weights"
    );
    for threads in [2, 3] {
        for ((n, a), (_, b)) in one.iter().zip(weights(threads)) {
            let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{n}: 1 thread and {threads} threads differ");
        }
    }
}
