// Input gradients as bfloat16, two per 32-bit word, element 2k in the low half
// of word k (little-endian); a bf16 is the upper half of an f32, so the exact
// conversion is a shift. See grads_f32.wgsl for the interface.
alias GradWord = u32;
alias GradQuad = vec2<u32>;

fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn grad_at(i: u32) -> f32 {
    return bf16_pair(grad_word(i >> 1u))[i & 1u];
}

fn grad_quad(q: u32) -> vec4<f32> {
    let w = grad_words4(q);
    return vec4<f32>(bf16_pair(w.x), bf16_pair(w.y));
}

// Elements 4q .. 4q + 7 as two quads (see grads_f32.wgsl): the words of both
// quads in one `vec4<u32>` load where the rows are bound as octs
// (grads_octs.wgsl, q even), else two `vec2<u32>` loads.
fn grad_quad_pair(q: u32) -> mat2x4<f32> {
    let w = grad_words8(q);
    return mat2x4<f32>(vec4<f32>(bf16_pair(w.x), bf16_pair(w.y)), vec4<f32>(bf16_pair(w.z), bf16_pair(w.w)));
}
