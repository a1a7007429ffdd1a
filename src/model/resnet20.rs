//! ResNet-20 for CIFAR-10 (He et al. 2016, §4.2): a 3×3 conv with 16 channels, three
//! stages of three basic blocks (16, 32, 64 channels; stride 2 at the first block of
//! stages 2 and 3), global average pooling, a linear layer to 10 classes.
//!
//! - Shortcuts are "option A": identity, and where the shape changes, every other pixel
//!   with the new channels zero-padded (half on each side) — no parameters.
//! - Per-channel normalization (CIFAR-10 mean and std) is the model's first operation, so
//!   inputs are images in [0, 1] and ε is in pixel units.
//! - 269,722 trainable parameters. Tensor names and layouts are those of the de-facto
//!   PyTorch ResNet-20 (`conv1.weight`, `bn1.*`, `layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}.*`,
//!   `linear.{weight,bias}`; OIHW convs, [out, in] linear), with BatchNorm buffers
//!   `running_mean`, `running_var` and `num_batches_tracked`, so that PyTorch's
//!   `load_state_dict` takes our safetensors file as it is.
//! - BatchNorm: ε = 1e-5, momentum 0.1, biased batch variance for normalization and
//!   unbiased for the running estimate (PyTorch's conventions).
//! - Initialization as the PyTorch reference: Kaiming-normal (fan-in, gain √2) conv and
//!   linear weights, linear bias uniform in ±1/√fan_in, BatchNorm weight 1 and bias 0 —
//!   drawn from the project's seeded [`Rng`].
//!
//! # Shapes
//! input B×3×32×32 → stem B×16×32×32 → layer1 B×16×32×32 → layer2 B×32×16×16 →
//! layer3 B×64×8×8 → pool B×64 → logits B×10.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::{Classifier, FullPrecision, Seam};
use crate::kernels;
use crate::rng::Rng;
use crate::{Error, Result};

/// CIFAR-10 per-channel mean (the model's normalization).
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 per-channel standard deviation.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// Classes.
pub const NUM_CLASSES: usize = 10;
/// Trainable parameters of ResNet-20.
pub const NUM_PARAMETERS: usize = 269_722;
/// BatchNorm ε.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum.
pub const BN_MOMENTUM: f64 = 0.1;

/// One parameter or buffer of the architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
}

/// What a named tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Conv weight (OIHW), trainable.
    ConvWeight,
    /// Linear weight ([out, in]), trainable.
    LinearWeight,
    /// Linear bias, trainable.
    LinearBias,
    /// BatchNorm γ, trainable.
    BnWeight,
    /// BatchNorm β, trainable.
    BnBias,
    /// BatchNorm running mean (buffer).
    RunningMean,
    /// BatchNorm running variance (buffer).
    RunningVar,
}

impl TensorKind {
    /// True for parameters the optimizer updates.
    pub fn trainable(self) -> bool {
        !matches!(self, TensorKind::RunningMean | TensorKind::RunningVar)
    }
}

/// The residual blocks: (name, in channels, out channels, stride).
pub fn blocks() -> Vec<(String, usize, usize, usize)> {
    let mut v = Vec::new();
    let mut in_planes = 16;
    for (stage, planes) in [(1usize, 16usize), (2, 32), (3, 64)] {
        for b in 0..3 {
            let stride = if stage > 1 && b == 0 { 2 } else { 1 };
            v.push((format!("layer{stage}.{b}"), in_planes, planes, stride));
            in_planes = planes;
        }
    }
    v
}

fn bn_specs(out: &mut Vec<TensorSpec>, name: &str, c: usize) {
    for (suffix, kind) in [
        ("weight", TensorKind::BnWeight),
        ("bias", TensorKind::BnBias),
        ("running_mean", TensorKind::RunningMean),
        ("running_var", TensorKind::RunningVar),
    ] {
        out.push(TensorSpec {
            name: format!("{name}.{suffix}"),
            shape: vec![c],
            kind,
        });
    }
}

fn conv_spec(out: &mut Vec<TensorSpec>, name: &str, o: usize, i: usize) {
    out.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![o, i, 3, 3],
        kind: TensorKind::ConvWeight,
    });
}

/// Every tensor of ResNet-20 (parameters and float buffers) in a fixed order.
/// `num_batches_tracked` counters are handled apart (they are i64 scalars).
pub fn tensor_specs() -> Vec<TensorSpec> {
    let mut v = Vec::new();
    conv_spec(&mut v, "conv1", 16, 3);
    bn_specs(&mut v, "bn1", 16);
    for (name, i, o, _) in blocks() {
        conv_spec(&mut v, &format!("{name}.conv1"), o, i);
        bn_specs(&mut v, &format!("{name}.bn1"), o);
        conv_spec(&mut v, &format!("{name}.conv2"), o, o);
        bn_specs(&mut v, &format!("{name}.bn2"), o);
    }
    v.push(TensorSpec {
        name: "linear.weight".into(),
        shape: vec![NUM_CLASSES, 64],
        kind: TensorKind::LinearWeight,
    });
    v.push(TensorSpec {
        name: "linear.bias".into(),
        shape: vec![NUM_CLASSES],
        kind: TensorKind::LinearBias,
    });
    v
}

/// The BatchNorm layers' names (`bn1`, `layer1.0.bn1`, ...).
pub fn bn_names() -> Vec<String> {
    tensor_specs()
        .into_iter()
        .filter(|s| s.kind == TensorKind::RunningMean)
        .map(|s| s.name.trim_end_matches(".running_mean").to_string())
        .collect()
}

/// ResNet-20 with its tensors, on one device.
///
/// A trainable model holds its parameters and BatchNorm buffers as [`Var`]s (updated in
/// place by the optimizer and by training-mode BatchNorm). [`ResNet20::frozen`] gives a
/// view on the same storage whose tensors are not variables: attacks run on it, so a
/// backward pass computes the input gradient only.
pub struct ResNet20 {
    tensors: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
    num_batches_tracked: Arc<AtomicI64>,
    seam: Seam,
    mean: Tensor,
    std: Tensor,
    device: Device,
}

impl ResNet20 {
    /// A freshly initialized, trainable model (seeded).
    pub fn init(rng: &mut Rng, device: &Device) -> Result<Self> {
        let mut map = BTreeMap::new();
        for s in tensor_specs() {
            let n: usize = s.shape.iter().product();
            let data = match s.kind {
                TensorKind::ConvWeight | TensorKind::LinearWeight => {
                    let fan_in: usize = s.shape[1..].iter().product();
                    rng.normal_vec(n, (2.0 / fan_in as f32).sqrt())
                }
                TensorKind::LinearBias => {
                    let bound = 1.0 / (64f32).sqrt();
                    rng.uniform_vec(n, -bound, bound)
                }
                TensorKind::BnWeight | TensorKind::RunningVar => vec![1.0; n],
                TensorKind::BnBias | TensorKind::RunningMean => vec![0.0; n],
            };
            map.insert(s.name.clone(), Tensor::from_vec(data, s.shape, device)?);
        }
        Self::from_tensors(map, 0, device, true)
    }

    /// A model from named tensors (all of [`tensor_specs`], right shapes, f32).
    /// `trainable`: hold them as variables.
    pub fn from_tensors(
        tensors: BTreeMap<String, Tensor>,
        num_batches_tracked: i64,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        check_tensors(&tensors)?;
        let mut vars = BTreeMap::new();
        let mut held = BTreeMap::new();
        for s in tensor_specs() {
            let t = tensors[&s.name].to_device(device)?.to_dtype(DType::F32)?;
            if trainable {
                let v = Var::from_tensor(&t.contiguous()?.copy()?)?;
                held.insert(s.name.clone(), v.as_tensor().clone());
                vars.insert(s.name.clone(), v);
            } else {
                held.insert(s.name.clone(), t.detach());
            }
        }
        Ok(ResNet20 {
            tensors: held,
            vars,
            num_batches_tracked: Arc::new(AtomicI64::new(num_batches_tracked)),
            seam: Arc::new(FullPrecision),
            mean: Tensor::from_slice(&CIFAR10_MEAN, (1, 3, 1, 1), device)?,
            std: Tensor::from_slice(&CIFAR10_STD, (1, 3, 1, 1), device)?,
            device: device.clone(),
        })
    }

    /// The same model with a different quantizer seam (shares the tensors).
    pub fn with_seam(&self, seam: Seam) -> Self {
        ResNet20 {
            tensors: self.tensors.clone(),
            vars: self.vars.clone(),
            num_batches_tracked: self.num_batches_tracked.clone(),
            seam,
            mean: self.mean.clone(),
            std: self.std.clone(),
            device: self.device.clone(),
        }
    }

    /// A non-trainable view on the same storage: optimizer updates show through, but a
    /// backward pass through it reaches no weight.
    pub fn frozen(&self) -> Self {
        ResNet20 {
            tensors: self
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.detach()))
                .collect(),
            vars: BTreeMap::new(),
            num_batches_tracked: self.num_batches_tracked.clone(),
            seam: self.seam.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
            device: self.device.clone(),
        }
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The quantizer seam in use.
    pub fn seam(&self) -> &Seam {
        &self.seam
    }

    /// A named tensor (parameter or buffer).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::config("tensor", name, "ResNet-20 has no tensor of that name"))
    }

    /// All named tensors (parameters and float buffers).
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// The trainable variables, by name (empty for a frozen model).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        tensor_specs()
            .into_iter()
            .filter(|s| s.kind.trainable())
            .filter_map(|s| self.vars.get(&s.name).map(|v| (s.name, v.clone())))
            .collect()
    }

    /// The number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        tensor_specs()
            .iter()
            .filter(|s| s.kind.trainable())
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Re-estimates the BatchNorm running statistics as the exact average of the batch
    /// statistics over `batches` (training-mode forward passes, no gradients; PyTorch's
    /// `momentum=None`). Used after QAT, whose quantized weights change the scale of every
    /// conv output faster than momentum 0.1 tracks in a short fine-tuning. Needs a trainable
    /// model (its running statistics are variables); a no-op for an empty slice.
    pub fn reestimate_batch_norm(&self, batches: &[Tensor]) -> Result<()> {
        let names = bn_names();
        let get = |n: &str| -> Result<Var> {
            self.vars.get(n).cloned().ok_or_else(|| {
                crate::Error::config("reestimate_batch_norm", n, "the model is not trainable")
            })
        };
        let mut sums: Vec<Option<(Tensor, Tensor)>> = vec![None; names.len()];
        for x in batches {
            let before: Vec<(Tensor, Tensor)> = names
                .iter()
                .map(|n| {
                    Ok((
                        get(&format!("{n}.running_mean"))?.as_tensor().copy()?,
                        get(&format!("{n}.running_var"))?.as_tensor().copy()?,
                    ))
                })
                .collect::<Result<_>>()?;
            self.forward(&x.detach(), true)?;
            // new = (1 − m)·old + m·batch, so batch = (new − (1 − m)·old) / m.
            for (i, n) in names.iter().enumerate() {
                let m = BN_MOMENTUM;
                let batch = |var: &str, old: &Tensor| -> Result<Tensor> {
                    let new = get(&format!("{n}.{var}"))?.as_tensor().copy()?;
                    Ok(((new - (old * (1.0 - m))?)? / m)?)
                };
                let (bm, bv) = (
                    batch("running_mean", &before[i].0)?,
                    batch("running_var", &before[i].1)?,
                );
                sums[i] = Some(match sums[i].take() {
                    None => (bm, bv),
                    Some((a, b)) => ((a + bm)?, (b + bv)?),
                });
            }
        }
        let k = batches.len() as f64;
        for (i, n) in names.iter().enumerate() {
            if let Some((a, b)) = &sums[i] {
                get(&format!("{n}.running_mean"))?.set(&(a / k)?)?;
                get(&format!("{n}.running_var"))?.set(&(b / k)?)?;
            }
        }
        Ok(())
    }

    /// BatchNorm's batch counter (PyTorch's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked.load(Ordering::Relaxed)
    }

    fn t(&self, name: &str) -> &Tensor {
        // Names come from the fixed architecture; `check_tensors` guaranteed them.
        &self.tensors[name]
    }

    /// The weight layer `layer` uses: its stored weight through the seam's quantizer.
    fn layer_weight(&self, layer: &str) -> Result<Tensor> {
        self.seam.weight(layer, self.t(&format!("{layer}.weight")))
    }

    /// The kernel `w` and BatchNorm `bn` (running statistics) folded into one convolution:
    /// `(w·a, b)` with `a = γ/√(σ² + ε)` and `b = β − μ·a` per output channel.
    fn folded(&self, w: &Tensor, bn: &str) -> Result<(Tensor, Tensor)> {
        let gamma = self.t(&format!("{bn}.weight"));
        let beta = self.t(&format!("{bn}.bias"));
        let rm = self.t(&format!("{bn}.running_mean")).detach();
        let rv = self.t(&format!("{bn}.running_var")).detach();
        let scale = (rv + BN_EPS)?.sqrt()?.recip()?.mul(gamma)?;
        let shift = beta.sub(&rm.mul(&scale)?)?;
        let o = scale.dim(0)?;
        Ok((w.broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?, shift))
    }

    /// Convolution `layer` (through the seam's weight quantizer) followed by BatchNorm `bn`
    /// and, with `site`, the seam's activation there: in training mode with batch statistics
    /// (and the running-statistics update); in evaluation mode BatchNorm folds into the
    /// convolution, `conv(x, w·a) + b` with `a = γ/√(σ² + ε)` and `b = β − μ·a` per output
    /// channel, and a plain-ReLU activation into the convolution's store.
    fn conv_bn(&self, x: &Tensor, names: ConvBn<'_>, stride: usize, train: bool) -> Result<Tensor> {
        let ConvBn {
            conv: layer,
            bn,
            act: site,
            residual,
            link,
        } = names;
        let w = self.layer_weight(layer)?;
        // The convolution, as the block's first where it takes the shortcut's gradient.
        let conv = |w: &Tensor, bias: Option<&Tensor>, relu: bool| -> Result<Tensor> {
            Ok(match (link.filter(|_| residual.is_none()), bias) {
                (Some(link), _) => {
                    kernels::conv2d_block_start(x, w, bias, relu, (1, stride), link)?
                }
                (None, None) => kernels::conv2d(x, w, 1, stride)?,
                (None, Some(b)) if relu => kernels::conv2d_bias_relu(x, w, b, 1, stride)?,
                (None, Some(b)) => kernels::conv2d_bias(x, w, b, 1, stride)?,
            })
        };
        if train {
            let gamma = self.t(&format!("{bn}.weight"));
            let beta = self.t(&format!("{bn}.bias"));
            let rm_name = format!("{bn}.running_mean");
            let rv_name = format!("{bn}.running_var");
            let x = conv(&w, None, false)?;
            // A plain ReLU first at the site goes inside BatchNorm's op (with the residual
            // added before it, when there is one).
            let relu_first = site.is_some_and(|s| self.seam.relu_first(s));
            let (y, mean, var) = match (residual, relu_first) {
                (Some(r), true) => {
                    kernels::batch_norm_add_relu_train(&x, (gamma, beta), r, link, BN_EPS)?
                }
                (None, true) => kernels::batch_norm_relu_train(&x, gamma, beta, BN_EPS)?,
                (None, false) => kernels::batch_norm_train(&x, gamma, beta, BN_EPS)?,
                (Some(_), false) => {
                    return Err(Error::config(
                        "activation site",
                        site.unwrap_or("none"),
                        "a residual goes inside BatchNorm's op only before a plain ReLU",
                    ))
                }
            };
            if let (Some(rm), Some(rv)) = (self.vars.get(&rm_name), self.vars.get(&rv_name)) {
                let (b, _, h, w) = x.dims4()?;
                let n = (b * h * w) as f64;
                let m = BN_MOMENTUM;
                let unbiased = n / (n - 1.0).max(1.0);
                let new_rm = ((rm.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?;
                let new_rv = ((rv.as_tensor().detach() * (1.0 - m))? + (var * (m * unbiased))?)?;
                rm.set(&new_rm)?;
                rv.set(&new_rv)?;
            }
            match site {
                Some(site) if relu_first => self.seam.after_relu(site, &y),
                Some(site) => self.seam.activation(site, &y),
                None => Ok(y),
            }
        } else {
            if residual.is_some() {
                return Err(Error::config(
                    "batch-norm mode",
                    "evaluation",
                    "a residual goes inside BatchNorm's op only in training mode",
                ));
            }
            let (w, shift) = self.folded(&w, bn)?;
            match site {
                Some(site) if self.seam.relu_first(site) => {
                    let y = conv(&w, Some(&shift), true)?;
                    self.seam.after_relu(site, &y)
                }
                Some(site) => {
                    let y = conv(&w, Some(&shift), false)?;
                    self.seam.activation(site, &y)
                }
                None => conv(&w, Some(&shift), false),
            }
        }
    }

    fn block(
        &self,
        x: &Tensor,
        name: &str,
        in_planes: usize,
        planes: usize,
        stride: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (relu1, relu2) = (format!("{name}.relu1"), format!("{name}.relu2"));
        let identity = stride == 1 && in_planes == planes;
        // An identity shortcut's gradient goes from the op at the block's end straight into
        // conv1's input gradient.
        let link = identity.then(kernels::ResidualLink::default);
        let out = self.conv_bn(
            x,
            ConvBn {
                conv: &format!("{name}.conv1"),
                bn: &format!("{name}.bn1"),
                act: Some(&relu1),
                residual: None,
                link: link.as_ref(),
            },
            stride,
            train,
        )?;
        let shortcut = if identity {
            x.clone()
        } else {
            option_a_shortcut(x, planes)?
        };
        let (conv2, bn2) = (format!("{name}.conv2"), format!("{name}.bn2"));
        if !train && self.seam.relu_first(&relu2) {
            // Evaluation: BatchNorm folded, the shortcut and the ReLU in the kernel's store.
            let (w, shift) = self.folded(&self.layer_weight(&conv2)?, &bn2)?;
            let y =
                kernels::conv2d_bias_add_relu(&out, &w, &shift, &shortcut, link.as_ref(), (1, 1))?;
            return self.seam.after_relu(&relu2, &y);
        }
        if train && self.seam.relu_first(&relu2) {
            // Training: BatchNorm, the shortcut and the ReLU in one op.
            let names = ConvBn {
                conv: &conv2,
                bn: &bn2,
                act: Some(&relu2),
                residual: Some(&shortcut),
                link: link.as_ref(),
            };
            return self.conv_bn(&out, names, 1, train);
        }
        let out = self.conv_bn(
            &out,
            ConvBn {
                conv: &conv2,
                bn: &bn2,
                act: None,
                residual: None,
                link: None,
            },
            1,
            train,
        )?;
        // (A plain ReLU after the sum took one of the fused ends above.)
        let sum = kernels::add(&out, &shortcut, link.as_ref())?;
        self.seam.activation(&relu2, &sum)
    }

    /// Logits; `train` selects BatchNorm's mode (batch statistics and running-statistics
    /// update in training mode, running statistics in evaluation mode).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != 32 || w != 32 {
            return Err(Error::config(
                "input shape",
                format!("{:?}", x.dims()),
                "ResNet-20 takes B×3×32×32 images in [0, 1]",
            ));
        }
        if train && !self.vars.is_empty() {
            self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
        }
        let x = x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        let stem = ConvBn {
            conv: "conv1",
            bn: "bn1",
            act: Some("relu"),
            residual: None,
            link: None,
        };
        let mut x = self.conv_bn(&x, stem, 1, train)?;
        for (name, i, o, s) in blocks() {
            x = self.block(&x, &name, i, o, s, train)?;
        }
        let pooled = x.mean((2, 3))?;
        let w = self.seam.weight("linear", self.t("linear.weight"))?;
        Ok(pooled
            .matmul(&w.t()?)?
            .broadcast_add(self.t("linear.bias"))?)
    }
}

impl Classifier for ResNet20 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(x, train)
    }
}

/// The tensors of one convolution + BatchNorm, the activation site after it (`None`: none,
/// as before a residual sum), and a residual added before that activation (training mode,
/// before a plain ReLU only).
#[derive(Clone, Copy)]
struct ConvBn<'a> {
    conv: &'a str,
    bn: &'a str,
    act: Option<&'a str>,
    residual: Option<&'a Tensor>,
    /// The block's shortcut link (see [`kernels::ResidualLink`]): with `residual`, the op at
    /// the block's end leaves the residual's gradient there; without, this convolution (the
    /// block's first) adds it to its input gradient.
    link: Option<&'a kernels::ResidualLink>,
}

/// Option-A shortcut: every other pixel, new channels zero-padded half on each side.
pub use crate::kernels::option_a_shortcut;

/// Checks that `tensors` holds every ResNet-20 tensor with its shape, and nothing else
/// (`num_batches_tracked` entries are allowed).
pub fn check_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let specs = tensor_specs();
    for s in &specs {
        let t = tensors
            .get(&s.name)
            .ok_or_else(|| Error::config("tensor", &s.name, "missing (not a ResNet-20 state)"))?;
        if t.dims() != s.shape.as_slice() {
            return Err(Error::config(
                "tensor",
                &s.name,
                format!("shape {:?}, expected {:?}", t.dims(), s.shape),
            ));
        }
        // Integers are not weights: converting them would give a model of rounded numbers.
        if !t.dtype().is_float() {
            return Err(Error::config(
                "tensor",
                &s.name,
                format!("stored as {:?}, expected a float type (f32)", t.dtype()),
            ));
        }
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::config(
                "tensor",
                &s.name,
                format!("element {i} is {} (weights must be finite)", v[i]),
            ));
        }
        if s.name.ends_with("running_var") {
            if let Some(i) = v.iter().position(|&x| x < 0.0) {
                return Err(Error::config(
                    "tensor",
                    &s.name,
                    format!("element {i} is {} (a variance is never negative)", v[i]),
                ));
            }
        }
    }
    let counters: Vec<String> = bn_names()
        .iter()
        .map(|bn| format!("{bn}.num_batches_tracked"))
        .collect();
    for k in tensors.keys() {
        if !counters.contains(k) && !specs.iter().any(|s| &s.name == k) {
            return Err(Error::config(
                "tensor",
                k,
                "unexpected (not a ResNet-20 tensor)",
            ));
        }
    }
    Ok(())
}
