// Input gradients as IEEE binary16, two per 32-bit word, element 2k in the low
// half of word k (little-endian). See grads_f32.wgsl for the interface.
//
// The host appends `f16_pair(w)`, the two halves of w as f32 (`F16_PAIR_BITS`
// and `F16_PAIR_UNPACK` in src/gpu/kernels.rs): on hardware f16_pair_bits
// below, exact (subnormals, infinities and NaN payloads included) and needing
// nothing; with small workgroups (a software adapter) the unpack2x16float
// builtin where the device compiles it (wgpu's SHADER_F16_IN_F32 downlevel
// flag, which wgpu 30 withholds only on llvmpipe without shaderFloat16). On
// lavapipe the builtin is about 10% faster at b = 1 and exact for every finite
// value (tests/half_inputs.rs reads each through both); WGSL lets it flush
// subnormals, so hardware keeps the integer decode until a run there shows the
// builtin exact.
alias GradWord = u32;
alias GradQuad = vec2<u32>;

// The two halves of w as f32, with integer operations and selects.
fn f16_pair_bits(w: u32) -> vec2<f32> {
    let h = vec2<u32>(w & 0xffffu, w >> 16u);
    let sign = (h & vec2<u32>(0x8000u)) << vec2<u32>(16u);
    let em = h & vec2<u32>(0x7fffu); // exponent and mantissa
    // Normal: move into place and rebias the exponent from 15 to 127.
    let normal = (em << vec2<u32>(13u)) + vec2<u32>(0x38000000u);
    // Infinity or NaN (exponent 31): exponent 255, payload kept.
    let special = (em << vec2<u32>(13u)) | vec2<u32>(0x7f800000u);
    // Zero or subnormal: mantissa * 2^-24, exact (and normal) in f32.
    let sub = bitcast<vec2<u32>>(vec2<f32>(em) * 0x1p-24f);
    let bits = select(select(normal, special, em >= vec2<u32>(0x7c00u)), sub, em < vec2<u32>(0x0400u));
    return bitcast<vec2<f32>>(bits | sign);
}

fn grad_at(i: u32) -> f32 {
    return f16_pair(grad_word(i >> 1u))[i & 1u];
}

fn grad_quad(q: u32) -> vec4<f32> {
    let w = grad_words4(q);
    return vec4<f32>(f16_pair(w.x), f16_pair(w.y));
}

// Elements 4q .. 4q + 7 as two quads (see grads_f32.wgsl): the words of both
// quads in one `vec4<u32>` load where the rows are bound as octs
// (grads_octs.wgsl, q even), else two `vec2<u32>` loads.
fn grad_quad_pair(q: u32) -> mat2x4<f32> {
    let w = grad_words8(q);
    return mat2x4<f32>(vec4<f32>(f16_pair(w.x), f16_pair(w.y)), vec4<f32>(f16_pair(w.z), f16_pair(w.w)));
}
