//! ResNet's option-A shortcut as one op on the CPU: every other pixel of each input channel,
//! the new channels zero, half before and half after. Its gradient puts each output
//! gradient back at its pixel, zero elsewhere. (Written with candle's ops — a strided view,
//! a copy, a concatenation with zeros — the backward pass made batch-sized copies: each
//! narrow's gradient concatenates zeros around it.) Only data moves, so the values and
//! gradients are those of candle's ops, bit for bit.
//!
//! [`ResidualLink`] carries an identity shortcut's gradient to the block's first
//! convolution, which adds it as it stores its input gradient.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, IndexOp, Layout, Shape, Tensor};

use super::slice;

/// The shortcut from `x` (N×C×H×W, even H and W) to `planes` ≥ C channels of H/2×W/2:
/// channel `(planes − C)/2 + c` is channel c at the even rows and columns, the others zero.
/// Our op on the CPU (f32), candle's ops elsewhere.
pub fn option_a_shortcut(x: &Tensor, planes: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if planes < c || !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        candle_core::bail!(
            "option-A shortcut: {c}×{h}×{w} input to {planes} channels needs an even height \
             and width and at least as many output channels as input channels"
        )
    }
    let before = (planes - c) / 2;
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(Shortcut { planes, before });
    }
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .i((.., .., .., 0, .., 0))?
        .contiguous()?
        .pad_with_zeros(1, before, planes - c - before)
}

/// The gradient of a residual block's identity shortcut on its way to the block's input.
///
/// The block's input `x` feeds its first convolution and, as the shortcut, the op at the
/// block's end; candle sums the two gradients of `x` in a pass of its own over the
/// activations, on its own threads. Linked, the op at the block's end (which the backward
/// pass reaches first: the first convolution's output leads to it) leaves the shortcut's
/// gradient here instead of returning it, and the first convolution's input gradient adds
/// it as the kernel stores each value: the same sums (one f32 addition, which is
/// commutative), one pass less. The end's residual operand must be the first convolution's
/// input (the model links identity shortcuts only). Where either end is not our CPU op (it
/// bypasses the link), the gradient takes candle's way; the first
/// convolution's backward pass fails if the end's left nothing.
#[derive(Clone, Default)]
pub struct ResidualLink(Arc<Mutex<Link>>);

/// What a [`ResidualLink`] holds.
#[derive(Default)]
enum Link {
    /// Nothing yet.
    #[default]
    Open,
    /// An end is not our op: the gradient goes through candle.
    Bypassed,
    /// The shortcut's gradient, for the first convolution.
    Grad(Tensor),
}

impl ResidualLink {
    fn state(&self) -> std::sync::MutexGuard<'_, Link> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the link unused: an end of it runs candle's ops.
    pub(crate) fn bypass(&self) {
        *self.state() = Link::Bypassed;
    }

    /// Leaves the shortcut's gradient (the op at the block's end); it comes back where the
    /// link is bypassed, for the end to return it.
    fn put(&self, grad: Tensor) -> Option<Tensor> {
        let mut state = self.state();
        match *state {
            Link::Bypassed => Some(grad),
            _ => {
                *state = Link::Grad(grad);
                None
            }
        }
    }

    /// The residual's gradient that an op at a block's end returns: `grad` without a link,
    /// else what [`Self::put`] gives back (nothing unless the link is bypassed).
    pub(crate) fn route(link: Option<&Self>, grad: Option<Tensor>) -> Option<Tensor> {
        match (link, grad) {
            (Some(link), Some(g)) => link.put(g),
            (_, grad) => grad,
        }
    }

    /// Takes the shortcut's gradient (the block's first convolution): `None` where the link
    /// is bypassed.
    pub(crate) fn take(&self) -> candle_core::Result<Option<Tensor>> {
        let mut state = self.state();
        match std::mem::take(&mut *state) {
            Link::Grad(g) => Ok(Some(g)),
            Link::Bypassed => {
                *state = Link::Bypassed;
                Ok(None)
            }
            Link::Open => candle_core::bail!(
                "residual link: the block's first convolution took its input gradient before \
                 the block's end left the shortcut's"
            ),
        }
    }
}

/// The forward op: N×C×H×W → N×`planes`×H/2×W/2, input channels from `before`.
struct Shortcut {
    planes: usize,
    before: usize,
}

/// Its gradient: N×`planes`×H/2×W/2 → N×C×H×W.
struct ShortcutGrad {
    c: usize,
    h: usize,
    w: usize,
    before: usize,
}

impl CustomOp1 for Shortcut {
    fn name(&self) -> &'static str {
        "qr-option-a-shortcut"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = slice(s, l, "input")?;
        let (h2, w2) = (h / 2, w / 2);
        let (planes, before) = (self.planes, self.before);
        let per = planes * h2 * w2;
        // SAFETY: chunk i is image i's output (`per` elements), written in full: every
        // channel is either zero or copied pixel by pixel.
        let y = unsafe {
            super::par_uninit(n * per, per, |i, out| {
                for (k, plane) in out.chunks_mut(h2 * w2).enumerate() {
                    let Some(ci) = k.checked_sub(before).filter(|&ci| ci < c) else {
                        plane.fill(std::mem::MaybeUninit::new(0.0));
                        continue;
                    };
                    let src = &x[(i * c + ci) * h * w..][..h * w];
                    for (r, row) in plane.chunks_mut(w2).enumerate() {
                        let from = &src[2 * r * w..][..w];
                        for (o, pair) in row.iter_mut().zip(from.chunks_exact(2)) {
                            o.write(pair[0]);
                        }
                    }
                }
            })
        };
        Ok((CpuStorage::F32(y), Shape::from((n, planes, h2, w2))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, c, h, w) = x.dims4()?;
        let op = ShortcutGrad {
            c,
            h,
            w,
            before: self.before,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for ShortcutGrad {
    fn name(&self) -> &'static str {
        "qr-option-a-shortcut-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, planes, h2, w2) = l.shape().dims4()?;
        let dy = slice(s, l, "gradient")?;
        let Self { c, h, w, before } = *self;
        if (h2, w2) != (h / 2, w / 2) || planes < before + c {
            candle_core::bail!("option-A shortcut gradient: {:?} does not fit", l.dims())
        }
        // SAFETY: chunk p is plane p of dx (image p / C, channel p % C), written in full:
        // even rows alternate gradient and zero, odd rows are zero.
        let dx = unsafe {
            super::par_uninit(n * c * h * w, h * w, |p, plane| {
                let (i, ci) = (p / c, p % c);
                let src = &dy[(i * planes + before + ci) * h2 * w2..][..h2 * w2];
                for (r, row) in plane.chunks_mut(w).enumerate() {
                    if r % 2 == 1 {
                        row.fill(std::mem::MaybeUninit::new(0.0));
                        continue;
                    }
                    let from = &src[r / 2 * w2..][..w2];
                    for (pair, &g) in row.chunks_exact_mut(2).zip(from) {
                        pair[0].write(g);
                        pair[1].write(0.0);
                    }
                }
            })
        };
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }
}
