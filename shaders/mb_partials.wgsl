// Pass 1: segmented reduction over rows. One workgroup of WG = 64 threads per
// (column tile of TILE = 4096 columns, micro-batch of the window). Each thread walks
// its columns of the tile (strided by WG, so loads coalesce), forms the micro-batch
// mean of each column (`column_mean`, blocked) and accumulates its squared norm
// privately; the workgroup then does ONE tree reduction and writes the tile's
// (scale, ssq, flags) record. Per workgroup: 7 barriers for 4096 columns.
//
// Scaled sum of squares in one pass, without divisions (Blue's algorithm, as in
// LAPACK 3.10's snrm2 / Anderson 2017, "Algorithm 978"): three accumulators with
// constant power-of-two scalings, for magnitudes below T_SML = 2^-63, between,
// and above T_BIG = 2^52. None can overflow or lose the small terms that matter. The maximum |g|
// comes for free as an integer max over the bits (the order of |float| bits is
// the order of magnitudes), which also yields the NaN/Inf flags: any NaN puts the
// max above 0x7f800000, an Inf (without NaN) makes it equal. At the end lane 0
// rewrites the three sums as (scale = max |g|, ssq = sum (g / scale)^2), the record
// the later passes expect (ssq in [1, TILE]).
//
// A tensor larger than one storage binding is processed in row windows. A
// micro-batch cut by a window boundary passes its partial column sums to the next
// window through `carry` (two halves, read one and write the other, so no workgroup
// reads what another writes in the same dispatch).

const WG: u32 = 64u;
const TILE: u32 = 4096u; // columns per workgroup; must match TILE_COLS in plan.rs

// Blue's thresholds and scalings for f32 (all powers of two, so scaling is exact).
// Terms: |g| < T_SML: (g * S_SML)^2 < 2^74; T_SML <= |g| <= T_BIG: g^2 <= 2^104;
// |g| > T_BIG: (g * S_BIG)^2 < 2^104. Sums of 2^20 such terms stay below f32::MAX.
// S_SML is larger than LAPACK's 2^75 so that subnormal g still square to normals.
const S_SML: f32 = 0x1p100f;
const S_BIG: f32 = 0x1p-76f;
const INV_S_SML: f32 = 0x1p-100f;
const INV_S_BIG: f32 = 0x1p76f;
const T_SML_BITS: u32 = 0x20000000u; // bits of T_SML = 2^-63
const T_BIG_BITS: u32 = 0x59800000u; // bits of T_BIG = 2^52
const INF_BITS: u32 = 0x7f800000u;

struct Params {
    cols: u32,          // D_p
    elem_offset: u32,   // element index in `grads` of (row_start, column 0)
    row_start: u32,     // first row of the window
    row_end: u32,       // one past the last row of the window
    mb_first: u32,      // first micro-batch touching the window
    tiles: u32,         // column tiles of this tensor
    tiles_x: u32,       // tiles per dispatch row (x); tile = wg.x + wg.y * tiles_x
    tile_base: u32,     // global index of this tensor's first tile
    tiles_total: u32,   // tiles over all tensors (row stride of `partials`)
    carry_in: u32,      // 1: the window's first micro-batch began in an earlier window
    carry_out: u32,     // 1: the window's last micro-batch goes on in a later window
    last_local: u32,    // index (within the window) of the window's last micro-batch
    carry_in_base: u32, // element offsets of the two halves of `carry`
    carry_out_base: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grads: array<f32>;
@group(0) @binding(2) var<storage, read> offsets: array<u32>;
@group(0) @binding(3) var<storage, read_write> partials: array<Partial>;
@group(0) @binding(4) var<storage, read_write> carry: array<f32>;

// (small, medium, big) sums of squares, and the max |g| bits.
var<workgroup> red_sums: array<vec3<f32>, WG>;
var<workgroup> red_max: array<u32, WG>;

// The partial squared norm held by Blue's three sums, as (scale, ssq) with
// scale = max_abs: scale^2 * ssq = sml / S_SML^2 + med + big / S_BIG^2. Each
// ratio below is formed so that it neither overflows nor underflows unless the
// term it scales is negligible next to max_abs^2.
fn blue_to_scaled(sums: vec3<f32>, max_abs: f32) -> vec2<f32> {
    if (max_abs == 0.0) {
        return vec2<f32>(0.0, 0.0);
    }
    let r_sml = (INV_S_SML / max_abs); // <= 2^-37 when max_abs >= T_SML
    var ssq = 0.0;
    if (sums.z > 0.0) {
        // max_abs > T_BIG: r_big in [2^-52, 2^24).
        let r_big = INV_S_BIG / max_abs;
        ssq = (sums.z * r_big) * r_big + (sums.y / max_abs) / max_abs;
    } else if (sums.y > 0.0) {
        // T_SML <= max_abs <= T_BIG.
        ssq = (sums.y / max_abs) / max_abs + (sums.x * r_sml) * r_sml;
    } else {
        // max_abs < T_SML: r_sml in (2^-37, 2^49].
        ssq = (sums.x * r_sml) * r_sml;
    }
    return vec2<f32>(max_abs, ssq);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * params.tiles_x;
    if (tile >= params.tiles) {
        return; // whole workgroup: uniform
    }
    let local_mb = wg.z;
    let mb = params.mb_first + local_mb;
    let mb_lo = offsets[mb];
    let mb_hi = offsets[mb + 1u];
    let inv_n = 1.0 / f32(mb_hi - mb_lo);
    let lo = max(mb_lo, params.row_start);
    let hi = min(mb_hi, params.row_end);
    let rows = hi - lo;
    let takes_carry = local_mb == 0u && params.carry_in == 1u;
    let gives_carry = local_mb == params.last_local && params.carry_out == 1u;
    let row0 = params.elem_offset + (lo - params.row_start) * params.cols;
    let col_end = min(params.cols, (tile + 1u) * TILE);

    var sums = vec3<f32>(0.0);
    var max_bits = 0u;
    for (var col = tile * TILE + lid; col < col_end; col += WG) {
        var v = column_mean(row0 + col, rows, params.cols, inv_n);
        if (takes_carry) {
            v += carry[params.carry_in_base + col];
        }
        if (gives_carry) {
            carry[params.carry_out_base + col] = v;
        }
        // Classified on the bits (NaN/Inf fall in no class, whatever the compiler
        // assumes about float comparisons); branch-free.
        let bits = bitcast<u32>(v) & 0x7fffffffu;
        max_bits = max(max_bits, bits);
        let sml = bits < T_SML_BITS;
        let big = bits > T_BIG_BITS && bits < INF_BITS;
        let med = bits >= T_SML_BITS && bits <= T_BIG_BITS;
        let t = v * select(select(1.0, S_SML, sml), S_BIG, big);
        sums += select(vec3<f32>(0.0), vec3<f32>(t * t), vec3<bool>(sml, med, big));
    }
    if (gives_carry) {
        return; // whole workgroup: uniform; the norm is formed in a later window
    }

    red_sums[lid] = sums;
    red_max[lid] = max_bits;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_sums[lid] += red_sums[lid + s];
            red_max[lid] = max(red_max[lid], red_max[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let at = mb * params.tiles_total + params.tile_base + tile;
        let m = red_max[0];
        var flags = 0u;
        var rec = vec2<f32>(0.0, 0.0);
        if (m > INF_BITS) {
            flags = FLAG_NAN;
        } else if (m == INF_BITS) {
            flags = FLAG_INF;
        } else {
            rec = blue_to_scaled(red_sums[0], bitcast<f32>(m));
        }
        partials[at] = Partial(rec.x, rec.y, flags, 0u);
    }
}
