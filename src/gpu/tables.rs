//! The parameter tables and buffer ranges of one call's dispatches, pass by
//! pass (`Call`), from the call's layout (`CallLayout`, see `layout.rs`); the
//! recording (`encode.rs`) binds and dispatches them.

use super::dispatch::{
    load_path, slot_sources, FixedPasses, Noise, ParamBlocks, Pass1, Pass4, Pass4Weights, Range,
    RowsJob, PARTIALS_TABLE_BYTES,
};
use super::kernels::{
    FactorsParams, MeansSumParams, NormsParams, PartialsParams, RowWeightsParams, NOISE_MODE_ADD,
};
use super::plan::{
    aligned_binding, block_window_rows, dispatch_2d, entries_blocks_binding, tiles, MeansLayout,
    Pass1Dispatch, RowChunks, WORKGROUP,
};
use super::{noise_params, CallLayout, GpuClipper, GpuTensor, GpuTensorMut};
use crate::config::{ClipBound, ClipConfig, ClipFunction, NonFinitePolicy};
use crate::dtype::Dtype;
use crate::error::Result;
use wgpu::BufferUsages as U;

/// What the encoding steps of one call share: its arguments, its layout and the
/// choices made once for all its dispatches.
pub(super) struct Call<'a> {
    config: &'a ClipConfig,
    pub(super) layout: &'a CallLayout,
    pub(super) inputs: &'a [GpuTensor<'a>],
    pub(super) outputs: &'a [GpuTensorMut<'a>],
    pub(super) read_outputs: bool,
    /// Each output's binding: (start, size, element index of `out_p[0]` in it).
    out_bindings: Vec<(u64, u64, u32)>,
    /// 1: a zero weight skips its row in pass 4 (so 0 * NaN never happens).
    skip_zero: u32,
    /// Pass 4 runs as ONE dispatch over the stored means of all tensors (with
    /// one parameter group: one weight per micro-batch), into the merged row.
    pub(super) merge_pass4: bool,
    /// Pass 4 re-reads the input rows in the norm pass's dispatches (same
    /// bindings, slots too), into the merged row.
    merge_rows: bool,
    /// The device's storage offset alignment.
    storage_align: u64,
    /// The binding limit in use.
    max_binding: u64,
    /// 16-bit rows that allow it are read as octs (`GpuClipper::oct_loads`).
    octs_allowed: bool,
}

impl<'a> Call<'a> {
    pub(super) fn new(
        clipper: &GpuClipper,
        config: &'a ClipConfig,
        layout: &'a CallLayout,
        inputs: &'a [GpuTensor<'a>],
        outputs: &'a [GpuTensorMut<'a>],
        read_outputs: bool,
    ) -> Self {
        let out_bindings = inputs
            .iter()
            .zip(outputs)
            .map(|(t, o)| aligned_binding(o.offset, t.cols as u64 * 4, clipper.storage_align, 4))
            .collect();
        // Pass 4 of several tensors into one scratch row (tensor p's columns from
        // means_starts[p]), then a copy per tensor into its output (or straight
        // into the read-back buffer on the host path): with several tensors, no
        // noise (added per tensor in the output), outputs that accept copies,
        // and tensors narrow enough on average that the dispatches saved
        // outweigh the bytes copied (`merge_max_avg_cols`), whose row fits one
        // binding. Extra memory: the row, sum ceil4(D_p) x 4 bytes.
        let copies_pay = inputs.len() > 1
            && config.noise.is_none()
            && layout.total_means_cols / inputs.len() as u64 <= clipper.merge_max_avg_cols
            && layout.total_means_cols * 4 <= clipper.max_binding
            && (read_outputs
                || outputs
                    .iter()
                    .all(|o| o.buffer.usage().contains(U::COPY_DST)));
        Self {
            config,
            layout,
            inputs,
            outputs,
            read_outputs,
            out_bindings,
            skip_zero: (config.non_finite != NonFinitePolicy::Propagate) as u32,
            merge_pass4: layout.means == MeansLayout::Rows && layout.groups == 1 && copies_pay,
            merge_rows: !layout.with_means() && copies_pay,
            storage_align: clipper.storage_align,
            max_binding: clipper.max_binding,
            octs_allowed: clipper.oct_loads(),
        }
    }

    /// Pass 4 writes the merged row, copied into the outputs after the pass.
    pub(super) fn merged(&self) -> bool {
        self.merge_pass4 || self.merge_rows
    }

    /// Pass 1: a table of up to `TABLE_LEN` tensor windows per dispatch, over
    /// `bindings` (`GpuClipper::pass1_bindings`).
    pub(super) fn pass1(
        &self,
        params: &mut ParamBlocks,
        bindings: &[(Vec<Range<'a>>, Vec<bool>)],
    ) -> Result<Vec<Pass1<'a>>> {
        let layout = self.layout;
        let mut dispatches = Vec::with_capacity(layout.pass1.len());
        for (((d, (bindings, whole_quads)), &variant), &octs) in layout
            .pass1
            .iter()
            .zip(bindings)
            .zip(&layout.pass1_variants)
            .zip(&layout.pass1_octs)
        {
            let mut table = Vec::with_capacity(d.entries.len());
            let mut dispatch_tiles = 0u64;
            let means = self.pass1_means(d);
            for e in &d.entries {
                let (p, k, elem_offset) = (e.tensor, e.window, e.elem_offset);
                let whole_quads = whole_quads[e.slot];
                let (tile_base, windows, _) = &layout.tensors[p];
                let w = &windows[k];
                let cols = self.inputs[p].cols as u64;
                let n_tiles = tiles(cols, layout.tile_cols);
                // The binding starts at byte means.0: tensor p's first mean lies
                // means.0 / 4 elements before its start (an index the shader
                // only uses plus the means of the dispatch's micro-batches, which
                // lie inside the binding: wrapping u32 arithmetic gets there).
                let (means_start, means_stride) = layout.means_block(p, cols as usize);
                table.push(PartialsParams {
                    cols: cols as u32,
                    elem_offset,
                    row_start: w.row_start,
                    row_end: w.row_end,
                    mb_first: w.mb_first,
                    tiles: n_tiles as u32,
                    tile_base: *tile_base as u32,
                    tiles_total: layout.tiles_total as u32,
                    carry_in: w.carry_in as u32,
                    carry_out: w.carry_out as u32,
                    last_local: w.mb_count - 1,
                    vec4_path: load_path(cols, elem_offset, whole_quads),
                    write_means: layout.with_means() as u32,
                    means_base: (means_start as u32).wrapping_sub((means.0 / 4) as u32),
                    tile_cols: layout.tile_cols as u32,
                    means_stride: means_stride as u32,
                    first_tile: dispatch_tiles as u32,
                    slot: e.slot as u32,
                    ..Default::default()
                });
                dispatch_tiles += n_tiles;
            }
            let (tiles_x, tiles_y) = dispatch_2d(dispatch_tiles)?;
            table[0].tiles_x = tiles_x;
            table[0].entries = table.len() as u32;
            table[0].dispatch_tiles = dispatch_tiles as u32;
            let (p, window) = (d.entries[0].tensor, d.entries[0].window);
            dispatches.push(Pass1 {
                params: params.push_table(&table, PARTIALS_TABLE_BYTES),
                variant,
                octs,
                sources: slot_sources(bindings, &table, |e| (e.slot as usize, e.vec4_path)),
                window,
                means,
                groups: (tiles_x, tiles_y, layout.tensors[p].1[window].mb_count),
                dtype: self.inputs[p].dtype,
            });
        }
        Ok(dispatches)
    }

    /// The means binding (byte offset, byte size) of norm-pass dispatch `d`: the
    /// rows of blocks its micro-batches write (`MeansLayout::Blocks`), the whole
    /// matrix (`Rows`), or 16 bytes the kernel never reads (`None`).
    fn pass1_means(&self, d: &Pass1Dispatch) -> (u64, u64) {
        let layout = self.layout;
        match layout.means {
            MeansLayout::None => (0, 16),
            MeansLayout::Rows => (0, layout.means_bytes()),
            MeansLayout::Blocks => entries_blocks_binding(
                &d.entries,
                &layout.tensors,
                |p| layout.means_block(p, self.inputs[p].cols),
                self.storage_align,
            ),
        }
    }

    /// Pass 4 over the input rows of tensor p's window k (first row at element
    /// elem_offset of its binding), each row weighted, into column out_offset.
    /// `whole_quads`: the binding holds whole quads (see `quads_binding`).
    fn rows_block(
        &self,
        p: usize,
        k: usize,
        elem_offset: u32,
        out_offset: u32,
        whole_quads: bool,
    ) -> MeansSumParams {
        let (_, windows, group) = &self.layout.tensors[p];
        let w = &windows[k];
        let cols = self.inputs[p].cols as u64;
        MeansSumParams {
            cols: cols as u32,
            means_base: elem_offset,
            rows: w.row_end - w.row_start,
            out_offset,
            skip_zero: self.skip_zero,
            vec4_path: load_path(cols, elem_offset, whole_quads),
            groups: self.layout.groups as u32,
            group: *group,
            stride: cols as u32,
            weights_base: w.row_start,
            accumulate: (k > 0) as u32,
            ..Default::default()
        }
    }

    /// The pass-4 dispatches over input rows (none when the call stores the
    /// means), before row chunks, in groups: per tensor its windows into its
    /// output (one group), or in the norm pass's dispatches and `bindings` into
    /// `merged_out` (a group each). `quads_binding` is
    /// `GpuClipper::quads_binding`.
    pub(super) fn rows_jobs(
        &self,
        bindings: &[(Vec<Range<'a>>, Vec<bool>)],
        merged_out: &'a wgpu::Buffer,
        quads_binding: impl Fn(&GpuTensor<'a>, u64, u64) -> Option<u64>,
    ) -> Vec<Vec<RowsJob<'a>>> {
        if self.layout.with_means() {
            return Vec::new();
        }
        if self.merge_rows {
            return self
                .layout
                .pass1
                .iter()
                .zip(bindings)
                .map(|(d, (bindings, whole_quads))| {
                    vec![RowsJob {
                        table: d
                            .entries
                            .iter()
                            .map(|e| MeansSumParams {
                                slot: e.slot as u32,
                                ..self.rows_block(
                                    e.tensor,
                                    e.window,
                                    e.elem_offset,
                                    self.layout.means_starts[e.tensor] as u32,
                                    whole_quads[e.slot],
                                )
                            })
                            .collect(),
                        bindings: bindings.clone(),
                        out: (merged_out, 0, merged_out.size()),
                        dtype: self.inputs[d.entries[0].tensor].dtype,
                    }]
                })
                .collect();
        }
        let mut groups = Vec::new();
        for (p, ((_, windows, _), (t, o))) in self
            .layout
            .tensors
            .iter()
            .zip(self.inputs.iter().zip(self.outputs))
            .enumerate()
        {
            let (out_bind, out_size, out_offset) = self.out_bindings[p];
            let mut jobs = Vec::with_capacity(windows.len());
            for (k, w) in windows.iter().enumerate() {
                let quads_size = quads_binding(t, w.bind_offset, w.bind_size);
                jobs.push(RowsJob {
                    table: vec![self.rows_block(
                        p,
                        k,
                        w.elem_offset,
                        out_offset,
                        quads_size.is_some(),
                    )],
                    bindings: vec![(t.buffer, w.bind_offset, quads_size.unwrap_or(w.bind_size))],
                    out: (o.buffer, out_bind, out_size),
                    dtype: t.dtype,
                });
            }
            groups.push(jobs);
        }
        groups
    }

    /// Pass 4 over the stored means, a dispatch per tensor into its output
    /// (none without stored means or when merged); under `MeansLayout::Blocks`
    /// a dispatch per window of a tensor's rows of means that one binding holds,
    /// the later ones adding to the output.
    pub(super) fn means_pass4(
        &self,
        params: &mut ParamBlocks,
        means: &'a wgpu::Buffer,
    ) -> Result<Vec<Pass4<'a>>> {
        if !self.layout.with_means() || self.merge_pass4 {
            return Ok(Vec::new());
        }
        let layout = self.layout;
        let m = layout.micro_batches;
        let mut dispatches = Vec::with_capacity(self.inputs.len());
        for (p, ((_, _, group), (t, o))) in layout
            .tensors
            .iter()
            .zip(self.inputs.iter().zip(self.outputs))
            .enumerate()
        {
            let (out_bind, out_size, out_offset) = self.out_bindings[p];
            let (start, stride) = layout.means_block(p, t.cols);
            let window_rows = match layout.means {
                MeansLayout::Blocks => {
                    block_window_rows(stride, self.max_binding, self.storage_align)
                }
                _ => m,
            };
            for first in (0..m).step_by(window_rows as usize) {
                let rows = window_rows.min(m - first);
                // The stored means: f32, rows padded to whole quads.
                let (bind, size, elem) = match layout.means {
                    MeansLayout::Blocks => aligned_binding(
                        (start + first * stride) * 4,
                        rows * stride * 4,
                        self.storage_align,
                        4,
                    ),
                    _ => (0, layout.means_bytes(), start as u32),
                };
                dispatches.push(Pass4::push(
                    params,
                    vec![MeansSumParams {
                        cols: t.cols as u32,
                        means_base: elem,
                        rows: rows as u32,
                        out_offset,
                        skip_zero: self.skip_zero,
                        vec4_path: 1,
                        groups: layout.groups as u32,
                        group: *group,
                        stride: stride as u32,
                        weights_base: first as u32,
                        accumulate: (first > 0) as u32,
                        ..Default::default()
                    }],
                    vec![(means, bind, size)],
                    Pass4Weights::MicroBatch,
                    (o.buffer, out_bind, out_size),
                    Dtype::F32,
                    self.octs_allowed,
                )?);
            }
        }
        Ok(dispatches)
    }

    /// The pass-4 dispatches of `units`, each a group of jobs cut as its
    /// `RowChunks` say (the chunks of job `k` read its rows and write
    /// `partial_rows`, then one dispatch sums them with weights of one into
    /// the first job's output) or, without, every job whole.
    pub(super) fn rows_pass4(
        &self,
        params: &mut ParamBlocks,
        units: Vec<(Vec<RowsJob<'a>>, Option<RowChunks>)>,
        partial_rows: Range<'a>,
    ) -> Result<Vec<Pass4<'a>>> {
        let weights = if self.layout.per_row_weights {
            Pass4Weights::Row
        } else {
            Pass4Weights::MicroBatch
        };
        let mut dispatches = Vec::new();
        for (jobs, chunks) in units {
            let Some(chunks) = chunks else {
                for job in jobs {
                    dispatches.push(Pass4::push(
                        params,
                        job.table,
                        job.bindings,
                        weights,
                        job.out,
                        job.dtype,
                        self.octs_allowed,
                    )?);
                }
                continue;
            };
            for (k, table) in chunks.chunks {
                let job = &jobs[k];
                let mut chunk = Pass4::push(
                    params,
                    table,
                    job.bindings.clone(),
                    weights,
                    job.out,
                    job.dtype,
                    self.octs_allowed,
                )?;
                chunk.partials = Some(partial_rows);
                dispatches.push(chunk);
            }
            dispatches.push(Pass4::push(
                params,
                chunks.reduce,
                vec![partial_rows],
                Pass4Weights::Ones,
                jobs[0].out,
                Dtype::F32,
                self.octs_allowed,
            )?);
        }
        Ok(dispatches)
    }

    /// Pass 4 as one dispatch over the means of all tensors into the merged row.
    pub(super) fn merged_means_pass4(
        &self,
        params: &mut ParamBlocks,
        means: &'a wgpu::Buffer,
        merged_out: &'a wgpu::Buffer,
    ) -> Result<Pass4<'a>> {
        let cols = self.layout.total_means_cols as u32;
        Pass4::push(
            params,
            vec![MeansSumParams {
                cols,
                rows: self.layout.micro_batches as u32,
                skip_zero: self.skip_zero,
                vec4_path: 1,
                groups: 1,
                stride: cols,
                ..Default::default()
            }],
            vec![(means, 0, self.layout.means_bytes())],
            Pass4Weights::MicroBatch,
            (merged_out, 0, merged_out.size()),
            Dtype::F32,
            self.octs_allowed,
        )
    }

    /// The noise pass, a dispatch per tensor (none without noise).
    pub(super) fn noise(&self, params: &mut ParamBlocks) -> Result<Vec<Noise<'a>>> {
        let Some(noise) = self.config.noise else {
            return Ok(Vec::new());
        };
        let mut dispatches = Vec::with_capacity(self.inputs.len());
        let mut first_element = 0u64;
        for (t, (o, &(out_bind, out_size, out_offset))) in self
            .inputs
            .iter()
            .zip(self.outputs.iter().zip(&self.out_bindings))
        {
            let cols = t.cols as u64;
            let groups = dispatch_2d(cols.div_ceil(WORKGROUP))?;
            dispatches.push(Noise {
                params: params.push(&noise_params(
                    &noise,
                    first_element,
                    cols as u32,
                    out_offset,
                    groups.0,
                    NOISE_MODE_ADD,
                )),
                out: (o.buffer, out_bind, out_size),
                groups,
            });
            first_element += cols;
        }
        Ok(dispatches)
    }

    /// The parameter blocks and workgroups of the norms, the row weights (when
    /// pass 4 reads rows of micro-batches of several rows; `n` rows) and the
    /// factors.
    pub(super) fn fixed_passes(&self, params: &mut ParamBlocks, n: u64) -> Result<FixedPasses> {
        let (m, g) = (self.layout.micro_batches, self.layout.groups);
        let norm_groups = dispatch_2d(m * g)?;
        let norms = params.push(&NormsParams {
            micro_batches: m as u32,
            tiles_total: self.layout.tiles_total as u32,
            groups_x: norm_groups.0,
            groups: g as u32,
        });
        let row_weights = if self.layout.per_row_weights {
            let groups = dispatch_2d(n.div_ceil(WORKGROUP))?;
            let at = params.push(&RowWeightsParams {
                rows: n as u32,
                micro_batches: m as u32,
                groups: g as u32,
                groups_x: groups.0,
            });
            Some((at, groups))
        } else {
            None
        };
        let config = self.config;
        let (adaptive, scale) = match config.bound {
            ClipBound::Adaptive { scale } => (1, scale),
            _ => (0, 1.0),
        };
        let (scale_fract, scale_exp) = libm::frexpf(scale);
        let factors = params.push(&FactorsParams {
            micro_batches: m as u32,
            adaptive,
            policy: (config.non_finite == NonFinitePolicy::Propagate) as u32,
            groups: g as u32,
            scale,
            function: match config.function {
                ClipFunction::Hard => 0,
                ClipFunction::Automatic { .. } => 1,
                ClipFunction::Normalize => 2,
            },
            gamma: match config.function {
                ClipFunction::Automatic { gamma } => gamma,
                _ => 0.0,
            },
            sigma: config.noise.map_or(0.0, |n| n.multiplier),
            scale_fract,
            scale_exp,
            ..Default::default()
        });
        Ok(FixedPasses {
            norms,
            norm_groups,
            row_weights,
            factors,
        })
    }
}
