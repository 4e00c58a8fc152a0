//! Recording one call (`GpuClipper::encode_and_submit`): its scratch buffers,
//! its dispatches (their tables from `tables.rs`), bound and recorded in one
//! compute pass (the passes are listed in the `gpu` module's docs), and the
//! copies into the read-back buffer.

use super::dispatch::{
    bind_group, range, slot_resources, whole, FixedPasses, Noise, ParamBlocks, Pass1, Pass4,
    Pass4Weights, Range, RowsJob, Source, MEANS_TABLE_BYTES, PARTIALS_TABLE_BYTES,
};
use super::kernels::{
    FactorsParams, NoiseParams, NormsParams, RowWeightsParams, MB_NORM_BYTES, PARTIAL_BYTES,
    STATS_BYTES,
};
use super::plan::{chunk_rows_table, chunk_windows_table, means_cols, pass4_max_rows, RowChunks};
use super::pool::{Pool, Slot, SCRATCH_USAGE};
use super::tables::Call;
use super::timer::{PassTimer, TIMER_BYTES};
use super::{CallLayout, GpuClipper, GpuTensor, GpuTensorMut};
use crate::config::{ClipBound, ClipConfig};
use crate::error::{ClipError, Result};
use wgpu::BufferUsages as U;

impl GpuClipper {
    /// Records the passes and the copies into the read-back buffer, submits,
    /// and returns the read-back buffer and its used length.
    pub(super) fn encode_and_submit(
        &mut self,
        config: &ClipConfig,
        offsets: &[u32],
        layout: &CallLayout,
        inputs: &[GpuTensor<'_>],
        outputs: &[GpuTensorMut<'_>],
        read_outputs: bool,
    ) -> Result<(wgpu::Buffer, u64)> {
        let n = *offsets.last().expect("offsets hold [0, N]") as u64;
        let call = Call::new(self, config, layout, inputs, outputs, read_outputs);
        let scratch = Scratch::new(
            &mut self.pool,
            &self.queue,
            config,
            offsets,
            layout,
            call.merged(),
        );
        // All uniform blocks of the call in one buffer, one block per aligned slot.
        let mut params = ParamBlocks::new(self.uniform_align);
        let pass1_bindings = self.pass1_bindings(layout, inputs);
        let pass1 = call.pass1(&mut params, &pass1_bindings)?;
        let rows_jobs = call.rows_jobs(&pass1_bindings, &scratch.merged_out, |t, at, size| {
            self.quads_binding(t, at, size)
        });
        // Pass 4 over input rows cut into row chunks where it walks enough rows:
        // a tensor's row windows together (`chunk_windows_table`), else each
        // dispatch on its own (`chunk_rows_table`). The chunks' sums go to
        // partial rows of a scratch matrix (shared by the units, one after the
        // other), which one more dispatch sums into the outputs with weight 1.
        // Extra memory: the largest unit's partial rows, about
        // `rows / pass4_chunk_rows x ceil4(D_p) x 4` bytes, and the ones.
        let units = self.chunk_units(rows_jobs, offsets);
        let chunks = ChunkScratch::new(&mut self.pool, &self.queue, &units);
        let mut pass4 = call.means_pass4(&mut params, &scratch.means)?;
        pass4.extend(call.rows_pass4(&mut params, units, chunks.rows())?);
        if call.merge_pass4 {
            pass4.push(call.merged_means_pass4(
                &mut params,
                &scratch.means,
                &scratch.merged_out,
            )?);
        }
        let noise = call.noise(&mut params)?;
        let fixed = call.fixed_passes(&mut params, n)?;
        // Every dispatch's uniform block in one buffer (a few KiB; WebGPU
        // guarantees buffers of 256 MiB, but wgpu lets a device ask for less).
        let params_bytes = params.bytes.len() as u64;
        let max_buffer = self.device.limits().max_buffer_size;
        if params_bytes > max_buffer {
            return Err(ClipError::TooLarge(format!(
                "the call's {params_bytes} bytes of dispatch parameters exceed the \
                 device's largest buffer ({max_buffer} bytes)"
            )));
        }
        let uniforms = self
            .pool
            .get(Slot::Params, params_bytes, U::UNIFORM | U::COPY_DST);
        self.queue.write_buffer(&uniforms, 0, &params.bytes);
        // The partial rows' binding of pass-4 dispatches without row chunks.
        let no_partials = self.pool.get(Slot::NoPartials, 16, SCRATCH_USAGE);

        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("microclip"),
            });
        let bound = Bound {
            scratch: &scratch,
            uniforms: &uniforms,
            ones: &chunks.ones,
            no_partials: &no_partials,
        };
        self.last_dispatches = self.record(&mut encoder, &bound, &pass1, &pass4, &noise, &fixed);
        self.last_oct_dispatches =
            pass1.iter().filter(|d| d.octs).count() + pass4.iter().filter(|d| d.octs).count();
        let readback = self.copy_results(&mut encoder, &call, &scratch);
        self.queue.submit([encoder.finish()]);
        Ok(readback)
    }

    /// Pass 4's groups of jobs over input rows with their row chunks: a
    /// tensor's windows as one unit where `chunk_windows_table` cuts them, else
    /// a unit per job, cut or not by `chunk_rows_table` (at the micro-batch
    /// starts `offsets` where they can).
    fn chunk_units<'a>(
        &self,
        groups: Vec<Vec<RowsJob<'a>>>,
        offsets: &[u32],
    ) -> Vec<(Vec<RowsJob<'a>>, Option<RowChunks>)> {
        let max_reduce_rows = self.loop_budget.map_or(u64::MAX, pass4_max_rows);
        let mut units = Vec::new();
        for jobs in groups {
            // A tensor's windows: one table entry per job.
            let cut = if jobs.iter().all(|j| j.table.len() == 1) {
                let windows: Vec<_> = jobs.iter().map(|j| j.table[0]).collect();
                chunk_windows_table(
                    &windows,
                    self.pass4_chunk_rows,
                    self.max_binding,
                    max_reduce_rows,
                    offsets,
                )
            } else {
                None
            };
            if cut.is_some() {
                units.push((jobs, cut));
                continue;
            }
            for job in jobs {
                let cut =
                    chunk_rows_table(&job.table, self.pass4_chunk_rows, self.max_binding, offsets);
                units.push((vec![job], cut));
            }
        }
        units
    }

    /// Each norm-pass dispatch's bindings (buffer, offset, size) by slot, each
    /// rounded up to whole quads if it can be, and whether it was (pass 4 over
    /// the rows reuses the dispatches and their bindings).
    fn pass1_bindings<'a>(
        &self,
        layout: &CallLayout,
        inputs: &[GpuTensor<'a>],
    ) -> Vec<(Vec<Range<'a>>, Vec<bool>)> {
        layout
            .pass1
            .iter()
            .map(|d| {
                d.bindings
                    .iter()
                    .map(|b| {
                        let t = &inputs[b.tensor];
                        let quads = self.quads_binding(t, b.offset, b.size);
                        (
                            (t.buffer, b.offset, quads.unwrap_or(b.size)),
                            quads.is_some(),
                        )
                    })
                    .unzip()
            })
            .collect()
    }

    /// Binds and records every dispatch in one compute pass; returns how many.
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bound: &Bound<'_>,
        pass1: &[Pass1<'_>],
        pass4: &[Pass4<'_>],
        noise: &[Noise<'_>],
        fixed: &FixedPasses,
    ) -> usize {
        let s = bound.scratch;
        let device = &self.device;
        let uniform = |at: u64, size: u64| range(bound.uniforms, at, size);
        let bind = |pipeline: &wgpu::ComputePipeline, resources: Vec<wgpu::BindingResource<'_>>| {
            bind_group(device, pipeline, resources, Vec::new())
        };
        let k = &self.kernels;
        // The input readers of a dispatch: the slots variants over several
        // buffer ranges.
        let readers =
            |sources: &[Source<'_>], dtype, octs| k.readers(dtype, sources.len() > 1, octs);
        // Any read-only buffer, for the bindings a dispatch does not read.
        let dummy = &s.row_offsets;
        // (pipeline, bind group) of each input-reading dispatch.
        let partial_groups: Vec<_> = pass1
            .iter()
            .map(|d| {
                let pipeline = readers(&d.sources, d.dtype, d.octs).partials(d.variant);
                let [grads, grads4] = d.sources[0].resources(dummy);
                let resources = vec![
                    uniform(d.params, PARTIALS_TABLE_BYTES),
                    grads,
                    whole(&s.row_offsets),
                    whole(&s.partials),
                    // window k reads what window k - 1 wrote
                    whole(&s.carry[(d.window + 1) % 2]),
                    grads4,
                    range(&s.means, d.means.0, d.means.1),
                    whole(&s.carry[d.window % 2]),
                ];
                let slots = slot_resources(&d.sources, dummy);
                (pipeline, bind_group(device, pipeline, resources, slots))
            })
            .collect();
        let norms_group = bind(
            &k.norms,
            vec![
                uniform(fixed.norms, std::mem::size_of::<NormsParams>() as u64),
                whole(&s.partials),
                whole(&s.group_tiles),
                whole(&s.mb_norms),
            ],
        );
        let factors_group = bind(
            &k.factors,
            vec![
                uniform(fixed.factors, std::mem::size_of::<FactorsParams>() as u64),
                whole(&s.mb_norms),
                whole(&s.factors),
                whole(&s.weights),
                whole(&s.norms),
                whole(&s.stats),
                whole(&s.bounds),
                whole(&s.mb_flags),
            ],
        );
        let row_weights_group = fixed.row_weights.map(|(at, _)| {
            bind(
                &k.row_weights,
                vec![
                    uniform(at, std::mem::size_of::<RowWeightsParams>() as u64),
                    whole(&s.row_offsets),
                    whole(&s.weights),
                    whole(&s.row_weights),
                ],
            )
        });
        let noise_groups: Vec<_> = noise
            .iter()
            .map(|n| {
                let (out, out_bind, out_size) = n.out;
                bind(
                    &k.add_noise,
                    vec![
                        uniform(n.params, std::mem::size_of::<NoiseParams>() as u64),
                        whole(&s.stats),
                        range(out, out_bind, out_size),
                    ],
                )
            })
            .collect();
        let means_groups: Vec<_> = pass4
            .iter()
            .map(|d| {
                let runs = matches!(d.weights, Pass4Weights::Row);
                let pipeline = readers(&d.sources, d.dtype, d.octs).weighted_means(
                    d.partials.is_some(),
                    d.aligned,
                    runs,
                );
                let (out, out_bind, out_size) = d.out;
                let [grads, grads4] = d.sources[0].resources(dummy);
                let (partials, at, size) = d.partials.unwrap_or((bound.no_partials, 0, 16));
                let resources = vec![
                    uniform(d.params, MEANS_TABLE_BYTES),
                    grads,
                    whole(match d.weights {
                        Pass4Weights::MicroBatch => &s.weights,
                        Pass4Weights::Row => &s.row_weights,
                        Pass4Weights::Ones => bound.ones,
                    }),
                    range(out, out_bind, out_size),
                    grads4,
                    range(partials, at, size),
                ];
                let slots = slot_resources(&d.sources, dummy);
                (pipeline, bind_group(device, pipeline, resources, slots))
            })
            .collect();

        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("microclip"),
            timestamp_writes: self.timer.as_ref().map(PassTimer::writes),
        });
        for ((pipeline, group), d) in partial_groups.iter().zip(pass1) {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, group, &[]);
            let (x, y, z) = d.groups;
            pass.dispatch_workgroups(x, y, z);
        }
        pass.set_pipeline(&k.norms);
        pass.set_bind_group(0, &norms_group, &[]);
        pass.dispatch_workgroups(fixed.norm_groups.0, fixed.norm_groups.1, 1);
        pass.set_pipeline(&k.factors);
        pass.set_bind_group(0, &factors_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        if let (Some(group), Some((_, (x, y)))) = (&row_weights_group, fixed.row_weights) {
            pass.set_pipeline(&k.row_weights);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        for ((pipeline, group), d) in means_groups.iter().zip(pass4) {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(d.groups.0, d.groups.1, 1);
        }
        if !noise_groups.is_empty() {
            pass.set_pipeline(&k.add_noise);
        }
        for (group, n) in noise_groups.iter().zip(noise) {
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(n.groups.0, n.groups.1, 1);
        }
        partial_groups.len()
            + 2
            + row_weights_group.is_some() as usize
            + means_groups.len()
            + noise_groups.len()
    }

    /// The bytes of a call's read-back buffer (see [`Self::copy_results`]) for
    /// `m` micro-batches, `g` groups and `out_bytes` of outputs read back.
    pub(super) fn readback_len(&self, m: u64, g: u64, out_bytes: u64) -> u64 {
        let timer_bytes = if self.timer.is_some() { TIMER_BYTES } else { 0 };
        STATS_BYTES + 8 * m * g + 4 * g + out_bytes + timer_bytes
    }

    /// Records the copies into the read-back buffer, laid out as
    /// `[stats][norms M x G][factors M x G][bounds G][outputs...][timestamps]`
    /// (outputs on the host path, timestamps when timed), and the copies of a
    /// merged pass 4's row into the outputs; returns the buffer and its used
    /// length.
    fn copy_results(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        call: &Call<'_>,
        s: &Scratch,
    ) -> (wgpu::Buffer, u64) {
        let (m, g) = (call.layout.micro_batches, call.layout.groups);
        let per_mb = 4 * m * g;
        let outputs_at = STATS_BYTES + 2 * per_mb + 4 * g;
        let out_bytes: u64 = if call.read_outputs {
            call.inputs.iter().map(|t| t.cols as u64 * 4).sum()
        } else {
            0
        };
        let total = self.readback_len(m, g, out_bytes);
        let readback = self
            .pool
            .get(Slot::Readback, total, U::MAP_READ | U::COPY_DST);
        encoder.copy_buffer_to_buffer(&s.stats, 0, &readback, 0, STATS_BYTES);
        encoder.copy_buffer_to_buffer(&s.norms, 0, &readback, STATS_BYTES, per_mb);
        encoder.copy_buffer_to_buffer(&s.factors, 0, &readback, STATS_BYTES + per_mb, per_mb);
        encoder.copy_buffer_to_buffer(&s.bounds, 0, &readback, STATS_BYTES + 2 * per_mb, 4 * g);
        // Each output from where pass 4 left it (its buffer, or its columns of the
        // merged row) to where the caller reads it: the read-back buffer on the
        // host path, else its buffer.
        let merged = call.merged();
        let mut at = outputs_at;
        for (o, merged_at) in call.outputs.iter().zip(&call.layout.means_starts) {
            let len = o.cols as u64 * 4;
            let (source, source_at) = if merged {
                (&s.merged_out, merged_at * 4)
            } else {
                (o.buffer, o.offset)
            };
            if call.read_outputs {
                encoder.copy_buffer_to_buffer(source, source_at, &readback, at, len);
                at += len;
            } else if merged {
                encoder.copy_buffer_to_buffer(source, source_at, o.buffer, o.offset, len);
            }
        }
        if let Some(timer) = &self.timer {
            timer.copy_to(encoder, &readback, total - TIMER_BYTES);
        }
        (readback, total)
    }
}

/// The pooled scratch buffers of one call, sized from its layout.
struct Scratch {
    /// The micro-batch offsets `[0, ..., N]`.
    row_offsets: wgpu::Buffer,
    partials: wgpu::Buffer,
    mb_norms: wgpu::Buffer,
    factors: wgpu::Buffer,
    weights: wgpu::Buffer,
    norms: wgpu::Buffer,
    stats: wgpu::Buffer,
    mb_flags: wgpu::Buffer,
    group_tiles: wgpu::Buffer,
    bounds: wgpu::Buffer,
    /// Two buffers of one row each, read and written alternately by the windows.
    carry: [wgpu::Buffer; 2],
    /// The stored means (`MeansLayout`): one `[M, sum ceil4(D_p)]` matrix, tensor
    /// p's columns from column `sum_{q < p} ceil4(D_q)` on, or an `[M, ceil4(D_p)]`
    /// block per tensor (whole quads, so that pass 4 reads them four at a time
    /// whatever the widths).
    means: wgpu::Buffer,
    /// Without stored means pass 4 re-reads the input rows, each with its
    /// micro-batch's weight over the micro-batch's size: `[N, G]` floats (at
    /// b = 1 those are the micro-batch weights themselves).
    row_weights: wgpu::Buffer,
    /// The row of a merged pass 4 (`Call::merged`), `sum ceil4(D_p)` floats.
    merged_out: wgpu::Buffer,
}

impl Scratch {
    /// Takes the call's buffers from `pool` and writes the offsets (`[0, ..., N]`),
    /// the groups' first tiles and the fixed bounds.
    fn new(
        pool: &mut Pool,
        queue: &wgpu::Queue,
        config: &ClipConfig,
        offsets: &[u32],
        layout: &CallLayout,
        merged: bool,
    ) -> Self {
        let (m, g) = (layout.micro_batches, layout.groups);
        let n = *offsets.last().expect("offsets hold [0, N]") as u64;
        let storage = SCRATCH_USAGE;
        let row_offsets = pool.get(Slot::RowOffsets, offsets.len() as u64 * 4, storage);
        queue.write_buffer(&row_offsets, 0, bytemuck::cast_slice(offsets));
        let group_tiles = pool.get(Slot::GroupTiles, (g + 1) * 4, storage);
        queue.write_buffer(&group_tiles, 0, bytemuck::cast_slice(&layout.group_tiles));
        let bounds = pool.get(Slot::Bounds, g * 4, storage);
        let fixed_bounds: Vec<f32> = match &config.bound {
            ClipBound::Fixed(c) => vec![*c; g as usize],
            ClipBound::PerGroup(c) => c.clone(),
            ClipBound::Adaptive { .. } => vec![0.0; g as usize],
        };
        queue.write_buffer(&bounds, 0, bytemuck::cast_slice(&fixed_bounds));
        // Weight pairs (see clip_factors.wgsl): 8 bytes each.
        let row_weights_bytes = if layout.per_row_weights { n * g * 8 } else { 0 };
        let merged_bytes = if merged {
            layout.total_means_cols * 4
        } else {
            0
        };
        Self {
            row_offsets,
            partials: pool.get(
                Slot::Partials,
                m * layout.tiles_total * PARTIAL_BYTES,
                storage,
            ),
            mb_norms: pool.get(Slot::MbNorms, m * g * MB_NORM_BYTES, storage),
            factors: pool.get(Slot::Factors, m * g * 4, storage),
            weights: pool.get(Slot::Weights, m * g * 8, storage),
            norms: pool.get(Slot::Norms, m * g * 4, storage),
            stats: pool.get(Slot::Stats, STATS_BYTES, storage),
            mb_flags: pool.get(Slot::MbFlags, m * 4, storage),
            group_tiles,
            bounds,
            // Whole quads: the norm pass reads and writes them four at a time.
            carry: [0, 1]
                .map(|k| pool.get(Slot::Carry(k), means_cols(layout.carry_cols) * 4, storage)),
            means: pool.get(Slot::Means, layout.means_bytes(), storage),
            row_weights: pool.get(Slot::RowWeights, row_weights_bytes, storage),
            merged_out: pool.get(Slot::MergedOutput, merged_bytes, storage),
        }
    }
}

/// The scratch of pass 4's row chunks: the partial rows and the ones that weigh
/// them in their sum.
struct ChunkScratch {
    partials: wgpu::Buffer,
    /// Floats of `partials` in use.
    floats: u64,
    ones: wgpu::Buffer,
}

impl ChunkScratch {
    /// Sized for the largest of the cut `units` (empty if none is cut).
    fn new(
        pool: &mut Pool,
        queue: &wgpu::Queue,
        units: &[(Vec<RowsJob<'_>>, Option<RowChunks>)],
    ) -> Self {
        let cut = || units.iter().filter_map(|(_, c)| c.as_ref());
        let floats = cut().map(|c| c.scratch_floats).max();
        let max_chunks = cut().map(RowChunks::max_chunks).max();
        let partials = pool.get(Slot::ChunkPartials, floats.unwrap_or(0) * 4, SCRATCH_USAGE);
        let ones = pool.get(
            Slot::Ones,
            max_chunks.unwrap_or(0) as u64 * 8,
            SCRATCH_USAGE,
        );
        if let Some(k) = max_chunks {
            // Weight pairs (1, 1).
            queue.write_buffer(
                &ones,
                0,
                bytemuck::cast_slice(&vec![1.0f32; 2 * k as usize]),
            );
        }
        Self {
            partials,
            floats: floats.unwrap_or(0),
            ones,
        }
    }

    /// The partial rows' binding.
    fn rows(&self) -> Range<'_> {
        (&self.partials, 0, self.floats.max(4) * 4)
    }
}

/// The buffers `GpuClipper::record` binds besides the dispatches' own.
struct Bound<'a> {
    scratch: &'a Scratch,
    uniforms: &'a wgpu::Buffer,
    ones: &'a wgpu::Buffer,
    no_partials: &'a wgpu::Buffer,
}
