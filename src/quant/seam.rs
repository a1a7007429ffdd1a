//! Uniform post-training quantization of ResNet-20 through the model's quantizer seam.
//!
//! Weights: symmetric, per output channel, range max |w|; the first conv and the last
//! linear layer keep `first_last_bits` (8 by default, PACT's convention). Activations: the
//! ReLU outputs that feed every conv and linear layer, unsigned, each with a range
//! calibrated as the maximum over a calibration set (the [`Calibration`] seam records them
//! on a full-precision pass). `None` bits = full precision, so weights-only,
//! activations-only and both are all expressible. PWLQ, PACT and DoReFa build on the same
//! seam.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::bits::Bits;
use super::uniform::{quantize_activation, quantize_weight};
use super::GradientMode;
use crate::model::QuantSeam;
use crate::{Error, Result};

/// Bit widths of a uniformly quantized model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UniformConfig {
    /// Weight bits (2..=16); `None` = full precision.
    pub weight_bits: Option<u32>,
    /// Activation bits (2..=16); `None` = full precision.
    pub activation_bits: Option<u32>,
    /// Weight bits of `conv1` and `linear` when weights are quantized. Default 8.
    pub first_last_bits: u32,
}

impl Default for UniformConfig {
    fn default() -> Self {
        UniformConfig {
            weight_bits: None,
            activation_bits: None,
            first_last_bits: 8,
        }
    }
}

impl From<Bits> for UniformConfig {
    /// The widths of `bits`, first and last layers at the default 8 bits.
    fn from(bits: Bits) -> Self {
        UniformConfig {
            weight_bits: bits.weights(),
            activation_bits: bits.activations(),
            ..UniformConfig::default()
        }
    }
}

impl UniformConfig {
    /// `w4a8`-style name.
    pub fn name(&self) -> String {
        format!(
            "w{}a{}",
            self.weight_bits.unwrap_or(32),
            self.activation_bits.unwrap_or(32)
        )
    }
}

/// How an activation range is calibrated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CalibMethod {
    /// The maximum over the calibration set.
    #[default]
    Max,
    /// The given percentile (e.g. 99.99) of each batch's values, averaged over batches.
    Percentile(f64),
}

/// Records, per activation site, the range of the ReLU output (full-precision pass).
#[derive(Debug, Default)]
pub struct Calibration {
    method: CalibMethod,
    /// Per site: (max so far, sum of per-batch percentiles, batches).
    seen: Mutex<BTreeMap<String, (f32, f64, usize)>>,
}

impl Calibration {
    /// A calibration with the given method.
    pub fn new(method: CalibMethod) -> Self {
        Calibration {
            method,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// The recorded ranges.
    pub fn ranges(&self) -> BTreeMap<String, f32> {
        let seen = self.seen.lock().map(|r| r.clone()).unwrap_or_default();
        seen.into_iter()
            .map(|(k, (max, sum, n))| {
                let r = match self.method {
                    CalibMethod::Max => max,
                    CalibMethod::Percentile(_) => (sum / n.max(1) as f64) as f32,
                };
                (k, r)
            })
            .collect()
    }
}

/// The `p`-th percentile (0-100) of values, by sorting (nearest rank).
pub fn percentile(mut v: Vec<f32>, p: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

impl QuantSeam for Calibration {
    fn activation(&self, site: &str, x: &Tensor) -> Result<Tensor> {
        let y = crate::kernels::relu(x)?;
        let m = y.detach().max_all()?.to_scalar::<f32>()?;
        let pct = match self.method {
            CalibMethod::Max => 0.0,
            CalibMethod::Percentile(p) => {
                percentile(y.detach().flatten_all()?.to_vec1::<f32>()?, p) as f64
            }
        };
        if let Ok(mut r) = self.seen.lock() {
            let e = r.entry(site.to_string()).or_insert((0.0, 0.0, 0));
            e.0 = e.0.max(m);
            e.1 += pct;
            e.2 += 1;
        }
        Ok(y)
    }
    fn describe(&self) -> String {
        "calibration".into()
    }
}

/// Uniformly quantized weights and activations.
#[derive(Debug, Clone)]
pub struct UniformSeam {
    pub config: UniformConfig,
    /// Calibrated activation ranges per site.
    pub ranges: BTreeMap<String, f32>,
    pub mode: GradientMode,
}

impl QuantSeam for UniformSeam {
    fn weight(&self, layer: &str, w: &Tensor) -> Result<Tensor> {
        match self.config.weight_bits {
            None => Ok(w.clone()),
            Some(b) => {
                let bits = if layer == "conv1" || layer == "linear" {
                    self.config.first_last_bits
                } else {
                    b
                };
                quantize_weight(w, bits, true, self.mode)
            }
        }
    }

    fn activation(&self, site: &str, x: &Tensor) -> Result<Tensor> {
        self.after_relu(site, &crate::kernels::relu(x)?)
    }

    fn relu_first(&self, _site: &str) -> bool {
        true
    }

    fn after_relu(&self, site: &str, y: &Tensor) -> Result<Tensor> {
        match self.config.activation_bits {
            None => Ok(y.clone()),
            Some(b) => {
                let range = *self.ranges.get(site).ok_or_else(|| {
                    Error::config("activation site", site, "has no calibrated range")
                })?;
                quantize_activation(y, b, range, self.mode)
            }
        }
    }

    fn describe(&self) -> String {
        format!("uniform-{}-{:?}", self.config.name(), self.mode).to_lowercase()
    }

    fn quantizes(&self) -> bool {
        self.config.weight_bits.is_some() || self.config.activation_bits.is_some()
    }

    fn with_gradient_mode(&self, mode: GradientMode) -> Option<crate::model::Seam> {
        Some(std::sync::Arc::new(UniformSeam {
            mode,
            ..self.clone()
        }))
    }

    fn persist(&self) -> Result<Vec<(String, String)>> {
        Ok(StoredSeam::Uniform {
            config: self.config.clone(),
            ranges: self.ranges.clone(),
        }
        .to_metadata())
    }
}

/// The quantizers a checkpoint stores with its weights: a closed set, written into the
/// safetensors metadata one typed field per setting (`quant.version`, `quant.kind`,
/// `quant.weight_bits`, ..., `quant.range.<site>` or `quant.alpha.<site>`), which PyTorch's
/// loader ignores. The first checkpoints (version 1) hold the uniform settings as one JSON
/// entry `quant`; they still load.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredSeam {
    /// No quantizer: the weights as stored, ReLU activations.
    FullPrecision,
    /// Uniform weights and calibrated activation ranges: PTQ, and a QAT run's exported model.
    Uniform {
        config: UniformConfig,
        ranges: BTreeMap<String, f32>,
    },
    /// PACT activations with their α and DoReFa weights: a QAT run's latent weights.
    Pact {
        bits: UniformConfig,
        alphas: BTreeMap<String, f32>,
        alpha_bounds: (f64, f64),
    },
}

/// The prefix of every metadata entry of the stored quantizers.
const PREFIX: &str = "quant.";

impl StoredSeam {
    /// The version this code writes (it reads 1 and 2).
    pub const VERSION: u32 = 2;

    /// The metadata entries (none for full precision). Floats are written in their shortest
    /// form that reads back to the same bits.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        let field = |k: &str, v: String| (format!("{PREFIX}{k}"), v);
        let bits = |c: &UniformConfig| {
            vec![
                field("weight_bits", c.weight_bits.unwrap_or(32).to_string()),
                field(
                    "activation_bits",
                    c.activation_bits.unwrap_or(32).to_string(),
                ),
                field("first_last_bits", c.first_last_bits.to_string()),
            ]
        };
        let (kind, mut out) = match self {
            StoredSeam::FullPrecision => return Vec::new(),
            StoredSeam::Uniform { config, ranges } => {
                let mut v = bits(config);
                v.extend(
                    ranges
                        .iter()
                        .map(|(site, r)| field(&format!("range.{site}"), r.to_string())),
                );
                ("uniform", v)
            }
            StoredSeam::Pact {
                bits: b,
                alphas,
                alpha_bounds: (lo, hi),
            } => {
                let mut v = bits(b);
                v.push(field("alpha_min", lo.to_string()));
                v.push(field("alpha_max", hi.to_string()));
                v.extend(
                    alphas
                        .iter()
                        .map(|(site, a)| field(&format!("alpha.{site}"), a.to_string())),
                );
                ("pact", v)
            }
        };
        out.push(field("version", Self::VERSION.to_string()));
        out.push(field("kind", kind.to_string()));
        out
    }

    /// The quantizers a checkpoint's metadata describes, checked: a version this code knows,
    /// valid bit widths, finite positive ranges and α, no unknown field.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<Self> {
        let fields: BTreeMap<&str, &str> = meta
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(PREFIX)?, v.as_str())))
            .collect();
        let first = meta.get("quant");
        let stored = match (first, fields.is_empty()) {
            (None, true) => return Ok(StoredSeam::FullPrecision),
            (Some(_), false) => {
                return Err(Error::config(
                    "quantizer metadata",
                    "`quant` and `quant.*`",
                    "a checkpoint holds one format",
                ))
            }
            (Some(json), true) => {
                let q: PersistedQuant = serde_json::from_str(json).map_err(|e| {
                    Error::config("quantizer metadata", "quant", format!("unreadable: {e}"))
                })?;
                q.validate()?;
                StoredSeam::Uniform {
                    config: q.config,
                    ranges: q.ranges,
                }
            }
            (None, false) => Self::from_fields(&fields)?,
        };
        stored.validate()?;
        Ok(stored)
    }

    fn from_fields(fields: &BTreeMap<&str, &str>) -> Result<Self> {
        let get = |k: &str| {
            fields.get(k).copied().ok_or_else(|| {
                Error::config("quantizer metadata", format!("{PREFIX}{k}"), "missing")
            })
        };
        let number = |k: &str, v: &str| {
            v.parse::<f64>().map_err(|_| {
                Error::config(
                    "quantizer metadata",
                    format!("{PREFIX}{k} = {v}"),
                    "not a number",
                )
            })
        };
        let count = |k: &str| -> Result<u32> {
            let v = get(k)?;
            v.parse().map_err(|_| {
                Error::config(
                    "quantizer metadata",
                    format!("{PREFIX}{k} = {v}"),
                    "not a bit width",
                )
            })
        };
        let version = get("version")?;
        if version != Self::VERSION.to_string() {
            return Err(Error::config(
                "quantizer metadata version",
                version,
                format!("this build reads versions 1 and {}", Self::VERSION),
            ));
        }
        let b = super::Bits::new(count("weight_bits")?, count("activation_bits")?)?;
        let config = UniformConfig {
            first_last_bits: count("first_last_bits")?,
            ..b.into()
        };
        let per_site = |prefix: &str| -> Result<BTreeMap<String, f32>> {
            fields
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?, *v)))
                .map(|(site, v)| {
                    Ok((
                        site.to_string(),
                        number(&format!("{prefix}{site}"), v)? as f32,
                    ))
                })
                .collect()
        };
        let (stored, known): (StoredSeam, &[&str]) = match get("kind")? {
            "uniform" => (
                StoredSeam::Uniform {
                    config,
                    ranges: per_site("range.")?,
                },
                &["range."],
            ),
            "pact" => (
                StoredSeam::Pact {
                    bits: config,
                    alphas: per_site("alpha.")?,
                    alpha_bounds: (
                        number("alpha_min", get("alpha_min")?)?,
                        number("alpha_max", get("alpha_max")?)?,
                    ),
                },
                &["alpha.", "alpha_min", "alpha_max"],
            ),
            other => {
                return Err(Error::config(
                    "quantizer metadata",
                    format!("{PREFIX}kind = {other}"),
                    "expected uniform or pact",
                ))
            }
        };
        let common = [
            "version",
            "kind",
            "weight_bits",
            "activation_bits",
            "first_last_bits",
        ];
        if let Some(k) = fields
            .keys()
            .find(|k| !common.contains(k) && !known.iter().any(|p| k.starts_with(p)))
        {
            return Err(Error::config(
                "quantizer metadata",
                format!("{PREFIX}{k}"),
                "unknown field",
            ));
        }
        Ok(stored)
    }

    /// Finite, positive activation ranges and α; bounds in order; a known first/last width.
    fn validate(&self) -> Result<()> {
        let (config, values, what) = match self {
            StoredSeam::FullPrecision => return Ok(()),
            StoredSeam::Uniform { config, ranges } => (config, ranges, "activation range"),
            StoredSeam::Pact {
                bits,
                alphas,
                alpha_bounds: (lo, hi),
            } => {
                if !(*lo > 0.0 && hi > lo) {
                    return Err(Error::config(
                        "alpha bounds",
                        format!("({lo}, {hi})"),
                        "need 0 < low < high",
                    ));
                }
                (bits, alphas, "PACT α")
            }
        };
        super::uniform::code_range(
            config.first_last_bits,
            super::uniform::Signedness::Symmetric,
        )?;
        if let Some((site, r)) = values.iter().find(|(_, r)| !(r.is_finite() && **r > 0.0)) {
            return Err(Error::config(
                what,
                format!("{site} = {r}"),
                "must be finite and positive",
            ));
        }
        Ok(())
    }

    /// The seam these settings describe, with straight-through gradients (`None` for full
    /// precision); PACT's α as variables on `device`.
    pub fn into_seam(self, device: &candle_core::Device) -> Result<Option<crate::model::Seam>> {
        Ok(match self {
            StoredSeam::FullPrecision => None,
            StoredSeam::Uniform { config, ranges } => Some(std::sync::Arc::new(UniformSeam {
                config,
                ranges,
                mode: GradientMode::Ste,
            })),
            StoredSeam::Pact {
                bits,
                alphas,
                alpha_bounds,
            } => {
                let config = super::qat::QatConfig {
                    bits,
                    alpha_init: super::qat::AlphaInit::Calibrated,
                    alpha_bounds,
                    ..super::qat::QatConfig::default()
                };
                Some(std::sync::Arc::new(super::qat::PactSeam::new(
                    config, &alphas, device,
                )?))
            }
        })
    }
}

/// The first checkpoints' quantizers: one JSON entry `quant` in the metadata (version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedQuant {
    /// Absent in the first checkpoints: version 1.
    #[serde(default = "PersistedQuant::first_version")]
    version: u32,
    config: UniformConfig,
    ranges: BTreeMap<String, f32>,
}

impl PersistedQuant {
    fn first_version() -> u32 {
        1
    }

    fn validate(&self) -> Result<()> {
        if self.version != 1 {
            return Err(Error::config(
                "quantizer metadata version",
                self.version,
                format!(
                    "the JSON entry `quant` is version 1; version {} writes `quant.*` fields",
                    StoredSeam::VERSION
                ),
            ));
        }
        Ok(())
    }
}

/// Loads a checkpoint into a model on `device` (`trainable`: as variables, for training),
/// with the quantizers stored in it (a PTQ or QAT checkpoint) attached; an error naming the
/// file where they cannot be read.
pub fn load_checkpoint(
    path: &std::path::Path,
    device: &candle_core::Device,
    trainable: bool,
) -> Result<crate::model::ResNet20> {
    let stored = crate::model::checkpoint::load_stored(path, device, trainable)?;
    let bad = |e: Error| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: e.to_string(),
    };
    let seam = StoredSeam::from_metadata(&stored.metadata)
        .and_then(|q| q.into_seam(device))
        .map_err(bad)?;
    Ok(match seam {
        Some(s) => stored.model.with_seam(s),
        None => stored.model,
    })
}

/// Calibrates activation ranges: the maximum ReLU output per site over the images `idx`
/// of `data`, the model in evaluation mode at full precision.
pub fn calibrate(
    model: &crate::model::ResNet20,
    data: &crate::data::batch::DeviceData,
    idx: &[u32],
    batch_size: usize,
) -> Result<BTreeMap<String, f32>> {
    calibrate_with(model, data, idx, batch_size, CalibMethod::Max)
}

/// Calibrates activation ranges with a given method.
pub fn calibrate_with(
    model: &crate::model::ResNet20,
    data: &crate::data::batch::DeviceData,
    idx: &[u32],
    batch_size: usize,
    method: CalibMethod,
) -> Result<BTreeMap<String, f32>> {
    if let CalibMethod::Percentile(p) = method {
        if !(p > 0.0 && p <= 100.0) {
            return Err(Error::config("percentile", p, "must be in (0, 100]"));
        }
    }
    let cal = std::sync::Arc::new(Calibration::new(method));
    let m = model.with_seam(cal.clone());
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, _) = data.batch(chunk)?;
        m.forward(&x, false)?;
    }
    Ok(cal.ranges())
}

/// A uniformly quantized view of `model` (shares its weights).
pub fn uniform_ptq(
    model: &crate::model::ResNet20,
    config: UniformConfig,
    ranges: BTreeMap<String, f32>,
    mode: GradientMode,
) -> crate::model::ResNet20 {
    model.with_seam(std::sync::Arc::new(UniformSeam {
        config,
        ranges,
        mode,
    }))
}

/// The same model with its quantizers' gradients passed as `mode` says (no change for a
/// full-precision model).
pub fn with_gradient_mode(
    model: &crate::model::ResNet20,
    mode: GradientMode,
) -> crate::model::ResNet20 {
    model.with_seam(
        model
            .seam()
            .with_gradient_mode(mode)
            .unwrap_or_else(|| model.seam().clone()),
    )
}
