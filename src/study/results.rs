//! The study's results document: per model, clean and robust accuracy (each with its
//! Wilson 95% interval over test images), the masking diagnostics and the cost; across seeds,
//! the mean and a t-interval where there are several; the findings' verdicts; and the
//! manifest (configuration, data, code, device, timings).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::StudyConfig;
use super::plan::ModelSpec;
use super::run::{read_record, EvalRecord, Keys, ModelRecord};
use super::verdict::Verdict;
use crate::data::DataIdentity;
use crate::eval::robust::{EpsAccuracy, RobustnessReport};
use crate::manifest::Manifest;
use crate::{Error, Result};

/// True if the result name `name` is of the attack `attack` (`pgd` matches `pgd-10`).
fn is_attack(name: &str, attack: &str) -> bool {
    name.strip_prefix(attack)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// One attack's accuracy per ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackAccuracy {
    pub attack: String,
    pub gradient_free: bool,
    pub per_eps: Vec<EpsAccuracy>,
}

/// Everything measured about one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResult {
    pub id: String,
    pub spec: ModelSpec,
    /// The checkpoint, relative to the study directory.
    pub checkpoint: String,
    pub clean: EpsAccuracy,
    /// Straight-through-gradient, gradient-free and transfer attacks.
    pub attacks: Vec<AttackAccuracy>,
    /// Per-example worst case over `attacks`.
    pub worst_case: Vec<EpsAccuracy>,
    /// PGD with raw gradients through the quantizers (quantized models).
    pub raw_pgd: Option<Vec<EpsAccuracy>>,
    /// Fraction of correctly classified inputs with an all-zero input gradient (STE, raw).
    pub zero_gradient_fraction: f64,
    pub raw_zero_gradient_fraction: Option<f64>,
    /// Per ε: examples only Square or the transfer attack broke, and the masking flag.
    pub masking: Vec<crate::eval::robust::MaskingAtEps>,
    /// PACT α per site (QAT cells with quantized activations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<AlphaLog>,
    /// Clean accuracy and the cheap attacks on the larger image set (`eval.wide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wide: Option<WideResult>,
    /// AutoAttack beside PGD and the worst case (`eval.autoattack`, selected models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattack: Option<AutoAttackResult>,
    pub cost: Cost,
}

/// AutoAttack on a model, beside the other attacks on the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackResult {
    /// `autoattack`, or the custom cascade's name.
    pub attack: String,
    pub per_eps: Vec<AutoAttackAtEps>,
}

/// AutoAttack at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoAttackAtEps {
    pub eps: f64,
    /// AutoAttack's robust accuracy (re-evaluated).
    pub autoattack: EpsAccuracy,
    /// Robust accuracy after each stage of the cascade, in order.
    pub after_stage: Vec<(String, EpsAccuracy)>,
    /// PGD and APGD-CE of the main evaluation at this ε, where they ran.
    pub pgd: Option<EpsAccuracy>,
    pub apgd_ce: Option<EpsAccuracy>,
    /// The per-example worst case of the main evaluation's attacks, without and with
    /// AutoAttack (`None` where the main evaluation has no such ε).
    pub worst_case: Option<EpsAccuracy>,
    pub worst_with_autoattack: Option<EpsAccuracy>,
    /// Masking diagnostics over the main attacks and AutoAttack's stages together: images
    /// broken only by a gradient-free attack or stage (Square, transfer).
    pub masking: crate::eval::robust::MaskingAtEps,
    /// Images a stage broke that the re-evaluation classified correctly (expected 0).
    pub reevaluation_mismatches: usize,
}

impl AutoAttackResult {
    /// From the main evaluation and the AutoAttack evaluation on the same images.
    pub fn new(main: &RobustnessReport, aa: &RobustnessReport) -> Result<Self> {
        let a = aa.attacks.first().ok_or_else(|| {
            Error::config("autoattack results", "no attack", "expected one attack")
        })?;
        if main.n != aa.n {
            return Err(Error::config(
                "autoattack results",
                format!("{} vs {} images", aa.n, main.n),
                "AutoAttack must run on the main evaluation's images",
            ));
        }
        let n = aa.n;
        let bits = |s: &str| -> Vec<bool> { s.bytes().map(|c| c == b'1').collect() };
        let mut per_eps = Vec::new();
        for (ei, &eps) in aa.eps.iter().enumerate() {
            let aa_broken = bits(&a.broken[ei]);
            let st = a.stages.as_ref();
            let clean_wrong: Vec<bool> = match st {
                Some(st) => st.broken_by[ei].bytes().map(|c| c == b'x').collect(),
                None => vec![false; n],
            };
            let side = |gradients: bool| -> Vec<bool> {
                (0..n)
                    .map(|i| {
                        st.is_some_and(|st| {
                            st.stage_of(ei, i)
                                .is_some_and(|k| st.uses_gradients[k] == gradients)
                        })
                    })
                    .collect()
            };
            let (mut wb, mut gf) = (side(true), side(false));
            let main_ei = main.eps.iter().position(|&e| (e - eps).abs() < 1e-9);
            let mut worst_main = None;
            let mut worst_all = None;
            if let Some(mi) = main_ei {
                let mut w = clean_wrong.clone();
                for r in &main.attacks {
                    let b = bits(&r.broken[mi]);
                    for i in 0..n {
                        w[i] |= b[i];
                        if r.gradient_free {
                            gf[i] |= b[i];
                        } else {
                            wb[i] |= b[i];
                        }
                    }
                }
                worst_main = Some(EpsAccuracy::new(eps, &w));
                let both: Vec<bool> = (0..n).map(|i| w[i] || aa_broken[i]).collect();
                worst_all = Some(EpsAccuracy::new(eps, &both));
            }
            let only = (0..n)
                .filter(|&i| gf[i] && !wb[i] && !clean_wrong[i])
                .count();
            let threshold = main.diagnostics.masking_threshold;
            let find = |name: &str| {
                main.attacks
                    .iter()
                    .find(|r| is_attack(&r.attack, name))
                    .and_then(|r| main_ei.map(|mi| r.per_eps[mi].clone()))
            };
            per_eps.push(AutoAttackAtEps {
                eps,
                autoattack: a.per_eps[ei].clone(),
                after_stage: st
                    .map(|st| {
                        st.names
                            .iter()
                            .cloned()
                            .zip(st.after.iter().map(|v| v[ei].clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                pgd: find("pgd"),
                apgd_ce: find("apgd-ce"),
                worst_case: worst_main,
                worst_with_autoattack: worst_all,
                masking: crate::eval::robust::MaskingAtEps {
                    eps,
                    white_box_best: None,
                    gradient_free: None,
                    broken_only_without_gradients: only,
                    masking_suspected: only as f64 > threshold * n as f64,
                },
                reevaluation_mismatches: st.map_or(0, |st| st.reevaluation_mismatches[ei]),
            });
        }
        Ok(AutoAttackResult {
            attack: a.attack.clone(),
            per_eps,
        })
    }

    /// AutoAttack at `eps`.
    pub fn at(&self, eps: f64) -> Option<&AutoAttackAtEps> {
        self.per_eps.iter().find(|e| (e.eps - eps).abs() < 1e-9)
    }
}

/// PACT α of a QAT cell: per site at the start and after the last epoch, and the sites
/// where it ran away: ended at a bound of its clamp that it did not start at (where an
/// unbounded α would have gone on; a calibrated start can sit at the bound already, on a
/// random network's huge activations) or grew by more than
/// `findings.alpha_runaway_factor`. A shrinking α clips more and
/// is not a failure in itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlphaLog {
    pub start: BTreeMap<String, f32>,
    pub end: BTreeMap<String, f32>,
    pub ran_away: Vec<String>,
}

impl AlphaLog {
    /// From the α history of a QAT record (`None` when it has none: weights-only cells).
    pub fn from_history(
        history: &[BTreeMap<String, f32>],
        bounds: (f64, f64),
        factor: f64,
    ) -> Option<Self> {
        let (start, end) = (history.first()?, history.last()?);
        if start.is_empty() {
            return None;
        }
        let (lo, hi) = bounds;
        let ran_away = end
            .iter()
            .filter(|(site, &a)| {
                let a = a as f64;
                let s = start.get(*site).map(|&v| v as f64).unwrap_or(a);
                let (at_lo, at_hi) = (|v: f64| v <= lo * 1.001, |v: f64| v >= hi * 0.999);
                (at_lo(a) && !at_lo(s)) || (at_hi(a) && !at_hi(s)) || a > s * factor
            })
            .map(|(site, _)| site.clone())
            .collect();
        Some(AlphaLog {
            start: start.clone(),
            end: end.clone(),
            ran_away,
        })
    }
}

/// What a stage's cost is measured in when stages are compared: GPU seconds where every
/// stage ran on a GPU; else CPU seconds (all threads) where every stage has them, the work
/// done whatever else shared the cores (a run paused or sharing its cores with other work
/// has wall seconds that say little); else wall seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostMeasure {
    Gpu,
    Cpu,
    Wall,
}

impl CostMeasure {
    /// The measure every one of `models` has.
    pub fn of<'a>(models: impl Iterator<Item = &'a ModelResult> + Clone) -> Self {
        if models.clone().all(|m| m.cost.stage_gpu_s > 0.0) {
            CostMeasure::Gpu
        } else if models.clone().all(|m| m.cost.stage_cpu_s > 0.0) {
            CostMeasure::Cpu
        } else {
            CostMeasure::Wall
        }
    }

    /// The stage seconds of `m` in this measure.
    pub fn stage_seconds(self, m: &ModelResult) -> f64 {
        match self {
            CostMeasure::Gpu => m.cost.stage_gpu_s,
            CostMeasure::Cpu => m.cost.stage_cpu_s,
            CostMeasure::Wall => m.cost.stage_wall_s,
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            CostMeasure::Gpu => "GPU seconds",
            CostMeasure::Cpu => "CPU seconds",
            CostMeasure::Wall => "wall seconds",
        }
    }
}

/// A model's numbers on the larger image set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WideResult {
    pub clean: EpsAccuracy,
    pub attacks: Vec<AttackAccuracy>,
}

/// Seconds spent on a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// The stage that made it (training, PTQ or QAT).
    pub stage_wall_s: f64,
    pub stage_gpu_s: f64,
    /// Its evaluation.
    pub eval_wall_s: f64,
    pub eval_gpu_s: f64,
    /// CPU seconds (all threads) of the stage and of the evaluation (0 where not measured).
    #[serde(default)]
    pub stage_cpu_s: f64,
    #[serde(default)]
    pub eval_cpu_s: f64,
    /// Images the stage trained on (calibration images for PTQ).
    pub stage_images: usize,
}

impl ModelResult {
    /// Worst-case accuracy at `eps` (the robust accuracy of the findings).
    pub fn worst_at(&self, eps: f64) -> Option<&EpsAccuracy> {
        at_eps(&self.worst_case, eps)
    }

    /// Whether PACT α ran away in this cell.
    pub fn alpha_ran_away(&self) -> bool {
        self.alpha.as_ref().is_some_and(|a| !a.ran_away.is_empty())
    }

    /// An attack's accuracy at `eps` (`pgd` matches `pgd-10` etc.).
    pub fn attack_at(&self, attack: &str, eps: f64) -> Option<&EpsAccuracy> {
        self.attacks
            .iter()
            .find(|a| is_attack(&a.attack, attack))
            .and_then(|a| at_eps(&a.per_eps, eps))
    }

    /// The worst case over the white-box attacks alone, Square and transfer left out, is
    /// not stored; this is the raw-gradient PGD at `eps`.
    pub fn raw_at(&self, eps: f64) -> Option<&EpsAccuracy> {
        self.raw_pgd.as_ref().and_then(|v| at_eps(v, eps))
    }
}

/// The entry of `v` at `eps` (to 1e-9).
pub fn at_eps(v: &[EpsAccuracy], eps: f64) -> Option<&EpsAccuracy> {
    v.iter().find(|e| (e.eps - eps).abs() < 1e-9)
}

/// A model's numbers across seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedSummary {
    /// The model's id without the seed.
    pub id: String,
    pub seeds: Vec<u64>,
    pub clean_mean: f64,
    /// Student-t 95% interval of the mean across seeds.
    pub clean_ci95: (f64, f64),
    /// Per ε, the worst-case accuracy's mean and interval across seeds.
    pub worst_case: Vec<(f64, f64, (f64, f64))>,
}

/// The study's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyResults {
    pub config: StudyConfig,
    pub data: DataIdentity,
    pub models: Vec<ModelResult>,
    /// Only when the study has several seeds.
    pub across_seeds: Vec<SeedSummary>,
    pub findings: Vec<Verdict>,
    /// Totals and provenance: kind `study`; timings per stage kind.
    pub manifest: Manifest,
    /// An interim document ([`Unfinished::Skip`]): the models of the plan whose stages are
    /// not in the cache yet, left out of everything above. Empty for a finished study.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unfinished: Vec<String>,
}

impl StudyResults {
    pub fn model(&self, spec: &ModelSpec) -> Option<&ModelResult> {
        self.models.iter().find(|m| m.spec == *spec)
    }
}

/// Two-sided 97.5% Student-t quantiles for 1..=30 degrees of freedom (then 1.96).
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::INFINITY
    } else {
        T.get(df - 1).copied().unwrap_or(1.96)
    }
}

/// Mean and Student-t 95% interval of `xs` (at least two values).
pub fn mean_ci95(xs: &[f64]) -> (f64, (f64, f64)) {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, (mean, mean));
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let h = t975(n - 1) * (var / n as f64).sqrt();
    (mean, (mean - h, mean + h))
}

fn seed_summaries(cfg: &StudyConfig, models: &[ModelResult]) -> Vec<SeedSummary> {
    if cfg.seeds.len() < 2 {
        return Vec::new();
    }
    let mut ids: Vec<String> = Vec::new();
    for m in models {
        let id = m.spec.id_without_seed();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids.into_iter()
        .map(|id| {
            let ms: Vec<&ModelResult> = models
                .iter()
                .filter(|m| m.spec.id_without_seed() == id)
                .collect();
            let (clean_mean, clean_ci95) =
                mean_ci95(&ms.iter().map(|m| m.clean.accuracy).collect::<Vec<_>>());
            let worst_case = cfg
                .eval
                .eps
                .iter()
                .map(|&e| {
                    let v: Vec<f64> = ms
                        .iter()
                        .filter_map(|m| m.worst_at(e).map(|a| a.accuracy))
                        .collect();
                    let (mean, ci) = mean_ci95(&v);
                    (e, mean, ci)
                })
                .collect();
            SeedSummary {
                id,
                seeds: ms.iter().map(|m| m.spec.seed()).collect(),
                clean_mean,
                clean_ci95,
                worst_case,
            }
        })
        .collect()
}

/// An attack's accuracies, transfer attacks under one name whatever their source.
fn attack_accuracy(a: &crate::eval::robust::AttackResult) -> AttackAccuracy {
    AttackAccuracy {
        attack: if a.attack.starts_with("transfer") {
            "transfer".into()
        } else {
            a.attack.clone()
        },
        gradient_free: a.gradient_free,
        per_eps: a.per_eps.clone(),
    }
}

/// What [`collect`] does with a model of the plan whose stages are not all in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// An error naming them: the results of a study are those of all its models.
    Refuse,
    /// Leave them out and name them in [`StudyResults::unfinished`]: an interim document of
    /// the finished models, while the study runs.
    Skip,
}

/// Builds the results from the cache; every stage must be there (else the error names the
/// missing ones: run `reproduce` again, or merge the missing shards). The verdicts are left
/// empty: [`super::findings::judged`] adds them.
pub fn collect(
    cfg: &StudyConfig,
    data: &DataIdentity,
    out: &Path,
    device: &candle_core::Device,
) -> Result<StudyResults> {
    collect_with(cfg, data, out, device, Unfinished::Refuse)
}

/// [`collect`], with `unfinished` saying what becomes of the models not finished yet.
pub fn collect_with(
    cfg: &StudyConfig,
    data: &DataIdentity,
    out: &Path,
    device: &candle_core::Device,
    unfinished: Unfinished,
) -> Result<StudyResults> {
    let keys = Keys::new(cfg, data);
    let mut models = Vec::new();
    let mut missing = Vec::new();
    let mut timings: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    for (spec, key) in &keys.models {
        let ek = keys.eval(cfg, spec, data)?;
        let (Some(m), Some(e)) = (
            read_record::<ModelRecord>(out, key)?,
            read_record::<EvalRecord>(out, &ek)?,
        ) else {
            missing.push(spec.id());
            continue;
        };
        let stage = match spec {
            ModelSpec::Fp { .. } => "train",
            ModelSpec::Ptq { .. } => "ptq",
            ModelSpec::Qat { .. } => "qat",
        };
        for (k, w, g) in [(stage, m.wall_s, m.gpu_s), ("eval", e.wall_s, e.gpu_s)] {
            let t = timings.entry(k).or_default();
            t.0 += w;
            t.1 += g;
        }
        let r = &e.report;
        models.push(ModelResult {
            id: spec.id(),
            spec: spec.clone(),
            checkpoint: m.checkpoint.clone(),
            clean: r.clean.clone(),
            attacks: r.attacks.iter().map(attack_accuracy).collect(),
            worst_case: r.worst_case.clone(),
            raw_pgd: e
                .raw
                .as_ref()
                .and_then(|raw| raw.attacks.first().map(|a| a.per_eps.clone())),
            zero_gradient_fraction: r.diagnostics.zero_gradient_fraction,
            raw_zero_gradient_fraction: e
                .raw
                .as_ref()
                .map(|x| x.diagnostics.zero_gradient_fraction),
            masking: r.diagnostics.per_eps.clone(),
            alpha: m
                .details
                .get("alpha_per_epoch")
                .and_then(|v| serde_json::from_value::<Vec<BTreeMap<String, f32>>>(v.clone()).ok())
                .and_then(|h| {
                    AlphaLog::from_history(
                        &h,
                        crate::quant::qat::QatConfig::default().alpha_bounds,
                        cfg.findings.alpha_runaway_factor,
                    )
                }),
            wide: e.wide.as_ref().map(|w| WideResult {
                clean: w.clean.clone(),
                attacks: w.attacks.iter().map(attack_accuracy).collect(),
            }),
            autoattack: e
                .autoattack
                .as_ref()
                .map(|aa| AutoAttackResult::new(r, aa))
                .transpose()?,
            cost: Cost {
                stage_wall_s: m.wall_s,
                stage_gpu_s: m.gpu_s,
                eval_wall_s: e.wall_s,
                eval_gpu_s: e.gpu_s,
                stage_cpu_s: m.cpu_s,
                eval_cpu_s: e.cpu_s,
                stage_images: m.images,
            },
        });
    }
    if !missing.is_empty() && unfinished == Unfinished::Refuse {
        return Err(Error::config(
            "results",
            format!("{} missing", missing.len()),
            format!(
                "these models are not finished in {}: {} (run `reproduce` again, or merge the other shards)",
                out.display(),
                missing.join(", ")
            ),
        ));
    }
    let mut manifest = Manifest::new("study", device);
    manifest.seed = cfg.seeds.first().copied();
    manifest.data = Some(data.clone());
    manifest.config = serde_json::to_value(cfg).unwrap_or_default();
    for (k, (w, g)) in &timings {
        manifest.timings.push(crate::manifest::StageTiming {
            stage: (*k).into(),
            wall_s: *w,
            gpu_s: *g,
        });
    }
    manifest
        .metrics
        .insert("models".into(), models.len() as f64);
    Ok(StudyResults {
        config: cfg.clone(),
        data: data.clone(),
        across_seeds: seed_summaries(cfg, &models),
        models,
        findings: Vec::new(),
        manifest,
        unfinished: missing,
    })
}

/// Writes `results.json` and one `cells/<id>.json` per model (its full records).
pub fn write(res: &StudyResults, out: &Path) -> Result<()> {
    crate::io::write_json_atomic(&out.join("results.json"), res)?;
    let keys = Keys::new(&res.config, &res.data);
    for (spec, key) in &keys.models {
        let ek = keys.eval(&res.config, spec, &res.data)?;
        let m: Option<ModelRecord> = read_record(out, key)?;
        let e: Option<EvalRecord> = read_record(out, &ek)?;
        crate::io::write_json_atomic(
            &out.join("cells").join(format!("{}.json", spec.id())),
            &serde_json::json!({ "model": m, "evaluation": e }),
        )?;
    }
    Ok(())
}
