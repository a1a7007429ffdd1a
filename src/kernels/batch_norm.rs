//! BatchNorm and ReLU on the CPU as fused custom ops (f32, NCHW), each with its backward.
//!
//! Written with candle's elementwise ops, BatchNorm in training mode takes a dozen passes
//! over the activations and as many fresh allocations, with reductions over the batch and
//! spatial dimensions on candle's generic strided path; here it is three passes forward (two
//! for the statistics) and two backward.
//!
//! - [`batch_norm_train`]: `y = (x − μ_B)·γ/√(σ²_B + ε) + β` with batch statistics (biased
//!   variance), gradients for x, γ and β:
//!   `dx = γ·inv · (dy − Σdy/M − x̂·Σ(dy·x̂)/M)`, `dγ = Σ(dy·x̂)`, `dβ = Σdy`
//!   (M = N·H·W per channel, x̂ the normalized input). The batch statistics are computed
//!   once (and returned for the running statistics); the backward pass is one op.
//! - [`batch_norm_relu_train`]: the same followed by a ReLU in one op; its backward masks
//!   dy by the output inside the two passes above.
//! - [`channel_stats`]: per-channel mean and biased variance (for running statistics).
//! - [`channel_affine`]: `y = x·a_c + b_c` (BatchNorm in evaluation mode as its own op; the
//!   model folds it into the convolution instead, `kernels::conv2d_bias`), gradients for x,
//!   and for a and b only when they are tracked.
//! - [`relu`]: `max(x, 0)`, gradient `dy·[x > 0]`; [`add_relu`]: `max(a + b, 0)` (a residual
//!   sum and its ReLU), gradient `dy·[a + b > 0]` for both; [`add`]: a residual sum `a + r`
//!   (before another activation), r's gradient optionally through a
//!   [`super::ResidualLink`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

use super::{slice, ResidualLink};

/// (N, C, H·W) of an NCHW layout.
fn nchw(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        d => candle_core::bail!("batch-norm: expected N×C×H×W, got {d:?}"),
    }
}

/// A sum in f64 over eight independent lanes, so that the compiler vectorizes it (one f64
/// accumulator would make every add wait for the previous one), carried from one plane of a
/// channel to the next: element 8k + j of each plane goes to lane j, the elements after the
/// plane's last whole group of eight to `tail`, and the lanes meet once per channel.
#[derive(Clone, Copy, Default)]
struct Lanes {
    v: [f64; 8],
    tail: f64,
}

impl Lanes {
    fn total(&self) -> f64 {
        self.v.iter().sum::<f64>() + self.tail
    }
}

/// Adds f(xᵢ) of a plane to `acc` (see [`Lanes`]).
#[inline(always)]
fn lane_sum(xs: &[f32], acc: &mut Lanes, f: impl Fn(f32) -> f64) {
    let (chunks, rest) = xs.as_chunks::<8>();
    for &v in rest {
        acc.tail += f(v);
    }
    for ch in chunks {
        for (a, &v) in acc.v.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
}

/// Which code sums BatchNorm's statistics and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BnPath {
    /// Explicit AVX-512 where the machine runs it, else [`BnPath::Portable`].
    #[default]
    Auto,
    /// The portable loops (vectorized by the compiler at the machine's width). The same
    /// per-lane operations in the same order as the explicit code: the same bits.
    Portable,
}

impl BnPath {
    /// Whether the explicit AVX-512 code runs (asked once per op, not per plane).
    fn avx512(self) -> bool {
        self == BnPath::Auto && super::conv2d::direct_isa() == Some(super::Isa::Avx512)
    }
}

/// Where a plane's gradient passes the ReLU after BatchNorm: where the op's output `y` is
/// positive, or where the forward pass's affine map `x·a + b` was (the same test on the
/// same value: `y = max(x·a + b, 0)`, without reading y).
#[derive(Clone, Copy)]
enum Mask<'a> {
    Output(&'a [f32]),
    Affine(f32, f32),
}

impl<'a> Mask<'a> {
    /// The mask of the last `len` elements of the plane.
    fn tail(self, len: usize) -> Self {
        match self {
            Mask::Output(y) => Mask::Output(&y[y.len() - len..]),
            affine => affine,
        }
    }
}

/// Adds gᵢ and gᵢ·(xᵢ − μ) of a plane to `acc` (in f64 over eight lanes, see [`Lanes`]),
/// with gᵢ taken as 0 where `mask`, when given, says the ReLU was not passed (the ReLU's
/// gradient folded in: the same values its backward pass would have written).
fn lane_sums2(
    g: &[f32],
    x: &[f32],
    mask: Option<Mask>,
    mu: f32,
    avx512: bool,
    acc: &mut [Lanes; 2],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        let (gc, gr) = g.as_chunks::<8>();
        let (xc, xr) = x.as_chunks::<8>();
        let [s, sx] = acc;
        // SAFETY: the machine runs AVX-512F (`BnPath::avx512`); the chunks have equal
        // lengths (g, x and y are planes of one shape).
        unsafe { x86::sums2_avx512(gc, xc, mask, mu, [&mut s.v, &mut sx.v]) };
        lane_sums2_portable(gr, xr, mask.map(|m| m.tail(gr.len())), mu, acc);
        return;
    }
    let _ = avx512;
    lane_sums2_portable(g, x, mask, mu, acc)
}

/// Adds the xᵢ of a plane to `acc` (see [`Lanes`]).
fn plane_sum(xs: &[f32], avx512: bool, acc: &mut Lanes) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        let (c, r) = xs.as_chunks::<8>();
        // SAFETY: the machine runs AVX-512F (`BnPath::avx512`).
        unsafe { x86::sum_avx512(c, None, &mut acc.v) };
        return plane_sum_portable(r, acc);
    }
    let _ = avx512;
    plane_sum_portable(xs, acc)
}

/// Adds the (xᵢ − μ)² of a plane to `acc` (see [`Lanes`]).
fn plane_sq_dev(xs: &[f32], mu: f64, avx512: bool, acc: &mut Lanes) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        let (c, r) = xs.as_chunks::<8>();
        // SAFETY: the machine runs AVX-512F (`BnPath::avx512`).
        unsafe { x86::sum_avx512(c, Some(mu), &mut acc.v) };
        return plane_sq_dev_portable(r, mu, acc);
    }
    let _ = avx512;
    plane_sq_dev_portable(xs, mu, acc)
}

/// Eight f64 lanes in one AVX-512 register, fed eight f32 at a time: per lane the portable
/// code's operations in its order (f32 products, widened, added), hence its bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Adds to the lane sums `acc` those of g (masked to 0 where `mask`, when given, is not
    /// positive) and of g·(x − μ).
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn sums2_avx512(
        g: &[[f32; 8]],
        x: &[[f32; 8]],
        mask: Option<super::Mask>,
        mu: f32,
        acc: [&mut [f64; 8]; 2],
    ) {
        let [sa, sxa] = acc;
        let (mut s, mut sx) = (_mm512_loadu_pd(sa.as_ptr()), _mm512_loadu_pd(sxa.as_ptr()));
        let muv = _mm256_set1_ps(mu);
        let n = g.len().min(x.len());
        if let Some(super::Mask::Output(y)) = mask {
            assert!(y.len() >= 8 * n);
        }
        for i in 0..n {
            let mut gv = _mm256_loadu_ps(g[i].as_ptr());
            let xv = _mm256_loadu_ps(x[i].as_ptr());
            // The ReLU passed where its input was positive (x·a + b, multiplied then added
            // as the forward pass did) or, the same, where its output is.
            let before = match mask {
                None => None,
                Some(super::Mask::Output(y)) => Some(_mm256_loadu_ps(y.as_ptr().add(8 * i))),
                Some(super::Mask::Affine(a, b)) => Some(_mm256_add_ps(
                    _mm256_mul_ps(xv, _mm256_set1_ps(a)),
                    _mm256_set1_ps(b),
                )),
            };
            if let Some(v) = before {
                let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps());
                gv = _mm256_and_ps(pos, gv);
            }
            let gx = _mm256_mul_ps(gv, _mm256_sub_ps(xv, muv));
            s = _mm512_add_pd(s, _mm512_cvtps_pd(gv));
            sx = _mm512_add_pd(sx, _mm512_cvtps_pd(gx));
        }
        _mm512_storeu_pd(sa.as_mut_ptr(), s);
        _mm512_storeu_pd(sxa.as_mut_ptr(), sx);
    }

    /// Adds to the lane sums `lanes` those of x, or with `mu` of (x − μ)² (in f64).
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn sum_avx512(x: &[[f32; 8]], mu: Option<f64>, lanes: &mut [f64; 8]) {
        let mut acc = _mm512_loadu_pd(lanes.as_ptr());
        match mu {
            None => {
                for c in x {
                    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr())));
                }
            }
            Some(mu) => {
                let muv = _mm512_set1_pd(mu);
                for c in x {
                    let d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr())), muv);
                    acc = _mm512_add_pd(acc, _mm512_mul_pd(d, d));
                }
            }
        }
        _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
    }
}

super::multiversion! {
    fn lane_sums2_portable(
        g: &[f32],
        x: &[f32],
        mask: Option<Mask>,
        mu: f32,
        acc: &mut [Lanes; 2],
    ) {
        match mask {
            // The mask slice is not read without a ReLU.
            None => lane_sums2_with(g, x, g, mu, acc, |_, v| v),
            Some(Mask::Output(y)) => lane_sums2_with(g, x, y, mu, acc, relu_grad),
            Some(Mask::Affine(a, b)) => {
                lane_sums2_with(g, x, x, mu, acc, |v, g| relu_grad(v * a + b, g))
            }
        }
    }
}

super::multiversion! {
    fn plane_sum_portable(xs: &[f32], acc: &mut Lanes) {
        lane_sum(xs, acc, |v| v as f64)
    }
}

super::multiversion! {
    fn plane_sq_dev_portable(xs: &[f32], mu: f64, acc: &mut Lanes) {
        lane_sum(xs, acc, |v| (v as f64 - mu).powi(2))
    }
}

super::multiversion! {
    /// BatchNorm's input gradient on a plane: `o = k·(g − a − x̂·b)` with x̂ = (x − μ)·inv,
    /// g = dy masked as `mask` says when given; `coeffs` = [k, a, b, μ, inv].
    fn dx_plane(
        o: &mut [std::mem::MaybeUninit<f32>],
        xs: &[f32],
        gs: &[f32],
        mask: Option<Mask>,
        coeffs: [f32; 5],
    ) {
        let [k, a, b, mu, inv] = coeffs;
        let dx = |o: &mut std::mem::MaybeUninit<f32>, v: f32, g: f32| {
            let xhat = (v - mu) * inv;
            o.write(k * (g - a - xhat * b));
        };
        match mask {
            None => {
                for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
                    dx(o, v, g);
                }
            }
            Some(Mask::Output(y)) => {
                for (((o, &v), &g), &y) in o.iter_mut().zip(xs).zip(gs).zip(y) {
                    dx(o, v, relu_grad(y, g));
                }
            }
            Some(Mask::Affine(sa, sb)) => {
                for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
                    dx(o, v, relu_grad(v * sa + sb, g));
                }
            }
        }
    }
}

super::multiversion! {
    /// `o = x·s + t` on a plane, and its ReLU with `relu`.
    fn affine_plane(o: &mut [std::mem::MaybeUninit<f32>], xs: &[f32], s: f32, t: f32, relu: bool) {
        if relu {
            for (o, &v) in o.iter_mut().zip(xs) {
                o.write((v * s + t).max(0.0));
            }
        } else {
            for (o, &v) in o.iter_mut().zip(xs) {
                o.write(v * s + t);
            }
        }
    }
}

super::multiversion! {
    /// `o = max((x·s + t) + r, 0)` on a plane: BatchNorm's output, a residual added and the
    /// ReLU, in the order (and to the bits) of the three in a row.
    fn affine_add_relu_plane(
        o: &mut [std::mem::MaybeUninit<f32>],
        xs: &[f32],
        rs: &[f32],
        s: f32,
        t: f32,
    ) {
        for ((o, &v), &r) in o.iter_mut().zip(xs).zip(rs) {
            o.write(((v * s + t) + r).max(0.0));
        }
    }
}

/// ReLU's gradient at output `y`: `dy` where `y > 0`, else 0 (the select of
/// [`super::IntervalGrad::POSITIVE`], which the unfused ReLU's backward pass runs).
#[inline(always)]
fn relu_grad(y: f32, dy: f32) -> f32 {
    if super::IntervalGrad::POSITIVE.inside(y) {
        dy
    } else {
        0.0
    }
}

/// [`lane_sums2`] of gᵢ = `f(mᵢ, gᵢ)`.
#[inline(always)]
fn lane_sums2_with(
    g: &[f32],
    x: &[f32],
    m: &[f32],
    mu: f32,
    [s, sx]: &mut [Lanes; 2],
    f: impl Fn(f32, f32) -> f32,
) {
    let (gc, gr) = g.as_chunks::<8>();
    let (xc, xr) = x.as_chunks::<8>();
    let (mc, mr) = m.as_chunks::<8>();
    for ((&gv, &xv), &mv) in gr.iter().zip(xr).zip(mr) {
        let v = f(mv, gv);
        s.tail += v as f64;
        sx.tail += (v * (xv - mu)) as f64;
    }
    for ((gs, xs), ms) in gc.iter().zip(xc).zip(mc) {
        let mut v = [0f32; 8];
        let mut vx = [0f32; 8];
        for k in 0..8 {
            v[k] = f(ms[k], gs[k]);
            vx[k] = v[k] * (xs[k] - mu);
        }
        for k in 0..8 {
            s.v[k] += v[k] as f64;
            sx.v[k] += vx[k] as f64;
        }
    }
}

/// How many planes ahead a pass over one channel's planes (one per image, `C·H·W` floats
/// apart) asks for them: the hardware's prefetcher follows each plane only once it has seen
/// a few of its lines, and loses the start of every plane.
const PREFETCH_PLANES: usize = 2;

/// Asks for the 64-byte lines of `xs` to be brought into the cache (a hint only).
#[inline(always)]
fn prefetch(xs: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in xs.chunks(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch reads nothing into the program and faults on no address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

/// Asks for the 64-byte lines of `out` to be brought into the cache to be written
/// ([`super::prefetch_write`]; a hint only).
#[inline(always)]
fn prefetch_for_write(out: &[std::mem::MaybeUninit<f32>], avx512: bool) {
    for line in out.chunks(16) {
        super::prefetch_write(line.as_ptr().cast(), avx512);
    }
}

/// Mean and biased variance per channel (two-pass, f64 accumulation). Both passes over a
/// channel run one after the other, so the second reads the channel's planes from the cache.
fn stats(x: &[f32], (n, c, hw): (usize, usize, usize), path: BnPath) -> (Vec<f32>, Vec<f32>) {
    let avx512 = path.avx512();
    let m = (n * hw) as f64;
    let plane = |i: usize, ch: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut sum = Lanes::default();
            for i in 0..n {
                if i + PREFETCH_PLANES < n {
                    prefetch(plane(i + PREFETCH_PLANES, ch));
                }
                plane_sum(plane(i, ch), avx512, &mut sum);
            }
            let mean = sum.total() / m;
            let mut sq = Lanes::default();
            for i in 0..n {
                plane_sq_dev(plane(i, ch), mean, avx512, &mut sq);
            }
            (mean as f32, (sq.total() / m) as f32)
        })
        .unzip()
}

/// Per-channel mean and biased variance of an N×C×H×W tensor, as a 2×C tensor.
struct StatsOp(BnPath);

impl CustomOp1 for StatsOp {
    fn name(&self) -> &'static str {
        "qr-channel-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l)?;
        let (mut mean, var) = stats(slice(s, l, "input")?, (n, c, hw), self.0);
        mean.extend(var);
        Ok((CpuStorage::F32(mean), Shape::from((2, c))))
    }
}

/// A training-mode BatchNorm's batch statistics, computed once (by [`StatsOp`]) and kept for
/// the backward pass, with ε and the code that sums.
struct BatchStats {
    eps: f64,
    mean: Arc<[f32]>,
    var: Arc<[f32]>,
    path: BnPath,
}

impl BatchStats {
    /// The statistics of `x` (contiguous), and the same as tensors for the caller (the
    /// running statistics).
    fn of(x: &Tensor, eps: f64, path: BnPath) -> candle_core::Result<(Self, Tensor, Tensor)> {
        let (mean, var) = channel_stats_with(x, path)?;
        let stats = BatchStats {
            eps,
            mean: mean.to_vec1::<f32>()?.into(),
            var: var.to_vec1::<f32>()?.into(),
            path,
        };
        Ok((stats, mean, var))
    }

    /// The per-channel scale `γ/√(σ² + ε)` and shift `β − μ·scale` that normalize and apply
    /// γ and β in one affine map.
    fn scale_shift(&self, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let inv = inv_std(&self.var, self.eps);
        let a: Vec<f32> = inv.iter().zip(gamma).map(|(&i, &g)| i * g).collect();
        let b = (0..a.len())
            .map(|ch| beta[ch] - self.mean[ch] * a[ch])
            .collect();
        (a, b)
    }

    /// The backward op for weights `gamma`, masked as `relu` says.
    fn backward(&self, gamma: Vec<f32>, want_dx: bool, relu: Relu) -> BnTrainBackward {
        BnTrainBackward {
            gamma,
            mean: self.mean.clone(),
            inv: inv_std(&self.var, self.eps),
            want_dx,
            relu,
            path: self.path,
        }
    }
}

/// Training-mode BatchNorm forward: (x, γ, β) → y with the batch statistics `stats`; with
/// `relu`, the ReLU of it.
struct BnTrainOp {
    stats: BatchStats,
    relu: bool,
}

/// The whole backward pass in one: (x, dy, y) → [dx (if `want_dx`) ; Σ dy·x̂ ; Σ dy], flat;
/// dy first masked by the ReLU after BatchNorm as `relu` says.
struct BnTrainBackward {
    gamma: Vec<f32>,
    mean: Arc<[f32]>,
    inv: Vec<f32>,
    want_dx: bool,
    relu: Relu,
    path: BnPath,
}

/// Whether a ReLU follows BatchNorm in its op, and how its backward pass finds where the
/// ReLU passed the gradient.
#[derive(Debug, Clone)]
enum Relu {
    None,
    /// Where the op's output y is positive (a residual was added before the ReLU).
    Output,
    /// Where the forward pass's `x·scale_c + shift_c` was (its own scale and shift,
    /// [`BatchStats::scale_shift`]): no pass over y.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
}

fn inv_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect()
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "qr-batch-norm-train"
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
        let (_, c, hw) = nchw(l1)?;
        let x = slice(s1, l1, "input")?;
        let (gamma, beta) = (slice(s2, l2, "weight")?, slice(s3, l3, "bias")?);
        if gamma.len() != c || beta.len() != c || self.stats.mean.len() != c {
            candle_core::bail!("batch-norm: {c} channels, {} weights", gamma.len());
        }
        let (a, b) = self.stats.scale_shift(gamma, beta);
        let y = scale_planes(x, &a, Some(&b), (c, hw), self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_params = gamma.track_op() || beta.track_op();
        if !x.track_op() && !want_params {
            return Ok((None, None, None));
        }
        let gamma = gamma.to_vec1::<f32>()?;
        let relu = if self.relu {
            let (scale, shift) = self.stats.scale_shift(&gamma, &beta.to_vec1::<f32>()?);
            Relu::Affine { scale, shift }
        } else {
            Relu::None
        };
        let op = self.stats.backward(gamma, x.track_op(), relu);
        let c = op.gamma.len();
        let (dx, sums) = op.run(x, &dy.contiguous()?, res)?;
        let (dg, db) = if want_params {
            (Some(sums.narrow(0, 0, c)?), Some(sums.narrow(0, c, c)?))
        } else {
            (None, None)
        };
        Ok((dx, dg, db))
    }
}

impl BnTrainBackward {
    /// dx (where wanted) and [Σ dy·x̂ ; Σ dy] (= [dγ ; dβ]) for the input `x`, the output
    /// gradient `dy` and the forward output `y`.
    fn run(
        &self,
        x: &Tensor,
        dy: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let out = x.apply_op3_no_bwd(dy, &y.contiguous()?, self)?;
        let len = if self.want_dx { x.elem_count() } else { 0 };
        let dx = if self.want_dx {
            Some(out.narrow(0, 0, len)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, out.narrow(0, len, 2 * self.gamma.len())?))
    }
}

/// Training-mode BatchNorm, a residual added, then ReLU: (x, [γ ; β], r) → max(BN(x) + r,
/// 0) with the batch statistics `stats`. One pass over the activations where BatchNorm and
/// the residual sum with its ReLU took two; the backward pass is [`BnTrainOp`]'s through a
/// ReLU, and the residual's gradient the ReLU's (left in `link`, where given, for the
/// block's first convolution).
struct BnAddReluOp {
    stats: BatchStats,
    link: Option<ResidualLink>,
}

impl CustomOp3 for BnAddReluOp {
    fn name(&self) -> &'static str {
        "qr-batch-norm-add-relu-train"
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
        let (_, c, hw) = nchw(l1)?;
        let x = slice(s1, l1, "input")?;
        let params = slice(s2, l2, "weight and bias")?;
        let r = slice(s3, l3, "residual")?;
        if params.len() != 2 * c || self.stats.mean.len() != c || r.len() != x.len() {
            candle_core::bail!(
                "batch-norm + residual: {c} channels, {} weights, residual {:?} for input {:?}",
                params.len(),
                l3.dims(),
                l1.dims()
            );
        }
        let (gamma, beta) = params.split_at(c);
        let (a, b) = self.stats.scale_shift(gamma, beta);
        // SAFETY: chunk p is plane p (hw elements, zipped with plane p of x and r), written
        // in full.
        let y = unsafe {
            super::par_uninit(x.len(), hw, |p, out| {
                let (ch, plane) = (p % c, p * hw..(p + 1) * hw);
                affine_add_relu_plane(out, &x[plane.clone()], &r[plane], a[ch], b[ch]);
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        r: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let c = params.elem_count() / 2;
        // y = max(s + r, 0): y > 0 exactly where s + r > 0. The residual's gradient is dy
        // through that mask; when it is wanted, BatchNorm's backward pass reads it instead
        // of masking dy again.
        let dr = if r.track_op() {
            Some(super::IntervalGrad::POSITIVE.apply(res, &dy)?)
        } else {
            None
        };
        let returned = ResidualLink::route(self.link.as_ref(), dr.clone());
        if !x.track_op() && !params.track_op() {
            return Ok((None, None, returned));
        }
        let gamma = params.narrow(0, 0, c)?.to_vec1::<f32>()?;
        let relu = if dr.is_none() {
            Relu::Output
        } else {
            Relu::None
        };
        let op = self.stats.backward(gamma, x.track_op(), relu);
        // [Σ dy·x̂ ; Σ dy] = [dγ ; dβ], the parameters' order.
        let (dx, sums) = op.run(x, dr.as_ref().unwrap_or(&dy), res)?;
        Ok((dx, params.track_op().then_some(sums), returned))
    }
}

/// Σ dy and Σ dy·x̂ of channel `ch` (dy masked by the ReLU, when there is one).
fn param_sums(
    g: &BnGrad,
    ch: usize,
    (n, c, hw): (usize, usize, usize),
    avx512: bool,
) -> (f64, f64) {
    let mut acc = [Lanes::default(); 2];
    let plane = |i: usize| (i * c + ch) * hw..(i * c + ch + 1) * hw;
    for i in 0..n {
        if i + PREFETCH_PLANES < n {
            let r = plane(i + PREFETCH_PLANES);
            let y = matches!(g.relu, Relu::Output).then_some(g.y);
            for xs in [g.dy, g.x].into_iter().chain(y) {
                prefetch(&xs[r.clone()]);
            }
        }
        let r = plane(i);
        let mask = g.mask(ch, r.clone());
        lane_sums2(
            &g.dy[r.clone()],
            &g.x[r],
            mask,
            g.mean[ch],
            avx512,
            &mut acc,
        );
    }
    (acc[0].total(), acc[1].total() * g.inv[ch] as f64)
}

/// What BatchNorm's backward pass reads: the input, the output gradient, the op's output
/// (read only for [`Relu::Output`]), the ReLU after BatchNorm, the batch mean and 1/σ per
/// channel.
struct BnGrad<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    y: &'a [f32],
    relu: &'a Relu,
    mean: &'a [f32],
    inv: &'a [f32],
}

impl BnGrad<'_> {
    /// The ReLU's mask on the plane `r` of channel `ch`, where there is a ReLU.
    fn mask(&self, ch: usize, r: std::ops::Range<usize>) -> Option<Mask<'_>> {
        match self.relu {
            Relu::None => None,
            Relu::Output => Some(Mask::Output(&self.y[r])),
            Relu::Affine { scale, shift } => Some(Mask::Affine(scale[ch], shift[ch])),
        }
    }
}

impl CustomOp3 for BnTrainBackward {
    fn name(&self) -> &'static str {
        "qr-batch-norm-train-backward"
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
        let (n, c, hw) = nchw(l1)?;
        let x = slice(s1, l1, "input")?;
        let dy = slice(s2, l2, "gradient")?;
        let y = slice(s3, l3, "output")?;
        if dy.len() != x.len() || y.len() != x.len() || self.gamma.len() != c {
            candle_core::bail!("batch-norm backward: gradient or weights do not fit {c} channels");
        }
        let grad = BnGrad {
            x,
            dy,
            y,
            relu: &self.relu,
            mean: &self.mean,
            inv: &self.inv,
        };
        let avx512 = self.path.avx512();
        let len = if self.want_dx { x.len() } else { 0 };
        let mut out = Vec::with_capacity(len + 2 * c);
        // Each channel's planes of dx (none without `want_dx`): a channel's sums and then its
        // input gradient in one task, so the second pass reads its planes from the cache.
        let mut planes: Vec<Vec<&mut [std::mem::MaybeUninit<f32>]>> =
            (0..c).map(|_| Vec::with_capacity(n)).collect();
        for (p, plane) in out.spare_capacity_mut()[..len].chunks_mut(hw).enumerate() {
            planes[p % c].push(plane);
        }
        let m = (n * hw) as f64;
        let (sdy, sdyx): (Vec<f64>, Vec<f64>) = planes
            .into_par_iter()
            .enumerate()
            .map(|(ch, mut dx)| {
                let (sdy, sdyx) = param_sums(&grad, ch, (n, c, hw), avx512);
                // dx = γ·inv·(dy − mean(dy) − x̂·mean(dy·x̂)): the means, not the sums, keep
                // the f32 cancellation small.
                let k = self.gamma[ch] * grad.inv[ch];
                let (a, b) = ((sdy / m) as f32, (sdyx / m) as f32);
                // dx's planes lie C·H·W floats apart, like the inputs': each is asked for
                // (to be written) as the inputs are, `PREFETCH_PLANES` ahead.
                for i in 0..dx.len() {
                    if let Some(next) = dx.get(i + PREFETCH_PLANES) {
                        prefetch_for_write(next, avx512);
                    }
                    let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                    let mask = grad.mask(ch, r.clone());
                    let coeffs = [k, a, b, grad.mean[ch], grad.inv[ch]];
                    dx_plane(dx[i], &x[r.clone()], &dy[r], mask, coeffs);
                }
                (sdy, sdyx)
            })
            .unzip();
        // SAFETY: with `want_dx`, the planes cover 0..len (len = N·C·H·W, planes of H·W) and
        // dx_plane wrote every element of each.
        unsafe { out.set_len(len) };
        out.extend(sdyx.into_iter().map(|v| v as f32));
        out.extend(sdy.into_iter().map(|v| v as f32));
        let total = out.len();
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

/// y = x·a_c + b_c.
struct AffineOp;

/// (x, dy) → 2×C: [Σ dy·x ; Σ dy].
struct AffineGradParams;

/// (dy, a) → dy·a_c.
struct ScaleOp;

/// `x·a_c + b_c` per plane (b = 0 when not given), and with `relu` its ReLU.
fn scale_planes(
    x: &[f32],
    a: &[f32],
    b: Option<&[f32]>,
    (c, hw): (usize, usize),
    relu: bool,
) -> Vec<f32> {
    // SAFETY: chunk p is plane p (hw elements, zipped with plane p of x), written in full.
    unsafe {
        super::par_uninit(x.len(), hw, |p, out| {
            let ch = p % c;
            let t = b.map_or(0.0, |b| b[ch]);
            affine_plane(out, &x[p * hw..(p + 1) * hw], a[ch], t, relu);
        })
    }
}

impl CustomOp3 for AffineOp {
    fn name(&self) -> &'static str {
        "qr-channel-affine"
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
        let (_, c, hw) = nchw(l1)?;
        let x = slice(s1, l1, "input")?;
        let y = scale_planes(
            x,
            slice(s2, l2, "scale")?,
            Some(slice(s3, l3, "shift")?),
            (c, hw),
            false,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(a, &ScaleOp)?)
        } else {
            None
        };
        let (da, db) = if a.track_op() || b.track_op() {
            let p = x.apply_op2_no_bwd(&dy, &AffineGradParams)?;
            (Some(p.get(0)?), Some(p.get(1)?))
        } else {
            (None, None)
        };
        Ok((dx, da, db))
    }
}

impl CustomOp2 for ScaleOp {
    fn name(&self) -> &'static str {
        "qr-channel-scale"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, hw) = nchw(l1)?;
        let y = scale_planes(
            slice(s1, l1, "gradient")?,
            slice(s2, l2, "scale")?,
            None,
            (c, hw),
            false,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

impl CustomOp2 for AffineGradParams {
    fn name(&self) -> &'static str {
        "qr-channel-affine-grad-params"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l1)?;
        let (x, dy) = (slice(s1, l1, "input")?, slice(s2, l2, "gradient")?);
        // Σ dy·x and Σ dy: BatchNorm's parameter sums with mean 0 and scale 1.
        let (mean, inv) = (vec![0.0; c], vec![1.0; c]);
        let grad = BnGrad {
            x,
            dy,
            y: &[],
            relu: &Relu::None,
            mean: &mean,
            inv: &inv,
        };
        let avx512 = BnPath::Auto.avx512();
        let (s, sx): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| param_sums(&grad, ch, (n, c, hw), avx512))
            .unzip();
        let mut out: Vec<f32> = sx.into_iter().map(|v| v as f32).collect();
        out.extend(s.into_iter().map(|v| v as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// max(x, 0).
struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "qr-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "input")?;
        const CHUNK: usize = 1 << 14;
        // SAFETY: chunk i zips with the equally long chunk i of x; every element is written.
        let y = unsafe {
            super::par_uninit(x.len(), CHUNK, |i, o| {
                let xs = &x[i * CHUNK..][..o.len()];
                for (o, &v) in o.iter_mut().zip(xs) {
                    o.write(v.max(0.0));
                }
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(super::IntervalGrad::POSITIVE.apply(x, dy)?))
    }
}

/// A residual sum `a + r`, through ReLU with `relu` (`max(a + r, 0)`), in one pass; with
/// `link`, r's gradient goes there.
struct AddOp {
    relu: bool,
    link: Option<ResidualLink>,
}

impl CustomOp2 for AddOp {
    fn name(&self) -> &'static str {
        if self.relu {
            "qr-add-relu"
        } else {
            "qr-add"
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(s1, l1, "input")?, slice(s2, l2, "residual")?);
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "{}: shapes {:?} and {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        const CHUNK: usize = 1 << 14;
        let relu = self.relu;
        // SAFETY: chunk i zips with the equally long chunks i of a and b (same shape,
        // checked above); every element is written.
        let y = unsafe {
            super::par_uninit(a.len(), CHUNK, |i, o| {
                let (xs, rs) = (&a[i * CHUNK..][..o.len()], &b[i * CHUNK..][..o.len()]);
                for ((o, &u), &v) in o.iter_mut().zip(xs).zip(rs) {
                    o.write(if relu { (u + v).max(0.0) } else { u + v });
                }
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        r: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !r.track_op() {
            return Ok((None, None));
        }
        // y = max(a + r, 0): y > 0 exactly where a + r > 0.
        let g = if self.relu {
            super::IntervalGrad::POSITIVE.apply(res, dy)?
        } else {
            dy.clone()
        };
        let dr = ResidualLink::route(self.link.as_ref(), r.track_op().then(|| g.clone()));
        Ok((a.track_op().then_some(g), dr))
    }
}

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Per-channel (mean, biased variance) of an N×C×H×W tensor, detached (running statistics).
pub fn channel_stats(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    channel_stats_with(x, BnPath::Auto)
}

/// [`channel_stats`] by the given code on the CPU.
pub fn channel_stats_with(x: &Tensor, path: BnPath) -> candle_core::Result<(Tensor, Tensor)> {
    if cpu_f32(x) {
        let s = x.detach().contiguous()?.apply_op1_no_bwd(&StatsOp(path))?;
        Ok((s.get(0)?, s.get(1)?))
    } else {
        let x = x.detach();
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        Ok((mean.flatten_all()?, var.flatten_all()?))
    }
}

/// Training-mode BatchNorm with batch statistics: the output and the statistics used
/// (per-channel mean and biased variance, detached, for the running statistics).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_with(x, gamma, beta, eps, false, BnPath::Auto)
}

/// [`batch_norm_train`] followed by a ReLU, in one op on the CPU: the same values and
/// gradients as the two in a row, without the ReLU's own passes over the activations.
pub fn batch_norm_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_with(x, gamma, beta, eps, true, BnPath::Auto)
}

/// [`batch_norm_train`] (with `relu`: [`batch_norm_relu_train`]) by the given code on the
/// CPU.
pub fn batch_norm_train_with(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    path: BnPath,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if cpu_f32(x) {
        let x = x.contiguous()?;
        let (stats, mean, var) = BatchStats::of(&x, eps, path)?;
        let op = BnTrainOp { stats, relu };
        let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
        return Ok((y, mean, var));
    }
    if relu {
        let (y, mean, var) = batch_norm_train_with(x, gamma, beta, eps, false, path)?;
        return Ok((y.relu()?, mean, var));
    }
    let c = gamma.dim(0)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    let inv = (&var + eps)?.sqrt()?.recip()?;
    let y = centered
        .broadcast_mul(&inv.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
    Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
}

/// Training-mode BatchNorm of `x`, the residual `r` added, then ReLU (a residual block's
/// end): on the CPU one op, the same values and gradients as [`batch_norm_train`] and
/// [`add_relu`] in a row; with the statistics used, as [`batch_norm_train`] returns them.
/// With `link`, the residual's gradient goes to the block's first convolution
/// ([`super::conv2d::conv2d_block_start`]).
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    r: &Tensor,
    link: Option<&ResidualLink>,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    batch_norm_add_relu_train_with(x, (gamma, beta), r, link, eps, BnPath::Auto)
}

/// [`batch_norm_add_relu_train`] by the given code on the CPU.
pub fn batch_norm_add_relu_train_with(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    r: &Tensor,
    link: Option<&ResidualLink>,
    eps: f64,
    path: BnPath,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if !(cpu_f32(x) && cpu_f32(r)) {
        if let Some(link) = link {
            link.bypass();
        }
        let (y, mean, var) = batch_norm_train_with(x, gamma, beta, eps, false, path)?;
        return Ok((add_relu(&y, r)?, mean, var));
    }
    let x = x.contiguous()?;
    let (stats, mean, var) = BatchStats::of(&x, eps, path)?;
    let op = BnAddReluOp {
        stats,
        link: link.cloned(),
    };
    let params = Tensor::cat(&[gamma.contiguous()?, beta.contiguous()?], 0)?;
    let y = x.apply_op3(&params, &r.contiguous()?, op)?;
    Ok((y, mean, var))
}

/// `x·a_c + b_c` for per-channel `a`, `b` of length C.
pub fn channel_affine(x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_f32(x) {
        return x
            .contiguous()?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, AffineOp);
    }
    let c = a.dim(0)?;
    x.broadcast_mul(&a.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)
}

/// ReLU.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(ReluOp)
    } else {
        x.relu()
    }
}

/// A residual sum `a + r` (our op on the CPU, candle's elsewhere); with `link`, the
/// residual's gradient goes to the block's first convolution
/// ([`super::conv2d::conv2d_block_start`]).
pub fn add(a: &Tensor, r: &Tensor, link: Option<&ResidualLink>) -> candle_core::Result<Tensor> {
    if cpu_f32(a) && cpu_f32(r) {
        let op = AddOp {
            relu: false,
            link: link.cloned(),
        };
        return a.contiguous()?.apply_op2(&r.contiguous()?, op);
    }
    if let Some(link) = link {
        link.bypass();
    }
    a + r
}

/// ReLU of a residual sum, `max(a + b, 0)`, in one pass (same values and gradients as the
/// sum and the ReLU in a row).
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_f32(a) && b.dtype() == DType::F32 {
        let op = AddOp {
            relu: true,
            link: None,
        };
        a.contiguous()?.apply_op2(&b.contiguous()?, op)
    } else {
        (a + b)?.relu()
    }
}
