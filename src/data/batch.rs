//! A data split on a device, and the batches drawn from it.
//!
//! The split is uploaded once as `u8` (150 MB for CIFAR-10's training set); a batch is an
//! `index_select` on the device, converted to f32 in [0, 1]. Only the batch's indices (and
//! augmentation draws) travel from the host per step.

use candle_core::{DType, Device, Tensor};

use super::{Dataset, CHANNELS, SIDE};
use crate::rng::Rng;
use crate::Result;

/// A split resident on a device.
pub struct DeviceData {
    /// N×3×32×32 u8.
    pub images: Tensor,
    /// N labels, u32.
    pub labels: Tensor,
    /// Host copy of the labels.
    pub host_labels: Vec<u8>,
}

impl DeviceData {
    /// Uploads a split.
    pub fn new(ds: &Dataset, device: &Device) -> Result<Self> {
        let n = ds.len();
        let images = Tensor::from_slice(&ds.images, (n, CHANNELS, SIDE, SIDE), device)?;
        let labels: Vec<u32> = ds.labels.iter().map(|&l| l as u32).collect();
        let labels = Tensor::from_vec(labels, n, device)?;
        Ok(DeviceData {
            images,
            labels,
            host_labels: ds.labels.clone(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.host_labels.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.host_labels.is_empty()
    }

    /// The images at `idx` as f32 in [0, 1], and their labels.
    pub fn batch(&self, idx: &[u32]) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(idx, idx.len(), self.images.device())?;
        let x = to_unit(&self.images.index_select(&ids, 0)?)?;
        let y = self.labels.index_select(&ids, 0)?;
        Ok((x, y))
    }

    /// Images `start..start+len` in order (evaluation).
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let x = to_unit(&self.images.narrow(0, start, len)?)?;
        let y = self.labels.narrow(0, start, len)?;
        Ok((x, y))
    }
}

/// u8 pixels to f32 in [0, 1], divided by 255 exactly as PyTorch's `ToTensor` (a
/// multiplication by 1/255 differs in the last bit for some values).
pub fn to_unit(x: &Tensor) -> Result<Tensor> {
    let d = Tensor::new(255f32, x.device())?;
    Ok(x.to_dtype(DType::F32)?.broadcast_div(&d)?)
}

/// The batches of one training epoch: a seeded permutation cut into `batch_size` pieces.
/// A last batch of a single image is dropped (BatchNorm's variance is undefined for it).
pub fn epoch_batches(n: usize, batch_size: usize, rng: &mut Rng) -> Vec<Vec<u32>> {
    let perm = rng.permutation(n);
    perm.chunks(batch_size.max(1))
        .filter(|c| c.len() > 1 || n == 1)
        .map(|c| c.to_vec())
        .collect()
}
