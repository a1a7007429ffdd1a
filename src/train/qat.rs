//! The QAT stage: PACT + DoReFa fine-tuning of a model through [`PactSeam`], natural or
//! with PGD-AT inside, then export to an ordinary quantized checkpoint.
//!
//! α starts from the full-precision activations of a calibration sample; its per-site
//! values are logged after every epoch. With a latent path, every epoch leaves a resume
//! point beside it (latent weights, momentum, α and its history, the QAT settings), from
//! which [`QatStart::Resume`] continues exactly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use super::{CheckpointPaths, EpochRecord, Progress, QatState, TrainConfig, Trainer};
use crate::data::augment::{self, AugmentDraw};
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
    /// Wall seconds of the whole stage (calibration, training, export, evaluation), over
    /// every session of a resumed run.
    pub wall_s: f64,
    /// CPU seconds of the same (0 where the platform's counter is not read).
    pub cpu_s: f64,
}

/// Where a QAT run starts.
pub enum QatStart<'a> {
    /// From this full-precision model (trainable), described by `init` (`random`,
    /// `natural:PATH`, a study key).
    Fresh { model: &'a ResNet20, init: String },
    /// From the resume point beside the latent path; the settings given must be the ones
    /// it was started with.
    Resume,
}

/// The QAT state (start, settings, α so far) and the training recipe of the resume point
/// beside `latent`.
pub fn resume_settings(latent: &Path) -> Result<(QatState, TrainConfig)> {
    let state = Trainer::read_state(latent)?;
    let qat = state.qat.ok_or_else(|| Error::Checkpoint {
        path: CheckpointPaths::new(latent).resume,
        problem: "not the resume point of a QAT run (no QAT settings)".into(),
    })?;
    Ok((qat, state.config))
}

/// Whether a resume point exists beside `latent`.
pub fn can_resume(latent: &Path) -> bool {
    CheckpointPaths::new(latent).resume.is_file()
}

/// Fine-tunes with QAT on `train`, from `start` (a fresh start trains the given model's
/// variables in place).
///
/// `calib` draws the images that give α its initial values (called on a fresh start only);
/// `latent`, when given, receives the latent (full-precision shadow) weights and the resume
/// point after every epoch. `stop` is asked between epochs: when it says so the run returns
/// `None`, resumable from `latent`.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune(
    start: QatStart<'_>,
    qcfg: &QatConfig,
    tcfg: TrainConfig,
    calib: impl FnOnce() -> Result<DeviceData>,
    train: &DeviceData,
    test: &DeviceData,
    data: DataIdentity,
    latent: Option<&Path>,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn Progress,
    device: &Device,
) -> Result<Option<QatOutcome>> {
    if train.is_empty() {
        return Err(Error::config("qat", 0, "no training images"));
    }
    let t = Instant::now();
    let cpu_start = crate::device::process_cpu_seconds();
    let (mut trainer, seam) = match start {
        QatStart::Fresh {
            model: init,
            init: start,
        } => {
            if init.seam().quantizes() {
                return Err(Error::config(
                    "qat",
                    "quantized model",
                    "QAT starts from a full-precision model",
                ));
            }
            let calib = calib()?;
            let all: Vec<u32> = (0..calib.len() as u32).collect();
            let ranges = calibrate(&init.frozen(), &calib, &all, 256)?;
            let seam = Arc::new(PactSeam::new(qcfg.clone(), &ranges, device)?);
            let qmodel = init.with_seam(seam.clone());
            let mut trainer = Trainer::from_model(qmodel, tcfg.clone(), data, train.len(), device)?;
            trainer.state.qat = Some(QatState {
                init: start,
                config: qcfg.clone(),
                alpha_per_epoch: vec![seam.alpha_values()?],
            });
            (trainer, seam)
        }
        QatStart::Resume => {
            let latent = latent.ok_or_else(|| {
                Error::config(
                    "qat",
                    "resume",
                    "resuming needs the latent checkpoint's path",
                )
            })?;
            let (saved, saved_t) = resume_settings(latent)?;
            if saved.config != *qcfg || saved_t != tcfg {
                return Err(Error::Checkpoint {
                    path: CheckpointPaths::new(latent).resume,
                    problem: "was started with other QAT settings or another recipe".into(),
                });
            }
            let start_alphas = saved.alpha_per_epoch.first().cloned().unwrap_or_default();
            // α's values come from the resume point; these only name the sites.
            let seam = Arc::new(PactSeam::new(qcfg.clone(), &start_alphas, device)?);
            let trainer = Trainer::resume_with_seam(latent, None, seam.clone(), device)?;
            tracing::info!(
                "QAT {}: resuming after epoch {} of {}",
                qcfg.bits.name(),
                trainer.state.epoch,
                trainer.state.config.epochs
            );
            (trainer, seam)
        }
    };
    let (mut epochs_s, cpu_before) = (0.0, trainer.state.cpu_s);
    while trainer.state.epoch < trainer.state.config.epochs {
        if stop() {
            return Ok(None);
        }
        let r = trainer.run_epoch(train, test, progress)?;
        epochs_s += r.wall_s;
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
        if let Some(q) = trainer.state.qat.as_mut() {
            q.alpha_per_epoch.push(alphas);
        }
        if let Some(p) = latent {
            trainer.save(p)?;
        }
    }
    if qcfg.bn_reestimate_batches > 0 {
        let mut rng = crate::rng::Rng::new(tcfg.seed, "bn-reestimate");
        let order = rng.permutation(train.len());
        // The statistics the weights were trained under: with the training's augmentation
        // (pad-and-crop's zero borders shift every layer's statistics).
        let batches: Vec<candle_core::Tensor> = order
            .chunks(tcfg.batch_size)
            .filter(|c| c.len() > 1)
            .take(qcfg.bn_reestimate_batches)
            .map(|c| {
                let (x, _) = train.batch(c)?;
                let draw = AugmentDraw::sample(&tcfg.augment, c.len(), &mut rng);
                augment::apply(&x, tcfg.augment.pad, &draw)
            })
            .collect::<Result<_>>()?;
        trainer.model.reestimate_batch_norm(&batches)?;
    }
    let model = export(&trainer.model, &seam)?;
    let idx = eval_indices(test, tcfg.eval_images, tcfg.seed)?;
    let acc = clean_accuracy(&model, test, &idx, tcfg.eval_batch_size)?;
    let manifest = trainer.manifest()?;
    // Epochs of earlier sessions are in the state; this session adds its own overhead.
    let wall_s = trainer.state.wall_s + (t.elapsed().as_secs_f64() - epochs_s).max(0.0);
    let epochs_cpu_s = trainer.state.cpu_s - cpu_before;
    let cpu_s =
        trainer.state.cpu_s + (crate::device::cpu_seconds_since(cpu_start) - epochs_cpu_s).max(0.0);
    Ok(Some(QatOutcome {
        model,
        alpha_per_epoch: trainer
            .state
            .qat
            .as_ref()
            .map(|q| q.alpha_per_epoch.clone())
            .unwrap_or_default(),
        history: trainer.state.history.clone(),
        manifest,
        test: acc,
        wall_s,
        cpu_s,
    }))
}
