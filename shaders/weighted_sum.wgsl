// Pass 4: out_p[c] = sum_j w_j * mean_j[c] with w_j = s_{j,g} / M (g the tensor's
// parameter group), one thread per column,
// re-reading the rows of the window. Micro-batch terms are accumulated in blocks of
// ROW_BLOCK (sum of block sums). Windows after the first add to the output.

const WG: u32 = 256u;

struct Params {
    cols: u32,
    elem_offset: u32,
    row_start: u32,
    row_end: u32,
    mb_first: u32,
    mb_count: u32,
    groups_x: u32,   // column group = wg.x + wg.y * groups_x
    out_offset: u32, // element index of out_p[0] in `out`
    accumulate: u32, // 1: add to what `out` holds (not the first window)
    skip_zero: u32,  // 1: a zero weight skips its micro-batch (so 0 * NaN never happens)
    groups: u32,     // parameter groups G: weights are [M, G]
    group: u32,      // this tensor's group
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grads: array<GradWord>;
@group(0) @binding(2) var<storage, read> offsets: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Declared for the loader's grad_quad, which this kernel never calls (one column
// per thread): statically unused, so not part of the pipeline's layout.
@group(0) @binding(5) var<storage, read> grads4: array<GradQuad>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (col >= params.cols) {
        return;
    }
    var total = 0.0;
    var block = 0.0;
    var in_block = 0u;
    for (var k = 0u; k < params.mb_count; k++) {
        let mb = params.mb_first + k;
        let w = weights[mb * params.groups + params.group];
        if (params.skip_zero == 1u && w == 0.0) {
            continue;
        }
        let mb_lo = offsets[mb];
        let mb_hi = offsets[mb + 1u];
        let lo = max(mb_lo, params.row_start);
        let hi = min(mb_hi, params.row_end);
        let first = params.elem_offset + (lo - params.row_start) * params.cols + col;
        block += w * column_mean(first, hi - lo, params.cols, 1.0 / f32(mb_hi - mb_lo));
        in_block += 1u;
        if (in_block == ROW_BLOCK) {
            total += block;
            block = 0.0;
            in_block = 0u;
        }
    }
    total += block;
    let at = params.out_offset + col;
    if (params.accumulate == 1u) {
        total += out[at];
    }
    out[at] = total;
}
