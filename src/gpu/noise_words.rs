//! The noise pass on its own, for tests of the generator: the raw Philox words or
//! standard normals it draws for a range of output elements.

use super::dispatch::{bind_group, range, whole};
use super::kernels::{NoiseParams, NOISE_MODE_NORMALS, NOISE_MODE_RAW_WORDS, STATS_BYTES};
use super::plan::{dispatch_2d, WORKGROUP};
use super::pool::{Slot, SCRATCH_USAGE};
use super::{scoped, GpuClipper};
use crate::config::GaussianNoise;
use crate::error::{ClipError, Result};
use wgpu::BufferUsages as U;

impl GpuClipper {
    /// The raw Philox words the noise pass draws for output elements
    /// `first..first + count` (the same words as [`crate::noise::philox_word`]),
    /// or, with `normals`, the f32 bits of their standard normals.
    pub fn noise_words(
        &mut self,
        noise: &GaussianNoise,
        first: u64,
        count: u32,
        normals: bool,
    ) -> Result<Vec<u32>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let bytes = count as u64 * 4;
        if bytes > self.max_binding {
            return Err(ClipError::TooLarge(format!(
                "{count} words ({bytes} bytes) exceed one storage binding ({} bytes)",
                self.max_binding
            )));
        }
        let device = self.device.clone();
        let readback = scoped(&device, || {
            self.record_noise_words(noise, first, count, normals)
        })
        .inspect_err(|_| self.pool.clear())??;
        let words = self.read_back(&readback)?;
        // A test helper's output is not kept (up to a binding's size).
        self.pool.release(Slot::Output(usize::MAX));
        self.pool.release(Slot::Readback);
        Ok(bytemuck::pod_collect_to_vec(&words))
    }

    /// Records and submits [`Self::noise_words`]' pass; returns its read-back buffer.
    fn record_noise_words(
        &mut self,
        noise: &GaussianNoise,
        first: u64,
        count: u32,
        normals: bool,
    ) -> Result<(wgpu::Buffer, u64)> {
        let bytes = count as u64 * 4;
        let out = self
            .pool
            .get(Slot::Output(usize::MAX), bytes, U::STORAGE | U::COPY_SRC);
        let stats = self.pool.get(Slot::Stats, STATS_BYTES, SCRATCH_USAGE);
        let (groups_x, groups_y) = dispatch_2d((count as u64).div_ceil(WORKGROUP))?;
        let mode = if normals {
            NOISE_MODE_NORMALS
        } else {
            NOISE_MODE_RAW_WORDS
        };
        let params = noise_params(noise, first, count, 0, groups_x, mode);
        let uniforms = self.pool.get(
            Slot::Params,
            std::mem::size_of::<NoiseParams>() as u64,
            U::UNIFORM | U::COPY_DST,
        );
        self.queue
            .write_buffer(&uniforms, 0, bytemuck::bytes_of(&params));
        let pipeline = &self.kernels.add_noise;
        let group = bind_group(
            &self.device,
            pipeline,
            vec![
                range(&uniforms, 0, std::mem::size_of::<NoiseParams>() as u64),
                whole(&stats),
                range(&out, 0, bytes),
            ],
            Vec::new(),
        );
        let readback = self
            .pool
            .get(Slot::Readback, bytes, U::MAP_READ | U::COPY_DST);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups_x, groups_y, 1);
        }
        encoder.copy_buffer_to_buffer(&out, 0, &readback, 0, bytes);
        self.queue.submit([encoder.finish()]);
        Ok((readback, bytes))
    }
}

/// The `add_noise` parameters for one tensor whose first output is element `first`.
pub(super) fn noise_params(
    noise: &GaussianNoise,
    first: u64,
    cols: u32,
    out_offset: u32,
    groups_x: u32,
    mode: u32,
) -> NoiseParams {
    let halves = |v: u64| [v as u32, (v >> 32) as u32];
    NoiseParams {
        cols,
        out_offset,
        first: halves(first),
        seed: halves(noise.seed),
        step: halves(noise.step),
        groups_x,
        mode,
        pad: [0; 2],
    }
}
