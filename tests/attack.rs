//! Attacks: known answers on a tiny linear model, the ε-ball and [0, 1] invariants for
//! every attack, ε = 0, robust ≤ clean, APGD's schedule, DLR, Square, masking diagnostics.

use candle_core::{DType, Device, Tensor, D};
use proptest::prelude::*;
use quant_robust::attack::apgd::{Apgd, ApgdTargeted};
use quant_robust::attack::autoattack::{AutoAttack, Stage};
use quant_robust::attack::fab::{project_onto_hyperplane_linf, Fab, FabTargeted};
use quant_robust::attack::fgsm::Fgsm;
use quant_robust::attack::pgd::Pgd;
use quant_robust::attack::square::Square;
use quant_robust::attack::transfer::Transfer;
use quant_robust::attack::{loss_per_example, Attack, Loss, Norm};
use quant_robust::data::batch::DeviceData;
use quant_robust::eval::robust::{evaluate, evaluate_with, Hooks, RobustnessConfig, Unit};
use quant_robust::model::{Classifier, ResNet20};
use quant_robust::rng::Rng;

use crate::common::sample;

/// logits = W·q(x) + b over the flattened image; `quantize_input` rounds x to quarters first
/// (a step function: zero input gradient everywhere, a masked model).
struct Linear {
    w: Tensor,
    b: Tensor,
    quantize_input: bool,
}

impl Linear {
    fn new(seed: u64, quantize_input: bool) -> Self {
        let mut rng = Rng::new(seed, "linear");
        let w =
            Tensor::from_vec(rng.normal_vec(10 * 3072, 0.02), (10, 3072), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(rng.normal_vec(10, 0.1), 10, &Device::Cpu).unwrap();
        Linear {
            w,
            b,
            quantize_input,
        }
    }
}

impl Classifier for Linear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> quant_robust::Result<Tensor> {
        let x = if self.quantize_input {
            (x * 4.0)?.round()?.affine(0.25, 0.0)?
        } else {
            x.clone()
        };
        Ok(x.flatten_from(1)?
            .matmul(&self.w.t()?)?
            .broadcast_add(&self.b)?)
    }
}

fn images(n: usize, seed: u64, lo: f32, hi: f32) -> Tensor {
    let v = Rng::new(seed, "img").uniform_vec(n * 3072, lo, hi);
    Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
}

fn labels(n: usize) -> Tensor {
    Tensor::from_vec(
        (0..n as u32).map(|i| i % 10).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
}

/// The analytic input gradient of the cross-entropy of the linear model (f64, host).
fn linear_ce_gradient(m: &Linear, x: &Tensor, y: &[u32]) -> Vec<Vec<f64>> {
    let w = m.w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let logits = m
        .forward_t(x, false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    logits
        .iter()
        .zip(y)
        .map(|(z, &yi)| {
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            (0..3072)
                .map(|j| {
                    (0..10)
                        .map(|k| (e[k] / s - f64::from(u8::from(k as u32 == yi))) * w[k][j])
                        .sum()
                })
                .collect()
        })
        .collect()
}

#[test]
fn fgsm_equals_the_analytic_step_on_a_linear_model() {
    let m = Linear::new(1, false);
    let x = images(3, 1, 0.2, 0.8);
    let y = labels(3);
    let eps = 4.0 / 255.0;
    let adv = Fgsm
        .perturb(&m, &x, &y, Norm::Linf, eps, &mut Rng::new(0, "a"))
        .unwrap();
    let g = linear_ce_gradient(&m, &x, &y.to_vec1().unwrap());
    let xv = x.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let av = adv.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    for i in 0..3 {
        for j in 0..3072 {
            let expect = xv[i][j] as f64 + eps * g[i][j].signum();
            assert!((av[i][j] as f64 - expect).abs() < 1e-6, "({i},{j})");
        }
    }
}

#[test]
fn one_pgd_l2_step_moves_eps_along_the_normalized_gradient() {
    let m = Linear::new(2, false);
    let x = images(2, 2, 0.4, 0.6);
    let y = labels(2);
    let eps = 0.3;
    let one_step = Pgd {
        steps: 1,
        step_fraction: 1.0,
        restarts: 1,
        random_start: false,
    };
    let adv = one_step
        .perturb(&m, &x, &y, Norm::L2, eps, &mut Rng::new(0, "a"))
        .unwrap();
    let g = linear_ce_gradient(&m, &x, &y.to_vec1().unwrap());
    let xv = x.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let av = adv.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    for i in 0..2 {
        let norm = g[i].iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut dn = 0.0;
        for j in 0..3072 {
            let d = av[i][j] as f64 - xv[i][j] as f64;
            dn += d * d;
            assert!((d - eps * g[i][j] / norm).abs() < 1e-6, "({i},{j})");
        }
        assert!((dn.sqrt() - eps).abs() < 1e-4, "‖δ‖ = {}", dn.sqrt());
    }
}

fn all_attacks() -> Vec<Box<dyn Attack>> {
    vec![
        Box::new(Fgsm),
        Box::new(Pgd {
            steps: 3,
            restarts: 2,
            ..Pgd::default()
        }),
        Box::new(Apgd {
            iterations: 6,
            ..Apgd::default()
        }),
        Box::new(Apgd {
            iterations: 6,
            ..Apgd::dlr()
        }),
        Box::new(ApgdTargeted {
            apgd: Apgd {
                iterations: 4,
                ..Apgd::dlr()
            },
            targets: 3,
        }),
        Box::new(Fab {
            iterations: 5,
            restarts: 2,
            ..Fab::default()
        }),
        Box::new(FabTargeted {
            fab: Fab {
                iterations: 4,
                ..Fab::default()
            },
            targets: 2,
        }),
        Box::new(Square {
            queries: 30,
            ..Square::default()
        }),
        Box::new(small_autoattack(Stage::STANDARD.to_vec())),
        // A custom cascade without FAB, for L2 too.
        Box::new(small_autoattack(vec![
            Stage::ApgdCe,
            Stage::ApgdT,
            Stage::Square,
        ])),
        Box::new(Transfer {
            source: Box::new(Linear::new(9, false)),
            source_name: "linear-9".into(),
            pgd: Pgd {
                steps: 2,
                ..Pgd::default()
            },
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    /// Every attack's output stays in [0, 1] and in the ε-ball: L∞ max-abs ≤ ε + 1e-6;
    /// L2 norm ≤ ε·(1 + 1e-5) + 1e-6 (float rounding of the projection).
    #[test]
    fn outputs_stay_in_the_box_and_the_ball(
        seed in 0u64..10_000,
        eps_linf in 0.0f64..0.1,
        eps_l2 in 0.0f64..2.0,
        lo in 0.0f32..0.5,
    ) {
        let m = Linear::new(seed, false);
        let x = images(4, seed, lo, lo + 0.5);
        let y = labels(4);
        for a in all_attacks() {
            for (norm, eps) in [(Norm::Linf, eps_linf), (Norm::L2, eps_l2)] {
                if !a.supports(norm) {
                    continue;
                }
                let adv = a.perturb(&m, &x, &y, norm, eps, &mut Rng::new(seed, "p")).unwrap();
                let lo_v = adv.min_all().unwrap().to_scalar::<f32>().unwrap();
                let hi_v = adv.max_all().unwrap().to_scalar::<f32>().unwrap();
                prop_assert!(lo_v >= 0.0 && hi_v <= 1.0, "{} left [0, 1]", a.name());
                let d = (&adv - &x).unwrap();
                match norm {
                    Norm::Linf => {
                        let m = d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        prop_assert!(m as f64 <= eps + 1e-6, "{}: |δ|∞ = {} > {}", a.name(), m, eps);
                    }
                    Norm::L2 => {
                        let n = d.sqr().unwrap().flatten_from(1).unwrap().sum(1).unwrap()
                            .sqrt().unwrap().to_vec1::<f32>().unwrap();
                        for v in n {
                            prop_assert!(v as f64 <= eps * (1.0 + 1e-5) + 1e-6,
                                "{}: |δ|₂ = {} > {}", a.name(), v, eps);
                        }
                    }
                }
                if eps == 0.0 {
                    prop_assert_eq!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                }
            }
        }
    }
}

#[test]
fn eps_zero_is_clean_accuracy_and_robust_never_exceeds_clean() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let model = ResNet20::init(&mut Rng::new(3, "init"), &Device::Cpu).unwrap();
    // A model that predicts something other than one class: a few steps of training.
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(25).collect();
    let cfg = RobustnessConfig {
        eps: vec![0.0, 2.0 / 255.0, 8.0 / 255.0],
        batch_size: 20,
        ..RobustnessConfig::default()
    };
    let attacks: Vec<Box<dyn Attack>> = vec![
        Box::new(Fgsm),
        Box::new(Pgd {
            steps: 3,
            ..Pgd::default()
        }),
        Box::new(Square {
            queries: 10,
            ..Square::default()
        }),
    ];
    let r = evaluate(&model, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    let clean = quant_robust::eval::clean_accuracy(&model, &dd, &idx, 20).unwrap();
    assert_eq!(r.clean.correct, clean.correct);
    assert_eq!(r.n, 40);
    for a in &r.attacks {
        assert_eq!(a.per_eps[0].correct, clean.correct, "{} at ε = 0", a.attack);
        for e in &a.per_eps {
            assert!(e.correct <= clean.correct, "{}: robust > clean", a.attack);
            assert!(e.ci95.0 <= e.accuracy && e.accuracy <= e.ci95.1);
        }
        assert_eq!(a.broken.len(), 3);
        assert_eq!(a.broken[0].len(), 40);
    }
    for (ei, w) in r.worst_case.iter().enumerate() {
        for a in &r.attacks {
            assert!(
                w.correct <= a.per_eps[ei].correct,
                "worst case above {}",
                a.attack
            );
        }
    }
}

/// Returns its input unchanged and records the labels of every image it was given.
struct Recorder(std::rc::Rc<std::cell::RefCell<Vec<u32>>>);

impl Attack for Recorder {
    fn name(&self) -> String {
        "recorder".into()
    }
    fn supports(&self, _: Norm) -> bool {
        true
    }
    fn perturb(
        &self,
        _: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        _: Norm,
        _: f64,
        _: &mut Rng,
    ) -> quant_robust::Result<Tensor> {
        self.0.borrow_mut().extend(y.to_vec1::<u32>()?);
        Ok(x.clone())
    }
}

#[test]
fn attacks_see_only_the_correctly_classified_images() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let model = Linear::new(5, false);
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(7).collect();
    let cfg = RobustnessConfig {
        eps: vec![2.0 / 255.0, 8.0 / 255.0],
        batch_size: 16,
        ..RobustnessConfig::default()
    };
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let attacks: Vec<Box<dyn Attack>> = vec![Box::new(Recorder(seen.clone()))];
    let r = evaluate(&model, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    let (x, y) = dd.batch(&idx).unwrap();
    let labels = y.to_vec1::<u32>().unwrap();
    let preds = quant_robust::attack::predictions(&model.forward_t(&x, false).unwrap()).unwrap();
    let wrong: Vec<bool> = preds.iter().zip(&labels).map(|(p, l)| p != l).collect();
    let right: Vec<u32> = labels
        .iter()
        .zip(&wrong)
        .filter(|(_, w)| !**w)
        .map(|(l, _)| *l)
        .collect();
    assert!(
        !right.is_empty() && right.len() < idx.len(),
        "{}",
        right.len()
    );
    assert_eq!(r.clean.correct, right.len());
    // The attack was given the correctly classified images, in order, once per ε.
    assert_eq!(*seen.borrow(), [right.clone(), right.clone()].concat());
    // The identity "attack" breaks nothing: robust = clean, and the per-image string marks
    // exactly the misclassified images, each in its place.
    for (e, b) in r.attacks[0].per_eps.iter().zip(&r.attacks[0].broken) {
        assert_eq!(e.correct, right.len());
        let marked: Vec<bool> = b.chars().map(|c| c == '1').collect();
        assert_eq!(marked, wrong);
    }
}

#[test]
fn apgd_checkpoints_follow_the_paper() {
    // p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of N = 100 iterations.
    assert_eq!(Apgd::checkpoints(100), vec![22, 41, 57, 70, 80, 87, 93, 99]);
    assert_eq!(Apgd::checkpoints(10), vec![3, 5, 6, 7, 8, 9]);
}

#[test]
fn dlr_loss_matches_its_definition() {
    let z = Tensor::new(
        &[[3.0f32, 1.0, 2.0, 0.0], [0.5, 4.0, 1.0, 3.0]],
        &Device::Cpu,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    let l = loss_per_example(Loss::Dlr, &z, &y)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Row 0: y = 0 (z_y = 3, max other 2, sorted 3 > 2 > 1): −(3 − 2)/(3 − 1) = −0.5.
    // Row 1: y = 3 (z_y = 3, max other 4, sorted 4 > 3 > 1): −(3 − 4)/(4 − 1) = 1/3.
    assert!(
        (l[0] + 0.5).abs() < 1e-6 && (l[1] - 1.0 / 3.0).abs() < 1e-6,
        "{l:?}"
    );
    let ce = loss_per_example(Loss::Ce, &z, &y)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lse0 = (3f32.exp() + 1f32.exp() + 2f32.exp() + 1.0).ln();
    assert!((ce[0] - (lse0 - 3.0)).abs() < 1e-5);
    let _ = z.argmax(D::Minus1).unwrap();
}

#[test]
fn targeted_dlr_loss_matches_its_definition() {
    use quant_robust::attack::targeted_dlr;
    let z = Tensor::new(
        &[[3.0f32, 1.0, 2.0, 0.0, -1.0], [0.5, 4.0, 1.0, 3.0, 2.0]],
        &Device::Cpu,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    let t = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
    let l = targeted_dlr(&z, &y, &t).unwrap().to_vec1::<f32>().unwrap();
    // Row 0: sorted 3 > 2 > 1 > 0: −(3 − 2)/(3 − (1 + 0)/2) = −1/2.5.
    // Row 1: sorted 4 > 3 > 2 > 1: −(3 − 4)/(4 − (2 + 1)/2) = 1/2.5.
    assert!(
        (l[0] + 0.4).abs() < 1e-6 && (l[1] - 0.4).abs() < 1e-6,
        "{l:?}"
    );
    let three = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
    let e = targeted_dlr(
        &three,
        &Tensor::new(&[0u32], &Device::Cpu).unwrap(),
        &Tensor::new(&[1u32], &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4 classes"), "{e}");
}

/// On a linear model the best L∞ step towards class t is known: δ = ε·sign(w_t − w_y) (the
/// images sit inside the box, so it does not bind), which moves z_t − z_y by
/// ε·|w_t − w_y|₁. Where that closes the clean gap to the first target, APGD-T with one
/// target must misclassify the image; where the gap is out of reach of every class, no
/// attack can, and APGD-T must not either.
#[test]
fn apgd_t_reaches_the_target_when_the_linear_margin_allows() {
    let m = Linear::new(4, false);
    let n = 100;
    let x = images(n, 4, 0.4, 0.6);
    // Labelled as the model classifies them: every image starts correct.
    let y = m.forward_t(&x, false).unwrap().argmax(D::Minus1).unwrap();
    let w = m.w.to_vec2::<f32>().unwrap();
    let z = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let yv = y.to_vec1::<u32>().unwrap();
    let l1 =
        |t: usize, yy: usize| -> f32 { w[t].iter().zip(&w[yy]).map(|(a, b)| (a - b).abs()).sum() };
    // ε: the median radius at which the first target becomes reachable, so that about half
    // of the images are on each side.
    let mut need: Vec<f32> = (0..n)
        .map(|i| {
            let (yy, t) = (
                yv[i] as usize,
                quant_robust::attack::descending(&z[i])[1] as usize,
            );
            (z[i][yy] - z[i][t]) / l1(t, yy)
        })
        .collect();
    need.sort_by(f32::total_cmp);
    let eps = need[n / 2] as f64;
    let gain = |t: usize, yy: usize| -> f32 { l1(t, yy) * eps as f32 };
    let attack = ApgdTargeted {
        apgd: Apgd {
            iterations: 20,
            ..Apgd::dlr()
        },
        targets: 1,
    };
    let adv = attack
        .perturb(&m, &x, &y, Norm::Linf, eps, &mut Rng::new(0, "t"))
        .unwrap();
    let pa = quant_robust::attack::predictions(&m.forward_t(&adv, false).unwrap()).unwrap();
    let (mut reachable, mut unreachable) = (0, 0);
    for i in 0..n {
        let yy = yv[i] as usize;
        let order = quant_robust::attack::descending(&z[i]);
        if order[0] as usize != yy {
            continue;
        }
        let t = order[1] as usize;
        let gap = z[i][yy] - z[i][t];
        if gain(t, yy) > 1.05 * gap {
            reachable += 1;
            assert_ne!(
                pa[i], yv[i],
                "image {i}: target {t} reachable but not reached"
            );
        } else if (0..10).all(|k| k == yy || gain(k, yy) < 0.95 * (z[i][yy] - z[i][k])) {
            unreachable += 1;
            assert_eq!(pa[i], yv[i], "image {i}: no class is reachable");
        }
    }
    assert!(
        reachable >= 3 && unreachable >= 3,
        "{reachable} / {unreachable}: pick another ε"
    );
}

#[test]
fn square_schedule_halves_p_as_in_the_paper() {
    let s = Square::default();
    assert_eq!(s.p_at(0, 10_000), 0.8);
    assert_eq!(s.p_at(11, 10_000), 0.4);
    assert_eq!(s.p_at(600, 10_000), 0.05);
    assert_eq!(s.p_at(9000, 10_000), 0.8 / 512.0);
    // Rescaled to a 5,000-query budget: iteration 300 is 600 of 10,000.
    assert_eq!(s.p_at(300, 5000), 0.05);
}

#[test]
fn masking_is_flagged_when_gradients_are_zero() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(10).collect();
    // Round the input to quarters: the gradient is zero everywhere.
    let masked = Linear::new(4, true);
    let cfg = RobustnessConfig {
        eps: vec![0.25],
        batch_size: 50,
        ..RobustnessConfig::default()
    };
    let attacks: Vec<Box<dyn Attack>> = vec![
        Box::new(Pgd {
            steps: 5,
            random_start: false,
            ..Pgd::default()
        }),
        Box::new(Square {
            queries: 100,
            ..Square::default()
        }),
    ];
    let r = evaluate(&masked, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    assert_eq!(r.diagnostics.zero_gradient_fraction, 1.0);
    let d = &r.diagnostics.per_eps[0];
    assert!(d.masking_suspected, "{d:?}");
    assert!(d.broken_only_without_gradients > 0);
    // PGD without a random start cannot move: its robust accuracy is the clean accuracy.
    assert_eq!(r.attacks[0].per_eps[0].correct, r.clean.correct);
    // The same attacks on the unmasked model raise no flag from PGD's side being blind.
    let plain = Linear::new(4, false);
    let r = evaluate(&plain, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    assert!(r.diagnostics.zero_gradient_fraction < 0.01);
    assert!(
        !r.diagnostics.per_eps[0].masking_suspected,
        "{:?}",
        r.diagnostics
    );
}

/// The L∞ distance from `x` to the region where class k beats y, for the linear model:
/// (z_y − z_k) / |w_y − w_k|₁ (the dual norm of L∞ is L1; images in the middle of the box,
/// so [0, 1] does not bind at these radii).
fn linear_boundary_distance(m: &Linear, z: &[f32], y: usize, k: usize) -> f64 {
    let w = m.w.to_vec2::<f32>().unwrap();
    let l1: f64 = w[y]
        .iter()
        .zip(&w[k])
        .map(|(a, b)| f64::from(a - b).abs())
        .sum();
    f64::from(z[y] - z[k]) / l1
}

/// FAB's minimal L∞ adversarial on a linear model is within 5% of the closed-form distance
/// to the nearest decision boundary (and, being a fooling point, never below it);
/// FAB-T's is within 5% of the distance to its target's boundary.
#[test]
fn fab_finds_the_linear_decision_boundary() {
    let m = Linear::new(5, false);
    let n = 40;
    let x = images(n, 5, 0.4, 0.6);
    let y = m.forward_t(&x, false).unwrap().argmax(D::Minus1).unwrap();
    let z = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let yv = y.to_vec1::<u32>().unwrap();
    let fab = Fab {
        iterations: 20,
        ..Fab::default()
    };
    let found = fab
        .minimal(&m, &x, &y, None, 8.0 / 255.0, &mut Rng::new(0, "fab"))
        .unwrap();
    let preds =
        quant_robust::attack::predictions(&m.forward_t(&found.x_adv, false).unwrap()).unwrap();
    let d_adv = (&found.x_adv - &x)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for i in 0..n {
        let yy = yv[i] as usize;
        let exact = (0..10)
            .filter(|&k| k != yy)
            .map(|k| linear_boundary_distance(&m, &z[i], yy, k))
            .fold(f64::INFINITY, f64::min);
        assert!(exact < 0.3, "image {i}: the box would bind");
        let d = f64::from(found.distance[i]);
        assert_ne!(preds[i], yv[i], "image {i}: FAB's point does not fool");
        assert!(
            (f64::from(d_adv[i]) - d).abs() < 1e-6,
            "image {i}: distance misreported"
        );
        assert!(
            d <= 1.05 * exact && d >= exact * (1.0 - 1e-3),
            "image {i}: FAB {d} vs closed form {exact}"
        );
    }
    // Targeted, towards the second-ranked class.
    let targets: Vec<u32> = z
        .iter()
        .map(|row| quant_robust::attack::descending(row)[1])
        .collect();
    let t = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
    let found = fab
        .minimal(&m, &x, &y, Some(&t), 8.0 / 255.0, &mut Rng::new(0, "fab-t"))
        .unwrap();
    for i in 0..n {
        let yy = yv[i] as usize;
        let to_target = linear_boundary_distance(&m, &z[i], yy, targets[i] as usize);
        let d = f64::from(found.distance[i]);
        assert!(d <= 1.05 * to_target, "image {i}: FAB-T {d} vs {to_target}");
    }
}

/// In the ε-ball version, FAB-T breaks an image exactly when its minimal distance is ≤ ε.
#[test]
fn fab_t_breaks_what_is_within_eps_and_nothing_else() {
    let m = Linear::new(6, false);
    let n = 60;
    let x = images(n, 6, 0.4, 0.6);
    let y = m.forward_t(&x, false).unwrap().argmax(D::Minus1).unwrap();
    let yv = y.to_vec1::<u32>().unwrap();
    let z = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let mut nearest: Vec<f64> = (0..n)
        .map(|i| {
            let yy = yv[i] as usize;
            (0..10)
                .filter(|&k| k != yy)
                .map(|k| linear_boundary_distance(&m, &z[i], yy, k))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let mut sorted = nearest.clone();
    sorted.sort_by(f64::total_cmp);
    let eps = sorted[n / 2];
    let attack = FabTargeted {
        fab: Fab {
            iterations: 30,
            ..Fab::default()
        },
        targets: 9,
    };
    let adv = attack
        .perturb(&m, &x, &y, Norm::Linf, eps, &mut Rng::new(1, "fab-t"))
        .unwrap();
    let preds = quant_robust::attack::predictions(&m.forward_t(&adv, false).unwrap()).unwrap();
    let (mut broken, mut safe) = (0, 0);
    for (i, d) in nearest.iter_mut().enumerate() {
        if *d > eps {
            safe += 1;
            assert_eq!(
                preds[i], yv[i],
                "image {i}: out of reach ({d} > {eps}) yet broken"
            );
        } else if *d * 1.06 < eps {
            broken += 1;
            assert_ne!(
                preds[i], yv[i],
                "image {i}: within reach ({d} < {eps}) yet robust"
            );
        }
    }
    assert!(broken >= 5 && safe >= 5, "{broken} / {safe}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// The L∞ projection onto a hyperplane within [0, 1]: the result is in the box, lies on
    /// the hyperplane when the box allows it, and no smaller L∞ step reaches the
    /// hyperplane (checked against the largest change of w·z a step of 0.999·|d|∞ allows).
    #[test]
    fn hyperplane_projection_is_the_shortest_step(
        t in proptest::collection::vec(0.0f32..=1.0, 1..12),
        w_seed in 0u64..1000,
        b in -3.0f64..3.0,
    ) {
        let n = t.len();
        let mut rng = Rng::new(w_seed, "w");
        let mut w = rng.normal_vec(n, 1.0);
        if w_seed % 5 == 0 {
            w[0] = 0.0;
        }
        let d = project_onto_hyperplane_linf(&t, &w, b);
        let z: Vec<f64> = t.iter().zip(&d).map(|(&a, &b)| f64::from(a) + f64::from(b)).collect();
        for &v in &z {
            prop_assert!((-1e-6..=1.0 + 1e-6).contains(&v), "left the box: {v}");
        }
        for (i, &wi) in w.iter().enumerate() {
            if wi == 0.0 {
                prop_assert_eq!(d[i], 0.0);
            }
        }
        let wz = |p: &[f64]| -> f64 { p.iter().zip(&w).map(|(a, &b)| a * f64::from(b)).sum() };
        let t64: Vec<f64> = t.iter().map(|&v| f64::from(v)).collect();
        let gap = wz(&t64) - b;
        // The most a step of L∞ size r inside the box can shrink |gap|.
        let reach = |r: f64| -> f64 {
            w.iter().zip(&t64).map(|(&wi, &ti)| {
                let dir = -gap.signum() * f64::from(wi).signum();
                let cap = if dir > 0.0 { 1.0 - ti } else { ti };
                f64::from(wi).abs() * r.min(cap)
            }).sum()
        };
        let norm = d.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
        if reach(1.0) >= gap.abs() * (1.0 + 1e-6) {
            prop_assert!((wz(&z) - b).abs() < 1e-4 * (1.0 + b.abs()), "off the plane: {} vs {b}", wz(&z));
            prop_assert!(reach(norm * 0.999) < gap.abs() + 1e-9, "a shorter step reaches it");
        } else {
            // Out of reach: every coordinate at its box edge in the closing direction.
            prop_assert!((reach(1.0) - (gap.abs() - (wz(&z) - b).abs())).abs() < 1e-4);
        }
    }
}

/// AutoAttack with every stage shortened, for tests.
fn small_autoattack(stages: Vec<Stage>) -> AutoAttack {
    AutoAttack {
        stages,
        apgd_iterations: 8,
        fab_iterations: 8,
        targets: 3,
        square_queries: 40,
    }
}

/// The cascade's bookkeeping on a batch: a stage's verdict stands on re-evaluation (no
/// stage "repairs" what an earlier one broke), images nothing broke are returned as they
/// were, misclassified images are nobody's, and the first stage breaks exactly what it
/// breaks alone (each stage has its own random stream).
#[test]
fn autoattack_keeps_what_each_stage_broke() {
    let m = Linear::new(7, false);
    let n = 60;
    let x = images(n, 7, 0.3, 0.7);
    let mut yv = m
        .forward_t(&x, false)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    for v in yv.iter_mut().take(5) {
        *v = (*v + 1) % 10;
    }
    let y = Tensor::from_vec(yv.clone(), n, &Device::Cpu).unwrap();
    let aa = small_autoattack(Stage::STANDARD.to_vec());
    // ε: the median distance to the nearest boundary, so that the first stage leaves work.
    let z = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let mut nearest: Vec<f64> = (0..n)
        .map(|i| {
            let p = quant_robust::attack::descending(&z[i])[0] as usize;
            (0..10)
                .filter(|&k| k != p)
                .map(|k| linear_boundary_distance(&m, &z[i], p, k))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    nearest.sort_by(f64::total_cmp);
    let eps = nearest[n / 2];
    let c = aa
        .run(&m, &x, &y, Norm::Linf, eps, &mut Rng::new(3, "aa"))
        .unwrap();
    let preds = quant_robust::attack::predictions(&m.forward_t(&c.x_adv, false).unwrap()).unwrap();
    assert_eq!(c.reevaluation_mismatches, 0);
    let xv = x.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let av = c.x_adv.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let mut per_stage = [0usize; 4];
    for i in 0..n {
        assert_eq!(c.clean_wrong[i], i < 5);
        match c.broken_by[i] {
            Some(k) => {
                per_stage[k] += 1;
                assert!(!c.clean_wrong[i]);
                assert_ne!(
                    preds[i], yv[i],
                    "image {i}: stage {k} broke it, re-evaluation disagrees"
                );
            }
            None => assert_eq!(xv[i], av[i], "image {i}: unbroken yet changed"),
        }
    }
    assert!(
        per_stage[0] > 0 && per_stage[0] < n - 5,
        "{per_stage:?}: pick another ε"
    );
    let first = small_autoattack(vec![Stage::ApgdCe])
        .run(&m, &x, &y, Norm::Linf, eps, &mut Rng::new(3, "aa"))
        .unwrap();
    for i in 0..n {
        assert_eq!(
            first.broken_by[i].is_some(),
            c.broken_by[i] == Some(0),
            "image {i}"
        );
    }
    let zero = aa
        .run(&m, &x, &y, Norm::Linf, 0.0, &mut Rng::new(3, "aa"))
        .unwrap();
    assert!(zero.broken_by.iter().all(Option::is_none));
    assert_eq!(
        zero.x_adv
            .flatten_from(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        xv,
        "ε = 0 moved an image"
    );
}

/// Through the evaluation: AutoAttack's robust accuracy is at most every one of its stages'
/// run alone, its per-stage record is consistent (accuracy after each stage never rises,
/// the last equals the re-evaluated one), and ε = 0 gives clean accuracy.
#[test]
fn autoattack_is_at_most_each_of_its_stages() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(10).collect();
    let m = Linear::new(8, false);
    let aa = small_autoattack(Stage::STANDARD.to_vec());
    let mut attacks: Vec<Box<dyn Attack>> = vec![Box::new(aa.clone())];
    for st in Stage::STANDARD {
        attacks.push(aa.stage_attack(st));
    }
    let cfg = RobustnessConfig {
        eps: vec![0.0, 0.5 / 255.0, 1.0 / 255.0, 2.0 / 255.0],
        batch_size: 40,
        ..RobustnessConfig::default()
    };
    let r = evaluate(&m, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    let a = &r.attacks[0];
    let st = a.stages.as_ref().expect("a stage record");
    assert_eq!(st.names, ["apgd-ce", "apgd-t", "fab-t", "square"]);
    assert_eq!(st.uses_gradients, [true, true, true, false]);
    assert_eq!(a.per_eps[0].correct, r.clean.correct);
    for (ei, e) in a.per_eps.iter().enumerate() {
        for single in &r.attacks[1..] {
            assert!(
                e.correct <= single.per_eps[ei].correct,
                "ε {}: autoattack {} > {} {}",
                e.eps,
                e.correct,
                single.attack,
                single.per_eps[ei].correct
            );
        }
        assert_eq!(st.reevaluation_mismatches[ei], 0);
        assert_eq!(st.broken_by[ei].len(), r.n);
        let mut prev = r.clean.correct;
        for after in &st.after {
            assert!(after[ei].correct <= prev);
            prev = after[ei].correct;
        }
        assert_eq!(prev, e.correct);
    }
    // At least one ε where the stages after the first add something.
    assert!(
        (1..cfg.eps.len()).any(|ei| st.after[0][ei].correct > a.per_eps[ei].correct),
        "{:?}",
        st.after
    );
}

/// Masking seen inside the cascade: on a model with zero input gradients only the Square
/// stage can break images, and the diagnostics say so with AutoAttack as the only attack.
#[test]
fn autoattack_flags_masking_through_its_square_stage() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(10).collect();
    let masked = Linear::new(4, true);
    let aa = AutoAttack {
        square_queries: 100,
        ..small_autoattack(vec![Stage::ApgdCe, Stage::Square])
    };
    let attacks: Vec<Box<dyn Attack>> = vec![Box::new(aa)];
    let cfg = RobustnessConfig {
        eps: vec![0.25],
        batch_size: 50,
        ..RobustnessConfig::default()
    };
    let r = evaluate(&masked, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    let d = &r.diagnostics.per_eps[0];
    assert!(d.broken_only_without_gradients > 0, "{d:?}");
    assert!(d.masking_suspected, "{d:?}");
    assert_eq!(r.attacks[0].attack, "autoattack[apgd-ce+square]");
}

/// Units kept in memory (through their JSON form, as the study keeps them on disk); stops
/// before the unit after the first `budget` computed ones.
struct Interrupting {
    kept: std::collections::HashMap<String, String>,
    budget: usize,
    computed: usize,
    reused: usize,
}

impl Hooks for Interrupting {
    fn finished(&mut self, key: &str) -> quant_robust::Result<Option<Unit>> {
        Ok(self.kept.get(key).map(|j| serde_json::from_str(j).unwrap()))
    }
    fn reusing(&mut self, _unit: &Unit) {
        self.reused += 1;
    }
    fn keep(&mut self, key: &str, unit: &Unit) -> quant_robust::Result<()> {
        self.computed += 1;
        self.kept
            .insert(key.into(), serde_json::to_string(unit).unwrap());
        Ok(())
    }
    fn should_stop(&self) -> bool {
        self.computed >= self.budget
    }
}

/// An evaluation stopped between units again and again, each time resumed from the units kept
/// so far, ends with the report of an uninterrupted run (timings aside): per attack, per ε and
/// per image, AutoAttack's stage record included; each unit is computed exactly once.
#[test]
fn an_evaluation_stopped_between_units_resumes_to_the_same_report() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..s.test.len() as u32).step_by(4).collect();
    let m = Linear::new(9, false);
    let attacks: Vec<Box<dyn Attack>> = vec![
        Box::new(Fgsm),
        Box::new(Pgd {
            steps: 3,
            ..Pgd::default()
        }),
        Box::new(Square {
            queries: 30,
            ..Square::default()
        }),
        Box::new(small_autoattack(Stage::STANDARD.to_vec())),
    ];
    let cfg = RobustnessConfig {
        eps: vec![0.5 / 255.0, 2.0 / 255.0],
        batch_size: 12,
        ..RobustnessConfig::default()
    };
    let whole = evaluate(&m, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    let batches = (whole.clean.correct).div_ceil(cfg.batch_size);
    let units = attacks.len() * cfg.eps.len() * batches;
    assert!(batches >= 2, "{batches} batches");
    let mut hooks = Interrupting {
        kept: Default::default(),
        budget: 0,
        computed: 0,
        reused: 0,
    };
    let mut runs = 0;
    let resumed = loop {
        runs += 1;
        hooks.budget = hooks.computed + 3;
        if let Some(r) = evaluate_with(&m, &dd, &idx, &attacks, &cfg, &mut hooks).unwrap() {
            break r;
        }
        assert!(runs <= units, "no progress after {runs} runs");
    };
    assert_eq!(hooks.computed, units);
    assert_eq!(runs, units.div_ceil(3));
    assert!(hooks.reused > 0);
    let stripped = |r: &quant_robust::eval::robust::RobustnessReport| {
        let mut v = serde_json::to_value(r).unwrap();
        crate::study::strip(&mut v);
        v
    };
    assert_eq!(stripped(&resumed), stripped(&whole));
    // A unit kept for other images (another evaluation's) is not taken: it is redone.
    let mut other = Interrupting {
        kept: hooks.kept.clone(),
        budget: usize::MAX,
        computed: 0,
        reused: 0,
    };
    let shifted: Vec<u32> = idx.iter().map(|i| i + 1).collect();
    evaluate_with(&m, &dd, &shifted, &attacks, &cfg, &mut other).unwrap();
    assert_eq!(other.reused, 0);
    assert!(other.computed > 0);
}

#[test]
fn autoattack_settings_are_checked() {
    let bad = [
        small_autoattack(vec![]),
        small_autoattack(vec![Stage::Square, Stage::Square]),
        AutoAttack {
            targets: 0,
            ..AutoAttack::default()
        },
    ];
    for a in bad {
        assert!(a.validate().is_err(), "{a:?}");
    }
    let aa = AutoAttack::default();
    assert!(aa.validate().is_ok() && aa.is_standard());
    assert!(!aa.supports(Norm::L2), "FAB is L∞ only");
    let e = quant_robust::attack::build("autoattack", &Default::default(), Norm::L2)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("l2"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// ε strings: any text parses to a finite number or is refused with a message that
    /// quotes it, never a panic; `a/b` is a ÷ b, and a zero denominator is refused.
    #[test]
    fn eps_strings_parse_or_are_refused(s in "\\PC{0,12}", a in -1e3f64..1e3, b in -300i32..300) {
        use quant_robust::attack::parse_fraction;
        match parse_fraction(&s) {
            Ok(v) => prop_assert!(v.is_finite()),
            Err(e) => prop_assert!(e.contains(&format!("`{s}`")), "{}", e),
        }
        let r = parse_fraction(&format!("{a}/{b}"));
        if b == 0 {
            prop_assert!(r.is_err());
        } else {
            prop_assert_eq!(r.unwrap(), a / b as f64);
        }
    }
}
