//! The WGSL kernels: sources, their uniform parameter blocks (laid out exactly as in
//! the shaders) and the compute pipelines, built once per clipper.

use bytemuck::{Pod, Zeroable};

use crate::dtype::Dtype;

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const COLUMN_MEAN: &str = include_str!("../../shaders/column_mean.wgsl");
const TENSOR_TABLE: &str = include_str!("../../shaders/tensor_table.wgsl");
const GRADS_SHIFTED: &str = include_str!("../../shaders/grads_shifted.wgsl");
const GRADS_ONE_BINDING: &str = include_str!("../../shaders/grads_one_binding.wgsl");
const GRADS_SLOTS: &str = include_str!("../../shaders/grads_slots.wgsl");
const GRADS_OCTS: &str = include_str!("../../shaders/grads_octs.wgsl");

/// `grad_words8` (the words of two adjacent quads) of the 16-bit loaders where
/// `grads4` holds quads: two `vec2<u32>` loads (one with
/// [`KernelVariant::octs`], grads_octs.wgsl).
const WORDS8_FROM_QUADS: &str = "fn grad_words8(q: u32) -> vec4<u32> {
    return vec4<u32>(grad_words4(q), grad_words4(q + 1u));
}
";

/// Buffer ranges one dispatch of an input-reading kernel can read through its
/// slots variant (grads_slots.wgsl): slot 0 at the kernel's own bindings, slots
/// 1.. at bindings 14 + 2k and 15 + 2k.
pub(crate) const SLOTS: usize = 8;
/// Storage buffers the slots variant of mb_partials binds (the most of the two
/// readers): its own 7 and two per further slot.
pub(crate) const SLOTS_STORAGE_BUFFERS: u32 = 7 + 2 * (SLOTS as u32 - 1);
/// Binding of `grads_k` in the slots variant (`grads4_k` is the next one).
pub(crate) fn slot_binding(k: usize) -> u32 {
    14 + 2 * k as u32
}

/// What a kernel needs before its body, after common.wgsl.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prelude {
    /// Nothing more.
    None,
    /// The gradient loader of the element type (`grads_<type>.wgsl`), its
    /// unaligned quads (grads_shifted.wgsl), then the tensor table's search
    /// (tensor_table.wgsl).
    Grads,
    /// Those, then the column-mean helper.
    GradsAndMean,
}

/// Every kernel: (name, prelude, body).
pub(crate) const KERNELS: [(&str, Prelude, &str); 6] = [
    (
        "mb_partials",
        Prelude::GradsAndMean,
        include_str!("../../shaders/mb_partials.wgsl"),
    ),
    (
        "mb_norms",
        Prelude::None,
        include_str!("../../shaders/mb_norms.wgsl"),
    ),
    (
        "clip_factors",
        Prelude::None,
        include_str!("../../shaders/clip_factors.wgsl"),
    ),
    (
        "row_weights",
        Prelude::None,
        include_str!("../../shaders/row_weights.wgsl"),
    ),
    (
        "weighted_means",
        Prelude::Grads,
        include_str!("../../shaders/weighted_means.wgsl"),
    ),
    (
        "add_noise",
        Prelude::None,
        include_str!("../../shaders/add_noise.wgsl"),
    ),
];

/// The gradient loader of each element type (f16's `f16_pair` as `variant` says).
fn grads_loader(dtype: Dtype, variant: KernelVariant) -> String {
    match dtype {
        Dtype::F32 => include_str!("../../shaders/grads_f32.wgsl").to_string(),
        Dtype::F16 => {
            let pair = if variant.f16_unpack {
                F16_PAIR_UNPACK
            } else {
                F16_PAIR_BITS
            };
            format!("{}\n{pair}", include_str!("../../shaders/grads_f16.wgsl"))
        }
        Dtype::Bf16 => include_str!("../../shaders/grads_bf16.wgsl").to_string(),
    }
}

/// grads_f16.wgsl's `f16_pair` by its exact integer decode (the default
/// without small workgroups, and wherever the builtin does not compile).
const F16_PAIR_BITS: &str = "fn f16_pair(w: u32) -> vec2<f32> {
    return f16_pair_bits(w);
}
";

/// grads_f16.wgsl's `f16_pair` by the `unpack2x16float` builtin
/// ([`KernelVariant::f16_unpack`]).
const F16_PAIR_UNPACK: &str = "fn f16_pair(w: u32) -> vec2<f32> {
    return unpack2x16float(w);
}
";

/// How a kernel's source is composed beyond its name and input element type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelVariant {
    /// The input readers (`mb_partials`, `weighted_means`) over up to 8 buffer
    /// ranges in one dispatch, each table entry naming its slot
    /// (grads_slots.wgsl); else over one.
    pub slots: bool,
    /// f16 input decoded by WGSL's `unpack2x16float` instead of integer
    /// operations (grads_f16.wgsl): what the GPU backend runs with small
    /// workgroups (by default on a software adapter) where the device compiles
    /// it (wgpu's `SHADER_F16_IN_F32`). A validation tool must then allow naga's
    /// `SHADER_FLOAT16_IN_FLOAT32`. No effect on other element types or kernels.
    pub f16_unpack: bool,
    /// 16-bit input whose rows all start at multiples of 8 elements, bound as
    /// octs (grads_octs.wgsl): the ADJACENT walks read two quads per
    /// `vec4<u32>` load instead of one per `vec2<u32>` load. What the GPU
    /// backend runs with small workgroups (a software adapter, which pays per
    /// load instruction) for such rows. Not with `slots`, nor for f32 input.
    pub octs: bool,
}

/// The full WGSL source of a kernel reading f32 gradients: the shared prelude(s)
/// then its body.
pub fn kernel_source(name: &str) -> Option<String> {
    kernel_source_for(name, Dtype::F32)
}

/// The full WGSL source of a kernel for input gradients of `dtype` (the same for
/// every type when the kernel does not read them).
pub fn kernel_source_for(name: &str, dtype: Dtype) -> Option<String> {
    kernel_source_variant(name, dtype, KernelVariant::default())
}

/// The variant of an input-reading kernel (`mb_partials`, `weighted_means`) that
/// reads the rows of up to 8 buffer ranges in one dispatch, each table entry
/// naming its slot (grads_slots.wgsl): what the GPU backend runs for tensors in
/// separate buffers. `None` for the other kernels.
pub fn kernel_source_with_slots(name: &str, dtype: Dtype) -> Option<String> {
    let slots = KernelVariant {
        slots: true,
        ..Default::default()
    };
    kernel_source_variant(name, dtype, slots)
}

/// The full WGSL source of kernel `name` for input gradients of `dtype` in
/// `variant`; `None` for an unknown name, for the slots or octs variant of a
/// kernel that does not read the input, and for octs with slots or f32 input.
pub fn kernel_source_variant(name: &str, dtype: Dtype, variant: KernelVariant) -> Option<String> {
    let (_, prelude, body) = KERNELS.iter().find(|(n, _, _)| *n == name)?;
    if (variant.slots || variant.octs) && *prelude == Prelude::None {
        return None;
    }
    if variant.octs && (variant.slots || dtype == Dtype::F32) {
        return None;
    }
    let loader = match prelude {
        Prelude::None => String::new(),
        _ => grads_loader(dtype, variant),
    };
    let (shifted, table, mean) = match prelude {
        Prelude::None => ("", "", ""),
        Prelude::Grads => (GRADS_SHIFTED, TENSOR_TABLE, ""),
        Prelude::GradsAndMean => (GRADS_SHIFTED, TENSOR_TABLE, COLUMN_MEAN),
    };
    let words = match prelude {
        Prelude::None => String::new(),
        _ if variant.octs => GRADS_OCTS.to_string(),
        _ => {
            let quads = if variant.slots {
                GRADS_SLOTS
            } else {
                GRADS_ONE_BINDING
            };
            let words8 = if dtype == Dtype::F32 {
                ""
            } else {
                WORDS8_FROM_QUADS
            };
            format!("{quads}\n{words8}")
        }
    };
    let common = if cfg!(feature = "emulate-ftz-division") {
        COMMON.replacen(FDIV_EXACT, FDIV_FLUSHING, 1)
    } else {
        COMMON.to_string()
    };
    Some(format!(
        "{common}\n{loader}\n{words}\n{shifted}\n{table}\n{mean}\n{body}"
    ))
}

/// The body of common.wgsl's `fdiv`, the kernels' only float division.
const FDIV_EXACT: &str = "    return a / b;\n";

/// `fdiv`'s body with feature `emulate-ftz-division`: division as NVIDIA's Vulkan
/// driver does it (PTX `div.approx.f32`: a times an approximate reciprocal of b,
/// subnormal operands and results flushed to zero, so the reciprocal of
/// |b| >= 2^126 is 0). Lets the tests catch, on any adapter, kernels that divide
/// by such numbers without `div_wide`.
const FDIV_FLUSHING: &str = "    let a_ftz = select(a, a * 0.0, abs(a) < 0x1p-126f);
    let b_ftz = select(b, b * 0.0, abs(b) < 0x1p-126f);
    let r = 1.0 / b_ftz;
    let q = a_ftz * select(r, r * 0.0, abs(r) < 0x1p-126f);
    return select(q, q * 0.0, abs(q) < 0x1p-126f);
";

/// The pipeline-overridable constants kernel `name` is built with: the workgroup
/// size `WG` of the two reduction kernels (`mb_partials`, `mb_norms`) when
/// `small_workgroups` (one SIMD group of 8 lanes: what a software adapter runs
/// best, see `default_small_workgroups` in the GPU module), and the
/// `ADJACENT` lane mapping of the two input readers (in the norm pass each lane
/// reads 4 adjacent quads, so rows that are not 16-byte aligned take 5 aligned
/// loads per 4 quads; in `weighted_means` 8); else none (the shaders' defaults:
/// 64 and 256 threads, each load of a run of lanes on adjacent quads).
pub fn kernel_constants(name: &str, small_workgroups: bool) -> &'static [(&'static str, f64)] {
    match name {
        "mb_partials" if small_workgroups => &PARTIALS_SMALL,
        "weighted_means" if small_workgroups => &[("ADJACENT", 1.0)],
        "mb_norms" if small_workgroups => &[("WG", SMALL_WORKGROUP)],
        _ => &[],
    }
}

/// The constants of the variant built for calls with deep micro-batches (more
/// than [`CHUNK_ROWS`] rows whose means are stored): with `small_workgroups` the
/// norm pass also walks such micro-batches [`CHUNK_ROWS`] rows at a time
/// (`CHUNK_ROWS` in mb_partials.wgsl); otherwise [`kernel_constants`]. A
/// separate variant because on lavapipe the chunked walk's code made the norm
/// pass over many shallow micro-batches about 9% slower.
pub fn deep_kernel_constants(name: &str, small_workgroups: bool) -> &'static [(&'static str, f64)] {
    match name {
        "mb_partials" if small_workgroups => &PARTIALS_SMALL_DEEP,
        _ => kernel_constants(name, small_workgroups),
    }
}

/// Which build of the norm pass (`mb_partials`) a dispatch runs. Each field
/// that is set compiles away code the dispatch must not need (see
/// [`partials_constants`]): a dispatch that breaks one of them gets wrong
/// results. [`Default`] is the general build, which handles every dispatch
/// (the GPU backend always knows `stores_means`, so it never runs that one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartialsVariant {
    /// Some micro-batch has more than [`CHUNK_ROWS`] rows whose means are stored
    /// ([`deep_kernel_constants`]).
    pub deep: bool,
    /// Every tensor window of the dispatch has rows read as whole quads: D_p and
    /// the element index of its first row in the binding are multiples of 4
    /// (`vec4_path` 1; 16-byte aligned rows for f32, 8-byte for f16 / bf16).
    pub aligned: bool,
    /// No tensor window of the dispatch carries sums to or from another window.
    pub no_carry: bool,
    /// Whether the call stores the micro-batch means (`Some`, every entry alike)
    /// or each entry says (`None`).
    pub stores_means: Option<bool>,
}

impl PartialsVariant {
    /// Where [`GradKernels`] keeps it.
    fn index(self) -> usize {
        let means = match self.stores_means {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.deep as usize + 2 * self.aligned as usize + 4 * self.no_carry as usize + 8 * means
    }
}

/// The constants of the norm pass (`mb_partials`) in `variant`: those of
/// [`kernel_constants`] ([`deep_kernel_constants`] if `deep`), with `aligned`
/// also `ALIGNED_ROWS` (every walk, Blue's too, loads vec4: the shifted and
/// scalar walks compile away), with `no_carry` also `CARRIES = false` (the carry
/// code compiles away), with `stores_means` also `WRITE_MEANS` 0 or 1 (the walks
/// of the other case compile away). On lavapipe a workgroup's start costs more the more code
/// its shader has, even code it never reaches (BENCHMARKS.md), so the GPU backend
/// builds each variant a call's dispatches need on first use.
pub fn partials_constants(
    small_workgroups: bool,
    variant: PartialsVariant,
) -> Vec<(&'static str, f64)> {
    let mut constants = if variant.deep {
        deep_kernel_constants("mb_partials", small_workgroups).to_vec()
    } else {
        kernel_constants("mb_partials", small_workgroups).to_vec()
    };
    if variant.aligned {
        constants.push(("ALIGNED_ROWS", 1.0));
    }
    if variant.no_carry {
        constants.push(("CARRIES", 0.0));
    }
    if let Some(stores) = variant.stores_means {
        constants.push(("WRITE_MEANS", stores as u32 as f64));
    }
    constants
}

/// The constants of pass 4 (`weighted_means`): those of [`kernel_constants`], of
/// [`row_chunks_kernel_constants`] if `row_chunks`, with `aligned` (every
/// entry of the dispatch reads its rows as whole quads, `vec4_path` 1: the
/// stored means, the partial rows of row chunks, input rows whose D_p and first
/// element are multiples of 4) also `ALIGNED_ROWS`, which compiles the shifted
/// and scalar loads away (see [`partials_constants`]), and with `row_runs` (the
/// dispatch reads input rows with per-row weights) `ROW_RUNS`: each
/// micro-batch's rows summed before its factor scales them.
pub fn weighted_means_constants(
    small_workgroups: bool,
    row_chunks: bool,
    aligned: bool,
    row_runs: bool,
) -> Vec<(&'static str, f64)> {
    let mut constants = if row_chunks {
        row_chunks_kernel_constants("weighted_means", small_workgroups).to_vec()
    } else {
        kernel_constants("weighted_means", small_workgroups).to_vec()
    };
    if aligned {
        constants.push(("ALIGNED_ROWS", 1.0));
    }
    if row_runs {
        constants.push(("ROW_RUNS", 1.0));
    }
    constants
}

/// The constants of the pass-4 variant that sums row chunks of the input into
/// partial rows (`ROW_CHUNKS` in weighted_means.wgsl; what the GPU backend runs
/// when it cuts that pass's rows into chunks, by default on a software adapter);
/// [`kernel_constants`] for the other kernels.
pub fn row_chunks_kernel_constants(
    name: &str,
    small_workgroups: bool,
) -> &'static [(&'static str, f64)] {
    match name {
        "weighted_means" if small_workgroups => &[("ADJACENT", 1.0), ("ROW_CHUNKS", 1.0)],
        "weighted_means" => &[("ROW_CHUNKS", 1.0)],
        _ => kernel_constants(name, small_workgroups),
    }
}

/// The norm pass's constants on a software adapter ([`kernel_constants`]).
const PARTIALS_SMALL: [(&str, f64); 2] = [("WG", SMALL_WORKGROUP), ("ADJACENT", 1.0)];

/// [`PARTIALS_SMALL`] with the chunked walk over deep micro-batches
/// ([`deep_kernel_constants`]).
const PARTIALS_SMALL_DEEP: [(&str, f64); 3] = [
    PARTIALS_SMALL[0],
    PARTIALS_SMALL[1],
    ("CHUNK_ROWS", CHUNK_ROWS as f64),
];

/// Rows per chunk of the norm pass's walk over a deep micro-batch on a software
/// adapter ([`deep_kernel_constants`]).
pub const CHUNK_ROWS: u64 = 32;

/// Threads per workgroup of the reduction kernels on a software adapter: one SIMD
/// group of llvmpipe (8 f32 lanes of AVX2), so no workgroup runs as coroutines.
const SMALL_WORKGROUP: f64 = 8.0;

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
    pub vec4_path: u32,
    pub write_means: u32,
    pub means_base: u32,
    pub tile_cols: u32,
    pub means_stride: u32,
    pub first_tile: u32,
    pub entries: u32,
    pub dispatch_tiles: u32,
    pub slot: u32,
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
    /// `scale` as `scale_fract * 2^scale_exp`, `scale_fract` in [0.5, 1): split
    /// on the host, which is exact for a subnormal scale too (a GPU may flush
    /// one before its `frexp`; lavapipe's gave bounds off by 60x and more).
    pub scale_fract: f32,
    pub scale_exp: i32,
    pub pad0: u32,
    pub pad1: u32,
}

/// `Params` of row_weights.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct RowWeightsParams {
    pub rows: u32,
    pub micro_batches: u32,
    pub groups: u32,
    pub groups_x: u32,
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
/// `NoiseParams::mode`: write each element's standard normal as f32 bits (tests).
pub(crate) const NOISE_MODE_NORMALS: u32 = 2;
/// `Params` of weighted_means.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct MeansSumParams {
    pub cols: u32,
    pub means_base: u32,
    pub rows: u32,
    pub groups_x: u32,
    pub out_offset: u32,
    pub skip_zero: u32,
    pub vec4_path: u32,
    pub groups: u32,
    pub group: u32,
    pub stride: u32,
    pub weights_base: u32,
    pub accumulate: u32,
    pub first_group: u32,
    pub entries: u32,
    pub dispatch_groups: u32,
    pub slot: u32,
}

/// Size in bytes of the `Partial` record of common.wgsl.
pub(crate) const PARTIAL_BYTES: u64 = 16;
/// Size in bytes of the `MbNorm` record of common.wgsl.
pub(crate) const MB_NORM_BYTES: u64 = 16;
/// Size in bytes of the `Stats` record of clip_factors.wgsl.
pub(crate) const STATS_BYTES: u64 = 32;

/// The two kernels that read the input gradients, compiled for one element type,
/// over one buffer range per dispatch or (the slots variants, grads_slots.wgsl)
/// over up to [`SLOTS`].
pub(crate) struct GradKernels {
    /// `mb_partials` by [`PartialsVariant::index`], each built when a dispatch
    /// first needs it (a deep one only where its constants differ from the
    /// shallow one's).
    partials: [Option<wgpu::ComputePipeline>; 24],
    /// `weighted_means` by [`pass4_index`] ([`weighted_means_constants`]): over
    /// any rows and over aligned rows (built up front; aligned rows only in the
    /// octs variant), and the same over row chunks and with row runs (built on
    /// first use).
    weighted_means: [Option<wgpu::ComputePipeline>; 8],
    /// What every build of this set shares: element type, source variant, small
    /// workgroups.
    dtype: Dtype,
    variant: KernelVariant,
    small_workgroups: bool,
}

/// Where [`GradKernels`] keeps pass 4 over row chunks or not, aligned rows or
/// not, with row runs or not.
fn pass4_index(row_chunks: bool, aligned: bool, row_runs: bool) -> usize {
    row_chunks as usize + 2 * aligned as usize + 4 * row_runs as usize
}

impl GradKernels {
    fn build(
        device: &wgpu::Device,
        dtype: Dtype,
        small_workgroups: bool,
        variant: KernelVariant,
    ) -> Self {
        let mut kernels = Self {
            partials: Default::default(),
            weighted_means: Default::default(),
            dtype,
            variant,
            small_workgroups,
        };
        kernels.build_pass4(device, false, false);
        kernels
    }

    /// Where the norm pass's build for `variant` is kept: a deep variant whose
    /// constants are those of the shallow one (hardware) is that one.
    fn partials_slot(&self, variant: PartialsVariant) -> usize {
        let deep_differs = deep_kernel_constants("mb_partials", self.small_workgroups)
            != kernel_constants("mb_partials", self.small_workgroups);
        PartialsVariant {
            deep: variant.deep && deep_differs,
            ..variant
        }
        .index()
    }

    /// Builds the norm pass in `variant` unless it exists.
    fn build_partials(&mut self, device: &wgpu::Device, variant: PartialsVariant) {
        let slot = self.partials_slot(variant);
        let (dtype, source, small) = (self.dtype, self.variant, self.small_workgroups);
        self.partials[slot].get_or_insert_with(|| {
            let constants = partials_constants(small, variant);
            build(device, "mb_partials", dtype, &constants, source)
        });
    }

    /// Builds pass 4 over row chunks or not (`chunks`), with row runs or not
    /// (`runs`), over any rows and over aligned ones (only those in the octs
    /// variant: `Pass4::push` takes it only where every row is), unless they
    /// exist.
    fn build_pass4(&mut self, device: &wgpu::Device, chunks: bool, runs: bool) {
        let (dtype, source, small) = (self.dtype, self.variant, self.small_workgroups);
        let alignments: &[bool] = if source.octs { &[true] } else { &[false, true] };
        for &aligned in alignments {
            self.weighted_means[pass4_index(chunks, aligned, runs)].get_or_insert_with(|| {
                let constants = weighted_means_constants(small, chunks, aligned, runs);
                build(device, "weighted_means", dtype, &constants, source)
            });
        }
    }

    /// The norm pass in `variant` (after [`Kernels::prepare`] with it).
    pub fn partials(&self, variant: PartialsVariant) -> &wgpu::ComputePipeline {
        self.partials[self.partials_slot(variant)]
            .as_ref()
            .expect("norm-pass variant prepared before encoding")
    }

    /// Pass 4: the variant that sums row chunks into partial rows if `chunks`
    /// (after [`Kernels::prepare`] with `chunks`), for `aligned` rows only if
    /// they all are, with row runs if `runs` (after [`Kernels::prepare`] with
    /// `runs`).
    pub fn weighted_means(
        &self,
        chunks: bool,
        aligned: bool,
        runs: bool,
    ) -> &wgpu::ComputePipeline {
        self.weighted_means[pass4_index(chunks, aligned, runs)]
            .as_ref()
            .expect("pass-4 variant prepared before encoding")
    }
}

/// The optional pipelines a call needs ([`Kernels::prepare`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Needs {
    /// The slots variants of the input readers (the device must allow them:
    /// [`slots_supported`]).
    pub slots: bool,
    /// A build of the norm pass (a deep one where its constants differ from the
    /// shallow one's, else that one).
    pub partials: Option<PartialsVariant>,
    /// Pass 4's variant over row chunks.
    pub chunks: bool,
    /// Pass 4's variants with row runs (input rows with per-row weights), over
    /// row chunks too if `chunks`.
    pub runs: bool,
    /// The octs variants ([`KernelVariant::octs`]; 16-bit input, not with
    /// `slots`) instead of the one-binding ones.
    pub octs: bool,
}

/// The input readers of one element type: over one buffer range, and the slots
/// and octs variants (built on first use).
struct TypeReaders {
    one: GradKernels,
    slots: Option<GradKernels>,
    octs: Option<GradKernels>,
    /// Built with [`KernelVariant::f16_unpack`] (both sets).
    f16_unpack: bool,
}

/// The compute pipelines: those that do not read gradients, and the gradient
/// readers per element type (f32 built up front, f16 / bf16 on first use).
pub(crate) struct Kernels {
    pub norms: wgpu::ComputePipeline,
    pub factors: wgpu::ComputePipeline,
    pub row_weights: wgpu::ComputePipeline,
    pub add_noise: wgpu::ComputePipeline,
    readers: [Option<TypeReaders>; 3],
    /// Built with [`kernel_constants`]' small workgroups.
    small_workgroups: bool,
    /// Whether the device compiles `unpack2x16float` ([`f16_unpack_compiles`]).
    f16_unpack_compiles: bool,
    /// [`KernelVariant::f16_unpack`] as set (`None`: with small workgroups).
    f16_unpack_choice: Option<bool>,
}

/// Whether `device` can bind the slots variants ([`SLOTS_STORAGE_BUFFERS`]
/// storage buffers in one shader stage; wgpu's default limit is 8, adapters
/// usually allow more, and `GpuClipper::new_default` asks for all of them).
pub(crate) fn slots_supported(device: &wgpu::Device) -> bool {
    device.limits().max_storage_buffers_per_shader_stage >= SLOTS_STORAGE_BUFFERS
}

/// Whether `device` compiles WGSL's `unpack2x16float`: wgpu's
/// `SHADER_F16_IN_F32` downlevel flag, which a device does not expose (on
/// llvmpipe it follows the adapter's `SHADER_F16` feature), so a one-line module
/// is compiled in an error scope.
fn f16_unpack_compiles(device: &wgpu::Device) -> bool {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let _probe = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("unpack2x16float probe"),
        source: wgpu::ShaderSource::Wgsl(F16_PAIR_UNPACK.into()),
    });
    pollster::block_on(scope.pop()).is_none()
}

/// Builds kernel `name` for `dtype` in `variant` with pipeline `constants`.
fn build(
    device: &wgpu::Device,
    name: &str,
    dtype: Dtype,
    constants: &[(&str, f64)],
    variant: KernelVariant,
) -> wgpu::ComputePipeline {
    let source = kernel_source_variant(name, dtype, variant).expect("known kernel");
    let label = format!(
        "{name} ({dtype}{}{}{})",
        if variant.slots { ", slots" } else { "" },
        if variant.octs { ", octs" } else { "" },
        if variant.f16_unpack && dtype == Dtype::F16 {
            ", unpack2x16float"
        } else {
            ""
        }
    );
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            ..Default::default()
        },
        cache: None,
    })
}

impl Kernels {
    /// `small_workgroups`: see [`kernel_constants`].
    /// f16 is decoded by `unpack2x16float` with small workgroups (a software
    /// adapter) where the device compiles it.
    pub fn new(device: &wgpu::Device, small_workgroups: bool) -> Self {
        Self::build_all(device, small_workgroups, f16_unpack_compiles(device), None)
    }

    /// The kernels with the device's [`f16_unpack_compiles`] known and the f16
    /// decode chosen (`None`: with small workgroups).
    fn build_all(
        device: &wgpu::Device,
        small_workgroups: bool,
        f16_unpack_compiles: bool,
        f16_unpack_choice: Option<bool>,
    ) -> Self {
        let f32_kernel = |name: &str| {
            build(
                device,
                name,
                Dtype::F32,
                kernel_constants(name, small_workgroups),
                KernelVariant::default(),
            )
        };
        let mut kernels = Self {
            norms: f32_kernel("mb_norms"),
            factors: f32_kernel("clip_factors"),
            row_weights: f32_kernel("row_weights"),
            add_noise: f32_kernel("add_noise"),
            readers: [None, None, None],
            small_workgroups,
            f16_unpack_compiles,
            f16_unpack_choice,
        };
        kernels.prepare(device, Dtype::F32, Needs::default());
        kernels
    }

    pub fn small_workgroups(&self) -> bool {
        self.small_workgroups
    }

    /// Whether the f16 readers decode with `unpack2x16float`.
    pub fn f16_unpack(&self) -> bool {
        self.f16_unpack_compiles && self.f16_unpack_choice.unwrap_or(self.small_workgroups)
    }

    /// Whether the f16 readers built so far decode with `unpack2x16float`
    /// (`None` before the first f16 call).
    pub fn f16_unpack_built(&self) -> Option<bool> {
        self.readers[Dtype::F16.index()]
            .as_ref()
            .map(|r| r.f16_unpack)
    }

    /// The element types whose readers exist, and whether their slots variants do.
    fn prepared(&self) -> Vec<(Dtype, bool)> {
        Dtype::ALL
            .into_iter()
            .filter_map(|d| Some((d, self.readers[d.index()].as_ref()?.slots.is_some())))
            .collect()
    }

    /// These pipelines built again with or without small workgroups (the gradient
    /// readers of every element type prepared so far); the caller swaps them in
    /// once they built without error.
    pub fn rebuilt(&self, device: &wgpu::Device, small: bool) -> Self {
        let mut kernels = Self::build_all(
            device,
            small,
            self.f16_unpack_compiles,
            self.f16_unpack_choice,
        );
        for (dtype, slots) in self.prepared() {
            let needs = Needs {
                slots,
                ..Needs::default()
            };
            kernels.prepare(device, dtype, needs);
        }
        kernels
    }

    /// Sets whether f16 is decoded by `unpack2x16float` where the device compiles
    /// it (`None`: with small workgroups); rebuilds the f16 readers if that
    /// changes which decode they run.
    pub fn set_f16_unpack(&mut self, device: &wgpu::Device, choice: Option<bool>) {
        let before = self.f16_unpack();
        self.f16_unpack_choice = choice;
        if self.f16_unpack() == before {
            return;
        }
        if let Some(built) = self.readers[Dtype::F16.index()].take() {
            let needs = Needs {
                slots: built.slots.is_some(),
                ..Needs::default()
            };
            self.prepare(device, Dtype::F16, needs);
        }
    }

    /// Builds the gradient readers of `dtype` unless they exist, their slots
    /// variants if `needs.slots`, and the variants `needs` names of the readers
    /// `needs.slots` names (see [`Needs`]).
    pub fn prepare(&mut self, device: &wgpu::Device, dtype: Dtype, needs: Needs) {
        let Needs {
            slots,
            partials,
            chunks,
            runs,
            octs,
        } = needs;
        let small = self.small_workgroups;
        let one = KernelVariant {
            slots: false,
            f16_unpack: self.f16_unpack(),
            octs: false,
        };
        let readers = self.readers[dtype.index()].get_or_insert_with(|| TypeReaders {
            one: GradKernels::build(device, dtype, small, one),
            slots: None,
            octs: None,
            f16_unpack: one.f16_unpack,
        });
        let kernels = if slots {
            let variant = KernelVariant { slots, ..one };
            readers
                .slots
                .get_or_insert_with(|| GradKernels::build(device, dtype, small, variant))
        } else if octs && dtype != Dtype::F32 {
            let variant = KernelVariant { octs, ..one };
            readers
                .octs
                .get_or_insert_with(|| GradKernels::build(device, dtype, small, variant))
        } else {
            &mut readers.one
        };
        if let Some(partials) = partials {
            kernels.build_partials(device, partials);
        }
        if chunks {
            kernels.build_pass4(device, true, false);
        }
        if runs {
            kernels.build_pass4(device, false, true);
            if chunks {
                kernels.build_pass4(device, true, true);
            }
        }
    }

    /// Drops every gradient reader, to be built again on first use: after a call
    /// failed, a pipeline built in it may be invalid, and would fail every later
    /// call.
    pub fn forget_readers(&mut self) {
        self.readers = [None, None, None];
    }

    /// The gradient readers of `dtype`, the slots variants if `slots`, the
    /// octs variants if `octs` (after [`Self::prepare`] with the same `slots`
    /// and `octs`).
    pub fn readers(&self, dtype: Dtype, slots: bool, octs: bool) -> &GradKernels {
        let readers = self.readers[dtype.index()]
            .as_ref()
            .expect("readers prepared before encoding");
        if slots {
            readers
                .slots
                .as_ref()
                .expect("slot readers prepared before encoding")
        } else if octs && dtype != Dtype::F32 {
            readers
                .octs
                .as_ref()
                .expect("oct readers prepared before encoding")
        } else {
            &readers.one
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel's `Params` struct has the size of the Rust block the host
    /// writes for it (naga's layout of the WGSL, every element type and variant).
    #[test]
    fn parameter_blocks_match_the_shaders() {
        use std::mem::size_of;
        let blocks = [
            ("mb_partials", size_of::<PartialsParams>()),
            ("mb_norms", size_of::<NormsParams>()),
            ("clip_factors", size_of::<FactorsParams>()),
            ("row_weights", size_of::<RowWeightsParams>()),
            ("weighted_means", size_of::<MeansSumParams>()),
            ("add_noise", size_of::<NoiseParams>()),
        ];
        assert_eq!(blocks.len(), KERNELS.len());
        for (name, bytes) in blocks {
            for dtype in Dtype::ALL {
                let sources = [
                    kernel_source_for(name, dtype),
                    kernel_source_with_slots(name, dtype),
                ];
                for source in sources.into_iter().flatten() {
                    let module = naga::front::wgsl::parse_str(&source).expect("parses");
                    let params = module
                        .types
                        .iter()
                        .find(|(_, t)| t.name.as_deref() == Some("Params"))
                        .map(|(_, t)| t.inner.size(module.to_ctx()))
                        .expect("a Params struct");
                    assert_eq!(params as usize, bytes, "{name} ({dtype})");
                }
            }
        }
    }

    /// Chunks of a deep micro-batch end where the shaders' row blocks end, so a
    /// chunked walk sums the same blocks in the same order (mb_partials.wgsl).
    #[test]
    fn chunks_are_whole_row_blocks() {
        let source = kernel_source("mb_partials").expect("known kernel");
        let row_block: u64 = source
            .lines()
            .find_map(|l| l.strip_prefix("const ROW_BLOCK: u32 = "))
            .and_then(|v| v.trim_end_matches(['u', ';']).parse().ok())
            .expect("ROW_BLOCK in the prelude");
        assert_eq!(CHUNK_ROWS % row_block, 0);
    }

    #[test]
    fn the_emulated_division_replaces_fdiv() {
        assert_eq!(COMMON.matches(FDIV_EXACT).count(), 1);
        let source = kernel_source("clip_factors").unwrap();
        let emulated = cfg!(feature = "emulate-ftz-division");
        assert_eq!(source.contains(FDIV_FLUSHING), emulated);
        assert_eq!(source.contains(FDIV_EXACT), !emulated);
    }
}
