//! `train`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use quant_robust::attack::PgdConfig;
use quant_robust::data::batch::DeviceData;
use quant_robust::device;
use quant_robust::study::stages::{TrainFp, TrainStart};
use quant_robust::train::{Adversarial, LrSchedule, TrainConfig};

use super::args::*;
use super::{check_out_path, load_data, train_size, write_result, Bar, EXIT_STOPPED_EARLY};

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
    let stage = TrainFp {
        start: match &a.resume {
            Some(_) => TrainStart::Resume { epochs: a.epochs },
            None => TrainStart::Fresh(train_config(&a)?),
        },
        path: a.resume.as_ref().unwrap_or(&a.checkpoint),
        train_size: train_size(a.fraction, a.train_count),
    };
    let test_dev = DeviceData::new(&data.test, &dev)?;
    let mut bar = Bar { bar: None };
    let trainer = stage
        .run(&data, &test_dev, &device::stop_requested, &mut bar, &dev)
        .with_context(|| match &a.resume {
            Some(p) => format!("resuming from {}", p.display()),
            None => format!("training {}", a.checkpoint.display()),
        })?;
    let Some(trainer) = trainer else {
        tracing::warn!(
            "stopped on SIGTERM; continue with `train --resume {}`",
            stage.path.display()
        );
        return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
    };
    let result = json!({
        "checkpoint": stage.path,
        "manifest": trainer.manifest()?,
        "history": trainer.state.history,
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}
