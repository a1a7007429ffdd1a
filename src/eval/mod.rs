//! Evaluation: clean accuracy, and robust accuracy under PGD, over a device-resident split.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::attack::{pgd_linf, PgdConfig};
use crate::data::batch::DeviceData;
use crate::model::Classifier;
use crate::rng::Rng;
use crate::Result;

/// Correct predictions out of a number of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    /// Fraction correct (0 for no images).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    /// Percentage correct.
    pub fn percent(&self) -> f64 {
        100.0 * self.fraction()
    }
}

/// Number of predictions in `logits` equal to `labels` (on the device; one scalar read).
pub fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(logits
        .argmax(candle_core::D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?)
}

/// Clean accuracy on the first `n` images (all if `None`), in batches.
pub fn clean_accuracy<M: Classifier + ?Sized>(
    model: &M,
    data: &DeviceData,
    n: Option<usize>,
    batch_size: usize,
) -> Result<Accuracy> {
    let n = n.unwrap_or(data.len()).min(data.len());
    let mut correct = Tensor::zeros((), DType::F32, data.images.device())?;
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let (x, y) = data.range(start, len)?;
        let logits = model.forward_t(&x, false)?;
        correct = (correct + count_correct(&logits, &y)?)?;
        start += len;
    }
    Ok(Accuracy {
        correct: correct.to_scalar::<f32>()? as usize,
        total: n,
    })
}

/// Robust accuracy under PGD L∞ on the first `n` images.
pub fn pgd_accuracy<M: Classifier + ?Sized>(
    model: &M,
    data: &DeviceData,
    n: Option<usize>,
    batch_size: usize,
    cfg: &PgdConfig,
    rng: &mut Rng,
) -> Result<Accuracy> {
    let n = n.unwrap_or(data.len()).min(data.len());
    let mut correct = Tensor::zeros((), DType::F32, data.images.device())?;
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let (x, y) = data.range(start, len)?;
        let x_adv = pgd_linf(model, &x, &y, cfg, rng)?;
        let logits = model.forward_t(&x_adv, false)?;
        correct = (correct + count_correct(&logits, &y)?)?;
        start += len;
    }
    Ok(Accuracy {
        correct: correct.to_scalar::<f32>()? as usize,
        total: n,
    })
}
