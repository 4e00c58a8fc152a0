// Pass 4 when pass 1 materialised the micro-batch means (see `materialize_means` in
// src/gpu/plan.rs), or at b = 1 on the input rows themselves (`rows_are_means`):
// out_p[c] = sum_j w_{j,g} * mean_j[c] (g the tensor's group), reading M rows of means instead of re-deriving
// them from the N input rows. One thread per 4 adjacent columns: one vec4 load per
// micro-batch when the means rows are 16-byte aligned in the binding, else 4 scalar
// loads (same arithmetic, same bits). Micro-batch terms are accumulated in blocks of
// ROW_BLOCK (sum of block sums), as in weighted_sum.

const WG: u32 = 256u;

struct Params {
    cols: u32,
    means_base: u32,    // element index of mean_0[0] of this tensor in `means`
    micro_batches: u32,
    groups_x: u32,      // column group = wg.x + wg.y * groups_x (WG * 4 columns each)
    out_offset: u32,    // element index of out_p[0] in `out`
    skip_zero: u32,     // 1: a zero weight skips its micro-batch (so 0 * NaN never happens)
    vec4_path: u32,     // 1: cols and means_base are multiples of 4: read `grads4`
    groups: u32,        // parameter groups G: weights are [M, G]
    group: u32,         // this tensor's group
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// The means (f32), or at b = 1 the input rows (any element type): read through
// grad_at / grad_quad of grads_<type>.wgsl.
@group(0) @binding(1) var<storage, read> grads: array<GradWord>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer range as `grads`, four elements at a time (a dummy when
// vec4_path = 0).
@group(0) @binding(4) var<storage, read> grads4: array<GradQuad>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col0 = ((wg.x + wg.y * params.groups_x) * WG + lid) * 4u;
    if (col0 >= params.cols) {
        return;
    }
    let full = col0 + 4u <= params.cols;
    var total = vec4<f32>(0.0);
    var block = vec4<f32>(0.0);
    var in_block = 0u;
    var idx = params.means_base + col0;
    for (var j = 0u; j < params.micro_batches; j++) {
        let w = weights[j * params.groups + params.group];
        var mean = vec4<f32>(0.0);
        if (params.vec4_path == 1u && full) {
            mean = grad_quad(idx >> 2u);
        } else if (full) {
            mean = vec4<f32>(grad_at(idx), grad_at(idx + 1u), grad_at(idx + 2u), grad_at(idx + 3u));
        } else {
            for (var k = 0u; k < 4u; k++) {
                if (col0 + k < params.cols) {
                    mean[k] = grad_at(idx + k);
                }
            }
        }
        idx += params.cols;
        if (params.skip_zero == 1u && w == 0.0) {
            continue;
        }
        block += w * mean;
        in_block += 1u;
        if (in_block == ROW_BLOCK) {
            total += block;
            block = vec4<f32>(0.0);
            in_block = 0u;
        }
    }
    let sum = total + block;
    for (var k = 0u; k < 4u; k++) {
        if (col0 + k < params.cols) {
            out[params.out_offset + col0 + k] = sum[k];
        }
    }
}
