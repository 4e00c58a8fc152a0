// Pass 1: segmented reduction over rows. One workgroup of WG threads (64; 8, one
// SIMD group, on a software adapter: `kernel_constants` in src/gpu/kernels.rs) per
// (column tile of params.tile_cols columns, micro-batch of the window); the host
// picks the tile width per call (4096 to 65536 columns, `tile_cols` in plan.rs).
// The tile's groups of 4 columns (quads) are cut into WG / RUN contiguous spans,
// one per run of RUN threads; a run walks its span 4 RUN quads at a time, each
// run streaming through its own span in order (on lavapipe, whose SIMD-8 groups
// each run the whole loop in turn, this took the pass at b = 4 from 1.4-1.5x to
// 1.0x a read-and-sum, against threads strided by WG quads). On a GPU each load
// instruction of a run reads RUN adjacent quads (RUN * 16 contiguous bytes); on a
// software adapter each lane owns 4 adjacent quads (see quad_step). A quad is one
// load of 4 elements per row when the tensor's rows start at a multiple of 4
// elements in the binding, else aligned loads and a shift, or 4 scalar loads
// (f32, f16 or bf16 through grads_<type>.wgsl, always accumulated in
// f32); the thread forms the micro-batch mean of each column (blocked, as
// column_mean) and accumulates its squared norm privately; the workgroup then
// does ONE tree reduction and writes the tile's (scale, ssq, flags) record. Per
// workgroup: log2(WG) + 1 barriers, for 4096 columns or more (on lavapipe the cost
// of a workgroup's start and barriers is what the tile width trades against
// parallelism; a workgroup of several SIMD groups runs them as coroutines that
// switch at every barrier, which made a 64-thread tree 16x dearer than an
// 8-thread one there). At b = 1 and 2 (no carry, no stored means) the vec4 path
// loads each quad's rows directly, four quads per iteration, instead of
// column_mean4x4's row loop (walk_shallow).
// Otherwise (b > 2, a carry, stored means or unaligned rows) it forms four
// quads' means in one row loop (column_mean4x4), which
// took pass 1 at b = 8..256 from 0.9-1.1x to 0.75-0.9x a read; rows that are not
// 16-byte aligned do the same with aligned vec4 loads and shifts where the
// binding holds whole quads (on a software adapter, whose lanes then own 4
// adjacent quads each: see quad_step), else with scalar loads.
//
// Sum of squares: each thread first adds plain squares and tracks its max |mean|;
// when that max lies outside [2^-40, 2^52] (tiny or huge magnitudes: see
// plain_is_safe) the thread walks its columns again with a scaled sum of squares
// without divisions (Blue's algorithm, as in LAPACK 3.10's snrm2 / Anderson 2017,
// "Algorithm 978"): three accumulators with constant power-of-two scalings, for
// magnitudes below T_SML = 2^-63, between, and above T_BIG = 2^52. None can
// overflow or lose the small terms that matter. Blue's classes cost about 19
// operations per element, a plain square 2: on lavapipe pass 1 at b = 1 went from
// 1.2-1.4x to 1.0-1.1x a read.
// The maximum |g| comes for free as an integer max over the bits (the order of |float| bits is
// the order of magnitudes), which also yields the NaN/Inf flags: any NaN puts the
// max above 0x7f800000, an Inf (without NaN) makes it equal. At the end lane 0
// rewrites the three sums as (scale = max |g|, ssq = sum (g / scale)^2), the record
// the later passes expect (ssq in [1, tile_cols]).
//
// When the call stores the means (micro-batches of 3 rows or more on average,
// see `materialize_means` in plan.rs; WRITE_MEANS below) each finished mean is
// also stored in `means`, so that pass 4 reads M rows of means instead of the N
// input rows.
//
// A tensor larger than one storage binding is processed in row windows. A
// micro-batch cut by a window boundary passes its partial column sums to the next
// window: it reads them from `carry_in` and writes its own to `carry_out`, two
// buffers that swap roles from window to window (so no workgroup reads what another
// writes in the same dispatch, and a row up to a whole binding can be carried).
//
// One dispatch serves up to TABLE_LEN tensors (or windows): `table` holds one
// Params per tensor, their tiles numbered one after the other (first_tile), and
// each workgroup finds its tensor by a binary search over them (tensor_table.wgsl). The host puts
// several tensors in one dispatch when each fits one window and they lie in the
// same buffer, or with buffer slots (grads_slots.wgsl) in up to 8 buffers (see
// `pass1_dispatches` in src/gpu/plan.rs), so a model's many small tensors cost
// one launch instead of one each.

// Threads per workgroup: a multiple of RUN, at most 64 (tile_cols is a multiple
// of 4 * 64); set per adapter as a pipeline constant.
override WG: u32 = 64u;
// Lanes that read adjacent quads of a row with one load each (a SIMD group of a
// software rasteriser such as llvmpipe; a quarter warp on a GPU).
const RUN: u32 = 8u;

// Blue's thresholds and scalings for f32 (all powers of two, so scaling is exact).
// Terms: |g| < T_SML: (g * S_SML)^2 < 2^74; T_SML <= |g| <= T_BIG: g^2 <= 2^104;
// |g| > T_BIG: (g * S_BIG)^2 < 2^104. Sums of 2^20 such terms stay below f32::MAX
// (a tile has at most 2^16 columns).
// S_SML is larger than LAPACK's 2^75 so that subnormal g still square to normals.
const S_SML: f32 = 0x1p100f;
const S_BIG: f32 = 0x1p-76f;
const INV_S_SML: f32 = 0x1p-100f;
const INV_S_BIG: f32 = 0x1p76f;
const T_SML_BITS: u32 = 0x20000000u; // bits of T_SML = 2^-63
const T_BIG_BITS: u32 = 0x59800000u; // bits of T_BIG = 2^52
const T_PLAIN_BITS: u32 = 0x2b800000u; // bits of 2^-40, see plain_is_safe
const INF_BITS: u32 = 0x7f800000u;

struct Params {
    cols: u32,          // D_p
    elem_offset: u32,   // element index in `grads` of (row_start, column 0)
    row_start: u32,     // first row of the window
    row_end: u32,       // one past the last row of the window
    mb_first: u32,      // first micro-batch touching the window
    tiles: u32,         // column tiles of this tensor
    tiles_x: u32,       // (entry 0) tiles per dispatch row: wg.x + wg.y * tiles_x
    tile_base: u32,     // global index of this tensor's first tile
    tiles_total: u32,   // tiles over all tensors (row stride of `partials`)
    carry_in: u32,      // 1: the window's first micro-batch began in an earlier window
    carry_out: u32,     // 1: the window's last micro-batch goes on in a later window
    last_local: u32,    // index (within the window) of the window's last micro-batch
    vec4_path: u32,     // 1: cols and elem_offset are multiples of 4: vec4 loads;
                        // 2: rows not 16-byte aligned, `grads4` bound in whole
                        // quads, ADJACENT: 5 aligned vec4 loads per step of 4 quads,
                        // shifted into place (grads_shifted.wgsl); 0: scalar loads
    write_means: u32,   // 1: also store each finished micro-batch mean in `means`
                        // (read only with WRITE_MEANS = 2)
    means_base: u32,    // element index of mean_0[0] of this tensor in `means`
                        // (modulo 2^32: where the binding starts after it, only
                        // base + mb * means_stride + col of the dispatch's own
                        // micro-batches is in range, and u32 arithmetic wraps)
    tile_cols: u32,     // columns per workgroup: a multiple of 4 * WG, at most 65536
    means_stride: u32,  // elements between two micro-batches' means: all tensors'
                        // padded columns (one matrix), or this tensor's cols
                        // rounded up to 4 (a block per tensor)
    first_tile: u32,    // this entry's first tile among the dispatch's tiles
    entries: u32,       // (entry 0) entries of the table in use
    dispatch_tiles: u32,// (entry 0) tiles of all entries
    slot: u32,          // the binding slot of the entry's rows (grads_slots.wgsl;
                        // 0 in a dispatch over one buffer range)
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// Up to TABLE_LEN tensor windows (tensor_table.wgsl), tiles numbered entry by entry.
@group(0) @binding(0) var<uniform> table: array<Params, TABLE_LEN>;
// The workgroup's entry of the table.
var<private> params: Params;

fn table_first(k: u32) -> u32 {
    return table[k].first_tile;
}

fn table_len() -> u32 {
    return table[0].entries;
}
@group(0) @binding(1) var<storage, read> grads: array<GradWord>;
@group(0) @binding(2) var<storage, read> offsets: array<u32>;
@group(0) @binding(3) var<storage, read_write> partials: array<Partial>;
// The carried sums of an earlier window (whole quads: the rows are padded to a
// multiple of 4 columns; a dummy buffer without carry).
@group(0) @binding(4) var<storage, read> carry_in: array<vec4<f32>>;
// The same rows as `grads`, four elements at a time, or eight for 16-bit rows
// bound as octs (grads_octs.wgsl; bound to a dummy buffer when every entry of
// the table has vec4_path = 0).
@group(0) @binding(5) var<storage, read> grads4: array<GradBinding4>;
// The micro-batch means, read by weighted_means.wgsl: one [M, sum ceil4(D_p)]
// matrix of all tensors, or, larger than one binding, the rows of per-tensor
// [M, ceil4(D_p)] blocks that this dispatch's micro-batches write (MeansLayout in
// src/gpu/plan.rs; a dummy buffer when write_means = 0), a quad per store:
// means_base, means_stride and every quad's first column are multiples of 4.
@group(0) @binding(6) var<storage, read_write> means: array<vec4<f32>>;
// The carried sums this window passes on (whole quads, as carry_in; a dummy
// buffer without carry). Quads, not scalars: llvmpipe loads and stores lane by
// lane with a bounds test per access; with every micro-batch carried (the
// issue's N = 256, D = 1M, b = 32 in windows of 16 rows) quads took 139-163 ms
// against 149-182 ms for four scalars (BENCHMARKS.md, twenty-third session).
@group(0) @binding(7) var<storage, read_write> carry_out: array<vec4<f32>>;

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
    let r_sml = div_wide(INV_S_SML, max_abs); // <= 2^-37 when max_abs >= T_SML
    var ssq = 0.0;
    if (sums.z > 0.0) {
        // max_abs > T_BIG: r_big in [2^-52, 2^24).
        let r_big = div_wide(INV_S_BIG, max_abs);
        ssq = (sums.z * r_big) * r_big + div_wide(div_wide(sums.y, max_abs), max_abs);
    } else if (sums.y > 0.0) {
        // T_SML <= max_abs <= T_BIG.
        ssq = div_wide(div_wide(sums.y, max_abs), max_abs) + (sums.x * r_sml) * r_sml;
    } else {
        // max_abs < T_SML: r_sml in (2^-37, 2^49].
        ssq = (sums.x * r_sml) * r_sml;
    }
    return vec2<f32>(max_abs, ssq);
}

// column_mean on four adjacent columns: `first` and `stride` count vec4. The same
// operations per component as column_mean, so both paths give the same bits.
fn column_mean4(first: u32, rows: u32, stride: u32, inv_n: f32) -> vec4<f32> {
    var total = vec4<f32>(0.0);
    var block = vec4<f32>(0.0);
    var idx = first;
    for (var r = 0u; r < rows; r++) {
        block += grad_quad(idx) * inv_n;
        idx += stride;
        if ((r + 1u) % ROW_BLOCK == 0u) {
            total += block;
            block = vec4<f32>(0.0);
        }
    }
    return total + block;
}

// The quads a thread reads in one step of its walk: its first quad q and then
// q + quad_step(), q + 2 quad_step(), q + 3 quad_step(). On a GPU (ADJACENT off)
// lane l of a run owns quads l, l + RUN, l + 2 RUN, l + 3 RUN of each step of
// 4 RUN quads, so each load instruction of the run reads RUN adjacent quads. On
// a software adapter (ADJACENT, a pipeline constant with the small workgroups)
// lane l owns quads 4 l .. 4 l + 3, so that a row that is not 16-byte aligned
// is read as 5 aligned quads per step instead of 16 scalar loads
// (grads_shifted.wgsl). Every path (vec4, shifted, scalar, Blue's walk) follows
// the same mapping, so the alignment of a tensor changes no bit of its result.
override ADJACENT: bool = false;

fn quad_step() -> u32 {
    return select(RUN, 1u, ADJACENT);
}

// How a walk loads its quads (a constant at every call site, so the shader
// compiler keeps one way per instance).
const LOAD_VEC4: u32 = 0u;    // a vec4 load per quad (rows 16-byte aligned)
const LOAD_SHIFTED: u32 = 1u; // aligned vec4 loads and shifts (vec4_path = 2)
const LOAD_SCALAR: u32 = 2u;  // four scalar loads per quad (any alignment)

// The four quads of one row a thread reads in a step, the first at element i.
fn step_quads(loads: u32, i: u32) -> mat4x4<f32> {
    let qs = quad_step();
    if (loads == LOAD_VEC4) {
        let q = i >> 2u;
        if (ADJACENT) {
            // Two pairs (one load each for 16-bit rows bound as octs: q is
            // even there, see grads_octs.wgsl).
            let a = grad_quad_pair(q);
            let b = grad_quad_pair(q + 2u);
            return mat4x4<f32>(a[0], a[1], b[0], b[1]);
        }
        return mat4x4<f32>(grad_quad(q), grad_quad(q + qs), grad_quad(q + 2u * qs), grad_quad(q + 3u * qs));
    }
    if (loads == LOAD_SHIFTED) {
        // Adjacent quads (walk_tile takes this way only with ADJACENT).
        return grad_quads4_at(i);
    }
    return mat4x4<f32>(grad_at4(i), grad_at4(i + 4u * qs), grad_at4(i + 8u * qs), grad_at4(i + 12u * qs));
}

// column_mean4 of the four quads of a step (step_quads) in one row loop: `first`
// and `stride` count elements. The same operations per quad as column_mean4, so
// the same bits whatever `loads`: on lavapipe a row loop per quad cost more than
// its loads (a tensor of 250,001 columns took 1.5-1.7x one of 250,000 at b = 4
// with one loop per quad, 1.3-1.4x with one per step and scalar loads).
// `init`: the total of the rows before `first` (a chunk of a deep micro-batch,
// see walk4x4_chunks; rows of earlier chunks are a multiple of ROW_BLOCK, so the blocks
// fall where they would without chunks and the sums are the same bits). With
// `partial` (a call-site constant) the chunk's total is returned without the
// open block, which is empty then.
fn column_mean4x4(loads: u32, first: u32, rows: u32, stride: u32, inv_n: f32, init: mat4x4<f32>, partial: bool) -> mat4x4<f32> {
    // Block sums and totals, one column per quad (matrix operations are per
    // component: the same operations as column_mean4's).
    var total = init;
    var block = mat4x4<f32>();
    var idx = first;
    for (var r = 0u; r < rows; r++) {
        block += step_quads(loads, idx) * inv_n;
        idx += stride;
        if ((r + 1u) % ROW_BLOCK == 0u) {
            total += block;
            block = mat4x4<f32>();
        }
    }
    if (partial) {
        return total;
    }
    return total + block;
}

// The vec4 path's mean of the quad at column `col`: plus the carried-in sums of
// an earlier window; passed on to the next window's carry or stored in `means`.
fn pass_on4(col: u32, mean: vec4<f32>, mb: u32, takes_carry: bool, gives_carry: bool) -> vec4<f32> {
    var v = mean;
    if (takes_carry) {
        v += carry_in[col >> 2u];
    }
    if (gives_carry) {
        carry_out[col >> 2u] = v;
    } else if (writes_means()) {
        means[(params.means_base + mb * params.means_stride + col) >> 2u] = v;
    }
    return v;
}

// column_mean4 with scalar loads (`first` and `stride` count f32): for rows that
// are not 16-byte aligned. Same operations per component, so the same bits.
fn column_mean4_scalar(first: u32, rows: u32, stride: u32, inv_n: f32) -> vec4<f32> {
    var total = vec4<f32>(0.0);
    var block = vec4<f32>(0.0);
    var idx = first;
    for (var r = 0u; r < rows; r++) {
        block += grad_at4(idx) * inv_n;
        idx += stride;
        if ((r + 1u) % ROW_BLOCK == 0u) {
            total += block;
            block = vec4<f32>(0.0);
        }
    }
    return total + block;
}

// Elements i .. i + 3 with scalar loads (any alignment).
fn grad_at4(i: u32) -> vec4<f32> {
    return vec4<f32>(grad_at(i), grad_at(i + 1u), grad_at(i + 2u), grad_at(i + 3u));
}

// A thread's sums of squares: Blue's three scaled classes (sml, med, big) and
// the max |v| bits per lane. The plain pass puts every square in `med`.
struct Sums {
    sml: vec4<f32>,
    med: vec4<f32>,
    big: vec4<f32>,
    max4: vec4<u32>,
}

// Adds the squares of four means to the sums and their |v| bits to the max. With
// `blue` (a call-site constant) Blue's classes, decided on the bits (NaN/Inf fall
// in no class, whatever the compiler assumes about float comparisons),
// branch-free; else plainly v * v, which is exact enough while every |v| of the
// thread lies in [T_PLAIN, T_BIG] (see `plain_is_safe`), and 4x cheaper: on
// lavapipe pass 1 at b = 1 cost 1.03-1.05x a read with plain squares against
// 1.25-1.42x with Blue's classes on every element.
fn add4(blue: bool, v: vec4<f32>, s: ptr<function, Sums>) {
    let bits = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
    (*s).max4 = max((*s).max4, bits);
    if (!blue) {
        (*s).med += v * v;
        return;
    }
    let sml = bits < vec4<u32>(T_SML_BITS);
    let big = bits > vec4<u32>(T_BIG_BITS) & bits < vec4<u32>(INF_BITS);
    let med = bits >= vec4<u32>(T_SML_BITS) & bits <= vec4<u32>(T_BIG_BITS);
    let f = select(select(vec4<f32>(1.0), vec4<f32>(S_SML), sml), vec4<f32>(S_BIG), big);
    let t = v * f;
    let t2 = t * t;
    (*s).sml += select(vec4<f32>(0.0), t2, sml);
    (*s).med += select(vec4<f32>(0.0), t2, med);
    (*s).big += select(vec4<f32>(0.0), t2, big);
}

// Whether a thread's plain sum of squares (no scaling) is as good as Blue's: its
// max |v| is 0, NaN or Inf (then only the flags count), or in [T_PLAIN, T_BIG].
// Below T_BIG = 2^52 no square exceeds 2^104 and 2^16 of them stay below f32::MAX;
// from T_PLAIN = 2^-40 on the sum is at least 2^-80, while the squares lost to
// underflow (below 2^-126 each, at most 2^16 of them) add up to under 2^-110, a
// relative 2^-30. Otherwise the thread walks its columns again with Blue's sums.
fn plain_is_safe(max4: vec4<u32>) -> bool {
    let m = max(max(max4.x, max4.y), max(max4.z, max4.w));
    return m == 0u || m >= INF_BITS || (m >= T_PLAIN_BITS && m <= T_BIG_BITS);
}

// How walk4x4 finishes each mean (a constant at every call site, so that the
// shader compiler drops the other cases: llvmpipe runs both sides of every
// branch under a lane mask, so a runtime test per quad costs as much as its work;
// passing every mean through pass_on4's carry tests made pass 1 at b = 2 cost
// 3x a read instead of 1.2x).
const NORM_ONLY: u32 = 0u;   // add its square to the norm
const STORE_MEANS: u32 = 1u; // also store it in `means` (write_means = 1, no carry)
const CARRY: u32 = 2u;       // pass_on4 first (a micro-batch cut by a window)

// The mean v of quad q, finished as `mode` says and added to the sums.
fn finish4(blue: bool, mode: u32, q: u32, v: vec4<f32>, means_row: u32, mb: u32, takes_carry: bool, gives_carry: bool, s: ptr<function, Sums>) {
    var w = v;
    if (mode == STORE_MEANS) {
        means[means_row + q] = w;
    } else if (mode == CARRY) {
        w = pass_on4(q << 2u, w, mb, takes_carry, gives_carry);
    }
    add4(blue, w, s);
}

// Rows per chunk of a deep micro-batch whose means are stored (0: no chunks; a
// multiple of ROW_BLOCK). A pipeline constant: 32 in the variant the host builds
// for calls with such micro-batches on a software adapter
// (`deep_kernel_constants` in src/gpu/kernels.rs), else 0: the chunked walk's
// code, even where no workgroup takes it, made the pass over many shallow
// micro-batches about 9% slower on lavapipe.
override CHUNK_ROWS: u32 = 0u;

// Two constants that compile code away for the dispatches that do not need it
// (`partials_constants` in src/gpu/kernels.rs; the host sets each per dispatch).
// ALIGNED_ROWS: every table entry has vec4_path = 1, so every walk, Blue's too,
// loads vec4 (the shifted and scalar walks compile away). CARRIES = false: no
// entry carries sums between windows (no carry code). On lavapipe a workgroup's
// start costs more the more code the shader has, even where it returns at once:
// at N = 256, D = 64, b = 1 a call took 1.10-1.18 ms with both walks and the
// carry compiled in, 0.65-0.68 without (M = 256 workgroups); at D = 63 1.21-1.23
// with the carry, 0.92-1.08 without.
override ALIGNED_ROWS: bool = false;
override CARRIES: bool = true;
// Whether the dispatch stores the means: 0 never, 1 always (the host sets one of
// the two per call, so the other walks compile away), 2 as each entry's
// write_means says (the default, for tools that build the kernel without
// constants; the crate never runs it).
override WRITE_MEANS: u32 = 2u;

fn writes_means() -> bool {
    if (WRITE_MEANS == 2u) {
        return params.write_means == 1u;
    }
    return WRITE_MEANS == 1u;
}

// The four quads of a step in the stored means (a chunk's running totals).
fn load_means4(at: u32, qs: u32) -> mat4x4<f32> {
    return mat4x4<f32>(means[at], means[at + qs], means[at + 2u * qs], means[at + 3u * qs]);
}

// Walks a span one step (four quads, see quad_step) at a time from *c4 while the
// step's fourth quad is below q_end: their means in one row loop (column_mean4x4,
// loading as `loads` says), finished as `mode` says and added to the sums in quad
// order. Leaves *c4 at the first quad not done. Stored means of more than
// CHUNK_ROWS rows take walk4x4_chunks instead.
fn walk4x4(blue: bool, loads: u32, mode: u32, c4: ptr<function, u32>, q_end: u32, row0: u32, rows: u32, inv_n: f32, mb: u32, takes_carry: bool, gives_carry: bool, s: ptr<function, Sums>) {
    let means_row = (params.means_base + mb * params.means_stride) >> 2u;
    let qs = quad_step();
    if (mode == STORE_MEANS && CHUNK_ROWS > 0u && rows > CHUNK_ROWS) {
        walk4x4_chunks(blue, loads, c4, q_end, row0, rows, inv_n, mb, s);
        return;
    }
    while (*c4 + 3u * qs < q_end) {
        let m = column_mean4x4(loads, row0 + (*c4 << 2u), rows, params.cols, inv_n, mat4x4<f32>(), false);
        finish4(blue, mode, *c4, m[0], means_row, mb, takes_carry, gives_carry, s);
        finish4(blue, mode, *c4 + qs, m[1], means_row, mb, takes_carry, gives_carry, s);
        finish4(blue, mode, *c4 + 2u * qs, m[2], means_row, mb, takes_carry, gives_carry, s);
        finish4(blue, mode, *c4 + 3u * qs, m[3], means_row, mb, takes_carry, gives_carry, s);
        *c4 += 4u * RUN;
    }
}

// walk4x4 in mode STORE_MEANS over a micro-batch of more than CHUNK_ROWS rows:
// the span is walked once per chunk of CHUNK_ROWS rows, each chunk's running
// totals kept in the means' own place (zeroed first, so that every chunk loads
// them without a branch) until the last chunk finishes them. A row loop then
// visits at most CHUNK_ROWS rows: on lavapipe a walk over 128 or 256 rows cost
// 1.6x one over 16 to 64 (bench_report --scaling, time against M), and b = 256
// went from 1.96x to 1.31-1.35x a read-and-sum with chunks of 32 rows.
fn walk4x4_chunks(blue: bool, loads: u32, c4: ptr<function, u32>, q_end: u32, row0: u32, rows: u32, inv_n: f32, mb: u32, s: ptr<function, Sums>) {
    let means_row = (params.means_base + mb * params.means_stride) >> 2u;
    let qs = quad_step();
    let start = *c4;
    for (var c = start; c + 3u * qs < q_end; c += 4u * RUN) {
        let at = means_row + c;
        means[at] = vec4<f32>(0.0);
        means[at + qs] = vec4<f32>(0.0);
        means[at + 2u * qs] = vec4<f32>(0.0);
        means[at + 3u * qs] = vec4<f32>(0.0);
    }
    var r0 = 0u; // rows done in earlier chunks
    for (; rows - r0 > CHUNK_ROWS; r0 += CHUNK_ROWS) {
        for (*c4 = start; *c4 + 3u * qs < q_end; *c4 += 4u * RUN) {
            let at = means_row + *c4;
            let m = column_mean4x4(loads, row0 + r0 * params.cols + (*c4 << 2u), CHUNK_ROWS, params.cols, inv_n, load_means4(at, qs), true);
            means[at] = m[0];
            means[at + qs] = m[1];
            means[at + 2u * qs] = m[2];
            means[at + 3u * qs] = m[3];
        }
    }
    for (*c4 = start; *c4 + 3u * qs < q_end; *c4 += 4u * RUN) {
        let m = column_mean4x4(loads, row0 + r0 * params.cols + (*c4 << 2u), rows - r0, params.cols, inv_n, load_means4(means_row + *c4, qs), false);
        finish4(blue, STORE_MEANS, *c4, m[0], means_row, mb, false, false, s);
        finish4(blue, STORE_MEANS, *c4 + qs, m[1], means_row, mb, false, false, s);
        finish4(blue, STORE_MEANS, *c4 + 2u * qs, m[2], means_row, mb, false, false, s);
        finish4(blue, STORE_MEANS, *c4 + 3u * qs, m[3], means_row, mb, false, false, s);
    }
}

// walk4x4 in the mode the micro-batch needs (carry, stored means or the norm
// only), each a separate instance: `loads` is a call-site constant.
fn walk_modes(blue: bool, loads: u32, c4: ptr<function, u32>, q_end: u32, row0: u32, rows: u32, inv_n: f32, mb: u32, takes_carry: bool, gives_carry: bool, s: ptr<function, Sums>) {
    if (takes_carry || gives_carry) {
        walk4x4(blue, loads, CARRY, c4, q_end, row0, rows, inv_n, mb, takes_carry, gives_carry, s);
    } else if (writes_means()) {
        walk4x4(blue, loads, STORE_MEANS, c4, q_end, row0, rows, inv_n, mb, false, false, s);
    } else {
        walk4x4(blue, loads, NORM_ONLY, c4, q_end, row0, rows, inv_n, mb, false, false, s);
    }
}

// The mean of quad q over `rows` rows (1 or 2, a call-site constant) of a
// micro-batch of that many rows, without the row loop: the same bits as
// column_mean4 (up to the sign of a zero, which the squares drop). Two rows
// are a * inv_n + b * 0.5 (inv_n is 1/2 then): with inv_n in both products the
// shader compiler may factor the sum into (a + b) * inv_n (lavapipe did), which
// overflows where a + b exceeds f32::MAX.
fn shallow_mean4(rows: u32, q: u32, stride4: u32, inv_n: f32) -> vec4<f32> {
    let a = grad_quad(q) * inv_n;
    if (rows == 1u) {
        return a;
    }
    return a + grad_quad(q + stride4) * 0.5;
}

// shallow_mean4 of the adjacent quads q and q + 1 (grad_quad_pair: q even
// where 16-bit rows are bound as octs, and so is stride4 there), with the same
// operations per component.
fn shallow_mean_pair(rows: u32, q: u32, stride4: u32, inv_n: f32) -> mat2x4<f32> {
    let a = grad_quad_pair(q) * inv_n;
    if (rows == 1u) {
        return a;
    }
    return a + grad_quad_pair(q + stride4) * 0.5;
}

// walk4x4 in mode NORM_ONLY for micro-batches of one or two aligned rows
// (`rows`, a call-site constant), four quads per iteration in the same order:
// on lavapipe the row loop's per-lane mask and exit tests cost more than the
// loads (pass 1 at b = 1 went from 1.6x to 0.85x a read against the
// read-and-sum of 2026-12-02, at b = 2 from about 1.4x to about 1.05x against
// the faster one of 2026-12-04 on).
fn walk_shallow(rows: u32, c4: ptr<function, u32>, q_end: u32, row04: u32, stride4: u32, inv_n: f32, s: ptr<function, Sums>) {
    let qs = quad_step();
    while (*c4 + 3u * qs < q_end) {
        var v: mat4x4<f32>;
        if (ADJACENT) {
            // Adjacent quads in two pairs (see step_quads).
            let a = shallow_mean_pair(rows, row04 + *c4, stride4, inv_n);
            let b = shallow_mean_pair(rows, row04 + *c4 + 2u, stride4, inv_n);
            v = mat4x4<f32>(a[0], a[1], b[0], b[1]);
        } else {
            v = mat4x4<f32>(
                shallow_mean4(rows, row04 + *c4, stride4, inv_n),
                shallow_mean4(rows, row04 + *c4 + qs, stride4, inv_n),
                shallow_mean4(rows, row04 + *c4 + 2u * qs, stride4, inv_n),
                shallow_mean4(rows, row04 + *c4 + 3u * qs, stride4, inv_n),
            );
        }
        add4(false, v[0], s);
        add4(false, v[1], s);
        add4(false, v[2], s);
        add4(false, v[3], s);
        *c4 += 4u * RUN;
    }
}

// One thread's walk over its span [span0, span_end) of the tile's quads (up to
// column col_end): every mean formed, passed on or stored, and its square added
// to the sums (`blue`: Blue's classes, else plain squares). Running it twice
// stores the same means and carries again (the second walk only repeats the
// norm's arithmetic). With Blue's classes (the rare second walk) it reads with
// scalar loads whatever the alignment (vec4 loads in the ALIGNED_ROWS variant),
// which gives the same bits as the vec4 loads and compiles half the code.
fn walk_tile(blue: bool, lid: u32, span0: u32, span_end: u32, col_end: u32, row0: u32, rows: u32, inv_n: f32, mb: u32, takes_carry: bool, gives_carry: bool, s: ptr<function, Sums>) {
    let qs = quad_step();
    var c4 = span0 + select(lid % RUN, 4u * (lid % RUN), ADJACENT);
    let q_end = min(span_end, col_end >> 2u);
    // Blue's walk takes vec4 loads only where every row is aligned (a constant):
    // elsewhere scalar loads, which compile half the code for the same bits.
    if (ALIGNED_ROWS || (!blue && params.vec4_path == 1u)) {
        let stride4 = params.cols >> 2u;
        let row04 = row0 >> 2u;
        // Without a carry the micro-batch lies whole in the window, so rows is
        // its size and inv_n = 1 / rows (walk_shallow relies on it). Plain
        // squares only (Blue's walk takes column_mean4x4).
        let shallow = !blue && !takes_carry && !gives_carry && !writes_means();
        if (shallow && rows == 1u) {
            walk_shallow(1u, &c4, q_end, row04, stride4, inv_n, s);
        } else if (shallow && rows == 2u) {
            walk_shallow(2u, &c4, q_end, row04, stride4, inv_n, s);
        } else {
            walk_modes(blue, LOAD_VEC4, &c4, q_end, row0, rows, inv_n, mb, takes_carry, gives_carry, s);
        }
        // The rest of the last step, one quad at a time.
        let tail_end = min(q_end, c4 + 4u * qs);
        for (; c4 < tail_end; c4 += qs) {
            let mean = column_mean4(row04 + c4, rows, stride4, inv_n);
            add4(blue, pass_on4(c4 << 2u, mean, mb, takes_carry, gives_carry), s);
        }
        return;
    }
    // Unaligned rows (or Blue's walk): the same columns per thread and lane, in
    // the same order, as the vec4 path (so the alignment of a tensor does not
    // change a bit of its result): whole steps with aligned loads and shifts
    // where the binding holds whole quads, else with scalar loads; then the rest
    // of the last step (a last partial quad too) one quad at a time.
    if (!blue && ADJACENT && params.vec4_path == 2u) {
        walk_modes(blue, LOAD_SHIFTED, &c4, q_end, row0, rows, inv_n, mb, takes_carry, gives_carry, s);
    } else {
        walk_modes(blue, LOAD_SCALAR, &c4, q_end, row0, rows, inv_n, mb, takes_carry, gives_carry, s);
    }
    let tail_end = min(min(span_end, (col_end + 3u) >> 2u), c4 + 4u * qs);
    for (; c4 < tail_end; c4 += qs) {
        let col0 = c4 << 2u;
        var v = vec4<f32>(0.0);
        if (col0 + 4u <= col_end) {
            v = column_mean4_scalar(row0 + col0, rows, params.cols, inv_n);
        } else {
            for (var j = 0u; j < 4u; j++) {
                if (col0 + j < col_end) {
                    v[j] = column_mean(row0 + col0 + j, rows, params.cols, inv_n);
                }
            }
        }
        // Columns past col_end (0 in v) take nothing from the carry: what its
        // padding holds never reaches a result.
        if (takes_carry) {
            let carried = carry_in[c4];
            for (var j = 0u; j < 4u; j++) {
                if (col0 + j < col_end) {
                    v[j] += carried[j];
                }
            }
        }
        if (gives_carry) {
            carry_out[c4] = v;
        }
        if (!gives_carry && writes_means()) {
            // Columns past col_end are 0, in the rows' padding.
            means[(params.means_base + mb * params.means_stride + col0) >> 2u] = v;
        }
        add4(blue, v, s);
    }
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let dispatch_tile = wg.x + wg.y * table[0].tiles_x;
    if (dispatch_tile >= table[0].dispatch_tiles) {
        return; // whole workgroup: uniform
    }
    let entry = table_entry(dispatch_tile);
    params = table[entry];
    // Tests that precede barriers read `table` (uniform), not the private copy,
    // which WGSL's uniformity analysis counts as non-uniform.
    let tile = dispatch_tile - table[entry].first_tile;
    if (tile >= table[entry].tiles) {
        return; // whole workgroup: uniform (a table whose entries leave gaps)
    }
    let local_mb = wg.z;
    let mb = params.mb_first + local_mb;
    let mb_lo = offsets[mb];
    let mb_hi = offsets[mb + 1u];
    let inv_n = div_wide(1.0, f32(mb_hi - mb_lo));
    let lo = max(mb_lo, params.row_start);
    let hi = min(mb_hi, params.row_end);
    let rows = hi - lo;
    // Both false in the variant without carries (CARRIES, a constant).
    let takes_carry = CARRIES && local_mb == 0u && params.carry_in == 1u;
    let gives_carry = CARRIES && local_mb == table[entry].last_local && table[entry].carry_out == 1u;
    let row0 = params.elem_offset + (lo - params.row_start) * params.cols;
    let col_end = min(params.cols, (tile + 1u) * params.tile_cols);

    // Lane group lid / RUN of the workgroup walks its own contiguous span of the
    // tile's quads, a step of 4 RUN quads at a time (which lane owns which quad of
    // a step: quad_step). The spans split the tile's own columns (a tensor
    // narrower than a tile still keeps every group busy), in multiples of RUN quads.
    let tile_q0 = tile * params.tile_cols >> 2u;
    let tile_quads = ((col_end + 3u) >> 2u) - tile_q0;
    let span = (tile_quads + RUN * (WG / RUN) - 1u) / (RUN * (WG / RUN)) * RUN;
    let span0 = tile_q0 + (lid / RUN) * span;
    let span_end = span0 + span;
    // Four accumulators per class: column c goes to component c % 4 of the thread
    // that owns its quad.
    // Plain squares first; a thread whose magnitudes make them unsafe walks again
    // with Blue's sums (on lavapipe an `if` runs its loop only while a lane needs it).
    var sums = Sums(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<u32>(0u));
    walk_tile(false, lid, span0, span_end, col_end, row0, rows, inv_n, mb, takes_carry, gives_carry, &sums);
    if (gives_carry) {
        return; // whole workgroup: uniform; the norm is formed in a later window
    }
    if (!plain_is_safe(sums.max4)) {
        sums = Sums(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<u32>(0u));
        walk_tile(true, lid, span0, span_end, col_end, row0, rows, inv_n, mb, takes_carry, false, &sums);
    }

    red_sums[lid] = vec3<f32>(hsum(sums.sml), hsum(sums.med), hsum(sums.big));
    let max4 = sums.max4;
    red_max[lid] = max(max(max4.x, max4.y), max(max4.z, max4.w));
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
