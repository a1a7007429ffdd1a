//! The study's configuration: a JSON document (serde; every field has a documented default,
//! so a file may name only what it changes) and its three presets.
//!
//! ```text
//! StudyConfig
//! ├── data, seeds
//! ├── natural, robust        the full-precision stages (FpStage: training images + TrainConfig)
//! ├── ptq                    PTQ settings shared by every PTQ cell (PtqStage)
//! ├── qat                    QAT settings shared by every QAT cell (QatStage)
//! ├── grid                   which cells exist (Grid: the paper's tables and figures)
//! ├── eval                   how every model is evaluated (EvalStage)
//! └── findings               the thresholds of the verdicts (FindingsConfig)
//! ```
//!
//! ε values may be written as numbers (0.0314) or as `"8/255"`.

use serde::{Deserialize, Deserializer, Serialize};

use crate::attack::autoattack::AutoAttack;
use crate::attack::{AttackSettings, PgdConfig, ATTACK_NAMES};
use crate::quant::ptq::PtqMethod;
use crate::quant::pwlq::Breakpoint;
use crate::quant::qat::AlphaInit;
use crate::quant::seam::CalibMethod;
use crate::quant::Bits;
use crate::train::{Adversarial, LrSchedule, TrainConfig};
use crate::{Error, Result};

/// The whole study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StudyConfig {
    /// Written into the results. Default `custom`.
    pub name: String,
    /// `default` (the shipped archive `../shared/data/cifar10-jpeg.tar.gz` when present, else
    /// the embedded sample), `embedded`, or a path (archive, binary batches, image folder).
    /// Default `default`.
    pub data: String,
    /// Seeds; every model of the study is made once per seed. Default `[0]`.
    pub seeds: Vec<u64>,
    /// The study directory `reproduce` uses when `--out` is not given, relative to the
    /// working directory. Default null: `runs/study-<name>`. A study whose finished stages
    /// are committed (the `cpu` preset: `studies/cpu`) names its store here, so that
    /// `reproduce --preset cpu` on a fresh clone continues from what is committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<String>,
    /// The natural ("non-robust") full-precision model.
    pub natural: FpStage,
    /// The robust full-precision model (PGD-AT).
    pub robust: FpStage,
    pub ptq: PtqStage,
    pub qat: QatStage,
    pub grid: Grid,
    pub eval: EvalStage,
    pub findings: FindingsConfig,
}

impl Default for StudyConfig {
    fn default() -> Self {
        StudyConfig {
            name: "custom".into(),
            data: "default".into(),
            seeds: vec![0],
            out: None,
            natural: FpStage::default(),
            robust: FpStage::robust_default(),
            ptq: PtqStage::default(),
            qat: QatStage::default(),
            grid: Grid::default(),
            eval: EvalStage::default(),
            findings: FindingsConfig::default(),
        }
    }
}

/// A full-precision training stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FpStage {
    /// Training images (a seeded stratified subset); `null` = the whole training split.
    /// Default null.
    pub train_count: Option<usize>,
    /// The recipe (natural: [`TrainConfig::default`]; robust: the same with PGD-AT, ε 8/255,
    /// step 2/255, 7 steps).
    pub train: TrainConfig,
    /// A checkpoint trained beforehand to use instead of training (then `train` and
    /// `train_count` describe nothing the study does). Default null: the study trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<GivenCheckpoint>,
}

/// A full-precision checkpoint made outside the study, named by its path and pinned by the
/// sha256 of its bytes: the stage's key is the hash, so the same file anywhere is the same
/// stage, and a different file under the same path is an error, not a silent swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GivenCheckpoint {
    /// The `.safetensors` file, relative to the working directory (its `.json` manifest,
    /// when present beside it, travels with it).
    pub path: String,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
}

impl GivenCheckpoint {
    /// Checks the hash's form.
    pub fn validate(&self, what: &'static str) -> Result<()> {
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::config(
                what,
                &self.sha256,
                "expected 64 lower-case hex digits (sha256sum of the file)",
            ));
        }
        Ok(())
    }

    /// Reads the file's hash and compares it with the pinned one.
    pub fn verify(&self) -> Result<std::path::PathBuf> {
        let path = std::path::PathBuf::from(&self.path);
        let found = crate::data::file_sha256(&path)?;
        if found != self.sha256 {
            return Err(Error::config(
                "checkpoint.sha256",
                format!("{} has sha256 {found}", path.display()),
                format!("the configuration pins {}", self.sha256),
            ));
        }
        Ok(path)
    }
}

impl FpStage {
    /// The robust stage's default: the natural recipe with PGD-AT.
    pub fn robust_default() -> Self {
        FpStage {
            train_count: None,
            train: TrainConfig {
                adversarial: Adversarial::pgd_default(),
                ..TrainConfig::default()
            },
            checkpoint: None,
        }
    }
}

/// Settings of every PTQ cell (the bits come from the cell).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PtqStage {
    /// Weight quantizer. Default pwlq.
    pub method: PtqMethod,
    /// PWLQ breakpoint rule. Default search.
    pub breakpoint: Breakpoint,
    /// PWLQ bias correction. Default false.
    pub bias_correction: bool,
    /// Calibration images (seeded, stratified, from the training split). Default 512.
    pub calib: usize,
    /// Activation range rule. Default max.
    pub calib_range: CalibMethod,
    /// Weight bits of the first conv and last linear. Default 8.
    pub first_last_bits: u32,
}

impl Default for PtqStage {
    fn default() -> Self {
        PtqStage {
            method: PtqMethod::Pwlq,
            breakpoint: Breakpoint::Search,
            bias_correction: false,
            calib: 512,
            calib_range: CalibMethod::Max,
            first_last_bits: 8,
        }
    }
}

/// Settings of every QAT cell (bits, init, data fraction and AT come from the cell).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QatStage {
    /// Fine-tuning recipe from a trained (natural or robust) model. Default: 5 epochs,
    /// peak lr 0.01, otherwise [`TrainConfig::default`]. Its `adversarial` must be `none`:
    /// the cell decides AT.
    pub finetune: TrainConfig,
    /// Recipe from random initialization (training from scratch). Default: 10 epochs,
    /// peak lr 0.1.
    pub from_random: TrainConfig,
    /// The PGD inner loop of AT cells. Default ε 8/255, step 2/255, 7 steps, random start.
    pub adversarial: PgdConfig,
    /// α's start in cells from a trained (natural or robust) model. Default calibrated (max
    /// activation on `calib` images).
    pub alpha_init: AlphaInit,
    /// α's start in cells from random initialization. Default 10 (PACT's paper): an untrained
    /// network's activations grow through the residual stages, so calibrating on them puts
    /// every layer3 α at the upper bound (100), a 4-bit step of ~6 that zeroes most
    /// activations.
    pub alpha_init_random: AlphaInit,
    /// L2 penalty on α. Default 2e-4.
    pub alpha_decay: f64,
    /// Calibration images for α's start. Default 512.
    pub calib: usize,
    /// Weight bits of the first conv and last linear. Default 8.
    pub first_last_bits: u32,
    /// Training batches over which BatchNorm's statistics are re-estimated after the last
    /// epoch (0: keep the running statistics; see `QatConfig::bn_reestimate_batches`).
    /// Default 0.
    pub bn_reestimate_batches: usize,
}

impl Default for QatStage {
    fn default() -> Self {
        let pgd = match Adversarial::pgd_default() {
            Adversarial::Pgd(p) => p,
            Adversarial::None => PgdConfig::default(),
        };
        QatStage {
            finetune: TrainConfig {
                epochs: 5,
                lr: 0.01,
                ..TrainConfig::default()
            },
            from_random: TrainConfig {
                epochs: 10,
                ..TrainConfig::default()
            },
            adversarial: pgd,
            alpha_init: AlphaInit::Calibrated,
            alpha_init_random: AlphaInit::Fixed(10.0),
            alpha_decay: 2e-4,
            calib: 512,
            first_last_bits: 8,
            bn_reestimate_batches: 0,
        }
    }
}

impl QatStage {
    /// α's start for a cell from `init`.
    pub fn alpha_init_for(&self, init: Init) -> AlphaInit {
        match init {
            Init::Random => self.alpha_init_random,
            Init::Natural | Init::Robust => self.alpha_init,
        }
    }
}

/// Where a quantization stage starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    Random,
    Natural,
    Robust,
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Init::Random => "random",
            Init::Natural => "natural",
            Init::Robust => "robust",
        })
    }
}

/// The cells of the study: the union of the tables and figures below (a cell that two of
/// them share is made once).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grid {
    pub ptq_table: PtqTable,
    pub qat_table: QatTable,
    pub bits_sweep: BitsSweep,
    pub data_curve: DataCurve,
}

/// PTQ of the natural and robust models at several bit widths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PtqTable {
    /// Default [natural, robust] (PTQ needs a trained model: no random).
    pub inits: Vec<Init>,
    /// `wXaY` widths (32 = full precision). Default w8a8, w6a6, w4a8, w4a4, w3a8, w2a8.
    pub bits: Vec<Bits>,
}

impl Default for PtqTable {
    fn default() -> Self {
        PtqTable {
            inits: vec![Init::Natural, Init::Robust],
            bits: vec![
                Bits::of(8, 8),
                Bits::of(6, 6),
                Bits::of(4, 8),
                Bits::of(4, 4),
                Bits::of(3, 8),
                Bits::of(2, 8),
            ],
        }
    }
}

/// QAT from each init, with and without AT inside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QatTable {
    /// Default [random, natural, robust].
    pub inits: Vec<Init>,
    /// AT inside QAT: default [false, true].
    pub adversarial: Vec<bool>,
    /// Default w4a4, w8a8.
    pub bits: Vec<Bits>,
    /// Fraction of the training split fine-tuned on. Default 1.
    pub fraction: f64,
}

impl Default for QatTable {
    fn default() -> Self {
        QatTable {
            inits: vec![Init::Random, Init::Natural, Init::Robust],
            adversarial: vec![false, true],
            bits: vec![Bits::of(4, 4), Bits::of(8, 8)],
            fraction: 1.0,
        }
    }
}

/// The paper's Figure 2 analog: QAT with only activations (W32Ab) or only weights (WbA32)
/// quantized, at each b.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BitsSweep {
    /// Default natural.
    pub init: Init,
    /// AT inside QAT. Default false.
    pub adversarial: bool,
    /// Default [2, 3, 4, 8].
    pub bits: Vec<u32>,
    /// Default 1.
    pub fraction: f64,
}

impl BitsSweep {
    /// The sweep's pair at width `b`: activations only (W32Ab), weights only (WbA32).
    /// `b` is one of `bits`, which `StudyConfig::validate` checked.
    pub fn pair(b: u32) -> (Bits, Bits) {
        (Bits::of(32, b), Bits::of(b, 32))
    }
}

impl Default for BitsSweep {
    fn default() -> Self {
        BitsSweep {
            init: Init::Natural,
            adversarial: false,
            bits: vec![2, 3, 4, 8],
            fraction: 1.0,
        }
    }
}

/// Robustness against the fraction of training data used by QAT, per init.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataCurve {
    /// Default [random, natural, robust].
    pub inits: Vec<Init>,
    /// AT inside QAT. Default true.
    pub adversarial: bool,
    /// Default w4a4.
    pub bits: Bits,
    /// Default 0.01, 0.05, 0.1, 0.25, 0.5, 1.
    pub fractions: Vec<f64>,
}

impl Default for DataCurve {
    fn default() -> Self {
        DataCurve {
            inits: vec![Init::Random, Init::Natural, Init::Robust],
            adversarial: true,
            bits: Bits::of(4, 4),
            fractions: vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0],
        }
    }
}

/// How every model is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalStage {
    /// Test images (seeded, stratified); `null` = all. Default null.
    pub n: Option<usize>,
    /// Radii (L∞, pixel units). Default 2/255, 8/255.
    #[serde(deserialize_with = "de_eps_list")]
    pub eps: Vec<f64>,
    /// Attacks with straight-through gradients through quantizers. Default fgsm, pgd,
    /// apgd-ce, square.
    pub attacks: Vec<String>,
    pub settings: AttackSettings,
    /// Transfer attack from the full-precision model (quantized models only). Default true.
    pub transfer: bool,
    /// PGD with raw (true, zero almost everywhere) gradients too (quantized models only),
    /// to show masking. Default true.
    pub raw_gradients: bool,
    /// Batch size. Default 250.
    pub batch_size: usize,
    /// Seed of the subset and the attacks' draws (offset by the model's seed). Default 0.
    pub seed: u64,
    /// Cheap attacks run again on a larger set of test images (clean accuracy included),
    /// for tighter intervals in the tables. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wide: Option<WideEval>,
    /// AutoAttack on the models the findings rest on, on the same images as the attacks
    /// above. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattack: Option<AutoAttackEval>,
}

/// AutoAttack, the robustness number of record, on a selection of models: its robust
/// accuracy is reported beside PGD and the worst case of the other attacks, on the same
/// images, and its stages feed the masking diagnostics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoAttackEval {
    /// The cascade and its settings. Default: the standard version.
    pub attack: AutoAttack,
    /// Radii (L∞, pixel units). Default 8/255.
    #[serde(deserialize_with = "de_eps_list")]
    pub eps: Vec<f64>,
    /// Which models. Default: both full-precision models, PTQ W4A4, and QAT W4A4 trained on
    /// all of the training split (every init, with and without AT).
    pub models: ModelSelection,
}

impl Default for AutoAttackEval {
    fn default() -> Self {
        AutoAttackEval {
            attack: AutoAttack::default(),
            eps: vec![8.0 / 255.0],
            models: ModelSelection::default(),
        }
    }
}

/// A set of the study's models, by kind and bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSelection {
    /// The full-precision models. Default true.
    pub fp: bool,
    /// PTQ cells with these bits (every init). Default w4a4.
    pub ptq: Vec<Bits>,
    /// QAT cells with these bits trained on all of the training split (every init, with
    /// and without AT). Default w4a4.
    pub qat: Vec<Bits>,
}

impl Default for ModelSelection {
    fn default() -> Self {
        ModelSelection {
            fp: true,
            ptq: vec![Bits::of(4, 4)],
            qat: vec![Bits::of(4, 4)],
        }
    }
}

impl ModelSelection {
    /// True if `spec` is in the selection.
    pub fn contains(&self, spec: &crate::study::plan::ModelSpec) -> bool {
        use crate::study::plan::ModelSpec;
        match spec {
            ModelSpec::Fp { .. } => self.fp,
            ModelSpec::Ptq { bits, .. } => self.ptq.contains(bits),
            ModelSpec::Qat { bits, fraction, .. } => *fraction == 1.0 && self.qat.contains(bits),
        }
    }
}

impl EvalStage {
    /// The AutoAttack evaluation of `spec`, if it is selected for one.
    pub fn autoattack_for(&self, spec: &crate::study::plan::ModelSpec) -> Option<&AutoAttackEval> {
        self.autoattack.as_ref().filter(|a| a.models.contains(spec))
    }

    /// What an evaluation of `spec` depends on: every setting here, except that AutoAttack
    /// counts only for the models it is selected for (so changing its selection leaves the
    /// other models' evaluations alone).
    pub fn key_of(&self, spec: &crate::study::plan::ModelSpec) -> serde_json::Value {
        let mut v = serde_json::to_value(EvalStage {
            autoattack: None,
            ..self.clone()
        })
        .unwrap_or_default();
        if let (Some(a), Some(obj)) = (self.autoattack_for(spec), v.as_object_mut()) {
            obj.insert(
                "autoattack".into(),
                serde_json::to_value(a).unwrap_or_default(),
            );
        }
        v
    }
}

/// A second evaluation of every model on more test images, with the attacks cheap enough
/// for it; the findings keep using the per-example worst case on `eval.n` images, where
/// every attack ran on the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WideEval {
    /// Test images (seeded, stratified); `null` = all. Default null.
    pub n: Option<usize>,
    /// Attacks (straight-through gradients through quantizers). Default pgd.
    pub attacks: Vec<String>,
    /// Radii (L∞, pixel units). Default 8/255.
    #[serde(deserialize_with = "de_eps_list")]
    pub eps: Vec<f64>,
}

impl Default for WideEval {
    fn default() -> Self {
        WideEval {
            n: None,
            attacks: vec!["pgd".into()],
            eps: vec![8.0 / 255.0],
        }
    }
}

impl Default for EvalStage {
    fn default() -> Self {
        EvalStage {
            n: None,
            eps: vec![2.0 / 255.0, 8.0 / 255.0],
            attacks: ["fgsm", "pgd", "apgd-ce", "square"]
                .map(String::from)
                .to_vec(),
            settings: AttackSettings::default(),
            transfer: true,
            raw_gradients: true,
            batch_size: 250,
            seed: 0,
            wide: None,
            autoattack: None,
        }
    }
}

/// Thresholds of the findings' verdicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FindingsConfig {
    /// ε of F2-F6. Default 8/255.
    #[serde(deserialize_with = "de_eps")]
    pub eps: f64,
    /// ε of F1 (natural-init QAT has no robustness left at 8/255). Default 2/255.
    #[serde(deserialize_with = "de_eps")]
    pub f1_eps: f64,
    /// F3: the AT-QAT / QAT cost ratio that counts as "large". Default 2.
    pub f3_min_cost_ratio: f64,
    /// F4: fractions up to this are "partial data". Default 0.25.
    pub f4_partial_max: f64,
    /// A QAT cell's PACT α "ran away" when some site's α ends at a bound of its clamp or
    /// more than this factor above where it started; such cells are reported and left out
    /// of the pooled verdicts. Default 10.
    pub alpha_runaway_factor: f64,
}

impl Default for FindingsConfig {
    fn default() -> Self {
        FindingsConfig {
            eps: 8.0 / 255.0,
            f1_eps: 2.0 / 255.0,
            f3_min_cost_ratio: 2.0,
            f4_partial_max: 0.25,
            alpha_runaway_factor: 10.0,
        }
    }
}

/// A radius: a number or a `"k/255"` string.
fn parse_eps_value(v: &serde_json::Value) -> std::result::Result<f64, String> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| format!("bad number {n}")),
        serde_json::Value::String(s) => crate::attack::parse_fraction(s),
        other => Err(format!("expected a number or \"k/255\", got {other}")),
    }
}

fn de_eps<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    parse_eps_value(&v).map_err(serde::de::Error::custom)
}

fn de_eps_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    let v = Vec::<serde_json::Value>::deserialize(d)?;
    v.iter()
        .map(|x| parse_eps_value(x).map_err(serde::de::Error::custom))
        .collect()
}

fn check_fraction(what: &'static str, f: f64) -> Result<()> {
    if !(f > 0.0 && f <= 1.0) {
        return Err(Error::config(what, f, "must be in (0, 1]"));
    }
    Ok(())
}

impl StudyConfig {
    /// The study directory when none is given: `out`, else `runs/study-<name>`.
    pub fn default_out(&self) -> std::path::PathBuf {
        match &self.out {
            Some(o) => o.into(),
            None => format!("runs/study-{}", self.name).into(),
        }
    }

    /// Checks every setting, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.seeds.is_empty() {
            return Err(Error::config("seeds", "[]", "give at least one seed"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.seeds {
            if !seen.insert(s) {
                return Err(Error::config("seeds", s, "listed twice"));
            }
        }
        self.natural.train.validate()?;
        self.robust.train.validate()?;
        for (what, stage) in [
            ("natural.checkpoint.sha256", &self.natural),
            ("robust.checkpoint.sha256", &self.robust),
        ] {
            if let Some(c) = &stage.checkpoint {
                c.validate(what)?;
            }
        }
        if !matches!(self.robust.train.adversarial, Adversarial::Pgd(_)) {
            return Err(Error::config(
                "robust.train.adversarial",
                "none",
                "the robust model is adversarially trained: give {\"kind\": \"pgd\", ...}",
            ));
        }
        if matches!(self.natural.train.adversarial, Adversarial::Pgd(_)) {
            return Err(Error::config(
                "natural.train.adversarial",
                "pgd",
                "the natural model is trained on clean data",
            ));
        }
        for (what, n) in [
            ("natural.train_count", self.natural.train_count),
            ("robust.train_count", self.robust.train_count),
            ("eval.n", self.eval.n),
        ] {
            if n == Some(0) {
                return Err(Error::config(what, 0, "must be ≥ 1 (or null for all)"));
            }
        }
        if self.ptq.calib == 0 || self.qat.calib == 0 {
            return Err(Error::config("calib", 0, "must be ≥ 1"));
        }
        for (what, cfg) in [
            ("qat.finetune", &self.qat.finetune),
            ("qat.from_random", &self.qat.from_random),
        ] {
            cfg.validate()?;
            if cfg.adversarial != Adversarial::None {
                return Err(Error::config(
                    what,
                    "adversarial",
                    "must be none: each cell decides AT (grid), with qat.adversarial's PGD",
                ));
            }
        }
        self.qat.adversarial.validate()?;
        for (name, a) in [
            ("qat.alpha_init", self.qat.alpha_init),
            ("qat.alpha_init_random", self.qat.alpha_init_random),
        ] {
            a.validate(name)?;
        }
        for b in [self.ptq.first_last_bits, self.qat.first_last_bits] {
            crate::quant::uniform::code_range(b, crate::quant::uniform::Signedness::Symmetric)?;
        }
        let g = &self.grid;
        if g.ptq_table.inits.contains(&Init::Random) {
            return Err(Error::config(
                "grid.ptq_table.inits",
                "random",
                "PTQ quantizes a trained model: use natural or robust",
            ));
        }
        for &b in &g.bits_sweep.bits {
            Bits::new(b, b).map_err(|_| {
                Error::config("grid.bits_sweep.bits", b, crate::quant::bits::width_rule())
            })?;
        }
        check_fraction("grid.qat_table.fraction", g.qat_table.fraction)?;
        check_fraction("grid.bits_sweep.fraction", g.bits_sweep.fraction)?;
        for &f in &g.data_curve.fractions {
            check_fraction("grid.data_curve.fractions", f)?;
        }
        let e = &self.eval;
        if e.eps.is_empty() {
            return Err(Error::config("eval.eps", "[]", "give at least one ε"));
        }
        for &x in &e.eps {
            crate::attack::check_eps(crate::attack::Norm::Linf, x)?;
        }
        if let Some(w) = &e.wide {
            if w.n == Some(0) {
                return Err(Error::config(
                    "eval.wide.n",
                    0,
                    "must be ≥ 1 (or null for all)",
                ));
            }
            if w.eps.is_empty() {
                return Err(Error::config("eval.wide.eps", "[]", "give at least one ε"));
            }
            for &x in &w.eps {
                crate::attack::check_eps(crate::attack::Norm::Linf, x)?;
            }
        }
        if let Some(a) = &e.autoattack {
            a.attack.validate()?;
            if a.eps.is_empty() {
                return Err(Error::config(
                    "eval.autoattack.eps",
                    "[]",
                    "give at least one ε",
                ));
            }
            for &x in &a.eps {
                crate::attack::check_eps(crate::attack::Norm::Linf, x)?;
            }
        }
        let wide_attacks = e.wide.iter().flat_map(|w| &w.attacks);
        for a in e.attacks.iter().chain(wide_attacks) {
            if !ATTACK_NAMES.contains(&a.as_str()) {
                return Err(Error::config(
                    "eval.attacks",
                    a,
                    format!(
                        "unknown (known: {}; transfer and raw gradients are eval.transfer and eval.raw_gradients)",
                        ATTACK_NAMES.join(", ")
                    ),
                ));
            }
        }
        if e.batch_size == 0 {
            return Err(Error::config("eval.batch_size", 0, "must be ≥ 1"));
        }
        let s = &e.settings;
        if s.pgd_steps == 0
            || s.restarts == 0
            || s.apgd_iterations == 0
            || s.square_queries == 0
            || s.fab_iterations == 0
        {
            return Err(Error::config(
                "eval.settings",
                format!(
                    "steps {} restarts {} apgd {} square {} fab {}",
                    s.pgd_steps, s.restarts, s.apgd_iterations, s.square_queries, s.fab_iterations
                ),
                "every count must be ≥ 1",
            ));
        }
        // A step beyond ε only saturates at the ball's edge; a negative one climbs down.
        check_fraction("eval.settings.pgd_step_fraction", s.pgd_step_fraction)?;
        let f = &self.findings;
        for (what, x) in [("findings.eps", f.eps), ("findings.f1_eps", f.f1_eps)] {
            if !e.eps.iter().any(|&v| (v - x).abs() < 1e-9) {
                return Err(Error::config(
                    what,
                    format!("{:.4} ({:.2}/255)", x, x * 255.0),
                    "must be one of eval.eps",
                ));
            }
        }
        check_fraction("findings.f4_partial_max", f.f4_partial_max)?;
        if !(f.alpha_runaway_factor > 1.0 && f.alpha_runaway_factor.is_finite()) {
            return Err(Error::config(
                "findings.alpha_runaway_factor",
                f.alpha_runaway_factor,
                "must be a finite number > 1",
            ));
        }
        Ok(())
    }

    /// Reads a configuration file (JSON; unknown fields are errors) and validates it.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let c: StudyConfig = crate::io::read_json(path)?;
        c.validate()?;
        Ok(c)
    }

    /// A preset by name: one of [`PRESETS`].
    pub fn preset(name: &str) -> Result<Self> {
        let c = match name {
            "smoke" => smoke(),
            "cpu" => cpu(),
            "fast" => fast(),
            "full" => full(),
            other => {
                return Err(Error::config(
                    "preset",
                    other,
                    format!("unknown (known: {})", PRESETS.join(", ")),
                ))
            }
        };
        c.validate()?;
        Ok(c)
    }
}

/// The preset names.
pub const PRESETS: [&str; 4] = ["smoke", "cpu", "fast", "full"];

/// The committed golden full-precision checkpoints the `cpu` preset starts from, by name
/// (`natural`, `robust`) with the sha256 of their bytes. `scripts/train-golden.sh` trained
/// them; their manifests, per-epoch logs and commands lie beside them.
pub const GOLDEN_CHECKPOINTS: [(&str, &str); 2] = [
    (
        "natural",
        "1834a181dd62d5706e5f328b3fb4eb5a29aeaa47ad503d41c701fe840de43b02",
    ),
    (
        "robust",
        "cfd63fe0fbe78bfd98103068bd9bf71da8f73bf509021b7c8cd01bfe9d6d9f42",
    ),
];

/// `cpu`: [`cpu_with`] on the golden checkpoints of [`GOLDEN_CHECKPOINTS`].
pub fn cpu() -> StudyConfig {
    let [natural, robust] = GOLDEN_CHECKPOINTS.map(|(name, sha256)| GivenCheckpoint {
        path: format!("golden/checkpoints/{name}.safetensors"),
        sha256: sha256.into(),
    });
    cpu_with(natural, robust)
}

/// `smoke`: the whole pipeline on the embedded sample in a few CPU minutes. Its numbers
/// mean nothing (tiny models); it proves the code path end to end.
pub fn smoke() -> StudyConfig {
    let short = |epochs, lr| TrainConfig {
        epochs,
        lr,
        batch_size: 64,
        eval_images: Some(100),
        eval_adv_images: 20,
        ..TrainConfig::default()
    };
    let pgd2 = PgdConfig {
        eps: 8.0 / 255.0,
        step: 4.0 / 255.0,
        steps: 2,
        random_start: true,
    };
    StudyConfig {
        name: "smoke".into(),
        out: None,
        data: "embedded".into(),
        seeds: vec![0],
        natural: FpStage {
            train_count: Some(1000),
            checkpoint: None,
            train: short(3, 0.1),
        },
        robust: FpStage {
            train_count: Some(1000),
            checkpoint: None,
            train: TrainConfig {
                adversarial: Adversarial::Pgd(pgd2.clone()),
                ..short(2, 0.1)
            },
        },
        ptq: PtqStage {
            calib: 128,
            ..PtqStage::default()
        },
        qat: QatStage {
            finetune: short(1, 0.01),
            from_random: short(1, 0.1),
            adversarial: pgd2,
            calib: 128,
            ..QatStage::default()
        },
        grid: Grid {
            ptq_table: PtqTable {
                inits: vec![Init::Natural, Init::Robust],
                bits: vec![Bits::of(8, 8), Bits::of(4, 4)],
            },
            qat_table: QatTable {
                inits: vec![Init::Random, Init::Natural, Init::Robust],
                adversarial: vec![false, true],
                bits: vec![Bits::of(4, 4)],
                fraction: 0.1,
            },
            bits_sweep: BitsSweep {
                init: Init::Natural,
                adversarial: false,
                bits: vec![4],
                fraction: 0.1,
            },
            data_curve: DataCurve {
                inits: vec![Init::Random, Init::Natural, Init::Robust],
                adversarial: true,
                bits: Bits::of(4, 4),
                fractions: vec![0.05, 0.1],
            },
        },
        eval: EvalStage {
            n: Some(32),
            eps: vec![2.0 / 255.0, 8.0 / 255.0],
            attacks: ["fgsm", "pgd", "apgd-ce", "square"]
                .map(String::from)
                .to_vec(),
            settings: AttackSettings {
                pgd_steps: 3,
                apgd_iterations: 3,
                square_queries: 10,
                ..AttackSettings::default()
            },
            transfer: true,
            raw_gradients: true,
            batch_size: 32,
            seed: 0,
            wide: None,
            autoattack: None,
        },
        findings: FindingsConfig::default(),
    }
}

/// `fast`: every table and finding on the full data at reduced epochs (meant for a GPU; on
/// 2 CPU cores it takes days).
pub fn fast() -> StudyConfig {
    let fp = |epochs| TrainConfig {
        epochs,
        eval_images: Some(2000),
        ..TrainConfig::default()
    };
    StudyConfig {
        name: "fast".into(),
        out: None,
        data: "default".into(),
        seeds: vec![0],
        natural: FpStage {
            train_count: None,
            checkpoint: None,
            train: fp(30),
        },
        robust: FpStage {
            train_count: None,
            checkpoint: None,
            train: TrainConfig {
                adversarial: Adversarial::Pgd(PgdConfig {
                    eps: 8.0 / 255.0,
                    step: 2.0 / 255.0,
                    steps: 5,
                    random_start: true,
                }),
                ..fp(15)
            },
        },
        ptq: PtqStage::default(),
        qat: QatStage {
            finetune: TrainConfig {
                epochs: 3,
                lr: 0.01,
                schedule: LrSchedule::Cosine,
                ..fp(3)
            },
            from_random: fp(10),
            adversarial: PgdConfig {
                eps: 8.0 / 255.0,
                step: 2.5 / 255.0,
                steps: 3,
                random_start: true,
            },
            ..QatStage::default()
        },
        grid: Grid {
            data_curve: DataCurve {
                fractions: vec![0.01, 0.05, 0.1, 0.25, 1.0],
                ..DataCurve::default()
            },
            ..Grid::default()
        },
        eval: EvalStage {
            n: Some(1000),
            settings: AttackSettings {
                pgd_steps: 10,
                apgd_iterations: 50,
                square_queries: 1000,
                ..AttackSettings::default()
            },
            ..EvalStage::default()
        },
        findings: FindingsConfig::default(),
    }
}

/// The real study on a 2-core CPU (the `cpu` preset), on full-precision checkpoints trained
/// beforehand with `quant-robust train` (natural: the default recipe; robust: PGD-5 AT for
/// 15 epochs), sized to finish in about 8 hours of such a machine: PTQ at W8A8 … W2A8 plus
/// weights-only and activations-only rows; QAT W4A4 from random, natural and robust init,
/// with and without AT; the Figure 2 sweep at 2, 4 and 8 bits; the data curve at 10%, 25%
/// and 100%; the expensive attacks on 1,000 seeded test images, PGD-10 on all 10,000.
pub fn cpu_with(natural: GivenCheckpoint, robust: GivenCheckpoint) -> StudyConfig {
    let finetune = TrainConfig {
        epochs: 3,
        lr: 0.01,
        schedule: LrSchedule::Cosine,
        eval_images: Some(2000),
        ..TrainConfig::default()
    };
    StudyConfig {
        name: "cpu".into(),
        data: "default".into(),
        seeds: vec![0],
        out: Some("studies/cpu".into()),
        natural: FpStage {
            train_count: None,
            train: TrainConfig::default(),
            checkpoint: Some(natural),
        },
        robust: FpStage {
            train_count: None,
            train: TrainConfig {
                epochs: 15,
                adversarial: Adversarial::Pgd(PgdConfig {
                    eps: 8.0 / 255.0,
                    step: 2.0 / 255.0,
                    steps: 5,
                    random_start: true,
                }),
                ..TrainConfig::default()
            },
            checkpoint: Some(robust),
        },
        ptq: PtqStage::default(),
        qat: QatStage {
            finetune: finetune.clone(),
            from_random: TrainConfig {
                epochs: 6,
                eval_images: Some(2000),
                ..TrainConfig::default()
            },
            adversarial: PgdConfig {
                eps: 8.0 / 255.0,
                step: 2.5 / 255.0,
                steps: 3,
                random_start: true,
            },
            ..QatStage::default()
        },
        grid: Grid {
            ptq_table: PtqTable {
                inits: vec![Init::Natural, Init::Robust],
                bits: [
                    (8, 8),
                    (6, 6),
                    (4, 8),
                    (4, 4),
                    (3, 8),
                    (2, 8),
                    (4, 32),
                    (32, 4),
                ]
                .map(|(w, a)| Bits::of(w, a))
                .to_vec(),
            },
            qat_table: QatTable {
                bits: vec![Bits::of(4, 4)],
                ..QatTable::default()
            },
            bits_sweep: BitsSweep {
                bits: vec![2, 4, 8],
                ..BitsSweep::default()
            },
            data_curve: DataCurve {
                fractions: vec![0.1, 0.25, 1.0],
                ..DataCurve::default()
            },
        },
        eval: EvalStage {
            n: Some(1000),
            settings: AttackSettings {
                pgd_steps: 10,
                apgd_iterations: 50,
                square_queries: 1000,
                ..AttackSettings::default()
            },
            wide: Some(WideEval::default()),
            autoattack: Some(AutoAttackEval::default()),
            ..EvalStage::default()
        },
        findings: FindingsConfig::default(),
    }
}

/// `full`: the study's recipes at full length, three seeds, all test images.
pub fn full() -> StudyConfig {
    StudyConfig {
        name: "full".into(),
        seeds: vec![0, 1, 2],
        natural: FpStage {
            train_count: None,
            checkpoint: None,
            train: TrainConfig {
                epochs: 80,
                ..TrainConfig::default()
            },
        },
        robust: FpStage {
            train_count: None,
            checkpoint: None,
            train: TrainConfig {
                epochs: 40,
                adversarial: Adversarial::Pgd(PgdConfig {
                    eps: 8.0 / 255.0,
                    step: 2.0 / 255.0,
                    steps: 10,
                    random_start: true,
                }),
                ..TrainConfig::default()
            },
        },
        qat: QatStage {
            finetune: TrainConfig {
                epochs: 10,
                lr: 0.01,
                ..TrainConfig::default()
            },
            from_random: TrainConfig {
                epochs: 40,
                ..TrainConfig::default()
            },
            ..QatStage::default()
        },
        eval: EvalStage {
            n: None,
            eps: [1.0, 2.0, 4.0, 8.0, 16.0].map(|e| e / 255.0).to_vec(),
            ..EvalStage::default()
        },
        ..StudyConfig::default()
    }
}
