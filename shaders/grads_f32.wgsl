// Input gradients as f32 (prepended after common.wgsl to the kernels that read
// them). A kernel declares `grads: array<GradWord>` and `grads4:
// array<GradBinding4>` (the same rows, read four elements at a time, or eight
// for 16-bit rows bound as octs: the words file declares the type) and reads
// them only through grad_at / grad_quad / grad_quad_pair, so one body serves
// every element type. Those read the words through grad_word / grad_words4 /
// grad_words8 (grads_one_binding.wgsl, grads_octs.wgsl for 16-bit rows bound
// as octs, or grads_slots.wgsl for rows of several buffers in one dispatch).
alias GradWord = f32;
alias GradQuad = vec4<f32>;

// Element i of the binding.
fn grad_at(i: u32) -> f32 {
    return grad_word(i);
}

// Elements 4q .. 4q + 3 of the binding.
fn grad_quad(q: u32) -> vec4<f32> {
    return grad_words4(q);
}

// Elements 4q .. 4q + 7 as two quads (the columns). For 16-bit rows bound as
// octs (grads_octs.wgsl) q must be even: one load then serves both quads.
fn grad_quad_pair(q: u32) -> mat2x4<f32> {
    return mat2x4<f32>(grad_quad(q), grad_quad(q + 1u));
}
