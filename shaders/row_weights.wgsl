// Pass 4's weight of every input row, when it re-reads the rows (micro-batches of
// several rows whose means were not stored, see `materialize_means` in
// src/gpu/plan.rs): row r of micro-batch j (offsets[j] <= r < offsets[j + 1])
// gets the pair that makes weighted_means (its ROW_RUNS build) sum x_r / n_j over
// the micro-batch, n_j = offsets[j + 1] - offsets[j], and scale that mean by
// w_{j,g} at the micro-batch's last row: sum_j w_{j,g} mean_j, as over M stored
// means. [N, G] weight pairs; one thread per row, its micro-batch found by binary
// search over the offsets.

const WG: u32 = 256u;

struct Params {
    rows: u32,          // N
    micro_batches: u32, // M
    groups: u32,        // parameter groups G: weights are [M, G]
    groups_x: u32,      // row = (wg.x + wg.y * groups_x) * WG + lid
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> offsets: array<u32>;
// Weight pairs (m, r), w = m * r (clip_factors.wgsl's EXTREME_LOG2): the row's
// pair is (m / n_j, r) (or (m, r / n_j) where m / n_j is subnormal), m's sign bit
// set but on the micro-batch's last row (pass 4 sums m x_i over the
// micro-batch's rows, then scales by r).
@group(0) @binding(2) var<storage, read> weights: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> row_weights: array<vec2<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (row >= params.rows) {
        return;
    }
    // The last micro-batch that starts at or before `row` (offsets[0] = 0).
    var lo = 0u;
    var hi = params.micro_batches;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (offsets[mid] <= row) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let n = f32(offsets[lo + 1u] - offsets[lo]);
    // Rows before the micro-batch's last carry m with its sign bit set: pass 4
    // sums them with the next row before scaling (weighted_means.wgsl's
    // run_continues; m itself is positive).
    let goes_on = select(0u, 0x80000000u, row + 1u < offsets[lo + 1u]);
    for (var g = 0u; g < params.groups; g++) {
        let w = weights[lo * params.groups + g];
        // m / n below f32's normal range (m = 2^-126 for a norm near f32::MAX)
        // would flush to 0 where the GPU flushes subnormals: keep m then and
        // divide r instead (m * row is then far from overflowing).
        let m_n = div_wide(w.x, n);
        let pair = select(vec2<f32>(m_n, w.y), vec2<f32>(w.x, div_wide(w.y, n)), m_n < 0x1p-126f);
        let m = bitcast<f32>(bitcast<u32>(pair.x) | goes_on);
        row_weights[row * params.groups + g] = vec2<f32>(m, pair.y);
    }
}
