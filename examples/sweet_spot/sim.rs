//! Simulation core of the `sweet_spot` example: data, model, per-sample gradients,
//! training loop and the sweep over arms. Shared with `tests/sweet_spot.rs`
//! (which includes this file with `#[path]`), so it uses only `microclip`, `rand`
//! and `std`.
//!
//! Everything here is deterministic: a run is a pure function of its [`RunSpec`]
//! (and of the backend's arithmetic, which microclip keeps bitwise reproducible).

use microclip::{Backend, ClipConfig, ClipError, Clipper, MicroBatches};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Input dimension.
pub const D: usize = 10;
/// Number of classes.
pub const K: usize = 4;
/// Width of the weight tensor row (`K x D`, row-major by class).
pub const DW: usize = K * D;

/// Seed of the fixed "world": class means, the minority domain's rotation and the
/// validation / test sets. Run seeds vary the training stream and the init only.
const WORLD_SEED: u64 = 0x5EED_2025;
/// Scale of the class means `mu_k ~ N(0, MEAN_SCALE^2 I)`; noise is N(0, I).
const MEAN_SCALE: f64 = 0.8;
/// Std of the initial weights (biases start at 0).
const INIT_STD: f64 = 0.01;
/// Sizes of the held-out sets (per domain).
const N_VAL: usize = 2000;
const N_TEST: usize = 5000;

/// What the minority of the training stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A fraction `p` of samples are draggers: input scaled by `dragger_scale`,
    /// label `(y + 1) mod K`.
    Draggers,
    /// A fraction `p` of samples come from a second, legitimate domain: inputs
    /// rotated by a fixed random rotation, labels correct.
    MultiDomain,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Draggers => "draggers",
            Scenario::MultiDomain => "multi-domain",
        }
    }
}

/// How the clip bound is set in an arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The paper's Algorithm 1: `C_t = 1.0 * min_j norm_j` (microclip's adaptive bound).
    Adaptive,
    /// A fixed `C`: the median micro-batch norm over a warm-up of plain SGD
    /// (same init, separate data stream, `warmup_steps` at `warmup_lr`), per b and seed.
    FixedWarmupMedian,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Adaptive => "adaptive",
            Rule::FixedWarmupMedian => "fixed",
        }
    }
}

/// One training run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub scenario: Scenario,
    /// Fraction of draggers / minority-domain samples in the training stream.
    pub p: f64,
    pub rule: Rule,
    /// Micro-batch size.
    pub b: usize,
    pub lr: f64,
    pub steps: usize,
    pub batch: usize,
    pub seed: u64,
    pub dragger_scale: f64,
    pub warmup_steps: usize,
    pub warmup_lr: f64,
}

/// Held-out evaluation of a model.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Eval {
    /// Accuracy / mean cross-entropy on the main (clean) domain.
    pub acc_main: f64,
    pub loss_main: f64,
    /// Same on the minority domain (multi-domain scenario; NaN for draggers).
    pub acc_minor: f64,
    pub loss_minor: f64,
    /// What the arm is judged on: draggers: the clean main domain; multi-domain:
    /// the training mixture `(1 - p) * main + p * minor` (both domains are legitimate).
    pub acc: f64,
    pub loss: f64,
}

/// Result of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub spec: RunSpec,
    /// Validation loss (selection criterion) at init and after training.
    pub val_loss_init: f64,
    pub val: Eval,
    pub test: Eval,
    /// Mean over steps of clipped_count / M.
    pub clipped_frac: f64,
    /// Mean over steps of the clip bound C_t.
    pub mean_bound: f64,
    /// Fixed rule: the bound chosen from the warm-up (NaN for adaptive).
    pub fixed_bound: f64,
    /// Mean clip factor of a minority sample (dragger / minority domain) divided by
    /// that of a majority sample, over all steps (1 = no pruning; NaN if undefined).
    pub weight_ratio: f64,
    /// The training objective (mean loss on the training distribution, draggers or
    /// minority domain included, with their training labels), on a fixed held-out
    /// sample of it, at init and after training.
    pub train_loss_init: f64,
    pub train_loss_final: f64,
    /// Steps where the returned statistics disagreed with the bound
    /// (clipped_count != #{norm_j > C}, or adaptive C != min_j norm_j).
    pub stat_mismatches: usize,
}

/// The fixed world: class means, rotation, held-out sets.
pub struct World {
    pub means: [[f64; D]; K],
    pub rot: [[f64; D]; D],
    pub val_main: Vec<([f64; D], usize)>,
    pub val_minor: Vec<([f64; D], usize)>,
    pub test_main: Vec<([f64; D], usize)>,
    pub test_minor: Vec<([f64; D], usize)>,
}

/// A standard normal by Box-Muller (two uniforms, one normal: simple and
/// deterministic; no rand_distr needed).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of a combination: independent-looking seeds for sub-streams.
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl World {
    pub fn new() -> Self {
        let mut rng = StdRng::seed_from_u64(WORLD_SEED);
        let mut means = [[0.0; D]; K];
        for m in means.iter_mut() {
            for v in m.iter_mut() {
                *v = MEAN_SCALE * normal(&mut rng);
            }
        }
        // Random rotation: Gram-Schmidt of a Gaussian matrix.
        let mut rot = [[0.0; D]; D];
        for i in 0..D {
            let mut v = [0.0; D];
            for x in v.iter_mut() {
                *x = normal(&mut rng);
            }
            for r in rot.iter().take(i) {
                let dot: f64 = (0..D).map(|k| v[k] * r[k]).sum();
                for k in 0..D {
                    v[k] -= dot * r[k];
                }
            }
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            for k in 0..D {
                rot[i][k] = v[k] / n;
            }
        }
        let mut w = World {
            means,
            rot,
            val_main: vec![],
            val_minor: vec![],
            test_main: vec![],
            test_minor: vec![],
        };
        let set = |n: usize, minor: bool, rng: &mut StdRng| -> Vec<([f64; D], usize)> {
            (0..n)
                .map(|_| {
                    let y = rng.random_range(0..K);
                    let mut x = [0.0; D];
                    for (d, v) in x.iter_mut().enumerate() {
                        *v = w.means[y][d] + normal(rng);
                    }
                    if minor {
                        x = w.rotate(&x);
                    }
                    (x, y)
                })
                .collect()
        };
        let val_main = set(N_VAL, false, &mut rng);
        let val_minor = set(N_VAL, true, &mut rng);
        let test_main = set(N_TEST, false, &mut rng);
        let test_minor = set(N_TEST, true, &mut rng);
        w.val_main = val_main;
        w.val_minor = val_minor;
        w.test_main = test_main;
        w.test_minor = test_minor;
        w
    }

    fn rotate(&self, x: &[f64; D]) -> [f64; D] {
        let mut out = [0.0; D];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (0..D).map(|k| self.rot[i][k] * x[k]).sum();
        }
        out
    }

    /// One training sample: `(input, training label, is_minority)`. Draws the same
    /// random numbers whatever `p` is, so the streams of different p (and of all
    /// arms) share their clean samples and the draggers at p = 0.1 are a subset of
    /// those at p = 0.25.
    pub fn sample(
        &self,
        scenario: Scenario,
        p: f64,
        dragger_scale: f64,
        rng: &mut StdRng,
    ) -> ([f64; D], usize, bool) {
        let y = rng.random_range(0..K);
        let mut x = [0.0; D];
        for (d, v) in x.iter_mut().enumerate() {
            *v = self.means[y][d] + normal(rng);
        }
        let u: f64 = rng.random::<f64>();
        let minor = u < p;
        if !minor {
            return (x, y, false);
        }
        match scenario {
            Scenario::Draggers => {
                for v in x.iter_mut() {
                    *v *= dragger_scale;
                }
                (x, (y + 1) % K, true)
            }
            Scenario::MultiDomain => (self.rotate(&x), y, true),
        }
    }
}

impl World {
    /// A fixed held-out sample of the training distribution (same for every seed and
    /// arm of a given p), to measure the training objective.
    pub fn training_sample(
        &self,
        scenario: Scenario,
        p: f64,
        dragger_scale: f64,
        n: usize,
    ) -> Vec<([f64; D], usize)> {
        let mut rng = StdRng::seed_from_u64(mix(WORLD_SEED, 0x0B1E));
        (0..n)
            .map(|_| {
                let (x, y, _) = self.sample(scenario, p, dragger_scale, &mut rng);
                (x, y)
            })
            .collect()
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Linear softmax classifier: logits = W x + b.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub w: Vec<f64>, // [K * D], row k = class k
    pub b: Vec<f64>, // [K]
}

impl Model {
    pub fn init(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(mix(seed, 0x1A17));
        Model {
            w: (0..DW).map(|_| INIT_STD * normal(&mut rng)).collect(),
            b: vec![0.0; K],
        }
    }

    /// Softmax probabilities.
    pub fn probs(&self, x: &[f64; D]) -> [f64; K] {
        let mut z = [0.0; K];
        for (k, zk) in z.iter_mut().enumerate() {
            *zk = self.b[k] + (0..D).map(|d| self.w[k * D + d] * x[d]).sum::<f64>();
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut s = 0.0;
        for zk in z.iter_mut() {
            *zk = (*zk - m).exp();
            s += *zk;
        }
        for zk in z.iter_mut() {
            *zk /= s;
        }
        z
    }

    /// (accuracy, mean cross-entropy) on a labelled set.
    pub fn evaluate(&self, set: &[([f64; D], usize)]) -> (f64, f64) {
        let mut correct = 0usize;
        let mut loss = 0.0;
        for (x, y) in set {
            let pr = self.probs(x);
            let arg = (0..K).fold(0, |a, k| if pr[k] > pr[a] { k } else { a });
            correct += (arg == *y) as usize;
            loss -= pr[*y].max(1e-300).ln();
        }
        (correct as f64 / set.len() as f64, loss / set.len() as f64)
    }

    fn eval_pair(
        &self,
        main: &[([f64; D], usize)],
        minor: &[([f64; D], usize)],
        scenario: Scenario,
        p: f64,
    ) -> Eval {
        let (acc_main, loss_main) = self.evaluate(main);
        match scenario {
            Scenario::Draggers => Eval {
                acc_main,
                loss_main,
                acc_minor: f64::NAN,
                loss_minor: f64::NAN,
                acc: acc_main,
                loss: loss_main,
            },
            Scenario::MultiDomain => {
                let (acc_minor, loss_minor) = self.evaluate(minor);
                Eval {
                    acc_main,
                    loss_main,
                    acc_minor,
                    loss_minor,
                    acc: (1.0 - p) * acc_main + p * acc_minor,
                    loss: (1.0 - p) * loss_main + p * loss_minor,
                }
            }
        }
    }

    pub fn eval_val(&self, world: &World, scenario: Scenario, p: f64) -> Eval {
        self.eval_pair(&world.val_main, &world.val_minor, scenario, p)
    }

    pub fn eval_test(&self, world: &World, scenario: Scenario, p: f64) -> Eval {
        self.eval_pair(&world.test_main, &world.test_minor, scenario, p)
    }
}

/// A training batch with its per-sample gradients, computed by hand on the CPU:
/// for cross-entropy on softmax(W x + b), `dL/dW[k, :] = (p_k - 1[k = y]) x` and
/// `dL/db[k] = p_k - 1[k = y]`.
pub struct Batch {
    /// `[n, K * D]` row-major.
    pub grad_w: Vec<f32>,
    /// `[n, K]` row-major.
    pub grad_b: Vec<f32>,
    /// Whether row i is a dragger / minority-domain sample.
    pub minor: Vec<bool>,
}

pub fn make_batch(world: &World, model: &Model, spec: &RunSpec, rng: &mut StdRng) -> Batch {
    let n = spec.batch;
    let mut grad_w = vec![0.0f32; n * DW];
    let mut grad_b = vec![0.0f32; n * K];
    let mut minor = vec![false; n];
    for i in 0..n {
        let (x, y, m) = world.sample(spec.scenario, spec.p, spec.dragger_scale, rng);
        minor[i] = m;
        let pr = model.probs(&x);
        for k in 0..K {
            let g = pr[k] - if k == y { 1.0 } else { 0.0 };
            grad_b[i * K + k] = g as f32;
            for d in 0..D {
                grad_w[i * DW + k * D + d] = (g * x[d]) as f32;
            }
        }
    }
    Batch {
        grad_w,
        grad_b,
        minor,
    }
}

/// Plain SGD = microclip with an effectively infinite fixed bound (every s_j = 1).
pub fn plain_config(b: usize) -> ClipConfig {
    ClipConfig::fixed(f32::MAX, MicroBatches::Uniform(b))
}

/// The fixed bound of [`Rule::FixedWarmupMedian`]: median of all micro-batch norms
/// seen in `warmup_steps` of plain SGD at `warmup_lr` from the run's init, on a data
/// stream separate from the training stream.
pub fn warmup_bound(
    world: &World,
    spec: &RunSpec,
    clipper: &mut Clipper,
) -> Result<f64, ClipError> {
    let mut model = Model::init(spec.seed);
    let mut rng = StdRng::seed_from_u64(mix(spec.seed, 0x3A3A));
    let cfg = plain_config(spec.b);
    let mut norms: Vec<f32> = Vec::new();
    for _ in 0..spec.warmup_steps {
        let batch = make_batch(world, &model, spec, &mut rng);
        let out = clipper.clip(&cfg, &[&batch.grad_w, &batch.grad_b], spec.batch)?;
        norms.extend_from_slice(&out.stats.norms);
        apply(&mut model, &out.grads, spec.warmup_lr);
    }
    norms.sort_by(|a, b| a.total_cmp(b));
    Ok(if norms.is_empty() {
        1.0
    } else {
        let n = norms.len();
        if n % 2 == 1 {
            norms[n / 2] as f64
        } else {
            0.5 * (norms[n / 2 - 1] as f64 + norms[n / 2] as f64)
        }
    })
}

fn apply(model: &mut Model, grads: &[Vec<f32>], lr: f64) {
    for (w, g) in model.w.iter_mut().zip(&grads[0]) {
        *w -= lr * *g as f64;
    }
    for (b, g) in model.b.iter_mut().zip(&grads[1]) {
        *b -= lr * *g as f64;
    }
}

/// Trains one arm at one learning rate and seed.
pub fn run(world: &World, spec: &RunSpec, clipper: &mut Clipper) -> Result<RunResult, ClipError> {
    let (cfg, fixed_bound) = match spec.rule {
        Rule::Adaptive => (
            ClipConfig::adaptive(1.0, MicroBatches::Uniform(spec.b)),
            f64::NAN,
        ),
        Rule::FixedWarmupMedian => {
            let c = warmup_bound(world, spec, clipper)?;
            // f32 bound must be > 0 and finite.
            let c32 = (c as f32).max(f32::MIN_POSITIVE);
            (ClipConfig::fixed(c32, MicroBatches::Uniform(spec.b)), c)
        }
    };
    let mut model = Model::init(spec.seed);
    let val_loss_init = model.eval_val(world, spec.scenario, spec.p).loss;
    let mut rng = StdRng::seed_from_u64(mix(spec.seed, 0x7EA1));
    let (mut clipped_frac, mut bound_sum) = (0.0, 0.0);
    let (mut w_minor, mut n_minor, mut w_major, mut n_major) = (0.0, 0usize, 0.0, 0usize);
    let train_set = world.training_sample(spec.scenario, spec.p, spec.dragger_scale, N_VAL);
    let train_loss_init = model.evaluate(&train_set).1;
    let mut mismatches = 0usize;
    for _ in 0..spec.steps {
        let batch = make_batch(world, &model, spec, &mut rng);
        let out = clipper.clip(&cfg, &[&batch.grad_w, &batch.grad_b], spec.batch)?;
        let st = &out.stats;
        let m = st.norms.len();
        clipped_frac += st.clipped_count as f64 / m as f64;
        bound_sum += st.clip_bound as f64;
        let above = st
            .norms
            .iter()
            .filter(|&&n| n.is_finite() && n > st.clip_bound)
            .count();
        let bound_ok = match spec.rule {
            Rule::Adaptive => {
                let min = st.norms.iter().cloned().fold(f32::INFINITY, f32::min);
                (st.clip_bound - min).abs() <= 1e-6 * min
            }
            Rule::FixedWarmupMedian => true,
        };
        if above != st.clipped_count || !bound_ok {
            mismatches += 1;
        }
        for (i, &is_minor) in batch.minor.iter().enumerate() {
            let s = st.factors[i / spec.b] as f64;
            if is_minor {
                w_minor += s;
                n_minor += 1;
            } else {
                w_major += s;
                n_major += 1;
            }
        }
        apply(&mut model, &out.grads, spec.lr);
    }
    let weight_ratio = if n_minor > 0 && n_major > 0 {
        (w_minor / n_minor as f64) / (w_major / n_major as f64)
    } else {
        f64::NAN
    };
    let steps = spec.steps.max(1) as f64;
    Ok(RunResult {
        spec: spec.clone(),
        val_loss_init,
        val: model.eval_val(world, spec.scenario, spec.p),
        test: model.eval_test(world, spec.scenario, spec.p),
        clipped_frac: clipped_frac / steps,
        mean_bound: bound_sum / steps,
        fixed_bound,
        weight_ratio,
        train_loss_init,
        train_loss_final: model.evaluate(&train_set).1,
        stat_mismatches: mismatches,
    })
}

/// The sweep: every p, rule and b; for each arm every learning rate and seed.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub scenario: Scenario,
    pub ps: Vec<f64>,
    pub bs: Vec<usize>,
    pub rules: Vec<Rule>,
    pub lrs: Vec<f64>,
    pub seeds: usize,
    pub steps: usize,
    pub batch: usize,
    pub dragger_scale: f64,
    pub warmup_steps: usize,
    pub warmup_lr: f64,
    pub backend: Backend,
    /// Worker threads (CPU backend only; the GPU backend runs on one thread).
    pub threads: usize,
}

impl SweepConfig {
    /// The example's defaults.
    pub fn defaults(scenario: Scenario) -> Self {
        SweepConfig {
            scenario,
            ps: match scenario {
                Scenario::Draggers => vec![0.0, 0.1, 0.25],
                Scenario::MultiDomain => vec![0.1, 0.25],
            },
            bs: vec![1, 2, 4, 8, 16, 32, 64],
            rules: vec![Rule::Adaptive, Rule::FixedWarmupMedian],
            lrs: vec![0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
            seeds: 5,
            steps: 400,
            batch: 64,
            dragger_scale: 4.0,
            warmup_steps: 50,
            warmup_lr: 0.1,
            backend: Backend::Cpu,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// One arm (p, rule, b) after learning-rate selection.
#[derive(Clone, Debug)]
pub struct ArmResult {
    pub p: f64,
    pub rule: Rule,
    pub b: usize,
    /// Mean validation loss over seeds for each learning rate of the grid.
    pub val_by_lr: Vec<(f64, f64)>,
    /// The learning rate with the lowest mean validation loss.
    pub lr: f64,
    /// The runs at that learning rate, one per seed.
    pub runs: Vec<RunResult>,
    /// Every run of the arm (all learning rates and seeds).
    pub all_runs: Vec<RunResult>,
}

pub fn mean_std(xs: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = xs.into_iter().collect();
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

impl ArmResult {
    pub fn stat(&self, f: impl Fn(&RunResult) -> f64) -> (f64, f64) {
        mean_std(self.runs.iter().map(f))
    }
}

/// Runs the whole sweep, calling `progress(arm, index, total)` after each arm.
pub fn sweep(
    cfg: &SweepConfig,
    world: &World,
    mut progress: impl FnMut(&ArmResult, usize, usize),
) -> Result<Vec<ArmResult>, ClipError> {
    let gpu = !matches!(cfg.backend, Backend::Cpu);
    let workers = if gpu { 1 } else { cfg.threads.max(1) };
    let mut clippers: Vec<Clipper> = (0..workers)
        .map(|_| Clipper::new(cfg.backend))
        .collect::<Result<_, _>>()?;
    let mut arms = Vec::new();
    for &p in &cfg.ps {
        for &rule in &cfg.rules {
            for &b in &cfg.bs {
                arms.push((p, rule, b));
            }
        }
    }
    let total = arms.len();
    let mut out = Vec::with_capacity(total);
    for (idx, &(p, rule, b)) in arms.iter().enumerate() {
        let specs: Vec<RunSpec> = cfg
            .lrs
            .iter()
            .flat_map(|&lr| {
                (0..cfg.seeds as u64).map(move |seed| RunSpec {
                    scenario: cfg.scenario,
                    p,
                    rule,
                    b,
                    lr,
                    steps: cfg.steps,
                    batch: cfg.batch,
                    seed,
                    dragger_scale: cfg.dragger_scale,
                    warmup_steps: cfg.warmup_steps,
                    warmup_lr: cfg.warmup_lr,
                })
            })
            .collect();
        let results = run_parallel(world, &specs, &mut clippers)?;
        let mut val_by_lr = Vec::new();
        for &lr in &cfg.lrs {
            let (m, _) = mean_std(results.iter().filter(|r| r.spec.lr == lr).map(|r| {
                if r.val.loss.is_finite() {
                    r.val.loss
                } else {
                    f64::INFINITY
                }
            }));
            val_by_lr.push((lr, m));
        }
        let lr = val_by_lr
            .iter()
            .fold((f64::NAN, f64::INFINITY), |best, &(lr, v)| {
                if v < best.1 || best.0.is_nan() {
                    (lr, v)
                } else {
                    best
                }
            })
            .0;
        let runs = results
            .iter()
            .filter(|r| r.spec.lr == lr)
            .cloned()
            .collect();
        let arm = ArmResult {
            p,
            rule,
            b,
            val_by_lr,
            lr,
            runs,
            all_runs: results,
        };
        progress(&arm, idx, total);
        out.push(arm);
    }
    Ok(out)
}

/// Runs the specs on one thread per clipper; results come back in spec order.
fn run_parallel(
    world: &World,
    specs: &[RunSpec],
    clippers: &mut [Clipper],
) -> Result<Vec<RunResult>, ClipError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Result<RunResult, ClipError>>> = vec![None; specs.len()];
    let chunks: Vec<Vec<(usize, Result<RunResult, ClipError>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = clippers
            .iter_mut()
            .map(|clipper| {
                let next = &next;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= specs.len() {
                            break;
                        }
                        mine.push((i, run(world, &specs[i], clipper)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    for (i, r) in chunks.into_iter().flatten() {
        slots[i] = Some(r);
    }
    slots
        .into_iter()
        .map(|r| r.expect("every spec ran"))
        .collect()
}
