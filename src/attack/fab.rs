//! FAB, L∞ (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast
//! adaptive boundary attack"): a minimum-norm attack. Each iteration linearizes the model
//! at the current point, takes the decision hyperplane closest in L∞ (untargeted: of the
//! class whose linearized boundary is nearest, eq. 7; targeted, [`FabTargeted`]: of the
//! target class), projects both the current point and the original image onto that
//! hyperplane intersected with the box [0, 1] (eq. 8), and moves to a convex combination of
//! the two projections, extrapolated by η (eq. 9). Once a point fools the model it is kept
//! if it is the closest so far, and the iterate is pulled back towards the original image
//! by β (eq. 11). An example counts as broken at radius ε when the closest fooling point
//! found is within ε.
//!
//! Following the reference implementation (AutoAttack's `fab_pt.py`) where the paper differs
//! or is silent: the first run starts at the original image, later restarts at a random
//! point of half the current best radius (or ε) scaled to the L∞ sphere; the combination
//! weight is α = min(max(a₁ / (a₁ + a₂), 0), α_max) with a₁, a₂ the L∞ norms of the two
//! projection steps (each at least 1e-8), and the next point is clipped to [0, 1]. The
//! targeted version's classes are ranked by the clean logits, as in APGD-T.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{loss_and_gradient_of, per_target, predictions, replace_rows, Attack, Norm};
use crate::model::Classifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// FAB settings (untargeted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fab {
    /// Iterations per run. Default 100.
    pub iterations: usize,
    /// Runs; every one after the first starts at a random point. Default 1.
    pub restarts: usize,
    /// Largest weight of the step from the original image, α_max. Default 0.1.
    pub alpha_max: f64,
    /// Extrapolation of the projection step, η. Default 1.05.
    pub eta: f64,
    /// Backward step towards the original image once fooled, β. Default 0.9.
    pub beta: f64,
}

impl Default for Fab {
    fn default() -> Self {
        Fab {
            iterations: 100,
            restarts: 1,
            alpha_max: 0.1,
            eta: 1.05,
            beta: 0.9,
        }
    }
}

/// A model linearized at a batch of points: per example the logit difference of the
/// hyperplane's class and its input gradient (flattened).
struct Linearized {
    df: Vec<f32>,
    dg: Vec<Vec<f32>>,
}

/// What a minimum-norm run found, per example.
#[derive(Debug, Clone)]
pub struct MinimalAdversarial {
    /// The closest fooling point found (the original image where none was found, or where
    /// the image is misclassified already).
    pub x_adv: Tensor,
    /// Its L∞ distance to the original image: 0 for misclassified images, infinite where
    /// no fooling point was found.
    pub distance: Vec<f32>,
}

/// The shortest L∞ step `d` from `t` onto the hyperplane w·z = b within the box [0, 1]
/// (Croce & Hein's `projection_linf`): every coordinate moves by the same amount λ in the
/// direction that closes the gap, except those that reach the box first, λ as small as
/// reaches the hyperplane. When the hyperplane is out of reach inside the box, every
/// coordinate goes all the way to the box edge in its direction (the closest the box allows).
pub fn project_onto_hyperplane_linf(t: &[f32], w: &[f32], b: f64) -> Vec<f32> {
    let gap: f64 = w
        .iter()
        .zip(t)
        .map(|(&wi, &ti)| f64::from(wi) * f64::from(ti))
        .sum::<f64>()
        - b;
    let mut d = vec![0f32; t.len()];
    if gap == 0.0 {
        return d;
    }
    // Moving coordinate i by `dir_i` changes w·z by −|w_i| per unit, in the direction that
    // shrinks |gap|; it can move at most `cap_i` before leaving the box.
    let dir = |wi: f32| -> f32 { -(gap.signum() as f32) * wi.signum() };
    let cap = |wi: f32, ti: f32| -> f64 {
        if dir(wi) > 0.0 {
            f64::from(1.0 - ti)
        } else {
            f64::from(ti)
        }
    };
    let mut order: Vec<(f64, f64)> = w
        .iter()
        .zip(t)
        .filter(|(&wi, _)| wi != 0.0)
        .map(|(&wi, &ti)| (cap(wi, ti), f64::from(wi.abs())))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let need = gap.abs();
    // g(λ) = Σ |w_i| min(λ, cap_i): walk the caps in order until g reaches `need`.
    let mut reached: f64 = 0.0;
    let mut free: f64 = order.iter().map(|o| o.1).sum();
    let mut lambda = None;
    let mut prev_cap = 0.0;
    for &(c, wa) in &order {
        let at_cap = reached + free * (c - prev_cap);
        if at_cap >= need && free > 0.0 {
            lambda = Some(prev_cap + (need - reached) / free);
            break;
        }
        reached = at_cap;
        free -= wa;
        prev_cap = c;
    }
    for ((di, &wi), &ti) in d.iter_mut().zip(w).zip(t) {
        if wi != 0.0 {
            let c = cap(wi, ti);
            let step = lambda.map_or(c, |l| l.min(c));
            *di = dir(wi) * step as f32;
        }
    }
    d
}

fn linf(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, &x| m.max(x.abs()))
}

impl Fab {
    fn check(&self) -> Result<()> {
        let ok = self.iterations >= 1
            && self.restarts >= 1
            && (0.0..=1.0).contains(&self.alpha_max)
            && self.eta >= 1.0
            && self.beta > 0.0
            && self.beta < 1.0;
        if !ok {
            return Err(Error::config(
                "fab",
                format!(
                    "iterations {}, restarts {}, alpha_max {}, eta {}, beta {}",
                    self.iterations, self.restarts, self.alpha_max, self.eta, self.beta
                ),
                "iterations and restarts ≥ 1, alpha_max in [0, 1], eta ≥ 1, beta in (0, 1)",
            ));
        }
        Ok(())
    }

    /// The hyperplane of each of the n examples at `x1`: the logit difference z_k − z_y of
    /// the chosen class k and its input gradient. Untargeted: k is the class whose linearized boundary is nearest in L∞,
    /// |z_k − z_y| / |∇(z_k − z_y)|₁ (eq. 7); targeted: k is the target.
    fn hyperplane(
        &self,
        model: &dyn Classifier,
        x1: &Tensor,
        labels: &[u32],
        targets: Option<&[u32]>,
        classes: usize,
    ) -> Result<Linearized> {
        let n = labels.len();
        let dev = x1.device();
        if let Some(t) = targets {
            let (yi, ti) = (
                Tensor::from_vec(labels.to_vec(), (n, 1), dev)?,
                Tensor::from_vec(t.to_vec(), (n, 1), dev)?,
            );
            let (_, df, dg) = loss_and_gradient_of(model, x1, |z| {
                Ok((z.gather(&ti, 1)? - z.gather(&yi, 1)?)?.squeeze(1)?)
            })?;
            return Ok(Linearized {
                df: df.to_vec1::<f32>()?,
                dg: dg.flatten_from(1)?.to_vec2::<f32>()?,
            });
        }
        // The Jacobian of all logit differences: each example repeated once per class, row
        // i·K + k differentiating z_k − z_y of example i; in chunks of about 256 rows.
        let per_chunk = (256 / classes).max(1);
        let (mut df, mut dg) = (
            Vec::with_capacity(n * classes),
            Vec::with_capacity(n * classes),
        );
        for start in (0..n).step_by(per_chunk) {
            let m = per_chunk.min(n - start);
            let rep = x1
                .narrow(0, start, m)?
                .unsqueeze(1)?
                .repeat((1, classes, 1, 1, 1))?
                .reshape((m * classes, 3, 32, 32))?;
            let k_idx: Vec<u32> = (0..m * classes).map(|r| (r % classes) as u32).collect();
            let y_idx: Vec<u32> = (0..m * classes)
                .map(|r| labels[start + r / classes])
                .collect();
            let ki = Tensor::from_vec(k_idx, (m * classes, 1), dev)?;
            let yi = Tensor::from_vec(y_idx, (m * classes, 1), dev)?;
            let (_, f, g) = loss_and_gradient_of(model, &rep, |z| {
                Ok((z.gather(&ki, 1)? - z.gather(&yi, 1)?)?.squeeze(1)?)
            })?;
            df.extend(f.to_vec1::<f32>()?);
            dg.extend(g.flatten_from(1)?.to_vec2::<f32>()?);
        }
        let mut out_f = Vec::with_capacity(n);
        let mut out_g = Vec::with_capacity(n);
        for (i, &yi) in labels.iter().enumerate() {
            let best = (0..classes)
                .filter(|&k| k as u32 != yi)
                .map(|k| {
                    let r = i * classes + k;
                    let l1: f32 = dg[r].iter().map(|v| v.abs()).sum();
                    (r, df[r].abs() / (1e-12 + l1))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(r, _)| r)
                .ok_or_else(|| Error::config("fab", classes, "needs at least 2 classes"))?;
            out_f.push(df[best]);
            out_g.push(dg[best].clone());
        }
        Ok(Linearized {
            df: out_f,
            dg: out_g,
        })
    }

    /// The closest fooling point FAB finds for each image, at any distance (`eps` only
    /// scales the random starts of restarts after the first). Targeted when `targets`
    /// gives a class per image.
    pub fn minimal(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        y: &Tensor,
        targets: Option<&Tensor>,
        eps: f64,
        rng: &mut Rng,
    ) -> Result<MinimalAdversarial> {
        self.check()?;
        let x = x.detach().to_dtype(DType::F32)?;
        let labels = y.to_vec1::<u32>()?;
        let all_targets = targets.map(|t| t.to_vec1::<u32>()).transpose()?;
        let clean_logits = model.forward_t(&x, false)?;
        let classes = clean_logits.dim(1)?;
        let clean = predictions(&clean_logits)?;
        let mut distance: Vec<f32> = clean
            .iter()
            .zip(&labels)
            .map(|(p, l)| if p != l { 0.0 } else { f32::INFINITY })
            .collect();
        let mut x_adv = x.clone();
        let todo: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| distance[i as usize].is_infinite())
            .collect();
        if todo.is_empty() {
            return Ok(MinimalAdversarial { x_adv, distance });
        }
        let dev = x.device();
        let ids = Tensor::from_vec(todo.clone(), todo.len(), dev)?;
        let x0t = x.index_select(&ids, 0)?;
        let shape = x0t.shape().clone();
        let x0 = x0t.flatten_from(1)?.to_vec2::<f32>()?;
        let lab: Vec<u32> = todo.iter().map(|&i| labels[i as usize]).collect();
        let tgt: Option<Vec<u32>> = all_targets
            .as_ref()
            .map(|t| todo.iter().map(|&i| t[i as usize]).collect());
        let n = todo.len();
        let mut best = x0.clone();
        let mut best_d = vec![f32::INFINITY; n];
        let to_tensor = |rows: &[Vec<f32>]| -> Result<Tensor> {
            Ok(Tensor::from_vec(rows.concat(), shape.clone(), dev)?)
        };
        for restart in 0..self.restarts {
            let mut x1 = if restart == 0 {
                x0.clone()
            } else {
                self.random_start(&x0, &best_d, eps, rng)
            };
            for _ in 0..self.iterations {
                let lin =
                    self.hyperplane(model, &to_tensor(&x1)?, &lab, tgt.as_deref(), classes)?;
                self.step(&mut x1, &x0, &lin.df, &lin.dg);
                // Keep what fools, and pull it back towards the image.
                let preds = predictions(&model.forward_t(&to_tensor(&x1)?, false)?)?;
                for i in (0..n).filter(|&i| preds[i] != lab[i]) {
                    let diff: Vec<f32> = x1[i].iter().zip(&x0[i]).map(|(a, b)| a - b).collect();
                    let t = linf(&diff);
                    if t < best_d[i] {
                        best_d[i] = t;
                        best[i].clone_from(&x1[i]);
                    }
                    for (v, (o, dv)) in x1[i].iter_mut().zip(x0[i].iter().zip(&diff)) {
                        *v = o + dv * self.beta as f32;
                    }
                }
            }
        }
        // Write the found points back into the full batch, exactly.
        let found: Vec<usize> = (0..n).filter(|&i| best_d[i].is_finite()).collect();
        if !found.is_empty() {
            let rows: Vec<Vec<f32>> = found.iter().map(|&i| best[i].clone()).collect();
            let mut dims = shape.dims().to_vec();
            dims[0] = found.len();
            let adv_rows = Tensor::from_vec(rows.concat(), dims, dev)?;
            let at: Vec<u32> = found.iter().map(|&i| todo[i]).collect();
            x_adv = replace_rows(&x_adv, &at, &adv_rows)?;
        }
        for (i, &j) in todo.iter().enumerate() {
            distance[j as usize] = best_d[i];
        }
        Ok(MinimalAdversarial { x_adv, distance })
    }

    /// One FAB update of every iterate (eq. 9), the examples in parallel (each example's
    /// arithmetic is its own, so the split does not change a bit).
    fn step(&self, x1: &mut [Vec<f32>], x0: &[Vec<f32>], df: &[f32], dg: &[Vec<f32>]) {
        let (eta, alpha_max) = (self.eta as f32, self.alpha_max as f32);
        x1.par_iter_mut()
            .zip(x0.par_iter().zip(df.par_iter().zip(dg.par_iter())))
            .for_each(|(x1, (x0, (&df, w)))| {
                // The linearization z_k − z_y ≈ df + w·(z − x1) vanishes where
                // w·z = w·x1 − df.
                let b: f64 = w
                    .iter()
                    .zip(x1.iter())
                    .map(|(&a, &v)| f64::from(a) * f64::from(v))
                    .sum::<f64>()
                    - f64::from(df);
                let d1 = project_onto_hyperplane_linf(x1, w, b);
                let d2 = project_onto_hyperplane_linf(x0, w, b);
                let a1 = linf(&d1).max(1e-8);
                let a2 = linf(&d2).max(1e-8);
                let alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max);
                for (j, v) in x1.iter_mut().enumerate() {
                    let moved = (*v + eta * d1[j]) * (1.0 - alpha) + (x0[j] + eta * d2[j]) * alpha;
                    *v = moved.clamp(0.0, 1.0);
                }
            });
    }

    /// A random start for a restart: the original image plus a random direction scaled to
    /// the L∞ sphere of half the best radius found so far (ε where none).
    fn random_start(
        &self,
        x0: &[Vec<f32>],
        best_d: &[f32],
        eps: f64,
        rng: &mut Rng,
    ) -> Vec<Vec<f32>> {
        x0.iter()
            .zip(best_d)
            .map(|(x, &d)| {
                let t = rng.uniform_vec(x.len(), -1.0, 1.0);
                let m = linf(&t).max(1e-12);
                let r = d.min(eps as f32) * 0.5;
                x.iter()
                    .zip(&t)
                    .map(|(&a, &b)| (a + r * b / m).clamp(0.0, 1.0))
                    .collect()
            })
            .collect()
    }

    /// The in-ball result of a minimal run: the fooling point where it is within ε, else
    /// the original image.
    fn within(&self, x: &Tensor, found: &MinimalAdversarial, eps: f64) -> Result<Tensor> {
        let keep: Vec<bool> = found
            .distance
            .iter()
            .map(|&d| f64::from(d) <= eps)
            .collect();
        super::select(&keep, &found.x_adv, x)
    }
}

impl Attack for Fab {
    fn name(&self) -> String {
        if self.restarts > 1 {
            format!("fabx{}", self.restarts)
        } else {
            "fab".into()
        }
    }
    fn supports(&self, norm: Norm) -> bool {
        norm == Norm::Linf
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
        fab_norm(norm)?;
        super::check_eps(norm, eps)?;
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        let found = self.minimal(model, &x, y, None, eps, rng)?;
        self.within(&x, &found, eps)
    }
}

fn fab_norm(norm: Norm) -> Result<()> {
    if norm != Norm::Linf {
        return Err(Error::config("fab", norm, "implemented for linf only"));
    }
    Ok(())
}

/// FAB-T, AutoAttack's targeted FAB: for each of the `targets` classes ranked highest by
/// the clean logits after the first, FAB towards that class, run only on the images no
/// earlier target has broken within ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FabTargeted {
    pub fab: Fab,
    /// Target classes. Default 9 (every other class of CIFAR-10).
    pub targets: usize,
}

impl Default for FabTargeted {
    fn default() -> Self {
        FabTargeted {
            fab: Fab::default(),
            targets: 9,
        }
    }
}

impl Attack for FabTargeted {
    fn name(&self) -> String {
        if self.fab.restarts > 1 {
            format!("fab-tx{}", self.fab.restarts)
        } else {
            "fab-t".into()
        }
    }
    fn supports(&self, norm: Norm) -> bool {
        norm == Norm::Linf
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
        fab_norm(norm)?;
        super::check_eps(norm, eps)?;
        if self.targets == 0 {
            return Err(Error::config("fab-t targets", 0, "must be ≥ 1"));
        }
        let x = x.detach();
        if eps == 0.0 {
            return Ok(x);
        }
        let fab = &self.fab;
        per_target(
            model,
            &x,
            y,
            "fab-t targets",
            self.targets,
            1,
            |xs, ys, ts| {
                let found = fab.minimal(model, xs, ys, Some(ts), eps, rng)?;
                fab.within(xs, &found, eps)
            },
        )
    }
}
