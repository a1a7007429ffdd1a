//! The stage graph: which models the study makes (full-precision models and the grid's
//! cells), what each depends on, and the content address (key) of every stage's output.
//!
//! A key is the SHA-256 of the stage's kind, its configuration (defaults included), the
//! identity of the data it reads and the keys of the stages it reads, plus
//! [`CACHE_VERSION`] (and, for evaluations, [`EVAL_VERSION`]). Changing any of them gives a new key, so a re-run recomputes exactly
//! what changed; everything else is read from the cache.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::{BitsSweep, FpStage, Init, StudyConfig};
use crate::data::DataIdentity;
use crate::quant::Bits;
use crate::train::{Adversarial, TrainConfig};

/// Bumped whenever a stage's code changes what it computes for the same configuration.
pub const CACHE_VERSION: u32 = 1;

/// Bumped whenever an evaluation's code changes what it computes for the same
/// configuration, leaving the model keys alone. 2: attacks run on the correctly classified
/// images only (the batches, and so the attacks' random draws, differ from version 1's).
pub const EVAL_VERSION: u32 = 2;

/// One model of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "lowercase")]
pub enum ModelSpec {
    /// A full-precision model: `natural` or `robust` (PGD-AT).
    Fp { init: Init, seed: u64 },
    /// Post-training quantization of a full-precision model.
    Ptq { init: Init, bits: Bits, seed: u64 },
    /// Quantization-aware training from `init`, on `fraction` of the training split,
    /// with or without PGD-AT inside.
    Qat {
        init: Init,
        bits: Bits,
        adversarial: bool,
        fraction: f64,
        seed: u64,
    },
}

impl ModelSpec {
    /// A readable, unique name: `fp-natural-s0`, `ptq-robust-w4a4-s0`,
    /// `qat-natural-w4a4-at-f0.25-s0`.
    pub fn id(&self) -> String {
        format!("{}-s{}", self.id_without_seed(), self.seed())
    }

    /// The id without the seed (the same model across seeds).
    pub fn id_without_seed(&self) -> String {
        match self {
            ModelSpec::Fp { init, .. } => format!("fp-{init}"),
            ModelSpec::Ptq { init, bits, .. } => format!("ptq-{init}-{bits}"),
            ModelSpec::Qat {
                init,
                bits,
                adversarial,
                fraction,
                ..
            } => format!(
                "qat-{init}-{bits}-{}-f{}",
                if *adversarial { "at" } else { "nat" },
                fraction
            ),
        }
    }

    pub fn seed(&self) -> u64 {
        match self {
            ModelSpec::Fp { seed, .. }
            | ModelSpec::Ptq { seed, .. }
            | ModelSpec::Qat { seed, .. } => *seed,
        }
    }

    pub fn init(&self) -> Init {
        match self {
            ModelSpec::Fp { init, .. }
            | ModelSpec::Ptq { init, .. }
            | ModelSpec::Qat { init, .. } => *init,
        }
    }

    /// The bit widths (`w32a32` for full precision).
    pub fn bits(&self) -> Bits {
        match self {
            ModelSpec::Fp { .. } => Bits::FULL_PRECISION,
            ModelSpec::Ptq { bits, .. } | ModelSpec::Qat { bits, .. } => *bits,
        }
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self, ModelSpec::Fp { .. })
    }

    /// Adversarial training inside the stage that made this model.
    pub fn adversarial(&self) -> bool {
        match self {
            ModelSpec::Fp { init, .. } => *init == Init::Robust,
            ModelSpec::Ptq { .. } => false,
            ModelSpec::Qat { adversarial, .. } => *adversarial,
        }
    }

    /// The full-precision model this one starts from (none for FP models and random init).
    pub fn parent(&self) -> Option<ModelSpec> {
        match self {
            ModelSpec::Fp { .. } => None,
            ModelSpec::Ptq { init, seed, .. } | ModelSpec::Qat { init, seed, .. } => {
                (*init != Init::Random).then_some(ModelSpec::Fp {
                    init: *init,
                    seed: *seed,
                })
            }
        }
    }

    /// The full-precision model a quantized model is compared with: its parent; for random
    /// init, the FP model trained the same way (robust when AT is inside QAT, else natural).
    /// It is also the source of the transfer attack.
    pub fn reference(&self) -> Option<ModelSpec> {
        if !self.is_quantized() {
            return None;
        }
        self.parent().or(Some(ModelSpec::Fp {
            init: if self.adversarial() {
                Init::Robust
            } else {
                Init::Natural
            },
            seed: self.seed(),
        }))
    }

    /// Every FP model this one needs (parent and reference).
    pub fn needs(&self) -> Vec<ModelSpec> {
        let mut v: Vec<ModelSpec> = self.parent().into_iter().collect();
        if let Some(r) = self.reference() {
            if !v.contains(&r) {
                v.push(r);
            }
        }
        v
    }
}

/// Every model of the study, full-precision models first, each once, in a fixed order.
pub fn models(cfg: &StudyConfig) -> Vec<ModelSpec> {
    let mut out: Vec<ModelSpec> = Vec::new();
    let mut push = |m: ModelSpec| {
        if !out.iter().any(|o| o.id() == m.id()) {
            out.push(m);
        }
    };
    let g = &cfg.grid;
    for &seed in &cfg.seeds {
        for init in [Init::Natural, Init::Robust] {
            push(ModelSpec::Fp { init, seed });
        }
    }
    for &seed in &cfg.seeds {
        for &init in &g.ptq_table.inits {
            for &bits in &g.ptq_table.bits {
                push(ModelSpec::Ptq { init, bits, seed });
            }
        }
        for &init in &g.qat_table.inits {
            for &adversarial in &g.qat_table.adversarial {
                for &bits in &g.qat_table.bits {
                    push(ModelSpec::Qat {
                        init,
                        bits,
                        adversarial,
                        fraction: g.qat_table.fraction,
                        seed,
                    });
                }
            }
        }
        let s = &g.bits_sweep;
        for &b in &s.bits {
            let (activations_only, weights_only) = BitsSweep::pair(b);
            for bits in [activations_only, weights_only] {
                push(ModelSpec::Qat {
                    init: s.init,
                    bits,
                    adversarial: s.adversarial,
                    fraction: s.fraction,
                    seed,
                });
            }
        }
        let c = &g.data_curve;
        for &init in &c.inits {
            for &fraction in &c.fractions {
                push(ModelSpec::Qat {
                    init,
                    bits: c.bits,
                    adversarial: c.adversarial,
                    fraction,
                    seed,
                });
            }
        }
    }
    out
}

/// SHA-256 (hex, first 16 characters) of a JSON value.
pub fn hash_json(v: &serde_json::Value) -> String {
    let s = serde_json::to_string(v).unwrap_or_default();
    let d = Sha256::digest(s.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The stage that makes the FP model of `init` (random init has none: it reads natural's).
pub fn fp_stage(cfg: &StudyConfig, init: Init) -> &FpStage {
    if init == Init::Robust {
        &cfg.robust
    } else {
        &cfg.natural
    }
}

/// The training recipe of an FP model (the study seed replaces the recipe's).
pub fn fp_train_config(cfg: &StudyConfig, init: Init, seed: u64) -> TrainConfig {
    TrainConfig {
        seed,
        ..fp_stage(cfg, init).train.clone()
    }
}

/// The training recipe of a QAT cell.
pub fn qat_train_config(cfg: &StudyConfig, spec: &ModelSpec) -> TrainConfig {
    let (init, adversarial, seed) = match spec {
        ModelSpec::Qat {
            init,
            adversarial,
            seed,
            ..
        } => (*init, *adversarial, *seed),
        _ => (Init::Natural, false, spec.seed()),
    };
    let base = if init == Init::Random {
        &cfg.qat.from_random
    } else {
        &cfg.qat.finetune
    };
    TrainConfig {
        seed,
        adversarial: if adversarial {
            Adversarial::Pgd(cfg.qat.adversarial.clone())
        } else {
            Adversarial::None
        },
        ..base.clone()
    }
}

/// The content address of a model stage. `parent_key` is the key of the model it starts
/// from.
pub fn model_key(
    cfg: &StudyConfig,
    spec: &ModelSpec,
    data: &DataIdentity,
    parent_key: Option<&str>,
) -> String {
    let stage = match spec {
        ModelSpec::Fp { init, seed } => match &fp_stage(cfg, *init).checkpoint {
            // A given checkpoint is its bytes, whatever recipe the configuration describes.
            Some(c) => serde_json::json!({ "checkpoint_sha256": c.sha256 }),
            None => serde_json::json!({
                "train": fp_train_config(cfg, *init, *seed),
                "train_count": fp_stage(cfg, *init).train_count,
            }),
        },
        ModelSpec::Ptq { .. } => serde_json::json!({ "ptq": cfg.ptq }),
        ModelSpec::Qat { .. } => {
            serde_json::json!({
                "train": qat_train_config(cfg, spec),
                "alpha_init": cfg.qat.alpha_init_for(spec.init()),
                "alpha_decay": cfg.qat.alpha_decay,
                "calib": cfg.qat.calib,
                "first_last_bits": cfg.qat.first_last_bits,
                // Always present: keys without it were made with un-augmented re-estimation.
                "bn_reestimate_batches": cfg.qat.bn_reestimate_batches,
            })
        }
    };
    let v = serde_json::json!({
        "version": CACHE_VERSION,
        "spec": spec,
        "stage": stage,
        "train_data": data.train_sha256,
        "parent": parent_key,
    });
    format!("{}-{}", spec.id(), hash_json(&v))
}

/// The content address of a model's evaluation.
pub fn eval_key(
    cfg: &StudyConfig,
    spec: &ModelSpec,
    model_key: &str,
    reference_key: Option<&str>,
    data: &DataIdentity,
) -> String {
    let v = serde_json::json!({
        "version": CACHE_VERSION,
        "eval_version": EVAL_VERSION,
        "eval": cfg.eval.key_of(spec),
        "model": model_key,
        "reference": reference_key,
        "test_data": data.test_sha256,
    });
    format!("eval-{}-{}", spec.id(), hash_json(&v))
}
