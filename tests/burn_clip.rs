//! microclip inside burn (feature `burn`): the clipped gradient burn receives equals
//! the float64 reference on the same gradients, a huge clip norm gives plain
//! averaged SGD, tied weights are one tensor, a parameter no loss reaches gets no
//! gradient, tensors on another device, bad configurations and mismatched modules
//! are rejected with a typed error (keeping the rows when nothing was done), the
//! outputs are f32 whatever the device's default float type, and the adapter never
//! reads tensor data to the host.
#![cfg(feature = "burn")]

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{activation::relu, DType, Device, FloatDType, Tensor, TensorData};
use microclip::burn::{shared_setup, BurnClipError, BurnClipper, MicroBatchGrads};
use microclip::reference::clip_f64;
use microclip::{ClipBound, ClipConfig, ClipError, MicroBatches, REQUIRE_GPU_ENV};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A clipper sharing a fresh wgpu device with a new burn runtime (microclip's
/// device handed to burn), or `None` (skipped) without an adapter unless
/// `MICROCLIP_REQUIRE_GPU=1`.
fn shared() -> Option<(BurnClipper, Device)> {
    let setup = match shared_setup() {
        Ok(s) => s,
        Err(e) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but no GPU: {e}");
            }
            eprintln!("skipping burn test: {e}");
            return None;
        }
    };
    Some(BurnClipper::register(setup).expect("register the setup with burn"))
}

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(5, 7).init(device),
            l2: LinearConfig::new(7, 3).init(device),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.l2.forward(relu(self.l1.forward(x)))
    }
    /// The trainable parameters in visiting order.
    fn params(&self) -> Vec<ParamRef<'_>> {
        let mut out = Vec::new();
        for l in [&self.l1, &self.l2] {
            out.push(ParamRef::W(&l.weight));
            out.push(ParamRef::B(l.bias.as_ref().unwrap()));
        }
        out
    }
}

enum ParamRef<'a> {
    W(&'a Param<Tensor<2>>),
    B(&'a Param<Tensor<1>>),
}

impl ParamRef<'_> {
    fn grad_host(&self, grads: &burn::tensor::Gradients) -> Vec<f32> {
        match self {
            ParamRef::W(p) => p.val().grad(grads).unwrap().into_data(),
            ParamRef::B(p) => p.val().grad(grads).unwrap().into_data(),
        }
        .try_to_vec::<f32>()
        .unwrap()
    }
    fn in_params(&self, g: &GradientsParams) -> Vec<f32> {
        match self {
            ParamRef::W(p) => g.get::<2>(p.id).unwrap().into_data(),
            ParamRef::B(p) => g.get::<1>(p.id).unwrap().into_data(),
        }
        .try_to_vec::<f32>()
        .unwrap()
    }
    fn value(&self) -> Vec<f32> {
        match self {
            ParamRef::W(p) => p.val().into_data(),
            ParamRef::B(p) => p.val().into_data(),
        }
        .try_to_vec::<f32>()
        .unwrap()
    }
}

fn batch(seed: u64, n: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
    // Some samples with large targets so that some micro-batches get clipped.
    let y: Vec<f32> = (0..n * 3)
        .map(|i| rng.random_range(-1.0..1.0) * if (i / 3) % 5 == 0 { 20.0 } else { 1.0 })
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [n, 5]), device),
        Tensor::from_data(TensorData::new(y, [n, 3]), device),
    )
}

fn mse(pred: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
    (pred - y).powi_scalar(2).mean()
}

/// One backward per micro-batch; returns the rows (pushed) and the same gradients
/// read to the host (for the test only), per parameter as `[M, D_p]`.
fn micro_batch_grads(
    model: &Mlp,
    x: &Tensor<2>,
    y: &Tensor<2>,
    m: usize,
    b: usize,
) -> (MicroBatchGrads, Vec<Vec<f32>>) {
    let mut rows = MicroBatchGrads::new(model);
    let mut host = vec![Vec::new(); model.params().len()];
    for j in 0..m {
        let xj = x.clone().narrow(0, j * b, b);
        let yj = y.clone().narrow(0, j * b, b);
        let grads = mse(model.forward(xj), yj).backward();
        for (h, p) in host.iter_mut().zip(model.params()) {
            h.extend(p.grad_host(&grads));
        }
        rows.push(model, grads).unwrap();
    }
    (rows, host)
}

#[test]
fn clipped_gradient_matches_the_float64_reference() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let (m, b) = (6, 4);
    let (x, y) = batch(1, m * b, &ad);
    let (mut rows, host) = micro_batch_grads(&model, &x, &y, m, b);
    assert_eq!(rows.len(), m);
    assert_eq!(rows.num_params(), 5 * 7 + 7 + 7 * 3 + 3);

    for c in [0.05f32, 0.5, 5.0] {
        let cfg = ClipConfig::fixed(c, MicroBatches::Uniform(1));
        let (mut rows, _) = micro_batch_grads(&model, &x, &y, m, b);
        let (grads, stats) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
        assert!(rows.is_empty());
        let tensors: Vec<&[f32]> = host.iter().map(|v| v.as_slice()).collect();
        let want = clip_f64(&cfg, &tensors, m).unwrap();
        assert_eq!(stats.clipped_count, want.clipped_count, "C = {c}");
        for (nj, wj) in stats.norms.iter().zip(&want.norms) {
            assert!(
                ((*nj as f64) - wj).abs() <= 1e-5 * wj.max(1e-3),
                "{nj} vs {wj}"
            );
        }
        for (p, w) in model.params().iter().zip(&want.grads) {
            let got = p.in_params(&grads);
            assert_eq!(got.len(), w.len());
            // Relative L2 error per tensor, as in the core tests: an element of
            // the average can be much smaller than the terms that cancel in it
            // (the model's initialisation is random), so no per-element bound.
            let err: f64 = got
                .iter()
                .zip(w)
                .map(|(&g, w)| (g as f64 - w).powi(2))
                .sum();
            let norm: f64 = w.iter().map(|w| w * w).sum();
            assert!(
                err.sqrt() <= 3e-5 * norm.sqrt().max(1e-12),
                "C = {c}: relative L2 error {:e}",
                (err / norm).sqrt()
            );
        }
    }
    // The example's spread: some micro-batches clipped at 0.5, not all.
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(1));
    let (_, stats) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
    assert!(stats.clipped_count > 0 && stats.clipped_count <= m);
}

#[test]
fn huge_clip_norm_is_plain_averaged_sgd() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let (m, b) = (4, 8);
    let (x, y) = batch(2, m * b, &ad);
    let (mut rows, _) = micro_batch_grads(&model, &x, &y, m, b);
    let cfg = ClipConfig::fixed(1e30, MicroBatches::Uniform(1));
    let (clipped, stats) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
    assert_eq!(stats.clipped_count, 0);
    assert!(stats.factors.iter().all(|&s| s == 1.0));

    // Plain SGD on the whole batch: with equal micro-batches the mean loss's
    // gradient is the average of the micro-batch gradients.
    let full = GradientsParams::from_grads(mse(model.forward(x), y).backward(), &model);
    let lr = 0.1;
    let a = SgdConfig::new().init().step(lr, model.clone(), clipped);
    let b = SgdConfig::new().init().step(lr, model.clone(), full);
    for (pa, pb) in a.params().iter().zip(b.params()) {
        for (u, v) in pa.value().iter().zip(pb.value()) {
            assert!((u - v).abs() <= 1e-6 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
    // And the step moved the model.
    assert_ne!(a.params()[0].value(), model.params()[0].value());
}

#[test]
fn clip_rows_matches_reference_on_raw_tensors() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);
    let n = 10;
    let widths = [1usize, 33, 300];
    let host: Vec<Vec<f32>> = widths
        .iter()
        .map(|&d| (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let tensors: Vec<Tensor<2>> = host
        .iter()
        .zip(widths)
        .map(|(v, d)| Tensor::from_data(TensorData::new(v.clone(), [n, d]), &device))
        .collect();
    let cfg = ClipConfig::fixed(0.3, MicroBatches::Offsets(vec![0, 3, 4, 10]));
    let (out, stats) = clipper.clip_rows(&cfg, tensors).unwrap();
    let want = clip_f64(
        &cfg,
        &host.iter().map(|v| v.as_slice()).collect::<Vec<_>>(),
        n,
    )
    .unwrap();
    assert_eq!(stats.norms.len(), 3);
    for (t, w) in out.into_iter().zip(&want.grads) {
        let got: Vec<f32> = t.into_data().try_to_vec::<f32>().unwrap();
        for (g, w) in got.iter().zip(w) {
            assert!(
                ((*g as f64) - w).abs() <= 1e-5 * (w.abs() + 1e-3),
                "{g} vs {w}"
            );
        }
    }
}

#[test]
fn tensors_on_another_device_are_rejected() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let Some((_, other)) = shared() else {
        return;
    };
    assert_ne!(device, other);
    let here = Tensor::<2>::ones([4, 3], &device);
    let there = Tensor::<2>::ones([4, 2], &other);
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(2));
    let err = clipper.clip_rows(&cfg, vec![here, there]).unwrap_err();
    assert!(
        matches!(err, BurnClipError::WrongDevice { tensor: 1, .. }),
        "{err}"
    );
    // And a shape mismatch is typed too.
    let a = Tensor::<2>::ones([4, 3], &device);
    let b = Tensor::<2>::ones([5, 3], &device);
    let err = clipper.clip_rows(&cfg, vec![a, b]).unwrap_err();
    assert!(
        matches!(err, BurnClipError::Layout { tensor: 1, .. }),
        "{err}"
    );
    assert_eq!(
        clipper.clip_rows(&cfg, vec![]).unwrap_err(),
        BurnClipError::Empty
    );
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Relative L2 error of `got` against `want` at most 3e-5 (per tensor, as in the
/// core tests).
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, w)| (g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    assert!(
        err.sqrt() <= 3e-5 * norm.sqrt().max(1e-12),
        "{what}: relative L2 error {:e}",
        (err / norm).sqrt()
    );
}

/// An autoencoder whose decoder is the encoder's transpose: `dec` is the same
/// `Param` as `enc` (one `ParamId`, tied weights) or, untied, a copy with its own.
#[derive(Module, Debug)]
struct AutoEncoder {
    enc: Param<Tensor<2>>,
    dec: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

impl AutoEncoder {
    fn new(device: &Device, tied: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(11);
        let w: Vec<f32> = (0..5 * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
        let enc = Param::from_data(TensorData::new(w.clone(), [5, 3]), device);
        let dec = if tied {
            enc.clone()
        } else {
            Param::from_data(TensorData::new(w, [5, 3]), device)
        };
        let bias = Param::from_data(TensorData::new(vec![0.1f32; 5], [5]), device);
        Self { enc, dec, bias }
    }
    /// `[b, 5]` to `[b, 5]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        relu(x.matmul(self.enc.val())).matmul(self.dec.val().transpose())
            + self.bias.val().unsqueeze()
    }
}

#[test]
fn tied_parameters_are_one_tensor_with_the_summed_gradient() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let tied = AutoEncoder::new(&ad, true);
    let untied = AutoEncoder::new(&ad, false);
    assert_eq!(tied.enc.id, tied.dec.id);
    let (m, b) = (5, 3);
    let (x, _) = batch(4, m * b, &ad);
    let mut rows = MicroBatchGrads::new(&tied);
    assert_eq!(rows.param_ids(), &[tied.enc.id, tied.bias.id]);
    assert_eq!(rows.num_params(), 15 + 5);
    // The untied model's gradients, its two uses of the weight summed: what the
    // tied weight's gradient is.
    let mut want_rows = [Vec::new(), Vec::new()];
    for j in 0..m {
        let xj = x.clone().narrow(0, j * b, b);
        let grads = mse(tied.forward(xj.clone()), xj.clone()).backward();
        rows.push(&tied, grads).unwrap();
        let grads = mse(untied.forward(xj.clone()), xj).backward();
        let g = |p: &Param<Tensor<2>>| host(p.val().grad(&grads).unwrap());
        let (enc, dec) = (g(&untied.enc), g(&untied.dec));
        want_rows[0].extend(enc.iter().zip(dec).map(|(a, b)| a + b));
        want_rows[1].extend(host(untied.bias.val().grad(&grads).unwrap()));
    }
    assert_eq!(rows.len(), m);
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(1));
    let (grads, stats) = clipper.clip_module(&cfg, &tied, &mut rows).unwrap();
    let want = clip_f64(&cfg, &[&want_rows[0], &want_rows[1]], m).unwrap();
    assert!(want.clipped_count > 0, "the test should clip");
    assert_eq!(stats.clipped_count, want.clipped_count);
    assert_eq!(grads.len(), 2);
    assert_close(
        &host(grads.get::<2>(tied.enc.id).unwrap()),
        &want.grads[0],
        "tied weight",
    );
    assert_close(
        &host(grads.get::<1>(tied.bias.id).unwrap()),
        &want.grads[1],
        "bias",
    );
}

/// An MLP with a parameter the loss never reaches.
#[derive(Module, Debug)]
struct WithUnused {
    mlp: Mlp,
    unused: Param<Tensor<1>>,
}

#[test]
fn a_parameter_no_loss_reaches_gets_no_gradient() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = WithUnused {
        mlp: Mlp::new(&ad),
        unused: Param::from_data(TensorData::new(vec![1.0f32; 4], [4]), &ad),
    };
    let (m, b) = (4, 2);
    let (x, y) = batch(5, m * b, &ad);
    let mut rows = MicroBatchGrads::new(&model);
    assert_eq!(rows.param_ids().len(), 5);
    assert_eq!(rows.param_ids()[4], model.unused.id);
    let mut want_rows = vec![Vec::new(); 4];
    for j in 0..m {
        let xj = x.clone().narrow(0, j * b, b);
        let yj = y.clone().narrow(0, j * b, b);
        let grads = mse(model.mlp.forward(xj), yj).backward();
        for (h, p) in want_rows.iter_mut().zip(model.mlp.params()) {
            h.extend(p.grad_host(&grads));
        }
        rows.push(&model, grads).unwrap();
    }
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(1));
    let (grads, stats) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
    // As burn's own GradientsParams: nothing for the unused parameter, so an
    // optimizer leaves it alone.
    assert!(grads.get::<1>(model.unused.id).is_none());
    assert_eq!(grads.len(), 4);
    // Its zero rows add nothing to the norms: the others' clipping is unchanged.
    let want = clip_f64(
        &cfg,
        &want_rows.iter().map(|v| v.as_slice()).collect::<Vec<_>>(),
        m,
    )
    .unwrap();
    assert_eq!(stats.clipped_count, want.clipped_count);
    for (nj, wj) in stats.norms.iter().zip(&want.norms) {
        assert!(
            ((*nj as f64) - wj).abs() <= 1e-5 * wj.max(1e-3),
            "{nj} vs {wj}"
        );
    }
    for (p, w) in model.mlp.params().iter().zip(&want.grads) {
        assert_close(&p.in_params(&grads), w, "reached parameter");
    }
}

#[test]
fn a_bad_config_is_refused_before_the_rows_are_used() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let (m, b) = (4, 2);
    let (x, y) = batch(6, m * b, &ad);
    let (mut rows, host_rows) = micro_batch_grads(&model, &x, &y, m, b);
    let bad = [
        (
            ClipConfig::fixed(1.0, MicroBatches::Uniform(0)),
            "micro-batch size 0",
        ),
        (
            ClipConfig::fixed(1.0, MicroBatches::Offsets(vec![0, 2, m + 1])),
            "offsets past M",
        ),
        (
            ClipConfig::fixed(1.0, MicroBatches::Uniform(1)).with_groups(vec![0, 1]),
            "2 group indices for 4 tensors",
        ),
        (
            ClipConfig::fixed(-1.0, MicroBatches::Uniform(1)),
            "negative clip norm",
        ),
    ];
    for (cfg, what) in bad {
        match clipper.clip_module(&cfg, &model, &mut rows) {
            Err(BurnClipError::Clip(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(rows.len(), m, "{what}: the rows are kept");
    }
    let err = clipper
        .clip_module(
            &ClipConfig::fixed(1.0, MicroBatches::Uniform(0)),
            &model,
            &mut rows,
        )
        .unwrap_err();
    assert_eq!(err, BurnClipError::Clip(ClipError::ZeroMicroBatchSize));
    // The kept rows still clip to the right answer.
    let cfg = ClipConfig::fixed(0.5, MicroBatches::Uniform(1));
    let (grads, _) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
    assert!(rows.is_empty(), "consumed once clipped");
    let want = clip_f64(
        &cfg,
        &host_rows.iter().map(|v| v.as_slice()).collect::<Vec<_>>(),
        m,
    )
    .unwrap();
    for (p, w) in model.params().iter().zip(&want.grads) {
        assert_close(&p.in_params(&grads), w, "after the refusals");
    }
}

#[test]
fn gradients_that_reach_no_parameter_are_refused() {
    let Some((_, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let other = Mlp::new(&ad);
    let (x, y) = batch(7, 4, &ad);
    let mut rows = MicroBatchGrads::new(&model);
    // The loss of another model: none of `model`'s parameters has a gradient.
    let grads = mse(other.forward(x), y).backward();
    assert_eq!(
        rows.push(&model, grads).unwrap_err(),
        BurnClipError::NoGradient
    );
    assert!(rows.is_empty(), "nothing appended");
}

#[test]
fn a_module_that_does_not_visit_every_parameter_is_refused() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let (m, b) = (3, 2);
    let (x, y) = batch(8, m * b, &ad);
    let cfg = ClipConfig::fixed(1.0, MicroBatches::Uniform(1));

    // Pushed with a sub-module: l2's tensors get no rows.
    let mut rows = MicroBatchGrads::new(&model);
    rows.push(
        &model.l1,
        mse(model.forward(x.clone()), y.clone()).backward(),
    )
    .unwrap();
    assert_eq!(
        clipper.clip_module(&cfg, &model, &mut rows).unwrap_err(),
        BurnClipError::RowCount {
            tensor: 2,
            rows: 0,
            pushed: 1
        }
    );

    // Clipped for a sub-module: l2's clipped gradients would have nowhere to go.
    let (mut rows, _) = micro_batch_grads(&model, &x, &y, m, b);
    assert_eq!(
        clipper.clip_module(&cfg, &model.l1, &mut rows).unwrap_err(),
        BurnClipError::NotInModule { tensor: 2 }
    );
    assert_eq!(rows.len(), m, "the rows are kept");
    assert!(clipper.clip_module(&cfg, &model, &mut rows).is_ok());
}

#[test]
fn param_ids_give_the_tensor_order_of_groups() {
    let Some((mut clipper, device)) = shared() else {
        return;
    };
    let ad = device.clone().autodiff();
    let model = Mlp::new(&ad);
    let (m, b) = (5, 2);
    let (x, y) = batch(9, m * b, &ad);
    let (mut rows, host_rows) = micro_batch_grads(&model, &x, &y, m, b);
    let ids = [
        model.l1.weight.id,
        model.l1.bias.as_ref().unwrap().id,
        model.l2.weight.id,
        model.l2.bias.as_ref().unwrap().id,
    ];
    assert_eq!(rows.param_ids(), &ids);
    // One group per layer, each with its own bound.
    let group_of: Vec<usize> = rows
        .param_ids()
        .iter()
        .map(|id| usize::from(*id == ids[2] || *id == ids[3]))
        .collect();
    let cfg = ClipConfig::new(
        ClipBound::PerGroup(vec![0.2, 2.0]),
        MicroBatches::Uniform(1),
    )
    .with_groups(group_of);
    let (grads, stats) = clipper.clip_module(&cfg, &model, &mut rows).unwrap();
    let want = clip_f64(
        &cfg,
        &host_rows.iter().map(|v| v.as_slice()).collect::<Vec<_>>(),
        m,
    )
    .unwrap();
    assert_eq!(stats.clipped_count, want.clipped_count);
    for (p, w) in model.params().iter().zip(&want.grads) {
        assert_close(&p.in_params(&grads), w, "per-layer groups");
    }
}

#[test]
fn outputs_are_f32_whatever_the_default_float_type() {
    let Some((mut clipper, mut device)) = shared() else {
        return;
    };
    // A device whose tensors default to f16 (where the adapter supports it).
    if let Err(e) = device.configure(FloatDType::F16) {
        eprintln!("skipping: no f16 default on this device: {e}");
        return;
    }
    let (n, d) = (6, 5);
    let v: Vec<f32> = (0..n * d).map(|i| (i as f32 - 7.0) * 0.1).collect();
    let t = Tensor::<2>::from_data(TensorData::new(v.clone(), [n, d]), (&device, DType::F32));
    assert_eq!(t.dtype(), DType::F32);
    let cfg = ClipConfig::fixed(0.3, MicroBatches::Uniform(2));
    let (out, _) = clipper.clip_rows(&cfg, vec![t]).unwrap();
    assert_eq!(out[0].dtype(), DType::F32);
    let want = clip_f64(&cfg, &[&v], n).unwrap();
    assert_close(&host(out[0].clone()), &want.grads[0], "f32 output");
}

/// The adapter's source never reads tensor data to the host: no `into_data`,
/// `to_data`, `read`/`read_one`/`read_tensor` or mapping call. (The runtime side of
/// the check is in BENCHMARKS.md / the module docs: the only host reads are
/// microclip's O(M) statistics.)
#[test]
fn adapter_never_reads_tensors_to_the_host() {
    let src = include_str!("../src/burn.rs");
    let code: String = src
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "into_data",
        "to_data",
        ".read(",
        "read_one",
        "read_tensor",
        "map_async",
        "get_mapped_range",
    ] {
        assert!(!code.contains(needle), "src/burn.rs calls {needle}");
    }
}
