//! The paper's findings as functions from results to verdicts.
//!
//! Every finding compares robust accuracies: by default the per-example worst case over the
//! straight-through-gradient attacks, Square and the transfer attack (so a "gain" that only
//! fools one attack does not count), at the ε of [`FindingsConfig`]. Counts of the compared
//! groups are pooled (summed) over bit widths, fractions and seeds; the difference of the
//! two pooled proportions gets Newcombe's hybrid-score 95% interval (from the two Wilson
//! intervals; conservative for the paired images of this study). A verdict is
//! - `holds` when the interval lies on the side the finding claims,
//! - `does not hold` when it lies on the other side (or a second condition fails),
//! - `undecided` when it contains zero,
//! - `not tested` when the study has none of the cells the finding needs.
//!
//! [`FindingsConfig`]: super::config::FindingsConfig

use super::config::{BitsSweep, Init};
use super::plan::ModelSpec;
use super::results::{CostMeasure, ModelResult, StudyResults};
pub use super::verdict::{Number, Status, Verdict};
use crate::attack::eps_label;
use crate::eval::{wilson95, Accuracy};
use serde::{Deserialize, Serialize};

/// Newcombe's hybrid-score 95% interval of p1 − p2 for independent proportions.
pub fn diff_ci95(a: Accuracy, b: Accuracy) -> (f64, (f64, f64)) {
    let (p1, p2) = (a.fraction(), b.fraction());
    let (l1, u1) = wilson95(a.correct, a.total);
    let (l2, u2) = wilson95(b.correct, b.total);
    let d = p1 - p2;
    let lo = d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt();
    let hi = d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt();
    (d, (lo, hi))
}

/// `holds` when the interval is above zero, `does not hold` below, else `undecided`.
pub fn decide(ci: (f64, f64)) -> Status {
    if ci.0 > 0.0 {
        Status::Holds
    } else if ci.1 < 0.0 {
        Status::DoesNotHold
    } else {
        Status::Undecided
    }
}

fn add(a: Accuracy, b: Accuracy) -> Accuracy {
    Accuracy {
        correct: a.correct + b.correct,
        total: a.total + b.total,
    }
}

fn zero() -> Accuracy {
    Accuracy {
        correct: 0,
        total: 0,
    }
}

fn worst(m: &ModelResult, eps: f64) -> Option<Accuracy> {
    m.worst_at(eps).map(|e| Accuracy {
        correct: e.correct,
        total: e.total,
    })
}

/// Every finding, F1 to F6.
pub fn all(r: &StudyResults) -> Vec<Verdict> {
    vec![f1(r), f2(r), f3(r), f4(r), f5(r), f6(r)]
}

/// The results with their verdicts (see [`all`]).
pub fn judged(mut r: StudyResults) -> StudyResults {
    r.findings = all(&r);
    r
}

/// Pooled comparison of pairs of models (first − second).
struct Pooled {
    a: Accuracy,
    b: Accuracy,
    numbers: Vec<Number>,
    /// Pairs left out because a cell's PACT α ran away.
    excluded: Vec<String>,
}

fn pool(r: &StudyResults, pairs: &[(ModelSpec, ModelSpec)], eps: f64) -> Pooled {
    let mut p = Pooled {
        a: zero(),
        b: zero(),
        numbers: Vec::new(),
        excluded: Vec::new(),
    };
    for (sa, sb) in pairs {
        let (Some(ma), Some(mb)) = (r.model(sa), r.model(sb)) else {
            continue;
        };
        if ma.alpha_ran_away() || mb.alpha_ran_away() {
            p.excluded.push(format!("{} vs {}", ma.id, mb.id));
            continue;
        }
        let (Some(a), Some(b)) = (worst(ma, eps), worst(mb, eps)) else {
            continue;
        };
        p.a = add(p.a, a);
        p.b = add(p.b, b);
        p.numbers.push(Number::count(ma.id.clone(), a));
        p.numbers.push(Number::count(mb.id.clone(), b));
    }
    p
}

fn pooled_verdict(
    id: &str,
    claim: &str,
    measure: String,
    p: Pooled,
    labels: (&str, &str),
) -> Verdict {
    if p.a.total == 0 || p.b.total == 0 {
        let why = if p.excluded.is_empty() {
            "the study has none of the cells this finding compares".to_string()
        } else {
            format!("every pair was {}", excluded_note(&p.excluded))
        };
        return Verdict::not_tested(id, claim, &why);
    }
    let (d, ci) = diff_ci95(p.a, p.b);
    let mut numbers = vec![
        Number::count(format!("pooled {}", labels.0), p.a),
        Number::count(format!("pooled {}", labels.1), p.b),
    ];
    numbers.extend(p.numbers);
    Verdict {
        id: id.into(),
        claim: claim.into(),
        status: decide(ci),
        measure,
        margin: Some(d),
        margin_ci95: Some(ci),
        numbers,
        note: excluded_note(&p.excluded),
    }
}

fn excluded_note(excluded: &[String]) -> String {
    if excluded.is_empty() {
        String::new()
    } else {
        format!("left out, PACT α ran away: {}", excluded.join("; "))
    }
}

const F1: &str = "Activation quantization gives a larger robustness gain than weight quantization";

/// F1: QAT with only activations quantized (W32Ab) is more robust than with only weights
/// quantized (WbA32), over the bits sweep.
pub fn f1(r: &StudyResults) -> Verdict {
    let s = &r.config.grid.bits_sweep;
    let eps = r.config.findings.f1_eps;
    let mut pairs = Vec::new();
    for &seed in &r.config.seeds {
        for &b in &s.bits {
            let cell = |bits| ModelSpec::Qat {
                init: s.init,
                bits,
                adversarial: s.adversarial,
                fraction: s.fraction,
                seed,
            };
            let (activations_only, weights_only) = BitsSweep::pair(b);
            pairs.push((cell(activations_only), cell(weights_only)));
        }
    }
    pooled_verdict(
        "F1",
        F1,
        format!(
            "worst-case robust accuracy at ε {}: QAT W32Ab (activations only) − WbA32 (weights only), b ∈ {:?}, {} init",
            eps_label(eps),
            s.bits,
            s.init
        ),
        pool(r, &pairs, eps),
        ("activations only", "weights only"),
    )
}

const F2: &str = "Robust initialization helps: PTQ of a robust model keeps robustness that PTQ of a natural model does not have";

/// F2: PTQ from robust init vs PTQ from natural init, same bits.
pub fn f2(r: &StudyResults) -> Verdict {
    let eps = r.config.findings.eps;
    let mut pairs = Vec::new();
    for &seed in &r.config.seeds {
        for &bits in &r.config.grid.ptq_table.bits {
            let cell = |init| ModelSpec::Ptq { init, bits, seed };
            pairs.push((cell(Init::Robust), cell(Init::Natural)));
        }
    }
    let mut v = pooled_verdict(
        "F2",
        F2,
        format!(
            "worst-case robust accuracy at ε {}: PTQ from robust init − PTQ from natural init, bits {}",
            eps_label(eps),
            r.config
                .grid
                .ptq_table
                .bits
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        pool(r, &pairs, eps),
        ("robust init", "natural init"),
    );
    // How much of the robust FP model's robustness PTQ keeps, per bit width.
    let mut kept = Vec::new();
    for &seed in &r.config.seeds {
        let fp = r.model(&ModelSpec::Fp {
            init: Init::Robust,
            seed,
        });
        for (qa, _) in pairs.iter().filter(|(a, _)| a.seed() == seed) {
            if let (Some(fp), Some(q)) = (fp, r.model(qa)) {
                if let (Some(f), Some(qv)) = (fp.worst_at(eps), q.worst_at(eps)) {
                    if f.accuracy > 0.0 {
                        kept.push(Number::value(
                            format!("{}: robustness kept vs {}", q.id, fp.id),
                            qv.accuracy / f.accuracy,
                        ));
                    }
                }
            }
        }
    }
    v.numbers.extend(kept);
    v
}

const F3: &str = "Adversarial training inside QAT buys robustness at a large computational cost";

/// F3: QAT+AT vs QAT (same init and bits): robustness gained, and the cost ratio.
pub fn f3(r: &StudyResults) -> Verdict {
    let eps = r.config.findings.eps;
    let t = &r.config.grid.qat_table;
    let mut pairs = Vec::new();
    for &seed in &r.config.seeds {
        for &init in &t.inits {
            for &bits in &t.bits {
                let cell = |adversarial| ModelSpec::Qat {
                    init,
                    bits,
                    adversarial,
                    fraction: t.fraction,
                    seed,
                };
                pairs.push((cell(true), cell(false)));
            }
        }
    }
    let both: Vec<(&ModelResult, &ModelResult)> = pairs
        .iter()
        .filter_map(|(a, b)| Some((r.model(a)?, r.model(b)?)))
        .collect();
    let measure = CostMeasure::of(both.iter().flat_map(|&(a, b)| [a, b]));
    let (cost_at, cost_nat) = both.iter().fold((0.0, 0.0), |(x, y), &(a, b)| {
        (x + measure.stage_seconds(a), y + measure.stage_seconds(b))
    });
    let mut v = pooled_verdict(
        "F3",
        F3,
        format!(
            "worst-case robust accuracy at ε {}: QAT with AT − QAT without, same init and bits; and the stage-cost ratio (≥ {} counts as large)",
            eps_label(eps),
            r.config.findings.f3_min_cost_ratio
        ),
        pool(r, &pairs, eps),
        ("QAT+AT", "QAT"),
    );
    if v.status == Status::NotTested {
        return v;
    }
    let ratio = if cost_nat > 0.0 {
        cost_at / cost_nat
    } else {
        f64::NAN
    };
    v.numbers
        .insert(0, Number::value("cost AT-QAT / QAT", ratio));
    v.numbers.insert(
        1,
        Number::value(format!("stage {}, AT-QAT (sum)", measure.unit()), cost_at),
    );
    v.numbers.insert(
        2,
        Number::value(format!("stage {}, QAT (sum)", measure.unit()), cost_nat),
    );
    let large = ratio >= r.config.findings.f3_min_cost_ratio; // false for NaN
    if v.status == Status::Holds && !large {
        v.status = Status::DoesNotHold;
        v.note = format!(
            "AT bought robustness but cost only {ratio:.2}x in {} (threshold {})",
            measure.unit(),
            r.config.findings.f3_min_cost_ratio
        );
    } else {
        v.note = format!("cost ratio {ratio:.2}x in {}", measure.unit());
    }
    v
}

const F4: &str =
    "Starting QAT from a robust model reaches robust performance with partial data (vs natural or random init)";

/// F4: along the data curve, robust init vs each other init at the partial fractions; the
/// verdict takes the weaker of the two comparisons.
pub fn f4(r: &StudyResults) -> Verdict {
    let c = &r.config.grid.data_curve;
    let eps = r.config.findings.eps;
    let partial: Vec<f64> = c
        .fractions
        .iter()
        .copied()
        .filter(|&f| f <= r.config.findings.f4_partial_max && f < 1.0)
        .collect();
    let cell = |init, fraction, seed| ModelSpec::Qat {
        init,
        bits: c.bits,
        adversarial: c.adversarial,
        fraction,
        seed,
    };
    if !c.inits.contains(&Init::Robust) || partial.is_empty() {
        return Verdict::not_tested(
            "F4",
            F4,
            "the data curve has no robust init or no partial fraction",
        );
    }
    let others: Vec<Init> = c
        .inits
        .iter()
        .copied()
        .filter(|&i| i != Init::Robust)
        .collect();
    let mut best: Option<Verdict> = None;
    for other in others {
        let mut pairs = Vec::new();
        for &seed in &r.config.seeds {
            for &f in &partial {
                pairs.push((cell(Init::Robust, f, seed), cell(other, f, seed)));
            }
        }
        let v = pooled_verdict(
            "F4",
            F4,
            format!(
                "worst-case robust accuracy at ε {}: QAT{} {} from robust init − from {other} init, fractions {:?} (the weaker of the comparisons decides)",
                eps_label(eps),
                if c.adversarial { "+AT" } else { "" },
                c.bits,
                partial
            ),
            pool(r, &pairs, eps),
            ("robust init", &format!("{other} init")),
        );
        let weaker = match &best {
            None => true,
            Some(b) => v.margin_ci95.map(|x| x.0) < b.margin_ci95.map(|x| x.0),
        };
        if weaker {
            best = Some(v);
        }
    }
    let mut v =
        best.unwrap_or_else(|| Verdict::not_tested("F4", F4, "the data curve has one init only"));
    // How close robust init gets to its own full-data robustness at each partial fraction.
    for &seed in &r.config.seeds {
        if let Some(full) = r
            .model(&cell(Init::Robust, 1.0, seed))
            .and_then(|m| m.worst_at(eps))
        {
            for &f in &partial {
                if let Some(p) = r
                    .model(&cell(Init::Robust, f, seed))
                    .and_then(|m| m.worst_at(eps))
                {
                    if full.accuracy > 0.0 {
                        v.numbers.push(Number::value(
                            format!("robust init, fraction {f}: share of its full-data robustness (seed {seed})"),
                            p.accuracy / full.accuracy,
                        ));
                    }
                }
            }
        }
    }
    v
}

const F5: &str = "Whether quantization helps, hurts or does nothing to robustness depends on the pipeline (init, method, AT)";

/// How a quantized cell compares with its full-precision reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Helps,
    Hurts,
    NoDetectableEffect,
}

/// A cell's effect: its worst-case robust accuracy against its reference's at `eps`.
pub fn effect(r: &StudyResults, m: &ModelResult, eps: f64) -> Option<(Effect, f64, (f64, f64))> {
    let reference = r.model(&m.spec.reference()?)?;
    let (d, ci) = diff_ci95(worst(m, eps)?, worst(reference, eps)?);
    let e = match decide(ci) {
        Status::Holds => Effect::Helps,
        Status::DoesNotHold => Effect::Hurts,
        _ => Effect::NoDetectableEffect,
    };
    Some((e, d, ci))
}

/// F5: the grid's cells fall into more than one class (helps / hurts / no effect), with at
/// least one significant.
pub fn f5(r: &StudyResults) -> Verdict {
    let eps = r.config.findings.eps;
    let mut counts = [0usize; 3];
    let mut numbers = Vec::new();
    let mut excluded = Vec::new();
    for m in r.models.iter().filter(|m| m.spec.is_quantized()) {
        if m.alpha_ran_away() {
            excluded.push(m.id.clone());
            continue;
        }
        if let Some((e, d, _)) = effect(r, m, eps) {
            counts[e as usize] += 1;
            numbers.push(Number::value(format!("{} ({e:?})", m.id), d));
        }
    }
    let total: usize = counts.iter().sum();
    if total == 0 {
        return Verdict::not_tested("F5", F5, "no quantized cell with a reference model");
    }
    let classes = counts.iter().filter(|&&c| c > 0).count();
    let significant = counts[0] + counts[1] > 0;
    let status = if classes >= 2 && significant {
        Status::Holds
    } else {
        Status::DoesNotHold
    };
    let mut all = vec![
        Number::value("cells where quantization helps", counts[0] as f64),
        Number::value("cells where quantization hurts", counts[1] as f64),
        Number::value("cells with no detectable effect", counts[2] as f64),
    ];
    all.extend(numbers);
    Verdict {
        id: "F5".into(),
        claim: F5.into(),
        status,
        measure: format!(
            "per quantized cell: worst-case robust accuracy at ε {} − its full-precision reference's (parent; for random init the FP model trained the same way), classified by its 95% interval",
            eps_label(eps)
        ),
        margin: None,
        margin_ci95: None,
        numbers: all,
        note: if excluded.is_empty() {
            format!("{classes} of 3 classes present")
        } else {
            format!(
                "{classes} of 3 classes present; left out, PACT α ran away: {}",
                excluded.join(", ")
            )
        },
    }
}

const F6: &str = "Part of the apparent robustness of quantized models is gradient masking: raw gradients through the quantizers overstate it";

/// F6: per quantized model, PGD with raw gradients vs the worst case of STE attacks,
/// Square and transfer. Holds when at least one model's raw-gradient accuracy is
/// significantly higher (its "robustness" is masking); the margin is the largest gap.
pub fn f6(r: &StudyResults) -> Verdict {
    let eps = r.config.findings.eps;
    let mut numbers = Vec::new();
    let mut masked = Vec::new();
    let mut best: Option<(f64, (f64, f64))> = None;
    let mut tested = 0;
    for m in r.models.iter().filter(|m| m.spec.is_quantized()) {
        // Per model, so AutoAttack may sharpen the worst case where it ran.
        let with_aa = m
            .autoattack
            .as_ref()
            .and_then(|a| a.at(eps))
            .and_then(|e| e.worst_with_autoattack.as_ref())
            .map(|e| Accuracy {
                correct: e.correct,
                total: e.total,
            });
        let (Some(raw), Some(w)) = (m.raw_at(eps), with_aa.or_else(|| worst(m, eps))) else {
            continue;
        };
        tested += 1;
        let raw = Accuracy {
            correct: raw.correct,
            total: raw.total,
        };
        let (d, ci) = diff_ci95(raw, w);
        if decide(ci) == Status::Holds {
            masked.push(m.id.clone());
        }
        if best.is_none_or(|(bd, _)| d > bd) {
            best = Some((d, ci));
        }
        numbers.push(Number::value(format!("{}: raw PGD − worst case", m.id), d));
    }
    if tested == 0 {
        return Verdict::not_tested(
            "F6",
            F6,
            "no quantized model was attacked with raw gradients",
        );
    }
    let status = if !masked.is_empty() {
        Status::Holds
    } else if best.is_some_and(|(d, _)| d > 0.0) {
        // A gap in the claimed direction, but within noise.
        Status::Undecided
    } else {
        Status::DoesNotHold
    };
    let mut all = vec![
        Number::value("quantized models tested", tested as f64),
        Number::value(
            "models whose raw-gradient robustness is masking",
            masked.len() as f64,
        ),
    ];
    all.extend(numbers);
    Verdict {
        id: "F6".into(),
        claim: F6.into(),
        status,
        measure: format!(
            "per quantized model at ε {}: PGD accuracy with raw gradients − worst case over STE attacks, Square and transfer (and AutoAttack where it ran) (largest gap shown as the margin)",
            eps_label(eps)
        ),
        margin: best.map(|b| b.0),
        margin_ci95: best.map(|b| b.1),
        numbers: all,
        note: if masked.is_empty() {
            "no model's raw-gradient robustness is significantly above the worst case".into()
        } else {
            format!("masking in: {}", masked.join(", "))
        },
    }
}
