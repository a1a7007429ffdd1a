//! `ptq` and `qat`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use quant_robust::data::{self, batch::DeviceData, subset};
use quant_robust::device;
use quant_robust::eval::clean_accuracy;
use quant_robust::model::checkpoint;
use quant_robust::rng::Rng;

use super::args::*;
use super::{
    check_out_path, load_data, parse_number, train_config, write_result, Bar, EXIT_STOPPED_EARLY,
};

pub(super) fn ptq(a: PtqArgs) -> Result<ExitCode> {
    use quant_robust::quant::ptq::{post_training_quantize, PtqConfig, PtqOutcome};
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
    if a.calib == 0 || a.calib > data.train.len() {
        bail!(
            "--calib {}: the training split has {} images",
            a.calib,
            data.train.len()
        );
    }
    let fp = quant_robust::quant::load_checkpoint(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    if fp.seam().persist().is_some() {
        bail!(
            "{} is already quantized; give a full-precision checkpoint",
            a.checkpoint.display()
        );
    }
    let t = Instant::now();
    let calib_set = calibration_set(&data, a.calib, a.seed, &dev)?;
    let PtqOutcome {
        model,
        breakpoint_ratios: ratios,
        activation_ranges: ranges,
    } = post_training_quantize(&fp, &cfg, &calib_set)?;
    let quant_s = t.elapsed().as_secs_f64();
    let dd = DeviceData::new(&data.test, &dev)?;
    let idx = quant_robust::eval::eval_indices(&dd, a.n, a.seed)?;
    let acc = clean_accuracy(&model, &dd, &idx, 500)?;
    let fp_acc = clean_accuracy(&fp, &dd, &idx, 500)?;
    let name = format!("ptq-{:?}-{}", a.method, cfg.bits.name()).to_lowercase();
    let out_ck = a.out_checkpoint.clone().unwrap_or_else(|| {
        let stem = a.checkpoint.with_extension("");
        PathBuf::from(format!("{}-{name}.safetensors", stem.display()))
    });
    check_out_path(a.out.as_deref(), &out_ck)?;
    let mut m = quant_robust::manifest::Manifest::new("checkpoint", &dev);
    m.seed = Some(a.seed);
    m.data = Some(data.identity.clone());
    m.config = json!({ "stage": "ptq", "source": a.checkpoint, "ptq": cfg });
    m.add_timing("ptq", quant_s, &dev);
    m.metrics.insert("test_accuracy".into(), acc.fraction());
    m.metrics
        .insert("fp_test_accuracy".into(), fp_acc.fraction());
    m.metrics.insert("test_images".into(), acc.total as f64);
    checkpoint::save(&model, &out_ck, &m)?;
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
        "breakpoint_ratio_p_over_m": ratios,
        "activation_ranges": ranges,
        "manifest": m,
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
            if model.seam().persist().is_some() {
                bail!("--init must be a full-precision checkpoint");
            }
            (qcfg, tcfg, init.clone(), Some(model))
        }
    };
    // α from the full-precision activations of 512 seeded training images.
    let calib_set = calibration_set(&data, 512.min(data.train.len()), tcfg.seed, &dev)?;
    let train_set = train_subset(&data, a.train.fraction, a.train.train_count, tcfg.seed)?;
    let train_dev = DeviceData::new(&train_set, &dev)?;
    let test_dev = DeviceData::new(&data.test, &dev)?;
    tracing::info!(
        "QAT {} from {init_desc} on {} images, {} epochs",
        qcfg.bits.name(),
        train_set.len(),
        tcfg.epochs,
    );
    let start = match &model {
        Some(m) => QatStart::Fresh {
            model: m,
            init: init_desc.clone(),
        },
        None => QatStart::Resume,
    };
    let mut bar = Bar { bar: None };
    let out = quant_robust::train::qat::fine_tune(
        start,
        &qcfg,
        tcfg.clone(),
        &calib_set,
        &train_dev,
        &test_dev,
        data.identity.clone(),
        Some(&latent),
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
    let (exported, acc, alpha_log) = (out.model, out.test, out.alpha_per_epoch);
    let mut m = out.manifest;
    m.config = json!({ "stage": "qat", "init": init_desc, "qat": qcfg, "train": tcfg });
    m.metrics.insert("test_accuracy".into(), acc.fraction());
    m.metrics.insert("test_images".into(), acc.total as f64);
    checkpoint::save(&exported, &out_path, &m)?;
    tracing::info!(
        "QAT {}: clean accuracy {:.2}% ({}/{}); wrote {}",
        qcfg.bits.name(),
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
        "alpha_per_epoch": alpha_log,
        "history": out.history,
        "manifest": m,
    });
    write_result(a.train.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

/// A seeded, class-stratified calibration set of `n` training images, on the device.
pub(super) fn calibration_set(
    data: &data::CifarData,
    n: usize,
    seed: u64,
    dev: &candle_core::Device,
) -> Result<DeviceData> {
    Ok(DeviceData::new(
        &subset::calibration(&data.train, n, seed)?,
        dev,
    )?)
}

/// The training images of a run: a seeded, stratified fraction or count, or all.
pub(super) fn train_subset(
    data: &data::CifarData,
    fraction: Option<f64>,
    count: Option<usize>,
    seed: u64,
) -> Result<data::Dataset> {
    let size = match (fraction, count) {
        (Some(f), _) => Some(subset::SubsetSize::Fraction(f)),
        (None, Some(n)) => Some(subset::SubsetSize::Count(n)),
        (None, None) => None,
    };
    Ok(subset::training(&data.train, size, seed)?)
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
