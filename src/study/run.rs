//! Running the stage graph with a content-addressed cache.
//!
//! Layout of a study directory:
//! ```text
//! DIR/study.json                      the configuration (all defaults written out)
//! DIR/cache/<model key>/model.safetensors (+ model.json manifest, model.train.safetensors
//!                                     resume point of FP training), record.json
//! DIR/cache/<eval key>/record.json    a model's evaluation
//! DIR/cache/<eval key>/partial/<part>/<unit>.json   units of an evaluation in progress
//! DIR/results.json, DIR/cells/*.json, DIR/report.md, DIR/plots/   (written by `finish`)
//! ```
//! A stage is done when its `record.json` exists (written atomically, last). FP training
//! saves a resume point after every epoch and QAT after every epoch of its fine-tuning; an
//! evaluation keeps each finished unit (one attack at one ε on one batch) under `partial/`
//! and stops between units when asked, so an interrupted run continues mid-stage with the
//! same results; PTQ is short and restarts.
//!
//! Several processes may run on one study directory at once: a stage is computed by the
//! process that holds the lock in its cache folder (`DIR/cache/<key>/.lock`, removed once the
//! record is written); the others skip it, go on with other stages, and wait for it at the
//! end. A lock left by a killed process of the same host is taken over.
//!
//! Sharding: the jobs (a model and its evaluation) are numbered in plan order and shard
//! K of N runs those with index ≡ K-1 (mod N). A shard makes the full-precision models it
//! needs itself when they are not in its cache (deterministic: the same bits on the same
//! device), so shards can run anywhere; `merge` copies the shards' caches together.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::config::{GivenCheckpoint, Init, StudyConfig};
use super::plan::{self, ModelSpec};
use super::shard::Shard;
use super::stages::{EpochLog, Made, Ptq, Qat, TrainFp, TrainStart};
use crate::attack::{pgd::Pgd, transfer::Transfer, Attack, Norm};
use crate::data::batch::DeviceData;
use crate::data::{self, subset, CifarData, DataSource};
use crate::eval::robust::{
    evaluate_with, Hooks, OnBatch, RobustnessConfig, RobustnessReport, Unit,
};
use crate::manifest::{gpu_seconds, Manifest};
use crate::model::{checkpoint, Classifier, ResNet20};
use crate::quant::ptq::PtqConfig;
use crate::quant::qat::QatConfig;
use crate::quant::seam::{with_gradient_mode, UniformConfig};
use crate::quant::GradientMode;
use crate::rng::Rng;
use crate::train::qat::QatStart;
use crate::{Error, Result};

/// What a finished model stage recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub id: String,
    pub key: String,
    pub spec: ModelSpec,
    /// The checkpoint, relative to the study directory.
    pub checkpoint: String,
    /// Wall and GPU seconds of the stage (training or quantization).
    pub wall_s: f64,
    pub gpu_s: f64,
    /// CPU seconds of the stage, all threads (0 where not measured).
    #[serde(default)]
    pub cpu_s: f64,
    /// Training images the stage used (calibration images for PTQ).
    pub images: usize,
    /// Stage-specific details: training history, α per epoch, breakpoints, ranges.
    pub details: serde_json::Value,
    pub manifest: Manifest,
}

/// What a finished evaluation recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub id: String,
    pub key: String,
    pub model_key: String,
    /// Attacks with straight-through gradients, the gradient-free attack and the transfer
    /// attack; the worst case is over all of them.
    pub report: RobustnessReport,
    /// PGD with raw gradients through the quantizers (quantized models, when configured).
    pub raw: Option<RobustnessReport>,
    /// The cheap attacks on the larger image set (`eval.wide`, when configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wide: Option<RobustnessReport>,
    /// AutoAttack on the same images (`eval.autoattack`, for the models it selects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattack: Option<RobustnessReport>,
    pub wall_s: f64,
    pub gpu_s: f64,
    /// CPU seconds, all threads (0 where not measured).
    #[serde(default)]
    pub cpu_s: f64,
    pub manifest: Manifest,
}

/// How a run stops early.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run one shard of the jobs only.
    pub shard: Option<Shard>,
    /// Stop (cleanly, resumable) after computing this many stages.
    pub max_stages: Option<usize>,
    /// Stop (cleanly, resumable) once this instant has passed: checked between stages,
    /// between training epochs and between evaluation units.
    pub deadline: Option<Instant>,
    /// Which stages to run: everything, the models only, or the full-precision models only.
    pub scope: Scope,
}

/// What a run reports as it goes; the command line draws it as a progress bar.
pub trait RunProgress {
    /// The run goes through `models` models.
    fn start(&mut self, _models: usize) {}
    /// What it is doing now (`making <id>`, `attacking <id>`, waiting for other processes).
    fn doing(&mut self, _what: &str) {}
    /// One more model is done: made and evaluated, or found in the cache.
    fn model_done(&mut self) {}
    /// The run ended, finished or stopped.
    fn end(&mut self) {}
}

/// No progress output.
pub struct NoProgress;
impl RunProgress for NoProgress {}

/// Which of the study's stages a run computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every model and its evaluation.
    #[default]
    All,
    /// The models (training, PTQ, QAT), not their evaluations: the expensive stages can run
    /// while the evaluation settings are still changing (a model's key does not depend on
    /// them).
    Models,
    /// The full-precision models only: the checkpoints every other cell starts from (a
    /// cluster's first job, before the grid's array).
    Fp,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    /// Every stage of the run (or of the shard) is in the cache.
    Complete { computed: usize, cached: usize },
    /// Stopped by `max_stages` or `deadline`; run again to continue.
    Interrupted { computed: usize, remaining: usize },
}

/// The data source a configuration names.
pub fn data_source(cfg: &StudyConfig) -> Result<DataSource> {
    match cfg.data.as_str() {
        "default" => data::default_source(),
        "" => Err(Error::config(
            "data",
            "\"\"",
            "give a path, `default` (the shipped archive) or `embedded`",
        )),
        other => {
            let Ok(source) = other.parse::<DataSource>();
            Ok(source)
        }
    }
}

/// The cache directory of a stage.
pub fn cache_dir(out: &Path, key: &str) -> PathBuf {
    out.join("cache").join(key)
}

/// Reads a stage's record if the stage is done.
pub fn read_record<T: serde::de::DeserializeOwned>(out: &Path, key: &str) -> Result<Option<T>> {
    let p = cache_dir(out, key).join("record.json");
    if p.is_file() {
        Ok(Some(crate::io::read_json(&p)?))
    } else {
        Ok(None)
    }
}

/// The keys of every stage, computed from the configuration and the data.
pub struct Keys {
    pub models: Vec<(ModelSpec, String)>,
}

impl Keys {
    pub fn new(cfg: &StudyConfig, data: &data::DataIdentity) -> Self {
        let mut models: Vec<(ModelSpec, String)> = Vec::new();
        for spec in plan::models(cfg) {
            let parent_key = spec.parent().map(|p| {
                models
                    .iter()
                    .find(|(s, _)| *s == p)
                    .map(|(_, k)| k.clone())
                    .unwrap_or_default()
            });
            let key = plan::model_key(cfg, &spec, data, parent_key.as_deref());
            models.push((spec, key));
        }
        Keys { models }
    }

    pub fn model(&self, spec: &ModelSpec) -> Result<&str> {
        self.models
            .iter()
            .find(|(s, _)| s == spec)
            .map(|(_, k)| k.as_str())
            .ok_or_else(|| Error::config("model", spec.id(), "not in the study's plan"))
    }

    pub fn eval(
        &self,
        cfg: &StudyConfig,
        spec: &ModelSpec,
        data: &data::DataIdentity,
    ) -> Result<String> {
        let mk = self.model(spec)?;
        let rk = spec.reference().map(|r| self.model(&r)).transpose()?;
        Ok(plan::eval_key(cfg, spec, mk, rk, data))
    }
}

/// A study run in progress.
struct Runner<'a> {
    cfg: &'a StudyConfig,
    out: &'a Path,
    data: CifarData,
    test: DeviceData,
    keys: Keys,
    dev: Device,
    opts: &'a RunOptions,
    computed: usize,
    progress: &'a mut dyn RunProgress,
}

/// Stops the run cleanly (not an error to the caller).
struct Stop;

enum Outcome<T> {
    Done(T),
    Stopped,
    /// Another process is computing the stage (or one it needs).
    Busy,
}

impl<T> Outcome<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(t) => Outcome::Done(f(t)),
            Outcome::Stopped => Outcome::Stopped,
            Outcome::Busy => Outcome::Busy,
        }
    }
}

impl Runner<'_> {
    fn should_stop(&self) -> bool {
        self.opts.max_stages.is_some_and(|m| self.computed >= m)
            || self.opts.deadline.is_some_and(|d| Instant::now() >= d)
            || crate::device::stop_requested()
    }

    fn model_path(&self, key: &str) -> PathBuf {
        cache_dir(self.out, key).join("model.safetensors")
    }

    fn load(&self, spec: &ModelSpec, trainable: bool) -> Result<ResNet20> {
        let key = self.keys.model(spec)?;
        crate::quant::load_checkpoint(&self.model_path(key), &self.dev, trainable)
    }

    /// Claims the stage `key` for this process, or `None` while another process computes it.
    /// The claim is held until the stage's record is written.
    fn claim(&self, key: &str) -> Result<Option<crate::io::DirLock>> {
        let dir = cache_dir(self.out, key);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(match crate::io::DirLock::try_acquire(&dir)? {
            crate::io::Claim::Mine(lock) => Some(lock),
            crate::io::Claim::Held { pid, host } => {
                tracing::debug!("{key}: computed by process {pid} on {host}");
                None
            }
        })
    }

    /// Makes sure the model is in the cache (computing its dependencies first).
    fn ensure_model(&mut self, spec: &ModelSpec) -> Result<Outcome<ModelRecord>> {
        let key = self.keys.model(spec)?.to_string();
        if let Some(r) = read_record::<ModelRecord>(self.out, &key)? {
            return Ok(Outcome::Done(r));
        }
        for dep in spec.needs() {
            match self.ensure_model(&dep)? {
                Outcome::Done(_) => {}
                Outcome::Stopped => return Ok(Outcome::Stopped),
                Outcome::Busy => return Ok(Outcome::Busy),
            }
        }
        if self.should_stop() {
            return Ok(Outcome::Stopped);
        }
        let Some(_claim) = self.claim(&key)? else {
            return Ok(Outcome::Busy);
        };
        // Another process may have finished it between the first look and the claim.
        if let Some(r) = read_record::<ModelRecord>(self.out, &key)? {
            return Ok(Outcome::Done(r));
        }
        self.progress.doing(&format!("making {}", spec.id()));
        let record = match spec {
            ModelSpec::Fp { init, seed } => match self.train_fp(spec, *init, *seed, &key)? {
                Ok(r) => r,
                Err(Stop) => return Ok(Outcome::Stopped),
            },
            ModelSpec::Ptq { .. } => self.ptq(spec, &key)?,
            ModelSpec::Qat { .. } => match self.qat(spec, &key)? {
                Ok(r) => r,
                Err(Stop) => return Ok(Outcome::Stopped),
            },
        };
        crate::io::write_json_atomic(&cache_dir(self.out, &key).join("record.json"), &record)?;
        self.computed += 1;
        tracing::info!(
            "made {} in {:.1}s: {}",
            spec.id(),
            record.wall_s,
            record
                .manifest
                .metrics
                .get("test_accuracy")
                .map(|a| format!("clean {:.2}% (training-time check)", 100.0 * a))
                .unwrap_or_default()
        );
        Ok(Outcome::Done(record))
    }

    fn train_fp(
        &mut self,
        spec: &ModelSpec,
        init: Init,
        seed: u64,
        key: &str,
    ) -> Result<std::result::Result<ModelRecord, Stop>> {
        if let Some(given) = &plan::fp_stage(self.cfg, init).checkpoint {
            return self.given_fp(spec, given, key).map(Ok);
        }
        let path = self.model_path(key);
        let resume = crate::train::CheckpointPaths::new(&path).resume.is_file();
        if resume {
            tracing::info!("{}: resuming from {}", spec.id(), path.display());
        }
        let stage = TrainFp {
            start: if resume {
                TrainStart::Resume { epochs: None }
            } else {
                TrainStart::Fresh(plan::fp_train_config(self.cfg, init, seed))
            },
            path: &path,
            train_size: plan::fp_stage(self.cfg, init)
                .train_count
                .map(subset::SubsetSize::Count),
        };
        let id = spec.id();
        let Some(trainer) = stage.run(
            &self.data,
            &self.test,
            &|| self.should_stop(),
            &mut EpochLog { id: &id },
            &self.dev,
        )?
        else {
            return Ok(Err(Stop));
        };
        let m = trainer.manifest()?;
        Ok(Ok(ModelRecord {
            id: spec.id(),
            key: key.into(),
            spec: spec.clone(),
            checkpoint: format!("cache/{key}/model.safetensors"),
            wall_s: trainer.state.wall_s,
            gpu_s: gpu_seconds(&self.dev, trainer.state.wall_s),
            cpu_s: trainer.state.cpu_s,
            images: trainer.state.n_train,
            details: serde_json::json!({ "history": trainer.state.history }),
            manifest: m,
        }))
    }

    /// An FP model trained outside the study: its bytes are checked against the pinned
    /// hash and copied into the cache (its training history and cost come from its
    /// manifest).
    fn given_fp(
        &mut self,
        spec: &ModelSpec,
        given: &GivenCheckpoint,
        key: &str,
    ) -> Result<ModelRecord> {
        let src = given.verify()?;
        let dst = self.model_path(key);
        crate::io::copy_atomic(&src, &dst)?;
        let manifest = checkpoint::load_manifest(&src)?;
        if manifest.is_some() {
            crate::io::copy_atomic(
                &checkpoint::manifest_path(&src),
                &checkpoint::manifest_path(&dst),
            )?;
        }
        let manifest = manifest.unwrap_or_else(|| Manifest::new("checkpoint", &self.dev));
        let wall_s: f64 = manifest.timings.iter().map(|t| t.wall_s).sum();
        // Manifests written before `train_images` existed: the configured training set.
        let init = spec.init();
        let images = match manifest.metrics.get("train_images") {
            Some(&n) => n as usize,
            None => plan::fp_stage(self.cfg, init)
                .train_count
                .unwrap_or(self.data.train.len()),
        };
        Ok(ModelRecord {
            id: spec.id(),
            key: key.into(),
            spec: spec.clone(),
            checkpoint: format!("cache/{key}/model.safetensors"),
            wall_s,
            gpu_s: manifest.timings.iter().map(|t| t.gpu_s).sum(),
            cpu_s: manifest.metrics.get("train_cpu_s").copied().unwrap_or(0.0),
            images,
            details: serde_json::json!({ "given_checkpoint": given }),
            manifest,
        })
    }

    fn bits(&self, spec: &ModelSpec, first_last_bits: u32) -> UniformConfig {
        UniformConfig {
            first_last_bits,
            ..spec.bits().into()
        }
    }

    fn ptq(&mut self, spec: &ModelSpec, key: &str) -> Result<ModelRecord> {
        let parent = spec
            .parent()
            .ok_or_else(|| Error::config("ptq", spec.id(), "needs a trained model"))?;
        let fp = self.load(&parent, false)?;
        let p = &self.cfg.ptq;
        let stage = Ptq {
            config: PtqConfig {
                method: p.method,
                bits: self.bits(spec, p.first_last_bits),
                breakpoint: p.breakpoint,
                bias_correction: p.bias_correction,
                calib: p.calib,
                calib_range: p.calib_range,
            },
            seed: spec.seed(),
        };
        let mut made = stage.run(&fp, &self.data, &self.dev)?;
        made.note("spec", serde_json::json!(spec));
        made.note("parent", self.keys.model(&parent)?.into());
        checkpoint::save(&made.model, &self.model_path(key), &made.manifest)?;
        Ok(self.record(spec, key, made))
    }

    /// The record of a model stage the runner computed.
    fn record(&self, spec: &ModelSpec, key: &str, made: Made) -> ModelRecord {
        ModelRecord {
            id: spec.id(),
            key: key.into(),
            spec: spec.clone(),
            checkpoint: format!("cache/{key}/model.safetensors"),
            wall_s: made.wall_s,
            gpu_s: gpu_seconds(&self.dev, made.wall_s),
            cpu_s: made.cpu_s,
            images: made.images,
            details: made.details,
            manifest: made.manifest,
        }
    }

    /// The latent weights and resume point of a QAT cell in progress.
    fn latent_path(&self, key: &str) -> PathBuf {
        cache_dir(self.out, key).join("model.latent.safetensors")
    }

    fn qat(
        &mut self,
        spec: &ModelSpec,
        key: &str,
    ) -> Result<std::result::Result<ModelRecord, Stop>> {
        let ModelSpec::Qat { fraction, .. } = spec else {
            return Err(Error::config("qat", spec.id(), "not a QAT cell"));
        };
        let latent = self.latent_path(key);
        let resuming = crate::train::qat::can_resume(&latent);
        let init = match (resuming, spec.parent()) {
            (true, _) => None,
            (false, Some(p)) => Some(self.load(&p, true)?),
            (false, None) => Some(ResNet20::init(
                &mut Rng::new(spec.seed(), "init"),
                &self.dev,
            )?),
        };
        let start = match &init {
            Some(m) => QatStart::Fresh {
                model: m,
                init: match spec.parent() {
                    Some(p) => self.keys.model(&p)?.to_string(),
                    None => "random".into(),
                },
            },
            None => {
                tracing::info!("{}: resuming from {}", spec.id(), latent.display());
                QatStart::Resume
            }
        };
        let q = &self.cfg.qat;
        let stage = Qat {
            config: QatConfig {
                bits: self.bits(spec, q.first_last_bits),
                alpha_init: q.alpha_init_for(spec.init()),
                alpha_decay: q.alpha_decay,
                bn_reestimate_batches: q.bn_reestimate_batches,
                ..QatConfig::default()
            },
            train: plan::qat_train_config(self.cfg, spec),
            calib: q.calib,
            train_size: Some(subset::SubsetSize::Fraction(*fraction)),
        };
        let id = spec.id();
        let Some(mut made) = stage.run(
            start,
            &self.data,
            &self.test,
            &latent,
            &|| self.should_stop(),
            &mut EpochLog { id: &id },
            &self.dev,
        )?
        else {
            return Ok(Err(Stop));
        };
        made.note("spec", serde_json::json!(spec));
        let parent = spec.parent().map(|p| self.keys.model(&p)).transpose()?;
        made.note("parent", serde_json::json!(parent));
        checkpoint::save(&made.model, &self.model_path(key), &made.manifest)?;
        // The finished cell keeps its quantized model only: the latent weights and the
        // resume point are not needed any more.
        let paths = crate::train::CheckpointPaths::new(&latent);
        for p in [
            paths.resume,
            checkpoint::manifest_path(&latent),
            paths.weights,
        ] {
            crate::io::remove_if_present(&p)?;
        }
        Ok(Ok(self.record(spec, key, made)))
    }

    /// Makes sure the model's evaluation is in the cache.
    fn ensure_eval(&mut self, spec: &ModelSpec) -> Result<Outcome<EvalRecord>> {
        let key = self.keys.eval(self.cfg, spec, &self.data.identity)?;
        if let Some(r) = read_record::<EvalRecord>(self.out, &key)? {
            return Ok(Outcome::Done(r));
        }
        for m in std::iter::once(spec.clone()).chain(spec.needs()) {
            match self.ensure_model(&m)? {
                Outcome::Done(_) => {}
                Outcome::Stopped => return Ok(Outcome::Stopped),
                Outcome::Busy => return Ok(Outcome::Busy),
            }
        }
        if self.should_stop() {
            return Ok(Outcome::Stopped);
        }
        let Some(_claim) = self.claim(&key)? else {
            return Ok(Outcome::Busy);
        };
        if let Some(r) = read_record::<EvalRecord>(self.out, &key)? {
            return Ok(Outcome::Done(r));
        }
        self.progress.doing(&format!("attacking {}", spec.id()));
        let Some(record) = self.evaluate(spec, &key)? else {
            tracing::info!(
                "{}: stopped mid-evaluation; its finished units are kept in {}",
                spec.id(),
                cache_dir(self.out, &key).join(PARTIAL).display()
            );
            return Ok(Outcome::Stopped);
        };
        let dir = cache_dir(self.out, &key);
        crate::io::write_json_atomic(&dir.join("record.json"), &record)?;
        crate::io::remove_if_present(&dir.join(PARTIAL))?;
        self.computed += 1;
        let e8 = record
            .report
            .worst_case
            .iter()
            .map(|e| format!("{:.2}/255: {:.1}%", e.eps * 255.0, 100.0 * e.accuracy))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(
            "evaluated {} in {:.1}s: clean {:.1}%, worst case {e8}",
            spec.id(),
            record.wall_s,
            100.0 * record.report.clean.accuracy
        );
        Ok(Outcome::Done(record))
    }

    /// The units of part `part` of the evaluation `key`, kept under its `partial/` folder.
    fn units<'a>(&self, key: &str, part: &'a str, id: &'a str, eps: &'a [f64]) -> UnitDir<'a> {
        UnitDir {
            dir: cache_dir(self.out, key).join(PARTIAL).join(part),
            deadline: self.opts.deadline,
            log: Box::new(progress(id, part, eps)),
            reused: Reused::default(),
        }
    }

    /// The model's evaluation, or `None` when the run was asked to stop before its end.
    fn evaluate(&mut self, spec: &ModelSpec, key: &str) -> Result<Option<EvalRecord>> {
        let e = &self.cfg.eval;
        let model = self.load(spec, false)?;
        let mut attacks: Vec<Box<dyn Attack>> = e
            .attacks
            .iter()
            .map(|a| crate::attack::build(a, &e.settings, Norm::Linf))
            .collect::<Result<_>>()?;
        if let (true, Some(r)) = (e.transfer, spec.reference()) {
            attacks.push(Box::new(Transfer {
                source: Box::new(self.load(&r, false)?),
                source_name: r.id(),
                pgd: Pgd {
                    restarts: 1,
                    ..e.settings.pgd()
                },
            }));
        }
        let idx = crate::eval::eval_indices(&self.test, e.n, e.seed)?;
        let rcfg = RobustnessConfig {
            norm: Norm::Linf,
            eps: e.eps.clone(),
            batch_size: e.batch_size,
            seed: e.seed.wrapping_add(spec.seed()),
            ..RobustnessConfig::default()
        };
        let id = spec.id();
        let t = Instant::now();
        let cpu_start = crate::device::process_cpu_seconds();
        let mut reused = Reused::default();
        // Each part of the evaluation with its units' folder; `None` once a stop is asked for.
        let mut part = |name: &str,
                        model: &dyn Classifier,
                        idx: &[u32],
                        attacks: &[Box<dyn Attack>],
                        cfg: &RobustnessConfig|
         -> Result<Option<RobustnessReport>> {
            let mut units = self.units(key, name, &id, &cfg.eps);
            let r = evaluate_with(model, &self.test, idx, attacks, cfg, &mut units)?;
            reused.add(&units.reused);
            Ok(r)
        };
        let Some(report) = part("attacks", &model, &idx, &attacks, &rcfg)? else {
            return Ok(None);
        };
        let raw = if e.raw_gradients && spec.is_quantized() {
            let raw_model = with_gradient_mode(&model, GradientMode::Raw);
            let pgd: Vec<Box<dyn Attack>> = vec![Box::new(e.settings.pgd())];
            match part("raw gradients", &raw_model, &idx, &pgd, &rcfg)? {
                Some(r) => Some(r),
                None => return Ok(None),
            }
        } else {
            None
        };
        let wide = match &e.wide {
            Some(w) => {
                let attacks: Vec<Box<dyn Attack>> = w
                    .attacks
                    .iter()
                    .map(|a| crate::attack::build(a, &e.settings, Norm::Linf))
                    .collect::<Result<_>>()?;
                let idx = crate::eval::eval_indices(&self.test, w.n, e.seed)?;
                let wcfg = RobustnessConfig {
                    eps: w.eps.clone(),
                    ..rcfg.clone()
                };
                match part("wide", &model, &idx, &attacks, &wcfg)? {
                    Some(r) => Some(r),
                    None => return Ok(None),
                }
            }
            None => None,
        };
        let autoattack = match e.autoattack_for(spec) {
            Some(a) => {
                let attacks: Vec<Box<dyn Attack>> = vec![Box::new(a.attack.clone())];
                let acfg = RobustnessConfig {
                    eps: a.eps.clone(),
                    ..rcfg.clone()
                };
                match part("autoattack", &model, &idx, &attacks, &acfg)? {
                    Some(r) => Some(r),
                    None => return Ok(None),
                }
            }
            None => None,
        };
        crate::device::synchronize(&self.dev)?;
        // The stage's cost includes what earlier, interrupted runs spent on the units reused.
        let wall = t.elapsed().as_secs_f64() + reused.wall_s;
        let cpu = crate::device::cpu_seconds_since(cpu_start) + reused.cpu_s;
        let mut m = Manifest::new("evaluation", &self.dev);
        m.seed = Some(rcfg.seed);
        m.data = Some(self.data.identity.clone());
        m.config = serde_json::json!({
            "eval": e.key_of(spec),
            "model": self.keys.model(spec)?,
            "reference": spec.reference().map(|r| self.keys.model(&r).map(String::from)).transpose()?,
        });
        m.add_timing("eval", wall, &self.dev);
        if reused.units > 0 {
            tracing::info!(
                "{id}: {} units finished by earlier runs reused ({:.0} s of the {wall:.0} s)",
                reused.units,
                reused.wall_s
            );
            m.add_timing("eval: units of earlier runs", reused.wall_s, &self.dev);
        }
        Ok(Some(EvalRecord {
            id: spec.id(),
            key: key.into(),
            model_key: self.keys.model(spec)?.into(),
            report,
            raw,
            wide,
            autoattack,
            wall_s: wall,
            gpu_s: gpu_seconds(&self.dev, wall),
            cpu_s: cpu,
            manifest: m,
        }))
    }
}

/// The folder of an evaluation's finished units, inside its stage folder.
pub const PARTIAL: &str = "partial";

/// How many units an evaluation took from earlier runs, and what they had cost.
#[derive(Debug, Default, Clone, Copy)]
struct Reused {
    units: usize,
    wall_s: f64,
    cpu_s: f64,
}

impl Reused {
    fn add(&mut self, o: &Reused) {
        self.units += o.units;
        self.wall_s += o.wall_s;
        self.cpu_s += o.cpu_s;
    }
}

/// An evaluation part's units as files (`<dir>/<unit>.json`, written atomically), the run's
/// stop request (SIGTERM or the time budget) checked between units, and its log.
struct UnitDir<'a> {
    dir: PathBuf,
    deadline: Option<Instant>,
    log: Box<OnBatch<'a>>,
    reused: Reused,
}

impl Hooks for UnitDir<'_> {
    fn batch_done(&mut self, attack: &str, ei: usize, done: usize, total: usize) {
        (self.log)(attack, ei, done, total)
    }

    fn finished(&mut self, key: &str) -> Result<Option<Unit>> {
        let f = self.dir.join(format!("{key}.json"));
        if !f.is_file() {
            return Ok(None);
        }
        match crate::io::read_json(&f) {
            Ok(u) => Ok(Some(u)),
            Err(e) => {
                tracing::warn!("{e}: unreadable, the unit is redone");
                Ok(None)
            }
        }
    }

    fn reusing(&mut self, u: &Unit) {
        self.reused.units += 1;
        self.reused.wall_s += u.wall_s;
        self.reused.cpu_s += u.cpu_s;
    }

    fn keep(&mut self, key: &str, unit: &Unit) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        crate::io::write_json_atomic(&self.dir.join(format!("{key}.json")), unit)
    }

    fn should_stop(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d) || crate::device::stop_requested()
    }
}

/// Logs the end of each attack at each ε: an evaluation runs for many minutes and the study's
/// log (or terminal) shows how far it is.
fn progress<'a>(
    id: &'a str,
    part: &'a str,
    eps: &'a [f64],
) -> impl FnMut(&str, usize, usize, usize) + 'a {
    move |attack, ei, done, total| {
        if done == total {
            tracing::info!(
                "{id} ({part}): {attack} at ε {:.2}/255 done on {total} images",
                eps[ei] * 255.0
            );
        }
    }
}

/// Loads the configuration's data (once per run).
pub fn load_data(cfg: &StudyConfig) -> Result<CifarData> {
    let source = data_source(cfg)?;
    data::load(&source)
}

/// Runs the study's stages (or one shard's) into `out`, reading what is cached.
pub fn run(
    cfg: &StudyConfig,
    data: &CifarData,
    out: &Path,
    dev: &Device,
    opts: &RunOptions,
) -> Result<RunStatus> {
    run_with(cfg, data, out, dev, opts, &mut NoProgress)
}

/// [`run`], reporting its progress to `progress`.
pub fn run_with(
    cfg: &StudyConfig,
    data: &CifarData,
    out: &Path,
    dev: &Device,
    opts: &RunOptions,
    progress: &mut dyn RunProgress,
) -> Result<RunStatus> {
    cfg.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::io::write_json_atomic(&out.join("study.json"), cfg)?;
    let keys = Keys::new(cfg, &data.identity);
    let specs: Vec<ModelSpec> = keys.models.iter().map(|(s, _)| s.clone()).collect();
    // A shard owns every N-th job of the plan (of its full-precision models under
    // `Scope::Fp`).
    let mine: Vec<&ModelSpec> = specs
        .iter()
        .filter(|s| opts.scope != Scope::Fp || matches!(s, ModelSpec::Fp { .. }))
        .enumerate()
        .filter(|(i, _)| opts.shard.is_none_or(|s| s.owns(*i)))
        .map(|(_, s)| s)
        .collect();
    progress.start(mine.len());
    let mut r = Runner {
        cfg,
        out,
        test: DeviceData::new(&data.test, dev)?,
        data: data.clone(),
        keys,
        dev: dev.clone(),
        opts,
        computed: 0,
        progress,
    };
    // Several processes may share one store: each stage is claimed by the process that
    // computes it (a lock in its cache folder), the others go on with other stages and come
    // back to it once everything else is done.
    let (mut pending, mut cached) = (mine, 0);
    loop {
        let mut busy = Vec::new();
        for (i, spec) in pending.iter().enumerate() {
            let before = r.computed;
            let outcome = if opts.scope != Scope::All {
                r.ensure_model(spec)?.map(|_| ())
            } else {
                r.ensure_eval(spec)?.map(|_| ())
            };
            match outcome {
                Outcome::Done(()) => {
                    if r.computed == before {
                        cached += 1;
                    }
                    r.progress.model_done();
                }
                Outcome::Busy => busy.push(*spec),
                Outcome::Stopped => {
                    r.progress.end();
                    return Ok(RunStatus::Interrupted {
                        computed: r.computed,
                        remaining: pending.len() - i + busy.len(),
                    });
                }
            }
        }
        if busy.is_empty() {
            break;
        }
        let ids: Vec<String> = busy.iter().map(|s| s.id()).collect();
        r.progress
            .doing(&format!("waiting for other processes: {}", ids.join(", ")));
        tracing::debug!(
            "waiting for stages other processes compute: {}",
            ids.join(", ")
        );
        for _ in 0..WAIT_POLLS {
            if r.should_stop() {
                r.progress.end();
                return Ok(RunStatus::Interrupted {
                    computed: r.computed,
                    remaining: busy.len(),
                });
            }
            std::thread::sleep(WAIT_POLL);
        }
        pending = busy;
    }
    r.progress.end();
    Ok(RunStatus::Complete {
        computed: r.computed,
        cached,
    })
}

/// How often a run looks again at a stage another process is computing.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(500);
const WAIT_POLLS: usize = 10;

/// Copies the caches of shard directories into `out` (entries already there are kept).
/// The shards must have run the same configuration.
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<StudyConfig> {
    let mut cfg: Option<StudyConfig> = None;
    // Shards may read the same data from different paths: compare all but `data`.
    let same = |a: &StudyConfig, b: &StudyConfig| {
        StudyConfig {
            data: String::new(),
            ..a.clone()
        } == StudyConfig {
            data: String::new(),
            ..b.clone()
        }
    };
    for s in shards {
        let c: StudyConfig = crate::io::read_json(&s.join("study.json"))?;
        match &cfg {
            None => cfg = Some(c),
            Some(first) if !same(first, &c) => {
                return Err(Error::config(
                    "merge",
                    s.display(),
                    "ran a different configuration than the first shard",
                ))
            }
            _ => {}
        }
    }
    let cfg = cfg.ok_or_else(|| Error::config("merge", "[]", "give at least one shard"))?;
    std::fs::create_dir_all(out.join("cache")).map_err(|e| Error::io(out, e))?;
    crate::io::write_json_atomic(&out.join("study.json"), &cfg)?;
    // A shard that is `out` itself (every task wrote to one shared folder, as the Slurm jobs
    // do) has nothing to copy: the merge only collects.
    let same_dir = |s: &Path| match (s.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for s in shards {
        if same_dir(s) {
            continue;
        }
        let cache = s.join("cache");
        let entries = match std::fs::read_dir(&cache) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&cache, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&cache, e))?;
            let src = entry.path();
            let dst = out.join("cache").join(entry.file_name());
            // Only finished stages travel; a stage is finished when its record exists.
            if !src.join("record.json").is_file() || dst.join("record.json").is_file() {
                continue;
            }
            std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            for f in std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))? {
                let f = f.map_err(|e| Error::io(&src, e))?;
                let name = f.file_name();
                // Folders (an evaluation's units) belong to the stage in progress, not to
                // its result.
                if name == "record.json" || name == crate::io::DirLock::FILE || f.path().is_dir() {
                    continue;
                }
                crate::io::copy_atomic(&f.path(), &dst.join(&name))?;
            }
            crate::io::copy_atomic(&src.join("record.json"), &dst.join("record.json"))?;
        }
    }
    Ok(cfg)
}
