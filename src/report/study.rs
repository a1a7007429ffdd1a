//! `report.md` and its plots, drawn from a [`StudyResults`] only (so `quant-robust report
//! DIR` can redraw them without running anything).

use std::fmt::Write as _;
use std::path::Path;

use super::plots::{LinePlot, Series};
use crate::attack::eps_label;
use crate::eval::robust::EpsAccuracy;
use crate::study::config::BitsSweep;
use crate::study::config::Init;
use crate::study::findings::{effect, Status};
use crate::study::plan::ModelSpec;
use crate::study::results::{CostMeasure, ModelResult, StudyResults};
use crate::Result;

fn pct(a: &EpsAccuracy) -> String {
    format!(
        "{:.1} ({:.1}–{:.1})",
        100.0 * a.accuracy,
        100.0 * a.ci95.0,
        100.0 * a.ci95.1
    )
}

fn opt_pct(a: Option<&EpsAccuracy>) -> String {
    a.map(pct).unwrap_or_else(|| "–".into())
}

/// A markdown table.
fn table(head: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

fn worst_cols(res: &StudyResults) -> Vec<String> {
    res.config
        .eval
        .eps
        .iter()
        .map(|&e| format!("robust {} (worst case)", eps_label(e)))
        .collect()
}

fn model_row(res: &StudyResults, m: &ModelResult, lead: Vec<String>) -> Vec<String> {
    let mut row = lead;
    row.push(pct(&m.clean));
    for &e in &res.config.eval.eps {
        row.push(opt_pct(m.worst_at(e)));
    }
    row
}

/// PACT α per activation site of every QAT cell that has one, start → end, and the cells
/// where it ran away.
fn alpha_section(s: &mut String, res: &StudyResults) {
    let cells: Vec<&ModelResult> = res.models.iter().filter(|m| m.alpha.is_some()).collect();
    let Some(first) = cells.first().and_then(|m| m.alpha.as_ref()) else {
        return;
    };
    let _ = writeln!(
        s,
        "\n## PACT α per layer (start → after the last epoch)\n\n\
         α \"ran away\" when it ends at a bound of its clamp or more than {}× above its start; \
         such cells are left out of the pooled verdicts.\n",
        res.config.findings.alpha_runaway_factor
    );
    let ran: Vec<String> = cells
        .iter()
        .filter(|m| m.alpha_ran_away())
        .map(|m| {
            let a = m
                .alpha
                .as_ref()
                .map(|a| a.ran_away.join(", "))
                .unwrap_or_default();
            format!("`{}` ({a})", m.id)
        })
        .collect();
    let _ = writeln!(
        s,
        "Ran away: {}.\n",
        if ran.is_empty() {
            "none".to_string()
        } else {
            ran.join("; ")
        }
    );
    let mut head = vec!["site".to_string()];
    head.extend(cells.iter().map(|m| m.id.clone()));
    let rows: Vec<Vec<String>> = first
        .start
        .keys()
        .map(|site| {
            let mut row = vec![site.clone()];
            for m in &cells {
                let a = m.alpha.as_ref();
                let v = |map: Option<&std::collections::BTreeMap<String, f32>>| {
                    map.and_then(|x| x.get(site))
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_else(|| "–".into())
                };
                let flag = a.is_some_and(|a| a.ran_away.contains(site));
                row.push(format!(
                    "{} → {}{}",
                    v(a.map(|a| &a.start)),
                    v(a.map(|a| &a.end)),
                    if flag { " **ran away**" } else { "" }
                ));
            }
            row
        })
        .collect();
    s.push_str(&table(&head, &rows));
}

/// The cheap attacks on the larger image set (`eval.wide`).
fn wide_section(s: &mut String, res: &StudyResults) {
    let Some(w) = res.config.eval.wide.as_ref() else {
        return;
    };
    let n = res
        .models
        .iter()
        .find_map(|m| m.wide.as_ref().map(|w| w.clean.total))
        .unwrap_or(0);
    let _ = writeln!(
        s,
        "\n## Clean and {:?} on {n} test images\n\nThe same models on more images (straight-through gradients; not the per-example worst case, which the findings use).\n",
        w.attacks
    );
    let mut head = vec!["model".to_string(), "clean".into()];
    let attacks: Vec<String> = res
        .models
        .iter()
        .find_map(|m| m.wide.as_ref())
        .map(|w| w.attacks.iter().map(|a| a.attack.clone()).collect())
        .unwrap_or_default();
    for a in &attacks {
        for &e in &w.eps {
            head.push(format!("{a} {}", eps_label(e)));
        }
    }
    let rows: Vec<Vec<String>> = res
        .models
        .iter()
        .filter_map(|m| {
            let mw = m.wide.as_ref()?;
            let mut row = vec![m.id.clone(), pct(&mw.clean)];
            for a in &attacks {
                for &e in &w.eps {
                    row.push(opt_pct(
                        mw.attacks
                            .iter()
                            .find(|x| &x.attack == a)
                            .and_then(|x| x.per_eps.iter().find(|p| (p.eps - e).abs() < 1e-9)),
                    ));
                }
            }
            Some(row)
        })
        .collect();
    s.push_str(&table(&head, &rows));
}

/// AutoAttack beside PGD, APGD-CE and the worst case of the other attacks, on the same
/// images (`eval.autoattack`).
fn autoattack_section(s: &mut String, res: &StudyResults) {
    let cells: Vec<&ModelResult> = res
        .models
        .iter()
        .filter(|m| m.autoattack.is_some())
        .collect();
    let Some(first) = cells.first().and_then(|m| m.autoattack.as_ref()) else {
        return;
    };
    let stages: Vec<String> = first
        .per_eps
        .first()
        .map(|e| e.after_stage.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "\n## AutoAttack ({}), the robustness number of record\n\n\
         On the same images as the other attacks. \"worst + AA\" is the per-example worst \
         case of everything; \"after <stage>\" is the cascade's accuracy after that stage; \
         \"Square only\" counts images that only a gradient-free attack or stage broke (the \
         masking diagnostic over all attacks; \"(flag)\" above the masking threshold). The \
         findings F1-F5 use the worst case of the main attacks, which every model has; F6 \
         uses the worst case with AutoAttack where it ran.\n",
        first.attack,
    );
    let mut head: Vec<String> = [
        "model",
        "ε",
        "clean",
        "PGD",
        "APGD-CE",
        "worst case",
        "AutoAttack",
        "worst + AA",
    ]
    .map(String::from)
    .to_vec();
    head.extend(stages.iter().map(|n| format!("after {n}")));
    head.push("Square only".into());
    let mut rows = Vec::new();
    for m in &cells {
        let Some(a) = &m.autoattack else { continue };
        for e in &a.per_eps {
            let mut row = vec![
                m.id.clone(),
                eps_label(e.eps),
                pct(&m.clean),
                opt_pct(e.pgd.as_ref()),
                opt_pct(e.apgd_ce.as_ref()),
                opt_pct(e.worst_case.as_ref()),
                pct(&e.autoattack),
                opt_pct(e.worst_with_autoattack.as_ref()),
            ];
            row.extend(
                e.after_stage
                    .iter()
                    .map(|(_, x)| format!("{:.1}", 100.0 * x.accuracy)),
            );
            row.push(format!(
                "{}{}",
                e.masking.broken_only_without_gradients,
                if e.masking.masking_suspected {
                    " (flag)"
                } else {
                    ""
                }
            ));
            rows.push(row);
        }
    }
    s.push_str(&table(&head, &rows));
}

/// The report's markdown.
pub fn markdown(res: &StudyResults) -> String {
    let mut s = String::new();
    header(&mut s, res);
    findings_section(&mut s, res);
    fp_section(&mut s, res);
    ptq_section(&mut s, res);
    qat_section(&mut s, res);
    bits_section(&mut s, res);
    data_curve_section(&mut s, res);
    cost_section(&mut s, res);
    masking_section(&mut s, res);
    alpha_section(&mut s, res);
    wide_section(&mut s, res);
    autoattack_section(&mut s, res);
    seeds_section(&mut s, res);
    s.push_str(
        "\n## Plots\n\n![robust accuracy vs eps](plots/eps.svg)\n\n![robust accuracy vs bits](plots/bits.svg)\n\n![robust accuracy vs data fraction](plots/fraction.svg)\n",
    );
    s
}

/// The title, the smoke warning, the provenance and what the numbers are.
fn header(s: &mut String, res: &StudyResults) {
    let c = &res.config;
    let man = &res.manifest;
    let _ = writeln!(s, "# quant-robust study `{}`\n", c.name);
    if !res.unfinished.is_empty() {
        let _ = writeln!(
            s,
            "> **Interim.** {} of the plan's {} models are evaluated; these are not yet: {}. \
             Every table and verdict below uses the finished models only: a finding whose cells \
             are missing is *not tested*, and a pooled verdict can still move as cells finish.\n",
            res.models.len(),
            res.models.len() + res.unfinished.len(),
            res.unfinished.join(", ")
        );
    }
    if res.data.is_sample() {
        s.push_str(
            "> **Smoke run.** Tiny models trained for seconds on the embedded 2,000-image sample and \
             evaluated on a few dozen images: the numbers and verdicts below mean nothing about the paper. \
             This run only proves that the whole pipeline works end to end.\n\n",
        );
    }
    let _ = writeln!(
        s,
        "Data `{}` ({} train / {} test images, test split sha256 `{}`); device `{}`; code {} {} (commit {}{}); seeds {:?}; {} models.\n",
        res.data.name,
        res.data.n_train,
        res.data.n_test,
        &res.data.test_sha256[..res.data.test_sha256.len().min(16)],
        man.device,
        man.code.name,
        man.code.version,
        man.code.git_commit,
        if man.code.git_dirty { ", dirty tree" } else { "" },
        c.seeds,
        res.models.len()
    );
    let n_eval = res.models.first().map(|m| m.clean.total).unwrap_or(0);
    let _ = writeln!(
        s,
        "Every accuracy is in % over {n_eval} test images (seeded, class-stratified) with its Wilson 95% interval. \
         \"Worst case\" is per example over the attacks {:?} with straight-through gradients, plus the transfer attack \
         from the full-precision reference model. Attacks: PGD {} steps (step ε/4), APGD {} iterations, Square {} queries.\n",
        c.eval.attacks,
        c.eval.settings.pgd_steps,
        c.eval.settings.apgd_iterations,
        c.eval.settings.square_queries,
    );
}

/// The verdicts F1-F6.
fn findings_section(s: &mut String, res: &StudyResults) {
    // Findings.
    s.push_str("## Findings\n\n");
    let rows: Vec<Vec<String>> = res
        .findings
        .iter()
        .map(|v| {
            let verdict = match v.status {
                Status::Holds => "**holds**".to_string(),
                Status::DoesNotHold => "**does not hold**".to_string(),
                other => other.to_string(),
            };
            let margin = match (v.margin, v.margin_ci95) {
                (Some(m), Some(ci)) => format!(
                    "{:+.1} pp ({:+.1} to {:+.1})",
                    100.0 * m,
                    100.0 * ci.0,
                    100.0 * ci.1
                ),
                _ => "–".into(),
            };
            vec![
                v.id.clone(),
                v.claim.clone(),
                verdict,
                margin,
                format!("{} {}", v.measure, v.note).trim().to_string(),
            ]
        })
        .collect();
    s.push_str(&table(
        &["id", "claim", "verdict", "margin (95% CI)", "measured as"].map(String::from),
        &rows,
    ));
    s.push_str(
        "\nThe numbers behind each verdict are in `results.json` (`findings[].numbers`).\n\n",
    );
}

/// The full-precision models.
fn fp_section(s: &mut String, res: &StudyResults) {
    // Full-precision models.
    s.push_str("## Full-precision models\n\n");
    let mut head = vec!["model".to_string(), "clean".into()];
    head.extend(worst_cols(res));
    let rows: Vec<Vec<String>> = res
        .models
        .iter()
        .filter(|m| !m.spec.is_quantized())
        .map(|m| model_row(res, m, vec![m.id.clone()]))
        .collect();
    s.push_str(&table(&head, &rows));
}

/// The PTQ table.
fn ptq_section(s: &mut String, res: &StudyResults) {
    // PTQ table.
    s.push_str("\n## PTQ (PWLQ weights, calibrated uniform activations)\n\n");
    let mut head = vec![
        "init".to_string(),
        "bits".into(),
        "seed".into(),
        "clean".into(),
    ];
    head.extend(worst_cols(res));
    let rows: Vec<Vec<String>> = res
        .models
        .iter()
        .filter(|m| matches!(m.spec, ModelSpec::Ptq { .. }))
        .map(|m| {
            model_row(
                res,
                m,
                vec![
                    m.spec.init().to_string(),
                    m.spec.bits().to_string(),
                    m.spec.seed().to_string(),
                ],
            )
        })
        .collect();
    s.push_str(&table(&head, &rows));
}

/// The QAT table.
fn qat_section(s: &mut String, res: &StudyResults) {
    let c = &res.config;
    // QAT table.
    let t = &c.grid.qat_table;
    let _ = writeln!(
        s,
        "\n## QAT (PACT activations, DoReFa weights), fraction {}\n",
        t.fraction
    );
    let mut head = vec![
        "init".to_string(),
        "AT".into(),
        "bits".into(),
        "seed".into(),
        "clean".into(),
    ];
    head.extend(worst_cols(res));
    let mut rows = Vec::new();
    for &seed in &c.seeds {
        for &init in &t.inits {
            for &adversarial in &t.adversarial {
                for &bits in &t.bits {
                    let spec = ModelSpec::Qat {
                        init,
                        bits,
                        adversarial,
                        fraction: t.fraction,
                        seed,
                    };
                    if let Some(m) = res.model(&spec) {
                        rows.push(model_row(
                            res,
                            m,
                            vec![
                                init.to_string(),
                                if adversarial { "yes" } else { "no" }.into(),
                                m.spec.bits().to_string(),
                                seed.to_string(),
                            ],
                        ));
                    }
                }
            }
        }
    }
    s.push_str(&table(&head, &rows));
}

/// The bits sweep (the paper's Figure 2 analog).
fn bits_section(s: &mut String, res: &StudyResults) {
    let c = &res.config;
    // Figure 2 analog.
    let b = &c.grid.bits_sweep;
    let e1 = c.findings.f1_eps;
    let _ = writeln!(
        s,
        "\n## Activations-only vs weights-only quantization (the paper's Figure 2 analog)\n\n\
         QAT from {} init{}, fraction {}; robust accuracy at ε {} per attack. Plot: `plots/bits.svg`.\n",
        b.init,
        if b.adversarial { " with AT" } else { "" },
        b.fraction,
        eps_label(e1)
    );
    let attacks: Vec<String> = res
        .models
        .iter()
        .find(|m| m.spec.is_quantized())
        .map(|m| m.attacks.iter().map(|a| a.attack.clone()).collect())
        .unwrap_or_default();
    let mut head = vec!["bits".to_string(), "quantized".into(), "clean".into()];
    head.extend(attacks.iter().cloned());
    head.push("worst case".into());
    let mut rows = Vec::new();
    for &seed in &c.seeds {
        for &bits in &b.bits {
            let (activations_only, weights_only) = BitsSweep::pair(bits);
            for (what, name) in [("activations", activations_only), ("weights", weights_only)] {
                let spec = ModelSpec::Qat {
                    init: b.init,
                    bits: name,
                    adversarial: b.adversarial,
                    fraction: b.fraction,
                    seed,
                };
                if let Some(m) = res.model(&spec) {
                    let mut row = vec![bits.to_string(), what.into(), pct(&m.clean)];
                    for a in &attacks {
                        row.push(opt_pct(m.attack_at(a, e1)));
                    }
                    row.push(opt_pct(m.worst_at(e1)));
                    rows.push(row);
                }
            }
        }
    }
    s.push_str(&table(&head, &rows));
}

/// The data curve.
fn data_curve_section(s: &mut String, res: &StudyResults) {
    let c = &res.config;
    // Data curve.
    let d = &c.grid.data_curve;
    let e = c.findings.eps;
    let _ = writeln!(
        s,
        "\n## Robustness vs training-data fraction (QAT{} {})\n\nWorst-case robust accuracy at ε {} (clean in brackets). Plot: `plots/fraction.svg`.\n",
        if d.adversarial { "+AT" } else { "" },
        d.bits,
        eps_label(e)
    );
    let mut head = vec!["fraction".to_string()];
    head.extend(d.inits.iter().map(|i| format!("{i} init")));
    let mut rows = Vec::new();
    for &seed in &c.seeds {
        for &f in &d.fractions {
            let mut row = vec![if c.seeds.len() > 1 {
                format!("{f} (seed {seed})")
            } else {
                f.to_string()
            }];
            for &init in &d.inits {
                let spec = ModelSpec::Qat {
                    init,
                    bits: d.bits,
                    adversarial: d.adversarial,
                    fraction: f,
                    seed,
                };
                row.push(
                    res.model(&spec)
                        .map(|m| {
                            format!(
                                "{} [{:.1}]",
                                opt_pct(m.worst_at(e)),
                                100.0 * m.clean.accuracy
                            )
                        })
                        .unwrap_or_else(|| "–".into()),
                );
            }
            rows.push(row);
        }
    }
    s.push_str(&table(&head, &rows));
}

/// The cost per model and the totals.
fn cost_section(s: &mut String, res: &StudyResults) {
    // Cost.
    let gpu = res.models.iter().any(|m| m.cost.stage_gpu_s > 0.0);
    let unit = if gpu { "GPU-s" } else { "CPU wall s" };
    let _ = writeln!(
        s,
        "\n## Cost ({unit})\n\nStage = training (FP), calibration + quantization (PTQ) or fine-tuning (QAT).\n"
    );
    let head = [
        "model",
        "stage images",
        "stage",
        "evaluation",
        "stage CPU s",
        "evaluation CPU s",
        "AT-QAT / QAT (stage)",
    ]
    .map(String::from);
    let rows: Vec<Vec<String>> = res
        .models
        .iter()
        .map(|m| {
            let cost = |w: f64, g: f64| if gpu { g } else { w };
            let ratio = match &m.spec {
                ModelSpec::Qat {
                    init,
                    bits,
                    adversarial: true,
                    fraction,
                    seed,
                } => res
                    .model(&ModelSpec::Qat {
                        init: *init,
                        bits: *bits,
                        adversarial: false,
                        fraction: *fraction,
                        seed: *seed,
                    })
                    .map(|n| {
                        let k = CostMeasure::of([m, n].into_iter());
                        format!(
                            "{:.2}x in {}",
                            k.stage_seconds(m) / k.stage_seconds(n).max(1e-9),
                            k.unit()
                        )
                    })
                    .unwrap_or_else(|| "–".into()),
                _ => "–".into(),
            };
            vec![
                m.id.clone(),
                m.cost.stage_images.to_string(),
                format!("{:.1}", cost(m.cost.stage_wall_s, m.cost.stage_gpu_s)),
                format!("{:.1}", cost(m.cost.eval_wall_s, m.cost.eval_gpu_s)),
                format!("{:.0}", m.cost.stage_cpu_s),
                format!("{:.0}", m.cost.eval_cpu_s),
                ratio,
            ]
        })
        .collect();
    let total = |f: fn(&ModelResult) -> f64| res.models.iter().map(f).sum::<f64>();
    let mut rows = rows;
    rows.push(vec![
        "**total**".into(),
        String::new(),
        format!(
            "{:.1}",
            if gpu {
                total(|m| m.cost.stage_gpu_s)
            } else {
                total(|m| m.cost.stage_wall_s)
            }
        ),
        format!(
            "{:.1}",
            if gpu {
                total(|m| m.cost.eval_gpu_s)
            } else {
                total(|m| m.cost.eval_wall_s)
            }
        ),
        format!("{:.0}", total(|m| m.cost.stage_cpu_s)),
        format!("{:.0}", total(|m| m.cost.eval_cpu_s)),
        String::new(),
    ]);
    s.push_str(&table(&head, &rows));
}

/// The gradient-masking diagnostics per quantized model.
fn masking_section(s: &mut String, res: &StudyResults) {
    let e = res.config.findings.eps;
    // Masking.
    let _ = writeln!(
        s,
        "\n## Gradient masking (ε {})\n\nPer quantized model: PGD through the quantizers with straight-through (STE) and with raw (true, almost everywhere zero) gradients, \
         the gradient-free Square attack, and the transfer attack from the full-precision reference. A raw-gradient accuracy far above the others is masking, not robustness. \
         \"Effect\" compares the worst case with the FP reference's.\n",
        eps_label(e)
    );
    let head = [
        "model",
        "clean",
        "PGD (STE)",
        "PGD (raw)",
        "Square",
        "transfer",
        "worst case",
        "zero-grad (STE/raw)",
        "only gradient-free broke",
        "effect vs FP",
    ]
    .map(String::from);
    let rows: Vec<Vec<String>> = res
        .models
        .iter()
        .filter(|m| m.spec.is_quantized())
        .map(|m| {
            let mask = m.masking.iter().find(|x| (x.eps - e).abs() < 1e-9);
            vec![
                m.id.clone(),
                pct(&m.clean),
                opt_pct(m.attack_at("pgd", e)),
                opt_pct(m.raw_at(e)),
                opt_pct(m.attack_at("square", e)),
                opt_pct(m.attack_at("transfer", e)),
                opt_pct(m.worst_at(e)),
                format!(
                    "{:.2} / {}",
                    m.zero_gradient_fraction,
                    m.raw_zero_gradient_fraction
                        .map(|z| format!("{z:.2}"))
                        .unwrap_or_else(|| "–".into())
                ),
                mask.map(|x| {
                    format!(
                        "{}{}",
                        x.broken_only_without_gradients,
                        if x.masking_suspected { " (flag)" } else { "" }
                    )
                })
                .unwrap_or_else(|| "–".into()),
                effect(res, m, e)
                    .map(|(ef, d, _)| format!("{ef:?} ({:+.1} pp)", 100.0 * d))
                    .unwrap_or_else(|| "–".into()),
            ]
        })
        .collect();
    s.push_str(&table(&head, &rows));
}

/// Means and intervals across seeds, where there are several.
fn seeds_section(s: &mut String, res: &StudyResults) {
    if !res.across_seeds.is_empty() {
        s.push_str("\n## Across seeds (mean and Student-t 95% interval)\n\n");
        let mut head = vec!["model".to_string(), "seeds".into(), "clean".into()];
        head.extend(worst_cols(res));
        let rows: Vec<Vec<String>> = res
            .across_seeds
            .iter()
            .map(|a| {
                let f = |m: f64, ci: (f64, f64)| {
                    format!("{:.1} ({:.1}–{:.1})", 100.0 * m, 100.0 * ci.0, 100.0 * ci.1)
                };
                let mut row = vec![
                    a.id.clone(),
                    format!("{:?}", a.seeds),
                    f(a.clean_mean, a.clean_ci95),
                ];
                row.extend(a.worst_case.iter().map(|(_, m, ci)| f(*m, *ci)));
                row
            })
            .collect();
        s.push_str(&table(&head, &rows));
    }
}

/// The three plots.
pub fn plots(res: &StudyResults) -> Vec<(&'static str, LinePlot)> {
    let c = &res.config;
    let seed = c.seeds[0];
    // vs ε: the FP models and the QAT table's cells of the first bit width.
    let mut eps_series = Vec::new();
    let series_of = |m: &ModelResult| {
        let mut pts = vec![(0.0, m.clean.accuracy)];
        pts.extend(m.worst_case.iter().map(|e| (e.eps * 255.0, e.accuracy)));
        Series {
            name: m.id.clone(),
            points: pts,
        }
    };
    for m in res.models.iter().filter(|m| m.spec.seed() == seed) {
        let first_bits = c.grid.qat_table.bits.first();
        let in_table = match &m.spec {
            ModelSpec::Fp { .. } => true,
            ModelSpec::Qat { bits, fraction, .. } => {
                Some(bits) == first_bits && *fraction == c.grid.qat_table.fraction
            }
            ModelSpec::Ptq { .. } => false,
        };
        if in_table && eps_series.len() < 8 {
            eps_series.push(series_of(m));
        }
    }
    let eps_plot = LinePlot {
        title: "Worst-case robust accuracy vs ε".into(),
        x_label: "ε (×1/255; 0 = clean)".into(),
        y_label: "accuracy (%)".into(),
        x_log: false,
        series: eps_series,
    };
    // vs bits (Figure 2 analog).
    let b = &c.grid.bits_sweep;
    let bits_series = [
        ("activations only (W32Ab)", true),
        ("weights only (WbA32)", false),
    ]
    .iter()
    .map(|(name, acts)| Series {
        name: format!("{name}, ε {}", eps_label(c.findings.f1_eps)),
        points: b
            .bits
            .iter()
            .filter_map(|&k| {
                let (activations_only, weights_only) = BitsSweep::pair(k);
                let bits = if *acts {
                    activations_only
                } else {
                    weights_only
                };
                let m = res.model(&ModelSpec::Qat {
                    init: b.init,
                    bits,
                    adversarial: b.adversarial,
                    fraction: b.fraction,
                    seed,
                })?;
                Some((k as f64, m.worst_at(c.findings.f1_eps)?.accuracy))
            })
            .collect(),
    })
    .collect();
    let bits_plot = LinePlot {
        title: format!("QAT from {} init: robustness vs bits", b.init),
        x_label: "bits".into(),
        y_label: "worst-case robust accuracy (%)".into(),
        x_log: false,
        series: bits_series,
    };
    // vs data fraction.
    let d = &c.grid.data_curve;
    let frac_series = d
        .inits
        .iter()
        .map(|&init: &Init| Series {
            name: format!("{init} init"),
            points: d
                .fractions
                .iter()
                .filter_map(|&f| {
                    let m = res.model(&ModelSpec::Qat {
                        init,
                        bits: d.bits,
                        adversarial: d.adversarial,
                        fraction: f,
                        seed,
                    })?;
                    Some((f, m.worst_at(c.findings.eps)?.accuracy))
                })
                .collect(),
        })
        .collect();
    let frac_plot = LinePlot {
        title: format!(
            "QAT{} {}: robustness at ε {} vs data fraction",
            if d.adversarial { "+AT" } else { "" },
            d.bits,
            eps_label(c.findings.eps)
        ),
        x_label: "fraction of the training split (log)".into(),
        y_label: "worst-case robust accuracy (%)".into(),
        x_log: true,
        series: frac_series,
    };
    vec![
        ("eps.svg", eps_plot),
        ("bits.svg", bits_plot),
        ("fraction.svg", frac_plot),
    ]
}

/// Writes `report.md` and `plots/*.svg` into `out`.
pub fn write(res: &StudyResults, out: &Path) -> Result<()> {
    for (name, p) in plots(res) {
        p.write_svg(&out.join("plots").join(name))?;
    }
    crate::io::write_bytes_atomic(&out.join("report.md"), markdown(res).as_bytes())
}
