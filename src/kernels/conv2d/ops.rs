//! The convolutions as candle ops: forward passes (plain, with a bias and ReLU, with a
//! residual) and their gradients, each running the algorithm its [`Conv`]'s path chooses.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{forward, grad_input, grad_weight, Conv, Geom, Store};
use crate::kernels::{slice, ResidualLink};

impl Conv {
    /// A forward op's output: `y = conv(x, w)` by the algorithm this convolution's path
    /// chooses, each output stored as `store` says.
    fn output(
        &self,
        g: &Geom,
        x: &[f32],
        w: &[f32],
        store: Store,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = forward(g, x, w, store, self.path.forward(g)?);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }
}

/// The forward op: `(x, w) -> y`; with `link`, a residual block's first convolution, whose
/// input gradient adds the shortcut's.
pub(super) struct Conv2dOp {
    pub conv: Conv,
    pub link: Option<ResidualLink>,
}

/// `(dy, w) -> dx` for an input of shape `in_shape` (and `(dy, w, y) -> dx` through the
/// ReLU whose output is `y`), plus `shortcut` (of the input's shape) where given.
struct GradInputOp {
    conv: Conv,
    in_shape: [usize; 4],
    shortcut: Option<Tensor>,
}

/// `(x, dy) -> dw` for a kernel of shape `w_shape`.
struct GradWeightOp {
    conv: Conv,
    w_shape: [usize; 4],
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "qr-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.conv.geom(l1.dims(), l2.dims())?;
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        self.conv.output(&g, x, w, Store::default())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        grads(self.conv, self.link.as_ref(), x, w, &grad.contiguous()?)
    }
}

/// The input and weight gradients of a convolution, each only where its operand is tracked;
/// the input gradient with the shortcut's that `link` holds, where given.
fn grads(
    conv: Conv,
    link: Option<&ResidualLink>,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = grad_x(conv, link, x, w, grad, None)?;
    let dw = if w.track_op() {
        let d = w.dims();
        let op = GradWeightOp {
            conv,
            w_shape: [d[0], d[1], d[2], d[3]],
        };
        Some(x.contiguous()?.apply_op2_no_bwd(grad, &op)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The input gradient where `x` is tracked: of `grad`, or with `relu_out` of
/// grad·[relu_out > 0] (through the ReLU that made the output `relu_out`), masked inside
/// the kernel; plus the shortcut's gradient that `link` holds, added as the kernel stores.
fn grad_x(
    conv: Conv,
    link: Option<&ResidualLink>,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    relu_out: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !x.track_op() {
        return Ok(None);
    }
    let d = x.dims();
    let shortcut = match link {
        Some(link) => link.take()?.map(|g| g.contiguous()).transpose()?,
        None => None,
    };
    if shortcut.as_ref().is_some_and(|s| s.dims() != d) {
        candle_core::bail!("conv2d grad: the shortcut's gradient does not fit the input {d:?}");
    }
    let op = GradInputOp {
        conv,
        in_shape: [d[0], d[1], d[2], d[3]],
        shortcut,
    };
    let (grad, w) = (grad.contiguous()?, w.contiguous()?);
    Ok(Some(match relu_out {
        Some(y) => grad.apply_op3_no_bwd(&w, &y.contiguous()?, &op)?,
        None => grad.apply_op2_no_bwd(&w, &op)?,
    }))
}

/// The forward op with a bias per output channel: `(x, w, b) -> y`, optionally through ReLU;
/// with `link`, as [`Conv2dOp`]'s.
pub(super) struct Conv2dBiasOp {
    pub conv: Conv,
    pub relu: bool,
    pub link: Option<ResidualLink>,
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "qr-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.conv.geom(l1.dims(), l2.dims())?;
        let bias = slice(s3, l3, "bias")?;
        if bias.len() != g.o {
            candle_core::bail!("conv2d: {} biases for {} output channels", bias.len(), g.o);
        }
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        let store = Store {
            bias: Some(bias),
            residual: None,
            relu: self.relu,
        };
        self.conv.output(&g, x, w, store)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.relu && !w.track_op() && !b.track_op() {
            // Only the input gradient (an attack's): the ReLU's mask goes inside its kernel.
            let dx = grad_x(self.conv, self.link.as_ref(), x, w, grad, Some(res))?;
            return Ok((dx, None, None));
        }
        let grad = if self.relu {
            // y = max(s, 0): y > 0 exactly where s > 0.
            crate::kernels::IntervalGrad::POSITIVE.apply(res, grad)?
        } else {
            grad.contiguous()?
        };
        let (dx, dw) = grads(self.conv, self.link.as_ref(), x, w, &grad)?;
        let db = if b.track_op() {
            Some(bias_gradient(&grad)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Σ over images and pixels of `dy` (N×O×H×W) per output channel, accumulated in f64: a sum
/// of N·H·W terms in f32 loses ~1e-5 of its size at a few thousand terms.
fn bias_gradient(dy: &Tensor) -> candle_core::Result<Tensor> {
    let (n, o, h, w) = dy.dims4()?;
    let v = dy.flatten_all()?.to_vec1::<f32>()?;
    let sums: Vec<f32> = (0..o)
        .map(|k| {
            let planes = (0..n).map(|i| &v[(i * o + k) * h * w..][..h * w]);
            planes.flatten().map(|&g| g as f64).sum::<f64>() as f32
        })
        .collect();
    Tensor::from_vec(sums, o, dy.device())
}

impl GradInputOp {
    /// `dx` for the output gradient `dy`, masked by `relu_out` where given.
    fn input_gradient(
        &self,
        (dy, l1): (&CpuStorage, &Layout),
        (w, l2): (&CpuStorage, &Layout),
        relu_out: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.conv.geom(&self.in_shape, l2.dims())?;
        if l1.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d grad: output gradient shape {:?}", l1.dims());
        }
        let dy = slice(dy, l1, "gradient")?;
        if relu_out.is_some_and(|r| r.len() != dy.len()) {
            candle_core::bail!("conv2d grad: the ReLU output does not fit {:?}", l1.dims());
        }
        let algo = self.conv.path.input_grad(&g)?;
        let held = self.shortcut.as_ref().map(Tensor::storage_and_layout);
        let shortcut = match &held {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(cpu) => Some(slice(cpu, layout, "shortcut gradient")?),
                _ => candle_core::bail!("conv2d grad: the shortcut's gradient is not on the CPU"),
            },
            None => None,
        };
        let dx = grad_input(&g, dy, slice(w, l2, "kernel")?, relu_out, shortcut, algo);
        Ok((CpuStorage::F32(dx), Shape::from(self.in_shape.to_vec())))
    }
}

impl CustomOp2 for GradInputOp {
    fn name(&self) -> &'static str {
        "qr-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.input_gradient((s1, l1), (s2, l2), None)
    }
}

/// `(dy, w, y) -> dx` through a ReLU: the gradient of `dy`·[y > 0].
impl CustomOp3 for GradInputOp {
    fn name(&self) -> &'static str {
        "qr-conv2d-grad-input-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s3, l3, "ReLU output")?;
        self.input_gradient((s1, l1), (s2, l2), Some(y))
    }
}

impl CustomOp2 for GradWeightOp {
    fn name(&self) -> &'static str {
        "qr-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.conv.geom(l1.dims(), &self.w_shape)?;
        if l2.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d grad: output gradient shape {:?}", l2.dims());
        }
        let algo = self.conv.path.weight_grad(&g)?;
        let dw = grad_weight(
            &g,
            slice(s1, l1, "input")?,
            slice(s2, l2, "gradient")?,
            algo,
        );
        Ok((CpuStorage::F32(dw), Shape::from(self.w_shape.to_vec())))
    }
}

/// The forward op of a residual block's last convolution in evaluation mode:
/// `(x, w, r) -> relu(conv(x, w) + bias + r)`, the bias per output channel held as data (it
/// takes no gradient); with `link`, the residual's gradient goes there instead of being
/// returned.
pub(super) struct Conv2dResidualReluOp {
    pub conv: Conv,
    pub bias: Vec<f32>,
    pub link: Option<ResidualLink>,
}

impl CustomOp3 for Conv2dResidualReluOp {
    fn name(&self) -> &'static str {
        "qr-conv2d-residual-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.conv.geom(l1.dims(), l2.dims())?;
        if self.bias.len() != g.o || l3.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d: residual {:?} or {} biases do not fit the output {:?}",
                l3.dims(),
                self.bias.len(),
                [g.n, g.o, g.ho, g.wo]
            );
        }
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        let r = slice(s3, l3, "residual")?;
        let store = Store {
            bias: Some(&self.bias),
            residual: Some(r),
            relu: true,
        };
        self.conv.output(&g, x, w, store)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // y = max(s, 0): y > 0 exactly where s > 0.
        let grad = crate::kernels::IntervalGrad::POSITIVE.apply(res, grad)?;
        let (dx, dw) = grads(self.conv, None, x, w, &grad)?;
        let dr = ResidualLink::route(self.link.as_ref(), r.track_op().then_some(grad));
        Ok((dx, dw, dr))
    }
}
