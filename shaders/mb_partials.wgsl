// Pass 1: segmented reduction over rows. One workgroup per (column tile, micro-batch
// of the window); each of its 256 threads owns COLS_PER_THREAD columns of the tile
// (strided by the workgroup size, so loads coalesce). The thread forms the
// micro-batch mean of its columns, then the workgroup reduces the tile's partial
// squared norm to one (scale, ssq, flags) record.
//
// A tensor larger than one storage binding is processed in row windows. A
// micro-batch cut by a window boundary passes its partial column sums to the next
// window through `carry` (two halves, read one and write the other, so no workgroup
// reads what another writes in the same dispatch).

const WG: u32 = 256u;
const COLS_PER_THREAD: u32 = 4u;
const TILE: u32 = 1024u; // WG * COLS_PER_THREAD

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

var<workgroup> red_scale: array<f32, WG>;
var<workgroup> red_ssq: array<f32, WG>;
var<workgroup> red_flags: atomic<u32>;

@compute @workgroup_size(256)
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
    let takes_carry = local_mb == 0u && params.carry_in == 1u;
    let gives_carry = local_mb == params.last_local && params.carry_out == 1u;

    if (lid == 0u) {
        atomicStore(&red_flags, 0u);
    }
    var g = array<f32, COLS_PER_THREAD>();
    var local_max = 0.0;
    var flags = 0u;
    for (var k = 0u; k < COLS_PER_THREAD; k++) {
        let col = tile * TILE + k * WG + lid;
        if (col < params.cols) {
            let first = params.elem_offset + (lo - params.row_start) * params.cols + col;
            var v = column_mean(first, hi - lo, params.cols, inv_n);
            if (takes_carry) {
                v += carry[params.carry_in_base + col];
            }
            if (gives_carry) {
                carry[params.carry_out_base + col] = v;
            }
            g[k] = v;
            let f = nonfinite_flags(v);
            flags |= f;
            if (f == 0u) {
                local_max = max(local_max, abs(v));
            }
        }
    }
    if (gives_carry) {
        return; // whole workgroup: uniform; the norm is formed in a later window
    }

    // Tile scale: max |g| over finite values.
    red_scale[lid] = local_max;
    if (flags != 0u) {
        atomicOr(&red_flags, flags);
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_scale[lid] = max(red_scale[lid], red_scale[lid + s]);
        }
        workgroupBarrier();
    }
    let scale = red_scale[0];

    // Scaled sum of squares.
    var ssq = 0.0;
    if (scale > 0.0) {
        for (var k = 0u; k < COLS_PER_THREAD; k++) {
            let col = tile * TILE + k * WG + lid;
            if (col < params.cols && nonfinite_flags(g[k]) == 0u) {
                let r = g[k] / scale;
                ssq += r * r;
            }
        }
    }
    red_ssq[lid] = ssq;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_ssq[lid] += red_ssq[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let at = mb * params.tiles_total + params.tile_base + tile;
        partials[at] = Partial(scale, red_ssq[0], atomicLoad(&red_flags), 0u);
    }
}
