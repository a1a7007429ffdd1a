//! `eval` and `attack`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use quant_robust::data::batch::DeviceData;
use quant_robust::device;
use quant_robust::eval::clean_accuracy;

use super::args::*;
use super::{check_calib, load_data, parse_number, side_manifest, write_result};

pub(super) fn eval(a: EvalArgs) -> Result<ExitCode> {
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    let model = quant_robust::quant::load_checkpoint(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let split = match a.split {
        SplitArg::Train => &data.train,
        SplitArg::Test => &data.test,
    };
    if let Some(n) = a.n {
        if n == 0 || n > split.len() {
            bail!(
                "--n {n}: the {:?} split has {} images",
                a.split,
                split.len()
            );
        }
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be ≥ 1");
    }
    let dd = DeviceData::new(split, &dev)?;
    let t = Instant::now();
    let idx = quant_robust::eval::eval_indices(&dd, a.n, a.seed)?;
    let acc = clean_accuracy(&model, &dd, &idx, a.batch_size)?;
    device::synchronize(&dev)?;
    let wall = t.elapsed().as_secs_f64();
    let mut m = quant_robust::manifest::Manifest::new("eval", &dev);
    m.data = Some(data.identity.clone());
    m.config = json!({
        "checkpoint": a.checkpoint,
        "split": format!("{:?}", a.split).to_lowercase(),
        "n": acc.total,
        "subset_seed": a.n.map(|_| a.seed),
        "batch_size": a.batch_size,
    });
    m.add_timing("eval", wall, &dev);
    m.metrics.insert("accuracy".into(), acc.fraction());
    let result = json!({
        "checkpoint": a.checkpoint,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "images_per_s": acc.total as f64 / wall.max(1e-9),
        "checkpoint_manifest": side_manifest(&a.checkpoint),
        "manifest": m,
    });
    tracing::info!(
        "accuracy {:.2}% ({}/{}) in {:.1}s",
        acc.percent(),
        acc.correct,
        acc.total,
        wall
    );
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn parse_list(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| parse_number(t.trim()).map_err(|e| anyhow::anyhow!("--eps: {e}")))
        .collect()
}

pub(super) fn build_attacks(
    a: &AttackArgs,
    dev: &candle_core::Device,
) -> Result<Vec<Box<dyn quant_robust::attack::Attack>>> {
    use quant_robust::attack::{pgd::Pgd, transfer::Transfer, AttackSettings};
    let settings = AttackSettings {
        pgd_steps: a.steps,
        pgd_step_fraction: a.step_fraction,
        restarts: a.restarts,
        apgd_iterations: a.apgd_iterations,
        square_queries: a.square_queries,
        fab_iterations: a.fab_iterations,
    };
    let mut out: Vec<Box<dyn quant_robust::attack::Attack>> = Vec::new();
    for name in a
        .attacks
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let attack: Box<dyn quant_robust::attack::Attack> =
            if let Some(src) = name.strip_prefix("transfer:") {
                let src = PathBuf::from(src);
                let source = quant_robust::quant::load_checkpoint(&src, dev, false)
                    .with_context(|| format!("loading the transfer source {}", src.display()))?;
                Box::new(Transfer {
                    source: Box::new(source),
                    source_name: src.display().to_string(),
                    pgd: Pgd {
                        restarts: 1,
                        ..settings.pgd()
                    },
                })
            } else if let (Some(stages), "autoattack") = (&a.autoattack_stages, name) {
                let aa = quant_robust::attack::autoattack::AutoAttack {
                    stages: stages.clone(),
                    ..Default::default()
                };
                aa.validate().context("--autoattack-stages")?;
                Box::new(aa)
            } else {
                quant_robust::attack::build(name, &settings, a.norm)
                    .with_context(|| "--attacks (transfer is written transfer:CHECKPOINT)")?
            };
        if !attack.supports(a.norm) {
            bail!("attack `{name}` does not support the {} norm", a.norm);
        }
        out.push(attack);
    }
    if out.is_empty() {
        bail!("--attacks names no attack");
    }
    Ok(out)
}

pub(super) fn attack(a: AttackArgs) -> Result<ExitCode> {
    use quant_robust::eval::robust::{self, RobustnessConfig};
    let eps = parse_list(&a.eps)?;
    for &e in &eps {
        quant_robust::attack::check_eps(a.norm, e)?;
    }
    let dev = device::select(a.data.device)?;
    let attacks = build_attacks(&a, &dev)?;
    let data = load_data(&a.data)?;
    if a.n == 0 || a.n > data.test.len() {
        bail!("--n {}: the test split has {} images", a.n, data.test.len());
    }
    let quantize = a
        .quantize
        .map(quant_robust::quant::seam::UniformConfig::from);
    let model = quant_robust::quant::load_checkpoint(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let mut ranges = None;
    let model = match &quantize {
        None => quant_robust::quant::seam::with_gradient_mode(&model, a.gradient),
        Some(q) => {
            check_calib(a.calib, &data)?;
            let calib_set =
                quant_robust::study::stages::calibration_set(&data.train, a.calib, a.seed, &dev)?;
            let all: Vec<u32> = (0..calib_set.len() as u32).collect();
            let r = quant_robust::quant::seam::calibrate(&model, &calib_set, &all, a.batch_size)?;
            ranges = Some(r.clone());
            quant_robust::quant::seam::uniform_ptq(&model, q.clone(), r, a.gradient)
        }
    };
    let dd = DeviceData::new(&data.test, &dev)?;
    let idx = quant_robust::eval::eval_indices(&dd, Some(a.n), a.seed)?;
    let cfg = RobustnessConfig {
        norm: a.norm,
        eps: eps.clone(),
        batch_size: a.batch_size,
        seed: a.seed,
        ..RobustnessConfig::default()
    };
    let total = (attacks.len() * eps.len() * idx.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images ({elapsed}<{eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut finished = 0u64;
    let mut last = (String::new(), usize::MAX);
    let t = Instant::now();
    let report = robust::evaluate(
        &model,
        &dd,
        &idx,
        &attacks,
        &cfg,
        &mut |name, ei, done, n| {
            if (name.to_string(), ei) != last {
                if last.1 != usize::MAX {
                    finished += n as u64;
                }
                last = (name.to_string(), ei);
            }
            bar.set_prefix(format!("{name} eps {:.4}", eps[ei]));
            bar.set_position(finished + done as u64);
        },
    )?;
    bar.finish_and_clear();
    let wall = t.elapsed().as_secs_f64();
    for r in &report.attacks {
        for e in &r.per_eps {
            tracing::info!(
                "{:>12} eps {:.4} ({:>5.2}/255): robust {:.2}% ({}/{})",
                r.attack,
                e.eps,
                e.eps * 255.0,
                100.0 * e.accuracy,
                e.correct,
                e.total
            );
        }
        if let Some(st) = &r.stages {
            for (k, name) in st.names.iter().enumerate() {
                let after: Vec<String> = st.after[k]
                    .iter()
                    .map(|e| format!("{:.2}% at {:.4}", 100.0 * e.accuracy, e.eps))
                    .collect();
                tracing::info!(
                    "{:>12}   after {name}: {} ({} images attacked, {:.1} s)",
                    "",
                    after.join(", "),
                    st.images[k],
                    st.wall_s[k]
                );
            }
        }
    }
    for e in &report.worst_case {
        tracing::info!(
            "  worst case eps {:.4}: robust {:.2}% ({}/{}), clean {:.2}%",
            e.eps,
            100.0 * e.accuracy,
            e.correct,
            e.total,
            100.0 * report.clean.accuracy
        );
    }
    if let Some(p) = &a.save_examples {
        let k = idx.len().min(8);
        let pick: Vec<u32> = (0..k).map(|i| idx[i * idx.len() / k]).collect();
        let e = eps.iter().cloned().fold(0.0, f64::max);
        let ex = robust::examples(&model, &dd, &pick, attacks[0].as_ref(), a.norm, e, a.seed)?;
        quant_robust::report::examples::write_grid(p, &ex, e)?;
        tracing::info!("wrote {}", p.display());
    }
    let mut m = quant_robust::manifest::Manifest::new("attack", &dev);
    m.seed = Some(a.seed);
    m.data = Some(data.identity.clone());
    m.config = json!({
        "checkpoint": a.checkpoint,
        "attacks": attacks.iter().map(|x| x.name()).collect::<Vec<_>>(),
        "norm": a.norm,
        "eps": eps,
        "steps": a.steps,
        "step_fraction": a.step_fraction,
        "restarts": a.restarts,
        "apgd_iterations": a.apgd_iterations,
        "square_queries": a.square_queries,
        "fab_iterations": a.fab_iterations,
        "autoattack_stages": a.autoattack_stages,
        "n": a.n,
        "batch_size": a.batch_size,
        "model": model.seam().describe(),
        "quantize": quantize,
        "calib": quantize.as_ref().map(|_| a.calib),
        "activation_ranges": ranges,
        "gradient": a.gradient,
    });
    m.add_timing("attack", wall, &dev);
    m.metrics
        .insert("clean_accuracy".into(), report.clean.accuracy);
    let result = json!({
        "checkpoint": a.checkpoint,
        "report": report,
        "manifest": m,
        "checkpoint_manifest": side_manifest(&a.checkpoint),
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}
