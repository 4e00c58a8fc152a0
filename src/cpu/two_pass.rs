//! Two passes over fixed column blocks (rayon over blocks): the norms of every
//! micro-batch mean, then, once the factors are known, the weighted sum. Each block's
//! working set (one f64 mean or accumulator row of `BLOCK_COLS`) stays in the
//! core's cache; the input is read twice.

use rayon::prelude::*;

use super::{as_f32, axpy, axpy_rows, scale_and_sum_squares, sum_squares, Plan};
use crate::dtype::{Dtype, GradElement};

/// Squared norm of block `b`'s part of micro-batch `j`'s mean; `sum` is scratch.
fn block_ssq<T: GradElement>(
    plan: &Plan<'_, T>,
    b: &super::Block,
    j: usize,
    sum: &mut [f64],
) -> f64 {
    let rows = plan.rows(j);
    if rows.len() == 1 {
        return as_f32(plan.segment(b, rows.start), sum_squares);
    }
    let inv_n = 1.0 / rows.len() as f64;
    let sum = &mut sum[..b.w];
    plan.row_sums(b, rows, sum);
    scale_and_sum_squares(sum, inv_n, None)
}

/// Pass 1: the `[M, G]` norms, per block in parallel, summed in block order.
pub(super) fn norms<T: GradElement>(plan: &Plan<'_, T>) -> Vec<f64> {
    let m = plan.micro_batches();
    let ssq: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .map(|b| {
            let mut sum = vec![0.0f64; b.w];
            (0..m).map(|j| block_ssq(plan, b, j, &mut sum)).collect()
        })
        .collect();
    (0..m).flat_map(|j| plan.norms(|k| ssq[k][j])).collect()
}

/// Pass 2, once the `[M, G]` factors are known: per tensor,
/// `sum_j s_j * mean_j = sum_i (s_j(i) / n_j(i)) * x_i`, block by block.
pub(super) fn sums<T: GradElement>(plan: &Plan<'_, T>, factors: &[f64]) -> Vec<Vec<f64>> {
    let block_sums: Vec<Vec<f64>> = plan
        .blocks
        .par_iter()
        .map(|b| {
            let mut acc = vec![0.0f64; b.w];
            // f32 rows as they are, several per sweep of the accumulator.
            let mut terms: Vec<(f64, &[f32])> = Vec::new();
            for j in 0..plan.micro_batches() {
                let s = factors[j * plan.groups + plan.group(b)];
                if s == 0.0 && !plan.propagate {
                    continue;
                }
                let rows = plan.rows(j);
                let coef = s / rows.len() as f64;
                for i in rows {
                    if T::DTYPE == Dtype::F32 {
                        terms.push((coef, bytemuck::cast_slice(plan.segment(b, i))));
                    } else {
                        as_f32(plan.segment(b, i), |x| axpy(&mut acc, coef, x));
                    }
                }
            }
            axpy_rows(&mut acc, &terms);
            acc
        })
        .collect();
    plan.per_tensor(block_sums.iter().map(Vec::as_slice))
}
