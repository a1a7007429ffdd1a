//! AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
//! ensemble of diverse parameter-free attacks"): a cascade of attacks, each run only on the
//! images that every earlier stage left robust. The standard version (L∞) is APGD-CE →
//! APGD-T (9 targets) → FAB-T (9 targets) → Square (5,000 queries), one run each, 100
//! iterations for the gradient attacks; a custom list of stages is allowed (AutoAttack's
//! `version='custom'`).
//!
//! After the cascade, AutoAttack's own checks: every adversarial image within the ε-ball
//! and in [0, 1], finite (a violation is an error: a bug, never a result), and the final
//! images re-evaluated; an image a stage broke that the re-evaluation classifies correctly
//! is counted (expected none) and the re-evaluation is what counts.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::apgd::{Apgd, ApgdTargeted};
use super::fab::{Fab, FabTargeted};
use super::square::Square;
use super::{predictions, replace_rows, Attack, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// A stage of the cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// APGD with the cross-entropy loss.
    ApgdCe,
    /// APGD with the DLR loss.
    ApgdDlr,
    /// APGD with the targeted DLR loss, per target class.
    ApgdT,
    /// FAB, untargeted.
    Fab,
    /// FAB, per target class.
    FabT,
    /// Square, score-based.
    Square,
}

impl Stage {
    /// The standard cascade, L∞.
    pub const STANDARD: [Stage; 4] = [Stage::ApgdCe, Stage::ApgdT, Stage::FabT, Stage::Square];

    pub fn name(self) -> &'static str {
        match self {
            Stage::ApgdCe => "apgd-ce",
            Stage::ApgdDlr => "apgd-dlr",
            Stage::ApgdT => "apgd-t",
            Stage::Fab => "fab",
            Stage::FabT => "fab-t",
            Stage::Square => "square",
        }
    }

    /// False for the score-based stage.
    pub fn uses_gradients(self) -> bool {
        self != Stage::Square
    }
}

/// The cascade and its stages' settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoAttack {
    /// Stages, in order. Default apgd-ce, apgd-t, fab-t, square (the standard version).
    pub stages: Vec<Stage>,
    /// APGD iterations. Default 100.
    pub apgd_iterations: usize,
    /// FAB iterations. Default 100.
    pub fab_iterations: usize,
    /// Target classes of APGD-T and FAB-T. Default 9.
    pub targets: usize,
    /// Square queries. Default 5,000.
    pub square_queries: usize,
}

impl Default for AutoAttack {
    fn default() -> Self {
        AutoAttack {
            stages: Stage::STANDARD.to_vec(),
            apgd_iterations: 100,
            fab_iterations: 100,
            targets: 9,
            square_queries: 5000,
        }
    }
}

/// What the cascade did to a batch.
#[derive(Debug, Clone)]
pub struct Cascade {
    /// The adversarial images: a stage's output where it broke the image, else the image.
    pub x_adv: Tensor,
    /// Per image, the stage (index into the stages) that broke it; `None` where no stage
    /// did or the image is misclassified clean.
    pub broken_by: Vec<Option<usize>>,
    /// Per image, misclassified before any attack.
    pub clean_wrong: Vec<bool>,
    /// Images a stage broke that the final re-evaluation classifies correctly.
    pub reevaluation_mismatches: usize,
    /// Per stage: the images it attacked and its wall seconds.
    pub stage_images: Vec<usize>,
    pub stage_wall_s: Vec<f64>,
}

impl AutoAttack {
    /// True for the standard version (stages and settings).
    pub fn is_standard(&self) -> bool {
        *self == AutoAttack::default()
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(Error::config(
                "autoattack stages",
                "[]",
                "give at least one stage",
            ));
        }
        if self.stages.len() > 36 {
            return Err(Error::config(
                "autoattack stages",
                self.stages.len(),
                "at most 36",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.stages {
            if !seen.insert(s) {
                return Err(Error::config("autoattack stages", s.name(), "listed twice"));
            }
        }
        for (what, v) in [
            ("autoattack apgd_iterations", self.apgd_iterations),
            ("autoattack fab_iterations", self.fab_iterations),
            ("autoattack targets", self.targets),
            ("autoattack square_queries", self.square_queries),
        ] {
            if v == 0 {
                return Err(Error::config(what, 0, "must be ≥ 1"));
            }
        }
        Ok(())
    }

    /// The attack of one stage.
    pub fn stage_attack(&self, stage: Stage) -> Box<dyn Attack> {
        let apgd = Apgd {
            iterations: self.apgd_iterations,
            ..Apgd::default()
        };
        let fab = Fab {
            iterations: self.fab_iterations,
            ..Fab::default()
        };
        match stage {
            Stage::ApgdCe => Box::new(apgd),
            Stage::ApgdDlr => Box::new(Apgd {
                iterations: self.apgd_iterations,
                ..Apgd::dlr()
            }),
            Stage::ApgdT => Box::new(ApgdTargeted {
                apgd: Apgd {
                    iterations: self.apgd_iterations,
                    ..Apgd::dlr()
                },
                targets: self.targets,
            }),
            Stage::Fab => Box::new(fab),
            Stage::FabT => Box::new(FabTargeted {
                fab,
                targets: self.targets,
            }),
            Stage::Square => Box::new(Square {
                queries: self.square_queries,
                ..Square::default()
            }),
        }
    }

    /// Runs the cascade on a batch, with the final checks.
    pub fn run(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Cascade> {
        self.validate()?;
        if !self.supports(norm) {
            return Err(Error::config(
                "attack",
                self.name(),
                format!("a stage does not support the {norm} norm"),
            ));
        }
        super::check_eps(norm, eps)?;
        let x = x.detach();
        let labels = y.to_vec1::<u32>()?;
        let n = labels.len();
        let clean = predictions(&model.forward_t(&x, false)?)?;
        let clean_wrong: Vec<bool> = (0..n).map(|i| clean[i] != labels[i]).collect();
        let mut broken_by: Vec<Option<usize>> = vec![None; n];
        let mut x_adv = x.clone();
        let mut stage_images = vec![0; self.stages.len()];
        let mut stage_wall_s = vec![0.0; self.stages.len()];
        if eps > 0.0 {
            for (si, &stage) in self.stages.iter().enumerate() {
                let todo: Vec<u32> = (0..n)
                    .filter(|&i| !clean_wrong[i] && broken_by[i].is_none())
                    .map(|i| i as u32)
                    .collect();
                if todo.is_empty() {
                    break;
                }
                let ids = Tensor::from_vec(todo.clone(), todo.len(), x.device())?;
                let (xs, ys) = (x.index_select(&ids, 0)?, y.index_select(&ids, 0)?);
                // Each stage draws from its own stream: a custom list gives each stage the
                // draws it has in the standard one.
                let mut stage_rng = rng.fork(stage.name());
                let t = std::time::Instant::now();
                let out =
                    self.stage_attack(stage)
                        .perturb(model, &xs, &ys, norm, eps, &mut stage_rng)?;
                let preds = predictions(&model.forward_t(&out, false)?)?;
                crate::device::synchronize(x.device())?;
                stage_images[si] = todo.len();
                stage_wall_s[si] = t.elapsed().as_secs_f64();
                let fooled: Vec<usize> = (0..todo.len())
                    .filter(|&j| preds[j] != labels[todo[j] as usize])
                    .collect();
                if fooled.is_empty() {
                    continue;
                }
                let at: Vec<u32> = fooled.iter().map(|&j| todo[j]).collect();
                let rows: Vec<u32> = fooled.iter().map(|&j| j as u32).collect();
                let rows =
                    out.index_select(&Tensor::from_vec(rows, fooled.len(), x.device())?, 0)?;
                x_adv = replace_rows(&x_adv, &at, &rows)?;
                for &i in &at {
                    broken_by[i as usize] = Some(si);
                }
            }
        }
        self.check(&x, &x_adv, norm, eps)?;
        let final_preds = predictions(&model.forward_t(&x_adv, false)?)?;
        let reevaluation_mismatches = (0..n)
            .filter(|&i| broken_by[i].is_some() && final_preds[i] == labels[i])
            .count();
        if reevaluation_mismatches > 0 {
            tracing::warn!(
                "{}: {reevaluation_mismatches} images a stage broke are classified correctly on \
                 re-evaluation; the re-evaluation counts",
                self.name()
            );
        }
        Ok(Cascade {
            x_adv,
            broken_by,
            clean_wrong,
            reevaluation_mismatches,
            stage_images,
            stage_wall_s,
        })
    }

    /// AutoAttack's final checks: finite, in [0, 1], within the ε-ball (float tolerance
    /// 1e-6 in L∞, relative 1e-5 in L2).
    fn check(&self, x: &Tensor, x_adv: &Tensor, norm: Norm, eps: f64) -> Result<()> {
        let fail = |problem: String| Error::AttackCheck {
            attack: self.name(),
            problem,
        };
        let v = x_adv.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = v.iter().find(|a| !a.is_finite()) {
            return Err(fail(format!("an adversarial pixel is {bad}")));
        }
        let (lo, hi) = v
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &a| {
                (l.min(a), h.max(a))
            });
        if lo < 0.0 || hi > 1.0 {
            return Err(fail(format!("pixels in [{lo}, {hi}], outside [0, 1]")));
        }
        let d = (x_adv - x)?.flatten_from(1)?;
        let (dist, limit) = match norm {
            Norm::Linf => (d.abs()?.max(1)?, eps + 1e-6),
            Norm::L2 => (d.sqr()?.sum(1)?.sqrt()?, eps * (1.0 + 1e-5) + 1e-6),
        };
        let worst = dist.to_vec1::<f32>()?.into_iter().fold(0f32, f32::max);
        if f64::from(worst) > limit {
            return Err(fail(format!(
                "a perturbation of {norm} size {worst} exceeds ε = {eps}"
            )));
        }
        Ok(())
    }
}

impl Attack for AutoAttack {
    fn name(&self) -> String {
        if self.is_standard() {
            "autoattack".into()
        } else {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name()).collect();
            format!("autoattack[{}]", names.join("+"))
        }
    }
    fn supports(&self, norm: Norm) -> bool {
        self.stages
            .iter()
            .all(|&s| self.stage_attack(s).supports(norm))
    }
    fn perturb(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        Ok(self.run(model, x, y, norm, eps, rng)?.x_adv)
    }
    fn perturb_staged(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<super::Staged> {
        let c = self.run(model, x, y, norm, eps, rng)?;
        Ok(super::Staged {
            x_adv: c.x_adv,
            broken_by: Some(c.broken_by),
            stage_images: c.stage_images,
            stage_wall_s: c.stage_wall_s,
        })
    }
    fn stages(&self) -> Vec<(String, bool)> {
        self.stages
            .iter()
            .map(|s| (s.name().to_string(), s.uses_gradients()))
            .collect()
    }
}
