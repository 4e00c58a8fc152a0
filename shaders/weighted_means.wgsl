// Pass 4: out_p[c] = sum_r w_{r,g} * row_r[c] (g the tensor's group) over `rows`
// rows of `grads`: the M micro-batch means when pass 1 stored them (see
// `materialize_means` in src/gpu/plan.rs; weights w_{j,g} = s_{j,g} / M), else the
// input rows of one window (weights per row from row_weights.wgsl: each
// micro-batch's rows summed as x / n_j, then scaled by w_{j,g}, see ROW_RUNS;
// at b = 1 the rows are the means and the micro-batch weights serve). Terms are
// accumulated per column in blocks of ROW_BLOCK (sum of block sums); windows after
// a tensor's first add to its output. Input rows may instead come in row chunks
// (a software adapter's default; `chunk_rows_table` in src/gpu/plan.rs, and
// `chunk_windows_table` for a tensor's row windows together): the ROW_CHUNKS
// pipeline sums each chunk of a few dozen rows into a partial row (table entry =
// chunk; no blocks, the chunk is the block), then this one sums the partial
// rows (weights 1) into the output.
//
// A workgroup of 64 threads covers WG = 64 * QUADS groups of 4 adjacent columns
// (quads), 2048 columns. Each run of RUN threads owns RUN * QUADS adjacent quads
// and reads RUN * QUADS * 16 = 1 KiB contiguous bytes of every row per visit. On
// a GPU thread t of the run sums quads t, t + RUN, ..., t + 7 RUN, so each of its
// QUADS loads per row is one of RUN adjacent quads. On a software adapter
// (ADJACENT, a pipeline constant) or with vec4_path = 2, thread t sums the 8
// adjacent quads 8 t .. 8 t + 7 instead: on the eleventh session's lavapipe
// host that took this pass over 256 input rows (b = 1) from 1.68-1.77x to
// 1.41-1.48x a read-and-sum (3 alternating pairs of `bench_report --breakdown`;
// each lane's loads are then 128 contiguous bytes, as the norm pass's ADJACENT
// mapping found for 64). The ninth session's host had measured it slower
// (BENCHMARKS.md): the better mapping depends on the host CPU. On
// lavapipe (SIMD-8 groups that each run the whole loop before the next starts) 4
// quads per thread made the pass 1.7x faster at b = 1 than one quad per thread,
// and 8 quads another 5-20% than 4 (longer visits of each row; 7 of 8
// alternating pairs).
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
    slot: u32,          // the binding slot of the entry's rows (grads_slots.wgsl;
                        // 0 in a dispatch over one buffer range)
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
// Weight pairs (m, r): row j adds r * (m * row_j), see clip_factors.wgsl's
// EXTREME_LOG2 (m = 1 but for factors of tiny or huge norms); under ROW_RUNS a
// micro-batch's rows add r * (sum of |m| * row) (row_weights.wgsl).
@group(0) @binding(2) var<storage, read> weights: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer range as `grads`, four elements at a time, or eight for 16-bit
// rows bound as octs (grads_octs.wgsl; a dummy when every entry has vec4_path =
// 0).
@group(0) @binding(4) var<storage, read> grads4: array<GradBinding4>;
// The partial rows of row chunks (ROW_CHUNKS; a dummy otherwise).
@group(0) @binding(5) var<storage, read_write> partials4: array<vec4<f32>>;

// The pipeline that sums row chunks into partial rows (see `sum_quads8_plain`):
// every entry's rows are a chunk of a few dozen rows, summed plainly (the chunk
// is the block) and stored as whole quads into `partials4` from out_offset (a
// multiple of 4; partial rows are padded to whole quads), never added to. A
// pipeline constant rather than a parameter: on lavapipe the chunk sums ran
// about 15% slower with the other path compiled into the same pipeline.
override ROW_CHUNKS: bool = false;

// Every entry of the dispatch has vec4_path = 1 (the stored means, the partial
// rows of row chunks, aligned input rows): the shifted and scalar loads compile
// away. A pipeline constant the host sets per dispatch (`weighted_means_constants`
// in src/gpu/kernels.rs): on lavapipe a workgroup's start costs more the more
// code the shader has (mb_partials.wgsl); a probe of the main shape at b = 1
// took 0.2-0.5 ms less of 15.5-16 ms with it (4 alternating pairs).
override ALIGNED_ROWS: bool = false;

// The dispatch reads input rows with per-row weights (micro-batches of several
// rows whose means were not stored): each micro-batch's rows are summed, as
// |m| * row (m = m_j / n_j), before its r scales them, so that rows that cancel
// do so first (see run_continues). A pipeline constant: the other dispatches
// (stored means, one-row micro-batches, the sum of row chunks) add r * (m * row)
// row by row, which is the same per row, without the run's registers and test
// (on lavapipe runs in every dispatch made a b = 1 call about 5% slower, 3
// alternating rounds; at b = 2, where they are needed, 4-8%).
override ROW_RUNS: bool = false;

// Whether row weight `w` marks a row whose micro-batch goes on in the next row
// (row_weights.wgsl sets the sign bit of its m): the run is scaled by r at the
// micro-batch's last row, or where the rows of this window or chunk end. A run
// is summed in blocks of ROW_BLOCK rows, as the means of pass 1 (a chunk's run,
// at most a chunk of rows, plainly).
fn run_continues(w: vec2<f32>) -> bool {
    return (bitcast<u32>(w.x) & 0x80000000u) != 0u;
}

// The weighted sum over the micro-batches of one quad (columns col0 .. col0 + 3,
// any alignment, clipped at cols), with scalar loads unless vec4_path.
fn quad_sum(col0: u32) -> vec4<f32> {
    let full = col0 + 4u <= params.cols;
    var total = vec4<f32>(0.0);
    var block = vec4<f32>(0.0);
    var in_block = 0u;
    var run = vec4<f32>(0.0);
    var run_block = vec4<f32>(0.0);
    var run_rows = 0u;
    var pending = false;
    var w_run = vec2<f32>(0.0);
    var idx = params.means_base + col0;
    for (var j = 0u; j < params.rows; j++) {
        let w = weight(j);
        var mean = vec4<f32>(0.0);
        if (ALIGNED_ROWS || params.vec4_path == 1u) {
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
        if (params.skip_zero == 1u && w.y == 0.0) {
            continue;
        }
        if (ROW_RUNS) {
            run_block += abs(w.x) * mean;
            run_rows += 1u;
            if (run_rows == ROW_BLOCK && !ROW_CHUNKS) {
                run += run_block;
                run_block = vec4<f32>(0.0);
                run_rows = 0u;
            }
            pending = true;
            w_run = w;
            if (run_continues(w)) {
                continue;
            }
            block += w.y * (run + run_block);
            run = vec4<f32>(0.0);
            run_block = vec4<f32>(0.0);
            run_rows = 0u;
            pending = false;
        } else {
            block += w.y * (w.x * mean);
        }
        in_block += 1u;
        if (in_block == ROW_BLOCK && !ROW_CHUNKS) {
            total += block;
            block = vec4<f32>(0.0);
            in_block = 0u;
        }
    }
    if (ROW_RUNS && pending) {
        block += w_run.y * (run + run_block);
    }
    return total + block;
}

fn weight(j: u32) -> vec2<f32> {
    return weights[(params.weights_base + j) * params.groups + params.group];
}

fn store_quad(col0: u32, sum: vec4<f32>) {
    if (ROW_CHUNKS) {
        // The partial row is padded to whole quads.
        partials4[(params.out_offset + col0) >> 2u] = sum;
        return;
    }
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
// Each thread sums QUADS adjacent quads (a software adapter: see the top).
override ADJACENT: bool = false;
// Quads per thread: a run reads RUN * QUADS * 16 contiguous bytes of every row.
const QUADS: u32 = 8u;

// How sum_quads8 loads its quads (a constant at each call site, so the shader
// compiler keeps one way per instance).
const LOAD_VEC4: u32 = 0u;    // a vec4 load per quad (vec4_path = 1)
const LOAD_SHIFTED: u32 = 1u; // 9 aligned loads shifted into 8 adjacent quads (vec4_path = 2)

// The 8 adjacent quads q .. q + 7 (ADJACENT, step 1) as two matrices, read in
// pairs: one load per pair for 16-bit rows bound as octs (grads_octs.wgsl; q
// is even there: the lane's first quad and every row start are).
fn adjacent_quads8(q: u32) -> array<mat4x4<f32>, 2> {
    let a = grad_quad_pair(q);
    let b = grad_quad_pair(q + 2u);
    let c = grad_quad_pair(q + 4u);
    let d = grad_quad_pair(q + 6u);
    return array<mat4x4<f32>, 2>(mat4x4<f32>(a[0], a[1], b[0], b[1]), mat4x4<f32>(c[0], c[1], d[0], d[1]));
}

// The weighted sums of the QUADS quads first + k * step (k = 0..7) of every row,
// stored: one row loop with block sums and totals per quad (the same operations
// per column as quad_sum, so the same bits whatever the loads). With
// LOAD_SHIFTED the quads are adjacent (step 1) in rows that need not be 16-byte
// aligned, read as 9 aligned quads shifted into place (grads_shifted.wgsl):
// llvmpipe pays per load instruction, and 4 scalar loads per quad cost about
// twice one vec4 load.
fn sum_quads8(loads: u32, first: u32, step: u32) {
    // Quads 0..3 and 4..7 as the columns of two matrices (matrix operations are
    // per component: the same operations as quad_sum's).
    var total_lo = mat4x4<f32>();
    var total_hi = mat4x4<f32>();
    var block_lo = mat4x4<f32>();
    var block_hi = mat4x4<f32>();
    var in_block = 0u;
    var run_lo = mat4x4<f32>();
    var run_hi = mat4x4<f32>();
    var run_block_lo = mat4x4<f32>();
    var run_block_hi = mat4x4<f32>();
    var run_rows = 0u;
    var pending = false;
    var w_run = vec2<f32>(0.0);
    // Element index of the first quad in row j.
    var e = params.means_base + first * 4u;
    for (var j = 0u; j < params.rows; j++) {
        let w = weight(j);
        let q = e >> 2u;
        var lo: mat4x4<f32>;
        var hi: mat4x4<f32>;
        if (loads == LOAD_VEC4 && ADJACENT) {
            let m = adjacent_quads8(q);
            lo = m[0];
            hi = m[1];
        } else if (loads == LOAD_VEC4) {
            lo = mat4x4<f32>(grad_quad(q), grad_quad(q + step), grad_quad(q + 2u * step), grad_quad(q + 3u * step));
            hi = mat4x4<f32>(grad_quad(q + 4u * step), grad_quad(q + 5u * step), grad_quad(q + 6u * step), grad_quad(q + 7u * step));
        } else {
            // 9 loads: quad q + 4 serves both halves.
            let s = e & 3u;
            let mid = grad_quad(q + 4u);
            lo = shift_quads4(grad_quad(q), grad_quad(q + 1u), grad_quad(q + 2u), grad_quad(q + 3u), mid, s);
            hi = shift_quads4(mid, grad_quad(q + 5u), grad_quad(q + 6u), grad_quad(q + 7u), grad_quad(q + 8u), s);
        }
        e += params.stride;
        if (params.skip_zero == 1u && w.y == 0.0) {
            continue;
        }
        if (ROW_RUNS) {
            run_block_lo += abs(w.x) * lo;
            run_block_hi += abs(w.x) * hi;
            run_rows += 1u;
            if (run_rows == ROW_BLOCK) {
                run_lo += run_block_lo;
                run_hi += run_block_hi;
                run_block_lo = mat4x4<f32>();
                run_block_hi = mat4x4<f32>();
                run_rows = 0u;
            }
            pending = true;
            w_run = w;
            if (run_continues(w)) {
                continue;
            }
            block_lo += w.y * (run_lo + run_block_lo);
            block_hi += w.y * (run_hi + run_block_hi);
            run_lo = mat4x4<f32>();
            run_hi = mat4x4<f32>();
            run_block_lo = mat4x4<f32>();
            run_block_hi = mat4x4<f32>();
            run_rows = 0u;
            pending = false;
        } else {
            block_lo += w.y * (w.x * lo);
            block_hi += w.y * (w.x * hi);
        }
        in_block += 1u;
        if (in_block == ROW_BLOCK) {
            total_lo += block_lo;
            total_hi += block_hi;
            block_lo = mat4x4<f32>();
            block_hi = mat4x4<f32>();
            in_block = 0u;
        }
    }
    if (ROW_RUNS && pending) {
        block_lo += w_run.y * (run_lo + run_block_lo);
        block_hi += w_run.y * (run_hi + run_block_hi);
    }
    let lo = total_lo + block_lo;
    let hi = total_hi + block_hi;
    for (var k = 0u; k < 4u; k++) {
        store_quad((first + k * step) * 4u, lo[k]);
        store_quad((first + (k + 4u) * step) * 4u, hi[k]);
    }
}

// sum_quads8 for a row chunk (ROW_CHUNKS): plain sums of the chunk's
// rows in two matrices of four vec4 accumulators, the eight quads stored as vec4 into the
// chunk's partial row (the host cuts the rows into chunks of a few dozen and sums
// the partial rows in a second dispatch, see `chunk_rows_table` in
// src/gpu/plan.rs; a chunk is the block here). On lavapipe the block flushes and
// scalar stores of sum_quads8 cost about as much as the chunks save: a probe of
// this pass over 256 rows of 62,500 f32 in chunks of 32 rows took 9.2-9.8 ms with
// sum_quads8, 7.0-7.1 with a plain loop like this one alone in the shader, and
// 7.7-7.9 in the ROW_CHUNKS pipeline (BENCHMARKS.md). The same operations per column as
// quad_sum with ROW_CHUNKS (no flush), so the same bits whatever the loads.
fn sum_quads8_plain(loads: u32, first: u32, step: u32) {
    // Quads 0..3 and 4..7 as the columns of two matrices, as in sum_quads8.
    var acc_lo = mat4x4<f32>();
    var acc_hi = mat4x4<f32>();
    // ROW_RUNS: the current micro-batch's rows.
    var run_lo = mat4x4<f32>();
    var run_hi = mat4x4<f32>();
    var pending = false;
    var w_run = vec2<f32>(0.0);
    var e = params.means_base + first * 4u;
    for (var j = 0u; j < params.rows; j++) {
        let w = weight(j);
        let q = e >> 2u;
        let s = e & 3u;
        e += params.stride;
        if (params.skip_zero == 1u && w.y == 0.0) {
            continue;
        }
        var lo: mat4x4<f32>;
        var hi: mat4x4<f32>;
        if (loads == LOAD_VEC4 && ADJACENT) {
            let m = adjacent_quads8(q);
            lo = m[0];
            hi = m[1];
        } else if (loads == LOAD_VEC4) {
            lo = mat4x4<f32>(grad_quad(q), grad_quad(q + step), grad_quad(q + 2u * step), grad_quad(q + 3u * step));
            hi = mat4x4<f32>(grad_quad(q + 4u * step), grad_quad(q + 5u * step), grad_quad(q + 6u * step), grad_quad(q + 7u * step));
        } else {
            let mid = grad_quad(q + 4u);
            lo = shift_quads4(grad_quad(q), grad_quad(q + 1u), grad_quad(q + 2u), grad_quad(q + 3u), mid, s);
            hi = shift_quads4(mid, grad_quad(q + 5u), grad_quad(q + 6u), grad_quad(q + 7u), grad_quad(q + 8u), s);
        }
        if (ROW_RUNS) {
            run_lo += abs(w.x) * lo;
            run_hi += abs(w.x) * hi;
            pending = true;
            w_run = w;
            if (run_continues(w)) {
                continue;
            }
            acc_lo += w.y * run_lo;
            acc_hi += w.y * run_hi;
            run_lo = mat4x4<f32>();
            run_hi = mat4x4<f32>();
            pending = false;
        } else {
            acc_lo += w.y * (w.x * lo);
            acc_hi += w.y * (w.x * hi);
        }
    }
    if (ROW_RUNS && pending) {
        acc_lo += w_run.y * run_lo;
        acc_hi += w_run.y * run_hi;
    }
    let o = (params.out_offset >> 2u) + first;
    for (var k = 0u; k < 4u; k++) {
        partials4[o + k * step] = acc_lo[k];
        partials4[o + (k + 4u) * step] = acc_hi[k];
    }
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
    // t, t + RUN, ..., t + 7 RUN of them, or with ADJACENT or vec4_path = 2 the
    // 8 adjacent quads from QUADS t (the same operations per column either way).
    let run_first = (dispatch_group - params.first_group) * WG + (lid / RUN) * RUN * QUADS;
    let shifted = !ALIGNED_ROWS && params.vec4_path == 2u;
    let adjacent = ADJACENT || shifted;
    let first = run_first + select(lid % RUN, (lid % RUN) * QUADS, adjacent);
    let step = select(RUN, 1u, adjacent);
    let quads = (params.cols + 3u) / 4u;
    if (first + (QUADS - 1u) * step < quads) {
        let plain = ROW_CHUNKS;
        if (ALIGNED_ROWS || params.vec4_path == 1u) {
            if (plain) {
                sum_quads8_plain(LOAD_VEC4, first, step);
            } else {
                sum_quads8(LOAD_VEC4, first, step);
            }
            return;
        }
        if (shifted) {
            if (plain) {
                sum_quads8_plain(LOAD_SHIFTED, first, step);
            } else {
                sum_quads8(LOAD_SHIFTED, first, step);
            }
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
