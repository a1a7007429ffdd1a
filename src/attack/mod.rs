//! Adversarial attacks over any [`Classifier`], in evaluation mode, computing the input
//! gradient only.
//!
//! Conventions (those of torchattacks and AutoAttack): images in [0, 1]; ε in pixel units (8/255); random starts
//! uniform in the ε-ball, then clipped to [0, 1]; every output inside the ball and in
//! [0, 1]; random draws from the caller's seeded [`Rng`]. An attack returns adversarial
//! images; success is judged by [`crate::eval::robust`], per example, so that the worst case
//! over several attacks can be taken per example.
//!
//! - [`fgsm`]: FGSM (L∞) and its L2 analogue FGM;
//! - [`pgd`]: PGD, L∞ and L2, random start, restarts;
//! - [`apgd`]: APGD-CE, APGD-DLR and APGD-T (targeted DLR; Croce & Hein 2020);
//! - [`fab`]: FAB and FAB-T, minimum-norm L∞ (Croce & Hein 2020);
//! - [`square`]: Square attack, L∞, gradient-free (Andriushchenko et al. 2020);
//! - [`autoattack`]: the AutoAttack cascade (standard or a custom list of stages);
//! - [`transfer`]: examples crafted on a source model, evaluated on the target.

pub mod apgd;
pub mod autoattack;
pub mod fab;
pub mod fgsm;
pub mod pgd;
pub mod square;
pub mod transfer;

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

pub use pgd::{pgd_linf, PgdConfig};

/// The threat model's norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// L∞ (max-abs per pixel).
    Linf,
    /// L2 (Euclidean norm over the whole image).
    L2,
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        })
    }
}

/// An attack: adversarial images for a batch, within `eps` of `x` in the attack's norm.
pub trait Attack {
    /// A name for results (`pgd-10`, `apgd-ce`, ...).
    fn name(&self) -> String;
    /// Norms this attack supports.
    fn supports(&self, norm: Norm) -> bool;
    /// True if the attack uses the model's gradients (white-box).
    fn uses_gradients(&self) -> bool {
        true
    }
    /// Adversarial images for `x` (B×3×32×32 in [0, 1]) with labels `y` (u32, B).
    fn perturb(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Tensor>;
    /// [`Attack::perturb`], and for a composite attack which of its stages broke each
    /// example.
    fn perturb_staged(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        norm: Norm,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<Staged> {
        Ok(Staged {
            x_adv: self.perturb(model, x, y, norm, eps, rng)?,
            broken_by: None,
            stage_images: Vec::new(),
            stage_wall_s: Vec::new(),
        })
    }
    /// A composite attack's stages: name, and whether it uses the model's gradients
    /// (empty for a single attack).
    fn stages(&self) -> Vec<(String, bool)> {
        Vec::new()
    }
}

/// Adversarial images, with the stage that broke each example for composite attacks.
#[derive(Debug, Clone)]
pub struct Staged {
    pub x_adv: Tensor,
    /// Per example, the index of the stage that broke it (`None`: not broken).
    pub broken_by: Option<Vec<Option<usize>>>,
    /// Per stage: the images it attacked and its wall seconds (empty for a single attack).
    pub stage_images: Vec<usize>,
    pub stage_wall_s: Vec<f64>,
}

/// Checks ε for a norm.
pub fn check_eps(norm: Norm, eps: f64) -> Result<()> {
    let max = match norm {
        Norm::Linf => 1.0,
        Norm::L2 => (3.0f64 * 32.0 * 32.0).sqrt(),
    };
    if !(eps >= 0.0 && eps <= max) {
        return Err(Error::config(
            "eps",
            eps,
            format!("must be in [0, {max:.1}] for {norm} (pixel units: write 8/255, not 8)"),
        ));
    }
    Ok(())
}

/// Mean cross-entropy of logits against u32 labels.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}

/// Per-example cross-entropy (B).
pub fn cross_entropy_per_example(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(lsm.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

/// Per-example loss functions an attack maximizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Cross-entropy.
    Ce,
    /// Difference of logits ratio (Croce & Hein 2020):
    /// −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12), π the logits sorted decreasingly.
    Dlr,
}

/// Indices, per example, of the largest logit other than `y`, and of the first and third
/// largest logits (from the detached values; gathering at them is differentiable).
fn logit_indices(logits: &Tensor, labels: &[u32]) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let z = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut other, mut first, mut third) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &y) in z.iter().zip(labels) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        first.push(order[0] as u32);
        third.push(order[2.min(order.len() - 1)] as u32);
        let o = order.iter().find(|&&i| i as u32 != y).copied().unwrap_or(0);
        other.push(o as u32);
    }
    Ok((other, first, third))
}

fn gather_at(logits: &Tensor, idx: Vec<u32>) -> Result<Tensor> {
    let n = idx.len();
    let idx = Tensor::from_vec(idx, (n, 1), logits.device())?;
    Ok(logits.gather(&idx, 1)?.squeeze(1)?)
}

/// Per-example loss (B) of the given kind.
pub fn loss_per_example(loss: Loss, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    match loss {
        Loss::Ce => cross_entropy_per_example(logits, labels),
        Loss::Dlr => {
            let y = labels.to_vec1::<u32>()?;
            let (other, first, third) = logit_indices(&logits.detach(), &y)?;
            let zy = gather_at(logits, y)?;
            let zo = gather_at(logits, other)?;
            let z1 = gather_at(logits, first)?;
            let z3 = gather_at(logits, third)?;
            let denom = ((z1 - z3)? + 1e-12)?;
            Ok((zo - zy)?.div(&denom)?)
        }
    }
}

/// Targeted DLR loss per example (Croce & Hein 2020, eq. 7; AutoAttack's
/// `dlr_loss_targeted`): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12), π the logits
/// sorted decreasingly, t the target class. Needs at least 4 classes.
pub fn targeted_dlr(logits: &Tensor, labels: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let z = logits.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut first, mut third, mut fourth) = (Vec::new(), Vec::new(), Vec::new());
    for row in &z {
        if row.len() < 4 {
            return Err(Error::config(
                "targeted DLR loss",
                row.len(),
                "needs at least 4 classes",
            ));
        }
        let order = descending(row);
        first.push(order[0]);
        third.push(order[2]);
        fourth.push(order[3]);
    }
    let zy = gather_at(logits, labels.to_vec1::<u32>()?)?;
    let zt = gather_at(logits, targets.to_vec1::<u32>()?)?;
    let z1 = gather_at(logits, first)?;
    let z34 = ((gather_at(logits, third)? + gather_at(logits, fourth)?)? * 0.5)?;
    let denom = ((z1 - z34)? + 1e-12)?;
    Ok((zy - zt)?.neg()?.div(&denom)?)
}

/// Class indices of a row of logits, largest first (ties: lower index first).
pub fn descending(row: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    order
}

/// Margin z_y − max_{i≠y} z_i per example (host), negative when misclassified.
pub fn margins(logits: &Tensor, labels: &[u32]) -> Result<Vec<f32>> {
    let z = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(z.iter()
        .zip(labels)
        .map(|(row, &y)| {
            let other = row
                .iter()
                .enumerate()
                .filter(|(i, _)| *i as u32 != y)
                .map(|(_, v)| *v)
                .fold(f32::NEG_INFINITY, f32::max);
            row[y as usize] - other
        })
        .collect())
}

/// Logits, per-example loss and the gradient of the summed loss with respect to `x` (so
/// each example's gradient is its own). The model should hold no variables (a
/// [`crate::model::ResNet20::frozen`] view), so no weight gradient is computed.
pub fn loss_and_gradient(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &Tensor,
    loss: Loss,
) -> Result<(Tensor, Tensor, Tensor)> {
    loss_and_gradient_of(model, x, |logits| loss_per_example(loss, logits, labels))
}

/// [`loss_and_gradient`] for any per-example loss of the logits.
pub fn loss_and_gradient_of(
    model: &dyn Classifier,
    x: &Tensor,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let xv = Var::from_tensor(&x.detach())?;
    let logits = model.forward_t(xv.as_tensor(), false)?;
    let per = loss(&logits)?;
    let grads = per.sum_all()?.backward()?;
    let g = match grads.get(xv.as_tensor()) {
        Some(g) => g.detach(),
        None => xv.as_tensor().zeros_like()?,
    };
    Ok((logits.detach(), per.detach(), g))
}

/// The summed cross-entropy and its input gradient ([`loss_and_gradient`] with [`Loss::Ce`]).
pub fn input_gradient(
    model: &dyn Classifier,
    x: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (_, per, g) = loss_and_gradient(model, x, labels, Loss::Ce)?;
    Ok((per.sum_all()?, g))
}

/// Per-example L2 norms over all but the first dimension, shaped B×1×1×1.
pub fn l2_norms(t: &Tensor) -> Result<Tensor> {
    let b = t.dim(0)?;
    Ok(t.sqr()?
        .flatten_from(1)?
        .sum(1)?
        .sqrt()?
        .reshape((b, 1, 1, 1))?)
}

/// The ascent direction for a gradient: sign (L∞) or unit L2 direction per example.
pub fn direction(g: &Tensor, norm: Norm) -> Result<Tensor> {
    match norm {
        Norm::Linf => Ok(g.sign()?),
        Norm::L2 => Ok(g.broadcast_div(&(l2_norms(g)? + 1e-12)?)?),
    }
}

/// Projects `x_adv` onto the L∞ ball of radius `eps` around `x`, intersected with [0, 1].
pub fn project_linf(x_adv: &Tensor, x: &Tensor, eps: f64) -> Result<Tensor> {
    let lo = (x - eps)?.clamp(0f32, 1f32)?;
    let hi = (x + eps)?.clamp(0f32, 1f32)?;
    Ok(x_adv.maximum(&lo)?.minimum(&hi)?)
}

/// Projects onto the L2 ball of radius `eps` around `x`, then clips to [0, 1] (clipping
/// moves every coordinate towards the box that holds `x`, so the result stays in the ball).
pub fn project_l2(x_adv: &Tensor, x: &Tensor, eps: f64) -> Result<Tensor> {
    let delta = (x_adv - x)?;
    let n = l2_norms(&delta)?;
    let factor = (n + 1e-12)?.recip()?.affine(eps, 0.0)?.clamp(0f32, 1f32)?;
    Ok((x + delta.broadcast_mul(&factor)?)?.clamp(0f32, 1f32)?)
}

/// Projection for a norm.
pub fn project(x_adv: &Tensor, x: &Tensor, norm: Norm, eps: f64) -> Result<Tensor> {
    match norm {
        Norm::Linf => project_linf(x_adv, x, eps),
        Norm::L2 => project_l2(x_adv, x, eps),
    }
}

/// A uniform random point of the ε-ball around `x`, clipped to [0, 1].
/// L∞: each coordinate uniform in [−ε, ε]. L2: a Gaussian direction with radius ε·u^(1/d).
pub fn random_start(x: &Tensor, norm: Norm, eps: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let delta = match norm {
        Norm::Linf => Tensor::from_vec(
            rng.uniform_vec(n, -eps as f32, eps as f32),
            x.shape(),
            x.device(),
        )?,
        Norm::L2 => {
            let b = x.dim(0)?;
            let d = n / b.max(1);
            let g = Tensor::from_vec(rng.normal_vec(n, 1.0), x.shape(), x.device())?;
            let radii: Vec<f32> = (0..b)
                .map(|_| (eps * (rng.uniform_f32() as f64).powf(1.0 / d as f64)) as f32)
                .collect();
            let radii = Tensor::from_vec(radii, (b, 1, 1, 1), x.device())?;
            g.broadcast_div(&(l2_norms(&g)? + 1e-12)?)?
                .broadcast_mul(&radii)?
        }
    };
    Ok((x + delta)?.clamp(0f32, 1f32)?)
}

/// Chooses per example: `mask[i]` true → `a[i]`, else `b[i]` (B-long mask, any shapes B×…).
pub fn select(mask: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = mask.len();
    let m: Vec<u8> = mask.iter().map(|&v| u8::from(v)).collect();
    let mut shape = vec![n];
    shape.extend(std::iter::repeat_n(1, a.rank() - 1));
    let m = Tensor::from_vec(m, shape, a.device())?.broadcast_as(a.shape())?;
    Ok(m.where_cond(a, b)?)
}

/// Predicted classes on the host.
pub fn predictions(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Restarts: runs `attack` again, `restarts − 1` times, on the examples the current result
/// does not fool yet (only those, so restarts cost little once most examples are broken),
/// replacing their result with the new one.
pub fn with_restarts<F>(
    model: &dyn Classifier,
    x: &Tensor,
    y: &Tensor,
    restarts: usize,
    mut attack: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    let labels = y.to_vec1::<u32>()?;
    let mut best = attack(x, y)?;
    for _ in 1..restarts {
        let preds = predictions(&model.forward_t(&best, false)?)?;
        let todo: Vec<u32> = (0..labels.len())
            .filter(|&i| preds[i] == labels[i])
            .map(|i| i as u32)
            .collect();
        if todo.is_empty() {
            break;
        }
        let ids = Tensor::from_vec(todo.clone(), todo.len(), x.device())?;
        let next = attack(&x.index_select(&ids, 0)?, &y.index_select(&ids, 0)?)?;
        best = replace_rows(&best, &todo, &next)?;
    }
    Ok(best)
}

/// A targeted attack run once per target class, AutoAttack's way: for each of the
/// `targets` classes ranked highest by the clean logits after the first (AutoAttack's
/// `-target_class` for target_class in 2..=targets+1), `repeats` times, on the examples
/// that nothing before has fooled. `run(xs, ys, ts)` attacks images `xs` with labels `ys`
/// towards classes `ts`. An example counts as fooled when misclassified, as any class.
pub fn per_target<F>(
    model: &dyn Classifier,
    x: &Tensor,
    y: &Tensor,
    what: &'static str,
    targets: usize,
    repeats: usize,
    mut run: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
{
    let labels = y.to_vec1::<u32>()?;
    let clean = model.forward_t(x, false)?.to_vec2::<f32>()?;
    let classes = clean.first().map(Vec::len).unwrap_or(0);
    if targets + 1 > classes {
        return Err(Error::config(
            what,
            targets,
            format!(
                "the model has {classes} classes: at most {}",
                classes.saturating_sub(1)
            ),
        ));
    }
    let ranked: Vec<Vec<u32>> = clean.iter().map(|row| descending(row)).collect();
    let mut best = x.clone();
    for rank in (1..=targets).flat_map(|k| std::iter::repeat_n(k, repeats)) {
        let preds = predictions(&model.forward_t(&best, false)?)?;
        let todo: Vec<u32> = (0..labels.len())
            .filter(|&i| preds[i] == labels[i])
            .map(|i| i as u32)
            .collect();
        if todo.is_empty() {
            break;
        }
        let ids = Tensor::from_vec(todo.clone(), todo.len(), x.device())?;
        let ts: Vec<u32> = todo.iter().map(|&i| ranked[i as usize][rank]).collect();
        let ts = Tensor::from_vec(ts, todo.len(), x.device())?;
        let next = run(&x.index_select(&ids, 0)?, &y.index_select(&ids, 0)?, &ts)?;
        best = replace_rows(&best, &todo, &next)?;
    }
    Ok(best)
}

/// `base` with its rows `at` replaced by the rows of `rows`, in order (an exact copy: no
/// arithmetic touches the values).
pub fn replace_rows(base: &Tensor, at: &[u32], rows: &Tensor) -> Result<Tensor> {
    let n = base.dim(0)?;
    if rows.dim(0)? != at.len() {
        return Err(Error::config(
            "replace_rows",
            format!("{} rows for {} indices", rows.dim(0)?, at.len()),
            "one row per index",
        ));
    }
    let mut source: Vec<u32> = (0..n as u32).collect();
    for (j, &i) in at.iter().enumerate() {
        source[i as usize] = (n + j) as u32;
    }
    let all = Tensor::cat(&[base, rows], 0)?;
    let source = Tensor::from_vec(source, n, base.device())?;
    Ok(all.index_select(&source, 0)?)
}

/// A radius for people: `8/255` when ε is a whole number of 255ths, else `0.0314`.
pub fn eps_label(eps: f64) -> String {
    let v = eps * 255.0;
    if (v - v.round()).abs() < 1e-6 {
        format!("{}/255", v.round())
    } else {
        format!("{eps:.4}")
    }
}

/// The settings of the attacks that are built by name ([`build`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttackSettings {
    /// PGD steps (also the transfer attack's PGD on its source). Default 10.
    pub pgd_steps: usize,
    /// PGD step as a fraction of ε. Default 0.25.
    pub pgd_step_fraction: f64,
    /// Random restarts of PGD and APGD. Default 1.
    pub restarts: usize,
    /// APGD iterations. Default 100.
    pub apgd_iterations: usize,
    /// Square attack queries per image. Default 5,000.
    pub square_queries: usize,
    /// FAB and FAB-T iterations. Default 100.
    pub fab_iterations: usize,
}

impl Default for AttackSettings {
    fn default() -> Self {
        AttackSettings {
            pgd_steps: 10,
            pgd_step_fraction: 0.25,
            restarts: 1,
            apgd_iterations: 100,
            square_queries: 5000,
            fab_iterations: 100,
        }
    }
}

impl AttackSettings {
    /// The PGD attack these settings describe.
    pub fn pgd(&self) -> pgd::Pgd {
        pgd::Pgd {
            steps: self.pgd_steps,
            step_fraction: self.pgd_step_fraction,
            restarts: self.restarts,
            random_start: true,
        }
    }
}

/// The attack names [`build`] knows.
pub const ATTACK_NAMES: [&str; 9] = [
    "fgsm",
    "pgd",
    "apgd-ce",
    "apgd-dlr",
    "apgd-t",
    "fab",
    "fab-t",
    "square",
    "autoattack",
];

/// Builds a white-box or score-based attack by name ([`ATTACK_NAMES`]), checking that it
/// supports `norm`. Transfer attacks need a source model and
/// are built with [`transfer::Transfer`].
pub fn build(name: &str, s: &AttackSettings, norm: Norm) -> Result<Box<dyn Attack>> {
    let attack: Box<dyn Attack> = match name {
        "fgsm" => Box::new(fgsm::Fgsm),
        "pgd" => Box::new(s.pgd()),
        "apgd-ce" | "apgd-dlr" => Box::new(apgd::Apgd {
            iterations: s.apgd_iterations,
            restarts: s.restarts,
            ..if name == "apgd-ce" {
                apgd::Apgd::default()
            } else {
                apgd::Apgd::dlr()
            }
        }),
        "apgd-t" => Box::new(apgd::ApgdTargeted {
            apgd: apgd::Apgd {
                iterations: s.apgd_iterations,
                restarts: s.restarts,
                ..apgd::Apgd::dlr()
            },
            ..apgd::ApgdTargeted::default()
        }),
        "fab" => Box::new(fab::Fab {
            iterations: s.fab_iterations,
            restarts: s.restarts,
            ..fab::Fab::default()
        }),
        "fab-t" => Box::new(fab::FabTargeted {
            fab: fab::Fab {
                iterations: s.fab_iterations,
                restarts: s.restarts,
                ..fab::Fab::default()
            },
            ..fab::FabTargeted::default()
        }),
        "square" => Box::new(square::Square {
            queries: s.square_queries,
            ..square::Square::default()
        }),
        // The standard version, whatever the other attacks' settings.
        "autoattack" => Box::new(autoattack::AutoAttack::default()),
        other => return Err(Error::config(
            "attack",
            other,
            "unknown (known: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square, autoattack, transfer)",
        )),
    };
    if !attack.supports(norm) {
        return Err(Error::config(
            "attack",
            name,
            format!("does not support the {norm} norm"),
        ));
    }
    Ok(attack)
}

/// Parses `8/255`, `0.0314` or `1e-3`.
pub fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    let v = if let Some((a, b)) = s.split_once('/') {
        let a: f64 = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number"))?;
        let b: f64 = b
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number"))?;
        if b == 0.0 {
            return Err(format!("`{s}` divides by zero"));
        }
        a / b
    } else {
        s.trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number"))?
    };
    if !v.is_finite() {
        return Err(format!("`{s}` is not finite"));
    }
    Ok(v)
}
