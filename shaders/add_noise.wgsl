// Pass 5 (only with Gaussian noise): out_p[c] += noise_scale * z_e, one thread per
// output element, where e = first + c numbers the outputs of all tensors in order
// and noise_scale = sigma * S / M (S the total bound) comes from clip_factors. z_e is drawn by
// Philox4x32-10 (key = seed, counter = (e / 2, step)) and Box-Muller on a 64-bit
// uniform for the radius, exactly as src/noise.rs does on the CPU, so it depends
// on nothing but (seed, step, e). Mode 1 writes word e of the Philox stream
// instead (word e % 4 of counter e / 4), mode 2 the f32 bits of z_e (both for
// tests).

const WG: u32 = 256u;
const MODE_ADD_NOISE: u32 = 0u;
const MODE_RAW_WORDS: u32 = 1u;
const MODE_NORMALS: u32 = 2u;

struct Params {
    cols: u32,
    out_offset: u32, // element index of out_p[0] in `out`
    first_lo: u32,   // e of out_p[0], as a 64-bit (lo, hi) pair
    first_hi: u32,
    seed_lo: u32,
    seed_hi: u32,
    step_lo: u32,
    step_hi: u32,
    groups_x: u32,   // column group = wg.x + wg.y * groups_x
    mode: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> stats: array<f32>; // clip_factors' Stats
@group(0) @binding(2) var<storage, read_write> out: array<u32>; // f32 bits

const STATS_NOISE_SCALE: u32 = 4u;

// (hi, lo) 32-bit halves of the 64-bit product a * b.
fn mul_hi_lo(a: u32, b: u32) -> vec2<u32> {
    let al = a & 0xffffu;
    let ah = a >> 16u;
    let bl = b & 0xffffu;
    let bh = b >> 16u;
    let ll = al * bl;
    let lh = al * bh;
    let hl = ah * bl;
    let hh = ah * bh;
    let mid = (ll >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    return vec2<u32>(hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u), a * b);
}

fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) {
            k += vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mul_hi_lo(0xD2511F53u, c.x);
        let p1 = mul_hi_lo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}

// A word as a uniform in (0, 1): (2 * (w >> 9) + 1) / 2^24, exact in f32.
fn uniform01(w: u32) -> f32 {
    return f32(2u * (w >> 9u) + 1u) * 5.9604645e-8;
}

// (x + 1/2) / 2^64 for x = hi * 2^32 + lo, in (0, 1), to f32's relative precision
// (about 2^-24) down to 2^-65: the radius's uniform, whose smallest value sets
// the cut tail (9.49 standard deviations; src/noise.rs says why it matters).
fn unit64(hi: u32, lo: u32) -> f32 {
    return f32(hi) * 0x1p-32f + (f32(lo) * 0x1p-64f + 0x1p-65f);
}

// -ln u, u = unit64(hi, lo). Near u = 1 the radius sqrt(-2 ln u) is tiny, and
// `log` has only an absolute error bound there (2^-21 in Vulkan; lavapipe's is
// that coarse), which made tiny radii wrong by up to 30 %. So for v = 1 - u < 1/16
// (v = unit64 of the complement, to f32's relative precision) it sums the series
// of -ln(1 - v) = v + v^2/2 + ... + v^7/7 (the rest is below 5e-10 of the sum);
// elsewhere -ln u >= 0.064 and log's absolute error is below 8e-6 of it.
fn neg_log_unit64(hi: u32, lo: u32) -> f32 {
    let v = unit64(~hi, ~lo);
    if (v < 0.0625) {
        let tail = 0.2 + v * (0.16666667 + v * 0.14285715);
        return v * (1.0 + v * (0.5 + v * (0.33333334 + v * (0.25 + v * tail))));
    }
    return -log(unit64(hi, lo));
}

// The Philox block of counter c (64 bits) for this call's seed and step.
fn block(c: vec2<u32>) -> vec4<u32> {
    return philox4x32_10(
        vec4<u32>(c.x, c.y, params.step_lo, params.step_hi),
        vec2<u32>(params.seed_lo, params.seed_hi),
    );
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (col >= params.cols) {
        return;
    }
    let e_lo = params.first_lo + col;
    let e_hi = params.first_hi + select(0u, 1u, e_lo < col);
    let at = params.out_offset + col;
    if (params.mode == MODE_RAW_WORDS) {
        out[at] = block(vec2<u32>((e_lo >> 2u) | (e_hi << 30u), e_hi >> 2u))[e_lo & 3u];
        return;
    }
    let words = block(vec2<u32>((e_lo >> 1u) | (e_hi << 31u), e_hi >> 1u));
    let r = sqrt(2.0 * neg_log_unit64(words.x, words.y));
    let theta = 6.2831855 * uniform01(words.z) - 3.1415927;
    let z = select(r * sin(theta), r * cos(theta), (e_lo & 1u) == 0u);
    if (params.mode == MODE_NORMALS) {
        out[at] = bitcast<u32>(z);
        return;
    }
    out[at] = bitcast<u32>(bitcast<f32>(out[at]) + stats[STATS_NOISE_SCALE] * z);
}
