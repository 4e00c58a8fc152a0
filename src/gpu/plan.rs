//! Planning: how a tensor is cut into row windows that fit one storage binding, and
//! how many workgroups each pass dispatches. Pure arithmetic, tested without a GPU.

use super::defaults::MAX_PASS4_CHUNK_ROWS;
use super::kernels::MeansSumParams;
use crate::error::{ClipError, Result};

/// Narrowest column tile of one norm-pass workgroup (a multiple of the 4 x 64
/// columns its threads load per step).
pub(crate) const MIN_TILE_COLS: u64 = 4096;
/// Widest column tile: 2^16 squares per workgroup keep Blue's sums in mb_partials.wgsl
/// far from overflow.
pub(crate) const MAX_TILE_COLS: u64 = 65536;
/// Workgroup size of every kernel.
pub(crate) const WORKGROUP: u64 = 256;
/// Columns per workgroup of `weighted_means` (64 threads of 8 quads).
pub(crate) const MEANS_SUM_COLS: u64 = 2048;
/// Largest workgroup count of one dispatch dimension (WebGPU default limit).
pub(crate) const MAX_GROUPS_PER_DIM: u32 = 65535;

/// A range of rows of one tensor, bound as one storage binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    /// First row.
    pub row_start: u32,
    /// One past the last row.
    pub row_end: u32,
    /// First micro-batch that has rows in the window.
    pub mb_first: u32,
    /// Number of micro-batches with rows in the window.
    pub mb_count: u32,
    /// The first micro-batch began in an earlier window.
    pub carry_in: bool,
    /// The last micro-batch goes on in a later window.
    pub carry_out: bool,
    /// Byte offset of the binding in the buffer (aligned to the device's storage
    /// offset alignment).
    pub bind_offset: u64,
    /// Byte size of the binding.
    pub bind_size: u64,
    /// Element index, within the binding, of (row_start, column 0).
    pub elem_offset: u32,
}

/// The size of a binding from `offset` of at least `size` bytes that holds whole
/// quads of `elem_bytes` elements (`size` rounded up to `4 * elem_bytes`), if a
/// buffer of `buffer_size` bytes and one binding of at most `max_binding` have
/// room for it (`GpuClipper::quads_binding`).
pub(crate) fn whole_quads_binding(
    offset: u64,
    size: u64,
    elem_bytes: u64,
    buffer_size: u64,
    max_binding: u64,
) -> Option<u64> {
    let quads = size.next_multiple_of(4 * elem_bytes);
    (offset
        .checked_add(quads)
        .is_some_and(|end| end <= buffer_size)
        && quads <= max_binding)
        .then_some(quads)
}

/// A byte range `[offset, offset + len)` of a buffer bound from an aligned start,
/// with the binding's size rounded up to whole 32-bit words: (binding offset,
/// binding size, index of the element at `offset` counted in `elem_bytes` elements
/// from the binding's start).
pub(crate) fn aligned_binding(
    offset: u64,
    len: u64,
    align: u64,
    elem_bytes: u64,
) -> (u64, u64, u32) {
    let start = offset - offset % align;
    let elem_offset = ((offset - start) / elem_bytes) as u32;
    (
        start,
        (offset + len - start).next_multiple_of(4),
        elem_offset,
    )
}

/// The micro-batch holding `row`.
fn micro_batch_of(offsets: &[u32], row: u32) -> u32 {
    (offsets.partition_point(|&o| o <= row) - 1) as u32
}

/// Cuts a `[N, cols]` tensor of `elem_bytes`-byte elements that starts at byte
/// `base` (a multiple of 4) of its buffer into windows of whole rows, each bound in
/// at most `max_binding` bytes and touching at most `MAX_GROUPS_PER_DIM`
/// micro-batches and at most `max_rows` rows (see `window_rows_cap`). A window
/// ends before a micro-batch that begins in it would be cut; only a micro-batch
/// deeper than a window (one that begins a window and does not fit it) is cut,
/// and carried from window to window.
pub(crate) fn plan_windows(
    offsets: &[u32],
    cols: u64,
    elem_bytes: u64,
    base: u64,
    max_binding: u64,
    align: u64,
    max_rows: u64,
) -> Result<Vec<Window>> {
    let n = *offsets.last().expect("offsets hold at least [0, N]");
    let row_bytes = cols * elem_bytes;
    // A window starts at most `align - elem_bytes` bytes past its aligned binding
    // offset, and its end is rounded up to a whole word.
    let usable = (max_binding / 4 * 4)
        .saturating_sub(align - elem_bytes)
        .saturating_sub(4 - elem_bytes)
        .min(u32::MAX as u64);
    let rows_max = usable / row_bytes;
    if rows_max == 0 {
        return Err(ClipError::TooLarge(format!(
            "one row of {cols} elements ({row_bytes} bytes) does not fit in a storage binding of {max_binding} bytes ({usable} usable after the {align}-byte offset alignment's slack)"
        )));
    }
    let rows_max = rows_max.min(max_rows.max(1));
    let mut windows = Vec::new();
    let mut row_start = 0u32;
    while row_start < n {
        let mut row_end = (row_start as u64 + rows_max).min(n as u64) as u32;
        let mb_first = micro_batch_of(offsets, row_start);
        let mut mb_last = micro_batch_of(offsets, row_end - 1);
        if mb_last - mb_first >= MAX_GROUPS_PER_DIM {
            mb_last = mb_first + MAX_GROUPS_PER_DIM - 1;
            row_end = offsets[mb_last as usize + 1];
        }
        // A window ends where a micro-batch does if one that begins in it goes
        // on past its end: no carry, and the micro-batches of a window (the
        // norm pass's slowest grid dimension) then hold equal rows where they
        // are uniform. llvmpipe hands each of its threads a contiguous share of
        // a dispatch's workgroups; with the N = 256, D = 1M, b = 32 in
        // 128 MiB windows of 33 rows, one thread got the 31-row part of each
        // window and the other the 2-row part: 1.6x the time of 32-row windows.
        let last_start = offsets[mb_last as usize];
        if row_end < offsets[mb_last as usize + 1] && last_start > row_start {
            row_end = last_start;
            mb_last -= 1;
        }
        let (bind_offset, bind_size, elem_offset) = aligned_binding(
            base + row_start as u64 * row_bytes,
            (row_end - row_start) as u64 * row_bytes,
            align,
            elem_bytes,
        );
        windows.push(Window {
            row_start,
            row_end,
            mb_first,
            mb_count: mb_last - mb_first + 1,
            carry_in: offsets[mb_first as usize] < row_start,
            carry_out: offsets[mb_last as usize + 1] > row_end,
            bind_offset,
            bind_size,
            elem_offset,
        });
        row_start = row_end;
    }
    Ok(windows)
}

/// Columns one norm-pass (`mb_partials`) workgroup of 8 lanes advances per
/// iteration of its walk along a row: each lane's 4 adjacent quads, 8 lanes
/// (wider workgroups advance further, so this bounds their iterations too).
const PASS1_COLS_PER_STEP: u64 = 8 * 4 * 4;

/// Walks of the norm pass over a micro-batch's rows counted per step and row:
/// the plain walk, the walk again with Blue's scaled sums where a value lies
/// outside [2^-40, 2^52] (`plain_is_safe` in mb_partials.wgsl), and one more for
/// the tail loops of partial tiles and the deep walk's chunks.
const PASS1_WALKS: u64 = 3;

/// Iterations of pass 4's loops per row it sums: a thread whose quads do not all
/// exist sums its up to 8 quads one at a time, each a walk over all rows, a
/// partial quad with a loop over its up to 4 elements where it is read by
/// scalar loads, plus the walks' blocks of `ROW_BLOCK` rows.
const PASS4_STEPS_PER_ROW: u64 = 13;

/// Row chunks below this many rows may not fit their partial rows in one binding
/// (`chunk_rows_table` then gives `None` and pass 4 walks the window's rows at
/// once): the window cap counts on chunks only from this size.
const MIN_CAPPED_CHUNK_ROWS: u32 = 8;

/// The widest norm-pass tile under a loop `budget` for micro-batches of up to
/// `deepest` rows (at least `MIN_TILE_COLS`; u64::MAX without a budget): a
/// narrower tile makes fewer steps per row, so deep micro-batches need no row
/// windows until even the narrowest tile is too wide.
pub(crate) fn tile_cap(budget: Option<u64>, deepest: u64) -> u64 {
    match budget {
        None => u64::MAX,
        Some(budget) => {
            let steps = (budget / (PASS1_WALKS * deepest.max(1))).max(1);
            (steps * PASS1_COLS_PER_STEP).max(MIN_TILE_COLS)
        }
    }
}

/// The most stored means pass 4 may sum in one invocation under a loop `budget`
/// (see `defaults::default_loop_budget`).
pub(crate) fn pass4_max_rows(budget: u64) -> u64 {
    budget / PASS4_STEPS_PER_ROW
}

/// The most rows a row window may hold under a loop `budget` (u64::MAX: none):
/// the norm pass walks each micro-batch's rows of the window up to
/// `PASS1_WALKS` times per step of its tile (`tile_cols / PASS1_COLS_PER_STEP`
/// steps), a cap needed only where a micro-batch is deeper than that allows
/// (`deepest` rows; its sums then carry from window to window); pass 4, where it re-reads the input rows
/// (`rereads`), walks a window's rows, or its row chunks' partial rows
/// (`chunk_rows > 0`: one per chunk).
pub(crate) fn window_rows_cap(
    budget: Option<u64>,
    tile_cols: u64,
    deepest: u64,
    rereads: bool,
    chunk_rows: u32,
) -> u64 {
    let Some(budget) = budget else {
        return u64::MAX;
    };
    let steps = tile_cols.div_ceil(PASS1_COLS_PER_STEP);
    let pass1 = (budget / (PASS1_WALKS * steps)).max(1);
    let mut cap = if deepest > pass1 { pass1 } else { u64::MAX };
    if rereads {
        let chunks = if chunk_rows >= MIN_CAPPED_CHUNK_ROWS {
            chunk_rows as u64
        } else {
            1
        };
        cap = cap.min(pass4_max_rows(budget) * chunks);
    }
    cap
}

/// Entries of one dispatch's tensor table (`TABLE_LEN` in tensor_table.wgsl).
pub(crate) const TABLE_LEN: usize = 32;

/// A tensor as the norm pass's dispatches see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass1Tensor<'a> {
    /// Equal for tensors in the same buffer.
    pub buffer: usize,
    /// Equal for tensors of the same element type (one pipeline per type).
    pub dtype: usize,
    /// Bytes per element.
    pub elem_bytes: u64,
    /// Its row windows.
    pub windows: &'a [Window],
}

/// One entry of a norm-pass dispatch's tensor table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass1Entry {
    /// The tensor.
    pub tensor: usize,
    /// Its window.
    pub window: usize,
    /// The binding slot its rows are read through.
    pub slot: usize,
    /// Element index within that binding of the window's first row.
    pub elem_offset: u32,
}

/// One buffer range a dispatch binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    /// A tensor whose rows lie in it (names the buffer).
    pub tensor: usize,
    /// Byte offset in the buffer (aligned).
    pub offset: u64,
    /// Byte size.
    pub size: u64,
}

/// One norm-pass (`mb_partials`) dispatch: the tensor windows it covers and the
/// buffer ranges (slots) they are read through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pass1Dispatch {
    /// At most [`TABLE_LEN`] entries.
    pub entries: Vec<Pass1Entry>,
    /// At most `slots` bindings (slot k is `bindings[k]`).
    pub bindings: Vec<Binding>,
}

/// Groups the norm pass's tensor windows into dispatches. Tensors held in one
/// window share a dispatch with others of the same element type while they
/// number at most [`TABLE_LEN`] and lie in at most `slots` bindings, each of at
/// most `max_binding` bytes (element indices below 2^32): tensors of one buffer
/// share a binding where their rows fit one, tensors in other buffers take
/// further slots (with `slots` = 1, only tensors of one buffer share). Every
/// window of a tensor cut into several is a dispatch of its own, in order
/// (window k hands its carried sums to window k + 1), first; the shared
/// dispatches come after them: their order does not matter.
pub(crate) fn pass1_dispatches(
    tensors: &[Pass1Tensor<'_>],
    max_binding: u64,
    slots: usize,
) -> Vec<Pass1Dispatch> {
    /// A shared dispatch being filled: its element type and size, its members
    /// (tensor, slot, first byte) and its bindings (buffer, tensor, start, end).
    struct Open {
        dtype: usize,
        elem_bytes: u64,
        members: Vec<(usize, usize, u64)>,
        bindings: Vec<(usize, usize, u64, u64)>,
    }
    let close = |o: Open| Pass1Dispatch {
        entries: o
            .members
            .iter()
            .map(|&(tensor, slot, first_byte)| Pass1Entry {
                tensor,
                window: 0,
                slot,
                elem_offset: ((first_byte - o.bindings[slot].2) / o.elem_bytes) as u32,
            })
            .collect(),
        bindings: o
            .bindings
            .iter()
            .map(|&(_, tensor, start, end)| Binding {
                tensor,
                offset: start,
                size: end - start,
            })
            .collect(),
    };
    let fits = |start: u64, end: u64, elem_bytes: u64| {
        end - start <= max_binding && (end - start) / elem_bytes <= u32::MAX as u64
    };
    let mut out = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    let mut full = Vec::new();
    for (p, t) in tensors.iter().enumerate() {
        let [w] = t.windows else {
            for (k, w) in t.windows.iter().enumerate() {
                out.push(Pass1Dispatch {
                    entries: vec![Pass1Entry {
                        tensor: p,
                        window: k,
                        slot: 0,
                        elem_offset: w.elem_offset,
                    }],
                    bindings: vec![Binding {
                        tensor: p,
                        offset: w.bind_offset,
                        size: w.bind_size,
                    }],
                });
            }
            continue;
        };
        let first_byte = w.bind_offset + w.elem_offset as u64 * t.elem_bytes;
        let (start, end) = (w.bind_offset, w.bind_offset + w.bind_size);
        let same_type = |o: &&mut Open| o.dtype == t.dtype;
        // A binding of the same buffer that can take the rows, else a free slot.
        let into_binding = open.iter_mut().filter(same_type).find_map(|o| {
            let slot = o.bindings.iter().position(|&(b, _, s, e)| {
                b == t.buffer && fits(s.min(start), e.max(end), t.elem_bytes)
            })?;
            Some((o, slot))
        });
        let placed = match into_binding {
            Some((o, slot)) => {
                let (_, _, s, e) = &mut o.bindings[slot];
                (*s, *e) = ((*s).min(start), (*e).max(end));
                Some((o, slot))
            }
            None => open
                .iter_mut()
                .filter(same_type)
                .find(|o| o.bindings.len() < slots)
                .map(|o| {
                    o.bindings.push((t.buffer, p, start, end));
                    let slot = o.bindings.len() - 1;
                    (o, slot)
                }),
        };
        match placed {
            Some((o, slot)) => o.members.push((p, slot, first_byte)),
            None => open.push(Open {
                dtype: t.dtype,
                elem_bytes: t.elem_bytes,
                members: vec![(p, 0, first_byte)],
                bindings: vec![(t.buffer, p, start, end)],
            }),
        }
        // A full table takes no more tensors.
        if let Some(i) = open.iter().position(|o| o.members.len() == TABLE_LEN) {
            full.push(close(open.swap_remove(i)));
        }
    }
    out.extend(full);
    out.extend(open.into_iter().map(close));
    out
}

/// Places blocks of `sizes` bytes one after the other at multiples of `align`,
/// in order, starting a new buffer when the next block would take the current
/// one past `limit` bytes (a block larger than `limit` gets a buffer of its own):
/// (buffer, byte offset) per block, and each buffer's used bytes.
pub(crate) fn pack(sizes: &[u64], align: u64, limit: u64) -> (Vec<(usize, u64)>, Vec<u64>) {
    let mut placed = Vec::with_capacity(sizes.len());
    let mut used = vec![0u64];
    for &bytes in sizes {
        let last = used.last_mut().expect("one buffer at least");
        let at = last.next_multiple_of(align);
        if *last == 0 || at + bytes <= limit {
            *last = at + bytes;
            placed.push((used.len() - 1, at));
        } else {
            used.push(bytes);
            placed.push((used.len() - 1, 0));
        }
    }
    (placed, used)
}

/// Splits `groups` workgroups into a 2-D dispatch `(x, y)` with `x * y >= groups`;
/// kernels recover the linear index as `wg.x + wg.y * x`.
pub(crate) fn dispatch_2d(groups: u64) -> Result<(u32, u32)> {
    let x = groups.clamp(1, MAX_GROUPS_PER_DIM as u64);
    let y = groups.div_ceil(x);
    if y > MAX_GROUPS_PER_DIM as u64 {
        return Err(ClipError::TooLarge(format!(
            "{groups} workgroups exceed one dispatch"
        )));
    }
    Ok((x as u32, y.max(1) as u32))
}

/// Columns a tensor of `cols` columns takes in the stored means matrix: whole
/// quads, so that pass 4 reads them four at a time whatever the widths.
pub(crate) fn means_cols(cols: u64) -> u64 {
    cols.next_multiple_of(4)
}

/// Column tiles of a tensor of `cols` columns in the norm pass.
pub(crate) fn tiles(cols: u64, tile_cols: u64) -> u64 {
    cols.div_ceil(tile_cols)
}

/// The norm pass's tile width for one call: the widest power-of-two multiple of
/// [`MIN_TILE_COLS`], up to [`MAX_TILE_COLS`], that still gives at least
/// `min_workgroups` workgroups over all tensors and `micro_batches`. Wider tiles
/// mean fewer workgroups (each with its start-up and 7 barriers) and fewer norm
/// partials; narrower ones more parallelism.
pub(crate) fn tile_cols(
    widths: impl Iterator<Item = u64> + Clone,
    micro_batches: u64,
    min_workgroups: u64,
    max_tile: u64,
) -> u64 {
    let workgroups =
        |tile: u64| widths.clone().map(|d| tiles(d, tile)).sum::<u64>() * micro_batches;
    let mut tile = MIN_TILE_COLS;
    while tile * 2 <= MAX_TILE_COLS.min(max_tile) && workgroups(tile * 2) >= min_workgroups {
        tile *= 2;
    }
    tile
}

/// Whether the kernels may read rows of `cols` elements, the first at element
/// `elem_offset` of an (aligned) binding, as vec4: every row starts at a multiple
/// of 4 elements from the binding's start. The binding's size need not be a whole
/// number of vec4: every vec4 such rows cover lies inside it.
pub(crate) fn vec4_aligned(cols: u64, elem_offset: u32) -> bool {
    cols.is_multiple_of(4) && elem_offset.is_multiple_of(4)
}

/// Whether an input-reading dispatch over one binding of `bind_size` bytes
/// may read its 16-bit rows as octs (grads_octs.wgsl): every entry's rows
/// (`rows`: columns, element index of the first row in the binding) start at
/// multiples of 8 elements, so each lane's adjacent quads pair up as whole
/// 16-byte words, and the binding holds whole octs.
pub(crate) fn oct_rows(
    elem_bytes: u64,
    bind_size: u64,
    mut rows: impl Iterator<Item = (u64, u64)>,
) -> bool {
    elem_bytes == 2
        && bind_size.is_multiple_of(16)
        && rows.all(|(cols, first)| cols.is_multiple_of(8) && first.is_multiple_of(8))
}

/// Where the norm pass stores a call's micro-batch means, if it keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MeansLayout {
    /// Not kept: pass 4 re-reads the input rows.
    None,
    /// One `[M, sum ceil4(D_p)]` matrix, tensor p's columns from
    /// `sum_{q < p} ceil4(D_q)`: it fits one storage binding, bound whole.
    Rows,
    /// Tensor after tensor, an `[M, ceil4(D_p)]` block each (tensor p's from
    /// element `M x sum_{q < p} ceil4(D_q)`), for means larger than one binding:
    /// each norm-pass dispatch binds the rows its micro-batches write
    /// ([`blocks_binding`]), pass 4 sums a block in windows of rows
    /// ([`block_window_rows`]).
    Blocks,
}

/// Whether and how a call materialises the micro-batch means: pass 1 also writes
/// the `[M, D_p]` means of every tensor, each row padded to a multiple of 4
/// elements (`M x sum ceil4(D_p) x 4` bytes of extra device memory; `padded` are
/// the `ceil4(D_p)`) and pass 4 reads them instead of re-reading the `N` input
/// rows (each weighted by its micro-batch's weight over its size). Input bytes
/// read: `N x D x 4 x (1 + 2 / b)` (means written once, read once) instead of
/// `2 x N x D x 4`, so it pays in bytes when the average micro-batch holds
/// `b = N / M >= 3` rows (`min_rows`, 3 by default: `DEFAULT_MEANS_MIN_ROWS`) and
/// breaks even at `b = 2`.
/// [`MeansLayout::Rows`] when the means fit one storage binding; else
/// [`MeansLayout::Blocks`] when they take at most `max_blocks_bytes` (and element
/// indices below 2^32) and one padded row of every tensor fits a binding from an
/// `align`ed start; otherwise the rows are re-read (no extra memory but the
/// `N x G` row weights). The caller also fits each norm-pass dispatch's rows of
/// blocks in a binding ([`split_for_blocks`]).
pub(crate) fn materialize_means(
    n: u64,
    micro_batches: u64,
    min_rows: u64,
    padded: &[u64],
    max_binding: u64,
    align: u64,
    max_blocks_bytes: u64,
) -> MeansLayout {
    if n < min_rows.saturating_mul(micro_batches) {
        return MeansLayout::None;
    }
    let total: u64 = padded.iter().sum();
    let elements = micro_batches.saturating_mul(total);
    let bytes = elements.saturating_mul(4);
    let widest = padded.iter().copied().max().unwrap_or(0);
    if bytes <= max_binding.min(u32::MAX as u64) {
        MeansLayout::Rows
    } else if bytes <= max_blocks_bytes
        && elements <= u32::MAX as u64
        && widest * 4 + align <= max_binding
    {
        MeansLayout::Blocks
    } else {
        MeansLayout::None
    }
}

/// Tensor p's stored means under `layout` (not [`MeansLayout::None`]): (element
/// of its first micro-batch's mean in the means buffer, elements from one
/// micro-batch's mean to the next), for `micro_batches`, its padded width
/// `padded` and its first column `start` in a row of all tensors' `total`.
pub(crate) fn means_block(
    layout: MeansLayout,
    micro_batches: u64,
    start: u64,
    padded: u64,
    total: u64,
) -> (u64, u64) {
    match layout {
        MeansLayout::Blocks => (micro_batches * start, padded),
        _ => (start, total),
    }
}

/// The binding (byte offset, byte size) of [`MeansLayout::Blocks`] means that
/// one norm-pass dispatch writes, from an `align`ed start: for each of its
/// entries `(block start, stride, first micro-batch, micro-batches)` (elements,
/// see [`means_block`]), the rows `first .. first + count` of the block.
pub(crate) fn blocks_binding(
    entries: impl Iterator<Item = (u64, u64, u64, u64)>,
    align: u64,
) -> (u64, u64) {
    let (lo, hi) = entries.fold((u64::MAX, 0), |(lo, hi), (base, stride, first, count)| {
        (
            lo.min(base + first * stride),
            hi.max(base + (first + count) * stride),
        )
    });
    let (offset, size, _) = aligned_binding(lo * 4, (hi - lo) * 4, align, 4);
    (offset, size)
}

/// [`blocks_binding`] of norm-pass `entries`: each entry's window (in `tensors`,
/// as `CallLayout::tensors` holds them: tile base, windows, group) writes the
/// rows of its micro-batches in its tensor's block, `block(p)` = (start, stride)
/// of tensor p's ([`means_block`]).
pub(crate) fn entries_blocks_binding(
    entries: &[Pass1Entry],
    tensors: &[(u64, Vec<Window>, u32)],
    block: impl Fn(usize) -> (u64, u64),
    align: u64,
) -> (u64, u64) {
    let rows = entries.iter().map(|e| {
        let w = &tensors[e.tensor].1[e.window];
        let (start, stride) = block(e.tensor);
        (start, stride, w.mb_first as u64, w.mb_count as u64)
    });
    blocks_binding(rows, align)
}

/// The norm-pass dispatches cut so that each one's [`MeansLayout::Blocks`] means
/// fit one binding (`fits`, over a dispatch's entries): a dispatch shared by
/// several tensors is split into runs of its entries, in order, each keeping the
/// dispatch's bindings; `None` where one entry alone does not fit (the call then
/// re-reads the rows). Whether it does depends on the tensor's windows, not on
/// how dispatches are shared, so buffer slots never change the choice (nor the
/// bits: pass 1's results do not depend on which dispatch computes them).
pub(crate) fn split_for_blocks(
    dispatches: Vec<Pass1Dispatch>,
    fits: impl Fn(&[Pass1Entry]) -> bool,
) -> Option<Vec<Pass1Dispatch>> {
    let mut out = Vec::with_capacity(dispatches.len());
    for d in dispatches {
        let mut run: Vec<Pass1Entry> = Vec::new();
        for &e in &d.entries {
            if !fits(&[e]) {
                return None;
            }
            run.push(e);
            if !fits(&run) {
                run.pop();
                out.push(Pass1Dispatch {
                    entries: std::mem::replace(&mut run, vec![e]),
                    bindings: d.bindings.clone(),
                });
            }
        }
        out.push(Pass1Dispatch {
            entries: run,
            bindings: d.bindings,
        });
    }
    Some(out)
}

/// Rows of an [`MeansLayout::Blocks`] block of `stride` floats per row that one
/// pass-4 dispatch sums: as many as one binding from an `align`ed start holds
/// (`materialize_means` checked that one row fits).
pub(crate) fn block_window_rows(stride: u64, max_binding: u64, align: u64) -> u64 {
    (max_binding.saturating_sub(align) / (stride * 4)).max(1)
}

/// Pass 4 over input rows cut into row chunks: the chunk dispatches' tables
/// (entry `(e, c)` sums rows `c R ..` of entry `e` into partial row `c` of `e`'s
/// block of the scratch matrix, never adding to it) and the reduction dispatch's
/// table (entry `e` sums its partial rows, weight 1 each, into `e`'s output,
/// adding to it where `e` did).
#[derive(Debug)]
pub(crate) struct RowChunks {
    /// The chunk dispatches' tables, at most [`TABLE_LEN`] entries each, with
    /// the index of the table (a window, for `chunk_windows_table`) whose rows
    /// and binding they read; every entry's `out_offset` is its partial row's
    /// first element in the scratch.
    pub chunks: Vec<(usize, Vec<MeansSumParams>)>,
    /// The reduction's table (one entry per entry of the original table): rows
    /// are the partial rows (`stride` whole quads apart, `vec4_path` 1), weights
    /// from a buffer of ones (`weights_base` 0, one group).
    pub reduce: Vec<MeansSumParams>,
    /// Floats of the scratch matrix: `sum_e chunks_e x ceil4(cols_e)`.
    pub scratch_floats: u64,
}

impl RowChunks {
    /// The most chunks of one entry: the ones the reduction reads.
    pub fn max_chunks(&self) -> u32 {
        self.reduce.iter().map(|e| e.rows).max().unwrap_or(0)
    }
}

/// The reduction's entry for `e`'s `rows` partial rows from element `base` of
/// the scratch, `stride` apart: weights of one (`weights_base` 0, one group),
/// into `e`'s output, adding to it where `e` did.
fn partial_rows_sum(e: &MeansSumParams, base: u64, rows: u32, stride: u64) -> MeansSumParams {
    MeansSumParams {
        cols: e.cols,
        means_base: base as u32,
        rows,
        out_offset: e.out_offset,
        skip_zero: 0,
        vec4_path: 1,
        groups: 1,
        group: 0,
        stride: stride as u32,
        weights_base: 0,
        accumulate: e.accumulate,
        ..Default::default()
    }
}

/// Whether `rows` rows make at least two chunks of `chunk_rows` (> 0): only
/// tables with such an entry are cut.
pub(crate) fn cuts(rows: u32, chunk_rows: u32) -> bool {
    chunk_rows > 0 && rows / 2 >= chunk_rows
}

/// Cuts the rows of a pass-4 table over input rows (`table`: entries reading
/// rows of the input, `stride` elements apart, weights `weights_base + j`) into
/// row chunks (`cut_entry`, at micro-batch boundaries of `offsets` where it
/// can), or `None` when no entry has two chunks or the scratch matrix would not
/// fit `max_binding` bytes. Walking a few rows at a
/// time across all columns, instead of every row down one column tile, is what
/// lavapipe reads at about the speed of a linear read (see
/// `default_pass4_chunk_rows`). Every entry of a cut table is cut (a short one
/// into one chunk), so no chunk holds more than `MAX_PASS4_CHUNK_ROWS` rows
/// and an entry's sum never depends on the other entries of its dispatch.
pub(crate) fn chunk_rows_table(
    table: &[MeansSumParams],
    chunk_rows: u32,
    max_binding: u64,
    offsets: &[u32],
) -> Option<RowChunks> {
    if !table.iter().any(|e| cuts(e.rows, chunk_rows)) {
        return None;
    }
    let mut entries = Vec::new();
    let mut reduce = Vec::with_capacity(table.len());
    let mut base = 0u64;
    for e in table {
        let stride = means_cols(e.cols as u64);
        let chunks = cut_entry(e, chunk_rows, base, stride, offsets);
        reduce.push(partial_rows_sum(e, base, chunks.len() as u32, stride));
        base += chunks.len() as u64 * stride;
        entries.extend(chunks);
    }
    if base * 4 > max_binding.min(u32::MAX as u64) {
        return None;
    }
    Some(RowChunks {
        chunks: entries.chunks(TABLE_LEN).map(|t| (0, t.to_vec())).collect(),
        reduce,
        scratch_floats: base,
    })
}

/// The row chunks of one pass-4 entry over input rows (`chunk_rows` > 0): its
/// `r` rows become `round(r / chunk_rows)` chunks (at least one, and at least
/// `ceil(r / MAX_PASS4_CHUNK_ROWS)`) of nearly equal rows, so under 1.5 x
/// `chunk_rows` rows each (before the cuts move, below) and never more than
/// `MAX_PASS4_CHUNK_ROWS`. Every
/// chunk sweeps all the entry's columns and stores a partial row, so a short
/// last chunk would cost nearly what a full one does: 70 rows are two chunks
/// of 35, not 32 + 32 + 6, and the 33-row windows of a 1,000,000-column f32
/// tensor in a 128 MiB binding one chunk each, not 32 + 1. Chunk `c`'s partial
/// row starts at element `out0 + c * stride` of the scratch matrix.
///
/// Each cut moves to the nearest micro-batch start (`offsets`, rows of the
/// whole call; the entry's first row is its `weights_base`) within half a
/// chunk of the even cut, as long as every chunk keeps 1 to
/// `MAX_PASS4_CHUNK_ROWS` rows: pass 4 sums a micro-batch's rows before its
/// weight scales them only within a chunk, so a cut micro-batch whose rows
/// cancel would add its large halves to the other micro-batches' terms in
/// f32 (see `run_continues` in weighted_means.wgsl). Same chunk count, so the
/// same scratch.
fn cut_entry(
    e: &MeansSumParams,
    chunk_rows: u32,
    out0: u64,
    stride: u64,
    offsets: &[u32],
) -> Vec<MeansSumParams> {
    let count = (e.rows.saturating_add(chunk_rows / 2) / chunk_rows)
        .max(e.rows.div_ceil(MAX_PASS4_CHUNK_ROWS))
        .max(1);
    let (short, long) = (e.rows / count, e.rows % count);
    // How far a cut may move: half a chunk.
    let reach = short / 2;
    // Chunk c's first row (relative to the entry's), c = 0..=count.
    let mut bounds = vec![0u32; count as usize + 1];
    bounds[count as usize] = e.rows;
    for c in 1..count {
        let even = c * short + c.min(long);
        let later = count - c;
        let prev = bounds[c as usize - 1];
        let lo = (prev + 1).max(
            e.rows
                .saturating_sub(MAX_PASS4_CHUNK_ROWS.saturating_mul(later)),
        );
        let hi = prev
            .saturating_add(MAX_PASS4_CHUNK_ROWS)
            .min(e.rows - later);
        let window = (
            even.saturating_sub(reach).max(lo),
            even.saturating_add(reach).min(hi),
        );
        bounds[c as usize] =
            nearest_start(offsets, e.weights_base, even, window).unwrap_or(even.max(lo).min(hi));
    }
    bounds
        .windows(2)
        .enumerate()
        .map(|(c, b)| MeansSumParams {
            means_base: e.means_base + b[0] * e.stride,
            rows: b[1] - b[0],
            weights_base: e.weights_base + b[0],
            out_offset: (out0 + c as u64 * stride) as u32,
            accumulate: 0,
            ..*e
        })
        .collect()
}

/// The micro-batch start (an element of the sorted `offsets`, less `first`)
/// nearest to `row` within `window` (inclusive), the earlier one of a tie.
fn nearest_start(offsets: &[u32], first: u32, row: u32, window: (u32, u32)) -> Option<u32> {
    let (lo, hi) = window;
    if lo > hi {
        return None;
    }
    let at = offsets.partition_point(|&o| o < first + row);
    let inside = |o: u32| o.checked_sub(first).filter(|s| (lo..=hi).contains(s));
    let after = offsets.get(at).and_then(|&o| inside(o));
    let before = at.checked_sub(1).and_then(|k| inside(offsets[k]));
    match (before, after) {
        (Some(b), Some(a)) if row - b <= a - row => Some(b),
        (_, Some(a)) => Some(a),
        (b, None) => b,
    }
}

/// Cuts the row windows of one tensor (`windows`: one entry per window, each
/// over its own binding, the later ones adding to the output) into row chunks
/// (`cut_entry`) whose partial rows one reduction sums into the output: the
/// output is then written once, not read and written again per window (a
/// window of about `chunk_rows` rows is otherwise walked whole, with block sums
/// and scalar stores into the output). `None` with fewer than two windows,
/// without chunks (`chunk_rows` 0), or when the partial rows would not fit
/// `max_binding` bytes or be more than `max_reduce_rows` (the reduction walks
/// them in one invocation; see `pass4_max_rows`): each window is then cut on
/// its own (`chunk_rows_table`).
pub(crate) fn chunk_windows_table(
    windows: &[MeansSumParams],
    chunk_rows: u32,
    max_binding: u64,
    max_reduce_rows: u64,
    offsets: &[u32],
) -> Option<RowChunks> {
    let first = windows.first()?;
    if windows.len() < 2 || chunk_rows == 0 {
        return None;
    }
    debug_assert!(windows.iter().all(|w| w.cols == first.cols
        && w.out_offset == first.out_offset
        && w.groups == first.groups
        && w.group == first.group));
    debug_assert!(windows[1..].iter().all(|w| w.accumulate == 1));
    let stride = means_cols(first.cols as u64);
    let mut chunks = Vec::new();
    let mut partial = 0u64;
    for (k, w) in windows.iter().enumerate() {
        let entries = cut_entry(w, chunk_rows, partial * stride, stride, offsets);
        partial += entries.len() as u64;
        chunks.extend(entries.chunks(TABLE_LEN).map(|t| (k, t.to_vec())));
    }
    if partial > max_reduce_rows || partial * stride * 4 > max_binding.min(u32::MAX as u64) {
        return None;
    }
    Some(RowChunks {
        chunks,
        reduce: vec![partial_rows_sum(first, 0, partial as u32, stride)],
        scratch_floats: partial * stride,
    })
}

#[cfg(test)]
mod tests;
