"""Micro-batch clipping in the CPU peers of issue 3 (numpy, JAX jit), on this machine.

The same operation and shapes as `bench_report --backend cpu`: per-sample
gradients x of shape [N, D] (f32), M = N / b micro-batches of b consecutive rows,
g_j = mean of micro-batch j, s_j = min(1, C / ||g_j||), out = mean_j s_j g_j, with
C the median micro-batch norm (about half the micro-batches clipped). Prints a
markdown table of medians over --runs timed calls after 2 warm-up calls, each
beside a plain sum over the same array in the same framework (its read floor).

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install numpy jax
    /tmp/peers/bin/python benches/peers/clip_peers.py [--runs 11] [--scale 1]

Not run by CI; the figures go into BENCHMARKS.md beside microclip's CPU rows.
"""

import argparse
import statistics
import time

import numpy as np

CASES = [  # (name, N, D, b), as bench_report's CPU cases
    ("main", 256, 1_000_000, 1),
    ("main", 256, 1_000_000, 8),
    ("main", 256, 1_000_000, 32),
    ("wide", 64, 4_000_000, 4),
    ("tall", 1024, 65_536, 16),
]


def numpy_clip(x, b, c):
    n, d = x.shape
    g = x.reshape(n // b, b, d).mean(axis=1)
    norms = np.sqrt(np.einsum("md,md->m", g, g))
    s = np.minimum(1.0, c / norms).astype(np.float32)
    return (s @ g) / g.shape[0]


def median_ms(f, runs):
    for _ in range(2):
        f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--scale", type=int, default=1, help="divide every D by this")
    args = ap.parse_args()
    try:
        import jax
        import jax.numpy as jnp

        jax_clip = jax.jit(
            lambda x, c, b: _jax_clip(jnp, x, c, b), static_argnums=(2,)
        )
        jax_sum = jax.jit(jnp.sum)
        jax_name = f"JAX {jax.__version__} jit ({jax.devices()[0].platform})"
    except ImportError:
        jax = None
        jax_name = "JAX (not installed)"
    print(f"numpy {np.__version__}; {jax_name}; median of {args.runs} runs after 2 warm-up")
    print()
    print("| case | N | D | b | numpy ms | numpy sum ms | JAX jit ms | JAX sum ms | JAX vs numpy rel L2 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(7)
    for name, n, d, b in CASES:
        d = max(1, d // args.scale)
        x = rng.standard_normal((n, d), dtype=np.float32)
        g = x.reshape(n // b, b, d).mean(axis=1)
        c = float(np.median(np.linalg.norm(g, axis=1)))
        del g
        want = numpy_clip(x, b, c)
        np_ms = median_ms(lambda: numpy_clip(x, b, c), args.runs)
        np_sum = median_ms(lambda: x.sum(), args.runs)
        jax_ms = jax_sum_ms = err = float("nan")
        if jax is not None:
            xj = jax.device_put(x)
            got = np.asarray(jax_clip(xj, c, b))
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            # Both accumulate in f32 (JAX's XLA sums are less exact: about 1e-4
            # relative over 4M columns).
            assert err < 1e-3, f"JAX and numpy disagree: rel L2 {err:.1e}"
            jax_ms = median_ms(lambda: jax_clip(xj, c, b).block_until_ready(), args.runs)
            jax_sum_ms = median_ms(lambda: jax_sum(xj).block_until_ready(), args.runs)
            del xj
        print(
            f"| {name} | {n} | {d} | {b} | {np_ms:.1f} | {np_sum:.1f} | {jax_ms:.1f} | {jax_sum_ms:.1f} | {err:.1e} |",
            flush=True,
        )
        del x


def _jax_clip(jnp, x, c, b):
    n, d = x.shape
    g = x.reshape(n // b, b, d).mean(axis=1)
    norms = jnp.sqrt(jnp.sum(g * g, axis=1))
    s = jnp.minimum(1.0, c / norms)
    return (s @ g) / g.shape[0]


if __name__ == "__main__":
    main()
