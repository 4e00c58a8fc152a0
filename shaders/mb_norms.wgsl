// Pass 2: one workgroup per (micro-batch, parameter group) combines the (scale, ssq,
// flags) records of the group's column tiles (tiles are numbered group by group, so
// group g owns tiles [group_tiles[g], group_tiles[g + 1])) into (scale,
// root = sqrt(ssq), flags): the norm is scale * root. Strided sequential combine
// per thread, then a tree.

// Threads per workgroup, a power of two: 256, or 8 (one SIMD group) on a software
// adapter (`kernel_constants` in src/gpu/kernels.rs); a pipeline constant.
override WG: u32 = 256u;

struct Params {
    micro_batches: u32,
    tiles_total: u32,
    groups_x: u32, // (micro-batch, group) index = wg.x + wg.y * groups_x
    groups: u32,   // parameter groups G
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partials: array<Partial>;
@group(0) @binding(2) var<storage, read> group_tiles: array<u32>;
@group(0) @binding(3) var<storage, read_write> mb_norms: array<MbNorm>;

var<workgroup> red: array<vec2<f32>, WG>;
var<workgroup> red_flags: atomic<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let at = wg.x + wg.y * params.groups_x;
    if (at >= params.micro_batches * params.groups) {
        return; // whole workgroup: uniform
    }
    let mb = at / params.groups;
    let group = at % params.groups;
    if (lid == 0u) {
        atomicStore(&red_flags, 0u);
    }
    // Before any thread ORs its flags in: without this barrier a fast thread's
    // atomicOr could land before lid 0's store and be lost (on a GPU whose
    // subgroups run independently; lavapipe runs lid 0's subgroup first).
    workgroupBarrier();
    var acc = vec2<f32>(0.0, 0.0);
    var flags = 0u;
    let base = mb * params.tiles_total;
    let tile_end = group_tiles[group + 1u];
    for (var t = group_tiles[group] + lid; t < tile_end; t += WG) {
        let p = partials[base + t];
        acc = combine_scaled(acc, vec2<f32>(p.scale, p.ssq));
        flags |= p.flags;
    }
    red[lid] = acc;
    if (flags != 0u) {
        atomicOr(&red_flags, flags);
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = combine_scaled(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let r = red[0];
        mb_norms[at] = MbNorm(r.x, sqrt(r.y), atomicLoad(&red_flags), 0u);
    }
}
