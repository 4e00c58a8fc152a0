//! One call's dispatches as the recording binds them (parameter-block offsets,
//! buffer ranges by slot, workgroups), the uniform blocks they point into
//! (`ParamBlocks`), and the binding helpers.

use super::kernels::{slot_binding, MeansSumParams, PartialsParams, PartialsVariant, SLOTS};
use super::plan::{dispatch_2d, oct_rows, vec4_aligned, MEANS_SUM_COLS, TABLE_LEN};
use crate::dtype::Dtype;
use crate::error::Result;

/// A buffer range: (buffer, byte offset, byte size).
pub(super) type Range<'a> = (&'a wgpu::Buffer, u64, u64);

/// The fixed-size passes' parameter blocks and workgroups.
pub(super) struct FixedPasses {
    pub(super) norms: u64,
    pub(super) norm_groups: (u32, u32),
    /// Only when pass 4 reads rows of micro-batches of several rows.
    pub(super) row_weights: Option<(u64, (u32, u32))>,
    pub(super) factors: u64,
}

/// One noise dispatch: its parameter block, output range and workgroups.
pub(super) struct Noise<'a> {
    pub(super) params: u64,
    pub(super) out: Range<'a>,
    pub(super) groups: (u32, u32),
}

/// One pass-4 (`weighted_means`) dispatch: its parameter block, the rows it reads
/// (buffer, offset, size), its output range and the workgroups it runs.
pub(super) struct Pass4<'a> {
    pub(super) params: u64,
    /// The rows' buffer ranges, by slot.
    pub(super) sources: Vec<Source<'a>>,
    /// Which weights it reads.
    pub(super) weights: Pass4Weights,
    pub(super) out: Range<'a>,
    /// The partial rows it writes (a row-chunk dispatch: the `ROW_CHUNKS`
    /// pipeline), if any.
    pub(super) partials: Option<Range<'a>>,
    /// Every entry reads its rows as whole quads (`vec4_path` 1): the pipeline
    /// built for them (`kernels::weighted_means_constants`).
    pub(super) aligned: bool,
    /// The octs readers (`KernelVariant::octs`) read its rows.
    pub(super) octs: bool,
    pub(super) groups: (u32, u32),
    pub(super) dtype: Dtype,
}

impl<'a> Pass4<'a> {
    /// Numbers the column groups of `table`'s tensors one after the other, sets
    /// the dispatch's size in entry 0 and appends the table to `params`. With
    /// `octs_allowed` (`GpuClipper::oct_loads`) 16-bit rows that allow it are
    /// read as octs (`plan::oct_rows`).
    pub(super) fn push(
        params: &mut ParamBlocks,
        mut table: Vec<MeansSumParams>,
        bindings: Vec<Range<'a>>,
        weights: Pass4Weights,
        out: Range<'a>,
        dtype: Dtype,
        octs_allowed: bool,
    ) -> Result<Self> {
        let mut dispatch_groups = 0u64;
        for e in &mut table {
            e.first_group = dispatch_groups as u32;
            dispatch_groups += (e.cols as u64).div_ceil(MEANS_SUM_COLS);
        }
        let groups = dispatch_2d(dispatch_groups)?;
        table[0].groups_x = groups.0;
        table[0].entries = table.len() as u32;
        table[0].dispatch_groups = dispatch_groups as u32;
        let sources = slot_sources(&bindings, &table, |e| (e.slot as usize, e.vec4_path));
        let aligned = table.iter().all(|e| e.vec4_path == 1);
        let octs = octs_allowed
            && aligned
            && sources.len() == 1
            && oct_rows(
                dtype.size_bytes(),
                sources[0].size,
                table.iter().map(|e| (e.stride as u64, e.means_base as u64)),
            );
        Ok(Self {
            aligned,
            octs,
            params: params.push_table(&table, MEANS_TABLE_BYTES),
            sources,
            weights,
            out,
            partials: None,
            groups,
            dtype,
        })
    }
}

/// The weights a pass-4 dispatch reads: per micro-batch (`s_{j,g} / M`), per
/// input row (the row-weight table), or ones (the sum of row chunks' partial
/// rows).
#[derive(Clone, Copy)]
pub(super) enum Pass4Weights {
    MicroBatch,
    Row,
    Ones,
}

/// A pass-4 dispatch over input rows before it is cut into row chunks: its
/// table, bindings by slot, output range and element type.
pub(super) struct RowsJob<'a> {
    pub(super) table: Vec<MeansSumParams>,
    pub(super) bindings: Vec<Range<'a>>,
    pub(super) out: Range<'a>,
    pub(super) dtype: Dtype,
}

/// One norm-pass (`mb_partials`) dispatch: its table's offset in the uniform
/// blocks, the rows it reads (by slot), the carry buffers' roles (its window's
/// index), its workgroups and type.
pub(super) struct Pass1<'a> {
    pub(super) params: u64,
    /// The norm pass's build it runs (`CallLayout::pass1_variants`).
    pub(super) variant: PartialsVariant,
    /// The octs readers (`KernelVariant::octs`) read its rows
    /// (`CallLayout::pass1_octs`).
    pub(super) octs: bool,
    pub(super) sources: Vec<Source<'a>>,
    pub(super) window: usize,
    /// The range of the means buffer it binds (byte offset, byte size).
    pub(super) means: (u64, u64),
    pub(super) groups: (u32, u32, u32),
    pub(super) dtype: Dtype,
}

/// A buffer range an input-reading dispatch reads rows from, and whether an
/// entry of the table reads it as quads (`vec4_path` != 0).
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub(super) buffer: &'a wgpu::Buffer,
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) quads: bool,
}

impl<'a> Source<'a> {
    /// Its `grads` and `grads4` bindings (`dummy` for the latter when no entry
    /// reads quads).
    pub(super) fn resources(&self, dummy: &'a wgpu::Buffer) -> [wgpu::BindingResource<'a>; 2] {
        let rows = range(self.buffer, self.offset, self.size);
        let quads = if self.quads {
            range(self.buffer, self.offset, self.size)
        } else {
            whole(dummy)
        };
        [rows, quads]
    }
}

/// The sources of a dispatch from its bindings (buffer, offset, size) by slot
/// and its table, whose entries give (slot, `vec4_path`) through `slot_path`.
pub(super) fn slot_sources<'a, T>(
    bindings: &[Range<'a>],
    table: &[T],
    slot_path: impl Fn(&T) -> (usize, u32),
) -> Vec<Source<'a>> {
    (0..bindings.len())
        .map(|slot| {
            let (buffer, offset, size) = bindings[slot];
            Source {
                buffer,
                offset,
                size,
                quads: table
                    .iter()
                    .map(&slot_path)
                    .any(|(s, p)| s == slot && p != 0),
            }
        })
        .collect()
}

/// The numbered bindings of slots 1.. of the slots variants (grads_slots.wgsl)
/// for a dispatch over several sources (the unused ones bound to `dummy`); none
/// for a dispatch over one.
pub(super) fn slot_resources<'a>(
    sources: &[Source<'a>],
    dummy: &'a wgpu::Buffer,
) -> Vec<(u32, wgpu::BindingResource<'a>)> {
    if sources.len() < 2 {
        return Vec::new();
    }
    (1..SLOTS)
        .flat_map(|k| {
            let [rows, quads] = match sources.get(k) {
                Some(s) => s.resources(dummy),
                None => [whole(dummy), whole(dummy)],
            };
            [(slot_binding(k), rows), (slot_binding(k) + 1, quads)]
        })
        .collect()
}

/// `vec4_path` of the two input-reading kernels for rows of `cols` elements, the
/// first at element `elem_offset` of a binding: 1 (vec4 loads) when every row
/// starts at a multiple of 4 elements, else 2 (aligned loads shifted into place)
/// when the binding holds whole quads (`GpuClipper::quads_binding`), else 0
/// (scalar loads).
pub(super) fn load_path(cols: u64, elem_offset: u32, whole_quads: bool) -> u32 {
    if vec4_aligned(cols, elem_offset) {
        1
    } else if whole_quads {
        2
    } else {
        0
    }
}

/// Bytes of mb_partials' `table` binding: `TABLE_LEN` parameter blocks.
pub(super) const PARTIALS_TABLE_BYTES: u64 =
    (TABLE_LEN * std::mem::size_of::<PartialsParams>()) as u64;
/// Bytes of weighted_means' `table` binding: `TABLE_LEN` parameter blocks.
pub(super) const MEANS_TABLE_BYTES: u64 =
    (TABLE_LEN * std::mem::size_of::<MeansSumParams>()) as u64;

/// Uniform blocks packed at the device's uniform offset alignment.
pub(super) struct ParamBlocks {
    pub(super) align: u64,
    pub(super) bytes: Vec<u8>,
}

impl ParamBlocks {
    pub(super) fn new(align: u64) -> Self {
        Self {
            align,
            bytes: Vec::new(),
        }
    }

    /// Appends `entries` as one block of `bytes` (the rest zeros) and returns its
    /// byte offset.
    pub(super) fn push_table<T: bytemuck::Pod>(&mut self, entries: &[T], bytes: u64) -> u64 {
        let at = self.push(&entries[0]);
        self.bytes
            .extend_from_slice(bytemuck::cast_slice(&entries[1..]));
        self.bytes.resize((at + bytes) as usize, 0);
        at
    }

    /// Appends a block and returns its byte offset.
    pub(super) fn push<T: bytemuck::Pod>(&mut self, block: &T) -> u64 {
        let at = (self.bytes.len() as u64).next_multiple_of(self.align);
        self.bytes.resize(at as usize, 0);
        self.bytes.extend_from_slice(bytemuck::bytes_of(block));
        at
    }
}

/// A bind group of `pipeline`'s group 0 with `resources` at bindings 0, 1, ...
/// and the numbered `more`.
pub(super) fn bind_group(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    resources: Vec<wgpu::BindingResource<'_>>,
    more: Vec<(u32, wgpu::BindingResource<'_>)>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = (0..)
        .zip(resources)
        .chain(more)
        .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// `size` bytes of `buffer` from `offset` as a binding.
pub(super) fn range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: wgpu::BufferSize::new(size.max(4)),
    })
}

/// A whole buffer as a binding.
pub(super) fn whole(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
    buffer.as_entire_binding()
}
