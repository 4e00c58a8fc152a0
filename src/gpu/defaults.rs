//! The settings that depend on the adapter: tile widths, workgroup sizes, when to
//! store the means, pass 4's row chunks and merged row, binding slots (each with
//! the measurement behind it).

use super::kernels::{slots_supported, SLOTS};

/// The norm pass's minimum workgroup count for an adapter type. A software adapter
/// (lavapipe, SwiftShader: `DeviceType::Cpu`) pays per workgroup for its start and
/// its barriers (measured on lavapipe: pass 1 at b = 1 went from 2.2x to 0.8x a
/// read of the same bytes with 4x wider tiles), so its tiles widen while every
/// host thread keeps 16 workgroups. Hardware adapters keep the narrowest tile (more
/// workgroups in flight; wider tiles not measured on one).
pub(super) fn default_min_tile_workgroups(device_type: wgpu::DeviceType) -> u64 {
    match device_type {
        wgpu::DeviceType::Cpu => {
            16 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
        }
        _ => u64::MAX,
    }
}

/// Whether the reduction kernels (passes 1 and 2) run workgroups of one SIMD group
/// (8 threads, see `kernels::kernel_constants`) on an adapter type: yes on a
/// software adapter, where a workgroup of several SIMD groups runs them one after
/// the other as coroutines that switch at every barrier (measured on lavapipe: a
/// 64-thread workgroup with a 6-level tree reduction cost 3.9 us, an 8-thread one
/// with a 3-level tree 0.24 us; 100 small tensors at b = 4 went from 3.2x to 2.5x
/// a read of the same bytes). Hardware adapters keep 64 and 256 threads.
pub(super) fn default_small_workgroups(device_type: wgpu::DeviceType) -> bool {
    device_type == wgpu::DeviceType::Cpu
}

/// From how many rows per micro-batch on average pass 1 stores the means: 3, the
/// break-even in bytes being 2 (see `materialize_means`). On lavapipe at b = 2
/// re-reading the rows cost 2.5x a read (pass 1 1.3x, pass 4 1.3x), storing the
/// means 2.9x while the host's writes cost 4-6x its reads, about the same while
/// they cost 1.2x; at b = 4 storing wins (1.9x against 3.0x).
pub(super) const DEFAULT_MEANS_MIN_ROWS: u64 = 3;

/// The most bytes of micro-batch means a call stores when they do not fit one
/// storage binding (`MeansLayout::Blocks` in plan.rs; within one binding they are
/// stored from `DEFAULT_MEANS_MIN_ROWS` rows per micro-batch on average, unless
/// a software adapter's loop budget caps M, see `pass4_max_rows`):
/// 1 GiB, as the CPU backend's stored means. Larger means would take a fraction
/// `1 / b` of an input that already fills device memory; their rows are
/// re-read instead. On lavapipe (128 MiB bindings) the shapes at b = 4
/// (N = 256, D = 1,000,000: 256 MB of means; N = 64, D = 4,000,000) went from
/// re-reading the rows to storing blocks (BENCHMARKS.md, twenty-third session).
pub(super) const MEANS_BLOCKS_MAX_BYTES: u64 = 1 << 30;

/// The most rows per chunk of pass 4 over input rows: a chunk is a plain sum
/// (no blocks of `ROW_BLOCK`), so its rounding error grows with its rows.
pub(crate) const MAX_PASS4_CHUNK_ROWS: u32 = 64;

/// Rows per chunk of pass 4 over input rows (b <= 2) for an adapter type: 32 on
/// a software adapter, else 0 (no chunks). Walking a column tile down all N rows
/// costs lavapipe about 1.4x a linear read of the same bytes; 32 rows at a time
/// across all columns (chunk after chunk, in one dispatch) about 1.1x (a probe
/// over 256 rows of 62,500 f32, 64-thread workgroups: 8.8 ms against 6.7-6.8;
/// BENCHMARKS.md), since then few rows stream at once. The chunks' partial rows
/// cost one more dispatch and `1/32` of an f32 input's bytes written and read.
/// Hardware keeps the long walk (not measured there).
pub(super) fn default_pass4_chunk_rows(device_type: wgpu::DeviceType) -> u32 {
    match device_type {
        wgpu::DeviceType::Cpu => 32,
        _ => 0,
    }
}

/// Up to which average padded tensor width pass 4 runs once for several tensors,
/// for an adapter type. Merging saves a dispatch per tensor and costs one more
/// write, read and write of the output (12 bytes per column). On a software
/// adapter a dispatch costs about 50 us and a 10 KB copy 1.4 us (lavapipe): always.
/// On hardware, where a dispatch costs a few us, up to 2^18 columns on average
/// (3 MB of copies a tensor, a few us at HBM speeds; an estimate, not measured on
/// a GPU yet).
pub(super) fn default_merge_max_avg_cols(device_type: wgpu::DeviceType) -> u64 {
    match device_type {
        wgpu::DeviceType::Cpu => u64::MAX,
        _ => 1 << 18,
    }
}

/// Loop iterations one shader invocation may make, for an adapter type: on a
/// software adapter 32,768, half of what llvmpipe allows. llvmpipe (lavapipe)
/// ends every loop of an invocation once they have iterated 65,535 times
/// between them (`LP_MAX_TGSI_LOOP_ITERATIONS` in Mesa's gallivm, "shared
/// between every loop in a shader"), silently: a pass-4 walk over 80,000 stored
/// means, or a norm-pass walk down a micro-batch of 2,048 rows of 4,096-column
/// tiles, stopped part-way and gave wrong outputs. The call plans count each
/// kernel's loop steps against this budget and narrow the norm pass's tiles,
/// cut row windows, or do not store the means where a walk would pass it
/// (`plan::tile_cap`, `plan::window_rows_cap`, `plan::pass4_max_rows`).
/// Hardware adapters have no such limit.
pub(super) fn default_loop_budget(device_type: wgpu::DeviceType) -> Option<u64> {
    match device_type {
        wgpu::DeviceType::Cpu => Some(1 << 15),
        _ => None,
    }
}

/// Buffer ranges per input-reading dispatch on `device` by default: [`SLOTS`] on
/// a hardware adapter that allows the slots variants (their storage bindings),
/// else 1. The slots variants choose each load's binding by the table entry's
/// slot: a branch that is the same for the whole workgroup. llvmpipe runs every
/// side of a branch under a lane mask, so on lavapipe those loads cost about 8
/// times as much: the input readers took 2.3-3.8x the time over the same bytes
/// (measured: the 100 tensors in 100 buffers at b = 4 went from 3.8-4.4x a read
/// to 6-10x, despite 13 norm-pass dispatches instead of 100), so a software
/// adapter keeps a dispatch per buffer. Hardware runs a workgroup-uniform branch
/// as one scalar branch and saves each dispatch's launch and barrier (the H200
/// took 8.6x a read on those 100 buffers with a dispatch each): on by default
/// there, not yet measured on a GPU.
pub(super) fn default_buffer_slots(device: &wgpu::Device) -> usize {
    let software = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
    if slots_supported(device) && !software {
        SLOTS
    } else {
        1
    }
}
