//! The WGSL kernels: sources, their uniform parameter blocks (laid out exactly as in
//! the shaders) and the compute pipelines, built once per clipper.

use bytemuck::{Pod, Zeroable};

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const COLUMN_MEAN: &str = include_str!("../../shaders/column_mean.wgsl");

/// Every kernel: (name, needs the column-mean helper, body).
pub(crate) const KERNELS: [(&str, bool, &str); 6] = [
    (
        "mb_partials",
        true,
        include_str!("../../shaders/mb_partials.wgsl"),
    ),
    (
        "mb_norms",
        false,
        include_str!("../../shaders/mb_norms.wgsl"),
    ),
    (
        "clip_factors",
        false,
        include_str!("../../shaders/clip_factors.wgsl"),
    ),
    (
        "weighted_sum",
        true,
        include_str!("../../shaders/weighted_sum.wgsl"),
    ),
    (
        "weighted_means",
        false,
        include_str!("../../shaders/weighted_means.wgsl"),
    ),
    (
        "add_noise",
        false,
        include_str!("../../shaders/add_noise.wgsl"),
    ),
];

/// The full WGSL source of a kernel: the shared prelude(s) then its body.
pub fn kernel_source(name: &str) -> Option<String> {
    let (_, needs_mean, body) = KERNELS.iter().find(|(n, _, _)| *n == name)?;
    let mean = if *needs_mean { COLUMN_MEAN } else { "" };
    Some(format!("{COMMON}\n{mean}\n{body}"))
}

/// Names of all kernels, for validation tools.
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    KERNELS.iter().map(|(n, _, _)| *n)
}

/// `Params` of mb_partials.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct PartialsParams {
    pub cols: u32,
    pub elem_offset: u32,
    pub row_start: u32,
    pub row_end: u32,
    pub mb_first: u32,
    pub tiles: u32,
    pub tiles_x: u32,
    pub tile_base: u32,
    pub tiles_total: u32,
    pub carry_in: u32,
    pub carry_out: u32,
    pub last_local: u32,
    pub carry_in_base: u32,
    pub carry_out_base: u32,
    pub vec4_path: u32,
    pub write_means: u32,
    pub means_base: u32,
    pub pad: [u32; 3],
}

/// `Params` of mb_norms.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct NormsParams {
    pub micro_batches: u32,
    pub tiles_total: u32,
    pub groups_x: u32,
    pub groups: u32,
}

/// `Params` of clip_factors.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct FactorsParams {
    pub micro_batches: u32,
    pub adaptive: u32,
    pub policy: u32,
    pub groups: u32,
    pub scale: f32,
    pub function: u32,
    pub gamma: f32,
    pub sigma: f32,
}

/// `Params` of weighted_sum.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct SumParams {
    pub cols: u32,
    pub elem_offset: u32,
    pub row_start: u32,
    pub row_end: u32,
    pub mb_first: u32,
    pub mb_count: u32,
    pub groups_x: u32,
    pub out_offset: u32,
    pub accumulate: u32,
    pub skip_zero: u32,
    pub groups: u32,
    pub group: u32,
}

/// `Params` of add_noise.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct NoiseParams {
    pub cols: u32,
    pub out_offset: u32,
    pub first: [u32; 2],
    pub seed: [u32; 2],
    pub step: [u32; 2],
    pub groups_x: u32,
    pub mode: u32,
    pub pad: [u32; 2],
}

/// `NoiseParams::mode`: add the noise to the output.
pub(crate) const NOISE_MODE_ADD: u32 = 0;
/// `NoiseParams::mode`: write each element's raw Philox word (tests).
pub(crate) const NOISE_MODE_RAW_WORDS: u32 = 1;
/// `Params` of weighted_means.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct MeansSumParams {
    pub cols: u32,
    pub means_base: u32,
    pub micro_batches: u32,
    pub groups_x: u32,
    pub out_offset: u32,
    pub skip_zero: u32,
    pub vec4_path: u32,
    pub groups: u32,
    pub group: u32,
    pub pad: [u32; 3],
}

/// Size in bytes of the `Partial` record of common.wgsl.
pub(crate) const PARTIAL_BYTES: u64 = 16;
/// Size in bytes of the `MbNorm` record of common.wgsl.
pub(crate) const MB_NORM_BYTES: u64 = 16;
/// Size in bytes of the `Stats` record of clip_factors.wgsl.
pub(crate) const STATS_BYTES: u64 = 32;

/// The compute pipelines.
pub(crate) struct Kernels {
    pub partials: wgpu::ComputePipeline,
    pub norms: wgpu::ComputePipeline,
    pub factors: wgpu::ComputePipeline,
    pub weighted_sum: wgpu::ComputePipeline,
    pub add_noise: wgpu::ComputePipeline,
    pub weighted_means: wgpu::ComputePipeline,
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let build = |name: &str| {
            let source = kernel_source(name).expect("known kernel");
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        Self {
            partials: build("mb_partials"),
            norms: build("mb_norms"),
            factors: build("clip_factors"),
            weighted_sum: build("weighted_sum"),
            add_noise: build("add_noise"),
            weighted_means: build("weighted_means"),
        }
    }
}
