// Pass 4: out_p[c] = sum_r w_{r,g} * row_r[c] (g the tensor's group) over `rows`
// rows of `grads`: the M micro-batch means when pass 1 stored them (see
// `materialize_means` in src/gpu/plan.rs; weights w_{j,g} = s_{j,g} / M), else the
// input rows of one window (weights per row, w_{j,g} / n_j, from row_weights.wgsl;
// at b = 1 the rows are the means and the micro-batch weights serve). Terms are
// accumulated per column in blocks of ROW_BLOCK (sum of block sums); windows after
// a tensor's first add to its output.
//
// A workgroup of 64 threads covers WG = 64 * QUADS groups of 4 adjacent columns
// (quads), 2048 columns. Each run of RUN threads owns RUN * QUADS adjacent quads:
// thread t of the run sums quads t, t + RUN, ..., t + 7 RUN (with vec4_path = 2
// quads 8 t .. 8 t + 7, see below), so each of its QUADS
// loads per row is one of RUN adjacent quads, and the run reads
// RUN * QUADS * 16 = 1 KiB contiguous bytes of every row per visit. On lavapipe
// (SIMD-8 groups that each run the whole loop before the next starts) 4 quads per
// thread made the pass 1.7x faster at b = 1 than one quad per thread, and 8
// quads another 5-20% than 4 (longer visits of each row; 7 of 8 alternating
// pairs).
// QUADS separate accumulators, not an array: a row-walking variant with private
// arrays was slower on llvmpipe (see BENCHMARKS.md). With vec4_path = 1 (rows 16-byte aligned
// in the binding: the stored means, whose rows are padded to whole quads, or
// input rows of a multiple of 4 elements) every quad is one vec4 load, a last
// partial one too (its padding is loaded, never stored); a thread whose QUADS
// quads do not all exist sums them one at a time. Unaligned rows are read, with
// vec4_path = 2 (a software adapter, the binding rounded up to whole quads), as
// 9 aligned loads shifted into the thread's 8 adjacent quads, else with scalar
// loads; always with the same operations per column in the same order, so
// alignment changes no bit of the result.

const WG: u32 = 512u;

struct Params {
    cols: u32,
    means_base: u32,    // element index in `grads` of row 0, column 0 (this tensor's
                        // first mean, or the window's first input row)
    rows: u32,          // rows summed: M means, or the rows of a window
    groups_x: u32,      // (entry 0) column group = wg.x + wg.y * groups_x (WG * 4 columns each)
    out_offset: u32,    // element index of out_p[0] in `out`
    skip_zero: u32,     // 1: a zero weight skips its row (so 0 * NaN never happens)
    vec4_path: u32,     // 1: stride and means_base are multiples of 4: read `grads4`
                        // (every quad, a last partial one too: the stored means'
                        // rows are padded to 4 elements, input rows are then whole quads);
                        // 2: unaligned rows, `grads4` bound in whole quads: shifted
                        // aligned loads; 0: scalar loads
    groups: u32,        // parameter groups G: weights are [rows, G]
    group: u32,         // this tensor's group
    stride: u32,        // elements from one row to the next: cols, or cols
                        // rounded up to 4 for the stored means
    weights_base: u32,  // weight row of the first row (the window's first row)
    accumulate: u32,    // 1: add to what `out` holds (not the tensor's first window)
    first_group: u32,   // this entry's first column group among the dispatch's
    entries: u32,       // (entry 0) entries of the table in use
    dispatch_groups: u32, // (entry 0) column groups of all entries
    pad: u32,
}

// One dispatch serves up to TABLE_LEN tensors (or windows, tensor_table.wgsl):
// their column groups are numbered one after the other.
@group(0) @binding(0) var<uniform> table: array<Params, TABLE_LEN>;
// The workgroup's entry of the table.
var<private> params: Params;

fn table_first(k: u32) -> u32 {
    return table[k].first_group;
}

fn table_len() -> u32 {
    return table[0].entries;
}
// The means (f32), or the input rows (any element type): read through grad_at /
// grad_quad of grads_<type>.wgsl.
@group(0) @binding(1) var<storage, read> grads: array<GradWord>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer range as `grads`, four elements at a time (a dummy when every
// entry has vec4_path = 0).
@group(0) @binding(4) var<storage, read> grads4: array<GradQuad>;

// The weighted sum over the micro-batches of one quad (columns col0 .. col0 + 3,
// any alignment, clipped at cols), with scalar loads unless vec4_path.
fn quad_sum(col0: u32) -> vec4<f32> {
    let full = col0 + 4u <= params.cols;
    var total = vec4<f32>(0.0);
    var block = vec4<f32>(0.0);
    var in_block = 0u;
    var idx = params.means_base + col0;
    for (var j = 0u; j < params.rows; j++) {
        let w = weight(j);
        var mean = vec4<f32>(0.0);
        if (params.vec4_path == 1u) {
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
        idx += params.stride;
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
    return total + block;
}

fn weight(j: u32) -> f32 {
    return weights[(params.weights_base + j) * params.groups + params.group];
}

fn store_quad(col0: u32, sum: vec4<f32>) {
    for (var k = 0u; k < 4u; k++) {
        if (col0 + k < params.cols) {
            let at = params.out_offset + col0 + k;
            var v = sum[k];
            if (params.accumulate == 1u) {
                v += out[at];
            }
            out[at] = v;
        }
    }
}

// Threads in a run: lanes that read adjacent quads of a row with one load each.
const RUN: u32 = 8u;
// Quads per thread: a run reads RUN * QUADS * 16 contiguous bytes of every row.
const QUADS: u32 = 8u;

// How sum_quads8 loads its quads (a constant at each call site, so the shader
// compiler keeps one way per instance).
const LOAD_VEC4: u32 = 0u;    // a vec4 load per quad (vec4_path = 1)
const LOAD_SHIFTED: u32 = 1u; // 9 aligned loads shifted into 8 adjacent quads (vec4_path = 2)

// The weighted sums of the QUADS quads first + k * step (k = 0..7) of every row,
// stored: one row loop with 8 block sums b_k and totals t_k (the same operations
// per column as quad_sum, so the same bits whatever the loads). With
// LOAD_SHIFTED the quads are adjacent (step 1) in rows that need not be 16-byte
// aligned, read as 9 aligned quads shifted into place (grads_shifted.wgsl):
// llvmpipe pays per load instruction, and 4 scalar loads per quad cost about
// twice one vec4 load.
fn sum_quads8(loads: u32, first: u32, step: u32) {
    var t0 = vec4<f32>(0.0);
    var t1 = vec4<f32>(0.0);
    var t2 = vec4<f32>(0.0);
    var t3 = vec4<f32>(0.0);
    var t4 = vec4<f32>(0.0);
    var t5 = vec4<f32>(0.0);
    var t6 = vec4<f32>(0.0);
    var t7 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    var b4 = vec4<f32>(0.0);
    var b5 = vec4<f32>(0.0);
    var b6 = vec4<f32>(0.0);
    var b7 = vec4<f32>(0.0);
    var in_block = 0u;
    // Element index of the first quad in row j.
    var e = params.means_base + first * 4u;
    for (var j = 0u; j < params.rows; j++) {
        let w = weight(j);
        let q = e >> 2u;
        var lo: mat4x4<f32>;
        var hi: mat4x4<f32>;
        if (loads == LOAD_VEC4) {
            lo = mat4x4<f32>(grad_quad(q), grad_quad(q + step), grad_quad(q + 2u * step), grad_quad(q + 3u * step));
            hi = mat4x4<f32>(grad_quad(q + 4u * step), grad_quad(q + 5u * step), grad_quad(q + 6u * step), grad_quad(q + 7u * step));
        } else {
            let s = e & 3u;
            let a0 = grad_quad(q);
            let a1 = grad_quad(q + 1u);
            let a2 = grad_quad(q + 2u);
            let a3 = grad_quad(q + 3u);
            let a4 = grad_quad(q + 4u);
            let a5 = grad_quad(q + 5u);
            let a6 = grad_quad(q + 6u);
            let a7 = grad_quad(q + 7u);
            let a8 = grad_quad(q + 8u);
            lo = mat4x4<f32>(shift4(a0, a1, s), shift4(a1, a2, s), shift4(a2, a3, s), shift4(a3, a4, s));
            hi = mat4x4<f32>(shift4(a4, a5, s), shift4(a5, a6, s), shift4(a6, a7, s), shift4(a7, a8, s));
        }
        e += params.stride;
        if (params.skip_zero == 1u && w == 0.0) {
            continue;
        }
        b0 += w * lo[0];
        b1 += w * lo[1];
        b2 += w * lo[2];
        b3 += w * lo[3];
        b4 += w * hi[0];
        b5 += w * hi[1];
        b6 += w * hi[2];
        b7 += w * hi[3];
        in_block += 1u;
        if (in_block == ROW_BLOCK) {
            t0 += b0;
            t1 += b1;
            t2 += b2;
            t3 += b3;
            t4 += b4;
            t5 += b5;
            t6 += b6;
            t7 += b7;
            b0 = vec4<f32>(0.0);
            b1 = vec4<f32>(0.0);
            b2 = vec4<f32>(0.0);
            b3 = vec4<f32>(0.0);
            b4 = vec4<f32>(0.0);
            b5 = vec4<f32>(0.0);
            b6 = vec4<f32>(0.0);
            b7 = vec4<f32>(0.0);
            in_block = 0u;
        }
    }
    store_quad(first * 4u, t0 + b0);
    store_quad((first + step) * 4u, t1 + b1);
    store_quad((first + 2u * step) * 4u, t2 + b2);
    store_quad((first + 3u * step) * 4u, t3 + b3);
    store_quad((first + 4u * step) * 4u, t4 + b4);
    store_quad((first + 5u * step) * 4u, t5 + b5);
    store_quad((first + 6u * step) * 4u, t6 + b6);
    store_quad((first + 7u * step) * 4u, t7 + b7);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let dispatch_group = wg.x + wg.y * table[0].groups_x;
    if (dispatch_group >= table[0].dispatch_groups) {
        return;
    }
    params = table[table_entry(dispatch_group)];
    // WG quads per workgroup (the host dispatches cols / (4 WG) workgroups per
    // entry), RUN * QUADS per run of RUN threads: thread t of the run owns quads
    // t, t + RUN, ..., t + 7 RUN of them, or with vec4_path = 2 the 8 adjacent
    // quads from QUADS t.
    let run_first = (dispatch_group - params.first_group) * WG + (lid / RUN) * RUN * QUADS;
    let shifted = params.vec4_path == 2u;
    let first = run_first + select(lid % RUN, (lid % RUN) * QUADS, shifted);
    let step = select(RUN, 1u, shifted);
    let quads = (params.cols + 3u) / 4u;
    if (first + (QUADS - 1u) * step < quads) {
        if (params.vec4_path == 1u) {
            sum_quads8(LOAD_VEC4, first, step);
            return;
        }
        if (shifted) {
            sum_quads8(LOAD_SHIFTED, first, step);
            return;
        }
    }
    for (var k = 0u; k < QUADS; k++) {
        let quad = first + k * step;
        if (quad < quads) {
            store_quad(quad * 4u, quad_sum(quad * 4u));
        }
    }
}
