//! One read of the input, in groups of R consecutive micro-batches: every thread
//! forms the means of its own column blocks (f64 sums, kept as f32 rows when a
//! micro-batch has several rows; where a mean's norm is below 2^-64, too small
//! for f32 storage, the rows are read again instead) and their squared norms,
//! the threads meet at a
//! barrier to combine the partial norms in block order, and each thread adds
//! `sum_r h_r * mean_r` to its f64 accumulator while the group's rows or means are
//! still in the last-level cache. One sweep of the accumulator per group rather
//! than per micro-batch. When every micro-batch has one row, both phases read the
//! rows in their own type, 16-bit rows widened in registers in each phase (f16
//! with F16C; without it f16 rows, whose integer decode costs more, are widened
//! once into f32 copies).
//!
//! Extra host memory: an f64 accumulator of `8 x sum_p D_p` bytes and, when a
//! micro-batch has more than one row (or the input is f16 without F16C), R f32
//! means (or widened 16-bit rows) of `4 x sum_p D_p` bytes each.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Barrier, Condvar, Mutex, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use super::{axpy_rows, factor, mean_too_coarse, Plan, BLOCK_COLS};
use crate::config::{starts, ClipBound, ClipFunction};
use crate::dtype::{Dtype, GradElement};

/// The factor `h` applied during the pass: `s_j` with a fixed bound; `s_j / C` with
/// an adaptive one (hard clipping with `scale <= 1` is `C / norm_j` for every j
/// the minimum is taken over; `choose` keeps every other adaptive hard call off
/// this path).
fn pass_factor<T: GradElement>(plan: &Plan<'_, T>, group: usize, n: f64, mb_finite: bool) -> f64 {
    let f = plan.config.function;
    match &plan.config.bound {
        ClipBound::Fixed(c) => factor(f, *c as f64, n, mb_finite, plan.propagate),
        ClipBound::PerGroup(c) => factor(f, c[group] as f64, n, mb_finite, plan.propagate),
        ClipBound::Adaptive { .. } => {
            let f = match f {
                ClipFunction::Hard => ClipFunction::Normalize,
                other => other,
            };
            factor(f, 1.0, n, mb_finite, plan.propagate)
        }
    }
}

/// Blocks `[0, blocks)` split into `threads` contiguous ranges of about equal width.
fn split<T: GradElement>(plan: &Plan<'_, T>, threads: usize) -> Vec<Range<usize>> {
    let total: usize = plan.blocks.iter().map(|b| b.w).sum();
    let mut ranges = Vec::with_capacity(threads);
    let (mut start, mut width) = (0, 0);
    for (k, b) in plan.blocks.iter().enumerate() {
        width += b.w;
        if width * threads >= total * (ranges.len() + 1) && ranges.len() + 1 < threads {
            ranges.push(start..k + 1);
            start = k + 1;
        }
    }
    ranges.push(start..plan.blocks.len());
    ranges
}

/// A worker's remaining waits at the group barrier. A worker that unwinds makes
/// them as it drops, so that the other workers are not left waiting at the
/// barrier for it (they finish with meaningless partials and [`run`] re-raises
/// the panic) instead of hanging the call.
struct BarrierWaits<'a> {
    barrier: &'a Barrier,
    left: usize,
}

impl BarrierWaits<'_> {
    fn wait(&mut self) {
        self.left -= 1;
        self.barrier.wait();
    }
}

impl Drop for BarrierWaits<'_> {
    fn drop(&mut self) {
        for _ in 0..self.left {
            self.barrier.wait();
        }
    }
}

/// Whether the workers may begin: opened (true) once every worker thread has
/// started, or closed (false) when one could not be started, so that the started
/// ones return before their first barrier instead of waiting there for a worker
/// that does not exist.
#[derive(Default)]
struct StartGate {
    state: Mutex<Option<bool>>,
    changed: Condvar,
}

impl StartGate {
    fn set(&self, go: bool) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(go);
        self.changed.notify_all();
    }

    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(go) = *state {
                return go;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Starts worker `t` on a thread of `scope`; an error when the system refuses a
/// thread (a process or memory limit).
fn spawn_worker<'s, 'e, R: Send + 'e>(
    scope: &'s Scope<'s, 'e>,
    t: usize,
    f: impl FnOnce() -> R + Send + 'e,
) -> std::io::Result<ScopedJoinHandle<'s, R>> {
    #[cfg(test)]
    if tests::spawn_fails(t) {
        return Err(std::io::Error::other("injected spawn failure"));
    }
    std::thread::Builder::new()
        .name(format!("microclip-cpu-{t}"))
        .spawn_scoped(scope, f)
}

/// `blocks` cut into runs of consecutive blocks that are all whole tensors or
/// all parts of wider ones ([`Plan::whole`]).
fn whole_runs<'p, T: GradElement>(
    plan: &'p Plan<'_, T>,
    blocks: Range<usize>,
) -> impl Iterator<Item = Range<usize>> + 'p {
    let mut start = blocks.start;
    std::iter::from_fn(move || {
        let kind = plan.whole(plan.blocks.get(start).filter(|_| start < blocks.end)?);
        let end = (start..blocks.end)
            .find(|&k| plan.whole(&plan.blocks[k]) != kind)
            .unwrap_or(blocks.end);
        Some(std::mem::replace(&mut start, end)..end)
    })
}

/// Worker `t` over `blocks`, making its `waits` at `barrier` (the remaining ones
/// as it drops, should it unwind); see [`worker`].
fn run_worker<T: GradElement>(
    plan: &Plan<'_, T>,
    t: usize,
    blocks: Range<usize>,
    group_size: usize,
    partials: &[Vec<AtomicU64>; 2],
    barrier: &Barrier,
    waits: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut barrier = BarrierWaits {
        barrier,
        left: waits,
    };
    #[cfg(test)]
    tests::maybe_panic(t);
    worker(plan, blocks, group_size, partials, &mut barrier, t == 0)
}

/// One thread's share: returns the norms (thread 0 only) and its accumulator.
fn worker<T: GradElement>(
    plan: &Plan<'_, T>,
    blocks: Range<usize>,
    group_size: usize,
    partials: &[Vec<AtomicU64>; 2],
    barrier: &mut BarrierWaits<'_>,
    record: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mine = &plan.blocks[blocks.clone()];
    let n_blocks = plan.blocks.len();
    let width: usize = mine.iter().map(|b| b.w).sum();
    let m = plan.micro_batches();
    // Phase B reads f32 when a micro-batch has several rows: their means, and the
    // one-row micro-batches' rows as they are (f32 input) or widened into the
    // means (16-bit input). Otherwise it reads the rows themselves, in their own
    // type, still in the last-level cache; except f16 rows without F16C, which
    // are widened once, into the means: their integer decode costs more than the
    // copy's trip through the cache (f16 at b = 1 took 1.5x as long decoded in
    // both phases; bf16's is a shift).
    let via_means =
        (0..m).any(|j| plan.rows(j).len() > 1) || (T::DTYPE == Dtype::F16 && !plan.f16c.on());
    let stored = |rows: usize| via_means && (rows > 1 || T::DTYPE != Dtype::F32);
    let mut acc = vec![0.0f64; width];
    let mut means = vec![0.0f32; if via_means { group_size * width } else { 0 }];
    let mut sum = vec![0.0f64; BLOCK_COLS];
    let mut norms = Vec::new();
    let mut h = vec![0.0f64; group_size * plan.groups];
    // Per (micro-batch, group): whether its stored f32 mean is too coarse for
    // phase B, which then reads the rows instead (see mean_too_coarse).
    let mut coarse = vec![false; group_size * plan.groups];
    // Each block's first column in the thread's accumulator and means.
    let block_starts = starts(mine.iter().map(|b| b.w));
    for (step, first) in (0..m).step_by(group_size).enumerate() {
        let mbs = first..(first + group_size).min(m);
        let slot = &partials[step % 2];
        // Phase A: means and partial squared norms of this thread's blocks.
        let mut block_mean = |k: usize, r: usize, j: usize| {
            let (b, at) = (&plan.blocks[k], block_starts[k - blocks.start]);
            let rows = plan.rows(j);
            let keep = stored(rows.len());
            // A 16-bit row that is kept: a plain widening loop, then the squares
            // of the copy in L1 (mean_ssq; f16 at b = 1 took 1.3x as long with
            // the decode inside the squares' loop).
            let mean = keep.then(|| &mut means[r * width + at..][..b.w]);
            let ssq = plan.mean_ssq(b, rows, &mut sum, mean, false);
            slot[r * n_blocks + k].store(ssq.to_bits(), Relaxed);
        };
        // Blocks of tensors wider than a block: micro-batch by micro-batch, each
        // a sweep along its rows. Whole small tensors: tensor by tensor, each a
        // sweep along its `[N, D_p]` rows (micro-batch by micro-batch, 10,000
        // tensors of 20 columns took about 1.5x as long: short reads scattered
        // over the tensors). The order changes no partial.
        for run in whole_runs(plan, blocks.clone()) {
            if plan.whole(&plan.blocks[run.start]) {
                for k in run {
                    for (r, j) in mbs.clone().enumerate() {
                        block_mean(k, r, j);
                    }
                }
            } else {
                for (r, j) in mbs.clone().enumerate() {
                    for k in run.clone() {
                        block_mean(k, r, j);
                    }
                }
            }
        }
        // Every thread's partials are written before anyone reads them; the slots
        // alternate, so nobody writes group s + 2's before all have read group s's.
        barrier.wait();
        for (r, _) in mbs.clone().enumerate() {
            let norms_j = plan.norms(|k| f64::from_bits(slot[r * n_blocks + k].load(Relaxed)));
            let mb_finite = norms_j.iter().all(|n| n.is_finite());
            for (g, &n) in norms_j.iter().enumerate() {
                h[r * plan.groups + g] = pass_factor(plan, g, n, mb_finite);
                coarse[r * plan.groups + g] = mean_too_coarse(n);
            }
            if record {
                norms.extend_from_slice(&norms_j);
            }
        }
        // Phase B: acc += h_j * mean_j for the group's micro-batches, block by block
        // (the accumulator block stays in the core's cache), from the rows (one-row
        // micro-batches) or the means, still in the last-level cache.
        // Several micro-batches per sweep of the accumulator block (axpy_rows).
        let mut at = 0;
        let mut row_terms: Vec<(f64, &[T])> = Vec::with_capacity(group_size);
        let mut f32_terms: Vec<(f64, &[f32])> = Vec::with_capacity(group_size);
        let mut coarse_terms: Vec<(Range<usize>, f64)> = Vec::new();
        for b in mine {
            let g = plan.group(b);
            let live = mbs.clone().enumerate().filter_map(|(r, j)| {
                let h = h[r * plan.groups + g];
                (h != 0.0 || plan.propagate).then_some((r, plan.rows(j), h))
            });
            let acc = &mut acc[at..at + b.w];
            if via_means {
                f32_terms.clear();
                coarse_terms.clear();
                for (r, rows, h) in live {
                    if !stored(rows.len()) {
                        // One f32 row (not stored): T is f32.
                        debug_assert_eq!(T::DTYPE, Dtype::F32);
                        f32_terms.push((h, bytemuck::cast_slice(plan.segment(b, rows.start))));
                    } else if rows.len() > 1 && coarse[r * plan.groups + g] {
                        coarse_terms.push((rows, h));
                    } else {
                        f32_terms.push((h, &means[r * width + at..r * width + at + b.w]));
                    }
                }
                axpy_rows(acc, &f32_terms, plan.f16c);
                for (rows, h) in coarse_terms.drain(..) {
                    plan.add_mean_from_rows(acc, b, rows, h, &mut sum);
                }
            } else {
                row_terms.clear();
                row_terms.extend(live.map(|(_, rows, h)| (h, plan.segment(b, rows.start))));
                axpy_rows(acc, &row_terms, plan.f16c);
            }
            at += b.w;
        }
    }
    (norms, acc)
}

/// Runs the pass with groups of `group_size` micro-batches between barriers;
/// returns the `[M, G]` norms and, per tensor, `sum_j h_j * mean_j` with `h_j` of
/// [`pass_factor`] (`s_j / C_g` under an adaptive bound).
pub(super) fn run<T: GradElement>(
    plan: &Plan<'_, T>,
    group_size: usize,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let threads = if plan.parallel {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        #[cfg(test)]
        let available = tests::threads(available);
        available.min(plan.blocks.len()).max(1)
    } else {
        1
    };
    let mut ranges = split(plan, threads);
    let slots = group_size * plan.blocks.len();
    let partials = [0, 1].map(|_| (0..slots).map(|_| AtomicU64::new(0)).collect());
    let barrier = Barrier::new(ranges.len());
    let gate = StartGate::default();
    let waits = plan.micro_batches().div_ceil(group_size);
    // Workers 1.. on threads of their own, worker 0 on the calling thread (one
    // thread fewer to start per call); with one thread, none started (None).
    let started: Option<Vec<(Vec<f64>, Vec<f64>)>> = (threads > 1)
        .then(|| {
            std::thread::scope(|s| {
                let mut handles = Vec::with_capacity(ranges.len() - 1);
                for (t, r) in ranges.iter().enumerate().skip(1) {
                    let (partials, barrier, gate) = (&partials, &barrier, &gate);
                    let spawned = spawn_worker(s, t, move || {
                        if !gate.wait() {
                            return None;
                        }
                        Some(run_worker(
                            plan,
                            t,
                            r.clone(),
                            group_size,
                            partials,
                            barrier,
                            waits,
                        ))
                    });
                    match spawned {
                        Ok(h) => handles.push(h),
                        Err(_) => break,
                    }
                }
                let all_started = handles.len() == ranges.len() - 1;
                gate.set(all_started);
                // A panic here unwinds through the scope, which joins the others
                // first (this worker's remaining barrier waits are made as it drops).
                let first = all_started.then(|| {
                    run_worker(
                        plan,
                        0,
                        ranges[0].clone(),
                        group_size,
                        &partials,
                        &barrier,
                        waits,
                    )
                });
                // Every worker is joined (the others finish when one panics), then
                // the first panic is raised again.
                let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
                let rest = joined
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
                let rest: Option<Vec<_>> = rest.collect();
                first
                    .zip(rest)
                    .map(|(first, rest)| std::iter::once(first).chain(rest).collect())
            })
        })
        .flatten();
    // One thread, or a thread that could not be started: the whole pass on the
    // calling thread (no worker has touched the partials). The blocks' sums do
    // not depend on how the blocks are shared out, so the result is the same.
    let results = started.unwrap_or_else(|| {
        ranges.clear();
        ranges.push(0..plan.blocks.len());
        let alone = Barrier::new(1);
        vec![run_worker(
            plan,
            0,
            ranges[0].clone(),
            group_size,
            &partials,
            &alone,
            waits,
        )]
    });
    // Each thread's accumulator holds its blocks in order, and the threads' ranges
    // follow each other: cut them back into blocks.
    let block_sums = ranges.iter().zip(&results).flat_map(|(r, (_, acc))| {
        plan.blocks[r.clone()].iter().scan(0, move |at, b| {
            *at += b.w;
            Some(&acc[*at - b.w..*at])
        })
    });
    let sums = plan.per_tensor(block_sums);
    let norms = results.into_iter().next().map(|r| r.0).unwrap_or_default();
    (norms, sums)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{mpsc, Mutex, PoisonError};
    use std::time::Duration;

    use crate::{Backend, ClipConfig, ClipOutput, Clipper, MicroBatches};

    /// The worker that panics before its first barrier (usize::MAX: none). Only
    /// the test below sets it.
    static PANIC_WORKER: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// The first worker whose thread "cannot be started" (usize::MAX: none).
    static SPAWN_FAILS_FROM: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// The CPUs the pass sees (0: the machine's own).
    static THREADS: AtomicUsize = AtomicUsize::new(0);
    /// Held by the tests that set the hooks above (no other unit test runs the
    /// CPU path).
    static HOOKS: Mutex<()> = Mutex::new(());

    pub(super) fn maybe_panic(worker: usize) {
        if PANIC_WORKER.load(SeqCst) == worker {
            panic!("injected worker panic");
        }
    }

    pub(super) fn spawn_fails(worker: usize) -> bool {
        worker >= SPAWN_FAILS_FROM.load(SeqCst)
    }

    pub(super) fn threads(available: usize) -> usize {
        match THREADS.load(SeqCst) {
            0 => available,
            set => set,
        }
    }

    /// Rows of `3 * BLOCK_COLS + 5` columns: several blocks, so two workers
    /// where there are two CPUs.
    fn blocks_input() -> (usize, Vec<f32>, ClipConfig) {
        // Over PARALLEL_MIN_BYTES, so that the pass starts its threads.
        let (n, d) = (176, 3 * super::BLOCK_COLS + 5);
        assert!(n * d * 4 >= super::super::PARALLEL_MIN_BYTES);
        let rows: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        (n, rows, ClipConfig::fixed(1.0, MicroBatches::Uniform(2)))
    }

    /// `clipper.clip` of `(config, rows, n)` on a thread of its own, the pass
    /// seeing `threads` CPUs (0: the machine's own) and the threads of workers
    /// `spawn_fails_from` and later refused; the hooks are reset afterwards.
    /// Panics with `hung` if the call has not returned within 60 s.
    fn clip_with_refused_threads(
        mut clipper: Clipper,
        (config, rows, n): (&ClipConfig, &[f32], usize),
        threads: usize,
        spawn_fails_from: usize,
        hung: &str,
    ) -> ClipOutput {
        THREADS.store(threads, SeqCst);
        SPAWN_FAILS_FROM.store(spawn_fails_from, SeqCst);
        let (send, receive) = mpsc::channel();
        let (config, rows) = (config.clone(), rows.to_vec());
        std::thread::spawn(move || {
            let out = clipper.clip(&config, &[&rows], n);
            send.send(out).unwrap();
        });
        let outcome = receive.recv_timeout(Duration::from_secs(60));
        THREADS.store(0, SeqCst);
        SPAWN_FAILS_FROM.store(usize::MAX, SeqCst);
        outcome.expect(hung).unwrap()
    }

    /// A worker thread that cannot be started (a process or memory limit) makes
    /// the call run the pass on the calling thread, with the same result, instead
    /// of leaving the started workers at the barrier (which hung the call).
    #[test]
    fn a_thread_that_cannot_start_leaves_the_pass_to_the_caller() {
        let _hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (n, rows, config) = blocks_input();
        let mut clipper = Clipper::new(Backend::Cpu).unwrap();
        let before = clipper.clip(&config, &[&rows], n).unwrap();
        assert!(before.grads[0].iter().any(|&v| v != 0.0));
        // The last of two workers (with one CPU, the only one).
        let after = clip_with_refused_threads(
            clipper,
            (&config, &rows, n),
            0,
            threads.min(2) - 1,
            "the call hung when a thread could not start",
        );
        let bits =
            |v: &[Vec<f32>]| -> Vec<u32> { v.concat().iter().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&before.grads), bits(&after.grads));
        assert_eq!(before.stats.norms, after.stats.norms);
    }

    /// With three workers, a thread that cannot start after another one has
    /// started: the start gate sends the started worker back before its first
    /// barrier, which it would otherwise wait at for a worker that does not
    /// exist (the call hung), and the calling thread runs the pass alone.
    #[test]
    fn a_later_thread_that_cannot_start_releases_the_started_ones() {
        let _hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, rows, config) = blocks_input();
        let mut clipper = Clipper::new(Backend::Cpu).unwrap();
        let before = clipper.clip(&config, &[&rows], n).unwrap();
        let after = clip_with_refused_threads(
            clipper,
            (&config, &rows, n),
            3,
            2,
            "the call hung when its third thread could not start",
        );
        assert_eq!(before, after);
    }

    /// A worker that panics makes the call panic with its message, instead of
    /// leaving the other workers at the barrier (which hung the call before).
    #[test]
    fn a_worker_panic_reaches_the_caller_without_hanging() {
        let _hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        // Two workers need two blocks of columns and two threads (with one CPU
        // there is one worker, no one to leave waiting, and the test only
        // checks that the panic reaches the caller).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (n, rows, config) = blocks_input();
        let mut clipper = Clipper::new(Backend::Cpu).unwrap();
        let before = clipper.clip(&config, &[&rows], n).unwrap();

        // Worker 0 runs on the calling thread, the others on threads of their own.
        for panicking in [threads.min(2) - 1, 0] {
            PANIC_WORKER.store(panicking, SeqCst);
            let (send, receive) = mpsc::channel();
            let (config_, rows_) = (config.clone(), rows.clone());
            std::thread::spawn(move || {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    clipper.clip(&config_, &[&rows_], n)
                }));
                let message = caught.err().map(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                });
                send.send((message, clipper)).unwrap();
            });
            let outcome = receive.recv_timeout(Duration::from_secs(60));
            PANIC_WORKER.store(usize::MAX, SeqCst);
            let (message, clipper_back) = outcome
                .unwrap_or_else(|_| panic!("the call hung after worker {panicking} panicked"));
            clipper = clipper_back;
            assert_eq!(message.as_deref(), Some("injected worker panic"));
            // The clipper still works afterwards, with the same result.
            let after = clipper.clip(&config, &[&rows], n).unwrap();
            assert_eq!(before.grads, after.grads);
        }
        assert!(before.grads[0].iter().any(|&v| v != 0.0));
    }
}
