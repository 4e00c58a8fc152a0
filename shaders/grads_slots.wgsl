// The input words of a dispatch whose tensors lie in up to 8 buffer ranges
// (the same interface as grads_one_binding.wgsl): slot 0 is the kernel's `grads`
// and `grads4`, slot k > 0 the pair grads_k, grads4_k at bindings 14 + 2k and
// 15 + 2k; the workgroup's table entry names its slot (`params.slot`, the same
// for every invocation of a workgroup, so every branch below is uniform). The
// host binds slots it does not use to a dummy buffer. Used only for dispatches
// that span several buffers (many tensors each in its own buffer share the norm
// pass's dispatches instead of one dispatch per tensor); the others keep the
// one-binding loads, which have no branch.
alias GradBinding4 = GradQuad;
@group(0) @binding(16) var<storage, read> grads_1: array<GradWord>;
@group(0) @binding(17) var<storage, read> grads4_1: array<GradQuad>;
@group(0) @binding(18) var<storage, read> grads_2: array<GradWord>;
@group(0) @binding(19) var<storage, read> grads4_2: array<GradQuad>;
@group(0) @binding(20) var<storage, read> grads_3: array<GradWord>;
@group(0) @binding(21) var<storage, read> grads4_3: array<GradQuad>;
@group(0) @binding(22) var<storage, read> grads_4: array<GradWord>;
@group(0) @binding(23) var<storage, read> grads4_4: array<GradQuad>;
@group(0) @binding(24) var<storage, read> grads_5: array<GradWord>;
@group(0) @binding(25) var<storage, read> grads4_5: array<GradQuad>;
@group(0) @binding(26) var<storage, read> grads_6: array<GradWord>;
@group(0) @binding(27) var<storage, read> grads4_6: array<GradQuad>;
@group(0) @binding(28) var<storage, read> grads_7: array<GradWord>;
@group(0) @binding(29) var<storage, read> grads4_7: array<GradQuad>;

// Word i of the workgroup's slot.
fn grad_word(i: u32) -> GradWord {
    switch params.slot {
        case 1u: { return grads_1[i]; }
        case 2u: { return grads_2[i]; }
        case 3u: { return grads_3[i]; }
        case 4u: { return grads_4[i]; }
        case 5u: { return grads_5[i]; }
        case 6u: { return grads_6[i]; }
        case 7u: { return grads_7[i]; }
        default: { return grads[i]; }
    }
}

// Words of elements 4q .. 4q + 3 of the workgroup's slot.
fn grad_words4(q: u32) -> GradQuad {
    switch params.slot {
        case 1u: { return grads4_1[q]; }
        case 2u: { return grads4_2[q]; }
        case 3u: { return grads4_3[q]; }
        case 4u: { return grads4_4[q]; }
        case 5u: { return grads4_5[q]; }
        case 6u: { return grads4_6[q]; }
        case 7u: { return grads4_7[q]; }
        default: { return grads4[q]; }
    }
}
