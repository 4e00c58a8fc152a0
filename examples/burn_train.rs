//! Trains a small burn MLP on synthetic data with micro-batch clipping by microclip,
//! on one wgpu device shared by burn and microclip.
//!
//! ```text
//! cargo run --release --features burn --example burn_train
//! ```
//!
//! Each step takes a batch of 32 samples, splits it into 8 micro-batches of 4, runs
//! one backward per micro-batch (the gradient rows stay on the device), clips each
//! micro-batch gradient to norm C with microclip in burn's own buffers, and applies
//! the clipped average with burn's SGD. Prints the loss per epoch, the fraction of
//! micro-batches clipped, and `final_loss=<x> initial_loss=<y>`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::tensor::{activation::relu, Device, Tensor, TensorData};
use microclip::burn::{BurnClipper, MicroBatchGrads};
use microclip::{ClipConfig, MicroBatches};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const D_IN: usize = 16;
const HIDDEN: usize = 64;
const SAMPLES: usize = 512;
const BATCH: usize = 32;
const MICRO: usize = 4; // samples per micro-batch: M = 8 per step
const EPOCHS: usize = 12;
const CLIP: f32 = 0.5;
const LR: f64 = 0.2;

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(D_IN, HIDDEN).init(device),
            l2: LinearConfig::new(HIDDEN, 1).init(device),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.l2.forward(relu(self.l1.forward(x)))
    }
}

fn mse(pred: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
    (pred - y).powi_scalar(2).mean()
}

/// Synthetic regression: y = sin(x . w1) + 0.5 (x . w2)^2 / D + noise, with a few
/// outlier samples (targets x3) whose gradients clipping keeps in check.
fn dataset(device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut rng = StdRng::seed_from_u64(7);
    let w1: Vec<f32> = (0..D_IN).map(|_| rng.random_range(-0.5..0.5)).collect();
    let w2: Vec<f32> = (0..D_IN).map(|_| rng.random_range(-0.5..0.5)).collect();
    let mut x = Vec::with_capacity(SAMPLES * D_IN);
    let mut y = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let row: Vec<f32> = (0..D_IN).map(|_| rng.random_range(-1.0..1.0)).collect();
        let a: f32 = row.iter().zip(&w1).map(|(u, v)| u * v).sum();
        let b: f32 = row.iter().zip(&w2).map(|(u, v)| u * v).sum();
        let mut t = a.sin() * 2.0 + 2.0 * b * b + rng.random_range(-0.05..0.05);
        if i % 61 == 0 {
            t *= 3.0;
        }
        x.extend(row);
        y.push(t);
    }
    (
        Tensor::from_data(TensorData::new(x, [SAMPLES, D_IN]), device),
        Tensor::from_data(TensorData::new(y, [SAMPLES, 1]), device),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // burn's device handed to microclip: one wgpu device and queue for both.
    let (mut clipper, device) = BurnClipper::init()?;
    println!("device: {:?} ({})", device, clipper.clipper().backend());
    let ad = device.clone().autodiff();
    let (x, y) = dataset(&ad);
    let mut model = Mlp::new(&ad);
    let mut optim = SgdConfig::new().init();
    let config = ClipConfig::fixed(CLIP, MicroBatches::Uniform(1));

    let eval = |model: &Mlp| -> f32 {
        let loss = mse(model.forward(x.clone()), y.clone());
        loss.into_scalar()
    };
    let initial = eval(&model);
    println!("epoch 0: loss {initial:.5}");
    let m = BATCH / MICRO;
    let mut final_loss = initial;
    for epoch in 1..=EPOCHS {
        let (mut clipped, mut total) = (0usize, 0usize);
        let mut peak_rows = 0u64;
        for step in 0..SAMPLES / BATCH {
            let mut rows = MicroBatchGrads::new(&model);
            for j in 0..m {
                let lo = step * BATCH + j * MICRO;
                let xj = x.clone().narrow(0, lo, MICRO);
                let yj = y.clone().narrow(0, lo, MICRO);
                rows.push(&model, mse(model.forward(xj), yj).backward())?;
            }
            peak_rows = peak_rows.max(rows.bytes());
            let (grads, stats) = clipper.clip_module(&config, &model, &mut rows)?;
            clipped += stats.clipped_count;
            total += stats.norms.len();
            model = optim.step(LR, model, grads);
        }
        final_loss = eval(&model);
        println!(
            "epoch {epoch}: loss {final_loss:.5}  clipped {clipped}/{total} micro-batches ({:.0}%)  rows {} KiB",
            100.0 * clipped as f64 / total as f64,
            peak_rows / 1024
        );
    }
    println!("final_loss={final_loss} initial_loss={initial}");
    // CI runs this example: training must actually work.
    if final_loss.is_nan() || final_loss >= 0.5 * initial {
        return Err(format!("did not train: {final_loss} vs {initial}").into());
    }
    Ok(())
}
