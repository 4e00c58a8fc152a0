// Reference kernels of the bench: the cheapest passes over the same bytes.
//
// read_sum: every element read once with vec4 loads; each workgroup sums
//           WG * ITEMS vec4 (64 KiB) and writes one partial sum.
// copy:     every element read once and written once (vec4).
//
// A read_sum workgroup whose whole block lies in the window (all but the
// window's last) reads it without a bounds test per load, 8 loads per loop
// iteration into 4 accumulators; only the last block tests each index. On lavapipe
// this reads 64 MB in 0.55-0.7x the time of one tested load per iteration in
// the bench's rows (0.6-0.9x in an interleaved probe; BENCHMARKS.md, eleventh
// session): the floor must be a read that microclip's own kernels cannot beat.
// ITEMS is a multiple of 8 (asserted where the bench sets it).
//
// The host binds the buffer in windows of at most one storage binding and
// dispatches each window separately; `count` is the window's length in vec4.

// WG * ITEMS = 4096 vec4 (64 KiB) per workgroup. Pipeline constants: the bench
// builds read_sum with WG = 8, ITEMS = 512 on a software adapter (one SIMD group,
// as microclip's reduction kernels there: a 256-thread tree reduction per 64 KiB
// would run as 32 coroutines switching at each of its 9 barriers).
override WG: u32 = 256u;
override ITEMS: u32 = 16u;

struct Params {
    count: u32,    // vec4 elements in this window
    groups: u32,   // workgroups of this window
    groups_x: u32, // group = wg.x + wg.y * groups_x
    out_base: u32, // index of this window's first partial sum
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<f32>>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn read_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wg.x + wg.y * params.groups_x;
    if (group >= params.groups) {
        return; // whole workgroup: uniform
    }
    let first = group * (WG * ITEMS);
    let base = first + lid;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    if (first + WG * ITEMS <= params.count) {
        // Whole block in range (uniform): no test per load.
        for (var k = 0u; k < ITEMS; k += 8u) {
            let i = base + k * WG;
            a0 += src[i] + src[i + 4u * WG];
            a1 += src[i + WG] + src[i + 5u * WG];
            a2 += src[i + 2u * WG] + src[i + 6u * WG];
            a3 += src[i + 3u * WG] + src[i + 7u * WG];
        }
    } else {
        for (var k = 0u; k < ITEMS; k++) {
            let i = base + k * WG;
            if (i < params.count) {
                a0 += src[i];
            }
        }
    }
    let acc = (a0 + a1) + (a2 + a3);
    red[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[params.out_base + group] = red[0];
    }
}

@compute @workgroup_size(WG)
fn copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wg.x + wg.y * params.groups_x;
    if (group >= params.groups) {
        return;
    }
    let base = group * (WG * ITEMS) + lid;
    for (var k = 0u; k < ITEMS; k++) {
        let i = base + k * WG;
        if (i < params.count) {
            dst[i] = src[i];
        }
    }
}
