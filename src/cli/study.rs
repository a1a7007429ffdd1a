//! `reproduce`, `merge`, `report` and `golden`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use quant_robust::data::{self, batch::DeviceData};
use quant_robust::device;
use quant_robust::study::shard::Shard;

use super::args::*;
use super::{write_result, EXIT_STOPPED_EARLY};

pub(super) fn reproduce(a: ReproduceArgs) -> Result<ExitCode> {
    use quant_robust::study::run;
    let cfg = study_config(&a.preset, a.config.as_deref(), a.data.as_deref())?;
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(ExitCode::SUCCESS);
    }
    let shard = Shard::resolve(a.shard, |v| std::env::var(v).ok())?;
    if let Some((s, from)) = shard {
        tracing::info!("shard {s} (from {from})");
    }
    if let Some(t) = a.time_budget {
        if !(t > 0.0 && t.is_finite()) {
            bail!("--time-budget {t}: must be a positive number of seconds");
        }
    }
    if !(a.end_margin >= 0.0 && a.end_margin.is_finite()) {
        bail!(
            "--end-margin {}: must be a number of seconds ≥ 0",
            a.end_margin
        );
    }
    let budget = match a.time_budget {
        Some(t) => Some(t),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let left = quant_robust::study::slurm::seconds_left(
                |v| std::env::var(v).ok(),
                now,
                a.end_margin,
            )?;
            if let Some(s) = left {
                tracing::info!(
                    "time budget {s:.0} s (from SLURM_JOB_END_TIME, less --end-margin {:.0} s)",
                    a.end_margin
                );
            }
            left
        }
    };
    let out = a.out.clone().unwrap_or_else(|| cfg.default_out());
    let dev = device::select(a.device)?;
    let t = Instant::now();
    let data = run::load_data(&cfg).context("loading the study's data")?;
    if a.interim {
        return interim(&cfg, &data.identity, &out);
    }
    tracing::info!(
        "study `{}`: data {} ({} train / {} test), {} models, device {}, directory {}",
        cfg.name,
        data.identity.name,
        data.train.len(),
        data.test.len(),
        quant_robust::study::plan::models(&cfg).len(),
        device::name(&dev),
        out.display()
    );
    let opts = run::RunOptions {
        shard: shard.map(|(s, _)| s),
        max_stages: a.max_stages,
        deadline: budget.map(|s| t + std::time::Duration::from_secs_f64(s)),
        scope: if a.fp_only {
            run::Scope::Fp
        } else if a.models_only {
            run::Scope::Models
        } else {
            run::Scope::All
        },
    };
    match run::run_with(&cfg, &data, &out, &dev, &opts, &mut StudyBar::default())? {
        run::RunStatus::Interrupted {
            computed,
            remaining,
        } => {
            tracing::warn!(
                "stopped early after {computed} new stages ({remaining} models left, {:.0}s); run the same command again to continue",
                t.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
        }
        run::RunStatus::Complete { computed, cached } => {
            tracing::info!(
                "{computed} stages computed, {cached} models read from the cache, {:.0}s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    if a.models_only || a.fp_only {
        tracing::info!(
            "every {} is made; run again without --{} to go on",
            if a.fp_only {
                "full-precision model"
            } else {
                "model"
            },
            if a.fp_only { "fp-only" } else { "models-only" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((s, _)) = shard {
        tracing::info!("shard {s} done; `quant-robust merge --out DIR SHARD_DIRS...` when all are");
        return Ok(ExitCode::SUCCESS);
    }
    finish(&cfg, &data.identity, &out, &dev)
}

/// The study configuration: the file if given, else the preset; `data` overrides its data.
fn study_config(
    preset: &str,
    config: Option<&Path>,
    data: Option<&str>,
) -> Result<quant_robust::study::StudyConfig> {
    use quant_robust::study::StudyConfig;
    let mut cfg = match config {
        Some(p) => StudyConfig::from_file(p)
            .with_context(|| format!("reading the study configuration {}", p.display()))?,
        None => StudyConfig::preset(preset)?,
    };
    if let Some(d) = data {
        cfg.data = d.to_string();
    }
    Ok(cfg)
}

pub(super) fn slurm(a: SlurmArgs) -> Result<ExitCode> {
    use clap::ValueEnum;
    use quant_robust::study::{plan, slurm};
    let cfg = study_config(&a.preset, a.config.as_deref(), a.data.as_deref())?;
    cfg.validate()?;
    let workdir = std::env::current_dir().context("reading the current directory")?;
    let out = workdir.join(a.out.clone().unwrap_or_else(|| cfg.default_out()));
    let binary = match &a.binary {
        Some(b) => workdir.join(b),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let layout = slurm::Layout {
        binary,
        workdir,
        out,
        device: a
            .device
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| "auto".into()),
    };
    let opts = slurm::JobOptions {
        name: a
            .job_name
            .clone()
            .unwrap_or_else(|| format!("qr-{}", cfg.name)),
        tasks: a.tasks,
        throttle: a.throttle,
        partition: a.partition.clone(),
        time: a.time,
        cpus_per_task: a.cpus,
        gres: a.gres.clone(),
        mem: a.mem.clone(),
        end_margin_s: a.end_margin,
        requeues: a.requeues,
    };
    let n_fp = plan::models(&cfg)
        .iter()
        .filter(|m| matches!(m, plan::ModelSpec::Fp { .. }))
        .count();
    let scripts = slurm::scripts(&opts, &layout, n_fp)?;
    let dir = layout.slurm_dir();
    if a.dry_run {
        for (stage, text) in [
            ("fp", &scripts.fp),
            ("grid", &scripts.grid),
            ("merge", &scripts.merge),
        ] {
            println!(
                "# {}\n{text}",
                dir.join(format!("{stage}.sbatch")).display()
            );
        }
        println!(
            "# would run: sbatch --parsable fp.sbatch; sbatch --parsable \
             --dependency=afterok:<fp> --kill-on-invalid-dep=yes grid.sbatch; sbatch \
             --parsable --dependency=afterok:<grid> --kill-on-invalid-dep=yes merge.sbatch \
             (in {}), after writing the configuration to {}",
            dir.display(),
            layout.config_path().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    quant_robust::io::write_json_atomic(&layout.config_path(), &cfg)?;
    let jobs = slurm::submit(&scripts, &layout, &a.sbatch).with_context(|| {
        format!(
            "submitting with {} (is Slurm installed here? --dry-run prints the scripts)",
            a.sbatch.display()
        )
    })?;
    tracing::info!(
        "submitted study `{}` into {}: full-precision job {} ({n_fp} tasks), grid {} ({} tasks), merge {}; logs in {}; `squeue -j {},{},{}` to follow",
        cfg.name,
        layout.out.display(),
        jobs.fp,
        jobs.grid,
        opts.tasks,
        jobs.merge,
        dir.join("logs").display(),
        jobs.fp,
        jobs.grid,
        jobs.merge
    );
    println!("{} {} {}", jobs.fp, jobs.grid, jobs.merge);
    Ok(ExitCode::SUCCESS)
}

/// The study's progress as a bar: models done of the run's, what it is doing now.
#[derive(Default)]
struct StudyBar {
    bar: Option<indicatif::ProgressBar>,
}

impl quant_robust::study::run::RunProgress for StudyBar {
    fn start(&mut self, models: usize) {
        let bar = indicatif::ProgressBar::new(models as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "study [{bar:30}] {pos}/{len} models {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }
    fn doing(&mut self, what: &str) {
        if let Some(b) = &self.bar {
            b.set_message(what.to_string());
        }
    }
    fn model_done(&mut self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
    fn end(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Collects the results from the cache, writes them and the report, logs the verdicts.
pub(super) fn finish(
    cfg: &quant_robust::study::StudyConfig,
    data: &data::DataIdentity,
    out: &Path,
    dev: &candle_core::Device,
) -> Result<ExitCode> {
    use quant_robust::study::{findings, results};
    let res = findings::judged(results::collect(cfg, data, out, dev)?);
    results::write(&res, out)?;
    quant_robust::report::study::write(&res, out)?;
    log_verdicts(&res);
    tracing::info!(
        "wrote {}, {} and {}",
        out.join("results.json").display(),
        out.join("report.md").display(),
        out.join("plots").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The results and the report of the models finished so far, in `out/interim/`.
fn interim(
    cfg: &quant_robust::study::StudyConfig,
    data: &data::DataIdentity,
    out: &Path,
) -> Result<ExitCode> {
    use quant_robust::study::{findings, results};
    let res = findings::judged(results::collect_with(
        cfg,
        data,
        out,
        &candle_core::Device::Cpu,
        results::Unfinished::Skip,
    )?);
    if res.models.is_empty() {
        bail!(
            "no model of the study is finished in {}: nothing to report",
            out.display()
        );
    }
    let dir = out.join("interim");
    quant_robust::io::write_json_atomic(&dir.join("results.json"), &res)?;
    quant_robust::report::study::write(&res, &dir)?;
    log_verdicts(&res);
    tracing::info!(
        "{} of {} models finished; wrote {} and {}",
        res.models.len(),
        res.models.len() + res.unfinished.len(),
        dir.join("results.json").display(),
        dir.join("report.md").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// One log line per verdict.
fn log_verdicts(res: &quant_robust::study::StudyResults) {
    for v in &res.findings {
        tracing::info!(
            "{} {}: {}{}",
            v.id,
            v.status,
            v.claim,
            v.margin
                .map(|m| format!(" (margin {:+.1} pp)", 100.0 * m))
                .unwrap_or_default()
        );
    }
}

pub(super) fn merge(a: MergeArgs) -> Result<ExitCode> {
    let cfg = quant_robust::study::run::merge(&a.out, &a.shards)?;
    let data = quant_robust::study::run::load_data(&cfg).context("loading the study's data")?;
    finish(&cfg, &data.identity, &a.out, &candle_core::Device::Cpu)
}

pub(super) fn golden_update(a: GoldenUpdateArgs) -> Result<ExitCode> {
    let defaults = quant_robust::study::golden::SnapshotConfig::default();
    let snapshot = quant_robust::study::golden::SnapshotConfig {
        n: a.snapshot_n.unwrap_or(defaults.n),
        n_slow: a.snapshot_n_slow.unwrap_or(defaults.n_slow),
        ..defaults
    };
    let g = quant_robust::study::golden::update(
        &a.study,
        &a.golden,
        &a.name,
        &a.device_label,
        &a.command,
        snapshot,
        Path::new("."),
    )?;
    tracing::info!(
        "wrote {} ({} models, study code {}, device {} / {}, data {}); now write its snapshots ({} and {} images; golden/README.md)",
        a.golden.join(&a.name).display(),
        g.models.len(),
        g.code.git_commit,
        g.device,
        g.device_label,
        g.data.name,
        g.snapshot.n,
        g.snapshot.n_slow
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn golden_check(a: GoldenCheckArgs) -> Result<ExitCode> {
    use quant_robust::attack::{fgsm::Fgsm, Attack, Norm};
    use quant_robust::eval::robust::{evaluate, RobustnessConfig};
    use quant_robust::study::golden;
    let g = golden::read(&a.dir)?;
    let res: quant_robust::study::StudyResults =
        quant_robust::io::read_json(&a.dir.join("results.json"))?;
    let dev = device::select(a.device)?;
    let source = match &a.data {
        Some(d) => d.clone(),
        None => quant_robust::study::run::data_source(&res.config)?,
    };
    let data = data::load(&source)?;
    if data.identity.test_sha256 != g.data.test_sha256 {
        bail!(
            "the data's test split ({}) is not the golden study's ({}, sha256 {})",
            data.identity.name,
            g.data.name,
            g.data.test_sha256
        );
    }
    let test = DeviceData::new(&data.test, &dev)?;
    let n = match a.n.as_deref() {
        None => res.config.eval.n,
        Some("all") => None,
        Some(v) => Some(v.parse().with_context(|| format!("--n {v}"))?),
    };
    let idx = quant_robust::eval::eval_indices(&test, n, res.config.eval.seed)?;
    let mut rows = Vec::new();
    let mut failed = 0;
    let t = Instant::now();
    for m in &g.models {
        let model =
            quant_robust::quant::load_checkpoint(&golden::checkpoint_path(&a.dir, m), &dev, false)?;
        let attacks: Vec<Box<dyn Attack>> = vec![Box::new(Fgsm)];
        let rcfg = RobustnessConfig {
            norm: Norm::Linf,
            eps: res.config.eval.eps.clone(),
            batch_size: res.config.eval.batch_size,
            seed: res.config.eval.seed.wrapping_add(m.spec.seed()),
            ..RobustnessConfig::default()
        };
        let r = evaluate(&model, &test, &idx, &attacks, &rcfg, &mut |_, _, _, _| {})?;
        let golden_model = res
            .model(&m.spec)
            .with_context(|| format!("{} is not in results.json", m.id))?;
        let mut cmp = vec![(
            "clean".to_string(),
            r.clean.correct,
            r.clean.total,
            Some(golden_model.clean.clone()),
        )];
        for e in &r.attacks[0].per_eps {
            cmp.push((
                format!("fgsm {:.2}/255", e.eps * 255.0),
                e.correct,
                e.total,
                golden_model.attack_at("fgsm", e.eps).cloned(),
            ));
        }
        for (what, k, total, gold) in cmp {
            let Some(gold) = gold else { continue };
            // Same images: compare counts; other sizes: compare rates via the intervals.
            let ok = if gold.total == total {
                k.abs_diff(gold.correct) <= a.tolerance
            } else {
                let (lo, hi) = quant_robust::eval::wilson95(k, total);
                gold.ci95.0 <= hi && lo <= gold.ci95.1
            };
            if !ok {
                failed += 1;
                tracing::error!(
                    "{} {what}: {k}/{total} now, golden {}/{}",
                    m.id,
                    gold.correct,
                    gold.total
                );
            }
            rows.push(
                json!({"model": m.id, "measure": what, "correct": k, "total": total,
                "golden_correct": gold.correct, "golden_total": gold.total, "agrees": ok}),
            );
        }
    }
    tracing::info!(
        "{} models, {} comparisons, {failed} disagree (tolerance {} images, {} test images, device {}, {:.0}s)",
        g.models.len(),
        rows.len(),
        a.tolerance,
        idx.len(),
        device::name(&dev),
        t.elapsed().as_secs_f64()
    );
    let mut man = quant_robust::manifest::Manifest::new("golden-check", &dev);
    man.data = Some(data.identity.clone());
    man.config = json!({"dir": a.dir, "n": idx.len(), "tolerance": a.tolerance});
    write_result(
        a.out.as_deref(),
        &json!({"golden": g.name, "disagreements": failed, "comparisons": rows, "manifest": man}),
    )?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) fn report(a: ReportArgs) -> Result<ExitCode> {
    let p = a.dir.join("results.json");
    let res: quant_robust::study::StudyResults = quant_robust::io::read_json(&p)
        .with_context(|| format!("reading {} (run `reproduce` first)", p.display()))?;
    quant_robust::report::study::write(&res, &a.dir)?;
    tracing::info!("wrote {}", a.dir.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
