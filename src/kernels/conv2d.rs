//! 2-D convolution (NCHW, f32, square kernel, zero padding, no groups or dilation) on the
//! CPU, forward and both gradients, by one of three algorithms ([`ConvPath`]):
//!
//! - Winograd (`winograd.rs`), the forward pass and both gradients: 3×3, pad 1, stride 1,
//!   an even height and a width that is a multiple of 8 — every stride-1 convolution of
//!   ResNet-20 but the 3-channel stem, where [`ConvPath::Auto`] keeps the direct kernel.
//!   F(4×4, 3×3) where the height is a multiple of 8 and the width of 16 (4× fewer
//!   multiply-adds than the direct kernel), else F(2×2, 3×3) (2.25× fewer); the same result
//!   within f32 rounding.
//! - direct (`direct.rs`): 3×3, pad 1, stride 1 or 2, output width a multiple of 8 — every
//!   ResNet-20 convolution. Register tiles of output channels × 8-wide output vectors
//!   (AVX-512VL or AVX2 + FMA); the stride-1 input gradient is the same kernel on the
//!   transposed, rotated weights; the weight gradient has its own tiles (channels × 9 taps)
//!   and serves the shapes Winograd does not take (stride 2, the stem).
//! - im2col + GEMM (`im2col.rs`): every other shape.
//!
//! This file chooses the algorithm and splits the batch over rayon's threads; `ops.rs`
//! wraps the passes as candle ops with their gradients; the public functions below pick
//! our ops on the CPU and candle's elsewhere.

use candle_core::Tensor;
use rayon::prelude::*;

mod direct;
mod im2col;
mod ops;
mod winograd;

use ops::{Conv2dBiasOp, Conv2dOp, Conv2dResidualReluOp};

use super::ResidualLink;

pub use direct::Isa;

/// The best instruction set this machine runs for the SIMD kernels, if any.
pub(crate) fn direct_isa() -> Option<Isa> {
    direct::best()
}

/// Which CPU algorithm computes a convolution and its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvPath {
    /// The fastest this machine and shape allow (AVX-512VL, else AVX2 + FMA, else im2col):
    /// the forward pass by Winograd (F(4×4, 3×3) or F(2×2, 3×3), as the shape allows: module
    /// docs) for 3×3, pad-1, stride-1 convolutions with
    /// an even height, a width that is a multiple of 8 and at least 8 input channels, else
    /// by the direct kernel for 3×3, pad-1 convolutions with stride 1 and a width that is a
    /// multiple of 8, or stride 2, an even height and a width that is a multiple of 16, else
    /// im2col. The input gradient of a stride-1 convolution is the forward pass of another
    /// (the output gradient with the transposed, rotated kernel: at least 8 *output*
    /// channels for Winograd) and takes the same choice; that of a stride-2 convolution is
    /// im2col's. The weight gradient: Winograd where the forward pass takes it, else the
    /// direct kernel where it fits, else im2col.
    #[default]
    Auto,
    /// im2col + GEMM for every shape.
    Im2col,
    /// The direct kernel with the given instruction set (the input gradient of a stride-2
    /// convolution excepted); an error where the shape or the machine does not allow it.
    Direct(Isa),
    /// The forward pass and both gradients (the input gradient is a stride-1 convolution of
    /// the output gradient) by Winograd (module docs) with the given instruction set; an error
    /// where the shape or the machine does not allow it.
    Winograd(Isa),
}

/// The fewest input channels for which [`ConvPath::Auto`] takes Winograd: its transforms
/// cost per channel what its products save per channel pair, so with few input channels the
/// direct kernel is faster (ResNet-20's 3-channel stem on this project's 2-core AVX-512
/// machine: direct 176, Winograd 142 GFLOP/s-equivalent; 16 channels: 190 vs 257; the
/// `conv/` benchmarks).
const WINOGRAD_MIN_CHANNELS: usize = 8;

/// The algorithm of one pass: the forward, the input gradient or the weight gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
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
    fn forward(self, g: &Geom) -> candle_core::Result<Algo> {
        match self {
            ConvPath::Auto => Ok(match direct::best() {
                Some(isa) if winograd::fits(g) && g.c >= WINOGRAD_MIN_CHANNELS => {
                    Algo::Winograd(isa)
                }
                Some(isa) if direct::fits(g) => Algo::Direct(isa),
                _ => Algo::Im2col,
            }),
            ConvPath::Winograd(isa) => {
                if !winograd::fits(g) {
                    candle_core::bail!("conv2d: the Winograd path does not take {g:?}")
                }
                checked(isa).map(Algo::Winograd)
            }
            path => Ok(path.resolve(g)?.map_or(Algo::Im2col, Algo::Direct)),
        }
    }

    /// The weight gradient's algorithm for `g`: that of the forward pass (with few input
    /// channels the direct kernel's weight gradient is as fast: the stem's training step
    /// took the same time either way).
    fn weight_grad(self, g: &Geom) -> candle_core::Result<Algo> {
        self.forward(g)
    }

    /// The input gradient's algorithm for `g`: for stride 1, that of the forward pass of the
    /// convolution it is (the output gradient, the kernel transposed and rotated: input and
    /// output channels swapped); for stride 2, im2col.
    fn input_grad(self, g: &Geom) -> candle_core::Result<Algo> {
        if g.stride != 1 {
            self.resolve(g)?;
            return Ok(Algo::Im2col);
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
    /// The direct and Winograd kernels' view of one image, through ReLU when `relu`.
    fn plane(&self, relu: bool) -> direct::Plane {
        direct::Plane {
            h: self.h,
            w: self.w,
            c: self.c,
            o: self.o,
            stride: self.stride,
            relu,
        }
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
    /// The kernel `w` (O×C×3×3) packed for `algo` on `h`×`w` images; `None` for im2col.
    fn new(algo: Algo, w: &[f32], o: usize, c: usize, [ih, iw]: [usize; 2]) -> Option<Self> {
        match algo {
            Algo::Winograd(isa) => {
                let tiling = winograd::Tiling::of(ih, iw);
                Some(Packed::Winograd(isa, winograd::pack(isa, tiling, w, o, c)))
            }
            Algo::Direct(isa) => Some(Packed::Direct(isa, direct::pack(isa, w, o, c))),
            Algo::Im2col => None,
        }
    }
}

/// For each of `n` images of `x` (sizes as `p` says), `y` = conv(image, `kernel`) + `add`
/// [through ReLU, `p.relu`], by the direct or Winograd kernel, the batch split evenly over
/// the threads. With `relu_out` (of `x`'s shape), each image of `x` is masked where it is
/// not positive, as the gradient through the ReLU whose output it is: inside the Winograd
/// F(4×4, 3×3) input transform, else first (one image at a time, in the cache, instead of a
/// pass over the whole batch).
fn each_image(
    p: direct::Plane,
    n: usize,
    kernel: &Packed,
    x: &[f32],
    relu_out: Option<&[f32]>,
    add: Addends,
) -> Vec<f32> {
    let (per, hw) = (chunk(n), p.out_pixels());
    let (in_len, out_len) = (p.c * p.h * p.w, p.o * hw);
    // The Winograd F(4×4, 3×3) input transform applies the mask as it reads each image.
    let inside = matches!(kernel, Packed::Winograd(..)) && winograd::masks_inside(p.h, p.w);
    // SAFETY: chunk t holds the outputs of images t·per.., each written in full by the
    // direct or the Winograd kernel (both write every element of their output).
    unsafe {
        super::par_uninit(n * out_len, per * out_len, |t, ys| {
            let (mut xp, mut scratch, mut masked) =
                (Vec::new(), winograd::Scratch::default(), Vec::new());
            for (i, yi) in ys.chunks_mut(out_len).enumerate() {
                let img = t * per + i;
                let mut xi = &x[img * in_len..(img + 1) * in_len];
                let mut mask = None;
                if let Some(r) = relu_out {
                    let ri = &r[img * in_len..(img + 1) * in_len];
                    if inside {
                        mask = Some(ri);
                    } else {
                        super::IntervalGrad::POSITIVE.apply_into(ri, xi, &mut masked);
                        xi = &masked;
                    }
                }
                let add = Addends {
                    residual: add.residual.map(|r| &r[img * out_len..(img + 1) * out_len]),
                    ..add
                };
                match kernel {
                    Packed::Direct(isa, wp) => direct::conv(*isa, p, xi, wp, add, &mut xp, yi),
                    Packed::Winograd(isa, up) => {
                        winograd::conv(*isa, p, xi, mask, up, add, &mut scratch, yi)
                    }
                }
            }
        })
    }
}

/// `y = conv(x, w)`, each output stored as `store` says.
fn forward(g: &Geom, x: &[f32], w: &[f32], store: Store, algo: Algo) -> Vec<f32> {
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
    let add = Addends { bias, residual };
    if let Some(kernel) = Packed::new(algo, w, g.o, g.c, [g.h, g.w]) {
        return each_image(g.plane(relu), g.n, &kernel, x, None, add);
    }
    im2col::forward(g, x, w, add, relu)
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

/// The input gradient: of `dy`, or with `relu_out` of dy·[relu_out > 0] (the gradient
/// through the ReLU that made the forward output `relu_out`), plus `shortcut` (of the
/// input's shape) where given.
fn grad_input(
    g: &Geom,
    dy: &[f32],
    w: &[f32],
    relu_out: Option<&[f32]>,
    shortcut: Option<&[f32]>,
    algo: Algo,
) -> Vec<f32> {
    // Stride 1, pad 1: dx is the convolution of dy with the transposed, rotated kernel
    // ([`ConvPath::input_grad`] chose its algorithm). (A stride-2 input gradient is a
    // transposed convolution: im2col's col2im does it.)
    let kernel = match algo {
        Algo::Im2col => None,
        _ => Packed::new(algo, &transposed_rotated(w, g.o, g.c), g.c, g.o, [g.h, g.w]),
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
            residual: shortcut,
        };
        return each_image(plane, g.n, &kernel, dy, relu_out, add);
    }
    let mut dx = match relu_out {
        Some(r) => im2col::grad_input(g, &super::IntervalGrad::POSITIVE.apply_slices(r, dy), w),
        None => im2col::grad_input(g, dy, w),
    };
    if let Some(r) = shortcut {
        dx.par_iter_mut().zip(r).for_each(|(d, &r)| *d += r);
    }
    dx
}

/// The weight gradient is summed over the batch in this many parts, whatever the number of
/// threads, so that its bits (and a training run's) do not depend on the machine's cores.
const WEIGHT_GRAD_PARTS: usize = 2;

fn grad_weight(g: &Geom, x: &[f32], dy: &[f32], algo: Algo) -> Vec<f32> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let per = g.n.div_ceil(WEIGHT_GRAD_PARTS).max(1);
    let plane = g.plane(false);
    let partial: Vec<Vec<f32>> = (0..g.n.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let imgs = t * per..((t + 1) * per).min(g.n);
            let xs = &x[imgs.start * g.in_len()..imgs.end * g.in_len()];
            let dys = &dy[imgs.start * g.o * hw..imgs.end * g.o * hw];
            match algo {
                Algo::Im2col => im2col::grad_weight(g, x, dy, imgs),
                Algo::Direct(isa) => {
                    let mut dw = vec![0f32; g.o * ckk];
                    direct::grad_weight(isa, plane, xs, dys, &mut Vec::new(), &mut dw);
                    dw
                }
                Algo::Winograd(isa) => {
                    let mut dw = vec![0f32; g.o * ckk];
                    let mut scratch = winograd::GradScratch::default();
                    winograd::grad_weight(isa, plane, xs, dys, &mut scratch, &mut dw);
                    dw
                }
            }
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
                link: None,
            },
        )
    } else {
        x.conv2d(w, pad, stride, 1, 1)
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
        let op = Conv2dBiasOp {
            conv,
            relu,
            link: None,
        };
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

/// A residual block's first convolution, `conv2d(x, w)` [+ `bias` per output channel]
/// [through ReLU, `relu`, which needs the bias], whose input gradient also carries the
/// shortcut's gradient that the block's end leaves in `link` (see [`ResidualLink`]); the
/// same values and gradients as [`conv2d`], [`conv2d_bias`] or [`conv2d_bias_relu`] with
/// candle summing the two gradients of `x`.
pub fn conv2d_block_start(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    (pad, stride): (usize, usize),
    link: &ResidualLink,
) -> candle_core::Result<Tensor> {
    let conv = Conv {
        pad,
        stride,
        path: ConvPath::Auto,
    };
    if relu && bias.is_none() {
        candle_core::bail!("conv2d: a ReLU in the store needs a bias");
    }
    if !ours(x, w) {
        link.bypass();
        return match bias {
            Some(b) => bias_op(x, w, b, conv, relu),
            None => x.conv2d(w, pad, stride, 1, 1),
        };
    }
    let (x, w, link) = (x.contiguous()?, w.contiguous()?, Some(link.clone()));
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dBiasOp { conv, relu, link }),
        None => x.apply_op2(&w, Conv2dOp { conv, link }),
    }
}

/// `relu(conv2d(x, w) + b + r)`: a residual block's last convolution, its (folded)
/// BatchNorm shift `b`, the shortcut `r` and the ReLU, the sum and the ReLU applied as the
/// kernel stores each output (CPU, f32, `b` not tracked); otherwise [`conv2d_bias`] followed
/// by [`super::add_relu`]. Same values and gradients either way. With `link`, the
/// shortcut's gradient goes to the block's first convolution ([`conv2d_block_start`]).
pub fn conv2d_bias_add_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    link: Option<&ResidualLink>,
    (pad, stride): (usize, usize),
) -> candle_core::Result<Tensor> {
    conv2d_bias_add_relu_with(x, w, b, r, link, (pad, stride), ConvPath::Auto)
}

/// [`conv2d_bias_add_relu`] with the CPU algorithm chosen by `path`.
pub fn conv2d_bias_add_relu_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    link: Option<&ResidualLink>,
    (pad, stride): (usize, usize),
    path: ConvPath,
) -> candle_core::Result<Tensor> {
    if ours(x, w) && [r.dtype(), b.dtype()] == [x.dtype(); 2] && !b.track_op() {
        let op = Conv2dResidualReluOp {
            conv: Conv { pad, stride, path },
            bias: b.to_vec1::<f32>()?,
            link: link.cloned(),
        };
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &r.contiguous()?, op)
    } else {
        if let Some(link) = link {
            link.bypass();
        }
        super::add_relu(&conv2d_bias_with(x, w, b, pad, stride, path)?, r)
    }
}
