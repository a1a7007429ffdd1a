//! 2-D convolution (NCHW, f32, square kernel, zero padding, no groups or dilation) on the
//! CPU, forward and both gradients, by one of three algorithms ([`ConvPath`]):
//!
//! - Winograd F(2×2, 3×3) (`winograd.rs`), forward only: 3×3, pad 1, stride 1, an even
//!   height and a width that is a multiple of 8 — every stride-1 convolution of ResNet-20
//!   but the 3-channel stem, where [`ConvPath::Auto`] keeps the direct kernel. 2.25× fewer
//!   multiply-adds than the direct kernel, the same result within f32 rounding.
//! - direct (`direct.rs`): 3×3, pad 1, stride 1 or 2, output width a multiple of 8 — every
//!   ResNet-20 convolution. Register tiles of output channels × 8-wide output vectors
//!   (AVX-512VL or AVX2 + FMA); the stride-1 input gradient is the same kernel on the
//!   transposed, rotated weights; the weight gradient has its own tiles (channels × 9 taps).
//! - im2col + GEMM (every other shape). For one image with `C` input channels, kernel `k`,
//!   output `Ho×Wo`: `col` is the `(C·k·k) × (Ho·Wo)` patch matrix, and
//!   - forward:       `y = W · col`                 (`O × Ho·Wo`, `W` is `O × C·k·k`)
//!   - input grad:    `dcol = Wᵀ · dy`, scattered back by col2im
//!   - weight grad:   `dW = Σ_images dy · colᵀ`
//!
//! Work is split over the batch across rayon's threads; each GEMM runs single-threaded.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::slice;

mod direct;
mod winograd;

pub use direct::Isa;

/// The best instruction set this machine runs for the SIMD kernels, if any.
pub(crate) fn direct_isa() -> Option<Isa> {
    direct::best()
}

/// Which CPU algorithm computes a convolution and its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvPath {
    /// The fastest this machine and shape allow (AVX-512VL, else AVX2 + FMA, else im2col):
    /// the forward pass by Winograd F(2×2, 3×3) for 3×3, pad-1, stride-1 convolutions with
    /// an even height, a width that is a multiple of 8 and at least 8 input channels, else
    /// by the direct kernel for 3×3, pad-1 convolutions with stride 1 and a width that is a
    /// multiple of 8, or stride 2, an even height and a width that is a multiple of 16, else
    /// im2col. The input gradient of a stride-1 convolution is the forward pass of another
    /// (the output gradient with the transposed, rotated kernel: at least 8 *output*
    /// channels for Winograd) and takes the same choice; that of a stride-2 convolution is
    /// im2col's. The weight gradient: the direct kernel where it fits, else im2col.
    #[default]
    Auto,
    /// im2col + GEMM for every shape.
    Im2col,
    /// The direct kernel with the given instruction set (the input gradient of a stride-2
    /// convolution excepted); an error where the shape or the machine does not allow it.
    Direct(Isa),
    /// The forward pass and the input gradient (a stride-1 convolution of the output
    /// gradient) by Winograd F(2×2, 3×3) with the given instruction set, the weight gradient
    /// as [`ConvPath::Direct`]; an error where the shape or the machine does not allow it.
    Winograd(Isa),
}

/// The fewest input channels for which [`ConvPath::Auto`] takes Winograd: its transforms
/// cost per channel what its products save per channel pair, so with few input channels the
/// direct kernel is faster (ResNet-20's 3-channel stem on this project's 2-core AVX-512
/// machine: direct 176, Winograd 142 GFLOP/s-equivalent; 16 channels: 190 vs 257; the
/// `conv/` benchmarks).
const WINOGRAD_MIN_CHANNELS: usize = 8;

/// The algorithm of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forward {
    Im2col,
    Direct(Isa),
    Winograd(Isa),
}

/// `isa`, or an error where this machine does not run it.
fn checked(isa: Isa) -> candle_core::Result<Isa> {
    if !direct::available(isa) {
        candle_core::bail!("conv2d: this machine does not run {isa:?}")
    }
    Ok(isa)
}

impl ConvPath {
    /// The direct kernel's instruction set for the gradients of `g`, or `None` for im2col.
    fn resolve(self, g: &Geom) -> candle_core::Result<Option<Isa>> {
        match self {
            ConvPath::Auto => Ok(if direct::fits(g) {
                direct::best()
            } else {
                None
            }),
            ConvPath::Im2col => Ok(None),
            ConvPath::Direct(isa) | ConvPath::Winograd(isa) => {
                if !direct::fits(g) {
                    candle_core::bail!("conv2d: the direct path does not take {g:?}")
                }
                checked(isa).map(Some)
            }
        }
    }

    /// The forward pass's algorithm for `g`.
    fn forward(self, g: &Geom) -> candle_core::Result<Forward> {
        match self {
            ConvPath::Auto => Ok(match direct::best() {
                Some(isa) if winograd::fits(g) && g.c >= WINOGRAD_MIN_CHANNELS => {
                    Forward::Winograd(isa)
                }
                Some(isa) if direct::fits(g) => Forward::Direct(isa),
                _ => Forward::Im2col,
            }),
            ConvPath::Winograd(isa) => {
                if !winograd::fits(g) {
                    candle_core::bail!("conv2d: the Winograd path does not take {g:?}")
                }
                checked(isa).map(Forward::Winograd)
            }
            path => Ok(path.resolve(g)?.map_or(Forward::Im2col, Forward::Direct)),
        }
    }

    /// The input gradient's algorithm for `g`: for stride 1, that of the forward pass of the
    /// convolution it is (the output gradient, the kernel transposed and rotated: input and
    /// output channels swapped); for stride 2, im2col.
    fn input_grad(self, g: &Geom) -> candle_core::Result<Forward> {
        if g.stride != 1 {
            self.resolve(g)?;
            return Ok(Forward::Im2col);
        }
        self.forward(&Geom {
            c: g.o,
            o: g.c,
            ..*g
        })
    }
}

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<Self> {
        let (&[n, c, h, wd], &[o, ci, k, k2]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and kernel, got {x:?} and {w:?}")
        };
        if ci != c || k != k2 || stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
            candle_core::bail!(
                "conv2d: input {x:?} and kernel {w:?} (stride {stride}, pad {pad}) do not fit"
            );
        }
        Ok(Geom {
            n,
            c,
            h,
            w: wd,
            o,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (wd + 2 * pad - k) / stride + 1,
        })
    }
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// The output columns `ow` whose input column `ow·stride + kj − pad` lies inside the image.
fn valid_cols(g: &Geom, kj: usize) -> std::ops::Range<usize> {
    // ow·s + kj ≥ pad  and  ow·s + kj − pad < w
    let lo = g.pad.saturating_sub(kj).div_ceil(g.stride);
    let hi = if g.w + g.pad > kj {
        (g.w + g.pad - kj).div_ceil(g.stride).min(g.wo)
    } else {
        0
    };
    lo..hi.max(lo)
}

/// The patch matrix of one image: `col[(c·k + ki)·k + kj][oh·Wo + ow]`.
fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &mut col[((c * g.k + ki) * g.k + kj) * hw..][..hw];
                let cols = valid_cols(g, kj);
                for oh in 0..g.ho {
                    let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                    let out = &mut row[oh * g.wo..(oh + 1) * g.wo];
                    if ih < 0 || ih >= g.h as isize || cols.is_empty() {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    out[..cols.start].fill(0.0);
                    out[cols.end..].fill(0.0);
                    let first = cols.start * g.stride + kj - g.pad;
                    if g.stride == 1 {
                        out[cols.clone()].copy_from_slice(&src[first..first + cols.len()]);
                    } else {
                        for (o, v) in out[cols.clone()]
                            .iter_mut()
                            .zip(src[first..].iter().step_by(g.stride))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the patch-matrix gradient back onto the image gradient (the adjoint of im2col).
fn col2im(g: &Geom, col: &[f32], dx: &mut [f32]) {
    let hw = g.hw_out();
    dx.fill(0.0);
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &col[((c * g.k + ki) * g.k + kj) * hw..][..hw];
                let cols = valid_cols(g, kj);
                if cols.is_empty() {
                    continue;
                }
                let first = cols.start * g.stride + kj - g.pad;
                for oh in 0..g.ho {
                    let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                    if ih < 0 || ih >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let src = &row[oh * g.wo + cols.start..oh * g.wo + cols.end];
                    for (d, v) in dst[first..].iter_mut().step_by(g.stride).zip(src) {
                        *d += *v;
                    }
                }
            }
        }
    }
}

/// `dst (m×n) = [dst +] a · b` for row-major matrices given by their strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: isize,
    a_cs: isize,
    b: &[f32],
    b_rs: isize,
    b_cs: isize,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element addressed by the given sizes and strides
    // (checked by the callers' shapes), and `dst` does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Images per parallel task: the batch split evenly over the threads.
fn chunk(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// A convolution's settings: zero padding, stride, and the CPU algorithm.
#[derive(Debug, Clone, Copy)]
struct Conv {
    pad: usize,
    stride: usize,
    path: ConvPath,
}

impl Conv {
    /// The geometry of this convolution of an input shaped `x` by a kernel shaped `w`.
    fn geom(&self, x: &[usize], w: &[usize]) -> candle_core::Result<Geom> {
        Geom::new(x, w, self.stride, self.pad)
    }
}

/// What a kernel adds to each output as it stores it: the bias of its channel and, if any,
/// the residual at its place.
#[derive(Clone, Copy)]
struct Addends<'a> {
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
}

/// What the forward pass does as it stores each output: add a bias per channel (zero when
/// `None`) and a residual (of the output's shape), then ReLU.
#[derive(Clone, Copy, Default)]
struct Store<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    relu: bool,
}

/// A kernel packed for the direct or the Winograd algorithm.
enum Packed {
    Direct(Isa, Vec<f32>),
    Winograd(Isa, Vec<f32>),
}

impl Packed {
    /// The kernel `w` (O×C×3×3) packed for `algo`; `None` for im2col.
    fn new(algo: Forward, w: &[f32], o: usize, c: usize) -> Option<Self> {
        match algo {
            Forward::Winograd(isa) => Some(Packed::Winograd(isa, winograd::pack(isa, w, o, c))),
            Forward::Direct(isa) => Some(Packed::Direct(isa, direct::pack(isa, w, o, c))),
            Forward::Im2col => None,
        }
    }
}

/// For each of `n` images of `x` (sizes as `p` says), `y` = conv(image, `kernel`) + `add`
/// [through ReLU, `p.relu`], by the direct or Winograd kernel, the batch split evenly over
/// the threads.
fn each_image(p: direct::Plane, n: usize, kernel: &Packed, x: &[f32], add: Addends) -> Vec<f32> {
    let (per, hw) = (chunk(n), p.out_pixels());
    let (in_len, out_len) = (p.c * p.h * p.w, p.o * hw);
    // SAFETY: chunk t holds the outputs of images t·per.., each written in full by the
    // direct or the Winograd kernel (both write every element of their output).
    unsafe {
        super::par_uninit(n * out_len, per * out_len, |t, ys| {
            let (mut xp, mut scratch) = (Vec::new(), winograd::Scratch::default());
            for (i, yi) in ys.chunks_mut(out_len).enumerate() {
                let img = t * per + i;
                let xi = &x[img * in_len..(img + 1) * in_len];
                let add = Addends {
                    residual: add.residual.map(|r| &r[img * out_len..(img + 1) * out_len]),
                    ..add
                };
                match kernel {
                    Packed::Direct(isa, wp) => direct::conv(*isa, p, xi, wp, add, &mut xp, yi),
                    Packed::Winograd(isa, up) => {
                        winograd::conv(*isa, p, xi, up, add, &mut scratch, yi)
                    }
                }
            }
        })
    }
}

/// `y = conv(x, w)`, each output stored as `store` says.
fn forward(g: &Geom, x: &[f32], w: &[f32], store: Store, algo: Forward) -> Vec<f32> {
    let Store {
        bias,
        residual,
        relu,
    } = store;
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0f32; g.o];
            &zeros
        }
    };
    let (ckk, hw) = (g.ckk(), g.hw_out());
    if let Some(kernel) = Packed::new(algo, w, g.o, g.c) {
        let plane = direct::Plane {
            h: g.h,
            w: g.w,
            c: g.c,
            o: g.o,
            stride: g.stride,
            relu,
        };
        return each_image(plane, g.n, &kernel, x, Addends { bias, residual });
    }
    let per = chunk(g.n);
    let mut y = vec![0f32; g.n * g.o * hw];
    y.par_chunks_mut(per * g.o * hw)
        .enumerate()
        .for_each(|(t, ys)| {
            let mut col = vec![0f32; ckk * hw];
            for (i, yi) in ys.chunks_mut(g.o * hw).enumerate() {
                let img = t * per + i;
                im2col(g, &x[img * g.in_len()..(img + 1) * g.in_len()], &mut col);
                for (row, &b) in yi.chunks_mut(hw).zip(bias) {
                    row.fill(b);
                }
                matmul(
                    g.o,
                    hw,
                    ckk,
                    yi,
                    true,
                    w,
                    ckk as isize,
                    1,
                    &col,
                    hw as isize,
                    1,
                );
                if let Some(r) = residual {
                    let ri = &r[img * g.o * hw..(img + 1) * g.o * hw];
                    for (v, &u) in yi.iter_mut().zip(ri) {
                        *v += u;
                    }
                }
                if relu {
                    for v in yi.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
            }
        });
    y
}

/// The 3×3 kernel `w` (O×C×3×3) with input and output channels swapped and the taps rotated
/// by 180° (C×O×3×3): the kernel whose stride-1, pad-1 convolution of the output gradient is
/// the input gradient.
fn transposed_rotated(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut wt = vec![0f32; c * o * 9];
    for (co, taps) in wt.chunks_exact_mut(9).enumerate() {
        let (ci, oi) = (co / o, co % o);
        for (t, v) in taps.iter_mut().enumerate() {
            *v = w[(oi * c + ci) * 9 + 8 - t];
        }
    }
    wt
}

fn grad_input(g: &Geom, dy: &[f32], w: &[f32], algo: Forward) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    // Stride 1, pad 1: dx is the convolution of dy with the transposed, rotated kernel
    // ([`ConvPath::input_grad`] chose its algorithm). (A stride-2 input gradient is a
    // transposed convolution: im2col's col2im does it.)
    let kernel = match algo {
        Forward::Im2col => None,
        _ => Packed::new(algo, &transposed_rotated(w, g.o, g.c), g.c, g.o),
    };
    if let Some(kernel) = kernel {
        debug_assert_eq!(
            g.stride, 1,
            "ConvPath::input_grad takes im2col for stride 2"
        );
        let plane = direct::Plane {
            h: g.h,
            w: g.w,
            c: g.o,
            o: g.c,
            stride: 1,
            relu: false,
        };
        let zeros = vec![0f32; g.c];
        let add = Addends {
            bias: &zeros,
            residual: None,
        };
        return each_image(plane, g.n, &kernel, dy, add);
    }
    let per = chunk(g.n);
    let mut dx = vec![0f32; g.n * g.in_len()];
    dx.par_chunks_mut(per * g.in_len())
        .enumerate()
        .for_each(|(t, dxs)| {
            let mut dcol = vec![0f32; ckk * hw];
            for (i, dxi) in dxs.chunks_mut(g.in_len()).enumerate() {
                let img = t * per + i;
                let dyi = &dy[img * g.o * hw..(img + 1) * g.o * hw];
                // dcol (ckk × hw) = Wᵀ (ckk × o) · dy (o × hw)
                matmul(
                    ckk,
                    hw,
                    g.o,
                    &mut dcol,
                    false,
                    w,
                    1,
                    ckk as isize,
                    dyi,
                    hw as isize,
                    1,
                );
                col2im(g, &dcol, dxi);
            }
        });
    dx
}

/// The weight gradient is summed over the batch in this many parts, whatever the number of
/// threads, so that its bits (and a training run's) do not depend on the machine's cores.
const WEIGHT_GRAD_PARTS: usize = 2;

fn grad_weight(g: &Geom, x: &[f32], dy: &[f32], isa: Option<Isa>) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let per = g.n.div_ceil(WEIGHT_GRAD_PARTS).max(1);
    let tasks = g.n.div_ceil(per);
    if let Some(isa) = isa {
        let plane = direct::Plane {
            h: g.h,
            w: g.w,
            c: g.c,
            o: g.o,
            stride: g.stride,
            relu: false,
        };
        let partial: Vec<Vec<f32>> = (0..tasks)
            .into_par_iter()
            .map(|t| {
                let imgs = t * per..((t + 1) * per).min(g.n);
                let mut dw = vec![0f32; g.o * ckk];
                let mut xp = Vec::new();
                let xs = &x[imgs.start * g.in_len()..imgs.end * g.in_len()];
                let dys = &dy[imgs.start * g.o * hw..imgs.end * g.o * hw];
                direct::grad_weight(isa, plane, xs, dys, &mut xp, &mut dw);
                dw
            })
            .collect();
        return sum(partial, g.o * ckk);
    }
    let partial: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut dw = vec![0f32; g.o * ckk];
            let mut col = vec![0f32; ckk * hw];
            for img in t * per..((t + 1) * per).min(g.n) {
                im2col(g, &x[img * g.in_len()..(img + 1) * g.in_len()], &mut col);
                let dyi = &dy[img * g.o * hw..(img + 1) * g.o * hw];
                // dW (o × ckk) += dy (o × hw) · colᵀ (hw × ckk)
                matmul(
                    g.o,
                    ckk,
                    hw,
                    &mut dw,
                    true,
                    dyi,
                    hw as isize,
                    1,
                    &col,
                    1,
                    hw as isize,
                );
            }
            dw
        })
        .collect();
    sum(partial, g.o * ckk)
}

/// The element-wise sum of the threads' partial weight gradients.
fn sum(partial: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut dw = vec![0f32; len];
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// The forward op: `(x, w) -> y`.
struct Conv2dOp {
    conv: Conv,
}

/// `(dy, w) -> dx` for an input of shape `in_shape`.
struct GradInputOp {
    conv: Conv,
    in_shape: [usize; 4],
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
        let algo = self.conv.path.forward(&g)?;
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        let y = forward(&g, x, w, Store::default(), algo);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        grads(self.conv, x, w, &grad.contiguous()?)
    }
}

/// The input and weight gradients of a convolution, each only where its operand is tracked.
fn grads(
    conv: Conv,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if x.track_op() {
        let d = x.dims();
        let op = GradInputOp {
            conv,
            in_shape: [d[0], d[1], d[2], d[3]],
        };
        Some(grad.apply_op2_no_bwd(&w.contiguous()?, &op)?)
    } else {
        None
    };
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

/// The forward op with a bias per output channel: `(x, w, b) -> y`, optionally through ReLU.
struct Conv2dBiasOp {
    conv: Conv,
    relu: bool,
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
        let algo = self.conv.path.forward(&g)?;
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        let store = Store {
            bias: Some(bias),
            residual: None,
            relu: self.relu,
        };
        let y = forward(&g, x, w, store, algo);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu {
            // y = max(s, 0): y > 0 exactly where s > 0.
            super::IntervalGrad::POSITIVE.apply(res, grad)?
        } else {
            grad.contiguous()?
        };
        let (dx, dw) = grads(self.conv, x, w, &grad)?;
        let db = if b.track_op() {
            Some(grad.sum((0, 2, 3))?)
        } else {
            None
        };
        Ok((dx, dw, db))
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
        let g = self.conv.geom(&self.in_shape, l2.dims())?;
        if l1.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d grad: output gradient shape {:?}", l1.dims());
        }
        let algo = self.conv.path.input_grad(&g)?;
        let dx = grad_input(
            &g,
            slice(s1, l1, "gradient")?,
            slice(s2, l2, "kernel")?,
            algo,
        );
        Ok((CpuStorage::F32(dx), Shape::from(self.in_shape.to_vec())))
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
        let isa = self.conv.path.resolve(&g)?;
        let dw = grad_weight(&g, slice(s1, l1, "input")?, slice(s2, l2, "gradient")?, isa);
        Ok((CpuStorage::F32(dw), Shape::from(self.w_shape.to_vec())))
    }
}

/// Convolution of `x` (N×C×H×W) with `w` (O×C×k×k), zero padding `pad`, stride `stride`.
/// On the CPU with f32 tensors: our kernels ([`ConvPath::Auto`]) with their own gradients;
/// elsewhere (CUDA, other dtypes): candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> candle_core::Result<Tensor> {
    conv2d_with(x, w, pad, stride, ConvPath::Auto)
}

/// [`conv2d`] with the CPU algorithm chosen by `path` (tests and benchmarks compare them).
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    path: ConvPath,
) -> candle_core::Result<Tensor> {
    if ours(x, w) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv2dOp {
                conv: Conv { pad, stride, path },
            },
        )
    } else {
        x.conv2d(w, pad, stride, 1, 1)
    }
}

/// The forward op of a residual block's last convolution in evaluation mode:
/// `(x, w, r) -> relu(conv(x, w) + bias + r)`, the bias per output channel held as data (it
/// takes no gradient).
struct Conv2dResidualReluOp {
    conv: Conv,
    bias: Vec<f32>,
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
        let algo = self.conv.path.forward(&g)?;
        let (x, w) = (slice(s1, l1, "input")?, slice(s2, l2, "kernel")?);
        let r = slice(s3, l3, "residual")?;
        let store = Store {
            bias: Some(&self.bias),
            residual: Some(r),
            relu: true,
        };
        let y = forward(&g, x, w, store, algo);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
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
        let grad = super::IntervalGrad::POSITIVE.apply(res, grad)?;
        let (dx, dw) = grads(self.conv, x, w, &grad)?;
        Ok((dx, dw, r.track_op().then_some(grad)))
    }
}

/// `conv2d(x, w) + b` with `b` (length O) added per output channel, on the CPU inside the
/// kernel (each output starts from its bias: no extra pass over the output). BatchNorm in
/// evaluation mode folds into it: `conv(x, w)·a + b = conv(x, w·a) + b`.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_bias_with(x, w, b, pad, stride, ConvPath::Auto)
}

/// [`conv2d_bias`] with the CPU algorithm chosen by `path`.
pub fn conv2d_bias_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    pad: usize,
    stride: usize,
    path: ConvPath,
) -> candle_core::Result<Tensor> {
    bias_op(x, w, b, Conv { pad, stride, path }, false)
}

/// `relu(conv2d(x, w) + b)`, the ReLU applied as the kernel stores each output (on the CPU;
/// candle's ops elsewhere). Same values and gradients as the three ops in a row.
pub fn conv2d_bias_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_bias_relu_with(x, w, b, pad, stride, ConvPath::Auto)
}

/// [`conv2d_bias_relu`] with the CPU algorithm chosen by `path`.
pub fn conv2d_bias_relu_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    pad: usize,
    stride: usize,
    path: ConvPath,
) -> candle_core::Result<Tensor> {
    bias_op(x, w, b, Conv { pad, stride, path }, true)
}

/// Whether our CPU kernels take a convolution of `x` by `w` (else candle's ops).
fn ours(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == x.dtype()
}

/// `conv2d(x, w) + b`, through ReLU when `relu`: our op on the CPU, candle's ops elsewhere.
fn bias_op(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    conv: Conv,
    relu: bool,
) -> candle_core::Result<Tensor> {
    if ours(x, w) {
        let op = Conv2dBiasOp { conv, relu };
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op);
    }
    let o = b.dim(0)?;
    let y = x
        .conv2d(w, conv.pad, conv.stride, 1, 1)?
        .broadcast_add(&b.reshape((1, o, 1, 1))?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `relu(conv2d(x, w) + b + r)`: a residual block's last convolution, its (folded)
/// BatchNorm shift `b`, the shortcut `r` and the ReLU, the sum and the ReLU applied as the
/// kernel stores each output (CPU, f32, `b` not tracked); otherwise [`conv2d_bias`] followed
/// by [`super::add_relu`]. Same values and gradients either way.
pub fn conv2d_bias_add_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_bias_add_relu_with(x, w, b, r, pad, stride, ConvPath::Auto)
}

/// [`conv2d_bias_add_relu`] with the CPU algorithm chosen by `path`.
pub fn conv2d_bias_add_relu_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    pad: usize,
    stride: usize,
    path: ConvPath,
) -> candle_core::Result<Tensor> {
    if ours(x, w) && [r.dtype(), b.dtype()] == [x.dtype(); 2] && !b.track_op() {
        let op = Conv2dResidualReluOp {
            conv: Conv { pad, stride, path },
            bias: b.to_vec1::<f32>()?,
        };
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &r.contiguous()?, op)
    } else {
        super::add_relu(&conv2d_bias_with(x, w, b, pad, stride, path)?, r)
    }
}
