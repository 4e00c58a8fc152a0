//! One call's layout: its column tiles, row windows, norm-pass dispatches and
//! scratch (`CallLayout`), planned from the caller's tensors and the device's
//! limits (`GpuClipper::plan`); every buffer bound whole is checked against one
//! storage binding here.

use super::defaults::MEANS_BLOCKS_MAX_BYTES;
use super::kernels::{self, PartialsVariant, PARTIAL_BYTES};
use super::plan::{
    self, aligned_binding, cuts, entries_blocks_binding, materialize_means, means_block,
    means_cols, pass1_dispatches, pass4_max_rows, plan_windows, split_for_blocks, tile_cap,
    tile_cols, tiles, vec4_aligned, window_rows_cap, MeansLayout, Pass1Dispatch, Pass1Entry,
    Pass1Tensor, Window,
};
use super::{group_count, GpuClipper, GpuTensor, GpuTensorMut};
use crate::config::starts;
use crate::error::{ClipError, Result};

/// Byte layout of one call's scratch data, shared by encoding and read-back.
pub(super) struct CallLayout {
    pub(super) micro_batches: u64,
    pub(super) groups: u64,
    pub(super) tiles_total: u64,
    /// Columns per norm-pass workgroup.
    pub(super) tile_cols: u64,
    /// First tile of each group, then `tiles_total`.
    pub(super) group_tiles: Vec<u32>,
    /// (tile base, windows, group) per tensor.
    pub(super) tensors: Vec<(u64, Vec<Window>, u32)>,
    pub(super) carry_cols: u64,
    /// Columns of the stored means matrix, `sum ceil4(D_p)`.
    pub(super) total_means_cols: u64,
    /// How the means are laid out (`plan::materialize_means`).
    pub(super) means: MeansLayout,
    /// Each tensor's first column in a row of all tensors' padded columns
    /// (`sum_{q < p} ceil4(D_q)`): of its means in a `MeansLayout::Rows` row,
    /// of its output in the merged row.
    pub(super) means_starts: Vec<u64>,
    /// Pass 4 re-reads the input rows and may cut them into row chunks (at least
    /// two chunks of `pass4_chunk_rows` rows): its variant for them is built.
    pub(super) row_chunks: bool,
    /// Pass 4 re-reads rows of micro-batches of several rows, with `[N, G]` per-row
    /// weights.
    pub(super) per_row_weights: bool,
    /// The norm pass's dispatches (tensors of one buffer share them, and with
    /// buffer slots tensors of up to 8 buffers).
    pub(super) pass1: Vec<Pass1Dispatch>,
    /// Per dispatch of `pass1`: the norm pass's build it runs (whether all its
    /// entries' rows are read as whole quads, whether none carries sums between
    /// windows, whether the call stores the means, whether some micro-batch of
    /// more than `kernels::CHUNK_ROWS` rows does).
    pub(super) pass1_variants: Vec<PartialsVariant>,
    /// Per dispatch of `pass1`: its 16-bit rows are read as octs
    /// (`GpuClipper::oct_loads`, `plan::oct_rows`).
    pub(super) pass1_octs: Vec<bool>,
}

impl CallLayout {
    /// Pass 1 stores the micro-batch means (else pass 4 re-reads the input rows).
    pub(super) fn with_means(&self) -> bool {
        self.means != MeansLayout::None
    }

    /// Bytes of the stored means (0 without).
    pub(super) fn means_bytes(&self) -> u64 {
        if self.with_means() {
            self.micro_batches * self.total_means_cols * 4
        } else {
            0
        }
    }

    /// Tensor p's stored means (`plan::means_block`): element of its first
    /// micro-batch's mean in the means buffer, elements from one mean to the next.
    pub(super) fn means_block(&self, p: usize, cols: usize) -> (u64, u64) {
        means_block(
            self.means,
            self.micro_batches,
            self.means_starts[p],
            means_cols(cols as u64),
            self.total_means_cols,
        )
    }
}

impl GpuClipper {
    /// Tiles, row windows and scratch of one call; every buffer bound whole (not
    /// per window) is checked against one storage binding here, so a shape too
    /// large is a [`ClipError::TooLarge`], not a validation error at dispatch.
    pub(super) fn plan(
        &self,
        offsets: &[u32],
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
        group_of: &[usize],
    ) -> Result<CallLayout> {
        let groups = group_count(group_of);
        // Tiles are numbered group by group, so each group's tiles are contiguous.
        let mut tile_bases = vec![0u64; inputs.len()];
        let mut group_tiles = Vec::with_capacity(groups + 1);
        let micro_batches = offsets.len() as u64 - 1;
        let deepest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as u64;
        let tile_cols = tile_cols(
            inputs.iter().map(|t| t.cols as u64),
            micro_batches,
            self.min_tile_workgroups,
            tile_cap(self.loop_budget, deepest),
        );
        let mut tiles_total = 0u64;
        for g in 0..groups {
            group_tiles.push(tiles_total as u32);
            for (p, t) in inputs.iter().enumerate() {
                if group_of[p] == g {
                    tile_bases[p] = tiles_total;
                    tiles_total += tiles(t.cols as u64, tile_cols);
                }
            }
        }
        group_tiles.push(tiles_total as u32);
        // The stored means only when they fit one binding, or as blocks of at
        // most MEANS_BLOCKS_MAX_BYTES (else rows are re-read), and, under a loop
        // budget, pass 4 can sum them in one walk.
        let padded_cols: Vec<u64> = inputs.iter().map(|t| means_cols(t.cols as u64)).collect();
        let total_means_cols: u64 = padded_cols.iter().sum();
        let n = *offsets.last().expect("offsets hold [0, N]") as u64;
        let mut means = if self
            .loop_budget
            .is_none_or(|budget| micro_batches <= pass4_max_rows(budget))
        {
            materialize_means(
                n,
                micro_batches,
                self.means_min_rows,
                &padded_cols,
                self.max_binding,
                self.storage_align,
                MEANS_BLOCKS_MAX_BYTES.min(self.device.limits().max_buffer_size),
            )
        } else {
            MeansLayout::None
        };
        if let Some(budget) = self.loop_budget {
            // clip_factors walks the micro-batches, 256 per step, 3 G + 1
            // times (and a tree of 8 steps per group): up to 3/2 of the budget,
            // since this one cannot be cut into windows.
            let steps = (3 * groups as u64 + 1) * micro_batches.div_ceil(256) + 16 * groups as u64;
            if steps > budget + budget / 2 {
                return Err(ClipError::TooLarge(format!(
                    "{micro_batches} micro-batches x {groups} groups on a software adapter, \
                     whose shaders stop their loops after 65,535 iterations"
                )));
            }
            // mb_norms walks a group's tiles, 8 per step on a software adapter
            // (at least one tile per tensor).
            if tiles_total.div_ceil(8) + 16 > budget + budget / 2 {
                return Err(ClipError::TooLarge(format!(
                    "{tiles_total} column tiles on a software adapter, whose shaders stop \
                     their loops after 65,535 iterations"
                )));
            }
        }
        // Blocks of means that some tensor window cannot bind whole (its
        // micro-batches' rows over one binding) are not stored: plan again.
        let means_starts = starts(padded_cols.iter().copied());
        let (tensors, carry_cols, pass1) = loop {
            let max_rows = window_rows_cap(
                self.loop_budget,
                tile_cols,
                deepest,
                means == MeansLayout::None,
                self.pass4_chunk_rows,
            );
            let mut carry_cols = 0u64;
            let mut tensors = Vec::with_capacity(inputs.len());
            for (p, t) in inputs.iter().enumerate() {
                let cols = t.cols as u64;
                let windows = plan_windows(
                    offsets,
                    cols,
                    t.dtype.size_bytes(),
                    t.offset,
                    self.max_binding,
                    self.storage_align,
                    max_rows,
                )?;
                // Only a micro-batch that goes on in a later window is carried.
                if windows.iter().any(|w| w.carry_out) {
                    carry_cols = carry_cols.max(cols);
                }
                tensors.push((tile_bases[p], windows, group_of[p] as u32));
            }
            // Tensors in the same buffer (key: the first such tensor's index).
            // (wgpu::Buffer hashes and compares by its handle's address, which its
            // interior mutability never changes.)
            #[allow(clippy::mutable_key_type)]
            let mut first_of = std::collections::HashMap::new();
            let keyed: Vec<Pass1Tensor<'_>> = inputs
                .iter()
                .zip(&tensors)
                .enumerate()
                .map(|(p, (t, (_, windows, _)))| Pass1Tensor {
                    buffer: *first_of.entry(t.buffer).or_insert(p),
                    dtype: t.dtype.index(),
                    elem_bytes: t.dtype.size_bytes(),
                    windows,
                })
                .collect();
            let pass1 = pass1_dispatches(&keyed, self.max_binding, self.buffer_slots);
            if means != MeansLayout::Blocks {
                break (tensors, carry_cols, pass1);
            }
            // Dispatches whose rows of blocks exceed one binding are split; where
            // one tensor window's alone do, the rows are re-read instead.
            let block = |p: usize| {
                means_block(
                    means,
                    micro_batches,
                    means_starts[p],
                    padded_cols[p],
                    total_means_cols,
                )
            };
            let fits = |entries: &[Pass1Entry]| {
                entries_blocks_binding(entries, &tensors, block, self.storage_align).1
                    <= self.max_binding
            };
            match split_for_blocks(pass1, fits) {
                Some(pass1) => break (tensors, carry_cols, pass1),
                None => means = MeansLayout::None,
            }
        };
        let with_means = means != MeansLayout::None;
        let too_large = |what: String, bytes: u64| {
            if bytes > self.max_binding {
                Err(ClipError::TooLarge(format!(
                    "{what} need {bytes} bytes, over one storage binding ({} bytes)",
                    self.max_binding
                )))
            } else {
                Ok(())
            }
        };
        // The per-micro-batch norm records (M x G x 16 bytes) are never larger
        // than the partials (every group has a tile), so this bounds them too.
        too_large(
            format!("{micro_batches} micro-batches x {tiles_total} column tiles of norm partials"),
            micro_batches * tiles_total * PARTIAL_BYTES,
        )?;
        for (p, o) in outputs.iter().enumerate() {
            // One f32 row: larger than a 16-bit input row.
            let (_, bind_size, _) =
                aligned_binding(o.offset, o.cols as u64 * 4, self.storage_align, 4);
            too_large(format!("tensor {p}: the f32 output row"), bind_size)?;
        }
        // The two carry rows of a tensor split over row windows, whole quads.
        too_large("the carried sums".into(), means_cols(carry_cols) * 4)?;
        // Means are stored and some micro-batch has more than CHUNK_ROWS rows.
        let deep_means = with_means
            && offsets
                .windows(2)
                .any(|w| (w[1] - w[0]) as u64 > kernels::CHUNK_ROWS);
        // N is the last of the u32 row offsets; a tensor's row windows may be
        // cut together (`chunk_windows_table`).
        let row_chunks = !with_means
            && (cuts(n as u32, self.pass4_chunk_rows)
                || (self.pass4_chunk_rows > 0 && tensors.iter().any(|t| t.1.len() > 1)));
        let per_row_weights = !with_means && micro_batches != n;
        if per_row_weights {
            too_large(
                format!("{n} rows x {groups} groups of per-row weights"),
                n * groups as u64 * 8,
            )?;
        }
        let pass1_variants = pass1
            .iter()
            .map(|d| PartialsVariant {
                deep: deep_means,
                aligned: d
                    .entries
                    .iter()
                    .all(|e| vec4_aligned(inputs[e.tensor].cols as u64, e.elem_offset)),
                no_carry: d.entries.iter().all(|e| {
                    let w = &tensors[e.tensor].1[e.window];
                    !w.carry_in && !w.carry_out
                }),
                stores_means: Some(with_means),
            })
            .collect();
        let pass1_octs = pass1
            .iter()
            .map(|d| {
                let dtype = inputs[d.entries[0].tensor].dtype;
                self.oct_loads()
                    && d.bindings.len() == 1
                    && plan::oct_rows(
                        dtype.size_bytes(),
                        d.bindings[0].size,
                        d.entries
                            .iter()
                            .map(|e| (inputs[e.tensor].cols as u64, e.elem_offset as u64)),
                    )
            })
            .collect();
        Ok(CallLayout {
            micro_batches,
            groups: groups as u64,
            tiles_total,
            tile_cols,
            group_tiles,
            tensors,
            carry_cols,
            total_means_cols,
            means,
            means_starts,
            row_chunks,
            per_row_weights,
            pass1,
            pass1_variants,
            pass1_octs,
        })
    }
}
