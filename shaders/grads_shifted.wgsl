// Four consecutive input elements at any alignment from aligned quad loads
// (prepended after the gradient loader to the kernels that read the input), for
// rows that do not start at a multiple of 4 elements. llvmpipe runs every load
// instruction as a loop over its lanes (about 17 instructions per lane, then 7 per
// component), so four scalar loads cost about twice one vec4 load; a thread that
// reads adjacent quads shares the aligned quads between them (5 loads for 4
// quads). The binding of `grads4` must hold whole quads up to the one holding the
// last element needed (the host rounds it up: `vec4_path` = 2 in mb_partials.wgsl).

// Elements s .. s + 3 of the 8 elements (a, b), s in 0..3: shifts by 2, then by 1,
// with selects (never arithmetic: the elements not taken may be NaN).
fn shift4(a: vec4<f32>, b: vec4<f32>, s: u32) -> vec4<f32> {
    let two = (s & 2u) != 0u;
    let lo = select(a, vec4<f32>(a.zw, b.xy), two);
    let next = select(b.x, b.z, two);
    return select(lo, vec4<f32>(lo.yzw, next), (s & 1u) != 0u);
}

// The four quads that start s elements into the five consecutive aligned quads
// a .. e (columns of a mat4x4).
fn shift_quads4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, e: vec4<f32>, s: u32) -> mat4x4<f32> {
    return mat4x4<f32>(shift4(a, b, s), shift4(b, c, s), shift4(c, d, s), shift4(d, e, s));
}

// Elements i .. i + 15 as four quads (columns of a mat4x4), from the five aligned
// quads from quad i / 4. The fifth, unused when i is a multiple of 4, may then
// lie past the binding (an out-of-bounds read, defined in WGSL; its value is not
// taken).
fn grad_quads4_at(i: u32) -> mat4x4<f32> {
    let q = i >> 2u;
    return shift_quads4(grad_quad(q), grad_quad(q + 1u), grad_quad(q + 2u), grad_quad(q + 3u), grad_quad(q + 4u), i & 3u);
}
