// The input words of a dispatch whose rows lie in one buffer range: the kernel's
// `grads` and `grads4` bindings (see grads_f32.wgsl for the interface).
alias GradBinding4 = GradQuad;

// Word i of the binding.
fn grad_word(i: u32) -> GradWord {
    return grads[i];
}

// Words 4q .. 4q + 3 of the binding's elements (a quad of elements).
fn grad_words4(q: u32) -> GradQuad {
    return grads4[q];
}
