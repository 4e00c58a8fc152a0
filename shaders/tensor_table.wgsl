// The tensor table of the two kernels that read the input (prepended after the
// gradient loader to mb_partials and weighted_means). One dispatch serves up to
// TABLE_LEN tensors (or row windows): the kernel binds `table: array<Params,
// TABLE_LEN>` and numbers its work units (column tiles, column groups) entry after
// entry; it defines table_first(k), entry k's first unit, and table_len(), the
// entries in use (entry 0's count). The host groups the tensors
// (`pass1_dispatches` in src/gpu/plan.rs, whose TABLE_LEN must match).
const TABLE_LEN: u32 = 32u;

// The last entry whose first unit is at or before `unit` (a binary search; the
// same for every invocation of a workgroup).
fn table_entry(unit: u32) -> u32 {
    var entry = 0u;
    var past = table_len();
    while (past - entry > 1u) {
        let mid = (entry + past) / 2u;
        if (table_first(mid) <= unit) {
            entry = mid;
        } else {
            past = mid;
        }
    }
    return entry;
}
