//! The QAT stage: PACT + DoReFa fine-tuning of a model through [`PactSeam`], natural or
//! with PGD-AT inside, then export to an ordinary quantized checkpoint.
//!
//! α starts from the full-precision activations of a calibration sample; its per-site
//! values are logged after every epoch. QAT runs are short and are restarted, not resumed,
//! when interrupted (the study's cache works at the granularity of whole stages).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use super::{EpochRecord, Progress, TrainConfig, Trainer};
use crate::data::batch::DeviceData;
use crate::data::DataIdentity;
use crate::eval::{clean_accuracy, eval_indices, Accuracy};
use crate::manifest::Manifest;
use crate::model::ResNet20;
use crate::quant::qat::{export, PactSeam, QatConfig};
use crate::quant::seam::calibrate;
use crate::{Error, Result};

/// What a QAT run produced.
pub struct QatOutcome {
    /// The exported quantized model (DoReFa weights in the state, α as activation ranges).
    pub model: ResNet20,
    /// α per site: at the start, then after each epoch.
    pub alpha_per_epoch: Vec<BTreeMap<String, f32>>,
    pub history: Vec<EpochRecord>,
    /// The training run's manifest (configuration, timing).
    pub manifest: Manifest,
    /// Clean accuracy of the exported model on `test` (`eval_images` of the config).
    pub test: Accuracy,
    /// Wall seconds of the whole stage (calibration, training, export, evaluation).
    pub wall_s: f64,
}

/// Fine-tunes `init` (trainable, full precision) with QAT on `train`.
///
/// `calib` gives α's initial values; `latent`, when given, receives the latent
/// (full-precision shadow) weights after every epoch.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune(
    init: &ResNet20,
    qcfg: &QatConfig,
    tcfg: TrainConfig,
    calib: &DeviceData,
    train: &DeviceData,
    test: &DeviceData,
    data: DataIdentity,
    latent: Option<&Path>,
    progress: &mut dyn Progress,
    device: &Device,
) -> Result<QatOutcome> {
    if init.seam().persist().is_some() {
        return Err(Error::config(
            "qat",
            "quantized model",
            "QAT starts from a full-precision model",
        ));
    }
    if train.is_empty() {
        return Err(Error::config("qat", 0, "no training images"));
    }
    let t = Instant::now();
    let all: Vec<u32> = (0..calib.len() as u32).collect();
    let ranges = calibrate(&init.frozen(), calib, &all, 256)?;
    let seam = Arc::new(PactSeam::new(qcfg.clone(), &ranges, device)?);
    let qmodel = init.with_seam(seam.clone());
    let mut trainer = Trainer::from_model(qmodel, tcfg.clone(), data, train.len(), device)?;
    let mut alpha_per_epoch = vec![seam.alpha_values()?];
    while trainer.state.epoch < trainer.state.config.epochs {
        trainer.run_epoch(train, test, progress)?;
        let alphas = seam.alpha_values()?;
        let (lo, hi) = alphas
            .values()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        tracing::info!(
            "QAT {}: α after epoch {} in [{lo:.4}, {hi:.4}]",
            qcfg.bits.name(),
            trainer.state.epoch
        );
        alpha_per_epoch.push(alphas);
        if let Some(p) = latent {
            trainer.save(p)?;
        }
    }
    if qcfg.bn_reestimate_batches > 0 {
        let mut rng = crate::rng::Rng::new(tcfg.seed, "bn-reestimate");
        let order = rng.permutation(train.len());
        let batches: Vec<candle_core::Tensor> = order
            .chunks(tcfg.batch_size)
            .filter(|c| c.len() > 1)
            .take(qcfg.bn_reestimate_batches)
            .map(|c| train.batch(c).map(|(x, _)| x))
            .collect::<Result<_>>()?;
        trainer.model.reestimate_batch_norm(&batches)?;
    }
    let model = export(&trainer.model, &seam)?;
    let idx = eval_indices(test, tcfg.eval_images, tcfg.seed)?;
    let acc = clean_accuracy(&model, test, &idx, tcfg.eval_batch_size)?;
    let manifest = trainer.manifest()?;
    Ok(QatOutcome {
        model,
        alpha_per_epoch,
        history: trainer.state.history.clone(),
        manifest,
        test: acc,
        wall_s: t.elapsed().as_secs_f64(),
    })
}
