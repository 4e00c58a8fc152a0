// Pass 3: one workgroup turns the (micro-batch, group) norms into the bound of each
// group (fixed, or adaptive: scale * the smallest norm of the group over the finite
// micro-batches, found by a tree so no host round trip is needed), the factors
// s_{j,g}, the weights s_{j,g} / M used by the weighted sum (as pairs, see
// EXTREME_LOG2), the reported f32 norms,
// the counts, the total bound sqrt(sum_g C_g^2) and the noise scale.
//
// Phases: (A) per micro-batch, the flags of all its groups (a micro-batch is
// non-finite when any group is); (B) per group, the bound and the factors; (C) the
// totals.

const WG: u32 = 256u;
const POLICY_SKIP: u32 = 0u;      // Skip and Error: factor 0 (the host raises Error)
const POLICY_PROPAGATE: u32 = 1u; // factor = min(1, C / norm) in IEEE arithmetic
const FN_HARD: u32 = 0u;          // s = min(1, C / norm), 1 when norm = 0
const FN_AUTOMATIC: u32 = 1u;     // s = C / (norm + gamma)
const FN_NORMALIZE: u32 = 2u;     // s = C / norm, 0 when norm = 0

struct Params {
    micro_batches: u32,
    adaptive: u32,  // 0: fixed bounds in `bounds`; 1: bound = `scale` * min finite norm
    policy: u32,
    groups: u32,    // parameter groups G
    scale: f32,
    function: u32,  // FN_HARD, FN_AUTOMATIC or FN_NORMALIZE
    gamma: f32,     // FN_AUTOMATIC: s = C / (norm + gamma)
    sigma: f32,     // noise multiplier (0 without noise)
    scale_fract: f32, // scale = scale_fract * 2^scale_exp, scale_fract in [0.5, 1),
    scale_exp: i32,   // split on the host: exact for a subnormal scale, which a
                      // GPU may flush before a frexp here
    pad0: u32,
    pad1: u32,
}

struct Stats {
    total_bound: f32, // S = sqrt(sum_g C_g^2)
    clipped: u32,
    nonfinite: u32,
    first_nonfinite: u32,
    noise_scale: f32, // sigma * S / M
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> mb_norms: array<MbNorm>;
@group(0) @binding(2) var<storage, read_write> factors: array<f32>;
@group(0) @binding(3) var<storage, read_write> weights: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: Stats;
@group(0) @binding(6) var<storage, read_write> bounds: array<f32>; // C_g: in when fixed, out
@group(0) @binding(7) var<storage, read_write> mb_flags: array<u32>;

var<workgroup> red_min: array<vec2<f32>, WG>;
var<workgroup> red_found: array<u32, WG>;
var<workgroup> clipped: atomic<u32>;
var<workgroup> nonfinite: atomic<u32>;
var<workgroup> first_nonfinite: atomic<u32>;

fn nan_f32() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

fn inf_f32() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

// Weights beyond 2^+-EXTREME_LOG2 (factors C / norm of tiny or huge norms) go
// to pass 4 as a pair (2^-k, w 2^k), k the exponent of the norm's scale, which
// weighted_means applies as (w 2^k) * (2^-k * mean): the scaled mean is near its
// unit vector, so neither the factor (C / 1e-37 overflows f32, and inf * 0 = NaN
// in a zero column) nor the weight (C / 1e40 is subnormal, 0 where denormals
// flush) has to fit f32 by itself. Every other weight is the pair (1, w): the
// same bits as w * mean.
const EXTREME_LOG2: i32 = 60;

// a * b * 2^shift with the power of two split so that no partial result
// overflows or vanishes unless the result does: the part of it that brings a
// toward 1 first, the rest after the product. (Applied whole before or after
// the product, a ratio of 1e-18 under 2^+66 lost bits as a subnormal product,
// and one of 1e-36 under 2^+128 vanished: a review, twenty-fifth session.)
// With shift = 0, a * b.
fn times_pow2(a: f32, b: f32, shift: i32) -> f32 {
    let first = clamp(-frexp(a).exp, min(shift, 0i), max(shift, 0i));
    return ldexp(ldexp(a, first) * b, shift - first);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    let m = params.micro_batches;
    let groups = params.groups;
    if (lid == 0u) {
        atomicStore(&clipped, 0u);
        atomicStore(&nonfinite, 0u);
        atomicStore(&first_nonfinite, 0xffffffffu);
    }
    workgroupBarrier();

    // (A) Micro-batch flags.
    for (var j = lid; j < m; j += WG) {
        var flags = 0u;
        for (var g = 0u; g < groups; g++) {
            flags |= mb_norms[j * groups + g].flags;
        }
        mb_flags[j] = flags;
        if (flags != 0u) {
            atomicAdd(&nonfinite, 1u);
            atomicMin(&first_nonfinite, j);
        }
    }
    storageBarrier();

    // (B) Per group. Every thread also sums C_g^2 as a (scale, ssq) pair (the
    // bounds are the same in all threads), so the total bound sqrt(sum_g C_g^2) and
    // the noise scale are formed without overflow even when a bound is beyond
    // f32::MAX.
    let inv_m = div_wide(1.0, f32(m));
    var sens = vec2<f32>(0.0, 0.0);
    var sens_valid = true;
    // An adaptive scale beyond 2^-16..2^16: its mantissa goes into the bounds'
    // pairs and its power of two, 2^shift, is applied to each result formed from
    // them (ratios, bounds, the total bound), never to a pair: a pair's root squared
    // (the total bound) would overflow or vanish, its scale leave f32's range
    // where the bound itself does not. Within the range shift = 0 and the scale
    // goes into the root whole (the bound's own micro-batch then has ratio
    // exactly 1 at scale 1).
    var shift = 0i;
    var to_root = params.scale;
    if (params.adaptive == 1u && (params.scale > 65536.0 || params.scale < 0x1p-16f)) {
        shift = params.scale_exp;
        to_root = params.scale_fract;
    }
    for (var g = 0u; g < groups; g++) {
        // Smallest norm over the finite micro-batches, as a (scale, root) pair.
        var best = vec2<f32>(0.0, 0.0);
        var found = 0u;
        if (params.adaptive == 1u) {
            for (var j = lid; j < m; j += WG) {
                let n = mb_norms[j * groups + g];
                let v = vec2<f32>(n.scale, n.root);
                if (mb_flags[j] == 0u && (found == 0u || norm_less(v, best))) {
                    best = v;
                    found = 1u;
                }
            }
        }
        red_min[lid] = best;
        red_found[lid] = found;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                let other = red_min[lid + s];
                if (red_found[lid + s] == 1u
                    && (red_found[lid] == 0u || norm_less(other, red_min[lid]))) {
                    red_min[lid] = other;
                    red_found[lid] = 1u;
                }
            }
            workgroupBarrier();
        }
        // The bound as a (scale, root) pair: C = bound.x * bound.y * 2^shift.
        // Fixed bounds are only read and adaptive ones only written, by thread 0
        // after the barrier below: no thread reads what another writes.
        var bound = vec2<f32>(1.0, 1.0);
        var bound_valid = true;
        if (params.adaptive == 0u) {
            bound.x = bounds[g];
        } else {
            // The scale (its mantissa when split) goes into the root, so the
            // pair's scale stays a norm's.
            bound = vec2<f32>(red_min[0].x, red_min[0].y * to_root);
            bound_valid = red_found[0] == 1u;
        }
        workgroupBarrier(); // everyone has read red_min before the next group's tree
        sens = combine_scaled(sens, vec2<f32>(bound.x, bound.y * bound.y));
        sens_valid = sens_valid && bound_valid;

        for (var j = lid; j < m; j += WG) {
            let at = j * groups + g;
            let n = mb_norms[at];
            var factor = 1.0;
            var norm = n.scale * n.root;
            // The weight as a pair (see EXTREME_LOG2): extreme, factor_k = factor 2^k.
            var k = 0i;
            var ratio_k = 0.0;
            var extreme = false;
            var log2_ratio = 0i;
            var factor_k = 0.0;
            var finite_k = false;
            if (!bound_valid && params.policy == POLICY_PROPAGATE) {
                // An adaptive bound without a finite micro-batch is NaN, and so
                // is every factor of its group (plain arithmetic).
                factor = nan_f32();
                norm = select(norm, select(inf_f32(), nan_f32(), (n.flags & FLAG_NAN) != 0u), n.flags != 0u);
            } else if (n.flags != 0u) {
                let has_nan = (n.flags & FLAG_NAN) != 0u;
                norm = select(inf_f32(), nan_f32(), has_nan);
                // Propagate: min(1, C / NaN) = NaN, min(1, C / inf) = 0.
                factor = select(0.0, select(0.0, nan_f32(), has_nan), params.policy == POLICY_PROPAGATE);
            } else {
                // C / norm without forming either.
                let positive = n.scale > 0.0;
                var ratio = 1.0;
                if (positive) {
                    // The ratio times 2^k without forming the ratio: n.scale =
                    // mant * 2^k with mant in [1, 2), k clamped so that 2^-k is a
                    // normal f32 (the mantissa then absorbs the rest: below 1 for
                    // a subnormal scale, down to 2^-23). One division by mant * root
                    // (>= 2^-23), not C / mant times 1 / root: C / mant overflowed
                    // for a subnormal scale where the ratio fits.
                    let fr = frexp(n.scale);
                    k = clamp(fr.exp - 1, -126, 126);
                    ratio_k = times_pow2(div_wide(bound.x, ldexp(n.scale, -k) * n.root), bound.y, shift);
                    // An infinite ratio_k (a ratio above 2^(128 - k): k > 0, not a
                    // tiny norm; or C near f32::MAX over a subnormal scale) keeps
                    // the plain weight, as before pairs.
                    finite_k = ratio_k <= 3.4028235e38;
                    log2_ratio = select(0i, frexp(ratio_k).exp - k, finite_k);
                    extreme = finite_k && abs(log2_ratio) > EXTREME_LOG2;
                    if (bound.x == n.scale) {
                        // Equal scales (the adaptive bound's own micro-batch): the
                        // ratio of roots, exactly 1 there.
                        ratio = ldexp(div_wide(bound.y, n.root), shift);
                    } else if (finite_k && ratio_k > 0.0) {
                        // ratio_k / 2^k (exact, a power of two): its quotient
                        // C / (mant * root) stays near C's magnitude, where the
                        // plain C / n.scale below can overflow (n.scale < 1, the
                        // root >= 1 not yet divided), vanish or turn subnormal
                        // (near 1e-41 under an adaptive bound's 2^+67 it lost
                        // 2.5e-5 of the factor, near 1e-56 under 2^+128 it
                        // vanished: the micro-batch dropped; a review,
                        // twenty-fifth session).
                        ratio = ldexp(ratio_k, -k);
                    } else {
                        // Ratios of scales, then of roots.
                        ratio = times_pow2(div_wide(bound.x, n.scale), div_wide(bound.y, n.root), shift);
                    }
                }
                // norm > C, decided exactly when the scales are equal (GPU
                // division need not be correctly rounded: C / C can miss 1).
                let over = positive && select(ratio < 1.0, bound.y < n.root, bound.x == n.scale && shift == 0i);
                let finite_mb = mb_flags[j] == 0u;
                if (over && finite_mb) {
                    atomicAdd(&clipped, 1u);
                }
                if (!finite_mb && params.policy != POLICY_PROPAGATE) {
                    factor = 0.0; // Skip drops the whole micro-batch
                } else if (params.function == FN_HARD) {
                    factor = select(1.0, ratio, over);
                    // Only a clipped factor can be extreme (tiny: a huge norm).
                    extreme = extreme && over;
                    factor_k = ratio_k;
                } else if (params.function == FN_NORMALIZE) {
                    factor = select(0.0, ratio, positive);
                    factor_k = ratio_k;
                } else {
                    // C / (norm + gamma) = (C / norm) * (norm / (norm + gamma)), so
                    // neither C nor the norm has to fit in f32 (nor norm + gamma:
                    // see the shrink below), and a zero norm gives C / gamma.
                    // C / (norm + gamma) <= C / gamma: a tiny norm (C / norm beyond
                    // 2^EXTREME_LOG2) is divided directly. Only where that
                    // overflows f32 (C / gamma > f32::MAX) does its weight go as a
                    // pair from ratio_k, like Normalize's, so that the
                    // micro-batch's terms stay finite wherever s_j g_j is.
                    // (Also where ratio_k overflowed for a subnormal scale: the
                    // ratio is then huge too.)
                    // The shrink norm / (norm + gamma): directly where
                    // norm + gamma fits f32, else as 1 / (1 + gamma / norm) from
                    // the norm's pair (a norm or gamma near f32::MAX, or a norm
                    // beyond it). Before, an overflowing sum gave a factor of 0
                    // (the micro-batch dropped) and a norm beyond f32::MAX left
                    // out gamma (a review, thirtieth session).
                    let sum = norm + params.gamma;
                    let shrink = select(
                        div_wide(1.0, 1.0 + div_wide(div_wide(params.gamma, n.scale), n.root)),
                        div_wide(norm, sum),
                        sum <= 3.4028235e38,
                    );
                    factor_k = ratio_k * shrink;
                    if (!positive || log2_ratio > EXTREME_LOG2 || (!finite_k && k < 0i)) {
                        factor = ldexp(div_wide(bound.x * bound.y, sum), shift);
                        extreme = extreme && nonfinite_flags(factor) != 0u;
                    } else {
                        factor = ratio * shrink;
                    }
                }
            }
            factors[at] = factor;
            // A group whose mean is exactly zero adds nothing, whatever its
            // factor (C / gamma under AUTO-S may overflow f32: inf * 0 = NaN).
            // (Not a NaN factor: a NaN bound's group stays NaN under Propagate.)
            let zero = n.flags == 0u && n.scale == 0.0 && (bound_valid || params.policy != POLICY_PROPAGATE);
            var pair = vec2<f32>(1.0, factor * inv_m);
            // (A finite group of a non-finite micro-batch: its factor under
            // Propagate, 0 under Skip.)
            if (extreme && n.flags == 0u && (mb_flags[j] == 0u || params.policy == POLICY_PROPAGATE)) {
                pair = vec2<f32>(ldexp(1.0, -k), factor_k * inv_m);
            }
            weights[at] = select(pair, vec2<f32>(1.0, 0.0), zero);
            norms[at] = norm;
        }
        if (lid == 0u && params.adaptive == 1u) {
            bounds[g] = select(nan_f32(), times_pow2(bound.x, bound.y, shift), bound_valid);
        }
    }

    // (C) Totals, once every thread's last additions to `clipped` are done.
    workgroupBarrier();
    if (lid == 0u) {
        let root = sqrt(sens.y);
        var total_bound = times_pow2(sens.x, root, shift);
        var noise_scale = times_pow2((params.sigma * inv_m) * sens.x, root, shift);
        if (!sens_valid) {
            // No finite micro-batch for an adaptive bound: NaN, but sigma = 0
            // still adds no noise.
            total_bound = nan_f32();
            noise_scale = select(nan_f32(), 0.0, params.sigma == 0.0);
        }
        stats = Stats(total_bound, atomicLoad(&clipped), atomicLoad(&nonfinite),
            atomicLoad(&first_nonfinite), noise_scale, 0u, 0u, 0u);
    }
}
