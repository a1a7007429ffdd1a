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

    fn persist(&self) -> Option<String> {
        serde_json::to_string(&PersistedQuant {
            version: PersistedQuant::VERSION,
            config: self.config.clone(),
            ranges: self.ranges.clone(),
        })
        .ok()
    }
}

/// The quantizers a checkpoint stores in its metadata (key `quant`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedQuant {
    /// The format's version ([`PersistedQuant::VERSION`]; absent in the first checkpoints,
    /// which are version 1).
    #[serde(default = "PersistedQuant::first_version")]
    pub version: u32,
    pub config: UniformConfig,
    pub ranges: BTreeMap<String, f32>,
}

impl PersistedQuant {
    /// The version this code writes and reads.
    pub const VERSION: u32 = 1;

    fn first_version() -> u32 {
        1
    }

    /// Checks what a file claims: a version this code knows, finite positive ranges.
    pub fn validate(&self) -> Result<()> {
        if self.version != Self::VERSION {
            return Err(Error::config(
                "quantizer metadata version",
                self.version,
                format!("this build reads version {}", Self::VERSION),
            ));
        }
        if let Some((site, r)) = self
            .ranges
            .iter()
            .find(|(_, r)| !(r.is_finite() && **r > 0.0))
        {
            return Err(Error::config(
                "activation range",
                format!("{site} = {r}"),
                "must be finite and positive",
            ));
        }
        Ok(())
    }

    /// The seam these settings describe, with straight-through gradients.
    pub fn seam(self) -> UniformSeam {
        UniformSeam {
            config: self.config,
            ranges: self.ranges,
            mode: GradientMode::Ste,
        }
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
    let Some(q) = stored.quant else {
        return Ok(stored.model);
    };
    let bad = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
    };
    let q: PersistedQuant =
        serde_json::from_str(&q).map_err(|e| bad(format!("unreadable quantizer settings: {e}")))?;
    q.validate().map_err(|e| bad(e.to_string()))?;
    Ok(stored.model.with_seam(std::sync::Arc::new(q.seam())))
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
