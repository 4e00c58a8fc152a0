//! Micro-batch clipping for [burn](https://burn.dev) models, on burn's own wgpu
//! device and in burn's own buffers (feature `burn`).
//!
//! burn 0.22 runs its wgpu backend on wgpu 30 through `cubecl-wgpu` 0.11, the same
//! wgpu as microclip, so one `wgpu::Device` and `wgpu::Queue` serve both. A
//! [`BurnClipper`] holds a [`Clipper`] built on that device; it takes burn gradient
//! tensors, looks up the `wgpu::Buffer` and byte offset behind each one through
//! CubeCL's resource handles (`client.get_resource`), and runs microclip's kernels
//! on them directly. The clipped average is written into fresh burn tensors on the
//! same device and handed back as [`GradientsParams`] for any burn optimizer.
//!
//! # One device for both
//!
//! Either direction works:
//!
//! * **burn's device handed to microclip**: [`BurnClipper::init`] asks burn for its
//!   default wgpu device with `Device::wgpu_options().init_with_setup()`, which also
//!   returns the exact `WgpuSetup` (instance, adapter, device, queue) burn uses, and
//!   builds the clipper on that device and queue. [`BurnClipper::from_setup`] does
//!   the same for a setup and device the application already has.
//! * **microclip's device handed to burn**: [`shared_setup`] creates the instance,
//!   adapter, device and queue (with the features and limits burn's runtime would
//!   request), and [`BurnClipper::register`] registers that setup with burn through
//!   `Device::wgpu_options().setup(setup).init()` (CubeCL's `init_device` path) and
//!   builds the clipper on the same handles.
//!
//! ```no_run
//! use microclip::burn::BurnClipper;
//! # fn main() -> Result<(), microclip::burn::BurnClipError> {
//! // burn -> microclip
//! let (clipper, device) = BurnClipper::init()?;
//! // or microclip -> burn
//! let setup = microclip::burn::shared_setup()?;
//! let (clipper2, device2) = BurnClipper::register(setup)?;
//! # Ok(()) }
//! ```
//!
//! # Per-micro-batch gradients in burn
//!
//! burn's autodiff gives one gradient per parameter per backward pass, so the
//! micro-batch gradients `g_j` come from one backward per micro-batch, as in
//! TensorFlow Privacy's micro-batching: for each micro-batch `j`, compute the mean
//! loss over its samples, call `backward()`, and [`MicroBatchGrads::push`] the
//! resulting `Gradients`. `push` flattens each parameter's gradient into one row;
//! [`BurnClipper::clip_module`] stacks the rows of each parameter into a
//! `[M, D_p]` tensor (`Tensor::cat`, on the device) and clips with `N = M` rows.
//! Use `MicroBatches::Uniform(1)` then (each row is already a micro-batch mean); to
//! clip per-sample gradients instead, push one backward per sample and give the
//! micro-batch size. For DP accounting the micro-batch size is still the
//! examples behind each row, not 1
//! ([`accountant::micro_batch_sensitivity`](crate::accountant::micro_batch_sensitivity)).
//!
//! A parameter is one tensor however often the module visits it: tied weights
//! (one [`Param`] in several fields, one [`ParamId`]) get one row per push, the
//! gradient burn's autodiff sums over all their uses. A parameter the loss of a
//! micro-batch does not reach gets a zero row (it adds nothing to that
//! micro-batch's norm or to the sum); one that no pushed loss reaches is left out
//! of the returned [`GradientsParams`], as burn's own `GradientsParams::from_grads`
//! leaves it out, so optimizers leave it alone (no weight decay or momentum step).
//!
//! Memory: the pushed rows hold `M x P x 4` bytes of device memory (`P` = the
//! model's trainable parameter count); while a parameter's rows are stacked, its
//! rows and the stacked copy coexist, so stacking peaks at `M x P x 4 + M x D_max
//! x 4` bytes (`D_max` = the largest parameter). Clipping then holds the stacked
//! `M x P x 4` bytes, the clipped output twice (`2 x P x 4` bytes: burn's output
//! tensors, from CubeCL's pool, and the fresh `wgpu::Buffer`s, one per tensor,
//! that [`Clipper::clip_buffers`] creates on every call, outside CubeCL's pool and
//! not counted in [`Clipper::scratch_bytes`], dropped once they are copied into
//! burn's tensors) and microclip's scratch ([`Clipper::scratch_bytes`]). Compute
//! is M backward passes instead of one batched backward.
//!
//! # No host round trip
//!
//! The gradient rows, the stacked `[M, D_p]` tensors and the clipped output never
//! leave the device: the adapter never reads a tensor (no `into_data`, `to_data`
//! or `read` call), it passes the `wgpu::Buffer` handles CubeCL owns straight to
//! [`Clipper::clip_buffers`], copies the clipped average into burn tensors with a
//! device-side `copy_buffer_to_buffer` (CubeCL packs tensors into shared page
//! buffers, and one dispatch cannot bind a buffer both read-only and read-write),
//! and the only bytes read back are microclip's statistics (`O(M)`). Before microclip records its work, the adapter flushes
//! burn's pending commands on the shared queue (`client.flush()`), so the wgpu
//! queue orders burn's backward, microclip's kernels and burn's next operations.
//!
//! # Requirements
//!
//! * burn's `fusion` feature must be off (it is off unless the application turns
//!   it on): the adapter needs the plain CubeCL tensor primitive, not a fusion
//!   handle. `autotune` may be on or off.
//! * Gradients must be `f32`, on the clipper's device, and produced on the calling
//!   thread (burn's command stream is per thread; the adapter flushes the caller's).
//!   [`BurnClipper::clip_rows`] takes contiguous row-major tensors only, not
//!   strided views or CubeCL's storage-tiled matmul operands.

use ::burn::module::{Module, ModuleVisitor, Param, ParamId};
use ::burn::optim::GradientsParams;
use ::burn::tensor::{DType, Device, Gradients, Shape, Tensor};
use burn_wgpu::{CubeBackend, CubeTensor, WgpuSetup};
use cubecl_wgpu::{AutoCompiler, WgpuServer};

use crate::{ClipConfig, ClipError, ClipStats, Clipper, GpuTensor};

pub use burn_wgpu::WgpuSetup as BurnWgpuSetup;

/// What can go wrong between burn and microclip.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BurnClipError {
    /// microclip rejected the call (shapes, configuration, GPU error).
    #[error(transparent)]
    Clip(#[from] ClipError),
    /// A tensor lives on another device than the clipper's.
    #[error("tensor {tensor} is on {found}, but the clipper runs on {expected}")]
    WrongDevice {
        /// Index of the offending tensor.
        tensor: usize,
        /// The clipper's burn device.
        expected: String,
        /// The tensor's burn device.
        found: String,
    },
    /// A tensor is not a plain CubeCL tensor (another backend, or burn's `fusion`
    /// feature is on).
    #[error("tensor {tensor} is not a CubeCL wgpu tensor: {reason}")]
    NotCube {
        /// Index of the offending tensor.
        tensor: usize,
        /// What burn said.
        reason: String,
    },
    /// A tensor's element type is not `f32`.
    #[error("tensor {tensor} has dtype {dtype}; microclip clips f32")]
    DType {
        /// Index of the offending tensor.
        tensor: usize,
        /// Its dtype, as burn prints it.
        dtype: String,
    },
    /// A tensor is not a contiguous row-major `[N, D_p]` matrix with the same `N`
    /// as the first one.
    #[error("tensor {tensor}: {reason}")]
    Layout {
        /// Index of the offending tensor.
        tensor: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No gradients were given (no tensors, or no micro-batch pushed).
    #[error("no gradients given")]
    Empty,
    /// [`MicroBatchGrads::push`] found no gradient for any trainable parameter of
    /// the module: nothing to clip (the `Gradients` of another model, or of a
    /// model without autodiff). Nothing was appended.
    #[error("the gradients hold none for the module's trainable parameters")]
    NoGradient,
    /// A trainable tensor of [`MicroBatchGrads`] has another number of rows than
    /// micro-batches were pushed (a push was given a module that does not visit
    /// it).
    #[error("tensor {tensor} has {rows} rows, but {pushed} micro-batches were pushed")]
    RowCount {
        /// Index of the tensor in [`MicroBatchGrads::param_ids`].
        tensor: usize,
        /// Its rows.
        rows: usize,
        /// Micro-batches pushed.
        pushed: usize,
    },
    /// A trainable tensor of [`MicroBatchGrads`] is not a parameter of the module
    /// given to [`BurnClipper::clip_module`] (a sub-module or another model), so
    /// its clipped gradient would have nowhere to go.
    #[error("tensor {tensor} is not a parameter of the module given to clip_module")]
    NotInModule {
        /// Index of the tensor in [`MicroBatchGrads::param_ids`].
        tensor: usize,
    },
    /// burn or CubeCL reported an error (device initialization, resource lookup,
    /// flush).
    #[error("burn runtime: {0}")]
    Runtime(String),
}

/// Result alias for this module.
pub type Result<T, E = BurnClipError> = std::result::Result<T, E>;

/// Creates a wgpu instance, adapter, device and queue for sharing: the default
/// high-performance adapter (`WGPU_BACKEND` is honoured), with the adapter's
/// features (less `MAPPABLE_PRIMARY_BUFFERS`) and limits, as burn's own runtime
/// requests them. Hand it to [`BurnClipper::register`].
pub fn shared_setup() -> Result<WgpuSetup> {
    pollster::block_on(shared_setup_async())
}

/// Async form of [`shared_setup`].
pub async fn shared_setup_async() -> Result<WgpuSetup> {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let instance = wgpu::Instance::new(desc);
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
        .map_err(|e| ClipError::NoAdapter(e.to_string()))?;
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("microclip+burn"),
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: adapter.limits(),
            ..Default::default()
        })
        .await
        .map_err(|e| ClipError::NoAdapter(e.to_string()))?;
    let backend = adapter.get_info().backend;
    Ok(WgpuSetup {
        instance,
        adapter,
        device,
        queue,
        backend,
    })
}

/// A [`Clipper`] on burn's wgpu device that clips burn gradient tensors in place
/// on the device.
pub struct BurnClipper {
    clipper: Clipper,
    device: Device,
}

impl std::fmt::Debug for BurnClipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnClipper")
            .field("device", &self.device)
            .field("backend", &self.clipper.backend())
            .finish()
    }
}

impl BurnClipper {
    /// burn's device handed to microclip: initializes burn's default wgpu runtime
    /// (`Device::wgpu_options().init_with_setup()`) and builds the clipper on the
    /// device and queue it returns. Returns the clipper and burn's device (without
    /// autodiff; call `.autodiff()` on it for training).
    ///
    /// Fails when burn's default wgpu runtime was already initialized (by an
    /// earlier call or a tensor operation); use [`Self::from_setup`] with the setup
    /// you got then.
    pub fn init() -> Result<(Self, Device)> {
        let (device, setup) = Device::wgpu_options()
            .init_with_setup()
            .map_err(|e| BurnClipError::Runtime(e.to_string()))?;
        let clipper = Self::from_setup(&device, &setup)?;
        Ok((clipper, device))
    }

    /// Builds the clipper on the handles of a setup burn already runs on
    /// (`device` is the burn device of that setup); fails as
    /// [`Clipper::from_device`] does.
    pub fn from_setup(device: &Device, setup: &WgpuSetup) -> Result<Self> {
        Ok(Self {
            clipper: Clipper::from_device(setup.device.clone(), setup.queue.clone())?,
            device: device.clone().without_autodiff(),
        })
    }

    /// microclip's device handed to burn: registers `setup` (for example from
    /// [`shared_setup`]) as a burn wgpu runtime (`Device::wgpu_options().setup(..)
    /// .init()`, CubeCL's `init_device`) and builds the clipper on the same device
    /// and queue. Returns the clipper and the new burn device.
    pub fn register(setup: WgpuSetup) -> Result<(Self, Device)> {
        let clipper = Clipper::from_device(setup.device.clone(), setup.queue.clone())?;
        let device = Device::wgpu_options()
            .setup(setup)
            .init()
            .map_err(|e| BurnClipError::Runtime(e.to_string()))?;
        Ok((
            Self {
                clipper,
                device: device.clone(),
            },
            device,
        ))
    }

    /// The burn device the clipper runs on (without autodiff).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying microclip clipper.
    pub fn clipper(&mut self) -> &mut Clipper {
        &mut self.clipper
    }

    /// Clips gradient matrices: tensor `p` is `[N, D_p]` (f32, contiguous
    /// row-major, not storage-tiled, on this clipper's device; autodiff tensors are
    /// unwrapped). Returns `out_p` as `[D_p]` f32 tensors on the device and the
    /// statistics. No gradient data is read to the host. The configuration is
    /// checked against `N` and the tensor count before any device work.
    ///
    /// Besides the outputs (from CubeCL's pool), each call creates fresh
    /// `wgpu::Buffer`s for microclip to write (`sum_p D_p x 4` bytes, one per
    /// tensor, [`Clipper::clip_buffers`]), outside CubeCL's pool and not counted
    /// in [`Clipper::scratch_bytes`]; they are dropped once copied into the
    /// outputs.
    pub fn clip_rows(
        &mut self,
        config: &ClipConfig,
        rows: Vec<Tensor<2>>,
    ) -> Result<(Vec<Tensor<1>>, ClipStats)> {
        let first = rows.first().ok_or(BurnClipError::Empty)?;
        let n_samples = first.dims()[0];
        check_config(config, n_samples, rows.len())?;
        let mut inputs: Vec<CubeTensor> = Vec::with_capacity(rows.len());
        let mut widths = Vec::with_capacity(rows.len());
        for (i, tensor) in rows.into_iter().enumerate() {
            let [n, cols] = tensor.dims();
            if n != n_samples {
                return Err(BurnClipError::Layout {
                    tensor: i,
                    reason: format!("{n} rows, but tensor 0 has {n_samples}"),
                });
            }
            inputs.push(self.primitive(i, tensor.without_autodiff())?);
            widths.push(cols);
        }
        for (i, t) in inputs.iter().enumerate() {
            // A storage-tiled tensor's strides order its tiles, not its rows:
            // `is_contiguous` says nothing about it.
            let reason = if t.meta.is_tiled() {
                "storage-tiled (a CubeCL matmul layout), not row-major"
            } else if !t.is_contiguous() {
                "not contiguous row-major"
            } else {
                continue;
            };
            return Err(BurnClipError::Layout {
                tensor: i,
                reason: reason.into(),
            });
        }
        let outputs = widths
            .iter()
            .enumerate()
            .map(|(i, &cols)| {
                self.primitive(i, Tensor::<1>::empty([cols], (&self.device, DType::F32)))
            })
            .collect::<Result<Vec<_>>>()?;

        let stats = {
            let resource = |t: &CubeTensor| {
                t.client
                    .get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone())
                    .map_err(|e| BurnClipError::Runtime(e.to_string()))
            };
            let in_res = inputs.iter().map(resource).collect::<Result<Vec<_>>>()?;
            let out_res = outputs.iter().map(resource).collect::<Result<Vec<_>>>()?;
            // burn's backward may still sit in CubeCL's encoder: submit it first so
            // the shared queue runs it before microclip's kernels.
            inputs[0]
                .client
                .flush()
                .map_err(|e| BurnClipError::Runtime(e.to_string()))?;
            let gpu_in: Vec<GpuTensor<'_>> = in_res
                .iter()
                .zip(&widths)
                .map(|(r, &cols)| GpuTensor::new(&r.resource().buffer, r.resource().offset, cols))
                .collect();
            // CubeCL sub-allocates tensors from shared page buffers, so an output
            // tensor may sit in the same `wgpu::Buffer` as an input, which one
            // dispatch cannot bind both read-only and read-write. microclip writes
            // into fresh buffers of its own (created per call, outside CubeCL's
            // pool); a device-side copy moves them into burn's.
            let (clipped, stats) = self.clipper.clip_buffers(config, &gpu_in, n_samples)?;
            let (device, queue) = match (self.clipper.device(), self.clipper.queue()) {
                (Some(d), Some(q)) => (d, q),
                _ => return Err(ClipError::NotGpu.into()),
            };
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("microclip->burn"),
            });
            for ((src, dst), &cols) in clipped.iter().zip(&out_res).zip(&widths) {
                let dst = dst.resource();
                encoder.copy_buffer_to_buffer(src, 0, &dst.buffer, dst.offset, (cols * 4) as u64);
            }
            queue.submit([encoder.finish()]);
            stats
        };
        drop(inputs);
        let outputs = outputs
            .into_iter()
            .map(Tensor::<1>::from_primitive::<CubeBackend>)
            .collect();
        Ok((outputs, stats))
    }

    /// Clips the micro-batch gradients collected in `grads` for `module` and
    /// returns the clipped average as [`GradientsParams`] (each parameter's
    /// gradient in its own shape) plus microclip's statistics.
    /// `config.micro_batches` applies to the pushed rows (`MicroBatches::Uniform(1)`
    /// when each push is one micro-batch); per-tensor settings
    /// ([`ClipConfig::with_groups`], [`ClipBound::PerGroup`](crate::ClipBound::PerGroup))
    /// index the tensors in [`MicroBatchGrads::param_ids`] order. A parameter no
    /// pushed loss reached gets no gradient in the result.
    ///
    /// Before any device work it checks the configuration against the pushed
    /// count and the tensor count, that every tensor has one row per push, and
    /// that `module` visits every tensor's parameter; such an error leaves `grads`
    /// as it was, to retry. Otherwise the rows are consumed, whatever the outcome:
    /// `grads` is left empty, ready for the next step's pushes.
    pub fn clip_module<M: Module>(
        &mut self,
        config: &ClipConfig,
        module: &M,
        grads: &mut MicroBatchGrads,
    ) -> Result<(GradientsParams, ClipStats)> {
        let pushed = grads.pushed;
        if pushed == 0 || grads.slots.is_empty() {
            return Err(BurnClipError::Empty);
        }
        check_config(config, pushed, grads.slots.len())?;
        if let Some((tensor, slot)) = grads
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.rows.len() != pushed)
        {
            return Err(BurnClipError::RowCount {
                tensor,
                rows: slot.rows.len(),
                pushed,
            });
        }
        let mut find = FindParams {
            ids: &grads.ids,
            seen: vec![false; grads.ids.len()],
        };
        module.visit(&mut find);
        if let Some(tensor) = find.seen.iter().position(|&seen| !seen) {
            return Err(BurnClipError::NotInModule { tensor });
        }

        grads.pushed = 0;
        let reached: Vec<bool> = grads
            .slots
            .iter_mut()
            .map(|slot| std::mem::take(&mut slot.reached))
            .collect();
        // One parameter at a time, so that only its rows and their stacked copy
        // coexist.
        let stacked: Vec<Tensor<2>> = grads
            .slots
            .iter_mut()
            .map(|slot| Tensor::cat(std::mem::take(&mut slot.rows), 0))
            .collect();
        let (outputs, stats) = self.clip_rows(config, stacked)?;
        let mut register = Register {
            ids: &grads.ids,
            outputs: outputs
                .into_iter()
                .zip(reached)
                .map(|(out, reached)| reached.then_some(out))
                .collect(),
            params: GradientsParams::new(),
        };
        module.visit(&mut register);
        Ok((register.params, stats))
    }

    fn primitive<const D: usize>(&self, index: usize, tensor: Tensor<D>) -> Result<CubeTensor> {
        let device = tensor.device();
        if device != self.device {
            return Err(BurnClipError::WrongDevice {
                tensor: index,
                expected: format!("{:?}", self.device),
                found: format!("{device:?}"),
            });
        }
        if tensor.dtype() != DType::F32 {
            return Err(BurnClipError::DType {
                tensor: index,
                dtype: format!("{:?}", tensor.dtype()),
            });
        }
        tensor
            .try_into_primitive::<CubeBackend>()
            .map_err(|e| BurnClipError::NotCube {
                tensor: index,
                reason: format!("{e:?}"),
            })
    }
}

/// Checks what does not depend on the data: the configuration, its row offsets
/// for `n_samples` rows and its parameter groups for `tensors` tensors.
fn check_config(config: &ClipConfig, n_samples: usize, tensors: usize) -> Result<()> {
    config.row_offsets(n_samples)?;
    config.tensor_groups(tensors)?;
    Ok(())
}

/// Per-micro-batch gradients of a burn module, one row per backward pass, kept on
/// the device.
///
/// ```ignore
/// let mut rows = MicroBatchGrads::new(&model);
/// for (x, y) in micro_batches {
///     let loss = loss_fn(model.forward(x), y); // mean over the micro-batch
///     rows.push(&model, loss.backward())?;
/// }
/// let (grads, stats) = clipper.clip_module(&config, &model, &mut rows)?;
/// model = optimizer.step(lr, model, grads);
/// ```
#[derive(Debug)]
pub struct MicroBatchGrads {
    /// The trainable parameters, once each, in visiting order.
    ids: Vec<ParamId>,
    /// One per entry of `ids`.
    slots: Vec<Slot>,
    pushed: usize,
}

#[derive(Debug)]
struct Slot {
    numel: usize,
    rows: Vec<Tensor<2>>,
    /// Whether a pushed loss reached the parameter (some row is a gradient).
    reached: bool,
}

impl MicroBatchGrads {
    /// Prepares rows for the trainable float parameters of `module`, in the order
    /// the module visits them; a parameter visited more than once (tied weights)
    /// is one tensor.
    pub fn new<M: Module>(module: &M) -> Self {
        let mut collect = CollectSlots {
            ids: Vec::new(),
            slots: Vec::new(),
        };
        module.visit(&mut collect);
        Self {
            ids: collect.ids,
            slots: collect.slots,
            pushed: 0,
        }
    }

    /// Appends one micro-batch gradient: each trainable parameter's gradient in
    /// `grads` is flattened into a `[1, D_p]` row (zeros, in the parameter's
    /// dtype, for a parameter the loss does not reach; one row for a parameter the
    /// module visits more than once). Nothing is read to the host.
    ///
    /// Fails with [`BurnClipError::NoGradient`], appending nothing, when `grads`
    /// holds a gradient for none of the parameters.
    pub fn push<M: Module>(&mut self, module: &M, grads: Gradients) -> Result<()> {
        let mut push = PushRows {
            ids: &self.ids,
            slots: &self.slots,
            grads,
            rows: (0..self.ids.len()).map(|_| None).collect(),
        };
        module.visit(&mut push);
        let rows = push.rows;
        if !rows.iter().flatten().any(|&(_, reached)| reached) {
            return Err(BurnClipError::NoGradient);
        }
        for (slot, row) in self.slots.iter_mut().zip(rows) {
            if let Some((row, reached)) = row {
                slot.rows.push(row);
                slot.reached |= reached;
            }
        }
        self.pushed += 1;
        Ok(())
    }

    /// How many rows (backward passes) were pushed.
    pub fn len(&self) -> usize {
        self.pushed
    }

    /// Whether no row was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// The trainable tensors, one [`ParamId`] each, in the order the module visits
    /// them (a tied parameter once, at its first visit); `param_ids().len()` is
    /// the number of tensors. This is the tensor order of
    /// [`BurnClipper::clip_module`]'s call to microclip: the one
    /// [`ClipConfig::with_groups`] and per-group settings index.
    pub fn param_ids(&self) -> &[ParamId] {
        &self.ids
    }

    /// The number of trainable parameters `P` (the row width summed over tensors).
    pub fn num_params(&self) -> usize {
        self.slots.iter().map(|s| s.numel).sum()
    }

    /// Device bytes held by the pushed rows (`rows x P x 4`).
    pub fn bytes(&self) -> u64 {
        (self.pushed * self.num_params() * 4) as u64
    }
}

struct CollectSlots {
    ids: Vec<ParamId>,
    slots: Vec<Slot>,
}

impl ModuleVisitor for CollectSlots {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.is_require_grad() && !self.ids.contains(&param.id) {
            self.ids.push(param.id);
            self.slots.push(Slot {
                numel: param.lazy_shape().num_elements(),
                rows: Vec::new(),
                reached: false,
            });
        }
    }
}

/// One push's rows, gathered before any is appended.
struct PushRows<'a> {
    ids: &'a [ParamId],
    slots: &'a [Slot],
    grads: Gradients,
    /// Per tensor: its row and whether it is a gradient (not zeros); `None`
    /// until the module visits the parameter.
    rows: Vec<Option<(Tensor<2>, bool)>>,
}

impl ModuleVisitor for PushRows<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(index) = self.ids.iter().position(|id| *id == param.id) else {
            return;
        };
        if self.rows[index].is_some() {
            // A tied parameter's next visit: its gradient is already in.
            return;
        }
        let numel = self.slots[index].numel;
        let value = param.val();
        let row = match value.grad_remove(&mut self.grads) {
            Some(grad) => (grad.reshape([1, numel]), true),
            None => {
                let device = value.device().without_autodiff();
                (Tensor::zeros([1, numel], (&device, value.dtype())), false)
            }
        };
        self.rows[index] = Some(row);
    }
}

/// Which of `ids` a module visits.
struct FindParams<'a> {
    ids: &'a [ParamId],
    seen: Vec<bool>,
}

impl ModuleVisitor for FindParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(index) = self.ids.iter().position(|id| *id == param.id) {
            self.seen[index] = true;
        }
    }
}

struct Register<'a> {
    ids: &'a [ParamId],
    /// The clipped output of each tensor; `None` for a parameter no loss reached
    /// (and, once registered, for the next visit of a tied one).
    outputs: Vec<Option<Tensor<1>>>,
    params: GradientsParams,
}

impl ModuleVisitor for Register<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(index) = self.ids.iter().position(|id| *id == param.id) else {
            return;
        };
        if let Some(flat) = self.outputs[index].take() {
            let shape: Shape = param.lazy_shape();
            self.params
                .register::<D>(param.id, flat.reshape(shape.dims::<D>()));
        }
    }
}
