//! Evaluation: clean accuracy, robust accuracy under PGD, and ([`robust`]) the per-example
//! success matrix of many attacks over many ε, their worst case, and masking diagnostics.

pub mod robust;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::attack::{pgd_linf, PgdConfig};
use crate::data::batch::DeviceData;
use crate::data::subset::{stratified_indices, SubsetSize};
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

    /// The Wilson score 95% interval of the fraction correct.
    pub fn interval95(&self) -> (f64, f64) {
        wilson95(self.correct, self.total)
    }
}

/// Wilson score 95% interval for `k` successes of `n` trials ((0, 1) for n = 0).
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Number of predictions in `logits` equal to `labels` (on the device; one scalar read).
pub fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(logits
        .argmax(candle_core::D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?)
}

/// The images an evaluation uses: all of a split in order, or a seeded class-stratified
/// subset of `n` (data sets are stored by class, so "the first n" would be one class).
pub fn eval_indices(data: &DeviceData, n: Option<usize>, seed: u64) -> Result<Vec<u32>> {
    match n {
        Some(k) if k < data.len() => {
            let idx = stratified_indices(
                &data.host_labels,
                crate::data::CIFAR10_CLASSES.len(),
                SubsetSize::Count(k),
                &mut Rng::new(seed, "eval-subset"),
            )?;
            Ok(idx.into_iter().map(|i| i as u32).collect())
        }
        _ => Ok((0..data.len() as u32).collect()),
    }
}

fn accumulate<F>(data: &DeviceData, idx: &[u32], batch_size: usize, mut f: F) -> Result<Accuracy>
where
    F: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    let mut correct = Tensor::zeros((), DType::F32, data.images.device())?;
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk)?;
        correct = (correct + f(&x, &y)?)?;
    }
    Ok(Accuracy {
        correct: correct.to_scalar::<f32>()? as usize,
        total: idx.len(),
    })
}

/// Clean accuracy on the images `idx` of `data`, in batches.
pub fn clean_accuracy(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    batch_size: usize,
) -> Result<Accuracy> {
    accumulate(data, idx, batch_size, |x, y| {
        count_correct(&model.forward_t(x, false)?, y)
    })
}

/// Robust accuracy under PGD L∞ on the images `idx` of `data`.
pub fn pgd_accuracy(
    model: &dyn Classifier,
    data: &DeviceData,
    idx: &[u32],
    batch_size: usize,
    cfg: &PgdConfig,
    rng: &mut Rng,
) -> Result<Accuracy> {
    accumulate(data, idx, batch_size, |x, y| {
        let x_adv = pgd_linf(model, x, y, cfg, rng)?;
        count_correct(&model.forward_t(&x_adv, false)?, y)
    })
}
