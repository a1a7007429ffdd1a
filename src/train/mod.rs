//! Training: natural and PGD-adversarial (Madry et al. 2018), resumable.
//!
//! [`Trainer::fit`] runs epochs of seeded shuffling, on-device augmentation, an optional PGD inner
//! maximization (on a frozen view of the model, so only input gradients are computed), the
//! cross-entropy step with [`sgd::Sgd`] and the [`schedule::LrSchedule`], evaluation after
//! each epoch, and an atomic checkpoint (weights + manifest + training state) after each
//! epoch. A NaN or Inf loss stops training with [`crate::Error::Diverged`] before anything
//! is written, so the last good checkpoint stays.
//!
//! Resuming reads the training state (epoch, step, optimizer momentum, the generator's
//! position) saved beside the checkpoint and continues as if never stopped: 1 + 1 epochs
//! give the same weights as 2.

pub mod qat;
pub mod schedule;
pub mod sgd;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::attack::{cross_entropy, pgd_linf, PgdConfig};
use crate::data::augment::{self, AugmentConfig, AugmentDraw};
use crate::data::batch::{epoch_batches, DeviceData};
use crate::data::DataIdentity;
use crate::eval::{clean_accuracy, count_correct, eval_indices, pgd_accuracy, Accuracy};
use crate::manifest::Manifest;
use crate::model::{checkpoint, ResNet20, Seam};
use crate::rng::{Rng, RngState};
use crate::{Error, Result};

pub use schedule::LrSchedule;
pub use sgd::{Sgd, SgdConfig};

/// Adversarial training inside the training loop.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Adversarial {
    /// Natural training on clean images.
    #[default]
    None,
    /// PGD-AT: every batch replaced by its PGD adversarial examples.
    Pgd(PgdConfig),
}

impl Adversarial {
    /// The PGD-AT defaults (Madry et al. 2018 on CIFAR-10): ε 8/255, step 2/255, 7 steps,
    /// random start.
    pub fn pgd_default() -> Self {
        Adversarial::Pgd(PgdConfig {
            eps: 8.0 / 255.0,
            step: 2.0 / 255.0,
            steps: 7,
            random_start: true,
        })
    }
}

/// Everything that defines a training run. Defaults: the study's natural FP recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs in all (a resumed run continues up to this). Default 30.
    pub epochs: usize,
    /// Batch size. Default 128.
    pub batch_size: usize,
    /// Peak learning rate. Default 0.1.
    pub lr: f64,
    /// Learning-rate schedule. Default one-cycle.
    pub schedule: LrSchedule,
    pub sgd: SgdConfig,
    pub augment: AugmentConfig,
    /// Natural or PGD adversarial training. Default natural.
    pub adversarial: Adversarial,
    /// The run's seed (init, shuffling, augmentation, PGD starts). Default 0.
    pub seed: u64,
    /// Test images evaluated after each epoch (`None`: all; else a seeded stratified
    /// subset). Default all.
    pub eval_images: Option<usize>,
    /// Test images attacked with PGD-10 after each epoch of adversarial training. Default 500.
    pub eval_adv_images: usize,
    /// Batch size of evaluation. Default 500.
    pub eval_batch_size: usize,
    /// Steps between reads of the running loss (progress and divergence check). Default 20.
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 30,
            batch_size: 128,
            lr: 0.1,
            schedule: LrSchedule::default(),
            sgd: SgdConfig::default(),
            augment: AugmentConfig::default(),
            adversarial: Adversarial::None,
            seed: 0,
            eval_images: None,
            eval_adv_images: 500,
            eval_batch_size: 500,
            log_every: 20,
        }
    }
}

impl TrainConfig {
    /// Checks every setting, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("epochs", 0, "must be ≥ 1"));
        }
        if self.batch_size < 2 {
            return Err(Error::config(
                "batch_size",
                self.batch_size,
                "must be ≥ 2 (BatchNorm needs two images)",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", self.lr, "must be > 0"));
        }
        if self.eval_batch_size == 0 || self.log_every == 0 {
            return Err(Error::config(
                "eval_batch_size/log_every",
                format!("{}/{}", self.eval_batch_size, self.log_every),
                "must be ≥ 1",
            ));
        }
        self.schedule.validate()?;
        self.sgd.validate()?;
        if let Adversarial::Pgd(p) = &self.adversarial {
            p.validate()?;
        }
        Ok(())
    }
}

/// Metrics after one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr_end: f64,
    pub train_loss: f64,
    /// Accuracy on the training batches as trained (adversarial batches under AT).
    pub train_accuracy: f64,
    pub test: Accuracy,
    /// PGD-10 accuracy at ε 8/255 on `eval_adv_images` test images (AT only).
    pub test_pgd: Option<Accuracy>,
    pub images_per_s: f64,
    pub wall_s: f64,
}

/// What a resumed run needs besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub config: TrainConfig,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// The training generator's position after the last completed epoch.
    pub rng: RngState,
    pub history: Vec<EpochRecord>,
    /// Wall seconds of training so far (all sessions).
    pub wall_s: f64,
    /// CPU seconds of this process's threads during training so far (all sessions; 0
    /// where the platform's counter is not read).
    #[serde(default)]
    pub cpu_s: f64,
    pub data: DataIdentity,
    /// Training images per epoch.
    pub n_train: usize,
    /// What a QAT run needs besides (PACT and DoReFa settings, α's history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qat: Option<QatState>,
}

/// The QAT part of a resume point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatState {
    /// What the run started from (`random`, `natural:PATH`, the study key of a model).
    pub init: String,
    pub config: crate::quant::qat::QatConfig,
    /// α per site: at the start, then after each completed epoch.
    pub alpha_per_epoch: Vec<BTreeMap<String, f32>>,
}

/// The files of a training run's checkpoint.
///
/// `X.safetensors` + `X.json` are the model and its manifest (what users and PyTorch load);
/// `X.train.safetensors` is the resume point: the same weights (`model.*`), the optimizer's
/// momentum (`momentum.*`) and the [`TrainState`] (JSON in the metadata), in one file
/// written atomically, so a kill at any moment leaves a consistent resume point.
#[derive(Debug, Clone)]
pub struct CheckpointPaths {
    pub weights: PathBuf,
    pub resume: PathBuf,
}

impl CheckpointPaths {
    /// The paths beside a weights file.
    pub fn new(weights: &Path) -> Self {
        let stem = weights.with_extension("");
        CheckpointPaths {
            weights: weights.to_path_buf(),
            resume: PathBuf::from(format!("{}.train.safetensors", stem.display())),
        }
    }
}

/// Progress callbacks (a progress bar in the CLI, nothing in tests).
pub trait Progress {
    /// A new epoch of `steps` steps starts.
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    /// `done` steps of the epoch are done; running loss and accuracy, images/s.
    fn update(&mut self, _done: usize, _loss: f64, _acc: f64, _images_per_s: f64) {}
    /// An epoch ended.
    fn epoch_end(&mut self, _record: &EpochRecord) {}
}

/// No progress output.
pub struct Silent;
impl Progress for Silent {}

/// A training run in progress: model, optimizer, generator, state.
pub struct Trainer {
    pub model: ResNet20,
    sgd: Sgd,
    rng: Rng,
    pub state: TrainState,
    device: Device,
}

impl Trainer {
    /// A fresh run: the model initialized from the seed.
    pub fn new(
        cfg: TrainConfig,
        data: DataIdentity,
        n_train: usize,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let model = ResNet20::init(&mut Rng::new(cfg.seed, "init"), device)?;
        Self::from_model(model, cfg, data, n_train, device)
    }

    /// A fresh run from given weights (fine-tuning).
    pub fn from_model(
        model: ResNet20,
        cfg: TrainConfig,
        data: DataIdentity,
        n_train: usize,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut sgd = Sgd::new(model.trainable_vars(), cfg.sgd.clone())?;
        for (name, var, wd) in model.seam().trainable() {
            sgd.add_var(name, var, wd);
        }
        let rng = Rng::new(cfg.seed, "train");
        let state = TrainState {
            config: cfg,
            epoch: 0,
            step: 0,
            rng: rng.state(),
            history: Vec::new(),
            wall_s: 0.0,
            cpu_s: 0.0,
            data,
            n_train,
            qat: None,
        };
        Ok(Trainer {
            model,
            sgd,
            rng,
            state,
            device: device.clone(),
        })
    }

    /// Resumes from a checkpoint written by [`Trainer::save`] (`weights` names `X.safetensors`
    /// or the resume file itself). `epochs` may extend the run.
    pub fn resume(weights: &Path, epochs: Option<usize>, device: &Device) -> Result<Self> {
        let (state, model, momentum, seam_vars) = Self::read_resume(weights, epochs, device)?;
        if let Some(name) = seam_vars.keys().next() {
            return Err(Error::Checkpoint {
                path: weights.to_path_buf(),
                problem: format!("holds quantizer parameters ({name}): resume it with `qat`"),
            });
        }
        Self::assemble(state, model, &momentum, device)
    }

    /// Resumes a run whose model trains through `seam` (QAT): the seam's parameters (PACT
    /// α) are set from the resume point before the optimizer's state is restored.
    pub fn resume_with_seam(
        weights: &Path,
        epochs: Option<usize>,
        seam: Seam,
        device: &Device,
    ) -> Result<Self> {
        let (state, model, momentum, seam_vars) = Self::read_resume(weights, epochs, device)?;
        let trainable = seam.trainable();
        for (name, var, _) in &trainable {
            let t = seam_vars.get(name).ok_or_else(|| Error::Checkpoint {
                path: weights.to_path_buf(),
                problem: format!("no saved value of the quantizer parameter {name}"),
            })?;
            var.set(&t.to_device(device)?.reshape(var.dims())?)?;
        }
        if trainable.len() != seam_vars.len() {
            return Err(Error::Checkpoint {
                path: weights.to_path_buf(),
                problem: format!(
                    "{} saved quantizer parameters, the seam has {}",
                    seam_vars.len(),
                    trainable.len()
                ),
            });
        }
        Self::assemble(state, model.with_seam(seam), &momentum, device)
    }

    fn assemble(
        state: TrainState,
        model: ResNet20,
        momentum: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut sgd = Sgd::new(model.trainable_vars(), state.config.sgd.clone())?;
        for (name, var, wd) in model.seam().trainable() {
            sgd.add_var(name, var, wd);
        }
        sgd.load_state(momentum)?;
        let rng = Rng::from_state(&state.rng)?;
        Ok(Trainer {
            model,
            sgd,
            rng,
            state,
            device: device.clone(),
        })
    }

    /// The training state of a resume point, without loading anything else.
    pub fn read_state(weights: &Path) -> Result<TrainState> {
        let paths = Self::resume_paths(weights);
        let bytes = std::fs::read(&paths.resume).map_err(|e| Error::io(&paths.resume, e))?;
        Self::parse_state(&paths.resume, &bytes)
    }

    fn resume_paths(weights: &Path) -> CheckpointPaths {
        if weights.to_string_lossy().ends_with(".train.safetensors") {
            CheckpointPaths {
                weights: PathBuf::from(
                    weights
                        .to_string_lossy()
                        .replace(".train.safetensors", ".safetensors"),
                ),
                resume: weights.to_path_buf(),
            }
        } else {
            CheckpointPaths::new(weights)
        }
    }

    fn parse_state(path: &Path, bytes: &[u8]) -> Result<TrainState> {
        let bad = |problem: String| Error::Checkpoint {
            path: path.to_path_buf(),
            problem,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let state_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("train_state"))
            .ok_or_else(|| bad("no training state in its metadata (not a resume file)".into()))?;
        serde_json::from_str(state_json).map_err(|e| bad(format!("unreadable training state: {e}")))
    }

    /// The state, the model, the momentum buffers and the seam's parameters of a resume
    /// point.
    #[allow(clippy::type_complexity)]
    fn read_resume(
        weights: &Path,
        epochs: Option<usize>,
        device: &Device,
    ) -> Result<(
        TrainState,
        ResNet20,
        BTreeMap<String, Tensor>,
        BTreeMap<String, Tensor>,
    )> {
        let paths = Self::resume_paths(weights);
        let bytes = std::fs::read(&paths.resume).map_err(|e| Error::io(&paths.resume, e))?;
        let bad = |problem: String| Error::Checkpoint {
            path: paths.resume.clone(),
            problem,
        };
        let mut state = Self::parse_state(&paths.resume, &bytes)?;
        if let Some(e) = epochs {
            state.config.epochs = e;
        }
        state.config.validate()?;
        let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut weights_map = BTreeMap::new();
        let mut momentum = BTreeMap::new();
        let mut seam_vars = BTreeMap::new();
        for (k, t) in all {
            if let Some(n) = k.strip_prefix("model.") {
                weights_map.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("seam.") {
                seam_vars.insert(n.to_string(), t);
            } else if k.starts_with("momentum.") {
                momentum.insert(k, t);
            }
        }
        let nbt = weights_map
            .get("bn1.num_batches_tracked")
            .map(|t| t.to_scalar::<i64>())
            .transpose()?
            .unwrap_or(0);
        weights_map.retain(|k, _| !k.ends_with("num_batches_tracked"));
        let model = ResNet20::from_tensors(weights_map, nbt, device, true)
            .map_err(|e| bad(e.to_string()))?;
        Ok((state, model, momentum, seam_vars))
    }

    /// Total optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        let bs = self.state.config.batch_size;
        let n = self.state.n_train;
        let per_epoch = n.div_ceil(bs) - usize::from(n % bs == 1 && n > 1);
        per_epoch * self.state.config.epochs
    }

    /// Runs one epoch over `train`, then evaluates on `test`.
    pub fn run_epoch(
        &mut self,
        train: &DeviceData,
        test: &DeviceData,
        progress: &mut dyn Progress,
    ) -> Result<EpochRecord> {
        let cfg = self.state.config.clone();
        if train.len() != self.state.n_train {
            return Err(Error::config(
                "training data",
                train.len(),
                format!("this run was started on {} images", self.state.n_train),
            ));
        }
        let start = Instant::now();
        let cpu_start = crate::device::process_cpu_seconds();
        let epoch = self.state.epoch;
        let total = self.total_steps();
        let batches = epoch_batches(train.len(), cfg.batch_size, &mut self.rng);
        let frozen = self.model.frozen();
        progress.epoch_start(epoch + 1, cfg.epochs, batches.len());
        let zero = || Tensor::zeros((), DType::F32, &self.device);
        let (mut loss_acc, mut correct_acc) = (zero()?, zero()?);
        let (mut seen, mut lr) = (0usize, cfg.lr);
        let (mut loss_sum, mut correct_sum) = (0f64, 0f64);
        for (i, idx) in batches.iter().enumerate() {
            let (x, y) = train.batch(idx)?;
            let draw = AugmentDraw::sample(&cfg.augment, idx.len(), &mut self.rng);
            let x = augment::apply(&x, cfg.augment.pad, &draw)?;
            let x = match &cfg.adversarial {
                Adversarial::None => x,
                Adversarial::Pgd(p) => pgd_linf(&frozen, &x, &y, p, &mut self.rng)?,
            };
            let logits = self.model.forward(&x, true)?;
            let loss = cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            lr = cfg.schedule.lr(cfg.lr, self.state.step, total);
            self.sgd.step(&grads, lr)?;
            self.model.seam().after_step()?;
            self.state.step += 1;
            let b = idx.len() as f64;
            loss_acc = (loss_acc + (loss.detach() * b)?)?;
            correct_acc = (correct_acc + count_correct(&logits.detach(), &y)?)?;
            seen += idx.len();
            if (i + 1) % cfg.log_every == 0 || i + 1 == batches.len() {
                loss_sum += loss_acc.to_scalar::<f32>()? as f64;
                correct_sum += correct_acc.to_scalar::<f32>()? as f64;
                (loss_acc, correct_acc) = (zero()?, zero()?);
                if !loss_sum.is_finite() {
                    return Err(Error::Diverged {
                        epoch: epoch + 1,
                        step: self.state.step,
                        loss: loss_sum as f32,
                    });
                }
                let rate = seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
                progress.update(
                    i + 1,
                    loss_sum / seen as f64,
                    correct_sum / seen as f64,
                    rate,
                );
            }
        }
        crate::device::synchronize(&self.device)?;
        let train_s = start.elapsed().as_secs_f64();
        let idx = eval_indices(test, cfg.eval_images, cfg.seed)?;
        let test_acc = clean_accuracy(&frozen, test, &idx, cfg.eval_batch_size)?;
        let test_pgd = match &cfg.adversarial {
            Adversarial::Pgd(_) if cfg.eval_adv_images > 0 => Some(pgd_accuracy(
                &frozen,
                test,
                &eval_indices(test, Some(cfg.eval_adv_images), cfg.seed)?,
                cfg.eval_batch_size,
                &PgdConfig::default(),
                &mut Rng::new(cfg.seed, &format!("eval-pgd/{epoch}")),
            )?),
            _ => None,
        };
        let wall = start.elapsed().as_secs_f64();
        let record = EpochRecord {
            epoch: epoch + 1,
            lr_end: lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct_sum / seen.max(1) as f64,
            test: test_acc,
            test_pgd,
            images_per_s: seen as f64 / train_s.max(1e-9),
            wall_s: wall,
        };
        self.state.epoch += 1;
        self.state.wall_s += wall;
        self.state.cpu_s += crate::device::cpu_seconds_since(cpu_start);
        self.state.rng = self.rng.state();
        self.state.history.push(record.clone());
        progress.epoch_end(&record);
        Ok(record)
    }

    /// The manifest describing the current state.
    pub fn manifest(&self) -> Result<Manifest> {
        let mut m = Manifest::new("checkpoint", &self.device);
        m.seed = Some(self.state.config.seed);
        m.data = Some(self.state.data.clone());
        m.config = serde_json::to_value(&self.state.config).unwrap_or_default();
        m.add_timing("train", self.state.wall_s, &self.device);
        m.metrics.insert("train_cpu_s".into(), self.state.cpu_s);
        m.metrics
            .insert("epochs_done".into(), self.state.epoch as f64);
        m.metrics.insert("steps".into(), self.state.step as f64);
        m.metrics
            .insert("train_images".into(), self.state.n_train as f64);
        m.metrics
            .insert("num_parameters".into(), self.model.num_parameters() as f64);
        if let Some(r) = self.state.history.last() {
            m.metrics.insert("test_accuracy".into(), r.test.fraction());
            m.metrics.insert("test_images".into(), r.test.total as f64);
            m.metrics.insert("train_loss".into(), r.train_loss);
            m.metrics
                .insert("train_images_per_s".into(), r.images_per_s);
            if let Some(p) = r.test_pgd {
                m.metrics.insert("test_pgd10_accuracy".into(), p.fraction());
                m.metrics.insert("test_pgd10_images".into(), p.total as f64);
            }
        }
        Ok(m)
    }

    /// Writes the resume file, then the weights and their manifest (each atomically).
    pub fn save(&self, weights: &Path) -> Result<()> {
        let paths = CheckpointPaths::new(weights);
        let mut all = BTreeMap::new();
        for (k, t) in checkpoint::state_dict(&self.model)? {
            all.insert(format!("model.{k}"), t);
        }
        for (k, t) in self.sgd.state() {
            all.insert(k, t.to_device(&Device::Cpu)?);
        }
        for (k, v, _) in self.model.seam().trainable() {
            all.insert(format!("seam.{k}"), v.as_tensor().to_device(&Device::Cpu)?);
        }
        let mut meta = HashMap::new();
        meta.insert(
            "train_state".to_string(),
            serde_json::to_string(&self.state).map_err(|e| Error::Json {
                path: paths.resume.clone(),
                source: e,
            })?,
        );
        let bytes = checkpoint::to_safetensors_bytes(&all, &meta)?;
        crate::io::write_bytes_atomic(&paths.resume, &bytes)?;
        checkpoint::save(&self.model, &paths.weights, &self.manifest()?)
    }

    /// Runs the remaining epochs, saving after each when `out` is given. Returns false when
    /// it stopped early because `stop` said so (asked between epochs), true when every
    /// epoch ran.
    ///
    /// A run resumed with no epoch left saves once more: a process killed after its last
    /// resume point was written but before its weights were leaves an older weights file,
    /// and the resume point is the record of what the run finished.
    pub fn fit(
        &mut self,
        train: &DeviceData,
        test: &DeviceData,
        out: Option<&Path>,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn Progress,
    ) -> Result<bool> {
        if self.state.epoch >= self.state.config.epochs {
            if let Some(p) = out {
                self.save(p)?;
            }
        }
        while self.state.epoch < self.state.config.epochs {
            if stop() {
                return Ok(false);
            }
            self.run_epoch(train, test, progress)?;
            if let Some(p) = out {
                self.save(p)?;
            }
        }
        Ok(true)
    }
}
