// Pass 3: one workgroup turns the micro-batch norms into the clip bound (fixed, or
// adaptive: scale * the smallest finite norm, found by a tree so no host round trip
// is needed), the factors s_j = min(1, C / norm_j), the weights s_j / M used by the
// weighted sum, the reported f32 norms and the counts.

const WG: u32 = 256u;
const POLICY_SKIP: u32 = 0u;      // Skip and Error: factor 0 (the host raises Error)
const POLICY_PROPAGATE: u32 = 1u; // factor = min(1, C / norm) in IEEE arithmetic
const FN_HARD: u32 = 0u;          // s = min(1, C / norm), 1 when norm = 0
const FN_AUTOMATIC: u32 = 1u;     // s = C / (norm + gamma)
const FN_NORMALIZE: u32 = 2u;     // s = C / norm, 0 when norm = 0

struct Params {
    micro_batches: u32,
    adaptive: u32,  // 0: fixed bound `bound`; 1: bound = `bound` * min finite norm
    policy: u32,
    pad: u32,
    bound: f32,
    function: u32, // FN_HARD, FN_AUTOMATIC or FN_NORMALIZE
    gamma: f32,    // FN_AUTOMATIC: s = C / (norm + gamma)
    pad1: f32,
}

struct Stats {
    clip_bound: f32,
    clipped: u32,
    nonfinite: u32,
    first_nonfinite: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> mb_norms: array<MbNorm>;
@group(0) @binding(2) var<storage, read_write> factors: array<f32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: Stats;

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

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    let m = params.micro_batches;
    if (lid == 0u) {
        atomicStore(&clipped, 0u);
        atomicStore(&nonfinite, 0u);
        atomicStore(&first_nonfinite, 0xffffffffu);
    }

    // Smallest finite norm (as a (scale, root) pair), for the adaptive bound.
    var best = vec2<f32>(0.0, 0.0);
    var found = 0u;
    for (var j = lid; j < m; j += WG) {
        let n = mb_norms[j];
        let v = vec2<f32>(n.scale, n.root);
        if (n.flags == 0u && (found == 0u || norm_less(v, best))) {
            best = v;
            found = 1u;
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
    // The bound as a (scale, root) pair: C = bound.x * bound.y.
    var bound = vec2<f32>(params.bound, 1.0);
    var bound_valid = true;
    if (params.adaptive == 1u) {
        bound = vec2<f32>(red_min[0].x * params.bound, red_min[0].y);
        bound_valid = red_found[0] == 1u;
    }

    let inv_m = 1.0 / f32(m);
    for (var j = lid; j < m; j += WG) {
        let n = mb_norms[j];
        var factor = 1.0;
        var norm = n.scale * n.root;
        if (n.flags != 0u) {
            atomicAdd(&nonfinite, 1u);
            atomicMin(&first_nonfinite, j);
            let has_nan = (n.flags & FLAG_NAN) != 0u;
            norm = select(inf_f32(), nan_f32(), has_nan);
            // Propagate: min(1, C / NaN) = NaN, min(1, C / inf) = 0.
            factor = select(0.0, select(0.0, nan_f32(), has_nan), params.policy == POLICY_PROPAGATE);
        } else {
            // C / norm without forming either: ratios of scales, then of roots.
            let positive = n.scale > 0.0;
            var ratio = 1.0;
            if (positive) {
                ratio = (bound.x / n.scale) * (bound.y / n.root);
            }
            let over = positive && ratio < 1.0; // norm > C
            if (over) {
                atomicAdd(&clipped, 1u);
            }
            if (params.function == FN_HARD) {
                factor = select(1.0, ratio, over);
            } else if (params.function == FN_NORMALIZE) {
                factor = select(0.0, ratio, positive);
            } else {
                // C / (norm + gamma); a norm beyond f32::MAX leaves C / norm.
                factor = select(ratio, (bound.x * bound.y) / (norm + params.gamma), norm <= 3.4028235e38);
            }
        }
        factors[j] = factor;
        weights[j] = factor * inv_m;
        norms[j] = norm;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var c = bound.x * bound.y;
        if (!bound_valid) {
            c = nan_f32();
        }
        stats = Stats(c, atomicLoad(&clipped), atomicLoad(&nonfinite), atomicLoad(&first_nonfinite));
    }
}
