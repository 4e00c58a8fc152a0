//! Deterministic bench inputs: per-sample gradients with a shared direction and
//! per-row scales (one row in five 10x larger), generated in parallel on the host
//! and, for the GPU, uploaded in chunks so that no second full-size host copy
//! exists. Element `(row, col)` of tensor `t` depends only on (seed, t, row, col),
//! so host and device copies of a tensor are identical.

use rayon::prelude::*;

use microclip::half::{bf16, f16};
use microclip::Dtype;

use crate::kernels::Gpu;

/// splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from the top 24 bits.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32
}

fn row_scale(key: u64, row: u64) -> f32 {
    let h = mix(key ^ row.wrapping_mul(0xd1b5_4a32_d192_ed03));
    if h.is_multiple_of(5) {
        10.0
    } else {
        0.1 + 1.9 * unit(h)
    }
}

/// Fills `out` with rows `row0..` of tensor `tensor` (`d` columns).
pub fn fill_rows(seed: u64, tensor: u64, d: usize, row0: usize, out: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    let key = mix(seed ^ mix(tensor));
    let first = (row0 * d) as u64;
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(k, chunk)| {
            let start = first + (k * CHUNK) as u64;
            for (i, v) in chunk.iter_mut().enumerate() {
                let idx = start + i as u64;
                let row = idx / d as u64;
                let u = unit(mix(key ^ idx)) * 2.0 - 1.0;
                *v = row_scale(key, row) * (u + 0.3);
            }
        });
}

/// Tensor `tensor` as a host `[n, d]` matrix.
pub fn host_tensor(seed: u64, tensor: u64, n: usize, d: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n * d];
    fill_rows(seed, tensor, d, 0, &mut v);
    v
}

/// Tensor `tensor` as a device `[n, d]` matrix of `dtype` in its own buffer
/// (16-bit types rounded to nearest from the f32 values), uploaded in chunks of
/// about 32 MiB (each flushed before the next, bounding staging memory).
pub fn device_tensor_as(
    gpu: &Gpu,
    seed: u64,
    tensor: u64,
    n: usize,
    d: usize,
    dtype: Dtype,
) -> Result<wgpu::Buffer, String> {
    let elem = dtype.size_bytes() as usize;
    let bytes = ((n * d * elem) as u64).next_multiple_of(4);
    let buffer = gpu.storage_buffer(&format!("input {tensor} [{n}, {d}] {dtype}"), bytes)?;
    // An even number of rows per chunk keeps every chunk but the last whole words.
    let rows_per_chunk = ((8usize << 20) / d).max(2) / 2 * 2;
    let mut host = vec![0.0f32; rows_per_chunk.min(n) * d];
    let mut row = 0;
    while row < n {
        let rows = rows_per_chunk.min(n - row);
        let chunk = &mut host[..rows * d];
        fill_rows(seed, tensor, d, row, chunk);
        let mut words: Vec<u8> = match dtype {
            Dtype::F32 => bytemuck::cast_slice(chunk).to_vec(),
            Dtype::F16 => chunk
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            Dtype::Bf16 => chunk
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        words.resize(words.len().next_multiple_of(4), 0);
        gpu.queue
            .write_buffer(&buffer, (row * d * elem) as u64, &words);
        gpu.queue.submit([]);
        gpu.wait();
        row += rows;
    }
    Ok(buffer)
}

/// [`device_tensor_as`] in f32.
pub fn device_tensor(
    gpu: &Gpu,
    seed: u64,
    tensor: u64,
    n: usize,
    d: usize,
) -> Result<wgpu::Buffer, String> {
    device_tensor_as(gpu, seed, tensor, n, d, Dtype::F32)
}

/// f32 tensors `first_tensor + p` of `[n, widths[p]]` packed into one buffer, each
/// at a 256-byte aligned offset (as a framework's allocator might place a model's
/// gradients); returns the buffer and the offsets.
pub fn packed_tensors(
    gpu: &Gpu,
    seed: u64,
    first_tensor: u64,
    n: usize,
    widths: &[usize],
) -> Result<(wgpu::Buffer, Vec<u64>), String> {
    let mut offsets = Vec::with_capacity(widths.len());
    let mut end = 0u64;
    for &d in widths {
        let at = end.next_multiple_of(256);
        offsets.push(at);
        end = at + (n * d * 4) as u64;
    }
    let buffer = gpu.storage_buffer(&format!("{} packed tensors", widths.len()), end)?;
    for (p, (&d, &at)) in widths.iter().zip(&offsets).enumerate() {
        let t = host_tensor(seed, first_tensor + p as u64, n, d);
        gpu.queue
            .write_buffer(&buffer, at, bytemuck::cast_slice(&t));
        gpu.queue.submit([]);
        gpu.wait();
    }
    Ok((buffer, offsets))
}

/// `count` tensor widths from 1 to `max`, spread as `1 + (max - 1) * (k / (count - 1))^4`:
/// many small tensors and a few large ones (100 tensors up to 200,000 sum to about
/// 4.06 M).
pub fn spread_widths(count: usize, max: usize) -> Vec<usize> {
    (0..count)
        .map(|k| {
            let t = if count > 1 {
                k as f64 / (count - 1) as f64
            } else {
                1.0
            };
            1 + ((max - 1) as f64 * t.powi(4)).round() as usize
        })
        .collect()
}
