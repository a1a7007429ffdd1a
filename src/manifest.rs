//! Run manifests: what produced a result. Every checkpoint and every results file carries
//! one — configuration, seed, data identity, code version, device, timings, metrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::DataIdentity;

/// The code that produced a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeVersion {
    pub name: String,
    pub version: String,
    pub git_commit: String,
    /// True when the tree had uncommitted changes at build time.
    pub git_dirty: bool,
    /// Cargo features compiled in (`cuda`).
    pub features: Vec<String>,
}

impl CodeVersion {
    /// This binary's version.
    pub fn current() -> Self {
        let mut features = Vec::new();
        if cfg!(feature = "cuda") {
            features.push("cuda".to_string());
        }
        CodeVersion {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: env!("QR_GIT_COMMIT").into(),
            git_dirty: env!("QR_GIT_DIRTY") == "true",
            features,
        }
    }
}

/// Wall seconds counted as GPU-seconds: `wall_s` on a GPU, 0 on the CPU.
pub fn gpu_seconds(device: &candle_core::Device, wall_s: f64) -> f64 {
    if device.is_cuda() {
        wall_s
    } else {
        0.0
    }
}

/// Time spent in one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub wall_s: f64,
    /// Wall seconds spent on a GPU (0 on the CPU).
    pub gpu_s: f64,
}

/// What produced a result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// What the file is: `checkpoint`, `eval`, ...
    pub kind: String,
    pub code: CodeVersion,
    /// Seconds since the Unix epoch when written.
    pub created_unix: u64,
    /// `cpu` or `cuda:0`.
    pub device: String,
    pub seed: Option<u64>,
    pub data: Option<DataIdentity>,
    /// The full configuration, defaults included.
    pub config: serde_json::Value,
    pub timings: Vec<StageTiming>,
    pub metrics: BTreeMap<String, f64>,
}

impl Manifest {
    /// A manifest stamped with this code version and the current time.
    pub fn new(kind: &str, device: &candle_core::Device) -> Self {
        Manifest {
            kind: kind.into(),
            code: CodeVersion::current(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            device: crate::device::name(device),
            seed: None,
            data: None,
            config: serde_json::Value::Null,
            timings: Vec::new(),
            metrics: BTreeMap::new(),
        }
    }

    /// Adds a stage's wall time; counted as GPU time when `device` is a GPU.
    pub fn add_timing(&mut self, stage: &str, wall_s: f64, device: &candle_core::Device) {
        self.timings.push(StageTiming {
            stage: stage.into(),
            wall_s,
            gpu_s: gpu_seconds(device, wall_s),
        });
    }
}
