// The 5-pass baseline: micro-batch clipping the way an eager framework runs it,
// one kernel per tensor operation, every intermediate materialised in a device
// buffer:
//
//   means   = x.view(M, b, D).mean(1)        [M, D]   (mb_mean)
//   sq      = (means * means).sum(1)         [M]      (sq_norm)
//   factors = min(1, C / sqrt(sq))           [M]      (clip_factor; 1 for a zero norm)
//   scaled  = means * factors[:, None]       [M, D]   (scale)
//   out     = scaled.sum(0) / M              [D]      (mean_out)
//
// Micro-batches are uniform: b rows each, the last one shorter when b does not
// divide N. The host binds `x`, `means` and `scaled` in windows of whole
// micro-batches (at most one storage binding each) and dispatches each window
// separately; `x_elem` / `mb_elem` locate the window's first element inside the
// binding (bindings start at an aligned offset).

const WG: u32 = 256u;

struct Params {
    cols: u32,       // D
    n: u32,          // N
    b: u32,          // rows per micro-batch
    m: u32,          // micro-batches in total
    mb_first: u32,   // first micro-batch of this window
    mb_count: u32,   // micro-batches in this window
    x_elem: u32,     // element of `x` holding (row mb_first * b, column 0)
    mb_elem: u32,    // element of `means` / `scaled` holding (mb_first, column 0)
    groups_x: u32,   // column group = wg.x + wg.y * groups_x
    accumulate: u32, // mean_out: add to `out` (every window but the first)
    clip: f32,       // C
    pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> means: array<f32>;
@group(0) @binding(3) var<storage, read_write> sq_norms: array<f32>;
@group(0) @binding(4) var<storage, read_write> factors: array<f32>;
@group(0) @binding(5) var<storage, read_write> scaled: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

// One thread per (column, micro-batch of the window = wg.z).
@compute @workgroup_size(256)
fn mb_mean(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (c >= params.cols) {
        return;
    }
    let j = params.mb_first + wg.z;
    let lo = j * params.b;
    let hi = min(lo + params.b, params.n);
    var acc = 0.0;
    var idx = params.x_elem + (lo - params.mb_first * params.b) * params.cols + c;
    for (var r = lo; r < hi; r++) {
        acc += x[idx];
        idx += params.cols;
    }
    means[params.mb_elem + wg.z * params.cols + c] = acc / f32(hi - lo);
}

// One workgroup per micro-batch of the window (wg.x).
@compute @workgroup_size(256)
fn sq_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = params.mb_elem + wg.x * params.cols;
    var acc = 0.0;
    for (var c = lid; c < params.cols; c += WG) {
        let v = means[base + c];
        acc += v * v;
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        sq_norms[params.mb_first + wg.x] = red[0];
    }
}

// One thread per micro-batch (all of them, one dispatch).
@compute @workgroup_size(256)
fn clip_factor(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= params.m) {
        return;
    }
    let norm = sqrt(sq_norms[j]);
    factors[j] = select(1.0, min(1.0, params.clip / norm), norm > 0.0);
}

// One thread per (column, micro-batch of the window = wg.z).
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (c >= params.cols) {
        return;
    }
    let at = params.mb_elem + wg.z * params.cols + c;
    scaled[at] = means[at] * factors[params.mb_first + wg.z];
}

// One thread per column, summing the window's micro-batches.
@compute @workgroup_size(256)
fn mean_out(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = (wg.x + wg.y * params.groups_x) * WG + lid;
    if (c >= params.cols) {
        return;
    }
    var acc = 0.0;
    var at = params.mb_elem + c;
    for (var k = 0u; k < params.mb_count; k++) {
        acc += scaled[at];
        at += params.cols;
    }
    acc /= f32(params.m);
    if (params.accumulate == 1u) {
        acc += out[c];
    }
    out[c] = acc;
}
