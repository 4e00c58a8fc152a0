use super::*;

fn offsets(n: u32, b: u32) -> Vec<u32> {
    let mut o: Vec<u32> = (0..n).step_by(b as usize).collect();
    o.push(n);
    o
}

#[test]
fn one_window_when_everything_fits() {
    let w = plan_windows(&offsets(10, 3), 7, 4, 0, 1 << 20, 256, u64::MAX).unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].row_start, w[0].row_end, w[0].mb_count), (0, 10, 4));
    assert!(!w[0].carry_in && !w[0].carry_out);
    assert_eq!(w[0].bind_size, 10 * 7 * 4);
}

#[test]
fn windows_cover_all_rows_and_mark_cut_micro_batches() {
    // 10 rows of 100 f32 = 400 bytes; the binding holds 2 rows after alignment slack.
    let o = offsets(10, 3);
    let w = plan_windows(&o, 100, 4, 12, 1052, 256, u64::MAX).unwrap();
    // [0, 2) [2, 3) [3, 5) [5, 6) [6, 8) [8, 10): a window ends where a
    // micro-batch begun in it would be cut.
    assert_eq!(w.len(), 6);
    let mut row = 0;
    for win in &w {
        assert_eq!(win.row_start, row);
        row = win.row_end;
        assert!(win.bind_offset % 256 == 0);
        assert!(win.bind_size <= 1052);
        let first_byte = win.bind_offset + win.elem_offset as u64 * 4;
        assert_eq!(first_byte, 12 + win.row_start as u64 * 400);
    }
    assert_eq!(row, 10);
    // rows [2, 3): micro-batch 0 = [0, 3) began earlier; [3, 5): micro-batch 1
    // = [3, 6) goes on.
    assert_eq!((w[1].mb_first, w[1].mb_count), (0, 1));
    assert!(w[1].carry_in && !w[1].carry_out);
    assert_eq!((w[2].row_start, w[2].mb_first, w[2].mb_count), (3, 1, 1));
    assert!(!w[2].carry_in && w[2].carry_out);
    assert!(!w[0].carry_in && w[0].carry_out);
    assert_eq!((w[5].row_start, w[5].mb_count), (8, 2));
    assert!(w[5].carry_in && !w[5].carry_out);
}

#[test]
fn windows_end_where_micro_batches_do() {
    // Windows of up to 4 rows over micro-batches of 3 (and a last one of 1):
    // [0, 3) [3, 6) [6, 10), none carried.
    let w = plan_windows(&offsets(10, 3), 100, 4, 0, 1 << 20, 256, 4).unwrap();
    let rows: Vec<(u32, u32)> = w.iter().map(|w| (w.row_start, w.row_end)).collect();
    assert_eq!(rows, [(0, 3), (3, 6), (6, 10)]);
    assert!(w.iter().all(|w| !w.carry_in && !w.carry_out));
    // Micro-batches deeper than a window are still cut.
    let w = plan_windows(&offsets(10, 5), 100, 4, 0, 1 << 20, 256, 4).unwrap();
    let rows: Vec<(u32, u32)> = w.iter().map(|w| (w.row_start, w.row_end)).collect();
    assert_eq!(rows, [(0, 4), (4, 5), (5, 9), (9, 10)]);
    // Ragged: a 1-row micro-batch before a deep one is a window of its own; the
    // deep one is carried through windows of 4, its last window also holds the
    // short ones that fit after it, and the one that would be cut starts the next.
    let o = [0, 1, 10, 11, 13, 14];
    let w = plan_windows(&o, 100, 4, 0, 1 << 20, 256, 4).unwrap();
    let rows: Vec<(u32, u32, bool, bool)> = w
        .iter()
        .map(|w| (w.row_start, w.row_end, w.carry_in, w.carry_out))
        .collect();
    assert_eq!(
        rows,
        [
            (0, 1, false, false),
            (1, 5, false, true),
            (5, 9, true, true),
            (9, 13, true, false),
            (13, 14, false, false)
        ]
    );
}

/// Random ragged offsets, element sizes, alignments, bases, bindings and row
/// caps: the windows cover the rows in order within their bindings, carries
/// match from window to window, a window that carries out holds one
/// micro-batch and is full, and one that does not ends where the next
/// micro-batch would not fit (the review of fbddbe1, 20,000 cases there).
#[test]
fn windows_keep_their_invariants_on_random_plans() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..5000 {
        let n: u32 = rng.random_range(1..300);
        let m: u32 = rng.random_range(1..=n);
        let mut cuts: Vec<u32> = (1..n).collect();
        for i in (1..cuts.len()).rev() {
            cuts.swap(i, rng.random_range(0..=i));
        }
        let mut o: Vec<u32> = cuts.into_iter().take((m - 1) as usize).collect();
        o.push(0);
        o.push(n);
        o.sort_unstable();
        let cols: u64 = rng.random_range(1..50);
        let eb: u64 = if rng.random_bool(0.5) { 4 } else { 2 };
        let align: u64 = [16u64, 32, 256][rng.random_range(0..3)];
        let base: u64 = rng.random_range(0..64u64) * 4;
        let rows: u64 = rng.random_range(1..20);
        let max_binding = rows * cols * eb + align + rng.random_range(0..8u64) * 4;
        let max_rows = if rng.random_bool(0.3) {
            rng.random_range(1..10)
        } else {
            u64::MAX
        };
        let usable = (max_binding / 4 * 4)
            .saturating_sub(align - eb)
            .saturating_sub(4 - eb);
        let rows_max = (usable / (cols * eb)).min(max_rows);
        let planned = plan_windows(&o, cols, eb, base, max_binding, align, max_rows);
        let Ok(w) = planned else {
            assert_eq!(rows_max, 0, "{o:?}: {planned:?}");
            continue;
        };
        let mut row = 0;
        for (k, win) in w.iter().enumerate() {
            assert_eq!(win.row_start, row);
            assert!(win.row_end > win.row_start);
            assert!((win.row_end - win.row_start) as u64 <= rows_max);
            assert!(win.bind_size <= max_binding, "{o:?} {win:?} {max_binding}");
            assert_eq!(win.bind_offset % align, 0);
            let first_byte = win.bind_offset + win.elem_offset as u64 * eb;
            assert_eq!(first_byte, base + win.row_start as u64 * cols * eb);
            let end = first_byte + (win.row_end - win.row_start) as u64 * cols * eb;
            assert!(end <= win.bind_offset + win.bind_size);
            let mbf = win.mb_first as usize;
            let mbl = mbf + win.mb_count as usize - 1;
            assert!(o[mbf] <= win.row_start && o[mbf + 1] > win.row_start);
            assert!(o[mbl] < win.row_end && o[mbl + 1] >= win.row_end);
            assert_eq!(win.carry_in, o[mbf] < win.row_start);
            assert_eq!(win.carry_out, o[mbl + 1] > win.row_end);
            assert_eq!(win.carry_in, k > 0 && w[k - 1].carry_out);
            if win.carry_out {
                assert_eq!(win.mb_count, 1, "{o:?} {w:?}");
                assert_eq!((win.row_end - win.row_start) as u64, rows_max);
            } else if win.row_end < n {
                let next_end = o[mbl + 2];
                assert!(
                    (next_end - win.row_start) as u64 > rows_max,
                    "{o:?} {win:?} rows_max {rows_max}"
                );
            }
            row = win.row_end;
        }
        assert_eq!(row, n);
    }
}

#[test]
fn half_windows_bind_whole_words_within_the_limit() {
    // 10 rows of 7 halves (14 bytes) at byte 12: windows start mid-word.
    let o = offsets(10, 3);
    for max in [60, 64, 100, 1 << 20] {
        let w = plan_windows(&o, 7, 2, 12, max, 32, u64::MAX).unwrap();
        let mut row = 0;
        for win in &w {
            assert_eq!(win.row_start, row);
            row = win.row_end;
            assert_eq!(win.bind_offset % 32, 0);
            assert_eq!(win.bind_size % 4, 0);
            assert!(win.bind_size <= max, "{max}: {win:?}");
            let first_byte = win.bind_offset + win.elem_offset as u64 * 2;
            assert_eq!(first_byte, 12 + win.row_start as u64 * 14);
            let end = first_byte + (win.row_end - win.row_start) as u64 * 14;
            assert!(end <= win.bind_offset + win.bind_size);
        }
        assert_eq!(row, 10);
    }
    assert!(plan_windows(&o, 7, 2, 12, 32, 32, u64::MAX).is_err());
}

#[test]
fn row_larger_than_a_binding_is_an_error() {
    let e = plan_windows(&offsets(4, 1), 1000, 4, 0, 2048, 256, u64::MAX).unwrap_err();
    assert!(matches!(e, ClipError::TooLarge(_)));
}

#[test]
fn windows_hold_at_most_one_dispatch_of_micro_batches() {
    let n = 200_000u32;
    let w = plan_windows(&offsets(n, 1), 1, 4, 0, 1 << 30, 256, u64::MAX).unwrap();
    assert!(w.iter().all(|w| w.mb_count <= MAX_GROUPS_PER_DIM));
    assert_eq!(w.last().unwrap().row_end, n);
}

#[test]
fn vec4_rows_need_aligned_rows() {
    let w =
        |cols, base| plan_windows(&offsets(10, 3), cols, 4, base, 1 << 20, 256, u64::MAX).unwrap();
    let vec4_rows = |cols, w: &Window| vec4_aligned(cols, w.elem_offset);
    assert!(vec4_rows(8, &w(8, 0)[0]));
    assert!(vec4_rows(8, &w(8, 272)[0])); // 16 bytes past an aligned start
    assert!(!vec4_rows(8, &w(8, 260)[0]));
    assert!(!vec4_rows(6, &w(6, 0)[0]));
}

#[test]
fn means_are_materialised_from_three_rows_per_micro_batch() {
    use MeansLayout::{Blocks, None, Rows};
    let gib = 1 << 30;
    let means = |n, m, min_rows, padded: &[u64]| {
        materialize_means(n, m, min_rows, padded, 1 << 27, 256, gib)
    };
    assert_eq!(means(256, 256, 3, &[1000]), None); // b = 1
    assert_eq!(means(10, 4, 3, &[1000]), None); // b = 2.5
    assert_eq!(means(12, 4, 3, &[1000]), Rows); // b = 3
    assert_eq!(means(256, 1, 3, &[1000]), Rows);
    // 256 MiB of means: blocks, each row within a binding.
    assert_eq!(means(256, 64, 3, &[1 << 20]), Blocks);
    assert_eq!(means(256, 64, 3, &[1 << 19, 1 << 19]), Blocks);
    // A software adapter's rule: from b = 2 on.
    assert_eq!(means(256, 256, 2, &[1000]), None); // b = 1
    assert_eq!(means(7, 4, 2, &[1000]), None); // b = 1.75
    assert_eq!(means(8, 4, 2, &[1000]), Rows); // b = 2
    assert_eq!(means(256, 128, 2, &[1 << 20]), Blocks); // 512 MiB of means
                                                        // Over 1 GiB, or one padded row (plus the alignment) over a binding: re-read.
    assert_eq!(means(1024, 512, 2, &[1 << 20]), None);
    assert_eq!(means(256, 4, 3, &[1 << 25]), None);
    assert_eq!(means(256, 4, 3, &[(1 << 25) - 64]), Blocks);
}

#[test]
fn blocks_of_means_are_bound_by_the_rows_a_dispatch_writes() {
    // Tensors of 8 and 1000 padded columns, 10 micro-batches: blocks at
    // elements 0 and 80.
    let blocks = [(0u64, 8u64), (80, 1000)];
    assert_eq!(
        means_block(MeansLayout::Blocks, 10, 8, 1000, 1008),
        (80, 1000)
    );
    assert_eq!(means_block(MeansLayout::Rows, 10, 8, 1000, 1008), (8, 1008));
    // Micro-batches 3 and 4 of the second tensor: elements 3080 .. 5080, bound
    // from byte 12288 (a multiple of 256 below 12320).
    let entry = |t: usize, first, count| (blocks[t].0, blocks[t].1, first, count);
    assert_eq!(
        blocks_binding([entry(1, 3, 2)].into_iter(), 256),
        (12288, 20320 - 12288)
    );
    // With all of the first tensor's: from element 0.
    assert_eq!(
        blocks_binding([entry(0, 0, 10), entry(1, 3, 2)].into_iter(), 256),
        (0, 20320)
    );
    // Windows of pass 4: rows of 1000 floats within 64 KiB from an aligned start.
    assert_eq!(block_window_rows(1000, 65536, 256), 16);
    assert_eq!(block_window_rows(1000, 4256, 256), 1);
}

/// Every pass-4 window of a block of means, bound from an `align`ed start at or
/// before its first row, stays within one binding, wherever the block starts
/// (the alignment slack is part of the binding); the windows are as long as
/// that allows.
#[test]
fn block_windows_stay_within_one_binding() {
    let align = 256;
    for stride in [4, 8, 1000, 1004] {
        for max_binding in [1024, 4256, 65536, 65536 + 68] {
            // materialize_means stores such blocks only where a row fits.
            if stride * 4 + align > max_binding {
                continue;
            }
            let rows = block_window_rows(stride, max_binding, align);
            for start in (0..2 * align).step_by(4) {
                for first in (0..5 * rows).step_by(rows as usize) {
                    let offset = start + first * stride * 4;
                    let (_, size, _) = aligned_binding(offset, rows * stride * 4, align, 4);
                    assert!(
                        size <= max_binding,
                        "stride {stride}, binding {max_binding}, start {start}: \
                         {rows} rows bind {size} bytes"
                    );
                }
            }
            // One row more would not fit from the worst start.
            let worst = align - 4;
            let (_, size, _) = aligned_binding(worst, (rows + 1) * stride * 4, align, 4);
            assert!(size > max_binding, "stride {stride}, binding {max_binding}");
        }
    }
}

#[test]
fn tiles_widen_while_enough_workgroups_remain() {
    let one = |d: u64| std::iter::once(d);
    // b = 1 at N = 256, D = 62500: 16 tiles of 4096 per row; 1 of 65536 still
    // gives 256 workgroups.
    assert_eq!(tile_cols(one(62_500), 256, 32, u64::MAX), 65_536);
    // M = 8: 8 x 4 tiles of 16384 = 32 workgroups, 8 x 2 of 32768 too few.
    assert_eq!(tile_cols(one(62_500), 8, 32, u64::MAX), 16_384);
    // M = 1: never narrower than the minimum, even with too few workgroups.
    assert_eq!(tile_cols(one(62_500), 1, 32, u64::MAX), MIN_TILE_COLS);
    // Hardware adapters ask for u64::MAX workgroups: always the minimum.
    assert_eq!(
        tile_cols(one(1 << 20), 1024, u64::MAX, u64::MAX),
        MIN_TILE_COLS
    );
    // Many tensors count together.
    assert_eq!(
        tile_cols([10u64; 100].into_iter(), 1, 32, u64::MAX),
        MAX_TILE_COLS
    );
    assert_eq!(tile_cols(std::iter::empty(), 4, 1, u64::MAX), MIN_TILE_COLS);
}

/// f32 tensors in buffer `buffer` as the norm pass sees them.
fn f32_in(buffer: usize, windows: &[Window]) -> Pass1Tensor<'_> {
    Pass1Tensor {
        buffer,
        dtype: 0,
        elem_bytes: 4,
        windows,
    }
}

fn entry(tensor: usize, slot: usize, elem_offset: u32) -> Pass1Entry {
    Pass1Entry {
        tensor,
        window: 0,
        slot,
        elem_offset,
    }
}

#[test]
fn tensors_of_one_buffer_share_norm_pass_dispatches() {
    let o = offsets(10, 3);
    // f32 tensors of 7 columns (280 bytes) at 256-aligned bytes; buffer 0 or 1.
    let one = |base| plan_windows(&o, 7, 4, base, 1 << 20, 256, u64::MAX).unwrap();
    let (a, b, c) = (one(512), one(0), one(1024));
    let tensors = [f32_in(0, &a), f32_in(1, &b), f32_in(0, &c)];
    let d = pass1_dispatches(&tensors, 1 << 20, 1);
    // Tensors 0 and 2 share buffer 0: one binding from byte 512, tensor 2 at 128 floats.
    assert_eq!(d.len(), 2);
    let shared = d.iter().find(|d| d.entries.len() == 2).unwrap();
    assert_eq!(shared.entries, vec![entry(0, 0, 0), entry(2, 0, 128)]);
    let binding = shared.bindings[0];
    assert_eq!((binding.offset, binding.size), (512, 512 + 280));
    // The same binding limited to 600 bytes: two dispatches.
    let d = pass1_dispatches(&[f32_in(0, &a), f32_in(0, &c)], 600, 1);
    assert_eq!(d.len(), 2);
    // At most TABLE_LEN tensors per dispatch.
    let many: Vec<Vec<Window>> = (0..TABLE_LEN as u64 + 1).map(|p| one(p * 512)).collect();
    let tensors: Vec<Pass1Tensor<'_>> = many.iter().map(|w| f32_in(0, w)).collect();
    let d = pass1_dispatches(&tensors, 1 << 30, 1);
    let sizes: Vec<usize> = d.iter().map(|d| d.entries.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), TABLE_LEN + 1);
    assert!(sizes.iter().all(|&s| s <= TABLE_LEN), "{sizes:?}");
    // A tensor cut into windows: one dispatch per window, in order, first.
    let cut = plan_windows(&o, 100, 4, 12, 1052, 256, u64::MAX).unwrap();
    let tensors = [f32_in(0, &a), f32_in(0, &cut), f32_in(0, &c)];
    let d = pass1_dispatches(&tensors, 1052, 8);
    let cut_entries: Vec<_> = d[..cut.len()].iter().map(|d| d.entries[0]).collect();
    let want: Vec<_> = cut
        .iter()
        .enumerate()
        .map(|(k, w)| Pass1Entry {
            tensor: 1,
            window: k,
            slot: 0,
            elem_offset: w.elem_offset,
        })
        .collect();
    assert_eq!(cut_entries, want);
    assert_eq!(d.len(), cut.len() + 1);
}

#[test]
fn tensors_of_many_buffers_share_dispatches_through_slots() {
    let o = offsets(10, 3);
    let one = |base| plan_windows(&o, 7, 4, base, 1 << 20, 256, u64::MAX).unwrap();
    let b0 = one(0);
    // The 100 tensors, each in its own buffer: 8 per dispatch.
    let windows: Vec<Vec<Window>> = (0..100).map(|_| one(0)).collect();
    let tensors: Vec<Pass1Tensor<'_>> = windows
        .iter()
        .enumerate()
        .map(|(p, w)| f32_in(p, w))
        .collect();
    let d = pass1_dispatches(&tensors, 1 << 20, 8);
    assert_eq!(d.len(), 13);
    for (k, d) in d.iter().enumerate() {
        assert_eq!(d.bindings.len(), d.entries.len());
        for (slot, e) in d.entries.iter().enumerate() {
            assert_eq!(*e, entry(8 * k + slot, slot, 0));
            assert_eq!(d.bindings[slot].tensor, e.tensor);
        }
    }
    // Without slots: one dispatch per buffer.
    assert_eq!(pass1_dispatches(&tensors, 1 << 20, 1).len(), 100);
    // Buffers 0, 1, 0, 1, ...: two bindings, tensors of a buffer in one.
    let tensors: Vec<Pass1Tensor<'_>> = windows[..6]
        .iter()
        .enumerate()
        .map(|(p, w)| f32_in(p % 2, w))
        .collect();
    let d = pass1_dispatches(&tensors, 1 << 20, 8);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].bindings.len(), 2);
    let slots: Vec<usize> = d[0].entries.iter().map(|e| e.slot).collect();
    assert_eq!(slots, [0, 1, 0, 1, 0, 1]);
    // The same with slots = 1: one dispatch per buffer.
    assert_eq!(pass1_dispatches(&tensors, 1 << 20, 1).len(), 2);
    // Element types never share: two types, two dispatches.
    let mut mixed = tensors.clone();
    mixed[3].dtype = 1;
    let d = pass1_dispatches(&mixed, 1 << 20, 8);
    assert_eq!(d.len(), 2);
    assert!(d.iter().any(|d| d.entries == [entry(3, 0, 0)]));
    // Tensors of a buffer placed from the highest offset down: the binding's
    // start moves lower, and every entry's offset counts from the final start.
    let (hi, mid, lo) = (one(1024), one(512), one(0));
    let d = pass1_dispatches(
        &[
            f32_in(0, &hi),
            f32_in(1, &b0),
            f32_in(0, &mid),
            f32_in(0, &lo),
        ],
        1 << 20,
        8,
    );
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].entries,
        vec![
            entry(0, 0, 256),
            entry(1, 1, 0),
            entry(2, 0, 128),
            entry(3, 0, 0)
        ]
    );
    assert_eq!(
        (d[0].bindings[0].offset, d[0].bindings[0].size),
        (0, 1024 + 280)
    );
    // At most TABLE_LEN entries per dispatch with slots too.
    let many: Vec<Vec<Window>> = (0..TABLE_LEN as u64 + 9).map(|p| one(p * 512)).collect();
    let tensors: Vec<Pass1Tensor<'_>> = many
        .iter()
        .enumerate()
        .map(|(p, w)| f32_in(p % 3, w))
        .collect();
    let d = pass1_dispatches(&tensors, 1 << 30, 8);
    let sizes: Vec<usize> = d.iter().map(|d| d.entries.len()).collect();
    assert_eq!(sizes, [TABLE_LEN, 9]);
    // A binding too small for two tensors of a buffer: another slot.
    let (a, c) = (one(512), one(1024));
    let d = pass1_dispatches(&[f32_in(0, &a), f32_in(0, &c)], 600, 8);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].entries, vec![entry(0, 0, 0), entry(1, 1, 0)]);
    assert_eq!(d[0].bindings.len(), 2);
}

#[test]
fn table_length_matches_the_shaders() {
    let line = format!("const TABLE_LEN: u32 = {TABLE_LEN}u;");
    let shader = include_str!("../../../shaders/tensor_table.wgsl");
    assert!(shader.contains(&line), "tensor_table.wgsl lacks `{line}`");
}

#[test]
fn packing_fills_buffers_in_order_at_aligned_offsets() {
    let (placed, used) = pack(&[100, 4, 300, 600, 8], 256, 1000);
    assert_eq!(placed, vec![(0, 0), (0, 256), (0, 512), (1, 0), (1, 768)]);
    assert_eq!(used, vec![812, 776]);
    let (placed, used) = pack(&[1000, 1], 256, 1000);
    assert_eq!((placed, used), (vec![(0, 0), (1, 0)], vec![1000, 1]));
    // Blocks over the limit each get a buffer of their own.
    let (placed, used) = pack(&[1500, 1200, 10], 256, 1000);
    assert_eq!(placed, vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(used, vec![1500, 1200, 10]);
}

#[test]
fn dispatch_shapes() {
    assert_eq!(dispatch_2d(1).unwrap(), (1, 1));
    assert_eq!(dispatch_2d(65535).unwrap(), (65535, 1));
    assert_eq!(dispatch_2d(65536).unwrap(), (65535, 2));
    assert_eq!(tiles(1, 4096), 1);
    assert_eq!(tiles(4096, 4096), 1);
    assert_eq!(tiles(4097, 4096), 2);
}

#[test]
fn row_chunks_cover_every_row_once_and_reduce_into_the_outputs() {
    assert!(!cuts(63, 32) && cuts(64, 32) && cuts(70, 32));
    assert!(!cuts(1000, 0) && !cuts(u32::MAX, u32::MAX) && cuts(u32::MAX, u32::MAX / 2));
    let entry = |cols, rows, means_base, out_offset, accumulate| MeansSumParams {
        cols,
        rows,
        means_base,
        stride: cols,
        weights_base: 5,
        out_offset,
        accumulate,
        skip_zero: 1,
        vec4_path: 2,
        groups: 3,
        group: 2,
        slot: 1,
        ..Default::default()
    };
    // A short entry among long ones is cut too (into one chunk); rows are
    // split evenly, round(rows / 32) chunks: 100 rows are 34 + 33 + 33.
    let table = [
        entry(7, 100, 3, 100, 1),
        entry(4100, 40, 9, 0, 0),
        entry(1, 64, 0, 50, 0),
    ];
    let chunked = chunk_rows_table(&table, 32, u64::MAX, &[]).unwrap();
    let all: Vec<_> = chunked
        .chunks
        .iter()
        .flat_map(|(k, t)| {
            assert_eq!(*k, 0);
            t.clone()
        })
        .collect();
    assert!(chunked.chunks.iter().all(|(_, t)| t.len() <= TABLE_LEN));
    assert_eq!(all.len(), 3 + 1 + 2);
    // Entry by entry, chunk by chunk: rows, first row, first weight, partial row.
    let want = [
        (7, 34, 3, 5, 0),
        (7, 33, 3 + 34 * 7, 5 + 34, 8),
        (7, 33, 3 + 67 * 7, 5 + 67, 16),
        (4100, 40, 9, 5, 24),
        (1, 32, 0, 5, 24 + 4100),
        (1, 32, 32, 5 + 32, 24 + 4100 + 4),
    ];
    for (e, w) in all.iter().zip(want) {
        assert_eq!(
            (e.cols, e.rows, e.means_base, e.weights_base, e.out_offset),
            w
        );
        assert_eq!(e.accumulate, 0);
        // The rest as in the original entry.
        assert_eq!(
            (e.skip_zero, e.vec4_path, e.groups, e.group, e.slot),
            (1, 2, 3, 2, 1)
        );
    }
    assert_eq!(chunked.scratch_floats, 24 + 4100 + 8);
    assert_eq!(chunked.max_chunks(), 3);
    let reduce: Vec<_> = chunked
        .reduce
        .iter()
        .map(|e| {
            (
                e.cols,
                e.rows,
                e.means_base,
                e.stride,
                e.out_offset,
                e.accumulate,
            )
        })
        .collect();
    assert_eq!(
        reduce,
        [
            (7, 3, 0, 8, 100, 1),
            (4100, 1, 24, 4100, 0, 0),
            (1, 2, 4124, 4, 50, 0)
        ]
    );
    assert!(chunked.reduce.iter().all(|e| (
        e.vec4_path,
        e.groups,
        e.group,
        e.skip_zero,
        e.weights_base
    ) == (1, 1, 0, 0, 0)));
    // Nothing to cut, or a scratch matrix over the binding limit: no chunks.
    assert!(chunk_rows_table(&table[1..2], 32, u64::MAX, &[]).is_none());
    assert!(chunk_rows_table(&table, 0, u64::MAX, &[]).is_none());
    assert!(chunk_rows_table(&table, 32, 4 * (24 + 4100 + 8) - 4, &[]).is_none());
    assert!(chunk_rows_table(&table, 32, 4 * (24 + 4100 + 8), &[]).is_some());
    // Many chunks: tables of at most TABLE_LEN entries.
    let long = chunk_rows_table(&[entry(5, 32 * 40, 0, 0, 0)], 32, u64::MAX, &[]).unwrap();
    let sizes: Vec<usize> = long.chunks.iter().map(|(_, t)| t.len()).collect();
    assert_eq!(sizes, [TABLE_LEN, 40 - TABLE_LEN]);
    // Never more than MAX_PASS4_CHUNK_ROWS rows: 150 rows in chunks of 64 are
    // three of 50 (round(150 / 64) = 2 chunks would hold 75 rows each).
    let capped = chunk_rows_table(&[entry(5, 150, 0, 0, 0)], 64, u64::MAX, &[]).unwrap();
    let rows: Vec<u32> = capped.chunks[0].1.iter().map(|e| e.rows).collect();
    assert_eq!(rows, [50, 50, 50]);
}

/// A tensor's row windows (33, 80, 10 and 50 rows; the first at row 0, the
/// others adding to the output) cut together: chunks of nearly equal rows,
/// round(rows / 32) per window, every row once, partial rows one after the
/// other, one reduction of all of them into the output.
#[test]
fn row_windows_cut_together_reduce_once() {
    let rows = [33, 80, 10, 50];
    let mut first_row = 0;
    let windows: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(k, &r)| {
            let w = MeansSumParams {
                cols: 4101,
                rows: r,
                // Each window's rows from the start of its own binding.
                means_base: 3,
                stride: 4101,
                weights_base: first_row,
                out_offset: 40,
                accumulate: (k > 0) as u32,
                skip_zero: 1,
                vec4_path: 2,
                groups: 2,
                group: 1,
                ..Default::default()
            };
            first_row += r;
            w
        })
        .collect();
    let cut = chunk_windows_table(&windows, 32, u64::MAX, u64::MAX, &[]).unwrap();
    // Window, rows, first element, first weight row, partial row's offset.
    let got: Vec<_> = cut
        .chunks
        .iter()
        .flat_map(|(k, t)| t.iter().map(move |e| (*k, e)))
        .map(|(k, e)| (k, e.rows, e.means_base, e.weights_base, e.out_offset))
        .collect();
    let s = 4104;
    assert_eq!(
        got,
        [
            (0, 33, 3, 0, 0),
            (1, 27, 3, 33, s),
            (1, 27, 3 + 27 * 4101, 60, 2 * s),
            (1, 26, 3 + 54 * 4101, 87, 3 * s),
            (2, 10, 3, 113, 4 * s),
            (3, 25, 3, 123, 5 * s),
            (3, 25, 3 + 25 * 4101, 148, 6 * s),
        ]
    );
    assert!(cut.chunks.iter().flat_map(|(_, t)| t).all(|e| (
        e.accumulate,
        e.skip_zero,
        e.vec4_path,
        e.groups,
        e.group,
        e.stride
    ) == (0, 1, 2, 2, 1, 4101)));
    assert_eq!(cut.scratch_floats, 7 * s as u64);
    assert_eq!(cut.max_chunks(), 7);
    let r = &cut.reduce[..];
    assert_eq!(r.len(), 1);
    assert_eq!(
        (
            r[0].cols,
            r[0].rows,
            r[0].means_base,
            r[0].stride,
            r[0].out_offset
        ),
        (4101, 7, 0, s, 40)
    );
    assert_eq!(
        (
            r[0].accumulate,
            r[0].vec4_path,
            r[0].groups,
            r[0].group,
            r[0].weights_base
        ),
        (0, 1, 1, 0, 0)
    );
    // One window, no chunks, too many partial rows for the budget or the
    // binding: not cut together.
    assert!(chunk_windows_table(&windows[..1], 32, u64::MAX, u64::MAX, &[]).is_none());
    assert!(chunk_windows_table(&windows, 0, u64::MAX, u64::MAX, &[]).is_none());
    assert!(chunk_windows_table(&windows, 32, u64::MAX, 6, &[]).is_none());
    assert!(chunk_windows_table(&windows, 32, u64::MAX, 7, &[]).is_some());
    assert!(chunk_windows_table(&windows, 32, 7 * s as u64 * 4 - 4, u64::MAX, &[]).is_none());
    // Many chunks of one window: tables of at most TABLE_LEN entries.
    let long = MeansSumParams {
        rows: 40 * 4,
        ..windows[1]
    };
    let many = chunk_windows_table(&[windows[0], long], 4, u64::MAX, u64::MAX, &[]).unwrap();
    let sizes: Vec<_> = many.chunks.iter().map(|(k, t)| (*k, t.len())).collect();
    assert_eq!(sizes, [(0, 8), (1, TABLE_LEN), (1, 40 - TABLE_LEN)]);
    // Chunks of 64: a 90-row window is two of 45 rows, not one over 64.
    let deep = MeansSumParams {
        rows: 90,
        ..windows[1]
    };
    let cut = chunk_windows_table(&[windows[0], deep], 64, u64::MAX, u64::MAX, &[]).unwrap();
    let rows: Vec<_> = cut
        .chunks
        .iter()
        .flat_map(|(_, t)| t)
        .map(|e| e.rows)
        .collect();
    assert_eq!(rows, [33, 45, 45]);
    // With two-row micro-batches each window's cuts fall on the call's even
    // rows (its own first row is given): the 80 rows from row 33 are 27 + 26 +
    // 27 rather than 27 + 27 + 26 (the even cut at row 87 moves to the earlier
    // of rows 86 and 88), the 50 rows from row 123 are cut at row 148 as before.
    let cut = chunk_windows_table(&windows, 32, u64::MAX, u64::MAX, &offsets(173, 2)).unwrap();
    let got: Vec<_> = cut
        .chunks
        .iter()
        .flat_map(|(_, t)| t)
        .map(|e| (e.weights_base, e.rows))
        .collect();
    assert_eq!(
        got,
        [
            (0, 33),
            (33, 27),
            (60, 26),
            (86, 27),
            (113, 10),
            (123, 25),
            (148, 25)
        ]
    );
}

/// Under a loop budget, tiles narrow and windows are capped only where the norm
/// pass's walks down a micro-batch (three per step: plain, Blue's, tails) or pass
/// 4's walk over re-read rows would exceed it.
#[test]
fn window_rows_cap_follows_the_loop_budget() {
    let budget = Some(1 << 15);
    // No budget (hardware): no cap.
    assert_eq!(window_rows_cap(None, 65536, 1 << 20, true, 0), u64::MAX);
    assert_eq!(tile_cap(None, 1 << 20), u64::MAX);
    // Tiles of 4096 columns: 32 steps per row, 3 walks: 341 rows per micro-batch.
    assert_eq!(window_rows_cap(budget, 4096, 341, false, 32), u64::MAX);
    assert_eq!(window_rows_cap(budget, 4096, 342, false, 32), 341);
    // Tiles of 65536 columns: 512 steps per row.
    assert_eq!(window_rows_cap(budget, 65536, 22, false, 32), 21);
    // Re-read rows: pass 4 sums 2520 rows, or partial rows of chunks of 8 or more.
    assert_eq!(window_rows_cap(budget, 65536, 1, true, 0), 2520);
    assert_eq!(window_rows_cap(budget, 65536, 1, true, 4), 2520);
    assert_eq!(window_rows_cap(budget, 65536, 1, true, 32), 2520 * 32);
    assert_eq!(window_rows_cap(budget, 4096, 2048, true, 32), 341);
    assert_eq!(pass4_max_rows(1 << 15), 2520);
    // The widest tile for deep micro-batches: 32 rows allow 341 steps (32768
    // columns), 342 rows or more only the narrowest.
    assert_eq!(tile_cap(budget, 32), 341 * 128);
    assert_eq!(tile_cap(budget, 342), MIN_TILE_COLS);
    let one = std::iter::once(62_500u64);
    assert_eq!(tile_cols(one.clone(), 8, 1, u64::MAX), MAX_TILE_COLS);
    assert_eq!(tile_cols(one, 8, 1, tile_cap(budget, 32)), 32_768);
    // A capped plan: windows of at most 341 rows, carrying the deep micro-batch.
    let o = offsets(1000, 1000);
    let w = plan_windows(&o, 4096, 4, 0, 1 << 30, 256, 341).unwrap();
    assert_eq!(w.len(), 3);
    assert!(w.iter().all(|w| w.row_end - w.row_start <= 341));
    assert!(w[0].carry_out && w[1].carry_in && w[1].carry_out && w[2].carry_in);
}

#[test]
fn shared_dispatches_are_split_to_bind_their_blocks_of_means() {
    let entry = |tensor| Pass1Entry {
        tensor,
        window: 0,
        slot: tensor % 2,
        elem_offset: 0,
    };
    let bindings = vec![
        Binding {
            tensor: 0,
            offset: 0,
            size: 64,
        },
        Binding {
            tensor: 1,
            offset: 0,
            size: 64,
        },
    ];
    let shared = |tensors: std::ops::Range<usize>| Pass1Dispatch {
        entries: tensors.map(entry).collect(),
        bindings: bindings.clone(),
    };
    // At most 2 entries fit; tensor 9 alone does not.
    let fits = |e: &[Pass1Entry]| e.len() <= 2 && e.iter().all(|e| e.tensor != 9);
    let split = split_for_blocks(vec![shared(0..1), shared(1..6)], fits).unwrap();
    let tensors: Vec<Vec<usize>> = split
        .iter()
        .map(|d| d.entries.iter().map(|e| e.tensor).collect())
        .collect();
    assert_eq!(tensors, [vec![0], vec![1, 2], vec![3, 4], vec![5]]);
    assert!(split.iter().all(|d| d.bindings == bindings));
    assert!(split_for_blocks(vec![shared(7..10)], fits).is_none());
}

/// Row counts around one and two dispatches' worth of one-row micro-batches:
/// 200,000 rows alone never put a window's natural range one over the limit.
#[test]
fn windows_at_exactly_one_dispatch_of_micro_batches() {
    for n in [
        65_534u32,
        65_535,
        65_536,
        65_537,
        2 * 65_535,
        2 * 65_535 + 1,
    ] {
        let w = plan_windows(&offsets(n, 1), 1, 4, 0, 1 << 30, 256, u64::MAX).unwrap();
        assert!(
            w.iter().all(|w| w.mb_count <= MAX_GROUPS_PER_DIM),
            "n {n}: {w:?}"
        );
        assert_eq!(w.iter().map(|w| w.mb_count).sum::<u32>(), n, "n {n}");
    }
}

/// A binding read as shifted quads holds whole quads of its element type (8
/// bytes for 16-bit input, 16 for f32), inside the buffer and one binding; a
/// rounding to 4 bytes passed every GPU test on lavapipe (mutation testing).
#[test]
fn whole_quads_bindings_hold_whole_quads_inside_the_buffer() {
    for elem_bytes in [2u64, 4] {
        let quad = 4 * elem_bytes;
        for offset in [0u64, 256, 512] {
            for size in 1..=3 * quad {
                let size = size.next_multiple_of(4); // bindings are whole words
                for buffer_size in [offset + size, offset + size + 4, offset + 3 * quad] {
                    for max_binding in [size, 2 * quad, u64::MAX] {
                        let got =
                            whole_quads_binding(offset, size, elem_bytes, buffer_size, max_binding);
                        let fits = offset + size.next_multiple_of(quad) <= buffer_size
                            && size.next_multiple_of(quad) <= max_binding;
                        assert_eq!(
                            got.is_some(),
                            fits,
                            "{elem_bytes} {offset} {size} {buffer_size}"
                        );
                        if let Some(q) = got {
                            assert_eq!(q % quad, 0);
                            assert!(q >= size && q < size + quad);
                        }
                    }
                }
            }
        }
    }
    // An f16 row ending 4 bytes into a quad: 4 bytes more where the buffer has them.
    assert_eq!(whole_quads_binding(0, 12, 2, 16, u64::MAX), Some(16));
    assert_eq!(whole_quads_binding(0, 12, 2, 12, u64::MAX), None);
    assert_eq!(
        whole_quads_binding(u64::MAX - 8, 12, 2, u64::MAX, u64::MAX),
        None
    );
}

#[test]
fn oct_rows_only_for_16_bit_rows_on_whole_octs() {
    let rows = [(8u64, 0u64), (1032, 8), (16, 4096)];
    assert!(oct_rows(2, 4128, rows.into_iter()));
    // f32 rows, a binding ending mid-oct, a width or a first row off by 4.
    assert!(!oct_rows(4, 4128, rows.into_iter()));
    assert!(!oct_rows(2, 4120, rows.into_iter()));
    assert!(!oct_rows(2, 4128, [(12, 0)].into_iter()));
    assert!(!oct_rows(2, 4128, rows.into_iter().chain([(8, 4)])));
}

/// The rows of each chunk of a cut table, in order.
fn chunk_rows_of(cut: &RowChunks) -> Vec<u32> {
    cut.chunks
        .iter()
        .flat_map(|(_, t)| t)
        .map(|e| e.rows)
        .collect()
}

/// A pass-4 entry over `rows` input rows from row `first_row` of the call.
fn rows_entry(rows: u32, first_row: u32) -> MeansSumParams {
    MeansSumParams {
        cols: 10,
        rows,
        stride: 10,
        weights_base: first_row,
        ..Default::default()
    }
}

/// Chunk cuts move to the nearest micro-batch start within half a chunk of the
/// even cut, keeping the chunk count and 1 to MAX_PASS4_CHUNK_ROWS rows a chunk.
#[test]
fn row_chunks_end_at_micro_batch_starts_where_they_can() {
    let cut = |rows, first_row, chunk_rows, offsets: &[u32]| {
        let table = [rows_entry(rows, first_row)];
        chunk_rows_of(&chunk_rows_table(&table, chunk_rows, u64::MAX, offsets).unwrap())
    };
    // 70 rows in two-row micro-batches: the even cut (35) would split rows 34
    // and 35; the earlier of the two nearest starts (34, 36) takes it.
    assert_eq!(cut(70, 0, 32, &offsets(70, 2)), [34, 36]);
    // Every row a start (b = 1), or none given: the even cut.
    assert_eq!(cut(70, 0, 32, &offsets(70, 1)), [35, 35]);
    assert_eq!(cut(70, 0, 32, &[]), [35, 35]);
    // A window from row 101 of the call: the call's starts, less 101.
    assert_eq!(cut(70, 101, 32, &offsets(300, 2)), [35, 35]);
    assert_eq!(cut(70, 100, 32, &offsets(300, 2)), [34, 36]);
    // The nearest start within half a chunk (17 rows), else the even cut.
    assert_eq!(cut(70, 0, 32, &[0, 10, 50, 70]), [50, 20]);
    assert_eq!(cut(70, 0, 32, &[0, 5, 60, 70]), [35, 35]);
    // Never more than MAX_PASS4_CHUNK_ROWS rows: 150 rows in three chunks (even
    // cuts 50 and 100); the first moves to the start at 26, so the second may
    // lie at most 64 rows later (90), with no start there.
    assert_eq!(cut(150, 0, 64, &[0, 26, 150]), [26, 64, 60]);
    // The chunks' first rows and weights follow their rows.
    let table = [MeansSumParams {
        means_base: 3,
        ..rows_entry(70, 100)
    }];
    let chunks = chunk_rows_table(&table, 32, u64::MAX, &offsets(300, 2)).unwrap();
    let firsts: Vec<_> = chunks.chunks[0]
        .1
        .iter()
        .map(|e| (e.means_base, e.weights_base, e.out_offset))
        .collect();
    assert_eq!(firsts, [(3, 100, 0), (3 + 34 * 10, 134, 12)]);
}

proptest::proptest! {
    /// Any micro-batch starts: the same chunk count as the even cut, every row
    /// once, 1 to MAX_PASS4_CHUNK_ROWS rows a chunk; with uniform micro-batches
    /// of 2 or 3 rows and chunks of at least twice as many and at most half the
    /// most rows (the default 32 among them), every cut at a start (the entry's
    /// first row need not be one). Chunks of nearly MAX_PASS4_CHUNK_ROWS rows
    /// cannot all end at starts: 1,767 rows in 28 chunks of at most 64 rows
    /// need some of 64, no multiple of 3.
    #[test]
    fn row_chunks_keep_their_count_and_limits(
        rows in 1u32..3000,
        first_row in 0u32..50,
        chunk_rows in 1u32..=MAX_PASS4_CHUNK_ROWS,
        steps in proptest::collection::vec(1u32..80, 1..200),
        b in 2u32..=3,
    ) {
        let mut ragged = vec![0u32];
        for s in steps.iter().cycle() {
            let next = ragged.last().unwrap() + s;
            if next >= first_row + rows {
                break;
            }
            ragged.push(next);
        }
        ragged.push(first_row + rows);
        let table = [rows_entry(rows, first_row)];
        let even = chunk_rows_table(&table, chunk_rows, u64::MAX, &[]);
        let uniform = offsets(first_row + rows, b);
        for starts in [&ragged, &uniform] {
            let cut = chunk_rows_table(&table, chunk_rows, u64::MAX, starts);
            proptest::prop_assert_eq!(cut.is_some(), even.is_some());
            let (Some(cut), Some(even)) = (cut, &even) else { continue };
            let sizes = chunk_rows_of(&cut);
            proptest::prop_assert_eq!(sizes.len(), chunk_rows_of(even).len());
            proptest::prop_assert_eq!(sizes.iter().sum::<u32>(), rows);
            proptest::prop_assert!(sizes.iter().all(|&r| (1..=MAX_PASS4_CHUNK_ROWS).contains(&r)));
            let mut row = first_row;
            for e in cut.chunks.iter().flat_map(|(_, t)| t) {
                proptest::prop_assert_eq!(e.weights_base, row);
                row += e.rows;
            }
            if starts == &uniform && (2 * b..=MAX_PASS4_CHUNK_ROWS / 2).contains(&chunk_rows) {
                for e in cut.chunks.iter().flat_map(|(_, t)| t).skip(1) {
                    proptest::prop_assert_eq!(e.weights_base % b, 0, "{:?}", sizes);
                }
            }
        }
    }
}
