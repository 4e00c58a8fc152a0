// Pass 4 when pass 1 materialised the micro-batch means (see `materialize_means` in
// src/gpu/plan.rs): out_p[c] = sum_j w_{j,g} * mean_j[c], one thread per column, reading
// the M x D_p means instead of re-reading the N rows. Micro-batch terms are
// accumulated in blocks of ROW_BLOCK (sum of block sums), as in weighted_sum.

const WG: u32 = 256u;

struct Params {
    cols: u32,
    means_base: u32,    // element index of mean_0[0] of this tensor in `means`
    micro_batches: u32,
    groups_x: u32,      // column group = wg.x + wg.y * groups_x
    out_offset: u32,    // element index of out_p[0] in `out`
    skip_zero: u32,     // 1: a zero weight skips its micro-batch (so 0 * NaN never happens)
    groups: u32,        // parameter groups G: weights are [M, G]
    group: u32,         // this tensor's group
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> means: array<f32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (col >= params.cols) {
        return;
    }
    var total = 0.0;
    var block = 0.0;
    var in_block = 0u;
    var idx = params.means_base + col;
    for (var j = 0u; j < params.micro_batches; j++) {
        let w = weights[j * params.groups + params.group];
        let mean = means[idx];
        idx += params.cols;
        if (params.skip_zero == 1u && w == 0.0) {
            continue;
        }
        block += w * mean;
        in_block += 1u;
        if (in_block == ROW_BLOCK) {
            total += block;
            block = 0.0;
            in_block = 0u;
        }
    }
    out[params.out_offset + col] = total + block;
}
