//! The pipeline's model stages as the study's runner and the command line both run them:
//! train a full-precision model ([`TrainFp`]), quantize it after training ([`Ptq`]) or while
//! training ([`Qat`]). Each holds its settings, takes its inputs, and returns what it made
//! ([`Made`]) with its manifest and cost; where the model is written, under which cache key,
//! and what else the manifest names (a cell, a source file) is the caller's.
//!
//! The fourth stage, evaluation, is `crate::eval::robust::evaluate_with` for both.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde_json::{json, Value};

use crate::data::batch::DeviceData;
use crate::data::subset::{self, SubsetSize};
use crate::data::{CifarData, Dataset};
use crate::eval::Accuracy;
use crate::manifest::Manifest;
use crate::model::ResNet20;
use crate::quant::ptq::{post_training_quantize, PtqConfig};
use crate::quant::qat::QatConfig;
use crate::train::qat::{fine_tune, QatStart};
use crate::train::{EpochRecord, Progress, TrainConfig, Trainer};
use crate::{Error, Result};

/// What a model stage made.
pub struct Made {
    pub model: ResNet20,
    /// What produced it: the stage's settings, seed, data, code, timings.
    pub manifest: Manifest,
    pub wall_s: f64,
    /// CPU seconds (0 where the platform's counter is not read).
    pub cpu_s: f64,
    /// The images it learned from: training images, or calibration images for PTQ.
    pub images: usize,
    /// Clean test accuracy as the stage measured it (QAT's training-time check).
    pub test: Option<Accuracy>,
    /// The stage's own record: PTQ's breakpoints and activation ranges, QAT's training
    /// history and α per epoch.
    pub details: Value,
}

impl Made {
    /// Adds `key` = `value` to the manifest's configuration (what the caller knows of the
    /// stage's inputs: a source file, a cell, a parent's key).
    pub fn note(&mut self, key: &str, value: Value) {
        if let Value::Object(m) = &mut self.manifest.config {
            m.insert(key.to_string(), value);
        }
    }
}

/// A seeded, class-stratified calibration set of `n` training images (all of them where
/// the split has fewer), on `dev`.
pub fn calibration_set(train: &Dataset, n: usize, seed: u64, dev: &Device) -> Result<DeviceData> {
    DeviceData::new(&subset::calibration(train, n.min(train.len()), seed)?, dev)
}

/// Post-training quantization of a full-precision model: `config` (method, bits,
/// calibration), calibrated on `config.calib` seeded training images.
pub struct Ptq {
    pub config: PtqConfig,
    /// Seed of the calibration set.
    pub seed: u64,
}

impl Ptq {
    pub fn run(&self, source: &ResNet20, data: &CifarData, dev: &Device) -> Result<Made> {
        let t = Instant::now();
        let cpu_start = crate::device::process_cpu_seconds();
        let calib = calibration_set(&data.train, self.config.calib, self.seed, dev)?;
        let q = post_training_quantize(source, &self.config, &calib)?;
        crate::device::synchronize(dev)?;
        let wall_s = t.elapsed().as_secs_f64();
        let cpu_s = crate::device::cpu_seconds_since(cpu_start);
        let mut manifest = Manifest::new("checkpoint", dev);
        manifest.seed = Some(self.seed);
        manifest.data = Some(data.identity.clone());
        manifest.config = json!({ "stage": "ptq", "ptq": self.config });
        manifest.add_timing("ptq", wall_s, dev);
        Ok(Made {
            model: q.model,
            manifest,
            wall_s,
            cpu_s,
            images: calib.len(),
            test: None,
            details: json!({
                "breakpoint_ratio_p_over_m": q.breakpoint_ratios,
                "activation_ranges": q.activation_ranges,
            }),
        })
    }
}

/// Quantization-aware training: PACT activations and DoReFa weights (`config`) trained with
/// the recipe `train` on a seeded, stratified subset of the training split, α started from
/// `calib` seeded training images (both drawn with the recipe's seed).
pub struct Qat {
    pub config: QatConfig,
    pub train: TrainConfig,
    pub calib: usize,
    /// The training images; `None` = the whole split.
    pub train_size: Option<SubsetSize>,
}

impl Qat {
    /// Runs (or, with [`QatStart::Resume`], continues) the stage; its latent weights and
    /// resume point go to `latent` after every epoch. `None` when `stop` said so between
    /// epochs: the run continues from `latent`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        start: QatStart<'_>,
        data: &CifarData,
        test: &DeviceData,
        latent: &Path,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn Progress,
        dev: &Device,
    ) -> Result<Option<Made>> {
        let seed = self.train.seed;
        let calib = || calibration_set(&data.train, self.calib, seed, dev);
        let train = DeviceData::new(&subset::training(&data.train, self.train_size, seed)?, dev)?;
        let Some(out) = fine_tune(
            start,
            &self.config,
            self.train.clone(),
            calib,
            &train,
            test,
            data.identity.clone(),
            Some(latent),
            stop,
            progress,
            dev,
        )?
        else {
            return Ok(None);
        };
        let mut manifest = out.manifest;
        manifest.config = json!({ "stage": "qat", "qat": self.config, "train": self.train });
        manifest.timings.clear();
        manifest.add_timing("qat", out.wall_s, dev);
        manifest
            .metrics
            .insert("test_accuracy".into(), out.test.fraction());
        manifest
            .metrics
            .insert("test_images".into(), out.test.total as f64);
        Ok(Some(Made {
            model: out.model,
            manifest,
            wall_s: out.wall_s,
            cpu_s: out.cpu_s,
            images: train.len(),
            test: Some(out.test),
            details: json!({
                "history": out.history,
                "alpha_per_epoch": out.alpha_per_epoch,
            }),
        }))
    }
}

/// Where a full-precision run starts.
#[derive(Debug, Clone)]
pub enum TrainStart {
    /// A fresh run of this recipe.
    Fresh(TrainConfig),
    /// The run whose checkpoint (and resume point) is at the stage's path, with its own
    /// recipe; `epochs` extends it to a new epoch count.
    Resume { epochs: Option<usize> },
}

/// Full-precision training: a fresh run or the continuation of one ([`TrainStart`]), saved
/// at `path` after every epoch, on a seeded, stratified subset of the training split drawn
/// with the run's seed.
pub struct TrainFp<'a> {
    pub start: TrainStart,
    pub path: &'a Path,
    /// The training images; `None` = the whole split.
    pub train_size: Option<SubsetSize>,
}

impl TrainFp<'_> {
    /// The finished run (its model, history and manifest), or `None` when `stop` said so
    /// between epochs: the run continues from the checkpoint.
    pub fn run(
        &self,
        data: &CifarData,
        test: &DeviceData,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn Progress,
        dev: &Device,
    ) -> Result<Option<Trainer>> {
        let mut trainer = match &self.start {
            TrainStart::Resume { epochs } => {
                let t = Trainer::resume(self.path, *epochs, dev)?;
                if t.state.data.train_sha256 != data.identity.train_sha256 {
                    tracing::warn!(
                        "{}: resuming on data that differs from the run's original data",
                        self.path.display()
                    );
                }
                t
            }
            TrainStart::Fresh(config) => {
                Trainer::new(config.clone(), data.identity.clone(), 0, dev)?
            }
        };
        let seed = trainer.state.config.seed;
        let train = DeviceData::new(&subset::training(&data.train, self.train_size, seed)?, dev)?;
        if train.is_empty() {
            return Err(Error::config("training images", 0, "the data set has none"));
        }
        if trainer.state.n_train == 0 {
            trainer.state.n_train = train.len();
        }
        tracing::info!(
            "training on {} images, epoch {} of {}, device {}",
            train.len(),
            trainer.state.epoch,
            trainer.state.config.epochs,
            crate::device::name(dev)
        );
        Ok(trainer
            .fit(&train, test, Some(self.path), stop, progress)?
            .then_some(trainer))
    }
}

/// Progress as log lines, one per epoch, named `id` (long runs without a terminal).
pub struct EpochLog<'a> {
    pub id: &'a str,
}

impl Progress for EpochLog<'_> {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, _steps: usize) {
        tracing::debug!("{} epoch {epoch}/{epochs} begins", self.id);
    }
    fn epoch_end(&mut self, r: &EpochRecord) {
        tracing::info!(
            "{} epoch {}: loss {:.4}, test {:.2}%{}",
            self.id,
            r.epoch,
            r.train_loss,
            r.test.percent(),
            r.test_pgd
                .map(|a| format!(", PGD-10 {:.2}%", a.percent()))
                .unwrap_or_default()
        );
    }
}
