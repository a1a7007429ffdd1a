//! `train`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use quant_robust::attack::PgdConfig;
use quant_robust::data::batch::DeviceData;
use quant_robust::device;
use quant_robust::train::{Adversarial, LrSchedule, TrainConfig, Trainer};

use super::args::*;
use super::{check_out_path, load_data, train_subset, write_result, Bar, EXIT_STOPPED_EARLY};

pub(super) fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg: TrainConfig = match &a.config {
        Some(p) => quant_robust::io::read_json(p)?,
        None => TrainConfig::default(),
    };
    if let Some(v) = a.epochs {
        cfg.epochs = v;
    }
    if let Some(v) = a.batch_size {
        cfg.batch_size = v;
    }
    if let Some(v) = a.lr {
        cfg.lr = v;
    }
    if let Some(s) = a.schedule {
        cfg.schedule = match s {
            ScheduleArg::OneCycle => LrSchedule::one_cycle(),
            ScheduleArg::Cosine => LrSchedule::Cosine,
            ScheduleArg::Multistep => LrSchedule::multistep(),
            ScheduleArg::Constant => LrSchedule::Constant,
        };
    }
    if let Some(v) = a.momentum {
        cfg.sgd.momentum = v;
    }
    if let Some(v) = a.weight_decay {
        cfg.sgd.weight_decay = v;
    }
    if a.no_nesterov {
        cfg.sgd.nesterov = false;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.eval_images {
        cfg.eval_images = Some(v);
    }
    let wants_pgd = a.adv == Some(AdvArg::Pgd)
        || (a.adv.is_none() && matches!(cfg.adversarial, Adversarial::Pgd(_)));
    if a.adv == Some(AdvArg::None) {
        cfg.adversarial = Adversarial::None;
    }
    if wants_pgd {
        let mut p = match (&cfg.adversarial, Adversarial::pgd_default()) {
            (Adversarial::Pgd(p), _) => p.clone(),
            (_, Adversarial::Pgd(d)) => d,
            _ => PgdConfig::default(),
        };
        if let Some(v) = a.adv_eps {
            p.eps = v;
        }
        if let Some(v) = a.adv_step {
            p.step = v;
        }
        if let Some(v) = a.adv_steps {
            p.steps = v;
        }
        cfg.adversarial = Adversarial::Pgd(p);
    } else if a.adv_eps.is_some() || a.adv_step.is_some() || a.adv_steps.is_some() {
        bail!("--adv-eps/--adv-step/--adv-steps need --adv pgd");
    }
    cfg.validate()?;
    Ok(cfg)
}

pub(super) fn train(a: TrainArgs) -> Result<ExitCode> {
    check_out_path(a.out.as_deref(), a.resume.as_ref().unwrap_or(&a.checkpoint))?;
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    let (mut trainer, checkpoint_path) = match &a.resume {
        Some(p) => {
            let t = Trainer::resume(p, a.epochs, &dev)
                .with_context(|| format!("resuming from {}", p.display()))?;
            if t.state.data.train_sha256 != data.identity.train_sha256 && a.fraction.is_none() {
                tracing::warn!("resuming on data that differs from the run's original data");
            }
            (t, p.clone())
        }
        None => {
            let cfg = train_config(&a)?;
            (
                Trainer::new(cfg, data.identity.clone(), 0, &dev)?,
                a.checkpoint.clone(),
            )
        }
    };
    let seed = trainer.state.config.seed;
    let train_set = train_subset(&data, a.fraction, a.train_count, seed)?;
    if train_set.is_empty() {
        bail!("the data set has no training images");
    }
    if trainer.state.n_train == 0 {
        trainer.state.n_train = train_set.len();
    }
    let train_dev = DeviceData::new(&train_set, &dev)?;
    let test_dev = DeviceData::new(&data.test, &dev)?;
    tracing::info!(
        "training on {} images, {} epochs, device {}",
        train_set.len(),
        trainer.state.config.epochs,
        device::name(&dev)
    );
    let mut bar = Bar { bar: None };
    if !trainer.fit(&train_dev, &test_dev, Some(&checkpoint_path), &mut bar)? {
        tracing::warn!(
            "stopped on SIGTERM after epoch {}/{}; continue with `train --resume {}`",
            trainer.state.epoch,
            trainer.state.config.epochs,
            checkpoint_path.display()
        );
        return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
    }
    let result = json!({
        "checkpoint": checkpoint_path,
        "manifest": trainer.manifest()?,
        "history": trainer.state.history,
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}
