//! `ptq` and `qat`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use quant_robust::data::{batch::DeviceData, subset::SubsetSize};
use quant_robust::device;
use quant_robust::eval::clean_accuracy;
use quant_robust::model::checkpoint;
use quant_robust::rng::Rng;
use quant_robust::study::stages::{Ptq, Qat};

use super::args::*;
use super::{
    check_calib, check_out_path, load_data, parse_number, train_config, write_result, Bar,
    EXIT_STOPPED_EARLY,
};

pub(super) fn ptq(a: PtqArgs) -> Result<ExitCode> {
    use quant_robust::quant::ptq::PtqConfig;
    use quant_robust::quant::seam::CalibMethod;
    let bits = parse_bits(a.wbits, a.abits, a.first_last_bits)?;
    let calib_range = match a.calib_range.as_str() {
        "max" => CalibMethod::Max,
        p => CalibMethod::Percentile(
            parse_number(p).map_err(|e| anyhow::anyhow!("--calib-range: {e}"))?,
        ),
    };
    let cfg = PtqConfig {
        calib_range,
        method: a.method,
        bits,
        breakpoint: a.breakpoint,
        bias_correction: a.bias_correction,
        calib: a.calib,
    };
    if let Some(ck) = &a.out_checkpoint {
        check_out_path(a.out.as_deref(), ck)?;
    }
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    check_calib(a.calib, &data)?;
    let fp = quant_robust::quant::load_checkpoint(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let stage = Ptq {
        config: cfg,
        seed: a.seed,
    };
    let mut made = stage
        .run(&fp, &data, &dev)
        .with_context(|| format!("quantizing {}", a.checkpoint.display()))?;
    let cfg = &stage.config;
    let dd = DeviceData::new(&data.test, &dev)?;
    let idx = quant_robust::eval::eval_indices(&dd, a.n, a.seed)?;
    let acc = clean_accuracy(&made.model, &dd, &idx, 500)?;
    let fp_acc = clean_accuracy(&fp, &dd, &idx, 500)?;
    let name = format!("ptq-{:?}-{}", a.method, cfg.bits.name()).to_lowercase();
    let out_ck = a.out_checkpoint.clone().unwrap_or_else(|| {
        let stem = a.checkpoint.with_extension("");
        PathBuf::from(format!("{}-{name}.safetensors", stem.display()))
    });
    check_out_path(a.out.as_deref(), &out_ck)?;
    made.note("source", json!(a.checkpoint));
    let m = &mut made.manifest;
    m.metrics.insert("test_accuracy".into(), acc.fraction());
    m.metrics
        .insert("fp_test_accuracy".into(), fp_acc.fraction());
    m.metrics.insert("test_images".into(), acc.total as f64);
    checkpoint::save(&made.model, &out_ck, &made.manifest)?;
    tracing::info!(
        "{name}: clean accuracy {:.2}% ({}/{}), full precision {:.2}%; wrote {}",
        acc.percent(),
        acc.correct,
        acc.total,
        fp_acc.percent(),
        out_ck.display()
    );
    let result = json!({
        "checkpoint": out_ck,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "fp_accuracy": fp_acc.fraction(),
        "breakpoint_ratio_p_over_m": made.details["breakpoint_ratio_p_over_m"],
        "activation_ranges": made.details["activation_ranges"],
        "manifest": made.manifest,
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn qat(a: QatArgs) -> Result<ExitCode> {
    use quant_robust::quant::qat::{AlphaInit, QatConfig};
    use quant_robust::study::config::{Init, QatStage};
    use quant_robust::train::qat::{resume_settings, QatStart};
    // A resumed run writes where it was started; --checkpoint names a fresh run's output.
    let out_path = a.train.resume.clone().unwrap_or(a.train.checkpoint.clone());
    check_out_path(a.train.out.as_deref(), &out_path)?;
    let latent = out_path.with_extension("latent.safetensors");
    let dev = device::select(a.train.data.device)?;
    let data = load_data(&a.train.data)?;
    let (qcfg, tcfg, init_desc, model) = match &a.init {
        None => {
            let (state, tcfg) = resume_settings(&latent)
                .with_context(|| format!("resuming the QAT run of {}", out_path.display()))?;
            let mut tcfg = tcfg;
            if let Some(e) = a.train.epochs {
                tcfg.epochs = e;
            }
            (state.config, tcfg, state.init, None)
        }
        Some(init) => {
            let bits = parse_bits(a.wbits, a.abits, a.first_last_bits)?;
            let alpha_init = match a.alpha_init.as_deref() {
                None => QatStage::default().alpha_init_for(if init == "random" {
                    Init::Random
                } else {
                    Init::Natural
                }),
                Some("calibrated") => AlphaInit::Calibrated,
                Some(v) => AlphaInit::Fixed(
                    parse_number(v).map_err(|e| anyhow::anyhow!("--alpha-init: {e}"))?,
                ),
            };
            alpha_init.validate("--alpha-init")?;
            let qcfg = QatConfig {
                bits,
                alpha_init,
                ..QatConfig::default()
            };
            let mut tcfg = train_config(&a.train)?;
            if a.train.epochs.is_none() {
                tcfg.epochs = 5;
            }
            if a.train.lr.is_none() && init != "random" {
                tcfg.lr = 0.01;
            }
            tcfg.validate()?;
            let model = match init.split_once(':') {
                None if init == "random" => {
                    quant_robust::model::ResNet20::init(&mut Rng::new(tcfg.seed, "init"), &dev)?
                }
                Some((kind @ ("natural" | "robust"), path)) => {
                    quant_robust::quant::load_checkpoint(Path::new(path), &dev, true)
                        .with_context(|| format!("loading the {kind} initialization {path}"))?
                }
                _ => {
                    bail!("--init {init}: expected random, natural:CHECKPOINT or robust:CHECKPOINT")
                }
            };
            if model.seam().quantizes() {
                bail!("--init must be a full-precision checkpoint");
            }
            (qcfg, tcfg, init.clone(), Some(model))
        }
    };
    let stage = Qat {
        config: qcfg,
        train: tcfg,
        calib: QatStage::default().calib,
        train_size: train_size(a.train.fraction, a.train.train_count),
    };
    let test_dev = DeviceData::new(&data.test, &dev)?;
    tracing::info!(
        "QAT {} from {init_desc}, {} epochs",
        stage.config.bits.name(),
        stage.train.epochs,
    );
    let start = match &model {
        Some(m) => QatStart::Fresh {
            model: m,
            init: init_desc.clone(),
        },
        None => QatStart::Resume,
    };
    let mut bar = Bar { bar: None };
    let out = stage.run(
        start,
        &data,
        &test_dev,
        &latent,
        &quant_robust::device::stop_requested,
        &mut bar,
        &dev,
    )?;
    let Some(out) = out else {
        tracing::warn!(
            "stopped on SIGTERM; continue with `qat --resume {}`",
            out_path.display()
        );
        return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
    };
    let mut made = out;
    made.note("init", json!(init_desc));
    checkpoint::save(&made.model, &out_path, &made.manifest)?;
    let acc = made.test.context("QAT measured no test accuracy")?;
    tracing::info!(
        "QAT {}: clean accuracy {:.2}% ({}/{}); wrote {}",
        stage.config.bits.name(),
        acc.percent(),
        acc.correct,
        acc.total,
        out_path.display()
    );
    let result = json!({
        "checkpoint": out_path,
        "latent_checkpoint": latent,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "alpha_per_epoch": made.details["alpha_per_epoch"],
        "history": made.details["history"],
        "manifest": made.manifest,
    });
    write_result(a.train.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

/// The training images of a run: a seeded, stratified fraction or count, or all (`None`).
pub(super) fn train_size(fraction: Option<f64>, count: Option<usize>) -> Option<SubsetSize> {
    match (fraction, count) {
        (Some(f), _) => Some(SubsetSize::Fraction(f)),
        (None, Some(n)) => Some(SubsetSize::Count(n)),
        (None, None) => None,
    }
}

/// Weight and activation bits (32 = full precision) and the first/last layers' weight bits.
pub(super) fn parse_bits(
    wbits: u32,
    abits: u32,
    first_last: u32,
) -> Result<quant_robust::quant::seam::UniformConfig> {
    let bits = quant_robust::quant::Bits::new(wbits, abits).context("--wbits / --abits")?;
    quant_robust::quant::uniform::code_range(
        first_last,
        quant_robust::quant::uniform::Signedness::Symmetric,
    )
    .context("--first-last-bits")?;
    Ok(quant_robust::quant::seam::UniformConfig {
        first_last_bits: first_last,
        ..bits.into()
    })
}
