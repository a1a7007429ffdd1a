//! Seeded, class-stratified subsets: the study's 1%..100% data fractions and the
//! calibration samples.
//!
//! Each class contributes in proportion to its size (largest-remainder rounding, ties to
//! the lower class index); within a class the images are a seeded uniform draw. The
//! returned indices are sorted, so a subset keeps the data set's order.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};

/// How large a subset is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubsetSize {
    /// A fraction in (0, 1] of the data set.
    Fraction(f64),
    /// An exact number of images, 1..=N.
    Count(usize),
}

impl SubsetSize {
    /// The number of images this size means for a set of `n`.
    pub fn resolve(self, n: usize) -> Result<usize> {
        match self {
            SubsetSize::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::config("fraction", f, "must be in (0, 1]"));
                }
                Ok(((f * n as f64).round() as usize).clamp(1, n.max(1)))
            }
            SubsetSize::Count(k) => {
                if k == 0 || k > n {
                    return Err(Error::config(
                        "count",
                        k,
                        format!("must be between 1 and the data set's size {n}"),
                    ));
                }
                Ok(k)
            }
        }
    }
}

/// Per-class quotas summing to `total`, proportional to `class_sizes`.
pub fn class_quotas(class_sizes: &[usize], total: usize) -> Vec<usize> {
    let n: usize = class_sizes.iter().sum();
    if n == 0 {
        return vec![0; class_sizes.len()];
    }
    let mut quotas: Vec<usize> = class_sizes.iter().map(|&c| c * total / n).collect();
    let mut rem: Vec<(usize, usize)> = class_sizes
        .iter()
        .enumerate()
        .map(|(i, &c)| ((c * total) % n, i))
        .collect();
    // Largest remainder first; ties to the lower class index.
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = total - quotas.iter().sum::<usize>();
    for &(_, i) in &rem {
        if left == 0 {
            break;
        }
        if quotas[i] < class_sizes[i] {
            quotas[i] += 1;
            left -= 1;
        }
    }
    quotas
}

/// Sorted indices of a stratified subset of `labels` (labels < `num_classes`).
pub fn stratified_indices(
    labels: &[u8],
    num_classes: usize,
    size: SubsetSize,
    rng: &mut Rng,
) -> Result<Vec<usize>> {
    let total = size.resolve(labels.len())?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let sizes: Vec<usize> = by_class.iter().map(Vec::len).collect();
    let quotas = class_quotas(&sizes, total);
    let mut out = Vec::with_capacity(total);
    for (members, q) in by_class.iter_mut().zip(quotas) {
        rng.shuffle(members);
        out.extend_from_slice(&members[..q]);
    }
    out.sort_unstable();
    Ok(out)
}

/// A stratified subset of a data set.
pub fn stratified(ds: &super::Dataset, size: SubsetSize, rng: &mut Rng) -> Result<super::Dataset> {
    let idx = stratified_indices(&ds.labels, ds.classes.len(), size, rng)?;
    Ok(ds.select(&idx))
}

/// The seeded, stratified calibration sample of `n` images (stream `calibration`): PTQ's
/// activation ranges and QAT's initial α are computed on it.
pub fn calibration(ds: &super::Dataset, n: usize, seed: u64) -> Result<super::Dataset> {
    stratified(ds, SubsetSize::Count(n), &mut Rng::new(seed, "calibration"))
}

/// The training images of a run (stream `train-subset`): a seeded, stratified fraction or
/// count, or all of `ds` for `None`.
pub fn training(
    ds: &super::Dataset,
    size: Option<SubsetSize>,
    seed: u64,
) -> Result<super::Dataset> {
    match size {
        None => Ok(ds.clone()),
        Some(s) => stratified(ds, s, &mut Rng::new(seed, "train-subset")),
    }
}
