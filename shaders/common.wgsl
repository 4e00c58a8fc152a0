// Shared by every microclip kernel (prepended by the host before compilation).
//
// Numerics conventions:
// * A micro-batch mean is accumulated as sum_i (x_i * inv_n) so it does not
//   overflow when the true mean is finite, unless that mean is within a few
//   roundings of f32::MAX (rows of f32::MAX with n = 10, 18, 20, 36, 40 on
//   lavapipe: the terms round up; the micro-batch then counts as non-finite), in
//   blocks of ROW_BLOCK rows (sum of block sums):
//   the rounding error grows like ROW_BLOCK + rows / ROW_BLOCK, not like rows.
// * Squared norms travel as (scale, ssq) pairs: the value is scale^2 * ssq with
//   scale = max |g| over the covered elements (BLAS nrm2 style), so 1e30 and 1e-30
//   do not overflow or underflow.
// * Non-finite values are detected on the bits (NaN/Inf may be assumed absent by
//   WGSL implementations for arithmetic, never for bitcasts).

const ROW_BLOCK: u32 = 16u;
const FLAG_NAN: u32 = 1u;
const FLAG_INF: u32 = 2u;

// (scale, ssq) partial squared norm with non-finite flags, one per (micro-batch, tile).
struct Partial {
    scale: f32,
    ssq: f32,
    flags: u32,
    pad: u32,
}

// A micro-batch's norm as scale * root, with the non-finite flags of its mean.
struct MbNorm {
    scale: f32,
    root: f32,
    flags: u32,
    pad: u32,
}

fn nonfinite_flags(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    if ((bits & 0x7f800000u) != 0x7f800000u) {
        return 0u;
    }
    return select(FLAG_INF, FLAG_NAN, (bits & 0x007fffffu) != 0u);
}

// a / b: the kernels' only float division (tests/shaders.rs checks it), so
// that the test feature `emulate-ftz-division` can replace it by the division
// of NVIDIA's Vulkan driver (see FDIV_FLUSHING in src/gpu/kernels.rs).
fn fdiv(a: f32, b: f32) -> f32 {
    return a / b;
}

// a / b for every normal b, also |b| >= 2^126: Vulkan bounds the error of a
// division only for |b| in [2^-126, 2^126], and GPUs may divide as a * (1 / b)
// with the reciprocal flushed to zero when it is subnormal (NVIDIA does:
// 1e38 / 1e38 = 0 there), so such a and b are first scaled by 2^-64 (a power
// of two: exact). The quotient then differs from a / b only where a * 2^-64 is
// subnormal, that is where |a / b| < 2^-188 and rounds to zero in f32 anyway.
// (A subnormal b is the denormal policy's: flushed where the GPU flushes.)
fn div_wide(a: f32, b: f32) -> f32 {
    let k = select(1.0, 0x1p-64f, abs(b) >= 0x1p126f);
    return fdiv(a * k, b * k);
}

// Combine two (scale, ssq) pairs.
fn combine_scaled(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let s = max(a.x, b.x);
    if (s == 0.0) {
        return vec2<f32>(0.0, 0.0);
    }
    // The larger scale's own ratio is exactly 1: a division need not give it
    // (x * (1 / x) can be 1 - 2^-24 on a GPU), and mb_norms combines a thread's
    // tiles one after another, so a bias per combine would add up.
    let ra = select(div_wide(a.x, s), 1.0, a.x == s);
    let rb = select(div_wide(b.x, s), 1.0, b.x == s);
    return vec2<f32>(s, a.y * ra * ra + b.y * rb * rb);
}

// Whether the norm written as (scale, root) pair a is smaller than b's, with no
// overflow: the roots lie in [1, sqrt(D)] whenever scale > 0. Equal scales (a
// norm against itself, as the adaptive bound's micro-batch is) compare their
// roots exactly: GPU division need not be correctly rounded (Vulkan allows 2.5
// ULP, and NVIDIA's x / x can miss 1).
fn norm_less(a: vec2<f32>, b: vec2<f32>) -> bool {
    if (b.x == 0.0) {
        return false;
    }
    if (a.x == 0.0) {
        return true;
    }
    if (a.x == b.x) {
        return a.y < b.y;
    }
    return div_wide(a.x, b.x) * div_wide(a.y, b.y) < 1.0;
}
