//! Golden results: a finished study frozen into `golden/<name>/` (its configuration,
//! results, report, plots and every model's checkpoint with its manifest), plus what the
//! regression gates re-measure: per model, counts of clean, FGSM and PGD accuracy on a
//! fixed, seeded subset of the test split ([`snapshot`]).
//!
//! `golden update` refuses a dirty tree (here, or in the binary or the results it copies)
//! and requires a device label, so every golden file says which code, device and data made it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::ModelSpec;
use super::results::StudyResults;
use crate::attack::{fgsm::Fgsm, pgd::Pgd, Attack, Norm};
use crate::data::batch::DeviceData;
use crate::data::DataIdentity;
use crate::eval::robust::{evaluate, RobustnessConfig};
use crate::io::copy_atomic as copy;
use crate::manifest::CodeVersion;
use crate::model::Classifier;
use crate::{Error, Result};

/// What the snapshot tests re-measure on every golden model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Test images of the default tier (seeded, stratified). Default 32.
    pub n: usize,
    /// Test images of the slow tier (`QR_SLOW=1`). Default 256.
    pub n_slow: usize,
    /// Radii. Default 2/255, 8/255.
    pub eps: Vec<f64>,
    /// PGD steps (step ε/4, random start). Default 10.
    pub pgd_steps: usize,
    /// Seed of the subset and of PGD's starts. Default 0.
    pub seed: u64,
    /// Batch size. Default 64.
    pub batch_size: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            n: 32,
            n_slow: 256,
            eps: vec![2.0 / 255.0, 8.0 / 255.0],
            pgd_steps: 10,
            seed: 0,
            batch_size: 64,
        }
    }
}

impl SnapshotConfig {
    /// Refuses a tier without images, no radius, a radius outside (0, 1], no PGD step or
    /// an empty batch.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, v: String, why: &str| Err(Error::config(what, v, why));
        if self.n == 0 || self.n_slow == 0 {
            return bad(
                "snapshot images",
                format!("{} / {}", self.n, self.n_slow),
                "each tier needs at least one image",
            );
        }
        if self.eps.is_empty() {
            return bad("snapshot eps", "[]".into(), "give at least one radius");
        }
        if let Some(e) = self.eps.iter().find(|e| !(**e > 0.0 && **e <= 1.0)) {
            return bad("snapshot eps", e.to_string(), "a radius lies in (0, 1]");
        }
        if self.pgd_steps == 0 {
            return bad("snapshot pgd_steps", "0".into(), "PGD needs a step");
        }
        if self.batch_size == 0 {
            return bad("snapshot batch_size", "0".into(), "a batch holds an image");
        }
        Ok(())
    }
}

/// One golden model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenModel {
    pub id: String,
    pub spec: ModelSpec,
    /// The checkpoint, relative to the golden directory.
    pub checkpoint: String,
}

/// `golden/<name>/golden.json`: what the golden files are and what made them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenManifest {
    pub name: String,
    /// The command that produced the study (as given to `golden update`).
    pub command: String,
    /// The device, in words (e.g. "NVIDIA H100 80GB HBM3" or "2-core CPU, CI class").
    pub device_label: String,
    /// The device the study's manifests name (`cpu`, `cuda:0`).
    pub device: String,
    pub data: DataIdentity,
    /// The code that ran the study.
    pub code: CodeVersion,
    /// The code that wrote these files.
    pub written_by: CodeVersion,
    pub created_unix: u64,
    pub snapshot: SnapshotConfig,
    pub models: Vec<GoldenModel>,
}

fn git_dirty(dir: &Path) -> Option<bool> {
    std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty())
}

/// Freezes the finished study in `study_dir` into `golden_root/<name>/`.
///
/// Refuses: an empty `device_label` or `command`; snapshot settings without images or
/// radii; a study whose results were made by code from a dirty tree; a binary built from a
/// dirty tree; a working tree (`repo`) with uncommitted changes.
pub fn update(
    study_dir: &Path,
    golden_root: &Path,
    name: &str,
    device_label: &str,
    command: &str,
    snapshot: SnapshotConfig,
    repo: &Path,
) -> Result<GoldenManifest> {
    let refuse = |why: String| Err(Error::config("golden update", name.to_string(), why));
    snapshot.validate()?;
    if device_label.trim().is_empty() {
        return refuse("say which device produced the study (--device-label)".into());
    }
    if command.trim().is_empty() {
        return refuse("say which command produced the study (--command)".into());
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return refuse("the name must be letters, digits and '-'".into());
    }
    let here = CodeVersion::current();
    if here.git_dirty {
        return refuse("this binary was built from a dirty tree: commit, rebuild, rerun".into());
    }
    match git_dirty(repo) {
        Some(false) => {}
        Some(true) => return refuse(format!("{} has uncommitted changes", repo.display())),
        None => return refuse(format!("{} is not a git checkout", repo.display())),
    }
    let res: StudyResults = crate::io::read_json(&study_dir.join("results.json"))?;
    if res.manifest.code.git_dirty {
        return refuse(format!(
            "{} was produced by code from a dirty tree (commit {}): rerun it from a clean one",
            study_dir.display(),
            res.manifest.code.git_commit
        ));
    }
    let out = golden_root.join(name);
    let mut models = Vec::new();
    for m in &res.models {
        let ck = format!("checkpoints/{}.safetensors", m.id);
        copy(&study_dir.join(&m.checkpoint), &out.join(&ck))?;
        let src_manifest = crate::model::checkpoint::manifest_path(&study_dir.join(&m.checkpoint));
        if src_manifest.is_file() {
            copy(
                &src_manifest,
                &crate::model::checkpoint::manifest_path(&out.join(&ck)),
            )?;
        }
        models.push(GoldenModel {
            id: m.id.clone(),
            spec: m.spec.clone(),
            checkpoint: ck,
        });
    }
    for f in ["study.json", "results.json", "report.md"] {
        copy(&study_dir.join(f), &out.join(f))?;
    }
    for p in ["eps.svg", "bits.svg", "fraction.svg"] {
        let src = study_dir.join("plots").join(p);
        if src.is_file() {
            copy(&src, &out.join("plots").join(p))?;
        }
    }
    let g = GoldenManifest {
        name: name.into(),
        command: command.into(),
        device_label: device_label.into(),
        device: res.manifest.device.clone(),
        data: res.data.clone(),
        code: res.manifest.code.clone(),
        written_by: here,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        snapshot,
        models,
    };
    crate::io::write_json_atomic(&out.join("golden.json"), &g)?;
    Ok(g)
}

/// Reads `dir/golden.json`.
pub fn read(dir: &Path) -> Result<GoldenManifest> {
    crate::io::read_json(&dir.join("golden.json"))
}

/// A golden model's checkpoint path.
pub fn checkpoint_path(dir: &Path, m: &GoldenModel) -> PathBuf {
    dir.join(&m.checkpoint)
}

/// Counts on the images `idx`: clean, FGSM and PGD per ε (an image counts as robust when
/// it is classified correctly clean and after the attack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub n: usize,
    pub clean: usize,
    /// (ε·255 rounded to 3 decimals as text, count).
    pub fgsm: Vec<(String, usize)>,
    pub pgd: Vec<(String, usize)>,
}

/// Measures a model's [`Snapshot`] on `n` seeded, stratified images of `test`.
pub fn snapshot(
    model: &dyn Classifier,
    test: &DeviceData,
    cfg: &SnapshotConfig,
    n: usize,
) -> Result<Snapshot> {
    let idx = crate::eval::eval_indices(test, Some(n), cfg.seed)?;
    let attacks: Vec<Box<dyn Attack>> = vec![
        Box::new(Fgsm),
        Box::new(Pgd {
            steps: cfg.pgd_steps,
            ..Pgd::default()
        }),
    ];
    let rcfg = RobustnessConfig {
        norm: Norm::Linf,
        eps: cfg.eps.clone(),
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        ..RobustnessConfig::default()
    };
    let r = evaluate(model, test, &idx, &attacks, &rcfg, &mut |_, _, _, _| {})?;
    let per = |k: usize| -> Vec<(String, usize)> {
        r.attacks[k]
            .per_eps
            .iter()
            .map(|e| (format!("{:.3}/255", e.eps * 255.0), e.correct))
            .collect()
    };
    Ok(Snapshot {
        n: idx.len(),
        clean: r.clean.correct,
        fgsm: per(0),
        pgd: per(1),
    })
}
