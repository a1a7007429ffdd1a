//! Direct 3×3, pad-1 convolution (stride 1 or 2) over register tiles (x86-64 AVX2 + FMA).
//!
//! ResNet-20's convolutions are all 3×3 with padding 1 (two with stride 2). A direct
//! convolution beats im2col + GEMM on 2 cores: it skips the patch matrix (9× the input,
//! written and read once per image) and keeps a tile of output channels × eight-wide output
//! vectors in registers ([`Isa`] says how many), each tap of each input channel adding one
//! broadcast weight times one input vector, loaded from a zero-padded copy of the image. For
//! stride 2 the padded copy splits each row into its even and odd columns, so that every
//! tap's eight inputs are again contiguous.
//!
//! The input gradient of a stride-1 convolution is the same convolution of the output
//! gradient with the kernel transposed (input ↔ output channels) and rotated by 180°, so both
//! use [`conv`]. Only shapes whose output rows are whole vectors (`Wo % 8 == 0`) take this
//! path.

use std::mem::MaybeUninit;

use super::{Addends, Geom};

/// The instruction sets the tile kernel is compiled for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512VL's 32 vector registers: tiles of 8 channels × 3 vectors.
    Avx512,
    /// AVX2 + FMA's 16 registers: tiles of 4 channels × 2 vectors.
    Avx2,
}

impl Isa {
    /// Whether this machine runs this instruction set.
    pub fn available(self) -> bool {
        available(self)
    }

    /// Output channels per tile.
    pub(super) fn ob(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 4,
        }
    }
}

/// Whether `g` has the direct path's shape: 3×3, stride 1, pad 1, whole vectors per row.
pub(super) fn fits(g: &Geom) -> bool {
    let rows = match g.stride {
        1 => g.w.is_multiple_of(8),
        2 => g.w.is_multiple_of(16) && g.h.is_multiple_of(2),
        _ => false,
    };
    g.k == 3 && g.pad == 1 && rows && g.w > 0 && g.h > 0
}

/// Whether this machine runs `isa`.
#[cfg(target_arch = "x86_64")]
pub(super) fn available(isa: Isa) -> bool {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma");
    match isa {
        Isa::Avx2 => avx2,
        Isa::Avx512 => avx2 && has!("avx512f") && has!("avx512vl"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn available(_: Isa) -> bool {
    false
}

/// The best instruction set for the direct path on this machine, if any (asked once: the
/// elementwise kernels ask per plane).
pub(super) fn best() -> Option<Isa> {
    static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| [Isa::Avx512, Isa::Avx2].into_iter().find(|&i| available(i)))
}

/// The kernel `w` (O×C×3×3) as tiles: `[o / ob][c][tap][o % ob]` with `ob = isa.ob()`, output
/// channels padded to a multiple of `ob` with zeros.
pub(super) fn pack(isa: Isa, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let ob = isa.ob();
    let blocks = o.div_ceil(ob);
    let mut out = vec![0f32; blocks * c * 9 * ob];
    for oo in 0..o {
        for cc in 0..c {
            for t in 0..9 {
                out[(((oo / ob) * c + cc) * 9 + t) * ob + oo % ob] = w[(oo * c + cc) * 9 + t];
            }
        }
    }
    out
}

/// Runs `(j, n)` of `n` vectors from vector `j` that cover `nvec` vectors in order: `big` at a
/// time, then pairs (where `big` > 2), then single vectors (the register tiles' widths).
pub(super) fn runs(nvec: usize, big: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = nvec / big * big;
    let pairs = if big > 2 { (nvec - full) / 2 * 2 } else { 0 };
    (0..full)
        .step_by(big)
        .map(move |j| (j, big))
        .chain((full..full + pairs).step_by(2).map(|j| (j, 2)))
        .chain((full + pairs..nvec).map(|j| (j, 1)))
}

/// A convolution's sizes as the direct kernel sees them: an `h`×`w` input image with `c`
/// input and `o` output channels (for the input gradient: the forward's output and input
/// channels), the stride (1 or 2), and whether the output goes through ReLU as it is stored.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plane {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub o: usize,
    pub stride: usize,
    pub relu: bool,
}

impl Plane {
    /// Output pixels per channel.
    pub(super) fn out_pixels(self) -> usize {
        (self.h / self.stride) * (self.w / self.stride)
    }
}

/// Where the padded copy keeps one channel, and where each output vector's inputs start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Padded {
    /// Floats per channel.
    plane: usize,
    /// Offset between the inputs of consecutive output rows.
    row: usize,
    /// Offset of tap (ki, kj) from the top-left input of its output vector.
    taps: [usize; 9],
    /// Output height and width.
    ho: usize,
    wo: usize,
}

impl Padded {
    fn new(p: Plane) -> Self {
        let hp = p.h + 2;
        if p.stride == 1 {
            let wp = p.w + 2;
            Padded {
                plane: hp * wp,
                row: wp,
                taps: std::array::from_fn(|t| t / 3 * wp + t % 3),
                ho: p.h,
                wo: p.w,
            }
        } else {
            // Each padded row as its even columns, then (half a plane on) its odd ones:
            // input column 2·j + kj of an output column j is even column j (kj = 0), odd
            // column j (kj = 1) or even column j + 1 (kj = 2).
            let ws = p.w / 2 + 1;
            let half = hp * ws;
            Padded {
                plane: 2 * half,
                row: 2 * ws,
                taps: std::array::from_fn(|t| t / 3 * ws + [0, half, 1][t % 3]),
                ho: p.h / 2,
                wo: p.w / 2,
            }
        }
    }
}

/// One image: `y` (O×H×W) = `bias` (per output channel) + conv(`x` (C×H×W), kernel `wp`
/// packed for `isa`) [+ `residual` (O×H×W)] [through ReLU, `p.relu`], with `xp` as scratch
/// for the zero-padded image. Every element of `y` is
/// written. Each output starts from its bias and adds the terms in the same order whatever
/// the tile shape, so a zero bias gives the bits of the plain convolution.
pub(super) fn conv(
    isa: Isa,
    p: Plane,
    x: &[f32],
    wp: &[f32],
    add: Addends,
    xp: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    let Addends { bias, residual } = add;
    let Plane { h, w, c, o, .. } = p;
    let pd = Padded::new(p);
    pad(p, x, xp);
    let ob = isa.ob();
    assert!(
        x.len() == c * h * w
            && y.len() == o * pd.ho * pd.wo
            && bias.len() == o
            && residual.is_none_or(|r| r.len() == y.len())
            && wp.len() == o.div_ceil(ob) * c * 9 * ob,
        "direct conv: buffer sizes do not match {p:?}"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was detected on this machine; the tile kernel reads `xp` within the padded
    // image (every output vector's 3×3 neighbourhood lies inside it), `wp` within the packed
    // kernel and writes `y` within O×H×W (sizes asserted above).
    unsafe {
        match isa {
            Isa::Avx512 => x86::image_avx512(p, pd, xp, wp, add, y.as_mut_ptr().cast()),
            Isa::Avx2 => x86::image_avx2(p, pd, xp, wp, add, y.as_mut_ptr().cast()),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("direct convolution is only selected on x86-64")
}

/// `xp` = the images of `x` (each `c`×`h`×`w`), each channel zero-padded by one pixel, laid
/// out as [`Padded`] says. An `xp` that already has the padded length is taken to be an
/// earlier result of `pad` for the same plane (its padding zero: only the interior is
/// written); any other is resized and zeroed first.
pub(super) fn pad(p: Plane, x: &[f32], xp: &mut Vec<f32>) {
    let Plane { h, w, c, .. } = p;
    let pd = Padded::new(p);
    let planes = x.len() / (h * w);
    debug_assert_eq!(planes % c, 0);
    if xp.len() != planes * pd.plane {
        xp.clear();
        xp.resize(planes * pd.plane, 0.0);
    }
    for (pl, src) in x.chunks_exact(h * w).enumerate() {
        let base = pl * pd.plane;
        for (r, row) in src.chunks_exact(w).enumerate() {
            if p.stride == 1 {
                let dst = base + (r + 1) * (w + 2) + 1;
                // Eight floats at a time, inline (a `memmove` call per short row costs more
                // than the copy).
                let (d8, s8) = (xp[dst..dst + w].chunks_exact_mut(8), row.chunks_exact(8));
                let tail = w - w % 8;
                for (d, s) in d8.zip(s8) {
                    let d: &mut [f32; 8] = d.try_into().expect("8 floats");
                    *d = s.try_into().expect("8 floats");
                }
                for (d, s) in xp[dst + tail..dst + w].iter_mut().zip(&row[tail..]) {
                    *d = *s;
                }
            } else {
                // Padded column q = input column + 1: even q to q/2, odd q to the odd half.
                let ws = w / 2 + 1;
                let (even, odd) = (base + (r + 1) * ws, base + pd.plane / 2 + (r + 1) * ws);
                // Slices of the two halves' rows, so that the copy vectorizes.
                let (head, tail) = xp.split_at_mut(odd);
                let evens = &mut head[even + 1..even + 1 + w / 2];
                for ((o, e), pair) in tail[..w / 2].iter_mut().zip(evens).zip(row.chunks_exact(2)) {
                    *o = pair[0];
                    *e = pair[1];
                }
            }
        }
    }
}

/// Images per group in [`grad_weight`]: their padded inputs stay in the L2 cache, and each
/// tile's vector sums are reduced once per group.
const GROUP: usize = 8;

/// The weight gradient of a batch of images: `dw` (O×C×3×3) += Σ over images and output
/// pixels of `dy[o][pixel] · x[c][pixel + tap − 1]`, for `x` (N×C×H×W) and `dy` (N×O×H×W).
/// `xp` is scratch for the padded images.
pub(super) fn grad_weight(
    isa: Isa,
    p: Plane,
    x: &[f32],
    dy: &[f32],
    xp: &mut Vec<f32>,
    dw: &mut [f32],
) {
    let Plane { h, w, c, o, .. } = p;
    let pd = Padded::new(p);
    let (per_x, per_dy) = (c * h * w, o * pd.ho * pd.wo);
    assert!(
        x.len().is_multiple_of(per_x)
            && dy.len() / per_dy == x.len() / per_x
            && dw.len() == o * c * 9,
        "direct conv weight gradient: buffer sizes do not match {p:?}"
    );
    for (xg, dyg) in x.chunks(GROUP * per_x).zip(dy.chunks(GROUP * per_dy)) {
        pad(p, xg, xp);
        let imgs = xg.len() / per_x;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected on this machine; the kernel reads `xp` within the
        // `imgs` padded images, `dyg` within `imgs`×O×H×W and writes `dw` within O×C×9.
        unsafe {
            match isa {
                Isa::Avx512 => x86::grad_weight_avx512(p, pd, imgs, xp, dyg, dw),
                Isa::Avx2 => x86::grad_weight_avx2(p, pd, imgs, xp, dyg, dw),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct convolution is only selected on x86-64 ({imgs} images)")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Addends, Padded, Plane};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn image_avx512(
        p: Plane,
        pd: Padded,
        xp: &[f32],
        wp: &[f32],
        add: Addends,
        y: *mut f32,
    ) {
        image::<8, 3>(p, pd, xp, wp, add, y)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn image_avx2(
        p: Plane,
        pd: Padded,
        xp: &[f32],
        wp: &[f32],
        add: Addends,
        y: *mut f32,
    ) {
        image::<4, 2>(p, pd, xp, wp, add, y)
    }

    /// The weight gradient on 512-bit registers, each holding two output channels' eight
    /// lanes: every lane adds the same products in the same order as [`wtile`]'s, so the bits
    /// are those of the AVX2 kernel, for twice the work per instruction where the machine
    /// has full-width 512-bit FMA units.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn grad_weight_avx512(
        p: Plane,
        pd: Padded,
        imgs: usize,
        xp: &[f32],
        dy: &[f32],
        dw: &mut [f32],
    ) {
        for ci in 0..p.c {
            let mut o0 = 0;
            while o0 + 4 <= p.o {
                wtile_pairs::<2>(p, pd, imgs, xp, dy, ci, o0, dw);
                o0 += 4;
            }
            while o0 + 2 <= p.o {
                wtile_pairs::<1>(p, pd, imgs, xp, dy, ci, o0, dw);
                o0 += 2;
            }
            while o0 < p.o {
                wtile::<1>(p, pd, imgs, xp, dy, ci, o0, dw);
                o0 += 1;
            }
        }
    }

    /// `dw[o0..o0 + 2P][ci][tap]` += Σ over the images and their output vectors, output
    /// channels `o0 + 2q` and `o0 + 2q + 1` in the low and high halves of register `q`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wtile_pairs<const P: usize>(
        p: Plane,
        pd: Padded,
        imgs: usize,
        xp: &[f32],
        dy: &[f32],
        ci: usize,
        o0: usize,
        dw: &mut [f32],
    ) {
        let Plane { c, o, .. } = p;
        let (ho, wo) = (pd.ho, pd.wo);
        let hw = ho * wo;
        // Two eight-float vectors as the halves of one register (AVX-512F only: no DQ).
        let join = |lo: __m256, hi: __m256| {
            _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                _mm256_castps_pd(hi),
                1,
            ))
        };
        let mut acc = [[_mm512_setzero_ps(); 9]; P];
        for img in 0..imgs {
            let xc = xp.as_ptr().add((img * c + ci) * pd.plane);
            let dyo = dy.as_ptr().add((img * o + o0) * hw);
            for r in 0..ho {
                for col in (0..wo).step_by(8) {
                    let at = r * wo + col;
                    let d: [__m512; P] = std::array::from_fn(|q| {
                        join(
                            _mm256_loadu_ps(dyo.add(2 * q * hw + at)),
                            _mm256_loadu_ps(dyo.add((2 * q + 1) * hw + at)),
                        )
                    });
                    let base = xc.add(r * pd.row + col);
                    for (t, &off) in pd.taps.iter().enumerate() {
                        let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(
                            _mm256_loadu_ps(base.add(off)),
                        )));
                        for q in 0..P {
                            acc[q][t] = _mm512_fmadd_ps(d[q], xv, acc[q][t]);
                        }
                    }
                }
            }
        }
        for (q, taps) in acc.iter().enumerate() {
            for (t, v) in taps.iter().enumerate() {
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
                for (half, sum) in [&lanes[..8], &lanes[8..]].into_iter().enumerate() {
                    dw[((o0 + 2 * q + half) * c + ci) * 9 + t] += sum.iter().sum::<f32>();
                }
            }
        }
    }

    /// The weight gradient on 256-bit registers, one output channel × 9 taps at a time (16
    /// registers hold no more accumulators).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn grad_weight_avx2(
        p: Plane,
        pd: Padded,
        imgs: usize,
        xp: &[f32],
        dy: &[f32],
        dw: &mut [f32],
    ) {
        for ci in 0..p.c {
            for o0 in 0..p.o {
                wtile::<1>(p, pd, imgs, xp, dy, ci, o0, dw);
            }
        }
    }

    /// `dw[o0..o0 + OB][ci][tap]` += Σ over the images and their output vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wtile<const OB: usize>(
        p: Plane,
        pd: Padded,
        imgs: usize,
        xp: &[f32],
        dy: &[f32],
        ci: usize,
        o0: usize,
        dw: &mut [f32],
    ) {
        let Plane { c, o, .. } = p;
        let (ho, wo) = (pd.ho, pd.wo);
        let hw = ho * wo;
        let mut acc = [[_mm256_setzero_ps(); 9]; OB];
        for img in 0..imgs {
            let xc = xp.as_ptr().add((img * c + ci) * pd.plane);
            let dyo = dy.as_ptr().add((img * o + o0) * hw);
            for r in 0..ho {
                for col in (0..wo).step_by(8) {
                    let d: [__m256; OB] =
                        std::array::from_fn(|b| _mm256_loadu_ps(dyo.add(b * hw + r * wo + col)));
                    let base = xc.add(r * pd.row + col);
                    for (t, &off) in pd.taps.iter().enumerate() {
                        let xv = _mm256_loadu_ps(base.add(off));
                        for b in 0..OB {
                            acc[b][t] = _mm256_fmadd_ps(d[b], xv, acc[b][t]);
                        }
                    }
                }
            }
        }
        for (b, taps) in acc.iter().enumerate() {
            for (t, v) in taps.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                dw[((o0 + b) * c + ci) * 9 + t] += lanes.iter().sum::<f32>();
            }
        }
    }

    /// Every tile of one image: `OB` output channels × `N` vectors (a remainder of single
    /// vectors at the end).
    #[inline(always)]
    unsafe fn image<const OB: usize, const N: usize>(
        p: Plane,
        pd: Padded,
        xp: &[f32],
        wp: &[f32],
        Addends { bias, residual }: Addends,
        y: *mut f32,
    ) {
        let Plane { c, o, .. } = p;
        let geo = Geo {
            c,
            plane: pd.plane,
            taps: pd.taps,
            hw: pd.ho * pd.wo,
        };
        let nvec = geo.hw / 8;
        // Input offset (top-left of the 3×3 neighbourhood) of output vector j.
        let src = |j: usize| j * 8 / pd.wo * pd.row + j * 8 % pd.wo;
        for blk in 0..o.div_ceil(OB) {
            let wb = wp.as_ptr().add(blk * c * 9 * OB);
            let dst = Dst {
                y: y.add(blk * OB * geo.hw),
                bias: bias.as_ptr().add(blk * OB),
                residual: residual.map_or(std::ptr::null(), |r| r.as_ptr().add(blk * OB * geo.hw)),
                valid: (o - blk * OB).min(OB),
                relu: p.relu,
            };
            for (j, n) in super::runs(nvec, N) {
                match n {
                    1 => tile::<OB, 1>(geo, xp.as_ptr(), [src(j)], wb, dst, [j * 8]),
                    2 => {
                        let offs = [src(j), src(j + 1)];
                        tile::<OB, 2>(geo, xp.as_ptr(), offs, wb, dst, [j * 8, j * 8 + 8])
                    }
                    _ => {
                        let offs: [usize; N] = std::array::from_fn(|v| src(j + v));
                        let outs: [usize; N] = std::array::from_fn(|v| (j + v) * 8);
                        tile::<OB, N>(geo, xp.as_ptr(), offs, wb, dst, outs)
                    }
                }
            }
        }
    }

    /// Where a tile's outputs go: the block's first output plane, its first bias, and how
    /// many of its channels are real (the rest pad the block).
    #[derive(Clone, Copy)]
    struct Dst {
        y: *mut f32,
        bias: *const f32,
        /// The residual's plane matching `y`, or null.
        residual: *const f32,
        valid: usize,
        relu: bool,
    }

    /// Strides of the padded image and the output.
    #[derive(Clone, Copy)]
    struct Geo {
        c: usize,
        plane: usize,
        taps: [usize; 9],
        hw: usize,
    }

    /// `OB` output channels × `N` output vectors, accumulated over every input channel and
    /// tap; the first `valid` channels are stored (through ReLU where asked).
    #[inline(always)]
    unsafe fn tile<const OB: usize, const N: usize>(
        g: Geo,
        xp: *const f32,
        offs: [usize; N],
        wb: *const f32,
        dst: Dst,
        outs: [usize; N],
    ) {
        let mut acc: [[__m256; N]; OB] = std::array::from_fn(|oo| {
            let b = if oo < dst.valid {
                *dst.bias.add(oo)
            } else {
                0.0
            };
            [_mm256_set1_ps(b); N]
        });
        for ci in 0..g.c {
            let xc = xp.add(ci * g.plane);
            let wc = wb.add(ci * 9 * OB);
            for (t, &off) in g.taps.iter().enumerate() {
                {
                    let mut xv = [_mm256_setzero_ps(); N];
                    for v in 0..N {
                        xv[v] = _mm256_loadu_ps(xc.add(offs[v] + off));
                    }
                    for (oo, row) in acc.iter_mut().enumerate() {
                        let wv = _mm256_broadcast_ss(&*wc.add(t * OB + oo));
                        for v in 0..N {
                            row[v] = _mm256_fmadd_ps(wv, xv[v], row[v]);
                        }
                    }
                }
            }
        }
        let zero = _mm256_setzero_ps();
        for (oo, row) in acc.iter().enumerate().take(dst.valid) {
            for v in 0..N {
                let at = oo * g.hw + outs[v];
                let mut out = row[v];
                if !dst.residual.is_null() {
                    // One f32 addition, as `conv + residual` in two ops would do.
                    out = _mm256_add_ps(out, _mm256_loadu_ps(dst.residual.add(at)));
                }
                if dst.relu {
                    // max(v, 0) gives 0 for NaN, as f32::max(v, 0.0) does.
                    out = _mm256_max_ps(out, zero);
                }
                _mm256_storeu_ps(dst.y.add(at), out);
            }
        }
    }
}
