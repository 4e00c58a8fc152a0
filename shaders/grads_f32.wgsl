// Input gradients as f32 (prepended after common.wgsl to the kernels that read
// them). A kernel declares `grads: array<GradWord>` and `grads4: array<GradQuad>`
// (the same rows, read four elements at a time) and reads them only through
// grad_at / grad_quad, so one body serves every element type.
alias GradWord = f32;
alias GradQuad = vec4<f32>;

// Element i of the binding.
fn grad_at(i: u32) -> f32 {
    return grads[i];
}

// Elements 4q .. 4q + 3 of the binding.
fn grad_quad(q: u32) -> vec4<f32> {
    return grads4[q];
}
