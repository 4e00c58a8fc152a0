// Input gradients as f32 (prepended after common.wgsl to the kernels that read
// them). A kernel declares `grads: array<GradWord>` and `grads4: array<GradQuad>`
// (the same rows, read four elements at a time) and reads them only through
// grad_at / grad_quad, so one body serves every element type. Those read the
// words through grad_word / grad_words4 (grads_one_binding.wgsl, or
// grads_slots.wgsl for rows of several buffers in one dispatch).
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
