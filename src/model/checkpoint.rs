//! ResNet-20 checkpoints: safetensors with PyTorch's names and layouts, plus a JSON
//! manifest beside it (`X.safetensors` → `X.json`).
//!
//! Besides the float tensors the file holds each BatchNorm's `num_batches_tracked` (i64
//! scalar), so PyTorch's strict `load_state_dict` takes it unchanged. Both files are
//! written atomically; loading checks every name and shape and names what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::resnet20::{bn_names, check_tensors, ResNet20};
use crate::manifest::Manifest;
use crate::{Error, Result};

/// The format tag stored in the safetensors metadata.
pub const FORMAT: &str = "quant-robust/resnet20/v1";

/// The manifest path of a checkpoint: the same stem with `.json`.
pub fn manifest_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// The tensors of a model as a checkpoint holds them (floats + i64 counters).
pub fn state_dict(model: &ResNet20) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (k, t) in model.tensors() {
        out.insert(k.clone(), t.detach().to_device(&Device::Cpu)?.contiguous()?);
    }
    let nbt = Tensor::new(model.num_batches_tracked(), &Device::Cpu)?;
    for bn in bn_names() {
        out.insert(format!("{bn}.num_batches_tracked"), nbt.clone());
    }
    Ok(out)
}

/// Serializes named tensors to safetensors bytes with metadata. The same tensors and
/// metadata always give the same bytes: the metadata's keys are written sorted (the
/// safetensors crate writes them in a hash map's random order).
pub fn to_safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let data: Vec<(&String, &Tensor)> = tensors.iter().collect();
    let bad = |why: String| Error::config("safetensors", "serialize", why);
    let mut bytes =
        safetensors::serialize(data, Some(metadata.clone())).map_err(|e| bad(e.to_string()))?;
    // The header (after its 8-byte length) starts with the metadata object; the sorted one
    // has the same length, so it replaces it in place.
    let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
    let sorted = serde_json::to_string(&sorted).map_err(|e| bad(e.to_string()))?;
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let at = 8 + PREFIX.len();
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad("no header".into()))?);
    let header_end = 8 + n as usize;
    if !metadata.is_empty() {
        if bytes.get(8..at) != Some(PREFIX) || at + sorted.len() > header_end {
            return Err(bad("the header does not start with its metadata".into()));
        }
        let before: serde_json::Value =
            serde_json::from_slice(&bytes[8..header_end]).map_err(|e| bad(e.to_string()))?;
        bytes[at..at + sorted.len()].copy_from_slice(sorted.as_bytes());
        let after: serde_json::Value = serde_json::from_slice(&bytes[8..header_end])
            .map_err(|e| bad(format!("sorting the metadata broke the header: {e}")))?;
        if before != after {
            return Err(bad("sorting the metadata changed the header".into()));
        }
    }
    Ok(bytes)
}

/// Writes `model` to `path` (safetensors) and `manifest` beside it, both atomically.
pub fn save(model: &ResNet20, path: &Path, manifest: &Manifest) -> Result<()> {
    let sd = state_dict(model)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("seam".to_string(), model.seam().describe());
    meta.extend(model.seam().persist()?);
    let bytes = to_safetensors_bytes(&sd, &meta)?;
    crate::io::write_bytes_atomic(path, &bytes)?;
    crate::io::write_json_atomic(&manifest_path(path), manifest)
}

/// Reads named tensors from a safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    tensors_of(path, &bytes)
}

/// The named tensors of the safetensors bytes `bytes` (read from `path`), on the CPU.
fn tensors_of(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        Error::Checkpoint {
            path: path.to_path_buf(),
            problem: format!("not a readable safetensors file: {e}"),
        }
    })?;
    Ok(map.into_iter().collect())
}

/// A checkpoint's weights as a full-precision model, and its metadata, where a PTQ or QAT
/// checkpoint keeps its quantizers: `crate::quant::load_checkpoint` puts the two together.
pub struct Stored {
    pub model: ResNet20,
    pub metadata: BTreeMap<String, String>,
}

/// Reads a checkpoint's weights into a model on `device` (`trainable`: as variables, for
/// training), and its stored quantizers.
pub fn load_stored(path: &Path, device: &Device, trainable: bool) -> Result<Stored> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut map = tensors_of(path, &bytes)?;
    let nbt = match map.get("bn1.num_batches_tracked") {
        Some(t) => t
            .to_dtype(DType::I64)
            .and_then(|t| t.to_scalar::<i64>())
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                problem: format!("bn1.num_batches_tracked: {e}"),
            })?,
        None => 0,
    };
    // Each BatchNorm's counter (PyTorch's buffer; all equal, bn1's is read above) is set
    // aside by its exact name: any other name is left for `check_tensors` to refuse.
    for bn in bn_names() {
        map.remove(&format!("{bn}.num_batches_tracked"));
    }
    check_tensors(&map).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let model = ResNet20::from_tensors(map, nbt, device, trainable)?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            problem: format!("unreadable header: {e}"),
        })?;
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Stored { model, metadata })
}

/// Reads a checkpoint's manifest, if there is one.
pub fn load_manifest(path: &Path) -> Result<Option<Manifest>> {
    let m = manifest_path(path);
    if !m.exists() {
        return Ok(None);
    }
    crate::io::read_json(&m).map(Some)
}
