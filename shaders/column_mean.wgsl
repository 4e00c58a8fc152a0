// Shared by the kernels that read the gradients (prepended after common.wgsl).
// Reads the gradients through grad_at (grads_<type>.wgsl).

// sum over `rows` rows of (x * inv_n), rows `stride` elements apart, starting at
// element `first`; blocked accumulation (see common.wgsl).
fn column_mean(first: u32, rows: u32, stride: u32, inv_n: f32) -> f32 {
    var total = 0.0;
    var block = 0.0;
    var idx = first;
    for (var r = 0u; r < rows; r++) {
        block += grad_at(idx) * inv_n;
        idx += stride;
        if ((r + 1u) % ROW_BLOCK == 0u) {
            total += block;
            block = 0.0;
        }
    }
    return total + block;
}
