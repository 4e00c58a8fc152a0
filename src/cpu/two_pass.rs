//! Two passes over fixed column blocks (rayon over blocks): the norms of every
//! micro-batch mean, then, once the factors are known, the weighted sum. Each block's
//! working set (one f64 mean or accumulator row of `BLOCK_COLS`) stays in the
//! core's cache. The second pass reads the input again ([`norms`], [`sums`]) or,
//! from 3 rows per micro-batch on, the f32 means the first pass stored
//! ([`norms_and_means`], [`sums_of_means`]): `1 / b` of the input's elements, so
//! the step moves about `1 + 2 / b` inputs' worth of bytes (means written and read
//! back) instead of 2 (N = 64, D = 4M, b = 4 on the 2-core VM: 109 ms -> 79 ms).
//! The means are written past the cache on x86-64 ([`super::loops::store_means`]), which
//! spares their lines' read for ownership, `1 / b` more (`1 + 3 / b` elsewhere;
//! the same shape on the Xeon VM: 69.6-75.1 ms -> 62.3-66.3).

use rayon::prelude::*;

use super::{axpy_rows, fence_streamed_means, mean_too_coarse, Plan};
use crate::dtype::GradElement;

/// Pass 1: the `[M, G]` norms, per block in parallel, summed in block order.
pub(super) fn norms<T: GradElement>(plan: &Plan<'_, T>) -> Vec<f64> {
    let m = plan.micro_batches();
    let ssq: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .with_min_len(plan.min_len(1))
        .map(|b| {
            let mut sum = vec![0.0f64; b.w];
            (0..m)
                .map(|j| plan.mean_ssq(b, plan.rows(j), &mut sum, None, false))
                .collect()
        })
        .collect();
    (0..m).flat_map(|j| plan.norms(|k| ssq[k][j])).collect()
}

/// Pass 2, once the `[M, G]` factors are known: per tensor, `sum_j s_j * mean_j`,
/// block by block, from the rows: one-row micro-batches as `s_j * x_i`, several
/// rows per sweep of the accumulator; the others summed first, then scaled
/// ([`add_means_from_rows`]), as the reference does. (Adding `(s_j / n_j) * x_i`
/// row by row instead let rows that cancel, say `1` and `-1` in a micro-batch of
/// norm 1e-18 that Normalize scales by 1e18, swamp the other micro-batches'
/// terms in the accumulator.)
pub(super) fn sums<T: GradElement>(
    plan: &Plan<'_, T>,
    norms: &[f64],
    factors: &[f64],
) -> Vec<Vec<f64>> {
    let block_sums: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .with_min_len(plan.min_len(1))
        .map(|b| {
            let mut acc = vec![0.0f64; b.w];
            let mut terms: Vec<(f64, &[T])> = Vec::new();
            let mut several = Vec::new();
            for (_, rows, s, _) in block_terms(plan, b, norms, factors) {
                if rows.len() > 1 {
                    several.push((rows, s));
                } else {
                    terms.push((s, plan.segment(b, rows.start)));
                }
            }
            axpy_rows(&mut acc, &terms, plan.f16c);
            add_means_from_rows(plan, &mut acc, b, several);
            acc
        })
        .collect();
    plan.per_tensor(block_sums.iter().map(Vec::as_slice))
}

/// The micro-batches pass 2 adds to block `b`: `(j, rows, s_j, from_rows)` for each
/// whose factor is not a dropped 0 (a 0 stays under Propagate, where `0 * NaN`
/// must show); `from_rows`: several rows whose norm is below 2^-64, to be summed
/// from the rows and then scaled ([`mean_too_coarse`], [`add_means_from_rows`]).
fn block_terms<'p, T: GradElement>(
    plan: &'p Plan<'_, T>,
    b: &'p super::Block,
    norms: &'p [f64],
    factors: &'p [f64],
) -> impl Iterator<Item = (usize, std::ops::Range<usize>, f64, bool)> + 'p {
    (0..plan.micro_batches()).filter_map(move |j| {
        let at = j * plan.groups + plan.group(b);
        let s = factors[at];
        if s == 0.0 && !plan.propagate {
            return None;
        }
        let rows = plan.rows(j);
        let from_rows = rows.len() > 1 && mean_too_coarse(norms[at]);
        Some((j, rows, s, from_rows))
    })
}

/// `acc += s * mean` for each (rows, s) of `means`, from the rows
/// ([`Plan::add_mean_from_rows`]).
fn add_means_from_rows<T: GradElement>(
    plan: &Plan<'_, T>,
    acc: &mut [f64],
    b: &super::Block,
    means: Vec<(std::ops::Range<usize>, f64)>,
) {
    if means.is_empty() {
        return;
    }
    let mut sum = vec![0.0f64; b.w];
    for (rows, s) in means {
        plan.add_mean_from_rows(acc, b, rows, s, &mut sum);
    }
}

/// The block-major means cut into each block's `M x w` means, in block order
/// (`split_at` or `split_at_mut`, for the pass that reads or writes them).
fn per_block<T: GradElement, S: Default>(
    plan: &Plan<'_, T>,
    mut rest: S,
    split_at: impl Fn(S, usize) -> (S, S),
) -> Vec<S> {
    let m = plan.micro_batches();
    plan.blocks
        .iter()
        .map(|b| {
            let (mine, after) = split_at(std::mem::take(&mut rest), m * b.w);
            rest = after;
            mine
        })
        .collect()
}

/// Pass 1 storing the means: the `[M, G]` norms, and every micro-batch mean as f32
/// in `means`, block-major (block k's `M x w_k` means follow block k - 1's), so
/// that pass 2 reads `1 / b` of the input's bytes instead of the input again.
pub(super) fn norms_and_means<T: GradElement>(plan: &Plan<'_, T>, means: &mut [f32]) -> Vec<f64> {
    let m = plan.micro_batches();
    let ssq: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .with_min_len(plan.min_len(1))
        .zip(per_block(plan, means, <[f32]>::split_at_mut))
        .map(|(b, mine)| {
            let mut sum = vec![0.0f64; b.w];
            let ssq = mine
                .chunks_mut(b.w)
                .enumerate()
                .map(|(j, mean)| plan.mean_ssq(b, plan.rows(j), &mut sum, Some(mean), true))
                .collect();
            fence_streamed_means();
            ssq
        })
        .collect();
    (0..m).flat_map(|j| plan.norms(|k| ssq[k][j])).collect()
}

/// Pass 2 over the stored means of [`norms_and_means`]: per tensor,
/// `sum_j s_j * mean_j`, block by block (from the rows where the stored mean is
/// too coarse for its norm, see [`mean_too_coarse`]).
pub(super) fn sums_of_means<T: GradElement>(
    plan: &Plan<'_, T>,
    norms: &[f64],
    factors: &[f64],
    means: &[f32],
) -> Vec<Vec<f64>> {
    let block_sums: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .with_min_len(plan.min_len(1))
        .zip(per_block(plan, means, <[f32]>::split_at))
        .map(|(b, mine)| {
            let mut acc = vec![0.0f64; b.w];
            let mut terms: Vec<(f64, &[f32])> = Vec::new();
            let mut coarse = Vec::new();
            for (j, rows, s, from_rows) in block_terms(plan, b, norms, factors) {
                if from_rows {
                    coarse.push((rows, s));
                } else {
                    terms.push((s, &mine[j * b.w..(j + 1) * b.w]));
                }
            }
            axpy_rows(&mut acc, &terms, plan.f16c);
            add_means_from_rows(plan, &mut acc, b, coarse);
            acc
        })
        .collect();
    plan.per_tensor(block_sums.iter().map(Vec::as_slice))
}
