//! Robustness over many attacks and many ε: the per-example success matrix (ε × images) of
//! each attack, the per-example worst case over all attacks run, and gradient-masking
//! diagnostics.
//!
//! An example counts as *broken* by an attack at ε if the model misclassifies it clean or
//! misclassifies the attack's output; robust accuracy is the fraction not broken, so it can
//! never exceed clean accuracy, and ε = 0 gives clean accuracy exactly. The worst case
//! breaks an example if any attack did. Every accuracy carries its Wilson 95% interval.
//!
//! Masking diagnostics: the fraction of (correctly classified) inputs whose input gradient
//! is exactly zero, and, per ε, the examples that only a gradient-free or transfer attack
//! broke. Many such examples mean the white-box attacks are blind: masking suspected.

use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::Accuracy;
use crate::attack::{input_gradient, predictions, Attack, Norm};
use crate::data::batch::DeviceData;
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// Accuracy at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpsAccuracy {
    pub eps: f64,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Wilson 95% interval.
    pub ci95: (f64, f64),
}

impl EpsAccuracy {
    /// The accuracy of a per-image "broken" mask at `eps`.
    pub fn new(eps: f64, broken: &[bool]) -> Self {
        let a = Accuracy {
            correct: broken.iter().filter(|&&b| !b).count(),
            total: broken.len(),
        };
        EpsAccuracy {
            eps,
            correct: a.correct,
            total: a.total,
            accuracy: a.fraction(),
            ci95: a.interval95(),
        }
    }
}

/// One attack's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackResult {
    pub attack: String,
    /// True for attacks that use no gradient of the evaluated model (Square, transfer).
    pub gradient_free: bool,
    pub per_eps: Vec<EpsAccuracy>,
    /// Per ε, one character per image: `1` broken, `0` robust.
    pub broken: Vec<String>,
    /// Images attacked per second (all ε together; only the correctly classified ones are
    /// attacked).
    pub images_per_s: f64,
    pub wall_s: f64,
    /// Wall seconds on a GPU (0 on the CPU).
    pub gpu_s: f64,
    /// For a composite attack (AutoAttack): which stage broke each image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<StageRecord>,
}

/// The per-example record of a composite attack's stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stages, in order.
    pub names: Vec<String>,
    /// Per stage: true if it uses the model's gradients.
    pub uses_gradients: Vec<bool>,
    /// Per ε, one character per image: the index of the stage that broke it (`0`–`9`),
    /// `.` robust, `x` misclassified clean.
    pub broken_by: Vec<String>,
    /// Per stage, per ε: robust accuracy after the stages up to and including this one.
    pub after: Vec<Vec<EpsAccuracy>>,
    /// Per ε: images a stage broke that the final re-evaluation classifies correctly
    /// (expected 0; the re-evaluation is what counts in `per_eps`).
    pub reevaluation_mismatches: Vec<usize>,
    /// Per stage, all ε together: the images it attacked (those still robust when it
    /// started) and its wall seconds.
    pub images: Vec<usize>,
    pub wall_s: Vec<f64>,
}

impl StageRecord {
    /// The stage that broke image `i` at ε index `ei`, if any.
    pub fn stage_of(&self, ei: usize, i: usize) -> Option<usize> {
        self.broken_by
            .get(ei)
            .and_then(|s| s.as_bytes().get(i))
            .and_then(|&c| (c as char).to_digit(10))
            .map(|d| d as usize)
            .filter(|&d| d < self.names.len())
    }
}

/// Masking diagnostics at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskingAtEps {
    pub eps: f64,
    /// Robust accuracy under the strongest white-box attack alone.
    pub white_box_best: Option<f64>,
    /// Robust accuracy under the gradient-free and transfer attacks together.
    pub gradient_free: Option<f64>,
    /// Examples broken by a gradient-free or transfer attack but by no white-box attack.
    pub broken_only_without_gradients: usize,
    /// True when that count exceeds the threshold: the white-box attacks are blind.
    pub masking_suspected: bool,
}

/// Gradient-masking diagnostics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Fraction of correctly classified inputs whose cross-entropy input gradient is all zero.
    pub zero_gradient_fraction: f64,
    /// The count threshold (fraction of images) above which masking is flagged.
    pub masking_threshold: f64,
    pub per_eps: Vec<MaskingAtEps>,
}

/// Everything a robustness evaluation found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustnessReport {
    pub norm: Norm,
    pub eps: Vec<f64>,
    pub n: usize,
    pub clean: EpsAccuracy,
    pub attacks: Vec<AttackResult>,
    /// Per-example worst case over all attacks.
    pub worst_case: Vec<EpsAccuracy>,
    pub diagnostics: Diagnostics,
}

/// Settings of a robustness evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RobustnessConfig {
    pub norm: Norm,
    /// Radii, in pixel units. Default 1, 2, 4, 8, 16 /255.
    pub eps: Vec<f64>,
    /// Batch size. Default 250.
    pub batch_size: usize,
    /// Seed of the attacks' random draws. Default 0.
    pub seed: u64,
    /// Masking is flagged when more than this fraction of the images is broken only by
    /// gradient-free or transfer attacks. Default 0.01.
    pub masking_threshold: f64,
}

impl Default for RobustnessConfig {
    fn default() -> Self {
        RobustnessConfig {
            norm: Norm::Linf,
            eps: [1.0, 2.0, 4.0, 8.0, 16.0]
                .iter()
                .map(|e| e / 255.0)
                .collect(),
            batch_size: 250,
            seed: 0,
            masking_threshold: 0.01,
        }
    }
}

fn bits(v: &[bool]) -> String {
    v.iter().map(|&b| if b { '1' } else { '0' }).collect()
}

/// Per-batch progress: (attack, ε index, images done, images total).
pub type OnBatch<'a> = dyn FnMut(&str, usize, usize, usize) + 'a;

/// One finished piece of an evaluation: one attack at one ε on one batch of the images it
/// attacks. An evaluation is a sequence of units, each with its own random stream, so the
/// units an interrupted evaluation finished can be kept and reused by the next run, which then
/// gives the same report, bit for bit, as an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub attack: String,
    pub eps: f64,
    /// The batch's images (indices into the data set).
    pub images: Vec<u32>,
    /// One character per image: `1` misclassified after the attack, `0` not.
    pub broken: String,
    /// For a composite attack: per image, the stage that broke it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_by: Option<Vec<Option<usize>>>,
    /// For a composite attack: per stage, the images it attacked and its wall seconds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_images: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_wall_s: Vec<f64>,
    pub wall_s: f64,
    pub gpu_s: f64,
    /// CPU seconds of the whole process while the unit ran.
    pub cpu_s: f64,
}

impl Unit {
    /// Whether this unit is the one `attack` at `eps` on `images` would compute.
    pub fn is_for(&self, attack: &str, eps: f64, images: &[u32]) -> bool {
        self.attack == attack && self.eps.to_bits() == eps.to_bits() && self.images == images
    }

    fn broken_flags(&self) -> Result<Vec<bool>> {
        let flags: Vec<bool> = self.broken.chars().map(|c| c == '1').collect();
        if flags.len() != self.images.len() || self.broken.chars().any(|c| c != '0' && c != '1') {
            return Err(Error::AttackCheck {
                attack: self.attack.clone(),
                problem: format!(
                    "a kept unit has {} flags for {} images",
                    self.broken.len(),
                    self.images.len()
                ),
            });
        }
        Ok(flags)
    }
}

/// What the caller of [`evaluate_with`] hooks into an evaluation: progress, the units an
/// earlier run finished, and a request to stop.
pub trait Hooks {
    /// An attack finished a batch at ε number `ei`: `done` of `total` images.
    fn batch_done(&mut self, _attack: &str, _ei: usize, _done: usize, _total: usize) {}
    /// The unit named `key` (unique within one evaluation) if an earlier run kept it.
    fn finished(&mut self, _key: &str) -> Result<Option<Unit>> {
        Ok(None)
    }
    /// A unit from [`Hooks::finished`] is used (it is the one this evaluation would compute).
    fn reusing(&mut self, _unit: &Unit) {}
    /// Keeps a unit just computed.
    fn keep(&mut self, _key: &str, _unit: &Unit) -> Result<()> {
        Ok(())
    }
    /// True to stop before computing the next unit.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Progress only: what [`evaluate`] hooks in.
struct ProgressOnly<'a, 'b>(&'a mut OnBatch<'b>);

impl Hooks for ProgressOnly<'_, '_> {
    fn batch_done(&mut self, attack: &str, ei: usize, done: usize, total: usize) {
        (self.0)(attack, ei, done, total)
    }
}

/// Runs every attack at every ε on the images `idx` of `data`.
pub fn evaluate(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    attacks: &[Box<dyn Attack>],
    cfg: &RobustnessConfig,
    on_batch: &mut OnBatch<'_>,
) -> Result<RobustnessReport> {
    let report = evaluate_with(model, data, idx, attacks, cfg, &mut ProgressOnly(on_batch))?;
    report.ok_or_else(|| Error::config("evaluation", "stopped", "nothing asked it to stop"))
}

/// [`evaluate`], unit by unit through `hooks`: reuses the units it already has, keeps the
/// ones it computes, and returns `None` when asked to stop before the end.
pub fn evaluate_with(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    attacks: &[Box<dyn Attack>],
    cfg: &RobustnessConfig,
    hooks: &mut dyn Hooks,
) -> Result<Option<RobustnessReport>> {
    check(attacks, cfg)?;
    let n = idx.len();
    let device = data.images.device().clone();
    let clean_pass = clean_pass(model, data, idx, cfg)?;
    let clean_wrong = &clean_pass.wrong;
    let clean = EpsAccuracy::new(0.0, clean_wrong);
    // An image misclassified clean is broken at every ε whatever an attack does, so the
    // attacks run on the correctly classified ones only (as AutoAttack does); `pos` maps
    // each attacked image back to its place in `idx`.
    let pos: Vec<usize> = (0..n).filter(|&i| !clean_wrong[i]).collect();
    let attacked: Vec<u32> = pos.iter().map(|&i| idx[i]).collect();
    let targets = Targets {
        clean_wrong,
        pos: &pos,
        attacked: &attacked,
    };
    let mut results = Vec::new();
    let mut broken_all: Vec<Vec<Vec<bool>>> = Vec::new();
    for (ai, a) in attacks.iter().enumerate() {
        let Some(outcome) = run_attack(model, data, ai, a.as_ref(), cfg, targets, hooks)? else {
            return Ok(None);
        };
        let AttackOutcome {
            stages,
            broken,
            wall_s,
            gpu_s,
        } = outcome;
        results.push(AttackResult {
            attack: a.name(),
            gradient_free: !a.uses_gradients(),
            per_eps: cfg
                .eps
                .iter()
                .zip(&broken)
                .map(|(&e, b)| EpsAccuracy::new(e, b))
                .collect(),
            broken: broken.iter().map(|b| bits(b)).collect(),
            images_per_s: (attacked.len() * cfg.eps.len()) as f64 / wall_s.max(1e-9),
            wall_s,
            gpu_s,
            stages,
        });
        broken_all.push(broken);
    }
    crate::device::synchronize(&device)?;
    let worst_case: Vec<EpsAccuracy> = (0..cfg.eps.len())
        .map(|ei| {
            let b: Vec<bool> = (0..n)
                .map(|i| clean_wrong[i] || broken_all.iter().any(|m| m[ei][i]))
                .collect();
            EpsAccuracy::new(cfg.eps[ei], &b)
        })
        .collect();
    let per_eps = (0..cfg.eps.len())
        .map(|ei| masking_at(ei, attacks, &results, &broken_all, clean_wrong, cfg))
        .collect();
    Ok(Some(RobustnessReport {
        norm: cfg.norm,
        eps: cfg.eps.clone(),
        n,
        clean,
        attacks: results,
        worst_case,
        diagnostics: Diagnostics {
            zero_gradient_fraction: clean_pass.zero_gradient as f64
                / clean_pass.correct.max(1) as f64,
            masking_threshold: cfg.masking_threshold,
            per_eps,
        },
    }))
}

/// The settings an evaluation cannot run with: no ε, an ε out of range, batch size 0, an
/// attack without the norm.
fn check(attacks: &[Box<dyn Attack>], cfg: &RobustnessConfig) -> Result<()> {
    if cfg.eps.is_empty() {
        return Err(Error::config("eps", "[]", "give at least one ε"));
    }
    for &e in &cfg.eps {
        crate::attack::check_eps(cfg.norm, e)?;
    }
    if cfg.batch_size == 0 {
        return Err(Error::config("batch_size", 0, "must be ≥ 1"));
    }
    for a in attacks {
        if !a.supports(cfg.norm) {
            return Err(Error::config(
                "attack",
                a.name(),
                format!("does not support the {} norm", cfg.norm),
            ));
        }
    }
    Ok(())
}

/// The clean pass: which images are misclassified, and how many of the correct ones have an
/// input gradient of exactly zero.
struct CleanPass {
    wrong: Vec<bool>,
    correct: usize,
    zero_gradient: usize,
}

fn clean_pass(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    cfg: &RobustnessConfig,
) -> Result<CleanPass> {
    let mut clean_wrong = Vec::with_capacity(idx.len());
    let (mut zero_grad, mut correct_total) = (0usize, 0usize);
    for chunk in idx.chunks(cfg.batch_size) {
        let (x, y) = data.batch(chunk)?;
        let labels = y.to_vec1::<u32>()?;
        let preds = predictions(&model.forward_t(&x, false)?)?;
        let (_, g) = input_gradient(model, &x, &y)?;
        let gsum = g.abs()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()?;
        for i in 0..chunk.len() {
            let wrong = preds[i] != labels[i];
            clean_wrong.push(wrong);
            if !wrong {
                correct_total += 1;
                if gsum[i] == 0.0 {
                    zero_grad += 1;
                }
            }
        }
    }
    Ok(CleanPass {
        wrong: clean_wrong,
        correct: correct_total,
        zero_gradient: zero_grad,
    })
}

/// One attack's outcome: its per-stage record (composite attacks), per ε which images are
/// broken, and its seconds (the sum of its units', whichever run computed them).
struct AttackOutcome {
    stages: Option<StageRecord>,
    broken: Vec<Vec<bool>>,
    wall_s: f64,
    gpu_s: f64,
}

/// The images of an evaluation the attacks run on.
#[derive(Clone, Copy)]
struct Targets<'a> {
    /// Per image of the evaluation: misclassified clean (broken at every ε).
    clean_wrong: &'a [bool],
    /// The attacked images' places in the evaluation's order.
    pos: &'a [usize],
    /// The attacked images (indices into the data).
    attacked: &'a [u32],
}

/// Attack number `ai`, `a`, at every ε on the `targets`, one unit (ε, batch) at a time;
/// `None` if `hooks` asked to stop.
fn run_attack(
    model: &dyn Classifier,
    data: &DeviceData,
    ai: usize,
    a: &dyn Attack,
    cfg: &RobustnessConfig,
    targets: Targets,
    hooks: &mut dyn Hooks,
) -> Result<Option<AttackOutcome>> {
    let Targets {
        clean_wrong,
        pos,
        attacked,
    } = targets;
    let n = clean_wrong.len();
    let name = a.name();
    let mut broken: Vec<Vec<bool>> = vec![clean_wrong.to_vec(); cfg.eps.len()];
    let stage_list = a.stages();
    let mut tally = StageTally::new(&name, stage_list.len(), cfg.eps.len(), n);
    let (mut wall_s, mut gpu_s) = (0.0, 0.0);
    for (ei, &eps) in cfg.eps.iter().enumerate() {
        let mut done = 0;
        for (bi, chunk) in attacked.chunks(cfg.batch_size).enumerate() {
            let key = format!("a{ai}-e{ei}-b{bi}");
            let unit = match hooks.finished(&key)? {
                Some(u) if u.is_for(&name, eps, chunk) => {
                    hooks.reusing(&u);
                    u
                }
                kept => {
                    if kept.is_some() {
                        tracing::warn!("unit {key} kept for another attack, ε or batch: redone");
                    }
                    if hooks.should_stop() {
                        return Ok(None);
                    }
                    let u = attack_batch(model, data, a, cfg, eps, chunk)?;
                    hooks.keep(&key, &u)?;
                    u
                }
            };
            let at = &pos[done..done + chunk.len()];
            for (&i, b) in at.iter().zip(unit.broken_flags()?) {
                broken[ei][i] = b;
            }
            wall_s += unit.wall_s;
            gpu_s += unit.gpu_s;
            tally.add(ei, unit, at)?;
            done += chunk.len();
            hooks.batch_done(&name, ei, done, attacked.len());
        }
    }
    let stages = (!stage_list.is_empty())
        .then(|| stage_record(&stage_list, &cfg.eps, tally, &broken, clean_wrong))
        .transpose()?;
    Ok(Some(AttackOutcome {
        stages,
        broken,
        wall_s,
        gpu_s,
    }))
}

/// One unit: `a` at `eps` on the images `chunk`, re-evaluated.
fn attack_batch(
    model: &dyn Classifier,
    data: &DeviceData,
    a: &dyn Attack,
    cfg: &RobustnessConfig,
    eps: f64,
    chunk: &[u32],
) -> Result<Unit> {
    let start = Instant::now();
    let cpu_start = crate::device::process_cpu_seconds();
    let name = a.name();
    let (x, y) = data.batch(chunk)?;
    let labels = y.to_vec1::<u32>()?;
    let mut rng = Rng::new(cfg.seed, &format!("attack/{name}/{eps}/{}", chunk[0]));
    let staged = a.perturb_staged(model, &x, &y, cfg.norm, eps, &mut rng)?;
    let preds = predictions(&model.forward_t(&staged.x_adv, false)?)?;
    let device = x.device().clone();
    crate::device::synchronize(&device)?;
    let wall_s = start.elapsed().as_secs_f64();
    let broken: Vec<bool> = preds.iter().zip(&labels).map(|(p, l)| p != l).collect();
    Ok(Unit {
        attack: name,
        eps,
        images: chunk.to_vec(),
        broken: bits(&broken),
        broken_by: staged.broken_by,
        stage_images: staged.stage_images,
        stage_wall_s: staged.stage_wall_s,
        wall_s,
        gpu_s: crate::manifest::gpu_seconds(&device, wall_s),
        cpu_s: crate::device::cpu_seconds_since(cpu_start),
    })
}

/// The masking diagnostics at ε number `ei`: the best white-box accuracy, the gradient-free
/// attacks' accuracy, and the images only a gradient-free attack broke.
fn masking_at(
    ei: usize,
    attacks: &[Box<dyn Attack>],
    results: &[AttackResult],
    broken_all: &[Vec<Vec<bool>>],
    clean_wrong: &[bool],
    cfg: &RobustnessConfig,
) -> MaskingAtEps {
    let n = clean_wrong.len();
    let (mut wb, mut gf) = (Vec::new(), Vec::new());
    for ((a, m), r) in attacks.iter().zip(broken_all).zip(results) {
        match &r.stages {
            // A composite attack: each broken image goes to its stage's side.
            Some(st) => {
                let side = |gradients: bool| -> Vec<bool> {
                    (0..n)
                        .map(|i| {
                            clean_wrong[i]
                                || st
                                    .stage_of(ei, i)
                                    .is_some_and(|s| st.uses_gradients[s] == gradients)
                        })
                        .collect()
                };
                wb.push(side(true));
                gf.push(side(false));
            }
            None if a.uses_gradients() => wb.push(m[ei].clone()),
            None => gf.push(m[ei].clone()),
        }
    }
    let only = (0..n)
        .filter(|&i| gf.iter().any(|m| m[i]) && !wb.iter().any(|m| m[i]) && !clean_wrong[i])
        .count();
    let acc = |ms: &[Vec<bool>]| {
        (!ms.is_empty())
            .then(|| (0..n).filter(|&i| !ms.iter().any(|m| m[i])).count() as f64 / n.max(1) as f64)
    };
    let best_wb = wb
        .iter()
        .map(|m| m.iter().filter(|&&b| !b).count() as f64 / n.max(1) as f64)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.min(v)))
        });
    MaskingAtEps {
        eps: cfg.eps[ei],
        white_box_best: best_wb,
        gradient_free: acc(&gf),
        broken_only_without_gradients: only,
        masking_suspected: !wb.is_empty() && only as f64 > cfg.masking_threshold * n as f64,
    }
}

/// A few images with their adversarial versions, labels and predictions.
pub struct Examples {
    pub x: Tensor,
    pub x_adv: Tensor,
    pub labels: Vec<u32>,
    pub clean_pred: Vec<u32>,
    pub adv_pred: Vec<u32>,
}

/// Adversarial examples of one attack at one ε for a few images (for pictures).
pub fn examples(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    attack: &dyn Attack,
    norm: Norm,
    eps: f64,
    seed: u64,
) -> Result<Examples> {
    let (x, y) = data.batch(idx)?;
    let mut rng = Rng::new(seed, &format!("examples/{}", attack.name()));
    let x_adv = attack.perturb(model, &x, &y, norm, eps, &mut rng)?;
    let clean = predictions(&model.forward_t(&x, false)?)?;
    let adv = predictions(&model.forward_t(&x_adv, false)?)?;
    Ok(Examples {
        x,
        x_adv,
        labels: y.to_vec1::<u32>()?,
        clean_pred: clean,
        adv_pred: adv,
    })
}

/// What a composite attack's batches said about its stages, summed over batches.
struct StageTally {
    attack: String,
    /// Per ε, per image: the stage that broke it.
    stage_of: Vec<Vec<Option<usize>>>,
    /// Per stage: images attacked and wall seconds, all ε together.
    images: Vec<usize>,
    wall_s: Vec<f64>,
}

impl StageTally {
    fn new(attack: &str, stages: usize, eps: usize, images: usize) -> Self {
        StageTally {
            attack: attack.into(),
            stage_of: vec![vec![None; images]; eps],
            images: vec![0; stages],
            wall_s: vec![0.0; stages],
        }
    }

    /// A unit's stages; `at` places the batch's images among all the images.
    fn add(&mut self, ei: usize, unit: Unit, at: &[usize]) -> Result<()> {
        if let Some(b) = unit.broken_by {
            if b.len() != at.len() {
                return Err(Error::AttackCheck {
                    attack: self.attack.clone(),
                    problem: format!("{} stage entries for a batch of {}", b.len(), at.len()),
                });
            }
            for (&i, s) in at.iter().zip(b) {
                self.stage_of[ei][i] = s;
            }
        }
        for (k, (m, w)) in unit
            .stage_images
            .into_iter()
            .zip(unit.stage_wall_s)
            .enumerate()
        {
            if k < self.images.len() {
                self.images[k] += m;
                self.wall_s[k] += w;
            }
        }
        Ok(())
    }
}

/// The stage record of a composite attack from its per-ε, per-image stages.
fn stage_record(
    stages: &[(String, bool)],
    eps: &[f64],
    tally: StageTally,
    broken: &[Vec<bool>],
    clean_wrong: &[bool],
) -> Result<StageRecord> {
    let stage_of = &tally.stage_of;
    let n = clean_wrong.len();
    if stages.len() > 10 {
        return Err(Error::config(
            "composite attack stages",
            stages.len(),
            "at most 10 are recorded",
        ));
    }
    let mut broken_by = Vec::with_capacity(eps.len());
    let mut mismatches = Vec::with_capacity(eps.len());
    for (ei, per) in stage_of.iter().enumerate() {
        let mut text = String::with_capacity(n);
        for (i, s) in per.iter().enumerate() {
            text.push(match s {
                _ if clean_wrong[i] => 'x',
                Some(k) => char::from_digit(*k as u32, 10).unwrap_or('?'),
                None => '.',
            });
        }
        broken_by.push(text);
        mismatches.push(
            (0..n)
                .filter(|&i| per[i].is_some() && !clean_wrong[i] && !broken[ei][i])
                .count(),
        );
    }
    let after = (0..stages.len())
        .map(|k| {
            eps.iter()
                .enumerate()
                .map(|(ei, &e)| {
                    let b: Vec<bool> = (0..n)
                        .map(|i| clean_wrong[i] || stage_of[ei][i].is_some_and(|s| s <= k))
                        .collect();
                    EpsAccuracy::new(e, &b)
                })
                .collect()
        })
        .collect();
    Ok(StageRecord {
        names: stages.iter().map(|s| s.0.clone()).collect(),
        uses_gradients: stages.iter().map(|s| s.1).collect(),
        broken_by,
        after,
        reevaluation_mismatches: mismatches,
        images: tally.images,
        wall_s: tally.wall_s,
    })
}
