// The input words of a dispatch over one buffer range whose 16-bit rows all
// start at multiples of 8 elements (the same interface as
// grads_one_binding.wgsl, for f16 and bf16 only): `grads4` is bound as octs, 8
// elements (16 bytes) per entry, so that two adjacent quads q, q + 1 (q even)
// are one `vec4<u32>` load (grad_words8) instead of two `vec2<u32>` ones. The
// host takes this variant with small workgroups (a software adapter: llvmpipe
// pays per load instruction, lane by lane; the kernels' ADJACENT mappings read
// a lane's quads in even-aligned pairs) where every entry's rows and the
// binding's size are whole octs (`oct_rows` in src/gpu/plan.rs).
alias GradBinding4 = vec4<u32>;

// Word i of the binding.
fn grad_word(i: u32) -> GradWord {
    return grads[i];
}

// Words of elements 4q .. 4q + 3: half of an oct.
fn grad_words4(q: u32) -> vec2<u32> {
    let o = grads4[q >> 1u];
    return select(o.xy, o.zw, (q & 1u) != 0u);
}

// Words of elements 4q .. 4q + 7, q even: one oct.
fn grad_words8(q: u32) -> vec4<u32> {
    return grads4[q >> 1u];
}
